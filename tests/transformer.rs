//! The `SentenceTransformer` encoder (feature `transformers`) on all-MiniLM-L6-v2:
//! parity with Hugging Face `transformers`, gradients reach every weight, fine-tuning
//! lowers the loss, save → load is exact.
//!
//! The model is not in the repository: `bash scripts/fetch-minilm.sh` downloads it into
//! `target/models/all-MiniLM-L6-v2` (or set `SIMILARITY_MINILM_DIR`).

mod common;

use std::sync::OnceLock;

use similarity_core::candle_core::{Device, Tensor};
use similarity_core::encoder::{TransformerBatch, encode_all};
use similarity_core::nn::Mode;
use similarity_core::prelude::*;

fn frozen() -> &'static SentenceTransformer {
    static ENC: OnceLock<SentenceTransformer> = OnceLock::new();
    ENC.get_or_init(|| {
        SentenceTransformer::from_pretrained(common::minilm_dir(), &Device::Cpu).unwrap()
    })
}

struct Reference {
    sentences: Vec<String>,
    input_ids: Vec<Vec<u32>>,
    attention_mask: Vec<Vec<f32>>,
    mean_pooled: Vec<Vec<f32>>,
    embeddings: Vec<Vec<f32>>,
}

fn reference() -> Reference {
    let path = common::repo_root().join("data/minilm_reference.json");
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("data/minilm_reference.json")).unwrap();
    let mat = |k: &str| -> Vec<Vec<f64>> { serde_json::from_value(v[k].clone()).unwrap() };
    let to32 = |m: Vec<Vec<f64>>| -> Vec<Vec<f32>> {
        m.into_iter()
            .map(|r| r.into_iter().map(|x| x as f32).collect())
            .collect()
    };
    Reference {
        sentences: serde_json::from_value(v["sentences"].clone()).unwrap(),
        input_ids: serde_json::from_value(v["input_ids"].clone()).unwrap(),
        attention_mask: to32(mat("attention_mask")),
        mean_pooled: to32(mat("mean_pooled")),
        embeddings: to32(mat("embeddings")),
    }
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

