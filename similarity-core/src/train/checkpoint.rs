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
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::optim::Optimizer;
use super::{EpochStats, ModelState};
use crate::error::{Error, Result};
use crate::model::{read_json, write_dir_atomically, write_json};

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
}

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

fn write(
    dir: &Path,
    model: &str,
    state: &ModelState,
    optimizer: &Optimizer,
    trainer: &TrainerState,
    extra: &HashMap<String, Tensor>,
) -> Result<()> {
    write_dir_atomically(dir, |tmp| {
        let weights: HashMap<String, Tensor> = state
            .named_trainable_vars()
            .into_iter()
            .map(|(name, var)| (name, var.as_tensor().clone()))
            .collect();
        candle_core::safetensors::save(&weights, tmp.join("weights.safetensors"))?;
        candle_core::safetensors::save(
            &optimizer.state_tensors(),
            tmp.join("optimizer.safetensors"),
        )?;
        if !extra.is_empty() {
            candle_core::safetensors::save(extra, tmp.join("extra.safetensors"))?;
        }
        write_json(
            &tmp.join("state.json"),
            &StateFile {
                format_version: FORMAT_VERSION,
                model: model.to_string(),
                optimizer_steps: optimizer.steps(),
                trainer: trainer.clone(),
            },
        )
    })
}

/// Restores weights and optimiser state; returns the trainer's state and the model's
/// extra state (empty when the checkpoint has none).
pub(super) fn restore(
    dir: &Path,
    model: &str,
    state: &ModelState,
    optimizer: &mut Optimizer,
) -> Result<(TrainerState, HashMap<String, Tensor>)> {
    let dir = &crate::model::resolve_saved_dir(dir);
    let path = dir.join("state.json");
    let file: StateFile = read_json(&path)?;
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
        if !p.exists() {
            return Err(Error::format(&p, "missing from the checkpoint"));
        }
        candle_core::safetensors::load(&p, &Device::Cpu)
            .map_err(|e| Error::format(&p, format!("not a readable safetensors file: {e}")))
    };
    let weights = load("weights.safetensors")?;
    let weights_path = dir.join("weights.safetensors");
    for (name, var) in state.named_trainable_vars() {
        let t = weights
            .get(&name)
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
        var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
    }
    optimizer.load_state(&load("optimizer.safetensors")?, file.optimizer_steps)?;
    let extra = if dir.join("extra.safetensors").exists() {
        load("extra.safetensors")?
    } else {
        HashMap::new()
    };
    Ok((file.trainer, extra))
}
