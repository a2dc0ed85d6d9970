//! Hard negatives mined from the whole training set during training, for pair and group
//! data.
//!
//! sentence-transformers mines hard negatives once, offline, with the model as it was
//! (`mine_hard_negatives`). Here every object's embedding is one pass through the head
//! over the frozen encoder's cache, so mining is re-run every `every_epochs` epochs with
//! the model as it is (ANCE, Xiong et al. 2021, <https://arxiv.org/abs/2007.00808>, does
//! this asynchronously).
//!
//! **Pairs** ([`mine`]). For `P` training pairs `(aᵢ, bᵢ)` with embeddings `A, B: (P, d)`
//! and `s_ij = sim(aᵢ, b_j)` (the loss's distance's similarity):
//!
//! ```text
//! t_i   = min( s_ii − absolute_margin,  s_ii − relative_margin · |s_ii|,  max_score )
//! neg_i = the num_negatives j with the largest s_ij  among  j ≠ i,  s_ij ≤ t_i,
//!         b_j not equal to bᵢ and a_j not equal to aᵢ
//! ```
//!
//! **Groups** ([`mine_groups`]). For `N` objects with embeddings `E: (N, d)` and groups
//! `g`, the candidates of object `i` are the objects of other groups, and the positive
//! score in `t_i` is that of `i`'s closest positive, `p_i = max_{j ≠ i, g_j = gᵢ} s_ij`
//! (an object alone in its group has none, and only `max_score` bounds it).
//!
//! The threshold `t_i` is the false-negative guard: a candidate that scores about as high
//! as the positive is more likely an unlabelled positive than a negative (the margins and
//! `max_score` are sentence-transformers' `absolute_margin`, `relative_margin` and
//! `max_score`; an option left `None` drops out of the `min`). Objects whose embeddings are
//! bit-identical to the query's positive or anchor (a duplicate answer, a question asked
//! twice) are positives, never negatives. Scores are computed for a block of `r` queries at
//! a time, `r = clamp(block_bytes / (4 P), 1, P)`, so a block's `(r, P)` f32 matrix takes at
//! most `block_bytes`; the top-k per row is a linear scan (`O(P · k)`), never a sort.
//!
//! **In the trainer** ([`TrainerConfig::hard_negatives`](super::TrainerConfig::hard_negatives)):
//! at the start of every epoch `e` with `e % every_epochs == 0` (and the first epoch of a
//! resumed run) the whole training set is embedded in evaluation mode and mined. Each
//! training batch then carries the mined negatives of its samples, each once and none
//! that is already a sample of the batch:
//!
//! * pair data: the mined answers after the pairs' rows, and the loss is
//!   [`forward_with_negatives`](crate::loss::SimilarityLoss::forward_with_negatives):
//!   MultipleNegativesRankingLoss ranks each anchor against the batch's positives and all
//!   those negatives ([`crate::loss::mined_negatives`]); other pair losses refuse them;
//! * group data: the mined objects join the batch as members with their own groups, and
//!   the loss is its plain `forward` over the enlarged batch. So every group loss
//!   (TripletLoss in every mining mode, OnlineContrastive, MultiSimilarity, SupCon,
//!   Circle, FastAP) sees them as negatives of the anchors they were mined for, as it
//!   would see any member of another group; they are also anchors themselves, with
//!   whatever positives the batch holds (for the class-logit losses they are simply more
//!   labelled rows). The step hook and cross-batch memory see the enlarged batch.
//!
//! Over several ranks ([`crate::distributed`]) every rank embeds and mines a share and
//! all ranks end with the same result. With [`GatherMode::Global`](crate::distributed::GatherMode)
//! the negatives are those of the whole global batch, each embedded by one rank and
//! gathered like the batch, so the loss is the single process's; with `Local`, each
//! rank's shard carries its own samples' negatives.

use std::collections::HashMap;
use std::ops::Range;
use std::time::Instant;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{Prepared, SampleOf, TrainableModel};
use crate::data::SimilaritySample;
use crate::distance::Distance;
use crate::distributed::{self, Communicator};
use crate::error::{Error, Result};
use crate::loss::SimilarityLoss;

