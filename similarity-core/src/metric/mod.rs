//! Retrieval metrics.
//!
//! Shapes: a query block is a distance matrix `distances: (n, m)` (row `i` holds query
//! `i`'s distance to each of `m` candidates; smaller is nearer) and a relevance matrix
//! `relevance: (n, m)` of the same shape (`> 0` relevant, the value being its gain: 1 for
//! groups, the pair score for pairs), as Quaterion's `raw_compute` takes them.
//!
//! | metric                      | per query row (R relevant, `rank_p` 0-based)          | over rows      |
//! |-----------------------------|--------------------------------------------------------|----------------|
//! | [`RetrievalPrecision`]`{k}` | `Σ_{top k} rel / k`                                    | mean, all rows |
//! | [`RecallAtK`]`{k}`          | `|relevant ∩ top k| / R`                               | mean, `R ≥ 1`  |
//! | [`RetrievalRPrecision`]     | `r / R`, `r = |relevant ∩ top R|`                      | `Σ r / Σ R`    |
//! | [`MapAtR`]                  | `(1/R) Σ_{rank_p < R} (p + 1)/(rank_p + 1)`            | mean, `R ≥ 1`  |
//! | [`Ndcg`]`{k}`               | `DCG@k / IDCG@k`, discount `1/log2(pos + 2)`           | mean, `R ≥ 1`  |
//! | [`RetrievalReciprocalRank`] | `Σ_p 1/(rank_p + 1)` (Quaterion 0.1.35, every relevant)| `/ Σ R`        |
//! | [`MeanReciprocalRank`]      | `1/(rank_0 + 1)` (standard MRR, first relevant)        | mean, `R ≥ 1`  |
//!
//! Candidates are ranked by `(distance, index)`; see [`RankedRow`] for the
//! exact tie rule. The raw functions ([`retrieval_precision`], [`retrieval_reciprocal_rank`],
//! [`retrieval_r_precision`], [`recall_at_k`], [`map_at_r`], [`ndcg_at_k`], …) score a
//! dense block; the [`Metric`] structs are what users attach, scored on a dense block with
//! [`Metric::compute`] or over a whole embedded dataset with [`Evaluator`], which computes
//! distances a block of query rows at a time (never `n × n`) with the query itself masked,
//! for groups ([`Relevance::Groups`]) and pairs ([`Relevance::Pairs`]).
//!
//! Distances: our cosine distance is `1 − cos`, Quaterion's matrix form `(1 − cos) / 2`.
//! The ranking is the same, so every metric here (all rank-based) agrees.
//!
//! The older helpers used by the trainer's validation follow.
//!
//! [`rank_against_candidates`] scores query → candidate retrieval where query `i`'s
//! relevant candidate is candidate `i` (a question and its answer). For each query the
//! *rank* is the number of candidates strictly closer than the relevant one
//! (`rank = |{j : d(qᵢ, cⱼ) < d(qᵢ, cᵢ)}|`, so ties count in the query's favour), and
//!
//! ```text
//! precision@1     = mean_i [rank_i = 0]
//! reciprocal_rank = mean_i 1 / (rank_i + 1)
//! ```
//!
//! [`group_retrieval`] scores retrieval within a labelled set: every object queries all
//! the others (never itself); the objects of its group are relevant. With `R` the number
//! of other members of the query's group,
//!
//! ```text
//! precision@1 = mean [nearest other object is in the group]
//! r_precision = mean (relevant among the R nearest) / R      (macro average over queries;
//!                                                             RetrievalRPrecision pools)
//! ```
//!
//! over the queries with `R ≥ 1`. Quaterion's evaluation leaves the self-distance in and
//! so deflates both; here the query itself is always excluded.
//!
//! Distances are computed in blocks of [`BLOCK`] queries against all candidates, so memory
//! is `O(BLOCK · m)`, never `n × m`.

mod evaluator;
mod map_at_r;
mod ndcg;
mod precision;
mod r_precision;
mod ranking;
mod recall;
mod reciprocal_rank;

