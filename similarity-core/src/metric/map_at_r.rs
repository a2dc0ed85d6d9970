//! MAP@R, mean average precision at R (Musgrave, Belongie & Lim, "A Metric Learning
//! Reality Check", ECCV 2020). Beyond Quaterion.
//!
//! A query with `R ≥ 1` relevant candidates (`rel_j > 0`, binary) retrieves its `R`
//! nearest. With `P(i)` the precision among the `i` nearest and `rel(i) ∈ {0, 1}` the
//! relevance of the `i`-th nearest (1-based):
//!
//! ```text
//! MAP@R = (1/R) Σ_{i=1..R} P(i) · rel(i)
//!       = (1/R) Σ_{p : rank_p < R} (p + 1) / (rank_p + 1)     (p-th relevant, 0-based)
//! ```
//!
//! It rewards R-precision's hits for also being ranked early. Rows with `R = 0` are
//! skipped; the metric is the mean over the other rows.

use candle_core::Tensor;

use super::ranking::{Metric, Partial, RankedRow, per_row};
use crate::error::Result;

/// MAP@R of each row of `distances: (n, m)` against `relevance: (n, m)`; `None` for rows
/// without a relevant candidate.
pub fn map_at_r(distances: &Tensor, relevance: &Tensor) -> Result<Vec<Option<f64>>> {
    per_row(&MapAtR, distances, relevance)
}

/// Mean MAP@R over the query rows that have a relevant candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MapAtR;

#[diagnostic::do_not_recommend]
impl Metric for MapAtR {
    fn name(&self) -> String {
        "map@r".into()
    }

    fn row(&self, row: &RankedRow) -> Partial {
        let r = row.relevant();
        if r == 0 {
            return Partial::NONE;
        }
        let sum: f64 = row
            .ranks
            .iter()
            .take_while(|&&rank| rank < r)
            .enumerate()
            .map(|(p, &rank)| (p + 1) as f64 / (rank + 1) as f64)
            .sum();
        Partial::new(sum / r as f64, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn hand_computed() {
        // Row 0 order: 0, 1, 2, 3, 4 with relevant {0, 2, 3}: R = 3, hits at positions 1
        // and 3 → (1/1 + 2/3) / 3 = 5/9. Row 1: relevant {4} ranked last, R = 1 → 0.
        // Row 2: the R = 2 relevant are the 2 nearest → 1.
        let d = Tensor::new(
            &[
                [0.1f32, 0.2, 0.3, 0.4, 0.5],
                [0.1, 0.2, 0.3, 0.4, 0.5],
                [0.5, 0.4, 0.3, 0.2, 0.1],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let r = Tensor::new(
            &[
                [1.0f32, 0.0, 1.0, 1.0, 0.0],
                [0.0, 0.0, 0.0, 0.0, 1.0],
                [0.0, 0.0, 0.0, 1.0, 1.0],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let rows = map_at_r(&d, &r).unwrap();
        assert!((rows[0].unwrap() - 5.0 / 9.0).abs() < 1e-12);
        assert_eq!(rows[1..], [Some(0.0), Some(1.0)]);
        let mean = MapAtR.compute(&d, &r).unwrap();
        assert!((mean - (5.0 / 9.0 + 1.0) / 3.0).abs() < 1e-12);
    }
}
