//! Cosine similarity kernels: the full matrix `x̂ ŷᵀ` (and `x̂ x̂ᵀ`) and a few chosen pairs
//! per row.
//!
//! ```text
//! S = x̂ ŷᵀ: (n, d), (m, d) → (n, m)    ∂x̂ = G ŷ, ∂ŷ = Gᵀ x̂ (self: ∂x̂ = (G + Gᵀ) x̂)
//!         (forward: (x̂ yᵀ) with column j scaled by 1 / max(‖y_j‖, ε), no copy of ŷ; for
//!         at most 64 rows against 8 times as many, (y x̂ᵀ)ᵀ, so that y is packed once)
//! pairs:  s_ik = x̂_i · ŷ_{idx_ik}: (n, d), (m, d), idx (n, k) → (n, k)
//!         ∂x̂_i = Σ_k G_ik ŷ_{idx_ik}, ∂ŷ_j = Σ_{idx_ik = j} G_ik x̂_i   (O((n·k + m)·d))
//! ```
//!
//! Each gradient then goes through the normalisation (see the parent module). The self
//! product `x̂ x̂ᵀ` is symmetric: [`gram`] computes its upper triangle and mirrors it.

use super::*;

/// `S = x̂ x̂ᵀ` (one input) or `S = x̂ ŷᵀ` (two inputs).
pub(super) struct CosineMatrix;

impl FusedOp<1> for CosineMatrix {
    const NAME: &'static str = "cosine-matrix";

    fn forward(&self, [s]: [Input<'_>; 1]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (n, d) = s.dims2()?;
        let x = s.data;
        let (_, unit) = normalize_rows(x, d);
        let mut out = vec![0.0f32; n * n];
        gram(&mut out, &unit, n, d);
        Ok((out, Shape::from((n, n))))
    }

    fn backward(
        &self,
        [x]: [&Tensor; 1],
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 1]> {
        let backward = Fused(CosineSelfBackward);
        Ok([Some(x.apply_op2_no_bwd(&grad.contiguous()?, &backward)?)])
    }
}

impl FusedOp<2> for CosineMatrix {
    const NAME: &'static str = "cosine-matrix";

    /// `S_ij = (x̂_i · y_j) / max(‖y_j‖, ε)`: the columns are scaled after the product
    /// instead of normalising a copy of `y`, which is usually the large side (a memory
    /// bank, or every candidate of an evaluation against a block of queries) and would be
    /// copied at every call.
    fn forward(&self, [s1, s2]: [Input<'_>; 2]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (n, d) = s1.dims2()?;
        let (m, _) = s2.dims2()?;
        let (_, xu) = normalize_rows(s1.data, d);
        let inv = inverse_norms(s2.data, d);
        let mut out = vec![0.0f32; n * m];
        if n <= THIN_ROWS && m >= 8 * n {
            // A few rows against many (an evaluation block of queries against every
            // candidate): the product `y x̂ᵀ` puts the large side in the product's rows, so
            // each thread's share of `y` is packed once (the other way round every thread
            // packs all of `y` for its few rows), then it is transposed and scaled.
            let mut t = vec![0.0f32; m * n];
            gemm(&mut t, s2.data, &xu, m, n, d, false, true);
            use rayon::prelude::*;
            let per = par_block_rows(n, m);
            out.par_chunks_mut(per * m)
                .enumerate()
                .for_each(|(b, rows)| transpose_scaled(&t, &inv, n, b * per, rows));
        } else {
            gemm(&mut out, &xu, s2.data, n, m, d, false, true);
            if m > 0 {
                par_rows_mut(&mut out, m, |rows| scale_columns(rows, &inv));
            }
        }
        Ok((out, Shape::from((n, m))))
    }

    fn backward(
        &self,
        [x, y]: [&Tensor; 2],
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 2]> {
        let grad = grad.contiguous()?;
        // A side that is not part of the graph (a detached memory bank) gets no gradient,
        // which saves its matrix product.
        let side = |this: &Tensor, other: &Tensor, lhs: bool| {
            this.track_op()
                .then(|| this.apply_op3_no_bwd(other, &grad, &Fused(CosineCrossBackward { lhs })))
                .transpose()
        };
        Ok([side(x, y, true)?, side(y, x, false)?])
    }
}

/// Rows at most this many against a side at least 8 times larger take the transposed
/// product in [`CosineMatrix`]'s two-input forward pass.
const THIN_ROWS: usize = 64;

/// `rows[k][j] = t[j][i0 + k] · c_j`: rows `i0..` of the transpose of `t: (m × n)`, each of
/// width `m = c.len()`, scaled by column. Reads `t` once, in order.
fn transpose_scaled(t: &[f32], c: &[f32], n: usize, i0: usize, rows: &mut [f32]) {
    let m = c.len();
    let r = rows.len() / m.max(1);
    for (j, (tr, &cj)) in t.chunks_exact(n.max(1)).zip(c).enumerate() {
        for (k, &v) in tr[i0..i0 + r].iter().enumerate() {
            rows[k * m + j] = v * cj;
        }
    }
}

simd_fn! {
    /// `s_ij ← s_ij · c_j` over a block of rows of width `c.len()`.
    fn scale_columns(s: &mut [f32], c: &[f32]) {
        for row in s.chunks_exact_mut(c.len()) {
            for (v, &cj) in row.iter_mut().zip(c) {
                *v *= cj;
            }
        }
    }
}

/// `∂L/∂x` of `S = x̂ x̂ᵀ` given `G`: `normalize_backward((G + Gᵀ) x̂)`.
pub(super) struct CosineSelfBackward;

impl FusedOp<2> for CosineSelfBackward {
    const NAME: &'static str = "cosine-matrix-backward";

