//! Recall@k (beyond Quaterion).
//!
//! For a query row with `R ≥ 1` relevant candidates (`rel_j > 0`):
//!
//! ```text
//! recall@k = |relevant ∩ top_k| / R
//! ```
//!
//! Rows with `R = 0` are skipped; the metric is the mean over the other rows. Relevance is
//! binary here (any `rel_j > 0` is one relevant candidate). With one relevant candidate
//! per query (pairs) recall@k is the hit rate at k.

use candle_core::Tensor;

use super::ranking::{Metric, Partial, RankedRow, check_k, per_row};
use crate::error::Result;

/// Recall@k of each row of `distances: (n, m)` against `relevance: (n, m)`; `None` for rows
/// without a relevant candidate. Errors when `k = 0`, `k > m` or the shapes differ.
pub fn recall_at_k(distances: &Tensor, relevance: &Tensor, k: usize) -> Result<Vec<Option<f64>>> {
    per_row(&RecallAtK { k }, distances, relevance)
}

/// Mean recall@k over the query rows that have a relevant candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecallAtK {
    /// Number of nearest candidates retrieved, `1 ≤ k ≤ m`.
    pub k: usize,
}

impl Default for RecallAtK {
    /// `k = 1`.
    fn default() -> Self {
        RecallAtK { k: 1 }
    }
}

#[diagnostic::do_not_recommend]
impl Metric for RecallAtK {
    fn name(&self) -> String {
        format!("recall@{}", self.k)
    }

    fn check(&self, candidates: usize) -> Result<()> {
        check_k("RecallAtK", self.k, candidates)
    }

    fn row(&self, row: &RankedRow) -> Partial {
        if row.relevant() == 0 {
            return Partial::NONE;
        }
        Partial::new(row.hits_at(self.k) as f64 / row.relevant() as f64, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn hand_computed() {
        // Row 0 order: 3, 1, 0, 2 with relevant {0, 2, 3}: recall@1 = 1/3, @2 = 1/3, @3 = 2/3.
        // Row 1 has no relevant candidate and is skipped.
        let d = Tensor::new(
            &[[0.3f32, 0.2, 0.4, 0.1], [0.1, 0.2, 0.3, 0.4]],
            &Device::Cpu,
        )
        .unwrap();
        let r = Tensor::new(&[[1.0f32, 0.0, 1.0, 1.0], [0.0; 4]], &Device::Cpu).unwrap();
        let at = |k| recall_at_k(&d, &r, k).unwrap();
        assert_eq!(at(1), vec![Some(1.0 / 3.0), None]);
        assert_eq!(at(2), vec![Some(1.0 / 3.0), None]);
        assert_eq!(at(3), vec![Some(2.0 / 3.0), None]);
        assert_eq!(RecallAtK { k: 4 }.compute(&d, &r).unwrap(), 1.0);
        assert!(RecallAtK { k: 0 }.compute(&d, &r).is_err());
    }
}
