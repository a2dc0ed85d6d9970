//! Fused f32 CPU kernels for the pieces of a training step that run every step of every
//! run: the cosine similarity matrix, the diagonal cross-entropy of
//! MultipleNegativesRankingLoss, and the Adam update.
//!
//! Why: Candle builds a loss from small tensor ops. On the CPU each op allocates and fills
//! its output, and each edge of the backward pass adds a zero-filled gradient buffer and an
//! addition (`GradStore::or_insert` + `add`). For a 256 × 384 batch that bookkeeping took
//! two thirds of a cached training step (BENCHMARKS.md). Here each piece is one Candle
//! custom op with a hand-written backward pass, so the graph holds one node where it held
//! ten, and the work is the matrix multiplications plus one pass over each matrix.
//!
//! The math, with `x: (n, d)`, `y: (m, d)`, row norms `‖x_i‖` and `ε = 1e-8`:
//!
//! ```text
//! cosine:   x̂_i = x_i / max(‖x_i‖, ε)            S = x̂ ŷᵀ               (n, m)
//!           given G = ∂L/∂S:  ∂L/∂x̂ = G ŷ,  ∂L/∂ŷ = Gᵀ x̂   (y = x: ∂L/∂x̂ = (G + Gᵀ) x̂)
//!           ∂L/∂x_i = (∂x̂_i − x̂_i ⟨x̂_i, ∂x̂_i⟩) / ‖x_i‖     (‖x_i‖ > ε)
//!                   = ∂x̂_i / ε                             (‖x_i‖ ≤ ε, the norm is clamped)
//! diag CE:  L = mean_i (lse_j Z_ij − Z_ii)                      rows only
//!           L = ½ mean_i lse_j Z_ij + ½ mean_j lse_i Z_ij − mean_i Z_ii   symmetric
//!           ∂L/∂Z = (softmax_rows(Z) − I) / n   (symmetric: ½ softmax_rows + ½ softmax_cols − I, / n)
//! Adam:     m ← β₁m + (1−β₁)g,  v ← β₂v + (1−β₂)g²,
//!           θ ← θ·(1 − lr·wd if AdamW) − lr · (m / (1−β₁ᵗ)) / (sqrt(v / (1−β₂ᵗ)) + eps)
//! ```
//!
//! Each entry point returns `None` where it does not apply (another device or dtype); the
//! caller then uses the composite Candle form, which stays the reference: the tests check
//! that both give the same values and gradients.

use std::sync::Mutex;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, InplaceOp2, Layout, Shape, Tensor,
    utils::get_num_threads,
};

use crate::error::Result;

/// `max(‖x‖, NORM_EPS)` is the row norm cosine divides by (as `distance::normalize`).
const NORM_EPS: f32 = 1e-8;

/// Whether the fused kernels apply to these tensors: f32 on the CPU.
fn applies(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// The f32 data of a CPU storage as a row-major slice of its layout, which must be
/// contiguous (the entry points make it so).
fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &'static str) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: input is not contiguous"),
    }
}

/// `dst (m × n) = lhs (m × k) · rhs`, all row-major; `rhs_t` says whether `rhs` is stored as
/// its transpose `(n × k)` (then `dst = lhs · rhsᵀ`) or as `(k × n)`. `accumulate` adds to
/// `dst` instead of overwriting it.
#[allow(clippy::too_many_arguments)]
fn gemm(
    dst: &mut [f32],
    lhs: &[f32],
    rhs: &[f32],
    m: usize,
    n: usize,
    k: usize,
    lhs_t: bool,
    rhs_t: bool,
) {
    debug_assert_eq!(dst.len(), m * n);
    debug_assert_eq!(lhs.len(), m * k);
    debug_assert_eq!(rhs.len(), k * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        dst.fill(0.0);
        return;
    }
    // Candle's `get_num_threads` re-reads /proc/cpuinfo on every call unless
    // RAYON_NUM_THREADS is set; the count does not change while a process runs.
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let threads = *THREADS.get_or_init(get_num_threads);
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // Row-major (r × c): row stride c, column stride 1; a stored transpose swaps them.
    let (lhs_rs, lhs_cs) = if lhs_t {
        (1, m as isize)
    } else {
        (k as isize, 1)
    };
    let (rhs_rs, rhs_cs) = if rhs_t {
        (1, k as isize)
    } else {
        (n as isize, 1)
    };
    // SAFETY: the pointers cover m·k, k·n and m·n elements (asserted above) and the strides
    // stay inside them; dst does not alias the inputs (it is a fresh &mut slice).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Defines `fn $name(..) -> ..` twice, once compiled for AVX2 + FMA and once for the
/// baseline, and picks the AVX2 one at run time where the CPU has it (the check is a cached
/// atomic load). The bodies are the same code, and Rust never contracts `a * b + c` into an
/// FMA on its own, so both give bit-identical results; AVX2 only widens the vector loops
/// (the crate is built for baseline x86-64, whose SSE2 is 4 lanes wide).
macro_rules! simd_fn {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn wide($($arg: $ty),*) $(-> $ret)? $body
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features `wide` is compiled for.
                    return unsafe { wide($($arg),*) };
                }
            }
            fn baseline($($arg: $ty),*) $(-> $ret)? $body
            baseline($($arg),*)
        }
    };
}

/// Lanes of the explicit vector accumulators below (16 f32: two AVX2 registers).
const LANES: usize = 16;

/// `Σ aᵢ` with independent partial sums, so that it vectorises.
#[inline(always)]
fn sum(a: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = a.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for k in 0..LANES {
            acc[k] += c[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `max aᵢ` (`−∞` for an empty slice), vectorised like [`sum`].
#[inline(always)]
fn max(a: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = a.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for k in 0..LANES {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
        }
    }
    acc.iter().copied().fold(tail, f32::max)
}

/// `Σ aᵢbᵢ` with independent partial sums, so that it vectorises (a plain iterator sum of
/// floats must keep its order and stays scalar).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..LANES {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Row norms `‖x_i‖` (unclamped) and the normalised rows `x̂ = x / max(‖x‖, ε)` of a
/// row-major `(rows × d)` matrix.
fn normalize_rows(x: &[f32], d: usize) -> (Vec<f32>, Vec<f32>) {
    let mut norms = vec![0.0f32; x.len().checked_div(d).unwrap_or(0)];
    let mut unit = vec![0.0f32; x.len()];
    normalize_rows_into(x, d, &mut norms, &mut unit);
    (norms, unit)
}

simd_fn! {
    /// [`normalize_rows`] into given buffers.
    fn normalize_rows_into(x: &[f32], d: usize, norms: &mut [f32], unit: &mut [f32]) {
        let d = d.max(1);
        for ((row, out), n) in x.chunks_exact(d).zip(unit.chunks_exact_mut(d)).zip(norms) {
            let norm = dot(row, row).sqrt();
            *n = norm;
            let inv = 1.0 / norm.max(NORM_EPS);
            for (o, v) in out.iter_mut().zip(row) {
                *o = v * inv;
            }
        }
    }
}

simd_fn! {
    /// `1 / max(‖y_j‖, ε)` for every row of a row-major `(rows × d)` matrix.
    fn inverse_norms(y: &[f32], d: usize) -> Vec<f32> {
        y.chunks_exact(d.max(1))
            .map(|row| 1.0 / dot(row, row).sqrt().max(NORM_EPS))
            .collect()
    }
}

simd_fn! {
    /// `∂L/∂x` from `∂L/∂x̂` (in place), see the module docs.
    fn normalize_backward(grad: &mut [f32], unit: &[f32], norms: &[f32], d: usize) {
        let d = d.max(1);
        for ((g, u), &norm) in grad.chunks_exact_mut(d).zip(unit.chunks_exact(d)).zip(norms) {
            if norm > NORM_EPS {
                let proj = dot(g, u);
                let inv = 1.0 / norm;
                for (gi, ui) in g.iter_mut().zip(u) {
                    *gi = (*gi - ui * proj) * inv;
                }
            } else {
                let inv = 1.0 / NORM_EPS;
                g.iter_mut().for_each(|gi| *gi *= inv);
            }
        }
    }
}

/// `S = x̂ x̂ᵀ` (one input) or `S = x̂ ŷᵀ` (two inputs).
struct CosineMatrix;

impl CustomOp1 for CosineMatrix {
    fn name(&self) -> &'static str {
        "cosine-matrix"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, d) = l.shape().dims2()?;
        let x = slice(s, l, "cosine-matrix")?;
        let (_, unit) = normalize_rows(x, d);
        let mut out = vec![0.0f32; n * n];
        gemm(&mut out, &unit, &unit, n, n, d, false, true);
        Ok((CpuStorage::F32(out), Shape::from((n, n))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &grad.contiguous()?,
            &CosineSelfBackward,
        )?))
    }
}

