//! The cloud-FAQ task shared by the `faq` and `bench` examples: the data reader and the
//! models of Quaterion's NLP tutorial.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use similarity_core::prelude::*;

/// The tutorial's model: all-MiniLM-L6-v2, frozen and cached, under the same head and loss.
#[cfg(feature = "transformers")]
#[trainable_model]
pub struct FaqMiniLm {
    #[encoder(cache = "auto")]
    text: Frozen<SentenceTransformer>,
    #[head]
    head: SkipConnectionHead,
    #[loss(scale = 20.0, symmetric = true)]
    loss: MultipleNegativesRankingLoss,
}

/// `FaqMiniLm` at the sharpness of Quaterion's loss: Quaterion's MNRL multiplies its cosine
/// similarity `(1 + cos) / 2` by its scale 20, and a softmax row ignores the constant, so its
/// logits are `10 · cos`. Quality comparisons with Quaterion train this model.
#[cfg(feature = "transformers")]
#[trainable_model]
pub struct FaqMiniLmScale10 {
    #[encoder(cache = "auto")]
    text: Frozen<SentenceTransformer>,
    #[head]
    head: SkipConnectionHead,
    #[loss(scale = 10.0, symmetric = true)]
    loss: MultipleNegativesRankingLoss,
}

/// all-MiniLM-L6-v2 fine-tuned end to end (every weight trainable, never cached) with
/// symmetric MNRL on its own mean-pooled embeddings, as sentence-transformers trains it.
#[cfg(feature = "transformers")]
#[trainable_model]
pub struct FaqFineTune {
    #[encoder]
    text: SentenceTransformer,
    #[head]
    head: EmptyHead,
    #[loss(scale = 20.0, symmetric = true)]
    loss: MultipleNegativesRankingLoss,
}

/// Question → answer retrieval model.
#[trainable_model]
pub struct FaqModel {
    /// Hashed word and character n-grams with a seeded projection; frozen, so its
    /// embeddings are computed once and cached on the model's device.
    #[encoder(cache = "auto")]
    text: HashedNgramEncoder,
    /// Gated residual layer, initialised close to the identity.
    #[head]
    head: SkipConnectionHead,
    /// In-batch negatives, both directions (question → answer and answer → question).
    #[loss(scale = 20.0, symmetric = true)]
    loss: MultipleNegativesRankingLoss,
}

/// The prefix sizes `FaqMatryoshka` trains (of the 384-d embedding).
pub const MATRYOSHKA_DIMS: [usize; 4] = [384, 256, 128, 64];

/// `FaqModel` trained with its loss on the nested prefixes 384, 256, 128 and 64 of the
/// embedding (weights 1), so that it can be served at any of them.
#[trainable_model]
pub struct FaqMatryoshka {
    #[encoder(cache = "auto")]
    text: HashedNgramEncoder,
    #[head]
    head: SkipConnectionHead,
    #[loss(
        dims = MATRYOSHKA_DIMS.to_vec(),
        inner = similarity_core::loss::MultipleNegativesRankingLossConfig {
            scale: 20.0,
            symmetric: true,
            ..Default::default()
        }
    )]
    loss: MatryoshkaLoss<MultipleNegativesRankingLoss>,
}

/// `FaqModel` with batch-hard TripletLoss (cosine distance, margin 0.5) over groups: a
/// question and its answer share a group (one group per distinct answer text).
#[trainable_model]
pub struct FaqTriplet {
    #[encoder(cache = "auto")]
    text: HashedNgramEncoder,
    #[head]
    head: SkipConnectionHead,
    #[loss(mining = TripletMining::Hard)]
    loss: TripletLoss,
}

/// The pairs as group samples: every question, then every distinct answer, in the group
/// of its answer text (so questions with one answer share its group).
pub fn pairs_as_groups(
    pairs: &[SimilarityPairSample<String>],
) -> Vec<SimilarityGroupSample<String>> {
    let mut group_of: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
    let mut answers = Vec::new();
    let mut questions = Vec::with_capacity(pairs.len());
    for p in pairs {
        let next = group_of.len() as i64;
        let g = *group_of.entry(p.obj_b.as_str()).or_insert_with(|| {
            answers.push(SimilarityGroupSample::new(p.obj_b.clone(), next));
            next
        });
        questions.push(SimilarityGroupSample::new(p.obj_a.clone(), g));
    }
    questions.extend(answers);
    questions
}

#[derive(serde::Deserialize)]
struct FaqRow {
    question: String,
    answer: String,
}

/// The directory of the cloud-FAQ data in this repository (under `SIMILARITY_REPO_ROOT`
/// when set: a binary built here and run from a copy of the repository elsewhere).
pub fn data_dir() -> PathBuf {
    std::env::var_os("SIMILARITY_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .join("data/cloud-faq")
}

/// Reads one split (`"train"` or `"val"`) as positive (question, answer) pairs.
pub fn read_split(split: &str) -> Result<Vec<SimilarityPairSample<String>>> {
    read_pairs(&data_dir().join(format!("{split}_cloud_faq_dataset.jsonl.gz")))
}

/// Reads gzipped JSON lines `{"question": ..., "answer": ...}`; errors name file and line.
pub fn read_pairs(path: &Path) -> Result<Vec<SimilarityPairSample<String>>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = std::io::BufReader::new(flate2::read::GzDecoder::new(file));
    let mut pairs = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("{}: line {}", path.display(), i + 1))?;
        let row: FaqRow = serde_json::from_str(&line)
            .with_context(|| format!("{}: line {}", path.display(), i + 1))?;
        pairs.push(SimilarityPairSample::positive(row.question, row.answer));
    }
    Ok(pairs)
}

/// The trainer settings of the tutorial's recipe: batch 1024, Adam.
pub fn trainer_config(
    epochs: usize,
    lr: f64,
    cache_batch_size: usize,
    logs: Option<PathBuf>,
) -> TrainerConfig {
    TrainerConfig {
        epochs,
        batch_size: 1024,
        cache_batch_size,
        optimizer: OptimizerConfig::adam(lr),
        logs_dir: logs,
        ..Default::default()
    }
}
