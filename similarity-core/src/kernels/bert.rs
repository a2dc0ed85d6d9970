//! Forward-only kernels for a frozen transformer's evaluation pass (the cache fill of a
//! frozen `SentenceTransformer`): a dense layer whose bias, residual, GELU or layer norm
//! are applied in the same op, and multi-head attention read straight from the packed
//! Q/K/V projection.
//!
//! ```text
//! dense:      y = epilogue(x Wᵀ + b + r)     x (n, k), W (m, k), b (m), r (n, m) optional
//!             epilogue: none | GELU (erf) | LN(y) = (y − μ) / √(σ² + ε) · γ + β per row
//! attention:  for each sequence s (L rows) and head h, q, k, v the head's d columns of
//!             Q, K and V in s's rows:
//!             ctx[s, h] = softmax(q kᵀ · scale + (1 − m_s) · (−10⁹)) v
//!             QKV (b·L, 3H) = [Q | K | V], mask (b, L) → ctx (b·L, H), d = H / heads
//! ```
//!
//! Why: per layer the composite form is three projections, four head split/merge copies, a
//! transposed copy of K, the score scaling and masking, the softmax, two bias additions, two
//! residual additions and two layer norms, each an op that allocates and fills its output.
//! Attention over the short texts of a cache fill is many tiny `(L × d) · (d × L)` products,
//! and Candle runs one `gemm` call per (sequence, head) for them. Here a layer is five ops:
//! the products go to `gemm` whole, and attention is a loop over each sequence's heads,
//! one sequence per task.
//!
//! Neither op has a backward pass: the transformer uses them only where nothing needs a
//! gradient (constant weights, evaluation mode), and its composite form stays the
//! reference (the tests compare the two).

#![cfg_attr(not(feature = "transformers"), allow(dead_code))]

use super::activation::{FRAC_1_SQRT_2, erf_f32};
use super::*;

/// Added to the attention score of a padding key, as the composite form does.
const MASK_BIAS: f32 = -1e9;

/// What [`dense`] applies to `x Wᵀ + b (+ r)` before returning it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Epilogue<'a> {
    /// Nothing.
    None,
    /// Exact GELU `y Φ(y)`.
    Gelu,
    /// Layer norm over each row with these `γ`, `β` (length `m`) and `ε`.
    LayerNorm {
        /// Scale `γ`.
        gamma: &'a [f32],
        /// Shift `β`.
        beta: &'a [f32],
        /// Added to the variance.
        eps: f32,
    },
}

simd_fn! {
    /// `y = GELU(y)` in place.
    fn gelu_in_place(y: &mut [f32]) {
        for v in y.iter_mut() {
            *v = 0.5 * *v * (1.0 + erf_f32(*v * FRAC_1_SQRT_2));
        }
    }
}

simd_fn! {
    /// Layer norm of each row of width `gamma.len()` in place, biased variance.
    fn layer_norm_in_place(y: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
        let m = gamma.len();
        let inv_m = 1.0 / m as f32;
        for row in y.chunks_exact_mut(m) {
            let mean = sum(row) * inv_m;
            let mut var = [0.0f32; LANES];
            let chunks = row.chunks_exact(LANES);
            let tail: f32 = chunks.remainder().iter().map(|v| (v - mean) * (v - mean)).sum();
            for c in chunks {
                for k in 0..LANES {
                    var[k] += (c[k] - mean) * (c[k] - mean);
                }
            }
            let var = (var.iter().sum::<f32>() + tail) * inv_m;
            let inv_std = 1.0 / (var + eps).sqrt();
            for ((v, &g), &b) in row.iter_mut().zip(gamma).zip(beta) {
                *v = (*v - mean) * inv_std * g + b;
            }
        }
    }
}

simd_fn! {
    /// `y_i = r_i + b` for each row `y_i` of width `b.len()`.
    fn add_bias_into(r: &[f32], b: &[f32], y: &mut [f32]) {
        let m = b.len();
        for (yr, rr) in y.chunks_exact_mut(m).zip(r.chunks_exact(m)) {
            for ((o, &ri), &bi) in yr.iter_mut().zip(rr).zip(b) {
                *o = ri + bi;
            }
        }
    }
}

/// `y = epilogue(x Wᵀ + b (+ r))`; see the module docs.
pub(super) struct Dense<'a> {
    bias: &'a [f32],
    epilogue: Epilogue<'a>,
}

