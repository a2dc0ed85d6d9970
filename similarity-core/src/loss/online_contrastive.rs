//! `OnlineContrastiveLoss`: contrastive loss (Hadsell, Chopra & LeCun, 2006,
//! <http://yann.lecun.com/exdb/publis/pdf/hadsell-chopra-lecun-06.pdf>) with the pairs
//! mined from group labels inside the batch.
//!
//! With `D` the distance matrix of the batch, `P` the anchor–positive mask (same group,
//! never the anchor itself) and `N` the anchor–negative mask (other group), see
//! [`masks`](super::masks):
//!
//! ```text
//! mining = all:   L = ½ [ Σ P⊙D / |P|  +  Σ N⊙relu(margin − D) / |N| ]
//! mining = hard:  L = ½ [ mean_{i has a positive} max_{j∈Pᵢ} D_ij
//!                       + mean_{i has a negative} relu(margin − min_{j∈Nᵢ} D_ij) ]
//! ```
//!
//! (an empty mean or sum counts as 0). Distances are not squared, as in Quaterion.
//! Options and defaults (Quaterion's): `margin` 0.5, `distance` cosine, `mining` hard, and
//! `reduction` `None`, which is [`Reduction::Mean`]: each of the two means runs over every
//! pair (`all`) or every anchor that has one (`hard`), zero hinges included.
//! `Some(Reduction::MeanNonZero)` averages each part over its non-zero terms instead.
//!
//! Against a memory bank ([`MemoryLoss`]) the batch rows are anchors and the memory rows
//! candidates; the masks compare groups only (a memory row is never "the anchor itself").
//! An empty memory gives 0.
//!
//! With the cosine distance in f32 on the CPU, `hard` mines on the fused kernels and `all` is
//! one fused op (`kernels::group_loss`); the composite forms are the reference.
//!
//! **Differences from Quaterion.**
//! * Its negative mask is "not a positive", which includes the anchor itself: every
//!   anchor counts its own distance (≈ 0) as a negative, so `all` adds `N` constant terms
//!   `relu(margin − 0)` and dilutes the average, and in `hard` mode the hardest negative
//!   of every anchor *is* the anchor. Here the anchor is never its own negative.
//! * Its cosine distance matrix is `(1 − cos)/2`; here it is `1 − cos`, so Quaterion's
//!   cosine loss with margin `m` is half of this formula with margin `2m`.
//! * In `hard` mode it takes the maximum of `P⊙D` (zeros off the mask), which ignores
//!   negative distances (dot product); here the maximum is over positives only.
//! * Its in-place masking breaks the Euclidean backward; the masks here are arithmetic.
//!
//! **Against pytorch-metric-learning** 2.9 (`ContrastiveLoss` on cosine similarities with
//! `pos_margin = 1`, `neg_margin = 1 − margin`, whose terms are these; checked in
//! `tests/parity_pml.rs`), three conventions differ:
//! * PML adds the two means without the `½`;
//! * it averages each over its non-zero terms (`AvgNonZeroReducer`), which is `reduction =
//!   Some(Reduction::MeanNonZero)` here; so PML's value is twice this loss with that option;
//! * `hard` (its `BatchEasyHardMiner(HARD, HARD)`): PML keeps only the anchors that have both
//!   a positive and a negative, while here an anchor with a negative but no positive (a
//!   group of one in the batch) still pushes its hardest negative away, and the mirror case
//!   still pulls its hardest positive. With every anchor having both, the two agree.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::contrastive::mask_offset;
use super::triplet::check_groups;
use super::{GroupKind, MemoryLoss, Reduction, SimilarityLoss, masks};
use crate::data::GroupTargets;
use crate::distance::Distance;
use crate::error::{Error, Result};
use crate::nn::ParamScope;

/// How [`OnlineContrastiveLoss`] picks pairs in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PairMining {
    /// Every anchor–positive and anchor–negative pair.
    All,
    /// Per anchor, the farthest positive and the closest negative (Quaterion's default).
    #[default]
    Hard,
}

