//! Group losses that are a function of the cosine similarity matrix alone, as one op from
//! the embeddings: CircleLoss (per anchor and pooled), MultiSimilarityLoss, SupConLoss,
//! OnlineContrastiveLoss with `all` mining, FastAPLoss and TripletLoss with `all` mining.
//!
//! ```text
//! S = x̂ ŷᵀ: (n, m)   (x̂ x̂ᵀ: its upper triangle, `cosine::gram`)      L = f(S; groups)
//! G = ∂L/∂S: (n, m)   ∂x̂ = G ŷ (self: (G + Gᵀ) x̂), ∂ŷ = Gᵀ x̂, then the normalisation
//! ```
//!
//! All of it is one op: the forward pass computes `L` and, when an input needs one, the
//! gradients, which the backward pass returns (scaled by the result's gradient). Where `G`
//! is mostly zeros (hinges that hold, mined pairs), `G x̂` is summed over its non-zero
//! entries instead of a dense product.
//!
//! Each loss walks the rows of `S` once (in parallel blocks of rows) with the masks read
//! from the group ids on the fly (`pos_ij = [g_i = h_j] ∧ ¬(self ∧ i = j)`, `neg_ij =
//! [g_i ≠ h_j]`, see `loss::masks`), so the graph holds one node where the composite form
//! holds twenty to forty `n × m` tensors, each with its zero-filled gradient buffer. The formulas and their conventions (empty rows, detached
//! weights and selections, the means) are the loss modules' own; the composite forms stay
//! the reference and `kernels::tests` checks both give the same values and gradients.
//!
//! The backward pass of each loss, written out (`σ` the logistic function, `w` the weight
//! of a row in the final mean):
//!
//! ```text
//! Circle:   ∂L/∂s_ij = w σ(lse_p + lse_n) softmax_p(l)_j (−γ α_p,j)   (pos; neg: +γ α_n,j)
//! MS:       ∂L/∂s_ij = −(1/n) e⁻ᵅ⁽ˢ⁻λ⁾ / (1 + Σ_P)  (pos)   (1/n) eᵝ⁽ˢ⁻λ⁾ / (1 + Σ_N)  (neg)
//! SupCon:   ∂L/∂s_ij = w/τ (softmax_A(S/τ)_ij − [j ∈ P(i)] / |P(i)|)
//! OCL all:  ∂L/∂s_ij = −½/|P| (pos)   +½/|N| [margin − 1 + s_ij ≥ 0] (neg)
//! FastAP:   D_ij = relu(S_ii + S_jj − 2 S_ij); ∂L/∂D through the soft histograms (below)
//! Triplet all: ∂L/∂s_an = (1/c) #{p : live(a, p, n)},  ∂L/∂s_ap = −(1/c) #{n : live(a, p, n)}
//! ```
//!
//! Triplet `all` never builds the `(n, m, m)` tensor of its composite form: per anchor it
//! walks its positives against its negatives, `O(Σ_a |P_a|·|N_a|)` time and `O(n·m)`
//! memory.

use super::*;
use rayon::prelude::*;

/// The loss the op computes from `S`, with its options in f32.
#[derive(Debug, Clone, Copy)]
pub(crate) enum GroupMatrixLoss {
    /// CircleLoss: margin `m`, scale `γ`; `pooled`: Quaterion's one softplus over the
    /// batch's pairs `i < j` (every entry against a memory).
    Circle {
        margin: f32,
        gamma: f32,
        pooled: bool,
    },
    /// MultiSimilarityLoss: `α`, `β`, base `λ`, and the mining margin `ε` (`None`: every
    /// pair).
    MultiSimilarity {
        alpha: f32,
        beta: f32,
        base: f32,
        epsilon: Option<f32>,
    },
    /// SupConLoss at temperature `τ`.
    SupCon { temperature: f32 },
    /// OnlineContrastiveLoss, `all` mining, cosine distance `1 − s`; `nonzero`: each mean
    /// over its non-zero terms (`Reduction::MeanNonZero`) instead of every term.
    OnlineContrastiveAll { margin: f32, nonzero: bool },
    /// FastAPLoss with `bins` histogram bins over `[0, 4]` (batch form only).
    FastAp { bins: usize },
    /// TripletLoss, `all` mining, cosine distance: `[s_an − s_ap + margin]_+` over every
    /// valid triplet; `nonzero`: the mean over the non-zero terms instead of every term.
    TripletAll { margin: f32, nonzero: bool },
}

