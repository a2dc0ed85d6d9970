//! `SkipConnectionHead`: gated residual blocks (Quaterion's `SkipConnectionHead`).
//!
//! With `x₀ = dropout(x)` and for each layer `i < n_layers`:
//!
//! ```text
//! xᵢ₊₁ = fcᵢ(skip_dropout(xᵢ)) ⊙ σ(gatesᵢ) + xᵢ
//! ```
//!
//! `fcᵢ` is a `d × d` linear layer (PyTorch's default init) and `gatesᵢ: (d)` starts at
//! −4, so `σ(−4) ≈ 0.018`: the untrained head is close to the identity and training
//! opens the gates only where it helps. Shapes: `(batch, d)` → `(batch, d)`.
//!
//! Variables: `gates_{i}`, `fc_{i}.weight`, `fc_{i}.bias` (Quaterion's state-dict names).

use candle_core::Tensor;
use candle_nn::ops::sigmoid;
use serde::{Deserialize, Serialize};

use super::{Head, Plan, check_dropout, check_input, check_input_size, check_layers};
use crate::error::Result;
use crate::kernels;
use crate::limits::ParamCount;
use crate::nn::{Init, Linear, Mode, ParamScope, dropout};

/// Options of [`SkipConnectionHead`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkipConnectionHeadConfig {
    /// Dropout on the head's input. Default 0.
    pub dropout: f64,
    /// Dropout on the trainable branch only, so the skip path keeps the input intact.
    /// Default 0.
    pub skip_dropout: f64,
    /// Number of gated residual blocks. Default 1.
    pub n_layers: usize,
}

impl Default for SkipConnectionHeadConfig {
    fn default() -> Self {
        SkipConnectionHeadConfig {
            dropout: 0.0,
            skip_dropout: 0.0,
            n_layers: 1,
        }
    }
}

/// Gated residual head; see the module docs for the formula.
#[derive(Debug, Clone)]
pub struct SkipConnectionHead {
    config: SkipConnectionHeadConfig,
    size: usize,
    layers: Vec<(Linear, Tensor)>,
}

#[diagnostic::do_not_recommend]
impl Head for SkipConnectionHead {
    type Config = SkipConnectionHeadConfig;
    const NAME: &'static str = "SkipConnectionHead";

    fn new(input_size: usize, config: Self::Config, params: &mut ParamScope) -> Result<Self> {
        Self::plan(input_size, &config)?;
        let mut layers = Vec::with_capacity(config.n_layers);
        for i in 0..config.n_layers {
            let gates = params.var(&format!("gates_{i}"), &[input_size], Init::Const(-4.0))?;
            let fc = Linear::new(
                input_size,
                input_size,
                true,
                &mut params.scope(&format!("fc_{i}")),
            )?;
            layers.push((fc, gates));
        }
        Ok(SkipConnectionHead {
            config,
            size: input_size,
            layers,
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
        self.transform(&dropout(x, self.config.dropout, mode)?, mode)
    }
}

impl SkipConnectionHead {
    /// The output size and parameter count for `config` on inputs of `input_size`, every
    /// option checked first (see [`Head::check_config`]).
    pub(crate) fn plan(input_size: usize, config: &SkipConnectionHeadConfig) -> Result<Plan> {
        check_dropout(Self::NAME, "dropout", config.dropout)?;
        check_dropout(Self::NAME, "skip_dropout", config.skip_dropout)?;
        check_layers(Self::NAME, "n_layers", config.n_layers)?;
        check_input_size(Self::NAME, input_size)?;
        let d = input_size;
        let mut params = ParamCount::new(Self::NAME);
        // Per block: fc weight (d, d), fc bias (d), gates (d).
        params.add(config.n_layers, &[d, d])?;
        params.add(2 * config.n_layers, &[d])?;
        Ok(Plan {
            output_size: d,
            params,
        })
    }

    /// The blocks without the input dropout (Quaterion's `transform`).
    pub(crate) fn transform(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let mut x = x.clone();
        // The fused block applies when the branch sees the same input as the skip path.
        let fused = self.config.skip_dropout == 0.0 || !mode.is_train();
        for (fc, gates) in &self.layers {
            if fused
                && let Some(bias) = fc.bias()
                && let Some(y) = kernels::skip_connection_layer(&x, fc.weight(), bias, gates)?
            {
                x = y;
                continue;
            }
            let branch = fc.forward(&dropout(&x, self.config.skip_dropout, mode)?)?;
            x = branch.broadcast_mul(&sigmoid(gates)?)?.add(&x)?;
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Params;
    use candle_core::Device;

    #[test]
    fn untrained_head_is_near_identity_and_matches_formula() {
        let mut p = Params::new(&Device::Cpu, 3);
        let head = SkipConnectionHead::new(4, Default::default(), &mut p.scope("head")).unwrap();
        let x = Tensor::new(&[[1.0f32, -2.0, 0.5, 3.0]], &Device::Cpu).unwrap();
        let y = head
            .forward(&x, &mut Mode::Eval)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let w = p.named_vars()["head.fc_0.weight"].to_vec2::<f32>().unwrap();
        let b = p.named_vars()["head.fc_0.bias"].to_vec1::<f32>().unwrap();
        let xv = [1.0f32, -2.0, 0.5, 3.0];
        let gate = 1.0 / (1.0 + 4f32.exp());
        for j in 0..4 {
            let fc: f32 = (0..4).map(|k| w[j][k] * xv[k]).sum::<f32>() + b[j];
            assert!((y[0][j] - (fc * gate + xv[j])).abs() < 1e-5);
        }
        assert_eq!(p.named_vars().len(), 3);
    }

    #[test]
    fn wrong_input_width_is_a_shape_error() {
        let mut p = Params::new(&Device::Cpu, 3);
        let head = SkipConnectionHead::new(4, Default::default(), &mut p.scope("head")).unwrap();
        let x = Tensor::zeros((2, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        let e = head.forward(&x, &mut Mode::Eval).unwrap_err().to_string();
        assert!(e.contains("(batch, 4)") && e.contains("[2, 5]"), "{e}");
    }
}
