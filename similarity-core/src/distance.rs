//! Distances and similarities between embeddings.
//!
//! Four metrics, each with a row-wise form (`x, y: (n, d)` → `(n)`) and a matrix form
//! (`x: (n, d)`, `y: (m, d)` → `(n, m)`). One definition per metric, the same in both
//! forms:
//!
//! | metric       | similarity `s`            | distance `d`           | range of `d` |
//! |--------------|---------------------------|------------------------|--------------|
//! | `Cosine`     | `cos(x, y)`               | `1 − cos(x, y)`        | `[0, 2]`     |
//! | `Euclidean`  | `1 / (1 + d)`             | `‖x − y‖₂`             | `[0, ∞)`     |
//! | `Manhattan`  | `1 / (1 + d)`             | `‖x − y‖₁`             | `[0, ∞)`     |
//! | `DotProduct` | `x · y`                   | `−x · y`               | `ℝ`          |
//!
//! **Difference from Quaterion.** Quaterion's cosine is `1 − cos` row-wise but
//! `(1 − cos) / 2` as a matrix (and its matrix similarity is `(1 + cos) / 2`), so losses that
//! use the matrix form see half the intended scale: MultipleNegativesRankingLoss's default
//! `scale = 20` acts as `10 · cos` there. Here both forms use `cos` and `1 − cos`, as
//! sentence-transformers and pytorch-metric-learning do.
//!
//! Gradients stay finite where a distance is zero (the diagonal of a self-distance matrix):
//! the Euclidean norm is `sqrt(‖x − y‖² + ε)` with `ε = 1e-12`, and cosine normalises by
//! `max(‖x‖, 1e-8)`. The Euclidean matrix form uses `|x|² + |y|² − 2x·y` on points centred
//! on y's mean; squared distances below its round-off floor (a few ulps of `|x|² + |y|²`)
//! are taken as exactly 0 with a zero gradient, as `torch.cdist` gives, and the Manhattan
//! forms use a zero subgradient of `|·|` at 0.

use candle_core::{D, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kernels;

const NORM_EPS: f64 = 1e-8;
const SQRT_EPS: f64 = 1e-12;

/// A distance metric between embeddings (Quaterion's `Distance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Distance {
    /// `1 − cos(x, y)`.
    #[default]
    Cosine,
    /// `‖x − y‖₂`.
    Euclidean,
    /// `‖x − y‖₁`.
    Manhattan,
    /// `−x · y`.
    DotProduct,
}

impl Distance {
    /// Row-wise distance: `x, y: (n, d)` → `(n)`.
    pub fn distance(self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        check_same(x, y, "Distance::distance")?;
        Ok(match self {
            Distance::Cosine => (1.0 - self.similarity(x, y)?)?,
            Distance::Euclidean => ((x - y)?.sqr()?.sum(D::Minus1)? + SQRT_EPS)?.sqrt()?,
            Distance::Manhattan => abs_zero_subgradient(&(x - y)?)?.sum(D::Minus1)?,
            Distance::DotProduct => (x * y)?.sum(D::Minus1)?.neg()?,
        })
    }

    /// Row-wise similarity: `x, y: (n, d)` → `(n)`.
    pub fn similarity(self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        check_same(x, y, "Distance::similarity")?;
        Ok(match self {
            Distance::Cosine => (normalize(x)? * normalize(y)?)?.sum(D::Minus1)?,
            Distance::DotProduct => (x * y)?.sum(D::Minus1)?,
            Distance::Euclidean | Distance::Manhattan => (self.distance(x, y)? + 1.0)?.recip()?,
        })
    }

