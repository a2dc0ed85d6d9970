//! `TripletLoss` (Schroff et al. 2015, FaceNet, <https://arxiv.org/abs/1503.03832>) with
//! online triplet mining.
//!
//! With `d = distance_matrix(embeddings)`, anchors `a`, positives `p` (same group, not the
//! anchor itself) and negatives `n` (another group):
//!
//! ```text
//! all:        L = mean_{valid (a,p,n)} [d_ap − d_an + m]_+
//! hard:       L = mean_a [ (d_a,p* − d_a,n*) / max(mean_a d_a,n*, ε) + m ]_+  (scale_by_mean_negative)
//!             L = mean_a [ d_a,p* − d_a,n* + m ]_+                        (without it)
//!             L = mean_a softplus(d_a,p* − d_a,n*)                        (soft; m unused)
//!               with p* = argmax_p d_ap (hardest positive), n* = argmin_n d_an (hardest negative)
//! semi_hard:  L = mean_{(a,p)} [ d_ap − d_a,n⁺(a,p) + m ]_+
//!               with n⁺(a,p) = argmin { d_an : d_an > d_ap } (closest negative farther than
//!               the positive); when there is none, the fallback: by default the farthest
//!               negative of `a`, argmax_n d_an (`semi_hard_fallback`)
//! ```
//!
//! Parameters and defaults (Quaterion's): `margin = 0.5`, `distance = cosine`,
//! `mining = hard`, `soft = false`, and `scale_by_mean_negative = true` (Quaterion's trick
//! against collapse: in non-soft hard mining the difference is divided by the batch mean of
//! the hardest-negative distances, which makes that mode invariant to the distance scale).
//!
//! **Which terms the means run over** (`reduction`, default `None`: the mining's own, as in
//! Quaterion): `all` averages over the triplets whose term is non-zero
//! ([`Reduction::MeanNonZero`]; Quaterion's batch-all), `hard` over every anchor that has a
//! positive and a negative, and `semi_hard` over every (anchor, positive) pair whose anchor
//! has a negative, zero terms included ([`Reduction::Mean`]). `Some(reduction)` applies that
//! reduction to whichever mining is chosen.
//!
//! Anchors without a positive or without a negative are left out (of the means and of the
//! mean hardest-negative distance); a batch with no usable anchor (or triplet) gives `0`,
//! with a zero gradient. With `scale_by_mean_negative`, a mean hardest-negative distance
//! below `ε = 10⁻⁶` in magnitude is replaced by `ε` (written `max(·, ε)` above): it is 0
//! in a batch without a usable anchor, and 0 or a round-off of either sign when every
//! hardest negative coincides with its anchor, where the quotient would be 0/0 or noise.
//!
//! **The semi-hard fallback.** FaceNet's semi-hard negatives are farther from the anchor
//! than the positive but still inside the margin; it does not say what to do for an
//! (anchor, positive) pair when every negative is closer than the positive. Semi-hard
//! mining exists to keep the hardest negatives out of training (FaceNet §3.2: they lead to
//! bad local minima, a collapsed model, early on), and that case is most common exactly
//! then, so the default falls back to the anchor's *farthest* negative: the one whose
//! distance is nearest the positive's from below. The chosen negative is then always the
//! one nearest the positive's distance, above it when there is one. This is what
//! TensorFlow's `triplet_semihard_loss` does (the reference most users know) and
//! sentence-transformers' `BatchSemiHardTripletLoss`, a port of it. The term is at least the
//! margin there, so the pair still teaches. [`SemiHardFallback::HardestNegative`] takes the
//! closest negative instead (batch-hard's choice; the default of earlier versions of this
//! crate).
//!
//! Memory: `hard` and `semi_hard` take `O(N²)` (`O(N·M)` against a memory); `all` builds the
//! full `(N, N, N)` triplet tensor (`(N, M, M)` against a memory) and is the only mode that
//! does, except with the cosine distance in f32 on the CPU, where one fused op walks each
//! anchor's positives against its negatives in `O(N²)` memory (`kernels::group_loss`). `semi_hard` sorts every row of the distance matrix (`arg_sort_last_dim`; on CUDA
//! rows are limited to the kernel's block size).
//!
//! **Differences from Quaterion** (0.1.35):
//! * cosine: Quaterion's cosine distance matrix is `(1 − cos) / 2`, ours `1 − cos`. So `all`
//!   with margin `2m` here is exactly twice Quaterion's `all` with margin `m`; hard mining
//!   with `scale_by_mean_negative` is scale-free and agrees directly; soft hard mining sees
//!   twice the difference here.
//! * `hard`: Quaterion counts anchors without a positive (as if their hardest positive were
//!   at distance 0) and masks with `0` / the row maximum, which is wrong for dot-product
//!   distances (they can be negative). Here masking is exact and such anchors are left out.
//! * `semi_hard`: Quaterion compares every positive pair of the batch with every negative
//!   pair of the batch (not per anchor, self-distances counted as positives) and clamps each
//!   term to `[0, m]`. Here it is FaceNet's per-anchor semi-hard mining described above.
//! * memory (XBM) with `all`: Quaterion returns the constant `0`; here it is the real
//!   all-triplets loss with batch anchors and memory positives and negatives.
//!
//! **Against pytorch-metric-learning** 2.9 (`TripletMarginLoss` with `BatchHardMiner`,
//! cosine `CosineSimilarity`, checked in `tests/parity_pml.rs`): the same mining and terms;
//! PML averages with `AvgNonZeroReducer` by default, which is `reduction =
//! Some(Reduction::MeanNonZero)` here (`all` already is). Its semi-hard miner
//! (`TripletMarginMiner(type_of_triplets="semihard")`) is another definition: every triplet
//! with `0 < d_an − d_ap ≤ m`, not one negative per (anchor, positive), and no fallback.

