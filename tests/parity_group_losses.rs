//! Group losses against Quaterion 0.1.35 (`tests/parity/loss_{triplet,circle,fast_ap}.json`,
//! see `tests/parity/SCHEMA.md`), against independent f64 references where Quaterion is
//! wrong or not comparable, and finite-difference gradient checks for every loss and mode.
//!
//! Tolerances: 1e-5 relative on values, 1e-4 on gradients, unless a case says otherwise.
//!
//! The cosine scale: Quaterion's cosine *distance matrix* is `(1 − cos) / 2` and its
//! similarity matrix `(1 + cos) / 2`; ours are `1 − cos` and `cos`. Where a formula is
//! homogeneous in the distance the equivalence is exact and asserted (triplet `all`:
//! ours with margin `2m` = 2 × Quaterion's with margin `m`; triplet `hard` with the
//! mean-negative scaling is scale-free); elsewhere the f64 reference is run once on
//! Quaterion's half-scale distances (it must reproduce Quaterion, which validates the
//! reference) and once on ours (it must reproduce our loss).

mod common;

use serde_json::Value;
use similarity_core::Tensor;
use similarity_core::candle_core::{DType, Var};
use similarity_core::data::GroupTargets;
use similarity_core::distance::Distance;
use similarity_core::loss::{
    CircleLoss, CircleLossConfig, FastAPLoss, FastAPLossConfig, MemoryLoss, MultiSimilarityLoss,
    MultiSimilarityLossConfig, Reduction, SemiHardFallback, SimilarityLoss, TripletLoss,
    TripletLossConfig, TripletMining, triplet_mask,
};
use similarity_core::nn::Params;

use common::check_gradient;
use common::parity::{assert_close, load, lookup, tensor, values};

// ---------------------------------------------------------------------------------------
// Inputs and plumbing
// ---------------------------------------------------------------------------------------

fn build<L: SimilarityLoss>(config: L::Config) -> L {
    L::new(
        4,
        config,
        &mut Params::new(&common::device(), 0).scope("loss"),
    )
    .unwrap()
}

fn groups_tensor(g: &[i64]) -> Tensor {
    Tensor::new(g, &common::device()).unwrap()
}

fn targets(g: &[i64]) -> GroupTargets {
    GroupTargets {
        groups: groups_tensor(g),
    }
}

/// Group ids of a parity tensor.
fn group_ids(t: &Value) -> Vec<i64> {
    values(t).0.into_iter().map(|v| v as i64).collect()
}

/// Rows of an embeddings parity tensor, in f64 (the exact f32 values).
fn rows(t: &Value) -> Vec<Vec<f64>> {
    let (v, shape) = values(t);
    v.chunks(shape[1])
        .map(|r| r.iter().map(|&x| x as f64).collect())
        .collect()
}

fn distance_of(name: &str) -> Distance {
    match name {
        "cosine" => Distance::Cosine,
        "euclidean" => Distance::Euclidean,
        "manhattan" => Distance::Manhattan,
        "dot_product" => Distance::DotProduct,
        other => panic!("unknown distance {other}"),
    }
}

/// The loss value and gradient w.r.t. the (f32) embeddings of `f`.
fn value_and_grad(x: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> (f64, Tensor) {
    let var = Var::from_tensor(x).unwrap();
    let loss = f(var.as_tensor());
    let grad = loss.backward().unwrap().get(&var).unwrap().clone();
    let v = loss
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    (v, grad)
}

fn assert_close_to(got: f64, want: f64, tol: f64, what: &str) {
    assert!(
        (got - want).abs() <= tol,
        "{what}: got {got}, expected {want} (difference {:e}, tolerance {tol:e})",
        (got - want).abs()
    );
}

fn assert_rel(got: f64, want: f64, rel: f64, what: &str) {
    assert!(
        (got - want).abs() <= rel * want.abs().max(1e-6),
        "{what}: got {got}, expected {want}"
    );
}

/// Small random f64 inputs for the gradient checks (a fixed LCG, no RNG crate).
fn random(n: usize, d: usize, seed: u64) -> Tensor {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f64> = (0..n * d)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, (n, d), &common::device()).unwrap()
}

// ---------------------------------------------------------------------------------------
// f64 references (plain loops, written from the formulas in the module docs)
// ---------------------------------------------------------------------------------------

fn dot(x: &[f64], y: &[f64]) -> f64 {
    x.iter().zip(y).map(|(a, b)| a * b).sum()
}