/// The op: `x (n, d) → L ()` (the batch form) or `(x (n, d), y (m, d)) → L ()` (against a
/// memory), with the groups of the rows and of the columns (dense ids) and whether the
/// columns are the rows themselves.
struct GroupMatrixOp {
    loss: GroupMatrixLoss,
    rows: Vec<i32>,
    cols: Vec<i32>,
    same: bool,
    /// Whether an input needs a gradient, and whether the memory side does.
    with_grad: bool,
    with_memory_grad: bool,
    /// `∂L/∂x` and `∂L/∂y`, computed by the forward pass for the backward one.
    grads: Mutex<Option<[Option<Tensor>; 2]>>,
}

/// `ln(e^a + e^b)` of two log-sums (`−∞` for empty ones).
fn log_add(a: f32, b: f32) -> f32 {
    let m = a.max(b);
    if m == f32::NEG_INFINITY {
        return m;
    }
    m + ((a - m).exp() + (b - m).exp()).ln()
}

/// `ln(1 + eˣ)`, as `relu(x) + ln(1 + e^{−|x|})` (the composite form's).
fn softplus(x: f32) -> f32 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// `1 / (1 + e^{−x})`.
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Whether entry `j` of row `i` is a positive and a negative.
#[inline(always)]
fn kind(g: i32, h: i32, same: bool, i: usize, j: usize) -> (bool, bool) {
    let eq = g == h;
    (eq && !(same && i == j), !eq)
}

impl GroupMatrixOp {
    /// Splits `f(first row, rows of S, rows of ∂S)` over parallel blocks of rows and
    /// collects each block's result.
    fn blocks<R: Send>(
        &self,
        s: &[f32],
        g: &mut [f32],
        m: usize,
        f: impl Fn(usize, &[f32], &mut [f32]) -> R + Sync,
    ) -> Vec<R> {
        let n = self.rows.len();
        let per = par_block_rows(n, m);
        let m = m.max(1);
        s.par_chunks(per * m)
            .zip(g.par_chunks_mut(per * m))
            .enumerate()
            .map(|(b, (sb, gb))| f(b * per, sb, gb))
            .collect()
    }

    /// Circle per anchor: returns `(Σ L_i, anchors)` and leaves `∂L_i/∂S` (unweighted) in
    /// `g`.
    fn circle(&self, s: &[f32], g: &mut [f32], m: usize, margin: f32, gamma: f32) -> f64 {
        let parts = self.blocks(s, g, m, |i0, sb, gb| {
            let (mut total, mut count) = (0.0f64, 0usize);
            let mut lp = vec![0.0f32; m];
            for (r, (row, grow)) in sb.chunks_exact(m).zip(gb.chunks_exact_mut(m)).enumerate() {
                let i = i0 + r;
                let gi = self.rows[i];
                let (mut mp, mut mn) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                for (j, (&sv, l)) in row.iter().zip(lp.iter_mut()).enumerate() {
                    let (p, q) = kind(gi, self.cols[j], self.same, i, j);
                    *l = if p {
                        -gamma * (1.0 + margin - sv).max(0.0) * (sv - (1.0 - margin))
                    } else if q {
                        gamma * (sv + margin).max(0.0) * (sv - margin)
                    } else {
                        f32::NEG_INFINITY
                    };
                    if p && *l > mp {
                        mp = *l;
                    }
                    if q && *l > mn {
                        mn = *l;
                    }
                }
                if mp == f32::NEG_INFINITY || mn == f32::NEG_INFINITY {
                    grow.fill(0.0);
                    continue;
                }
                let (mut sp, mut sn) = (0.0f32, 0.0f32);
                for (j, (l, o)) in lp.iter().zip(grow.iter_mut()).enumerate() {
                    let (p, _) = kind(gi, self.cols[j], self.same, i, j);
                    if *l == f32::NEG_INFINITY {
                        *o = 0.0;
                    } else if p {
                        *o = exp_f32(l - mp);
                        sp += *o;
                    } else {
                        *o = exp_f32(l - mn);
                        sn += *o;
                    }
                }
                let z = mp + sp.ln() + mn + sn.ln();
                total += f64::from(softplus(z));
                count += 1;
                let sig = sigmoid(z);
                let (kp, kn) = (sig / sp, sig / sn);
                for (j, (o, &sv)) in grow.iter_mut().zip(row).enumerate() {
                    let (p, q) = kind(gi, self.cols[j], self.same, i, j);
                    if p {
                        *o *= kp * -gamma * (1.0 + margin - sv).max(0.0);
                    } else if q {
                        *o *= kn * gamma * (sv + margin).max(0.0);
                    }
                }
            }
            (total, count)
        });
        let (total, count) = parts
            .into_iter()
            .fold((0.0, 0), |(t, c), (a, b)| (t + a, c + b));
        let w = 1.0 / count.max(1) as f32;
        g.par_chunks_mut(PAR_MIN)
            .for_each(|c| c.iter_mut().for_each(|v| *v *= w));
        total / count.max(1) as f64
    }