/// Options of hard-negative mining ([`TrainerConfig::hard_negatives`](super::TrainerConfig::hard_negatives)).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HardNegatives {
    /// Mine at the start of every this many epochs, at least 1. Default 1.
    pub every_epochs: usize,
    /// Negatives kept per query, at least 1. Default 1.
    pub num_negatives: usize,
    /// Skip candidates with `s_ij > s_ii − absolute_margin` (finite). Default none.
    pub absolute_margin: Option<f64>,
    /// Skip candidates with `s_ij > s_ii − relative_margin · |s_ii|`, in `[0, 1)`: within
    /// this fraction of the positive's score (`s_ii · (1 − relative_margin)` for a positive
    /// score, and below it for a negative one too, as with Euclidean similarities). Default
    /// 0.05 (sentence-transformers' suggestion, after NV-Retriever's "95% of the positive").
    pub relative_margin: Option<f64>,
    /// Skip candidates with `s_ij > max_score` (finite). Default none.
    pub max_score: Option<f64>,
    /// Bytes of one block's `(r, P)` score matrix. Default 64 MiB.
    pub block_bytes: usize,
}

impl Default for HardNegatives {
    fn default() -> Self {
        HardNegatives {
            every_epochs: 1,
            num_negatives: 1,
            absolute_margin: None,
            relative_margin: Some(0.05),
            max_score: None,
            block_bytes: 64 << 20,
        }
    }
}

impl HardNegatives {
    /// Checks every option; errors name `field.option`.
    pub fn check(&self, field: &str) -> Result<()> {
        let bad =
            |name: &str, message: String| Err(Error::invalid(format!("{field}.{name}"), message));
        if self.every_epochs == 0 {
            return bad("every_epochs", "must be at least 1, got 0".into());
        }
        if self.num_negatives == 0 {
            return bad("num_negatives", "must be at least 1, got 0".into());
        }
        if self.block_bytes == 0 {
            return bad("block_bytes", "must be at least 1, got 0".into());
        }
        for (name, v) in [
            ("absolute_margin", self.absolute_margin),
            ("max_score", self.max_score),
        ] {
            if let Some(v) = v
                && !v.is_finite()
            {
                return bad(name, format!("must be finite, got {v}"));
            }
        }
        if let Some(r) = self.relative_margin
            && !(0.0..1.0).contains(&r)
        {
            return bad("relative_margin", format!("must be in [0, 1), got {r}"));
        }
        Ok(())
    }

    /// The guard's threshold `t_i` for a query whose positive scores `positive` (`None`:
    /// a query without a positive, which only `max_score` bounds).
    fn threshold(&self, positive: Option<f32>) -> f32 {
        let mut t = f32::INFINITY;
        if let Some(p) = positive {
            if let Some(m) = self.absolute_margin {
                t = t.min(p - m as f32);
            }
            if let Some(r) = self.relative_margin {
                t = t.min(p - r as f32 * p.abs());
            }
        }
        if let Some(m) = self.max_score {
            t = t.min(m as f32);
        }
        t
    }
}

/// What one mining pass in the trainer cost and found ([`EpochStats::mining`](super::EpochStats::mining)).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MiningStats {
    /// Seconds of the whole pass: embedding every object, the scores, the selection (and
    /// the gathering of the ranks' shares).
    pub seconds: f64,
    /// Seconds of the scores and the selection alone (the slowest rank's).
    pub mine_seconds: f64,
    /// Negatives found, over all queries.
    pub negatives: usize,
    /// Candidates the false-negative guard skipped, over all queries.
    pub guarded: usize,
}

/// The result of one mining pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Mined {
    /// Per sample `i`, the samples `j` that are its hard negatives, hardest first (fewer
    /// than `num_negatives` where the guard left fewer): for pairs, `j`'s second object is
    /// a negative of `aᵢ` ([`mine`]); for groups, object `j` is one of object `i`
    /// ([`mine_groups`]).
    pub negatives: Vec<Vec<usize>>,
    /// Candidates the false-negative guard skipped, over all queries.
    pub guarded: usize,
    /// Seconds the pass took (scores and selection; not the embedding).
    pub seconds: f64,
    /// Seconds of the whole pass in the trainer, the embedding included (0 from [`mine`]
    /// and [`mine_groups`], which take embeddings).
    pub total_seconds: f64,
}

impl Mined {
    /// Room for `queries` lists, nothing found yet.
    fn empty(queries: usize) -> Mined {
        Mined {
            negatives: Vec::with_capacity(queries),
            guarded: 0,
            seconds: 0.0,
            total_seconds: 0.0,
        }
    }

