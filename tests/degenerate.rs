//! Every loss on degenerate batches: loss and gradients are finite, and where nothing can
//! be learnt the gradient is exactly zero.
//!
//! The table is [`rows`]: one row per configuration (a loss, its mining mode and distance,
//! and whether it is compared against a cross-batch memory). A new loss, mode or memory
//! form is covered by adding a row. Each row runs on every [`Case`], in f32 (the fused CPU
//! kernels where a loss has them) and in f64 (the composite Candle form every other device
//! and dtype uses), with gradients taken with respect to the embeddings and every
//! trainable parameter of the loss. All failures are collected and reported together.

mod common;

use similarity_core::candle_core::{DType, Tensor, Var};
use similarity_core::data::{
    GroupTargets, PairMeta, PairTargets, SimilarityPairSample, SimilaritySample,
};
use similarity_core::distance::Distance;
use similarity_core::loss::{
    ArcFaceLossConfig, CenterLossConfig, CircleLossConfig, CombinedLossConfig,
    ContrastiveLossConfig, CosFaceLossConfig, FastAPLossConfig, GroupKind, MatryoshkaLoss,
    MatryoshkaLossConfig, MultiSimilarityLossConfig, MultipleNegativesRankingLossConfig,
    OnlineContrastiveLossConfig, PairKind, PairMining, Reduction, SemiHardFallback,
    SoftmaxLossConfig, TripletLossConfig, TripletMining,
};
use similarity_core::nn::Params;
use similarity_core::prelude::*;

/// Embedding width of every case.
const D: usize = 4;
/// `num_groups` of the class losses (every case's group ids are below it).
const CLASSES: usize = 8;

/// A degenerate input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    /// Group losses: three embeddings in three groups (the reproduction of issue 15);
    /// against a memory, a memory that holds only other groups. Pair losses: every pair
    /// has score 0.
    NoPositive,
    /// Every object in one group (pairs: one subgroup), so there is no negative.
    OneGroup,
    /// Every group has one object (pairs: every pair its own subgroup); against a memory,
    /// every memory group once.
    Singletons,
    /// A batch of one object (pairs: one pair); against a memory, a memory of one row of
    /// the object's group.
    OneItem,
    /// Every embedding equal.
    Identical,
    /// Every embedding zero.
    Zeros,
    /// Embeddings of norm about 10¹⁵.
    Huge,
    /// Memory forms only: a memory with no rows (the trainer never asks for it, but
    /// `MemoryLoss` is public). Nothing can be learnt.
    EmptyMemory,
    /// Not degenerate: an ordinary batch (and memory), for the cross-device check.
    Ordinary,
}

thread_local! {
    /// The device the probes run on, when a test sets one (else the test device).
    static DEVICE: std::cell::RefCell<Option<Device>> = const { std::cell::RefCell::new(None) };
}

/// The device of the current run.
fn dev() -> Device {
    DEVICE
        .with(|d| d.borrow().clone())
        .unwrap_or_else(common::device)
}

/// Runs `f` with the probes on `device`.
fn on<T>(device: &Device, f: impl FnOnce() -> T) -> T {
    DEVICE.with(|d| *d.borrow_mut() = Some(device.clone()));
    let out = f();
    DEVICE.with(|d| *d.borrow_mut() = None);
    out
}

const CASES: [Case; 8] = [
    Case::NoPositive,
    Case::OneGroup,
    Case::Singletons,
    Case::OneItem,
    Case::Identical,
    Case::Zeros,
    Case::Huge,
    Case::EmptyMemory,
];

/// The inputs of a case: `n` embeddings of width [`D`] (row-major) and their group ids;
/// for pair losses the ids are the subgroups of `n / 2` pairs and `scores` their labels.
struct Input {
    embeddings: Vec<f64>,
    groups: Vec<i64>,
    scores: Vec<f32>,
}

/// Deterministic, non-degenerate values: `n` rows starting at row `from`.
fn spread(n: usize, from: usize) -> Vec<f64> {
    (from * D..(from + n) * D)
        .map(|i| (i as f64 * 0.917 + 0.3).sin())
        .collect()
}

