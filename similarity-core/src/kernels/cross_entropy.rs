//! The diagonal cross-entropy of MultipleNegativesRankingLoss, alone and fused with the
//! cosine similarity matrix.
//!
//! ```text
//! L = mean_i (lse_j Z_ij − Z_ii)                                            rows
//! L = ½ mean_i lse_j Z_ij + ½ mean_j lse_i Z_ij − mean_i Z_ii                symmetric
//! ∂L/∂Z = (softmax_rows(Z) − I) / n   (symmetric: ½ P_rows + ½ P_cols − I, / n)
//! fused:  Z = scale · â p̂ᵀ, a, p: (n, d);  ∂â = scale · ∂Z p̂,  ∂p̂ = scale · ∂Zᵀ â
//! ```
//!
//! In the fused form the logits are bounded, `|Z_ij| ≤ |scale|` (cosines), so every
//! log-sum-exp can use the same shift `c = |scale|` instead of a row or column maximum:
//! `lse_i = c + ln Σ_j e^{Z_ij − c}`, with `e^{Z − c} ≥ e^{−2c}` still a normal f32 for
//! `|scale| ≤` [`FIXED_SHIFT_MAX`]. One exponential per entry then serves the row and the
//! column softmax, in one parallel sweep, and `e^{Z − c}` is computed in place of `Z`.

use super::*;

simd_fn! {
    /// Row-wise `p = w · softmax(z)` of a row-major `(n × n)` matrix; returns `Σ_i lse_i`.
    pub(super) fn softmax_rows(z: &[f32], n: usize, w: f32, p: &mut [f32]) -> f64 {
        let mut lse_sum = 0.0f64;
        for (row, out) in z.chunks_exact(n).zip(p.chunks_exact_mut(n)) {
            let mx = max(row);
            for (o, &v) in out.iter_mut().zip(row) {
                *o = exp_f32(v - mx);
            }
            let total = sum(out);
            let scale = w / total;
            out.iter_mut().for_each(|o| *o *= scale);
            lse_sum += f64::from(mx) + f64::from(total.ln());
        }
        lse_sum
    }
}

simd_fn! {
    /// Adds the column-wise `w · softmax(z)` of a row-major `(n × n)` matrix to `p`, in
    /// row-major sweeps; returns `Σ_j lse_j`.
    pub(super) fn add_softmax_columns(z: &[f32], n: usize, w: f32, p: &mut [f32]) -> f64 {
        let mut mx = vec![f32::NEG_INFINITY; n];
        for row in z.chunks_exact(n) {
            for (m, &v) in mx.iter_mut().zip(row) {
                *m = if v > *m { v } else { *m };
            }
        }
        let mut total = vec![0.0f32; n];
        let mut e = vec![0.0f32; n * n];
        for (row, er) in z.chunks_exact(n).zip(e.chunks_exact_mut(n)) {
            for ((o, &v), &m) in er.iter_mut().zip(row).zip(&mx) {
                *o = exp_f32(v - m);
            }
            for (t, &o) in total.iter_mut().zip(er.iter()) {
                *t += o;
            }
        }
        let scale: Vec<f32> = total.iter().map(|t| w / t).collect();
        for (pr, er) in p.chunks_exact_mut(n).zip(e.chunks_exact(n)) {
            for ((pv, &ev), &sc) in pr.iter_mut().zip(er).zip(&scale) {
                *pv += ev * sc;
            }
        }
        mx.iter()
            .zip(&total)
            .map(|(&m, &t)| f64::from(m) + f64::from(t.ln()))
            .sum()
    }
}

/// The largest `|scale|` for which the fused form shifts by `|scale|` (module docs):
/// `e^{−2·40}` ≈ 1.8·10⁻³⁵ is still a normal f32.
const FIXED_SHIFT_MAX: f32 = 40.0;

simd_fn! {
    /// `z ← e^{scale·z − shift}` over a block of rows of width `n`; returns the block's row
    /// sums and its column sums.
    fn exp_block(z: &mut [f32], n: usize, scale: f32, shift: f32) -> (Vec<f32>, Vec<f32>) {
        let mut rows = Vec::with_capacity(z.len() / n);
        let mut cols = vec![0.0f32; n];
        for row in z.chunks_exact_mut(n) {
            for v in row.iter_mut() {
                *v = exp_f32(*v * scale - shift);
            }
            rows.push(sum(row));
            for (c, &v) in cols.iter_mut().zip(row.iter()) {
                *c += v;
            }
        }
        (rows, cols)
    }
}

/// [`exp_block`] over the whole `(n × n)` matrix in parallel blocks of rows: the row sums
/// `r_i` and the column sums `c_j` of `e^{scale·z − shift}`, which replaces `z`.
fn exp_sums(z: &mut [f32], n: usize, scale: f32, shift: f32) -> (Vec<f32>, Vec<f32>) {
    use rayon::prelude::*;
    let blocks: Vec<(Vec<f32>, Vec<f32>)> = z
        .par_chunks_mut(par_block_rows(n, n) * n)
        .map(|block| exp_block(block, n, scale, shift))
        .collect();
    let mut rows = Vec::with_capacity(n);
    let mut cols = vec![0.0f32; n];
    for (r, c) in blocks {
        rows.extend(r);
        cols.iter_mut().zip(&c).for_each(|(t, v)| *t += v);
    }
    (rows, cols)
}

