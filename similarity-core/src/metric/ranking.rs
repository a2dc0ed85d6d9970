//! Ranking one query row, and the [`Metric`] trait every retrieval metric implements.
//!
//! A query row is a distance row `d: (m)` and a relevance row `rel: (m)`. Candidates are
//! ordered by the key `(d_j, j)`: nearest first, ties broken by the lower candidate index,
//! so the order is total and deterministic (NaN distances sort last). A candidate is
//! *relevant* when `rel_j > 0`; its *gain* is `rel_j` (1 for groups, the pair score for
//! pairs). With `R` relevant candidates, [`RankedRow`] holds their 0-based positions in the
//! full order, `rank_0 < rank_1 < … < rank_{R−1}`, and their gains in the same order.
//!
//! Every metric here is a function of that ranked row only, so no row is ever fully
//! sorted. Each candidate's key `(d_j, j)` is one integer (the distance's total-order bits,
//! then the index), and the `R` relevant keys are sorted. With few of them (`R ≤ 8`, the
//! usual retrieval case: one answer per question) each position is a branch-free count,
//! `rank_p = #{j : key_j < key_p}`, `O(m R)`; otherwise one pass over the `m` candidates
//! places each among the relevant keys (a binary search for those between the first and
//! the last), `O(m log R + R log R)`.
//!
//! A metric's value over many rows is `Σ sum / Σ count` of the rows' [`Partial`]s. Most
//! metrics contribute `(value, 1)` per scored row (a mean over rows); Quaterion's
//! reciprocal rank and R-precision pool over relevant items instead (see their modules).

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// The relevant candidates of one query row, by their position in the ranking.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RankedRow {
    /// Number of candidates `m` the row ranks (masked ones included, ranked last).
    pub candidates: usize,
    /// 0-based positions of the relevant candidates in the order by `(distance, index)`,
    /// ascending. Its length is `R`.
    pub ranks: Vec<usize>,
    /// The relevance (gain, `> 0`) of each relevant candidate, aligned with `ranks`.
    pub gains: Vec<f32>,
}

/// Rows with at most this many relevant candidates are ranked by direct counts (see the
/// module docs); above it, by a binary search per candidate.
const DIRECT_COUNT_MAX: usize = 8;

/// An integer whose order is `f32::total_cmp`'s (−NaN < −∞ < … < −0 < +0 < … < +∞ < NaN):
/// the sign-magnitude bits turned two's complement.
fn total_order_key(x: f32) -> i32 {
    let bits = x.to_bits() as i32;
    bits ^ (((bits >> 31) as u32) >> 1) as i32
}

impl RankedRow {
    /// Ranks a dense row: `distances: (m)`, `relevance: (m)`; entries `> 0` are relevant.
    pub fn from_dense(distances: &[f32], relevance: &[f32]) -> RankedRow {
        let relevant = relevance
            .iter()
            .enumerate()
            .filter(|(_, r)| **r > 0.0)
            .map(|(j, r)| (j, *r));
        RankedRow::from_relevant(distances, relevant)
    }

    /// Ranks a row given only its relevant candidates `(index, gain)` (gains `> 0`; others
    /// are dropped); every other candidate of `distances: (m)` is irrelevant.
    pub fn from_relevant(
        distances: &[f32],
        relevant: impl IntoIterator<Item = (usize, f32)>,
    ) -> RankedRow {
        let m = distances.len();
        let mut rel: Vec<(usize, f32)> = relevant
            .into_iter()
            .filter(|&(j, g)| g > 0.0 && j < m)
            .collect();
        if rel.is_empty() {
            return RankedRow {
                candidates: m,
                ..Default::default()
            };
        }
        // One integer per candidate in the order of `(d_j, j)`: the distance's total-order
        // key in the high half, the index in the low half (rows of at most 2³² candidates;
        // a longer one could not be held as an f32 row in memory that any machine here has).
        assert!(
            m <= u32::MAX as usize,
            "a ranked row has at most 2^32 candidates, got {m}"
        );
        let key = |j: usize| (i64::from(total_order_key(distances[j])) << 32) | j as i64;
        rel.sort_by_key(|&(j, _)| key(j));
        let keys: Vec<i64> = rel.iter().map(|&(j, _)| key(j)).collect();
        let ranks = if keys.len() <= DIRECT_COUNT_MAX {
            // rank_p = #{j : key_j < key_p}, a branch-free count per relevant candidate.
            keys.iter()
                .map(|&kp| (0..m).filter(|&j| key(j) < kp).count())
                .collect()
        } else {
            // before[b] = candidates with exactly b relevant keys ≤ their own: they precede
            // the relevant candidates b, b+1, … . rank_p = Σ_{b ≤ p} before[b].
            let mut before = vec![0usize; keys.len() + 1];
            let (first, last) = (keys[0], keys[keys.len() - 1]);
            for j in 0..m {
                let k = key(j);
                let b = if k > last {
                    keys.len()
                } else if k < first {
                    0
                } else {
                    keys.partition_point(|&r| r <= k)
                };
                before[b] += 1;
            }
            let mut acc = 0;
            before[..keys.len()]
                .iter()
                .map(|&c| {
                    acc += c;
                    acc
                })
                .collect()
        };
        RankedRow {
            candidates: m,
            ranks,
            gains: rel.into_iter().map(|(_, g)| g).collect(),
        }
    }