    /// What the pass cost and found, for the epoch's report.
    pub fn stats(&self) -> MiningStats {
        MiningStats {
            seconds: self.total_seconds,
            mine_seconds: self.seconds,
            negatives: self.negatives.iter().map(Vec::len).sum(),
            guarded: self.guarded,
        }
    }

    /// The mined negatives of the anchors of `samples` (sample indices), each once, in
    /// order of first appearance, leaving out samples that are in `samples`.
    pub fn batch_negatives(&self, samples: &[usize]) -> Vec<usize> {
        let mut seen: std::collections::HashSet<usize> = samples.iter().copied().collect();
        let mut out = Vec::new();
        for &i in samples {
            for &j in self.negatives.get(i).map(Vec::as_slice).unwrap_or(&[]) {
                if seen.insert(j) {
                    out.push(j);
                }
            }
        }
        out
    }
}

/// A class id per row: rows with bit-identical values share one.
fn duplicate_classes(rows: &[Vec<f32>]) -> Vec<usize> {
    let mut ids: HashMap<Vec<u32>, usize> = HashMap::new();
    rows.iter()
        .map(|r| {
            let key: Vec<u32> = r.iter().map(|v| v.to_bits()).collect();
            let next = ids.len();
            *ids.entry(key).or_insert(next)
        })
        .collect()
}

/// Mines hard negatives for pairs with `anchors, positives: (P, d)` under `distance`;
/// see the module docs.
pub fn mine(
    anchors: &Tensor,
    positives: &Tensor,
    distance: Distance,
    options: &HardNegatives,
) -> Result<Mined> {
    let p = anchors.dims().first().copied().unwrap_or(0);
    mine_rows(anchors, positives, distance, options, 0..p)
}

/// [`mine`] for the queries `rows` only (`negatives[r]` is query `rows.start + r`'s).
fn mine_rows(
    anchors: &Tensor,
    positives: &Tensor,
    distance: Distance,
    options: &HardNegatives,
    rows: Range<usize>,
) -> Result<Mined> {
    options.check("HardNegatives")?;
    let started = Instant::now();
    let (p, d) = anchors
        .dims2()
        .map_err(|_| Error::shape("hard-negative mining, anchors", "(P, d)", anchors.dims()))?;
    if positives.dims() != [p, d] {
        return Err(Error::shape(
            "hard-negative mining, positives",
            format!("({p}, {d}) like the anchors"),
            positives.dims(),
        ));
    }
    let anchor_class = duplicate_classes(&anchors.to_vec2::<f32>()?);
    let positive_class = duplicate_classes(&positives.to_vec2::<f32>()?);
    let k = options.num_negatives;
    let mut mined = Mined::empty(rows.len());
    scan_blocks(anchors, positives, distance, options, rows, |i, row| {
        let t = options.threshold(Some(row[i]));
        let found = top_k(row, k, t, &mut mined.guarded, |j| {
            j == i || positive_class[j] == positive_class[i] || anchor_class[j] == anchor_class[i]
        });
        mined.negatives.push(found);
    })?;
    mined.seconds = started.elapsed().as_secs_f64();
    Ok(mined)
}

/// Hands `each(i, s_i)`, for every query `i` of `rows`, the similarities `s_i` of
/// `queries[i]` to every row of `candidates`, in order; the scores are computed for a
/// block of `r = clamp(block_bytes / (4 C), 1, C)` queries at a time (`C` candidates), so
/// a block's `(r, C)` f32 matrix takes at most `block_bytes`.
fn scan_blocks(
    queries: &Tensor,
    candidates: &Tensor,
    distance: Distance,
    options: &HardNegatives,
    rows: Range<usize>,
    mut each: impl FnMut(usize, &[f32]),
) -> Result<()> {
    let c = candidates.dim(0)?.max(1);
    let block = (options.block_bytes / (4 * c)).clamp(1, c);
    for start in rows.clone().step_by(block) {
        let len = block.min(rows.end - start);
        let scores = distance
            .similarity_matrix(&queries.narrow(0, start, len)?, Some(candidates))?
            .to_vec2::<f32>()?;
        for (r, row) in scores.iter().enumerate() {
            each(start + r, row);
        }
    }
    Ok(())
}

