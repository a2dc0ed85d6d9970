//! Retrieval precision@k (Quaterion's `RetrievalPrecision`).
//!
//! For a query row with relevance `rel: (m)` and the `k` nearest candidates `top_k`:
//!
//! ```text
//! precision@k = Σ_{j ∈ top_k} rel_j / k
//! ```
//!
//! Relevance values are summed as they are (graded pair scores count with their value,
//! as in Quaterion); entries `≤ 0` count as 0. On a dense block every row is scored, a row
//! with no relevant candidate scores 0, and the metric is the mean over rows (Quaterion's
//! raw function); over a data set the [`Evaluator`](super::Evaluator) only makes queries of
//! objects with something relevant. When `k` exceeds a row's number of relevant
//! candidates the row cannot reach 1. Reported as `precision@k`: with `k = 1`, the
//! fraction of queries whose nearest candidate is relevant.

use candle_core::Tensor;

use super::ranking::{Metric, Partial, RankedRow, check_k, per_row};
use crate::error::Result;

/// Precision@k of each row of `distances: (n, m)` against `relevance: (n, m)` → `n` values.
/// Errors when `k = 0`, `k > m` or the shapes differ.
pub fn retrieval_precision(distances: &Tensor, relevance: &Tensor, k: usize) -> Result<Vec<f64>> {
    Ok(per_row(&RetrievalPrecision { k }, distances, relevance)?
        .into_iter()
        .map(|v| v.unwrap_or(0.0))
        .collect())
}

/// Mean precision@k over query rows (Quaterion's `RetrievalPrecision(k)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetrievalPrecision {
    /// Number of nearest candidates retrieved, `1 ≤ k ≤ m`.
    pub k: usize,
}

impl Default for RetrievalPrecision {
    /// `k = 1`.
    fn default() -> Self {
        RetrievalPrecision { k: 1 }
    }
}

#[diagnostic::do_not_recommend]
impl Metric for RetrievalPrecision {
    fn name(&self) -> String {
        format!("precision@{}", self.k)
    }

    fn check(&self, candidates: usize) -> Result<()> {
        check_k("RetrievalPrecision", self.k, candidates)
    }

    fn row(&self, row: &RankedRow) -> Partial {
        let hits = row.hits_at(self.k);
        let sum: f64 = row.gains[..hits].iter().map(|&g| f64::from(g)).sum();
        Partial::new(sum / self.k as f64, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn hand_computed() {
        // Row 0 order: 1, 0, 2 (relevant: 0, 2); row 1 order: 2, 1, 0 (no relevant).
        let d = Tensor::new(&[[0.2f32, 0.1, 0.3], [0.9, 0.5, 0.1]], &Device::Cpu).unwrap();
        let r = Tensor::new(&[[1.0f32, 0.0, 1.0], [0.0, 0.0, 0.0]], &Device::Cpu).unwrap();
        assert_eq!(retrieval_precision(&d, &r, 1).unwrap(), vec![0.0, 0.0]);
        assert_eq!(retrieval_precision(&d, &r, 2).unwrap(), vec![0.5, 0.0]);
        let p3 = RetrievalPrecision { k: 3 }.compute(&d, &r).unwrap();
        assert!((p3 - 1.0 / 3.0).abs() < 1e-12);
        let e = retrieval_precision(&d, &r, 0).unwrap_err().to_string();
        assert!(e.contains("k = 0"), "{e}");
        let e = retrieval_precision(&d, &r, 4).unwrap_err().to_string();
        assert!(e.contains("k = 4") && e.contains("3 candidates"), "{e}");
    }
}