/// Distance; `half_cosine` gives Quaterion's matrix scale `(1 − cos) / 2`.
fn ref_distance(kind: &str, x: &[f64], y: &[f64], half_cosine: bool) -> f64 {
    match kind {
        "cosine" => {
            let d = 1.0 - dot(x, y) / (dot(x, x).sqrt() * dot(y, y).sqrt());
            if half_cosine { d / 2.0 } else { d }
        }
        "euclidean" => x
            .iter()
            .zip(y)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            .sqrt(),
        "manhattan" => x.iter().zip(y).map(|(a, b)| (a - b).abs()).sum(),
        "dot_product" => -dot(x, y),
        other => panic!("{other}"),
    }
}

/// Similarity; `half_cosine` gives Quaterion's matrix scale `(1 + cos) / 2`.
fn ref_similarity(kind: &str, x: &[f64], y: &[f64], half_cosine: bool) -> f64 {
    match kind {
        "cosine" => {
            let c = dot(x, y) / (dot(x, x).sqrt() * dot(y, y).sqrt());
            if half_cosine { (1.0 + c) / 2.0 } else { c }
        }
        "dot_product" => dot(x, y),
        _ => 1.0 / (1.0 + ref_distance(kind, x, y, false)),
    }
}

/// Anchors `a` against candidates `b` (`None`: the batch itself): for every anchor the
/// (distance-or-similarity, is positive) of each candidate that is a positive or negative.
struct Pairs {
    /// `(value, positive?)` per anchor.
    rows: Vec<Vec<(f64, bool)>>,
}

fn ref_pairs(
    a: &[Vec<f64>],
    ga: &[i64],
    b: Option<(&[Vec<f64>], &[i64])>,
    f: impl Fn(&[f64], &[f64]) -> f64,
) -> Pairs {
    let rows = a
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let (cands, gb) = b.unwrap_or((a, ga));
            cands
                .iter()
                .enumerate()
                .filter(|(j, _)| b.is_some() || *j != i)
                .map(|(j, y)| (f(x, y), gb[j] == ga[i]))
                .collect()
        })
        .collect();
    Pairs { rows }
}

fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

#[derive(Clone, Copy)]
struct TripletRef {
    margin: f64,
    mining: TripletMining,
    soft: bool,
    scale: bool,
    /// Quaterion's hard mining: an anchor without a positive still counts, with its hardest
    /// positive at distance 0 (its masked row maximum), for non-negative distances.
    quaterion_hard: bool,
    /// Semi-hard mining without a negative farther than the positive: the anchor's
    /// farthest negative, else its hardest.
    farthest_fallback: bool,
}

/// Our triplet loss, from distance rows.
fn ref_triplet(p: &Pairs, c: TripletRef) -> f64 {
    match c.mining {
        TripletMining::All => {
            let (mut sum, mut count) = (0.0, 0usize);
            for row in &p.rows {
                for &(dp, _) in row.iter().filter(|e| e.1) {
                    for &(dn, _) in row.iter().filter(|e| !e.1) {
                        let t = dp - dn + c.margin;
                        if t > 0.0 {
                            sum += t;
                            count += 1;
                        }
                    }
                }
            }
            if count == 0 { 0.0 } else { sum / count as f64 }
        }
        TripletMining::Hard => {
            let hard: Vec<(f64, f64)> = p
                .rows
                .iter()
                .filter_map(|row| {
                    let dp = row.iter().filter(|e| e.1).map(|e| e.0).reduce(f64::max);
                    let dp = if c.quaterion_hard {
                        dp.unwrap_or(0.0).max(0.0)
                    } else {
                        dp?
                    };
                    let dn = row.iter().filter(|e| !e.1).map(|e| e.0).reduce(f64::min)?;
                    Some((dp, dn))
                })
                .collect();
            if hard.is_empty() {
                return 0.0;
            }
            let mean_neg = hard.iter().map(|h| h.1).sum::<f64>() / hard.len() as f64;
            let per: Vec<f64> = hard
                .iter()
                .map(|&(dp, dn)| {
                    if c.soft {
                        softplus(dp - dn)
                    } else if c.scale {
                        ((dp - dn) / mean_neg + c.margin).max(0.0)
                    } else {
                        (dp - dn + c.margin).max(0.0)
                    }
                })
                .collect();
            per.iter().sum::<f64>() / per.len() as f64
        }
        TripletMining::SemiHard => {
            let mut terms = Vec::new();
            for row in &p.rows {
                let negs: Vec<f64> = row.iter().filter(|e| !e.1).map(|e| e.0).collect();
                if negs.is_empty() {
                    continue;
                }
                let fallback = if c.farthest_fallback {
                    negs.iter().copied().fold(f64::NEG_INFINITY, f64::max)
                } else {
                    negs.iter().copied().fold(f64::INFINITY, f64::min)
                };
                for &(dp, _) in row.iter().filter(|e| e.1) {
                    let dn = negs
                        .iter()
                        .copied()
                        .filter(|&dn| dn > dp)
                        .fold(f64::INFINITY, f64::min);
                    let dn = if dn.is_finite() { dn } else { fallback };
                    terms.push((dp - dn + c.margin).max(0.0));
                }
            }
            if terms.is_empty() {
                0.0
            } else {
                terms.iter().sum::<f64>() / terms.len() as f64
            }
        }
    }
}

