//! The group losses against pytorch-metric-learning 2.9 (PML), a second reference beside
//! Quaterion: `tests/parity-pml/pml_losses.json` (a copy of `../shared/parity-pml/`, see the
//! README there) holds PML's loss and gradient, computed in float64 on float32-exact inputs,
//! for 14 configurations on three cases (`A`: 32 × 16 in 4 groups, `B`: 64 × 8 in 16 groups
//! with three groups of one, `C`: 16 × 4 in 2 groups).
//!
//! **How the file is read.** Each entry `"<config>|<variant>"` is described by a [`Def`]:
//! what PML computed, in this crate's terms ([`def_of`], from the file's `configs`).
//! [`ours`] names the library configuration that computes a `Def` (times a constant), if
//! there is one; that mapping is the conventions the losses' docs state (the mean over
//! every valid anchor or over the non-zero terms, OnlineContrastive's `½` and its hard
//! mining anchor set, CircleLoss per anchor or pooled, the semi-hard fallback). Every entry
//! of the file is checked, and an entry without a `Def` fails the test:
//! 1. the f64 reference of this file (plain loops, written from the definitions) reproduces
//!    PML's value: the `Def` says what PML computed;
//! 2. where the library has that form: its f64 value and gradient equal PML's;
//! 3. and its f32 value (the fused CPU kernels where a loss has them) too.
//!
//! The variants the library has no form for are PML's semi-hard miner (every triplet with
//! `0 < d_an − d_ap ≤ m`, another definition than per-pair semi-hard mining) and, in case
//! `B` only, OnlineContrastive's hard mining over PML's anchor set (anchors with both a
//! positive and a negative; `B` has groups of one): there only step 1 runs. `oc_hard` has a
//! third variant beside `stock` and `matched`, `stock_mean_half`: PML's miner and anchor
//! set with `½ ×` the mean over every term.
//!
//! **Unseen cases.** Two cases generated here ([`unseen_cases`]: `D`, uniform with groups
//! of one; `E`, tight clusters, where many hinge terms are 0) and configurations the file
//! does not have (other margins, scales and temperatures, the default semi-hard fallback,
//! both reductions where they differ) are checked against the reference that step 1
//! validated: values on every case, and gradients on `C`, `D` and `E` against central
//! differences of the reference (not of the library).
//!
//! **Tolerances** are bounds on round-off, derived from the data's scale. Both sides start
//! from the same float32-exact numbers, so they differ only by rounding. A loss here is a
//! chain of a dot product of length `d` (the similarity), reductions of at most `T` terms
//! (`T = n` for row log-sum-exps and means over anchors, `n²` for means over pairs, `n³`
//! over triplets) and exponentials or hinges of arguments bounded by `Z` ([`Def::bound`]:
//! the largest magnitude a logit or hinge argument can reach, e.g. `4γ` for Circle, `2/τ`
//! for SupCon, `2 + m` for a hinge on cosine distances in `[0, 2]`). A sum of `k` rounded
//! terms in precision `ε` is within `k·ε` of the exact sum relative to its terms (Higham,
//! *Accuracy and Stability of Numerical Algorithms*, §4.2), and an absolute error `δ` in
//! the logits moves a log-sum-exp, a softplus or a hinge by at most `δ`, so each side's
//! value is within `k·ε·(Z + |L|)` of the exact one, with `k = d + T`: the test allows
//! twice that (two sides), in f64 `ε` for the f64 runs and f32 `ε` for the f32 runs. A
//! gradient component is a weighted sum of the same terms' derivatives, whose weights (the
//! softmax probabilities, the mean's `1/count`) carry the same relative error: the bound is
//! `2·k·ε·(Z + 1)` times the largest component. These are worst-case bounds (the
//! differences seen are at most a few hundredths of them), and nothing in them is read from
//! the file; the negative controls check that each convention the test tells apart moves
//! the value by far more.

mod common;

use serde_json::Value;
use similarity_core::Tensor;
use similarity_core::candle_core::{DType, Var};
use similarity_core::data::GroupTargets;
use similarity_core::distance::Distance;
use similarity_core::loss::{
    CircleLoss, CircleLossConfig, CosFaceLoss, CosFaceLossConfig, GroupKind, MultiSimilarityLoss,
    MultiSimilarityLossConfig, OnlineContrastiveLoss, OnlineContrastiveLossConfig, PairMining,
    Reduction, SemiHardFallback, SimilarityLoss, SupConLoss, SupConLossConfig, TripletLoss,
    TripletLossConfig, TripletMining,
};
use similarity_core::nn::Params;

// ---------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------

/// One set of inputs: `n` embeddings of width `d` (row-major, float32-exact), their groups,
/// and a `(d, c)` class kernel for CosFace.
#[derive(Clone)]
struct Case {
    name: String,
    n: usize,
    d: usize,
    c: usize,
    groups: Vec<i64>,
    x: Vec<f64>,
    kernel: Vec<f64>,
}

impl Case {
    /// Whether every anchor has a positive and a negative.
    fn every_anchor_has_both(&self) -> bool {
        (0..self.n).all(|i| {
            let same = (0..self.n)
                .filter(|&j| self.groups[j] == self.groups[i])
                .count();
            same > 1 && same < self.n
        })
    }
}