    /// `R`, the number of relevant candidates.
    pub fn relevant(&self) -> usize {
        self.ranks.len()
    }

    /// Relevant candidates among the `k` nearest.
    pub fn hits_at(&self, k: usize) -> usize {
        self.ranks.partition_point(|&r| r < k)
    }
}

/// A metric's running sums: its value is `sum / count`. Partials of disjoint sets of
/// query rows add up.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Partial {
    /// Sum of the contributions.
    pub sum: f64,
    /// What they are averaged over (rows, or relevant items for pooled metrics).
    pub count: f64,
}

impl Partial {
    /// A contribution summing to `sum`, averaged over `count`.
    pub fn new(sum: f64, count: f64) -> Partial {
        Partial { sum, count }
    }

    /// Nothing to average (a row the metric skips).
    pub const NONE: Partial = Partial {
        sum: 0.0,
        count: 0.0,
    };

    /// `sum / count`, or `None` when nothing was counted.
    pub fn value(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count)
    }
}

impl std::ops::AddAssign for Partial {
    fn add_assign(&mut self, o: Partial) {
        self.sum += o.sum;
        self.count += o.count;
    }
}

/// A retrieval metric over ranked query rows.
///
/// Implement [`Metric::row`] (and [`Metric::check`] for options that depend on the number
/// of candidates); [`Metric::compute`] scores a dense `(n, m)` distance and relevance
/// matrix, and [`Evaluator`](super::Evaluator) scores a whole embedded dataset in blocks.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a retrieval metric",
    label = "`Metric` is not implemented for `{Self}`",
    note = "a #[metric] field holds a metric such as `RetrievalPrecision`, `MeanReciprocalRank` or `RPrecision` (`similarity_core::metric`)"
)]
pub trait Metric: Send + Sync + std::fmt::Debug {
    /// The name it is reported under, e.g. `retrieval_precision@5`.
    fn name(&self) -> String;

    /// Checks the options against the number of candidates per row, `m`.
    fn check(&self, _candidates: usize) -> Result<()> {
        Ok(())
    }

    /// The contribution of one query row.
    fn row(&self, row: &RankedRow) -> Partial;

    /// The metric over `distances: (n, m)` and `relevance: (n, m)` (rows are queries).
    /// Errors when no row is scored (e.g. no row has a relevant candidate).
    fn compute(&self, distances: &Tensor, relevance: &Tensor) -> Result<f64> {
        let rows = ranked_rows(distances, relevance)?;
        self.check(rows.first().map_or(0, |r| r.candidates))?;
        let mut total = Partial::default();
        for r in &rows {
            total += self.row(r);
        }
        finish(self, total)
    }
}

/// The value of `total`, or an error naming `metric` when nothing was scored.
pub(crate) fn finish(metric: &(impl Metric + ?Sized), total: Partial) -> Result<f64> {
    total.value().ok_or_else(|| {
        Error::invalid(
            metric.name(),
            "no query row could be scored: no query has a relevant candidate",
        )
    })
}

/// Host copies of `distances: (n, m)` and `relevance: (n, m)`, checked to be of one shape.
pub(crate) fn host_rows(
    distances: &Tensor,
    relevance: &Tensor,
) -> Result<(Vec<f32>, Vec<f32>, usize)> {
    if distances.rank() != 2 || distances.dims() != relevance.dims() {
        return Err(Error::shape(
            "retrieval metric",
            format!(
                "distances and relevance of one (n, m) shape, distances are {:?}",
                distances.dims()
            ),
            relevance.dims(),
        ));
    }
    let m = distances.dim(1)?;
    let host = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    };
    Ok((host(distances)?, host(relevance)?, m))
}

