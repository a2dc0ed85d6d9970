//! End-to-end training: a model declared with `#[trainable_model]` learns, caches what
//! is frozen, and gives every trainable variable a gradient.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use similarity_core::candle_core::{DType, Var};
use similarity_core::nn::{Init, Mode, Params};
use similarity_core::prelude::*;
use similarity_core::train::EncoderBatch;

#[trainable_model]
struct FaqModel {
    #[encoder(cache = "auto")]
    text: HashedNgramEncoder,
    #[head]
    head: SkipConnectionHead,
    #[loss(scale = 20.0, symmetric = true)]
    loss: MultipleNegativesRankingLoss,
}

fn quiet(epochs: usize, batch_size: usize, lr: f64) -> TrainerConfig {
    TrainerConfig {
        epochs,
        batch_size,
        optimizer: OptimizerConfig::adam(lr),
        progress: false,
        ..Default::default()
    }
}

#[test]
fn faq_model_loss_falls_and_precision_rises() {
    let train = common::faq_pairs("train", 600);
    let val = common::faq_pairs("val", 300);
    let mut model = FaqModel::new(HashedNgramEncoder::default(), &common::options()).unwrap();
    let trainer = Trainer::new(quiet(15, 100, 1e-2));
    let before = trainer.evaluate(&mut model, &val).unwrap();
    let report = trainer.fit(&mut model, &train, Some(&val)).unwrap();
    let after = trainer.evaluate(&mut model, &val).unwrap();

    let first = report.epochs.first().unwrap().train_loss;
    let last = report.epochs.last().unwrap().train_loss;
    assert!(last < 0.7 * first, "training loss {first} → {last}");
    let (p0, p1) = (
        before.metric("precision@1").unwrap(),
        after.metric("precision@1").unwrap(),
    );
    assert!(p1 > p0 + 0.02, "precision@1 {p0} → {p1}");
    assert!(
        after.loss < before.loss,
        "validation loss {} → {}",
        before.loss,
        after.loss
    );
    assert_eq!(report.epochs.len(), 15);
    let last_val = report.epochs.last().unwrap().validation.as_ref().unwrap();
    assert_eq!(
        last_val, &after,
        "the last epoch's validation is the model's evaluation"
    );
}

#[test]
fn training_is_reproducible_from_the_seeds() {
    let train = common::faq_pairs("train", 200);
    let run = || {
        let mut model = FaqModel::new(
            HashedNgramEncoder::default(),
            &ModelOptions {
                seed: 5,
                ..common::options()
            },
        )
        .unwrap();
        let report = Trainer::new(quiet(3, 64, 1e-2))
            .fit(&mut model, &train, None)
            .unwrap();
        report
            .epochs
            .iter()
            .map(|e| e.train_loss)
            .collect::<Vec<_>>()
    };
    assert_eq!(run(), run());
}

/// A small trainable encoder over fixed-size feature vectors, counting its forward calls.
struct Mlp {
    weight: Var,
    calls: Arc<AtomicUsize>,
}

impl Mlp {
    fn new(input: usize, output: usize, seed: u64, calls: Arc<AtomicUsize>) -> Self {
        let mut params = Params::new(&common::device(), seed);
        params
            .var(
                "w",
                &[input, output],
                Init::Normal {
                    mean: 0.0,
                    std: 0.3,
                },
            )
            .unwrap();
        let weight = params.named_vars()["w"].clone();
        Mlp { weight, calls }
    }
}

impl Encoder for Mlp {
    type Input = Vec<f32>;
    type Batch = Tensor;
    const NAME: &'static str = "TestMlp";

    fn embedding_size(&self) -> usize {
        self.weight.dim(1).unwrap()
    }

    fn collate(&self, inputs: &[&Vec<f32>], device: &Device) -> similarity_core::Result<Tensor> {
        let d = self.weight.dim(0)?;
        for (i, x) in inputs.iter().enumerate() {
            if x.len() != d {
                return Err(similarity_core::Error::invalid(
                    format!("record {i}"),
                    format!("has {} features, expected {d}", x.len()),
                ));
            }
        }
        let flat: Vec<f32> = inputs.iter().flat_map(|x| x.iter().copied()).collect();
        Ok(Tensor::from_vec(flat, (inputs.len(), d), device)?)
    }