fn embed(enc: &impl Encoder<Input = String>, texts: &[String]) -> Vec<Vec<f32>> {
    let refs: Vec<&String> = texts.iter().collect();
    encode_all(enc, &refs, 16, &Device::Cpu)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

#[test]
fn matches_the_hugging_face_reference() {
    let r = reference();
    let enc = frozen();
    assert_eq!(enc.embedding_size(), 384);
    assert!(enc.normalize(), "modules.json lists Normalize");
    assert_eq!(enc.max_seq_length(), 256);

    let refs: Vec<&String> = r.sentences.iter().collect();
    let batch: TransformerBatch = enc.collate(&refs, &Device::Cpu).unwrap();
    assert_eq!(batch.input_ids().to_vec2::<u32>().unwrap(), r.input_ids);
    assert_eq!(
        batch.attention_mask().to_vec2::<f32>().unwrap(),
        r.attention_mask
    );

    let got = enc
        .forward(&batch, &mut Mode::Eval)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let diff = max_abs_diff(&got, &r.embeddings);
    println!("max |Δ| normalised embeddings: {diff:e}");
    assert!(diff < 1e-4, "max abs diff {diff}");

    let raw = enc.clone().with_normalize(false);
    let pooled = raw
        .forward(&batch, &mut Mode::Eval)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let diff = max_abs_diff(&pooled, &r.mean_pooled);
    println!("max |Δ| mean-pooled: {diff:e}");
    assert!(diff < 1e-4, "max abs diff {diff}");

    // Padding does not change a text's embedding: one at a time gives the same.
    let single = embed(enc, &r.sentences[..1]);
    assert!(max_abs_diff(&single, &r.embeddings[..1]) < 1e-4);
}

#[test]
fn long_texts_are_truncated_to_max_seq_length() {
    let enc = frozen().clone().with_max_seq_length(16).unwrap();
    let long = "word ".repeat(100);
    let ids = enc.tokenize(&[&long]).unwrap();
    assert_eq!(ids[0].len(), 16);
    assert_eq!((ids[0][0], ids[0][15]), (101, 102), "[CLS] … [SEP] kept");
    let e = embed(&enc, &[long]);
    assert_eq!(e[0].len(), 384);
    assert!(frozen().clone().with_max_seq_length(513).is_err());
}

#[test]
fn every_trainable_weight_receives_a_gradient() {
    let enc =
        SentenceTransformer::from_pretrained_trainable(common::minilm_dir(), &Device::Cpu).unwrap();
    let vars = enc.trainable_vars();
    // 5 embedding tensors and 16 per layer.
    assert_eq!(vars.len(), 5 + 16 * enc.config().num_hidden_layers);
    assert!(frozen().trainable_vars().is_empty());

    let texts = [
        "reset my password".to_string(),
        "how much does storage cost?".to_string(),
        "a".to_string(),
    ];
    let refs: Vec<&String> = texts.iter().collect();
    let batch = enc.collate(&refs, &Device::Cpu).unwrap();
    let e = enc.forward(&batch, &mut Mode::Eval).unwrap();
    // A fixed, asymmetric target: loss = Σ_ij (e eᵀ)_ij · w_ij + Σ e · r.
    let w = Tensor::new(
        &[[0.0f32, 1.0, -0.5], [0.3, 0.0, 0.7], [-1.0, 0.2, 0.0]],
        &Device::Cpu,
    )
    .unwrap();
    let r = Tensor::arange(0f32, (3 * 384) as f32, &Device::Cpu)
        .unwrap()
        .reshape((3, 384))
        .unwrap()
        .affine(0.37, 0.0)
        .unwrap()
        .sin()
        .unwrap();
    let loss = ((e.matmul(&e.t().unwrap()).unwrap() * w)
        .unwrap()
        .sum_all()
        .unwrap()
        + (e * r).unwrap().sum_all().unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    common::assert_every_var_has_a_gradient(
        &grads,
        enc.named_vars().iter().map(|(n, v)| (n.clone(), v)),
    );
}

#[trainable_model]
struct FineTuned {
    #[encoder]
    text: SentenceTransformer,
    #[head(n_layers = 1)]
    head: SkipConnectionHead,
    #[loss(scale = 20.0, symmetric = true)]
    loss: MultipleNegativesRankingLoss,
}

fn pairs() -> Vec<SimilarityPairSample<String>> {
    [
        ("resize a disk", "grow the volume"),
        ("reset password", "recover account access"),
        ("storage price", "cost per gigabyte"),
        ("delete a vm", "remove the instance"),
        ("open a port", "firewall rule"),
        ("dns records", "name server zone"),
    ]
    .iter()
    .map(|(a, b)| SimilarityPairSample::positive(a.to_string(), b.to_string()))
    .collect()
}

#[test]
fn fine_tuning_lowers_the_loss_and_the_model_round_trips() {
    let enc = SentenceTransformer::from_pretrained_trainable(common::minilm_dir(), &Device::Cpu)
        .unwrap()
        .with_max_seq_length(16)
        .unwrap();
    let mut model = FineTuned::new(enc, &ModelOptions::default()).unwrap();
    let n_enc = 5 + 16 * 6;
    // Head (1 layer: weight, bias, gate) plus every encoder weight.
    assert!(model.state().trainable_vars().len() > n_enc);
    let weight_of = |m: &FineTuned| -> Vec<f32> {
        let (_, var) = m
            .text
            .named_vars()
            .iter()
            .find(|(n, _)| n == "encoder.layer.0.attention.self.query.weight")
            .unwrap();
        var.as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let before = weight_of(&model);
    let data = pairs();
    let config = TrainerConfig {
        epochs: 4,
        batch_size: data.len(),
        optimizer: OptimizerConfig::adam(1e-4),
        progress: false,
        ..Default::default()
    };
    let report = Trainer::new(config).fit(&mut model, &data, None).unwrap();
    let losses: Vec<f64> = report.epochs.iter().map(|e| e.train_loss).collect();
    println!("fine-tuning losses: {losses:?}");
    assert!(
        losses.last().unwrap() < &(0.8 * losses[0]),
        "loss did not fall: {losses:?}"
    );
    assert_ne!(
        before,
        weight_of(&model),
        "the encoder itself was fine-tuned"
    );

    let texts: Vec<String> = data.iter().map(|p| p.obj_a.clone()).collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model");
    model.save(&path).unwrap();
    let loaded = FineTuned::load(&path, &Device::Cpu).unwrap();
    assert_eq!(
        model.encode(&texts, 4).unwrap().to_vec2::<f32>().unwrap(),
        loaded.encode(&texts, 4).unwrap().to_vec2::<f32>().unwrap()
    );
}

#[test]
fn save_then_load_gives_identical_embeddings() {
    let r = reference();
    let enc = Frozen(frozen().clone());
    let dir = tempfile::tempdir().unwrap();
    enc.save(dir.path()).unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "1_Pooling/config.json",
        "modules.json",
    ] {
        assert!(dir.path().join(f).is_file(), "{f} not written");
    }
    let loaded = <Frozen<SentenceTransformer>>::load(dir.path(), &Device::Cpu).unwrap();
    assert!(loaded.inner().normalize());
    assert_eq!(embed(&enc, &r.sentences), embed(&loaded, &r.sentences));
}

#[test]
fn missing_or_corrupt_files_are_named() {
    let src = common::minilm_dir();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("1_Pooling")).unwrap();
    for f in ["config.json", "tokenizer.json", "1_Pooling/config.json"] {
        std::fs::copy(src.join(f), d.join(f)).unwrap();
    }
    let err = SentenceTransformer::from_pretrained(d, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");

    std::fs::write(d.join("model.safetensors"), b"not safetensors").unwrap();
    let err = SentenceTransformer::from_pretrained(d, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");

    std::fs::write(d.join("tokenizer.json"), b"{").unwrap();
    let err = SentenceTransformer::from_pretrained(d, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tokenizer.json"), "{err}");

    std::fs::remove_file(d.join("1_Pooling/config.json")).unwrap();
    let err = SentenceTransformer::from_pretrained(d, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("1_Pooling"), "{err}");
}

/// A temporary directory with MiniLM's tokenizer, pooling and modules files and `extra`
/// (the test writes whatever else it changes).
fn minilm_copy(extra: &[&str]) -> tempfile::TempDir {
    let src = common::minilm_dir();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("1_Pooling")).unwrap();
    for f in ["tokenizer.json", "1_Pooling/config.json", "modules.json"]
        .iter()
        .chain(extra)
    {
        std::fs::copy(src.join(f), d.join(f)).unwrap();
    }
    dir
}

#[test]
fn a_bert_prefix_on_weight_names_is_accepted() {
    let src = common::minilm_dir();
    let dir = minilm_copy(&["config.json"]);
    let d = dir.path();
    let weights = similarity_core::candle_core::safetensors::load(
        src.join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let prefixed: std::collections::HashMap<String, Tensor> = weights
        .into_iter()
        .map(|(k, v)| (format!("bert.{k}"), v))
        .collect();
    similarity_core::candle_core::safetensors::save(&prefixed, d.join("model.safetensors"))
        .unwrap();
    let enc = SentenceTransformer::from_pretrained(d, &Device::Cpu).unwrap();
    let texts = vec!["how do i create a new virtual machine?".to_string()];
    assert_eq!(embed(&enc, &texts), embed(frozen(), &texts));
}

/// 300 texts of 3 to 60 words, lengths in no order.
fn mixed_length_texts() -> Vec<String> {
    let words = "the quick brown fox jumps over a lazy dog while clouds drift";
    let words: Vec<&str> = words.split(' ').collect();
    (0..300)
        .map(|i| {
            let n = 3 + (i * 37) % 58;
            (0..n)
                .map(|j| words[(i + j) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

#[test]
fn a_large_mixed_length_batch_equals_texts_embedded_one_at_a_time() {
    // One collated batch is run in several chunks, rows sorted by length and each chunk
    // trimmed to its own longest text; every row must match the text embedded alone.
    let texts = mixed_length_texts();
    let enc = frozen();
    let refs: Vec<&String> = texts.iter().collect();
    let batch = enc.collate(&refs, &Device::Cpu).unwrap();
    let (b, l) = batch.input_ids().dims2().unwrap();
    assert!(
        b * l > 8192,
        "the batch must span several chunks ({b} x {l})"
    );
    let all = enc
        .forward(&batch, &mut Mode::Eval)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for i in [0, 1, 57, 150, 299] {
        let one = embed(enc, std::slice::from_ref(&texts[i]));
        let d = max_abs_diff(&all[i..=i], &one);
        assert!(d < 1e-5, "text {i}: max |diff| {d}");
    }
}

#[test]
fn the_frozen_fused_forward_equals_the_differentiable_one() {
    // A frozen encoder evaluates with the fused CPU kernels (packed Q/K/V, attention,
    // dense layers with bias, residual, GELU and layer norm in one op each); a trainable
    // one with the composite, differentiable ops. Same weights, same embeddings.
    let texts = mixed_length_texts();
    let trainable =
        SentenceTransformer::from_pretrained_trainable(common::minilm_dir(), &Device::Cpu).unwrap();
    let refs: Vec<&String> = texts.iter().collect();
    let batch = frozen().collate(&refs, &Device::Cpu).unwrap();
    let run = |enc: &SentenceTransformer| {
        enc.forward(&batch, &mut Mode::Eval)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    };
    let d = max_abs_diff(&run(frozen()), &run(&trainable));
    assert!(d < 1e-5, "max |diff| {d}");
}

#[test]
fn heads_the_fused_attention_does_not_take_use_the_differentiable_forward() {
    // 128 heads of 3: not a whole number of the attention kernel's register blocks. The
    // weights' shapes do not depend on the head count, so MiniLM's serve; a frozen encoder
    // must then evaluate with the composite ops and agree with a trainable one.
    let src = common::minilm_dir();
    let dir = minilm_copy(&["model.safetensors"]);
    let d = dir.path();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    config["num_attention_heads"] = 128.into();
    std::fs::write(d.join("config.json"), config.to_string()).unwrap();
    let texts = vec![
        "how do i create a new virtual machine?".to_string(),
        "resize a disk".to_string(),
    ];
    let frozen = SentenceTransformer::from_pretrained(d, &Device::Cpu).unwrap();
    let trainable = SentenceTransformer::from_pretrained_trainable(d, &Device::Cpu).unwrap();
    let diff = max_abs_diff(&embed(&frozen, &texts), &embed(&trainable, &texts));
    assert!(diff < 1e-5, "max |diff| {diff}");
}
