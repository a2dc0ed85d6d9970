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
//!
//! Every head checks its options before it creates a variable ([`Head::check_config`]):
//! ranges, widths and layer counts against [`crate::limits`], and its parameter count as
//! a product that cannot overflow. A saved model's head options are checked the same way
//! before the head is rebuilt from them.

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
use crate::limits::{self, ParamCount};
use crate::nn::{Mode, ParamScope};

/// The trainable layer of a model.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a head",
    label = "`Head` is not implemented for `{Self}`",
    note = "the #[head] field holds a head such as `SkipConnectionHead`, `LinearHead` or `EmptyHead`; a loss belongs in the #[loss] field"
)]
pub trait Head: Sized + Send + Sync {
    /// Options, with Quaterion's defaults in `Default`. Saved with a servable model.
    type Config: Default + Clone + std::fmt::Debug + Serialize + DeserializeOwned;
    /// A stable type name, written into a saved model's config and checked on load.
    const NAME: &'static str;

    /// Builds the head for inputs of `input_size`, creating its variables in `params`.
    fn new(input_size: usize, config: Self::Config, params: &mut ParamScope) -> Result<Self>;

    /// Checks `config` for inputs of `input_size` without allocating anything: every
    /// option's range, every size against [`crate::limits`], and the parameter count as a
    /// product ([`ParamCount`]). A saved model's head options
    /// are checked with it before the head is built, and every built-in head's
    /// [`new`](Head::new) calls it first, so `new` fails for no other reason than the
    /// device. The default accepts everything: a head of your own whose allocations
    /// follow from its options should check them here.
    fn check_config(input_size: usize, config: &Self::Config) -> Result<()> {
        let _ = (input_size, config);
        Ok(())
    }

    /// The options it was built with.
    fn config(&self) -> &Self::Config;

    /// Size of its input.
    fn input_size(&self) -> usize;

    /// Size of its output, the final embedding.
    fn output_size(&self) -> usize;

    /// `(batch, input_size)` → `(batch, output_size)`.
    fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor>;
}

/// What a built-in head's options give before anything is built: the output size and
/// the parameter count, every option checked.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) output_size: usize,
    pub(crate) params: ParamCount,
}

/// Checks the input size of `head` against [`limits::MAX_WIDTH`].
pub(crate) fn check_input_size(head: &str, input_size: usize) -> Result<()> {
    limits::check_size(&format!("{head} input size"), input_size, limits::MAX_WIDTH)
}

/// Checks a layer width, option `option` of `head`, against [`limits::MAX_WIDTH`].
pub(crate) fn check_width(head: &str, option: &str, width: usize) -> Result<()> {
    limits::check_size(
        &format!("{head} option `{option}`"),
        width,
        limits::MAX_WIDTH,
    )
}

