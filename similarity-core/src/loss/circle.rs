//! `CircleLoss` (Sun et al. 2020, <https://arxiv.org/abs/2002.10857>).
//!
//! With `s = similarity_matrix(embeddings)`, for every anchor `i` its positive scores
//! `s_ip` (same group, `p ≠ i`) and negative scores `s_in` (other groups):
//!
//! ```text
//! α_p = [1 + m − s_p]_+ ,  α_n = [s_n + m]_+          (detached weights)
//! L_i = softplus( logsumexp_n γ·α_n·(s_in − m) + logsumexp_p −γ·α_p·(s_ip − (1 − m)) )
//! L   = mean of L_i over the anchors with a positive and a negative
//! ```
//!
//! This is the paper's loss: Eq. 1 and 4 define it for one sample over its own `K`
//! within-class and `L` between-class scores, and training averages it over the samples.
//! `pooled = true` gives Quaterion's form instead: every positive pair `i < j` of the batch
//! against every negative pair `i < j`, in one softplus:
//!
//! ```text
//! L = softplus( logsumexp_{n: i<j} γ·α_n·(s_n − m) + logsumexp_{p: i<j} −γ·α_p·(s_p − (1 − m)) )
//! ```
//!
//! That is one sample's loss with the batch's pairs as its scores, not a mean over samples:
//! the log-sum-exps are dominated by the few worst pairs of the whole batch, so with γ =
//! 80 or 256 the gradient lands on a handful of rows and the others hardly learn in that
//! step (in the inputs of `tests/parity-pml/`, 4 to 10 of 16 to 64 rows get more than a
//! thousandth of the largest row's gradient, against nearly every row per anchor,
//! and the gradient's norm is 4 to 5 times larger).
//!
//! Parameters and defaults (Quaterion's): `margin m = 0.25`, `scale_factor γ = 256`,
//! `distance = cosine` (whose similarity is `cos`), and `pooled = false`. A batch without a
//! positive (or without a negative) pair gives `0`, as the empty log-sum-exp is `−∞` in the
//! paper; per anchor, so does an anchor without one, which is left out of the mean.
//!
//! **Averaging.** Every anchor with a positive and a negative counts. Each of its two
//! log-sum-exps is at least `−γ·m²`, so its term is at least `softplus(−2γm²) > 0`, and this
//! mean is also pytorch-metric-learning's mean over the non-zero terms (`AvgNonZeroReducer`,
//! its default): its `CircleLoss` is this form, checked in `tests/parity_pml.rs`.
//!
//! **Differences from Quaterion** (0.1.35):
//! * the pooled form is the default there; here it is the `pooled` option (see above).
//! * Quaterion's weights are `[1 + m + s_p]_+` and `[s_n − m]_+`: both signs flipped
//!   against the paper (eq. 7, `α_p = [O_p − s_p]_+`, `α_n = [s_n − O_n]_+`, `O_p = 1 + m`,
//!   `O_n = −m`). Here they are the paper's, in both forms.
//! * its cosine similarity matrix is `(1 + cos) / 2`; here `cos`, the paper's `s ∈ [−1, 1]`.
//!
//! As a [`MemoryLoss`], the batch rows are the anchors and the memory rows their scores
//! (pooled: every (batch, memory) pair instead of `i < j`).
//!
//! With the cosine similarity in f32 on the CPU the loss is one fused op
//! (`kernels::group_loss`); the composite form below is the reference it is tested against.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::masks::group_masks;
use super::triplet::{check_groups, masked_logsumexp, softplus, weighted_mean};
use super::{GroupKind, MemoryLoss, SimilarityLoss};
use crate::data::GroupTargets;
use crate::distance::Distance;
use crate::error::{Error, Result};
use crate::nn::ParamScope;

/// Options of [`CircleLoss`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircleLossConfig {
    /// Relaxation margin `m`. Default 0.25.
    pub margin: f64,
    /// Scale `γ`. Default 256.
    pub scale_factor: f64,
    /// Distance whose similarity is used. Default cosine.
    pub distance: Distance,
    /// Quaterion's form: all pairs of the batch in one softplus, instead of the paper's
    /// loss per anchor averaged over the anchors. Default false.
    #[serde(default)]
    pub pooled: bool,
}