impl CustomOp2 for CosineMatrix {
    fn name(&self) -> &'static str {
        "cosine-matrix"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, d) = l1.shape().dims2()?;
        let (m, _) = l2.shape().dims2()?;
        let (_, xu) = normalize_rows(slice(s1, l1, "cosine-matrix")?, d);
        let (_, yu) = normalize_rows(slice(s2, l2, "cosine-matrix")?, d);
        let mut out = vec![0.0f32; n * m];
        gemm(&mut out, &xu, &yu, n, m, d, false, true);
        Ok((CpuStorage::F32(out), Shape::from((n, m))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // A side that is not part of the graph (a detached memory bank) gets no gradient,
        // which saves its matrix product.
        let gx = if x.track_op() {
            Some(x.apply_op3_no_bwd(y, &grad, &CosineCrossBackward { lhs: true })?)
        } else {
            None
        };
        let gy = if y.track_op() {
            Some(y.apply_op3_no_bwd(x, &grad, &CosineCrossBackward { lhs: false })?)
        } else {
            None
        };
        Ok((gx, gy))
    }
}

/// `∂L/∂x` of `S = x̂ x̂ᵀ` given `G`: `normalize_backward((G + Gᵀ) x̂)`.
struct CosineSelfBackward;

impl CustomOp2 for CosineSelfBackward {
    fn name(&self) -> &'static str {
        "cosine-matrix-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, d) = l1.shape().dims2()?;
        let (norms, unit) = normalize_rows(slice(s1, l1, self.name())?, d);
        let g = slice(s2, l2, self.name())?;
        let mut sym = vec![0.0f32; n * n];
        for i in 0..n {
            for j in 0..n {
                sym[i * n + j] = g[i * n + j] + g[j * n + i];
            }
        }
        let mut out = vec![0.0f32; n * d];
        gemm(&mut out, &sym, &unit, n, d, n, false, false);
        normalize_backward(&mut out, &unit, &norms, d);
        Ok((CpuStorage::F32(out), Shape::from((n, d))))
    }
}

/// `∂L/∂x` (lhs) or `∂L/∂y` of `S = x̂ ŷᵀ` given `G`; the first input is the side whose
/// gradient is computed, the second the other side.
struct CosineCrossBackward {
    lhs: bool,
}

impl candle_core::CustomOp3 for CosineCrossBackward {
    fn name(&self) -> &'static str {
        "cosine-matrix-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, d) = l1.shape().dims2()?;
        let (other, _) = l2.shape().dims2()?;
        let (norms, unit) = normalize_rows(slice(s1, l1, self.name())?, d);
        let (_, other_unit) = normalize_rows(slice(s2, l2, self.name())?, d);
        let g = slice(s3, l3, self.name())?;
        let mut out = vec![0.0f32; rows * d];
        // lhs: G (rows × other) · ŷ; rhs: Gᵀ (G stored as other × rows) · x̂.
        gemm(&mut out, g, &other_unit, rows, d, other, !self.lhs, false);
        normalize_backward(&mut out, &unit, &norms, d);
        Ok((CpuStorage::F32(out), Shape::from((rows, d))))
    }
}

/// The cosine similarity matrix `x̂ ŷᵀ` (`y = None`: `x̂ x̂ᵀ`) as one fused op, or `None`
/// where the kernel does not apply. Shapes are checked by the caller.
pub(crate) fn cosine_similarity_matrix(x: &Tensor, y: Option<&Tensor>) -> Result<Option<Tensor>> {
    if !applies(&[x]) || !y.is_none_or(|y| applies(&[y])) {
        return Ok(None);
    }
    let x = x.contiguous()?;
    Ok(Some(match y {
        None => x.apply_op1(CosineMatrix)?,
        Some(y) => x.apply_op2(&y.contiguous()?, CosineMatrix)?,
    }))
}

/// Fast `eˣ` for f32, within 2 ulp on the range where the result is a normal number, `0`
/// below it: Cody–Waite range reduction `x = k·ln2 + r` and a degree-6 polynomial for
/// `eʳ`, written so that loops over slices vectorise.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.336_55, 88.376_26);
    // Round to nearest by the 1.5·2²³ trick (`f32::round` is a libm call on baseline
    // x86-64 and would stop the vectorisation).
    const ROUND: f32 = 12_582_912.0;
    let k = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (0.166_666_67
                    + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_889)))));
    // 2^k by the exponent bits; k is in [-126, 127] after the clamp.
    p * f32::from_bits(((k as i32 + 127) as u32) << 23)
}

