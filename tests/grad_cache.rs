//! GradCache against the plain step: the same loss and the same gradient of every
//! trainable variable (encoder, head, loss) on a batch that fits, and the same weights
//! after training with `TrainerConfig::grad_cache`.

mod common;

use std::path::Path;

use rand::SeedableRng;
use rand::rngs::StdRng;
use similarity_core::data::SimilaritySample;
use similarity_core::prelude::*;
use similarity_core::train::{EncoderBatch, grad_cache};

/// A trainable two-layer encoder over feature vectors (tanh between the layers).
struct Features {
    params: Params,
}

impl Features {
    fn new(seed: u64) -> Self {
        let mut params = Params::new(&common::device(), seed);
        let init = Init::Normal {
            mean: 0.0,
            std: 0.4,
        };
        params.var("w1", &[6, 8], init).unwrap();
        params.var("w2", &[8, 5], init).unwrap();
        Features { params }
    }
}

impl Encoder for Features {
    type Input = Vec<f32>;
    type Batch = Tensor;
    const NAME: &'static str = "TestFeatures";

    fn embedding_size(&self) -> usize {
        5
    }

    fn collate(&self, inputs: &[&Vec<f32>], device: &Device) -> similarity_core::Result<Tensor> {
        let flat: Vec<f32> = inputs.iter().flat_map(|x| x.iter().copied()).collect();
        Ok(Tensor::from_vec(flat, (inputs.len(), 6), device)?)
    }

    fn forward(&self, batch: &Tensor, _mode: &mut Mode) -> similarity_core::Result<Tensor> {
        let v = self.params.named_vars();
        Ok(batch
            .matmul(v["w1"].as_tensor())?
            .tanh()?
            .matmul(v["w2"].as_tensor())?)
    }

    fn trainable_vars(&self) -> Vec<Var> {
        self.params.vars()
    }

    fn save(&self, _dir: &Path) -> similarity_core::Result<()> {
        Ok(())
    }

    fn load(_dir: &Path, _device: &Device) -> similarity_core::Result<Self> {
        Ok(Features::new(0))
    }
}

#[trainable_model]
struct PairModel {
    #[encoder]
    features: Features,
    #[head(n_layers = 2)]
    head: SkipConnectionHead,
    #[loss(scale = 10.0, symmetric = true)]
    loss: MultipleNegativesRankingLoss,
}

#[trainable_model]
struct GroupModel {
    #[encoder]
    features: Features,
    #[head]
    head: LinearHead,
    #[loss(num_groups = 3, scale = 8.0, margin = 0.2)]
    loss: ArcFaceLoss,
}

fn feature(i: usize) -> Vec<f32> {
    (0..6)
        .map(|k| ((i * 29 + k * 11) % 19) as f32 / 9.0 - 1.0)
        .collect()
}

/// Records `0 … n` as one batch, slot-major as the trainer lays it out.
fn records(n: usize) -> Vec<Vec<f32>> {
    (0..n).map(feature).collect()
}

/// Asserts equal loss and gradients, plain against GradCache with `mini` objects.
fn check_equal<M: TrainableModel<Record = Vec<f32>>>(
    model: &M,
    targets: &<<M::Loss as SimilarityLoss>::Kind as similarity_core::loss::LossKind>::Targets,
    n: usize,
    mini: usize,
) {
    let recs = records(n);
    let refs: Vec<&Vec<f32>> = recs.iter().collect();
    let batch = EncoderBatch::records(&refs, model.state().encoders());
    let mut rng = StdRng::seed_from_u64(1);
    let embeddings = model.embed(&batch, &mut Mode::Train(&mut rng)).unwrap();
    let loss = model.loss().forward(&embeddings, targets).unwrap();
    let plain = loss.backward().unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    let cached = grad_cache::step(model, &batch, mini, &mut rng, |e| {
        model.loss().forward(e, targets)
    })
    .unwrap();
    let value = |t: &Tensor| t.to_scalar::<f32>().unwrap();
    assert!(
        (value(&loss) - value(&cached.loss)).abs() < 1e-5,
        "loss {} vs {}",
        value(&loss),
        value(&cached.loss)
    );
    let diff = (embeddings - &cached.embeddings)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(value(&diff) < 1e-6);
    let grads = cached.grads.expect("a finite loss has gradients");
    let vars = model.state().named_trainable_vars();
    assert!(vars.len() >= 3, "encoder, head and loss variables");
    for (name, var) in vars {
        let a = plain
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no plain gradient"));
        let b = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no GradCache gradient"));
        let scale = value(&a.abs().unwrap().max_all().unwrap()).max(1e-3);
        let d = value(&(a - b).unwrap().abs().unwrap().max_all().unwrap());
        assert!(
            d.is_finite() && d <= 1e-5 * scale.max(1.0),
            "{name} (mini {mini}): max |Δ| {d}, max |g| {scale}"
        );
        assert!(scale > 0.0, "{name}: a zero gradient tests nothing");
    }
}

#[test]
fn pair_loss_gradients_equal_the_plain_step() {
    let model = PairModel::new(Features::new(3), &common::options()).unwrap();
    let metas = vec![
        similarity_core::data::PairMeta {
            score: 1.0,
            subgroup: 0
        };
        7
    ];
    let targets = SimilarityPairSample::<()>::targets(&metas, &common::device()).unwrap();
    // 14 objects: mini-batches of 1, of 3 (a short last one), of the whole batch, larger.
    for mini in [1, 3, 14, 20] {
        check_equal(&model, &targets, 14, mini);
    }
}

#[test]
fn loss_parameters_get_their_gradient_too() {
    let model = GroupModel::new(Features::new(5), &common::options()).unwrap();
    let groups: Vec<i64> = (0..9).map(|i| (i % 3) as i64).collect();
    let targets = similarity_core::data::GroupTargets {
        groups: Tensor::new(groups.as_slice(), &common::device()).unwrap(),
    };
    for mini in [2, 4] {
        check_equal(&model, &targets, 9, mini);
    }
}

#[test]
fn training_with_grad_cache_reaches_the_same_weights() {
    let train: Vec<SimilarityPairSample<Vec<f32>>> = (0..24)
        .map(|i| SimilarityPairSample::positive(feature(2 * i), feature(2 * i + 1)))
        .collect();
    let fit = |grad_cache: Option<usize>| {
        let mut model = PairModel::new(Features::new(3), &common::options()).unwrap();
        let config = TrainerConfig {
            epochs: 3,
            batch_size: 12,
            progress: false,
            grad_cache,
            ..Default::default()
        };
        let report = Trainer::new(config).fit(&mut model, &train, None).unwrap();
        (
            report.epochs.last().unwrap().train_loss,
            common::weights(&model),
        )
    };
    let (plain_loss, plain) = fit(None);
    let (cached_loss, cached) = fit(Some(5));
    assert!(
        (plain_loss - cached_loss).abs() < 1e-4,
        "{plain_loss} vs {cached_loss}"
    );
    for (a, b) in plain.iter().zip(&cached) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
    }
    let err = Trainer::new(TrainerConfig {
        grad_cache: Some(0),
        progress: false,
        ..Default::default()
    })
    .fit(
        &mut PairModel::new(Features::new(3), &common::options()).unwrap(),
        &train,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("TrainerConfig.grad_cache"), "{err}");
}
