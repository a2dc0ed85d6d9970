//! `LinearHead`: one fully connected layer.
//!
//! ```text
//! y = dropout(x) Wᵀ + b,   W: (output_size, d),  b: (output_size)
//! ```
//!
//! Quaterion 0.1.19 has no `LinearHead`; this is the one-layer case of
//! `StackedProjectionHead` under shorter names. `W` and `b` take PyTorch's default
//! initialisation `U(−1/√d, 1/√d)`. Shapes: `(batch, d)` → `(batch, output_size)`.
//! Defaults: `output_size = None` (the input size), `bias = true`, `dropout = 0`.
//!
//! Variables: `linear.weight`, `linear.bias`.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{Head, Plan, check_dropout, check_input, check_input_size, check_width};
use crate::error::Result;
use crate::limits::ParamCount;
use crate::nn::{Linear, Mode, ParamScope, dropout};

/// Options of [`LinearHead`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinearHeadConfig {
    /// Output size; `None` keeps the input size. Default `None`.
    pub output_size: Option<usize>,
    /// Whether the layer has a bias. Default true.
    pub bias: bool,
    /// Dropout on the head's input. Default 0.
    pub dropout: f64,
}

impl Default for LinearHeadConfig {
    fn default() -> Self {
        LinearHeadConfig {
            output_size: None,
            bias: true,
            dropout: 0.0,
        }
    }
}

/// A single linear projection; see the module docs for the formula.
#[derive(Debug, Clone)]
pub struct LinearHead {
    config: LinearHeadConfig,
    size: usize,
    out: usize,
    linear: Linear,
}

#[diagnostic::do_not_recommend]
impl Head for LinearHead {
    type Config = LinearHeadConfig;
    const NAME: &'static str = "LinearHead";

    fn new(input_size: usize, config: Self::Config, params: &mut ParamScope) -> Result<Self> {
        let out = Self::plan(input_size, &config)?.output_size;
        let linear = Linear::new(input_size, out, config.bias, &mut params.scope("linear"))?;
        Ok(LinearHead {
            config,
            size: input_size,
            out,
            linear,
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
        self.out
    }

    fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        check_input(x, self.size, Self::NAME)?;
        self.transform(&dropout(x, self.config.dropout, mode)?)
    }
}

impl LinearHead {
    /// The output size and parameter count for `config` on inputs of `input_size`, every
    /// option checked first (see [`Head::check_config`]).
    pub(crate) fn plan(input_size: usize, config: &LinearHeadConfig) -> Result<Plan> {
        check_dropout(Self::NAME, "dropout", config.dropout)?;
        check_input_size(Self::NAME, input_size)?;
        let out = config.output_size.unwrap_or(input_size);
        check_width(Self::NAME, "output_size", out)?;
        let mut params = ParamCount::new(Self::NAME);
        params.add(1, &[out, input_size])?;
        if config.bias {
            params.add(1, &[out])?;
        }
        Ok(Plan {
            output_size: out,
            params,
        })
    }

    /// The projection without the input dropout.
    pub(crate) fn transform(&self, x: &Tensor) -> Result<Tensor> {
        self.linear.forward(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Params;
    use candle_core::Device;

    #[test]
    fn projects_to_output_size_with_named_variables() {
        let mut p = Params::new(&Device::Cpu, 0);
        let config = LinearHeadConfig {
            output_size: Some(2),
            ..Default::default()
        };
        let head = LinearHead::new(3, config, &mut p.scope("head")).unwrap();
        assert_eq!(head.output_size(), 2);
        let x = Tensor::new(&[[1.0f32, 0.0, 0.0]], &Device::Cpu).unwrap();
        let y = head
            .forward(&x, &mut Mode::Eval)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let w = p.named_vars()["head.linear.weight"]
            .to_vec2::<f32>()
            .unwrap();
        let b = p.named_vars()["head.linear.bias"].to_vec1::<f32>().unwrap();
        assert!((y[0][1] - (w[1][0] + b[1])).abs() < 1e-6);
        let e = LinearHead::new(
            3,
            LinearHeadConfig {
                output_size: Some(0),
                ..Default::default()
            },
            &mut p.scope("h2"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("output_size"), "{e}");
    }
}
