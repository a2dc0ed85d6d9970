//! `SoftmaxLoss`: plain cross-entropy over the groups, with a trainable class kernel.
//!
//! For embeddings `X: (N, d)`, the kernel `W: (d, C)` (`C = num_groups`) and group ids
//! `gᵢ ∈ [0, C)`:
//!
//! ```text
//! Z = X W / temperature                         (N, C) logits
//! L = mean_i [ logsumexp_c Z_ic − Z_i,gᵢ ]
//! ```
//!
//! Parameters (defaults are Quaterion's):
//! * `num_groups`: number of classes `C`; required (the default 0 is rejected by `new`).
//! * `temperature`: divides the logits; default 0.05.
//!
//! The kernel is the trainable variable `kernel: (d, C)`, drawn from `N(0, 0.01²)` like
//! Quaterion's. Group ids must be valid class indices; an id outside `[0, C)` is an error
//! that names it. Retrieval metrics compare embeddings with the cosine distance, as in
//! Quaterion (whose group losses default to cosine). The logits and the cross-entropy are
//! the class-logit losses' shared code (`class_logits`).

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::class_logits::{ClassLogits, check_num_groups, class_kernel, class_loss};
use super::{GroupKind, SimilarityLoss};
use crate::data::GroupTargets;
use crate::distance::Distance;
use crate::error::{Error, Result};
use crate::nn::ParamScope;

/// Options of [`SoftmaxLoss`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SoftmaxLossConfig {
    /// Number of groups (classes). Required: must be set to a positive value.
    pub num_groups: usize,
    /// Divides the logits before the softmax. Default 0.05.
    pub temperature: f64,
}

impl Default for SoftmaxLossConfig {
    fn default() -> Self {
        SoftmaxLossConfig {
            num_groups: 0,
            temperature: 0.05,
        }
    }
}

/// Cross-entropy over the groups with a trainable kernel; see the module docs.
#[derive(Debug, Clone)]
pub struct SoftmaxLoss {
    config: SoftmaxLossConfig,
    kernel: Tensor,
}

impl SoftmaxLoss {
    /// The trainable kernel, `(embedding_size, num_groups)`, `f32`.
    pub fn kernel(&self) -> &Tensor {
        &self.kernel
    }
}

#[diagnostic::do_not_recommend]
impl SimilarityLoss for SoftmaxLoss {
    type Kind = GroupKind;
    type Config = SoftmaxLossConfig;
    const NAME: &'static str = "SoftmaxLoss";

    fn new(embedding_size: usize, config: Self::Config, params: &mut ParamScope) -> Result<Self> {
        crate::limits::check_class_table(Self::NAME, config.num_groups, embedding_size)?;
        check_num_groups(Self::NAME, config.num_groups)?;
        if !config.temperature.is_finite() || config.temperature <= 0.0 {
            return Err(Error::invalid(
                "SoftmaxLoss option `temperature`",
                format!("must be a positive number, got {}", config.temperature),
            ));
        }
        let kernel = class_kernel(embedding_size, config.num_groups, params)?;
        Ok(SoftmaxLoss { config, kernel })
    }

    fn config(&self) -> &Self::Config {
        &self.config
    }

    fn distance(&self) -> Distance {
        Distance::Cosine
    }

    fn forward(&self, embeddings: &Tensor, targets: &GroupTargets) -> Result<Tensor> {
        let logits = ClassLogits::Linear {
            temperature: self.config.temperature,
        };
        class_loss(
            Self::NAME,
            logits,
            embeddings,
            &self.kernel,
            &targets.groups,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::scalar;
    use crate::nn::Params;
    use candle_core::Device;

    #[test]
    fn hand_computed_and_validation() {
        let mut params = Params::new(&Device::Cpu, 0);
        let cfg = SoftmaxLossConfig {
            num_groups: 2,
            temperature: 1.0,
        };
        let loss = SoftmaxLoss::new(2, cfg, &mut params.scope("loss")).unwrap();
        params.named_vars()["loss.kernel"]
            .set(&Tensor::new(&[[1.0f32, 0.0], [0.0, 1.0]], &Device::Cpu).unwrap())
            .unwrap();
        // logits = X: row 0 [1, 0] target 0 → ln(1 + e^{-1}); row 1 [0, 2] target 0 → ln(1 + e²).
        let x = Tensor::new(&[[1.0f32, 0.0], [0.0, 2.0]], &Device::Cpu).unwrap();
        let groups = Tensor::new(&[0i64, 0], &Device::Cpu).unwrap();
        let got = scalar(&loss.forward(&x, &GroupTargets { groups }).unwrap());
        let want = ((1.0 + (-1f32).exp()).ln() + (1.0 + 2f32.exp()).ln()) / 2.0;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");

        let bad = Tensor::new(&[0i64, 2], &Device::Cpu).unwrap();
        let err = loss
            .forward(&x, &GroupTargets { groups: bad })
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("group id 2") && err.contains("num_groups = 2"),
            "{err}"
        );

        let err = SoftmaxLoss::new(2, Default::default(), &mut params.scope("other"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("num_groups"), "{err}");
    }
}