    /// Circle pooled: every pair `i < j` (every entry against a memory) in one softplus.
    fn circle_pooled(&self, s: &[f32], g: &mut [f32], m: usize, margin: f32, gamma: f32) -> f64 {
        let logit = |i: usize, j: usize, sv: f32| -> (f32, bool, bool) {
            if self.same && j <= i {
                return (f32::NEG_INFINITY, false, false);
            }
            let (p, q) = kind(self.rows[i], self.cols[j], self.same, i, j);
            if p {
                (
                    -gamma * (1.0 + margin - sv).max(0.0) * (sv - (1.0 - margin)),
                    true,
                    false,
                )
            } else {
                (gamma * (sv + margin).max(0.0) * (sv - margin), false, q)
            }
        };
        // Pass 1: the log-sum-exps of the positive and the negative logits, per block
        // merged by `log_add` (a block keeps its own running maximum).
        let parts = self.blocks(s, g, m, |i0, sb, _| {
            let (mut mp, mut sp, mut mn, mut sn) =
                (f32::NEG_INFINITY, 0.0f64, f32::NEG_INFINITY, 0.0f64);
            for (r, row) in sb.chunks_exact(m).enumerate() {
                for (j, &sv) in row.iter().enumerate() {
                    let (l, p, q) = logit(i0 + r, j, sv);
                    let (mx, sum) = if p {
                        (&mut mp, &mut sp)
                    } else if q {
                        (&mut mn, &mut sn)
                    } else {
                        continue;
                    };
                    if l > *mx {
                        *sum = *sum * f64::from((*mx - l).exp()) + 1.0;
                        *mx = l;
                    } else {
                        *sum += f64::from(exp_f32(l - *mx));
                    }
                }
            }
            (mp + sp.ln() as f32, mn + sn.ln() as f32)
        });
        let (lse_p, lse_n) = parts
            .into_iter()
            .fold((f32::NEG_INFINITY, f32::NEG_INFINITY), |(a, b), (c, d)| {
                (log_add(a, c), log_add(b, d))
            });
        if lse_p == f32::NEG_INFINITY || lse_n == f32::NEG_INFINITY {
            g.fill(0.0);
            return 0.0;
        }
        let z = lse_p + lse_n;
        let sig = sigmoid(z);
        self.blocks(s, g, m, |i0, sb, gb| {
            for (r, (row, grow)) in sb.chunks_exact(m).zip(gb.chunks_exact_mut(m)).enumerate() {
                for (j, (&sv, o)) in row.iter().zip(grow.iter_mut()).enumerate() {
                    let (l, p, q) = logit(i0 + r, j, sv);
                    *o = if p {
                        sig * exp_f32(l - lse_p) * -gamma * (1.0 + margin - sv).max(0.0)
                    } else if q {
                        sig * exp_f32(l - lse_n) * gamma * (sv + margin).max(0.0)
                    } else {
                        0.0
                    };
                }
            }
        });
        f64::from(softplus(z))
    }

