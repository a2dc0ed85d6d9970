//! Similarity losses.
//!
//! A loss consumes the head's embeddings of a batch, laid out as its [`LossKind`]'s data
//! loader lays them out, together with that kind's targets:
//! * pair losses ([`PairKind`]): `embeddings: (2P, d)`, first the `P` `obj_a`, then the
//!   `P` `obj_b`, and [`PairTargets`] (`pairs: (P, 2)`, `labels: (P)`, `subgroups: (2P)`).
//! * group losses ([`GroupKind`]): `embeddings: (N, d)` and [`GroupTargets`]
//!   (`groups: (N)`, `i64`). Those that can learn against a cross-batch memory also
//!   implement [`MemoryLoss`].
//!
//! Every loss is a batched expression of matrix operations (no per-item loops) returning
//! a scalar tensor. Losses with trainable parameters create them in the
//! [`ParamScope`] they are built with, so the trainer optimises them too.
//!
//! **Averaging.** A loss made of per-anchor (per-pair, per-triplet) terms says in its docs
//! which terms its mean runs over. pytorch-metric-learning (PML) has two conventions, its
//! reducers: the mean over every valid term (`MeanReducer`) and the mean over the non-zero
//! terms only (`AvgNonZeroReducer`, its default for its triplet, contrastive, circle and
//! SupCon losses). Where they differ in practice (the hinge losses, whose terms reach 0 once
//! their margin is met) the loss has a [`Reduction`] option; `tests/parity_pml.rs` checks
//! every loss that PML also has against PML 2.9, under the convention its docs state.

mod arcface;
mod center;
mod circle;
mod class_logits;
mod combined;
mod contrastive;
mod cos_face;
mod fast_ap;
pub mod masks;
mod matryoshka;
pub mod mined_negatives;
mod multi_similarity;
mod multiple_negatives_ranking;
mod online_contrastive;
mod softmax;
mod supcon;
mod triplet;

use candle_core::Tensor;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use arcface::{ArcFaceLoss, ArcFaceLossConfig};
pub use center::{CenterLoss, CenterLossConfig};
pub use circle::{CircleLoss, CircleLossConfig};
pub use combined::{CombinedLoss, CombinedLossConfig};
pub use contrastive::{ContrastiveLoss, ContrastiveLossConfig};
pub use cos_face::{CosFaceLoss, CosFaceLossConfig};
pub use fast_ap::{FastAPLoss, FastAPLossConfig};
pub use matryoshka::{MatryoshkaLoss, MatryoshkaLossConfig};
pub use multi_similarity::{MultiSimilarityLoss, MultiSimilarityLossConfig};
pub use multiple_negatives_ranking::{
    MultipleNegativesRankingLoss, MultipleNegativesRankingLossConfig,
};
pub use online_contrastive::{OnlineContrastiveLoss, OnlineContrastiveLossConfig, PairMining};
pub use softmax::{SoftmaxLoss, SoftmaxLossConfig};
pub use supcon::{SupConLoss, SupConLossConfig};
pub use triplet::{SemiHardFallback, TripletLoss, TripletLossConfig, TripletMining, triplet_mask};

use crate::data::{
    GroupMeta, GroupTargets, PairMeta, PairTargets, SimilarityGroupSample, SimilarityPairSample,
    SimilaritySample,
};
use crate::distance::Distance;
use crate::error::Result;
use crate::metric;
use crate::nn::ParamScope;

