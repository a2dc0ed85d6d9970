//! `SupConLoss`: supervised contrastive loss (Khosla et al. 2020, "Supervised Contrastive
//! Learning", <https://arxiv.org/abs/2004.11362>, the `L_out` form); with one positive per
//! anchor it is NT-Xent (Chen et al. 2020, SimCLR).
//!
//! With `S_ij = cos(xᵢ, xⱼ) / τ` over the batch, `P(i)` the other objects of `i`'s group
//! and `A(i)` every object but `i`:
//!
//! ```text
//! ℓᵢ = −1/|P(i)| · Σ_{p ∈ P(i)} [ S_ip − log Σ_{a ∈ A(i)} exp S_ia ]
//! L  = mean of ℓᵢ over the anchors with |P(i)| > 0
//! ```
//!
//! Anchors without a positive are left out (the loss is 0, with a zero gradient, when no
//! anchor has one). That is pytorch-metric-learning's `AvgNonZeroReducer`, its default for
//! `SupConLoss`: an anchor with a positive has `ℓᵢ > 0` unless its only candidate is that
//! positive, so the two means run over the same anchors (checked against PML 2.9 in
//! `tests/parity_pml.rs`). The anchor itself is excluded from the denominator by a mask that
//! selects the candidates before any arithmetic, and the log-sum-exp is shifted by the
//! maximum over the candidates (detached), so it is stable at any temperature.
//!
//! Parameters:
//! * `temperature` `τ`: default 0.1, as in pytorch-metric-learning's `SupConLoss`
//!   (Quaterion has no such loss).
//!
//! Against a cross-batch memory ([`MemoryLoss`]) the batch's embeddings are the anchors and
//! the memory's are the candidates: `P(i)` is the memory entries of `i`'s group and `A(i)`
//! the whole memory (nothing is excluded: the memory holds other objects' copies). An
//! empty memory gives 0.
//! Retrieval metrics use the cosine distance.
//! In f32 on the CPU the loss is one fused op (`kernels::group_loss`); the composite form
//! below is the reference it is tested against.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::masks::positive_mask;
use super::triplet::{check_groups, masked_logsumexp};
use super::{GroupKind, MemoryLoss, SimilarityLoss};
use crate::data::GroupTargets;
use crate::distance::Distance;
use crate::error::{Error, Result};
use crate::nn::ParamScope;

/// Options of [`SupConLoss`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupConLossConfig {
    /// Divides the cosine similarities. Default 0.1.
    pub temperature: f64,
}

impl Default for SupConLossConfig {
    fn default() -> Self {
        SupConLossConfig { temperature: 0.1 }
    }
}

/// Supervised contrastive loss; see the module docs.
#[derive(Debug, Clone)]
pub struct SupConLoss {
    config: SupConLossConfig,
}

impl SupConLoss {
    /// The loss of anchors `x: (N, d)` against candidates `y: (M, d)` (`y = x` when
    /// `memory` is `None`, then the diagonal is excluded).
    fn loss(&self, x: &Tensor, gx: &Tensor, memory: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
        let fused = crate::kernels::GroupMatrixLoss::SupCon {
            temperature: self.config.temperature as f32,
        };
        if let Some(l) = crate::kernels::cosine_group_loss(x, gx, memory, fused)? {
            return Ok(l);
        }
        let dtype = x.dtype();
        let (y, gy) = match memory {
            Some((y, gy)) => (y, Some(gy)),
            None => (x, None),
        };
        let logits = (Distance::Cosine.similarity_matrix(x, Some(y))? / self.config.temperature)?;
        let positives = positive_mask(gx, gy, dtype)?;
        let candidates = match gy {
            Some(_) => Tensor::ones(logits.dims(), dtype, x.device())?,
            None => (1.0 - Tensor::eye(x.dim(0)?, dtype, x.device())?)?,
        };
        // log Σ_{a ∈ A(i)} exp S_ia, shifted by the maximum over A(i) itself: the anchor's
        // own logit (the row's largest) would make every term underflow at a small τ. A
        // row with no candidate has no positive either and is dropped below.
        let log_denominator = masked_logsumexp(&logits, &candidates)?.unsqueeze(1)?;
        let log_prob = logits.broadcast_sub(&log_denominator)?;
        let n_pos = positives.sum_keepdim(1)?;
        let has_pos = n_pos.clamp(0.0, 1.0)?;
        let mean_log_prob = log_prob
            .mul(&positives)?
            .sum_keepdim(1)?
            .div(&n_pos.clamp(1.0, f64::MAX)?)?;
        let anchors = has_pos.sum_all()?.clamp(1.0, f64::MAX)?;
        Ok(mean_log_prob
            .mul(&has_pos)?
            .sum_all()?
            .div(&anchors)?
            .neg()?)
    }
}