/// Options of [`OnlineContrastiveLoss`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnlineContrastiveLossConfig {
    /// Negatives are pushed to at least this distance. Default 0.5.
    pub margin: f64,
    /// Distance between embeddings. Default cosine.
    pub distance: Distance,
    /// Pair mining strategy. Default hard.
    pub mining: PairMining,
    /// Which terms each of the two means runs over. Default `None`: every term
    /// ([`Reduction::Mean`]); see the module docs.
    #[serde(default)]
    pub reduction: Option<Reduction>,
}

impl Default for OnlineContrastiveLossConfig {
    fn default() -> Self {
        OnlineContrastiveLossConfig {
            margin: 0.5,
            distance: Distance::Cosine,
            mining: PairMining::Hard,
            reduction: None,
        }
    }
}

/// Contrastive loss with in-batch pair mining; see the module docs.
#[derive(Debug, Clone)]
pub struct OnlineContrastiveLoss {
    config: OnlineContrastiveLossConfig,
}

impl OnlineContrastiveLoss {
    /// `½ (reduce(positive terms) + reduce(negative terms))`, each over its `{0, 1}` mask.
    fn halves(
        &self,
        pos_terms: &Tensor,
        has_pos: &Tensor,
        neg_terms: &Tensor,
        has_neg: &Tensor,
    ) -> Result<Tensor> {
        let reduction = self.config.reduction.unwrap_or(Reduction::Mean);
        let pos_loss = reduction.reduce(pos_terms, has_pos)?;
        let neg_loss = reduction.reduce(neg_terms, has_neg)?;
        Ok(((pos_loss + neg_loss)? * 0.5)?)
    }

    /// The loss of distances `d: (n, m)` with `{0, 1}` masks `pos`, `neg` of the same shape.
    fn masked_loss(&self, d: &Tensor, pos: &Tensor, neg: &Tensor) -> Result<Tensor> {
        let margin = self.config.margin;
        match self.config.mining {
            PairMining::All => {
                // relu(m − D) is only read where `neg` is 1.
                let hinge = d.neg()?.affine(1.0, margin)?.relu()?;
                self.halves(&(pos * d)?, pos, &(neg * &hinge)?, neg)
            }
            PairMining::Hard => {
                let offset = mask_offset(d, margin)?;
                // Non-positives pushed below every distance, non-negatives above, so the
                // row max / min land on a real positive / negative when the row has one.
                // The columns are chosen on the detached distances and read from `d` with
                // a gather, so the graph holds two `(n, 1)` gathers, not `n × m` work.
                let dd = d.detach();
                let pos_idx = (&dd - ((1.0 - pos)? * offset)?)?.argmax_keepdim(1)?;
                let neg_idx = (&dd + ((1.0 - neg)? * offset)?)?.argmin_keepdim(1)?;
                let hardest_pos = d.gather(&pos_idx, 1)?.squeeze(1)?;
                let hardest_neg = d.gather(&neg_idx, 1)?.squeeze(1)?;
                let has_pos = pos.max(1)?;
                let has_neg = neg.max(1)?;
                let neg_hinge = hardest_neg.neg()?.affine(1.0, margin)?.relu()?;
                // Anchors without one are zeroed before the mean (their gathered column is
                // arbitrary).
                self.halves(
                    &(&has_pos * hardest_pos)?,
                    &has_pos,
                    &(&has_neg * neg_hinge)?,
                    &has_neg,
                )
            }
        }
    }

    /// `all` mining with the cosine distance as one fused op on the similarity matrix;
    /// `None` for other settings or where the kernels do not apply.
    fn all_cosine(
        &self,
        a: &Tensor,
        groups: &Tensor,
        b: Option<(&Tensor, &Tensor)>,
    ) -> Result<Option<Tensor>> {
        if self.config.mining != PairMining::All || self.config.distance != Distance::Cosine {
            return Ok(None);
        }
        let loss = crate::kernels::GroupMatrixLoss::OnlineContrastiveAll {
            margin: self.config.margin as f32,
            nonzero: self.config.reduction == Some(Reduction::MeanNonZero),
        };
        crate::kernels::cosine_group_loss(a, groups, b, loss)
    }

