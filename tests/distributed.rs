//! Data-parallel training over MPI (feature `mpi`): every test below starts
//! `mpirun --oversubscribe -np N` on this very binary (its ignored `rank` test is what
//! each rank runs) under a timeout, so a deadlock fails the test instead of hanging it.
//!
//! Each rank trains the same model twice: once alone (the reference, no communicator)
//! and once over `MPI_COMM_WORLD` at the same global batch, and compares.
//!
//! * World size 1 is bit-identical to the plain trainer.
//! * Worlds of 2 and 3 match the single process within [`TOLERANCE`]: the loss is
//!   computed on the same values, but the gradients of the encoder and head are sums of
//!   the ranks' partial sums (another order of f32 additions, ~1e-7 relative per step),
//!   which Adam's normalised update carries into the weights over the run's steps.
//! * Two negative controls show the comparison can fail: negatives from the local shard
//!   only (`GatherMode::Local`), and the gathered batch without the other ranks'
//!   gradients returned (all-gather without autograd, then data parallelism's mean).

mod common;

use common::Counting;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use similarity_core::candle_core::Var;
use similarity_core::distributed::{self, Communicator, GatherMode, Mpi};
use similarity_core::head::Head;
use similarity_core::nn::{Init, Mode, Params};
use similarity_core::prelude::*;
use similarity_core::train::FitReport;
use similarity_core::train::hard_negatives::HardNegatives;

/// Largest |Δ| allowed between a weight trained on N ranks and the same weight trained
/// alone (weights are O(0.1–1)). Measured: at most 4.8e-7 (Triplet hard mining with XBM,
/// 2 and 3 ranks); the local-negatives control differs by 3.3e-2.
const TOLERANCE: f32 = 1e-5;

/// What a rank does: the scenario of `SIMILARITY_MPI_SCENARIO`.
const SCENARIO: &str = "SIMILARITY_MPI_SCENARIO";

// ---- models -----------------------------------------------------------------------

#[trainable_model]
struct Mnrl {
    #[encoder(cache = "auto")]
    text: Counting,
    #[head]
    head: SkipConnectionHead,
    #[loss(scale = 20.0, symmetric = true)]
    loss: MultipleNegativesRankingLoss,
}

#[trainable_model]
struct Contrastive {
    #[encoder(cache = "auto")]
    text: Counting,
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: ContrastiveLoss,
}

#[trainable_model]
struct TripletXbm {
    #[encoder(cache = "auto")]
    text: Counting,
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: TripletLoss,
    #[xbm(size = 64, weight = 0.5, start_iteration = 2)]
    memory: Xbm,
}

/// A trainable encoder over feature vectors; it fails on purpose when asked to (the
/// failing-rank test).
struct Mlp {
    weight: Var,
    fail_after: Option<usize>,
    /// The forward call whose gradient is NaN.
    nan_at: Option<usize>,
    calls: AtomicUsize,
}

impl Mlp {
    fn new(fail_after: Option<usize>) -> Self {
        let mut params = Params::new(&Device::Cpu, 3);
        params
            .var(
                "w",
                &[6, 5],
                Init::Normal {
                    mean: 0.0,
                    std: 0.3,
                },
            )
            .unwrap();
        let weight = params.named_vars()["w"].clone();
        Mlp {
            weight,
            fail_after,
            nan_at: None,
            calls: AtomicUsize::new(0),
        }
    }
}

impl Encoder for Mlp {
    type Input = Vec<f32>;
    type Batch = Tensor;
    const NAME: &'static str = "TestMlp";