    /// MultiSimilarity: the mean over all `n` anchors.
    fn multi_similarity(
        &self,
        s: &[f32],
        g: &mut [f32],
        m: usize,
        (alpha, beta, base): (f32, f32, f32),
        epsilon: Option<f32>,
    ) -> f64 {
        let n = self.rows.len();
        let inv_n = 1.0 / n.max(1) as f32;
        let parts = self.blocks(s, g, m, |i0, sb, gb| {
            let mut total = 0.0f64;
            for (r, (row, grow)) in sb.chunks_exact(m).zip(gb.chunks_exact_mut(m)).enumerate() {
                let i = i0 + r;
                let gi = self.rows[i];
                // The mining thresholds, as the composite form: an empty min is `big`
                // (keeps no negative), an empty max `−big` (keeps no positive).
                let (keep_neg_above, keep_pos_below) = match epsilon {
                    None => (f32::NEG_INFINITY, f32::INFINITY),
                    Some(eps) => {
                        let (mut min_p, mut max_n) = (1.0e30f32, -1.0e30f32);
                        for (j, &sv) in row.iter().enumerate() {
                            let (p, q) = kind(gi, self.cols[j], self.same, i, j);
                            if p && sv < min_p {
                                min_p = sv;
                            }
                            if q && sv > max_n {
                                max_n = sv;
                            }
                        }
                        (min_p - eps, max_n + eps)
                    }
                };
                // Logits of the kept pairs into `grow` (others −∞), with their maxima.
                let (mut mp, mut mn) = (0.0f32, 0.0f32);
                for (j, (&sv, o)) in row.iter().zip(grow.iter_mut()).enumerate() {
                    let (p, q) = kind(gi, self.cols[j], self.same, i, j);
                    *o = if p && sv < keep_pos_below {
                        let l = -alpha * sv + alpha * base;
                        mp = mp.max(l);
                        l
                    } else if q && sv > keep_neg_above {
                        let l = beta * sv - beta * base;
                        mn = mn.max(l);
                        l
                    } else {
                        f32::NEG_INFINITY
                    };
                }
                // ln(1 + Σ e^l) = M + ln(e^{−M} + Σ e^{l − M}), M ≥ 0 the maximum with 0.
                let (mut sp, mut sn) = ((-mp).exp(), (-mn).exp());
                for (j, o) in grow.iter_mut().enumerate() {
                    if *o == f32::NEG_INFINITY {
                        *o = 0.0;
                    } else if self.rows[i] == self.cols[j] {
                        *o = exp_f32(*o - mp);
                        sp += *o;
                    } else {
                        *o = exp_f32(*o - mn);
                        sn += *o;
                    }
                }
                total += f64::from((mp + sp.ln()) / alpha + (mn + sn.ln()) / beta);
                let (kp, kn) = (-inv_n / sp, inv_n / sn);
                for (j, o) in grow.iter_mut().enumerate() {
                    *o *= if gi == self.cols[j] { kp } else { kn };
                }
            }
            total
        });
        parts.into_iter().sum::<f64>() / n.max(1) as f64
    }

    /// SupCon: the mean over the anchors with a positive.
    fn supcon(&self, s: &[f32], g: &mut [f32], m: usize, tau: f32) -> f64 {
        let parts = self.blocks(s, g, m, |i0, sb, gb| {
            let (mut total, mut count) = (0.0f64, 0usize);
            for (r, (row, grow)) in sb.chunks_exact(m).zip(gb.chunks_exact_mut(m)).enumerate() {
                let i = i0 + r;
                let gi = self.rows[i];
                let skip = self.same.then_some(i);
                let mut n_pos = 0usize;
                let mut mx = f32::NEG_INFINITY;
                let mut pos_sum = 0.0f32;
                for (j, &sv) in row.iter().enumerate() {
                    if skip == Some(j) {
                        continue;
                    }
                    let l = sv / tau;
                    mx = mx.max(l);
                    if gi == self.cols[j] {
                        n_pos += 1;
                        pos_sum += l;
                    }
                }
                if n_pos == 0 {
                    grow.fill(0.0);
                    continue;
                }
                let mut sum = 0.0f32;
                for (j, (&sv, o)) in row.iter().zip(grow.iter_mut()).enumerate() {
                    *o = if skip == Some(j) {
                        0.0
                    } else {
                        exp_f32(sv / tau - mx)
                    };
                    sum += *o;
                }
                let lden = mx + sum.ln();
                total += f64::from(lden - pos_sum / n_pos as f32);
                count += 1;
                let (inv_sum, inv_pos) = (1.0 / sum, 1.0 / n_pos as f32);
                for (j, o) in grow.iter_mut().enumerate() {
                    let p = gi == self.cols[j] && skip != Some(j);
                    *o = *o * inv_sum - if p { inv_pos } else { 0.0 };
                }
            }
            (total, count)
        });
        let (total, count) = parts
            .into_iter()
            .fold((0.0, 0), |(t, c), (a, b)| (t + a, c + b));
        let w = 1.0 / (count.max(1) as f32 * tau);
        g.par_chunks_mut(PAR_MIN)
            .for_each(|c| c.iter_mut().for_each(|v| *v *= w));
        total / count.max(1) as f64
    }

