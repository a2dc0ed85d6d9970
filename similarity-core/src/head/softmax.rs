//! `SoftmaxEmbeddingsHead`: independent softmax groups (Quaterion's
//! `SoftmaxEmbeddingsHead`).
//!
//! With `g = output_groups`, `s = output_size_per_group` and `p = projection_layer(dropout(x))`
//! reshaped to `(batch, g, s)`:
//!
//! ```text
//! y[b, k, j] = exp(p[b, k, j]) / Σⱼ' exp(p[b, k, j'])     then reshaped to (batch, g·s)
//! ```
//!
//! Each group is a probability distribution, which makes the embedding read as a set of
//! soft categorical choices (useful for confidence). `projection_layer` is a
//! `d → g·s` linear layer with PyTorch's default initialisation. The softmax is written
//! as `exp(p − m) / Σ exp(p − m)` with the detached row maximum `m`, so it is stable and
//! differentiable. Shapes: `(batch, d)` → `(batch, g·s)`.
//!
//! Defaults: Quaterion has none for the two sizes, which are required (≥ 1; the `Default`
//! leaves them 0 and `new` rejects that); `dropout = 0`.
//!
//! Variables: `projection_layer.weight`, `projection_layer.bias`.

use candle_core::{D, Tensor};
use serde::{Deserialize, Serialize};

use super::{Head, Plan, check_dropout, check_input, check_input_size, check_width};
use crate::error::Result;
use crate::limits::{self, ParamCount};
use crate::nn::{Linear, Mode, ParamScope, dropout};

/// Options of [`SoftmaxEmbeddingsHead`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SoftmaxEmbeddingsHeadConfig {
    /// Number of softmax groups `g`. Required.
    pub output_groups: usize,
    /// Size of each group `s`. Required.
    pub output_size_per_group: usize,
    /// Dropout on the head's input. Default 0.
    pub dropout: f64,
}

/// Concatenated softmax groups; see the module docs for the formula.
#[derive(Debug, Clone)]
pub struct SoftmaxEmbeddingsHead {
    config: SoftmaxEmbeddingsHeadConfig,
    size: usize,
    projection: Linear,
}

#[diagnostic::do_not_recommend]
impl Head for SoftmaxEmbeddingsHead {
    type Config = SoftmaxEmbeddingsHeadConfig;
    const NAME: &'static str = "SoftmaxEmbeddingsHead";

    fn new(input_size: usize, config: Self::Config, params: &mut ParamScope) -> Result<Self> {
        let out = Self::plan(input_size, &config)?.output_size;
        let projection = Linear::new(input_size, out, true, &mut params.scope("projection_layer"))?;
        Ok(SoftmaxEmbeddingsHead {
            config,
            size: input_size,
            projection,
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
        self.config.output_groups * self.config.output_size_per_group
    }

    fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        check_input(x, self.size, Self::NAME)?;
        self.transform(&dropout(x, self.config.dropout, mode)?)
    }
}

impl SoftmaxEmbeddingsHead {
    /// The output size and parameter count for `config` on inputs of `input_size`, every
    /// option checked first (see [`Head::check_config`]).
    pub(crate) fn plan(input_size: usize, config: &SoftmaxEmbeddingsHeadConfig) -> Result<Plan> {
        check_dropout(Self::NAME, "dropout", config.dropout)?;
        // Both are required (their `Default` is 0): at least 1 each.
        check_width(Self::NAME, "output_groups", config.output_groups)?;
        check_width(
            Self::NAME,
            "output_size_per_group",
            config.output_size_per_group,
        )?;
        check_input_size(Self::NAME, input_size)?;
        // Both at most 2^16, so the product fits.
        let out = config.output_groups * config.output_size_per_group;
        limits::check_at_most(
            "SoftmaxEmbeddingsHead output size `output_groups × output_size_per_group`",
            out,
            limits::MAX_WIDTH,
        )?;
        let mut params = ParamCount::new(Self::NAME);
        params.add(1, &[out, input_size])?;
        params.add(1, &[out])?;
        Ok(Plan {
            output_size: out,
            params,
        })
    }

    /// Projection and grouped softmax without the input dropout (Quaterion's `transform`).
    pub(crate) fn transform(&self, x: &Tensor) -> Result<Tensor> {
        let p = self.projection.forward(x)?;
        let batch = p.dim(0)?;
        let (g, s) = (self.config.output_groups, self.config.output_size_per_group);
        let p = p.reshape((batch, g, s))?;
        let max = p.max_keepdim(D::Minus1)?.detach();
        let e = p.broadcast_sub(&max)?.exp()?;
        let y = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        Ok(y.reshape((batch, g * s))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Params;
    use candle_core::Device;

    #[test]
    fn every_group_sums_to_one() {
        let mut p = Params::new(&Device::Cpu, 0);
        let config = SoftmaxEmbeddingsHeadConfig {
            output_groups: 3,
            output_size_per_group: 4,
            dropout: 0.0,
        };
        let head = SoftmaxEmbeddingsHead::new(5, config, &mut p.scope("head")).unwrap();
        let x = Tensor::new(&[[1.0f32, -2.0, 30.0, 0.0, 4.0]], &Device::Cpu).unwrap();
        let y = head
            .forward(&x, &mut Mode::Eval)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(y[0].len(), 12);
        for group in y[0].chunks(4) {
            assert!((group.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            assert!(group.iter().all(|v| v.is_finite() && *v >= 0.0));
        }
        let e = SoftmaxEmbeddingsHead::new(5, Default::default(), &mut p.scope("h2"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("output_groups"), "{e}");
    }
}
