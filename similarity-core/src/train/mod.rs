//! The trainer: epochs of optimisation over cached embeddings, with validation.
//!
//! ```text
//! fit(model, train, val):
//!   prepare: every object of every sample → cache rows (frozen encoders run once here)
//!   for epoch in 0..epochs:
//!     for batch in loader.batches(train, epoch):          seeded shuffle per epoch
//!       emb  = model.embed(batch objects, slot-major)      cache lookup → head
//!       loss = model.loss().forward(emb, targets(batch))
//!       optimiser step (Adam / AdamW)
//!     validate: mean loss over val batches + retrieval metrics over the whole val set
//!     log (CSV, JSON lines, SVG), checkpoint (every N epochs, best), early stopping
//! ```
//!
//! The loop is a short step (batch → loss → gradients → update, `Trainer::step`) and
//! observers around it for the progress bar, logs, checkpoints, early stopping and the
//! user's hook (`observers`). Given a communicator of several ranks
//! ([`Trainer::with_communicator`]) the step embeds this rank's shard of the global batch,
//! gathers the others' and all-reduces the gradients, and only rank 0 runs the observers
//! that write; see [`distributed`].
//!
//! Shuffling and dropout of epoch `e` are seeded with `(seed, e)` (and the rank, which is
//! 0 in one process), so a run resumed from the checkpoint of epoch `e` continues exactly
//! as the uninterrupted run (on CPU).
//!
//! Options are checked before anything runs ([`TrainerConfig::check`]), with errors that
//! name the field.
//!
//! **Non-finite guard.** After each backward pass and before the optimiser step, the
//! loss (already read back for the progress bar) and one scalar, the sum of squares of
//! every gradient, are checked; the variables are searched only when that sum is not
//! finite. With [`NonFinitePolicy::Error`] (the default) a non-finite loss stops training
//! with [`Error::NonFinite`] and a non-finite gradient with [`Error::NonFiniteGradient`],
//! naming the epoch, the step and the first variable; with [`NonFinitePolicy::SkipStep`]
//! the step is skipped (no update, no memory enqueue, no hook call), counted in
//! [`EpochStats::skipped_steps`] and reported with `tracing::warn!`. After every epoch the
//! weights themselves are checked ([`ModelState::first_non_finite_var`]): a non-finite
//! weight (an update that overflowed) is [`Error::NonFiniteWeights`], before any
//! checkpoint of that epoch is written, so no checkpoint ever holds one.

mod checkpoint;
pub mod grad_cache;
pub mod hard_negatives;
mod logs;
mod model;
mod observers;
mod optim;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

pub use checkpoint::{CheckpointConfig, TrainerState};
pub use logs::write_logs;
pub use model::{
    CachedRows, EncoderBatch, EncoderSlot, ModelOptions, ModelState, SampleOf, TrainableModel,
};
pub use optim::{LrSchedule, Optimizer, OptimizerConfig, ParamGroup};

use optim::GradNorm;

use crate::data::{ClassBalancedSampler, DataLoader, Sampler, SimilaritySample, metas};
use crate::distributed::{self, Communicator, GatherMode};
use crate::error::{Error, Result};
use crate::loss::{LossKind, SimilarityLoss};
use crate::metric::{Evaluator, Metric};
use crate::nn::Mode;

/// Options of a [`Trainer`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerConfig {
    /// Passes over the training set, at least 1. Default 10.
    ///
    /// A [`resume`](Trainer::resume) trains up to this many epochs in all (a checkpoint
    /// already past it trains none). Step-based learning-rate schedules span
    /// `epochs × steps per epoch` of the config they run with, so resuming with a
    /// different `epochs` changes the schedule from the resumed step on; see
    /// [`LrSchedule`].
    pub epochs: usize,
    /// Samples per training and validation batch, at least 1. Default 128.
    pub batch_size: usize,
    /// Objects per batch while filling caches and evaluating, at least 1. Default 1024.
    pub cache_batch_size: usize,
    /// Optimiser. Default Adam, lr 1e-3.
    pub optimizer: OptimizerConfig,
    /// Learning-rate factors by variable-name prefix (e.g. the loss's own parameters);
    /// each factor finite and `>= 0`.
    pub param_groups: Vec<ParamGroup>,
    /// Learning-rate schedule. Default constant.
    pub schedule: LrSchedule,
    /// Clip the global gradient norm to this value (finite, `> 0`). Default none.
    pub clip_grad_norm: Option<f64>,
    /// Stop when a monitored value stops improving. Default none.
    pub early_stopping: Option<EarlyStopping>,
    /// Where and when to write checkpoints. Default none.
    pub checkpoints: Option<CheckpointConfig>,
    /// Directory for `metrics.csv`, `metrics.jsonl` and `curves.svg`. Default none.
    pub logs_dir: Option<PathBuf>,
    /// Drop the last, smaller training batch. Default false.
    pub drop_last: bool,
    /// Seed of shuffling and dropout. Default 0.
    pub seed: u64,
    /// Draw progress bars on the terminal. Default true.
    pub progress: bool,
    /// How training batches are formed. Default [`Sampler::Shuffle`];
    /// [`Sampler::ClassBalanced`] needs group samples and ignores `drop_last`.
    #[serde(default)]
    pub sampler: Sampler,
    /// Directory of persisted embedding caches (`<cache_dir>/<encoder field>/`): `fit`
    /// loads a cache whose encoder fingerprint matches before preparing the data and
    /// writes it back after; `evaluate` loads it too but does not rewrite it (the file
    /// keeps `fit`'s key set); see [`cache::store`](crate::cache::store). Default none.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// What a step with a non-finite loss or gradient does (see the
    /// [module docs](self)). Default [`NonFinitePolicy::Error`].
    #[serde(default)]
    pub non_finite: NonFinitePolicy,
    /// With a communicator of more than one rank
    /// ([`Trainer::with_communicator`]): whether the loss sees the whole global batch
    /// (the single-process result) or each rank's shard. Default
    /// [`GatherMode::Global`]; see [`distributed`].
    #[serde(default)]
    pub gather: GatherMode,
    /// Compute each training step by GradCache in mini-batches of this many objects
    /// (see [`grad_cache`]): the same gradient as the plain step, with the memory of one
    /// mini-batch's graph, for trainable encoders under large batches (over several
    /// ranks, of the global batch or each shard as [`gather`](Self::gather) says). At
    /// least 1. Default none (the whole batch in one graph).
    #[serde(default)]
    pub grad_cache: Option<usize>,
    /// Mine hard negatives from the whole training set every few epochs and add them to
    /// each batch (pair data: as extra negatives of MultipleNegativesRankingLoss; group
    /// data: as batch members with their groups, for every group loss; over several
    /// ranks, of the global batch or of each shard as [`gather`](Self::gather) says; see
    /// [`hard_negatives`]). Default none.
    #[serde(default)]
    pub hard_negatives: Option<hard_negatives::HardNegatives>,
}

/// What the trainer does with a training step whose loss or gradient is NaN or ±∞.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NonFinitePolicy {
    /// Stop training with [`Error::NonFinite`] (the loss) or [`Error::NonFiniteGradient`]
    /// (naming the variable), before the step is taken.
    #[default]
    Error,
    /// Skip the step, as a mixed-precision gradient scaler does: no optimiser update (the
    /// schedule does not advance), no cross-batch-memory enqueue, no step-hook call. Each
    /// skip is counted in [`EpochStats::skipped_steps`] and logged with
    /// `tracing::warn!`; an epoch in which every step is skipped is an error.
    SkipStep,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        TrainerConfig {
            epochs: 10,
            batch_size: 128,
            cache_batch_size: 1024,
            optimizer: OptimizerConfig::default(),
            param_groups: Vec::new(),
            schedule: LrSchedule::Constant,
            clip_grad_norm: None,
            early_stopping: None,
            checkpoints: None,
            logs_dir: None,
            drop_last: false,
            seed: 0,
            progress: true,
            sampler: Sampler::Shuffle,
            cache_dir: None,
            non_finite: NonFinitePolicy::Error,
            gather: GatherMode::Global,
            grad_cache: None,
            hard_negatives: None,
        }
    }
}

