//! What runs around the training step: progress bars, logs, checkpoints, early stopping
//! and the user's step hook, each an [`Observer`] of the loop.
//!
//! ```text
//! for epoch:   observers.epoch_start
//!   for batch: step (batch → loss → gradients → update)  → observers.step
//!   validate, pick the best                                → observers.epoch_end → stop?
//! ```
//!
//! The step and the epoch's bookkeeping are the same on every rank of a distributed run;
//! the ranks differ only in which observers run: rank 0 has all of them, the others only
//! early stopping (whose decision, made from the same values, is the same everywhere)
//! and the user's hook.

use std::path::PathBuf;

use indicatif::ProgressBar;

use super::checkpoint::{self, CheckpointConfig, TrainerState};
use super::logs;
use super::{EarlyStopping, FitReport, Optimizer, StepOutput, TargetsOf, TrainableModel};
use crate::error::Result;
use crate::files::PathLock;

/// Whether training goes on after an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Control {
    Continue,
    Stop,
}

/// What an observer sees at the end of an epoch; the epoch's stats are the last entry of
/// `report.epochs`.
pub(super) struct EpochEnd<'a, M> {
    pub epoch: usize,
    pub report: &'a FitReport,
    /// The epoch set a new best of the monitored value.
    pub is_best: bool,
    pub model: &'a M,
    pub optimizer: &'a Optimizer,
}

/// One concern of the training loop.
pub(super) trait Observer<M: TrainableModel> {
    /// Before the first step of `epoch`, which has `steps` steps.
    fn epoch_start(&mut self, _epoch: usize, _steps: usize) {}
    /// After a step that updated the model; `live` is the running summary of the epoch.
    fn step(&mut self, _out: &StepOutput<'_, TargetsOf<M>>, _live: &str) {}
    /// After a step skipped for a non-finite loss or gradient.
    fn step_skipped(&mut self) {}
    /// After the epoch's validation; `Stop` ends training after this epoch.
    fn epoch_end(&mut self, _end: &EpochEnd<'_, M>) -> Result<Control> {
        Ok(Control::Continue)
    }
}

/// The progress bar of each epoch, with the running loss and metrics and the last
/// validation.
pub(super) struct Progress {
    pub make: Box<dyn Fn(u64) -> ProgressBar>,
    pub epochs: usize,
    pub bar: Option<ProgressBar>,
    /// The last validation, shown after the running values.
    pub last_val: String,
}

impl<M: TrainableModel> Observer<M> for Progress {
    fn epoch_start(&mut self, epoch: usize, steps: usize) {
        let bar = (self.make)(steps as u64);
        bar.set_prefix(format!("{}/{}", epoch + 1, self.epochs));
        self.bar = Some(bar);
    }
    fn step(&mut self, _out: &StepOutput<'_, TargetsOf<M>>, live: &str) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
            bar.set_message(format!("{live}{}", self.last_val));
        }
    }
    fn step_skipped(&mut self) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }
    fn epoch_end(&mut self, end: &EpochEnd<'_, M>) -> Result<Control> {
        let Some(stats) = end.report.epochs.last() else {
            return Ok(Control::Continue);
        };
        if let Some(v) = &stats.validation {
            self.last_val = format!(" | val_loss {:.4}", v.loss);
            for (name, value) in &v.metrics {
                self.last_val.push_str(&format!(" {name} {value:.4}"));
            }
        }
        let mut summary = format!("loss {:.4}", stats.train_loss);
        for (name, v) in &stats.train_metrics {
            summary.push_str(&format!(" {name} {v:.4}"));
        }
        if let Some(bar) = self.bar.take() {
            bar.set_message(format!("{summary}{}", self.last_val));
            bar.finish();
        }
        Ok(Control::Continue)
    }
}

/// `metrics.csv`, `metrics.jsonl` and `curves.svg`, rewritten after every epoch under the
/// lock the run holds.
pub(super) struct Logs {
    pub dir: PathBuf,
    pub lock: Option<PathLock>,
}

impl<M: TrainableModel> Observer<M> for Logs {
    fn epoch_end(&mut self, end: &EpochEnd<'_, M>) -> Result<Control> {
        if let Some(lock) = self.lock.take() {
            self.lock = Some(logs::write_logs_locked(
                &self.dir,
                &end.report.epochs,
                lock,
            )?);
        }
        Ok(Control::Continue)
    }
}

/// The checkpoints of [`CheckpointConfig`].
pub(super) struct Checkpoints {
    pub config: CheckpointConfig,
    /// Held for the run: one writer per checkpoint directory.
    pub _lock: PathLock,
}

impl<M: TrainableModel> Observer<M> for Checkpoints {
    fn epoch_end(&mut self, end: &EpochEnd<'_, M>) -> Result<Control> {
        let state = TrainerState {
            history: end.report.epochs.clone(),
            best: end.report.best,
        };
        let extra = end.model.extra_state();
        checkpoint::save_epoch(
            &self.config,
            M::NAME,
            end.epoch,
            end.is_best,
            end.model.state(),
            end.optimizer,
            &state,
            &extra,
        )?;
        Ok(Control::Continue)
    }
}

/// Stops when the monitored value has not improved for `patience` epochs.
pub(super) struct EarlyStop {
    pub config: EarlyStopping,
}

impl<M: TrainableModel> Observer<M> for EarlyStop {
    fn epoch_end(&mut self, end: &EpochEnd<'_, M>) -> Result<Control> {
        if let Some((best_epoch, _)) = end.report.best
            && end.epoch - best_epoch >= self.config.patience
        {
            tracing::info!(epoch = end.epoch, best_epoch, "early stopping");
            return Ok(Control::Stop);
        }
        Ok(Control::Continue)
    }
}

/// The user's step hook ([`Trainer::fit_with_hook`](super::Trainer::fit_with_hook)).
pub(super) struct Hook<'h, T> {
    pub hook: &'h mut dyn FnMut(&StepOutput<'_, T>),
}

impl<M: TrainableModel> Observer<M> for Hook<'_, TargetsOf<M>> {
    fn step(&mut self, out: &StepOutput<'_, TargetsOf<M>>, _live: &str) {
        (self.hook)(out);
    }
}