pub use evaluator::{Evaluator, OwnedRelevance, Relevance};
pub use map_at_r::{MapAtR, map_at_r};
pub use ndcg::{Ndcg, ndcg_at_k};
pub use precision::{RetrievalPrecision, retrieval_precision};
pub use r_precision::{RetrievalRPrecision, r_precision_per_row, retrieval_r_precision};
pub use ranking::{Metric, Partial, RankedRow, ranked_rows};
pub use recall::{RecallAtK, recall_at_k};
pub use reciprocal_rank::{
    MeanReciprocalRank, RetrievalReciprocalRank, mean_reciprocal_rank, retrieval_reciprocal_rank,
};

use candle_core::{DType, Tensor};

use crate::distance::Distance;
use crate::error::{Error, Result};

/// Queries per block of the distance computation.
pub const BLOCK: usize = 1024;

/// Mean retrieval scores over a set of queries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetrievalScores {
    /// Fraction of queries whose relevant candidate is the nearest.
    pub precision_at_1: f64,
    /// Mean of `1 / (rank + 1)`.
    pub reciprocal_rank: f64,
    /// Number of queries scored.
    pub queries: usize,
}

/// Ranks every candidate for the queries `which` (row indices of `queries`); query `i`'s
/// relevant candidate is row `i` of `candidates`. `queries: (n, d)`, `candidates: (m, d)`.
pub fn rank_against_candidates(
    queries: &Tensor,
    candidates: &Tensor,
    which: &[u32],
    distance: Distance,
) -> Result<RetrievalScores> {
    let m = candidates.dim(0)?;
    if let Some(&bad) = which
        .iter()
        .find(|&&i| i as usize >= m || i as usize >= queries.dim(0).unwrap_or(0))
    {
        return Err(Error::invalid(
            "retrieval evaluation",
            format!("query {bad} has no candidate of the same index ({m} candidates)"),
        ));
    }
    if which.is_empty() {
        return Err(Error::invalid(
            "retrieval evaluation",
            "no positive pair to use as a query",
        ));
    }
    let (mut hits, mut rr) = (0.0f64, 0.0f64);
    for block in which.chunks(BLOCK) {
        let fused = match distance {
            Distance::Cosine => crate::kernels::cosine_ranks(queries, candidates, block)?,
            _ => None,
        };
        let ranks = match fused {
            Some(r) => r,
            None => {
                let idx = Tensor::new(block, queries.device())?;
                let q = queries.index_select(&idx, 0)?;
                let d = distance.distance_matrix(&q, Some(candidates))?;
                let own = d.gather(&idx.unsqueeze(1)?, 1)?;
                d.broadcast_lt(&own)?
                    .to_dtype(DType::F32)?
                    .sum(1)?
                    .to_vec1::<f32>()?
            }
        };
        for r in ranks {
            if r == 0.0 {
                hits += 1.0;
            }
            rr += 1.0 / (f64::from(r) + 1.0);
        }
    }
    let n = which.len() as f64;
    Ok(RetrievalScores {
        precision_at_1: hits / n,
        reciprocal_rank: rr / n,
        queries: which.len(),
    })
}

/// Mean scores of retrieval within a labelled set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupScores {
    /// Fraction of queries whose nearest other object is in their group.
    pub precision_at_1: f64,
    /// Mean R-precision.
    pub r_precision: f64,
    /// Number of queries scored (objects whose group has another member).
    pub queries: usize,
}