impl TrainerConfig {
    /// Checks every option before training (linfa's `ParamGuard::check`): counts at least
    /// 1, learning rates, factors and tolerances finite and in range. An error names the
    /// field, e.g. `invalid input in TrainerConfig.clip_grad_norm: must be > 0 and finite,
    /// got -1`. [`Trainer::fit`] and its siblings call it first; what depends on the data
    /// or the model (a monitor name, a parameter-group prefix, the class-balanced sampler
    /// against the classes) is checked when they are known.
    pub fn check(&self) -> Result<()> {
        let at_least_one = |field: &str, value: usize| {
            if value == 0 {
                Err(Error::invalid(
                    format!("TrainerConfig.{field}"),
                    "must be at least 1, got 0",
                ))
            } else {
                Ok(())
            }
        };
        at_least_one("epochs", self.epochs)?;
        at_least_one("batch_size", self.batch_size)?;
        at_least_one("cache_batch_size", self.cache_batch_size)?;
        if let Some(m) = self.grad_cache {
            at_least_one("grad_cache", m)?;
        }
        if let Some(h) = &self.hard_negatives {
            h.check("TrainerConfig.hard_negatives")?;
        }
        self.optimizer.check("TrainerConfig.optimizer")?;
        for (i, group) in self.param_groups.iter().enumerate() {
            optim::check_lr_factor(group, &format!("TrainerConfig.param_groups[{i}]"))?;
        }
        self.schedule.check("TrainerConfig.schedule")?;
        if let Some(max) = self.clip_grad_norm
            && !(max.is_finite() && max > 0.0)
        {
            return Err(Error::invalid(
                "TrainerConfig.clip_grad_norm",
                format!("must be > 0 and finite, got {max}"),
            ));
        }
        if let Some(es) = &self.early_stopping {
            if es.monitor.is_empty() {
                return Err(Error::invalid(
                    "TrainerConfig.early_stopping.monitor",
                    "is empty; name `train_loss`, `val_loss` or a validation metric",
                ));
            }
            if es.patience == 0 {
                return Err(Error::invalid(
                    "TrainerConfig.early_stopping.patience",
                    "must be at least 1 (epochs without improvement before stopping), got 0",
                ));
            }
            // +∞ is allowed: no epoch after the first then counts as an improvement.
            if es.min_delta.is_nan() || es.min_delta < 0.0 {
                return Err(Error::invalid(
                    "TrainerConfig.early_stopping.min_delta",
                    format!(
                        "must be a number >= 0 (NaN never compares, so every epoch would be \
                         the last), got {}",
                        es.min_delta
                    ),
                ));
            }
        }
        if let Sampler::ClassBalanced { m } = self.sampler {
            if m == 0 {
                return Err(Error::invalid(
                    "TrainerConfig.sampler (ClassBalanced).m",
                    "must be at least 1, got 0",
                ));
            }
            if !self.batch_size.is_multiple_of(m) {
                return Err(Error::invalid(
                    "TrainerConfig.sampler (ClassBalanced).m",
                    format!(
                        "TrainerConfig.batch_size {} must be a multiple of m = {m} (each \
                         batch holds batch_size / m classes of m items)",
                        self.batch_size
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Whether a monitored value should go down or up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MonitorMode {
    /// Lower is better (losses).
    Min,
    /// Higher is better (retrieval metrics).
    Max,
}

/// Stop training when `monitor` has not improved by more than `min_delta` for `patience`
/// consecutive epochs (PyTorch Lightning's `EarlyStopping`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EarlyStopping {
    /// `"train_loss"`, `"val_loss"`, or a validation metric such as `"precision@1"`.
    pub monitor: String,
    /// Direction of improvement.
    pub mode: MonitorMode,
    /// Epochs without improvement before stopping, at least 1.
    pub patience: usize,
    /// Smallest change that counts as an improvement, `>= 0` (`+∞`: nothing after the
    /// first epoch does).
    pub min_delta: f64,
}

/// The value called `monitor` in `stats`: `train_loss`, `val_loss` or a validation metric.
pub fn monitored(stats: &EpochStats, monitor: &str) -> Option<f64> {
    match monitor {
        "train_loss" => Some(stats.train_loss),
        "val_loss" => stats.validation.as_ref().map(|v| v.loss),
        name => stats.validation.as_ref().and_then(|v| v.metric(name)),
    }
}

fn improves(mode: MonitorMode, value: f64, best: Option<f64>, min_delta: f64) -> bool {
    match (mode, best) {
        (_, None) => true,
        (MonitorMode::Min, Some(b)) => value < b - min_delta,
        (MonitorMode::Max, Some(b)) => value > b + min_delta,
    }
}

/// What a step hook sees: the head's embeddings of the batch, its targets and its loss
/// (Quaterion's `process_results`).
#[derive(Debug)]
pub struct StepOutput<'a, T> {
    /// 0-based epoch.
    pub epoch: usize,
    /// 0-based step within the epoch.
    pub step: usize,
    /// `(batch objects, d)`, in the loss's layout.
    pub embeddings: &'a Tensor,
    /// The batch's targets.
    pub targets: &'a T,
    /// The loss value.
    pub loss: f64,
}

/// Targets of a model's loss kind.
pub type TargetsOf<M> =
    <<<M as TrainableModel>::Loss as SimilarityLoss>::Kind as LossKind>::Targets;

/// Loss and metrics of one pass over an evaluation set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Mean loss over the set's batches.
    pub loss: f64,
    /// Retrieval metrics over the whole set, by name (e.g. `precision@1`).
    pub metrics: Vec<(String, f64)>,
}

impl Evaluation {
    /// The metric called `name`.
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    }
}

/// What happened in one epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochStats {
    /// 0-based epoch.
    pub epoch: usize,
    /// Mean training loss over the epoch's steps.
    pub train_loss: f64,
    /// Attached metrics, averaged over the epoch's training batches that could score them
    /// (a batch without a positive cannot).
    #[serde(default)]
    pub train_metrics: Vec<(String, f64)>,
    /// Validation loss and metrics, when a validation set was given.
    pub validation: Option<Evaluation>,
    /// Learning rate at the epoch's last step.
    pub lr: f64,
    /// Wall time of the epoch, validation included.
    pub seconds: f64,
    /// Training steps skipped for a non-finite loss or gradient
    /// ([`NonFinitePolicy::SkipStep`]); `train_loss` and the metrics average the others.
    #[serde(default)]
    pub skipped_steps: usize,
    /// The hard-negative mining pass run at the start of this epoch
    /// ([`TrainerConfig::hard_negatives`]), if one ran.
    #[serde(default)]
    pub mining: Option<hard_negatives::MiningStats>,
}

/// The record of a [`Trainer::fit`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitReport {
    /// Seconds spent filling caches.
    pub cache_seconds: f64,
    /// One entry per epoch (those before a resume included).
    pub epochs: Vec<EpochStats>,
    /// The epoch early stopping stopped after, if it did.
    pub stopped_early: Option<usize>,
    /// The best value of the early-stopping or checkpoint monitor, and its epoch.
    pub best: Option<(usize, f64)>,
}

/// Fits a [`TrainableModel`].
#[derive(Debug, Clone, Default)]
pub struct Trainer {
    config: TrainerConfig,
    metrics: std::sync::Arc<Vec<Box<dyn Metric>>>,
    /// The ranks of a data-parallel run; `None`: this process alone.
    comm: Option<std::sync::Arc<dyn Communicator>>,
}

/// Samples with their objects' cache rows: everything an epoch needs.
struct Prepared<'a, M: TrainableModel> {
    metas: Vec<<<M::Loss as SimilarityLoss>::Kind as LossKind>::Meta>,
    /// Object `i · OBJECTS + s` is object `s` of sample `i`.
    records: Records<'a, M::Record>,
    rows: CachedRows,
}

/// The objects of a prepared set: borrowed from a slice, owned (streamed, with an
/// uncached encoder), or not kept (streamed, every encoder cached).
enum Records<'a, R> {
    Borrowed(Vec<&'a R>),
    Owned(Vec<R>),
    Dropped,
}

impl<'a, M: TrainableModel> Prepared<'a, M> {
    const K: usize = <SampleOf<M> as SimilaritySample>::OBJECTS;

    /// Objects of `samples` in slot-major order.
    fn object_ids(samples: &[usize]) -> Vec<usize> {
        (0..Self::K)
            .flat_map(|s| samples.iter().map(move |&i| i * Self::K + s))
            .collect()
    }

    fn batch<'b, 'r>(
        &'r self,
        model: &M,
        ids: &[usize],
        scratch: &'b mut Vec<&'r M::Record>,
    ) -> Result<EncoderBatch<'b, M::Record>>
    where
        'r: 'b,
    {
        let rows = self.rows.select(model.state(), ids)?;
        scratch.clear();
        if self.rows.needs_records() {
            match &self.records {
                Records::Borrowed(r) => scratch.extend(ids.iter().map(|&i| r[i])),
                Records::Owned(r) => scratch.extend(ids.iter().map(|&i| &r[i])),
                Records::Dropped => {
                    return Err(Error::invalid(
                        "prepared data",
                        "an uncached encoder needs records that were not kept",
                    ));
                }
            }
        }
        Ok(EncoderBatch {
            records: self.rows.needs_records().then_some(&scratch[..]),
            rows,
        })
    }
}

impl Trainer {
    /// A trainer with `config`.
    pub fn new(config: TrainerConfig) -> Self {
        Trainer {
            config,
            metrics: Default::default(),
            comm: None,
        }
    }

