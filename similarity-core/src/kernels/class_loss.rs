//! The class-logit losses (scores, logits and cross-entropy) as one op on the embeddings
//! and the class kernel, and CenterLoss's distance to the centres as one op on the
//! embeddings and the centres.
//!
//! ```text
//! z = x W: (n, C), or z = x̂ ŵ (cosines of the rows of x and the columns of W); gᵢ the
//! class of row i
//! Z_ic = t(z_ic) for c = gᵢ,  s · z_ic otherwise         (the loss's target transform)
//! L = mean_i [ logsumexp_c Z_ic − Z_i,gᵢ ]
//! ∂L/∂z_ic = (softmax(Z_i)_c − [c = gᵢ]) / n · ∂Z_ic/∂z_ic
//! ∂x = ∂z Wᵀ, ∂W = xᵀ ∂z   (cosines: ∂x̂ = ∂z ŵᵀ, ∂ŵ = x̂ᵀ ∂z, then each normalisation)
//!
//! Center: L = λ / (n·d) Σᵢ ‖x̂ᵢ − C_gᵢ‖²,  ∂x̂ᵢ = 2λ/(n·d) (x̂ᵢ − C_gᵢ),  ∂C_c = −Σ_{gᵢ = c} ∂x̂ᵢ
//! ```
//!
//! The transforms (`loss::class_logits` has their derivations): plain logits `s·z` (the
//! softmax loss, `s = 1/temperature`), CosFace `s·(z − m)` and ArcFace `s·cos(θ + m)` on
//! the target. The cosine forms see `z` clamped to `[−1, 1]`, with the clamp's gradient
//! (Candle's: 1 inside, ½ at the bounds, 0 outside), as the composite form.

use super::*;
use rayon::prelude::*;

/// What the target class's score becomes (every other score is `scale · z`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum TargetLogit {
    /// `scale · z`, the scores unclamped (SoftmaxLoss).
    Plain { scale: f32 },
    /// `scale · (z − margin)`, `z` a clamped cosine (CosFaceLoss).
    CosFace { scale: f32, margin: f32 },
    /// `scale · (z cos m − √clamp(1 − z², 10⁻¹², 1) sin m)`, `z` a clamped cosine
    /// (ArcFaceLoss).
    ArcFace { scale: f32, cos_m: f32, sin_m: f32 },
}

/// Candle's gradient of `clamp(v, lo, hi)`: 1 inside, ½ on a bound, 0 outside.
fn clamp_grad(v: f32, lo: f32, hi: f32) -> f32 {
    if v > lo && v < hi {
        1.0
    } else if v == lo || v == hi {
        0.5
    } else {
        0.0
    }
}

impl TargetLogit {
    fn cosine(&self) -> bool {
        !matches!(self, TargetLogit::Plain { .. })
    }

    fn scale(&self) -> f32 {
        match *self {
            TargetLogit::Plain { scale }
            | TargetLogit::CosFace { scale, .. }
            | TargetLogit::ArcFace { scale, .. } => scale,
        }
    }

    /// The target's logit and its derivative by the (clamped) score.
    fn target(&self, z: f32) -> (f32, f32) {
        match *self {
            TargetLogit::Plain { scale } => (scale * z, scale),
            TargetLogit::CosFace { scale, margin } => (scale * (z - margin), scale),
            TargetLogit::ArcFace {
                scale,
                cos_m,
                sin_m,
            } => {
                let v = 1.0 - z * z;
                let sin = v.clamp(1e-12, 1.0).sqrt();
                let dsin = -z / sin * clamp_grad(v, 1e-12, 1.0);
                (
                    scale * (z * cos_m - sin * sin_m),
                    scale * (cos_m - dsin * sin_m),
                )
            }
        }
    }
}

/// `(x (n, d), W (d, C)) → L ()`: the class scores (`x W`, or the cosines `x̂ ŵ` of the
/// rows of `x` and the columns of `W`), the cross-entropy of their logits for the rows'
/// classes, and, when an input needs one, both gradients, computed in the forward pass and
/// kept for the backward one (three matrix products in all, as the composite form's).
struct ClassCrossEntropy {
    ids: Vec<u32>,
    target: TargetLogit,
    with_grad: bool,
    grads: Mutex<Option<(Tensor, Tensor)>>,
}

simd_fn! {
    /// One row: `out ← softmax(Z)/n` of the logits `Z = scale · z` with the target's logit
    /// `t` at column `g`; returns `lse − t`.
    fn row_cross_entropy(z: &[f32], scale: f32, g: usize, t: f32, inv_n: f32, out: &mut [f32]) -> f32 {
        for (o, &v) in out.iter_mut().zip(z) {
            *o = scale * v;
        }
        out[g] = t;
        let mx = max(out);
        for o in out.iter_mut() {
            *o = exp_f32(*o - mx);
        }
        let total = sum(out);
        let k = inv_n / total;
        out.iter_mut().for_each(|o| *o *= k);
        mx + total.ln() - t
    }
}