fn logsumexp(v: &[f64]) -> f64 {
    let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
}

/// Circle loss over pooled pairs `(similarity, positive?)`; `paper_signs = false` gives
/// Quaterion's flipped weights.
fn ref_circle(pairs: &[(f64, bool)], margin: f64, gamma: f64, paper_signs: bool) -> f64 {
    let (mut lp, mut ln) = (Vec::new(), Vec::new());
    for &(s, pos) in pairs {
        if pos {
            let a = if paper_signs {
                1.0 + margin - s
            } else {
                1.0 + margin + s
            };
            lp.push(-gamma * a.max(0.0) * (s - (1.0 - margin)));
        } else {
            let a = if paper_signs { s + margin } else { s - margin };
            ln.push(gamma * a.max(0.0) * (s - margin));
        }
    }
    softplus(logsumexp(&lp) + logsumexp(&ln))
}

/// The largest `|logit|` of [`ref_circle`] on `pairs`: the scale of its round-off.
fn circle_logit_bound(pairs: &[(f64, bool)], margin: f64, gamma: f64, paper_signs: bool) -> f64 {
    pairs
        .iter()
        .map(|&(s, pos)| {
            let z = match (pos, paper_signs) {
                (true, true) => (1.0 + margin - s).max(0.0) * (s - (1.0 - margin)),
                (true, false) => (1.0 + margin + s).max(0.0) * (s - (1.0 - margin)),
                (false, true) => (s + margin).max(0.0) * (s - margin),
                (false, false) => (s - margin).max(0.0) * (s - margin),
            };
            gamma * z.abs()
        })
        .fold(0.0, f64::max)
}

/// Per anchor: the mean of [`ref_circle`] over the rows (one anchor's pairs each) that hold
/// a positive and a negative; 0 when none does.
fn ref_circle_per_anchor(p: &Pairs, margin: f64, gamma: f64) -> f64 {
    let per: Vec<f64> = p
        .rows
        .iter()
        .filter(|row| row.iter().any(|e| e.1) && row.iter().any(|e| !e.1))
        .map(|row| ref_circle(row, margin, gamma, true))
        .collect();
    if per.is_empty() {
        0.0
    } else {
        per.iter().sum::<f64>() / per.len() as f64
    }
}

/// The round-off bound of a float32 circle loss against an f64 reference: a dot product
/// of length `d`, reductions of at most `terms` terms, logits up to `z` in magnitude; with
/// `k = d + terms`, the value is within `k·ε·(z + |value|)` (see `tests/parity_pml.rs`).
fn circle_tolerance(d: usize, terms: usize, z: f64, value: f64) -> f64 {
    (d + terms) as f64 * f64::from(f32::EPSILON) * (z + value.abs())
}

/// Pairs `i < j` of a batch, for the circle reference.
fn upper_pairs(x: &[Vec<f64>], g: &[i64], kind: &str, half: bool) -> Vec<(f64, bool)> {
    let mut out = Vec::new();
    for i in 0..x.len() {
        for j in i + 1..x.len() {
            out.push((ref_similarity(kind, &x[i], &x[j], half), g[i] == g[j]));
        }
    }
    out
}

/// Multi-similarity loss from cosine-similarity rows.
fn ref_multi_similarity(p: &Pairs, cfg: &MultiSimilarityLossConfig) -> f64 {
    let per: Vec<f64> = p
        .rows
        .iter()
        .map(|row| {
            let pos: Vec<f64> = row.iter().filter(|e| e.1).map(|e| e.0).collect();
            let neg: Vec<f64> = row.iter().filter(|e| !e.1).map(|e| e.0).collect();
            let (pos, neg) = match cfg.epsilon {
                None => (pos, neg),
                Some(eps) => {
                    let min_pos = pos.iter().copied().fold(f64::INFINITY, f64::min);
                    let max_neg = neg.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    (
                        pos.into_iter().filter(|&s| s < max_neg + eps).collect(),
                        neg.into_iter().filter(|&s| s > min_pos - eps).collect(),
                    )
                }
            };
            let sp: f64 = pos
                .iter()
                .map(|s| (-cfg.alpha * (s - cfg.base)).exp())
                .sum();
            let sn: f64 = neg.iter().map(|s| (cfg.beta * (s - cfg.base)).exp()).sum();
            sp.ln_1p() / cfg.alpha + sn.ln_1p() / cfg.beta
        })
        .collect();
    per.iter().sum::<f64>() / per.len() as f64
}

