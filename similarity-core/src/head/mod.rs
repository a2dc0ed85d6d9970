//! Heads: the trainable layer on top of the concatenated encoder embeddings.
//!
//! A head maps `(batch, input_size)` to `(batch, output_size)`, where `input_size` is the
//! sum of the encoders' embedding sizes (the `#[trainable_model]` constructor computes it).
//! As in Quaterion's `EncoderHead`, every head first applies its `dropout` to the input.
//!
//! | head | formula | variables |
//! |------|---------|-----------|
//! | [`EmptyHead`] | `y = x` | — |
//! | [`GatedHead`] | `y = x ⊙ tanh(gates)`, gates = 2 | `gates` |
//! | [`LinearHead`] | `y = x Wᵀ + b` | `linear.weight`, `linear.bias` |
//! | [`SkipConnectionHead`] | `xᵢ₊₁ = fcᵢ(xᵢ) ⊙ σ(gatesᵢ) + xᵢ`, gates = −4 | `gates_{i}`, `fc_{i}.*` |
//! | [`SoftmaxEmbeddingsHead`] | softmax per group of `projection_layer(x)` | `projection_layer.*` |
//! | [`StackedProjectionHead`] | `fc_L(act(… act(fc_1(x))))` | `_stack.{2i}.*` |
//! | [`WideningHead`] | `fc₂(act(fc₁(x)))`, `d → ⌊d·f⌋ → d` | `_stack.{0,2}.*` |
//! | [`SequentialHead`] | user [`Layer`] list | `_sequential.{k}.*` |
//! | [`SwitchHead`] | row `i` through `options[route[i]]` | `<key>.*` |

mod activation;
mod empty;
mod gated;
mod linear;
mod sequential;
mod skip_connection;
mod softmax;
mod stacked;
mod switch;
mod widening;

use candle_core::Tensor;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use activation::Activation;
pub use empty::{EmptyHead, EmptyHeadConfig};
pub use gated::{GATE_INIT, GatedHead, GatedHeadConfig};
pub use linear::{LinearHead, LinearHeadConfig};
pub use sequential::{Layer, SequentialHead, SequentialHeadConfig};
pub use skip_connection::{SkipConnectionHead, SkipConnectionHeadConfig};
pub use softmax::{SoftmaxEmbeddingsHead, SoftmaxEmbeddingsHeadConfig};
pub use stacked::{StackedProjectionHead, StackedProjectionHeadConfig};
pub use switch::{SwitchHead, SwitchHeadConfig, SwitchOption};
pub use widening::{WideningHead, WideningHeadConfig};

use crate::error::Result;
use crate::nn::{Mode, ParamScope};

/// The trainable layer of a model.
pub trait Head: Sized + Send + Sync {
    /// Options, with Quaterion's defaults in `Default`. Saved with a servable model.
    type Config: Default + Clone + std::fmt::Debug + Serialize + DeserializeOwned;
    /// A stable type name, written into a saved model's config and checked on load.
    const NAME: &'static str;

    /// Builds the head for inputs of `input_size`, creating its variables in `params`.
    fn new(input_size: usize, config: Self::Config, params: &mut ParamScope) -> Result<Self>;

    /// The options it was built with.
    fn config(&self) -> &Self::Config;

    /// Size of its input.
    fn input_size(&self) -> usize;

    /// Size of its output, the final embedding.
    fn output_size(&self) -> usize;

    /// `(batch, input_size)` → `(batch, output_size)`.
    fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor>;
}

/// Checks that a dropout probability `p`, option `option` of `head`, is in `[0, 1)`.
pub(crate) fn check_dropout(head: &str, option: &str, p: f64) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(crate::error::Error::invalid(
            format!("{head} option `{option}`"),
            format!("must be in [0, 1), got {p}"),
        ));
    }
    Ok(())
}

/// Checks that `x` is `(batch, expected)`.
pub(crate) fn check_input(x: &Tensor, expected: usize, head: &str) -> Result<()> {
    if x.rank() != 2 || x.dim(1)? != expected {
        return Err(crate::error::Error::shape(
            format!("{head} input"),
            format!("(batch, {expected})"),
            x.dims(),
        ));
    }
    Ok(())
}