    fn forward(&self, batch: &Tensor, _mode: &mut Mode) -> similarity_core::Result<Tensor> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(batch.matmul(self.weight.as_tensor())?.tanh()?)
    }

    fn trainable_vars(&self) -> Vec<Var> {
        vec![self.weight.clone()]
    }

    fn save(&self, dir: &Path) -> similarity_core::Result<()> {
        let map =
            std::collections::HashMap::from([("w".to_string(), self.weight.as_tensor().clone())]);
        Ok(similarity_core::candle_core::safetensors::save(
            &map,
            dir.join("w.safetensors"),
        )?)
    }

    fn load(dir: &Path, device: &Device) -> similarity_core::Result<Self> {
        let t = similarity_core::candle_core::safetensors::load(dir.join("w.safetensors"), device)?;
        Ok(Mlp {
            weight: Var::from_tensor(&t["w"])?,
            calls: Arc::default(),
        })
    }
}

/// Cache key of a feature vector (`f32` is not `Hash`): its bit patterns.
fn feature_bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// A frozen, cached encoder next to a trainable one.
#[trainable_model]
struct MixedModel {
    #[encoder(cache = "cpu", key = feature_bits)]
    frozen: Frozen<Mlp>,
    #[encoder]
    trainable: Mlp,
    #[head(n_layers = 2)]
    head: SkipConnectionHead,
    #[loss(scale = 10.0)]
    loss: MultipleNegativesRankingLoss,
}

fn mixed_pairs(n: usize) -> Vec<SimilarityPairSample<MixedModelRecord>> {
    let feat = |i: usize, j: usize| {
        (0..6)
            .map(|k| (((i * 31 + j * 7 + k * 13) % 17) as f32 / 8.0) - 1.0)
            .collect::<Vec<f32>>()
    };
    (0..n)
        .map(|i| {
            let rec = |j| MixedModelRecord {
                frozen: feat(i, j),
                trainable: feat(i, j + 1),
            };
            SimilarityPairSample::positive(rec(0), rec(1))
        })
        .collect()
}

#[test]
fn mixed_model_caches_the_frozen_encoder_and_trains_the_other() {
    let frozen_calls = Arc::new(AtomicUsize::new(0));
    let trainable_calls = Arc::new(AtomicUsize::new(0));
    let frozen = Frozen(Mlp::new(6, 4, 1, frozen_calls.clone()));
    let trainable = Mlp::new(6, 3, 2, trainable_calls.clone());
    let mut model = MixedModel::new(frozen, trainable, &common::options()).unwrap();
    // The head is sized from both encoders: 4 + 3.
    assert_eq!(
        model.state().params().named_vars()["head.fc_0.weight"].dims(),
        &[7, 7]
    );
    // Head (2 layers × 3 variables) and the trainable encoder; none of the frozen one.
    assert_eq!(model.state().trainable_vars().len(), 7);

    let data = mixed_pairs(40);
    Trainer::new(quiet(3, 10, 1e-2))
        .fit(&mut model, &data, None)
        .unwrap();
    // 80 objects, 40 distinct per slot pattern: the frozen encoder ran only while filling
    // the cache (80 records in one batch of ≤ 1024), never during the 12 steps.
    assert_eq!(frozen_calls.load(Ordering::SeqCst), 1);
    assert_eq!(trainable_calls.load(Ordering::SeqCst), 12);
}