/// `(d × c)` row-major → its `(c × d)` transpose.
fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; a.len()];
    for (r, row) in a.chunks_exact(cols.max(1)).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            t[c * rows + r] = v;
        }
    }
    t
}

impl ClassCrossEntropy {
    /// The cross-entropy of scores `z: (n, c)`, which `z` leaves holding `∂L/∂z`.
    fn cross_entropy(&self, z: &mut [f32], n: usize, c: usize) -> f64 {
        let inv_n = 1.0 / n.max(1) as f32;
        let (cosine, scale, target) = (self.target.cosine(), self.target.scale(), self.target);
        let per = par_block_rows(n, c);
        z.par_chunks_mut(per * c)
            .zip(self.ids.par_chunks(per))
            .map(|(zb, ids)| {
                let mut row = vec![0.0f32; c];
                let mut total = 0.0f64;
                for (out, &gi) in zb.chunks_exact_mut(c).zip(ids) {
                    let gi = gi as usize;
                    row.copy_from_slice(out);
                    if cosine {
                        row.iter_mut().for_each(|v| *v = v.clamp(-1.0, 1.0));
                    }
                    let (t, dt) = target.target(row[gi]);
                    total += f64::from(row_cross_entropy(&row, scale, gi, t, inv_n, out));
                    // ∂L/∂Z → ∂L/∂z: `scale` off the target, `dt` on it (less 1/n), and
                    // the clamp's gradient where a cosine left (−1, 1).
                    let pg = out[gi];
                    out.iter_mut().for_each(|o| *o *= scale);
                    out[gi] = (pg - inv_n) * dt;
                }
                total
            })
            .sum()
    }
}

impl FusedOp<2> for ClassCrossEntropy {
    const NAME: &'static str = "class-cross-entropy";

    fn forward(&self, [x, w]: [Input<'_>; 2]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (n, d) = x.dims2()?;
        let (dw, c) = w.dims2()?;
        if dw != d || self.ids.len() != n || self.ids.iter().any(|&g| g as usize >= c) {
            candle_core::bail!(
                "class-cross-entropy: ({n}, {d}) rows, ({dw}, {c}) kernel, {} class ids",
                self.ids.len()
            );
        }
        let dev = candle_core::Device::Cpu;
        if n == 0 || c == 0 {
            if self.with_grad {
                *self.grads.lock().expect("class-cross-entropy state") = Some((
                    Tensor::zeros((n, d), DType::F32, &dev)?,
                    Tensor::zeros((d, c), DType::F32, &dev)?,
                ));
            }
            return Ok((vec![0.0], Shape::from(())));
        }
        let mut z = vec![0.0f32; n * c];
        let total = if self.target.cosine() {
            let (xn, xu) = normalize_rows(x.data, d);
            let (wn, wu) = normalize_rows(&transpose(w.data, d, c), d);
            gemm(&mut z, &xu, &wu, n, c, d, false, true);
            let raw = z.clone();
            let total = self.cross_entropy(&mut z, n, c);
            for (g, &v) in z.iter_mut().zip(&raw) {
                if !(v > -1.0 && v < 1.0) {
                    *g *= clamp_grad(v, -1.0, 1.0);
                }
            }
            if self.with_grad {
                let mut gx = vec![0.0f32; n * d];
                gemm(&mut gx, &z, &wu, n, d, c, false, false);
                normalize_backward(&mut gx, &xu, &xn, d);
                let mut gwt = vec![0.0f32; c * d];
                gemm(&mut gwt, &z, &xu, c, d, n, true, false);
                normalize_backward(&mut gwt, &wu, &wn, d);
                *self.grads.lock().expect("class-cross-entropy state") = Some((
                    Tensor::from_vec(gx, (n, d), &dev)?,
                    Tensor::from_vec(transpose(&gwt, c, d), (d, c), &dev)?,
                ));
            }
            total
        } else {
            gemm(&mut z, x.data, w.data, n, c, d, false, false);
            let total = self.cross_entropy(&mut z, n, c);
            if self.with_grad {
                let mut gx = vec![0.0f32; n * d];
                gemm(&mut gx, &z, w.data, n, d, c, false, true);
                let mut gw = vec![0.0f32; d * c];
                gemm(&mut gw, x.data, &z, d, c, n, true, false);
                *self.grads.lock().expect("class-cross-entropy state") = Some((
                    Tensor::from_vec(gx, (n, d), &dev)?,
                    Tensor::from_vec(gw, (d, c), &dev)?,
                ));
            }
            total
        };
        Ok((vec![(total / n as f64) as f32], Shape::from(())))
    }

    fn backward(
        &self,
        [x, w]: [&Tensor; 2],
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 2]> {
        let (gx, gw) = self
            .grads
            .lock()
            .expect("class-cross-entropy state")
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("class-cross-entropy: no forward".into()))?;
        let k = f64::from(grad.to_scalar::<f32>()?);
        let scaled = |t: Tensor| if k == 1.0 { Ok(t) } else { t.affine(k, 0.0) };
        Ok([
            x.track_op().then(|| scaled(gx)).transpose()?,
            w.track_op().then(|| scaled(gw)).transpose()?,
        ])
    }
}