/// What kind of data a loss trains on: it fixes the sample type, the batch layout, the
/// targets and how a whole validation set is scored.
pub trait LossKind: 'static {
    /// The targets of one sample.
    type Meta: Copy + Send + Sync + std::fmt::Debug;
    /// The targets of a batch.
    type Targets;
    /// The sample type for records of type `R`.
    type Sample<R: Send + Sync>: SimilaritySample<Record = R, Meta = Self::Meta, Targets = Self::Targets>;

    /// Checks a whole data set before training (`what` names it in errors). Default: ok.
    fn check(_metas: &[Self::Meta], _what: &str) -> Result<()> {
        Ok(())
    }

    /// Who is relevant to whom among the objects of `metas`' samples, laid out
    /// slot-major (as a batch is): the partner of a pair, the members of a group.
    fn relevance(metas: &[Self::Meta]) -> metric::OwnedRelevance;

    /// The metrics every evaluation of this kind reports (before the attached ones).
    fn metrics() -> Vec<Box<dyn metric::Metric>>;

    /// Scores a whole evaluation set: `embeddings` holds every object of every sample
    /// in slot-major order (`OBJECTS · n` rows); returns the [`metrics`](Self::metrics)
    /// as `(name, value)`, computed by the [`Evaluator`](metric::Evaluator) with
    /// [`relevance`](Self::relevance), as `Trainer::fit` and `Trainer::evaluate` do.
    fn evaluate(
        embeddings: &Tensor,
        metas: &[Self::Meta],
        distance: Distance,
    ) -> Result<Vec<(String, f64)>> {
        let metrics = Self::metrics();
        let list: Vec<&dyn metric::Metric> = metrics.iter().map(|m| m.as_ref()).collect();
        metric::Evaluator::new(distance).evaluate(
            embeddings,
            &Self::relevance(metas).as_relevance(),
            &list,
        )
    }
}

/// Pairs of objects with a score ([`SimilarityPairSample`]).
#[derive(Debug)]
pub enum PairKind {}

impl LossKind for PairKind {
    type Meta = PairMeta;
    type Targets = PairTargets;
    type Sample<R: Send + Sync> = SimilarityPairSample<R>;

    /// Each positive pair's `obj_a` is a query ranked against every `obj_b` of the set
    /// (a question against all answers); its own `obj_b` is relevant, with the pair's
    /// score as gain.
    fn relevance(metas: &[PairMeta]) -> metric::OwnedRelevance {
        let p = metas.len();
        metric::OwnedRelevance::QueryCandidate {
            pairs: (0..p).map(|i| (i, i + p)).collect(),
            scores: metas.iter().map(|m| m.score).collect(),
        }
    }

    /// `precision@1` (the own answer is the nearest) and `mrr` (mean `1 / (rank + 1)`).
    fn metrics() -> Vec<Box<dyn metric::Metric>> {
        vec![
            Box::new(metric::RetrievalPrecision { k: 1 }),
            Box::new(metric::MeanReciprocalRank),
        ]
    }
}

/// Objects with a group id ([`SimilarityGroupSample`]).
#[derive(Debug)]
pub enum GroupKind {}

impl LossKind for GroupKind {
    type Meta = GroupMeta;
    type Targets = GroupTargets;
    type Sample<R: Send + Sync> = SimilarityGroupSample<R>;

    fn relevance(metas: &[GroupMeta]) -> metric::OwnedRelevance {
        metric::OwnedRelevance::Groups(metas.iter().map(|m| m.group).collect())
    }

    /// A group loss learns from pairs of items of one group: a data set where every group
    /// has a single item teaches nothing and is an error; single-item groups next to
    /// larger ones only serve as negatives, and are reported with `tracing::warn!`.
    fn check(metas: &[GroupMeta], what: &str) -> Result<()> {
        let mut sizes = std::collections::HashMap::<i64, usize>::new();
        for m in metas {
            *sizes.entry(m.group).or_default() += 1;
        }
        let singletons: Vec<i64> = sizes
            .iter()
            .filter(|(_, n)| **n == 1)
            .map(|(g, _)| *g)
            .collect();
        if singletons.len() == sizes.len() {
            return Err(crate::error::Error::invalid(
                what,
                format!(
                    "every one of its {} groups has a single item, so no item has a positive; \
                     a group loss needs groups of at least two items",
                    sizes.len()
                ),
            ));
        }
        if !singletons.is_empty() {
            let mut some = singletons.clone();
            some.sort_unstable();
            some.truncate(5);
            tracing::warn!(
                "{what}: {} of {} groups have a single item (e.g. groups {some:?}); they only serve as negatives",
                singletons.len(),
                sizes.len()
            );
        }
        Ok(())
    }

