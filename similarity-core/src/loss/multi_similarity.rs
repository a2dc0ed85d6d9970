//! `MultiSimilarityLoss` (Wang, Han, Huang, Dong, Scott, "Multi-Similarity Loss with General
//! Pair Weighting for Deep Metric Learning", CVPR 2019, <https://arxiv.org/abs/1904.06627>).
//!
//! With the cosine similarity `S_ij = cos(xᵢ, xⱼ)`, positives `P_i` (same group, not `i`)
//! and negatives `N_i` (other groups) of anchor `i`, optionally mined (`ε = epsilon`):
//!
//! ```text
//! P̃_i = { p ∈ P_i : S_ip < max_{n ∈ N_i} S_in + ε }
//! Ñ_i = { n ∈ N_i : S_in > min_{p ∈ P_i} S_ip − ε }
//! L_i = (1/α) ln(1 + Σ_{p ∈ P̃_i} e^{−α (S_ip − λ)}) + (1/β) ln(1 + Σ_{n ∈ Ñ_i} e^{β (S_in − λ)})
//! L = mean_i L_i                     (over all N anchors; one without pairs contributes 0)
//! ```
//!
//! Parameters and defaults (pytorch-metric-learning's `MultiSimilarityLoss` and
//! `MultiSimilarityMiner`): `alpha = 2`, `beta = 50`, `base λ = 0.5`, `epsilon = Some(0.1)`
//! (`None`: no mining, every pair counts, as the loss without its miner). An anchor
//! without a positive keeps no negative and one without a negative keeps no positive
//! (the empty min / max), as in pytorch-metric-learning's miner. The mining selection is
//! not differentiated. Memory: `O(N²)` (`O(N·M)` against a memory).
//!
//! The mean over all `N` anchors is pytorch-metric-learning's `MeanReducer`, its default for
//! this loss: mined and unmined, this is PML 2.9's `MultiSimilarityLoss` (with its
//! `MultiSimilarityMiner`), checked in `tests/parity_pml.rs`.
//!
//! Not in Quaterion.
//!
//! In f32 on the CPU the loss is one fused op (`kernels::group_loss`); the composite form
//! below is the reference it is tested against.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::masks::group_masks;
use super::triplet::{big, check_groups, masked_logsumexp};
use super::{GroupKind, MemoryLoss, SimilarityLoss};
use crate::data::GroupTargets;
use crate::distance::Distance;
use crate::error::{Error, Result};
use crate::nn::ParamScope;

/// Options of [`MultiSimilarityLoss`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultiSimilarityLossConfig {
    /// Scale of the positive term. Default 2.
    pub alpha: f64,
    /// Scale of the negative term. Default 50.
    pub beta: f64,
    /// Similarity offset `λ`. Default 0.5.
    pub base: f64,
    /// Pair-mining margin `ε`; `None` keeps every pair. Default `Some(0.1)`.
    pub epsilon: Option<f64>,
}

impl Default for MultiSimilarityLossConfig {
    fn default() -> Self {
        MultiSimilarityLossConfig {
            alpha: 2.0,
            beta: 50.0,
            base: 0.5,
            epsilon: Some(0.1),
        }
    }
}

/// Multi-similarity loss on cosine similarity; see the module docs.
#[derive(Debug, Clone)]
pub struct MultiSimilarityLoss {
    config: MultiSimilarityLossConfig,
}

/// `ln(1 + Σ_j mask_ij e^{x_ij})` per row, stable: `(n, m)` → `(n)`.
fn log1p_sum_exp(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    // Append a 0 logit that is always present (the "1 +").
    let zero = Tensor::zeros((x.dim(0)?, 1), x.dtype(), x.device())?;
    let one = Tensor::ones((x.dim(0)?, 1), x.dtype(), x.device())?;
    masked_logsumexp(
        &Tensor::cat(&[x, &zero], 1)?,
        &Tensor::cat(&[mask, &one], 1)?,
    )
}

impl MultiSimilarityLoss {
    /// The fused f32 CPU form; `None` where it does not apply.
    fn fused(
        &self,
        x: &Tensor,
        groups: &Tensor,
        memory: Option<(&Tensor, &Tensor)>,
    ) -> Result<Option<Tensor>> {
        let c = &self.config;
        let loss = crate::kernels::GroupMatrixLoss::MultiSimilarity {
            alpha: c.alpha as f32,
            beta: c.beta as f32,
            base: c.base as f32,
            epsilon: c.epsilon.map(|e| e as f32),
        };
        crate::kernels::cosine_group_loss(x, groups, memory, loss)
    }

    fn loss(&self, s: &Tensor, pos: &Tensor, neg: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let (pos, neg) = match c.epsilon {
            None => (pos.clone(), neg.clone()),
            Some(eps) => {
                let sd = s.detach();
                let big = big(s.dtype());
                let min_pos = sd.mul(pos)?.add(&((1.0 - pos)? * big)?)?.min_keepdim(1)?;
                let max_neg = sd.mul(neg)?.add(&((neg - 1.0)? * big)?)?.max_keepdim(1)?;
                let keep_neg = sd.broadcast_gt(&(min_pos - eps)?)?.to_dtype(s.dtype())?;
                let keep_pos = sd.broadcast_lt(&(max_neg + eps)?)?.to_dtype(s.dtype())?;
                (pos.mul(&keep_pos)?, neg.mul(&keep_neg)?)
            }
        };
        let pos_term = log1p_sum_exp(&s.affine(-c.alpha, c.alpha * c.base)?, &pos)?;
        let neg_term = log1p_sum_exp(&s.affine(c.beta, -c.beta * c.base)?, &neg)?;
        let per_anchor = ((pos_term / c.alpha)? + (neg_term / c.beta)?)?;
        Ok(per_anchor.mean_all()?)
    }
}

