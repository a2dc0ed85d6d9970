//! Fused f32 CPU kernels for what runs at every step of a training run: the cosine
//! similarity matrix, batch-hard mining, MultipleNegativesRankingLoss, the group losses
//! that are a function of the similarity matrix, the class-logit losses, the
//! SkipConnectionHead block, the Adam update, and a transformer's layers (GELU and softmax
//! with backward passes; forward-only dense layers and attention for a frozen encoder's
//! cache fill).
//!
//! Why: Candle builds a loss from small tensor ops. On the CPU each op allocates and fills
//! its output, and each edge of the backward pass adds a zero-filled gradient buffer and an
//! addition (`GradStore::or_insert` + `add`). For a 256 × 384 batch that bookkeeping took
//! two thirds of a cached training step (BENCHMARKS.md). Here each piece is one Candle
//! custom op with a hand-written backward pass, so the graph holds one node where it held
//! ten, and the work is the matrix multiplications (the `gemm` crate Candle itself uses)
//! plus one vectorised pass over each matrix.
//!
//! | module          | op                                      | shapes                        |
//! |-----------------|-----------------------------------------|-------------------------------|
//! | `cosine`        | `S = x̂ ŷᵀ` (`x̂ x̂ᵀ`: upper triangle), pairs | `(n, d), (m, d) → (n, m)`     |
//! | `mining`        | batch-hard columns, group masks         | `(n, m)` → `(n)` indices      |
//! | `cross_entropy` | diagonal cross-entropy, fused MNRL      | `(n, n)` or `(n, d)² → ()`    |
//! | `group_loss`    | Circle, MS, SupCon, OCL all, FastAP, Triplet all | `(n, m)` → `()`               |
//! | `class_loss`    | class-logit cross-entropy, CenterLoss   | `(n, C)` → `()`, `(n, d), (k, d) → ()` |
//! | `skip`          | `x + (x Wᵀ + b) ⊙ σ(gate)`              | `(n, d) → (n, d)`             |
//! | `adam`          | Adam / AdamW in place                   | any variable                  |
//! | `activation`    | GELU, softmax over the last dimension   | any → same                    |
//! | `bert`          | dense layer + epilogue, attention       | `(n, k) → (n, m)`, `(b·L, 3H) → (b·L, H)` |
//!
//! Shared here: the row normalisation every cosine kernel uses, with `ε = 1e-8`,
//!
//! ```text
//! x̂_i = x_i / max(‖x_i‖, ε)
//! ∂L/∂x_i = (∂x̂_i − x̂_i ⟨x̂_i, ∂x̂_i⟩) / ‖x_i‖     (‖x_i‖ > ε)
//!         = ∂x̂_i / ε                             (‖x_i‖ ≤ ε: the norm is clamped; torch's
//!                                                 subgradient, where the composite form's
//!                                                 sqrt at 0 gives NaN)
//! ```
//!
//! a fast vectorisable `exp`, and `simd_fn!`, which compiles a loop for AVX2 as well as
//! the baseline and picks one at run time.
//!
//! Each entry point returns `None` where it does not apply (another device or dtype); the
//! caller then uses the composite Candle form, which stays the reference: the tests check
//! that both give the same values and gradients.

use std::sync::Mutex;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, InplaceOp2, Layout, Shape, Tensor,
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

/// One input of a fused op: its f32 data (row-major, contiguous) and its dims.
#[derive(Clone, Copy)]
struct Input<'a> {
    data: &'a [f32],
    dims: &'a [usize],
}

impl Input<'_> {
    /// The dims of a matrix, `(rows, columns)`.
    fn dims2(&self) -> candle_core::Result<(usize, usize)> {
        match *self.dims {
            [r, c] => Ok((r, c)),
            _ => candle_core::bail!("expected a matrix, got dims {:?}", self.dims),
        }
    }
}

/// A fused f32 CPU op over `N` inputs: its forward pass and, optionally, its backward
/// pass; [`Fused`] makes it a Candle custom op.
trait FusedOp<const N: usize> {
    /// The op's name in Candle's errors.
    const NAME: &'static str;

