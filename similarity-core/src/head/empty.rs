//! `EmptyHead`: the identity (Quaterion's `EmptyHead`).
//!
//! ```text
//! y = dropout(x)
//! ```
//!
//! No trainable variables. Shapes: `(batch, d)` → `(batch, d)`. Default: `dropout = 0`.
//! Useful when the encoders are trained themselves, or as a baseline.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{Head, Plan, check_dropout, check_input, check_input_size};
use crate::error::Result;
use crate::limits::ParamCount;
use crate::nn::{Mode, ParamScope, dropout};

/// Options of [`EmptyHead`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmptyHeadConfig {
    /// Dropout on the head's input. Default 0.
    pub dropout: f64,
}

/// Returns its input unchanged (after dropout).
#[derive(Debug, Clone)]
pub struct EmptyHead {
    config: EmptyHeadConfig,
    size: usize,
}

#[diagnostic::do_not_recommend]
impl Head for EmptyHead {
    type Config = EmptyHeadConfig;
    const NAME: &'static str = "EmptyHead";

    fn new(input_size: usize, config: Self::Config, _params: &mut ParamScope) -> Result<Self> {
        Self::plan(input_size, &config)?;
        Ok(EmptyHead {
            config,
            size: input_size,
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
        dropout(x, self.config.dropout, mode)
    }
}

impl EmptyHead {
    /// The output size and parameter count for `config` on inputs of `input_size`, every
    /// option checked first (see [`Head::check_config`]).
    pub(crate) fn plan(input_size: usize, config: &EmptyHeadConfig) -> Result<Plan> {
        check_dropout(Self::NAME, "dropout", config.dropout)?;
        check_input_size(Self::NAME, input_size)?;
        Ok(Plan {
            output_size: input_size,
            params: ParamCount::new(Self::NAME),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Params;
    use candle_core::Device;

    #[test]
    fn returns_its_input_and_has_no_variables() {
        let mut p = Params::new(&Device::Cpu, 0);
        let head = EmptyHead::new(3, Default::default(), &mut p.scope("head")).unwrap();
        let x = Tensor::new(&[[1.0f32, -2.0, 0.5]], &Device::Cpu).unwrap();
        let y = head.forward(&x, &mut Mode::Eval).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), x.to_vec2::<f32>().unwrap());
        assert!(p.named_vars().is_empty());
        let bad = EmptyHeadConfig { dropout: 1.5 };
        let e = EmptyHead::new(3, bad, &mut p.scope("h2"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("dropout"), "{e}");
    }
}
