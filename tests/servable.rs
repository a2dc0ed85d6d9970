//! The servable model: save → load → encode gives identical embeddings, writes are
//! atomic, and a damaged directory gives an error naming the file.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use similarity_core::prelude::*;

#[trainable_model]
#[derive(Debug)]
struct FaqModel {
    #[encoder(cache = "auto")]
    text: HashedNgramEncoder,
    #[head(n_layers = 2)]
    head: SkipConnectionHead,
    #[loss(symmetric = true)]
    loss: MultipleNegativesRankingLoss,
}

#[trainable_model]
#[derive(Debug)]
struct OtherModel {
    #[encoder]
    text: HashedNgramEncoder,
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: MultipleNegativesRankingLoss,
}

fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn trained() -> FaqModel {
    let mut model = FaqModel::new(
        HashedNgramEncoder::default(),
        &ModelOptions {
            seed: 3,
            ..Default::default()
        },
    )
    .unwrap();
    let cfg = TrainerConfig {
        epochs: 2,
        batch_size: 50,
        progress: false,
        ..Default::default()
    };
    Trainer::new(cfg)
        .fit(&mut model, &common::faq_pairs("train", 200), None)
        .unwrap();
    model
}

fn texts() -> Vec<String> {
    common::faq_pairs("val", 20)
        .into_iter()
        .map(|p| p.obj_a)
        .collect()
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn save_load_encode_round_trip_is_exact() {
    let model = trained();
    let tmp = temp_dir();
    let dir = tmp.path().join("model");
    model.save(&dir).unwrap();
    let loaded = FaqModel::load(&dir, &Device::Cpu).unwrap();
    let (a, b) = (
        model.encode(&texts(), 7).unwrap(),
        loaded.encode(&texts(), 7).unwrap(),
    );
    assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
    // The trained head is not the initial one: the round trip carried real weights.
    let fresh = FaqModel::new(
        HashedNgramEncoder::default(),
        &ModelOptions {
            seed: 3,
            ..Default::default()
        },
    )
    .unwrap();
    assert_ne!(
        fresh.encode(&texts(), 7).unwrap().to_vec2::<f32>().unwrap(),
        b.to_vec2::<f32>().unwrap()
    );
    // Saved configs come back: two head layers, symmetric loss.
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(manifest["head"]["config"]["n_layers"], 2);
    assert_eq!(manifest["loss"]["config"]["symmetric"], true);
    assert_eq!(manifest["encoders"][0]["name"], "text");
}

#[test]
fn overwriting_is_atomic_and_leaves_no_temporary_files() {
    let tmp = temp_dir();
    let dir = tmp.path().join("model");
    FaqModel::new(HashedNgramEncoder::default(), &ModelOptions::default())
        .unwrap()
        .save(&dir)
        .unwrap();
    let model = trained();
    model.save(&dir).unwrap();
    assert_eq!(
        entries(tmp.path()),
        vec![tmp.path().join(".model.lock"), dir.clone()],
        "only the model directory and its lock file remain"
    );
    let loaded = FaqModel::load(&dir, &Device::Cpu).unwrap();
    assert_eq!(
        model
            .encode(&texts(), 20)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap(),
        loaded
            .encode(&texts(), 20)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    );
}

fn saved() -> (tempfile::TempDir, PathBuf) {
    let tmp = temp_dir();
    let dir = tmp.path().join("model");
    FaqModel::new(HashedNgramEncoder::default(), &ModelOptions::default())
        .unwrap()
        .save(&dir)
        .unwrap();
    (tmp, dir)
}

fn edit_manifest(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    f(&mut v);
    fs::write(path, serde_json::to_vec(&v).unwrap()).unwrap();
}

fn load_err(dir: &Path) -> String {
    FaqModel::load(dir, &Device::Cpu).unwrap_err().to_string()
}

#[test]
fn damaged_directories_give_errors_that_name_the_file() {
    let (_t, dir) = saved();
    edit_manifest(&dir, |v| v["format_version"] = 99.into());
    let e = load_err(&dir);
    assert!(
        e.contains("config.json") && e.contains("format_version 99"),
        "{e}"
    );

    let (_t, dir) = saved();
    fs::write(
        dir.join("config.json"),
        b"{\"format_version\": 1, \"model\": ",
    )
    .unwrap();
    let e = load_err(&dir);
    assert!(e.contains("config.json") && e.contains("EOF"), "{e}");

    let (_t, dir) = saved();
    let weights = dir.join("weights.safetensors");
    let bytes = fs::read(&weights).unwrap();
    fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("weights.safetensors"), "{e}");

    let (_t, dir) = saved();
    fs::remove_file(dir.join("weights.safetensors")).unwrap();
    assert!(load_err(&dir).contains("weights.safetensors"));

    let (_t, dir) = saved();
    edit_manifest(&dir, |v| v["encoders"][0]["embedding_size"] = 128.into());
    let e = load_err(&dir);
    assert!(e.contains("embedding size 128") && e.contains("384"), "{e}");

    let (_t, dir) = saved();
    edit_manifest(&dir, |v| v["head"]["type"] = "GatedHead".into());
    assert!(load_err(&dir).contains("head was saved as `GatedHead`"));

    let (_t, dir) = saved();
    fs::write(dir.join("encoders/text/config.json"), b"{\"dim\": 0}").unwrap();
    let e = load_err(&dir);
    assert!(e.contains("encoders/text/config.json"), "{e}");

    let (_t, dir) = saved();
    let e = OtherModel::load(&dir, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("holds a `FaqModel` model, not a `OtherModel`"),
        "{e}"
    );

    assert!(load_err(Path::new("no/such/model")).contains("no/such/model/config.json"));
}