    /// The result, row-major, and its shape.
    fn forward(&self, inputs: [Input<'_>; N]) -> candle_core::Result<(Vec<f32>, Shape)>;

    /// The inputs' gradients from the result's; by default the op has no backward pass
    /// (it is applied with `apply_op*_no_bwd`).
    fn backward(
        &self,
        _inputs: [&Tensor; N],
        _result: &Tensor,
        _grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; N]> {
        candle_core::bail!("{}: no backward pass", Self::NAME)
    }
}

/// A [`FusedOp`] as Candle's `CustomOp1`/`2`/`3`.
struct Fused<T>(T);

/// The [`Input`] of a storage and its layout.
fn input<'a>(s: &'a CpuStorage, l: &'a Layout, op: &'static str) -> candle_core::Result<Input<'a>> {
    Ok(Input {
        data: slice(s, l, op)?,
        dims: l.dims(),
    })
}

impl<T: FusedOp<1>> CustomOp1 for Fused<T> {
    fn name(&self) -> &'static str {
        T::NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (out, shape) = self.0.forward([input(s, l, T::NAME)?])?;
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(&self, a: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let [ga] = self.0.backward([a], res, grad)?;
        Ok(ga)
    }
}

impl<T: FusedOp<2>> CustomOp2 for Fused<T> {
    fn name(&self) -> &'static str {
        T::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let inputs = [input(s1, l1, T::NAME)?, input(s2, l2, T::NAME)?];
        let (out, shape) = self.0.forward(inputs)?;
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let [ga, gb] = self.0.backward([a, b], res, grad)?;
        Ok((ga, gb))
    }
}

impl<T: FusedOp<3>> CustomOp3 for Fused<T> {
    fn name(&self) -> &'static str {
        T::NAME
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
        let inputs = [
            input(s1, l1, T::NAME)?,
            input(s2, l2, T::NAME)?,
            input(s3, l3, T::NAME)?,
        ];
        let (out, shape) = self.0.forward(inputs)?;
        Ok((CpuStorage::F32(out), shape))
    }

    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [ga, gb, gc] = self.0.backward([a, b, c], res, grad)?;
        Ok((ga, gb, gc))
    }
}

/// `dst (m × n) = lhs (m × k) · rhs (k × n)`, all row-major, `dst` overwritten. `lhs_t`:
/// `lhs` is stored as its transpose `(k × m)`; `rhs_t`: `rhs` is stored as `(n × k)` (so
/// `dst = lhs · stored_rhsᵀ`). See [`gemm_into`] for the threads.
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
    gemm_into(dst, lhs, rhs, m, n, k, lhs_t, rhs_t, false);
}

