//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::io::BufRead;
use std::path::{Path, PathBuf};

use similarity_core::data::SimilarityPairSample;

pub mod parity;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use similarity_core::Device;
use similarity_core::encoder::{Encoder, FrozenEncoder, HashedNgramConfig, HashedNgramEncoder};
use similarity_core::nn::Mode;

/// The device the integration tests run on: the CPU, or the GPU named by
/// `SIMILARITY_TEST_DEVICE=cuda` (or `cuda:N`), so that the same suite checks the CUDA
/// build (`scripts/gpu-check.sh`). A GPU that was asked for and cannot be opened fails
/// the test rather than falling back.
pub fn device() -> similarity_core::Device {
    match std::env::var("SIMILARITY_TEST_DEVICE").as_deref() {
        Err(_) | Ok("") | Ok("cpu") => similarity_core::Device::Cpu,
        Ok(spec) => {
            let ordinal = match spec.strip_prefix("cuda") {
                Some("") => 0,
                Some(n) => n.trim_start_matches(':').parse().unwrap_or_else(|_| {
                    panic!("SIMILARITY_TEST_DEVICE={spec}: expected cpu, cuda or cuda:N")
                }),
                None => panic!("SIMILARITY_TEST_DEVICE={spec}: expected cpu, cuda or cuda:N"),
            };
            similarity_core::Device::new_cuda(ordinal)
                .unwrap_or_else(|e| panic!("SIMILARITY_TEST_DEVICE={spec}: {e}"))
        }
    }
}

/// Model options on the test [`device`], seed 0.
/// Every trainable variable of `model`, flattened, in the model's order.
pub fn weights<M: similarity_core::TrainableModel>(model: &M) -> Vec<Vec<f32>> {
    model
        .state()
        .named_trainable_vars()
        .iter()
        .map(|(_, v)| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

pub fn options() -> similarity_core::train::ModelOptions {
    similarity_core::train::ModelOptions {
        device: device(),
        ..Default::default()
    }
}

/// The repository's root: `SIMILARITY_REPO_ROOT` when set (test binaries built on one
/// machine and run from a copy of the repository elsewhere, as on the GPU machine), else
/// the source tree the tests were built from.
pub fn repo_root() -> PathBuf {
    std::env::var_os("SIMILARITY_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
}

/// Asserts that every `(name, var)` has a finite, non-zero gradient in `grads`: a
/// gradient that silently stops (a non-differentiable op) shows up as a missing or zero one.
pub fn assert_every_var_has_a_gradient<'a>(
    grads: &similarity_core::candle_core::backprop::GradStore,
    vars: impl IntoIterator<Item = (String, &'a similarity_core::candle_core::Var)>,
) {
    for (name, var) in vars {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient for `{name}`"));
        let norm = g
            .sqr()
            .and_then(|t| t.sum_all())
            .and_then(|t| t.to_dtype(similarity_core::candle_core::DType::F32))
            .and_then(|t| t.to_scalar::<f32>())
            .unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "`{name}` has gradient norm {norm}"
        );
    }
}

/// The all-MiniLM-L6-v2 directory the transformer tests read: `SIMILARITY_MINILM_DIR`, else
/// `target/models/all-MiniLM-L6-v2`, where `bash scripts/fetch-minilm.sh` puts it.
pub fn minilm_dir() -> PathBuf {
    let dir = std::env::var_os("SIMILARITY_MINILM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/models/all-MiniLM-L6-v2"));
    assert!(
        dir.join("model.safetensors").is_file(),
        "all-MiniLM-L6-v2 is not in `{}`: run `bash scripts/fetch-minilm.sh` first \
         (or set SIMILARITY_MINILM_DIR to a sentence-transformers model directory)",
        dir.display()
    );
    dir
}

/// The first `n` pairs of a cloud-FAQ split (`"train"` or `"val"`).
pub fn faq_pairs(split: &str, n: usize) -> Vec<SimilarityPairSample<String>> {
    let path = repo_root()
        .join("data/cloud-faq")
        .join(format!("{split}_cloud_faq_dataset.jsonl.gz"));
    let file = std::fs::File::open(&path).expect("data/cloud-faq is part of the repository");
    std::io::BufReader::new(flate2::read::GzDecoder::new(file))
        .lines()
        .take(n)
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
            SimilarityPairSample::positive(
                v["question"].as_str().unwrap().to_string(),
                v["answer"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

use similarity_core::candle_core::{DType, Tensor, Var};

/// Checks the gradient of the scalar `f(x)` at `x` against central finite differences,
/// in f64 (`x` is converted): every component must agree to `rel` relative to the largest
/// gradient component (and absolutely to `1e-7`). Returns the analytic gradient.
pub fn check_gradient(name: &str, x: &Tensor, rel: f64, f: impl Fn(&Tensor) -> Tensor) -> Vec<f64> {
    let x = x.to_dtype(DType::F64).unwrap();
    let var = Var::from_tensor(&x).unwrap();
    let grads = f(var.as_tensor()).backward().unwrap();
    let analytic: Vec<f64> = grads
        .get(&var)
        .unwrap_or_else(|| panic!("{name}: no gradient reaches the input"))
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let base: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let eps = 1e-6;
    let eval = |v: Vec<f64>| -> f64 {
        let t = Tensor::from_vec(v, x.shape(), x.device()).unwrap();
        f(&t).to_scalar::<f64>().unwrap()
    };
    let scale = analytic.iter().fold(0f64, |m, g| m.max(g.abs())).max(1e-3);
    for i in 0..base.len() {
        let (mut plus, mut minus) = (base.clone(), base.clone());
        plus[i] += eps;
        minus[i] -= eps;
        let numeric = (eval(plus) - eval(minus)) / (2.0 * eps);
        assert!(
            (numeric - analytic[i]).abs() <= rel * scale + 1e-7,
            "{name}: d/dx[{i}] analytic {} vs numeric {numeric}",
            analytic[i]
        );
    }
    analytic
}

/// A frozen text encoder that counts the objects it embeds.
pub struct Counting {
    inner: HashedNgramEncoder,
    objects: Arc<AtomicUsize>,
}

impl Counting {
    /// A 32-d hashed encoder of `seed` adding every object it collates to `objects`.
    pub fn new(seed: u64, objects: Arc<AtomicUsize>) -> Self {
        let inner = HashedNgramEncoder::new(HashedNgramConfig {
            dim: 32,
            seed,
            ..Default::default()
        })
        .unwrap();
        Counting { inner, objects }
    }
}

impl Encoder for Counting {
    type Input = String;
    type Batch = <HashedNgramEncoder as Encoder>::Batch;
    const NAME: &'static str = "CountingHashed";

    fn embedding_size(&self) -> usize {
        self.inner.embedding_size()
    }
    fn collate(&self, inputs: &[&String], device: &Device) -> similarity_core::Result<Self::Batch> {
        self.objects.fetch_add(inputs.len(), Ordering::SeqCst);
        self.inner.collate(inputs, device)
    }
    fn forward(&self, batch: &Self::Batch, mode: &mut Mode) -> similarity_core::Result<Tensor> {
        self.inner.forward(batch, mode)
    }
    fn save(&self, dir: &Path) -> similarity_core::Result<()> {
        self.inner.save(dir)
    }
    fn load(dir: &Path, device: &Device) -> similarity_core::Result<Self> {
        Ok(Counting {
            inner: HashedNgramEncoder::load(dir, device)?,
            objects: Arc::default(),
        })
    }
}

impl FrozenEncoder for Counting {}
