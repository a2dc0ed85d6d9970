//! The FAQ task end to end (feature `transformers`): Quaterion's NLP tutorial recipe on
//! `data/cloud-faq` with all-MiniLM-L6-v2 frozen and cached.

#[cfg(feature = "transformers")]
use std::time::Instant;

#[cfg(feature = "transformers")]
use anyhow::Context;
use anyhow::{Result, bail};
use serde_json::Value;
#[cfg(feature = "transformers")]
use serde_json::json;
#[cfg(feature = "transformers")]
use similarity_core::prelude::*;

#[cfg(feature = "transformers")]
use crate::common::*;
#[cfg(feature = "transformers")]
use crate::faq_task;

/// Matmul FLOPs of MiniLM's forward pass over `tokens` token positions in sequences of
/// `len` positions: per layer, Q/K/V/output projections `4 · 2H²`, the feed-forward
/// `2 · 2 H I` and attention scores and context `2 · 2 len H` per position.
#[cfg(feature = "transformers")]
pub(crate) fn bert_flops(
    c: &similarity_core::encoder::transformer::BertConfig,
    tokens: f64,
    len: f64,
) -> f64 {
    let (h, i) = (c.hidden_size as f64, c.intermediate_size as f64);
    let per_token = 8.0 * h * h + 4.0 * h * i + 4.0 * len * h;
    tokens * per_token * c.num_hidden_layers as f64
}

/// Matmul FLOPs of one epoch after the cache fill, `(training, validation)`, for
/// `train` and `val` pairs in batches of `batch` pairs, embeddings `d` wide:
///
/// ```text
/// training, per batch of P pairs (2P embeddings): head 2 · 2 · 2P · d² (forward and ∂W:
///                                                the cached encoder output needs no ∂x)
///                                                + symmetric MNRL 3 · 2 · P² · d
/// validation: head forward 2 · 2V · d², the loss forward 2 · P² · d per batch, and the
///             evaluation's distances 2 · V · V · d (each question against every answer)
/// ```
#[cfg(feature = "transformers")]
pub(crate) fn head_and_loss_flops(d: f64, train: usize, val: usize, batch: usize) -> (f64, f64) {
    let batches = |n: usize| step_rows(n, batch).into_iter().map(|p| p as f64);
    let training: f64 = batches(train)
        .map(|p| 2.0 * 2.0 * 2.0 * p * d * d + 3.0 * 2.0 * p * p * d)
        .sum();
    let v = val as f64;
    let validation = 2.0 * 2.0 * v * d * d
        + batches(val).map(|p| 2.0 * p * p * d).sum::<f64>()
        + 2.0 * v * v * d;
    (training, validation)
}

/// all-MiniLM-L6-v2 frozen and cached, SkipConnectionHead, symmetric MNRL, Adam 1e-4,
/// batch 1024, validation after every epoch: what Quaterion's tutorial runs. Timed: the
/// evaluation before training (it fills the validation cache), the fit (training-set
/// cache fill and the epochs), and the whole run; floors from the token counts.
///
/// `--scale 20` (default: `FaqMiniLm`, the scale of sentence-transformers and of our
/// examples) or `--scale 10` (`FaqMiniLmScale10`, the sharpness of Quaterion's loss);
/// `--seed N` seeds the head's initialisation and the batch order (default 0).
#[cfg(feature = "transformers")]
pub(crate) fn faq(epochs: usize) -> Result<Value> {
    let dir = arg("--faq").context("--faq DIR: a sentence-transformers directory")?;
    let seed: u64 = match arg("--seed") {
        Some(s) => s
            .parse()
            .with_context(|| format!("--seed {s}: not an integer"))?,
        None => 0,
    };
    let scale = arg("--scale").unwrap_or_else(|| "20".into());
    let encoder =
        SentenceTransformer::from_pretrained(&dir, &bench_device()?)?.with_normalize(false);
    let options = ModelOptions {
        seed,
        ..model_options()?
    };
    let train = faq_task::read_split("train")?;
    let val = faq_task::read_split("val")?;
    let (flops, epoch_flops) = faq_floors(&encoder, &train, &val)?;
    let data = (&train[..], &val[..]);
    let started = Instant::now();
    let mut out = match scale.as_str() {
        "20" => faq_run(
            faq_task::FaqMiniLm::new(Frozen(encoder), &options)?,
            data,
            epochs,
            seed,
            started,
        )?,
        "10" => faq_run(
            faq_task::FaqMiniLmScale10::new(Frozen(encoder), &options)?,
            data,
            epochs,
            seed,
            started,
        )?,
        other => bail!("--scale {other}: the FAQ models have scale 20 or 10"),
    };
    out["model"] = json!(dir);
    out["mnrl_scale"] = json!(scale.parse::<f64>()?);
    out["seed"] = json!(seed);
    out["fill_floor_gflop"] =
        json!({"train": round(flops[0] / 1e9, 1), "val": round(flops[1] / 1e9, 1)});
    out["epoch_floor_gflop"] = json!({"train": round(epoch_flops.0 / 1e9, 3), "validation": round(epoch_flops.1 / 1e9, 3)});
    Ok(out)
}