impl Default for CircleLossConfig {
    fn default() -> Self {
        CircleLossConfig {
            margin: 0.25,
            scale_factor: 256.0,
            distance: Distance::Cosine,
            pooled: false,
        }
    }
}

/// Circle loss, per anchor (or pooled over the batch); see the module docs.
#[derive(Debug, Clone)]
pub struct CircleLoss {
    config: CircleLossConfig,
}

impl CircleLoss {
    /// The fused f32 CPU form (cosine only); `None` where it does not apply.
    fn fused(
        &self,
        x: &Tensor,
        groups: &Tensor,
        memory: Option<(&Tensor, &Tensor)>,
    ) -> Result<Option<Tensor>> {
        if self.config.distance != Distance::Cosine {
            return Ok(None);
        }
        let loss = crate::kernels::GroupMatrixLoss::Circle {
            margin: self.config.margin as f32,
            gamma: self.config.scale_factor as f32,
            pooled: self.config.pooled,
        };
        crate::kernels::cosine_group_loss(x, groups, memory, loss)
    }

    /// The loss of similarities `s` with `{0, 1}` pair masks, all `(n, m)`: row `i` holds
    /// anchor `i`'s scores (pooled: every entry is one pair of the batch).
    fn loss(&self, s: &Tensor, pos: &Tensor, neg: &Tensor) -> Result<Tensor> {
        let (m, gamma) = (self.config.margin, self.config.scale_factor);
        let sd = s.detach();
        let alpha_p = sd.affine(-1.0, 1.0 + m)?.relu()?;
        let alpha_n = sd.affine(1.0, m)?.relu()?;
        let logit_p = s
            .affine(1.0, -(1.0 - m))?
            .mul(&alpha_p)?
            .affine(-gamma, 0.0)?;
        let logit_n = s.affine(1.0, -m)?.mul(&alpha_n)?.affine(gamma, 0.0)?;
        if self.config.pooled {
            let flat = |t: &Tensor| t.flatten_all()?.unsqueeze(0);
            let lse_p = masked_logsumexp(&flat(&logit_p)?, &flat(pos)?)?;
            let lse_n = masked_logsumexp(&flat(&logit_n)?, &flat(neg)?)?;
            return softplus(&lse_p.add(&lse_n)?)?
                .squeeze(0)
                .map_err(Into::into);
        }
        // An anchor without a positive or a negative has a log-sum-exp near −big: its
        // softplus is 0 with a zero gradient, and `valid` leaves it out of the mean.
        let lse_p = masked_logsumexp(&logit_p, pos)?;
        let lse_n = masked_logsumexp(&logit_n, neg)?;
        let per_anchor = softplus(&lse_p.add(&lse_n)?)?;
        let valid = pos.max(1)?.mul(&neg.max(1)?)?.detach();
        weighted_mean(&per_anchor, &valid)
    }
}

#[diagnostic::do_not_recommend]
impl SimilarityLoss for CircleLoss {
    type Kind = GroupKind;
    type Config = CircleLossConfig;
    const NAME: &'static str = "CircleLoss";

    fn new(_embedding_size: usize, config: Self::Config, _params: &mut ParamScope) -> Result<Self> {
        if !config.margin.is_finite() || config.margin < 0.0 {
            return Err(Error::invalid(
                "CircleLoss option `margin`",
                format!("must be a finite number ≥ 0, got {}", config.margin),
            ));
        }
        if !config.scale_factor.is_finite() || config.scale_factor <= 0.0 {
            return Err(Error::invalid(
                "CircleLoss option `scale_factor`",
                format!("must be a positive number, got {}", config.scale_factor),
            ));
        }
        Ok(CircleLoss { config })
    }

    fn config(&self) -> &Self::Config {
        &self.config
    }

    fn distance(&self) -> Distance {
        self.config.distance
    }