    /// `precision@1` (the nearest other object is in the query's group) and
    /// `r_precision` (mean over queries of the fraction of the `R` nearest in the group,
    /// `R` the number of other members), every object whose group has another member
    /// querying all the others.
    fn metrics() -> Vec<Box<dyn metric::Metric>> {
        vec![
            Box::new(metric::RetrievalPrecision { k: 1 }),
            Box::new(metric::RPrecision),
        ]
    }
}

/// Which terms a loss's mean runs over (see "Averaging" in the [module docs](self)). Losses
/// that take it as `reduction: Option<Reduction>` use their own documented convention for
/// `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reduction {
    /// The mean over every valid term, the zero ones included (PML's `MeanReducer`): terms
    /// that already meet their margin keep their weight in the average, so the loss and its
    /// gradient shrink as training satisfies them.
    Mean,
    /// The mean over the terms that are not zero (PML's `AvgNonZeroReducer`): terms that
    /// meet their margin drop out, so the remaining violations keep their full weight. `0`,
    /// with a zero gradient, when every term is `0`.
    MeanNonZero,
}

impl Reduction {
    /// The mean of `values` over the entries where the `{0, 1}` mask `valid` (same shape) is
    /// 1, and for [`MeanNonZero`](Reduction::MeanNonZero) `values` is also non-zero; `0`
    /// when no entry counts. Which entries count is not differentiated.
    pub(crate) fn reduce(self, values: &Tensor, valid: &Tensor) -> Result<Tensor> {
        let weights = match self {
            Reduction::Mean => valid.clone(),
            Reduction::MeanNonZero => values
                .detach()
                .ne(0.0)?
                .to_dtype(values.dtype())?
                .mul(valid)?,
        };
        triplet::weighted_mean(values, &weights)
    }
}

/// A group loss that can also compare a batch against a cross-batch memory (XBM, Wang et
/// al. 2020): the batch's embeddings are anchors, the memory's are the candidates.
#[diagnostic::on_unimplemented(
    message = "loss `{Self}` has no cross-batch-memory form, so it cannot be used with #[xbm]",
    label = "XBM needs a group loss that implements `MemoryLoss`",
    note = "use a group loss such as TripletLoss, or remove the #[xbm] field"
)]
pub trait MemoryLoss: SimilarityLoss<Kind = GroupKind> {
    /// The loss of `embeddings: (N, d)` with `groups: (N)` against
    /// `memory_embeddings: (M, d)` with `memory_groups: (M)`.
    fn forward_memory(
        &self,
        embeddings: &Tensor,
        groups: &Tensor,
        memory_embeddings: &Tensor,
        memory_groups: &Tensor,
    ) -> Result<Tensor>;
}

/// A similarity loss.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a similarity loss",
    label = "`SimilarityLoss` is not implemented for `{Self}`",
    note = "the #[loss] field holds a loss such as `MultipleNegativesRankingLoss` (pairs) or `TripletLoss` (groups); a head belongs in the #[head] field"
)]
pub trait SimilarityLoss: Sized + Send + Sync {
    /// The data it trains on.
    type Kind: LossKind;
    /// Options, with Quaterion's defaults in `Default`. Saved with a servable model.
    type Config: Default + Clone + std::fmt::Debug + Serialize + DeserializeOwned;
    /// A stable type name, written into a saved model's config.
    const NAME: &'static str;

    /// Builds the loss for embeddings of `embedding_size`; trainable parameters (if any)
    /// are created in `params`.
    fn new(embedding_size: usize, config: Self::Config, params: &mut ParamScope) -> Result<Self>;

    /// The options it was built with.
    fn config(&self) -> &Self::Config;

    /// The distance it compares embeddings with (also used by retrieval metrics).
    fn distance(&self) -> Distance;

    /// The scalar loss of a batch.
    fn forward(
        &self,
        embeddings: &Tensor,
        targets: &<Self::Kind as LossKind>::Targets,
    ) -> Result<Tensor>;

