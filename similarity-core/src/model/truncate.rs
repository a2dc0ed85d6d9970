//! Serving a Matryoshka-trained model at a smaller dimension.
//!
//! A model trained with [`MatryoshkaLoss`](crate::loss::MatryoshkaLoss) over prefix sizes
//! `d₁ > … > d_k` embeds usefully in the first `d_j` coordinates alone. Serving at `d_j`
//! keeps that prefix and scales each row back to unit L2 norm, as sentence-transformers
//! does with `truncate_dim` followed by `normalize_embeddings`:
//!
//! ```text
//! truncate(E, m)[i] = E[i, :m] / max(‖E[i, :m]‖₂, 1e-8)        E: (n, d) → (n, m)
//! ```
//!
//! Cosine rankings are unchanged by the normalisation; dot-product and Euclidean ones then
//! agree with cosine, which is what a vector database with a dot-product index expects.
//! [`TrainableModel::encode_truncated`](crate::train::TrainableModel::encode_truncated)
//! encodes records this way, and
//! [`Evaluator::evaluate_prefixes`](crate::metric::Evaluator::evaluate_prefixes) scores a
//! set at every prefix size.

use candle_core::Tensor;

use crate::error::{Error, Result};

/// The first `dim` coordinates of every row of `embeddings: (n, d)`, L2-normalised:
/// `(n, dim)`. An error names both sizes when `dim` is 0 or above `d`.
pub fn truncate_embeddings(embeddings: &Tensor, dim: usize) -> Result<Tensor> {
    let (_, d) = embeddings
        .dims2()
        .map_err(|_| Error::shape("truncate_embeddings", "(n, d)", embeddings.dims()))?;
    if dim == 0 || dim > d {
        return Err(Error::invalid(
            "truncate_embeddings `dim`",
            format!("must be in 1..={d} (the embedding size), got {dim}"),
        ));
    }
    let prefix = embeddings.narrow(1, 0, dim)?.contiguous()?;
    crate::distance::normalize(&prefix)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn prefix_rows_get_unit_norm() {
        let e = Tensor::new(&[[3.0f32, 4.0, 12.0], [0.0, 0.0, 1.0]], &Device::Cpu).unwrap();
        let t = truncate_embeddings(&e, 2)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(t[0], vec![0.6, 0.8]);
        // An all-zero prefix stays zero (the 1e-8 clamp), not NaN.
        assert_eq!(t[1], vec![0.0, 0.0]);
        let full = truncate_embeddings(&e, 3)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!((full[0][2] - 12.0 / 13.0).abs() < 1e-6);
        for bad in [0, 4] {
            let msg = truncate_embeddings(&e, bad).unwrap_err().to_string();
            assert!(
                msg.contains("1..=3") && msg.contains(&bad.to_string()),
                "{msg}"
            );
        }
    }
}
