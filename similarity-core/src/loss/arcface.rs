//! `ArcFaceLoss`: additive angular margin loss (Deng et al. 2019, "ArcFace: Additive
//! Angular Margin Loss for Deep Face Recognition", <https://arxiv.org/abs/1801.07698>).
//!
//! With unit-norm embeddings `x̂ᵢ`, the kernel `W: (d, C)` normalised column by column
//! (`ŵ_c`), `cos θ_ic = x̂ᵢ · ŵ_c` (clamped to `[−1, 1]`) and group ids `gᵢ ∈ [0, C)`:
//!
//! ```text
//! Z_ic = s · cos(θ_ic + m)   for c = gᵢ
//! Z_ic = s · cos θ_ic        otherwise
//! L    = mean_i [ logsumexp_c Z_ic − Z_i,gᵢ ]
//! ```
//!
//! Parameters (defaults are Quaterion's):
//! * `num_groups`: number of classes `C`; required (the default 0 is rejected by `new`).
//! * `scale` `s`: default 64.
//! * `margin` `m` (radians): default 0.5.
//!
//! `cos(θ + m)` is computed as `cos θ · cos m − sin θ · sin m` with
//! `sin θ = √max(1 − cos² θ, 1e-12)` (θ ∈ [0, π], so `sin θ ≥ 0`); this is exactly
//! `cos(acos(cos θ) + m)`, without `acos`. Like Quaterion (and the paper's formula), there
//! is no special case when `θ + m > π`: the target logit is then `cos(θ + m)` itself, which
//! grows again towards `θ = π` (the "easy margin"/threshold fallbacks of some other
//! implementations are not applied), so the values match Quaterion's.
//!
//! **Difference from Quaterion** (gradients only): Quaterion differentiates `acos`, whose
//! derivative `−1/√(1 − cos²)` is infinite when an embedding is exactly parallel or
//! anti-parallel to a class column (`|cos θ| = 1`), giving non-finite gradients; here the
//! floor on `sin² θ` keeps them finite there. Elsewhere values and gradients agree.
//!
//! The kernel is the trainable variable `kernel: (d, C)`, drawn from `N(0, 0.01²)` like
//! Quaterion's. Group ids must be valid class indices: an id outside `[0, C)` is an error
//! naming the id and `num_groups`. Retrieval metrics use the cosine distance. The logits
//! and the cross-entropy are the class-logit losses' shared code (`class_logits`).

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

/// Options of [`ArcFaceLoss`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArcFaceLossConfig {
    /// Number of groups (classes). Required: must be set to a positive value.
    pub num_groups: usize,
    /// Multiplies the (margin-adjusted) cosines. Default 64.
    pub scale: f64,
    /// Angular margin added to the target angle, in radians. Default 0.5.
    pub margin: f64,
}

impl Default for ArcFaceLossConfig {
    fn default() -> Self {
        ArcFaceLossConfig {
            num_groups: 0,
            scale: 64.0,
            margin: 0.5,
        }
    }
}

/// Additive angular margin loss; see the module docs.
#[derive(Debug, Clone)]
pub struct ArcFaceLoss {
    config: ArcFaceLossConfig,
    kernel: Tensor,
}

impl ArcFaceLoss {
    /// The trainable kernel, `(embedding_size, num_groups)`, `f32`.
    pub fn kernel(&self) -> &Tensor {
        &self.kernel
    }
}

#[diagnostic::do_not_recommend]
impl SimilarityLoss for ArcFaceLoss {
    type Kind = GroupKind;
    type Config = ArcFaceLossConfig;
    const NAME: &'static str = "ArcFaceLoss";

    fn new(embedding_size: usize, config: Self::Config, params: &mut ParamScope) -> Result<Self> {
        crate::limits::check_class_table(Self::NAME, config.num_groups, embedding_size)?;
        check_num_groups(Self::NAME, config.num_groups)?;
        check_scale_margin(Self::NAME, config.scale, config.margin)?;
        let kernel = class_kernel(embedding_size, config.num_groups, params)?;
        Ok(ArcFaceLoss { config, kernel })
    }

    fn config(&self) -> &Self::Config {
        &self.config
    }

    fn distance(&self) -> Distance {
        Distance::Cosine
    }

    fn forward(&self, embeddings: &Tensor, targets: &GroupTargets) -> Result<Tensor> {
        let logits = ClassLogits::ArcFace {
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
        let cfg = ArcFaceLossConfig {
            num_groups: 2,
            scale: 2.0,
            margin: 0.3,
        };
        let loss = ArcFaceLoss::new(2, cfg, &mut params.scope("loss")).unwrap();
        params.named_vars()["loss.kernel"]
            .set(&Tensor::new(&[[3.0f32, 0.0], [0.0, 0.5]], &Device::Cpu).unwrap())
            .unwrap();
        // x at angle 0.4 from class 0 (target) and π/2 − 0.4 from class 1.
        let a = 0.4f64;
        let x = Tensor::new(
            &[[a.cos() as f32 * 5.0, a.sin() as f32 * 5.0]],
            &Device::Cpu,
        )
        .unwrap();
        let groups = Tensor::new(&[0i64], &Device::Cpu).unwrap();
        let got = f64::from(scalar(&loss.forward(&x, &GroupTargets { groups }).unwrap()));
        let (t, o) = (2.0 * (a + 0.3).cos(), 2.0 * a.sin());
        let want = (t.exp() + o.exp()).ln() - t;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");

        let bad = Tensor::new(&[-1i64], &Device::Cpu).unwrap();
        let err = loss
            .forward(&x, &GroupTargets { groups: bad })
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("group id -1") && err.contains("num_groups = 2"),
            "{err}"
        );
    }

    #[test]
    fn gradient_is_finite_when_parallel_to_a_class() {
        let mut params = Params::new(&Device::Cpu, 0);
        let cfg = ArcFaceLossConfig {
            num_groups: 2,
            ..Default::default()
        };
        let loss = ArcFaceLoss::new(2, cfg, &mut params.scope("loss")).unwrap();
        params.named_vars()["loss.kernel"]
            .set(&Tensor::new(&[[1.0f32, 0.0], [0.0, 1.0]], &Device::Cpu).unwrap())
            .unwrap();
        let x = candle_core::Var::new(&[[2.0f32, 0.0], [0.0, -1.0]], &Device::Cpu).unwrap();
        let groups = Tensor::new(&[0i64, 0], &Device::Cpu).unwrap();
        let out = loss
            .forward(x.as_tensor(), &GroupTargets { groups })
            .unwrap();
        let grads = out.backward().unwrap();
        for g in [
            grads.get(&x).unwrap(),
            grads.get(&params.named_vars()["loss.kernel"]).unwrap(),
        ] {
            let v = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(v.iter().all(|e| e.is_finite()), "{v:?}");
        }
    }
}