use candle_core::{D, DType, Tensor};
use serde::{Deserialize, Serialize};

use super::masks::group_masks;
use super::{GroupKind, MemoryLoss, Reduction, SimilarityLoss};
use crate::data::GroupTargets;
use crate::distance::Distance;
use crate::error::{Error, Result};
use crate::nn::ParamScope;

/// A large finite value used to push masked entries out of a `max`/`min` (never `inf`, so
/// no NaN reaches a gradient).
pub(super) fn big(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 6.0e4,
        _ => 1.0e30,
    }
}

/// The smallest magnitude `ε` of the mean hardest-negative distance that
/// `scale_by_mean_negative` divides by: 10⁻⁶ (the Euclidean distance's own floor,
/// `√10⁻¹²`), 10⁻³ in f16, whose range ends at 65,504.
fn mean_negative_floor(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 1.0e-3,
        _ => 1.0e-6,
    }
}

/// `softplus(x) = ln(1 + eˣ)`, computed stably as `relu(x) + ln(1 + e^{−|x|})`.
pub(super) fn softplus(x: &Tensor) -> Result<Tensor> {
    let tail = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok(x.relu()?.add(&tail)?)
}

/// Row-wise `ln(Σ_j mask_ij · exp(x_ij))` for a `{0, 1}` mask, `(n, m)` → `(n)`, stable and
/// NaN-free: a row with an empty mask gives about `−big` (never `−∞`) with a zero gradient.
///
/// Entries outside the mask are selected away before any arithmetic (not multiplied by 0),
/// so whatever they hold (a huge logit, `±∞`) reaches neither the value nor the gradient;
/// the row maximum is taken over the mask only, so an entry outside it cannot make every
/// exponential underflow.
pub(super) fn masked_logsumexp(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let keep = mask.ne(0.0)?;
    let zeros = x.zeros_like()?;
    let lowest = Tensor::full(f32::NEG_INFINITY, x.shape(), x.device())?.to_dtype(x.dtype())?;
    let max = keep
        .where_cond(&x.detach(), &lowest)?
        .max_keepdim(D::Minus1)?
        .clamp(-big(x.dtype()), f64::MAX)?;
    let shifted = keep.where_cond(&x.broadcast_sub(&max)?, &zeros)?;
    let sum = shifted.exp()?.mul(mask)?.sum_keepdim(D::Minus1)?;
    // An empty row sums to 0: the floor replaces ln(0), and has no gradient.
    let tiny = match x.dtype() {
        DType::F64 => f64::MIN_POSITIVE,
        DType::F16 => 6.1e-5,
        _ => f32::MIN_POSITIVE as f64,
    };
    Ok(sum
        .clamp(tiny, f64::MAX)?
        .log()?
        .add(&max)?
        .squeeze(D::Minus1)?)
}

