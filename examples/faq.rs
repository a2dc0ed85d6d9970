//! The main job: question → answer retrieval on the cloud-FAQ pairs, the task of
//! Quaterion's NLP tutorial, with the built-in hashed n-gram encoder (no download).
//!
//! ```text
//! cargo run --release --example faq [-- --epochs 50 --lr 3e-3 --out target/faq-model]
//! bash scripts/fetch-minilm.sh && cargo run --release --features transformers --example faq \
//!     -- --minilm target/models/all-MiniLM-L6-v2      # Quaterion's tutorial recipe
//! ```
//!
//! With `--minilm DIR` the encoder is all-MiniLM-L6-v2 (frozen, cached, raw embeddings)
//! and the defaults become the tutorial's: Adam 1e-4, 500 epochs of batch 1024
//! (`--cache-batch N` sets the cache fill's batch, default 1,024; the encoder sorts it by
//! token count and runs it in chunks of at most 2,048 token positions, one chunk per
//! core). Measured over the full validation set (release, 2-core machine, 2026-11-28; the
//! same recipe as `bench -- --faq DIR`, whose JSON gives the timings): precision@1 0.6498
//! → 0.6920, MRR 0.7349 → 0.7729; the validation texts are embedded in 12.5 to 13.1 s by
//! the first evaluation, the training texts in 36 to 38 s, then 0.21 to 0.23 s per epoch
//! with validation.
//! Quaterion's tutorial reports 0.700 / 0.777 from its validation loop, which ranks within
//! each validation batch of 1,024 pairs, not from this full-set ranking.
//!
//! 1. Reads 6,476 training and 2,159 validation pairs from `data/cloud-faq`.
//! 2. Builds `FaqModel`: a frozen `HashedNgramEncoder` (384-d, cached), a
//!    `SkipConnectionHead` and a symmetric `MultipleNegativesRankingLoss` (scale 20).
//! 3. Scores the validation set before training: every one of the 2,159 questions is
//!    ranked against all 2,159 answers; precision@1 and mean reciprocal rank.
//! 4. Trains (batch 1024, Adam, lr 3e-3, 50 epochs), validating after each epoch, then
//!    scores again.
//!    Per-epoch metrics go to `target/faq-logs/` (`metrics.csv`, `metrics.jsonl`,
//!    `curves.svg`).
//! 5. Scores the validation set as served at 384, 256, 128 and 64 dimensions (prefix,
//!    L2-normalised) and as int8 codes (calibrated on the first 1,024 training pairs) and
//!    packed sign bits (Hamming), and writes the quantised answer embeddings to
//!    `target/faq-export/` (`answers.{f32,int8,binary}.npy`, `answers.{int8,binary}.jsonl`).
//! 6. Saves the servable model, loads it back, checks that it embeds exactly as before,
//!    and answers three validation questions with their nearest answers.
//!
//! Options of the capabilities in docs/beyond.md (measured results there):
//! * `--matryoshka`: `FaqMatryoshka`, the same model trained with `MatryoshkaLoss` over
//!   the prefixes 384, 256, 128 and 64;
//! * `--hard-negatives K [--mine-every N]`: `TrainerConfig::hard_negatives`, K mined
//!   negatives per question every N epochs (default 5), with one pass timed first;
//! * `--triplet [--hard-negatives K]`: `FaqTriplet`, batch-hard TripletLoss on the pairs
//!   as groups (a question and its answer share one), class-balanced batches of 512
//!   groups × 2, 50 epochs; with K, every object's K hardest objects of other groups
//!   join its batch (mined every `--mine-every` epochs);
//! * `--minilm DIR --finetune [--train-pairs N] [--grad-cache M]`: all-MiniLM-L6-v2
//!   fine-tuned end to end (`FaqFineTune`: no head, symmetric MNRL, Adam 2e-5, one epoch
//!   of batch 64 by default), GradCache mini-batches of M;
//! * `--batch B`, `--logs DIR` (default `target/faq-logs`), `--out DIR`.
//!
//! Measured output (release build, 2-core machine, defaults): see README.md.
//!
//! Across processes (feature `mpi`, Open MPI): every rank trains on its share of each
//! global batch of 1024 and ends with the same model; rank 0 prints, logs and saves.
//!
//! ```text
//! cargo build --release --features mpi --example faq
//! mpirun -np 2 target/release/examples/faq --mpi
//! ```

