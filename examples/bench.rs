//! Benchmark of the workloads W1 to W4 (the same work that
//! Quaterion's `bench.py` measured), printing one JSON line per measurement.
//!
//! ```text
//! cargo run --release --example bench -- --all            # matmul, W1 to W4, 3 runs each
//! cargo run --release --example bench -- --w1 --runs 5    # matmul and W1 only
//! cargo run --release --example bench -- --only w1_cached --gflops 60   # one run, this process
//! ```
//!
//! Flags: `--w1 --w2 --w3 --w4 --all`, `--runs N` (runs of each training workload,
//! default 3), `--epochs N` (default 10).
//!
//! The FAQ task end to end (feature `transformers`): Quaterion's NLP tutorial recipe on
//! `data/cloud-faq` with all-MiniLM-L6-v2 frozen and cached, 500 epochs by default:
//!
//! ```text
//! bash scripts/fetch-minilm.sh
//! cargo run --release --features transformers --example bench -- \
//!     --faq target/models/all-MiniLM-L6-v2 [--epochs 500]
//! ```
//!
//! It prints the matmul line and one `faq` line: `evaluate_before_s` (the first full-set
//! evaluation, which fills the validation cache), `cache_fill_s` (the training texts),
//! `mean_epoch_s` (training and validation, after the first epoch), `fit_wall_s`,
//! `total_s` (model built to final evaluation), `peak_rss_mb`, precision@1 and MRR
//! before and after over the full validation set, and the fill's matmul floor.
//! `scripts/quaterion_faq.py` runs the same recipe with Quaterion.
//!
//! * First line: the f32 matmul throughput of this machine, 2048³, median of 5.
//! * W1 to W3: every run is a fresh process (the example runs itself with `--only NAME`)
//!   so that its peak RSS (`VmHWM`) is its own. A run prints its figures; after the runs of
//!   a workload, a `summary` line gives the medians, the floor of each timing (its matmul
//!   FLOPs divided by the measured throughput) and `ratio = time / floor`.
//!   Training runs without validation, so epoch times are training only; one validation
//!   pass over the held-out set is timed separately.
//! * W4: forward + backward of every loss on 1024 × 384 N(0, 1) embeddings.
//!
//! Every line has `machine_load`: CPU seconds used by other processes during the
//! measurement (from `/proc/stat` minus this process's own time), as a fraction of
//! the machine's capacity over the wall time.

#[path = "common/faq_task.rs"]
#[allow(dead_code)]
mod faq_task;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use similarity_core::candle_core::{DType, Var};
use similarity_core::data::{GroupTargets, SimilaritySample};
use similarity_core::loss::{
    ArcFaceLossConfig, CenterLossConfig, CircleLossConfig, CombinedLossConfig, CosFaceLossConfig,
    LossKind, OnlineContrastiveLossConfig, PairMining, SoftmaxLossConfig, TripletLossConfig,
    TripletMining,
};
use similarity_core::metric::{Evaluator, Relevance, RetrievalPrecision};
use similarity_core::nn::{Mode, Params};
use similarity_core::prelude::*;

const DIM_IN: usize = 512;
const HIDDEN: usize = 1024;
const DIM: usize = 384;
const N_CLASSES: usize = 100;
const N_TRAIN: usize = 20_000;
const N_VAL: usize = 2_000;
const BATCH: usize = 256;
const XBM_SIZE: usize = 4096;

// ---------------------------------------------------------------------------------------
// Data and the frozen encoder

fn normal(rng: &mut StdRng) -> f32 {
    // Box–Muller.
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// `n_train + n_val` items (rows of one matrix) and their classes: 100 centroids in a random
/// 64-dim subspace of R^512 (scale 0.35·√8 per subspace coordinate), item = centroid + N(0, 1).
/// Train items come from seed 42, held-out items from seed 43; centroids from seed 41.
struct Data {
    x: Vec<f32>,
    classes: Vec<i64>,
}

fn make_data() -> Data {
    let mut rng = StdRng::seed_from_u64(41);
    // Orthonormal basis of a random 64-dim subspace (Gram–Schmidt of Gaussian vectors).
    let k = 64;
    let mut basis: Vec<Vec<f32>> = Vec::with_capacity(k);
    while basis.len() < k {
        let mut v: Vec<f32> = (0..DIM_IN).map(|_| normal(&mut rng)).collect();
        for b in &basis {
            let dot: f32 = v.iter().zip(b).map(|(x, y)| x * y).sum();
            v.iter_mut().zip(b).for_each(|(x, y)| *x -= dot * y);
        }
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= norm);
        basis.push(v);
    }
    let scale = 0.35 * 8f32.sqrt();
    let centroids: Vec<Vec<f32>> = (0..N_CLASSES)
        .map(|_| {
            let z: Vec<f32> = (0..k).map(|_| scale * normal(&mut rng)).collect();
            (0..DIM_IN)
                .map(|j| z.iter().zip(&basis).map(|(zi, b)| zi * b[j]).sum())
                .collect()
        })
        .collect();
    let mut x = Vec::with_capacity((N_TRAIN + N_VAL) * DIM_IN);
    let mut classes = Vec::with_capacity(N_TRAIN + N_VAL);
    for (seed, n) in [(42, N_TRAIN), (43, N_VAL)] {
        let mut rng = StdRng::seed_from_u64(seed);
        for _ in 0..n {
            let c = rng.random_range(0..N_CLASSES);
            classes.push(c as i64);
            x.extend(centroids[c].iter().map(|v| v + normal(&mut rng)));
        }
    }
    Data { x, classes }
}