/// `Σ values / max(Σ weights, 1)`: a mean over the entries that count, `0` when none do.
pub(super) fn weighted_mean(values: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let count = weights.sum_all()?.detach().clamp(1.0, f64::MAX)?;
    Ok(values.mul(weights)?.sum_all()?.div(&count)?)
}

/// The valid-triplet mask of a batch, `(N, N, N)` in `dtype`:
/// `mask[a, p, n] = [g_a = g_p] ∧ [a ≠ p] ∧ [g_a ≠ g_n]` (so `a`, `p`, `n` are distinct).
pub fn triplet_mask(groups: &Tensor, dtype: DType) -> Result<Tensor> {
    let (pos, neg) = group_masks(groups, None, dtype)?;
    Ok(pos.unsqueeze(2)?.broadcast_mul(&neg.unsqueeze(1)?)?)
}

/// How triplets are chosen in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TripletMining {
    /// Every valid triplet (batch-all); builds an `(N, N, N)` tensor.
    All,
    /// Hardest positive and hardest negative of every anchor (batch-hard).
    #[default]
    Hard,
    /// FaceNet's semi-hard negatives, per anchor–positive pair.
    SemiHard,
}

/// Semi-hard mining: the negative taken for an (anchor, positive) pair when no negative is
/// farther from the anchor than the positive.
///
/// Semi-hard mining exists to keep the hardest negatives out of training (FaceNet §3.2:
/// they lead to a collapsed model early on), and this case is most common exactly then, so
/// the default is the anchor's farthest negative, the one nearest the positive's distance,
/// as TensorFlow's `triplet_semihard_loss` does; its term is at least the margin. The
/// reasoning is in full in the module docs (`loss/triplet.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SemiHardFallback {
    /// The anchor's farthest negative, the one nearest the positive's distance (TensorFlow's
    /// `triplet_semihard_loss`).
    #[default]
    FarthestNegative,
    /// The anchor's closest (hardest) negative.
    HardestNegative,
}

/// Options of [`TripletLoss`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TripletLossConfig {
    /// Margin between positive and negative distances. Default 0.5.
    pub margin: f64,
    /// Distance between embeddings. Default cosine (`1 − cos`).
    pub distance: Distance,
    /// Mining strategy. Default `hard`.
    pub mining: TripletMining,
    /// Hard mining only: `softplus(d_ap − d_an)` instead of the margin hinge. Default false.
    pub soft: bool,
    /// Hard mining, not soft: divide `d_ap − d_an` by the batch mean of the hardest-negative
    /// distances (against collapse). Default true, as in Quaterion. That mean must be
    /// positive: with dot-product distances (which can be ≤ 0) turn it off.
    pub scale_by_mean_negative: bool,
    /// Semi-hard mining only: the negative of an (anchor, positive) pair that has no
    /// negative farther than the positive. Default the farthest negative.
    #[serde(default)]
    pub semi_hard_fallback: SemiHardFallback,
    /// Which terms the mean runs over. Default `None`: the mining's own (`all`: the
    /// non-zero triplets; `hard`, `semi_hard`: every term); see the module docs.
    #[serde(default)]
    pub reduction: Option<Reduction>,
}

impl Default for TripletLossConfig {
    fn default() -> Self {
        TripletLossConfig {
            margin: 0.5,
            distance: Distance::Cosine,
            mining: TripletMining::Hard,
            soft: false,
            scale_by_mean_negative: true,
            semi_hard_fallback: SemiHardFallback::FarthestNegative,
            reduction: None,
        }
    }
}