    /// OnlineContrastive `all`: `½ (Σ_P D / c_P + Σ_N relu(margin − D) / c_N)`, `D = 1 − s`.
    fn online_contrastive_all(
        &self,
        s: &[f32],
        g: &mut [f32],
        m: usize,
        margin: f32,
        nonzero: bool,
    ) -> f64 {
        // Pass 1: the sums and the counts; `g` gets −1 for a counted positive, +1 for a
        // counted negative with a live hinge, 0 otherwise (scaled in pass 2).
        let parts = self.blocks(s, g, m, |i0, sb, gb| {
            let (mut sp, mut cp, mut sn, mut cn) = (0.0f64, 0usize, 0.0f64, 0usize);
            for (r, (row, grow)) in sb.chunks_exact(m).zip(gb.chunks_exact_mut(m)).enumerate() {
                let i = i0 + r;
                let gi = self.rows[i];
                for (j, (&sv, o)) in row.iter().zip(grow.iter_mut()).enumerate() {
                    let (p, q) = kind(gi, self.cols[j], self.same, i, j);
                    let d = 1.0 - sv;
                    *o = 0.0;
                    if p {
                        if !nonzero || d != 0.0 {
                            sp += f64::from(d);
                            cp += 1;
                            *o = -1.0;
                        }
                    } else if q {
                        let pre = -d + margin;
                        let h = pre.max(0.0);
                        if !nonzero || h != 0.0 {
                            sn += f64::from(h);
                            cn += 1;
                            if pre >= 0.0 {
                                *o = 1.0;
                            }
                        }
                    }
                }
            }
            (sp, cp, sn, cn)
        });
        let (sp, cp, sn, cn) = parts.into_iter().fold((0.0, 0, 0.0, 0), |a, b| {
            (a.0 + b.0, a.1 + b.1, a.2 + b.2, a.3 + b.3)
        });
        let (cp, cn) = (cp.max(1) as f64, cn.max(1) as f64);
        let (kp, kn) = ((0.5 / cp) as f32, (0.5 / cn) as f32);
        g.par_chunks_mut(PAR_MIN).for_each(|c| {
            c.iter_mut()
                .for_each(|v| *v *= if *v < 0.0 { kp } else { kn })
        });
        0.5 * (sp / cp + sn / cn)
    }

    /// Triplet `all`: `mean [s_an − s_ap + margin]_+` over the valid triplets (with
    /// `nonzero`, over those whose term is positive).
    fn triplet_all(&self, s: &[f32], g: &mut [f32], m: usize, margin: f32, nonzero: bool) -> f64 {
        // Pass 1: per block, the sum of the terms and their count; `g` gets the counts of
        // live triplets each entry is in, signed (positives −, negatives +).
        let parts = self.blocks(s, g, m, |i0, sb, gb| {
            let (mut total, mut count) = (0.0f64, 0usize);
            let (mut pos, mut neg) = (Vec::new(), Vec::new());
            let mut neg_s = Vec::new();
            let mut live_n = Vec::new();
            for (r, (row, grow)) in sb.chunks_exact(m).zip(gb.chunks_exact_mut(m)).enumerate() {
                let i = i0 + r;
                let gi = self.rows[i];
                grow.fill(0.0);
                pos.clear();
                neg.clear();
                for j in 0..m {
                    let (p, q) = kind(gi, self.cols[j], self.same, i, j);
                    if p {
                        pos.push(j);
                    } else if q {
                        neg.push(j);
                    }
                }
                if pos.is_empty() || neg.is_empty() {
                    continue;
                }
                neg_s.clear();
                neg_s.extend(neg.iter().map(|&j| row[j]));
                live_n.clear();
                live_n.resize(neg.len(), 0.0f32);
                for &p in &pos {
                    let sp = row[p];
                    let (mut sum, mut live, mut counted) = (0.0f32, 0usize, 0usize);
                    for (&sn, ln) in neg_s.iter().zip(live_n.iter_mut()) {
                        // The composite form: d_ap − d_an + m with d = 1 − s.
                        let pre = (1.0 - sp) - (1.0 - sn) + margin;
                        let t = pre.max(0.0);
                        let counts = !nonzero || t != 0.0;
                        let grad = counts && pre >= 0.0;
                        sum += t;
                        counted += usize::from(counts);
                        live += usize::from(grad);
                        *ln += if grad { 1.0 } else { 0.0 };
                    }
                    total += f64::from(sum);
                    count += counted;
                    grow[p] -= live as f32;
                }
                for (&j, &ln) in neg.iter().zip(&live_n) {
                    grow[j] += ln;
                }
            }
            (total, count)
        });
        let (total, count) = parts
            .into_iter()
            .fold((0.0, 0), |(t, c), (a, b)| (t + a, c + b));
        let w = 1.0 / count.max(1) as f32;
        g.par_chunks_mut(PAR_MIN)
            .for_each(|c| c.iter_mut().for_each(|v| *v *= w));
        total / count.max(1) as f64
    }

