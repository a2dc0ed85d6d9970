//! `WideningHead`: narrow → wide → narrow (Quaterion's `WideningHead`).
//!
//! With `w = ⌊d · expansion_factor⌋` (Python's `int()` truncation):
//!
//! ```text
//! y = fc₂(act(fc₁(dropout(x)))),   fc₁: d → w,   fc₂: w → d
//! ```
//!
//! It is a `StackedProjectionHead` with `output_sizes = [w, d]`; both layers take PyTorch's
//! default initialisation. Shapes: `(batch, d)` → `(batch, d)`.
//!
//! Defaults: `expansion_factor = 4.0`, `activation_fn = "relu"` (any name of
//! [`Activation::NAMES`]), `dropout = 0`.
//!
//! Variables: `_stack.0.weight`, `_stack.0.bias`, `_stack.2.weight`, `_stack.2.bias`.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::stacked::Stack;
use super::{Activation, Head, Plan, check_dropout, check_input, check_input_size};
use crate::error::{Error, Result};
use crate::limits::{self, ParamCount};
use crate::nn::{Mode, ParamScope, dropout};

/// Options of [`WideningHead`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WideningHeadConfig {
    /// Width of the hidden layer relative to the input. Default 4.0.
    pub expansion_factor: f64,
    /// Activation after the hidden layer, by name. Default `"relu"`.
    pub activation_fn: String,
    /// Dropout on the head's input. Default 0.
    pub dropout: f64,
}

impl Default for WideningHeadConfig {
    fn default() -> Self {
        WideningHeadConfig {
            expansion_factor: 4.0,
            activation_fn: "relu".to_string(),
            dropout: 0.0,
        }
    }
}

/// Widen-then-narrow projection; see the module docs for the formula.
#[derive(Debug, Clone)]
pub struct WideningHead {
    config: WideningHeadConfig,
    size: usize,
    hidden: usize,
    stack: Stack,
}

#[diagnostic::do_not_recommend]
impl Head for WideningHead {
    type Config = WideningHeadConfig;
    const NAME: &'static str = "WideningHead";

    fn new(input_size: usize, config: Self::Config, params: &mut ParamScope) -> Result<Self> {
        Self::plan(input_size, &config)?;
        let hidden = Self::hidden_width(input_size, config.expansion_factor)?;
        let activation =
            Activation::from_name(&config.activation_fn, "WideningHead option `activation_fn`")?;
        let stack = Stack::new(input_size, &[hidden, input_size], activation, params)?;
        Ok(WideningHead {
            config,
            size: input_size,
            hidden,
            stack,
        })
    }

    fn check_config(input_size: usize, config: &Self::Config) -> Result<()> {
        Self::plan(input_size, config).map(drop)
    }

    fn config(&self) -> &Self::Config {
        &self.config
    }

    fn input_size(&self) -> usize {
        self.size
    }

    fn output_size(&self) -> usize {
        self.size
    }

    fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        check_input(x, self.size, Self::NAME)?;
        self.transform(&dropout(x, self.config.dropout, mode)?)
    }
}

impl WideningHead {
    /// The output size and parameter count for `config` on inputs of `input_size`, every
    /// option checked first (see [`Head::check_config`]).
    pub(crate) fn plan(input_size: usize, config: &WideningHeadConfig) -> Result<Plan> {
        check_dropout(Self::NAME, "dropout", config.dropout)?;
        check_input_size(Self::NAME, input_size)?;
        let hidden = Self::hidden_width(input_size, config.expansion_factor)?;
        Activation::from_name(&config.activation_fn, "WideningHead option `activation_fn`")?;
        let mut params = ParamCount::new(Self::NAME);
        Stack::plan(Self::NAME, input_size, &[hidden, input_size], &mut params)?;
        Ok(Plan {
            output_size: input_size,
            params,
        })
    }

    /// `⌊d · expansion_factor⌋`, which must be in `1..=MAX_WIDTH`; compared as a float
    /// before the cast, so a huge, infinite or NaN factor cannot saturate into a size.
    fn hidden_width(input_size: usize, expansion_factor: f64) -> Result<usize> {
        let hidden = (input_size as f64 * expansion_factor).trunc();
        if !(1.0..=limits::MAX_WIDTH as f64).contains(&hidden) {
            return Err(Error::invalid(
                "WideningHead option `expansion_factor`",
                format!(
                    "must give 1 to {} hidden units, got input size {input_size} × {expansion_factor} = {hidden}",
                    limits::MAX_WIDTH
                ),
            ));
        }
        Ok(hidden as usize)
    }

    /// Width of the hidden layer, `⌊d · expansion_factor⌋`.
    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    /// The two layers without the input dropout (Quaterion's `transform`).
    pub(crate) fn transform(&self, x: &Tensor) -> Result<Tensor> {
        self.stack.forward(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Params;
    use candle_core::Device;

    #[test]
    fn hidden_width_truncates_like_python_int() {
        let mut p = Params::new(&Device::Cpu, 0);
        let config = WideningHeadConfig {
            expansion_factor: 2.5,
            activation_fn: "tanh".into(),
            dropout: 0.0,
        };
        let head = WideningHead::new(5, config, &mut p.scope("head")).unwrap();
        assert_eq!(head.hidden_size(), 12);
        assert_eq!(p.named_vars()["head._stack.0.weight"].dims(), [12, 5]);
        assert_eq!(p.named_vars()["head._stack.2.weight"].dims(), [5, 12]);
        let bad = WideningHeadConfig {
            expansion_factor: 0.1,
            ..Default::default()
        };
        let e = WideningHead::new(5, bad, &mut p.scope("h2"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("expansion_factor"), "{e}");
    }
}