fn load() -> Value {
    let path = common::repo_root().join("tests/parity-pml/pml_losses.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// The float32-exact inputs of the file. serde_json's default parser can be one f64 ulp
/// off; rounding to f32 recovers the exact value, and the check says it was within that.
fn inputs(name: &str, v: &Value) -> Vec<f64> {
    floats(v)
        .into_iter()
        .map(|parsed| {
            let exact = f64::from(parsed as f32);
            assert!(
                (exact - parsed).abs() <= 2.0 * f64::EPSILON * exact.abs(),
                "{name}: input {parsed} is not float32-exact"
            );
            exact
        })
        .collect()
}

fn case_of(name: &str, v: &Value) -> Case {
    let size = |k: &str| v[k].as_u64().unwrap() as usize;
    let case = Case {
        name: name.to_string(),
        n: size("n"),
        d: size("d"),
        c: size("c"),
        groups: v["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g.as_i64().unwrap())
            .collect(),
        x: inputs(name, &v["x"]),
        kernel: inputs(name, &v["kernel"]),
    };
    assert_eq!(case.x.len(), case.n * case.d, "{name}: x");
    assert_eq!(case.kernel.len(), case.d * case.c, "{name}: kernel");
    case
}

/// A fixed LCG: uniform in `[−1, 1]`, rounded to f32 (so the f32 runs see the same numbers).
fn uniform(seed: u64) -> impl FnMut() -> f64 {
    let mut s = seed;
    move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        f64::from((((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0) as f32)
    }
}

/// The cases that are not in the file. `D`: 24 × 6 uniform in `[−1, 1]`, in 9 groups of
/// which three (4, 7, 8) have one member. `E`: 20 × 5 in 5 tight groups of 3 to 5 around
/// random centres (noise half the centres' spread) and one of one, so that, as late in
/// training, many hinge terms are 0 and the reductions differ.
fn unseen_cases() -> Vec<Case> {
    let mut next = uniform(0x9e37_79b9_7f4a_7c15);
    let (n, d, c) = (24, 6, 9);
    let x = (0..n * d).map(|_| next()).collect();
    let kernel = (0..d * c).map(|_| next()).collect();
    let case_d = Case {
        name: "D (not in the file)".into(),
        n,
        d,
        c,
        groups: vec![
            0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 4, 5, 5, 5, 6, 6, 6, 6, 7, 8,
        ],
        x,
        kernel,
    };
    let mut next = uniform(7);
    let groups: Vec<i64> = vec![0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 4, 4, 4, 4, 5];
    let (d, c) = (5, 6);
    let centres: Vec<f64> = (0..c * d).map(|_| next()).collect();
    let x = groups
        .iter()
        .flat_map(|&g| {
            let centre = &centres[g as usize * d..][..d];
            centre
                .iter()
                .map(|v| f64::from((v + 0.5 * next()) as f32))
                .collect::<Vec<_>>()
        })
        .collect();
    let kernel = (0..d * c).map(|_| next()).collect();
    let case_e = Case {
        name: "E (not in the file, clustered)".into(),
        n: groups.len(),
        d,
        c,
        groups,
        x,
        kernel,
    };
    vec![case_d, case_e]
}

// ---------------------------------------------------------------------------------------
// What PML computed
// ---------------------------------------------------------------------------------------

/// Which terms a mean runs over (PML's `MeanReducer` and `AvgNonZeroReducer`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Reducer {
    Mean,
    NonZero,
}

/// The triplets of a triplet loss.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Triplets {
    /// Per anchor with a positive and a negative: its hardest positive and negative.
    Hard,
    /// Every valid triplet.
    All,
    /// PML's semi-hard miner: every triplet with `0 < d_an − d_ap ≤ m`.
    SemiHardMiner,
    /// Per (anchor, positive): the closest negative farther than the positive, else the
    /// fallback.
    SemiHard(SemiHardFallback),
}

/// The per-triplet term.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Term {
    /// `[d_ap − d_an + m]_+`.
    Hinge,
    /// `softplus(d_ap − d_an)`.
    Soft,
    /// `[(d_ap − d_an) / mean(d_an) + m]_+`, the mean over the mined anchors.
    ScaledByMeanNegative,
}

/// Hard pair mining: which anchors' hardest pairs count.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Anchors {
    /// Only anchors with both a positive and a negative (PML's `BatchEasyHardMiner`).
    WithBoth,
    /// Positive terms over anchors with a positive, negative terms over anchors with a
    /// negative.
    Each,
}

/// A loss definition on cosine similarities `s` (distances `1 − s`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Def {
    MultiSimilarity {
        alpha: f64,
        beta: f64,
        base: f64,
        epsilon: Option<f64>,
    },
    SupCon {
        temperature: f64,
    },
    /// `pooled`: all `i < j` pairs in one softplus; else per anchor, PML's mean over the
    /// non-zero terms.
    Circle {
        margin: f64,
        gamma: f64,
        pooled: bool,
    },
    CosFace {
        scale: f64,
        margin: f64,
    },
    Triplet {
        triplets: Triplets,
        margin: f64,
        term: Term,
        reducer: Reducer,
    },
    /// `factor · (reduce(positive terms) + reduce(negative terms))`, positive terms `d`,
    /// negative terms `[margin − d]_+`; every pair, or the hardest per anchor.
    Contrastive {
        margin: f64,
        hard: Option<Anchors>,
        reducer: Reducer,
        factor: f64,
    },
}