/// Linear(512, 1024) → ReLU → Linear(1024, 384), uniform(±1/√fan_in) weights from seed 1234.
/// Its input is an item's row index in the shared data matrix, so collation is one gather.
struct FrozenMlp {
    data: Arc<Tensor>,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
}

impl FrozenMlp {
    fn new(data: Arc<Tensor>) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(1234);
        let mut uniform = |shape: &[usize], fan_in: usize| -> Result<Tensor> {
            let bound = 1.0 / (fan_in as f32).sqrt();
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..bound)).collect();
            Ok(Tensor::from_vec(v, shape, &bench_device()?)?)
        };
        Ok(FrozenMlp {
            w1: uniform(&[DIM_IN, HIDDEN], DIM_IN)?,
            b1: uniform(&[HIDDEN], DIM_IN)?,
            w2: uniform(&[HIDDEN, DIM], HIDDEN)?,
            b2: uniform(&[DIM], HIDDEN)?,
            data,
        })
    }
}

impl Encoder for FrozenMlp {
    type Input = u32;
    type Batch = Tensor;
    const NAME: &'static str = "BenchFrozenMlp";

    fn embedding_size(&self) -> usize {
        DIM
    }

    fn collate(&self, inputs: &[&u32], device: &Device) -> similarity_core::Result<Tensor> {
        let ids: Vec<u32> = inputs.iter().map(|&&i| i).collect();
        let ids = Tensor::from_vec(ids, inputs.len(), device)?;
        Ok(self.data.index_select(&ids, 0)?)
    }

    fn forward(&self, batch: &Tensor, _mode: &mut Mode) -> similarity_core::Result<Tensor> {
        let h = batch.matmul(&self.w1)?.broadcast_add(&self.b1)?.relu()?;
        Ok(h.matmul(&self.w2)?.broadcast_add(&self.b2)?)
    }

    fn save(&self, dir: &Path) -> similarity_core::Result<()> {
        let map = std::collections::HashMap::from([
            ("w1".to_string(), self.w1.clone()),
            ("b1".to_string(), self.b1.clone()),
            ("w2".to_string(), self.w2.clone()),
            ("b2".to_string(), self.b2.clone()),
        ]);
        Ok(similarity_core::candle_core::safetensors::save(
            &map,
            dir.join("mlp.safetensors"),
        )?)
    }

    fn load(_dir: &Path, _device: &Device) -> similarity_core::Result<Self> {
        Err(similarity_core::Error::invalid(
            "BenchFrozenMlp",
            "is a benchmark encoder over in-memory data and cannot be loaded",
        ))
    }
}

impl FrozenEncoder for FrozenMlp {}

#[trainable_model]
struct W1Cached {
    #[encoder(cache = "auto")]
    mlp: FrozenMlp,
    #[head]
    head: SkipConnectionHead,
    /// Defaults: margin 0.5, hard mining, cosine.
    #[loss]
    loss: TripletLoss,
}

#[trainable_model]
struct W1Uncached {
    #[encoder]
    mlp: FrozenMlp,
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: TripletLoss,
}

#[trainable_model]
struct W2Pairs {
    #[encoder(cache = "auto")]
    mlp: FrozenMlp,
    #[head]
    head: SkipConnectionHead,
    /// Defaults: cosine, margin 0.5.
    #[loss]
    loss: ContrastiveLoss,
}

#[trainable_model]
struct W3Xbm {
    #[encoder(cache = "auto")]
    mlp: FrozenMlp,
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: TripletLoss,
    #[xbm(size = 4096, start_iteration = 0)]
    memory: Xbm,
}

// ---------------------------------------------------------------------------------------
// Machine load and memory

/// Busy jiffies of the whole machine and of this process.
fn cpu_ticks() -> (u64, u64) {
    let total = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().next()?.to_string();
            let v: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal
            Some(v[0] + v[1] + v[2] + v.get(5).unwrap_or(&0) + v.get(6).unwrap_or(&0))
        })
        .unwrap_or(0);
    let own = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            let v: Vec<&str> = rest.split_whitespace().collect();
            // fields 14 and 15 (utime, stime) are 12 and 13 after the command name.
            Some(v[11].parse::<u64>().ok()? + v[12].parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    (total, own)
}

struct Load {
    start: Instant,
    ticks: (u64, u64),
    loadavg: String,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

impl Load {
    fn start() -> Self {
        Load {
            start: Instant::now(),
            ticks: cpu_ticks(),
            loadavg: loadavg(),
        }
    }