simd_fn! {
    /// `e_ij ← e_ij · (a_i + b_j)` over a block of rows (`a`: the block's rows, `b`: the
    /// columns).
    fn scale_rows_cols(e: &mut [f32], a: &[f32], b: &[f32]) {
        for (row, &ai) in e.chunks_exact_mut(b.len()).zip(a) {
            for (v, &bj) in row.iter_mut().zip(b) {
                *v *= ai + bj;
            }
        }
    }
}

/// Mean diagonal cross-entropy of a square logit matrix, rows (and columns when
/// symmetric), as one op: see the module docs.
pub(super) struct DiagonalCrossEntropy {
    symmetric: bool,
    /// The softmax-normalised gradient factor, `(½ if symmetric) P_rows + (½) P_cols − I`,
    /// computed in the forward pass for the backward one.
    grad: Mutex<Option<Tensor>>,
}

impl FusedOp<1> for DiagonalCrossEntropy {
    const NAME: &'static str = "diagonal-cross-entropy";

    fn forward(&self, [s]: [Input<'_>; 1]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (n, m) = s.dims2()?;
        if n != m {
            candle_core::bail!("diagonal-cross-entropy: logits must be square, got ({n}, {m})");
        }
        let z = s.data;
        let w = if self.symmetric { 0.5f32 } else { 1.0 };
        let mut p = vec![0.0f32; n * n];
        let mut loss = f64::from(w) * softmax_rows(z, n, w, &mut p);
        if self.symmetric {
            loss += f64::from(w) * add_softmax_columns(z, n, w, &mut p);
        }
        let diag_sum: f64 = (0..n).map(|i| f64::from(z[i * n + i])).sum();
        for i in 0..n {
            p[i * n + i] -= 1.0;
        }
        *self.grad.lock().expect("diagonal-cross-entropy state") =
            Some(Tensor::from_vec(p, (n, n), &candle_core::Device::Cpu)?);
        let loss = ((loss - diag_sum) / n as f64) as f32;
        Ok((vec![loss], Shape::from(())))
    }

    fn backward(
        &self,
        [z]: [&Tensor; 1],
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 1]> {
        let n = z.dim(0)?;
        let p = self
            .grad
            .lock()
            .expect("diagonal-cross-entropy state")
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("diagonal-cross-entropy: no forward".into()))?;
        let scale = f64::from(grad.to_scalar::<f32>()?) / n as f64;
        Ok([Some(p.affine(scale, 0.0)?)])
    }
}

/// The mean diagonal cross-entropy of square `logits` (rows, and columns when `symmetric`)
/// as one fused op, or `None` where the kernel does not apply.
pub(crate) fn diagonal_cross_entropy(logits: &Tensor, symmetric: bool) -> Result<Option<Tensor>> {
    if !applies(&[logits]) {
        return Ok(None);
    }
    let op = DiagonalCrossEntropy {
        symmetric,
        grad: Mutex::new(None),
    };
    Ok(Some(logits.contiguous()?.apply_op1(Fused(op))?))
}

/// MultipleNegativesRankingLoss with cosine similarity over `(a: (n, d), p: (n, d))`, the
/// pairs `(a_i, p_i)` positive: `Z = scale · â p̂ᵀ`, then the diagonal cross-entropy (module
/// docs). The forward pass keeps `∂L/∂Z` for the backward one, which is two products.
pub(super) struct CosineMnrl {
    scale: f32,
    symmetric: bool,
    /// Whether an input needs a gradient (else the forward pass keeps nothing).
    with_grad: bool,
    grad: Mutex<Option<std::sync::Arc<Vec<f32>>>>,
}

impl FusedOp<2> for CosineMnrl {
    const NAME: &'static str = "cosine-mnrl";