/// The `Def` of a file entry, from the file's `configs`.
fn def_of(key: &str) -> Option<Def> {
    use Def::*;
    let triplet = |triplets, margin, term, reducer| Triplet {
        triplets,
        margin,
        term,
        reducer,
    };
    let oc = |hard, reducer, factor| Contrastive {
        margin: 0.5,
        hard,
        reducer,
        factor,
    };
    let ms = |epsilon| MultiSimilarity {
        alpha: 2.0,
        beta: 50.0,
        base: 0.5,
        epsilon,
    };
    Some(match key {
        "ms_eps0.1|stock" => ms(Some(0.1)),
        "ms_nomine|stock" => ms(None),
        "supcon_t0.1|stock" => SupCon { temperature: 0.1 },
        "supcon_t0.5|stock" => SupCon { temperature: 0.5 },
        "circle_m0.25_g256|stock" | "circle_m0.25_g256|pooled_torch" => Circle {
            margin: 0.25,
            gamma: 256.0,
            pooled: key.ends_with("pooled_torch"),
        },
        "circle_m0.4_g80|stock" | "circle_m0.4_g80|pooled_torch" => Circle {
            margin: 0.4,
            gamma: 80.0,
            pooled: key.ends_with("pooled_torch"),
        },
        "cosface_s64_m0.35|stock" => CosFace {
            scale: 64.0,
            margin: 0.35,
        },
        "triplet_hard_unscaled|stock" => {
            triplet(Triplets::Hard, 0.5, Term::Hinge, Reducer::NonZero)
        }
        "triplet_hard_unscaled|matched" => triplet(Triplets::Hard, 0.5, Term::Hinge, Reducer::Mean),
        "triplet_hard_scaled|matched" => triplet(
            Triplets::Hard,
            0.5,
            Term::ScaledByMeanNegative,
            Reducer::Mean,
        ),
        "triplet_hard_soft|stock" => triplet(Triplets::Hard, 0.0, Term::Soft, Reducer::NonZero),
        "triplet_hard_soft|matched" => triplet(Triplets::Hard, 0.0, Term::Soft, Reducer::Mean),
        "triplet_all|stock" => triplet(Triplets::All, 0.5, Term::Hinge, Reducer::NonZero),
        "triplet_semihard|stock" => {
            triplet(Triplets::SemiHardMiner, 0.5, Term::Hinge, Reducer::NonZero)
        }
        "triplet_semihard|matched" => triplet(
            Triplets::SemiHard(SemiHardFallback::HardestNegative),
            0.5,
            Term::Hinge,
            Reducer::Mean,
        ),
        "oc_all|stock" => oc(None, Reducer::NonZero, 1.0),
        "oc_all|matched" => oc(None, Reducer::Mean, 0.5),
        "oc_hard|stock" => oc(Some(Anchors::WithBoth), Reducer::NonZero, 1.0),
        "oc_hard|stock_mean_half" => oc(Some(Anchors::WithBoth), Reducer::Mean, 0.5),
        "oc_hard|matched" => oc(Some(Anchors::Each), Reducer::Mean, 0.5),
        _ => return None,
    })
}

impl Def {
    /// `(Z, T)` of the module docs: the largest magnitude of a logit or hinge argument, and
    /// the most terms one reduction sums, for `case`.
    fn bound(&self, case: &Case) -> (f64, usize) {
        let n = case.n;
        match *self {
            // β(s − λ) with |s| ≤ 1 (α ≤ β likewise).
            Def::MultiSimilarity {
                alpha, beta, base, ..
            } => (alpha.max(beta) * (1.0 + base.abs()), n),
            // s/τ with |s| ≤ 1, shifted by the row maximum.
            Def::SupCon { temperature } => (2.0 / temperature, n),
            // γ·α·(s − Δ): α_p·|s_p − Δ_p| ≤ (2 + m)(2 − m), α_n·|s_n − Δ_n| ≤ (1 + m)².
            Def::Circle { gamma, pooled, .. } => (4.0 * gamma, if pooled { n * n } else { n }),
            Def::CosFace { scale, margin } => (scale * (1.0 + margin), n.max(case.c)),
            Def::Triplet {
                triplets,
                margin,
                term,
                ..
            } => {
                let z = match term {
                    // |d_ap − d_an| ≤ 2, divided by the mean hardest-negative distance.
                    Term::ScaledByMeanNegative => 2.0 / mean_hardest_negative(case) + margin,
                    Term::Hinge | Term::Soft => 2.0 + margin,
                };
                let t = match triplets {
                    Triplets::Hard => n,
                    Triplets::SemiHard(_) => n * n,
                    Triplets::All | Triplets::SemiHardMiner => n * n * n,
                };
                (z, t)
            }
            Def::Contrastive { margin, hard, .. } => {
                (2.0 + margin, if hard.is_some() { n } else { n * n })
            }
        }
    }
}

