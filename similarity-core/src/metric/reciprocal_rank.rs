//! Reciprocal rank, in Quaterion 0.1.35's form and in the standard (MRR) form.
//!
//! With `rank_p` the 0-based position of a query's `p`-th relevant candidate:
//!
//! ```text
//! Quaterion (RetrievalReciprocalRank):  value = Σ_rows Σ_p 1/(rank_p + 1)  /  Σ_rows R
//! standard MRR (MeanReciprocalRank):    value = mean over rows with R ≥ 1 of 1/(rank_0 + 1)
//! ```
//!
//! **The difference.** Quaterion's docs describe the standard metric (the reciprocal rank
//! of the *first* relevant result), but its code takes `1/(rank + 1)` of **every** relevant
//! entry of the sorted label matrix and averages those. With one relevant candidate per
//! query (pairs with a single positive) the two agree; with several (groups) Quaterion's
//! value is lower, because the second, third, … relevant results add `1/2`, `1/3`, … terms
//! and rows with more relevant candidates weigh more. Rows with no relevant candidate add
//! nothing to either. [`RetrievalReciprocalRank`] reproduces Quaterion (the parity value);
//! [`MeanReciprocalRank`] is the metric as usually defined.

use candle_core::Tensor;

use super::ranking::{Metric, Partial, RankedRow, per_row, ranked_rows};
use crate::error::Result;

/// Quaterion's `retrieval_reciprocal_rank`: `1/(rank + 1)` for every relevant entry
/// (`relevance > 0`) of `distances: (n, m)` / `relevance: (n, m)`, row by row, nearest
/// first. Rows without a relevant candidate add no entry. Its mean is Quaterion's value.
pub fn retrieval_reciprocal_rank(distances: &Tensor, relevance: &Tensor) -> Result<Vec<f64>> {
    Ok(ranked_rows(distances, relevance)?
        .iter()
        .flat_map(|r| r.ranks.iter().map(|&k| 1.0 / (k as f64 + 1.0)))
        .collect())
}

/// Standard reciprocal rank of each row: `1/(rank of the first relevant + 1)`, `None` for
/// rows without a relevant candidate. Its mean is the MRR.
pub fn mean_reciprocal_rank(distances: &Tensor, relevance: &Tensor) -> Result<Vec<Option<f64>>> {
    per_row(&MeanReciprocalRank, distances, relevance)
}

/// Quaterion 0.1.35's `RetrievalReciprocalRank`: the mean of `1/(rank + 1)` over every
/// relevant candidate of every query (see the module docs for how it differs from MRR).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetrievalReciprocalRank;

#[diagnostic::do_not_recommend]
impl Metric for RetrievalReciprocalRank {
    fn name(&self) -> String {
        "retrieval_reciprocal_rank".into()
    }

    fn row(&self, row: &RankedRow) -> Partial {
        let sum = row.ranks.iter().map(|&k| 1.0 / (k as f64 + 1.0)).sum();
        Partial::new(sum, row.relevant() as f64)
    }
}

/// Mean reciprocal rank of the first relevant candidate, over queries that have one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MeanReciprocalRank;

#[diagnostic::do_not_recommend]
impl Metric for MeanReciprocalRank {
    fn name(&self) -> String {
        "mrr".into()
    }

    fn row(&self, row: &RankedRow) -> Partial {
        match row.ranks.first() {
            Some(&k) => Partial::new(1.0 / (k as f64 + 1.0), 1.0),
            None => Partial::NONE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn quaterion_form_and_standard_form() {
        // Row 0 order: 1, 0, 2 with relevant {0, 2} → ranks 1, 2.
        // Row 1 order: 0, 1, 2 with relevant {0} → rank 0. Row 2 has none.
        let d = Tensor::new(
            &[[0.2f32, 0.1, 0.3], [0.1, 0.5, 0.9], [0.1, 0.2, 0.3]],
            &Device::Cpu,
        )
        .unwrap();
        let r = Tensor::new(
            &[[1.0f32, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0; 3]],
            &Device::Cpu,
        )
        .unwrap();
        let items = retrieval_reciprocal_rank(&d, &r).unwrap();
        assert_eq!(items, vec![0.5, 1.0 / 3.0, 1.0]);
        let q = RetrievalReciprocalRank.compute(&d, &r).unwrap();
        assert!((q - (0.5 + 1.0 / 3.0 + 1.0) / 3.0).abs() < 1e-12);
        assert_eq!(
            mean_reciprocal_rank(&d, &r).unwrap(),
            vec![Some(0.5), Some(1.0), None]
        );
        assert!((MeanReciprocalRank.compute(&d, &r).unwrap() - 0.75).abs() < 1e-12);
    }
}