/// The `k` candidates `j` of `row` with the largest scores, best first, among those
/// that `excluded(j)` does not rule out, are not NaN, and score at most `t` (a candidate
/// above `t` is counted in `guarded`). A linear scan, `O(len · k)`.
fn top_k(
    row: &[f32],
    k: usize,
    t: f32,
    guarded: &mut usize,
    excluded: impl Fn(usize) -> bool,
) -> Vec<usize> {
    let mut best: Vec<(f32, usize)> = Vec::with_capacity(k + 1);
    for (j, &s) in row.iter().enumerate() {
        if s.is_nan() || excluded(j) {
            continue;
        }
        if s > t {
            *guarded += 1;
            continue;
        }
        if best.len() == k && s <= best[k - 1].0 {
            continue;
        }
        let at = best.partition_point(|&(b, _)| b >= s);
        best.insert(at, (s, j));
        best.truncate(k);
    }
    best.into_iter().map(|(_, j)| j).collect()
}

/// Mines hard negatives for group data: `embeddings: (N, d)`, `groups[i]` the group of
/// object `i`, under `distance`. With `s_ij = sim(eᵢ, e_j)` and `p_i = max { s_ij : j ≠ i,
/// g_j = gᵢ }` (the closest positive; none for an object alone in its group):
///
/// ```text
/// t_i   = min( p_i − absolute_margin,  p_i − relative_margin · |p_i|,  max_score )
///         (only max_score when i has no positive)
/// neg_i = the num_negatives j with the largest s_ij  among  g_j ≠ gᵢ,  s_ij ≤ t_i,
///         e_j not equal to eᵢ
/// ```
///
/// The guard is the pair form's with the closest positive as "the positive": a
/// candidate of another group that scores about as high as anything of the query's own
/// group is more likely mislabelled than hard. Blocks of queries as in [`mine`].
pub fn mine_groups(
    embeddings: &Tensor,
    groups: &[i64],
    distance: Distance,
    options: &HardNegatives,
) -> Result<Mined> {
    mine_groups_rows(embeddings, groups, distance, options, 0..groups.len())
}

/// [`mine_groups`] for the queries `rows` only (`negatives[r]` is query `rows.start + r`'s).
fn mine_groups_rows(
    embeddings: &Tensor,
    groups: &[i64],
    distance: Distance,
    options: &HardNegatives,
    rows: Range<usize>,
) -> Result<Mined> {
    options.check("HardNegatives")?;
    let started = Instant::now();
    let (n, _) = embeddings.dims2().map_err(|_| {
        Error::shape(
            "hard-negative mining, embeddings",
            "(N, d)",
            embeddings.dims(),
        )
    })?;
    if groups.len() != n {
        return Err(Error::shape(
            "hard-negative mining, groups",
            format!("({n}), one per embedding"),
            [groups.len()],
        ));
    }
    let class = duplicate_classes(&embeddings.to_vec2::<f32>()?);
    let k = options.num_negatives;
    let mut mined = Mined::empty(rows.len());
    scan_blocks(embeddings, embeddings, distance, options, rows, |i, row| {
        let positive = row
            .iter()
            .enumerate()
            .filter(|&(j, s)| j != i && groups[j] == groups[i] && !s.is_nan())
            .map(|(_, &s)| s)
            .reduce(f32::max);
        let t = options.threshold(positive);
        let found = top_k(row, k, t, &mut mined.guarded, |j| {
            groups[j] == groups[i] || class[j] == class[i]
        });
        mined.negatives.push(found);
    })?;
    mined.seconds = started.elapsed().as_secs_f64();
    Ok(mined)
}