/// The tolerance of the module docs for a value `value` of `def` on `case` in precision
/// `eps`: `2·k·ε·(Z + |L|)`, `k = d + T`.
fn value_tolerance(def: &Def, case: &Case, value: f64, eps: f64) -> f64 {
    let (z, t) = def.bound(case);
    2.0 * (case.d + t) as f64 * eps * (z + value.abs())
}

/// The gradient tolerance of the module docs: `2·k·ε·(Z + 1) · max |g|`.
fn gradient_tolerance(def: &Def, case: &Case, grad: &[f64], eps: f64) -> f64 {
    let (z, t) = def.bound(case);
    let scale = grad.iter().fold(0f64, |m, g| m.max(g.abs()));
    2.0 * (case.d + t) as f64 * eps * (z + 1.0) * scale
}

// ---------------------------------------------------------------------------------------
// The library
// ---------------------------------------------------------------------------------------

/// A configuration of a library loss.
#[derive(Debug, Clone)]
enum Ours {
    MultiSimilarity(MultiSimilarityLossConfig),
    SupCon(SupConLossConfig),
    Circle(CircleLossConfig),
    CosFace(CosFaceLossConfig),
    Triplet(TripletLossConfig),
    OnlineContrastive(OnlineContrastiveLossConfig),
}

/// The library configuration that computes `def` on `case`, and the constant its value is
/// multiplied by to give `def`'s; `None` where the library has no such form. This is where
/// the conventions of the losses' docs are asserted.
fn ours(def: &Def, case: &Case) -> Option<(Ours, f64)> {
    let reduction = |r: Reducer| match r {
        Reducer::Mean => Reduction::Mean,
        Reducer::NonZero => Reduction::MeanNonZero,
    };
    Some(match *def {
        Def::MultiSimilarity {
            alpha,
            beta,
            base,
            epsilon,
        } => (
            Ours::MultiSimilarity(MultiSimilarityLossConfig {
                alpha,
                beta,
                base,
                epsilon,
            }),
            1.0,
        ),
        Def::SupCon { temperature } => (Ours::SupCon(SupConLossConfig { temperature }), 1.0),
        // Per anchor: the mean over the anchors with a positive and a negative, whose terms
        // are never 0, so PML's non-zero mean is the default form.
        Def::Circle {
            margin,
            gamma,
            pooled,
        } => (
            Ours::Circle(CircleLossConfig {
                margin,
                scale_factor: gamma,
                distance: Distance::Cosine,
                pooled,
            }),
            1.0,
        ),
        Def::CosFace { scale, margin } => (
            Ours::CosFace(CosFaceLossConfig {
                num_groups: case.c,
                scale,
                margin,
            }),
            1.0,
        ),
        Def::Triplet {
            triplets,
            margin,
            term,
            reducer,
        } => {
            let (mining, semi_hard_fallback) = match triplets {
                Triplets::Hard => (TripletMining::Hard, SemiHardFallback::default()),
                Triplets::All => (TripletMining::All, SemiHardFallback::default()),
                Triplets::SemiHard(f) => (TripletMining::SemiHard, f),
                Triplets::SemiHardMiner => return None,
            };
            // Each mining's own reduction is `None` (the documented default): `all` averages
            // over the non-zero triplets, `hard` and `semi_hard` over every term.
            let own = match mining {
                TripletMining::All => Reducer::NonZero,
                _ => Reducer::Mean,
            };
            let config = TripletLossConfig {
                margin,
                distance: Distance::Cosine,
                mining,
                soft: term == Term::Soft,
                scale_by_mean_negative: term == Term::ScaledByMeanNegative,
                semi_hard_fallback,
                reduction: (reducer != own).then(|| reduction(reducer)),
            };
            (Ours::Triplet(config), 1.0)
        }
        Def::Contrastive {
            margin,
            hard,
            reducer,
            factor,
        } => {
            let mining = match hard {
                None => PairMining::All,
                Some(Anchors::Each) => PairMining::Hard,
                // PML's anchor set is every anchor exactly when each has both.
                Some(Anchors::WithBoth) if case.every_anchor_has_both() => PairMining::Hard,
                Some(Anchors::WithBoth) => return None,
            };
            let config = OnlineContrastiveLossConfig {
                margin,
                distance: Distance::Cosine,
                mining,
                reduction: (reducer == Reducer::NonZero).then_some(Reduction::MeanNonZero),
            };
            // The loss is ½ (positive mean + negative mean).
            (Ours::OnlineContrastive(config), factor / 0.5)
        }
    })
}

/// The value and the gradient with respect to the embeddings of `L` on `case`, in `dtype`.
fn run<L: SimilarityLoss<Kind = GroupKind>>(
    config: L::Config,
    case: &Case,
    dtype: DType,
) -> (f64, Vec<f64>) {
    let mut params = Params::new(&common::device(), 0);
    let loss = L::new(case.d, config, &mut params.scope("loss")).unwrap();
    if let Some(kernel) = params.named_vars().get("loss.kernel") {
        let k = Tensor::from_vec(case.kernel.clone(), (case.d, case.c), &common::device())
            .and_then(|k| k.to_dtype(DType::F32))
            .unwrap();
        kernel.set(&k).unwrap();
    }
    let x = Tensor::from_vec(case.x.clone(), (case.n, case.d), &common::device())
        .and_then(|x| x.to_dtype(dtype))
        .unwrap();
    let x = Var::from_tensor(&x).unwrap();
    let targets = GroupTargets {
        groups: Tensor::new(case.groups.as_slice(), &common::device()).unwrap(),
    };
    let value = loss.forward(x.as_tensor(), &targets).unwrap();
    let grad = value.backward().unwrap().get(&x).unwrap().clone();
    (
        value
            .to_dtype(DType::F64)
            .and_then(|v| v.to_scalar::<f64>())
            .unwrap(),
        grad.to_dtype(DType::F64)
            .and_then(|g| g.flatten_all())
            .and_then(|g| g.to_vec1())
            .unwrap(),
    )
}

