//! R-precision, pooled (Quaterion's `RetrievalRPrecision`) and per query ([`RPrecision`]).
//!
//! A query with `R` relevant candidates (`rel_j > 0`) retrieves its `R` nearest; `r` of
//! them are relevant:
//!
//! ```text
//! RetrievalRPrecision  = Σ_rows r / Σ_rows R     (Quaterion, the parity value)
//! RPrecision           = mean over rows of r / R (the macro average of Musgrave et al.,
//!                                                 what group evaluation reports)
//! ```
//!
//! The two agree when every query has the same `R` (groups of one size); otherwise the
//! pooled form weighs queries of large groups more. Rows with `R = 0` add nothing to
//! either.

use candle_core::Tensor;

use super::ranking::{Metric, Partial, RankedRow, ranked_rows};
use crate::error::Result;

/// Quaterion's `retrieval_r_precision` of `distances: (n, m)` against `relevance: (n, m)`:
/// `Σ r / Σ R` over all rows. Errors when no row has a relevant candidate.
pub fn retrieval_r_precision(distances: &Tensor, relevance: &Tensor) -> Result<f64> {
    RetrievalRPrecision.compute(distances, relevance)
}

/// `r / R` of each row, `None` for rows without a relevant candidate.
pub fn r_precision_per_row(distances: &Tensor, relevance: &Tensor) -> Result<Vec<Option<f64>>> {
    Ok(ranked_rows(distances, relevance)?
        .iter()
        .map(|r| RetrievalRPrecision.row(r).value())
        .collect())
}

/// R-precision pooled over queries, `Σ r / Σ R` (Quaterion's `RetrievalRPrecision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetrievalRPrecision;

#[diagnostic::do_not_recommend]
impl Metric for RetrievalRPrecision {
    fn name(&self) -> String {
        "retrieval_r_precision".into()
    }

    fn row(&self, row: &RankedRow) -> Partial {
        let r = row.relevant();
        Partial::new(row.hits_at(r) as f64, r as f64)
    }
}

/// R-precision averaged over queries, `mean r / R` over the rows with `R ≥ 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RPrecision;

#[diagnostic::do_not_recommend]
impl Metric for RPrecision {
    fn name(&self) -> String {
        "r_precision".into()
    }

    fn row(&self, row: &RankedRow) -> Partial {
        match row.relevant() {
            0 => Partial::NONE,
            r => Partial::new(row.hits_at(r) as f64 / r as f64, 1.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn pooled_and_per_row() {
        // Row 0 order: 1, 0, 2, 3 with relevant {0, 2, 3}: R = 3, r = 2.
        // Row 1 order: 0, 1, 2, 3 with relevant {3}: R = 1, r = 0.
        let d = Tensor::new(
            &[[0.2f32, 0.1, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]],
            &Device::Cpu,
        )
        .unwrap();
        let r = Tensor::new(
            &[[1.0f32, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]],
            &Device::Cpu,
        )
        .unwrap();
        assert!((retrieval_r_precision(&d, &r).unwrap() - 0.5).abs() < 1e-12);
        // Per query: (2/3 + 0) / 2.
        assert!((RPrecision.compute(&d, &r).unwrap() - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(
            r_precision_per_row(&d, &r).unwrap(),
            vec![Some(2.0 / 3.0), Some(0.0)]
        );
        let none = Tensor::zeros((2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(retrieval_r_precision(&d, &none).is_err());
    }
}