impl super::Trainer {
    /// One mining pass over the prepared training set: every object through the encoders
    /// (or their caches) and the head in evaluation mode, `cache_batch_size` at a time,
    /// then [`mine`] (pair data) or [`mine_groups`] (group data) with the loss's distance.
    /// Over several ranks each embeds and mines a contiguous share (of the objects, then
    /// of the queries), and the shares are all-gathered, so every rank ends with the same
    /// result, each query's computed once.
    pub(super) fn mine<M: TrainableModel>(
        &self,
        model: &M,
        data: &Prepared<'_, M>,
        options: &HardNegatives,
        comm: &dyn Communicator,
    ) -> Result<Mined> {
        let k = Prepared::<M>::K;
        let groups: Option<Vec<i64>> = data.metas.iter().map(SampleOf::<M>::class).collect();
        let groups = match (k, groups) {
            (2, _) => None,
            (1, Some(groups)) => Some(groups),
            _ => {
                return Err(Error::invalid(
                    "TrainerConfig.hard_negatives",
                    "mines the answers of other pairs (SimilarityPairSample) or objects of \
                     other groups (SimilarityGroupSample); this sample type is neither",
                ));
            }
        };
        let started = Instant::now();
        let n = data.metas.len();
        let embeddings = self.embed_all(model, data, comm)?;
        let embed_seconds = started.elapsed().as_secs_f64();
        let distance = model.loss().distance();
        let rows = distributed::shard(n, comm.world_size(), comm.rank());
        let mut mined = match &groups {
            Some(groups) => mine_groups_rows(&embeddings, groups, distance, options, rows)?,
            None => mine_rows(
                &embeddings.narrow(0, 0, n)?,
                &embeddings.narrow(0, n, n)?,
                distance,
                options,
                rows,
            )?,
        };
        if comm.world_size() > 1 {
            mined = Mined::from_shares(comm, &comm.all_gather_bytes(&mined.to_bytes())?, n)?;
        }
        mined.total_seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            samples = n,
            embed_seconds,
            mine_seconds = mined.seconds,
            guarded = mined.guarded,
            "hard negatives mined"
        );
        Ok(mined)
    }
}

impl Mined {
    /// This share as bytes: the guarded count and seconds, then per query its count and
    /// indices, all little-endian (`u64`, `f64`, then `u32`s).
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend((self.guarded as u64).to_le_bytes());
        out.extend(self.seconds.to_le_bytes());
        for list in &self.negatives {
            out.extend((list.len() as u32).to_le_bytes());
            for &j in list {
                out.extend((j as u32).to_le_bytes());
            }
        }
        out
    }

    /// The ranks' shares, in rank order, as one result for `n` queries: guarded counts
    /// summed, the slowest rank's seconds. An error names a share that does not parse or
    /// an index out of range.
    fn from_shares(comm: &dyn Communicator, shares: &[Vec<u8>], n: usize) -> Result<Mined> {
        let bad = |rank: usize, what: &str| {
            comm.error(format!(
                "hard-negative mining: the share of rank {rank} {what}"
            ))
        };
        let mut mined = Mined::empty(n);
        for (rank, bytes) in shares.iter().enumerate() {
            let mut words = bytes.get(16..).unwrap_or(&[]).chunks_exact(4);
            if bytes.len() < 16 || !words.remainder().is_empty() {
                return Err(bad(rank, "is not whole"));
            }
            let head = |at: usize| -> [u8; 8] { bytes[at..at + 8].try_into().unwrap_or([0; 8]) };
            mined.guarded += u64::from_le_bytes(head(0)) as usize;
            mined.seconds = mined.seconds.max(f64::from_le_bytes(head(8)));
            let mut next = || {
                words
                    .next()
                    .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]) as usize)
            };
            while let Some(len) = next() {
                let list: Option<Vec<usize>> = (0..len).map(|_| next()).collect();
                match list {
                    Some(list) if list.iter().all(|&j| j < n) => mined.negatives.push(list),
                    _ => return Err(bad(rank, "has a truncated list or an index out of range")),
                }
            }
        }
        if mined.negatives.len() != n {
            return Err(comm.error(format!(
                "hard-negative mining: the ranks' shares hold {} queries, not {n}",
                mined.negatives.len()
            )));
        }
        Ok(mined)
    }
}