fn run_ours(config: &Ours, case: &Case, dtype: DType) -> (f64, Vec<f64>) {
    match config.clone() {
        Ours::MultiSimilarity(c) => run::<MultiSimilarityLoss>(c, case, dtype),
        Ours::SupCon(c) => run::<SupConLoss>(c, case, dtype),
        Ours::Circle(c) => run::<CircleLoss>(c, case, dtype),
        Ours::CosFace(c) => run::<CosFaceLoss>(c, case, dtype),
        Ours::Triplet(c) => run::<TripletLoss>(c, case, dtype),
        Ours::OnlineContrastive(c) => run::<OnlineContrastiveLoss>(c, case, dtype),
    }
}

// ---------------------------------------------------------------------------------------
// The f64 reference: plain loops from the definitions
// ---------------------------------------------------------------------------------------

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    dot(a, b) / (dot(a, a).sqrt() * dot(b, b).sqrt())
}

fn logsumexp(v: &[f64]) -> f64 {
    let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + v.iter().map(|z| (z - m).exp()).sum::<f64>().ln()
}

fn softplus(z: f64) -> f64 {
    z.max(0.0) + (-z.abs()).exp().ln_1p()
}

fn reduce(terms: &[f64], reducer: Reducer) -> f64 {
    let kept: Vec<f64> = match reducer {
        Reducer::Mean => terms.to_vec(),
        Reducer::NonZero => terms.iter().copied().filter(|&t| t > 0.0).collect(),
    };
    if kept.is_empty() {
        0.0
    } else {
        kept.iter().sum::<f64>() / kept.len() as f64
    }
}

/// Anchor `i`'s positive and negative similarities, for embeddings `x` (row-major).
fn rows(case: &Case, x: &[f64]) -> Vec<(Vec<f64>, Vec<f64>)> {
    let row = |i: usize| &x[i * case.d..(i + 1) * case.d];
    (0..case.n)
        .map(|i| {
            let (mut pos, mut neg) = (Vec::new(), Vec::new());
            for j in (0..case.n).filter(|&j| j != i) {
                let s = cosine(row(i), row(j));
                if case.groups[j] == case.groups[i] {
                    pos.push(s);
                } else {
                    neg.push(s);
                }
            }
            (pos, neg)
        })
        .collect()
}

/// The mean over the anchors with a positive and a negative of the hardest negative's
/// cosine distance.
fn mean_hardest_negative(case: &Case) -> f64 {
    let d: Vec<f64> = rows(case, &case.x)
        .iter()
        .filter(|(p, n)| !p.is_empty() && !n.is_empty())
        .map(|(_, n)| 1.0 - n.iter().copied().fold(f64::NEG_INFINITY, f64::max))
        .collect();
    d.iter().sum::<f64>() / d.len() as f64
}