#[path = "common/faq_task.rs"]
mod faq_task;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, ensure};
#[cfg(feature = "transformers")]
use faq_task::{FaqFineTune, FaqMiniLm};
use faq_task::{FaqMatryoshka, FaqModel, FaqTriplet, MATRYOSHKA_DIMS, pairs_as_groups, read_split};
use similarity_core::distributed::{self, Communicator};
use similarity_core::loss::{LossKind, PairKind};
use similarity_core::prelude::*;
use similarity_core::train::hard_negatives::{self, HardNegatives};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// `MPI_COMM_WORLD`, with `--mpi`.
#[cfg(feature = "mpi")]
fn mpi_world() -> Result<Arc<dyn Communicator>> {
    Ok(distributed::Mpi::init()?)
}

#[cfg(not(feature = "mpi"))]
fn mpi_world() -> Result<Arc<dyn Communicator>> {
    anyhow::bail!(
        "--mpi needs the MPI engine: cargo build --release --features mpi --example faq, then \
         mpirun -np 2 target/release/examples/faq --mpi"
    )
}

fn has_flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

fn main() -> Result<()> {
    let comm = if has_flag("--mpi") {
        mpi_world()?
    } else {
        distributed::single()
    };
    let train = read_split("train")?;
    let val = read_split("val")?;
    if comm.rank() == 0 {
        println!(
            "cloud-faq: {} training pairs, {} validation pairs",
            train.len(),
            val.len()
        );
        if comm.world_size() > 1 {
            println!(
                "{} ranks ({}): each embeds its share of every batch",
                comm.world_size(),
                comm.backend()
            );
        }
    }
    let out = PathBuf::from(arg("--out").unwrap_or_else(|| "target/faq-model".into()));
    match arg("--minilm") {
        None if has_flag("--triplet") => run_triplet(&train, &val),
        None if has_flag("--matryoshka") => {
            let model =
                FaqMatryoshka::new(HashedNgramEncoder::default(), &ModelOptions::default())?;
            run(model, &train, &val, &out, 50, 3e-3, comm)
        }
        None => {
            let model = FaqModel::new(HashedNgramEncoder::default(), &ModelOptions::default())?;
            run(model, &train, &val, &out, 50, 3e-3, comm)
        }
        #[cfg(feature = "transformers")]
        Some(dir) if has_flag("--finetune") => {
            // End to end: every weight of the encoder trains, no head, no cache;
            // sentence-transformers' learning rate, one epoch of batch 64.
            let encoder = SentenceTransformer::from_pretrained_trainable(&dir, &Device::Cpu)?;
            let model = FaqFineTune::new(encoder, &ModelOptions::default())?;
            let pairs: usize = arg("--train-pairs")
                .map(|e| e.parse())
                .transpose()?
                .unwrap_or(train.len())
                .min(train.len());
            run(model, &train[..pairs], &val, &out, 1, 2e-5, comm)
        }
        #[cfg(feature = "transformers")]
        Some(dir) => {
            // The tutorial's recipe: the sentence encoder frozen and cached, raw (not
            // L2-normalised) embeddings, Adam 1e-4, 500 epochs of batch 1024.
            let encoder =
                SentenceTransformer::from_pretrained(&dir, &Device::Cpu)?.with_normalize(false);
            let model = FaqMiniLm::new(Frozen(encoder), &ModelOptions::default())?;
            run(model, &train, &val, &out, 500, 1e-4, comm)
        }
        #[cfg(not(feature = "transformers"))]
        Some(_) => anyhow::bail!(
            "--minilm needs the transformer encoder: cargo run --release --features transformers --example faq -- --minilm DIR"
        ),
    }
}

