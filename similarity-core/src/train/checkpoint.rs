//! Checkpoints: everything needed to continue a run exactly.
//!
//! A checkpoint is a directory, written atomically (a crash leaves the previous one):
//!
//! ```text
//! state.json             format version, model type, optimiser steps, per-epoch history, best
//! weights.safetensors    every trainable variable by name (head.*, loss.*, encoders.<f>.<i>)
//! optimizer.safetensors  the optimiser's moments by variable name
//! extra.safetensors      the model's other state (its cross-batch memory), if any
//! ```
//!
//! Under [`CheckpointConfig::dir`] the trainer keeps `last/` (after every epoch),
//! `epoch-NNNN/` every `every_n_epochs` epochs, and `best/` when the monitored value
//! improves (the early-stopping monitor, else `val_loss`, else `train_loss`).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::optim::Optimizer;
use super::{EpochStats, ModelState, TrainableModel};
use crate::error::{Error, Result};
use crate::files;

const FORMAT_VERSION: u32 = 1;

/// Where and when the trainer writes checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointConfig {
    /// Directory holding `last/`, `best/` and `epoch-NNNN/`.
    pub dir: PathBuf,
    /// Keep a checkpoint every this many epochs (0: none besides `last` and `best`).
    pub every_n_epochs: usize,
    /// Keep the checkpoint of the best epoch in `best/`.
    pub save_best: bool,
}

/// The trainer's own state in a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// The epochs run so far.
    pub history: Vec<EpochStats>,
    /// The best monitored value so far and its epoch.
    pub best: Option<(usize, f64)>,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    format_version: u32,
    model: String,
    optimizer_steps: usize,
    trainer: TrainerState,
    /// The tensors of `optimizer.safetensors` (absent in checkpoints of earlier versions).
    #[serde(default)]
    optimizer_tensors: Option<Vec<String>>,
    /// The tensors of `extra.safetensors`, which is written only when there are any
    /// (absent in checkpoints of earlier versions).
    #[serde(default)]
    extra_tensors: Option<Vec<String>>,
}

const STATE: &str = "state.json";
const WEIGHTS: &str = "weights.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const EXTRA: &str = "extra.safetensors";

#[allow(clippy::too_many_arguments)]
pub(super) fn save_epoch(
    config: &CheckpointConfig,
    model: &str,
    epoch: usize,
    is_best: bool,
    state: &ModelState,
    optimizer: &Optimizer,
    trainer: &TrainerState,
    extra: &HashMap<String, Tensor>,
) -> Result<()> {
    // The trainer has checked the weights for this epoch (`first_non_finite_var`) just
    // before: a non-finite model never reaches here.
    let write = |dir: PathBuf| write(&dir, model, state, optimizer, trainer, extra);
    write(config.dir.join("last"))?;
    if config.every_n_epochs > 0 && (epoch + 1).is_multiple_of(config.every_n_epochs) {
        write(config.dir.join(format!("epoch-{:04}", epoch + 1)))?;
    }
    if config.save_best && is_best {
        write(config.dir.join("best"))?;
    }
    Ok(())
}

fn sorted_keys(map: &HashMap<String, Tensor>) -> Vec<String> {
    let mut keys: Vec<String> = map.keys().cloned().collect();
    keys.sort();
    keys
}

fn write(
    dir: &Path,
    model: &str,
    state: &ModelState,
    optimizer: &Optimizer,
    trainer: &TrainerState,
    extra: &HashMap<String, Tensor>,
) -> Result<()> {
    let moments = optimizer.state_tensors()?;
    files::write_dir(dir, files::DirKind::Checkpoint, |tmp| {
        let weights: HashMap<String, Tensor> = state
            .named_trainable_vars()
            .into_iter()
            .map(|(name, var)| (name, var.as_tensor().clone()))
            .collect();
        files::write_tensors(&tmp.join(WEIGHTS), &weights)?;
        files::write_tensors(&tmp.join(OPTIMIZER), &moments)?;
        if !extra.is_empty() {
            files::write_tensors(&tmp.join(EXTRA), extra)?;
        }
        files::write_json(
            &tmp.join(STATE),
            &StateFile {
                format_version: FORMAT_VERSION,
                model: model.to_string(),
                optimizer_steps: optimizer.steps(),
                trainer: trainer.clone(),
                optimizer_tensors: Some(sorted_keys(&moments)),
                extra_tensors: Some(sorted_keys(extra)),
            },
        )
    })
}