    fn finish(&self) -> Value {
        let wall = self.start.elapsed().as_secs_f64();
        let (total, own) = cpu_ticks();
        let hz = 100.0; // USER_HZ on Linux
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let total_s = (total - self.ticks.0) as f64 / hz;
        let own_s = (own - self.ticks.1) as f64 / hz;
        let other = (total_s - own_s).max(0.0);
        json!({
            "wall_s": round(wall, 3),
            "own_cpu_s": round(own_s, 2),
            "other_procs_cpu_s": round(other, 2),
            "other_procs_cpu_frac": round(other / (wall * cores), 4),
            "loadavg_before": self.loadavg,
            "loadavg_after": loadavg(),
        })
    }
}

/// `CANDLE_NUM_THREADS` as set for this run (see BENCHMARKS.md: on a small shared machine
/// `CANDLE_NUM_THREADS=1` avoids Candle's spin-waiting element-wise thread pool).
fn candle_threads_env() -> Value {
    std::env::var("CANDLE_NUM_THREADS").map_or(Value::Null, Value::String)
}

/// glibc's malloc thresholds as set for this run (see BENCHMARKS.md: raised thresholds keep
/// the multi-megabyte tensors of a step in the heap instead of mapping and page-faulting
/// them in again at every step).
fn malloc_env() -> Value {
    let get = |k: &str| std::env::var(k).map_or(Value::Null, Value::String);
    json!({
        "MALLOC_MMAP_THRESHOLD_": get("MALLOC_MMAP_THRESHOLD_"),
        "MALLOC_TRIM_THRESHOLD_": get("MALLOC_TRIM_THRESHOLD_"),
    })
}

fn vm_hwm_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?.to_string();
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

// ---------------------------------------------------------------------------------------
// Matmul throughput

fn matmul_gflops() -> Result<Value> {
    let load = Load::start();
    let n = 2048;
    let mut rng = StdRng::seed_from_u64(7);
    let mut m = || -> Result<Tensor> {
        let v: Vec<f32> = (0..n * n).map(|_| normal(&mut rng)).collect();
        Ok(Tensor::from_vec(v, (n, n), &Device::Cpu)?)
    };
    let (a, b) = (m()?, m()?);
    let _ = a.matmul(&b)?; // warm-up
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        times.push(t.elapsed().as_secs_f64());
        drop(c);
    }
    let flops = 2.0 * (n * n * n) as f64;
    let med = median(times.clone());
    Ok(json!({
        "measurement": "matmul_f32",
        "shape": [n, n, n],
        "median_s": round(med, 4),
        "gflops": round(flops / med / 1e9, 2),
        "best_gflops": round(flops / times.iter().cloned().fold(f64::INFINITY, f64::min) / 1e9, 2),
        "runs": times.len(),
        "threads": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "candle_num_threads_env": candle_threads_env(),
        "malloc_env": malloc_env(),
        "machine_load": load.finish(),
    }))
}

// ---------------------------------------------------------------------------------------
// The floor: matmul FLOPs of each figure

/// Rows per step of one epoch (the last batch is smaller).
fn step_rows(n: usize, batch: usize) -> Vec<usize> {
    (0..n.div_ceil(batch))
        .map(|i| batch.min(n - i * batch))
        .collect()
}

/// FLOPs of the frozen encoder on `n` items (forward only).
fn encoder_flops(n: usize) -> f64 {
    n as f64 * 2.0 * (DIM_IN * HIDDEN + HIDDEN * DIM) as f64
}

/// FLOPs of one training epoch of `workload` (forward and backward: ×3).
fn epoch_flops(workload: &str) -> f64 {
    let d = DIM as f64;
    let mut total = 0.0;
    for samples in step_rows(N_TRAIN, BATCH) {
        // W2: a batch of P pairs is 2P embeddings.
        let b = if workload == "w2" {
            2 * samples
        } else {
            samples
        } as f64;
        total += 2.0 * b * d * d * 3.0; // head
        total += b * b * d * 2.0 * 3.0; // distance matrix
        if workload == "w3" {
            total += b * XBM_SIZE as f64 * d * 2.0 * 2.0; // batch × memory, fwd + bwd wrt batch
        }
        if workload == "w1_uncached" {
            total += encoder_flops(samples);
        }
    }
    total
}

/// `objects`: the distinct items the cache fill encodes (W2: those of the pairs).
fn cache_flops(workload: &str, objects: Option<usize>) -> f64 {
    match workload {
        "w1_uncached" => 0.0,
        _ => encoder_flops(objects.unwrap_or(N_TRAIN)),
    }
}

// ---------------------------------------------------------------------------------------
// One training workload, in this process

fn trainer(epochs: usize) -> Trainer {
    Trainer::new(TrainerConfig {
        epochs,
        batch_size: BATCH,
        optimizer: OptimizerConfig::adam(1e-3),
        progress: false,
        seed: 42,
        ..Default::default()
    })
}

fn p1(e: &similarity_core::train::Evaluation) -> f64 {
    e.metric("precision@1").unwrap_or(f64::NAN)
}

