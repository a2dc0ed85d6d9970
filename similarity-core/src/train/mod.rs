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
//! ```
//!
//! A non-finite loss stops training with [`Error::NonFinite`] naming the epoch and step.

mod model;

use std::time::Instant;

use candle_core::Tensor;
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

pub use model::{
    CachedRows, EncoderBatch, EncoderSlot, ModelOptions, ModelState, SampleOf, TrainableModel,
};

use crate::data::{DataLoader, SimilaritySample, metas};
use crate::error::{Error, Result};
use crate::loss::{LossKind, SimilarityLoss};
use crate::nn::Mode;

/// The optimiser and its learning rate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerConfig {
    /// Adam (Kingma & Ba), betas (0.9, 0.999), eps 1e-8: PyTorch's defaults.
    Adam {
        /// Learning rate.
        lr: f64,
    },
    /// AdamW (decoupled weight decay, Loshchilov & Hutter).
    AdamW {
        /// Learning rate.
        lr: f64,
        /// Decoupled weight decay.
        weight_decay: f64,
    },
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig::Adam { lr: 1e-3 }
    }
}

impl OptimizerConfig {
    fn build(self, vars: Vec<candle_core::Var>) -> Result<AdamW> {
        let (lr, weight_decay) = match self {
            OptimizerConfig::Adam { lr } => (lr, 0.0),
            OptimizerConfig::AdamW { lr, weight_decay } => (lr, weight_decay),
        };
        if !(lr > 0.0 && lr.is_finite()) || weight_decay < 0.0 {
            return Err(Error::invalid(
                "TrainerConfig.optimizer",
                format!(
                    "needs lr > 0 and weight_decay >= 0, got lr = {lr}, weight_decay = {weight_decay}"
                ),
            ));
        }
        Ok(AdamW::new(
            vars,
            ParamsAdamW {
                lr,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay,
            },
        )?)
    }
}

/// Options of a [`Trainer`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerConfig {
    /// Passes over the training set. Default 10.
    pub epochs: usize,
    /// Samples per training and validation batch. Default 128.
    pub batch_size: usize,
    /// Objects per batch while filling caches and evaluating. Default 1024.
    pub cache_batch_size: usize,
    /// Optimiser. Default Adam, lr 1e-3.
    pub optimizer: OptimizerConfig,
    /// Drop the last, smaller training batch. Default false.
    pub drop_last: bool,
    /// Seed of shuffling and dropout. Default 0.
    pub seed: u64,
    /// Draw progress bars on the terminal. Default true.
    pub progress: bool,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        TrainerConfig {
            epochs: 10,
            batch_size: 128,
            cache_batch_size: 1024,
            optimizer: OptimizerConfig::default(),
            drop_last: false,
            seed: 0,
            progress: true,
        }
    }
}

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
    /// Validation loss and metrics, when a validation set was given.
    pub validation: Option<Evaluation>,
    /// Wall time of the epoch, validation included.
    pub seconds: f64,
}

/// The record of a [`Trainer::fit`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitReport {
    /// Seconds spent filling caches.
    pub cache_seconds: f64,
    /// One entry per epoch.
    pub epochs: Vec<EpochStats>,
}

/// Fits a [`TrainableModel`].
#[derive(Debug, Clone, Default)]
pub struct Trainer {
    config: TrainerConfig,
}

/// Samples with their objects' cache rows: everything an epoch needs.
struct Prepared<'a, M: TrainableModel> {
    metas: Vec<<<M::Loss as SimilarityLoss>::Kind as LossKind>::Meta>,
    /// Object `i · OBJECTS + s` is object `s` of sample `i`.
    records: Vec<&'a M::Record>,
    rows: CachedRows,
}

impl<'a, M: TrainableModel> Prepared<'a, M> {
    const K: usize = <SampleOf<M> as SimilaritySample>::OBJECTS;

    /// Objects of `samples` in slot-major order.
    fn object_ids(samples: &[usize]) -> Vec<usize> {
        (0..Self::K)
            .flat_map(|s| samples.iter().map(move |&i| i * Self::K + s))
            .collect()
    }