/// Triplet loss with online mining; see the module docs.
#[derive(Debug, Clone)]
pub struct TripletLoss {
    config: TripletLossConfig,
}

impl TripletLoss {
    /// The reduction in effect: the configured one, else the mining's own.
    fn reduction(&self) -> Reduction {
        self.config.reduction.unwrap_or(match self.config.mining {
            TripletMining::All => Reduction::MeanNonZero,
            TripletMining::Hard | TripletMining::SemiHard => Reduction::Mean,
        })
    }

    /// The loss of anchors `a` against candidates `b` (`b = None`: the batch itself, self
    /// excluded from the positives).
    fn loss(&self, a: &Tensor, groups_a: &Tensor, b: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
        let dtype = a.dtype();
        if self.config.mining == TripletMining::Hard
            && self.config.distance == Distance::Cosine
            && let Some(loss) = self.hard_rows(a, groups_a, b)?
        {
            return Ok(loss);
        }
        if self.config.mining == TripletMining::All && self.config.distance == Distance::Cosine {
            let fused = crate::kernels::GroupMatrixLoss::TripletAll {
                margin: self.config.margin as f32,
                nonzero: self.reduction() == Reduction::MeanNonZero,
            };
            if let Some(loss) = crate::kernels::cosine_group_loss(a, groups_a, b, fused)? {
                return Ok(loss);
            }
        }
        let d = self.config.distance.distance_matrix(a, b.map(|b| b.0))?;
        if self.config.mining == TripletMining::Hard
            && let Some((pos_idx, neg_idx, valid)) =
                crate::kernels::hardest_pairs(&d, groups_a, b.map(|b| b.1))?
        {
            return self.hard_selected(&d, &pos_idx, &neg_idx, &valid);
        }
        let (pos, neg) = group_masks(groups_a, b.map(|b| b.1), dtype)?;
        match self.config.mining {
            TripletMining::All => self.all(&d, &pos, &neg),
            TripletMining::Hard => self.hard(&d, &pos, &neg),
            TripletMining::SemiHard => self.semi_hard(&d, &pos, &neg),
        }
    }

    fn all(&self, d: &Tensor, pos: &Tensor, neg: &Tensor) -> Result<Tensor> {
        let mask = pos.unsqueeze(2)?.broadcast_mul(&neg.unsqueeze(1)?)?;
        let t = d
            .unsqueeze(2)?
            .broadcast_sub(&d.unsqueeze(1)?)?
            .affine(1.0, self.config.margin)?
            .relu()?
            .mul(&mask)?;
        self.reduction().reduce(&t, &mask)
    }

    fn hard(&self, d: &Tensor, pos: &Tensor, neg: &Tensor) -> Result<Tensor> {
        let big = big(d.dtype());
        // The hardest positive and negative of each anchor are found on the detached
        // distances and then read from `d` with a gather: the graph holds two `(n, 1)`
        // gathers instead of masked `n × m` products, sums and reductions, and the gradient
        // reaches exactly the selected entries (as torch's `max` gives it). Anchors without
        // a positive or a negative pick an arbitrary column and are masked by `valid`.
        let dd = d.detach();
        let pos_idx = dd
            .mul(pos)?
            .add(&((pos - 1.0)? * big)?)?
            .argmax_keepdim(1)?;
        let neg_idx = dd
            .mul(neg)?
            .add(&((1.0 - neg)? * big)?)?
            .argmin_keepdim(1)?;
        let valid = pos.max(1)?.mul(&neg.max(1)?)?.detach();
        self.hard_selected(d, &pos_idx, &neg_idx, &valid)
    }

    /// Cosine hard mining where the distance matrix never enters the graph: it is computed
    /// detached, mined in one pass, and only the chosen `(anchor, positive)` and
    /// `(anchor, negative)` distances are recomputed with gradient, so the backward pass
    /// costs `O(n·d)` instead of an `n × m × d` product (against a 4,096-row memory, most
    /// of a step). The same values as gathering from the matrix. `None` where the fused
    /// kernels do not apply.
    fn hard_rows(
        &self,
        a: &Tensor,
        groups_a: &Tensor,
        b: Option<(&Tensor, &Tensor)>,
    ) -> Result<Option<Tensor>> {
        let Some(h) = crate::kernels::cosine_hardest(a, b.map(|b| b.0), groups_a, b.map(|b| b.1))?
        else {
            return Ok(None);
        };
        let valid = h.has_pos.mul(&h.has_neg)?;
        Ok(Some(self.hard_from(&h.pos, &h.neg, &valid)?))
    }

