//! The diagonal cross-entropy of MultipleNegativesRankingLoss, alone and fused with the
//! cosine similarity matrix.
//!
//! ```text
//! L = mean_i (lse_j Z_ij − Z_ii)                                            rows
//! L = ½ mean_i lse_j Z_ij + ½ mean_j lse_i Z_ij − mean_i Z_ii                symmetric
//! ∂L/∂Z = (softmax_rows(Z) − I) / n   (symmetric: ½ P_rows + ½ P_cols − I, / n)
//! fused:  Z = scale · â p̂ᵀ, a = x[anchors], p = x[positives]: (n, d) rows of x: (N, d);
//!         ∂â = scale · ∂Z p̂,  ∂p̂ = scale · ∂Zᵀ â,  ∂x[r] = Σ of the ∂â, ∂p̂ rows taken from row r
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

/// The normalised rows of one side of the pairs, with their norms.
struct Side {
    /// `‖x_r‖` of each row (unclamped).
    norms: Vec<f32>,
    /// The rows at unit norm, `(n, d)` row-major.
    unit: Vec<f32>,
}

impl Side {
    /// Rows `rows` of the row-major `x: (·, d)`, normalised; one pass over a contiguous
    /// run of rows (the usual `(i, P + i)` layout of a pair batch), else row by row.
    fn of(x: &[f32], d: usize, rows: &[u32]) -> Side {
        let n = rows.len();
        let mut norms = vec![0.0f32; n];
        let mut unit = vec![0.0f32; n * d];
        if let Some(r0) = contiguous_run(rows) {
            normalize_rows_into(&x[r0 * d..(r0 + n) * d], d, &mut norms, &mut unit);
        } else {
            for ((&r, norm), out) in rows
                .iter()
                .zip(norms.iter_mut())
                .zip(unit.chunks_exact_mut(d.max(1)))
            {
                let r = r as usize;
                normalize_rows_into(&x[r * d..(r + 1) * d], d, std::slice::from_mut(norm), out);
            }
        }
        Side { norms, unit }
    }
}

/// `Some(r0)` when `rows` is `r0, r0 + 1, …` (or empty: `Some(0)`).
fn contiguous_run(rows: &[u32]) -> Option<usize> {
    let r0 = rows.first().copied().unwrap_or(0);
    rows.iter()
        .enumerate()
        .all(|(i, &r)| r as usize == r0 as usize + i)
        .then_some(r0 as usize)
}

/// What the forward pass of [`CosineMnrl`] keeps for the backward one: `∂L/∂S` (times
/// `scale`, `(n, n)`) and both sides' unit rows and norms.
struct MnrlState {
    g: Vec<f32>,
    anchors: Side,
    positives: Side,
}

/// MultipleNegativesRankingLoss with cosine similarity, as one op on the batch's
/// embeddings `x: (N, d)`: the pairs `(x_{aᵢ}, x_{pᵢ})` are positive, `Z = scale · â p̂ᵀ`,
/// then the diagonal cross-entropy (module docs). The rows are read from `x` by index
/// (no gathered copies), and the backward pass writes `∂â`, `∂p̂` (two products, through the
/// normalisation) into the rows of `∂x` they came from, summed where a row is used more
/// than once. With the usual layout (`aᵢ = i`, `pᵢ = P + i`, `N = 2P`) the products write
/// `∂x` directly.
pub(super) struct CosineMnrl {
    anchors: Vec<u32>,
    positives: Vec<u32>,
    scale: f32,
    symmetric: bool,
    /// Whether `x` needs a gradient (else the forward pass keeps nothing).
    with_grad: bool,
    state: Mutex<Option<std::sync::Arc<MnrlState>>>,
}

impl CosineMnrl {
    /// The loss of unit rows `au`, `pu` (`(n, d)` each); with `with_grad`, also `∂L/∂S`
    /// (`S` the cosines), which the returned buffer holds.
    fn loss_and_grad(&self, au: &[f32], pu: &[f32], n: usize, d: usize) -> (f64, Vec<f32>) {
        let scale = self.scale;
        let w = if self.symmetric { 0.5f32 } else { 1.0 };
        // Cosines; then ∂L/∂S = scale · (P − I) / n takes their place.
        let mut z = vec![0.0f32; n * n];
        gemm(&mut z, au, pu, n, n, d, false, true);
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
        (lse_sum - diag, z)
    }
}