simd_fn! {
    /// Row-wise `p = w · softmax(z)` of a row-major `(n × n)` matrix; returns `Σ_i lse_i`.
    fn softmax_rows(z: &[f32], n: usize, w: f32, p: &mut [f32]) -> f64 {
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
    fn add_softmax_columns(z: &[f32], n: usize, w: f32, p: &mut [f32]) -> f64 {
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

/// Mean diagonal cross-entropy of a square logit matrix, rows (and columns when
/// symmetric), as one op: see the module docs.
struct DiagonalCrossEntropy {
    symmetric: bool,
    /// The softmax-normalised gradient factor, `(½ if symmetric) P_rows + (½) P_cols − I`,
    /// computed in the forward pass for the backward one.
    grad: Mutex<Option<Tensor>>,
}

impl CustomOp1 for DiagonalCrossEntropy {
    fn name(&self) -> &'static str {
        "diagonal-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, m) = l.shape().dims2()?;
        if n != m {
            candle_core::bail!("diagonal-cross-entropy: logits must be square, got ({n}, {m})");
        }
        let z = slice(s, l, self.name())?;
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
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(&self, z: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let n = z.dim(0)?;
        let p = self
            .grad
            .lock()
            .expect("diagonal-cross-entropy state")
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("diagonal-cross-entropy: no forward".into()))?;
        let scale = f64::from(grad.to_scalar::<f32>()?) / n as f64;
        Ok(Some(p.affine(scale, 0.0)?))
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
    Ok(Some(logits.contiguous()?.apply_op1(op)?))
}

/// Hyper-parameters of one Adam/AdamW update.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled (AdamW) or L2 (Adam) weight decay.
    pub weight_decay: f32,
    pub decoupled: bool,
    /// `1 − β₁ᵗ` and `1 − β₂ᵗ`.
    pub bias1: f32,
    pub bias2: f32,
    /// Factor on the gradient (clipping).
    pub grad_scale: f32,
}

/// The Adam update of one variable in place, moments kept in host vectors.
struct AdamKernel<'a> {
    step: AdamStep,
    moments: Mutex<(&'a mut [f32], &'a mut [f32])>,
}

impl InplaceOp2 for AdamKernel<'_> {
    fn name(&self) -> &'static str {
        "adam-step"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let g = slice(s2, l2, self.name())?;
        let Some((start, end)) = l1.contiguous_offsets() else {
            candle_core::bail!("adam-step: the variable is not contiguous")
        };
        let CpuStorage::F32(theta) = s1 else {
            candle_core::bail!("adam-step: the variable is not f32")
        };
        let theta = &mut theta[start..end];
        let mut guard = self.moments.lock().expect("adam-step moments");
        let (m, v) = &mut *guard;
        if theta.len() != g.len() || m.len() != g.len() || v.len() != g.len() {
            candle_core::bail!("adam-step: variable, gradient and moments differ in size");
        }
        let s = self.step;
        let (c1, c2) = (1.0 - s.beta1, 1.0 - s.beta2);
        let decay = if s.decoupled {
            1.0 - s.lr * s.weight_decay
        } else {
            1.0
        };
        let l2 = if s.decoupled { 0.0 } else { s.weight_decay };
        let (inv1, inv2) = (1.0 / s.bias1, 1.0 / s.bias2);
        for (((t, &gi), mi), vi) in theta.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let gi = gi * s.grad_scale + l2 * *t;
            *mi = s.beta1 * *mi + c1 * gi;
            *vi = s.beta2 * *vi + c2 * gi * gi;
            let update = (*mi * inv1) / ((*vi * inv2).sqrt() + s.eps);
            *t = *t * decay - s.lr * update;
        }
        Ok(())
    }
}

/// Applies one Adam update to `var` in place with host-side moments `m`, `v` (as long as
/// the variable). Returns `false` (and changes nothing) where the kernel does not apply.
pub(crate) fn adam_step(
    var: &Tensor,
    grad: &Tensor,
    m: &mut [f32],
    v: &mut [f32],
    step: AdamStep,
) -> Result<bool> {
    if !applies(&[var, grad]) || !var.is_contiguous() || m.len() != var.elem_count() {
        return Ok(false);
    }
    let grad = grad.contiguous()?;
    let kernel = AdamKernel {
        step,
        moments: Mutex::new((m, v)),
    };
    var.inplace_op2(&grad, &kernel)?;
    Ok(true)
}

/// Whether the Adam kernel can update `var` (f32, contiguous, on the CPU).
pub(crate) fn adam_applies(var: &Tensor) -> bool {
    applies(&[var]) && var.is_contiguous()
}

/// What the backward pass of a [`SkipLayer`] needs from its forward pass.
struct SkipCache {
    /// `z = x Wᵀ + b`, `(n, d)`.
    z: Vec<f32>,
    /// `σ(gate)`, `(d)`.
    s: Vec<f32>,
}

/// One gated residual block of SkipConnectionHead, `y = x + (x Wᵀ + b) ⊙ σ(gate)`, over
/// `(x: (n, d), W: (d, d), [b; gate]: (2, d))`.
struct SkipLayer {
    cache: Mutex<Option<std::sync::Arc<SkipCache>>>,
}

impl candle_core::CustomOp3 for SkipLayer {
    fn name(&self) -> &'static str {
        "skip-connection-layer"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, d) = l1.shape().dims2()?;
        let x = slice(s1, l1, self.name())?;
        let w = slice(s2, l2, self.name())?;
        let bg = slice(s3, l3, self.name())?;
        let (b, gate) = bg.split_at(d);
        let s: Vec<f32> = gate.iter().map(|&g| 1.0 / (1.0 + exp_f32(-g))).collect();
        let mut z = vec![0.0f32; n * d];
        gemm(&mut z, x, w, n, d, d, false, true);
        let mut y = vec![0.0f32; n * d];
        for ((zr, yr), xr) in z
            .chunks_exact_mut(d)
            .zip(y.chunks_exact_mut(d))
            .zip(x.chunks_exact(d))
        {
            for j in 0..d {
                zr[j] += b[j];
                yr[j] = xr[j] + zr[j] * s[j];
            }
        }
        *self.cache.lock().expect("skip-connection-layer state") =
            Some(std::sync::Arc::new(SkipCache { z, s }));
        Ok((CpuStorage::F32(y), Shape::from((n, d))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _bg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let cache = self
            .cache
            .lock()
            .expect("skip-connection-layer state")
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("skip-connection-layer: no forward".into()))?;
        let (n, d) = x.dims2()?;
        let with_x = x.track_op();
        let packed =
            x.apply_op3_no_bwd(w, &grad.contiguous()?, &SkipLayerBackward { cache, with_x })?;
        let gw = packed.narrow(0, 0, d * d)?.reshape((d, d))?;
        let gbg = packed.narrow(0, d * d, 2 * d)?.reshape((2, d))?;
        let gx = if with_x {
            Some(packed.narrow(0, d * d + 2 * d, n * d)?.reshape((n, d))?)
        } else {
            None
        };
        Ok((gx, Some(gw), Some(gbg)))
    }
}

/// The gradients of a [`SkipLayer`] from `(x, W, G)`, packed flat as
/// `[∂W (d·d) | ∂b (d) | ∂gate (d) | ∂x (n·d), when asked for]`:
///
/// ```text
/// Gs = G ⊙ σ(gate)    ∂W = Gsᵀ x    ∂b = Σ_rows Gs    ∂gate = Σ_rows (G ⊙ z) ⊙ σ(1 − σ)
/// ∂x = G + Gs W
/// ```
struct SkipLayerBackward {
    cache: std::sync::Arc<SkipCache>,
    with_x: bool,
}

impl candle_core::CustomOp3 for SkipLayerBackward {
    fn name(&self) -> &'static str {
        "skip-connection-layer-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, d) = l1.shape().dims2()?;
        let x = slice(s1, l1, self.name())?;
        let w = slice(s2, l2, self.name())?;
        let g = slice(s3, l3, self.name())?;
        let SkipCache { z, s } = &*self.cache;
        let total = d * d + 2 * d + if self.with_x { n * d } else { 0 };
        let mut out = vec![0.0f32; total];
        let (gw, rest) = out.split_at_mut(d * d);
        let (gbg, gx) = rest.split_at_mut(2 * d);
        let (gb, ggate) = gbg.split_at_mut(d);
        let mut gs = vec![0.0f32; n * d];
        for ((gsr, gr), zr) in gs
            .chunks_exact_mut(d)
            .zip(g.chunks_exact(d))
            .zip(z.chunks_exact(d))
        {
            for j in 0..d {
                gsr[j] = gr[j] * s[j];
                gb[j] += gsr[j];
                ggate[j] += gr[j] * zr[j];
            }
        }
        for (gg, &sj) in ggate.iter_mut().zip(s) {
            *gg *= sj * (1.0 - sj);
        }
        // ∂W (d × d) = Gsᵀ (d × n) · x (n × d).
        gemm(gw, &gs, x, d, d, n, true, false);
        if self.with_x {
            // ∂x = Gs (n × d) · W (d × d) + G.
            gemm(gx, &gs, w, n, d, d, false, false);
            for (o, &gi) in gx.iter_mut().zip(g) {
                *o += gi;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(total)))
    }
}

