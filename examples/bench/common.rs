//! What every workload shares: the sizes from the command line, the synthetic data and
//! the frozen encoder, the machine-load and memory probes, the matmul throughput and the
//! floors (matmul FLOPs of each figure), and the trainer settings.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use similarity_core::nn::Mode;
use similarity_core::prelude::*;

/// Input width of the frozen encoder (Quaterion's bench.py).
pub(crate) const DIM_IN: usize = 512;
/// Hidden width of the frozen encoder.
pub(crate) const HIDDEN: usize = 1024;

/// The workload sizes, from the command line; the defaults are Quaterion's bench.py's.
pub(crate) struct Sizes {
    /// `--items`: training items (W1 to W3; W2 makes this many pairs). Default 20,000.
    pub(crate) items: usize,
    /// `--val-items`: held-out items. Default 2,000.
    pub(crate) val_items: usize,
    /// `--classes`: classes of the synthetic data, and of the class losses in W4. Default 100.
    pub(crate) classes: usize,
    /// `--batch`: training batch. Default 256.
    pub(crate) batch: usize,
    /// `--dim`: embedding size (the encoder's output and W4's rows). Default 384.
    pub(crate) dim: usize,
    /// `--xbm-size`: W3's memory entries, one of [`XBM_SIZES`]. Default 4096.
    pub(crate) xbm: usize,
    /// `--w4-batch`: W4's rows (pair losses see half as many pairs). Default 1024.
    pub(crate) w4_batch: usize,
}

/// The XBM sizes W3 has a model for (the size is a `#[xbm]` attribute, fixed at compile
/// time).
pub(crate) const XBM_SIZES: [usize; 4] = [1024, 4096, 16384, 65536];

static SIZES: OnceLock<Sizes> = OnceLock::new();

impl Sizes {
    fn from_args() -> Result<Self> {
        let get = |flag: &str, default: usize, min: usize| -> Result<usize> {
            let v = match arg(flag) {
                None => default,
                Some(v) => v
                    .parse()
                    .with_context(|| format!("{flag} {v}: expected a whole number"))?,
            };
            if v < min {
                bail!("{flag} {v}: must be at least {min}");
            }
            Ok(v)
        };
        let sizes = Sizes {
            items: get("--items", 20_000, 2)?,
            val_items: get("--val-items", 2_000, 2)?,
            classes: get("--classes", 100, 2)?,
            batch: get("--batch", 256, 2)?,
            dim: get("--dim", 384, 1)?,
            xbm: get("--xbm-size", 4096, 1)?,
            w4_batch: get("--w4-batch", 1024, 4)?,
        };
        if !XBM_SIZES.contains(&sizes.xbm) {
            bail!(
                "--xbm-size {}: W3 has models for {XBM_SIZES:?} entries (the size is a #[xbm] \
                 attribute, fixed at compile time)",
                sizes.xbm
            );
        }
        Ok(sizes)
    }

    /// The flags that give a child process these sizes.
    pub(crate) fn args(&self) -> Vec<String> {
        [
            ("--items", self.items),
            ("--val-items", self.val_items),
            ("--classes", self.classes),
            ("--batch", self.batch),
            ("--dim", self.dim),
            ("--xbm-size", self.xbm),
            ("--w4-batch", self.w4_batch),
        ]
        .iter()
        .flat_map(|(f, v)| [f.to_string(), v.to_string()])
        .collect()
    }

    /// The sizes as a JSON object, for the raw lines.
    pub(crate) fn json(&self) -> Value {
        json!({
            "items": self.items, "val_items": self.val_items, "classes": self.classes,
            "batch": self.batch, "dim": self.dim, "xbm_size": self.xbm, "w4_batch": self.w4_batch,
        })
    }
}

/// Reads the sizes from the command line; `main` calls it first.
pub(crate) fn init_sizes() -> Result<()> {
    let sizes = Sizes::from_args()?;
    let _ = SIZES.set(sizes);
    Ok(())
}

/// The sizes [`init_sizes`] read.
pub(crate) fn sizes() -> &'static Sizes {
    SIZES.get().expect("main calls init_sizes first")
}

/// The value after `name` on the command line.
pub(crate) fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// Whether `name` is on the command line.
pub(crate) fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