    fn forward(&self, [s1, s2]: [Input<'_>; 2]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (n, d) = s1.dims2()?;
        if s2.dims2()? != (n, d) {
            candle_core::bail!("cosine-mnrl: anchors and positives differ in shape");
        }
        let (_, au) = normalize_rows(s1.data, d);
        let (_, pu) = normalize_rows(s2.data, d);
        let scale = self.scale;
        let w = if self.symmetric { 0.5f32 } else { 1.0 };
        // Cosines; then ∂L/∂S = scale · (P − I) / n takes their place.
        let mut z = vec![0.0f32; n * n];
        gemm(&mut z, &au, &pu, n, n, d, false, true);
        let diag: f64 = (0..n).map(|i| f64::from(z[i * n + i] * scale)).sum();
        let k = scale / n as f32;
        let lse_sum = if scale.abs() <= FIXED_SHIFT_MAX {
            let shift = scale.abs();
            let (rows, cols) = exp_sums(&mut z, n, scale, shift);
            let lse = |t: &f32| f64::from(shift) + f64::from(t.ln());
            let mut total = f64::from(w) * rows.iter().map(lse).sum::<f64>();
            if self.symmetric {
                total += f64::from(w) * cols.iter().map(lse).sum::<f64>();
            }
            if self.with_grad {
                // P_ij = w e_ij / r_i (+ w e_ij / c_j), times k, minus k on the diagonal.
                let inv_r: Vec<f32> = rows.iter().map(|r| w * k / r).collect();
                let inv_c: Vec<f32> = if self.symmetric {
                    cols.iter().map(|c| w * k / c).collect()
                } else {
                    vec![0.0; n]
                };
                let per = par_block_rows(n, n);
                use rayon::prelude::*;
                z.par_chunks_mut(per * n)
                    .zip(inv_r.par_chunks(per))
                    .enumerate()
                    .for_each(|(b, (block, ir))| {
                        scale_rows_cols(block, ir, &inv_c);
                        for (r, row) in block.chunks_exact_mut(n).enumerate() {
                            row[b * per + r] -= k;
                        }
                    });
            }
            total
        } else {
            // Unbounded shift: the max-shifted passes of the plain cross-entropy.
            z.iter_mut().for_each(|v| *v *= scale);
            let mut g = vec![0.0f32; n * n];
            let mut total = f64::from(w) * softmax_rows(&z, n, w, &mut g);
            if self.symmetric {
                total += f64::from(w) * add_softmax_columns(&z, n, w, &mut g);
            }
            for i in 0..n {
                g[i * n + i] -= 1.0;
            }
            g.iter_mut().for_each(|v| *v *= k);
            z = g;
            total
        };
        if self.with_grad {
            *self.grad.lock().expect("cosine-mnrl state") = Some(std::sync::Arc::new(z));
        }
        let loss = ((lse_sum - diag) / n as f64) as f32;
        Ok((vec![loss], Shape::from(())))
    }

    fn backward(
        &self,
        [a, p]: [&Tensor; 2],
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 2]> {
        let g = self
            .grad
            .lock()
            .expect("cosine-mnrl state")
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("cosine-mnrl: no forward".into()))?;
        let (n, d) = a.dims2()?;
        let packed = a.apply_op3_no_bwd(
            p,
            &grad.contiguous()?,
            &Fused(CosineMnrlBackward {
                g,
                with_a: a.track_op(),
                with_p: p.track_op(),
            }),
        )?;
        let ga = a
            .track_op()
            .then(|| packed.narrow(0, 0, n * d)?.reshape((n, d)));
        let gp = p
            .track_op()
            .then(|| packed.narrow(0, n * d, n * d)?.reshape((n, d)));
        Ok([ga.transpose()?, gp.transpose()?])
    }
}

/// `(a, p, ∂L) → [∂a | ∂p]` of [`CosineMnrl`]: `∂â = ∂L · G p̂`, `∂p̂ = ∂L · Gᵀ â`, each
/// through the normalisation.
pub(super) struct CosineMnrlBackward {
    g: std::sync::Arc<Vec<f32>>,
    with_a: bool,
    with_p: bool,
}

impl FusedOp<3> for CosineMnrlBackward {
    const NAME: &'static str = "cosine-mnrl-backward";

    fn forward(&self, [s1, s2, s3]: [Input<'_>; 3]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (n, d) = s1.dims2()?;
        let (an, au) = normalize_rows(s1.data, d);
        let (pn, pu) = normalize_rows(s2.data, d);
        let scale = s3.data.first().copied().unwrap_or(1.0);
        let mut out = vec![0.0f32; 2 * n * d];
        let (ga, gp) = out.split_at_mut(n * d);
        if self.with_a {
            gemm(ga, &self.g, &pu, n, d, n, false, false);
            ga.iter_mut().for_each(|v| *v *= scale);
            normalize_backward(ga, &au, &an, d);
        }
        if self.with_p {
            gemm(gp, &self.g, &au, n, d, n, true, false);
            gp.iter_mut().for_each(|v| *v *= scale);
            normalize_backward(gp, &pu, &pn, d);
        }
        Ok((out, Shape::from(2 * n * d)))
    }
}

/// MultipleNegativesRankingLoss with cosine similarity of anchors `a` and positives `p`
/// (`(n, d)` each) at `scale`, as one op; `None` where it does not apply.
pub(crate) fn cosine_mnrl(
    a: &Tensor,
    p: &Tensor,
    scale: f64,
    symmetric: bool,
) -> Result<Option<Tensor>> {
    if !applies(&[a, p]) {
        return Ok(None);
    }
    let with_grad = a.track_op() || p.track_op();
    let op = CosineMnrl {
        scale: scale as f32,
        symmetric,
        with_grad,
        grad: Mutex::new(None),
    };
    let (a, p) = (a.contiguous()?, p.contiguous()?);
    Ok(Some(if with_grad {
        a.apply_op2(&p, Fused(op))?
    } else {
        a.apply_op2_no_bwd(&p, &Fused(op))?
    }))
}