    /// FastAP (batch form, `S` square): see the loss module for the histograms.
    fn fast_ap(&self, s: &[f32], g: &mut [f32], n: usize, bins: usize) -> f64 {
        let delta = 4.0 / bins as f32;
        let slope = -1.0 / delta;
        let centre = |k: usize| (k as f64 * (4.0 / bins as f64)) as f32;
        let diag: Vec<f32> = (0..n).map(|i| s[i * n + i]).collect();
        // Per block: (Σ (1 − FastAP_i), anchors, column sums of ∂L/∂D for ∂S_jj).
        let parts = self.blocks(s, g, n, |i0, sb, gb| {
            let (mut total, mut count) = (0.0f64, 0usize);
            let mut col = vec![0.0f32; n];
            let (mut hp, mut ha) = (vec![0.0f32; bins + 1], vec![0.0f32; bins + 1]);
            let (mut gp, mut ga) = (vec![0.0f32; bins + 1], vec![0.0f32; bins + 1]);
            let mut dist = vec![0.0f32; n];
            for (r, (row, grow)) in sb.chunks_exact(n).zip(gb.chunks_exact_mut(n)).enumerate() {
                let i = i0 + r;
                let gi = self.rows[i];
                hp.fill(0.0);
                ha.fill(0.0);
                let mut n_pos = 0usize;
                for (j, (&sv, dj)) in row.iter().zip(dist.iter_mut()).enumerate() {
                    *dj = diag[i] + diag[j] - 2.0 * sv;
                    let (p, q) = kind(gi, self.cols[j], true, i, j);
                    if !(p || q) {
                        continue;
                    }
                    n_pos += usize::from(p);
                    let d = dj.max(0.0);
                    let k0 = ((d / delta) as usize).min(bins);
                    for k in k0.saturating_sub(1)..=(k0 + 1).min(bins) {
                        let t = (d - centre(k)).abs() * slope + 1.0;
                        if t > 0.0 {
                            ha[k] += t;
                            if p {
                                hp[k] += t;
                            }
                        }
                    }
                }
                grow.fill(0.0);
                if n_pos == 0 {
                    continue;
                }
                // FastAP = (1/n⁺) Σ_k h⁺_k H⁺_k / H_k over the k with H_k > 0; its
                // derivatives by h⁺_l and h_l, back-to-front sums over k ≥ l.
                let inv = 1.0 / n_pos as f32;
                let (mut cum_p, mut cum_a) = (0.0f32, 0.0f32);
                let mut cum = vec![(0.0f32, 0.0f32); bins + 1];
                let mut ap = 0.0f32;
                for k in 0..=bins {
                    cum_p += hp[k];
                    cum_a += ha[k];
                    cum[k] = (cum_p, cum_a);
                    if cum_a > 0.0 {
                        ap += hp[k] * cum_p / cum_a;
                    }
                }
                total += f64::from(1.0 - ap * inv);
                count += 1;
                let (mut tail_p, mut tail_a) = (0.0f32, 0.0f32);
                for k in (0..=bins).rev() {
                    let (cp, ca) = cum[k];
                    if ca > 0.0 {
                        tail_p += hp[k] / ca;
                        tail_a += hp[k] * cp / (ca * ca);
                        gp[k] = cp / ca + tail_p;
                    } else {
                        gp[k] = tail_p;
                    }
                    ga[k] = -tail_a;
                }
                // ∂(1 − FastAP_i)/∂D_ij (unweighted by the anchor count).
                let mut row_sum = 0.0f32;
                for (j, (o, &dr)) in grow.iter_mut().zip(dist.iter()).enumerate() {
                    let (p, q) = kind(gi, self.cols[j], true, i, j);
                    if !(p || q) || dr < 0.0 {
                        continue;
                    }
                    let d = dr;
                    let k0 = ((d / delta) as usize).min(bins);
                    let mut dd = 0.0f32;
                    for k in k0.saturating_sub(1)..=(k0 + 1).min(bins) {
                        let x = d - centre(k);
                        let t = x.abs() * slope + 1.0;
                        if t >= 0.0 {
                            let w = if p { gp[k] + ga[k] } else { ga[k] };
                            let sign = if x >= 0.0 { 1.0 } else { -1.0 };
                            dd += w * sign * slope;
                        }
                    }
                    let dd = -dd * inv;
                    // D_ij = S_ii + S_jj − 2 S_ij.
                    *o = -2.0 * dd;
                    row_sum += dd;
                    col[j] += dd;
                }
                grow[i] += row_sum;
            }
            (total, count, col)
        });
        let mut total = 0.0f64;
        let mut count = 0usize;
        let mut col = vec![0.0f32; n];
        for (t, c, cs) in parts {
            total += t;
            count += c;
            col.iter_mut().zip(&cs).for_each(|(a, b)| *a += b);
        }
        for (j, c) in col.iter().enumerate() {
            g[j * n + j] += c;
        }
        let w = 1.0 / count.max(1) as f32;
        g.par_chunks_mut(PAR_MIN)
            .for_each(|c| c.iter_mut().for_each(|v| *v *= w));
        total / count.max(1) as f64
    }
}