    /// Trains data-parallel over the ranks of `comm` (e.g.
    /// [`Mpi::init`](crate::distributed) under `mpirun`): every rank calls `fit` with the
    /// same data and options; each takes its shard of every global batch of
    /// `batch_size` samples, cache fills and validation are shared out, and every rank
    /// ends with the same weights and report. Only rank 0 draws progress bars and writes
    /// checkpoints, logs and persisted caches; a step hook runs on every rank. An error on any rank ends every rank
    /// ([`Communicator::abort`]). A world of one trains exactly as without a
    /// communicator. The design, its exactness and what it communicates:
    /// [`distributed`].
    pub fn with_communicator(mut self, comm: std::sync::Arc<dyn Communicator>) -> Self {
        self.comm = Some(comm);
        self
    }

    /// The communicator of this trainer ([`SingleProcess`](distributed::SingleProcess)
    /// unless one was given).
    pub fn comm(&self) -> std::sync::Arc<dyn Communicator> {
        self.comm.clone().unwrap_or_else(distributed::single)
    }

    /// Attaches retrieval metrics (e.g. `RetrievalPrecision { k: 5 }`): each is computed
    /// on every training batch (within the batch, averaged over the epoch, reported as
    /// `train_<name>`) and over the whole validation set (self excluded, in blocks, by
    /// the same [`Evaluator`] as the loss kind's own metrics; one named like those, such
    /// as `RetrievalPrecision { k: 1 }`, is reported once, as `precision@1`), shown on
    /// the progress bar and written to the logs. The names: [`crate::metric`].
    pub fn with_metrics(mut self, metrics: Vec<Box<dyn Metric>>) -> Self {
        self.metrics = std::sync::Arc::new(metrics);
        self
    }

    /// Loss and metrics of `model` on a validation set: [`evaluate`](Self::evaluate)
    /// under Lightning's name.
    pub fn validate<M: TrainableModel>(
        &self,
        model: &mut M,
        val: &[SampleOf<M>],
    ) -> Result<Evaluation> {
        self.evaluate(model, val)
    }

    fn batch_metrics<M: TrainableModel>(
        &self,
        model: &M,
        embeddings: &Tensor,
        metas: &[<<M::Loss as SimilarityLoss>::Kind as LossKind>::Meta],
    ) -> Result<Vec<(String, Option<f64>, bool)>> {
        // The model's #[metric]s (on the bar when flagged `prog_bar`), then the trainer's.
        let mut metrics: Vec<(&dyn Metric, bool)> = model.metrics();
        metrics.extend(self.metrics.iter().map(|m| (m.as_ref(), true)));
        if metrics.is_empty() {
            return Ok(Vec::new());
        }
        let relevance = <<M::Loss as SimilarityLoss>::Kind as LossKind>::relevance(metas);
        let list: Vec<&dyn Metric> = metrics.iter().map(|(m, _)| *m).collect();
        // A batch that holds no positive (no two members of one group) scores nothing.
        let values = Evaluator::new(model.loss().distance()).scores(
            &embeddings.detach(),
            &relevance.as_relevance(),
            &list,
        )?;
        Ok(values
            .into_iter()
            .zip(&metrics)
            .map(|((name, v), (_, show))| (name, v, *show))
            .collect())
    }

    /// The configuration.
    pub fn config(&self) -> &TrainerConfig {
        &self.config
    }

    /// Trains `model` on `train`, validating on `val` after every epoch when given.
    pub fn fit<M: TrainableModel>(
        &self,
        model: &mut M,
        train: &[SampleOf<M>],
        val: Option<&[SampleOf<M>]>,
    ) -> Result<FitReport> {
        self.run(model, TrainSource::Slice(train), val, None, &mut |_| {})
    }

    /// [`fit`](Self::fit) on training samples streamed from an iterator (e.g. parsed
    /// line by line from a large JSONL file; an `Err` item stops the fit with that
    /// error, so a reader can report the line at fault). The iterator is consumed once,
    /// before the first epoch, `cache_batch_size` samples at a time: each chunk's
    /// objects are encoded into the caches and only the samples' targets and cache rows
    /// are kept. When every encoder is cached the records themselves are dropped as they
    /// stream, so memory holds the caches, not the data; a model with an uncached
    /// (trainable) encoder must run it on the records every epoch, so their objects are
    /// kept (moved, not cloned) for the whole fit.
    pub fn fit_iter<M: TrainableModel>(
        &self,
        model: &mut M,
        train: impl IntoIterator<Item = Result<SampleOf<M>>>,
        val: Option<&[SampleOf<M>]>,
    ) -> Result<FitReport> {
        let mut iter = train.into_iter();
        self.run(model, TrainSource::Iter(&mut iter), val, None, &mut |_| {})
    }