impl Dense<'_> {
    fn run(
        &self,
        x: Input<'_>,
        w: Input<'_>,
        residual: Option<Input<'_>>,
    ) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (n, k) = x.dims2()?;
        let (m, kw) = w.dims2()?;
        if kw != k || self.bias.len() != m {
            candle_core::bail!(
                "dense: input {:?}, weight {:?} and bias ({}) do not fit",
                x.dims,
                w.dims,
                self.bias.len()
            );
        }
        if let Epilogue::LayerNorm { gamma, beta, .. } = self.epilogue
            && (gamma.len() != m || beta.len() != m)
        {
            candle_core::bail!(
                "dense: layer norm of width {} after {m} outputs",
                gamma.len()
            );
        }
        let mut y = vec![0.0f32; n * m];
        if m == 0 {
            return Ok((y, Shape::from((n, m))));
        }
        match residual {
            Some(r) => {
                if r.dims2()? != (n, m) {
                    candle_core::bail!("dense: residual {:?} is not ({n}, {m})", r.dims);
                }
                add_bias_into(r.data, self.bias, &mut y);
            }
            None => y
                .chunks_exact_mut(m)
                .for_each(|row| row.copy_from_slice(self.bias)),
        }
        gemm_into(&mut y, x.data, w.data, n, m, k, false, true, true);
        match self.epilogue {
            Epilogue::None => {}
            Epilogue::Gelu => par_rows_mut(&mut y, m, gelu_in_place),
            Epilogue::LayerNorm { gamma, beta, eps } => par_rows_mut(&mut y, m, |rows| {
                layer_norm_in_place(rows, gamma, beta, eps)
            }),
        }
        Ok((y, Shape::from((n, m))))
    }
}

impl FusedOp<2> for Dense<'_> {
    const NAME: &'static str = "dense";

    fn forward(&self, [x, w]: [Input<'_>; 2]) -> candle_core::Result<(Vec<f32>, Shape)> {
        self.run(x, w, None)
    }
}

impl FusedOp<3> for Dense<'_> {
    const NAME: &'static str = "dense-residual";

    fn forward(&self, [x, w, r]: [Input<'_>; 3]) -> candle_core::Result<(Vec<f32>, Shape)> {
        self.run(x, w, Some(r))
    }
}

/// `epilogue(x Wᵀ + b (+ residual))` for `x: (n, k)`, `w: (m, k)`, `bias` and the layer
/// norm's parameters of length `m`: one op, no backward pass. An error where the tensors
/// are not f32 on the CPU or the shapes do not fit.
pub(crate) fn dense(
    x: &Tensor,
    w: &Tensor,
    bias: &[f32],
    residual: Option<&Tensor>,
    epilogue: Epilogue<'_>,
) -> Result<Tensor> {
    let op = Fused(Dense { bias, epilogue });
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let out = match residual {
        Some(r) => {
            check_applies(&[&x, &w, r], "dense")?;
            x.apply_op3_no_bwd(&w, &r.contiguous()?, &op)?
        }
        None => {
            check_applies(&[&x, &w], "dense")?;
            x.apply_op2_no_bwd(&w, &op)?
        }
    };
    Ok(out)
}

fn check_applies(tensors: &[&Tensor], op: &str) -> Result<()> {
    if applies(tensors) {
        Ok(())
    } else {
        Err(candle_core::Error::Msg(format!(
            "{op}: the fused kernel takes f32 tensors on the CPU"
        ))
        .into())
    }
}

/// Lanes of the register blocks in [`attend_into`] (one AVX2 register).
const BLOCK: usize = 8;