/// Prints one raw JSON line.
pub(crate) fn print(v: &Value) {
    println!("{v}");
}

/// A standard normal draw.
pub(crate) fn normal(rng: &mut StdRng) -> f32 {
    // Box–Muller.
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// `n_train + n_val` items (rows of one matrix) and their classes: 100 centroids in a random
/// 64-dim subspace of R^512 (scale 0.35·√8 per subspace coordinate), item = centroid + N(0, 1).
/// Train items come from seed 42, held-out items from seed 43; centroids from seed 41.
pub(crate) struct Data {
    pub(crate) x: Vec<f32>,
    pub(crate) classes: Vec<i64>,
}

pub(crate) fn make_data() -> Data {
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
    let centroids: Vec<Vec<f32>> = (0..sizes().classes)
        .map(|_| {
            let z: Vec<f32> = (0..k).map(|_| scale * normal(&mut rng)).collect();
            (0..DIM_IN)
                .map(|j| z.iter().zip(&basis).map(|(zi, b)| zi * b[j]).sum())
                .collect()
        })
        .collect();
    let mut x = Vec::with_capacity((sizes().items + sizes().val_items) * DIM_IN);
    let mut classes = Vec::with_capacity(sizes().items + sizes().val_items);
    for (seed, n) in [(42, sizes().items), (43, sizes().val_items)] {
        let mut rng = StdRng::seed_from_u64(seed);
        for _ in 0..n {
            let c = rng.random_range(0..sizes().classes);
            classes.push(c as i64);
            x.extend(centroids[c].iter().map(|v| v + normal(&mut rng)));
        }
    }
    Data { x, classes }
}

/// Linear(512, 1024) → ReLU → Linear(1024, 384), uniform(±1/√fan_in) weights from seed 1234.
/// Its input is an item's row index in the shared data matrix, so collation is one gather.
pub(crate) struct FrozenMlp {
    data: Arc<Tensor>,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
}

impl FrozenMlp {
    pub(crate) fn new(data: Arc<Tensor>) -> Result<Self> {
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
            w2: uniform(&[HIDDEN, sizes().dim], HIDDEN)?,
            b2: uniform(&[sizes().dim], HIDDEN)?,
            data,
        })
    }
}

impl Encoder for FrozenMlp {
    type Input = u32;
    type Batch = Tensor;
    const NAME: &'static str = "BenchFrozenMlp";

