//! GELU (exact, erf) and softmax over the last dimension, with backward passes (Candle's
//! fused softmax has none, and its `gelu_erf` calls a scalar `erf` per element).
//!
//! ```text
//! gelu(x) = x Φ(x),  ∂x = ∂y (Φ(x) + x φ(x))
//! y = softmax(x) per row,  ∂x = y ⊙ (∂y − ⟨y, ∂y⟩)
//! ```

#![cfg_attr(not(feature = "transformers"), allow(dead_code))]

use super::*;

/// `erf(x)` for f32 within 1.5·10⁻⁷ absolute (Abramowitz & Stegun 7.1.26), branch-free so
/// that loops over slices vectorise.
#[inline(always)]
pub(super) fn erf_f32(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152,
        1.061_405_4,
    ];
    let ax = x.abs();
    let t = 1.0 / (1.0 + P * ax);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let y = 1.0 - poly * exp_f32(-ax * ax);
    y.copysign(x)
}

pub(super) const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// `1 / √(2π)`.
pub(super) const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

simd_fn! {
    /// `y = x · Φ(x)` (exact GELU, `Φ` the standard normal CDF) elementwise.
    pub(super) fn gelu_into(x: &[f32], y: &mut [f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = 0.5 * v * (1.0 + erf_f32(v * FRAC_1_SQRT_2));
        }
    }
}

simd_fn! {
    /// `∂x = ∂y · (Φ(x) + x φ(x))` elementwise.
    pub(super) fn gelu_backward_into(x: &[f32], g: &[f32], out: &mut [f32]) {
        for ((o, &v), &gi) in out.iter_mut().zip(x).zip(g) {
            let cdf = 0.5 * (1.0 + erf_f32(v * FRAC_1_SQRT_2));
            let pdf = FRAC_1_SQRT_2PI * exp_f32(-0.5 * v * v);
            *o = gi * (cdf + v * pdf);
        }
    }
}

/// Exact (erf) GELU with its backward pass.
pub(super) struct GeluErf;

impl FusedOp<1> for GeluErf {
    const NAME: &'static str = "gelu-erf";

    fn forward(&self, [s]: [Input<'_>; 1]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let x = s.data;
        let mut y = vec![0.0f32; x.len()];
        par_rows(x, &mut y, 1, gelu_into);
        Ok((y, Shape::from(s.dims)))
    }

    fn backward(
        &self,
        [x]: [&Tensor; 1],
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 1]> {
        let backward = Fused(GeluErfBackward);
        Ok([Some(x.apply_op2_no_bwd(&grad.contiguous()?, &backward)?)])
    }
}

/// `(x, ∂y) → ∂x` of [`GeluErf`].
pub(super) struct GeluErfBackward;

impl FusedOp<2> for GeluErfBackward {
    const NAME: &'static str = "gelu-erf-backward";

    fn forward(&self, [s1, s2]: [Input<'_>; 2]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let x = s1.data;
        let g = s2.data;
        let mut out = vec![0.0f32; x.len()];
        gelu_backward_into(x, g, &mut out);
        Ok((out, Shape::from(s1.dims)))
    }
}

/// Exact GELU `x · Φ(x)` as one op with a backward pass (Candle's `gelu_erf` calls a
/// scalar `erf` per element: 15% of a MiniLM cache fill); `None` where it does not apply.
pub(crate) fn gelu_erf(x: &Tensor) -> Result<Option<Tensor>> {
    if !applies(&[x]) {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op1(Fused(GeluErf))?))
}

simd_fn! {
    /// Softmax over each row of length `n`.
    pub(super) fn softmax_into(x: &[f32], n: usize, y: &mut [f32]) {
        for (row, out) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
            let mx = max(row);
            for (o, &v) in out.iter_mut().zip(row) {
                *o = exp_f32(v - mx);
            }
            let inv = 1.0 / sum(out);
            out.iter_mut().for_each(|o| *o *= inv);
        }
    }
}

simd_fn! {
    /// `∂x = y ⊙ (∂y − ⟨y, ∂y⟩)` over each row of length `n`.
    pub(super) fn softmax_backward_into(y: &[f32], g: &[f32], n: usize, out: &mut [f32]) {
        for ((yr, gr), o) in y.chunks_exact(n).zip(g.chunks_exact(n)).zip(out.chunks_exact_mut(n)) {
            let dot_yg = dot(yr, gr);
            for ((oi, &yi), &gi) in o.iter_mut().zip(yr).zip(gr) {
                *oi = yi * (gi - dot_yg);
            }
        }
    }
}

/// Softmax over the last dimension with its backward pass.
pub(super) struct SoftmaxLastDim;

impl FusedOp<1> for SoftmaxLastDim {
    const NAME: &'static str = "softmax-last-dim";

    fn forward(&self, [s]: [Input<'_>; 1]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let x = s.data;
        let n = s.dims.last().copied().unwrap_or(1).max(1);
        let mut y = vec![0.0f32; x.len()];
        par_rows(x, &mut y, n, |a, b| softmax_into(a, n, b));
        Ok((y, Shape::from(s.dims)))
    }

    fn backward(
        &self,
        _x: [&Tensor; 1],
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 1]> {
        let backward = Fused(SoftmaxBackward);
        Ok([Some(res.apply_op2_no_bwd(&grad.contiguous()?, &backward)?)])
    }
}

/// `(y, ∂y) → ∂x` of [`SoftmaxLastDim`].
pub(super) struct SoftmaxBackward;

impl FusedOp<2> for SoftmaxBackward {
    const NAME: &'static str = "softmax-last-dim-backward";

    fn forward(&self, [s1, s2]: [Input<'_>; 2]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let y = s1.data;
        let g = s2.data;
        let n = s1.dims.last().copied().unwrap_or(1).max(1);
        let mut out = vec![0.0f32; y.len()];
        softmax_backward_into(y, g, n, &mut out);
        Ok((out, Shape::from(s1.dims)))
    }
}

/// Softmax over the last dimension as one op with a backward pass (Candle's fused
/// `softmax_last_dim` has none); `None` where it does not apply.
pub(crate) fn softmax_last_dim(x: &Tensor) -> Result<Option<Tensor>> {
    if !applies(&[x]) {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op1(Fused(SoftmaxLastDim))?))
}