    fn embedding_size(&self) -> usize {
        5
    }
    fn collate(&self, inputs: &[&Vec<f32>], device: &Device) -> similarity_core::Result<Tensor> {
        let flat: Vec<f32> = inputs.iter().flat_map(|x| x.iter().copied()).collect();
        Ok(Tensor::from_vec(flat, (inputs.len(), 6), device)?)
    }
    fn forward(&self, batch: &Tensor, _mode: &mut Mode) -> similarity_core::Result<Tensor> {
        let calls = self.calls.fetch_add(1, Ordering::SeqCst);
        if self.fail_after.is_some_and(|n| calls >= n) {
            return Err(similarity_core::Error::invalid(
                "TestMlp",
                "injected failure of this rank's encoder",
            ));
        }
        let out = batch.matmul(self.weight.as_tensor())?.tanh()?;
        if self.nan_at == Some(calls) {
            // Finite values, NaN gradient: d√x/dx at 0 is ∞, through w − w: ∞ − ∞.
            let w = self.weight.as_tensor();
            let zero = w.sub(&w.clone())?.sum_all()?.sqrt()?;
            return Ok(out.broadcast_add(&zero)?);
        }
        Ok(out)
    }
    fn trainable_vars(&self) -> Vec<Var> {
        vec![self.weight.clone()]
    }
    fn save(&self, _dir: &Path) -> similarity_core::Result<()> {
        Ok(())
    }
    fn load(_dir: &Path, _device: &Device) -> similarity_core::Result<Self> {
        Ok(Mlp::new(None))
    }
}

#[trainable_model]
struct Trainable {
    #[encoder]
    features: Mlp,
    #[head]
    head: SkipConnectionHead,
    #[loss(scale = 10.0)]
    loss: MultipleNegativesRankingLoss,
}

// ---- data ---------------------------------------------------------------------------

fn pairs(n: usize) -> Vec<SimilarityPairSample<String>> {
    common::faq_pairs("train", n)
}

/// Positive pairs and as many negatives (question i with answer i + 1).
fn scored_pairs(n: usize) -> Vec<SimilarityPairSample<String>> {
    let p = pairs(n);
    let mut out = Vec::new();
    for i in 0..n {
        out.push(p[i].clone());
        out.push(SimilarityPairSample {
            obj_a: p[i].obj_a.clone(),
            obj_b: p[(i + 1) % n].obj_b.clone(),
            score: 0.0,
            subgroup: 0,
        });
    }
    out
}

fn groups(n: usize) -> Vec<SimilarityGroupSample<String>> {
    pairs(n)
        .into_iter()
        .enumerate()
        .flat_map(|(i, p)| {
            [
                SimilarityGroupSample::new(p.obj_a, i as i64 % 9),
                SimilarityGroupSample::new(p.obj_b, i as i64 % 9),
            ]
        })
        .collect()
}

fn features(n: usize) -> Vec<SimilarityPairSample<Vec<f32>>> {
    let feat = |i: usize, j: usize| {
        (0..6)
            .map(|k| (((i * 31 + j * 7 + k * 13) % 17) as f32 / 8.0) - 1.0)
            .collect::<Vec<f32>>()
    };
    (0..n)
        .map(|i| SimilarityPairSample::positive(feat(i, 0), feat(i, 1)))
        .collect()
}

fn config(epochs: usize, batch_size: usize) -> TrainerConfig {
    TrainerConfig {
        epochs,
        batch_size,
        // Several cache batches, so the sharded fill shares them out.
        cache_batch_size: 24,
        optimizer: OptimizerConfig::adam(3e-3),
        progress: false,
        ..Default::default()
    }
}

// ---- comparisons --------------------------------------------------------------------