impl GroupMatrixOp {
    /// The loss of similarities `s: (n, m)`, leaving `∂L/∂S` in `g`.
    fn value(&self, s: &[f32], g: &mut [f32], n: usize, m: usize) -> candle_core::Result<f64> {
        if n != self.rows.len() || m != self.cols.len() {
            candle_core::bail!(
                "group-matrix-loss: similarities ({n}, {m}) against {} row and {} column groups",
                self.rows.len(),
                self.cols.len()
            );
        }
        if n == 0 || m == 0 {
            return Ok(0.0);
        }
        Ok(match self.loss {
            GroupMatrixLoss::Circle {
                margin,
                gamma,
                pooled: false,
            } => self.circle(s, g, m, margin, gamma),
            GroupMatrixLoss::Circle {
                margin,
                gamma,
                pooled: true,
            } => self.circle_pooled(s, g, m, margin, gamma),
            GroupMatrixLoss::MultiSimilarity {
                alpha,
                beta,
                base,
                epsilon,
            } => self.multi_similarity(s, g, m, (alpha, beta, base), epsilon),
            GroupMatrixLoss::SupCon { temperature } => self.supcon(s, g, m, temperature),
            GroupMatrixLoss::OnlineContrastiveAll { margin, nonzero } => {
                self.online_contrastive_all(s, g, m, margin, nonzero)
            }
            GroupMatrixLoss::TripletAll { margin, nonzero } => {
                self.triplet_all(s, g, m, margin, nonzero)
            }
            GroupMatrixLoss::FastAp { bins } => {
                if !self.same || n != m {
                    candle_core::bail!("group-matrix-loss: FastAP takes the batch form only");
                }
                self.fast_ap(s, g, n, bins)
            }
        })
    }

    /// The stored gradients, scaled by the result's.
    fn scaled(&self, grad: &Tensor, with: [bool; 2]) -> candle_core::Result<[Option<Tensor>; 2]> {
        let [gx, gy] = self
            .grads
            .lock()
            .expect("group-matrix-loss state")
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("group-matrix-loss: no forward".into()))?;
        let k = f64::from(grad.to_scalar::<f32>()?);
        let scale = |t: Option<Tensor>, w: bool| -> candle_core::Result<Option<Tensor>> {
            match t.filter(|_| w) {
                Some(t) if k != 1.0 => Ok(Some(t.affine(k, 0.0)?)),
                t => Ok(t),
            }
        };
        Ok([scale(gx, with[0])?, scale(gy, with[1])?])
    }
}

/// Below this share of non-zero entries `G x̂` runs row by row over the non-zeros.
const SPARSE_SHARE: usize = 8;

simd_fn! {
    /// `out += w · x` (one row).
    fn axpy(out: &mut [f32], w: f32, x: &[f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o += w * v;
        }
    }
}

/// `out (n × d) = g (n × n) · u (n × d)`: a dense product, or, where fewer than one entry
/// in [`SPARSE_SHARE`] of `g` is non-zero (a hinge loss whose margins hold, mined pairs),
/// one scaled row of `u` per non-zero entry, blocks of rows in parallel.
fn sparse_or_dense_product(out: &mut [f32], g: &[f32], u: &[f32], n: usize, d: usize) {
    let nnz = g
        .par_chunks(PAR_MIN)
        .map(|c| c.iter().filter(|&&v| v != 0.0).count())
        .sum::<usize>();
    if nnz * SPARSE_SHARE >= n * n || d == 0 {
        gemm(out, g, u, n, d, n, false, false);
        return;
    }
    let per = par_block_rows(n, n);
    out.par_chunks_mut(per * d)
        .zip(g.par_chunks(per * n))
        .for_each(|(ob, gb)| {
            for (o, row) in ob.chunks_exact_mut(d).zip(gb.chunks_exact(n)) {
                for (j, &w) in row.iter().enumerate() {
                    if w != 0.0 {
                        axpy(o, w, &u[j * d..(j + 1) * d]);
                    }
                }
            }
        });
}

/// The batch form: `x (n, d) → L ()`, `S = x̂ x̂ᵀ`, `∂x̂ = (G + Gᵀ) x̂`.
impl FusedOp<1> for GroupMatrixOp {
    const NAME: &'static str = "group-matrix-loss";