/// `def` on `case` with embeddings `x` (row-major, `case`'s shape).
fn reference(def: &Def, case: &Case, x: &[f64]) -> f64 {
    let rows = rows(case, x);
    let max = |v: &[f64]| v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    match *def {
        Def::MultiSimilarity {
            alpha,
            beta,
            base,
            epsilon,
        } => {
            let per: Vec<f64> = rows
                .iter()
                .map(|(pos, neg)| {
                    let (pos, neg): (Vec<f64>, Vec<f64>) = match epsilon {
                        None => (pos.clone(), neg.clone()),
                        Some(eps) => (
                            pos.iter()
                                .copied()
                                .filter(|&s| s - eps < max(neg))
                                .collect(),
                            neg.iter()
                                .copied()
                                .filter(|&s| s + eps > min(pos))
                                .collect(),
                        ),
                    };
                    let sp: f64 = pos.iter().map(|s| (-alpha * (s - base)).exp()).sum();
                    let sn: f64 = neg.iter().map(|s| (beta * (s - base)).exp()).sum();
                    sp.ln_1p() / alpha + sn.ln_1p() / beta
                })
                .collect();
            reduce(&per, Reducer::Mean)
        }
        Def::SupCon { temperature } => {
            let per: Vec<f64> = rows
                .iter()
                .filter(|(pos, _)| !pos.is_empty())
                .map(|(pos, neg)| {
                    let all: Vec<f64> = pos.iter().chain(neg).map(|s| s / temperature).collect();
                    let lse = logsumexp(&all);
                    -pos.iter().map(|s| s / temperature - lse).sum::<f64>() / pos.len() as f64
                })
                .collect();
            reduce(&per, Reducer::NonZero)
        }
        Def::Circle {
            margin: m,
            gamma,
            pooled,
        } => {
            let logit_p = |s: f64| -gamma * (1.0 + m - s).max(0.0) * (s - (1.0 - m));
            let logit_n = |s: f64| gamma * (s + m).max(0.0) * (s - m);
            if pooled {
                let (mut lp, mut ln) = (Vec::new(), Vec::new());
                for i in 0..case.n {
                    for j in i + 1..case.n {
                        let s = cosine(&x[i * case.d..][..case.d], &x[j * case.d..][..case.d]);
                        if case.groups[i] == case.groups[j] {
                            lp.push(logit_p(s));
                        } else {
                            ln.push(logit_n(s));
                        }
                    }
                }
                if lp.is_empty() || ln.is_empty() {
                    return 0.0;
                }
                return softplus(logsumexp(&lp) + logsumexp(&ln));
            }
            let per: Vec<f64> = rows
                .iter()
                .filter(|(pos, neg)| !pos.is_empty() && !neg.is_empty())
                .map(|(pos, neg)| {
                    let lp: Vec<f64> = pos.iter().map(|&s| logit_p(s)).collect();
                    let ln: Vec<f64> = neg.iter().map(|&s| logit_n(s)).collect();
                    softplus(logsumexp(&lp) + logsumexp(&ln))
                })
                .collect();
            reduce(&per, Reducer::NonZero)
        }
        Def::CosFace { scale, margin } => {
            let column = |k: usize| -> Vec<f64> {
                (0..case.d).map(|r| case.kernel[r * case.c + k]).collect()
            };
            let per: Vec<f64> = (0..case.n)
                .map(|i| {
                    let g = case.groups[i] as usize;
                    let z: Vec<f64> = (0..case.c)
                        .map(|k| {
                            let cos = cosine(&x[i * case.d..][..case.d], &column(k));
                            scale * (cos - if k == g { margin } else { 0.0 })
                        })
                        .collect();
                    logsumexp(&z) - z[g]
                })
                .collect();
            reduce(&per, Reducer::Mean)
        }
        Def::Triplet {
            triplets,
            margin,
            term,
            reducer,
        } => {
            // Cosine distances.
            let dist: Vec<(Vec<f64>, Vec<f64>)> = rows
                .iter()
                .map(|(p, n)| {
                    (
                        p.iter().map(|s| 1.0 - s).collect(),
                        n.iter().map(|s| 1.0 - s).collect(),
                    )
                })
                .collect();
            let usable = dist.iter().filter(|(p, n)| !p.is_empty() && !n.is_empty());
            let hinge = |dp: f64, dn: f64| (dp - dn + margin).max(0.0);
            let terms: Vec<f64> = match triplets {
                Triplets::Hard => {
                    let hard: Vec<(f64, f64)> = usable.map(|(p, n)| (max(p), min(n))).collect();
                    let mean_neg = hard.iter().map(|h| h.1).sum::<f64>() / hard.len() as f64;
                    hard.iter()
                        .map(|&(dp, dn)| match term {
                            Term::Hinge => hinge(dp, dn),
                            Term::Soft => softplus(dp - dn + margin),
                            Term::ScaledByMeanNegative => ((dp - dn) / mean_neg + margin).max(0.0),
                        })
                        .collect()
                }
                Triplets::All => usable
                    .flat_map(|(p, n)| {
                        p.iter()
                            .flat_map(move |&dp| n.iter().map(move |&dn| (dp, dn)))
                    })
                    .map(|(dp, dn)| hinge(dp, dn))
                    .collect(),
                Triplets::SemiHardMiner => usable
                    .flat_map(|(p, n)| {
                        p.iter()
                            .flat_map(move |&dp| n.iter().map(move |&dn| (dp, dn)))
                    })
                    .filter(|&(dp, dn)| dn - dp > 0.0 && dn - dp <= margin)
                    .map(|(dp, dn)| hinge(dp, dn))
                    .collect(),
                Triplets::SemiHard(fallback) => dist
                    .iter()
                    .filter(|(_, n)| !n.is_empty())
                    .flat_map(|(p, n)| {
                        p.iter().map(move |&dp| {
                            let farther = n.iter().copied().filter(|&dn| dn > dp);
                            let dn = farther.reduce(f64::min).unwrap_or(match fallback {
                                SemiHardFallback::FarthestNegative => max(n),
                                SemiHardFallback::HardestNegative => min(n),
                            });
                            hinge(dp, dn)
                        })
                    })
                    .collect(),
            };
            reduce(&terms, reducer)
        }
        Def::Contrastive {
            margin,
            hard,
            reducer,
            factor,
        } => {
            let (mut pos_terms, mut neg_terms) = (Vec::new(), Vec::new());
            for (pos, neg) in &rows {
                let d_pos: Vec<f64> = pos.iter().map(|s| 1.0 - s).collect();
                let d_neg: Vec<f64> = neg.iter().map(|s| 1.0 - s).collect();
                match hard {
                    None => {
                        pos_terms.extend(&d_pos);
                        neg_terms.extend(d_neg.iter().map(|d| (margin - d).max(0.0)));
                    }
                    Some(anchors) => {
                        let both = !pos.is_empty() && !neg.is_empty();
                        let keep = |has: bool| has && (anchors == Anchors::Each || both);
                        if keep(!pos.is_empty()) {
                            pos_terms.push(max(&d_pos));
                        }
                        if keep(!neg.is_empty()) {
                            neg_terms.push((margin - min(&d_neg)).max(0.0));
                        }
                    }
                }
            }
            factor * (reduce(&pos_terms, reducer) + reduce(&neg_terms, reducer))
        }
    }
}