#[diagnostic::do_not_recommend]
impl SimilarityLoss for MultiSimilarityLoss {
    type Kind = GroupKind;
    type Config = MultiSimilarityLossConfig;
    const NAME: &'static str = "MultiSimilarityLoss";

    fn new(_embedding_size: usize, config: Self::Config, _params: &mut ParamScope) -> Result<Self> {
        for (name, v) in [("alpha", config.alpha), ("beta", config.beta)] {
            if !v.is_finite() || v <= 0.0 {
                return Err(Error::invalid(
                    format!("MultiSimilarityLoss option `{name}`"),
                    format!("must be a positive number, got {v}"),
                ));
            }
        }
        if !config.base.is_finite() {
            return Err(Error::invalid(
                "MultiSimilarityLoss option `base`",
                format!("must be a finite number, got {}", config.base),
            ));
        }
        if let Some(eps) = config.epsilon
            && (!eps.is_finite() || eps < 0.0)
        {
            return Err(Error::invalid(
                "MultiSimilarityLoss option `epsilon`",
                format!("must be a finite number ≥ 0 (or null), got {eps}"),
            ));
        }
        Ok(MultiSimilarityLoss { config })
    }

    fn config(&self) -> &Self::Config {
        &self.config
    }

    /// Always cosine.
    fn distance(&self) -> Distance {
        Distance::Cosine
    }

    fn forward(&self, embeddings: &Tensor, targets: &GroupTargets) -> Result<Tensor> {
        check_groups("MultiSimilarityLoss", embeddings, &targets.groups)?;
        if let Some(l) = self.fused(embeddings, &targets.groups, None)? {
            return Ok(l);
        }
        let dtype = embeddings.dtype();
        let s = Distance::Cosine.similarity_matrix(embeddings, None)?;
        let (pos, neg) = group_masks(&targets.groups, None, dtype)?;
        self.loss(&s, &pos, &neg)
    }
}

#[diagnostic::do_not_recommend]
impl MemoryLoss for MultiSimilarityLoss {
    /// Batch anchors against memory positives and negatives. An empty memory gives 0.
    fn forward_memory(
        &self,
        embeddings: &Tensor,
        groups: &Tensor,
        memory_embeddings: &Tensor,
        memory_groups: &Tensor,
    ) -> Result<Tensor> {
        check_groups("MultiSimilarityLoss", embeddings, groups)?;
        check_groups(
            "MultiSimilarityLoss memory",
            memory_embeddings,
            memory_groups,
        )?;
        if memory_groups.dim(0)? == 0 {
            return Ok(embeddings.sum_all()?.affine(0.0, 0.0)?);
        }
        if let Some(l) = self.fused(embeddings, groups, Some((memory_embeddings, memory_groups)))? {
            return Ok(l);
        }
        let dtype = embeddings.dtype();
        let s = Distance::Cosine.similarity_matrix(embeddings, Some(memory_embeddings))?;
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

    fn loss(cfg: MultiSimilarityLossConfig) -> MultiSimilarityLoss {
        MultiSimilarityLoss::new(2, cfg, &mut Params::new(&Device::Cpu, 0).scope("loss")).unwrap()
    }

    #[test]
    fn hand_computed_three_points() {
        // e0 = e1 = (1, 0) group 0, e2 = (0, 1) group 1: S_01 = 1, S_02 = S_12 = 0.
        let e = Tensor::new(&[[1.0f64, 0.0], [1.0, 0.0], [0.0, 1.0]], &Device::Cpu).unwrap();
        let t = GroupTargets {
            groups: Tensor::new(&[0i64, 0, 1], &Device::Cpu).unwrap(),
        };
        let (a, b, l0) = (2.0f64, 50.0f64, 0.5f64);
        // No mining: anchors 0 and 1 have one positive (1) and one negative (0); anchor 2 has
        // two negatives and no positive.
        let pos = (1.0 + (-a * (1.0 - l0)).exp()).ln() / a;
        let neg1 = (1.0 + (b * (0.0 - l0)).exp()).ln() / b;
        let neg2 = (1.0 + 2.0 * (b * (0.0 - l0)).exp()).ln() / b;
        let expected = (2.0 * (pos + neg1) + neg2) / 3.0;
        let got = val(&loss(MultiSimilarityLossConfig {
            epsilon: None,
            ..Default::default()
        })
        .forward(&e, &t)
        .unwrap());
        assert!((got - expected).abs() < 1e-7, "{got} vs {expected}");
        // Mining ε = 0.1: anchor 0 keeps negative (0 > 1 − 0.1)? no; positive (1 < 0 + 0.1)?
        // no → 0. Anchor 2 has no positive → keeps nothing. The loss is 0.
        let got = val(&loss(Default::default()).forward(&e, &t).unwrap());
        assert_eq!(got, 0.0);
    }
}