/// One SkipConnectionHead block `x + (x Wᵀ + b) ⊙ σ(gate)` as one fused op, or `None`
/// where the kernel does not apply.
pub(crate) fn skip_connection_layer(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    gate: &Tensor,
) -> Result<Option<Tensor>> {
    if !applies(&[x, weight, bias, gate]) {
        return Ok(None);
    }
    let bg = Tensor::stack(&[bias, gate], 0)?;
    let op = SkipLayer {
        cache: Mutex::new(None),
    };
    Ok(Some(x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bg,
        op,
    )?))
}

/// Group masks (see `loss::masks`) as f32 `{0, 1}` matrices built in one pass, or `None`
/// where this does not apply (another device, dtype or id type).
pub(crate) fn group_masks(
    a: &Tensor,
    b: Option<&Tensor>,
    dtype: DType,
) -> Result<Option<(Tensor, Tensor)>> {
    if dtype != DType::F32
        || !a.device().is_cpu()
        || a.dtype() != DType::I64
        || b.is_some_and(|b| b.dtype() != DType::I64)
    {
        return Ok(None);
    }
    let ga = a.to_vec1::<i64>()?;
    let gb = match b {
        Some(b) => b.to_vec1::<i64>()?,
        None => ga.clone(),
    };
    let (n, m) = (ga.len(), gb.len());
    let mut pos = vec![0.0f32; n * m];
    let mut neg = vec![0.0f32; n * m];
    for (i, &gi) in ga.iter().enumerate() {
        let (pr, nr) = (&mut pos[i * m..(i + 1) * m], &mut neg[i * m..(i + 1) * m]);
        for ((p, q), &gj) in pr.iter_mut().zip(nr.iter_mut()).zip(&gb) {
            let same = gi == gj;
            *p = f32::from(u8::from(same));
            *q = f32::from(u8::from(!same));
        }
        if b.is_none() {
            pr[i] = 0.0;
        }
    }
    Ok(Some((
        Tensor::from_vec(pos, (n, m), a.device())?,
        Tensor::from_vec(neg, (n, m), a.device())?,
    )))
}

/// Batch-hard mining on a distance matrix `d: (n, m)` with group ids `a: (n)` and `b: (m)`
/// (`b = None`: `a` itself, the anchor excluded from its positives), in one pass:
/// for each anchor the column of its farthest positive and of its nearest negative
/// (`(n, 1)`, u32; the first on ties, column 0 when there is none) and whether it has both
/// (`(n)`, `{0, 1}` in d's dtype). `None` where this does not apply.
pub(crate) fn hardest_pairs(
    d: &Tensor,
    a: &Tensor,
    b: Option<&Tensor>,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    if !applies(&[d]) || a.dtype() != DType::I64 || b.is_some_and(|b| b.dtype() != DType::I64) {
        return Ok(None);
    }
    let (n, m) = d.dims2()?;
    let ga = a.to_vec1::<i64>()?;
    let gb = match b {
        Some(b) => b.to_vec1::<i64>()?,
        None => ga.clone(),
    };
    let (ga, gb) = dense_groups(&ga, &gb);
    let dv = d.detach().contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    // Closeness is −d: the farthest positive has the smallest, the nearest negative the
    // largest.
    let flip = vec![-1.0f32; m];
    let (mut pos_idx, mut neg_idx, mut valid) = (vec![0u32; n], vec![0u32; n], vec![0f32; n]);
    for i in 0..n {
        let skip = b.is_none().then_some(i);
        if let Some((p, q)) = mine_row(&dv[i * m..(i + 1) * m], &flip, ga[i], &gb, skip) {
            pos_idx[i] = p;
            neg_idx[i] = q;
            valid[i] = 1.0;
        }
    }
    let dev = d.device();
    Ok(Some((
        Tensor::from_vec(pos_idx, (n, 1), dev)?,
        Tensor::from_vec(neg_idx, (n, 1), dev)?,
        Tensor::from_vec(valid, n, dev)?,
    )))
}

/// `s_ik = x̂_i · ŷ_{idx_ik}` for a few chosen columns per row, over `(x: (n, d), y: (m, d))`
/// with the column indices kept in the op.
struct CosinePairs {
    idx: std::sync::Arc<Vec<u32>>,
    k: usize,
}

impl CosinePairs {
    fn check(&self, n: usize, m: usize) -> candle_core::Result<()> {
        if self.idx.len() != n * self.k || self.idx.iter().any(|&j| j as usize >= m) {
            candle_core::bail!("cosine-pairs: indices do not fit ({n}, {m})");
        }
        Ok(())
    }
}

impl CustomOp2 for CosinePairs {
    fn name(&self) -> &'static str {
        "cosine-pairs"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, d) = l1.shape().dims2()?;
        let (m, _) = l2.shape().dims2()?;
        self.check(n, m)?;
        let (x, y) = (
            slice(s1, l1, "cosine-pairs")?,
            slice(s2, l2, "cosine-pairs")?,
        );
        let (_, xu) = normalize_rows(x, d);
        let mut out = Vec::with_capacity(n * self.k);
        for (i, cols) in self.idx.chunks_exact(self.k.max(1)).enumerate().take(n) {
            let xi = &xu[i * d..(i + 1) * d];
            for &j in cols {
                let yj = &y[j as usize * d..(j as usize + 1) * d];
                let norm = dot(yj, yj).sqrt().max(NORM_EPS);
                out.push(dot(xi, yj) / norm);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((n, self.k))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (with_x, with_y) = (x.track_op(), y.track_op());
        if !with_x && !with_y {
            return Ok((None, None));
        }
        let (n, d) = x.dims2()?;
        let (m, _) = y.dims2()?;
        let packed = x.apply_op3_no_bwd(
            y,
            &grad.contiguous()?,
            &CosinePairsBackward {
                idx: self.idx.clone(),
                k: self.k,
                with_y,
            },
        )?;
        let gx = with_x.then(|| packed.narrow(0, 0, n * d)?.reshape((n, d)));
        let gy = with_y.then(|| packed.narrow(0, n * d, m * d)?.reshape((m, d)));
        Ok((gx.transpose()?, gy.transpose()?))
    }
}

/// The gradients of [`CosinePairs`], packed flat as `[∂x (n·d) | ∂y (m·d), when asked for]`:
/// `∂x̂_i = Σ_k G_ik ŷ_{idx_ik}`, `∂ŷ_j = Σ_{idx_ik = j} G_ik x̂_i`, then each through the
/// normalisation (module docs). `O((n·k + m)·d)`: no `n × m` matrix.
struct CosinePairsBackward {
    idx: std::sync::Arc<Vec<u32>>,
    k: usize,
    with_y: bool,
}