    fn forward(&self, embeddings: &Tensor, targets: &GroupTargets) -> Result<Tensor> {
        check_groups("CircleLoss", embeddings, &targets.groups)?;
        if let Some(l) = self.fused(embeddings, &targets.groups, None)? {
            return Ok(l);
        }
        let dtype = embeddings.dtype();
        let n = embeddings.dim(0)?;
        let s = self.config.distance.similarity_matrix(embeddings, None)?;
        let (pos, neg) = group_masks(&targets.groups, None, dtype)?;
        if !self.config.pooled {
            return self.loss(&s, &pos, &neg);
        }
        // Pooled: each unordered pair once, i < j.
        let upper = Tensor::triu2(n, dtype, embeddings.device())?.sub(&Tensor::eye(
            n,
            dtype,
            embeddings.device(),
        )?)?;
        self.loss(&s, &pos.mul(&upper)?, &neg.mul(&upper)?)
    }
}

#[diagnostic::do_not_recommend]
impl MemoryLoss for CircleLoss {
    /// Each batch row an anchor against the memory (pooled: every (batch, memory) pair).
    /// An empty memory gives 0.
    fn forward_memory(
        &self,
        embeddings: &Tensor,
        groups: &Tensor,
        memory_embeddings: &Tensor,
        memory_groups: &Tensor,
    ) -> Result<Tensor> {
        check_groups("CircleLoss", embeddings, groups)?;
        check_groups("CircleLoss memory", memory_embeddings, memory_groups)?;
        if memory_groups.dim(0)? == 0 {
            return Ok(embeddings.sum_all()?.affine(0.0, 0.0)?);
        }
        if let Some(l) = self.fused(embeddings, groups, Some((memory_embeddings, memory_groups)))? {
            return Ok(l);
        }
        let dtype = embeddings.dtype();
        let s = self
            .config
            .distance
            .similarity_matrix(embeddings, Some(memory_embeddings))?;
        let (pos, neg) = group_masks(groups, Some(memory_groups), dtype)?;
        self.loss(&s, &pos, &neg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Params;
    use candle_core::{DType, Device};

    fn val(t: &Tensor) -> f64 {
        t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    fn loss(cfg: CircleLossConfig) -> CircleLoss {
        CircleLoss::new(2, cfg, &mut Params::new(&Device::Cpu, 0).scope("loss")).unwrap()
    }

    #[test]
    fn hand_computed_three_points() {
        // e0 = e1 = (1, 0) (group 0), e2 = (0, 1) (group 1): one positive pair s_p = 1, two
        // negatives s_n = 0. γ = 1, m = 0.25: α_p = 0.25, logit_p = −0.25·(1 − 0.75);
        // α_n = 0.25, logit_n = 0.25·(0 − 0.25) twice.
        let e = Tensor::new(&[[1.0f64, 0.0], [1.0, 0.0], [0.0, 1.0]], &Device::Cpu).unwrap();
        let t = GroupTargets {
            groups: Tensor::new(&[0i64, 0, 1], &Device::Cpu).unwrap(),
        };
        let circle = |pooled| {
            loss(CircleLossConfig {
                scale_factor: 1.0,
                pooled,
                ..Default::default()
            })
        };
        // Pooled: the positive pair (0, 1) and the negatives (0, 2), (1, 2) in one softplus.
        let lp = -0.25f64 * 0.25;
        let ln = (2.0f64).ln() - 0.0625;
        let expected = (1.0 + (lp + ln).exp()).ln();
        let got = val(&circle(true).forward(&e, &t).unwrap());
        assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");
        // Per anchor: anchors 0 and 1 each have one positive (logit −0.0625) and one
        // negative (−0.0625); anchor 2 has no positive and is left out of the mean.
        let expected = (1.0 + (-0.125f64).exp()).ln();
        let got = val(&circle(false).forward(&e, &t).unwrap());
        assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");
        // No positive pair at all → 0.
        let t = GroupTargets {
            groups: Tensor::new(&[0i64, 1, 2], &Device::Cpu).unwrap(),
        };
        for pooled in [true, false] {
            assert_eq!(val(&circle(pooled).forward(&e, &t).unwrap()), 0.0);
        }
    }

    #[test]
    fn the_default_is_per_anchor_and_old_configs_still_load() {
        assert!(!CircleLossConfig::default().pooled);
        let cfg: CircleLossConfig = serde_json::from_str(
            r#"{"margin": 0.25, "scale_factor": 256.0, "distance": "cosine"}"#,
        )
        .unwrap();
        assert!(!cfg.pooled);
    }
}
