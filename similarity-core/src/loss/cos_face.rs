//! `CosFaceLoss`: large margin cosine loss (Wang et al. 2018, "CosFace: Large Margin
//! Cosine Loss for Deep Face Recognition", <https://arxiv.org/abs/1801.09414>).
//!
//! With unit-norm embeddings `x̂ᵢ`, the kernel `W: (d, C)` normalised column by column,
//! `cos θ_ic = x̂ᵢ · ŵ_c` and group ids `gᵢ ∈ [0, C)`:
//!
//! ```text
//! Z_ic = s · (cos θ_ic − m · [c = gᵢ])
//! L    = mean_i [ logsumexp_c Z_ic − Z_i,gᵢ ]
//! ```
//!
//! Parameters (defaults are Quaterion's):
//! * `num_groups`: number of classes `C`; required (the default 0 is rejected by `new`).
//! * `scale` `s`: default 64.
//! * `margin` `m`: subtracted from the target cosine; default 0.35.
//!
//! The kernel is the trainable variable `kernel: (d, C)`, drawn from `N(0, 0.01²)`. Group
//! ids must be valid class indices (an id outside `[0, C)` is an error naming it).
//! Retrieval metrics use the cosine distance. The mean over the batch is
//! pytorch-metric-learning's `MeanReducer`, its default: this is PML 2.9's `CosFaceLoss`
//! with the same `W: (d, C)` (checked in `tests/parity_pml.rs`).
//!
//! **Difference from Quaterion**: Quaterion 0.1.35 subtracts the margin from the cosine
//! and then applies `cos` a second time, computing `s · cos(cos θ − m·[c = g])`; the
//! logits then lie in `[s·cos 1.35, s]` and are largest for orthogonal vectors, which
//! is not the paper's loss. This crate implements the paper: `s · (cos θ − m·[c = g])`.
//!
//! The logits and the cross-entropy are the class-logit losses' shared code
//! (`class_logits`).

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::class_logits::{
    ClassLogits, check_num_groups, check_scale_margin, class_kernel, class_loss,
};
use super::{GroupKind, SimilarityLoss};
use crate::data::GroupTargets;
use crate::distance::Distance;
use crate::error::Result;
use crate::nn::ParamScope;

/// Options of [`CosFaceLoss`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CosFaceLossConfig {
    /// Number of groups (classes). Required: must be set to a positive value.
    pub num_groups: usize,
    /// Multiplies the (margin-adjusted) cosines. Default 64.
    pub scale: f64,
    /// Cosine margin subtracted from the target class's cosine. Default 0.35.
    pub margin: f64,
}

impl Default for CosFaceLossConfig {
    fn default() -> Self {
        CosFaceLossConfig {
            num_groups: 0,
            scale: 64.0,
            margin: 0.35,
        }
    }
}

/// Large margin cosine loss; see the module docs.
#[derive(Debug, Clone)]
pub struct CosFaceLoss {
    config: CosFaceLossConfig,
    kernel: Tensor,
}

impl CosFaceLoss {
    /// The trainable kernel, `(embedding_size, num_groups)`, `f32`.
    pub fn kernel(&self) -> &Tensor {
        &self.kernel
    }
}

#[diagnostic::do_not_recommend]
impl SimilarityLoss for CosFaceLoss {
    type Kind = GroupKind;
    type Config = CosFaceLossConfig;
    const NAME: &'static str = "CosFaceLoss";

    fn new(embedding_size: usize, config: Self::Config, params: &mut ParamScope) -> Result<Self> {
        crate::limits::check_class_table(Self::NAME, config.num_groups, embedding_size)?;
        check_num_groups(Self::NAME, config.num_groups)?;
        check_scale_margin(Self::NAME, config.scale, config.margin)?;
        let kernel = class_kernel(embedding_size, config.num_groups, params)?;
        Ok(CosFaceLoss { config, kernel })
    }

    fn config(&self) -> &Self::Config {
        &self.config
    }

    fn distance(&self) -> Distance {
        Distance::Cosine
    }

    fn forward(&self, embeddings: &Tensor, targets: &GroupTargets) -> Result<Tensor> {
        let logits = ClassLogits::CosFace {
            scale: self.config.scale,
            margin: self.config.margin,
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
    fn hand_computed_two_classes() {
        let mut params = Params::new(&Device::Cpu, 0);
        let cfg = CosFaceLossConfig {
            num_groups: 2,
            scale: 4.0,
            margin: 0.35,
        };
        let loss = CosFaceLoss::new(2, cfg, &mut params.scope("loss")).unwrap();
        params.named_vars()["loss.kernel"]
            .set(&Tensor::new(&[[2.0f32, 0.0], [0.0, 2.0]], &Device::Cpu).unwrap())
            .unwrap();
        // x = (0.6, 0.8): cos to class 0 (target) 0.6, to class 1 0.8.
        let x = Tensor::new(&[[6.0f32, 8.0]], &Device::Cpu).unwrap();
        let groups = Tensor::new(&[0i64], &Device::Cpu).unwrap();
        let got = f64::from(scalar(&loss.forward(&x, &GroupTargets { groups }).unwrap()));
        let (t, o) = (4.0 * (0.6f64 - 0.35), 4.0 * 0.8f64);
        let want = (t.exp() + o.exp()).ln() - t;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }
}
