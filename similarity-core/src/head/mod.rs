//! Heads: the trainable layer on top of the concatenated encoder embeddings.
//!
//! A head maps `(batch, input_size)` to `(batch, output_size)`, where `input_size` is the
//! sum of the encoders' embedding sizes (the `#[trainable_model]` constructor computes it).
//! As in Quaterion's `EncoderHead`, every head first applies its `dropout` to the input.

mod skip_connection;

use candle_core::Tensor;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use skip_connection::{SkipConnectionHead, SkipConnectionHeadConfig};

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