    /// Hard mining once the hardest positive and negative column of every anchor
    /// (`(n, 1)`, u32) and the anchors that have both (`valid`, `(n)`, `{0, 1}`) are known.
    fn hard_selected(
        &self,
        d: &Tensor,
        pos_idx: &Tensor,
        neg_idx: &Tensor,
        valid: &Tensor,
    ) -> Result<Tensor> {
        let hardest_pos = d.gather(pos_idx, 1)?.squeeze(1)?;
        let hardest_neg = d.gather(neg_idx, 1)?.squeeze(1)?;
        self.hard_from(&hardest_pos, &hardest_neg, valid)
    }

    /// The hard-mining loss from each anchor's hardest positive and negative distance
    /// (`(n)` each) and the anchors that have both (`valid`).
    fn hard_from(
        &self,
        hardest_pos: &Tensor,
        hardest_neg: &Tensor,
        valid: &Tensor,
    ) -> Result<Tensor> {
        // Invalid anchors are zeroed before any arithmetic on their ±big values.
        let diff = hardest_pos.sub(hardest_neg)?.mul(valid)?;
        let per_anchor = if self.config.soft {
            softplus(&diff)?
        } else if self.config.scale_by_mean_negative {
            // With no valid anchor the mean is 0 (the masked forward is 0, but its backward
            // is 0/0), and negatives that coincide with their anchors make it 0 or a
            // round-off of either sign: below ε in magnitude it is replaced by ε, selected
            // (not clamped: a clamp multiplies the discarded gradient, which can be
            // infinite, by 0), so it has no gradient there.
            let mean_neg = weighted_mean(&hardest_neg.mul(valid)?, valid)?;
            let floor = mean_negative_floor(diff.dtype());
            let mean_neg = mean_neg
                .abs()?
                .ge(floor)?
                .where_cond(&mean_neg, &(mean_neg.zeros_like()? + floor)?)?;
            diff.broadcast_div(&mean_neg)?
                .affine(1.0, self.config.margin)?
                .relu()?
        } else {
            diff.affine(1.0, self.config.margin)?.relu()?
        };
        self.reduction().reduce(&per_anchor, valid)
    }

    fn semi_hard(&self, d: &Tensor, pos: &Tensor, neg: &Tensor) -> Result<Tensor> {
        let dtype = d.dtype();
        let m = d.dim(1)?;
        let big = big(dtype);
        // Negatives of each row in ascending order (non-negatives pushed to the end).
        let neg_d = d.mul(neg)?.add(&((1.0 - neg)? * big)?)?;
        let order = neg_d.detach().arg_sort_last_dim(true)?;
        let sorted_neg = neg_d.gather(&order, 1)?;
        let n_neg = neg.sum_keepdim(1)?;
        // c[a, j] = how many negatives of `a` come before column j in distance order.
        let order_all = d.detach().arg_sort_last_dim(true)?;
        let neg_in_order = neg.gather(&order_all, 1)?;
        let before = neg_in_order.cumsum(1)?.sub(&neg_in_order)?;
        let inverse = order_all.arg_sort_last_dim(true)?;
        let c = before.gather(&inverse, 1)?;
        // The first negative farther than the positive is the c-th in order, if c < n_neg.
        let has_farther = c.broadcast_lt(&n_neg)?.to_dtype(dtype)?;
        let last = (&n_neg - 1.0)?.clamp(0.0, (m.max(1) - 1) as f64)?;
        let index = c
            .broadcast_minimum(&last)?
            .to_dtype(DType::U32)?
            .contiguous()?;
        let farther = sorted_neg.gather(&index, 1)?;
        let fallback = match self.config.semi_hard_fallback {
            SemiHardFallback::FarthestNegative => {
                sorted_neg.gather(&last.to_dtype(DType::U32)?.contiguous()?, 1)?
            }
            SemiHardFallback::HardestNegative => sorted_neg.narrow(1, 0, 1)?,
        };
        let semi = farther
            .mul(&has_farther)?
            .broadcast_add(&fallback.broadcast_mul(&(1.0 - &has_farther)?)?)?;
        let has_neg = n_neg.gt(0.0)?.to_dtype(dtype)?;
        let valid = pos.broadcast_mul(&has_neg)?.detach();
        let t = d
            .sub(&semi)?
            .mul(&valid)?
            .affine(1.0, self.config.margin)?
            .relu()?;
        self.reduction().reduce(&t, &valid)
    }
}

