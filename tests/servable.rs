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
            ..common::options()
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
    let loaded = FaqModel::load(&dir, &common::device()).unwrap();
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
            ..common::options()
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
    FaqModel::new(HashedNgramEncoder::default(), &common::options())
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
    let loaded = FaqModel::load(&dir, &common::device()).unwrap();
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
    FaqModel::new(HashedNgramEncoder::default(), &common::options())
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
    FaqModel::load(dir, &common::device())
        .unwrap_err()
        .to_string()
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
    let e = OtherModel::load(&dir, &common::device())
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
        &common::options(),
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

// ---- sizes read from files ------------------------------------------------------------
//
// Every size in a saved model's files is checked against `similarity_core::limits` before
// anything is sized from it. Before those checks, 2^62 and usize::MAX overflowed a
// capacity or a product (a panic), 10^6 head layers or a 10^6-wide encoder allocated until
// the process was killed, and an n-gram range [1, 2^62] loaded and then looped forever in
// `encode`. Each case here must come back as an error naming the file and the field, in
// bounded time.

/// The hostile sizes: an overflowing product, an allocation no machine holds, the maximum.
const HOSTILE: [u64; 3] = [1 << 62, 1_000_000, u64::MAX];

/// How long a load of a hostile directory may take before it counts as a hang.
const LOAD_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// A model with sized options in its head and loss.
#[trainable_model]
struct SizedModel {
    #[encoder]
    text: HashedNgramEncoder,
    #[head(output_sizes = vec![16, 8])]
    head: StackedProjectionHead,
    #[loss(num_groups = 3)]
    loss: ArcFaceLoss,
}

fn saved_sized() -> (tempfile::TempDir, PathBuf) {
    let tmp = temp_dir();
    let dir = tmp.path().join("model");
    SizedModel::new(HashedNgramEncoder::default(), &common::options())
        .unwrap()
        .save(&dir)
        .unwrap();
    (tmp, dir)
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(path).unwrap()).unwrap();
    f(&mut v);
    fs::write(path, serde_json::to_vec(&v).unwrap()).unwrap();
}

/// The error of loading `dir` as `M`, on another thread: a panic or a load that takes
/// longer than [`LOAD_LIMIT`] fails the test (an abort would end the whole run).
fn hostile_load_err<M: TrainableModel + 'static>(dir: &Path) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    let owned = dir.to_path_buf();
    std::thread::spawn(move || {
        let result = M::load(&owned, &common::device()).map(drop);
        let _ = tx.send(result.map_err(|e| e.to_string()));
    });
    match rx.recv_timeout(LOAD_LIMIT) {
        Ok(Ok(())) => panic!("`{}` loaded, but it holds a hostile size", dir.display()),
        Ok(Err(e)) => e,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!(
                "loading `{}` did not return within {LOAD_LIMIT:?}",
                dir.display()
            )
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            panic!("loading `{}` panicked", dir.display())
        }
    }
}

/// Asserts that `e` names the file `file` of `dir` and each of `words`.
fn assert_names(e: &str, dir: &Path, file: &str, words: &[&str]) {
    let path = dir.join(file).display().to_string();
    assert!(
        e.contains(&format!("`{path}`")),
        "does not name `{path}`: {e}"
    );
    for w in words {
        assert!(e.contains(w), "does not name `{w}`: {e}");
    }
}

#[test]
fn a_hostile_encoder_size_is_refused_naming_the_encoder_file() {
    for v in HOSTILE {
        // The encoder's `dim` alone, then with every size in the manifest that follows
        // from it (what a consistent but hostile writer produces).
        for consistent in [false, true] {
            let (_t, dir) = saved();
            edit_json(&dir.join("encoders/text/config.json"), |c| {
                c["dim"] = v.into()
            });
            if consistent {
                edit_manifest(&dir, |m| {
                    m["encoders"][0]["embedding_size"] = v.into();
                    for part in ["head", "loss"] {
                        m[part]["input_size"] = v.into();
                        m[part]["output_size"] = v.into();
                    }
                });
            }
            let e = hostile_load_err::<FaqModel>(&dir);
            let file = if consistent {
                "config.json"
            } else {
                "encoders/text/config.json"
            };
            let field = if consistent {
                "embedding_size"
            } else {
                "HashedNgramConfig.dim"
            };
            assert_names(&e, &dir, file, &[field, &v.to_string()]);
        }
    }
}

#[test]
fn a_hostile_ngram_range_or_bucket_count_is_refused_naming_the_encoder_file() {
    for v in HOSTILE {
        for field in ["word_ngrams", "char_ngrams"] {
            let (_t, dir) = saved();
            edit_json(&dir.join("encoders/text/config.json"), |c| {
                c[field] = serde_json::json!([1, v]);
            });
            let e = hostile_load_err::<FaqModel>(&dir);
            assert_names(
                &e,
                &dir,
                "encoders/text/config.json",
                &[&format!("HashedNgramConfig.{field}"), &v.to_string()],
            );
        }
        if v > 1 << 32 {
            let (_t, dir) = saved();
            edit_json(&dir.join("encoders/text/config.json"), |c| {
                c["n_features"] = v.into();
            });
            let e = hostile_load_err::<FaqModel>(&dir);
            assert_names(
                &e,
                &dir,
                "encoders/text/config.json",
                &["HashedNgramConfig.n_features", &v.to_string()],
            );
        }
    }
}