    /// The loss of a batch with `negatives: (N, d)`, extra negatives for every anchor
    /// (hard negatives mined from the cache, [`crate::train::hard_negatives`]). Default:
    /// an error saying the loss takes none; see [`mined_negatives`] for those that do.
    fn forward_with_negatives(
        &self,
        embeddings: &Tensor,
        targets: &<Self::Kind as LossKind>::Targets,
        negatives: &Tensor,
    ) -> Result<Tensor> {
        let _ = (embeddings, targets, negatives);
        Err(crate::error::Error::invalid(
            format!("{} with TrainerConfig.hard_negatives", Self::NAME),
            "this pair loss takes no extra negatives; use MultipleNegativesRankingLoss \
             (or MatryoshkaLoss over it), train on group data (every group loss takes mined \
             negatives as batch members), or turn hard-negative mining off",
        ))
    }
}

/// Checks a pair batch before a loss indexes into it: `embeddings: (n, d)`,
/// `pairs: (P, 2)` with every index below `n`, `labels: (P)`. An error names the loss and
/// the offending pair, instead of an index error deep inside a kernel.
pub(crate) fn check_pairs(loss: &str, embeddings: &Tensor, targets: &PairTargets) -> Result<()> {
    let n = embeddings.dims().first().copied().unwrap_or(0);
    if embeddings.rank() != 2 {
        return Err(crate::error::Error::shape(
            format!("{loss} embeddings"),
            "(n, d)",
            embeddings.dims(),
        ));
    }
    let p = targets.pairs.dims().first().copied().unwrap_or(0);
    if targets.pairs.dims() != [p, 2] || targets.labels.dims() != [p] {
        return Err(crate::error::Error::shape(
            format!("{loss} targets"),
            format!(
                "pairs (P, 2) and labels (P), labels are {:?}",
                targets.labels.dims()
            ),
            targets.pairs.dims(),
        ));
    }
    let pairs = targets
        .pairs
        .to_dtype(candle_core::DType::U32)?
        .to_vec2::<u32>()?;
    if let Some((i, pair)) = pairs
        .iter()
        .enumerate()
        .find(|(_, p)| p.iter().any(|&j| j as usize >= n))
    {
        return Err(crate::error::Error::invalid(
            format!("{loss}, pair {i}"),
            format!("indices {pair:?} are out of range for a batch of {n} embeddings"),
        ));
    }
    Ok(())
}

/// `mean_i(logsumexp(logits_i) − logits_i[target_i])` with `target_i = i`, for a square
/// `(n, n)` matrix: cross-entropy where row `i`'s class is `i`. With `symmetric`, the mean
/// of that and the same over the columns (`logits` transposed), without materialising the
/// transpose: both directions share the diagonal, read with a gather (`O(n)`, not an
/// `n × n` mask). Numerically stable (each row's or column's max is subtracted, detached)
/// and differentiable.
pub(crate) fn diagonal_cross_entropy(logits: &Tensor, symmetric: bool) -> Result<Tensor> {
    if let Some(loss) = crate::kernels::diagonal_cross_entropy(logits, symmetric)? {
        return Ok(loss);
    }
    diagonal_cross_entropy_composite(logits, symmetric)
}

/// The composite form of [`diagonal_cross_entropy`] (any device and dtype; the reference for
/// the fused CPU kernel).
pub(crate) fn diagonal_cross_entropy_composite(logits: &Tensor, symmetric: bool) -> Result<Tensor> {
    let n = logits.dim(0)?;
    let idx = Tensor::arange(0u32, n as u32, logits.device())?.unsqueeze(1)?;
    let diag = logits.gather(&idx, 1)?.squeeze(1)?.mean_all()?;
    // mean over `dim`'s complement of logsumexp along `dim`.
    let mean_lse = |dim: usize| -> Result<Tensor> {
        let max = logits.max_keepdim(dim)?.detach();
        Ok(logits
            .broadcast_sub(&max)?
            .exp()?
            .sum_keepdim(dim)?
            .log()?
            .add(&max)?
            .mean_all()?)
    };
    let rows = mean_lse(1)?;
    if !symmetric {
        return Ok(rows.sub(&diag)?);
    }
    let cols = mean_lse(0)?;
    Ok(((rows + cols)? * 0.5)?.sub(&diag)?)
}

/// The value of a scalar tensor, for tests.
#[cfg(test)]
pub(crate) fn scalar(t: &Tensor) -> f32 {
    t.to_device(&candle_core::Device::Cpu)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