impl candle_core::CustomOp3 for CosinePairsBackward {
    fn name(&self) -> &'static str {
        "cosine-pairs-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, d) = l1.shape().dims2()?;
        let (m, _) = l2.shape().dims2()?;
        let (xn, xu) = normalize_rows(slice(s1, l1, self.name())?, d);
        let y = slice(s2, l2, self.name())?;
        // Without ∂y only the chosen rows of ŷ are needed (a memory bank has many more).
        let (yn, yu) = if self.with_y {
            normalize_rows(y, d)
        } else {
            let mut yu = vec![0.0f32; m * d];
            let mut done = vec![false; m];
            for &j in self.idx.iter() {
                let j = j as usize;
                if !std::mem::replace(&mut done[j], true) {
                    let row = &y[j * d..(j + 1) * d];
                    let inv = 1.0 / dot(row, row).sqrt().max(NORM_EPS);
                    for (o, v) in yu[j * d..(j + 1) * d].iter_mut().zip(row) {
                        *o = v * inv;
                    }
                }
            }
            (Vec::new(), yu)
        };
        let g = slice(s3, l3, self.name())?;
        let total = n * d + if self.with_y { m * d } else { 0 };
        let mut out = vec![0.0f32; total];
        let (gx, gy) = out.split_at_mut(n * d);
        for (i, cols) in self.idx.chunks_exact(self.k.max(1)).enumerate().take(n) {
            for (kk, &j) in cols.iter().enumerate() {
                let gik = g[i * self.k + kk];
                if gik == 0.0 {
                    continue;
                }
                let j = j as usize;
                let (xi, yj) = (&xu[i * d..(i + 1) * d], &yu[j * d..(j + 1) * d]);
                for (o, &v) in gx[i * d..(i + 1) * d].iter_mut().zip(yj) {
                    *o += gik * v;
                }
                if self.with_y {
                    for (o, &v) in gy[j * d..(j + 1) * d].iter_mut().zip(xi) {
                        *o += gik * v;
                    }
                }
            }
        }
        normalize_backward(gx, &xu, &xn, d);
        if self.with_y {
            normalize_backward(gy, &yu, &yn, d);
        }
        Ok((CpuStorage::F32(out), Shape::from(total)))
    }
}

/// `s_ik = cos(x_i, y_{idx_ik})` for `idx: (n, k)` column indices into `y: (m, d)`, as one
/// op whose backward pass touches only the chosen rows; `None` where the kernel does not
/// apply.
pub(crate) fn cosine_pairs(x: &Tensor, y: &Tensor, idx: &Tensor) -> Result<Option<Tensor>> {
    if !applies(&[x, y]) {
        return Ok(None);
    }
    let (n, k) = idx.dims2()?;
    let cols = idx.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?;
    let op = CosinePairs {
        idx: std::sync::Arc::new(cols),
        k,
    };
    if x.dim(0)? != n {
        return Err(crate::error::Error::shape(
            "cosine_pairs",
            format!("({}, k) indices", x.dim(0)?),
            idx.dims(),
        ));
    }
    Ok(Some(x.contiguous()?.apply_op2(&y.contiguous()?, op)?))
}

/// Dense `i32` ids for the group ids of both sides (so that the mining passes compare
/// 32-bit lanes), in order: `a` then `b`.
fn dense_groups(a: &[i64], b: &[i64]) -> (Vec<i32>, Vec<i32>) {
    let mut ids = std::collections::HashMap::with_capacity(a.len() + b.len());
    let mut dense = |g: &i64| {
        let next = ids.len() as i32;
        *ids.entry(*g).or_insert(next)
    };
    let da = a.iter().map(&mut dense).collect();
    let db = b.iter().map(&mut dense).collect();
    (da, db)
}

simd_fn! {
    /// For one row of raw products `s` with per-column scales `inv` (cosine: `x̂_i · y_j`
    /// and `1 / ‖y_j‖`, so `s_j · inv_j` is the cosine) and the row's group `g` against the
    /// column groups `gb`: the column of the farthest same-group entry (smallest cosine) and
    /// of the closest other-group entry (largest), the first on ties, never column `skip`.
    /// `None` when the row has no positive or no negative.
    fn mine_row(s: &[f32], inv: &[f32], g: i32, gb: &[i32], skip: Option<usize>) -> Option<(u32, u32)> {
        let mut pmin = [f32::INFINITY; LANES];
        let mut nmax = [f32::NEG_INFINITY; LANES];
        let (sc, ic, gc) = (s.chunks_exact(LANES), inv.chunks_exact(LANES), gb.chunks_exact(LANES));
        let (sr, ir, gr) = (sc.remainder(), ic.remainder(), gc.remainder());
        for ((sv, iv), gv) in sc.zip(ic).zip(gc) {
            for l in 0..LANES {
                let c = sv[l] * iv[l];
                let same = gv[l] == g;
                pmin[l] = if same && c < pmin[l] { c } else { pmin[l] };
                nmax[l] = if !same && c > nmax[l] { c } else { nmax[l] };
            }
        }
        let mut pbest = pmin.iter().copied().fold(f32::INFINITY, f32::min);
        let mut nbest = nmax.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for ((&v, &iv), &gv) in sr.iter().zip(ir).zip(gr) {
            let c = v * iv;
            if gv == g {
                pbest = pbest.min(c);
            } else {
                nbest = nbest.max(c);
            }
        }
        // The skipped column (the anchor itself) may have set the positive minimum: then
        // search the positives again without it.
        if let Some(k) = skip
            && k < s.len()
            && gb[k] == g
            && s[k] * inv[k] <= pbest
        {
            pbest = f32::INFINITY;
            for (j, ((&v, &iv), &gv)) in s.iter().zip(inv).zip(gb).enumerate() {
                if gv == g && j != k {
                    pbest = pbest.min(v * iv);
                }
            }
        }
        if !pbest.is_finite() || !nbest.is_finite() {
            return None;
        }
        let mut cols = s.iter().zip(inv).zip(gb).enumerate();
        let p = cols
            .clone()
            .position(|(j, ((&v, &iv), &gv))| gv == g && Some(j) != skip && v * iv == pbest)?;
        let q = cols.position(|(_, ((&v, &iv), &gv))| gv != g && v * iv == nbest)?;
        Some((p as u32, q as u32))
    }
}

/// Batch-hard cosine mining without a similarity matrix in the graph: `x̂ ŷᵀ` is computed
/// into a scratch buffer in blocks of rows and mined as it goes. Output `(n, 3)` f32:
/// positive column, negative column, valid.
struct CosineMine {
    ga: Vec<i32>,
    gb: Vec<i32>,
    self_excluded: bool,
}

impl CustomOp2 for CosineMine {
    fn name(&self) -> &'static str {
        "cosine-mine"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, d) = l1.shape().dims2()?;
        let (m, _) = l2.shape().dims2()?;
        let (_, xu) = normalize_rows(slice(s1, l1, "cosine-mine")?, d);
        let y = slice(s2, l2, "cosine-mine")?;
        // x̂ · y_j scaled by 1 / ‖y_j‖ inside the mining pass: ŷ is never written.
        let inv = inverse_norms(y, d);
        // Rows per block. Each gemm call packs all of y, so blocks are large: up to 16 MB
        // of products per block (whole batches against a 4,096-row memory).
        let block = (4_194_304 / m.max(1)).clamp(16, n.max(16));
        let mut out = vec![0.0f32; n * 3];
        let mut scratch = vec![0.0f32; block.min(n) * m];
        for start in (0..n).step_by(block) {
            let rows = block.min(n - start);
            let sims = &mut scratch[..rows * m];
            gemm(
                sims,
                &xu[start * d..(start + rows) * d],
                y,
                rows,
                m,
                d,
                false,
                true,
            );
            for r in 0..rows {
                let i = start + r;
                let skip = self.self_excluded.then_some(i);
                if let Some((p, q)) =
                    mine_row(&sims[r * m..(r + 1) * m], &inv, self.ga[i], &self.gb, skip)
                {
                    out[i * 3..i * 3 + 3].copy_from_slice(&[p as f32, q as f32, 1.0]);
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((n, 3))))
    }
}