/// Scores every object of `embeddings: (n, d)` as a query against the others, with
/// `groups[i]` the group of row `i`.
pub fn group_retrieval(
    embeddings: &Tensor,
    groups: &[i64],
    distance: Distance,
) -> Result<GroupScores> {
    let n = embeddings.dim(0)?;
    if groups.len() != n {
        return Err(Error::shape(
            "group retrieval",
            format!("{n} group ids"),
            groups.len(),
        ));
    }
    let mut sizes = std::collections::HashMap::<i64, usize>::new();
    for g in groups {
        *sizes.entry(*g).or_default() += 1;
    }
    let (mut hits, mut rp, mut queries) = (0.0f64, 0.0f64, 0usize);
    let mut order: Vec<usize> = Vec::with_capacity(n);
    for start in (0..n).step_by(BLOCK) {
        let len = BLOCK.min(n - start);
        let d = distance
            .distance_matrix(&embeddings.narrow(0, start, len)?, Some(embeddings))?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        for (row, dist) in d.iter().enumerate() {
            let i = start + row;
            let r = sizes[&groups[i]] - 1;
            if r == 0 {
                continue;
            }
            order.clear();
            order.extend((0..n).filter(|&j| j != i));
            let by_distance = |a: &usize, b: &usize| dist[*a].total_cmp(&dist[*b]);
            order.select_nth_unstable_by(r - 1, by_distance);
            let nearest = order[..r].iter().min_by(|a, b| by_distance(a, b)).copied();
            if nearest.is_some_and(|j| groups[j] == groups[i]) {
                hits += 1.0;
            }
            let relevant = order[..r]
                .iter()
                .filter(|&&j| groups[j] == groups[i])
                .count();
            rp += relevant as f64 / r as f64;
            queries += 1;
        }
    }
    if queries == 0 {
        return Err(Error::invalid(
            "group retrieval",
            "no group has two members, so no object has a relevant neighbour",
        ));
    }
    Ok(GroupScores {
        precision_at_1: hits / queries as f64,
        r_precision: rp / queries as f64,
        queries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn hand_computed_ranks() {
        // q0 is nearest c0 (rank 0); q1 is nearest c0, then c1 (rank 1); q2 ranks c2 last
        // behind c0 and c1 (rank 2). P@1 = 1/3, RR = (1 + 1/2 + 1/3) / 3.
        let q = Tensor::new(&[[0.0f32, 0.0], [0.9, 0.0], [0.2, 0.0]], &Device::Cpu).unwrap();
        let c = Tensor::new(&[[0.0f32, 0.0], [2.0, 0.0], [5.0, 0.0]], &Device::Cpu).unwrap();
        let s = rank_against_candidates(&q, &c, &[0, 1, 2], Distance::Euclidean).unwrap();
        assert!((s.precision_at_1 - 1.0 / 3.0).abs() < 1e-12);
        assert!((s.reciprocal_rank - (1.0 + 0.5 + 1.0 / 3.0) / 3.0).abs() < 1e-6);
        let s = rank_against_candidates(&q, &c, &[0], Distance::Euclidean).unwrap();
        assert_eq!((s.precision_at_1, s.queries), (1.0, 1));
    }

    #[test]
    fn group_retrieval_excludes_self_and_skips_singletons() {
        // On a line: 0 and 1 in group 7, 2 and 3 in group 8, 4 alone (not a query).
        // Row 2 (x = 2.0) has row 1 (x = 1.9) nearer than row 3 (x = 3.5): a miss.
        let x = Tensor::new(&[[0.0f32], [1.9], [2.0], [3.5], [10.0]], &Device::Cpu).unwrap();
        let s = group_retrieval(&x, &[7, 7, 8, 8, 9], Distance::Euclidean).unwrap();
        assert_eq!(s.queries, 4);
        // Query 0 → 1 hit; 1 → 2 miss; 2 → 1 miss; 3 → 2 hit.
        assert!((s.precision_at_1 - 0.5).abs() < 1e-12);
        assert!((s.r_precision - 0.5).abs() < 1e-12);
    }

    #[test]
    fn blocks_give_the_same_answer_as_one_pass() {
        // 2·BLOCK + 5 queries: every query equals its candidate, so all ranks are 0.
        let n = 2 * BLOCK + 5;
        let v: Vec<f32> = (0..n * 3)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
            .collect();
        let x = Tensor::from_vec(v, (n, 3), &Device::Cpu).unwrap();
        let which: Vec<u32> = (0..n as u32).collect();
        let s = rank_against_candidates(&x, &x, &which, Distance::Euclidean).unwrap();
        assert_eq!(s.queries, n);
        assert!(s.precision_at_1 > 0.99);
    }
}