    /// [`fit`](Self::fit), calling `hook` after every training step with the batch's
    /// embeddings, targets and loss.
    pub fn fit_with_hook<M: TrainableModel>(
        &self,
        model: &mut M,
        train: &[SampleOf<M>],
        val: Option<&[SampleOf<M>]>,
        hook: &mut dyn FnMut(&StepOutput<'_, TargetsOf<M>>),
    ) -> Result<FitReport> {
        self.run(model, TrainSource::Slice(train), val, None, hook)
    }

    /// Continues a run from a checkpoint directory written by this trainer (see
    /// [`CheckpointConfig`]): restores the weights, the optimiser state and the history,
    /// then trains the remaining epochs. With the same data and config it ends with the
    /// same weights as the uninterrupted run.
    pub fn resume<M: TrainableModel>(
        &self,
        model: &mut M,
        checkpoint: &Path,
        train: &[SampleOf<M>],
        val: Option<&[SampleOf<M>]>,
    ) -> Result<FitReport> {
        self.run(
            model,
            TrainSource::Slice(train),
            val,
            Some(checkpoint),
            &mut |_| {},
        )
    }

    fn run<M: TrainableModel>(
        &self,
        model: &mut M,
        train: TrainSource<'_, SampleOf<M>>,
        val: Option<&[SampleOf<M>]>,
        resume: Option<&Path>,
        hook: &mut dyn FnMut(&StepOutput<'_, TargetsOf<M>>),
    ) -> Result<FitReport> {
        self.with_ranks(model, |model, comm| {
            self.run_ranked(model, train, val, resume, hook, comm)
        })
    }

    /// Runs `f` with this trainer's communicator; with more than one rank, the model's
    /// cache fills are shared out over it meanwhile, and an error ends every rank (the
    /// others may be waiting in a collective this rank will never join).
    fn with_ranks<M: TrainableModel, T>(
        &self,
        model: &mut M,
        f: impl FnOnce(&mut M, &dyn Communicator) -> Result<T>,
    ) -> Result<T> {
        let comm = self.comm();
        if comm.world_size() == 1 {
            return f(model, &*comm);
        }
        model.state().set_communicator(Some(comm.clone()));
        let result = f(model, &*comm);
        model.state().set_communicator(None);
        result.or_else(|e| comm.abort(&e))
    }

    fn run_ranked<M: TrainableModel>(
        &self,
        model: &mut M,
        train: TrainSource<'_, SampleOf<M>>,
        val: Option<&[SampleOf<M>]>,
        resume: Option<&Path>,
        hook: &mut dyn FnMut(&StepOutput<'_, TargetsOf<M>>),
        comm: &dyn Communicator,
    ) -> Result<FitReport> {
        let c = &self.config;
        c.check()?;
        if let Some(es) = &c.early_stopping
            && val.is_none()
            && es.monitor != "train_loss"
        {
            return Err(Error::invalid(
                "TrainerConfig.early_stopping",
                format!(
                    "monitors `{}`, which needs a validation set; pass one, or monitor `train_loss`",
                    es.monitor
                ),
            ));
        }
        // One run at a time writes a checkpoint or logs directory: a second one is told
        // which process holds it before it trains, rather than failing at a write. Only
        // rank 0 writes them.
        if let (Some(cp), Some(logs)) = (&c.checkpoints, &c.logs_dir)
            && cp.dir == *logs
        {
            return Err(Error::invalid(
                "TrainerConfig.logs_dir",
                format!(
                    "is `{}`, the checkpoint directory too; give each its own directory",
                    logs.display()
                ),
            ));
        }
        let writer = comm.rank() == 0;
        let checkpoint_lock = match &c.checkpoints {
            Some(cp) if writer => Some(crate::files::PathLock::acquire(&cp.dir)?),
            _ => None,
        };
        let logs_lock = match &c.logs_dir {
            Some(dir) if writer => {
                crate::files::check_dir_target(dir, crate::files::DirKind::Logs)?;
                Some(crate::files::PathLock::acquire(dir)?)
            }
            _ => None,
        };
        let started = Instant::now();
        if let Some(dir) = &c.cache_dir {
            model.state().begin_cache_store(dir);
        }
        let prepared = (|| {
            let train_data = match train {
                TrainSource::Slice(t) => self.prepare(model, t, "training set")?,
                TrainSource::Iter(it) => self.prepare_iter(model, it, "training set")?,
            };
            let val_data = val
                .map(|v| self.prepare(model, v, "validation set"))
                .transpose()?;
            Ok::<_, Error>((train_data, val_data))
        })();
        if prepared.is_err() || !writer {
            // Every rank holds the same caches; rank 0 persists them.
            model.state().cancel_cache_store();
        }
        let (train_data, val_data) = prepared?;
        if writer {
            for (encoder, encoded) in model.state().finish_cache_store()? {
                tracing::info!(encoder, encoded, "embedding cache prepared");
            }
        }
        let cache_seconds = started.elapsed().as_secs_f64();
        let n_train = train_data.metas.len();
        let balanced = match c.sampler {
            Sampler::Shuffle => None,
            Sampler::ClassBalanced { m } => Some(class_balanced::<M>(&train_data.metas, c, m)?),
        };

        let loader = DataLoader {
            batch_size: c.batch_size,
            shuffle: true,
            drop_last: c.drop_last,
            seed: c.seed,
        };
        // The model's own optimiser (#[trainable_model(optimizer = ...)]) wins.
        let optimizer_config = match M::optimizer() {
            Some(own) => {
                own.check(&format!(
                    "the optimizer of {}'s #[trainable_model]",
                    M::NAME
                ))?;
                own
            }
            None => c.optimizer,
        };
        let vars = model.state().named_trainable_vars();
        let mut optimizer = Optimizer::new(optimizer_config, vars.clone(), &c.param_groups)?;
        let world = comm.world_size();
        let epoch_batches = |epoch: usize| {
            let batches = match &balanced {
                Some(s) => s.batches(epoch),
                // The user set these options on the trainer, not on a loader.
                None => loader.batches(n_train, epoch).map_err(|e| match e {
                    Error::InvalidInput { location, message } => Error::invalid(
                        location.replacen("DataLoader.", "TrainerConfig.", 1),
                        message,
                    ),
                    other => other,
                })?,
            };
            // A batch too small to give every rank a sample is dropped, on every rank.
            Ok::<_, Error>(if world > 1 {
                batches.into_iter().filter(|b| b.len() >= world).collect()
            } else {
                batches
            })
        };
        let steps_per_epoch = epoch_batches(0)?.len();
        if steps_per_epoch == 0 {
            return Err(Error::invalid(
                "TrainerConfig.batch_size",
                format!(
                    "no training batch holds a sample for each of the {world} ranks \
                     ({n_train} training samples)"
                ),
            ));
        }
        let total_steps = c.epochs * steps_per_epoch;
        let mut report = FitReport {
            cache_seconds,
            epochs: Vec::with_capacity(c.epochs),
            stopped_early: None,
            best: None,
        };
        if let Some(dir) = resume {
            let state = checkpoint::restore(dir, model, &mut optimizer)?;
            report.epochs = state.history;
            report.best = state.best;
        }
        let first_epoch = report.epochs.len();
        if world > 1 {
            let params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
            distributed::check_agreement(
                comm,
                &[
                    ("the number of training samples", n_train as u64),
                    (
                        "the number of validation samples",
                        val_data.as_ref().map_or(0, |v| v.metas.len()) as u64,
                    ),
                    (
                        "the training data (its cache rows)",
                        train_data.rows.fingerprint(),
                    ),
                    ("TrainerConfig", config_fingerprint(c)),
                    (
                        "the trainable variables",
                        (vars.len() as u64) << 40 | params as u64,
                    ),
                    ("the epoch to start from (resume)", first_epoch as u64),
                ],
            )?;
            // Every rank starts from rank 0's weights (a model initialised with another
            // seed on one machine would otherwise drift apart silently).
            distributed::broadcast_vars(comm, &vars)?;
        }
        let monitor = c
            .early_stopping
            .as_ref()
            .map(|e| (e.monitor.clone(), e.mode, e.min_delta))
            .unwrap_or_else(|| {
                if val.is_some() {
                    ("val_loss".into(), MonitorMode::Min, 0.0)
                } else {
                    ("train_loss".into(), MonitorMode::Min, 0.0)
                }
            });
        let mut observers = self.observers::<M>(writer, checkpoint_lock, logs_lock, hook);
        let mut step_ctx = StepContext {
            comm,
            vars: &vars,
            data: &train_data,
            mined: None,
        };
        for epoch in first_epoch..c.epochs {
            let epoch_start = Instant::now();
            let mut mining = None;
            if let Some(options) = &c.hard_negatives
                && (epoch % options.every_epochs == 0 || epoch == first_epoch)
            {
                let mined = self.mine(model, &train_data, options, comm)?;
                mining = Some(mined.stats());
                step_ctx.mined = Some(mined);
            }
            // Dropout of epoch e depends only on (seed, e, rank), like the shuffling.
            let mut rng = StdRng::seed_from_u64(
                c.seed
                    ^ 0x5EED
                    ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    ^ (comm.rank() as u64).wrapping_mul(0xD1B5_4A32_D192_ED03),
            );
            for o in observers.iter_mut() {
                o.epoch_start(epoch, steps_per_epoch);
            }
            let (mut sum, mut count, mut lr) = (0.0, 0usize, optimizer_config.lr());
            let (mut skipped, mut last_skip) = (0usize, None);
            // (name, sum over the batches that scored it, those batches, on the bar)
            let mut metric_sums: Vec<(String, f64, usize, bool)> = Vec::new();
            for (step, samples) in epoch_batches(epoch)?.iter().enumerate() {
                let factor = c.schedule.factor(optimizer.steps(), epoch, total_steps);
                let taken = match self.step(
                    &step_ctx,
                    model,
                    &mut optimizer,
                    samples,
                    (epoch, step, factor),
                    &mut rng,
                ) {
                    Ok(taken) => taken,
                    Err(e) if c.non_finite == NonFinitePolicy::SkipStep && is_non_finite(&e) => {
                        let why = skip_reason(&e);
                        tracing::warn!(epoch, step, "{why}: step skipped (non_finite = skip_step)");
                        skipped += 1;
                        last_skip = Some(why);
                        for o in observers.iter_mut() {
                            o.step_skipped();
                        }
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                lr = optimizer_config.lr() * factor;
                sum += taken.loss;
                count += 1;
                let mut live = format!("loss {:.4}", sum / count as f64);
                for (i, (name, v, show)) in self
                    .batch_metrics(model, &taken.embeddings, &taken.metas)?
                    .into_iter()
                    .enumerate()
                {
                    if metric_sums.len() == i {
                        metric_sums.push((name, 0.0, 0, show));
                    }
                    let (name, total, scored, _) = &mut metric_sums[i];
                    if let Some(v) = v {
                        *total += v;
                        *scored += 1;
                    }
                    if show && *scored > 0 {
                        live.push_str(&format!(" {name} {:.4}", *total / *scored as f64));
                    }
                }
                let out = StepOutput {
                    epoch,
                    step,
                    embeddings: &taken.embeddings,
                    targets: &taken.targets,
                    loss: taken.loss,
                };
                for o in observers.iter_mut() {
                    o.step(&out, &live);
                }
            }
            if count == 0 {
                let last = last_skip.map_or_else(String::new, |e| format!("; the last: {e}"));
                return Err(Error::invalid(
                    "TrainerConfig.non_finite (skip_step)",
                    format!(
                        "every one of the {skipped} steps of epoch {epoch} had a non-finite loss \
                         or gradient and was skipped, so the epoch learnt nothing{last}"
                    ),
                ));
            }
            if let Some(variable) = model.state().first_non_finite_var()? {
                return Err(Error::NonFiniteWeights {
                    variable,
                    context: format!(
                        "after epoch {epoch} (an optimiser update overflowed); no checkpoint \
                         of this epoch is written"
                    ),
                });
            }
            let train_loss = sum / count as f64;
            let train_metrics: Vec<(String, f64)> = metric_sums
                .into_iter()
                // A metric that no batch of the epoch could score is left out.
                .filter(|(_, _, scored, _)| *scored > 0)
                .map(|(name, total, scored, _)| (format!("train_{name}"), total / scored as f64))
                .collect();
            let validation = match &val_data {
                Some(v) => Some(self.evaluate_prepared(model, v, comm)?),
                None => None,
            };
            let stats = EpochStats {
                epoch,
                train_loss,
                train_metrics,
                validation,
                lr,
                seconds: epoch_start.elapsed().as_secs_f64(),
                skipped_steps: skipped,
                mining,
            };
            if skipped > 0 {
                tracing::warn!(
                    epoch,
                    skipped,
                    "{skipped} of {} steps skipped for a non-finite loss or gradient",
                    skipped + count
                );
            }
            tracing::info!(epoch, train_loss, "epoch finished");
            let (name, mode, min_delta) = &monitor;
            let value = monitored(&stats, name).ok_or_else(|| {
                Error::invalid(
                    "TrainerConfig.early_stopping.monitor",
                    format!("`{name}` is not a value this run produces (train_loss, val_loss, or one of the validation metrics)"),
                )
            })?;
            let is_best = improves(*mode, value, report.best.map(|(_, b)| b), *min_delta);
            if is_best {
                report.best = Some((epoch, value));
            }
            report.epochs.push(stats);
            let end = observers::EpochEnd {
                epoch,
                report: &report,
                is_best,
                model: &*model,
                optimizer: &optimizer,
            };
            let mut stop = false;
            for o in observers.iter_mut() {
                stop |= o.epoch_end(&end)? == observers::Control::Stop;
            }
            if stop {
                report.stopped_early = Some(epoch);
                break;
            }
        }
        Ok(report)
    }

    /// The observers of a run: all of them on rank 0 (`writer`), early stopping and the
    /// hook on the other ranks. Their order is the order they act in at an epoch's end:
    /// the bar, the logs, the checkpoint, then the stopping decision.
    fn observers<'h, M: TrainableModel>(
        &self,
        writer: bool,
        checkpoint_lock: Option<crate::files::PathLock>,
        logs_lock: Option<crate::files::PathLock>,
        hook: &'h mut dyn FnMut(&StepOutput<'_, TargetsOf<M>>),
    ) -> Vec<Box<dyn observers::Observer<M> + 'h>> {
        let c = &self.config;
        let mut list: Vec<Box<dyn observers::Observer<M> + 'h>> = Vec::new();
        if writer {
            let progress = self.clone();
            list.push(Box::new(observers::Progress {
                make: Box::new(move |len| {
                    progress.bar(
                        len,
                        "epoch {prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed})",
                    )
                }),
                epochs: c.epochs,
                bar: None,
                last_val: String::new(),
            }));
        }
        if let (Some(dir), Some(lock)) = (&c.logs_dir, logs_lock) {
            list.push(Box::new(observers::Logs {
                dir: dir.clone(),
                lock: Some(lock),
            }));
        }
        if let (Some(cp), Some(lock)) = (&c.checkpoints, checkpoint_lock) {
            list.push(Box::new(observers::Checkpoints {
                config: cp.clone(),
                _lock: lock,
            }));
        }
        if let Some(es) = &c.early_stopping {
            list.push(Box::new(observers::EarlyStop { config: es.clone() }));
        }
        list.push(Box::new(observers::Hook { hook }));
        list
    }

    /// One training step on the global batch `samples`: this rank's shard through the
    /// encoders and head, the loss (of the gathered global batch, or of the shard), the
    /// gradients (reduced over the ranks), the update and the memory enqueue. An error for
    /// a non-finite loss or gradient leaves the model untouched (the caller may skip).
    fn step<M: TrainableModel>(
        &self,
        ctx: &StepContext<'_, '_, M>,
        model: &mut M,
        optimizer: &mut Optimizer,
        samples: &[usize],
        (epoch, step, lr_factor): (usize, usize, f64),
        rng: &mut StdRng,
    ) -> Result<Taken<M>> {
        let c = &self.config;
        let comm = ctx.comm;
        let (world, k) = (comm.world_size(), Prepared::<M>::K);
        let global = world > 1 && c.gather == GatherMode::Global;
        // Mined hard negatives, of the whole global batch (gathered like it) or of this
        // rank's shard (local negatives): for group data, objects of other groups that
        // join the batch with their groups, so that every group loss sees them as it sees
        // any member; for pair data, answers of other pairs, after the pairs' rows.
        let negatives_of = |s: &[usize]| match &ctx.mined {
            Some(m) => m.batch_negatives(s),
            None => Vec::new(),
        };
        // Group data (one object per sample): the mined objects join the rows as members,
        // and no separate negatives remain.
        let join = |rows: &[usize], negatives: &mut Vec<usize>| -> Option<Vec<usize>> {
            if k != 1 || negatives.is_empty() {
                return None;
            }
            let joined = rows.iter().chain(negatives.iter()).copied().collect();
            negatives.clear();
            Some(joined)
        };
        let mut samples = samples;
        let mut negatives = Vec::new();
        let extended: Vec<usize>;
        if global {
            negatives = negatives_of(samples);
            if let Some(rows) = join(samples, &mut negatives) {
                extended = rows;
                samples = &extended;
            }
        }
        let sizes = distributed::shard_sizes(samples.len(), world);
        let mut mine = &samples[distributed::shard(samples.len(), world, comm.rank())];
        let with_mined: Vec<usize>;
        if !global {
            negatives = negatives_of(mine);
            if let Some(rows) = join(mine, &mut negatives) {
                with_mined = rows;
                mine = &with_mined;
            }
        }
        // The pair negatives this rank embeds: its share of the global list, or its own.
        let negative_sizes = distributed::shard_sizes(negatives.len(), world);
        let my_negatives = if global {
            &negatives[distributed::shard(negatives.len(), world, comm.rank())]
        } else {
            &negatives[..]
        };
        let batch_samples = if global { samples } else { mine };
        let metas: Vec<_> = batch_samples.iter().map(|&i| ctx.data.metas[i]).collect();
        let targets = <SampleOf<M>>::targets(&metas, model.state().device())?;
        let mut ids = Prepared::<M>::object_ids(mine);
        let local_main = ids.len();
        // Rows of the batch the loss sees (the gathered global batch, or this shard).
        let n_main = k * batch_samples.len();
        ids.extend(my_negatives.iter().map(|&j| j * k + 1));
        let mut scratch = Vec::new();
        let batch = ctx.data.batch(model, &ids, &mut scratch)?;
        // Against the memory as it was before this batch joins it.
        let batch_loss = |embeddings: &Tensor| -> Result<Tensor> {
            let (embeddings, negatives) = hard_negatives::split(embeddings, n_main)?;
            let loss = match &negatives {
                Some(n) => model
                    .loss()
                    .forward_with_negatives(&embeddings, &targets, n)?,
                None => model.loss().forward(&embeddings, &targets)?,
            };
            match model.memory_loss(&embeddings, &targets, optimizer.steps())? {
                Some(memory) => Ok((loss + memory)?),
                None => Ok(loss),
            }
        };
        // This rank's rows → the global batch (the pairs' or objects' rows gathered
        // slot-major, then the mined answers), keeping this rank's graph or not.
        let to_global = |local: &Tensor, keep_graph: bool| -> Result<Tensor> {
            let main = local.narrow(0, 0, local_main)?;
            let main = distributed::gather_global_batch(comm, &main, &sizes, k, keep_graph)?;
            if negatives.is_empty() {
                return Ok(main);
            }
            let own = local.narrow(0, local_main, my_negatives.len())?;
            let all = distributed::gather_global_batch(comm, &own, &negative_sizes, 1, keep_graph)?;
            Ok(Tensor::cat(&[main, all], 0)?)
        };
        let (embeddings, loss, cached_grads) = match c.grad_cache {
            Some(m) => {
                let gather_detached = |local: &Tensor| to_global(local, false);
                let gather = if global {
                    // Where this rank's rows sit in the global batch.
                    let (rank, total) = (comm.rank(), samples.len());
                    let first: usize = sizes[..rank].iter().sum();
                    let first_negative: usize = negative_sizes[..rank].iter().sum();
                    let positions: Vec<u32> = (0..k)
                        .flat_map(|s| (0..mine.len()).map(move |r| s * total + first + r))
                        .chain((0..my_negatives.len()).map(|r| n_main + first_negative + r))
                        .map(|p| p as u32)
                        .collect();
                    let n = positions.len();
                    Some(grad_cache::Gather {
                        gather: &gather_detached,
                        positions: Tensor::from_vec(positions, n, model.state().device())?,
                    })
                } else {
                    None
                };
                let s = grad_cache::step_gathered(
                    &*model,
                    &batch,
                    m,
                    rng,
                    gather.as_ref(),
                    batch_loss,
                )?;
                (s.embeddings, s.loss, Some(s.grads))
            }
            None => {
                let local = model.embed(&batch, &mut Mode::Train(rng))?;
                let embeddings = if global {
                    to_global(&local, true)?
                } else {
                    local
                };
                let loss = batch_loss(&embeddings)?;
                (embeddings, loss, None)
            }
        };
        let embeddings = hard_negatives::split(&embeddings, n_main)?.0;
        let mut value = scalar(&loss)?;
        let mut grads = match cached_grads {
            Some(grads) => grads,
            None if value.is_finite() => Some(loss.backward()?),
            None => None,
        };
        if world > 1 {
            value = reduce_gradients(comm, c.gather, ctx.vars, &mut grads, value)?;
        }
        // The guard: the loss, then one read-back for every gradient (after the
        // reduction, so that every rank decides alike).
        let grads = match grads {
            Some(grads) if value.is_finite() => grads,
            _ => {
                return Err(Error::NonFinite {
                    what: "training loss",
                    epoch,
                    step,
                    value,
                });
            }
        };
        let norm = match optimizer.checked_grad_norm(&grads)? {
            GradNorm::Finite(norm) => norm,
            GradNorm::NonFinite {
                variable,
                value: bad,
            } => {
                return Err(Error::NonFiniteGradient {
                    variable,
                    epoch,
                    step,
                    value: bad,
                    loss: value,
                });
            }
        };
        let scale = match c.clip_grad_norm {
            Some(max) if norm > max => max / norm,
            _ => 1.0,
        };
        optimizer.step(&grads, lr_factor, scale)?;
        model.memory_enqueue(&embeddings.detach(), &targets)?;
        Ok(Taken {
            loss: value,
            embeddings,
            targets,
            metas,
        })
    }

    /// Loss and retrieval metrics of `model` on `samples` (filling caches as needed, from
    /// the persisted caches of `cache_dir` when they match).
    pub fn evaluate<M: TrainableModel>(
        &self,
        model: &mut M,
        samples: &[SampleOf<M>],
    ) -> Result<Evaluation> {
        self.with_ranks(model, |model, comm| {
            if let Some(dir) = &self.config.cache_dir {
                model.state().begin_cache_store(dir);
            }
            let data = self.prepare(model, samples, "evaluation set");
            // Read only: what the file holds is `fit`'s key set (the next `fit` that sees
            // these objects writes them).
            model.state().cancel_cache_store();
            self.evaluate_prepared(model, &data?, comm)
        })
    }

    /// Every object of a prepared set through the encoders and the head once, in
    /// evaluation mode and without a gradient graph, slot-major (object `s` of sample `i`
    /// is row `s·n + i`), `cache_batch_size` at a time; each rank embeds a contiguous
    /// share of the objects, all-gathered in order, so every rank holds all rows.
    fn embed_all<M: TrainableModel>(
        &self,
        model: &M,
        data: &Prepared<'_, M>,
        comm: &dyn Communicator,
    ) -> Result<Tensor> {
        let mut scratch = Vec::new();
        let all: Vec<usize> = (0..data.metas.len()).collect();
        let ids = Prepared::<M>::object_ids(&all);
        let world = comm.world_size();
        let share = &ids[distributed::shard(ids.len(), world, comm.rank())];
        let mut parts = Vec::new();
        for chunk in share.chunks(self.config.cache_batch_size.max(1)) {
            let batch = data.batch(model, chunk, &mut scratch)?;
            parts.push(model.embed(&batch, &mut Mode::Eval)?.detach());
        }
        if world == 1 {
            return Ok(Tensor::cat(&parts, 0)?);
        }
        let local = match parts.len() {
            // A share of nothing (fewer objects than ranks): no rows of the width.
            0 => {
                let batch = data.batch(model, &ids[..1], &mut scratch)?;
                model
                    .embed(&batch, &mut Mode::Eval)?
                    .detach()
                    .narrow(0, 0, 0)?
            }
            _ => Tensor::cat(&parts, 0)?,
        };
        comm.all_gather_rows(&local, &distributed::shard_sizes(ids.len(), world))
    }

    fn evaluate_prepared<M: TrainableModel>(
        &self,
        model: &M,
        data: &Prepared<'_, M>,
        comm: &dyn Communicator,
    ) -> Result<Evaluation> {
        let n = data.metas.len();
        let world = comm.world_size();
        let embeddings = self.embed_all(model, data, comm)?;
        // The loss over batches of the training batch size, in order, from those rows.
        let (mut sum, mut count) = (0.0, 0usize);
        let order = DataLoader {
            batch_size: self.config.batch_size,
            shuffle: false,
            drop_last: false,
            seed: 0,
        };
        let device = model.state().device();
        // Rank r computes batches r, r + W, ...; the sums are all-reduced below.
        for (i, samples) in order.batches(n, 0)?.into_iter().enumerate() {
            if i % world != comm.rank() {
                continue;
            }
            let ids = Prepared::<M>::object_ids(&samples);
            let rows: Vec<u32> = ids
                .iter()
                .map(|id| ((id % Prepared::<M>::K) * n + id / Prepared::<M>::K) as u32)
                .collect();
            let emb = match crate::kernels::gather_rows(&embeddings, &rows)? {
                Some(emb) => emb,
                None => embeddings.index_select(&Tensor::from_vec(rows, ids.len(), device)?, 0)?,
            };
            let batch_metas: Vec<_> = samples.iter().map(|&i| data.metas[i]).collect();
            let targets = <SampleOf<M>>::targets(&batch_metas, device)?;
            sum += scalar(&model.loss().forward(&emb, &targets)?)?;
            count += 1;
        }
        if world > 1 {
            let mut totals = [sum, count as f64];
            comm.all_reduce_sum_f64(&mut totals)?;
            (sum, count) = (totals[0], totals[1] as usize);
        }
        // The kind's metrics, then the attached ones, in one pass of the Evaluator; an
        // attached metric named like one of the kind's is that metric, reported once.
        type Kind<M> = <<M as TrainableModel>::Loss as SimilarityLoss>::Kind;
        let own = <Kind<M> as LossKind>::metrics();
        let mut list: Vec<&dyn Metric> = own.iter().map(|m| m.as_ref()).collect();
        let attached = model
            .metrics()
            .into_iter()
            .map(|(m, _)| m)
            .chain(self.metrics.iter().map(|m| m.as_ref()));
        for m in attached {
            let name = m.name();
            if !list.iter().any(|l| l.name() == name) {
                list.push(m);
            }
        }
        // Each rank ranks its share of the queries; the sums are all-reduced.
        let metrics = Evaluator::new(model.loss().distance()).evaluate_shared(
            &embeddings,
            &<Kind<M> as LossKind>::relevance(&data.metas).as_relevance(),
            &list,
            comm,
        )?;
        Ok(Evaluation {
            loss: sum / count as f64,
            metrics,
        })
    }

    fn prepare<'a, M: TrainableModel>(
        &self,
        model: &mut M,
        samples: &'a [SampleOf<M>],
        what: &str,
    ) -> Result<Prepared<'a, M>> {
        if samples.is_empty() {
            return Err(Error::invalid(what, "is empty"));
        }
        let metas = metas(samples).map_err(|e| match e {
            Error::InvalidInput { location, message } => {
                Error::invalid(format!("{what}, {location}"), message)
            }
            other => other,
        })?;
        <<M::Loss as SimilarityLoss>::Kind as LossKind>::check(&metas, what)?;
        let k = <SampleOf<M> as SimilaritySample>::OBJECTS;
        let records: Vec<&M::Record> = samples
            .iter()
            .flat_map(|s| (0..k).map(move |slot| s.object(slot)))
            .collect();
        let bar = self.bar(
            0,
            "{spinner} caching {prefix} [{bar:30}] {pos}/{len} ({eta})",
        );
        let rows = model.fill_caches(
            &records,
            self.config.cache_batch_size,
            &mut |name, done, total| {
                bar.set_prefix(name);
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            },
        )?;
        bar.finish_and_clear();
        Ok(Prepared {
            metas,
            records: Records::Borrowed(records),
            rows,
        })
    }