/// The embeddings of `n` objects for `case` (`from` offsets the values, so a memory
/// differs from the batch).
fn embeddings(case: Case, n: usize, from: usize) -> Vec<f64> {
    match case {
        Case::Identical => [0.3, -0.5, 0.8, 0.1].repeat(n),
        Case::Zeros => vec![0.0; n * D],
        Case::Huge => spread(n, from).iter().map(|v| v * 1e15).collect(),
        _ => spread(n, from),
    }
}

/// The batch of a group loss.
fn group_batch(case: Case) -> Input {
    let groups: Vec<i64> = match case {
        Case::NoPositive => vec![0, 1, 2],
        Case::OneGroup => vec![0; 6],
        Case::Singletons => (0..6).collect(),
        Case::OneItem => vec![0],
        Case::Identical | Case::Zeros | Case::Huge | Case::EmptyMemory => vec![0, 0, 1, 1, 2, 2],
        Case::Ordinary => vec![0, 1, 2, 3, 0, 1, 2, 3, 4, 4],
    };
    Input {
        embeddings: embeddings(case, groups.len(), 0),
        groups,
        scores: Vec::new(),
    }
}

/// The memory a group loss's batch is compared with.
fn group_memory(case: Case) -> Input {
    let groups: Vec<i64> = match case {
        Case::NoPositive => vec![3, 4, 5, 6, 7],
        Case::OneGroup => vec![0; 5],
        Case::Singletons => (0..5).collect(),
        Case::OneItem => vec![0],
        Case::Identical | Case::Zeros | Case::Huge => vec![0, 1, 2, 0, 3],
        Case::EmptyMemory => Vec::new(),
        Case::Ordinary => vec![0, 1, 2, 3, 4, 5, 6, 0],
    };
    Input {
        embeddings: embeddings(case, groups.len(), 10),
        groups,
        scores: Vec::new(),
    }
}

/// The batch of a pair loss: `P` pairs, `2P` embeddings.
fn pair_batch(case: Case) -> Input {
    let (scores, subgroups): (Vec<f32>, Vec<i64>) = match case {
        Case::NoPositive => (vec![0.0; 3], vec![0, 1, 2]),
        Case::OneGroup => (vec![1.0; 3], vec![0; 3]),
        Case::Singletons => (vec![1.0; 3], vec![0, 1, 2]),
        Case::OneItem => (vec![1.0], vec![0]),
        Case::Identical | Case::Zeros | Case::Huge | Case::EmptyMemory => {
            (vec![1.0; 3], vec![0, 1, 1])
        }
        Case::Ordinary => (vec![1.0; 5], vec![0, 1, 2, 3, 4]),
    };
    Input {
        embeddings: embeddings(case, 2 * scores.len(), 0),
        groups: subgroups,
        scores,
    }
}

/// What one run gave: the loss value and every gradient by variable name (`None`: the
/// variable got no gradient, which counts as zero).
struct Outcome {
    loss: f64,
    grads: Vec<(String, Option<Vec<f64>>)>,
}

/// One configuration of one loss, runnable on every case.
trait Probe {
    fn run(&self, case: Case, dtype: DType) -> similarity_core::Result<Outcome>;

    /// Whether `case` means something for this form.
    fn applies(&self, case: Case) -> bool {
        case != Case::EmptyMemory
    }
}

/// `(rows, D)` in `dtype` on the run's device.
fn tensor(values: &[f64], dtype: DType) -> Tensor {
    Tensor::from_vec(values.to_vec(), (values.len() / D, D), &dev())
        .and_then(|t| t.to_dtype(dtype))
        .unwrap()
}

/// Backward from `loss`, reading the gradients of `x` and of the loss's parameters.
fn outcome(loss: &Tensor, x: &Var, params: &Params) -> similarity_core::Result<Outcome> {
    let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let grads = loss.backward()?;
    let mut vars: Vec<(String, Var)> = vec![("embeddings".into(), x.clone())];
    vars.extend(
        params
            .named_vars()
            .iter()
            .map(|(n, v)| (n.clone(), v.clone())),
    );
    let grads = vars
        .into_iter()
        .map(|(name, var)| {
            let g = grads
                .get(&var)
                .map(|g| g.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>())
                .transpose()?;
            Ok((name, g))
        })
        .collect::<similarity_core::Result<_>>()?;
    Ok(Outcome { loss: value, grads })
}