    fn batch<'b>(
        &self,
        model: &M,
        ids: &[usize],
        scratch: &'b mut Vec<&'a M::Record>,
    ) -> Result<EncoderBatch<'b, M::Record>>
    where
        'a: 'b,
    {
        let rows = self.rows.select(model.state(), ids)?;
        scratch.clear();
        if self.rows.needs_records() {
            scratch.extend(ids.iter().map(|&i| self.records[i]));
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
        Trainer { config }
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
        let c = &self.config;
        if c.epochs == 0 {
            return Err(Error::invalid("TrainerConfig.epochs", "must be at least 1"));
        }
        let started = Instant::now();
        let train_data = self.prepare(model, train, "training set")?;
        let val_data = val
            .map(|v| self.prepare(model, v, "validation set"))
            .transpose()?;
        let cache_seconds = started.elapsed().as_secs_f64();

        let loader = DataLoader {
            batch_size: c.batch_size,
            shuffle: true,
            drop_last: c.drop_last,
            seed: c.seed,
        };
        let mut optimizer = c.optimizer.build(model.state().trainable_vars())?;
        let mut rng = StdRng::seed_from_u64(c.seed ^ 0x5EED);
        let steps_per_epoch = loader.batches(train.len(), 0)?.len();
        let bar = self.bar(
            (c.epochs * steps_per_epoch) as u64,
            "{spinner} epoch {prefix} [{bar:30}] {pos}/{len} {msg} ({eta})",
        );
        let mut report = FitReport {
            cache_seconds,
            epochs: Vec::with_capacity(c.epochs),
        };
        let mut scratch = Vec::new();
        let mut last_val = String::new();
        for epoch in 0..c.epochs {
            let epoch_start = Instant::now();
            bar.set_prefix(format!("{}/{}", epoch + 1, c.epochs));
            let (mut sum, mut count) = (0.0, 0usize);
            for (step, samples) in loader.batches(train.len(), epoch)?.iter().enumerate() {
                let ids = Prepared::<M>::object_ids(samples);
                let batch = train_data.batch(model, &ids, &mut scratch)?;
                let batch_metas: Vec<_> = samples.iter().map(|&i| train_data.metas[i]).collect();
                let targets = <SampleOf<M>>::targets(&batch_metas, model.state().device())?;
                let embeddings = model.embed(&batch, &mut Mode::Train(&mut rng))?;
                let loss = model.loss().forward(&embeddings, &targets)?;
                let value = scalar(&loss)?;
                if !value.is_finite() {
                    return Err(Error::NonFinite {
                        what: "training loss",
                        epoch,
                        step,
                        value,
                    });
                }
                optimizer.backward_step(&loss)?;
                sum += value;
                count += 1;
                bar.inc(1);
                bar.set_message(format!("loss {:.4}{last_val}", sum / count as f64));
            }
            let train_loss = sum / count as f64;
            let validation = match &val_data {
                Some(v) => Some(self.evaluate_prepared(model, v)?),
                None => None,
            };
            if let Some(v) = &validation {
                last_val = format!(" | val_loss {:.4}", v.loss);
                for (name, value) in &v.metrics {
                    last_val.push_str(&format!(" {name} {value:.4}"));
                }
            }
            bar.set_message(format!("loss {train_loss:.4}{last_val}"));
            report.epochs.push(EpochStats {
                epoch,
                train_loss,
                validation,
                seconds: epoch_start.elapsed().as_secs_f64(),
            });
        }
        bar.finish();
        Ok(report)
    }

    /// Loss and retrieval metrics of `model` on `samples` (filling caches as needed).
    pub fn evaluate<M: TrainableModel>(
        &self,
        model: &mut M,
        samples: &[SampleOf<M>],
    ) -> Result<Evaluation> {
        let data = self.prepare(model, samples, "evaluation set")?;
        self.evaluate_prepared(model, &data)
    }

    fn evaluate_prepared<M: TrainableModel>(
        &self,
        model: &M,
        data: &Prepared<'_, M>,
    ) -> Result<Evaluation> {
        let n = data.metas.len();
        let mut scratch = Vec::new();
        let (mut sum, mut count) = (0.0, 0usize);
        let order = DataLoader {
            batch_size: self.config.batch_size,
            shuffle: false,
            drop_last: false,
            seed: 0,
        };
        for samples in order.batches(n, 0)? {
            let ids = Prepared::<M>::object_ids(&samples);
            let batch = data.batch(model, &ids, &mut scratch)?;
            let batch_metas: Vec<_> = samples.iter().map(|&i| data.metas[i]).collect();
            let targets = <SampleOf<M>>::targets(&batch_metas, model.state().device())?;
            let emb = model.embed(&batch, &mut Mode::Eval)?;
            sum += scalar(&model.loss().forward(&emb, &targets)?)?;
            count += 1;
        }
        // Every object of the set, slot-major, through the head.
        let all: Vec<usize> = (0..n).collect();
        let ids = Prepared::<M>::object_ids(&all);
        let mut parts = Vec::new();
        for chunk in ids.chunks(self.config.cache_batch_size.max(1)) {
            let batch = data.batch(model, chunk, &mut scratch)?;
            parts.push(model.embed(&batch, &mut Mode::Eval)?.detach());
        }
        let embeddings = Tensor::cat(&parts, 0)?;
        let metrics = <<M::Loss as SimilarityLoss>::Kind as LossKind>::evaluate(
            &embeddings,
            &data.metas,
            model.loss().distance(),
        )?;
        Ok(Evaluation {
            loss: sum / count as f64,
            metrics: metrics
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
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
            records,
            rows,
        })
    }

    fn bar(&self, len: u64, template: &str) -> ProgressBar {
        if !self.config.progress {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    }
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}