#[diagnostic::do_not_recommend]
impl SimilarityLoss for TripletLoss {
    type Kind = GroupKind;
    type Config = TripletLossConfig;
    const NAME: &'static str = "TripletLoss";

    fn new(_embedding_size: usize, config: Self::Config, _params: &mut ParamScope) -> Result<Self> {
        if !config.margin.is_finite() || config.margin < 0.0 {
            return Err(Error::invalid(
                "TripletLoss option `margin`",
                format!("must be a finite number ≥ 0, got {}", config.margin),
            ));
        }
        if config.soft && config.mining != TripletMining::Hard {
            return Err(Error::invalid(
                "TripletLoss option `soft`",
                format!(
                    "only applies to mining `hard`, but mining is {:?}",
                    config.mining
                ),
            ));
        }
        if config.semi_hard_fallback != SemiHardFallback::default()
            && config.mining != TripletMining::SemiHard
        {
            return Err(Error::invalid(
                "TripletLoss option `semi_hard_fallback`",
                format!(
                    "only applies to mining `semi_hard`, but mining is {:?}",
                    config.mining
                ),
            ));
        }
        Ok(TripletLoss { config })
    }

    fn config(&self) -> &Self::Config {
        &self.config
    }

    fn distance(&self) -> Distance {
        self.config.distance
    }

    fn forward(&self, embeddings: &Tensor, targets: &GroupTargets) -> Result<Tensor> {
        check_groups("TripletLoss", embeddings, &targets.groups)?;
        self.loss(embeddings, &targets.groups, None)
    }
}

#[diagnostic::do_not_recommend]
impl MemoryLoss for TripletLoss {
    /// Batch anchors against memory positives and negatives, with the configured mining
    /// (`all`: the real all-triplets loss, an `(N, M, M)` tensor). An empty memory gives 0.
    fn forward_memory(
        &self,
        embeddings: &Tensor,
        groups: &Tensor,
        memory_embeddings: &Tensor,
        memory_groups: &Tensor,
    ) -> Result<Tensor> {
        check_groups("TripletLoss", embeddings, groups)?;
        check_groups("TripletLoss memory", memory_embeddings, memory_groups)?;
        if memory_groups.dim(0)? == 0 {
            return Ok(embeddings.sum_all()?.affine(0.0, 0.0)?);
        }
        self.loss(embeddings, groups, Some((memory_embeddings, memory_groups)))
    }
}