#[test]
fn every_trainable_variable_receives_a_gradient() {
    let frozen = Frozen(Mlp::new(6, 4, 1, Arc::default()));
    let trainable = Mlp::new(6, 3, 2, Arc::default());
    let model = MixedModel::new(frozen, trainable, &common::options()).unwrap();
    let data = mixed_pairs(8);
    let records: Vec<&MixedModelRecord> = data
        .iter()
        .map(|p| &p.obj_a)
        .chain(data.iter().map(|p| &p.obj_b))
        .collect();
    let batch = EncoderBatch::records(&records, model.state().encoders());
    let emb = model.embed(&batch, &mut Mode::Eval).unwrap();
    let metas: Vec<_> = data
        .iter()
        .map(|p| similarity_core::data::SimilaritySample::meta(p).unwrap())
        .collect();
    let targets = <SimilarityPairSample<MixedModelRecord> as similarity_core::data::SimilaritySample>::targets(&metas, &common::device()).unwrap();
    let loss = model.loss().forward(&emb, &targets).unwrap();
    let grads = loss.backward().unwrap();
    let vars = model.state().trainable_vars();
    common::assert_every_var_has_a_gradient(
        &grads,
        vars.iter().map(|v| (format!("variable {:?}", v.dims()), v)),
    );
}

#[test]
fn bad_inputs_are_named() {
    let mut model = FaqModel::new(HashedNgramEncoder::default(), &common::options()).unwrap();
    let trainer = Trainer::new(quiet(1, 8, 1e-3));
    let err = trainer.fit(&mut model, &[], None).unwrap_err().to_string();
    assert!(
        err.contains("training set") && err.contains("empty"),
        "{err}"
    );

    let mut pairs = common::faq_pairs("train", 4);
    pairs[2].score = -0.5;
    let err = trainer
        .fit(&mut model, &pairs, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("training set, sample 2") && err.contains("-0.5"),
        "{err}"
    );

    let mut mixed = MixedModel::new(
        Frozen(Mlp::new(6, 4, 1, Arc::default())),
        Mlp::new(6, 3, 2, Arc::default()),
        &common::options(),
    )
    .unwrap();
    let mut data = mixed_pairs(4);
    data[1].obj_b.trainable.pop();
    let err = trainer
        .fit(&mut mixed, &data, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("encoder `trainable`, a batch, record")
            && err.contains("5 features, expected 6"),
        "{err}"
    );
}

#[test]
fn non_finite_inputs_and_bad_pairs_are_named() {
    let trainer = Trainer::new(quiet(1, 8, 1e-3));
    // A NaN feature in sample 1's obj_b (object 3) of the cached encoder.
    let mut data = mixed_pairs(4);
    data[1].obj_b.frozen[2] = f32::NAN;
    let mut mixed = MixedModel::new(
        Frozen(Mlp::new(6, 4, 1, Arc::default())),
        Mlp::new(6, 3, 2, Arc::default()),
        &common::options(),
    )
    .unwrap();
    let err = trainer
        .fit(&mut mixed, &data, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("encoder `frozen`") && err.contains("object 3") && err.contains("NaN"),
        "{err}"
    );
    // The same in the trainable (uncached) encoder is caught at the batch.
    let mut data = mixed_pairs(4);
    data[0].obj_a.trainable[0] = f32::NAN;
    let err = trainer
        .fit(&mut mixed, &data, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("encoder `trainable`") && err.contains("record") && err.contains("NaN"),
        "{err}"
    );

    // Pair indices out of range for the batch, straight into a loss.
    let loss = MultipleNegativesRankingLoss::new(
        2,
        Default::default(),
        &mut Params::new(&common::device(), 0).scope("l"),
    )
    .unwrap();
    let targets = similarity_core::data::PairTargets {
        pairs: Tensor::new(&[[0u32, 1], [1, 9]], &common::device()).unwrap(),
        labels: Tensor::new(&[1f32, 1.0], &common::device()).unwrap(),
        subgroups: Tensor::new(&[0i64, 0, 0, 0], &common::device()).unwrap(),
    };
    let e = Tensor::zeros((4, 2), DType::F32, &common::device()).unwrap();
    let err = loss.forward(&e, &targets).unwrap_err().to_string();
    assert!(
        err.contains("pair 1") && err.contains("[1, 9]") && err.contains("4 embeddings"),
        "{err}"
    );
}