/// Central differences of the reference, step `h = 10⁻⁶`. Their error is a rounding part
/// `ε·|L|/h ≈ 2·10⁻¹⁰·|L|` and a truncation part `h²·|L'''|/6`, of order `10⁻¹²·Z³/6`
/// for logits up to `Z` in magnitude (at most 30 here: about `5·10⁻⁹`), against
/// components of order 0.1 to 1; the check allows `10⁻⁶` of the largest component plus
/// `10⁻⁸`, still far below a difference of convention.
fn reference_gradient(def: &Def, case: &Case) -> Vec<f64> {
    let h = 1e-6;
    (0..case.x.len())
        .map(|i| {
            let (mut plus, mut minus) = (case.x.clone(), case.x.clone());
            plus[i] += h;
            minus[i] -= h;
            (reference(def, case, &plus) - reference(def, case, &minus)) / (2.0 * h)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()))
}

/// Collects failures, so that one run reports all of them.
#[derive(Default)]
struct Report {
    checked: usize,
    failures: Vec<String>,
    /// The largest difference as a fraction of its tolerance, and where.
    worst: (f64, String),
}

impl Report {
    fn close(&mut self, what: String, got: f64, want: f64, tol: f64) {
        self.checked += 1;
        let ratio = (got - want).abs() / tol;
        if ratio > self.worst.0 {
            self.worst = (ratio, what.clone());
        }
        let within = (got - want).abs() <= tol;
        if !within {
            self.failures.push(format!(
                "{what}: got {got}, expected {want} (difference {:e}, tolerance {tol:e})",
                (got - want).abs()
            ));
        }
    }

    fn close_all(&mut self, what: String, got: &[f64], want: &[f64], tol: f64) {
        self.close(what, max_abs_diff(got, want), 0.0, tol);
    }

    fn finish(self, name: &str) {
        eprintln!(
            "{name}: {} checks; the largest difference is {:.2e} of its tolerance ({})",
            self.checked, self.worst.0, self.worst.1
        );
        assert!(
            self.failures.is_empty(),
            "{} of {} checks failed:\n{}",
            self.failures.len(),
            self.checked,
            self.failures.join("\n")
        );
    }
}

#[test]
fn every_configuration_of_the_file_matches_pml() {
    let file = load();
    let mut report = Report::default();
    let (mut with_form, mut reference_only) = (0, Vec::new());
    for (name, v) in file["cases"].as_object().unwrap() {
        let case = case_of(name, v);
        for (key, expected) in v["refs"].as_object().unwrap() {
            let def = def_of(key).unwrap_or_else(|| {
                panic!("{key}: an entry of the file without a definition here; add it to def_of")
            });
            let at = format!("{name} {key}");
            let want = expected["loss"].as_f64().unwrap();
            let want_grad = floats(&expected["grad_x"]);
            let eps64 = f64::EPSILON;
            // 1. The reference says what PML computed.
            let tol = value_tolerance(&def, &case, want, eps64);
            report.close(
                format!("{at}: reference"),
                reference(&def, &case, &case.x),
                want,
                tol,
            );
            // 2 and 3. The library, where it has the form.
            let Some((config, factor)) = ours(&def, &case) else {
                reference_only.push(at);
                continue;
            };
            with_form += 1;
            let (value, grad) = run_ours(&config, &case, DType::F64);
            report.close(format!("{at}: f64 loss"), factor * value, want, tol);
            let grad: Vec<f64> = grad.iter().map(|g| factor * g).collect();
            report.close_all(
                format!("{at}: f64 gradient, max |difference|"),
                &grad,
                &want_grad,
                gradient_tolerance(&def, &case, &want_grad, eps64),
            );
            let (value, _) = run_ours(&config, &case, DType::F32);
            report.close(
                format!("{at}: f32 loss"),
                factor * value,
                want,
                value_tolerance(&def, &case, want, f64::from(f32::EPSILON)),
            );
        }
    }
    eprintln!(
        "{with_form} entries with a library form; reference only: {}",
        reference_only.join(", ")
    );
    // The only entries without a form are the ones the module docs name.
    assert!(
        reference_only
            .iter()
            .all(|k| k.ends_with("triplet_semihard|stock")
                || k == "B oc_hard|stock"
                || k == "B oc_hard|stock_mean_half"),
        "{reference_only:?}"
    );
    report.finish("PML file");
}