fn weights(state: &similarity_core::train::ModelState) -> Vec<(String, Vec<f32>)> {
    state
        .named_trainable_vars()
        .into_iter()
        .map(|(n, v)| (n, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

/// The largest |Δ| between two models' weights, and where.
fn max_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> (f32, String) {
    assert_eq!(a.len(), b.len());
    let mut worst = (0f32, String::new());
    for ((na, va), (nb, vb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        for (x, y) in va.iter().zip(vb) {
            let d = (x - y).abs();
            if d > worst.0 || d.is_nan() {
                worst = (d, na.clone());
            }
        }
    }
    worst
}

/// The largest |Δ| between two reports' per-epoch losses and metrics.
fn report_diff(a: &FitReport, b: &FitReport) -> f64 {
    assert_eq!(a.epochs.len(), b.epochs.len());
    assert_eq!(a.stopped_early, b.stopped_early);
    let mut worst = 0f64;
    for (x, y) in a.epochs.iter().zip(&b.epochs) {
        worst = worst.max((x.train_loss - y.train_loss).abs());
        if let (Some(vx), Some(vy)) = (&x.validation, &y.validation) {
            worst = worst.max((vx.loss - vy.loss).abs());
            for ((nx, mx), (ny, my)) in vx.metrics.iter().zip(&vy.metrics) {
                assert_eq!(nx, ny);
                worst = worst.max((mx - my).abs());
            }
        }
    }
    worst
}

/// The agreed outcome of a comparison: exact on one rank, within the tolerance on more.
fn check(
    name: &str,
    comm: &dyn Communicator,
    alone: &[(String, Vec<f32>)],
    ranked: &[(String, Vec<f32>)],
) -> f32 {
    let (d, var) = max_diff(alone, ranked);
    println!(
        "rank {} of {}: {name}: max |Δweight| {d:e} (at {var})",
        comm.rank(),
        comm.world_size()
    );
    if comm.world_size() == 1 {
        assert_eq!(d, 0.0, "{name}: a world of one must be bit-identical");
    } else {
        assert!(d <= TOLERANCE, "{name}: {d} > {TOLERANCE} at {var}");
    }
    d
}

/// A directory every rank names alike: rank 0's fresh temporary directory, broadcast.
fn shared_dir(comm: &dyn Communicator, keep: &mut Vec<tempfile::TempDir>) -> PathBuf {
    let mut bytes = Vec::new();
    if comm.rank() == 0 {
        let dir = tempfile::tempdir().unwrap();
        bytes = dir.path().to_string_lossy().into_owned().into_bytes();
        keep.push(dir);
    }
    comm.broadcast_bytes(0, &mut bytes).unwrap();
    PathBuf::from(String::from_utf8(bytes).unwrap())
}

// ---- what each rank runs --------------------------------------------------------------

fn match_single_process(comm: Arc<Mpi>) {
    let c = || config(3, 20);
    let world = comm.world_size();
    let mut keep = Vec::new();

    // MNRL pairs: in-batch negatives over the whole global batch; validation metrics
    // over the whole validation set; the sharded fill gives every rank the same cache.
    let val = common::faq_pairs("val", 30);
    let (solo, alone) = {
        let objects = Arc::new(AtomicUsize::new(0));
        let mut m = Mnrl::new(Counting::new(7, objects.clone()), &Default::default()).unwrap();
        let report = Trainer::new(c())
            .fit(&mut m, &pairs(70), Some(&val))
            .unwrap();
        (
            report,
            (weights(m.state()), m, objects.load(Ordering::SeqCst)),
        )
    };
    let objects = Arc::new(AtomicUsize::new(0));
    let mut m = Mnrl::new(Counting::new(7, objects.clone()), &Default::default()).unwrap();
    let cache_dir = shared_dir(&*comm, &mut keep);
    let cfg = TrainerConfig {
        cache_dir: Some(cache_dir.clone()),
        ..c()
    };
    let report = Trainer::new(cfg)
        .with_communicator(comm.clone())
        .fit(&mut m, &pairs(70), Some(&val))
        .unwrap();
    check("MNRL", &*comm, &alone.0, &weights(m.state()));
    let rd = report_diff(&solo, &report);
    assert!(rd <= 1e-4, "MNRL: reports differ by {rd}");
    // Every unique object once over all ranks, each rank about 1/world of them (the
    // fill goes by batches of cache_batch_size).
    let encoded = objects.load(Ordering::SeqCst);
    let mut total = [encoded as f64];
    comm.all_reduce_sum_f64(&mut total).unwrap();
    assert_eq!(
        total[0] as usize, alone.2,
        "sharded fill: objects encoded in all"
    );
    if world > 1 {
        assert!(
            encoded < alone.2,
            "rank {}: encoded {encoded} of {}",
            comm.rank(),
            alone.2
        );
    }
    // The same rows as the single-process fill, bit for bit.
    let (a, b) = (
        alone.1.state().cache(0).unwrap(),
        m.state().cache(0).unwrap(),
    );
    let keys: Vec<_> = a.keys().copied().collect();
    assert_eq!(keys.len(), b.len());
    let (ra, rb) = (a.rows_of(&keys).unwrap(), b.rows_of(&keys).unwrap());
    let d = (ra - rb)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(
        d, 0.0,
        "sharded cache rows differ from the single-process fill"
    );
    comm.barrier().unwrap();
    // Rank 0 persisted the cache (its key set: every object of the fit).
    assert!(
        cache_dir.join("text").exists(),
        "the persisted cache is missing"
    );
    println!(
        "rank {}: sharded fill ok ({encoded} of {} objects here)",
        comm.rank(),
        alone.2
    );

    // ContrastiveLoss over scored pairs.
    let alone = {
        let mut m =
            Contrastive::new(Counting::new(7, Arc::default()), &Default::default()).unwrap();
        Trainer::new(c())
            .fit(&mut m, &scored_pairs(40), None)
            .unwrap();
        weights(m.state())
    };
    let mut m = Contrastive::new(Counting::new(7, Arc::default()), &Default::default()).unwrap();
    Trainer::new(c())
        .with_communicator(comm.clone())
        .fit(&mut m, &scored_pairs(40), None)
        .unwrap();
    check("Contrastive", &*comm, &alone, &weights(m.state()));

    // Triplet hard mining over the global batch, with the memory enqueued in rank order.
    let alone = {
        let mut m = TripletXbm::new(Counting::new(7, Arc::default()), &Default::default()).unwrap();
        Trainer::new(c()).fit(&mut m, &groups(45), None).unwrap();
        (weights(m.state()), m.extra_state())
    };
    let mut m = TripletXbm::new(Counting::new(7, Arc::default()), &Default::default()).unwrap();
    Trainer::new(c())
        .with_communicator(comm.clone())
        .fit(&mut m, &groups(45), None)
        .unwrap();
    check("Triplet hard + XBM", &*comm, &alone.0, &weights(m.state()));
    for (name, t) in m.extra_state() {
        let d = (&alone.1[&name] - &t)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap();
        let d = d
            .max(0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d <= TOLERANCE, "memory `{name}` differs by {d}");
    }

    // Hard negatives mined over the ranks (each mines a share of the queries): MNRL with
    // the global batch's mined answers gathered after it, and batch-hard triplets with
    // the mined objects in the global batch. Mining must change training (the runs are
    // not vacuous) and the ranks must still match the single process.
    let mined = || TrainerConfig {
        hard_negatives: Some(HardNegatives {
            num_negatives: 2,
            every_epochs: 2,
            ..Default::default()
        }),
        ..c()
    };
    for (name, groups_data) in [
        ("MNRL + mined negatives", false),
        ("Triplet + mined negatives", true),
    ] {
        let fit = |cfg: TrainerConfig, comm: Option<Arc<Mpi>>| {
            let mut trainer = Trainer::new(cfg);
            if let Some(comm) = comm {
                trainer = trainer.with_communicator(comm);
            }
            if groups_data {
                let mut m =
                    TripletXbm::new(Counting::new(7, Arc::default()), &Default::default()).unwrap();
                trainer.fit(&mut m, &groups(45), None).unwrap();
                weights(m.state())
            } else {
                let mut m =
                    Mnrl::new(Counting::new(7, Arc::default()), &Default::default()).unwrap();
                trainer.fit(&mut m, &pairs(70), None).unwrap();
                weights(m.state())
            }
        };
        let (plain, alone) = (fit(c(), None), fit(mined(), None));
        let (changed, _) = max_diff(&plain, &alone);
        assert!(changed > 1e-4, "{name}: mining changed nothing ({changed})");
        check(name, &*comm, &alone, &fit(mined(), Some(comm.clone())));
    }

    // GradCache over the global batch: each rank embeds its shard without graph, the
    // loss and its gradient are the global batch's, each rank backpropagates its rows.
    // A trainable encoder (whose gradient crosses the gather), and MNRL with mined
    // negatives (rows after the pairs').
    let cached = |cfg: TrainerConfig| TrainerConfig {
        grad_cache: Some(3),
        ..cfg
    };
    let alone = {
        let mut m = Trainable::new(Mlp::new(None), &Default::default()).unwrap();
        Trainer::new(cached(c()))
            .fit(&mut m, &features(50), None)
            .unwrap();
        weights(m.state())
    };
    let mut m = Trainable::new(Mlp::new(None), &Default::default()).unwrap();
    Trainer::new(cached(c()))
        .with_communicator(comm.clone())
        .fit(&mut m, &features(50), None)
        .unwrap();
    check(
        "trainable encoder, GradCache",
        &*comm,
        &alone,
        &weights(m.state()),
    );
    let alone = {
        let mut m = Mnrl::new(Counting::new(7, Arc::default()), &Default::default()).unwrap();
        Trainer::new(cached(mined()))
            .fit(&mut m, &pairs(70), None)
            .unwrap();
        weights(m.state())
    };
    let mut m = Mnrl::new(Counting::new(7, Arc::default()), &Default::default()).unwrap();
    Trainer::new(cached(mined()))
        .with_communicator(comm.clone())
        .fit(&mut m, &pairs(70), None)
        .unwrap();
    check(
        "MNRL + mined negatives, GradCache",
        &*comm,
        &alone,
        &weights(m.state()),
    );

    // A trainable encoder: its gradient crosses the gather too. Clipped hard, so that
    // every step is clipped: the norm must be the reduced gradient's, not a rank's.
    let clipped = || TrainerConfig {
        clip_grad_norm: Some(0.01),
        ..c()
    };
    let alone = {
        let mut m = Trainable::new(Mlp::new(None), &Default::default()).unwrap();
        Trainer::new(clipped())
            .fit(&mut m, &features(50), None)
            .unwrap();
        weights(m.state())
    };
    let mut m = Trainable::new(Mlp::new(None), &Default::default()).unwrap();
    Trainer::new(clipped())
        .with_communicator(comm.clone())
        .fit(&mut m, &features(50), None)
        .unwrap();
    check(
        "trainable encoder, clipped",
        &*comm,
        &alone,
        &weights(m.state()),
    );

    // Checkpoints on rank 0, early stopping alike everywhere, and a distributed resume
    // that ends where the uninterrupted distributed run ends.
    let dir = shared_dir(&*comm, &mut keep);
    let es = TrainerConfig {
        epochs: 4,
        early_stopping: Some(EarlyStopping {
            monitor: "val_loss".into(),
            mode: MonitorMode::Min,
            patience: 2,
            min_delta: 0.0,
        }),
        checkpoints: Some(CheckpointConfig {
            dir: dir.join("checkpoints"),
            every_n_epochs: 1,
            save_best: true,
        }),
        ..c()
    };
    let full = {
        let mut m = Mnrl::new(Counting::new(7, Arc::default()), &Default::default()).unwrap();
        let r = Trainer::new(es.clone())
            .with_communicator(comm.clone())
            .fit(&mut m, &pairs(70), Some(&val))
            .unwrap();
        (r, weights(m.state()))
    };
    let solo = {
        let mut m = Mnrl::new(Counting::new(7, Arc::default()), &Default::default()).unwrap();
        let cfg = TrainerConfig {
            checkpoints: None,
            ..es.clone()
        };
        Trainer::new(cfg)
            .fit(&mut m, &pairs(70), Some(&val))
            .unwrap()
    };
    let rd = report_diff(&solo, &full.0);
    assert!(rd <= 1e-4, "early-stopping run: reports differ by {rd}");
    comm.barrier().unwrap();
    let epoch_1 = dir.join("checkpoints").join("epoch-0002");
    assert!(
        epoch_1.exists(),
        "rank 0 wrote no checkpoint at {}",
        epoch_1.display()
    );
    let mut m = Mnrl::new(Counting::new(7, Arc::default()), &Default::default()).unwrap();
    let resume_cfg = TrainerConfig {
        checkpoints: None,
        ..es
    };
    let resumed = Trainer::new(resume_cfg)
        .with_communicator(comm.clone())
        .resume(&mut m, &epoch_1, &pairs(70), Some(&val))
        .unwrap();
    assert_eq!(resumed.epochs.len(), full.0.epochs.len());
    let (d, var) = max_diff(&full.1, &weights(m.state()));
    assert_eq!(
        d, 0.0,
        "a distributed resume differs from the uninterrupted run at {var}"
    );
    println!(
        "rank {}: checkpoints, early stopping, resume ok",
        comm.rank()
    );
}

/// The two negative controls (worlds of 2 and more).
fn negative_controls(comm: Arc<Mpi>) {
    let c = || config(3, 20);
    // 1. Negatives only from the local shard.
    let alone = {
        let mut m = Mnrl::new(Counting::new(7, Arc::default()), &Default::default()).unwrap();
        Trainer::new(c()).fit(&mut m, &pairs(70), None).unwrap();
        weights(m.state())
    };
    let mut m = Mnrl::new(Counting::new(7, Arc::default()), &Default::default()).unwrap();
    let local = TrainerConfig {
        gather: GatherMode::Local,
        ..c()
    };
    Trainer::new(local)
        .with_communicator(comm.clone())
        .fit(&mut m, &pairs(70), None)
        .unwrap();
    let (d, _) = max_diff(&alone, &weights(m.state()));
    println!(
        "rank {}: control, local negatives: max |Δweight| {d:e}",
        comm.rank()
    );
    assert!(
        d > 10.0 * TOLERANCE,
        "local-shard negatives should differ, got {d}"
    );

    // 2. The gathered batch without the other ranks' gradients returned: one step's
    // gradients, against the single-process gradients of the same global batch.
    let mut m = Mnrl::new(Counting::new(7, Arc::default()), &Default::default()).unwrap();
    let data = pairs(24);
    let trainer = Trainer::new(TrainerConfig { epochs: 1, ..c() });
    // Fills the cache (and validates nothing): afterwards every text is a cache row.
    trainer.evaluate(&mut m, &data).unwrap();
    let cache = m.state().cache(0).unwrap();
    let key = |s: &String| similarity_core::cache::cache_key(s);
    let rows_of = |range: std::ops::Range<usize>| {
        let keys: Vec<_> = [0, 1]
            .iter()
            .flat_map(|&slot| {
                data[range.clone()]
                    .iter()
                    .map(move |p| key(if slot == 0 { &p.obj_a } else { &p.obj_b }))
            })
            .collect();
        cache.rows_of(&keys).unwrap()
    };
    let metas = similarity_core::data::metas(&data).unwrap();
    let targets =
        <SimilarityPairSample<String> as similarity_core::data::SimilaritySample>::targets(
            &metas,
            &Device::Cpu,
        )
        .unwrap();
    let head_grads = |emb: &Tensor| {
        let loss = m.loss().forward(emb, &targets).unwrap();
        let grads = loss.backward().unwrap();
        weights_of_grads(m.state(), &grads)
    };
    let embed = |rows: Tensor| m.head.forward(&rows, &mut Mode::Eval).unwrap();
    let reference = head_grads(&embed(rows_of(0..data.len())));
    let world = comm.world_size();
    let sizes = distributed::shard_sizes(data.len(), world);
    let mine = distributed::shard(data.len(), world, comm.rank());
    let local = embed(rows_of(mine));
    let reduce = |g: &[(String, Vec<f32>)], scale: f32| {
        let mut flat: Vec<f32> = g
            .iter()
            .flat_map(|(_, v)| v.iter().map(|x| x * scale))
            .collect();
        comm.all_reduce_sum(&mut flat).unwrap();
        flat
    };
    let flat = |g: &[(String, Vec<f32>)]| g.iter().flat_map(|(_, v)| v.clone()).collect::<Vec<_>>();
    let exact = reduce(
        &head_grads(&distributed::gather_global_batch(&*comm, &local, &sizes, 2, true).unwrap()),
        1.0,
    );
    let naive = reduce(
        &head_grads(&distributed::gather_global_batch(&*comm, &local, &sizes, 2, true).unwrap()),
        1.0 / world as f32,
    );
    let reference = flat(&reference);
    let diff = |g: &[f32]| {
        g.iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    };
    let scale = reference.iter().map(|v| v.abs()).fold(0f32, f32::max);
    println!(
        "rank {}: one step, max |Δgrad| exact {:e}, without the gradients summed {:e} (max |grad| {scale:e})",
        comm.rank(),
        diff(&exact),
        diff(&naive)
    );
    assert!(
        diff(&exact) <= 1e-5 * scale.max(1.0),
        "the exact gradient differs"
    );
    assert!(
        diff(&naive) > 0.1 * scale,
        "the naive gradient should differ"
    );
    // All rows constant: no gradient at all reaches the head.
    let detached = distributed::gather_global_batch(&*comm, &local, &sizes, 2, false).unwrap();
    let loss = m.loss().forward(&detached, &targets).unwrap();
    let grads = loss.backward().unwrap();
    assert!(
        m.state()
            .named_trainable_vars()
            .iter()
            .all(|(_, v)| grads.get(v).is_none()),
        "a detached gather carries no gradient"
    );
}

fn weights_of_grads(
    state: &similarity_core::train::ModelState,
    grads: &similarity_core::candle_core::backprop::GradStore,
) -> Vec<(String, Vec<f32>)> {
    state
        .named_trainable_vars()
        .into_iter()
        .filter_map(|(n, v)| {
            grads
                .get(&v)
                .map(|g| (n, g.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        })
        .collect()
}

/// Rank 1's encoder fails at its fourth batch: every rank must end, with the error.
fn failing_rank(comm: Arc<Mpi>) {
    let fail = (comm.rank() == 1).then_some(3);
    let mut m = Trainable::new(Mlp::new(fail), &Default::default()).unwrap();
    let _ = Trainer::new(config(50, 10))
        .with_communicator(comm.clone())
        .fit(&mut m, &features(50), None);
    unreachable!(
        "rank {}: the fit returned although rank 1 failed",
        comm.rank()
    );
}

/// Rank 1's encoder gives a NaN gradient at its third batch (finite embeddings; NaN ones
/// are an error naming the record): with `SkipStep` every rank skips that
/// step alike and the ranks end with the same weights.
fn non_finite_on_one_rank(comm: Arc<Mpi>) {
    let mut mlp = Mlp::new(None);
    if comm.rank() == 1 {
        mlp.nan_at = Some(2);
    }
    let mut m = Trainable::new(mlp, &Default::default()).unwrap();
    let cfg = TrainerConfig {
        non_finite: NonFinitePolicy::SkipStep,
        ..config(2, 10)
    };
    let report = Trainer::new(cfg)
        .with_communicator(comm.clone())
        .fit(&mut m, &features(50), None)
        .unwrap();
    let skipped: Vec<usize> = report.epochs.iter().map(|e| e.skipped_steps).collect();
    assert_eq!(skipped, [1, 0], "rank {}: skipped steps", comm.rank());
    // The same weights everywhere: rank 0's, broadcast, against this rank's.
    let mine = weights(m.state());
    let mut bytes: Vec<u8> = mine
        .iter()
        .flat_map(|(_, v)| v.iter().flat_map(|x| x.to_le_bytes()))
        .collect();
    let own = bytes.clone();
    comm.broadcast_bytes(0, &mut bytes).unwrap();
    assert_eq!(
        bytes,
        own,
        "rank {}: weights differ from rank 0's",
        comm.rank()
    );
}

/// Rank 1 is given one sample less: the ranks must refuse to train, naming it.
fn disagreeing_data(comm: Arc<Mpi>) {
    let n = if comm.rank() == 1 { 69 } else { 70 };
    let mut m = Mnrl::new(Counting::new(7, Arc::default()), &Default::default()).unwrap();
    let _ = Trainer::new(config(1, 20))
        .with_communicator(comm.clone())
        .fit(&mut m, &pairs(n), None);
    unreachable!("rank {}: trained on different data", comm.rank());
}

#[test]
#[ignore = "what each rank runs under mpirun; started by the tests below"]
fn rank() {
    let scenario = std::env::var(SCENARIO).expect("set by the launching test");
    let comm = Mpi::init().unwrap();
    match scenario.as_str() {
        "match" => match_single_process(comm.clone()),
        "controls" => negative_controls(comm.clone()),
        "fail" => failing_rank(comm.clone()),
        "disagree" => disagreeing_data(comm.clone()),
        "nonfinite" => non_finite_on_one_rank(comm.clone()),
        other => panic!("unknown scenario {other}"),
    }
    println!(
        "rank {} of {}: scenario {scenario} passed",
        comm.rank(),
        comm.world_size()
    );
}

// ---- the launcher ---------------------------------------------------------------------

/// Runs `scenario` on `np` ranks under `mpirun`, killed after `timeout`: (success,
/// stdout + stderr, seconds).
fn mpirun(np: usize, scenario: &str, timeout: Duration) -> (bool, String, f64) {
    let exe = std::env::current_exe().unwrap();
    let start = Instant::now();
    let mut child = Command::new("mpirun")
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            &np.to_string(),
        ])
        .arg(&exe)
        .args([
            "rank",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SCENARIO, scenario)
        // One thread per rank: the ranks share this machine's cores.
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun (Open MPI: apt-get install openmpi-bin libopenmpi-dev)");
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let readers = (
        std::thread::spawn(move || {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut out, &mut s).ok();
            s
        }),
        std::thread::spawn(move || {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut err, &mut s).ok();
            s
        }),
    );
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > timeout {
            child.kill().ok();
            let _ = child.wait();
            let text = format!("{}{}", readers.0.join().unwrap(), readers.1.join().unwrap());
            panic!("mpirun -np {np} {scenario}: no end after {timeout:?} (a deadlock?)\n{text}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = format!("{}{}", readers.0.join().unwrap(), readers.1.join().unwrap());
    (status.success(), text, start.elapsed().as_secs_f64())
}

fn assert_passes(np: usize, scenario: &str) {
    let (ok, text, secs) = mpirun(np, scenario, Duration::from_secs(600));
    println!("{text}");
    assert!(
        ok,
        "mpirun -np {np} {scenario} failed after {secs:.1} s:\n{text}"
    );
    let passed = text.matches(&format!("scenario {scenario} passed")).count();
    assert_eq!(passed, np, "not every rank passed:\n{text}");
}

#[test]
fn a_world_of_one_is_bit_identical_to_the_plain_trainer() {
    assert_passes(1, "match");
}

#[test]
fn two_ranks_match_one_process() {
    assert_passes(2, "match");
}

#[test]
fn three_ranks_match_one_process() {
    assert_passes(3, "match");
}

#[test]
fn local_negatives_and_ungathered_gradients_differ_from_one_process() {
    assert_passes(2, "controls");
}

#[test]
fn a_failing_rank_ends_every_rank_with_its_error() {
    let (ok, text, secs) = mpirun(2, "fail", Duration::from_secs(120));
    assert!(!ok, "the run succeeded although rank 1 failed:\n{text}");
    assert!(
        text.contains("rank 1 of 2"),
        "the error does not name the rank:\n{text}"
    );
    assert!(
        text.contains("injected failure"),
        "the error is not shown:\n{text}"
    );
    assert!(!text.contains("trained on different data") && !text.contains("the fit returned"));
    assert!(secs < 60.0, "ending took {secs:.1} s");
}

#[test]
fn a_non_finite_step_on_one_rank_is_skipped_on_every_rank() {
    assert_passes(2, "nonfinite");
}

#[test]
fn ranks_given_different_data_refuse_to_train() {
    let (ok, text, _) = mpirun(2, "disagree", Duration::from_secs(120));
    assert!(!ok, "the ranks trained on different data:\n{text}");
    assert!(
        text.contains("disagree on the number of training samples"),
        "the error does not name what differs:\n{text}"
    );
}