    /// [`prepare`](Self::prepare) for a stream: `cache_batch_size` samples at a time.
    fn prepare_iter<'a, M: TrainableModel>(
        &self,
        model: &mut M,
        samples: &mut dyn Iterator<Item = Result<SampleOf<M>>>,
        what: &str,
    ) -> Result<Prepared<'a, M>> {
        let chunk_size = self.config.cache_batch_size.max(1);
        let (mut metas, mut kept, mut rows) = (Vec::new(), Vec::new(), CachedRows::default());
        let mut keep: Option<bool> = None;
        let bar = self.bar(0, "{spinner} caching {prefix} {pos} objects ({elapsed})");
        loop {
            let mut chunk: Vec<SampleOf<M>> = Vec::with_capacity(chunk_size);
            for item in (&mut *samples).take(chunk_size) {
                // The stream's own error, with the index of the item that failed.
                let index = metas.len() + chunk.len();
                chunk.push(item.map_err(|e| match e {
                    Error::InvalidInput { location, message } => Error::invalid(
                        format!("{what}, item {index} of the stream: {location}"),
                        message,
                    ),
                    other => other,
                })?);
            }
            if chunk.is_empty() {
                break;
            }
            let offset = metas.len();
            metas.extend(crate::data::metas(&chunk).map_err(|e| match e {
                Error::InvalidInput { location, message } => Error::invalid(
                    format!("{what}, {location} of the chunk starting at sample {offset}"),
                    message,
                ),
                other => other,
            })?);
            let k = <SampleOf<M> as SimilaritySample>::OBJECTS;
            let records: Vec<&M::Record> = chunk
                .iter()
                .flat_map(|s| (0..k).map(move |slot| s.object(slot)))
                .collect();
            let chunk_rows =
                model.fill_caches(&records, chunk_size, &mut |name, _, _| bar.set_prefix(name))?;
            bar.inc(records.len() as u64);
            let keep_records = *keep.get_or_insert(chunk_rows.needs_records());
            rows.append(chunk_rows);
            if keep_records {
                for s in chunk {
                    s.into_objects(&mut kept);
                }
            }
        }
        bar.finish_and_clear();
        if metas.is_empty() {
            return Err(Error::invalid(what, "is empty"));
        }
        Ok(Prepared {
            metas,
            records: if keep == Some(true) {
                Records::Owned(kept)
            } else {
                Records::Dropped
            },
            rows,
        })
    }

    fn bar(&self, len: u64, template: &str) -> ProgressBar {
        if !self.config.progress || self.comm.as_ref().is_some_and(|c| c.rank() != 0) {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    }
}