#[diagnostic::do_not_recommend]
impl SimilarityLoss for SupConLoss {
    type Kind = GroupKind;
    type Config = SupConLossConfig;
    const NAME: &'static str = "SupConLoss";

    fn new(_embedding_size: usize, config: Self::Config, _params: &mut ParamScope) -> Result<Self> {
        if !config.temperature.is_finite() || config.temperature <= 0.0 {
            return Err(Error::invalid(
                "SupConLoss option `temperature`",
                format!("must be a positive number, got {}", config.temperature),
            ));
        }
        Ok(SupConLoss { config })
    }

    fn config(&self) -> &Self::Config {
        &self.config
    }

    fn distance(&self) -> Distance {
        Distance::Cosine
    }

    fn forward(&self, embeddings: &Tensor, targets: &GroupTargets) -> Result<Tensor> {
        check_groups("SupConLoss", embeddings, &targets.groups)?;
        self.loss(embeddings, &targets.groups, None)
    }
}

#[diagnostic::do_not_recommend]
impl MemoryLoss for SupConLoss {
    fn forward_memory(
        &self,
        embeddings: &Tensor,
        groups: &Tensor,
        memory_embeddings: &Tensor,
        memory_groups: &Tensor,
    ) -> Result<Tensor> {
        check_groups("SupConLoss", embeddings, groups)?;
        check_groups("SupConLoss memory", memory_embeddings, memory_groups)?;
        if memory_groups.dim(0)? == 0 {
            return Ok(embeddings.sum_all()?.affine(0.0, 0.0)?);
        }
        let memory_embeddings = memory_embeddings.to_dtype(embeddings.dtype())?;
        self.loss(
            embeddings,
            groups,
            Some((&memory_embeddings, memory_groups)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::scalar;
    use crate::nn::Params;
    use candle_core::Device;

    fn loss(t: f64) -> SupConLoss {
        SupConLoss::new(
            2,
            SupConLossConfig { temperature: t },
            &mut Params::new(&Device::Cpu, 0).scope("loss"),
        )
        .unwrap()
    }

    #[test]
    fn hand_computed_and_singletons_excluded() {
        // x0 = x1 = e1 (group 0), x2 = e2 (group 1, no positive), τ = 1.
        // Anchor 0: S = [·, 1, 0] → −(1 − ln(e + 1)); anchor 1 the same; anchor 2 dropped.
        let x = Tensor::new(&[[1.0f32, 0.0], [2.0, 0.0], [0.0, 3.0]], &Device::Cpu).unwrap();
        let groups = Tensor::new(&[0i64, 0, 1], &Device::Cpu).unwrap();
        let got = scalar(&loss(1.0).forward(&x, &GroupTargets { groups }).unwrap());
        let want = (1f32.exp() + 1.0).ln() - 1.0;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        // No anchor has a positive: 0.
        let groups = Tensor::new(&[0i64, 1, 2], &Device::Cpu).unwrap();
        let got = scalar(&loss(0.1).forward(&x, &GroupTargets { groups }).unwrap());
        assert_eq!(got, 0.0);
    }

    #[test]
    fn small_temperature_shifts_by_the_candidates_maximum() {
        // x0 = e1, x1 = −e1 (group 0), x2 = e2 (group 1), τ = 0.01. Anchor 0: S = [100 (self),
        // −100, 0], A = {1, 2}: ln(e^{−100} + e^0) = 0 (to 1e-43), so ℓ₀ = 100; anchor 1 the
        // same; anchor 2 has no positive. Shifting by the anchor's own logit (100) instead
        // makes both terms underflow in f32, and the loss came out as 131.
        let x = Tensor::new(&[[1.0f32, 0.0], [-1.0, 0.0], [0.0, 1.0]], &Device::Cpu).unwrap();
        let groups = Tensor::new(&[0i64, 0, 1], &Device::Cpu).unwrap();
        let got = scalar(&loss(0.01).forward(&x, &GroupTargets { groups }).unwrap());
        assert!((got - 100.0).abs() < 1e-3, "{got}");
    }

    #[test]
    fn memory_hand_computed() {
        // Anchor e1 (group 0) against memory [e1 (0), e2 (1)], τ = 0.5:
        // −(2 − ln(e² + e⁰)).
        let x = Tensor::new(&[[1.0f32, 0.0]], &Device::Cpu).unwrap();
        let g = Tensor::new(&[0i64], &Device::Cpu).unwrap();
        let m = Tensor::new(&[[1.0f32, 0.0], [0.0, 1.0]], &Device::Cpu).unwrap();
        let mg = Tensor::new(&[0i64, 1], &Device::Cpu).unwrap();
        let got = scalar(&loss(0.5).forward_memory(&x, &g, &m, &mg).unwrap());
        let want = (2f32.exp() + 1.0).ln() - 2.0;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }
}
