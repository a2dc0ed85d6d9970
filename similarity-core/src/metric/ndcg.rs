//! NDCG@k, normalised discounted cumulative gain (Järvelin & Kekäläinen 2002). Beyond
//! Quaterion.
//!
//! With `g_i` the gain (`rel > 0`, else 0) of the `i`-th nearest candidate (1-based) and
//! `g*_i` the gains sorted in decreasing order (the ideal ranking):
//!
//! ```text
//! DCG@k  = Σ_{i=1..k} g_i  / log2(i + 1)
//! IDCG@k = Σ_{i=1..k} g*_i / log2(i + 1)
//! NDCG@k = DCG@k / IDCG@k
//! ```
//!
//! Gains are linear in the relevance (1 for groups; the pair score for graded pairs). Rows
//! with no relevant candidate (IDCG = 0) are skipped; the metric is the mean over the rest.

use candle_core::Tensor;

use super::ranking::{Metric, Partial, RankedRow, check_k, per_row};
use crate::error::Result;

/// NDCG@k of each row of `distances: (n, m)` against `relevance: (n, m)`; `None` for rows
/// without a relevant candidate. Errors when `k = 0`, `k > m` or the shapes differ.
pub fn ndcg_at_k(distances: &Tensor, relevance: &Tensor, k: usize) -> Result<Vec<Option<f64>>> {
    per_row(&Ndcg { k }, distances, relevance)
}

/// Mean NDCG@k over the query rows that have a relevant candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ndcg {
    /// Depth of the ranking scored, `1 ≤ k ≤ m`.
    pub k: usize,
}

impl Default for Ndcg {
    /// `k = 10`.
    fn default() -> Self {
        Ndcg { k: 10 }
    }
}

#[diagnostic::do_not_recommend]
impl Metric for Ndcg {
    fn name(&self) -> String {
        format!("ndcg@{}", self.k)
    }

    fn check(&self, candidates: usize) -> Result<()> {
        check_k("Ndcg", self.k, candidates)
    }

    fn row(&self, row: &RankedRow) -> Partial {
        if row.relevant() == 0 {
            return Partial::NONE;
        }
        let discount = |pos: usize| 1.0 / ((pos + 2) as f64).log2();
        let hits = row.hits_at(self.k);
        let dcg: f64 = (0..hits)
            .map(|p| f64::from(row.gains[p]) * discount(row.ranks[p]))
            .sum();
        let mut ideal: Vec<f64> = row.gains.iter().map(|&g| f64::from(g)).collect();
        ideal.sort_by(|a, b| b.total_cmp(a));
        let idcg: f64 = ideal
            .iter()
            .take(self.k)
            .enumerate()
            .map(|(i, g)| g * discount(i))
            .sum();
        Partial::new(dcg / idcg, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn hand_computed() {
        // Row 0 order: 0, 1, 2, 3 with relevant {0, 2, 3} (binary).
        //   NDCG@3: DCG = 1/log2(2) + 1/log2(4) = 1.5; IDCG = 1 + 1/log2(3) + 1/2.
        // Row 1 graded: order 0, 1, 2, 3, gains 1 at 0 and 3 at 1.
        //   NDCG@2: DCG = 1 + 3/log2(3); IDCG = 3 + 1/log2(3).
        let d = Tensor::new(
            &[[0.1f32, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]],
            &Device::Cpu,
        )
        .unwrap();
        let r = Tensor::new(
            &[[1.0f32, 0.0, 1.0, 1.0], [1.0, 3.0, 0.0, 0.0]],
            &Device::Cpu,
        )
        .unwrap();
        let l3 = 3f64.log2();
        let at3 = ndcg_at_k(&d, &r, 3).unwrap();
        assert!((at3[0].unwrap() - 1.5 / (1.5 + 1.0 / l3)).abs() < 1e-12);
        let at2 = ndcg_at_k(&d, &r, 2).unwrap();
        assert!((at2[1].unwrap() - (1.0 + 3.0 / l3) / (3.0 + 1.0 / l3)).abs() < 1e-12);
        // Row 0 at k = 1: the nearest is relevant, the ideal is 1 → 1.
        assert_eq!(ndcg_at_k(&d, &r, 1).unwrap()[0], Some(1.0));
        let none = Tensor::zeros((2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(ndcg_at_k(&d, &none, 2).unwrap(), vec![None, None]);
        assert!(Ndcg { k: 5 }.compute(&d, &r).is_err());
    }
}