/// Batch-hard mining for the cosine distance of `x: (n, d)` against `y: (m, d)` (`None`:
/// `x` itself, the anchor excluded), groups `a: (n)`, `b: (m)`: per anchor the column of
/// its farthest positive and of its nearest negative (`(n, 1)`, u32) and whether it has
/// both (`(n)`, `{0, 1}`), without keeping the `(n, m)` matrix. `None` where this does not
/// apply.
pub(crate) fn cosine_hardest_pairs(
    x: &Tensor,
    y: Option<&Tensor>,
    a: &Tensor,
    b: Option<&Tensor>,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    if !applies(&[x])
        || !y.is_none_or(|y| applies(&[y]))
        || a.dtype() != DType::I64
        || b.is_some_and(|b| b.dtype() != DType::I64)
    {
        return Ok(None);
    }
    let ga = a.to_vec1::<i64>()?;
    let gb = match b {
        Some(b) => b.to_vec1::<i64>()?,
        None => ga.clone(),
    };
    let (ga, gb) = dense_groups(&ga, &gb);
    let op = CosineMine {
        ga,
        gb,
        self_excluded: b.is_none(),
    };
    let x = x.detach().contiguous()?;
    let y = y.map_or_else(|| x.clone(), |y| y.detach()).contiguous()?;
    let mined = x.apply_op2_no_bwd(&y, &op)?;
    let pos = mined.narrow(1, 0, 1)?.to_dtype(DType::U32)?;
    let neg = mined.narrow(1, 1, 1)?.to_dtype(DType::U32)?;
    let valid = mined.narrow(1, 2, 1)?.squeeze(1)?.contiguous()?;
    Ok(Some((pos, neg, valid)))
}

/// `erf(x)` for f32 within 1.5·10⁻⁷ absolute (Abramowitz & Stegun 7.1.26), branch-free so
/// that loops over slices vectorise.
#[inline(always)]
fn erf_f32(x: f32) -> f32 {
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

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// `1 / √(2π)`.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

simd_fn! {
    /// `y = x · Φ(x)` (exact GELU, `Φ` the standard normal CDF) elementwise.
    fn gelu_into(x: &[f32], y: &mut [f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = 0.5 * v * (1.0 + erf_f32(v * FRAC_1_SQRT_2));
        }
    }
}

simd_fn! {
    /// `∂x = ∂y · (Φ(x) + x φ(x))` elementwise.
    fn gelu_backward_into(x: &[f32], g: &[f32], out: &mut [f32]) {
        for ((o, &v), &gi) in out.iter_mut().zip(x).zip(g) {
            let cdf = 0.5 * (1.0 + erf_f32(v * FRAC_1_SQRT_2));
            let pdf = FRAC_1_SQRT_2PI * exp_f32(-0.5 * v * v);
            *o = gi * (cdf + v * pdf);
        }
    }
}

/// Exact (erf) GELU with its backward pass.
struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "gelu-erf")?;
        let mut y = vec![0.0f32; x.len()];
        gelu_into(x, &mut y);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            x.apply_op2_no_bwd(&grad.contiguous()?, &GeluErfBackward)?,
        ))
    }
}

/// `(x, ∂y) → ∂x` of [`GeluErf`].
struct GeluErfBackward;

impl CustomOp2 for GeluErfBackward {
    fn name(&self) -> &'static str {
        "gelu-erf-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let g = slice(s2, l2, self.name())?;
        let mut out = vec![0.0f32; x.len()];
        gelu_backward_into(x, g, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Exact GELU `x · Φ(x)` as one op with a backward pass (Candle's `gelu_erf` calls a
/// scalar `erf` per element: 15% of a MiniLM cache fill); `None` where it does not apply.
pub(crate) fn gelu_erf(x: &Tensor) -> Result<Option<Tensor>> {
    if !applies(&[x]) {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op1(GeluErf)?))
}

simd_fn! {
    /// Softmax over each row of length `n`.
    fn softmax_into(x: &[f32], n: usize, y: &mut [f32]) {
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
    fn softmax_backward_into(y: &[f32], g: &[f32], n: usize, out: &mut [f32]) {
        for ((yr, gr), o) in y.chunks_exact(n).zip(g.chunks_exact(n)).zip(out.chunks_exact_mut(n)) {
            let dot_yg = dot(yr, gr);
            for ((oi, &yi), &gi) in o.iter_mut().zip(yr).zip(gr) {
                *oi = yi * (gi - dot_yg);
            }
        }
    }
}

/// Softmax over the last dimension with its backward pass.
struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "softmax-last-dim")?;
        let n = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut y = vec![0.0f32; x.len()];
        softmax_into(x, n, &mut y);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward)?,
        ))
    }
}