thread_local! {
    /// Set by [`serial`]: the kernels' matrix products stay on this thread.
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the kernels' matrix products on the calling thread alone, for a caller
/// that already splits its work across threads (a transformer's cache fill runs one chunk
/// per core).
#[cfg_attr(not(feature = "transformers"), allow(dead_code))]
pub(crate) fn serial<R>(f: impl FnOnce() -> R) -> R {
    let before = SERIAL.replace(true);
    let out = f();
    SERIAL.set(before);
    out
}

/// [`gemm`], adding the product to `dst` when `accumulate`. Runs on Candle's thread count
/// (rayon), or on the calling thread alone inside [`serial`].
#[allow(clippy::too_many_arguments)]
fn gemm_into(
    dst: &mut [f32],
    lhs: &[f32],
    rhs: &[f32],
    m: usize,
    n: usize,
    k: usize,
    lhs_t: bool,
    rhs_t: bool,
    accumulate: bool,
) {
    // The unsafe call below relies on these (cheap next to the product).
    assert_eq!(dst.len(), m * n, "gemm: dst size");
    assert_eq!(lhs.len(), m * k, "gemm: lhs size");
    assert_eq!(rhs.len(), k * n, "gemm: rhs size");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
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
    // Rows `i0..i0 + rows` of the product into `block` (those rows of dst), on this thread.
    let product = |block: &mut [f32], i0: usize| {
        let rows = block.len() / n;
        let lhs_at = if lhs_t { i0 } else { i0 * k };
        // SAFETY: lhs holds m·k elements (asserted above), and rows i0..i0 + rows of the
        // (m × k) operand at these strides lie inside it; rhs covers k·n; block holds
        // rows·n elements and does not alias the inputs (it is part of a &mut slice).
        unsafe {
            gemm::gemm(
                rows,
                n,
                k,
                block.as_mut_ptr(),
                1,
                n as isize,
                accumulate,
                lhs.as_ptr().add(lhs_at),
                lhs_cs,
                lhs_rs,
                rhs.as_ptr(),
                rhs_cs,
                rhs_rs,
                if accumulate { 1.0 } else { 0.0 },
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    };
    let t = if SERIAL.get() { 1 } else { threads() };
    if t <= 1 || m * n * k < GEMM_PAR_MIN || m < 2 * t {
        product(dst, 0);
        return;
    }
    // One block of rows per thread, each a single-threaded product, rather than the gemm
    // crate splitting one product: on the square-ish shapes of a training step
    // (1024 × 1024 × 384, 384 × 384 × 2048) a throwaway timing loop in development found
    // its own split slower; end to end the difference is within this machine's noise
    // (BENCHMARKS.md, "The FAQ task after the encoder and epoch work").
    use rayon::prelude::*;
    let per = m.div_ceil(t);
    dst.par_chunks_mut(per * n)
        .enumerate()
        .for_each(|(b, block)| product(block, b * per));
}

/// Multiply-adds below which a product runs on the calling thread.
const GEMM_PAR_MIN: usize = 1 << 18;

/// Defines `fn $name(..) -> ..` twice, once compiled for AVX2 + FMA and once for the
/// baseline, and picks the AVX2 one at run time where the CPU has it (the check is a cached
/// atomic load). The bodies are the same code, and Rust never contracts `a * b + c` into an
/// FMA on its own, so both give bit-identical results; AVX2 only widens the vector loops
/// (the crate is built for baseline x86-64, whose SSE2 is 4 lanes wide).
macro_rules! simd_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
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

/// The thread count the kernels use: Candle's (`RAYON_NUM_THREADS`, else the physical
/// cores). Candle's `get_num_threads` re-reads /proc/cpuinfo on every call unless
/// RAYON_NUM_THREADS is set; the count does not change while a process runs.
fn threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(get_num_threads)
}

/// Below this many elements an element-wise pass runs on the calling thread: splitting
/// costs more than it saves.
const PAR_MIN: usize = 1 << 16;

/// Rows per parallel block of a pass over `n` rows of width `width`: all of them below
/// [`PAR_MIN`] entries, else an even split over [`threads`].
fn par_block_rows(n: usize, width: usize) -> usize {
    let t = threads();
    if t <= 1 || n * width < PAR_MIN {
        n.max(1)
    } else {
        n.div_ceil(t).max(1)
    }
}

/// `f(input rows, output rows)` over blocks of whole rows of width `width`, split across
/// [`threads`] when the pass is large (`input` and `out` have the same row count).
fn par_rows(input: &[f32], out: &mut [f32], width: usize, f: impl Fn(&[f32], &mut [f32]) + Sync) {
    use rayon::prelude::*;
    let width = width.max(1);
    let rows = input.len() / width;
    let per = par_block_rows(rows, width);
    if per >= rows {
        f(input, out);
        return;
    }
    let out_width = out.len() / rows;
    input
        .par_chunks(per * width)
        .zip(out.par_chunks_mut(per * out_width))
        .for_each(|(a, b)| f(a, b));
}

/// `f(rows)` over blocks of whole rows of width `width` of `out`, in place, split across
/// [`threads`] like [`par_rows`].
fn par_rows_mut(out: &mut [f32], width: usize, f: impl Fn(&mut [f32]) + Sync) {
    use rayon::prelude::*;
    let width = width.max(1);
    let rows = out.len() / width;
    let per = par_block_rows(rows, width);
    if per >= rows {
        f(out);
        return;
    }
    out.par_chunks_mut(per * width).for_each(&f);
}

/// Rows `rows` of the f32 CPU matrix `src`, `(rows.len(), d)`, copied in parallel blocks
/// (a cached embedding lookup: Candle's `index_select` copies on one thread). `None` where
/// it does not apply; an error for a row out of range.
pub(crate) fn gather_rows(src: &Tensor, rows: &[u32]) -> Result<Option<Tensor>> {
    use rayon::prelude::*;
    let (n, d) = match src.dims() {
        [n, d] if applies(&[src]) => (*n, *d),
        _ => return Ok(None),
    };
    if let Some(&bad) = rows.iter().find(|&&r| r as usize >= n) {
        return Err(candle_core::Error::Msg(format!(
            "row {bad} looked up in a matrix of {n} rows"
        ))
        .into());
    }
    let src = src.contiguous()?;
    let (storage, layout) = src.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let data = slice(cpu, layout, "gather-rows")?;
    let mut out = vec![0.0f32; rows.len() * d];
    if d > 0 {
        let per = par_block_rows(rows.len(), d);
        out.par_chunks_mut(per * d)
            .zip(rows.par_chunks(per))
            .for_each(|(block, ids)| {
                for (o, &r) in block.chunks_exact_mut(d).zip(ids) {
                    o.copy_from_slice(&data[r as usize * d..(r as usize + 1) * d]);
                }
            });
    }
    drop(storage);
    Ok(Some(Tensor::from_vec(out, (rows.len(), d), src.device())?))
}

/// `Σ xᵢ²` over every element of an f32 CPU tensor, without materialising `x²` (the
/// trainer's per-step gradient check reads one such sum per variable); `None` where it
/// does not apply. Summed in f32 lanes per block and f64 across blocks: a sum that
/// overflows f32 comes out as `+∞`, which the caller must tell from a non-finite element.
pub(crate) fn sum_of_squares(x: &Tensor) -> Result<Option<f64>> {
    use rayon::prelude::*;
    if !applies(&[x]) {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let data = slice(cpu, layout, "sum-of-squares")?;
    let total = if data.len() < PAR_MIN {
        f64::from(dot(data, data))
    } else {
        data.par_chunks(PAR_MIN).map(|c| f64::from(dot(c, c))).sum()
    };
    Ok(Some(total))
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
    pub(super) fn normalize_rows_into(x: &[f32], d: usize, norms: &mut [f32], unit: &mut [f32]) {
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
    pub(super) fn inverse_norms(y: &[f32], d: usize) -> Vec<f32> {
        y.chunks_exact(d.max(1))
            .map(|row| 1.0 / dot(row, row).sqrt().max(NORM_EPS))
            .collect()
    }
}

simd_fn! {
    /// `∂L/∂x` from `∂L/∂x̂` (in place), see the module docs.
    pub(super) fn normalize_backward(grad: &mut [f32], unit: &[f32], norms: &[f32], d: usize) {
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

/// Fast `eˣ` for f32, within 2 ulp on the range where the result is a normal number, `0`
/// below it: Cody–Waite range reduction `x = k·ln2 + r` and a degree-6 polynomial for
/// `eʳ`, written so that loops over slices vectorise.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.336_55, 88.376_26);
    // Round x·log₂e to the nearest integer k by the 1.5·2²³ trick: the sum's low mantissa
    // bits then hold k (in two's complement), read below without a float-to-int
    // conversion (Rust's saturating `as i32` is scalar per lane and stops vectorisation).
    const ROUND: f32 = 12_582_912.0;
    let kk = x * std::f32::consts::LOG2_E + ROUND;
    let k = kk - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (0.166_666_67
                    + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_889)))));
    // 2^k: the exponent field is k + 127 (in [1, 254] after the clamp); the low bits of
    // kk's representation are k, and the shift drops everything above them.
    p * f32::from_bits(kk.to_bits().wrapping_add(127) << 23)
}

mod activation;
mod adam;
mod bert;
mod class_loss;
mod cosine;
mod cross_entropy;
mod group_loss;
mod mining;
mod skip;
#[cfg(test)]
mod tests;

#[cfg(feature = "transformers")]
pub(crate) use activation::{gelu_erf, softmax_last_dim};
pub(crate) use adam::{AdamStep, adam_applies, adam_step};
#[cfg(feature = "transformers")]
pub(crate) use bert::{Epilogue, attention, attention_takes_head_size, dense};
pub(crate) use class_loss::{TargetLogit, center_distance, class_cross_entropy};
pub(crate) use cosine::cosine_similarity_matrix;
pub(crate) use cross_entropy::{cosine_mnrl, diagonal_cross_entropy};
pub(crate) use group_loss::{GroupMatrixLoss, cosine_group_loss};
pub(crate) use mining::{cosine_hardest, group_masks, hardest_pairs};
pub(crate) use skip::skip_connection_layer;