#[test]
fn a_hostile_head_or_loss_option_is_refused_naming_the_manifest() {
    for v in HOSTILE {
        let (_t, dir) = saved();
        edit_manifest(&dir, |m| m["head"]["config"]["n_layers"] = v.into());
        let e = hostile_load_err::<FaqModel>(&dir);
        assert_names(&e, &dir, "config.json", &["n_layers", &v.to_string()]);

        let (_t, dir) = saved_sized();
        edit_manifest(&dir, |m| m["head"]["config"]["output_sizes"][0] = v.into());
        let e = hostile_load_err::<SizedModel>(&dir);
        assert_names(&e, &dir, "config.json", &["output_sizes", &v.to_string()]);

        let (_t, dir) = saved_sized();
        edit_manifest(&dir, |m| m["loss"]["config"]["num_groups"] = v.into());
        let e = hostile_load_err::<SizedModel>(&dir);
        if v <= 1 << 24 {
            // 10^6 classes of 8 is a table within the bounds (8 million parameters): it
            // is built, and the saved weights do not fit it.
            assert_names(
                &e,
                &dir,
                "weights.safetensors",
                &["loss.kernel", "[8, 1000000]"],
            );
        } else {
            assert_names(&e, &dir, "config.json", &["num_groups", &v.to_string()]);
        }
    }
}

#[test]
fn a_hostile_manifest_size_is_refused_before_the_head_is_built() {
    for v in HOSTILE {
        for (part, field) in [
            ("head", "input_size"),
            ("head", "output_size"),
            ("loss", "input_size"),
            ("loss", "output_size"),
        ] {
            let (_t, dir) = saved();
            edit_manifest(&dir, |m| m[part][field] = v.into());
            let e = hostile_load_err::<FaqModel>(&dir);
            assert_names(
                &e,
                &dir,
                "config.json",
                &[&format!("{part}.{field}"), &v.to_string()],
            );
        }
        let (_t, dir) = saved();
        edit_manifest(&dir, |m| m["encoders"][0]["embedding_size"] = v.into());
        let e = hostile_load_err::<FaqModel>(&dir);
        assert_names(&e, &dir, "config.json", &["embedding_size", &v.to_string()]);
    }
}

#[test]
fn a_bad_option_read_from_the_manifest_names_it() {
    let (_t, dir) = saved();
    edit_manifest(&dir, |m| m["head"]["config"]["dropout"] = 1.5.into());
    let e = hostile_load_err::<FaqModel>(&dir);
    assert_names(
        &e,
        &dir,
        "config.json",
        &["SkipConnectionHead option `dropout`", "1.5"],
    );

    // The loss's options are checked by its constructor, after the head is built.
    let (_t, dir) = saved_sized();
    edit_manifest(&dir, |m| m["loss"]["config"]["scale"] = (-1.0).into());
    let e = hostile_load_err::<SizedModel>(&dir);
    assert_names(
        &e,
        &dir,
        "config.json",
        &["ArcFaceLoss option `scale`", "-1"],
    );
    assert_eq!(
        e,
        format!(
            "invalid file `{}`: ArcFaceLoss option `scale` must be a positive number, got -1",
            dir.join("config.json").display()
        )
    );

    // A head built for other encoders.
    let (_t, dir) = saved();
    edit_manifest(&dir, |m| m["head"]["input_size"] = 100.into());
    let e = hostile_load_err::<FaqModel>(&dir);
    assert_names(
        &e,
        &dir,
        "config.json",
        &["head.input_size is 100", "sum to 384"],
    );
}

/// Quaterion's models pickle their device; here a model saved from the test device (a GPU
/// under `SIMILARITY_TEST_DEVICE=cuda`) loads on the CPU and one saved from the CPU loads
/// on the test device, with the same embeddings (to float tolerance across devices).
#[test]
fn a_model_saved_on_one_device_loads_on_another() {
    let tmp = temp_dir();
    let model = trained();
    let expected = model.encode(&texts(), 7).unwrap().to_vec2::<f32>().unwrap();
    let close = |got: Vec<Vec<f32>>, what: &str| {
        for (a, b) in got.iter().flatten().zip(expected.iter().flatten()) {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                "{what}: {a} vs {b}"
            );
        }
    };
    model.save(&tmp.path().join("from-device")).unwrap();
    let on_cpu = FaqModel::load(&tmp.path().join("from-device"), &Device::Cpu).unwrap();
    close(
        on_cpu.encode(&texts(), 7).unwrap().to_vec2().unwrap(),
        "saved on the test device, loaded on the CPU",
    );
    on_cpu.save(&tmp.path().join("from-cpu")).unwrap();
    let back = FaqModel::load(&tmp.path().join("from-cpu"), &common::device()).unwrap();
    assert!(
        back.encode(&texts(), 7)
            .unwrap()
            .device()
            .same_device(&common::device())
    );
    close(
        back.encode(&texts(), 7).unwrap().to_vec2().unwrap(),
        "saved on the CPU, loaded on the test device",
    );
}