fn groups_tensor(groups: &[i64]) -> Tensor {
    Tensor::new(groups, &dev()).unwrap()
}

/// A group loss on a batch.
struct Batch<L: SimilarityLoss<Kind = GroupKind>>(L::Config);

impl<L: SimilarityLoss<Kind = GroupKind>> Probe for Batch<L> {
    fn run(&self, case: Case, dtype: DType) -> similarity_core::Result<Outcome> {
        let mut params = Params::new(&dev(), 7);
        let loss = L::new(D, self.0.clone(), &mut params.scope("loss"))?;
        let input = group_batch(case);
        let x = Var::from_tensor(&tensor(&input.embeddings, dtype))?;
        let targets = GroupTargets {
            groups: groups_tensor(&input.groups),
        };
        outcome(&loss.forward(x.as_tensor(), &targets)?, &x, &params)
    }
}

/// A group loss's memory form: the batch against a memory (detached, as XBM holds it).
struct Memory<L: MemoryLoss>(L::Config);

impl<L: MemoryLoss> Probe for Memory<L> {
    fn applies(&self, _case: Case) -> bool {
        true
    }

    fn run(&self, case: Case, dtype: DType) -> similarity_core::Result<Outcome> {
        let mut params = Params::new(&dev(), 7);
        let loss = L::new(D, self.0.clone(), &mut params.scope("loss"))?;
        let (batch, memory) = (group_batch(case), group_memory(case));
        let x = Var::from_tensor(&tensor(&batch.embeddings, dtype))?;
        let value = loss.forward_memory(
            x.as_tensor(),
            &groups_tensor(&batch.groups),
            &tensor(&memory.embeddings, dtype),
            &groups_tensor(&memory.groups),
        )?;
        outcome(&value, &x, &params)
    }
}

/// The pair targets of a case's batch: each pair's score and subgroup.
fn pair_targets(input: &Input) -> similarity_core::Result<PairTargets> {
    let metas: Vec<PairMeta> = input
        .scores
        .iter()
        .zip(&input.groups)
        .map(|(&score, &subgroup)| PairMeta { score, subgroup })
        .collect();
    SimilarityPairSample::<()>::targets(&metas, &dev())
}

/// A pair loss on a batch.
struct Pairs<L: SimilarityLoss<Kind = PairKind>>(L::Config);

impl<L: SimilarityLoss<Kind = PairKind>> Probe for Pairs<L> {
    fn run(&self, case: Case, dtype: DType) -> similarity_core::Result<Outcome> {
        let mut params = Params::new(&dev(), 7);
        let loss = L::new(D, self.0.clone(), &mut params.scope("loss"))?;
        let input = pair_batch(case);
        let targets = pair_targets(&input)?;
        let x = Var::from_tensor(&tensor(&input.embeddings, dtype))?;
        outcome(&loss.forward(x.as_tensor(), &targets)?, &x, &params)
    }
}

/// A pair loss on a batch with 2 extra, mined negatives
/// ([`SimilarityLoss::forward_with_negatives`]): the case's `2P` pair rows, then 2 rows
/// of the same case after them, all one variable (the negatives get gradients too).
struct PairsWithNegatives<L: SimilarityLoss<Kind = PairKind>>(L::Config);

impl<L: SimilarityLoss<Kind = PairKind>> Probe for PairsWithNegatives<L> {
    fn run(&self, case: Case, dtype: DType) -> similarity_core::Result<Outcome> {
        let mut params = Params::new(&dev(), 7);
        let loss = L::new(D, self.0.clone(), &mut params.scope("loss"))?;
        let input = pair_batch(case);
        let targets = pair_targets(&input)?;
        let n = input.scores.len() * 2;
        let mut values = input.embeddings.clone();
        values.extend(embeddings(case, 2, n));
        let x = Var::from_tensor(&tensor(&values, dtype))?;
        let value = loss.forward_with_negatives(
            &x.as_tensor().narrow(0, 0, n)?,
            &targets,
            &x.as_tensor().narrow(0, n, 2)?,
        )?;
        outcome(&value, &x, &params)
    }
}