fn run<M>(
    mut model: M,
    train: &[SimilarityPairSample<String>],
    val: &[SimilarityPairSample<String>],
    out: &Path,
    default_epochs: usize,
    default_lr: f64,
    comm: Arc<dyn Communicator>,
) -> Result<()>
where
    M: TrainableModel<Record = String>,
    M::Loss: SimilarityLoss<Kind = PairKind>,
{
    let started = Instant::now();
    let epochs: usize = arg("--epochs")
        .map(|e| e.parse())
        .transpose()?
        .unwrap_or(default_epochs);
    let lr: f64 = arg("--lr")
        .map(|e| e.parse())
        .transpose()?
        .unwrap_or(default_lr);
    let cache_batch_size: usize = arg("--cache-batch")
        .map(|e| e.parse())
        .transpose()?
        .unwrap_or(if has_flag("--finetune") {
            // Evaluating through a trainable encoder keeps the batch's graph.
            64
        } else {
            TrainerConfig::default().cache_batch_size
        });
    let default_batch = if has_flag("--finetune") { 64 } else { 1024 };
    let batch_size: usize = arg("--batch")
        .map(|e| e.parse())
        .transpose()?
        .unwrap_or(default_batch);
    let grad_cache: Option<usize> = arg("--grad-cache").map(|e| e.parse()).transpose()?;
    let hard_negatives = hard_negatives_option()?;
    if let Some(options) = &hard_negatives {
        mining_cost(&model, train, options)?;
    }
    let trainer = Trainer::new(TrainerConfig {
        batch_size,
        grad_cache,
        hard_negatives,
        ..faq_task::trainer_config(
            epochs,
            lr,
            cache_batch_size,
            Some(PathBuf::from(
                arg("--logs").unwrap_or_else(|| "target/faq-logs".into()),
            )),
        )
    })
    .with_communicator(comm.clone());
    let lead = comm.rank() == 0;

    let before = trainer.evaluate(&mut model, val)?;
    let p1 = |e: &similarity_core::train::Evaluation| e.metric("precision@1").unwrap_or(f64::NAN);
    let rr = |e: &similarity_core::train::Evaluation| e.metric("mrr").unwrap_or(f64::NAN);
    if lead {
        println!(
            "before training: precision@1 {:.4}  MRR {:.4}  (each of {} questions ranked against all {} answers)",
            p1(&before),
            rr(&before),
            val.len(),
            val.len()
        );
    }

    let report = trainer.fit(&mut model, train, Some(val))?;
    let train_seconds: f64 = report.epochs.iter().map(|e| e.seconds).sum();
    let after = trainer.evaluate(&mut model, val)?;
    if !lead {
        // Every rank holds the same model; rank 0 reports and saves it.
        return Ok(());
    }
    println!(
        "after {epochs} epochs:  precision@1 {:.4}  MRR {:.4}  (train loss {:.4}, val loss {:.4})",
        p1(&after),
        rr(&after),
        report.epochs.last().map_or(f64::NAN, |e| e.train_loss),
        after.loss,
    );
    println!(
        "cache fill {:.2} s, {:.3} s per epoch (validation included)",
        report.cache_seconds,
        train_seconds / epochs as f64
    );
    mining_report(&report);

    compression_report(&model, train, val, cache_batch_size)?;

    model.save(out)?;
    let served = M::load(out, &Device::Cpu)?;
    let answers: Vec<String> = val.iter().map(|p| p.obj_b.clone()).collect();
    let original = model.encode(&answers, cache_batch_size)?;
    let reloaded = served.encode(&answers, cache_batch_size)?;
    let max_diff = (original - &reloaded)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    ensure!(
        max_diff == 0.0,
        "reloaded model embeds differently: max |Δ| = {max_diff}"
    );
    println!(
        "saved to {}, reloaded: identical embeddings for all {} answers",
        out.display(),
        answers.len()
    );

    for sample in [&val[0], &val[700], &val[1500]] {
        let q = served.encode(std::slice::from_ref(&sample.obj_a), 1)?;
        let d = Distance::Cosine
            .distance_matrix(&q, Some(&reloaded))?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        let best = (0..d.len())
            .min_by(|&a, &b| d[a].total_cmp(&d[b]))
            .unwrap_or(0);
        println!("\nQ: {}\nA: {}", sample.obj_a, answers[best]);
        println!(
            "   ({})",
            if answers[best] == sample.obj_b {
                "the reference answer"
            } else {
                "not the reference answer"
            }
        );
    }
    println!("\ntotal {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Scores the validation set as served at each Matryoshka prefix size and as int8 and
/// binary codes (calibrated on the training texts' embeddings), next to the float
/// embeddings, and writes the quantised answer embeddings to `target/faq-export/`.
/// Encodes `encode_batch` texts at a time: a trainable encoder keeps the graph of a whole
/// batch while it runs, so a large batch costs memory there.
fn compression_report<M>(
    model: &M,
    train: &[SimilarityPairSample<String>],
    val: &[SimilarityPairSample<String>],
    encode_batch: usize,
) -> Result<()>
where
    M: TrainableModel<Record = String>,
    M::Loss: SimilarityLoss<Kind = PairKind>,
{
    use similarity_core::metric::{Evaluator, Metric};
    use similarity_core::model::quantize::{Int8Calibration, quantize_binary};

    // Questions then answers, the pair kind's slot-major layout.
    let objects: Vec<String> = val
        .iter()
        .map(|p| p.obj_a.clone())
        .chain(val.iter().map(|p| p.obj_b.clone()))
        .collect();
    let embeddings = model.encode(&objects, encode_batch)?;
    let metas = similarity_core::data::metas(val)?;
    let relevance = PairKind::relevance(&metas);
    let metrics = PairKind::metrics();
    let metrics: Vec<&dyn Metric> = metrics.iter().map(|m| m.as_ref()).collect();
    let distance = model.loss().distance();
    let evaluator = Evaluator::new(distance);
    let show = |scores: &[(String, f64)]| {
        scores
            .iter()
            .map(|(name, v)| format!("{name} {v:.4}"))
            .collect::<Vec<_>>()
            .join("  ")
    };
    let dims: Vec<usize> = MATRYOSHKA_DIMS
        .into_iter()
        .filter(|&d| d <= embeddings.dim(1).unwrap_or(0))
        .collect();
    for (dim, scores) in
        evaluator.evaluate_prefixes(&embeddings, &relevance.as_relevance(), &metrics, &dims)?
    {
        println!("served at {dim:>3} dims:   {}", show(&scores));
    }

    // A sample of the corpus calibrates (sentence-transformers' advice): the first 1,024
    // training pairs, both sides.
    let calibration_texts: Vec<String> = train
        .iter()
        .take(1024)
        .flat_map(|p| [p.obj_a.clone(), p.obj_b.clone()])
        .collect();
    let calibration = Int8Calibration::fit(&model.encode(&calibration_texts, encode_batch)?)?;
    let int8 = calibration.quantize(&embeddings)?;
    let binary = quantize_binary(&embeddings)?;
    let device = embeddings.device();
    let float_scores = evaluator.evaluate(&embeddings, &relevance.as_relevance(), &metrics)?;
    let int8_scores = evaluator.evaluate(
        &int8.to_tensor(device)?,
        &relevance.as_relevance(),
        &metrics,
    )?;
    let binary_scores = Evaluator::new(Distance::DotProduct).evaluate(
        &binary.signs(device)?,
        &relevance.as_relevance(),
        &metrics,
    )?;
    let d = embeddings.dim(1)?;
    println!("float32 ({:>4} B/vector): {}", 4 * d, show(&float_scores));
    println!("int8    ({:>4} B/vector): {}", d, show(&int8_scores));
    println!(
        "binary  ({:>4} B/vector): {}  (Hamming)",
        binary.bytes_per_row(),
        show(&binary_scores)
    );

    // The answers, as a vector database would take them.
    let dir = PathBuf::from("target/faq-export");
    std::fs::create_dir_all(&dir)?;
    let n = val.len();
    let answers = embeddings.narrow(0, n, n)?;
    let ids: Vec<u64> = (0..n as u64).collect();
    let payloads: Vec<serde_json::Value> = val
        .iter()
        .map(|p| serde_json::json!({ "answer": p.obj_b }))
        .collect();
    similarity_core::model::write_npy(&dir.join("answers.f32.npy"), &answers)?;
    let answers_int8 = calibration.quantize(&answers)?;
    answers_int8.write_npy(&dir.join("answers.int8.npy"))?;
    answers_int8.write_points_jsonl(&dir.join("answers.int8.jsonl"), &ids, Some(&payloads))?;
    let answers_binary = quantize_binary(&answers)?;
    answers_binary.write_npy(&dir.join("answers.binary.npy"))?;
    answers_binary.write_points_jsonl(&dir.join("answers.binary.jsonl"), &ids, Some(&payloads))?;
    println!("quantised answer embeddings written to {}", dir.display());
    Ok(())
}

/// The trainer's mining passes, from the report's epochs.
fn mining_report(report: &similarity_core::train::FitReport) {
    let passes: Vec<_> = report
        .epochs
        .iter()
        .filter_map(|e| e.mining.as_ref())
        .collect();
    if passes.is_empty() {
        return;
    }
    let mean = |f: fn(&hard_negatives::MiningStats) -> f64| {
        passes.iter().map(|m| f(m)).sum::<f64>() / passes.len() as f64
    };
    println!(
        "hard negatives in training: {} passes, {:.3} s each ({:.3} s of it scoring and \
         selecting), {:.0} negatives found per pass",
        passes.len(),
        mean(|m| m.seconds),
        mean(|m| m.mine_seconds),
        mean(|m| m.negatives as f64)
    );
}

/// `--hard-negatives K [--mine-every N]`.
fn hard_negatives_option() -> Result<Option<HardNegatives>> {
    arg("--hard-negatives")
        .map(|k| -> Result<HardNegatives> {
            Ok(HardNegatives {
                num_negatives: k.parse()?,
                every_epochs: arg("--mine-every")
                    .map(|e| e.parse())
                    .transpose()?
                    .unwrap_or(5),
                ..Default::default()
            })
        })
        .transpose()
}

/// `--triplet`: `FaqTriplet` on the training pairs as groups, class-balanced batches,
/// with `--hard-negatives K` mined objects of other groups joining each batch; scored
/// like the pair models (every validation question against all validation answers).
fn run_triplet(
    train: &[SimilarityPairSample<String>],
    val: &[SimilarityPairSample<String>],
) -> Result<()> {
    use similarity_core::metric::{Evaluator, Metric};

    let started = Instant::now();
    let epochs: usize = arg("--epochs")
        .map(|e| e.parse())
        .transpose()?
        .unwrap_or(50);
    let lr: f64 = arg("--lr").map(|e| e.parse()).transpose()?.unwrap_or(3e-3);
    let groups = pairs_as_groups(train);
    println!(
        "triplet: {} training objects ({} questions, {} distinct answers) as groups",
        groups.len(),
        train.len(),
        groups.len() - train.len()
    );
    let hard_negatives = hard_negatives_option()?;
    let mut model = FaqTriplet::new(HashedNgramEncoder::default(), &ModelOptions::default())?;
    let objects: Vec<String> = val
        .iter()
        .map(|p| p.obj_a.clone())
        .chain(val.iter().map(|p| p.obj_b.clone()))
        .collect();
    let relevance = PairKind::relevance(&similarity_core::data::metas(val)?);
    let metrics = PairKind::metrics();
    let metrics: Vec<&dyn Metric> = metrics.iter().map(|m| m.as_ref()).collect();
    let evaluator = Evaluator::new(model.loss().distance());
    let score = |model: &FaqTriplet| -> Result<String> {
        let scores = evaluator.evaluate(
            &model.encode(&objects, 1024)?,
            &relevance.as_relevance(),
            &metrics,
        )?;
        Ok(scores
            .iter()
            .map(|(name, v)| format!("{name} {v:.4}"))
            .collect::<Vec<_>>()
            .join("  "))
    };
    println!("before training: {}", score(&model)?);
    let trainer = Trainer::new(TrainerConfig {
        sampler: Sampler::ClassBalanced { m: 2 },
        hard_negatives,
        ..faq_task::trainer_config(epochs, lr, 1024, None)
    });
    let report = trainer.fit(&mut model, &groups, None)?;
    let train_seconds: f64 = report.epochs.iter().map(|e| e.seconds).sum();
    println!(
        "after {epochs} epochs:  {}  (train loss {:.4})",
        score(&model)?,
        report.epochs.last().map_or(f64::NAN, |e| e.train_loss)
    );
    println!(
        "cache fill {:.2} s, {:.3} s per epoch (mining included)",
        report.cache_seconds,
        train_seconds / epochs as f64
    );
    mining_report(&report);
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Times one mining pass over the training set as the model is now (the trainer repeats
/// it every `every_epochs` epochs, from the cache through the head).
fn mining_cost<M>(
    model: &M,
    train: &[SimilarityPairSample<String>],
    options: &HardNegatives,
) -> Result<()>
where
    M: TrainableModel<Record = String>,
    M::Loss: SimilarityLoss<Kind = PairKind>,
{
    let started = Instant::now();
    let questions: Vec<String> = train.iter().map(|p| p.obj_a.clone()).collect();
    let answers: Vec<String> = train.iter().map(|p| p.obj_b.clone()).collect();
    let (q, a) = (
        model.encode(&questions, 1024)?,
        model.encode(&answers, 1024)?,
    );
    let embed_seconds = started.elapsed().as_secs_f64();
    let mined = hard_negatives::mine(&q, &a, model.loss().distance(), options)?;
    let found: usize = mined.negatives.iter().map(Vec::len).sum();
    println!(
        "hard negatives: one pass over {} pairs mines {found} negatives in {:.3} s \
         ({} candidates skipped by the guard; embedding the texts here {:.2} s)",
        train.len(),
        mined.seconds,
        mined.guarded,
        embed_seconds
    );
    Ok(())
}