/// `(y, ∂y) → ∂x` of [`SoftmaxLastDim`].
struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax-last-dim-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = slice(s1, l1, self.name())?;
        let g = slice(s2, l2, self.name())?;
        let n = l1.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0.0f32; y.len()];
        softmax_backward_into(y, g, n, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Softmax over the last dimension as one op with a backward pass (Candle's fused
/// `softmax_last_dim` has none); `None` where it does not apply.
pub(crate) fn softmax_last_dim(x: &Tensor) -> Result<Option<Tensor>> {
    if !applies(&[x]) {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op1(SoftmaxLastDim)?))
}

#[cfg(test)]
mod tests {
    //! Every kernel against the composite Candle form it replaces (values and gradients).
    use super::*;
    use crate::distance::{Distance, cosine_similarity_matrix as composite_cosine};
    use crate::loss::diagonal_cross_entropy_composite;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn random(shape: (usize, usize), seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..shape.0 * shape.1)
            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
            .collect()
    }

    fn var(data: &[f32], shape: (usize, usize)) -> Var {
        Var::from_tensor(&Tensor::from_slice(data, shape, &Device::Cpu).unwrap()).unwrap()
    }

    fn close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
        close_except(a, b, tol, what, &[]);
    }

    /// As `close`, with entries `skip` left out of the comparison.
    fn close_except(a: &Tensor, b: &Tensor, tol: f32, what: &str, skip: &[usize]) {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        assert!(a.iter().all(|v| v.is_finite()), "{what}: fused not finite");
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            if skip.contains(&i) {
                continue;
            }
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "{what}[{i}]: fused {x} vs composite {y}"
            );
        }
    }

    /// A fixed, non-uniform weighting of the entries of `t` summed to a scalar, so that
    /// every entry gets its own gradient.
    fn weighted_sum(t: &Tensor) -> Tensor {
        let w: Vec<f32> = (0..t.elem_count())
            .map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.4)
            .collect();
        let w = Tensor::from_vec(w, t.shape(), t.device()).unwrap();
        (t * w).unwrap().sum_all().unwrap()
    }

    #[test]
    fn cosine_matrix_matches_the_composite_form() {
        let (n, m, d) = (37, 23, 19);
        let mut xd = random((n, d), 1);
        // A zero row and a tiny one: the clamped-norm branch of the backward pass.
        xd[3 * d..4 * d].fill(0.0);
        xd[5 * d..6 * d].iter_mut().for_each(|v| *v *= 1e-9);
        let x = var(&xd, (n, d));
        let y = var(&random((m, d), 2), (m, d));
        for other in [None, Some(&y)] {
            let fused = cosine_similarity_matrix(x.as_tensor(), other.map(|y| y.as_tensor()))
                .unwrap()
                .expect("applies to f32 on the CPU");
            let reference = composite_cosine(
                x.as_tensor(),
                other.map_or(x.as_tensor(), |y| y.as_tensor()),
            )
            .unwrap();
            close(&fused, &reference, 1e-5, "cosine values");
            let gf = weighted_sum(&fused).backward().unwrap();
            let gr = weighted_sum(&reference).backward().unwrap();
            // The composite form's gradient at an all-zero row is NaN (sqrt at 0); the
            // kernel gives torch's (the norm's subgradient 0 there, so ∂x̂ / ε).
            let zero_row: Vec<usize> = (3 * d..4 * d).collect();
            let (fx, rx) = (gf.get(&x).unwrap(), gr.get(&x).unwrap());
            close_except(fx, rx, 1e-4, "cosine ∂x", &zero_row);
            let row3 = fx.get(3).unwrap().to_vec1::<f32>().unwrap();
            assert!(row3.iter().all(|v| v.is_finite()));
            if let Some(y) = other {
                close(gf.get(y).unwrap(), gr.get(y).unwrap(), 1e-4, "cosine ∂y");
            }
        }
    }

    #[test]
    fn cosine_matrix_skips_the_gradient_of_a_detached_side() {
        let x = var(&random((8, 5), 3), (8, 5));
        let memory = Tensor::from_vec(random((6, 5), 4), (6, 5), &Device::Cpu).unwrap();
        let s = cosine_similarity_matrix(x.as_tensor(), Some(&memory))
            .unwrap()
            .unwrap();
        let g = s.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_some());
        assert!(g.get(&memory).is_none());
    }

    #[test]
    fn diagonal_cross_entropy_matches_the_composite_form() {
        let n = 29;
        // Logits of the scale MNRL uses (20 · cos), where exp's range matters.
        let data: Vec<f32> = random((n, n), 5).iter().map(|v| v * 20.0).collect();
        for symmetric in [false, true] {
            let z = var(&data, (n, n));
            let fused = diagonal_cross_entropy(z.as_tensor(), symmetric)
                .unwrap()
                .unwrap();
            let reference = diagonal_cross_entropy_composite(z.as_tensor(), symmetric).unwrap();
            close(&fused, &reference, 1e-5, "cross-entropy value");
            let gf = (fused * 3.0).unwrap().backward().unwrap();
            let gr = (reference * 3.0).unwrap().backward().unwrap();
            close(
                gf.get(&z).unwrap(),
                gr.get(&z).unwrap(),
                1e-5,
                "cross-entropy ∂z",
            );
        }
    }

    #[test]
    fn gelu_and_softmax_match_the_composite_forms() {
        let data: Vec<f32> = random((13, 40), 12).iter().map(|v| v * 8.0).collect();
        let x = var(&data, (13, 40));
        let fused = gelu_erf(x.as_tensor()).unwrap().unwrap();
        let reference = x.as_tensor().gelu_erf().unwrap();
        close(&fused, &reference, 1e-6, "gelu values");
        let gf = weighted_sum(&fused).backward().unwrap();
        // d/dx x·Φ(x) = Φ(x) + x·φ(x), from the reference forms.
        let xs = x.as_tensor();
        let cdf = ((xs * FRAC_1_SQRT_2 as f64).unwrap().erf().unwrap() + 1.0).unwrap() * 0.5;
        let pdf =
            ((xs.sqr().unwrap() * -0.5).unwrap().exp().unwrap() * FRAC_1_SQRT_2PI as f64).unwrap();
        let slope = (cdf.unwrap() + (xs * pdf).unwrap()).unwrap();
        let w = (weighted_sum(&(xs * 1.0).unwrap()).backward().unwrap())
            .get(&x)
            .unwrap()
            .clone();
        close(gf.get(&x).unwrap(), &(slope * w).unwrap(), 1e-5, "gelu ∂x");

        let fused = softmax_last_dim(x.as_tensor()).unwrap().unwrap();
        let xs = x.as_tensor();
        let e = xs
            .broadcast_sub(&xs.max_keepdim(1).unwrap().detach())
            .unwrap()
            .exp()
            .unwrap();
        let reference = e.broadcast_div(&e.sum_keepdim(1).unwrap()).unwrap();
        close(&fused, &reference, 1e-6, "softmax values");
        let gf = weighted_sum(&fused).backward().unwrap();
        let gr = weighted_sum(&reference).backward().unwrap();
        close(gf.get(&x).unwrap(), gr.get(&x).unwrap(), 1e-5, "softmax ∂x");
    }

    #[test]
    fn exp_is_accurate_over_the_range_softmax_uses() {
        let mut worst = 0.0f32;
        for i in -8700..=8800 {
            let x = i as f32 * 0.01 + 0.003;
            let (fast, exact) = (exp_f32(x), x.exp());
            if exact.is_normal() {
                worst = worst.max((fast - exact).abs() / exact);
            }
        }
        assert!(worst < 4.0 * f32::EPSILON, "max relative error {worst}");
        assert_eq!(exp_f32(-200.0), exp_f32(-87.336_55));
        assert!(exp_f32(-200.0) < 1e-37);
    }

    #[test]
    fn skip_connection_layer_matches_the_composite_form() {
        let (n, d) = (17, 11);
        let x = var(&random((n, d), 6), (n, d));
        let w = var(&random((d, d), 7), (d, d));
        let b = Var::from_tensor(&Tensor::from_vec(random((1, d), 8), d, &Device::Cpu).unwrap())
            .unwrap();
        let gate = Var::from_tensor(&Tensor::from_vec(random((1, d), 9), d, &Device::Cpu).unwrap())
            .unwrap();
        let fused = skip_connection_layer(x.as_tensor(), w.as_tensor(), b.as_tensor(), &gate)
            .unwrap()
            .unwrap();
        let reference = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap()
            .broadcast_mul(&candle_nn::ops::sigmoid(&gate).unwrap())
            .unwrap()
            .add(&x)
            .unwrap();
        close(&fused, &reference, 1e-5, "skip values");
        let gf = weighted_sum(&fused).backward().unwrap();
        let gr = weighted_sum(&reference).backward().unwrap();
        for (v, name) in [(&x, "∂x"), (&w, "∂W"), (&b, "∂b"), (&gate, "∂gate")] {
            close(gf.get(v).unwrap(), gr.get(v).unwrap(), 1e-4, name);
        }
        // A constant input (cached embeddings) gets no gradient and costs no product.
        let c = x.as_tensor().detach();
        let y = skip_connection_layer(&c, w.as_tensor(), b.as_tensor(), &gate)
            .unwrap()
            .unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&c).is_none() && g.get(&w).is_some());
    }

    #[test]
    fn group_masks_and_hardest_pairs_match_the_composite_forms() {
        // Groups with a singleton (no positive) and, against `b`, a group absent from `b`.
        let a = Tensor::new(&[0i64, 1, 0, 2, 1, 3, 0], &Device::Cpu).unwrap();
        let b = Tensor::new(&[1i64, 0, 0, 2, 5], &Device::Cpu).unwrap();
        for other in [None, Some(&b)] {
            let m = other.map_or(7, |b| b.dim(0).unwrap());
            let (p, q) = group_masks(&a, other, DType::F32).unwrap().unwrap();
            // F64 takes the composite path.
            let (rp, rq) = crate::loss::masks::group_masks(&a, other, DType::F64).unwrap();
            close(&p, &rp.to_dtype(DType::F32).unwrap(), 0.0, "positive mask");
            close(&q, &rq.to_dtype(DType::F32).unwrap(), 0.0, "negative mask");

            let d = Tensor::from_vec(random((7, m), 10), (7, m), &Device::Cpu).unwrap();
            let (pi, ni, valid) = hardest_pairs(&d, &a, other).unwrap().unwrap();
            let big = 1e30;
            let want_p = ((&d * &rp.to_dtype(DType::F32).unwrap()).unwrap()
                + ((rp.to_dtype(DType::F32).unwrap() - 1.0).unwrap() * big).unwrap())
            .unwrap()
            .argmax(1)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
            let want_n = ((&d * &q).unwrap() + ((1.0 - &q).unwrap() * big).unwrap())
                .unwrap()
                .argmin(1)
                .unwrap()
                .to_vec1::<u32>()
                .unwrap();
            let valid = valid.to_vec1::<f32>().unwrap();
            let (pi, ni) = (
                pi.flatten_all().unwrap().to_vec1::<u32>().unwrap(),
                ni.flatten_all().unwrap().to_vec1::<u32>().unwrap(),
            );
            let pv = p.to_vec2::<f32>().unwrap();
            let qv = q.to_vec2::<f32>().unwrap();
            for i in 0..7 {
                let has = pv[i].contains(&1.0) && qv[i].contains(&1.0);
                assert_eq!(valid[i], f32::from(u8::from(has)), "valid[{i}]");
                if has {
                    assert_eq!((pi[i], ni[i]), (want_p[i], want_n[i]), "anchor {i}");
                }
            }
        }
        // The cosine distance feeding the mining is the fused one as well.
        let _ = Distance::Cosine;
    }

    #[test]
    fn adam_kernel_matches_the_tensor_update() {
        use crate::train::{Optimizer, OptimizerConfig};
        let data = random((5, 4), 11);
        for config in [
            OptimizerConfig::adam(0.05),
            OptimizerConfig::Adam {
                lr: 0.05,
                weight_decay: 0.1,
            },
            OptimizerConfig::AdamW {
                lr: 0.05,
                weight_decay: 0.1,
            },
        ] {
            let run = |dtype: DType| {
                let v = Var::from_tensor(
                    &Tensor::from_slice(&data, (5, 4), &Device::Cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap(),
                )
                .unwrap();
                let mut opt = Optimizer::new(config, vec![("w".into(), v.clone())], &[]).unwrap();
                for step in 0..4 {
                    // f(θ) = Σ c·θ³ with varying c: gradients change sign and size.
                    let c = 1.0 + step as f64 * 0.5;
                    let loss = (v.as_tensor().powf(3.0).unwrap() * c)
                        .unwrap()
                        .sum_all()
                        .unwrap();
                    opt.step(&loss.backward().unwrap(), 0.7, 0.9).unwrap();
                }
                let state = opt.state_tensors();
                (
                    v.as_tensor().to_dtype(DType::F32).unwrap(),
                    state["m.w"].to_dtype(DType::F32).unwrap(),
                    state["v.w"].to_dtype(DType::F32).unwrap(),
                )
            };
            // F32 on the CPU takes the kernel, F64 the tensor update.
            let (fused, reference) = (run(DType::F32), run(DType::F64));
            close(&fused.0, &reference.0, 1e-5, "θ");
            close(&fused.1, &reference.1, 1e-5, "m");
            close(&fused.2, &reference.2, 1e-5, "v");
        }
    }
}