/// What a checkpoint directory holds, read from one version of it.
struct Read {
    file: StateFile,
    weights: HashMap<String, Tensor>,
    moments: HashMap<String, Tensor>,
    extra: HashMap<String, Tensor>,
}

fn read(dir: &Path, model: &str) -> Result<Read> {
    let path = dir.join(STATE);
    let file: StateFile = files::read_json(&path)?;
    if file.format_version != FORMAT_VERSION {
        return Err(Error::format(
            &path,
            format!(
                "checkpoint format_version {} is not supported (this library reads {FORMAT_VERSION})",
                file.format_version
            ),
        ));
    }
    if file.model != model {
        return Err(Error::format(
            &path,
            format!(
                "is a checkpoint of a `{}` model, not a `{model}`",
                file.model
            ),
        ));
    }
    let load = |name: &str| -> Result<HashMap<String, Tensor>> {
        let p = dir.join(name);
        if fs::symlink_metadata(&p).is_err() {
            return Err(Error::format(&p, "missing from the checkpoint"));
        }
        files::read_tensors(&p)
    };
    let weights = load(WEIGHTS)?;
    let moments = load(OPTIMIZER)?;
    let extra = match &file.extra_tensors {
        Some(keys) if keys.is_empty() => HashMap::new(),
        Some(keys) => {
            let extra = load(EXTRA)?;
            if sorted_keys(&extra) != *keys {
                return Err(Error::format(
                    dir.join(EXTRA),
                    format!("holds {:?}, state.json lists {keys:?}", sorted_keys(&extra)),
                ));
            }
            extra
        }
        // Written before the list existed: the file is there exactly when there was state.
        None if fs::symlink_metadata(dir.join(EXTRA)).is_ok() => load(EXTRA)?,
        None => HashMap::new(),
    };
    Ok(Read {
        file,
        weights,
        moments,
        extra,
    })
}

/// Restores weights, optimiser state and the model's extra state (its memory); returns
/// the trainer's state. Every tensor is checked (name, dtype, shape, finite values)
/// before anything is set, so a checkpoint that fails to load leaves the model and the
/// optimiser as they were.
pub(super) fn restore<M: TrainableModel>(
    dir: &Path,
    model: &mut M,
    optimizer: &mut Optimizer,
) -> Result<TrainerState> {
    let read = files::read_dir_consistently(dir, |dir| read(dir, M::NAME))?;
    let weights_path = dir.join(WEIGHTS);
    let vars = model.state().named_trainable_vars();
    let mut values = Vec::with_capacity(vars.len());
    for (name, var) in &vars {
        let t = read
            .weights
            .get(name)
            .ok_or_else(|| Error::format(&weights_path, format!("missing variable `{name}`")))?;
        if t.dims() != var.dims() {
            return Err(Error::format(
                &weights_path,
                format!(
                    "variable `{name}` has shape {:?}, the model has {:?}",
                    t.dims(),
                    var.dims()
                ),
            ));
        }
        let t = crate::nn::checked_tensor(&weights_path, name, t)?;
        values.push((var, t.to_dtype(var.dtype())?.to_device(var.device())?));
    }
    if let Some(extra) = read
        .weights
        .keys()
        .find(|k| !vars.iter().any(|(n, _)| n == *k))
    {
        return Err(Error::format(
            &weights_path,
            format!("unexpected variable `{extra}`: the checkpoint is of another model"),
        ));
    }
    // The memory checks everything before it changes; after it nothing can fail.
    let moments = optimizer.checked_state(
        &dir.join(OPTIMIZER),
        &read.moments,
        read.file.optimizer_tensors.as_deref(),
    )?;
    model
        .load_extra_state(&read.extra)
        .map_err(|e| Error::format(dir.join(EXTRA), e.to_string()))?;
    for (var, t) in values {
        var.set(&t)?;
    }
    optimizer.set_state(moments, read.file.optimizer_steps);
    Ok(read.file.trainer)
}