/// The hashed encoder with a cost hint (the text's length), so `encode` reorders.
struct LengthCosted(HashedNgramEncoder);

impl Encoder for LengthCosted {
    type Input = String;
    type Batch = <HashedNgramEncoder as Encoder>::Batch;
    const NAME: &'static str = "LengthCosted";
    fn embedding_size(&self) -> usize {
        self.0.embedding_size()
    }
    fn cost_hint(&self, input: &String) -> Option<usize> {
        Some(input.len())
    }
    fn collate(&self, inputs: &[&String], device: &Device) -> similarity_core::Result<Self::Batch> {
        self.0.collate(inputs, device)
    }
    fn forward(
        &self,
        batch: &Self::Batch,
        mode: &mut similarity_core::nn::Mode,
    ) -> similarity_core::Result<Tensor> {
        self.0.forward(batch, mode)
    }
    fn save(&self, dir: &Path) -> similarity_core::Result<()> {
        self.0.save(dir)
    }
    fn load(dir: &Path, device: &Device) -> similarity_core::Result<Self> {
        HashedNgramEncoder::load(dir, device).map(LengthCosted)
    }
}

#[trainable_model]
struct CostedModel {
    #[encoder]
    text: LengthCosted,
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: MultipleNegativesRankingLoss,
}

#[test]
fn encode_batches_by_cost_and_returns_rows_in_record_order() {
    let model = CostedModel::new(
        LengthCosted(HashedNgramEncoder::default()),
        &ModelOptions::default(),
    )
    .unwrap();
    let texts = texts();
    assert_eq!(model.record_cost(&texts[0]), Some(texts[0].len()));
    let lengths: Vec<usize> = texts.iter().map(String::len).collect();
    assert!(
        lengths.windows(2).any(|w| w[0] < w[1]),
        "the texts must not already be in decreasing length order"
    );
    let all = model.encode(&texts, 7).unwrap().to_vec2::<f32>().unwrap();
    for (i, text) in texts.iter().enumerate() {
        let one = model
            .encode(std::slice::from_ref(text), 1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (a, b) in all[i].iter().zip(&one[0]) {
            assert!((a - b).abs() < 1e-6, "record {i}: {a} vs {b}");
        }
    }
}