    fn forward(&self, [s1, s2]: [Input<'_>; 2]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (n, d) = s1.dims2()?;
        let (norms, unit) = normalize_rows(s1.data, d);
        let mut sym = vec![0.0f32; n * n];
        add_transpose(&mut sym, s2.data, n);
        let mut out = vec![0.0f32; n * d];
        gemm(&mut out, &sym, &unit, n, d, n, false, false);
        normalize_backward(&mut out, &unit, &norms, d);
        Ok((out, Shape::from((n, d))))
    }
}

/// Side of the square tiles of [`gram`] and [`add_transpose`].
const TILE: usize = 64;

/// A raw pointer that may cross threads; each user says why its accesses do not race.
#[derive(Clone, Copy)]
struct SharedPtr(*mut f32);
// SAFETY: only used by `gram` and `add_transpose`, whose threads write disjoint entries and
// read only entries no thread writes during that pass.
unsafe impl Send for SharedPtr {}
unsafe impl Sync for SharedPtr {}

impl SharedPtr {
    /// The pointer (a method, so that closures capture the whole `Sync` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `dst (n × n) = u uᵀ` for row-major `u: (n × d)`: the product is symmetric, so each
/// block of rows computes its columns from the block's first row onwards (the upper
/// triangle and the diagonal blocks, about half the multiply-adds of the full product), and
/// a second pass mirrors the strict lower triangle from the upper one in square tiles.
pub(super) fn gram(dst: &mut [f32], u: &[f32], n: usize, d: usize) {
    use rayon::prelude::*;
    assert_eq!(dst.len(), n * n, "gram: dst size");
    assert_eq!(u.len(), n * d, "gram: u size");
    if n == 0 {
        return;
    }
    if d == 0 || n < 2 * TILE {
        gemm(dst, u, u, n, n, d, false, true);
        return;
    }
    let blocks = n.div_ceil(TILE);
    let out = SharedPtr(dst.as_mut_ptr());
    let run = |b: usize| {
        let r0 = b * TILE;
        let rows = TILE.min(n - r0);
        let cols = n - r0;
        // SAFETY: `dst` holds n·n elements and this writes rows r0..r0 + rows, columns
        // r0..n of it (row stride n), which no other block writes; `u` holds n·d elements
        // and rows r0..n of it are read at row stride d.
        unsafe {
            gemm::gemm(
                rows,
                cols,
                d,
                out.get().add(r0 * n + r0),
                1,
                n as isize,
                false,
                u.as_ptr().add(r0 * d),
                1,
                d as isize,
                u.as_ptr().add(r0 * d),
                d as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    };
    if threads() <= 1 || SERIAL.get() {
        (0..blocks).for_each(run);
    } else {
        (0..blocks).into_par_iter().for_each(run);
    }
    // Mirror: block row b writes its entries left of the diagonal block, reading the
    // upper-triangle entries of the blocks above, which this pass never writes.
    let mirror = |b: usize| {
        let r0 = b * TILE;
        let r1 = (r0 + TILE).min(n);
        for c0 in (0..r0).step_by(TILE) {
            let c1 = (c0 + TILE).min(r0);
            for i in r0..r1 {
                for j in c0..c1 {
                    // SAFETY: i, j < n; (i, j) with j < r0 ≤ i is written only by block
                    // row b, and (j, i) lies in the upper triangle (read only here).
                    unsafe { *out.get().add(i * n + j) = *out.get().add(j * n + i) };
                }
            }
        }
        // The diagonal block's own lower triangle.
        for i in r0..r1 {
            for j in r0..i {
                // SAFETY: as above; (j, i) with r0 ≤ j < i is in this block's upper part.
                unsafe { *out.get().add(i * n + j) = *out.get().add(j * n + i) };
            }
        }
    };
    if threads() <= 1 || SERIAL.get() {
        (0..blocks).for_each(mirror);
    } else {
        (0..blocks).into_par_iter().for_each(mirror);
    }
}

/// `dst = g + gᵀ` for a row-major `(n × n)` matrix `g`, in square tiles so that both the
/// rows and the columns it reads stay in cache, blocks of rows in parallel.
pub(super) fn add_transpose(dst: &mut [f32], g: &[f32], n: usize) {
    use rayon::prelude::*;
    assert_eq!(dst.len(), n * n, "add_transpose: dst size");
    assert_eq!(g.len(), n * n, "add_transpose: g size");
    if n == 0 {
        return;
    }
    let block = |(b, rows): (usize, &mut [f32])| {
        let r0 = b * TILE;
        let r1 = r0 + rows.len() / n;
        for c0 in (0..n).step_by(TILE) {
            let c1 = (c0 + TILE).min(n);
            for i in r0..r1 {
                let row = &mut rows[(i - r0) * n..(i - r0 + 1) * n];
                for j in c0..c1 {
                    row[j] = g[i * n + j] + g[j * n + i];
                }
            }
        }
    };
    if threads() <= 1 || n * n < PAR_MIN {
        dst.chunks_mut(TILE * n).enumerate().for_each(block);
    } else {
        dst.par_chunks_mut(TILE * n).enumerate().for_each(block);
    }
}

/// `∂L/∂x` (lhs) or `∂L/∂y` of `S = x̂ ŷᵀ` given `G`; the first input is the side whose
/// gradient is computed, the second the other side.
pub(super) struct CosineCrossBackward {
    lhs: bool,
}

impl FusedOp<3> for CosineCrossBackward {
    const NAME: &'static str = "cosine-matrix-backward";

    fn forward(&self, [s1, s2, s3]: [Input<'_>; 3]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (rows, d) = s1.dims2()?;
        let (other, _) = s2.dims2()?;
        let (norms, unit) = normalize_rows(s1.data, d);
        let (_, other_unit) = normalize_rows(s2.data, d);
        let g = s3.data;
        let mut out = vec![0.0f32; rows * d];
        // lhs: G (rows × other) · ŷ; rhs: Gᵀ (G stored as other × rows) · x̂.
        gemm(&mut out, g, &other_unit, rows, d, other, !self.lhs, false);
        normalize_backward(&mut out, &unit, &norms, d);
        Ok((out, Shape::from((rows, d))))
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
        None => x.apply_op1(Fused(CosineMatrix))?,
        Some(y) => x.apply_op2(&y.contiguous()?, Fused(CosineMatrix))?,
    }))
}

/// `s_ik = x̂_i · ŷ_{idx_ik}` for a few chosen columns per row, over `(x: (n, d), y: (m, d))`
/// with the column indices kept in the op.
pub(super) struct CosinePairs {
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

impl FusedOp<2> for CosinePairs {
    const NAME: &'static str = "cosine-pairs";

    fn forward(&self, [s1, s2]: [Input<'_>; 2]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (n, d) = s1.dims2()?;
        let (m, _) = s2.dims2()?;
        self.check(n, m)?;
        let (x, y) = (s1.data, s2.data);
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
        Ok((out, Shape::from((n, self.k))))
    }

    fn backward(
        &self,
        [x, y]: [&Tensor; 2],
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 2]> {
        let (with_x, with_y) = (x.track_op(), y.track_op());
        if !with_x && !with_y {
            return Ok([None, None]);
        }
        let (n, d) = x.dims2()?;
        let (m, _) = y.dims2()?;
        let packed = x.apply_op3_no_bwd(
            y,
            &grad.contiguous()?,
            &Fused(CosinePairsBackward {
                idx: self.idx.clone(),
                k: self.k,
                with_y,
            }),
        )?;
        let gx = with_x.then(|| packed.narrow(0, 0, n * d)?.reshape((n, d)));
        let gy = with_y.then(|| packed.narrow(0, n * d, m * d)?.reshape((m, d)));
        Ok([gx.transpose()?, gy.transpose()?])
    }
}

/// The gradients of [`CosinePairs`], packed flat as `[∂x (n·d) | ∂y (m·d), when asked for]`:
/// `∂x̂_i = Σ_k G_ik ŷ_{idx_ik}`, `∂ŷ_j = Σ_{idx_ik = j} G_ik x̂_i`, then each through the
/// normalisation (module docs). `O((n·k + m)·d)`: no `n × m` matrix.
pub(super) struct CosinePairsBackward {
    idx: std::sync::Arc<Vec<u32>>,
    k: usize,
    with_y: bool,
}

impl FusedOp<3> for CosinePairsBackward {
    const NAME: &'static str = "cosine-pairs-backward";

    fn forward(&self, [s1, s2, s3]: [Input<'_>; 3]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (n, d) = s1.dims2()?;
        let (m, _) = s2.dims2()?;
        let (xn, xu) = normalize_rows(s1.data, d);
        let y = s2.data;
        // ∂x̂ needs the chosen rows of ŷ only: their scales 1 / max(‖y_j‖, ε), not a
        // normalised copy of y (a memory bank has many more rows than are chosen).
        let mut inv = vec![0.0f32; m];
        for &j in self.idx.iter() {
            let j = j as usize;
            if inv[j] == 0.0 {
                let row = &y[j * d..(j + 1) * d];
                inv[j] = 1.0 / dot(row, row).sqrt().max(NORM_EPS);
            }
        }
        let g = s3.data;
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
                let (xi, yj, scaled) = (
                    &xu[i * d..(i + 1) * d],
                    &y[j * d..(j + 1) * d],
                    gik * inv[j],
                );
                for (o, &v) in gx[i * d..(i + 1) * d].iter_mut().zip(yj) {
                    *o += scaled * v;
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
            let (yn, yu) = normalize_rows(y, d);
            normalize_backward(gy, &yu, &yn, d);
        }
        Ok((out, Shape::from(total)))
    }
}

/// `s_ik = cos(x_i, y_{cols[i·k + k']})`: `k` chosen columns of `y: (m, d)` for every row of
/// `x: (n, d)`, `(n, k)`, as one op whose backward pass touches only the chosen rows. Both
/// are f32 on the CPU (the caller has checked).
pub(super) fn cosine_pairs(x: &Tensor, y: &Tensor, cols: Vec<u32>, k: usize) -> Result<Tensor> {
    let n = x.dim(0)?;
    if cols.len() != n * k {
        return Err(crate::error::Error::shape(
            "cosine_pairs",
            format!("{n} rows of {k} columns"),
            cols.len(),
        ));
    }
    let op = CosinePairs {
        idx: std::sync::Arc::new(cols),
        k,
    };
    Ok(x.contiguous()?.apply_op2(&y.contiguous()?, Fused(op))?)
}
