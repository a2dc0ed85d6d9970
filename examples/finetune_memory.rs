//! Peak memory and time of training steps that fine-tune all-MiniLM-L6-v2 end to end,
//! plain against GradCache (`TrainerConfig::grad_cache`), on cloud-FAQ pairs.
//!
//! ```text
//! bash scripts/fetch-minilm.sh
//! cargo run --release --features transformers --example finetune_memory -- \
//!     target/models/all-MiniLM-L6-v2 --pairs 64 [--grad-cache 16]
//! ```
//!
//! Trains one epoch over the first `--pairs` training pairs in batches of `--batch`
//! (default: all of them, one step), with no validation, and prints the seconds per step
//! and the process's peak resident memory (`VmHWM` of `/proc/self/status`), which is
//! dominated by the autograd graph of the batch: the whole batch's in the plain step, one
//! mini-batch's with GradCache. Measured results: docs/beyond.md.

#[path = "common/faq_task.rs"]
#[allow(dead_code)]
mod faq_task;

use std::time::Instant;

use anyhow::{Context, Result};
use faq_task::{FaqFineTune, read_split};
use similarity_core::prelude::*;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// The peak resident set size of this process, in MiB (Linux).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn main() -> Result<()> {
    let dir = std::env::args()
        .nth(1)
        .context("usage: finetune_memory MODEL_DIR [--pairs N] [--batch B] [--grad-cache M]")?;
    let pairs: usize = arg("--pairs").map(|v| v.parse()).transpose()?.unwrap_or(64);
    let batch: usize = arg("--batch")
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(pairs);
    let grad_cache: Option<usize> = arg("--grad-cache").map(|v| v.parse()).transpose()?;
    let train = read_split("train")?;
    let train = &train[..pairs.min(train.len())];
    let encoder = SentenceTransformer::from_pretrained_trainable(&dir, &Device::Cpu)?;
    let mut model = FaqFineTune::new(encoder, &ModelOptions::default())?;
    let before = peak_rss_mib();
    let config = TrainerConfig {
        epochs: 1,
        batch_size: batch,
        optimizer: OptimizerConfig::adam(2e-5),
        progress: false,
        grad_cache,
        ..Default::default()
    };
    let started = Instant::now();
    let report = Trainer::new(config).fit(&mut model, train, None)?;
    let seconds = started.elapsed().as_secs_f64();
    let steps = train.len().div_ceil(batch);
    println!(
        "{} pairs, batch {batch}, grad_cache {grad_cache:?}: {steps} steps, {:.1} s per step, \
         train loss {:.4}, peak RSS {:.0} MiB (after loading: {:.0} MiB)",
        train.len(),
        seconds / steps as f64,
        report.epochs[0].train_loss,
        peak_rss_mib().unwrap_or(f64::NAN),
        before.unwrap_or(f64::NAN),
    );
    Ok(())
}