/// Ranks every row of `distances: (n, m)` against `relevance: (n, m)`.
pub fn ranked_rows(distances: &Tensor, relevance: &Tensor) -> Result<Vec<RankedRow>> {
    let (d, rel, m) = host_rows(distances, relevance)?;
    if m == 0 {
        return Ok(Vec::new());
    }
    Ok(d.chunks(m)
        .zip(rel.chunks(m))
        .map(|(d, r)| RankedRow::from_dense(d, r))
        .collect())
}

/// Per-row values of `metric` (`None` for rows it skips), for the raw functions.
pub(crate) fn per_row(
    metric: &impl Metric,
    distances: &Tensor,
    relevance: &Tensor,
) -> Result<Vec<Option<f64>>> {
    let rows = ranked_rows(distances, relevance)?;
    metric.check(rows.first().map_or(0, |r| r.candidates))?;
    Ok(rows.iter().map(|r| metric.row(r).value()).collect())
}

/// An error for `k = 0` or `k > m`.
pub(crate) fn check_k(metric: &str, k: usize, candidates: usize) -> Result<()> {
    if k == 0 {
        return Err(Error::invalid(metric, "k must be at least 1, got k = 0"));
    }
    if k > candidates {
        return Err(Error::invalid(
            metric,
            format!("k = {k} exceeds the {candidates} candidates per query"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_match_a_full_sort() {
        let d = [0.5f32, 0.1, 0.9, 0.1, 0.3, f32::INFINITY, 0.2];
        let rel = [1.0f32, 0.0, 2.0, 1.0, 0.0, 0.0, 0.5];
        let row = RankedRow::from_dense(&d, &rel);
        // Order by (d, j): 1, 3, 6, 4, 0, 2, 5.
        assert_eq!(row.ranks, vec![1, 2, 4, 5]);
        assert_eq!(row.gains, vec![1.0, 0.5, 1.0, 2.0]);
        assert_eq!((row.hits_at(3), row.relevant()), (2, 4));
        let empty = RankedRow::from_dense(&d, &[0.0; 7]);
        assert_eq!((empty.relevant(), empty.candidates), (0, 7));
    }

    /// Both rankings (direct counts for `R ≤ 8`, binary searches above) against a full
    /// sort by `(total_cmp(d), j)`, on rows with ties, ±0, infinities and NaNs.
    #[test]
    fn both_rankings_match_a_full_sort_with_ties_and_nans() {
        let values = [
            0.25f32,
            -0.0,
            0.0,
            0.25,
            f32::NAN,
            -1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.5,
            -f32::NAN,
        ];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..200 {
            let m = 1 + (next() % 40) as usize;
            let d: Vec<f32> = (0..m)
                .map(|_| values[(next() % values.len() as u64) as usize])
                .collect();
            let want_r = 1 + (next() % 16) as usize;
            let rel: Vec<f32> = (0..m)
                .map(|_| {
                    if (next() % m as u64) < want_r as u64 {
                        1.0
                    } else {
                        0.0
                    }
                })
                .collect();
            let mut order: Vec<usize> = (0..m).collect();
            order.sort_by(|&a, &b| d[a].total_cmp(&d[b]).then(a.cmp(&b)));
            let expected: Vec<usize> = order
                .iter()
                .enumerate()
                .filter(|&(_, &j)| rel[j] > 0.0)
                .map(|(pos, _)| pos)
                .collect();
            let row = RankedRow::from_dense(&d, &rel);
            assert_eq!(row.ranks, expected, "round {round}: d {d:?} rel {rel:?}");
        }
    }

    #[test]
    fn mismatched_shapes_name_both() {
        let d = Tensor::zeros((2, 3), DType::F32, &candle_core::Device::Cpu).unwrap();
        let r = Tensor::zeros((3, 2), DType::F32, &candle_core::Device::Cpu).unwrap();
        let e = ranked_rows(&d, &r).unwrap_err().to_string();
        assert!(e.contains("[2, 3]") && e.contains("[3, 2]"), "{e}");
    }
}