    /// Distance matrix: `x: (n, d)`, `y: (m, d)` (or `x` itself) → `(n, m)`.
    pub fn distance_matrix(self, x: &Tensor, y: Option<&Tensor>) -> Result<Tensor> {
        if self == Distance::Cosine {
            return Ok((1.0 - self.similarity_matrix(x, y)?)?);
        }
        let y = y.unwrap_or(x);
        check_dims(x, y, "Distance::distance_matrix")?;
        Ok(match self {
            Distance::Cosine => unreachable!("handled above"),
            Distance::DotProduct => x.matmul(&y.t()?)?.neg()?,
            Distance::Euclidean => {
                // Distances are translation invariant; centring on y's mean keeps |x|² and
                // |y|² (and so the round-off floor below) at the scale of the spread of
                // the points, not of their distance from the origin.
                let mean = y.mean_keepdim(0)?.detach();
                let (x, y) = (&x.broadcast_sub(&mean)?, &y.broadcast_sub(&mean)?);
                let xx = x.sqr()?.sum_keepdim(1)?;
                let yy = y.sqr()?.sum_keepdim(1)?.t()?;
                let xy = x.matmul(&y.t()?)?;
                let norms = xx.broadcast_add(&yy)?;
                let d2 = norms.sub(&(xy * 2.0)?)?;
                // `|x|² + |y|² − 2x·y` cancels catastrophically for (near-)equal rows: the
                // self-distance diagonal and duplicated embeddings come out as round-off of
                // either sign, and the round-off of the gradient, divided by a distance near
                // sqrt(ε), becomes a spurious gradient of order 1e-2. Below the round-off
                // floor (a few ulps of |x|² + |y|²) the value carries no information, so it
                // is taken as exactly 0, with a zero gradient, as `torch.cdist` gives.
                let floor = (norms * (8.0 * dtype_epsilon(x.dtype())))?;
                let informative = d2.gt(&floor)?.to_dtype(x.dtype())?;
                ((d2 * informative)? + SQRT_EPS)?.sqrt()?
            }
            Distance::Manhattan => {
                abs_zero_subgradient(&x.unsqueeze(1)?.broadcast_sub(&y.unsqueeze(0)?)?)?
                    .sum(D::Minus1)?
            }
        })
    }

    /// Similarity matrix: `x: (n, d)`, `y: (m, d)` (or `x` itself) → `(n, m)`.
    pub fn similarity_matrix(self, x: &Tensor, y: Option<&Tensor>) -> Result<Tensor> {
        check_dims(x, y.unwrap_or(x), "Distance::similarity_matrix")?;
        if self == Distance::Cosine
            && let Some(s) = kernels::cosine_similarity_matrix(x, y)?
        {
            return Ok(s);
        }
        let y = y.unwrap_or(x);
        Ok(match self {
            Distance::Cosine => cosine_similarity_matrix(x, y)?,
            Distance::DotProduct => x.matmul(&y.t()?)?,
            Distance::Euclidean | Distance::Manhattan => {
                (self.distance_matrix(x, Some(y))? + 1.0)?.recip()?
            }
        })
    }
}

/// The composite form of the cosine similarity matrix `x̂ ŷᵀ` (any device and dtype; the
/// reference for the fused CPU kernel).
pub(crate) fn cosine_similarity_matrix(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    Ok(normalize(x)?.matmul(&normalize(y)?.t()?)?)
}

/// `|v|` whose gradient at `v = 0` is 0 (Candle's `abs` uses +1 there): equal coordinates
/// of two embeddings then pull neither way, which keeps the gradient of a symmetric
/// distance symmetric (and equal to `torch`'s).
fn abs_zero_subgradient(v: &Tensor) -> Result<Tensor> {
    let zero = v.zeros_like()?;
    let sign = (v.gt(&zero)?.to_dtype(v.dtype())? - v.lt(&zero)?.to_dtype(v.dtype())?)?;
    Ok((v * sign)?)
}

/// The machine epsilon of a float dtype.
fn dtype_epsilon(dtype: candle_core::DType) -> f64 {
    use candle_core::DType;
    match dtype {
        DType::F64 => f64::EPSILON,
        DType::F16 => 9.77e-4,
        DType::BF16 => 7.81e-3,
        _ => f64::from(f32::EPSILON),
    }
}