    fn forward(&self, [x]: [Input<'_>; 1]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (n, d) = x.dims2()?;
        let (norms, unit) = normalize_rows(x.data, d);
        let mut s = vec![0.0f32; n * n];
        cosine::gram(&mut s, &unit, n, d);
        let mut g = vec![0.0f32; n * n];
        let value = self.value(&s, &mut g, n, n)?;
        if self.with_grad {
            // `s` is free: it takes G + Gᵀ.
            cosine::add_transpose(&mut s, &g, n);
            drop(g);
            let mut gx = vec![0.0f32; n * d];
            sparse_or_dense_product(&mut gx, &s, &unit, n, d);
            normalize_backward(&mut gx, &unit, &norms, d);
            *self.grads.lock().expect("group-matrix-loss state") = Some([
                Some(Tensor::from_vec(gx, (n, d), &candle_core::Device::Cpu)?),
                None,
            ]);
        }
        Ok((vec![value as f32], Shape::from(())))
    }

    fn backward(
        &self,
        [x]: [&Tensor; 1],
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 1]> {
        let [gx, _] = self.scaled(grad, [x.track_op(), false])?;
        Ok([gx])
    }
}

/// The memory form: `(x (n, d), y (m, d)) → L ()`, `S = x̂ ŷᵀ`, `∂x̂ = G ŷ`, `∂ŷ = Gᵀ x̂`
/// (only when `y` needs it: a memory bank is detached).
impl FusedOp<2> for GroupMatrixOp {
    const NAME: &'static str = "group-matrix-loss";

    fn forward(&self, [x, y]: [Input<'_>; 2]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (n, d) = x.dims2()?;
        let (m, dy) = y.dims2()?;
        if dy != d {
            candle_core::bail!("group-matrix-loss: rows of {d} and {dy} columns");
        }
        let (xn, xu) = normalize_rows(x.data, d);
        let (yn, yu) = normalize_rows(y.data, d);
        let mut s = vec![0.0f32; n * m];
        gemm(&mut s, &xu, &yu, n, m, d, false, true);
        let value = self.value(&s.clone(), &mut s, n, m)?;
        if self.with_grad {
            let dev = candle_core::Device::Cpu;
            let mut gx = vec![0.0f32; n * d];
            gemm(&mut gx, &s, &yu, n, d, m, false, false);
            normalize_backward(&mut gx, &xu, &xn, d);
            let gy = if self.with_memory_grad {
                let mut gy = vec![0.0f32; m * d];
                gemm(&mut gy, &s, &xu, m, d, n, true, false);
                normalize_backward(&mut gy, &yu, &yn, d);
                Some(Tensor::from_vec(gy, (m, d), &dev)?)
            } else {
                None
            };
            *self.grads.lock().expect("group-matrix-loss state") =
                Some([Some(Tensor::from_vec(gx, (n, d), &dev)?), gy]);
        }
        Ok((vec![value as f32], Shape::from(())))
    }

    fn backward(
        &self,
        [x, y]: [&Tensor; 2],
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 2]> {
        self.scaled(grad, [x.track_op(), y.track_op()])
    }
}

/// `loss` of the cosine similarities of `x: (n, d)` (groups `groups: (n)`) against
/// themselves or against a memory `(y: (m, d), groups (m))`, as one op that computes the
/// similarities, the loss and, when an input needs them, the gradients (kept for the
/// backward pass); `None` where the kernels do not apply (another device or dtype, ids not
/// `i64`). Shapes are checked by the caller.
pub(crate) fn cosine_group_loss(
    x: &Tensor,
    groups: &Tensor,
    memory: Option<(&Tensor, &Tensor)>,
    loss: GroupMatrixLoss,
) -> Result<Option<Tensor>> {
    if !applies(&[x]) || !memory.is_none_or(|(y, _)| applies(&[y])) {
        return Ok(None);
    }
    let Some((ga, gb)) = mining::group_ids(groups, memory.map(|m| m.1))? else {
        return Ok(None);
    };
    let (rows, cols) = mining::dense_groups(&ga, &gb);
    let with_memory_grad = memory.is_some_and(|(y, _)| y.track_op());
    let with_grad = x.track_op() || with_memory_grad;
    let op = GroupMatrixOp {
        loss,
        rows,
        cols,
        same: memory.is_none(),
        with_grad,
        with_memory_grad,
        grads: Mutex::new(None),
    };
    let x = x.contiguous()?;
    Ok(Some(match memory {
        None if with_grad => x.apply_op1(Fused(op))?,
        None => x.apply_op1_no_bwd(&Fused(op))?,
        Some((y, _)) => {
            let y = y.contiguous()?;
            if with_grad {
                x.apply_op2(&y, Fused(op))?
            } else {
                x.apply_op2_no_bwd(&y, &Fused(op))?
            }
        }
    }))
}