    /// `hard` mining with the cosine distance on the fused kernels: the hardest positive
    /// and negative of every anchor are mined on detached similarities and only those pairs
    /// are recomputed with gradient (no `n × m` matrix in the graph). `None` for other
    /// settings or where the kernels do not apply.
    fn hard_cosine(
        &self,
        a: &Tensor,
        groups: &Tensor,
        b: Option<(&Tensor, &Tensor)>,
    ) -> Result<Option<Tensor>> {
        if self.config.mining != PairMining::Hard || self.config.distance != Distance::Cosine {
            return Ok(None);
        }
        let Some(h) = crate::kernels::cosine_hardest(a, b.map(|b| b.0), groups, b.map(|b| b.1))?
        else {
            return Ok(None);
        };
        let neg_hinge = h.neg.neg()?.affine(1.0, self.config.margin)?.relu()?;
        Ok(Some(self.halves(
            &(&h.has_pos * &h.pos)?,
            &h.has_pos,
            &(&h.has_neg * neg_hinge)?,
            &h.has_neg,
        )?))
    }
}

#[diagnostic::do_not_recommend]
impl SimilarityLoss for OnlineContrastiveLoss {
    type Kind = GroupKind;
    type Config = OnlineContrastiveLossConfig;
    const NAME: &'static str = "OnlineContrastiveLoss";

    fn new(_embedding_size: usize, config: Self::Config, _params: &mut ParamScope) -> Result<Self> {
        if !config.margin.is_finite() {
            return Err(Error::invalid(
                "OnlineContrastiveLoss option `margin`",
                format!("must be a finite number, got {}", config.margin),
            ));
        }
        Ok(OnlineContrastiveLoss { config })
    }

    fn config(&self) -> &Self::Config {
        &self.config
    }

    fn distance(&self) -> Distance {
        self.config.distance
    }

    fn forward(&self, embeddings: &Tensor, targets: &GroupTargets) -> Result<Tensor> {
        check_groups("OnlineContrastiveLoss", embeddings, &targets.groups)?;
        if let Some(loss) = self.hard_cosine(embeddings, &targets.groups, None)? {
            return Ok(loss);
        }
        if let Some(loss) = self.all_cosine(embeddings, &targets.groups, None)? {
            return Ok(loss);
        }
        let dtype = embeddings.dtype();
        let d = self.config.distance.distance_matrix(embeddings, None)?;
        let (pos, neg) = masks::group_masks(&targets.groups, None, dtype)?;
        self.masked_loss(&d, &pos, &neg)
    }
}