// ---------------------------------------------------------------------------------------
// Parity
// ---------------------------------------------------------------------------------------

#[test]
fn triplet_mask_matches_quaterion() {
    let file = load("utils_masks.json");
    let case = file["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "triplet/a")
        .unwrap();
    let g = group_ids(lookup(&file, case["inputs"]["labels"].as_str().unwrap()));
    let mask = triplet_mask(&groups_tensor(&g), DType::F32).unwrap();
    assert_close(&mask, &case["expected"]["mask"], 0.0, "triplet/a");
}

/// A parity case's inputs: embeddings, groups and (xbm) memory.
struct CaseInputs {
    x: Tensor,
    rows: Vec<Vec<f64>>,
    groups: Vec<i64>,
    memory: Option<(Tensor, Vec<Vec<f64>>, Vec<i64>)>,
}

fn case_inputs(file: &Value, case: &Value) -> CaseInputs {
    let i = &case["inputs"];
    let get = |k: &str| lookup(file, i[k].as_str().unwrap());
    let memory = i.get("memory_embeddings").map(|_| {
        (
            tensor(get("memory_embeddings")),
            rows(get("memory_embeddings")),
            group_ids(get("memory_groups")),
        )
    });
    CaseInputs {
        x: tensor(get("embeddings")),
        rows: rows(get("embeddings")),
        groups: group_ids(get("groups")),
        memory,
    }
}

#[test]
fn triplet_loss_parity() {
    let file = load("loss_triplet.json");
    let (mut direct, mut doubled, mut corrected) = (Vec::new(), Vec::new(), Vec::new());
    for case in file["cases"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        let p = &case["params"];
        let kind = p["distance_metric_name"].as_str().unwrap();
        let margin = p["margin"].as_f64().unwrap();
        let soft = p["soft"].as_bool().unwrap();
        let mining = match p["mining"].as_str().unwrap() {
            "all" => TripletMining::All,
            "hard" => TripletMining::Hard,
            "semi_hard" => TripletMining::SemiHard,
            other => panic!("{other}"),
        };
        let xbm = case["method"] == "xbm_loss";
        let inp = case_inputs(&file, case);
        let e = &case["expected"];
        let cosine = kind == "cosine";
        // Cosine `all`: margin 2m here is exactly twice Quaterion's margin m.
        let ours_margin = if cosine && mining == TripletMining::All {
            2.0 * margin
        } else {
            margin
        };
        let loss: TripletLoss = build(TripletLossConfig {
            margin: ours_margin,
            distance: distance_of(kind),
            mining,
            soft,
            ..Default::default()
        });
        let g = groups_tensor(&inp.groups);
        let (value, grad) = value_and_grad(&inp.x, |x| match &inp.memory {
            Some((m, _, mg)) => loss.forward_memory(x, &g, m, &groups_tensor(mg)).unwrap(),
            None => loss
                .forward(x, &GroupTargets { groups: g.clone() })
                .unwrap(),
        });
        // The independent f64 reference of our definition, on our distance scale.
        let pairs = |half: bool| {
            ref_pairs(
                &inp.rows,
                &inp.groups,
                inp.memory.as_ref().map(|m| (&m.1[..], &m.2[..])),
                |a, b| ref_distance(kind, a, b, half),
            )
        };
        let r = TripletRef {
            margin: ours_margin,
            mining,
            soft,
            scale: true,
            quaterion_hard: false,
            farthest_fallback: true,
        };
        let reference = ref_triplet(&pairs(false), r);
        assert_rel(
            value,
            reference,
            1e-5,
            &format!("{id}: ours vs f64 reference"),
        );

        let quaterion = e["loss"].as_f64().unwrap();
        let edge = id.contains("/edge/");
        // Where the definitions coincide, Quaterion's value and gradient must match:
        // * `all` (forward): directly, or ×2 for cosine (margin 2m);
        // * `hard`, not soft, on the `main` set (every anchor has a positive) with a
        //   non-negative distance: directly (the mean-negative scaling is scale-free);
        //   soft hard mining likewise except for cosine (the difference doubles here).
        let scale = if cosine && mining == TripletMining::All {
            2.0
        } else {
            1.0
        };
        let comparable = match mining {
            TripletMining::All => !xbm,
            TripletMining::Hard => !edge && kind != "dot_product" && !(soft && cosine),
            TripletMining::SemiHard => false,
        };
        if comparable {
            // Euclidean/manhattan hard mining depends on arg-max choices: 1e-4 on gradients
            // still holds, values to 1e-5.
            assert_rel(value, scale * quaterion, 1e-5, &format!("{id}: loss"));
            let want = tensor(&e["grad_embeddings"]);
            let want = (want * scale).unwrap();
            assert_tensor_close(&grad, &want, 1e-4, &format!("{id}: gradient"));
            if scale == 1.0 {
                direct.push(id.to_string());
            } else {
                doubled.push(id.to_string());
            }
        } else {
            // Not comparable: check that the reference run with Quaterion's semantics
            // where they are only a scale apart reproduces Quaterion (hard/soft cosine),
            // and record the corrected cases.
            // Hard mining, non-negative distances: Quaterion = the reference with its
            // anchors-without-positive rule (edge set) on its half-scale cosine.
            if mining == TripletMining::Hard && kind != "dot_product" {
                let q = TripletRef {
                    quaterion_hard: true,
                    ..r
                };
                let q = ref_triplet(&pairs(true), q);
                assert_rel(
                    q,
                    quaterion,
                    1e-5,
                    &format!("{id}: Quaterion-rule reference"),
                );
            }
            corrected.push(format!("{id} (Quaterion {quaterion}, ours {value})"));
        }
    }
    eprintln!(
        "triplet: {} direct, {} doubled (cosine all), {} corrected:\n  {}",
        direct.len(),
        doubled.len(),
        corrected.len(),
        corrected.join("\n  ")
    );
    assert!(!direct.is_empty() && !doubled.is_empty());
}

fn assert_tensor_close(got: &Tensor, want: &Tensor, rel: f64, what: &str) {
    let g: Vec<f64> = got
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let w: Vec<f64> = want
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(g.len(), w.len(), "{what}: size");
    let scale = w.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-6);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!(
            (a - b).abs() <= rel * scale,
            "{what}[{i}]: got {a}, expected {b}"
        );
    }
}