/// Checks `embeddings: (N, d)` against `groups: (N)`.
pub(super) fn check_groups(loss: &str, embeddings: &Tensor, groups: &Tensor) -> Result<()> {
    if embeddings.rank() != 2 || groups.rank() != 1 || embeddings.dim(0)? != groups.dim(0)? {
        return Err(Error::shape(
            format!("{loss}: embeddings (N, d) and groups (N)"),
            format!("groups of shape {:?}", groups.dims()),
            embeddings.dims(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Params;
    use candle_core::{DType, Device};

    fn val(t: &Tensor) -> f64 {
        t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    fn loss(cfg: TripletLossConfig) -> TripletLoss {
        TripletLoss::new(2, cfg, &mut Params::new(&Device::Cpu, 0).scope("loss")).unwrap()
    }

    fn targets(g: &[i64]) -> GroupTargets {
        GroupTargets {
            groups: Tensor::new(g, &Device::Cpu).unwrap(),
        }
    }

    #[test]
    fn hand_computed_one_dimension() {
        // Points on a line, Euclidean: x = [0, 1, 3, 4], groups [0, 0, 1, 1].
        // d = |xi − xj|. Anchor 0: p = 1 (d 1), negatives at 3, 4.
        let e = Tensor::new(&[[0.0f64], [1.0], [3.0], [4.0]], &Device::Cpu).unwrap();
        let t = targets(&[0, 0, 1, 1]);
        let cfg = |mining, margin| TripletLossConfig {
            margin,
            mining,
            distance: Distance::Euclidean,
            scale_by_mean_negative: false,
            ..Default::default()
        };
        // Hard, margin 2.5: anchors 0..3 have (d_p, d_n) = (1,3), (1,2), (1,2), (1,3):
        // hinge 0.5, 1.5, 1.5, 0.5 → mean 1.
        let l = loss(cfg(TripletMining::Hard, 2.5));
        assert!((val(&l.forward(&e, &t).unwrap()) - 1.0).abs() < 1e-6);
        // Semi-hard: every negative is farther than the positive and the closest one is
        // the hard one → the same value.
        let l = loss(cfg(TripletMining::SemiHard, 2.5));
        assert!((val(&l.forward(&e, &t).unwrap()) - 1.0).abs() < 1e-6);
        // All: anchor 0: 1−3+2.5 = 0.5, 1−4+2.5 < 0; anchor 1: 1.5, 0.5; anchor 2: 0.5,
        // 1.5; anchor 3: 0.5 → sum 5 over 6 active triplets.
        let l = loss(cfg(TripletMining::All, 2.5));
        assert!((val(&l.forward(&e, &t).unwrap()) - 5.0 / 6.0).abs() < 1e-6);
        // Semi-hard where the hard negative is closer than the positive: x = [0, 2, 1, 5],
        // groups [0, 0, 1, 1], margin 0.5. Anchor 0: p at 2, negatives at 1 and 5 → the
        // semi-hard one is 5: [2 − 5 + 0.5]_+ = 0 (hard mining would give 1.5).
        let e2 = Tensor::new(&[[0.0f64], [2.0], [1.0], [5.0]], &Device::Cpu).unwrap();
        let l = loss(cfg(TripletMining::SemiHard, 0.5));
        // Anchor 1: p at 2, negatives at 1, 3 → 3: 2 − 3 + 0.5 = −0.5 → 0. Anchor 2: p at
        // 4, negatives at 1, 1 → none farther, hardest 1: 4 − 1 + 0.5 = 3.5. Anchor 3: p at
        // 4, negatives at 5, 3 → 5: 4 − 5 + 0.5 → 0. Mean over 4 pairs: 0.875.
        assert!((val(&l.forward(&e2, &t).unwrap()) - 0.875).abs() < 1e-6);
    }

    #[test]
    fn semi_hard_fallback_and_reduction_by_hand() {
        // Euclidean on a line: 0 and 3.3 in group 0, 1.2 and 2.1 in group 1.
        let e = Tensor::new(&[[0.0f64], [3.3], [1.2], [2.1]], &Device::Cpu).unwrap();
        let t = targets(&[0, 0, 1, 1]);
        let value = |margin, semi_hard_fallback, reduction| {
            let l = loss(TripletLossConfig {
                margin,
                distance: Distance::Euclidean,
                mining: TripletMining::SemiHard,
                semi_hard_fallback,
                reduction,
                ..Default::default()
            });
            val(&l.forward(&e, &t).unwrap())
        };
        use SemiHardFallback::{FarthestNegative, HardestNegative};
        // (0 → 3.3) and (3.3 → 0): d_ap = 3.3, negatives at 1.2 and 2.1, none farther:
        // the farthest gives 3.3 − 2.1 + m, the hardest 3.3 − 1.2 + m. (1.2 → 2.1) and
        // (2.1 → 1.2): d_ap = 0.9, the closest farther negative is at 1.2: 0.9 − 1.2 + m.
        let close = |got: f64, want: f64| assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        close(
            value(0.5, FarthestNegative, None),
            (1.7 + 1.7 + 0.2 + 0.2) / 4.0,
        );
        close(
            value(0.5, HardestNegative, None),
            (2.6 + 2.6 + 0.2 + 0.2) / 4.0,
        );
        // Margin 0.2: the last two terms are 0; the non-zero mean leaves them out.
        close(value(0.2, FarthestNegative, None), (1.4 + 1.4) / 4.0);
        close(
            value(0.2, FarthestNegative, Some(Reduction::MeanNonZero)),
            1.4,
        );
        // `all` averages over the non-zero triplets unless told otherwise: anchor 0 has
        // [3.3 − 1.2 + 0.2]_+ = 2.3, [3.3 − 2.1 + 0.2]_+ = 1.4; anchor 3.3: 1.4 and 2.3;
        // anchors 1.2, 2.1: [0.9 − 1.2 + 0.2]_+ = 0 and [0.9 − 2.1 + 0.2]_+ = 0.
        let all = |reduction| {
            let l = loss(TripletLossConfig {
                margin: 0.2,
                distance: Distance::Euclidean,
                mining: TripletMining::All,
                reduction,
                ..Default::default()
            });
            val(&l.forward(&e, &t).unwrap())
        };
        close(all(None), 7.4 / 4.0);
        close(all(Some(Reduction::Mean)), 7.4 / 8.0);
    }

    #[test]
    fn semi_hard_fallback_needs_semi_hard_mining() {
        let err = TripletLoss::new(
            2,
            TripletLossConfig {
                semi_hard_fallback: SemiHardFallback::HardestNegative,
                ..Default::default()
            },
            &mut Params::new(&Device::Cpu, 0).scope("loss"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("semi_hard_fallback"), "{err}");
    }

    #[test]
    fn no_usable_anchor_gives_zero() {
        let e = Tensor::new(&[[0.0f32, 1.0], [1.0, 0.0]], &Device::Cpu).unwrap();
        for mining in [
            TripletMining::All,
            TripletMining::Hard,
            TripletMining::SemiHard,
        ] {
            let l = loss(TripletLossConfig {
                mining,
                ..Default::default()
            });
            assert_eq!(val(&l.forward(&e, &targets(&[0, 1])).unwrap()), 0.0);
            assert_eq!(val(&l.forward(&e, &targets(&[0, 0])).unwrap()), 0.0);
        }
    }

    #[test]
    fn config_serde_names() {
        let cfg: TripletLossConfig = serde_json::from_str(
            r#"{"margin": 1.0, "distance": "euclidean", "mining": "semi_hard",
                "soft": false, "scale_by_mean_negative": false}"#,
        )
        .unwrap();
        assert_eq!(cfg.mining, TripletMining::SemiHard);
        // Written before the fallback and the reduction existed: their defaults.
        assert_eq!(cfg.semi_hard_fallback, SemiHardFallback::FarthestNegative);
        assert_eq!(cfg.reduction, None);
        let cfg: TripletLossConfig = serde_json::from_str(
            r#"{"margin": 1.0, "distance": "cosine", "mining": "semi_hard", "soft": false,
                "scale_by_mean_negative": false, "semi_hard_fallback": "hardest_negative",
                "reduction": "mean_non_zero"}"#,
        )
        .unwrap();
        assert_eq!(cfg.semi_hard_fallback, SemiHardFallback::HardestNegative);
        assert_eq!(cfg.reduction, Some(Reduction::MeanNonZero));
        assert!(
            serde_json::from_str::<TripletLossConfig>(r#"{"margin": 1.0, "typo": 1}"#).is_err()
        );
    }

    #[test]
    fn soft_needs_hard_mining() {
        let err = TripletLoss::new(
            2,
            TripletLossConfig {
                soft: true,
                mining: TripletMining::All,
                ..Default::default()
            },
            &mut Params::new(&Device::Cpu, 0).scope("loss"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("soft"), "{err}");
    }
}