impl FusedOp<1> for CosineMnrl {
    const NAME: &'static str = "cosine-mnrl";

    fn forward(&self, [x]: [Input<'_>; 1]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (rows, d) = x.dims2()?;
        let n = self.anchors.len();
        if self.positives.len() != n
            || self
                .anchors
                .iter()
                .chain(&self.positives)
                .any(|&r| r as usize >= rows)
        {
            candle_core::bail!("cosine-mnrl: {n} pairs with a row out of range of {rows}");
        }
        let anchors = Side::of(x.data, d, &self.anchors);
        let positives = Side::of(x.data, d, &self.positives);
        let (total, g) = self.loss_and_grad(&anchors.unit, &positives.unit, n, d);
        if self.with_grad {
            *self.state.lock().expect("cosine-mnrl state") = Some(std::sync::Arc::new(MnrlState {
                g,
                anchors,
                positives,
            }));
        }
        Ok((vec![(total / n as f64) as f32], Shape::from(())))
    }

    fn backward(
        &self,
        [x]: [&Tensor; 1],
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 1]> {
        let state = self
            .state
            .lock()
            .expect("cosine-mnrl state")
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("cosine-mnrl: no forward".into()))?;
        let upstream = grad.to_scalar::<f32>()?;
        let (rows, d) = x.dims2()?;
        let n = self.anchors.len();
        let MnrlState {
            g,
            anchors: a,
            positives: p,
        } = &*state;
        // ∂â = G p̂ and ∂p̂ = Gᵀ â, through the normalisation, times the upstream gradient.
        let side_grads = |ga: &mut [f32], gp: &mut [f32]| {
            gemm(ga, g, &p.unit, n, d, n, false, false);
            gemm(gp, g, &a.unit, n, d, n, true, false);
            for (out, side) in [(&mut *ga, a), (&mut *gp, p)] {
                if upstream != 1.0 {
                    out.iter_mut().for_each(|v| *v *= upstream);
                }
                normalize_backward(out, &side.unit, &side.norms, d);
            }
        };
        let mut out = vec![0.0f32; rows * d];
        let halves = rows == 2 * n
            && contiguous_run(&self.anchors) == Some(0)
            && contiguous_run(&self.positives) == Some(n);
        if halves {
            let (ga, gp) = out.split_at_mut(n * d);
            side_grads(ga, gp);
        } else {
            let mut ga = vec![0.0f32; n * d];
            let mut gp = vec![0.0f32; n * d];
            side_grads(&mut ga, &mut gp);
            for (idx, grads) in [(&self.anchors, &ga), (&self.positives, &gp)] {
                for (&r, gr) in idx.iter().zip(grads.chunks_exact(d.max(1))) {
                    let r = r as usize;
                    for (o, &v) in out[r * d..(r + 1) * d].iter_mut().zip(gr) {
                        *o += v;
                    }
                }
            }
        }
        Ok([Some(Tensor::from_vec(
            out,
            (rows, d),
            &candle_core::Device::Cpu,
        )?)])
    }
}

/// MultipleNegativesRankingLoss with cosine similarity at `scale` of the pairs
/// `(x_{anchors[i]}, x_{positives[i]})` of `x: (N, d)` (indices checked by the caller), as
/// one op; `None` where it does not apply.
pub(crate) fn cosine_mnrl(
    x: &Tensor,
    anchors: Vec<u32>,
    positives: Vec<u32>,
    scale: f64,
    symmetric: bool,
) -> Result<Option<Tensor>> {
    if !applies(&[x]) || x.rank() != 2 {
        return Ok(None);
    }
    let with_grad = x.track_op();
    let op = CosineMnrl {
        anchors,
        positives,
        scale: scale as f32,
        symmetric,
        with_grad,
        state: Mutex::new(None),
    };
    let x = x.contiguous()?;
    Ok(Some(if with_grad {
        x.apply_op1(Fused(op))?
    } else {
        x.apply_op1_no_bwd(&Fused(op))?
    }))
}