#[test]
fn circle_loss_parity() {
    // Quaterion's weights have flipped signs against the paper ([1 + m + s_p]_+ and
    // [s_n − m]_+), so no case can match: the reference run with Quaterion's signs and
    // similarity scale must reproduce Quaterion (validating the reference), and our loss
    // must equal the reference with the paper's signs on our scale (cosine: `cos`, not
    // `(1 + cos) / 2`). Quaterion pools the pairs of the batch: that is our `pooled`
    // option, held to Quaterion's numbers through the reference. Our default is the
    // paper's loss per anchor, held to the per-anchor reference on the same inputs.
    let file = load("loss_circle.json");
    for case in file["cases"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        let p = &case["params"];
        let kind = p["distance_metric_name"].as_str().unwrap();
        let margin = p["margin"].as_f64().unwrap();
        let gamma = p["scale_factor"].as_f64().unwrap();
        let inp = case_inputs(&file, case);
        let (n, d) = (inp.rows.len(), inp.rows[0].len());
        let quaterion = case["expected"]["loss"].as_f64().unwrap();
        let q_pairs = upper_pairs(&inp.rows, &inp.groups, kind, true);
        let q_ref = ref_circle(&q_pairs, margin, gamma, false);
        let z = circle_logit_bound(&q_pairs, margin, gamma, false);
        assert_close_to(
            q_ref,
            quaterion,
            circle_tolerance(d, q_pairs.len(), z, quaterion),
            &format!("{id}: Quaterion-sign reference"),
        );
        let ours_pairs = upper_pairs(&inp.rows, &inp.groups, kind, false);
        let z = circle_logit_bound(&ours_pairs, margin, gamma, true);
        for pooled in [true, false] {
            let loss: CircleLoss = build(CircleLossConfig {
                margin,
                scale_factor: gamma,
                distance: distance_of(kind),
                pooled,
            });
            let (value, grad) =
                value_and_grad(&inp.x, |x| loss.forward(x, &targets(&inp.groups)).unwrap());
            let (want, terms) = if pooled {
                (
                    ref_circle(&ours_pairs, margin, gamma, true),
                    ours_pairs.len(),
                )
            } else {
                let rows = ref_pairs(&inp.rows, &inp.groups, None, |a, b| {
                    ref_similarity(kind, a, b, false)
                });
                (ref_circle_per_anchor(&rows, margin, gamma), n)
            };
            assert_close_to(
                value,
                want,
                circle_tolerance(d, terms, z, want),
                &format!("{id}: ours (pooled = {pooled}) vs paper reference"),
            );
            let g: Vec<f32> = grad.flatten_all().unwrap().to_vec1().unwrap();
            assert!(g.iter().all(|v| v.is_finite()), "{id}: finite gradient");
        }
    }
}