/// Scores of queries `i..i + R` of one head against every key block:
/// `s[r][j] = ⟨q_{i+r}, k_j⟩ · scale + bias_j`, `R` rows of `s` (each `lp` long). Key
/// blocks go two at a time: `2R` independent accumulator chains, each key load shared by
/// `R` rows and each query value by two blocks.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn score_rows<const R: usize>(
    qkv: &[f32],
    h3: usize,
    qo: usize,
    i: usize,
    kt: &[f32],
    d: usize,
    bias: &[f32],
    scale: f32,
    s: &mut [f32],
) {
    let lp = bias.len();
    let q: [&[f32]; R] = std::array::from_fn(|r| &qkv[(i + r) * h3 + qo..][..d]);
    let blocks = kt.len() / (d * BLOCK);
    let mut store = |jb: usize, acc: &[[f32; BLOCK]; R]| {
        let bb = &bias[jb * BLOCK..][..BLOCK];
        for (r, a) in acc.iter().enumerate() {
            let row = &mut s[r * lp + jb * BLOCK..][..BLOCK];
            for t in 0..BLOCK {
                row[t] = a[t] * scale + bb[t];
            }
        }
    };
    // The pair of blocks and the last single one are written out: a form generic over the
    // number of blocks per pass (a const parameter) made the MiniLM cache fill of the FAQ
    // bench 13 % slower with one thread (34.8 against 30.8 s).
    let mut jb = 0;
    while jb + 2 <= blocks {
        let k0 = &kt[jb * d * BLOCK..][..d * BLOCK];
        let k1 = &kt[(jb + 1) * d * BLOCK..][..d * BLOCK];
        let mut acc0 = [[0.0f32; BLOCK]; R];
        let mut acc1 = [[0.0f32; BLOCK]; R];
        for (c, (kc0, kc1)) in k0
            .chunks_exact(BLOCK)
            .zip(k1.chunks_exact(BLOCK))
            .enumerate()
        {
            for r in 0..R {
                let qc = q[r][c];
                for t in 0..BLOCK {
                    acc0[r][t] += qc * kc0[t];
                    acc1[r][t] += qc * kc1[t];
                }
            }
        }
        store(jb, &acc0);
        store(jb + 1, &acc1);
        jb += 2;
    }
    if jb < blocks {
        let kb = &kt[jb * d * BLOCK..][..d * BLOCK];
        let mut acc = [[0.0f32; BLOCK]; R];
        for (c, kc) in kb.chunks_exact(BLOCK).enumerate() {
            for r in 0..R {
                let qc = q[r][c];
                for t in 0..BLOCK {
                    acc[r][t] += qc * kc[t];
                }
            }
        }
        store(jb, &acc);
    }
}

/// Context columns `cb..cb + G·BLOCK` of queries `i..i + R` of one head:
/// `o_r = Σ_j p_{rj} v_j` over those columns, with `p` the head's probability rows (each
/// `lp` long, `l` real) and `vo` the first column's offset in a `qkv` row; written to
/// `out` rows `i..i + R` (stride `h`) from column `oo`. `R·G` independent accumulator
/// chains: each value load is shared by `R` rows, each probability by `G` blocks.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn context_rows<const R: usize, const G: usize>(
    p: &[f32],
    lp: usize,
    l: usize,
    i: usize,
    qkv: &[f32],
    h3: usize,
    vo: usize,
    out: &mut [f32],
    h: usize,
    oo: usize,
) {
    let rows: [&[f32]; R] = std::array::from_fn(|r| &p[(i + r) * lp..][..l]);
    let mut acc = [[[0.0f32; BLOCK]; G]; R];
    for (j, vrow) in qkv.chunks_exact(h3).take(l).enumerate() {
        let v = &vrow[vo..][..G * BLOCK];
        for r in 0..R {
            let pj = rows[r][j];
            for g in 0..G {
                for t in 0..BLOCK {
                    acc[r][g][t] += pj * v[g * BLOCK + t];
                }
            }
        }
    }
    for (r, ar) in acc.iter().enumerate() {
        for (g, a) in ar.iter().enumerate() {
            out[(i + r) * h + oo + g * BLOCK..][..BLOCK].copy_from_slice(a);
        }
    }
}

/// [`context_rows`] for queries `i..i + R` over all `d` columns of the head at `qo`
/// (value columns from `vo`): groups of four blocks, then single blocks.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn context_head<const R: usize>(
    p: &[f32],
    lp: usize,
    l: usize,
    i: usize,
    qkv: &[f32],
    h3: usize,
    (vo, qo, d): (usize, usize, usize),
    out: &mut [f32],
    h: usize,
) {
    let mut cb = 0;
    while cb + 4 * BLOCK <= d {
        context_rows::<R, 4>(p, lp, l, i, qkv, h3, vo + cb, out, h, qo + cb);
        cb += 4 * BLOCK;
    }
    while cb < d {
        context_rows::<R, 1>(p, lp, l, i, qkv, h3, vo + cb, out, h, qo + cb);
        cb += BLOCK;
    }
}