/// Rows scaled to unit L2 norm: `x / max(‖x‖, 1e-8)`, `x: (n, d)`.
///
/// The clamp is applied to `‖x‖²` (at `1e-16`) before the square root, which gives the
/// same value and keeps the gradient of an all-zero row finite (`∂x̂ / 1e-8`, as torch's
/// `F.normalize`); a square root at 0 would make it NaN.
pub fn normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .clamp(NORM_EPS * NORM_EPS, f64::MAX)?
        .sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

fn check_same(x: &Tensor, y: &Tensor, ctx: &str) -> Result<()> {
    if x.dims() != y.dims() || x.rank() != 2 {
        return Err(Error::shape(
            ctx,
            format!("two (n, d) tensors of one shape, x is {:?}", x.dims()),
            y.dims(),
        ));
    }
    Ok(())
}

fn check_dims(x: &Tensor, y: &Tensor, ctx: &str) -> Result<()> {
    if x.rank() != 2 || y.rank() != 2 || x.dim(1)? != y.dim(1)? {
        return Err(Error::shape(
            ctx,
            format!("(n, d) and (m, d) with the same d, x is {:?}", x.dims()),
            y.dims(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[[f32; 2]]) -> Tensor {
        Tensor::from_vec(v.concat(), (v.len(), 2), &Device::Cpu).unwrap()
    }

    #[test]
    fn hand_computed_values() {
        // x0 = (3, 4), y0 = (4, 3): cos = 24/25, ‖x−y‖₂ = √2, ‖x−y‖₁ = 2, x·y = 24.
        let x = t(&[[3.0, 4.0], [1.0, 0.0]]);
        let y = t(&[[4.0, 3.0], [0.0, 1.0]]);
        let get = |d: Distance| d.distance(&x, &y).unwrap().to_vec1::<f32>().unwrap();
        let close = |a: f32, b: f32| assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        close(get(Distance::Cosine)[0], 1.0 - 24.0 / 25.0);
        close(get(Distance::Cosine)[1], 1.0);
        close(get(Distance::Euclidean)[0], 2f32.sqrt());
        close(get(Distance::Manhattan)[0], 2.0);
        close(get(Distance::DotProduct)[0], -24.0);
        let s = Distance::Euclidean
            .similarity(&x, &y)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        close(s[0], 1.0 / (1.0 + 2f32.sqrt()));
    }

    #[test]
    fn matrix_form_agrees_with_row_form() {
        let x = t(&[[3.0, 4.0], [1.0, 0.0], [-2.0, 0.5]]);
        let y = t(&[[4.0, 3.0], [0.0, 1.0], [1.0, 1.0]]);
        for d in [
            Distance::Cosine,
            Distance::Euclidean,
            Distance::Manhattan,
            Distance::DotProduct,
        ] {
            let m = d
                .distance_matrix(&x, Some(&y))
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let r = d.distance(&x, &y).unwrap().to_vec1::<f32>().unwrap();
            for i in 0..3 {
                assert!((m[i][i] - r[i]).abs() < 1e-5, "{d:?} row {i}");
            }
        }
    }

    #[test]
    fn self_distance_gradient_is_finite() {
        let x = Var::new(&[[1.0f32, 2.0], [1.0, 2.0], [0.0, -1.0]], &Device::Cpu).unwrap();
        for d in [Distance::Cosine, Distance::Euclidean, Distance::Manhattan] {
            let m = d.distance_matrix(x.as_tensor(), None).unwrap();
            let g = m.sum_all().unwrap().backward().unwrap();
            let g = g
                .get(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert!(g.iter().all(|v| v.is_finite()), "{d:?}: {g:?}");
        }
    }

    #[test]
    fn mismatched_dims_name_both_shapes() {
        let x = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let y = Tensor::zeros((2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let e = Distance::Cosine
            .distance_matrix(&x, Some(&y))
            .unwrap_err()
            .to_string();
        assert!(e.contains("[2, 3]") && e.contains("[2, 4]"), "{e}");
    }
}