/// Configurations that are not in the file: other parameters, the default semi-hard
/// fallback, both reductions where they differ.
fn unseen_defs() -> Vec<Def> {
    use Def::*;
    let triplet = |triplets, margin, term, reducer| Triplet {
        triplets,
        margin,
        term,
        reducer,
    };
    let farthest = Triplets::SemiHard(SemiHardFallback::FarthestNegative);
    vec![
        MultiSimilarity {
            alpha: 1.0,
            beta: 10.0,
            base: 0.2,
            epsilon: Some(0.3),
        },
        SupCon { temperature: 0.2 },
        Circle {
            margin: 0.3,
            gamma: 32.0,
            pooled: false,
        },
        Circle {
            margin: 0.3,
            gamma: 32.0,
            pooled: true,
        },
        CosFace {
            scale: 30.0,
            margin: 0.2,
        },
        triplet(farthest, 0.5, Term::Hinge, Reducer::Mean),
        triplet(farthest, 0.2, Term::Hinge, Reducer::NonZero),
        triplet(
            Triplets::SemiHard(SemiHardFallback::HardestNegative),
            0.2,
            Term::Hinge,
            Reducer::NonZero,
        ),
        triplet(Triplets::Hard, 0.1, Term::Hinge, Reducer::NonZero),
        triplet(Triplets::Hard, 0.1, Term::Hinge, Reducer::Mean),
        triplet(
            Triplets::Hard,
            0.3,
            Term::ScaledByMeanNegative,
            Reducer::NonZero,
        ),
        triplet(Triplets::Hard, 0.0, Term::Soft, Reducer::Mean),
        triplet(Triplets::All, 0.3, Term::Hinge, Reducer::Mean),
        triplet(Triplets::All, 0.3, Term::Hinge, Reducer::NonZero),
        Contrastive {
            margin: 0.3,
            hard: None,
            reducer: Reducer::NonZero,
            factor: 0.5,
        },
        Contrastive {
            margin: 0.7,
            hard: Some(Anchors::Each),
            reducer: Reducer::NonZero,
            factor: 0.5,
        },
        Contrastive {
            margin: 0.7,
            hard: Some(Anchors::Each),
            reducer: Reducer::Mean,
            factor: 0.5,
        },
    ]
}

#[test]
fn unseen_cases_and_configurations_match_the_validated_reference() {
    let file = load();
    let mut cases: Vec<Case> = file["cases"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, v)| case_of(name, v))
        .collect();
    cases.extend(unseen_cases());
    let mut report = Report::default();
    for case in &cases {
        let small = case.n * case.d <= 150;
        for def in unseen_defs() {
            let at = format!("{} {def:?}", case.name);
            let (config, factor) = ours(&def, case).unwrap();
            let want = reference(&def, case, &case.x);
            let (value, grad) = run_ours(&config, case, DType::F64);
            report.close(
                format!("{at}: loss"),
                factor * value,
                want,
                value_tolerance(&def, case, want, f64::EPSILON),
            );
            // The circle weights are detached (as in the paper and PML), so the gradient is
            // not the reference's derivative; the file's gradients cover that loss.
            if small && !matches!(def, Def::Circle { .. }) {
                let want = reference_gradient(&def, case);
                let grad: Vec<f64> = grad.iter().map(|g| factor * g).collect();
                let scale = want.iter().fold(0f64, |m, g| m.max(g.abs()));
                report.close_all(
                    format!("{at}: gradient vs central differences, max |difference|"),
                    &grad,
                    &want,
                    1e-6 * scale + 1e-8,
                );
            }
        }
    }
    report.finish("unseen");
}

#[test]
fn the_conventions_differ_on_these_inputs() {
    // Negative controls: each option the unseen check exercises changes the value on at
    // least one case, so a library that ignored it would fail there.
    let mut cases: Vec<Case> = {
        let file = load();
        file["cases"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(name, v)| case_of(name, v))
            .collect()
    };
    cases.extend(unseen_cases());
    let differs = |a: Def, b: Def| {
        cases.iter().any(|c| {
            let (x, y) = (reference(&a, c, &c.x), reference(&b, c, &c.x));
            (x - y).abs() > 1e-6 * x.abs().max(y.abs())
        })
    };
    let triplet = |triplets, margin, reducer| Def::Triplet {
        triplets,
        margin,
        term: Term::Hinge,
        reducer,
    };
    let semi = |f| Triplets::SemiHard(f);
    use SemiHardFallback::{FarthestNegative, HardestNegative};
    assert!(differs(
        triplet(semi(FarthestNegative), 0.5, Reducer::Mean),
        triplet(semi(HardestNegative), 0.5, Reducer::Mean)
    ));
    for t in [Triplets::Hard, Triplets::All, semi(FarthestNegative)] {
        assert!(
            differs(
                triplet(t, 0.1, Reducer::Mean),
                triplet(t, 0.1, Reducer::NonZero)
            ),
            "{t:?}"
        );
    }
    let circle = |pooled| Def::Circle {
        margin: 0.3,
        gamma: 32.0,
        pooled,
    };
    assert!(differs(circle(false), circle(true)));
    let oc = |hard, reducer| Def::Contrastive {
        margin: 0.7,
        hard,
        reducer,
        factor: 0.5,
    };
    for hard in [None, Some(Anchors::Each)] {
        assert!(differs(oc(hard, Reducer::Mean), oc(hard, Reducer::NonZero)));
    }
    assert!(differs(
        oc(Some(Anchors::Each), Reducer::Mean),
        oc(Some(Anchors::WithBoth), Reducer::Mean)
    ));
}