/// The class-logit cross-entropy (module docs) of `x: (n, d)` against the class kernel
/// `kernel: (d, C)` for the rows' classes `ids` (checked by the caller to lie in
/// `[0, C)`), as one op; `None` where the kernel does not apply.
pub(crate) fn class_cross_entropy(
    x: &Tensor,
    kernel: &Tensor,
    ids: Vec<u32>,
    target: TargetLogit,
) -> Result<Option<Tensor>> {
    if !applies(&[x, kernel]) {
        return Ok(None);
    }
    let with_grad = x.track_op() || kernel.track_op();
    let op = ClassCrossEntropy {
        ids,
        target,
        with_grad,
        grads: Mutex::new(None),
    };
    let (x, kernel) = (x.contiguous()?, kernel.contiguous()?);
    Ok(Some(if with_grad {
        x.apply_op2(&kernel, Fused(op))?
    } else {
        x.apply_op2_no_bwd(&kernel, &Fused(op))?
    }))
}

/// CenterLoss: `(x (n, d), C (k, d)) → L ()`; both gradients are kept for the backward
/// pass (each `O(n·d)`).
struct CenterDistance {
    ids: Vec<u32>,
    lambda: f32,
    grads: Mutex<Option<(Tensor, Tensor)>>,
}

impl FusedOp<2> for CenterDistance {
    const NAME: &'static str = "center-distance";

    fn forward(&self, [x, centers]: [Input<'_>; 2]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (n, d) = x.dims2()?;
        let (k, dc) = centers.dims2()?;
        if dc != d || self.ids.len() != n || self.ids.iter().any(|&g| g as usize >= k) {
            candle_core::bail!(
                "center-distance: ({n}, {d}) rows, ({k}, {dc}) centres, {} ids",
                self.ids.len()
            );
        }
        let (norms, unit) = normalize_rows(x.data, d);
        let w = 2.0 * self.lambda / (n * d).max(1) as f32;
        let mut gx = vec![0.0f32; n * d];
        let mut gc = vec![0.0f32; k * d];
        let mut total = 0.0f64;
        if d > 0 {
            for ((i, u), o) in unit.chunks_exact(d).enumerate().zip(gx.chunks_exact_mut(d)) {
                let gi = self.ids[i] as usize;
                let c = &centers.data[gi * d..(gi + 1) * d];
                let mut sq = 0.0f32;
                for ((o, &a), &b) in o.iter_mut().zip(u).zip(c) {
                    let diff = a - b;
                    sq += diff * diff;
                    *o = w * diff;
                }
                total += f64::from(sq);
                for (t, &v) in gc[gi * d..(gi + 1) * d].iter_mut().zip(o.iter()) {
                    *t -= v;
                }
            }
            normalize_backward(&mut gx, &unit, &norms, d);
        }
        let dev = candle_core::Device::Cpu;
        *self.grads.lock().expect("center-distance state") = Some((
            Tensor::from_vec(gx, (n, d), &dev)?,
            Tensor::from_vec(gc, (k, d), &dev)?,
        ));
        let value = f64::from(self.lambda) * total / (n * d).max(1) as f64;
        Ok((vec![value as f32], Shape::from(())))
    }

    fn backward(
        &self,
        [x, c]: [&Tensor; 2],
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 2]> {
        let (gx, gc) = self
            .grads
            .lock()
            .expect("center-distance state")
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("center-distance: no forward".into()))?;
        let k = f64::from(grad.to_scalar::<f32>()?);
        let scaled = |t: Tensor| if k == 1.0 { Ok(t) } else { t.affine(k, 0.0) };
        Ok([
            x.track_op().then(|| scaled(gx)).transpose()?,
            c.track_op().then(|| scaled(gc)).transpose()?,
        ])
    }
}

/// CenterLoss `λ / (n·d) Σᵢ ‖x̂ᵢ − C_gᵢ‖²` of `x: (n, d)` against `centers: (k, d)` for the
/// rows' classes `ids` (checked by the caller), as one op; `None` where it does not apply.
pub(crate) fn center_distance(
    x: &Tensor,
    centers: &Tensor,
    ids: Vec<u32>,
    lambda: f32,
) -> Result<Option<Tensor>> {
    if !applies(&[x, centers]) {
        return Ok(None);
    }
    let op = CenterDistance {
        ids,
        lambda,
        grads: Mutex::new(None),
    };
    let (x, centers) = (x.contiguous()?, centers.contiguous()?);
    Ok(Some(if x.track_op() || centers.track_op() {
        x.apply_op2(&centers, Fused(op))?
    } else {
        x.apply_op2_no_bwd(&centers, &Fused(op))?
    }))
}