/// Splits a training batch's embeddings into the pairs' `n_main` rows and the mined
/// negatives after them (`None` when there are none).
pub(crate) fn split(embeddings: &Tensor, n_main: usize) -> Result<(Tensor, Option<Tensor>)> {
    let n = embeddings.dim(0)?;
    if n == n_main {
        return Ok((embeddings.clone(), None));
    }
    Ok((
        embeddings.narrow(0, 0, n_main)?,
        Some(embeddings.narrow(0, n_main, n - n_main)?),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(rows: &[[f32; 2]]) -> Tensor {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (rows.len(), 2), &Device::Cpu).unwrap()
    }

    /// Angles in degrees → unit vectors, so cosine scores are cos(Δangle).
    fn at(deg: &[f32]) -> Tensor {
        let rows: Vec<[f32; 2]> = deg
            .iter()
            .map(|d| [d.to_radians().cos(), d.to_radians().sin()])
            .collect();
        t(&rows)
    }

    #[test]
    fn hardest_non_positives_by_hand_with_the_guard() {
        // Anchors and positives on the unit circle. Query 0 at 0°, its positive at 30°
        // (s = 0.866); other positives at 10° (s = 0.985, above the positive: guarded by
        // relative margin 0.05, threshold 0.823), 40° (0.766), 90° (0), 180° (−1).
        let anchors = at(&[0.0, 200.0, 300.0, 100.0, 150.0]);
        let positives = at(&[30.0, 10.0, 40.0, 90.0, 180.0]);
        let mined = mine(
            &anchors,
            &positives,
            Distance::Cosine,
            &HardNegatives {
                num_negatives: 2,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(mined.negatives[0], vec![2, 3]);
        // Without the guard, the 10° positive is the hardest.
        let open = mine(
            &anchors,
            &positives,
            Distance::Cosine,
            &HardNegatives {
                num_negatives: 2,
                relative_margin: None,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(open.negatives[0], vec![1, 2]);
        assert!(mined.guarded > open.guarded);
        // An absolute margin of 0.15 (threshold 0.716) also skips 40°; max_score −0.5
        // leaves only 180°.
        let abs = |absolute_margin, max_score| {
            mine(
                &anchors,
                &positives,
                Distance::Cosine,
                &HardNegatives {
                    num_negatives: 2,
                    relative_margin: None,
                    absolute_margin,
                    max_score,
                    ..Default::default()
                },
            )
            .unwrap()
            .negatives[0]
                .clone()
        };
        assert_eq!(abs(Some(0.15), None), vec![3, 4]);
        assert_eq!(abs(None, Some(-0.5)), vec![4]);
    }

    #[test]
    fn duplicates_are_positives_and_blocks_do_not_matter() {
        // Pair 2 repeats pair 0's answer and pair 3 its question: neither is a negative of
        // query 0, however close.
        let anchors = at(&[0.0, 90.0, 180.0, 0.0]);
        let positives = at(&[20.0, 100.0, 20.0, 270.0]);
        let options = HardNegatives {
            num_negatives: 3,
            relative_margin: None,
            ..Default::default()
        };
        let whole = mine(&anchors, &positives, Distance::Cosine, &options).unwrap();
        assert_eq!(whole.negatives[0], vec![1]);
        assert!(!whole.negatives[2].contains(&0));
        // One query row per block gives the same answer.
        let rowwise = mine(
            &anchors,
            &positives,
            Distance::Cosine,
            &HardNegatives {
                block_bytes: 1,
                ..options
            },
        )
        .unwrap();
        assert_eq!(rowwise.negatives, whole.negatives);
    }

    #[test]
    fn group_negatives_by_hand_with_the_guard() {
        // Object 0 at 0° (group 0), its positive at 20° (s = 0.940, threshold 0.893 at the
        // default relative margin); group 1 at 10° (0.985: guarded) and 30° (0.866),
        // group 2 at 60° (0.5), a duplicate of object 0 in group 3, and object 6 at 180°
        // alone in group 4.
        let e = at(&[0.0, 20.0, 10.0, 30.0, 60.0, 0.0, 180.0]);
        let groups = [0, 0, 1, 1, 2, 3, 4];
        let mine =
            |options: HardNegatives| mine_groups(&e, &groups, Distance::Cosine, &options).unwrap();
        let two = HardNegatives {
            num_negatives: 2,
            ..Default::default()
        };
        let mined = mine(two.clone());
        assert_eq!(mined.negatives[0], vec![3, 4]);
        // Object 1's own group is never a candidate, nor the duplicate 5 of object 0.
        assert!(mined.negatives.iter().enumerate().all(|(i, n)| {
            n.iter()
                .all(|&j| groups[j] != groups[i] && !(i == 0 && j == 5))
        }));
        // Object 6 has no positive: only max_score bounds it, so its nearest two (60° at
        // −0.5, 30° at −0.866) are its negatives.
        assert_eq!(mined.negatives[6], vec![4, 3]);
        // Without the guard the 10° object is the hardest.
        let open = mine(HardNegatives {
            relative_margin: None,
            ..two.clone()
        });
        assert_eq!(open.negatives[0], vec![2, 3]);
        assert!(mined.guarded > open.guarded);
        // max_score −0.9 leaves only the far side of the circle.
        let far = mine(HardNegatives {
            max_score: Some(-0.9),
            ..two.clone()
        });
        assert_eq!(far.negatives[0], vec![6]);
        assert_eq!(far.negatives[6], vec![1, 2]);
        // One query row per block gives the same answer.
        let rowwise = mine(HardNegatives {
            block_bytes: 1,
            ..two
        });
        assert_eq!(rowwise.negatives, mined.negatives);
        let err = mine_groups(
            &e,
            &groups[..6],
            Distance::Cosine,
            &HardNegatives::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("groups"), "{err}");
    }

    #[test]
    fn the_relative_margin_stays_below_a_negative_positive() {
        // A positive scoring −0.5 (at 120°): the threshold is −0.525, below it, not
        // −0.475 above it; a candidate at −0.51 (about 120.6°) is guarded.
        let anchors = at(&[0.0, 90.0]);
        let positives = at(&[120.0, 120.66]);
        let mined = mine(
            &anchors,
            &positives,
            Distance::Cosine,
            &HardNegatives::default(),
        )
        .unwrap();
        // Query 1 (90°, positive at 0.860, threshold 0.817) has its candidate at 0.866
        // guarded as well.
        assert_eq!(mined.negatives, vec![Vec::<usize>::new(), vec![]]);
        assert_eq!(mined.guarded, 2);
    }

    /// The ranks' shares round-trip through their bytes, in rank order; a share that is
    /// cut short or holds an index out of range is an error naming its rank.
    #[test]
    fn shares_round_trip_and_bad_shares_are_named() {
        let comm = crate::distributed::SingleProcess;
        let a = Mined {
            negatives: vec![vec![2, 1], vec![]],
            guarded: 4,
            seconds: 0.5,
            ..Mined::empty(0)
        };
        let b = Mined {
            negatives: vec![vec![0]],
            guarded: 1,
            seconds: 0.25,
            ..Mined::empty(0)
        };
        let joined = Mined::from_shares(&comm, &[a.to_bytes(), b.to_bytes()], 3).unwrap();
        assert_eq!(joined.negatives, vec![vec![2, 1], vec![], vec![0]]);
        assert_eq!((joined.guarded, joined.seconds), (5, 0.5));
        let msg = |shares: &[Vec<u8>], n| {
            Mined::from_shares(&comm, shares, n)
                .unwrap_err()
                .to_string()
        };
        let mut cut = a.to_bytes();
        cut.truncate(cut.len() - 4);
        assert!(msg(&[cut, b.to_bytes()], 3).contains("rank 0"));
        assert!(msg(&[a.to_bytes(), b.to_bytes()], 3 - 1).contains("rank 0"));
        let err = msg(&[a.to_bytes()], 3);
        assert!(err.contains("2 queries, not 3"), "{err}");
    }

    #[test]
    fn batch_negatives_are_unique_and_outside_the_batch() {
        let mined = Mined {
            negatives: vec![vec![3, 1], vec![3, 4], vec![0], vec![], vec![]],
            ..Mined::empty(0)
        };
        assert_eq!(mined.stats().negatives, 5);
        assert_eq!(mined.batch_negatives(&[0, 1]), vec![3, 4]);
        assert_eq!(mined.batch_negatives(&[2, 4]), vec![0]);
    }

    #[test]
    fn bad_options_are_named() {
        let msg = |o: HardNegatives| {
            o.check("TrainerConfig.hard_negatives")
                .unwrap_err()
                .to_string()
        };
        assert!(
            msg(HardNegatives {
                every_epochs: 0,
                ..Default::default()
            })
            .contains("hard_negatives.every_epochs")
        );
        assert!(
            msg(HardNegatives {
                num_negatives: 0,
                ..Default::default()
            })
            .contains("num_negatives")
        );
        assert!(
            msg(HardNegatives {
                relative_margin: Some(1.0),
                ..Default::default()
            })
            .contains("relative_margin")
        );
        assert!(
            msg(HardNegatives {
                max_score: Some(f64::NAN),
                ..Default::default()
            })
            .contains("max_score")
        );
        let e = t(&[[1.0, 0.0]]);
        let wrong = t(&[[1.0, 0.0], [0.0, 1.0]]);
        let err = mine(&e, &wrong, Distance::Cosine, &HardNegatives::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("positives"), "{err}");
    }
}
