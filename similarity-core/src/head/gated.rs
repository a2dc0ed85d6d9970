//! `GatedHead`: per-component gates on the input (Quaterion's `GatedHead`).
//!
//! ```text
//! y = dropout(x) ⊙ tanh(gates)
//! ```
//!
//! `gates: (d)` starts at the constant 2 (`tanh 2 ≈ 0.964`), so every component is
//! enabled at first; training can switch components off or flip their sign. It has only
//! `d` parameters, which suits very small training sets. Shapes: `(batch, d)` →
//! `(batch, d)`. Default: `dropout = 0`.
//!
//! Variables: `gates` (Quaterion's state-dict name).

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{Head, Plan, check_dropout, check_input, check_input_size};
use crate::error::Result;
use crate::limits::ParamCount;
use crate::nn::{Init, Mode, ParamScope, dropout};

/// Initial value of every gate (Quaterion's `reset_parameters`).
pub const GATE_INIT: f64 = 2.0;

/// Options of [`GatedHead`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatedHeadConfig {
    /// Dropout on the head's input. Default 0.
    pub dropout: f64,
}

/// Element-wise gates; see the module docs for the formula.
#[derive(Debug, Clone)]
pub struct GatedHead {
    config: GatedHeadConfig,
    size: usize,
    gates: Tensor,
}

#[diagnostic::do_not_recommend]
impl Head for GatedHead {
    type Config = GatedHeadConfig;
    const NAME: &'static str = "GatedHead";

    fn new(input_size: usize, config: Self::Config, params: &mut ParamScope) -> Result<Self> {
        Self::plan(input_size, &config)?;
        let gates = params.var("gates", &[input_size], Init::Const(GATE_INIT))?;
        Ok(GatedHead {
            config,
            size: input_size,
            gates,
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

impl GatedHead {
    /// The output size and parameter count for `config` on inputs of `input_size`, every
    /// option checked first (see [`Head::check_config`]).
    pub(crate) fn plan(input_size: usize, config: &GatedHeadConfig) -> Result<Plan> {
        check_dropout(Self::NAME, "dropout", config.dropout)?;
        check_input_size(Self::NAME, input_size)?;
        let mut params = ParamCount::new(Self::NAME);
        params.add(1, &[input_size])?;
        Ok(Plan {
            output_size: input_size,
            params,
        })
    }

    /// The gating without the input dropout (Quaterion's `transform`).
    pub(crate) fn transform(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.broadcast_mul(&self.gates.tanh()?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Params;
    use candle_core::Device;

    #[test]
    fn gates_start_at_two_and_scale_by_tanh() {
        let mut p = Params::new(&Device::Cpu, 0);
        let head = GatedHead::new(2, Default::default(), &mut p.scope("head")).unwrap();
        assert_eq!(
            p.named_vars()["head.gates"].to_vec1::<f32>().unwrap(),
            vec![2.0, 2.0]
        );
        let x = Tensor::new(&[[1.0f32, -3.0]], &Device::Cpu).unwrap();
        let y = head
            .forward(&x, &mut Mode::Eval)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let t = 2f32.tanh();
        assert!((y[0][0] - t).abs() < 1e-6 && (y[0][1] + 3.0 * t).abs() < 1e-6);
    }
}