#[test]
fn fast_ap_loss_parity() {
    // `main`: value and gradient directly. `edge` (anchors without a positive): the same
    // value; Quaterion's gradient is NaN everywhere (0/0 rows), ours is finite and checked
    // by finite differences in `gradients_match_finite_differences`.
    let file = load("loss_fast_ap.json");
    for case in file["cases"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        let num_bins = case["params"]["num_bins"].as_u64().unwrap() as usize;
        let inp = case_inputs(&file, case);
        let loss: FastAPLoss = build(FastAPLossConfig { num_bins });
        let (value, grad) =
            value_and_grad(&inp.x, |x| loss.forward(x, &targets(&inp.groups)).unwrap());
        let e = &case["expected"];
        assert_rel(
            value,
            e["loss"].as_f64().unwrap(),
            1e-5,
            &format!("{id}: loss"),
        );
        if id.starts_with("main/") {
            assert_close(
                &grad,
                &e["grad_embeddings"],
                1e-4,
                &format!("{id}: gradient"),
            );
        } else {
            let g: Vec<f32> = grad.flatten_all().unwrap().to_vec1().unwrap();
            assert!(g.iter().all(|v| v.is_finite()), "{id}: finite gradient");
            assert!(g.iter().any(|v| *v != 0.0), "{id}: a gradient at all");
        }
    }
}

#[test]
fn multi_similarity_matches_reference() {
    // Not in Quaterion: the triplet file's inputs against the f64 reference, mined and not,
    // in the batch and against the memory.
    let file = load("loss_triplet.json");
    let set = |name: &str| {
        let s = &file["inputs"][name];
        (
            tensor(&s["embeddings"]),
            rows(&s["embeddings"]),
            group_ids(&s["groups"]),
        )
    };
    let (mx, mrows, mg) = set("memory");
    for name in ["main", "edge"] {
        let (x, xr, g) = set(name);
        for cfg in [
            MultiSimilarityLossConfig::default(),
            MultiSimilarityLossConfig {
                epsilon: None,
                ..Default::default()
            },
            MultiSimilarityLossConfig {
                alpha: 1.0,
                beta: 10.0,
                base: 0.2,
                epsilon: Some(0.3),
            },
        ] {
            let loss: MultiSimilarityLoss = build(cfg.clone());
            let cos = |a: &[f64], b: &[f64]| ref_similarity("cosine", a, b, false);
            let got = loss.forward(&x, &targets(&g)).unwrap();
            let got = got
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            let want = ref_multi_similarity(&ref_pairs(&xr, &g, None, cos), &cfg);
            assert_rel(got, want, 1e-5, &format!("{name} {cfg:?}"));
            if name == "main" {
                let got = loss
                    .forward_memory(&x, &groups_tensor(&g), &mx, &groups_tensor(&mg))
                    .unwrap();
                let got = got
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                let want =
                    ref_multi_similarity(&ref_pairs(&xr, &g, Some((&mrows, &mg)), cos), &cfg);
                assert_rel(got, want, 1e-5, &format!("memory {cfg:?}"));
            }
        }
    }
}