#[diagnostic::do_not_recommend]
impl MemoryLoss for OnlineContrastiveLoss {
    fn forward_memory(
        &self,
        embeddings: &Tensor,
        groups: &Tensor,
        memory_embeddings: &Tensor,
        memory_groups: &Tensor,
    ) -> Result<Tensor> {
        check_groups("OnlineContrastiveLoss", embeddings, groups)?;
        check_groups(
            "OnlineContrastiveLoss memory",
            memory_embeddings,
            memory_groups,
        )?;
        if memory_groups.dim(0)? == 0 {
            return Ok(embeddings.sum_all()?.affine(0.0, 0.0)?);
        }
        let memory = Some((memory_embeddings, memory_groups));
        if let Some(loss) = self.hard_cosine(embeddings, groups, memory)? {
            return Ok(loss);
        }
        if let Some(loss) = self.all_cosine(embeddings, groups, memory)? {
            return Ok(loss);
        }
        let dtype = embeddings.dtype();
        let d = self
            .config
            .distance
            .distance_matrix(embeddings, Some(memory_embeddings))?;
        let (pos, neg) = masks::group_masks(groups, Some(memory_groups), dtype)?;
        self.masked_loss(&d, &pos, &neg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::scalar;
    use crate::nn::Params;
    use candle_core::Device;

    fn loss(mining: PairMining, margin: f64) -> OnlineContrastiveLoss {
        with_reduction(mining, margin, None)
    }

    fn with_reduction(
        mining: PairMining,
        margin: f64,
        reduction: Option<Reduction>,
    ) -> OnlineContrastiveLoss {
        let cfg = OnlineContrastiveLossConfig {
            margin,
            mining,
            distance: Distance::Euclidean,
            reduction,
        };
        OnlineContrastiveLoss::new(1, cfg, &mut Params::new(&Device::Cpu, 0).scope("loss")).unwrap()
    }

    #[test]
    fn hand_computed_on_a_line() {
        // Points 0, 1 (group 0) and 3 (group 1), Euclidean, margin 2.5.
        let e = Tensor::new(&[[0.0f32], [1.0], [3.0]], &Device::Cpu).unwrap();
        let t = GroupTargets {
            groups: Tensor::new(&[0i64, 0, 1], &Device::Cpu).unwrap(),
        };
        // all: positives (0,1),(1,0): mean 1. Negatives (0,2),(2,0): relu(2.5−3) = 0,
        // (1,2),(2,1): 0.5 → mean 0.25. L = ½(1 + 0.25) = 0.625.
        let got = scalar(&loss(PairMining::All, 2.5).forward(&e, &t).unwrap());
        assert!((got - 0.625).abs() < 1e-5, "{got}");
        // hard: anchors 0, 1 have positive distance 1 (anchor 2 has none) → 1. Hardest
        // negatives: 3, 2, 2 → relu: 0, 0.5, 0.5 → mean 1/3. L = ½(1 + 1/3).
        let got = scalar(&loss(PairMining::Hard, 2.5).forward(&e, &t).unwrap());
        assert!((got - 2.0 / 3.0).abs() < 1e-5, "{got}");
        // The non-zero mean leaves out the zero hinges: all: negatives 0.5, 0.5 → 0.5;
        // hard: 0.5, 0.5 → 0.5. Both give ½(1 + 0.5).
        for mining in [PairMining::All, PairMining::Hard] {
            let l = with_reduction(mining, 2.5, Some(Reduction::MeanNonZero));
            let got = scalar(&l.forward(&e, &t).unwrap());
            assert!((got - 0.75).abs() < 1e-5, "{mining:?}: {got}");
        }
    }

    #[test]
    fn memory_rows_are_never_the_anchor() {
        // Memory holds a copy of the anchor: it is a positive at distance ≈ 0.
        let e = Tensor::new(&[[0.0f32], [3.0]], &Device::Cpu).unwrap();
        let g = Tensor::new(&[0i64, 1], &Device::Cpu).unwrap();
        let m = Tensor::new(&[[0.0f32], [1.0]], &Device::Cpu).unwrap();
        let mg = Tensor::new(&[0i64, 1], &Device::Cpu).unwrap();
        // Positives (0,0): 0, (1,1): 2 → 1. Negatives (0,1): relu(2.5 − 1) = 1.5,
        // (1,0): relu(2.5 − 3) = 0 → 0.75. L = ½(1 + 0.75) = 0.875.
        let got = scalar(
            &loss(PairMining::All, 2.5)
                .forward_memory(&e, &g, &m, &mg)
                .unwrap(),
        );
        assert!((got - 0.875).abs() < 1e-5, "{got}");
    }

    #[test]
    fn mining_parses_from_snake_case() {
        let cfg: OnlineContrastiveLossConfig =
            serde_json::from_str(r#"{"margin": 1.0, "distance": "euclidean", "mining": "all"}"#)
                .unwrap();
        assert_eq!(cfg.mining, PairMining::All);
        assert!(
            serde_json::from_str::<OnlineContrastiveLossConfig>(
                r#"{"margin": 1.0, "mode": "all"}"#
            )
            .is_err()
        );
    }
}