/// Where `run` takes the training samples from.
enum TrainSource<'a, S> {
    Slice(&'a [S]),
    Iter(&'a mut dyn Iterator<Item = Result<S>>),
}

/// The class-balanced sampler over prepared training samples; an error when a sample
/// has no class (pairs).
fn class_balanced<M: TrainableModel>(
    metas: &[<<M::Loss as SimilarityLoss>::Kind as LossKind>::Meta],
    c: &TrainerConfig,
    m: usize,
) -> Result<ClassBalancedSampler> {
    let classes: Option<Vec<i64>> = metas.iter().map(<SampleOf<M>>::class).collect();
    let classes = classes.ok_or_else(|| {
        Error::invalid(
            "TrainerConfig.sampler (ClassBalanced { m })",
            "class-balanced batches need samples with a class (group samples); this \
             model's loss trains on samples without one (pairs): use Sampler::Shuffle",
        )
    })?;
    ClassBalancedSampler::new(&classes, c.batch_size, m, c.seed)
}

/// A skipped step's error in words, without the error's advice to skip such steps.
fn skip_reason(e: &Error) -> String {
    match e {
        Error::NonFiniteGradient {
            variable,
            epoch,
            step,
            value,
            loss,
        } => format!(
            "non-finite gradient of `{variable}` at epoch {epoch}, step {step}: {value} (the \
             loss was {loss})"
        ),
        other => other.to_string(),
    }
}

/// What a step borrows from its run.
struct StepContext<'a, 'd, M: TrainableModel> {
    comm: &'a dyn Communicator,
    /// The optimiser's variables, in `named_trainable_vars` order (the gradient buffer's
    /// layout).
    vars: &'a [(String, candle_core::Var)],
    data: &'a Prepared<'d, M>,
    /// The last hard-negative mining pass, with `TrainerConfig::hard_negatives`.
    mined: Option<hard_negatives::Mined>,
}

/// A step that updated the model: what the metrics and the observers see.
struct Taken<M: TrainableModel> {
    loss: f64,
    /// The batch the loss saw (the global batch, or the shard with `GatherMode::Local`).
    embeddings: Tensor,
    targets: TargetsOf<M>,
    metas: Vec<<<M::Loss as SimilarityLoss>::Kind as LossKind>::Meta>,
}

/// A non-finite loss or gradient: what `NonFinitePolicy::SkipStep` skips.
fn is_non_finite(e: &Error) -> bool {
    matches!(e, Error::NonFinite { .. } | Error::NonFiniteGradient { .. })
}

/// Sums this rank's gradients with every other rank's, in one flat buffer, and returns
/// the step's loss as every rank agrees on it (NaN when it was not finite on some rank).
///
/// The buffer: one presence flag per variable, then every variable's gradient (zeros
/// where this rank has none), then the loss and a count of ranks whose loss was not
/// finite. With [`GatherMode::Global`] every rank computed the same loss of the global
/// batch, so the gradients of encoder and head variables (through this rank's rows
/// only) are summed, and the loss's own variables (the full gradient on every rank)
/// averaged; with [`GatherMode::Local`] every gradient and the loss are averaged. See
/// [`distributed`] for why the sum is exact.
fn reduce_gradients(
    comm: &dyn Communicator,
    mode: GatherMode,
    vars: &[(String, candle_core::Var)],
    grads: &mut Option<candle_core::backprop::GradStore>,
    loss: f64,
) -> Result<f64> {
    let world = comm.world_size() as f64;
    let Some((_, first)) = vars.first() else {
        return Ok(loss);
    };
    let (device, dtype) = (first.device().clone(), first.dtype());
    let finite = grads.is_some() && loss.is_finite();
    let mut head = Vec::with_capacity(vars.len() + 2);
    let mut parts = Vec::with_capacity(vars.len() + 1);
    for (name, var) in vars {
        let scale = match mode {
            GatherMode::Global if !name.starts_with("loss.") => 1.0,
            _ => 1.0 / world,
        };
        let grad = grads.as_ref().filter(|_| finite).and_then(|g| g.get(var));
        head.push(if grad.is_some() { 1.0 } else { 0.0 });
        parts.push(match grad {
            Some(g) if scale == 1.0 => g.flatten_all()?.to_dtype(dtype)?,
            Some(g) => (g.flatten_all()? * scale)?.to_dtype(dtype)?,
            None => Tensor::zeros(var.elem_count(), dtype, &device)?,
        });
    }
    head.push(if finite { loss / world } else { 0.0 });
    head.push(if finite { 0.0 } else { 1.0 });
    let n_head = head.len();
    parts.insert(0, Tensor::new(head, &device)?.to_dtype(dtype)?);
    let flat = comm.all_reduce_sum_tensor(&Tensor::cat(&parts, 0)?)?;
    let summary = flat
        .narrow(0, 0, n_head)?
        .to_dtype(candle_core::DType::F64)?
        .to_vec1::<f64>()?;
    if summary[n_head - 1] > 0.0 {
        // Some rank's loss was not finite: every rank skips (or stops) alike.
        return Ok(if loss.is_finite() { f64::NAN } else { loss });
    }
    let Some(store) = grads.as_mut() else {
        return Ok(f64::NAN);
    };
    let mut at = n_head;
    for (i, (_, var)) in vars.iter().enumerate() {
        let n = var.elem_count();
        if summary[i] > 0.0 {
            let g = flat
                .narrow(0, at, n)?
                .reshape(var.shape())?
                .to_dtype(var.dtype())?;
            store.insert(var.as_tensor(), g);
        } else {
            store.remove(var.as_tensor());
        }
        at += n;
    }
    Ok(match mode {
        // Every rank computed this very loss; the sum of the shares keeps its last bits
        // only up to rounding, so the rank's own value is reported.
        GatherMode::Global => loss,
        GatherMode::Local => summary[n_head - 2],
    })
}

/// A hash of the options every rank must share (the paths and the progress flag may
/// differ between machines).
fn config_fingerprint(c: &TrainerConfig) -> u64 {
    let mut shared = c.clone();
    shared.checkpoints = None;
    shared.logs_dir = None;
    shared.cache_dir = None;
    shared.progress = false;
    let text = serde_json::to_string(&shared).unwrap_or_default();
    xxhash_rust::xxh3::xxh3_64(text.as_bytes())
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One row per checked field: a config with one bad value, and what the error must say.
    fn bad_configs() -> Vec<(&'static str, TrainerConfig, &'static str)> {
        let base = TrainerConfig::default;
        let stopping = |patience, min_delta| {
            Some(EarlyStopping {
                monitor: "train_loss".into(),
                mode: MonitorMode::Min,
                patience,
                min_delta,
            })
        };
        let group = |lr_factor| {
            vec![ParamGroup {
                prefix: "loss.".into(),
                lr_factor,
            }]
        };
        let cosine = |min_factor| LrSchedule::WarmupCosine {
            warmup_steps: 2,
            min_factor,
        };
        let step = |every_epochs, gamma| LrSchedule::Step {
            every_epochs,
            gamma,
        };
        let sgd = |lr, momentum, weight_decay| OptimizerConfig::Sgd {
            lr,
            momentum,
            weight_decay,
        };
        vec![
            (
                "epochs 0",
                TrainerConfig {
                    epochs: 0,
                    ..base()
                },
                "TrainerConfig.epochs: must be at least 1, got 0",
            ),
            (
                "batch_size 0",
                TrainerConfig {
                    batch_size: 0,
                    ..base()
                },
                "TrainerConfig.batch_size: must be at least 1, got 0",
            ),
            (
                "cache_batch_size 0",
                TrainerConfig {
                    cache_batch_size: 0,
                    ..base()
                },
                "TrainerConfig.cache_batch_size: must be at least 1",
            ),
            (
                "lr -1",
                TrainerConfig {
                    optimizer: OptimizerConfig::adam(-1.0),
                    ..base()
                },
                "TrainerConfig.optimizer.lr: must be > 0 and finite, got -1",
            ),
            (
                "lr 0",
                TrainerConfig {
                    optimizer: OptimizerConfig::adam(0.0),
                    ..base()
                },
                "TrainerConfig.optimizer.lr: must be > 0",
            ),
            (
                "lr NaN",
                TrainerConfig {
                    optimizer: OptimizerConfig::AdamW {
                        lr: f64::NAN,
                        weight_decay: 0.01,
                    },
                    ..base()
                },
                "TrainerConfig.optimizer.lr: must be > 0 and finite, got NaN",
            ),
            (
                "lr inf",
                TrainerConfig {
                    optimizer: sgd(f64::INFINITY, 0.0, 0.0),
                    ..base()
                },
                "TrainerConfig.optimizer.lr: must be > 0 and finite, got inf",
            ),
            (
                "weight_decay -0.1",
                TrainerConfig {
                    optimizer: OptimizerConfig::AdamW {
                        lr: 1e-3,
                        weight_decay: -0.1,
                    },
                    ..base()
                },
                "TrainerConfig.optimizer.weight_decay: must be >= 0 and finite, got -0.1",
            ),
            (
                "weight_decay NaN",
                TrainerConfig {
                    optimizer: OptimizerConfig::Adam {
                        lr: 1e-3,
                        weight_decay: f64::NAN,
                    },
                    ..base()
                },
                "TrainerConfig.optimizer.weight_decay",
            ),
            (
                "momentum 1",
                TrainerConfig {
                    optimizer: sgd(0.1, 1.0, 0.0),
                    ..base()
                },
                "TrainerConfig.optimizer.momentum: must be in [0, 1), got 1",
            ),
            (
                "momentum NaN",
                TrainerConfig {
                    optimizer: sgd(0.1, f64::NAN, 0.0),
                    ..base()
                },
                "TrainerConfig.optimizer.momentum",
            ),
            (
                "lr_factor -1",
                TrainerConfig {
                    param_groups: group(-1.0),
                    ..base()
                },
                "TrainerConfig.param_groups[0].lr_factor (prefix `loss.`): must be >= 0 and finite, got -1",
            ),
            (
                "lr_factor NaN",
                TrainerConfig {
                    param_groups: group(f64::NAN),
                    ..base()
                },
                "TrainerConfig.param_groups[0].lr_factor",
            ),
            (
                "min_factor -0.1",
                TrainerConfig {
                    schedule: cosine(-0.1),
                    ..base()
                },
                "TrainerConfig.schedule (WarmupCosine).min_factor: must be in [0, 1], got -0.1",
            ),
            (
                "min_factor 1.5",
                TrainerConfig {
                    schedule: cosine(1.5),
                    ..base()
                },
                "min_factor: must be in [0, 1], got 1.5",
            ),
            (
                "min_factor NaN",
                TrainerConfig {
                    schedule: cosine(f64::NAN),
                    ..base()
                },
                "min_factor: must be in [0, 1], got NaN",
            ),
            (
                "gamma -0.5",
                TrainerConfig {
                    schedule: step(2, -0.5),
                    ..base()
                },
                "TrainerConfig.schedule (Step).gamma: must be > 0 and finite",
            ),
            (
                "gamma 0",
                TrainerConfig {
                    schedule: step(2, 0.0),
                    ..base()
                },
                "(Step).gamma",
            ),
            (
                "gamma NaN",
                TrainerConfig {
                    schedule: step(2, f64::NAN),
                    ..base()
                },
                "got NaN",
            ),
            (
                "every_epochs 0",
                TrainerConfig {
                    schedule: step(0, 0.5),
                    ..base()
                },
                "TrainerConfig.schedule (Step).every_epochs: must be at least 1",
            ),
            (
                "clip -1",
                TrainerConfig {
                    clip_grad_norm: Some(-1.0),
                    ..base()
                },
                "invalid input in TrainerConfig.clip_grad_norm: must be > 0 and finite, got -1",
            ),
            (
                "clip 0",
                TrainerConfig {
                    clip_grad_norm: Some(0.0),
                    ..base()
                },
                "TrainerConfig.clip_grad_norm: must be > 0 and finite, got 0",
            ),
            (
                "clip NaN",
                TrainerConfig {
                    clip_grad_norm: Some(f64::NAN),
                    ..base()
                },
                "TrainerConfig.clip_grad_norm: must be > 0 and finite, got NaN",
            ),
            (
                "clip inf",
                TrainerConfig {
                    clip_grad_norm: Some(f64::INFINITY),
                    ..base()
                },
                "TrainerConfig.clip_grad_norm: must be > 0 and finite, got inf",
            ),
            (
                "min_delta NaN",
                TrainerConfig {
                    early_stopping: stopping(2, f64::NAN),
                    ..base()
                },
                "TrainerConfig.early_stopping.min_delta: must be a number >= 0",
            ),
            (
                "min_delta -1",
                TrainerConfig {
                    early_stopping: stopping(2, -1.0),
                    ..base()
                },
                "TrainerConfig.early_stopping.min_delta",
            ),
            (
                "patience 0",
                TrainerConfig {
                    early_stopping: stopping(0, 0.0),
                    ..base()
                },
                "TrainerConfig.early_stopping.patience: must be at least 1",
            ),
            (
                "monitor empty",
                TrainerConfig {
                    early_stopping: Some(EarlyStopping {
                        monitor: String::new(),
                        mode: MonitorMode::Max,
                        patience: 1,
                        min_delta: 0.0,
                    }),
                    ..base()
                },
                "TrainerConfig.early_stopping.monitor: is empty",
            ),
            (
                "sampler m 0",
                TrainerConfig {
                    sampler: Sampler::ClassBalanced { m: 0 },
                    ..base()
                },
                "TrainerConfig.sampler (ClassBalanced).m: must be at least 1",
            ),
            (
                "sampler m not dividing batch_size",
                TrainerConfig {
                    sampler: Sampler::ClassBalanced { m: 3 },
                    batch_size: 128,
                    ..base()
                },
                "TrainerConfig.batch_size 128 must be a multiple of m = 3",
            ),
            (
                "grad_cache 0",
                TrainerConfig {
                    grad_cache: Some(0),
                    ..base()
                },
                "TrainerConfig.grad_cache: must be at least 1, got 0",
            ),
            (
                "hard_negatives num_negatives 0",
                TrainerConfig {
                    hard_negatives: Some(hard_negatives::HardNegatives {
                        num_negatives: 0,
                        ..Default::default()
                    }),
                    ..base()
                },
                "TrainerConfig.hard_negatives.num_negatives: must be at least 1, got 0",
            ),
            (
                "hard_negatives every_epochs 0",
                TrainerConfig {
                    hard_negatives: Some(hard_negatives::HardNegatives {
                        every_epochs: 0,
                        ..Default::default()
                    }),
                    ..base()
                },
                "TrainerConfig.hard_negatives.every_epochs: must be at least 1, got 0",
            ),
            (
                "hard_negatives relative_margin 1",
                TrainerConfig {
                    hard_negatives: Some(hard_negatives::HardNegatives {
                        relative_margin: Some(1.0),
                        ..Default::default()
                    }),
                    ..base()
                },
                "TrainerConfig.hard_negatives.relative_margin: must be in [0, 1), got 1",
            ),
            (
                "hard_negatives max_score NaN",
                TrainerConfig {
                    hard_negatives: Some(hard_negatives::HardNegatives {
                        max_score: Some(f64::NAN),
                        ..Default::default()
                    }),
                    ..base()
                },
                "TrainerConfig.hard_negatives.max_score: must be finite, got NaN",
            ),
        ]
    }

    #[test]
    fn every_checked_field_is_named_in_its_error() {
        assert!(TrainerConfig::default().check().is_ok());
        for (case, config, want) in bad_configs() {
            let err = config.check().expect_err(case).to_string();
            assert!(err.contains(want), "{case}: {err}");
        }
    }

    #[test]
    fn valid_edge_values_pass() {
        for config in [
            TrainerConfig {
                schedule: LrSchedule::WarmupCosine {
                    warmup_steps: 0,
                    min_factor: 1.0,
                },
                ..Default::default()
            },
            TrainerConfig {
                schedule: LrSchedule::Step {
                    every_epochs: 1,
                    gamma: 2.0,
                },
                clip_grad_norm: Some(1e-9),
                ..Default::default()
            },
            TrainerConfig {
                optimizer: OptimizerConfig::Sgd {
                    lr: 1.0,
                    momentum: 0.0,
                    weight_decay: 0.0,
                },
                param_groups: vec![ParamGroup {
                    prefix: "loss.".into(),
                    lr_factor: 0.0,
                }],
                early_stopping: Some(EarlyStopping {
                    monitor: "val_loss".into(),
                    mode: MonitorMode::Min,
                    patience: 1,
                    min_delta: f64::INFINITY,
                }),
                sampler: Sampler::ClassBalanced { m: 4 },
                ..Default::default()
            },
        ] {
            config.check().unwrap();
        }
    }

    #[test]
    fn non_finite_policy_and_skipped_steps_read_from_old_json() {
        // A config and epoch stats written before these fields existed still read.
        let mut json = serde_json::to_value(TrainerConfig::default()).unwrap();
        json.as_object_mut().unwrap().remove("non_finite");
        let config: TrainerConfig = serde_json::from_value(json).unwrap();
        assert_eq!(config.non_finite, NonFinitePolicy::Error);
        let stats: EpochStats = serde_json::from_str(
            r#"{"epoch": 0, "train_loss": 0.5, "validation": null, "lr": 0.001, "seconds": 1.0}"#,
        )
        .unwrap();
        assert_eq!(stats.skipped_steps, 0);
        let policy: NonFinitePolicy = serde_json::from_str(r#""skip_step""#).unwrap();
        assert_eq!(policy, NonFinitePolicy::SkipStep);
    }
}