#[test]
fn circle_memory_matches_reference() {
    let file = load("loss_triplet.json");
    let s = |n: &str| &file["inputs"][n];
    let (x, xr, g) = (
        tensor(&s("main")["embeddings"]),
        rows(&s("main")["embeddings"]),
        group_ids(&s("main")["groups"]),
    );
    let (m, mr, mg) = (
        tensor(&s("memory")["embeddings"]),
        rows(&s("memory")["embeddings"]),
        group_ids(&s("memory")["groups"]),
    );
    for kind in ["cosine", "euclidean"] {
        let pairs = ref_pairs(&xr, &g, Some((&mr, &mg)), |a, b| {
            ref_similarity(kind, a, b, false)
        });
        let flat: Vec<(f64, bool)> = pairs.rows.concat();
        let z = circle_logit_bound(&flat, 0.4, 32.0, true);
        for pooled in [true, false] {
            let loss: CircleLoss = build(CircleLossConfig {
                scale_factor: 32.0,
                margin: 0.4,
                distance: distance_of(kind),
                pooled,
            });
            let got = loss
                .forward_memory(&x, &groups_tensor(&g), &m, &groups_tensor(&mg))
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            let (want, terms) = if pooled {
                (ref_circle(&flat, 0.4, 32.0, true), flat.len())
            } else {
                (ref_circle_per_anchor(&pairs, 0.4, 32.0), mr.len())
            };
            assert_close_to(
                got,
                want,
                circle_tolerance(xr[0].len(), terms, z, want),
                &format!("{kind} pooled = {pooled}"),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Finite-difference gradients (f64, small random inputs, a few groups and a singleton)
// ---------------------------------------------------------------------------------------

const GROUPS: [i64; 9] = [0, 0, 0, 1, 1, 1, 2, 2, 3];
const MEMORY_GROUPS: [i64; 7] = [0, 1, 1, 2, 3, 4, 0];

#[test]
fn gradients_match_finite_differences() {
    let x = random(GROUPS.len(), 4, 1);
    let memory = random(MEMORY_GROUPS.len(), 4, 2);
    let g = groups_tensor(&GROUPS);
    let mg = groups_tensor(&MEMORY_GROUPS);
    let t = targets(&GROUPS);
    let kinds = [
        Distance::Cosine,
        Distance::Euclidean,
        Distance::Manhattan,
        Distance::DotProduct,
    ];
    for distance in kinds {
        let farthest = SemiHardFallback::FarthestNegative;
        let hardest = SemiHardFallback::HardestNegative;
        let non_zero = Some(Reduction::MeanNonZero);
        for (mining, soft, scale, semi_hard_fallback, reduction) in [
            (TripletMining::All, false, true, farthest, None),
            (
                TripletMining::All,
                false,
                true,
                farthest,
                Some(Reduction::Mean),
            ),
            (TripletMining::Hard, false, true, farthest, None),
            (TripletMining::Hard, false, true, farthest, non_zero),
            (TripletMining::Hard, false, false, farthest, None),
            (TripletMining::Hard, false, false, farthest, non_zero),
            (TripletMining::Hard, true, true, farthest, None),
            (TripletMining::SemiHard, false, true, farthest, None),
            (TripletMining::SemiHard, false, true, farthest, non_zero),
            (TripletMining::SemiHard, false, true, hardest, None),
        ] {
            let loss: TripletLoss = build(TripletLossConfig {
                margin: 0.7,
                distance,
                mining,
                soft,
                scale_by_mean_negative: scale,
                semi_hard_fallback,
                reduction,
            });
            let name = format!(
                "triplet {distance:?} {mining:?} soft={soft} scale={scale} \
                 {semi_hard_fallback:?} {reduction:?}"
            );
            check_gradient(&name, &x, 1e-5, |x| loss.forward(x, &t).unwrap());
            check_gradient(&format!("{name} memory"), &x, 1e-5, |x| {
                loss.forward_memory(x, &g, &memory, &mg).unwrap()
            });
        }
        // The weights α are constants of the gradient (detached, as in the paper's and
        // Quaterion's implementations), so the finite-difference check is on a surrogate
        // with α frozen at x, written here with plain tensor ops; ours must equal it.
        for (with_memory, pooled) in [(false, false), (true, false), (false, true), (true, true)] {
            let loss: CircleLoss = build(CircleLossConfig {
                margin: 0.25,
                scale_factor: 8.0,
                distance,
                pooled,
            });
            let name = format!("circle {distance:?} memory={with_memory} pooled={pooled}");
            let ours = |x: &Tensor| match with_memory {
                true => loss.forward_memory(x, &g, &memory, &mg).unwrap(),
                false => loss.forward(x, &t).unwrap(),
            };
            let (_, grad) = value_and_grad(&x, ours);
            let mem = with_memory.then_some((&memory, &MEMORY_GROUPS[..]));
            let frozen = check_gradient(&name, &x, 1e-5, |y| {
                circle_frozen(y, &x, mem, distance, pooled, 0.25, 8.0)
            });
            let got: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
            for (i, (a, b)) in got.iter().zip(&frozen).enumerate() {
                assert!((a - b).abs() < 1e-9, "{name}[{i}]: {a} vs surrogate {b}");
            }
        }
    }
    for num_bins in [10, 5] {
        let loss: FastAPLoss = build(FastAPLossConfig { num_bins });
        check_gradient(&format!("fast_ap {num_bins}"), &x, 1e-5, |x| {
            loss.forward(x, &t).unwrap()
        });
    }
    for epsilon in [Some(0.1), None, Some(1.0)] {
        let loss: MultiSimilarityLoss = build(MultiSimilarityLossConfig {
            epsilon,
            ..Default::default()
        });
        check_gradient(&format!("multi_similarity {epsilon:?}"), &x, 1e-5, |x| {
            loss.forward(x, &t).unwrap()
        });
        check_gradient(
            &format!("multi_similarity {epsilon:?} memory"),
            &x,
            1e-5,
            |x| loss.forward_memory(x, &g, &memory, &mg).unwrap(),
        );
    }
}

#[test]
fn every_loss_runs_in_f32_and_f64() {
    let x64 = random(GROUPS.len(), 4, 3);
    let t = targets(&GROUPS);
    for x in [x64.clone(), x64.to_dtype(DType::F32).unwrap()] {
        let losses: Vec<Tensor> = vec![
            build::<TripletLoss>(Default::default())
                .forward(&x, &t)
                .unwrap(),
            build::<TripletLoss>(TripletLossConfig {
                mining: TripletMining::SemiHard,
                ..Default::default()
            })
            .forward(&x, &t)
            .unwrap(),
            build::<CircleLoss>(Default::default())
                .forward(&x, &t)
                .unwrap(),
            build::<FastAPLoss>(Default::default())
                .forward(&x, &t)
                .unwrap(),
            build::<MultiSimilarityLoss>(Default::default())
                .forward(&x, &t)
                .unwrap(),
        ];
        for l in losses {
            assert_eq!(l.dtype(), x.dtype());
            assert_eq!(l.dims(), &[] as &[usize]);
        }
    }
}

/// Circle loss (paper signs) with the weights α computed from `x0` and held constant:
/// `(n, m)` pair masks built by loops; pooled: the pairs `i < j` without memory in one
/// softplus, else per anchor (every other row, or the memory), averaged over the anchors
/// with a positive and a negative.
fn circle_frozen(
    x: &Tensor,
    x0: &Tensor,
    memory: Option<(&Tensor, &[i64])>,
    distance: Distance,
    pooled: bool,
    m: f64,
    gamma: f64,
) -> Tensor {
    let (cands, cg) = match memory {
        Some((mx, mg)) => (Some(mx), mg),
        None => (None, &GROUPS[..]),
    };
    let s = distance.similarity_matrix(x, cands).unwrap();
    let s0: Vec<Vec<f64>> = distance
        .similarity_matrix(x0, cands)
        .unwrap()
        .to_vec2()
        .unwrap();
    let (n, k) = (GROUPS.len(), cg.len());
    let (mut wp, mut wn) = (vec![0f64; n * k], vec![0f64; n * k]);
    let (mut mp, mut mn) = (vec![0f64; n * k], vec![0f64; n * k]);
    for i in 0..n {
        for j in 0..k {
            let excluded = memory.is_none() && if pooled { j <= i } else { j == i };
            if excluded {
                continue;
            }
            let v = s0[i][j];
            if GROUPS[i] == cg[j] {
                mp[i * k + j] = 1.0;
                wp[i * k + j] = -gamma * (1.0 + m - v).max(0.0);
            } else {
                mn[i * k + j] = 1.0;
                wn[i * k + j] = gamma * (v + m).max(0.0);
            }
        }
    }
    let t = |v: &[f64]| Tensor::from_vec(v.to_vec(), (n, k), &common::device()).unwrap();
    let masked_exp = |w: &[f64], mask: &[f64], delta: f64| {
        let logits = (s.affine(1.0, -delta).unwrap() * t(w)).unwrap();
        (logits.exp().unwrap() * t(mask)).unwrap()
    };
    let softplus = |z: Tensor| (z.exp().unwrap() + 1.0).unwrap().log().unwrap();
    if pooled {
        let lse = |e: Tensor| e.sum_all().unwrap().log().unwrap();
        let z = (lse(masked_exp(&wp, &mp, 1.0 - m)) + lse(masked_exp(&wn, &mn, m))).unwrap();
        return softplus(z);
    }
    let valid: Vec<u32> = (0..n)
        .filter(|&i| {
            let row = |mask: &[f64]| mask[i * k..(i + 1) * k].iter().any(|&v| v > 0.0);
            row(&mp) && row(&mn)
        })
        .map(|i| i as u32)
        .collect();
    let rows = Tensor::new(valid.as_slice(), &common::device()).unwrap();
    let lse = |e: Tensor| {
        e.index_select(&rows, 0)
            .unwrap()
            .sum(1)
            .unwrap()
            .log()
            .unwrap()
    };
    let z = (lse(masked_exp(&wp, &mp, 1.0 - m)) + lse(masked_exp(&wn, &mn, m))).unwrap();
    softplus(z).mean_all().unwrap()
}