simd_fn! {
    /// One sequence's attention, every head: `qkv` is its `(L, 3H)` rows, `mask` its `L`
    /// mask values, `out` its `(L, H)` context rows. `H / heads` must be a multiple of
    /// [`BLOCK`] (the caller checks).
    fn attend_into(qkv: &[f32], mask: &[f32], heads: usize, scale: f32, out: &mut [f32]) {
        let l = mask.len();
        let h3 = qkv.len() / l;
        let h = h3 / 3;
        let d = h / heads;
        // Keys are padded to whole blocks: a padding lane scores −∞ and weighs 0.
        let lp = l.div_ceil(BLOCK) * BLOCK;
        let mut bias = vec![f32::NEG_INFINITY; lp];
        for (b, &m) in bias.iter_mut().zip(mask) {
            *b = (1.0 - m) * MASK_BIAS;
        }
        // One head's keys as (lp / BLOCK, d, BLOCK): a block of BLOCK scores is d
        // multiply-adds into one register, reading contiguous memory.
        let mut kt = vec![0.0f32; lp * d];
        // One head's scores, then probabilities, (L, lp).
        let mut s = vec![0.0f32; l * lp];
        for head in 0..heads {
            let (qo, ko, vo) = (head * d, h + head * d, 2 * h + head * d);
            for (j, row) in qkv.chunks_exact(h3).enumerate() {
                let block = &mut kt[(j / BLOCK) * d * BLOCK..][..d * BLOCK];
                for (c, &v) in row[ko..ko + d].iter().enumerate() {
                    block[c * BLOCK + j % BLOCK] = v;
                }
            }
            let mut i = 0;
            while i + 4 <= l {
                score_rows::<4>(qkv, h3, qo, i, &kt, d, &bias, scale, &mut s[i * lp..]);
                i += 4;
            }
            while i < l {
                score_rows::<1>(qkv, h3, qo, i, &kt, d, &bias, scale, &mut s[i * lp..]);
                i += 1;
            }
            for row in s.chunks_exact_mut(lp) {
                let mx = max(row);
                for sj in row.iter_mut() {
                    *sj = exp_f32(*sj - mx);
                }
                let inv = 1.0 / sum(row);
                row[..l].iter_mut().for_each(|pj| *pj *= inv);
            }
            let cols = (vo, qo, d);
            let mut i = 0;
            while i + 4 <= l {
                context_head::<4>(&s, lp, l, i, qkv, h3, cols, out, h);
                i += 4;
            }
            while i < l {
                context_head::<1>(&s, lp, l, i, qkv, h3, cols, out, h);
                i += 1;
            }
        }
    }
}

/// Multi-head attention over packed projections; see the module docs.
pub(super) struct Attention {
    heads: usize,
    scale: f32,
}

impl FusedOp<2> for Attention {
    const NAME: &'static str = "attention";

    fn forward(&self, [qkv, mask]: [Input<'_>; 2]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (n, h3) = qkv.dims2()?;
        let (b, l) = mask.dims2()?;
        let heads = self.heads;
        if n != b * l || h3 % 3 != 0 || heads == 0 || (h3 / 3) % (heads * BLOCK) != 0 {
            candle_core::bail!(
                "attention: packed projections {:?}, mask {:?} and {heads} heads do not fit \
                 (the head size must be a multiple of {BLOCK})",
                qkv.dims,
                mask.dims
            );
        }
        let h = h3 / 3;
        let mut out = vec![0.0f32; n * h];
        if n == 0 || h == 0 {
            return Ok((out, Shape::from((n, h))));
        }
        let one =
            |(o, (q, m)): (&mut [f32], (&[f32], &[f32]))| attend_into(q, m, heads, self.scale, o);
        if threads() > 1 && b > 1 {
            use rayon::prelude::*;
            out.par_chunks_mut(l * h)
                .zip(qkv.data.par_chunks(l * h3).zip(mask.data.par_chunks(l)))
                .for_each(one);
        } else {
            out.chunks_mut(l * h)
                .zip(qkv.data.chunks(l * h3).zip(mask.data.chunks(l)))
                .for_each(one);
        }
        Ok((out, Shape::from((n, h))))
    }
}

/// Whether [`attention`] takes heads of this size (a whole number of register blocks).
pub(crate) fn attention_takes_head_size(d: usize) -> bool {
    d > 0 && d.is_multiple_of(BLOCK)
}

/// Multi-head attention: `qkv (b·L, 3H)` packed `[Q | K | V]`, `mask (b, L)` with 1 for a
/// token and 0 for padding, scores scaled by `1/√d` → context `(b·L, H)`. One op, no
/// backward pass; an error where the tensors are not f32 on the CPU or do not fit.
pub(crate) fn attention(qkv: &Tensor, mask: &Tensor, heads: usize) -> Result<Tensor> {
    check_applies(&[qkv, mask], "attention")?;
    let d = qkv.dim(1)? / 3 / heads.max(1);
    // The composite form multiplies by the f64 scale, which Candle applies as f32.
    let scale = (1.0 / (d.max(1) as f64).sqrt()) as f32;
    let op = Fused(Attention { heads, scale });
    Ok(qkv
        .contiguous()?
        .apply_op2_no_bwd(&mask.contiguous()?, &op)?)
}