#[cfg(test)]
mod triplet_tests {
    //! The fused batch-hard path of TripletLoss (`kernels::cosine_hardest_pairs` +
    //! `cosine_pairs`) against the composite one (F64 takes it), values and gradients.
    use crate::data::GroupTargets;
    use crate::loss::{MemoryLoss, SimilarityLoss, TripletLoss, TripletLossConfig};
    use crate::nn::Params;
    use candle_core::{DType, Device, Tensor, Var};

    fn run(n: usize, m: usize, groups: i64, dtype: DType) -> (f64, Vec<f64>) {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let dev = Device::Cpu;
        let mut rng = StdRng::seed_from_u64((n * 31 + m) as u64);
        let data: Vec<f64> = (0..(n + m) * 24)
            .map(|_| rng.random::<f64>() - 0.5)
            .collect();
        let x = Tensor::from_vec(data, (n + m, 24), &dev).unwrap();
        let (batch, memory) = (x.narrow(0, 0, n).unwrap(), x.narrow(0, n, m).unwrap());
        let v = Var::from_tensor(&batch.to_dtype(dtype).unwrap()).unwrap();
        let g: Vec<i64> = (0..n as i64).map(|i| (i * 7) % groups).collect();
        let mg: Vec<i64> = (0..m as i64).map(|i| (i * 3) % (groups + 2)).collect();
        let targets = GroupTargets {
            groups: Tensor::new(g.as_slice(), &dev).unwrap(),
        };
        let mut params = Params::new(&dev, 0);
        let loss =
            TripletLoss::new(24, TripletLossConfig::default(), &mut params.scope("l")).unwrap();
        let mut l = loss.forward(v.as_tensor(), &targets).unwrap();
        if m > 0 {
            let mem = memory.to_dtype(dtype).unwrap();
            let mem_g = Tensor::new(mg.as_slice(), &dev).unwrap();
            l = (l + loss
                .forward_memory(v.as_tensor(), &targets.groups, &mem, &mem_g)
                .unwrap())
            .unwrap();
        }
        let grad = l
            .backward()
            .unwrap()
            .get(&v)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        (
            l.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap(),
            grad.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        )
    }

    #[test]
    fn fused_hard_mining_matches_the_composite_path() {
        // Small groups (anchors without positives), a batch larger than a mining block, and
        // a memory bank.
        for (n, m, groups) in [(9, 0, 4), (300, 0, 100), (64, 700, 10), (2000, 0, 100)] {
            let (lf, gf) = run(n, m, groups, DType::F32);
            let (lr, gr) = run(n, m, groups, DType::F64);
            assert!(
                (lf - lr).abs() < 1e-5 * (1.0 + lr.abs()),
                "n={n} m={m}: {lf} vs {lr}"
            );
            let worst = gf
                .iter()
                .zip(&gr)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            let scale = gr.iter().map(|v| v.abs()).fold(0.0, f64::max);
            assert!(
                worst <= 1e-4 * scale.max(1e-6),
                "n={n} m={m}: gradient off by {worst} (max {scale})"
            );
        }
    }
}
