//! Batch-hard mining and group masks.
//!
//! For anchors with groups `a: (n)` against candidates with groups `b: (m)` (`b = a` with
//! the anchor itself excluded): the farthest same-group candidate and the closest
//! other-group candidate of every anchor, found in one vectorised pass per row:
//!
//! ```text
//! p*(i) = argmin_{j: b_j = a_i, j ≠ i} cos(x_i, y_j)     n*(i) = argmax_{j: b_j ≠ a_i} cos(x_i, y_j)
//! ```
//!
//! (on a distance matrix the same with `−d` as the closeness). Ties go to the first column.

use super::*;

/// The group ids of both sides as host vectors, `b = None` meaning `a` itself; `None` when
/// either is not `i64`.
pub(super) fn group_ids(a: &Tensor, b: Option<&Tensor>) -> Result<Option<(Vec<i64>, Vec<i64>)>> {
    if a.dtype() != DType::I64 || b.is_some_and(|b| b.dtype() != DType::I64) {
        return Ok(None);
    }
    let ga = a.to_vec1::<i64>()?;
    let gb = match b {
        Some(b) => b.to_vec1::<i64>()?,
        None => ga.clone(),
    };
    Ok(Some((ga, gb)))
}

/// Group masks (see `loss::masks`) as f32 `{0, 1}` matrices built in one pass, or `None`
/// where this does not apply (another device, dtype or id type).
pub(crate) fn group_masks(
    a: &Tensor,
    b: Option<&Tensor>,
    dtype: DType,
) -> Result<Option<(Tensor, Tensor)>> {
    if dtype != DType::F32 || !a.device().is_cpu() {
        return Ok(None);
    }
    let Some((ga, gb)) = group_ids(a, b)? else {
        return Ok(None);
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
    if !applies(&[d]) {
        return Ok(None);
    }
    let Some((ga, gb)) = group_ids(a, b)? else {
        return Ok(None);
    };
    let (n, m) = d.dims2()?;
    if ga.len() != n || gb.len() != m {
        return Err(crate::error::Error::shape(
            "batch-hard mining group ids",
            format!("{n} and {m} ids"),
            (ga.len(), gb.len()),
        ));
    }
    let (ga, gb) = dense_groups(&ga, &gb);
    let dv = d.detach().contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    // Closeness is −d: the farthest positive has the smallest, the nearest negative the
    // largest.
    let flip = vec![-1.0f32; m];
    let (mut pos_idx, mut neg_idx, mut valid) = (vec![0u32; n], vec![0u32; n], vec![0f32; n]);
    for i in 0..n {
        let skip = b.is_none().then_some(i);
        if let (Some(p), Some(q)) = mine_row(&dv[i * m..(i + 1) * m], &flip, ga[i], &gb, skip) {
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

/// Dense `i32` ids for the group ids of both sides (so that the mining passes compare
/// 32-bit lanes), in order: `a` then `b`.
pub(super) fn dense_groups(a: &[i64], b: &[i64]) -> (Vec<i32>, Vec<i32>) {
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
    /// of the closest other-group entry (largest), the first on ties, never column `skip`;
    /// each `None` when the row has no such entry.
    pub(super) fn mine_row(s: &[f32], inv: &[f32], g: i32, gb: &[i32], skip: Option<usize>) -> (Option<u32>, Option<u32>) {
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
        let mut cols = s.iter().zip(inv).zip(gb).enumerate();
        let p = pbest.is_finite().then(|| {
            cols.clone()
                .position(|(j, ((&v, &iv), &gv))| gv == g && Some(j) != skip && v * iv == pbest)
        });
        let q = nbest
            .is_finite()
            .then(|| cols.position(|(_, ((&v, &iv), &gv))| gv != g && v * iv == nbest));
        (p.flatten().map(|j| j as u32), q.flatten().map(|j| j as u32))
    }
}

/// Batch-hard cosine mining without a similarity matrix in the graph: `x̂ ŷᵀ` is computed
/// into a scratch buffer in blocks of rows and mined as it goes. Output `(n, 4)` f32:
/// positive column, has a positive, negative column, has a negative (`{0, 1}`; a missing
/// column is 0).
pub(super) struct CosineMine {
    ga: Vec<i32>,
    gb: Vec<i32>,
    self_excluded: bool,
}

impl FusedOp<2> for CosineMine {
    const NAME: &'static str = "cosine-mine";

    fn forward(&self, [s1, s2]: [Input<'_>; 2]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (n, d) = s1.dims2()?;
        let (m, _) = s2.dims2()?;
        if self.ga.len() != n || self.gb.len() != m {
            candle_core::bail!(
                "cosine-mine: {} and {} group ids for ({n}, {m}) rows",
                self.ga.len(),
                self.gb.len()
            );
        }
        let (_, xu) = normalize_rows(s1.data, d);
        let mut out = vec![0.0f32; n * 4];
        if self.self_excluded && n == m && n * n <= SELF_GRAM_MAX {
            // Against itself: the symmetric product of the unit rows (half the
            // multiply-adds), mined with unit column scales, rows in parallel.
            let mut sims = vec![0.0f32; n * n];
            super::cosine::gram(&mut sims, &xu, n, d);
            let ones = vec![1.0f32; n];
            self.mine_rows(&sims, &ones, 0, n, &mut out);
            return Ok((out, Shape::from((n, 4))));
        }
        let y = s2.data;
        // x̂ · y_j scaled by 1 / ‖y_j‖ inside the mining pass: ŷ is never written.
        let inv = inverse_norms(y, d);
        // Rows per block. Each gemm call packs all of y, so blocks are large: up to 16 MB
        // of products per block (whole batches against a 4,096-row memory).
        let block = (4_194_304 / m.max(1)).clamp(16, n.max(16));
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
            self.mine_rows(
                sims,
                &inv,
                start,
                m,
                &mut out[start * 4..(start + rows) * 4],
            );
        }
        Ok((out, Shape::from((n, 4))))
    }
}

/// Rows `n · n` at most whose self-product [`CosineMine`] computes whole (16 MB).
const SELF_GRAM_MAX: usize = 4_194_304;

impl CosineMine {
    /// Mines the rows `start..` of the products `sims` (rows of width `m`, column scales
    /// `inv`) into their rows of `out` (4 per row), blocks of rows in parallel.
    fn mine_rows(&self, sims: &[f32], inv: &[f32], start: usize, m: usize, out: &mut [f32]) {
        use rayon::prelude::*;
        let rows = out.len() / 4;
        let per = par_block_rows(rows, m);
        out.par_chunks_mut(per * 4)
            .zip(sims.par_chunks(per * m.max(1)))
            .enumerate()
            .for_each(|(b, (ob, sb))| {
                for (r, (row, s)) in ob
                    .chunks_exact_mut(4)
                    .zip(sb.chunks_exact(m.max(1)))
                    .enumerate()
                {
                    let i = start + b * per + r;
                    let skip = self.self_excluded.then_some(i);
                    let (p, q) = mine_row(s, inv, self.ga[i], &self.gb, skip);
                    if let Some(p) = p {
                        row[..2].copy_from_slice(&[p as f32, 1.0]);
                    }
                    if let Some(q) = q {
                        row[2..].copy_from_slice(&[q as f32, 1.0]);
                    }
                }
            });
    }
}

/// Runs [`CosineMine`]: `(n, 4)` as it documents, or `None` where it does not apply.
fn cosine_mine(
    x: &Tensor,
    y: Option<&Tensor>,
    a: &Tensor,
    b: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    if !applies(&[x]) || !y.is_none_or(|y| applies(&[y])) {
        return Ok(None);
    }
    let Some((ga, gb)) = group_ids(a, b)? else {
        return Ok(None);
    };
    let (ga, gb) = dense_groups(&ga, &gb);
    let op = CosineMine {
        ga,
        gb,
        self_excluded: b.is_none(),
    };
    let x = x.detach().contiguous()?;
    let y = y.map_or_else(|| x.clone(), |y| y.detach()).contiguous()?;
    Ok(Some(x.apply_op2_no_bwd(&y, &Fused(op))?))
}

/// The hardest candidates of every anchor for the cosine distance `1 − cos`, as distances
/// whose gradient reaches only those pairs.
pub(crate) struct Hardest {
    /// Distance to the farthest positive, `(n)` (to an arbitrary row when there is none).
    pub pos: Tensor,
    /// Whether the anchor has a positive, `(n)` `{0, 1}` f32.
    pub has_pos: Tensor,
    /// Distance to the nearest negative, `(n)` (to an arbitrary row when there is none).
    pub neg: Tensor,
    /// Whether the anchor has a negative, `(n)` `{0, 1}` f32.
    pub has_neg: Tensor,
}

/// Batch-hard mining for the cosine distance of `x: (n, d)` against `y: (m, d)` (`None`:
/// `x` itself, the anchor excluded), groups `a: (n)`, `b: (m)`: the columns are mined on
/// detached similarities (no `(n, m)` matrix in the graph) and only the chosen pairs are
/// recomputed with gradient, `O(n·d)` backward. `None` where this does not apply.
pub(crate) fn cosine_hardest(
    x: &Tensor,
    y: Option<&Tensor>,
    a: &Tensor,
    b: Option<&Tensor>,
) -> Result<Option<Hardest>> {
    let Some(mined) = cosine_mine(x, y, a, b)? else {
        return Ok(None);
    };
    // Rows of [positive column, has one, negative column, has one].
    let rows = mined.to_vec2::<f32>()?;
    let cols = rows
        .iter()
        .flat_map(|r| [r[0] as u32, r[2] as u32])
        .collect();
    let d = (1.0 - super::cosine::cosine_pairs(x, y.unwrap_or(x), cols, 2)?)?;
    let flag = |k: usize| {
        let v: Vec<f32> = rows.iter().map(|r| r[k]).collect();
        Tensor::from_vec(v, rows.len(), x.device())
    };
    Ok(Some(Hardest {
        pos: d.narrow(1, 0, 1)?.squeeze(1)?,
        has_pos: flag(1)?,
        neg: d.narrow(1, 1, 1)?.squeeze(1)?,
        has_neg: flag(3)?,
    }))
}