fn epoch_figures(report: &similarity_core::train::FitReport) -> Value {
    let secs: Vec<f64> = report.epochs.iter().map(|e| round(e.seconds, 4)).collect();
    let after_first = &secs[1.min(secs.len() - 1)..];
    json!({
        "epoch_train_only_s": secs,
        "mean_epoch_train_only_after_first_s": round(after_first.iter().sum::<f64>() / after_first.len() as f64, 4),
        "train_loss_per_epoch": report.epochs.iter().map(|e| round(e.train_loss, 6)).collect::<Vec<_>>(),
        "cache_fill_s": round(report.cache_seconds, 4),
    })
}

macro_rules! group_workload {
    ($ty:ty, $name:expr, $data:expr, $epochs:expr) => {{
        let data: Arc<Tensor> = $data;
        let classes: &[i64] = &CLASSES.get().unwrap();
        let train: Vec<SimilarityGroupSample<u32>> = (0..N_TRAIN)
            .map(|i| SimilarityGroupSample::new(i as u32, classes[i]))
            .collect();
        let val: Vec<SimilarityGroupSample<u32>> = (N_TRAIN..N_TRAIN + N_VAL)
            .map(|i| SimilarityGroupSample::new(i as u32, classes[i]))
            .collect();
        let mut model = <$ty>::new(FrozenMlp::new(data)?, &model_options()?)?;
        let t = trainer($epochs);
        let before = t.evaluate(&mut model, &val)?;
        let start = Instant::now();
        let report = t.fit(&mut model, &train, None)?;
        let fit_wall = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let after = t.evaluate(&mut model, &val)?;
        let val_s = start.elapsed().as_secs_f64();
        let mut out = json!({
            "workload": $name,
            "fit_wall_s": round(fit_wall, 4),
            "validation_pass_s": round(val_s, 4),
            "q_before": {"val_precision_at_1": round(p1(&before), 4)},
            "q_after": {"val_precision_at_1": round(p1(&after), 4), "val_loss": round(after.loss, 6)},
        });
        merge(&mut out, epoch_figures(&report));
        out
    }};
}

static CLASSES: std::sync::OnceLock<Vec<i64>> = std::sync::OnceLock::new();

fn merge(into: &mut Value, from: Value) {
    if let (Value::Object(a), Value::Object(b)) = (into, from) {
        a.extend(b);
    }
}