    fn embedding_size(&self) -> usize {
        sizes().dim
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

/// Busy jiffies of the whole machine and of this process.
pub(crate) fn cpu_ticks() -> (u64, u64) {
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

pub(crate) struct Load {
    start: Instant,
    ticks: (u64, u64),
    loadavg: String,
}

pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

impl Load {
    pub(crate) fn start() -> Self {
        Load {
            start: Instant::now(),
            ticks: cpu_ticks(),
            loadavg: loadavg(),
        }
    }

    pub(crate) fn finish(&self) -> Value {
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
pub(crate) fn candle_threads_env() -> Value {
    std::env::var("CANDLE_NUM_THREADS").map_or(Value::Null, Value::String)
}

/// glibc's malloc thresholds as set for this run (see BENCHMARKS.md: raised thresholds keep
/// the multi-megabyte tensors of a step in the heap instead of mapping and page-faulting
/// them in again at every step).
pub(crate) fn malloc_env() -> Value {
    let get = |k: &str| std::env::var(k).map_or(Value::Null, Value::String);
    json!({
        "MALLOC_MMAP_THRESHOLD_": get("MALLOC_MMAP_THRESHOLD_"),
        "MALLOC_TRIM_THRESHOLD_": get("MALLOC_TRIM_THRESHOLD_"),
    })
}

pub(crate) fn vm_hwm_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?.to_string();
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

pub(crate) fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
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

pub(crate) fn matmul_gflops() -> Result<Value> {
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

/// Rows per step of one epoch (the last batch is smaller).
pub(crate) fn step_rows(n: usize, batch: usize) -> Vec<usize> {
    (0..n.div_ceil(batch))
        .map(|i| batch.min(n - i * batch))
        .collect()
}

/// FLOPs of the frozen encoder on `n` items (forward only).
pub(crate) fn encoder_flops(n: usize) -> f64 {
    n as f64 * 2.0 * (DIM_IN * HIDDEN + HIDDEN * sizes().dim) as f64
}

/// Matmul FLOPs of training epoch `epoch` (0-based) of `workload`, for the work the fused
/// kernels do. Per step of `b` embeddings (W2: `b = 2 ×` the pairs), `d` wide:
///
/// ```text
/// head        2 · b · d² · 2   (forward and ∂W; the frozen encoder's output needs no ∂x,
///                               which the head's kernel skips)
/// distances   b² · d           (x̂ x̂ᵀ, upper triangle, forward only: the losses mine
///                               pairs on it and recompute them with gradient, O(b·d))
/// W3 memory   2 · b · M · d    (forward only, for the same reason; M: the entries the
///                               memory holds at that step)
/// uncached    the frozen encoder on the batch
/// ```
///
/// W3's memory fills from the first step (`min(rows enqueued before the step,
/// --xbm-size)` entries), so its early epochs cost less than a full memory's: at 65,536
/// entries and 20,000 items it is full from the fourth epoch. (Before 2026-12-01 the head
/// counted `2 · b · d² · 3`, the distances `3 · 2 · b² · d` and the memory
/// `2 · 2 · b · M · d`: products the kernels do not compute.)
pub(crate) fn epoch_flops_at(workload: &str, epoch: usize) -> f64 {
    let d = sizes().dim as f64;
    let mut total = 0.0;
    let mut enqueued = sizes().items.saturating_mul(epoch);
    for samples in step_rows(sizes().items, sizes().batch) {
        let memory = enqueued.min(sizes().xbm) as f64;
        enqueued = enqueued.saturating_add(samples);
        // W2: a batch of P pairs is 2P embeddings.
        let b = if workload == "w2" {
            2 * samples
        } else {
            samples
        } as f64;
        total += 2.0 * b * d * d * 2.0; // head: forward and ∂W
        total += b * b * d; // distance matrix, upper triangle
        if workload == "w3" {
            total += 2.0 * b * memory * d; // batch × memory, forward
        }
        if workload == "w1_uncached" {
            total += encoder_flops(samples);
        }
    }
    total
}

/// `objects`: the distinct items the cache fill encodes (W2: those of the pairs).
pub(crate) fn cache_flops(workload: &str, objects: Option<usize>) -> f64 {
    match workload {
        "w1_uncached" => 0.0,
        _ => encoder_flops(objects.unwrap_or(sizes().items)),
    }
}

pub(crate) fn trainer(epochs: usize) -> Trainer {
    Trainer::new(TrainerConfig {
        epochs,
        batch_size: sizes().batch,
        optimizer: OptimizerConfig::adam(1e-3),
        progress: false,
        seed: 42,
        ..Default::default()
    })
}

pub(crate) fn p1(e: &similarity_core::train::Evaluation) -> f64 {
    e.metric("precision@1").unwrap_or(f64::NAN)
}

pub(crate) fn epoch_figures(report: &similarity_core::train::FitReport) -> Value {
    let secs: Vec<f64> = report.epochs.iter().map(|e| round(e.seconds, 4)).collect();
    let after_first = &secs[1.min(secs.len() - 1)..];
    json!({
        "epoch_train_only_s": secs,
        "mean_epoch_train_only_after_first_s": round(after_first.iter().sum::<f64>() / after_first.len() as f64, 4),
        "train_loss_per_epoch": report.epochs.iter().map(|e| round(e.train_loss, 6)).collect::<Vec<_>>(),
        "cache_fill_s": round(report.cache_seconds, 4),
    })
}

pub(crate) fn merge(into: &mut Value, from: Value) {
    if let (Value::Object(a), Value::Object(b)) = (into, from) {
        a.extend(b);
    }
}

/// `--device cpu|cuda|cuda:N` (default cpu): where the workloads W1 to W3 and the FAQ
/// task keep their models and caches (the loss micro-benchmark W4 stays on the CPU).
pub(crate) fn bench_device() -> Result<Device> {
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

pub(crate) fn model_options() -> Result<ModelOptions> {
    Ok(ModelOptions {
        device: bench_device()?,
        ..Default::default()
    })
}