/// Checks a layer count, option `option` of `head`, against [`limits::MAX_LAYERS`].
pub(crate) fn check_layers(head: &str, option: &str, layers: usize) -> Result<()> {
    limits::check_size(
        &format!("{head} option `{option}`"),
        layers,
        limits::MAX_LAYERS,
    )
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use candle_core::Device;

    use super::*;
    use crate::nn::Params;

    type Checked = std::result::Result<(), String>;

    /// `H::check_config` on inputs of `input` with `config`, errors as text.
    fn check<H: Head>(input: usize, config: H::Config) -> Checked {
        H::check_config(input, &config).map_err(|e| e.to_string())
    }

    fn switch(option: SwitchOption) -> SwitchHeadConfig {
        SwitchHeadConfig {
            options: BTreeMap::from([("a".to_string(), option)]),
            ..Default::default()
        }
    }

    /// Every sized option of every head at 0, at its bound, past it, at 2^62 and at the
    /// maximum. Past the bound the error names the option and the value; at the bound
    /// the head is accepted, or, where the size squared is past the parameter bound (a
    /// 2^16 × 2^16 layer), refused for its parameter count.
    #[test]
    fn every_size_of_every_head_is_bounded() {
        let (w, l) = (limits::MAX_WIDTH, limits::MAX_LAYERS);
        // (head, option as the error names it, bound, accepted at the bound, check).
        type Case = (
            &'static str,
            &'static str,
            usize,
            bool,
            fn(usize) -> Checked,
        );
        let table: [Case; 17] = [
            ("EmptyHead", "input size", w, true, |v| {
                check::<EmptyHead>(v, Default::default())
            }),
            ("GatedHead", "input size", w, true, |v| {
                check::<GatedHead>(v, Default::default())
            }),
            ("LinearHead", "input size", w, false, |v| {
                check::<LinearHead>(v, Default::default())
            }),
            ("LinearHead", "`output_size`", w, true, |v| {
                let output_size = Some(v);
                check::<LinearHead>(
                    8,
                    LinearHeadConfig {
                        output_size,
                        ..Default::default()
                    },
                )
            }),
            ("SkipConnectionHead", "input size", w, false, |v| {
                check::<SkipConnectionHead>(v, Default::default())
            }),
            ("SkipConnectionHead", "`n_layers`", l, true, |v| {
                let config = SkipConnectionHeadConfig {
                    n_layers: v,
                    ..Default::default()
                };
                check::<SkipConnectionHead>(8, config)
            }),
            ("SoftmaxEmbeddingsHead", "input size", w, true, |v| {
                let config = SoftmaxEmbeddingsHeadConfig {
                    output_groups: 2,
                    output_size_per_group: 2,
                    dropout: 0.0,
                };
                check::<SoftmaxEmbeddingsHead>(v, config)
            }),
            ("SoftmaxEmbeddingsHead", "`output_groups`", w, true, |v| {
                let config = SoftmaxEmbeddingsHeadConfig {
                    output_groups: v,
                    output_size_per_group: 1,
                    dropout: 0.0,
                };
                check::<SoftmaxEmbeddingsHead>(8, config)
            }),
            (
                "SoftmaxEmbeddingsHead",
                "`output_size_per_group`",
                w,
                true,
                |v| {
                    let config = SoftmaxEmbeddingsHeadConfig {
                        output_groups: 1,
                        output_size_per_group: v,
                        dropout: 0.0,
                    };
                    check::<SoftmaxEmbeddingsHead>(8, config)
                },
            ),
            ("StackedProjectionHead", "input size", w, true, |v| {
                let output_sizes = vec![4];
                let config = StackedProjectionHeadConfig {
                    output_sizes,
                    ..Default::default()
                };
                check::<StackedProjectionHead>(v, config)
            }),
            ("StackedProjectionHead", "`output_sizes[1]`", w, true, |v| {
                let output_sizes = vec![4, v];
                let config = StackedProjectionHeadConfig {
                    output_sizes,
                    ..Default::default()
                };
                check::<StackedProjectionHead>(8, config)
            }),
            ("WideningHead", "input size", w, false, |v| {
                let config = WideningHeadConfig {
                    expansion_factor: 1.0,
                    ..Default::default()
                };
                check::<WideningHead>(v, config)
            }),
            // The hidden width is `1 × expansion_factor`.
            ("WideningHead", "`expansion_factor`", w, true, |v| {
                let expansion_factor = v as f64;
                check::<WideningHead>(
                    1,
                    WideningHeadConfig {
                        expansion_factor,
                        ..Default::default()
                    },
                )
            }),
            ("SequentialHead", "input size", w, true, |v| {
                check::<SequentialHead>(v, Default::default())
            }),
            ("SequentialHead", "`layers[1].out`", w, true, |v| {
                let layers = vec![Layer::Relu, Layer::linear(v)];
                check::<SequentialHead>(
                    8,
                    SequentialHeadConfig {
                        layers,
                        output_size: None,
                    },
                )
            }),
            ("SwitchHead", "input size", w, true, |v| {
                check::<SwitchHead>(v, switch(SwitchOption::GatedHead(Default::default())))
            }),
            (
                "SwitchHead",
                "`options.a` (LinearHead option `output_size`)",
                w,
                true,
                |v| {
                    let output_size = Some(v);
                    let option = SwitchOption::LinearHead(LinearHeadConfig {
                        output_size,
                        ..Default::default()
                    });
                    check::<SwitchHead>(8, switch(option))
                },
            ),
        ];
        for (head, option, bound, accepted_at_bound, check) in table {
            for v in [0, bound, bound + 1, 1 << 62, usize::MAX] {
                let case = format!("{head} {option} = {v}");
                match check(v) {
                    Ok(()) => assert!(v == bound && accepted_at_bound, "{case} was accepted"),
                    Err(e) if v == bound => {
                        assert!(
                            !accepted_at_bound && e.contains("MAX_PARAMETERS"),
                            "{case}: {e}"
                        )
                    }
                    Err(e) => {
                        assert!(e.contains(head) && e.contains(option), "{case}: {e}");
                        // A float prints its own digits (1.8446744073709552e19).
                        if !option.contains("expansion_factor") {
                            assert!(e.contains(&v.to_string()), "{case}: {e}");
                        }
                    }
                }
            }
        }
    }

    /// Lists of layers or heads: at most `MAX_LAYERS` entries.
    #[test]
    fn every_list_of_layers_is_bounded() {
        let l = limits::MAX_LAYERS;
        for (n, ok) in [(l, true), (l + 1, false)] {
            let output_sizes = vec![4; n];
            let config = StackedProjectionHeadConfig {
                output_sizes,
                ..Default::default()
            };
            assert_eq!(
                check::<StackedProjectionHead>(8, config).is_ok(),
                ok,
                "{n} sizes"
            );
            let layers = vec![Layer::Relu; n];
            let config = SequentialHeadConfig {
                layers,
                output_size: None,
            };
            assert_eq!(check::<SequentialHead>(8, config).is_ok(), ok, "{n} layers");
            let options = (0..n)
                .map(|i| (format!("h{i}"), SwitchOption::EmptyHead(Default::default())))
                .collect();
            let config = SwitchHeadConfig {
                options,
                ..Default::default()
            };
            assert_eq!(check::<SwitchHead>(8, config).is_ok(), ok, "{n} options");
        }
        let e = check::<StackedProjectionHead>(8, Default::default()).unwrap_err();
        assert!(e.contains("output_sizes"), "{e}");
        assert!(check::<SwitchHead>(8, Default::default()).is_err());
    }

    /// `new` checks before it creates a variable: nothing is allocated for a refused
    /// config, even one whose parameters each fit in the bound but not together.
    #[test]
    fn new_refuses_before_allocating() {
        let mut p = Params::new(&Device::Cpu, 0);
        let deep = SkipConnectionHeadConfig {
            n_layers: 1 << 62,
            ..Default::default()
        };
        assert!(SkipConnectionHead::new(384, deep, &mut p.scope("a")).is_err());
        let wide = LinearHeadConfig {
            output_size: Some(usize::MAX),
            ..Default::default()
        };
        assert!(LinearHead::new(384, wide, &mut p.scope("b")).is_err());
        let output_sizes = vec![limits::MAX_WIDTH; 3];
        let config = StackedProjectionHeadConfig {
            output_sizes,
            ..Default::default()
        };
        let e = StackedProjectionHead::new(8, config, &mut p.scope("c"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("MAX_PARAMETERS"), "{e}");
        assert_eq!(p.numel(), 0);
        assert!(p.named_vars().is_empty());
    }
}