fn run_workload(name: &str, epochs: usize) -> Result<Value> {
    let load = Load::start();
    if name == "faq" {
        let mut out = faq(epochs)?;
        out["peak_rss_mb"] = json!(round(vm_hwm_mb(), 1));
        out["epochs"] = json!(epochs);
        out["candle_num_threads_env"] = candle_threads_env();
        out["malloc_env"] = malloc_env();
        out["machine_load"] = load.finish();
        return Ok(out);
    }
    let data = make_data();
    CLASSES.get_or_init(|| data.classes.clone());
    let matrix = Arc::new(Tensor::from_vec(
        data.x.clone(),
        (N_TRAIN + N_VAL, DIM_IN),
        &bench_device()?,
    )?);
    drop(data.x);
    let mut out = match name {
        "w1_cached" => group_workload!(W1Cached, name, matrix, epochs),
        "w1_uncached" => group_workload!(W1Uncached, name, matrix, epochs),
        "w3" => group_workload!(W3Xbm, name, matrix, epochs),
        "w2" => w2(matrix, &data.classes, epochs)?,
        other => bail!("unknown workload {other}"),
    };
    out["peak_rss_mb"] = json!(round(vm_hwm_mb(), 1));
    out["epochs"] = json!(epochs);
    out["candle_num_threads_env"] = candle_threads_env();
    out["malloc_env"] = malloc_env();
    out["machine_load"] = load.finish();
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// The FAQ task end to end: Quaterion's NLP tutorial recipe

/// Matmul FLOPs of MiniLM's forward pass over `tokens` token positions in sequences of
/// `len` positions: per layer, Q/K/V/output projections `4 · 2H²`, the feed-forward
/// `2 · 2 H I` and attention scores and context `2 · 2 len H` per position.
#[cfg(feature = "transformers")]
fn bert_flops(c: &similarity_core::encoder::transformer::BertConfig, tokens: f64, len: f64) -> f64 {
    let (h, i) = (c.hidden_size as f64, c.intermediate_size as f64);
    let per_token = 8.0 * h * h + 4.0 * h * i + 4.0 * len * h;
    tokens * per_token * c.num_hidden_layers as f64
}

/// all-MiniLM-L6-v2 frozen and cached, SkipConnectionHead, symmetric MNRL, Adam 1e-4,
/// batch 1024, validation after every epoch: what Quaterion's tutorial runs. Timed: the
/// evaluation before training (it fills the validation cache), the fit (training-set
/// cache fill and the epochs), and the whole run; floors from the token counts.
#[cfg(feature = "transformers")]
fn faq(epochs: usize) -> Result<Value> {
    let dir = arg("--faq").context("--faq DIR: a sentence-transformers directory")?;
    let encoder =
        SentenceTransformer::from_pretrained(&dir, &bench_device()?)?.with_normalize(false);
    let train = faq_task::read_split("train")?;
    let val = faq_task::read_split("val")?;
    // Token positions the fill must embed: every distinct text once, unpadded.
    let mut flops = [0.0f64; 2];
    for (k, split) in [&train, &val].iter().enumerate() {
        let mut texts: Vec<&str> = split
            .iter()
            .flat_map(|p| [p.obj_a.as_str(), p.obj_b.as_str()])
            .collect();
        texts.sort_unstable();
        texts.dedup();
        for ids in encoder.tokenize(&texts)? {
            let n = ids.len() as f64;
            flops[k] += bert_flops(encoder.config(), n, n);
        }
    }
    let model_started = Instant::now();
    let mut model = faq_task::FaqMiniLm::new(Frozen(encoder), &model_options()?)?;
    let t = Trainer::new(TrainerConfig {
        progress: false,
        // `--cache-dir DIR` reuses persisted embeddings (for timing epochs only: the
        // recorded runs fill from scratch).
        cache_dir: arg("--cache-dir").map(Into::into),
        ..faq_task::trainer_config(
            epochs,
            1e-4,
            TrainerConfig::default().cache_batch_size,
            None,
        )
    });
    let start = Instant::now();
    let before = t.evaluate(&mut model, &val)?;
    let before_s = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let report = t.fit(&mut model, &train, Some(&val))?;
    let fit_s = start.elapsed().as_secs_f64();
    let after = t.evaluate(&mut model, &val)?;
    let total_s = model_started.elapsed().as_secs_f64();
    let secs: Vec<f64> = report.epochs.iter().map(|e| e.seconds).collect();
    let after_first = &secs[1.min(secs.len() - 1)..];
    let rr = |e: &similarity_core::train::Evaluation| e.metric("mrr").unwrap_or(f64::NAN);
    Ok(json!({
        "workload": "faq",
        "model": dir,
        "train_pairs": train.len(),
        "val_pairs": val.len(),
        "evaluate_before_s": round(before_s, 3),
        "cache_fill_s": round(report.cache_seconds, 3),
        "mean_epoch_s": round(after_first.iter().sum::<f64>() / after_first.len() as f64, 4),
        "fit_wall_s": round(fit_s, 3),
        "total_s": round(total_s, 3),
        "fill_floor_gflop": {"train": round(flops[0] / 1e9, 1), "val": round(flops[1] / 1e9, 1)},
        "q_before": {"precision_at_1": round(p1(&before), 4), "mrr": round(rr(&before), 4)},
        "q_after": {"precision_at_1": round(p1(&after), 4), "mrr": round(rr(&after), 4), "val_loss": round(after.loss, 6)},
        "train_loss_last": report.epochs.last().map(|e| round(e.train_loss, 6)),
    }))
}

#[cfg(not(feature = "transformers"))]
fn faq(_epochs: usize) -> Result<Value> {
    bail!(
        "the FAQ workload needs the transformer encoder: cargo run --release --features transformers --example bench -- --faq DIR"
    )
}

/// 20,000 pairs, half positive (obj_b of the same class), half negative (obj_b of another
/// class), subgroup = class of obj_a; 2,000 validation pairs from the held-out items.
fn make_pairs(
    range: std::ops::Range<usize>,
    n: usize,
    classes: &[i64],
    seed: u64,
) -> Vec<SimilarityPairSample<u32>> {
    let mut by_class: Vec<Vec<u32>> = vec![Vec::new(); N_CLASSES];
    for i in range.clone() {
        by_class[classes[i] as usize].push(i as u32);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let items: Vec<u32> = range.map(|i| i as u32).collect();
    (0..n)
        .map(|k| {
            let a = items[rng.random_range(0..items.len())];
            let ca = classes[a as usize];
            let positive = k % 2 == 0;
            let b = loop {
                let b = if positive {
                    let same = &by_class[ca as usize];
                    same[rng.random_range(0..same.len())]
                } else {
                    items[rng.random_range(0..items.len())]
                };
                let ok = if positive {
                    b != a
                } else {
                    classes[b as usize] != ca
                };
                if ok {
                    break b;
                }
            };
            SimilarityPairSample {
                obj_a: a,
                obj_b: b,
                score: if positive { 1.0 } else { 0.0 },
                subgroup: ca,
            }
        })
        .collect()
}

fn w2(matrix: Arc<Tensor>, classes: &[i64], epochs: usize) -> Result<Value> {
    let train = make_pairs(0..N_TRAIN, N_TRAIN, classes, 44);
    let val_pairs = make_pairs(N_TRAIN..N_TRAIN + N_VAL, N_VAL, classes, 45);
    let val_ids: Vec<u32> = (N_TRAIN..N_TRAIN + N_VAL).map(|i| i as u32).collect();
    let val_groups = &classes[N_TRAIN..];
    let mut model = W2Pairs::new(FrozenMlp::new(matrix)?, &model_options()?)?;
    let group_p1 = |m: &W2Pairs| -> Result<f64> {
        let e = m.encode(&val_ids, 1024)?;
        let scores = Evaluator::new(Distance::Cosine).evaluate(
            &e,
            &Relevance::Groups(val_groups),
            &[&RetrievalPrecision { k: 1 }],
        )?;
        Ok(scores[0].1)
    };
    let t = trainer(epochs);
    let before_pairs = t.evaluate(&mut model, &val_pairs)?;
    let before = group_p1(&model)?;
    let start = Instant::now();
    let report = t.fit(&mut model, &train, None)?;
    let fit_wall = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let after_pairs = t.evaluate(&mut model, &val_pairs)?;
    let val_s = start.elapsed().as_secs_f64();
    let after = group_p1(&model)?;
    let mut out = json!({
        "workload": "w2",
        "fit_wall_s": round(fit_wall, 4),
        "validation_pass_s": round(val_s, 4),
        "validation_pass_note": "Trainer::evaluate on 2,000 validation pairs (loss + pair retrieval)",
        "q_before": {"val_group_precision_at_1": round(before, 4), "val_pair_precision_at_1": round(p1(&before_pairs), 4)},
        "q_after": {"val_group_precision_at_1": round(after, 4), "val_pair_precision_at_1": round(p1(&after_pairs), 4), "val_loss": round(after_pairs.loss, 6)},
        "positive_share_train": train.iter().filter(|p| p.score > 0.0).count() as f64 / train.len() as f64,
        // The cache is de-duplicated: the fill encodes each distinct item once.
        "cache_objects": train.iter().flat_map(|p| [p.obj_a, p.obj_b]).collect::<std::collections::HashSet<_>>().len(),
    });
    merge(&mut out, epoch_figures(&report));
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// W4: loss micro-benchmark

fn embeddings(n: usize, seed: u64) -> Result<Var> {
    let mut rng = StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..n * DIM).map(|_| normal(&mut rng)).collect();
    Ok(Var::from_tensor(&Tensor::from_vec(
        v,
        (n, DIM),
        &Device::Cpu,
    )?)?)
}

fn group_targets(n: usize, seed: u64) -> Result<GroupTargets> {
    let mut rng = StdRng::seed_from_u64(seed);
    let g: Vec<i64> = (0..n)
        .map(|_| rng.random_range(0..N_CLASSES as i64))
        .collect();
    Ok(GroupTargets {
        groups: Tensor::from_vec(g, n, &Device::Cpu)?,
    })
}

/// `p` pairs with random subgroups; scores 0 or 1 at random, or all 1 (`positive_only`).
fn pair_targets(
    p: usize,
    seed: u64,
    positive_only: bool,
) -> Result<similarity_core::data::PairTargets> {
    let mut rng = StdRng::seed_from_u64(seed);
    let metas: Vec<_> = (0..p)
        .map(|_| similarity_core::data::PairMeta {
            score: if positive_only || rng.random_bool(0.5) {
                1.0
            } else {
                0.0
            },
            subgroup: rng.random_range(0..N_CLASSES as i64),
        })
        .collect();
    Ok(SimilarityPairSample::<()>::targets(&metas, &Device::Cpu)?)
}

fn time_loss<L: SimilarityLoss>(
    name: &str,
    config: L::Config,
    e: &Var,
    targets: &<L::Kind as LossKind>::Targets,
) -> Result<Value> {
    // `--w4-only NAME` times one loss (the others are skipped and not printed).
    if arg("--w4-only").is_some_and(|only| only != name) {
        return Ok(Value::Null);
    }
    let load = Load::start();
    let mut params = Params::new(&Device::Cpu, 0);
    let loss = L::new(DIM, config, &mut params.scope("loss"))?;
    let call = || -> Result<(f64, f64)> {
        let t = Instant::now();
        let l = loss.forward(e.as_tensor(), targets)?;
        let grads = l.backward()?;
        let g = grads.get(e.as_tensor()).context("no gradient")?;
        let _ = g.dims();
        let value = l.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        Ok((t.elapsed().as_secs_f64() * 1e3, value))
    };
    let (first_ms, value) = call()?;
    let (warmup, iters) = if first_ms > 1000.0 { (1, 3) } else { (5, 50) };
    for _ in 1..warmup {
        call()?;
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        times.push(call()?.0);
    }
    let min = times.iter().cloned().fold(f64::INFINITY, f64::min);
    let out = json!({
        "measurement": "w4_loss",
        "workload": "w4",
        "loss": name,
        "batch": e.dim(0)?,
        "median_ms": round(median(times.clone()), 3),
        "min_ms": round(min, 3),
        "iters": iters,
        "warmup": warmup,
        "first_call_ms": round(first_ms, 3),
        "loss_value": value,
        "candle_num_threads_env": candle_threads_env(),
        "malloc_env": malloc_env(),
        "machine_load": load.finish(),
    });
    print(&out);
    Ok(out)
}

fn w4() -> Result<Vec<Value>> {
    let n = 1024;
    let e = embeddings(n, 11)?;
    let g = group_targets(n, 12)?;
    let p = pair_targets(n / 2, 13, false)?;
    let positive = pair_targets(n / 2, 13, true)?;
    let e128 = embeddings(128, 14)?;
    let g128 = group_targets(128, 15)?;
    let e256 = embeddings(256, 16)?;
    let g256 = group_targets(256, 17)?;
    let triplet = |mining| TripletLossConfig {
        mining,
        ..Default::default()
    };
    let mut out = vec![
        time_loss::<TripletLoss>("TripletLoss_hard", triplet(TripletMining::Hard), &e, &g)?,
        time_loss::<TripletLoss>(
            "TripletLoss_semi_hard",
            triplet(TripletMining::SemiHard),
            &e,
            &g,
        )?,
        time_loss::<TripletLoss>(
            "TripletLoss_semi_hard_b128",
            triplet(TripletMining::SemiHard),
            &e128,
            &g128,
        )?,
        // Batch-all builds (N, N, N) tensors: 4 GB each at N = 1024, more than this
        // machine can hold for the forward and backward pass, so N = 256 here.
        time_loss::<TripletLoss>(
            "TripletLoss_all_b256",
            triplet(TripletMining::All),
            &e256,
            &g256,
        )?,
        time_loss::<ContrastiveLoss>("ContrastiveLoss", Default::default(), &e, &p)?,
        time_loss::<MultipleNegativesRankingLoss>(
            "MultipleNegativesRankingLoss",
            Default::default(),
            &e,
            &positive,
        )?,
        time_loss::<OnlineContrastiveLoss>(
            "OnlineContrastiveLoss_hard",
            OnlineContrastiveLossConfig {
                mining: PairMining::Hard,
                ..Default::default()
            },
            &e,
            &g,
        )?,
        time_loss::<OnlineContrastiveLoss>(
            "OnlineContrastiveLoss_all",
            OnlineContrastiveLossConfig {
                mining: PairMining::All,
                ..Default::default()
            },
            &e,
            &g,
        )?,
        time_loss::<ArcFaceLoss>(
            "ArcFaceLoss",
            ArcFaceLossConfig {
                num_groups: N_CLASSES,
                ..Default::default()
            },
            &e,
            &g,
        )?,
        time_loss::<CosFaceLoss>(
            "CosFaceLoss",
            CosFaceLossConfig {
                num_groups: N_CLASSES,
                ..Default::default()
            },
            &e,
            &g,
        )?,
        time_loss::<SoftmaxLoss>(
            "SoftmaxLoss",
            SoftmaxLossConfig {
                num_groups: N_CLASSES,
                ..Default::default()
            },
            &e,
            &g,
        )?,
        time_loss::<CenterLoss>(
            "CenterLoss",
            CenterLossConfig {
                num_groups: N_CLASSES,
                ..Default::default()
            },
            &e,
            &g,
        )?,
        // Quaterion's form (one softplus over the batch's pairs): the work Quaterion's W4
        // times, and the form of every CircleLoss figure in BENCHMARKS.md.
        time_loss::<CircleLoss>(
            "CircleLoss",
            CircleLossConfig {
                pooled: true,
                ..Default::default()
            },
            &e,
            &g,
        )?,
        time_loss::<FastAPLoss>("FastAPLoss", Default::default(), &e, &g)?,
        time_loss::<MultiSimilarityLoss>("MultiSimilarityLoss", Default::default(), &e, &g)?,
        time_loss::<SupConLoss>("SupConLoss", Default::default(), &e, &g)?,
        time_loss::<CombinedLoss<TripletLoss, CenterLoss>>(
            "CombinedLoss_TripletHard_Center",
            CombinedLossConfig {
                first: triplet(TripletMining::Hard),
                second: CenterLossConfig {
                    num_groups: N_CLASSES,
                    ..Default::default()
                },
                weights: (1.0, 1.0),
            },
            &e,
            &g,
        )?,
    ];
    out.retain(|v| !v.is_null());
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Driver

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// `--device cpu|cuda|cuda:N` (default cpu): where the workloads W1 to W3 and the FAQ
/// task keep their models and caches (the loss micro-benchmark W4 stays on the CPU).
fn bench_device() -> Result<Device> {
    let spec = arg("--device").unwrap_or_else(|| "cpu".into());
    match spec.as_str() {
        "cpu" => Ok(Device::Cpu),
        s if s.starts_with("cuda") => {
            let n = s["cuda".len()..].trim_start_matches(':');
            let ordinal = if n.is_empty() {
                0
            } else {
                n.parse().context("--device cuda:N")?
            };
            Ok(Device::new_cuda(ordinal)?)
        }
        other => bail!("--device {other}: expected cpu, cuda or cuda:N"),
    }
}

fn model_options() -> Result<ModelOptions> {
    Ok(ModelOptions {
        device: bench_device()?,
        ..Default::default()
    })
}

fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

fn print(v: &Value) {
    println!("{v}");
}

fn summary(name: &str, runs: &[Value], gflops: f64) -> Value {
    let med = |key: &str| median(runs.iter().filter_map(|r| r[key].as_f64()).collect());
    let epochs = runs
        .first()
        .and_then(|r| r["epochs"].as_u64())
        .unwrap_or(10) as f64;
    let floor = |flops: f64| flops / (gflops * 1e9);
    let objects = runs
        .first()
        .and_then(|r| r["cache_objects"].as_u64())
        .map(|n| n as usize);
    let cache_flops = |name: &str| cache_flops(name, objects);
    let cache_floor = floor(cache_flops(name));
    let epoch_floor = floor(epoch_flops(name));
    let fit_floor = cache_floor + epochs * epoch_floor;
    let (cache, epoch, fit) = (
        med("cache_fill_s"),
        med("mean_epoch_train_only_after_first_s"),
        med("fit_wall_s"),
    );
    let ratio = |t: f64, f: f64| if f > 0.0 { round(t / f, 2) } else { f64::NAN };
    json!({
        "measurement": "summary",
        "workload": name,
        "runs": runs.len(),
        "median": {
            "cache_fill_s": cache,
            "mean_epoch_train_only_after_first_s": epoch,
            "fit_wall_s": fit,
            "validation_pass_s": med("validation_pass_s"),
            "peak_rss_mb": med("peak_rss_mb"),
            "other_procs_cpu_frac": median(runs.iter().filter_map(|r| r["machine_load"]["other_procs_cpu_frac"].as_f64()).collect()),
        },
        "gflops_used": gflops,
        "floor_gflop": {
            "cache_fill": round(cache_flops(name) / 1e9, 2),
            "epoch": round(epoch_flops(name) / 1e9, 2),
            "fit": round((cache_flops(name) + epochs * epoch_flops(name)) / 1e9, 2),
        },
        "floor_s": {
            "cache_fill": round(cache_floor, 4),
            "epoch": round(epoch_floor, 4),
            "fit": round(fit_floor, 4),
        },
        "ratio": {
            "cache_fill": ratio(cache, cache_floor),
            "epoch": ratio(epoch, epoch_floor),
            "fit": ratio(fit, fit_floor),
        },
    })
}

fn main() -> Result<()> {
    let epochs: usize = arg("--epochs")
        .map(|e| e.parse())
        .transpose()?
        .unwrap_or(10);
    if let Some(name) = arg("--only") {
        print(&run_workload(&name, epochs)?);
        return Ok(());
    }
    if let Some(dir) = arg("--faq") {
        // One end-to-end run (500 epochs by default) in a fresh process, after the matmul
        // throughput line; the fill floors are in GFLOP, divide by that throughput.
        let faq_epochs = arg("--epochs").unwrap_or_else(|| "500".into());
        let mm = matmul_gflops()?;
        print(&mm);
        let mut args = vec!["--only", "faq", "--faq", &dir, "--epochs", &faq_epochs];
        let cache_dir = arg("--cache-dir");
        if let Some(c) = &cache_dir {
            args.extend(["--cache-dir", c.as_str()]);
        }
        let output = Command::new(std::env::current_exe()?)
            .args(&args)
            .output()
            .context("running faq")?;
        if !output.status.success() {
            bail!("faq failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        let mut v: Value = serde_json::from_str(String::from_utf8(output.stdout)?.trim())?;
        let gflops = mm["gflops"].as_f64().unwrap_or(f64::NAN);
        let floor = v["fill_floor_gflop"]["train"].as_f64().unwrap_or(f64::NAN) / gflops;
        v["fill_floor_s"] = json!({"train": round(floor, 2)});
        v["fill_ratio"] = json!(round(
            v["cache_fill_s"].as_f64().unwrap_or(f64::NAN) / floor,
            2
        ));
        print(&v);
        return Ok(());
    }
    let all = flag("--all");
    let runs: usize = arg("--runs").map(|e| e.parse()).transpose()?.unwrap_or(3);
    let mut workloads = Vec::new();
    if all || flag("--w1") {
        workloads.extend(["w1_cached", "w1_uncached"]);
    }
    if all || flag("--w2") {
        workloads.push("w2");
    }
    if all || flag("--w3") {
        workloads.push("w3");
    }
    let do_w4 = all || flag("--w4") || arg("--w4-only").is_some();
    if workloads.is_empty() && !do_w4 {
        bail!("pick workloads: --w1 --w2 --w3 --w4 or --all (and --runs N)");
    }

    let mm = matmul_gflops()?;
    print(&mm);
    let gflops = mm["gflops"].as_f64().unwrap_or(f64::NAN);
    let exe = std::env::current_exe()?;
    let mut summaries: BTreeMap<&str, Value> = BTreeMap::new();
    for name in &workloads {
        let mut results = Vec::new();
        for run in 0..runs {
            let output = Command::new(&exe)
                .args(["--only", name, "--epochs", &epochs.to_string()])
                .output()
                .with_context(|| format!("running {name}"))?;
            if !output.status.success() {
                bail!(
                    "{name} run {run} failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            let line = String::from_utf8(output.stdout)?;
            let mut v: Value = serde_json::from_str(line.trim())
                .with_context(|| format!("{name}: not JSON: {line}"))?;
            v["run"] = json!(run);
            print(&v);
            results.push(v);
        }
        let s = summary(name, &results, gflops);
        print(&s);
        summaries.insert(name, s);
    }
    if do_w4 {
        w4()?; // prints one line per loss as it is measured
    }
    Ok(())
}