/// One configuration: its probe, the cases where nothing can be learnt (gradient exactly
/// zero), the cases it rejects by design (an `Err` is expected there), and the cases whose
/// true value lies beyond the f32 range (run in f64 only). Each exception says why.
struct Row {
    name: String,
    probe: Box<dyn Probe>,
    zero: Vec<Case>,
    rejects: Vec<(Case, &'static str)>,
    beyond_f32: Vec<(Case, &'static str)>,
}

fn row(name: impl Into<String>, probe: impl Probe + 'static, zero: &[Case]) -> Row {
    Row {
        name: name.into(),
        probe: Box::new(probe),
        zero: zero.to_vec(),
        rejects: Vec::new(),
        beyond_f32: Vec::new(),
    }
}

/// `x · y` at norm 10¹⁵ is 10³⁰: a loss that squares the dot-product "distance" or
/// multiplies the similarity by a weight that grows with it has a true value near 10⁶¹.
const SQUARES_THE_DOT_PRODUCT: &str =
    "the loss is quadratic in the unbounded dot product (about 1e61 at norm 1e15)";

const DISTANCES: [Distance; 4] = [
    Distance::Cosine,
    Distance::Euclidean,
    Distance::Manhattan,
    Distance::DotProduct,
];

use Case::{NoPositive, OneGroup, OneItem, Singletons};

/// Batch cases without a positive pair or without a negative: a pair-mining group loss
/// learns nothing there.
const NO_PAIRS: &[Case] = &[NoPositive, OneGroup, Singletons, OneItem];
/// The same against a memory: the memory holds no positive, or no negative.
const NO_MEMORY_PAIRS: &[Case] = &[NoPositive, OneGroup, OneItem];

/// The table.
fn rows() -> Vec<Row> {
    let mut rows = Vec::new();
    for distance in DISTANCES {
        let triplet = |mining, soft, scale_by_mean_negative| TripletLossConfig {
            distance,
            mining,
            soft,
            scale_by_mean_negative,
            ..Default::default()
        };
        let non_zero = Some(Reduction::MeanNonZero);
        let triplets = [
            ("all", triplet(TripletMining::All, false, false)),
            (
                "all, mean",
                TripletLossConfig {
                    reduction: Some(Reduction::Mean),
                    ..triplet(TripletMining::All, false, false)
                },
            ),
            ("semi_hard", triplet(TripletMining::SemiHard, false, false)),
            (
                "semi_hard, hardest-negative fallback",
                TripletLossConfig {
                    semi_hard_fallback: SemiHardFallback::HardestNegative,
                    ..triplet(TripletMining::SemiHard, false, false)
                },
            ),
            (
                "semi_hard, non-zero mean",
                TripletLossConfig {
                    reduction: non_zero,
                    ..triplet(TripletMining::SemiHard, false, false)
                },
            ),
            ("hard, scaled", triplet(TripletMining::Hard, false, true)),
            (
                "hard, scaled, non-zero mean",
                TripletLossConfig {
                    reduction: non_zero,
                    ..triplet(TripletMining::Hard, false, true)
                },
            ),
            ("hard", triplet(TripletMining::Hard, false, false)),
            ("hard, soft", triplet(TripletMining::Hard, true, false)),
        ];
        for (mode, cfg) in triplets {
            let name = format!("TripletLoss {mode} {distance:?}");
            rows.push(row(&name, Batch::<TripletLoss>(cfg.clone()), NO_PAIRS));
            rows.push(row(
                format!("{name} + memory"),
                Memory::<TripletLoss>(cfg),
                NO_MEMORY_PAIRS,
            ));
        }
        let contrastive = [
            ("all", PairMining::All, None),
            ("all, non-zero mean", PairMining::All, non_zero),
            ("hard", PairMining::Hard, None),
            ("hard, non-zero mean", PairMining::Hard, non_zero),
        ];
        for (mode, mining, reduction) in contrastive {
            let cfg = OnlineContrastiveLossConfig {
                distance,
                mining,
                reduction,
                ..Default::default()
            };
            let name = format!("OnlineContrastiveLoss {mode} {distance:?}");
            rows.push(row(
                &name,
                Batch::<OnlineContrastiveLoss>(cfg.clone()),
                &[OneItem],
            ));
            rows.push(row(
                format!("{name} + memory"),
                Memory::<OnlineContrastiveLoss>(cfg),
                &[],
            ));
        }
        for (form, pooled) in [("per anchor", false), ("pooled", true)] {
            let cfg = CircleLossConfig {
                distance,
                pooled,
                ..Default::default()
            };
            let name = format!("CircleLoss {form} {distance:?}");
            let mut batch = row(&name, Batch::<CircleLoss>(cfg.clone()), NO_PAIRS);
            let mut memory = row(
                format!("{name} + memory"),
                Memory::<CircleLoss>(cfg),
                NO_MEMORY_PAIRS,
            );
            if distance == Distance::DotProduct {
                // α_n · s_n with α_n = [s_n + m]_+.
                batch.beyond_f32.push((Case::Huge, SQUARES_THE_DOT_PRODUCT));
                memory
                    .beyond_f32
                    .push((Case::Huge, SQUARES_THE_DOT_PRODUCT));
            }
            rows.push(batch);
            rows.push(memory);
        }
        for size_average in [true, false] {
            let cfg = ContrastiveLossConfig {
                distance,
                size_average,
                ..Default::default()
            };
            let mut r = row(
                format!("ContrastiveLoss {distance:?} size_average={size_average}"),
                Pairs::<ContrastiveLoss>(cfg),
                &[],
            );
            if distance == Distance::DotProduct {
                // y · d² with d = −x · y.
                r.beyond_f32.push((Case::Huge, SQUARES_THE_DOT_PRODUCT));
            }
            rows.push(r);
        }
        for symmetric in [false, true] {
            let cfg = MultipleNegativesRankingLossConfig {
                distance,
                symmetric,
                ..Default::default()
            };
            let mut r = row(
                format!("MultipleNegativesRankingLoss {distance:?} symmetric={symmetric}"),
                Pairs::<MultipleNegativesRankingLoss>(cfg.clone()),
                &[OneItem],
            );
            r.rejects
                .push((NoPositive, "it only takes positive pairs (score 1)"));
            rows.push(r);
            // The same loss over the nested prefixes 4 and 2 of the embedding.
            let mut r = row(
                format!(
                    "MatryoshkaLoss<MultipleNegativesRankingLoss> {distance:?} symmetric={symmetric}"
                ),
                Pairs::<MatryoshkaLoss<MultipleNegativesRankingLoss>>(MatryoshkaLossConfig {
                    dims: vec![D, D / 2],
                    weights: vec![1.0, 0.5],
                    inner: cfg.clone(),
                }),
                &[OneItem],
            );
            r.rejects
                .push((NoPositive, "it only takes positive pairs (score 1)"));
            rows.push(r);
            // With 2 mined negatives after the batch (TrainerConfig::hard_negatives): one
            // pair has something to learn now, so no case is flat.
            let mut r = row(
                format!(
                    "MultipleNegativesRankingLoss with mined negatives {distance:?} symmetric={symmetric}"
                ),
                PairsWithNegatives::<MultipleNegativesRankingLoss>(cfg.clone()),
                &[],
            );
            r.rejects
                .push((NoPositive, "it only takes positive pairs (score 1)"));
            rows.push(r);
            let mut r = row(
                format!(
                    "MatryoshkaLoss<MultipleNegativesRankingLoss> with mined negatives {distance:?} symmetric={symmetric}"
                ),
                PairsWithNegatives::<MatryoshkaLoss<MultipleNegativesRankingLoss>>(
                    MatryoshkaLossConfig {
                        dims: vec![D, D / 2],
                        weights: vec![1.0, 0.5],
                        inner: cfg.clone(),
                    },
                ),
                &[],
            );
            r.rejects
                .push((NoPositive, "it only takes positive pairs (score 1)"));
            rows.push(r);
        }
    }
    for distance in DISTANCES {
        let cfg = TripletLossConfig {
            distance,
            ..Default::default()
        };
        rows.push(row(
            format!("MatryoshkaLoss<TripletLoss hard> {distance:?}"),
            Batch::<MatryoshkaLoss<TripletLoss>>(MatryoshkaLossConfig {
                dims: vec![D, D / 2],
                weights: Vec::new(),
                inner: cfg.clone(),
            }),
            NO_PAIRS,
        ));
    }
    for (mode, epsilon) in [("mined", Some(0.1)), ("unmined", None)] {
        let cfg = MultiSimilarityLossConfig {
            epsilon,
            ..Default::default()
        };
        // Mined: an anchor without a positive keeps no negative and one without a
        // negative keeps no positive.
        let (zero, memory_zero): (&[Case], &[Case]) = match epsilon {
            Some(_) => (NO_PAIRS, NO_MEMORY_PAIRS),
            None => (&[OneItem], &[]),
        };
        let name = format!("MultiSimilarityLoss {mode}");
        rows.push(row(&name, Batch::<MultiSimilarityLoss>(cfg.clone()), zero));
        rows.push(row(
            format!("{name} + memory"),
            Memory::<MultiSimilarityLoss>(cfg),
            memory_zero,
        ));
    }
    rows.push(row(
        "SupConLoss",
        Batch::<SupConLoss>(Default::default()),
        &[NoPositive, Singletons, OneItem],
    ));
    rows.push(row(
        "SupConLoss + memory",
        Memory::<SupConLoss>(Default::default()),
        // One memory row of the anchor's group: the softmax over one candidate is 1.
        &[NoPositive, OneItem],
    ));
    rows.push(row(
        "FastAPLoss",
        Batch::<FastAPLoss>(FastAPLossConfig::default()),
        &[NoPositive, Singletons, OneItem],
    ));
    let softmax = SoftmaxLossConfig {
        num_groups: CLASSES,
        ..Default::default()
    };
    let center = CenterLossConfig {
        num_groups: CLASSES,
        ..Default::default()
    };
    rows.push(row(
        "SoftmaxLoss",
        Batch::<SoftmaxLoss>(softmax.clone()),
        &[],
    ));
    rows.push(row(
        "ArcFaceLoss",
        Batch::<ArcFaceLoss>(ArcFaceLossConfig {
            num_groups: CLASSES,
            ..Default::default()
        }),
        &[],
    ));
    rows.push(row(
        "CosFaceLoss",
        Batch::<CosFaceLoss>(CosFaceLossConfig {
            num_groups: CLASSES,
            ..Default::default()
        }),
        &[],
    ));
    rows.push(row("CenterLoss", Batch::<CenterLoss>(center.clone()), &[]));
    rows.push(row(
        "CombinedLoss<SoftmaxLoss, CenterLoss>",
        Batch::<CombinedLoss<SoftmaxLoss, CenterLoss>>(CombinedLossConfig {
            first: softmax,
            second: center,
            weights: (1.0, 0.5),
        }),
        &[],
    ));
    let combined = CombinedLossConfig::<TripletLossConfig, CircleLossConfig>::default();
    rows.push(row(
        "CombinedLoss<TripletLoss, CircleLoss>",
        Batch::<CombinedLoss<TripletLoss, CircleLoss>>(combined.clone()),
        NO_PAIRS,
    ));
    rows.push(row(
        "CombinedLoss<TripletLoss, CircleLoss> + memory",
        Memory::<CombinedLoss<TripletLoss, CircleLoss>>(combined),
        NO_MEMORY_PAIRS,
    ));
    rows
}

/// Why `outcome` fails the row on `case`, if it does.
fn check(row: &Row, case: Case, outcome: &Outcome) -> Vec<String> {
    let mut problems = Vec::new();
    if !outcome.loss.is_finite() {
        problems.push(format!("loss is {}", outcome.loss));
    }
    for (name, grad) in &outcome.grads {
        let Some(grad) = grad else { continue };
        if let Some(v) = grad.iter().find(|v| !v.is_finite()) {
            problems.push(format!("gradient of `{name}` holds {v}"));
        } else if (row.zero.contains(&case) || case == Case::EmptyMemory)
            && let Some(v) = grad.iter().find(|v| **v != 0.0)
        {
            problems.push(format!(
                "nothing can be learnt, but the gradient of `{name}` holds {v:e}"
            ));
        }
    }
    problems
}

#[test]
fn every_loss_is_finite_on_degenerate_batches_and_flat_where_nothing_can_be_learnt() {
    let rows = rows();
    let mut failures = Vec::new();
    let mut runs = 0;
    for row in &rows {
        for case in CASES.into_iter().filter(|&c| row.probe.applies(c)) {
            for dtype in [DType::F32, DType::F64] {
                if dtype == DType::F32 && row.beyond_f32.iter().any(|(c, _)| *c == case) {
                    continue;
                }
                runs += 1;
                let at = format!("{} on {case:?} ({dtype:?})", row.name);
                let result = row.probe.run(case, dtype);
                match (result, row.rejects.iter().find(|(c, _)| *c == case)) {
                    (Ok(outcome), None) => {
                        for p in check(row, case, &outcome) {
                            failures.push(format!("{at}: {p}"));
                        }
                    }
                    (Err(_), Some(_)) => {}
                    (Ok(_), Some((_, why))) => {
                        failures.push(format!("{at}: accepted, but should be rejected: {why}"))
                    }
                    (Err(e), None) => {
                        let e = e.to_string();
                        let first = e.lines().next().unwrap_or_default();
                        failures.push(format!("{at}: error: {first}"))
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {runs} runs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Every row on an ordinary batch, in f32 on the test device, against the same row in f64
/// on the CPU: on the CPU this holds the fused f32 kernels against the composite forms;
/// under `SIMILARITY_TEST_DEVICE=cuda` it holds the composite forms on the GPU (where the
/// kernels do not run) against the CPU, loss and every gradient.
#[test]
fn every_loss_on_the_test_device_matches_the_cpu_in_f64() {
    let mut failures = Vec::new();
    let rows = rows();
    for row in &rows {
        let at = &row.name;
        let got = row.probe.run(Case::Ordinary, DType::F32);
        let want = on(&Device::Cpu, || row.probe.run(Case::Ordinary, DType::F64));
        let (got, want) = match (got, want) {
            (Ok(g), Ok(w)) => (g, w),
            (g, w) => {
                failures.push(format!("{at}: {:?} / {:?}", g.err(), w.err()));
                continue;
            }
        };
        // f32 rounding (ε ≈ 1.2e-7) amplified by the largest logit scale in the table
        // (CircleLoss: 4γ = 1024) is about 1.2e-4 of the largest component per term;
        // 1e-3 leaves room for the sums over a batch (observed: 2.1e-4, CircleLoss pooled).
        let close = |a: f64, b: f64, scale: f64| (a - b).abs() <= 1e-3 * (1.0 + scale);
        if !close(got.loss, want.loss, want.loss.abs()) {
            failures.push(format!("{at}: loss {} vs {}", got.loss, want.loss));
        }
        for ((name, g), (_, w)) in got.grads.iter().zip(&want.grads) {
            let (g, w) = (g.clone().unwrap_or_default(), w.clone().unwrap_or_default());
            let scale = w.iter().fold(0f64, |m, v| m.max(v.abs()));
            let zeros = vec![0.0; g.len().max(w.len())];
            let (g, w) = (
                if g.is_empty() { &zeros } else { &g },
                if w.is_empty() { &zeros } else { &w },
            );
            let worst = g
                .iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs())
                .fold(0f64, f64::max);
            if g.len() != w.len() || g.iter().zip(w).any(|(a, b)| !close(*a, *b, scale)) {
                failures.push(format!(
                    "{at}: gradient of {name} differs by up to {worst:e} (largest component {scale:e})"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows differ across devices:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

/// The table covers every loss of the prelude: a loss added there without a row fails
/// here (the list is the prelude's, spelt out).
#[test]
fn the_table_covers_every_loss_in_the_prelude() {
    let names: Vec<String> = rows().into_iter().map(|r| r.name).collect();
    for loss in [
        "TripletLoss",
        "ContrastiveLoss",
        "OnlineContrastiveLoss",
        "MultipleNegativesRankingLoss",
        "MultiSimilarityLoss",
        "SupConLoss",
        "CircleLoss",
        "FastAPLoss",
        "SoftmaxLoss",
        "ArcFaceLoss",
        "CosFaceLoss",
        "CenterLoss",
        "CombinedLoss",
    ] {
        assert!(
            names.iter().any(|n| n.starts_with(&format!("{loss} "))
                || n == loss
                || n.starts_with(&format!("{loss}<"))),
            "no row for {loss}"
        );
    }
    for memory_loss in [
        "TripletLoss",
        "OnlineContrastiveLoss",
        "MultiSimilarityLoss",
        "SupConLoss",
        "CircleLoss",
        "CombinedLoss",
    ] {
        assert!(
            names
                .iter()
                .any(|n| n.starts_with(memory_loss) && n.ends_with("+ memory")),
            "no memory row for {memory_loss}"
        );
    }
}