/// The matmul FLOPs of the fill (training texts, validation texts: every distinct text
/// once, unpadded) and of one epoch (training, validation).
#[cfg(feature = "transformers")]
fn faq_floors(
    encoder: &SentenceTransformer,
    train: &Pairs,
    val: &Pairs,
) -> Result<([f64; 2], (f64, f64))> {
    let mut flops = [0.0f64; 2];
    for (k, split) in [train, val].iter().enumerate() {
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
    let epoch_flops = head_and_loss_flops(
        encoder.config().hidden_size as f64,
        train.len(),
        val.len(),
        faq_task::trainer_config(1, 1e-4, 1, None).batch_size,
    );
    Ok((flops, epoch_flops))
}

/// The FAQ pairs of one split.
#[cfg(feature = "transformers")]
type Pairs = [SimilarityPairSample<String>];

/// Evaluates on `val`, fits on `train` for `epochs` and evaluates again, timing each part
/// (`started`: when the model began to be built).
#[cfg(feature = "transformers")]
fn faq_run<M>(
    mut model: M,
    (train, val): (&Pairs, &Pairs),
    epochs: usize,
    seed: u64,
    started: Instant,
) -> Result<Value>
where
    M: TrainableModel<Record = String, Loss = MultipleNegativesRankingLoss>,
{
    let t = Trainer::new(TrainerConfig {
        progress: false,
        seed,
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
    let before = t.evaluate(&mut model, val)?;
    let before_s = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let report = t.fit(&mut model, train, Some(val))?;
    let fit_s = start.elapsed().as_secs_f64();
    let after = t.evaluate(&mut model, val)?;
    let total_s = started.elapsed().as_secs_f64();
    let secs: Vec<f64> = report.epochs.iter().map(|e| e.seconds).collect();
    let after_first = &secs[1.min(secs.len() - 1)..];
    let rr = |e: &similarity_core::train::Evaluation| e.metric("mrr").unwrap_or(f64::NAN);
    Ok(json!({
        "workload": "faq",
        "train_pairs": train.len(),
        "val_pairs": val.len(),
        "evaluate_before_s": round(before_s, 3),
        "cache_fill_s": round(report.cache_seconds, 3),
        "mean_epoch_s": round(after_first.iter().sum::<f64>() / after_first.len() as f64, 4),
        "fit_wall_s": round(fit_s, 3),
        "total_s": round(total_s, 3),
        "q_before": {"precision_at_1": round(p1(&before), 4), "mrr": round(rr(&before), 4)},
        "q_after": {"precision_at_1": round(p1(&after), 4), "mrr": round(rr(&after), 4), "val_loss": round(after.loss, 6)},
        "train_loss_last": report.epochs.last().map(|e| round(e.train_loss, 6)),
    }))
}

#[cfg(not(feature = "transformers"))]
pub(crate) fn faq(_epochs: usize) -> Result<Value> {
    bail!(
        "the FAQ workload needs the transformer encoder: cargo run --release --features transformers --example bench -- --faq DIR"
    )
}
