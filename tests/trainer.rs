//! The trainer around the step: early stopping, checkpoints and exact resume, logs,
//! schedules, clipping, parameter groups and the step hook.

mod common;

use std::path::Path;

use similarity_core::prelude::*;
use similarity_core::train::{
    CheckpointConfig, EarlyStopping, LrSchedule, MonitorMode, ParamGroup,
};

#[trainable_model]
struct FaqModel {
    #[encoder(cache = "auto")]
    text: HashedNgramEncoder,
    #[head(dropout = 0.1, skip_dropout = 0.1)]
    head: SkipConnectionHead,
    #[loss(symmetric = true)]
    loss: MultipleNegativesRankingLoss,
}

fn model() -> FaqModel {
    FaqModel::new(
        HashedNgramEncoder::default(),
        &ModelOptions {
            seed: 11,
            ..common::options()
        },
    )
    .unwrap()
}

fn config(epochs: usize) -> TrainerConfig {
    TrainerConfig {
        epochs,
        batch_size: 40,
        optimizer: OptimizerConfig::AdamW {
            lr: 5e-3,
            weight_decay: 0.01,
        },
        schedule: LrSchedule::WarmupCosine {
            warmup_steps: 3,
            min_factor: 0.1,
        },
        clip_grad_norm: Some(1.0),
        progress: false,
        ..Default::default()
    }
}

fn weights(m: &impl TrainableModel) -> Vec<Vec<f32>> {
    common::weights(m)
}

#[test]
fn a_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one() {
    let train = common::faq_pairs("train", 160);
    let val = common::faq_pairs("val", 60);
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainerConfig {
        checkpoints: Some(CheckpointConfig {
            dir: dir.path().to_path_buf(),
            every_n_epochs: 2,
            save_best: true,
        }),
        ..config(6)
    };
    let mut full = model();
    let full_report = Trainer::new(cfg.clone())
        .fit(&mut full, &train, Some(&val))
        .unwrap();
    for name in ["last", "best", "epoch-0002", "epoch-0004", "epoch-0006"] {
        assert!(dir.path().join(name).join("state.json").exists(), "{name}");
    }
    // A fresh process would start from the epoch-4 checkpoint with a fresh model.
    let mut resumed = model();
    let resumed_report = Trainer::new(cfg)
        .resume(
            &mut resumed,
            &dir.path().join("epoch-0004"),
            &train,
            Some(&val),
        )
        .unwrap();
    assert_eq!(weights(&full), weights(&resumed));
    assert_eq!(full_report.epochs.len(), resumed_report.epochs.len());
    assert_eq!(
        full_report.epochs.last().unwrap().train_loss,
        resumed_report.epochs.last().unwrap().train_loss
    );
    // And a different seed really gives different weights: the comparison can fail.
    let mut other = FaqModel::new(
        HashedNgramEncoder::default(),
        &ModelOptions {
            seed: 12,
            ..common::options()
        },
    )
    .unwrap();
    Trainer::new(config(6))
        .fit(&mut other, &train, Some(&val))
        .unwrap();
    assert_ne!(weights(&full), weights(&other));
}

#[test]
fn early_stopping_fires_after_patience_epochs_without_improvement() {
    let train = common::faq_pairs("train", 120);
    let val = common::faq_pairs("val", 60);
    // A monitor that can only get worse under a huge learning rate is not needed: with
    // min_delta = +∞ no epoch after the first counts as an improvement.
    let cfg = TrainerConfig {
        early_stopping: Some(EarlyStopping {
            monitor: "precision@1".into(),
            mode: MonitorMode::Max,
            patience: 2,
            min_delta: f64::INFINITY,
        }),
        ..config(10)
    };
    let report = Trainer::new(cfg)
        .fit(&mut model(), &train, Some(&val))
        .unwrap();
    assert_eq!(report.stopped_early, Some(2));
    assert_eq!(report.epochs.len(), 3);
    assert_eq!(report.best.map(|(e, _)| e), Some(0));

    // With a real min_delta of 0 and enough patience it runs to the end.
    let cfg = TrainerConfig {
        early_stopping: Some(EarlyStopping {
            monitor: "val_loss".into(),
            mode: MonitorMode::Min,
            patience: 10,
            min_delta: 0.0,
        }),
        ..config(4)
    };
    let report = Trainer::new(cfg)
        .fit(&mut model(), &train, Some(&val))
        .unwrap();
    assert_eq!((report.stopped_early, report.epochs.len()), (None, 4));

    let cfg = TrainerConfig {
        early_stopping: Some(EarlyStopping {
            monitor: "val_los".into(),
            mode: MonitorMode::Min,
            patience: 1,
            min_delta: 0.0,
        }),
        ..config(2)
    };
    let e = Trainer::new(cfg.clone())
        .fit(&mut model(), &train, Some(&val))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`val_los`"), "{e}");
    let e = Trainer::new(cfg)
        .fit(&mut model(), &train, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs a validation set"), "{e}");
}

#[test]
fn logs_hook_and_parameter_groups() {
    let train = common::faq_pairs("train", 80);
    let val = common::faq_pairs("val", 40);
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainerConfig {
        logs_dir: Some(dir.path().to_path_buf()),
        // The gates of the head are frozen by a zero learning-rate factor.
        param_groups: vec![ParamGroup {
            prefix: "head.gates".into(),
            lr_factor: 0.0,
        }],
        ..config(3)
    };
    let mut m = model();
    let gates_before = m.state().params().named_vars()["head.gates_0"]
        .as_tensor()
        .to_vec1::<f32>()
        .unwrap();
    let mut steps = 0;
    let report = Trainer::new(cfg)
        .fit_with_hook(&mut m, &train, Some(&val), &mut |out| {
            assert_eq!(
                out.embeddings.dims(),
                &[2 * out.targets.labels.dim(0).unwrap(), 384]
            );
            assert!(out.loss.is_finite());
            steps += 1;
        })
        .unwrap();
    assert_eq!(steps, 3 * 2);
    assert_eq!(
        m.state().params().named_vars()["head.gates_0"]
            .as_tensor()
            .to_vec1::<f32>()
            .unwrap(),
        gates_before
    );

    let csv = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "epoch,train_loss,val_loss,lr,seconds,precision@1,mrr"
    );
    assert_eq!(lines.len(), 4);
    let jsonl = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(jsonl.lines().last().unwrap()).unwrap();
    assert_eq!(
        last["train_loss"].as_f64().unwrap(),
        report.epochs[2].train_loss
    );
    let svg = std::fs::read_to_string(dir.path().join("curves.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.matches("<polyline").count() == 4,
        "train, val loss and two metrics"
    );
    // The cosine schedule decays the rate: the last epoch's lr is below the base.
    assert!(report.epochs[2].lr < 5e-3 && report.epochs[2].lr > 0.0);
}

#[test]
fn damaged_checkpoints_are_named() {
    let train = common::faq_pairs("train", 40);
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainerConfig {
        checkpoints: Some(CheckpointConfig {
            dir: dir.path().to_path_buf(),
            every_n_epochs: 0,
            save_best: false,
        }),
        ..config(1)
    };
    Trainer::new(cfg.clone())
        .fit(&mut model(), &train, None)
        .unwrap();
    let last = dir.path().join("last");
    std::fs::write(last.join("optimizer.safetensors"), b"garbage").unwrap();
    let e = Trainer::new(cfg.clone())
        .resume(&mut model(), &last, &train, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("optimizer.safetensors"), "{e}");
    let e = Trainer::new(cfg)
        .resume(&mut model(), Path::new("no/checkpoint"), &train, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no/checkpoint/state.json"), "{e}");
}

/// MNRL that turns NaN from its `nan_at`-th call on (a diverging run, on cue).
#[derive(Debug)]
struct NanAfter {
    inner: similarity_core::loss::MultipleNegativesRankingLoss,
    calls: std::sync::atomic::AtomicUsize,
    nan_at: usize,
}

impl SimilarityLoss for NanAfter {
    type Kind = similarity_core::loss::PairKind;
    type Config = usize;
    const NAME: &'static str = "NanAfter";

    fn new(
        d: usize,
        nan_at: usize,
        params: &mut similarity_core::nn::ParamScope,
    ) -> similarity_core::Result<Self> {
        let inner = SimilarityLoss::new(d, Default::default(), params)?;
        Ok(NanAfter {
            inner,
            calls: Default::default(),
            nan_at,
        })
    }
    fn config(&self) -> &usize {
        &self.nan_at
    }
    fn distance(&self) -> similarity_core::distance::Distance {
        self.inner.distance()
    }
    fn forward(
        &self,
        e: &Tensor,
        t: &similarity_core::data::PairTargets,
    ) -> similarity_core::Result<Tensor> {
        let loss = self.inner.forward(e, t)?;
        let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(if call >= self.nan_at {
            (loss * f64::NAN)?
        } else {
            loss
        })
    }
}

#[trainable_model]
struct Diverging {
    #[encoder(cache = "auto")]
    text: HashedNgramEncoder,
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: NanAfter,
}

#[test]
fn a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint() {
    let train = common::faq_pairs("train", 80); // 2 steps per epoch at batch 40
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(5);
    cfg.checkpoints = Some(CheckpointConfig {
        dir: dir.path().to_path_buf(),
        every_n_epochs: 0,
        save_best: false,
    });
    // Training calls only (no validation): calls 0-1 are epoch 0, call 3 is epoch 1 step 1.
    let mut m = Diverging::new(HashedNgramEncoder::default(), &common::options()).unwrap();
    m.loss.nan_at = 3;
    let e = Trainer::new(cfg).fit(&mut m, &train, None).unwrap_err();
    assert!(
        matches!(
            e,
            similarity_core::Error::NonFinite {
                epoch: 1,
                step: 1,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("non-finite training loss at epoch 1, step 1: NaN"),
        "{e}"
    );
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("last/state.json")).unwrap())
            .unwrap();
    assert_eq!(
        state["trainer"]["history"].as_array().unwrap().len(),
        1,
        "the checkpoint of epoch 0 is intact"
    );
}

#[test]
fn attached_metrics_are_computed_per_batch_and_over_the_validation_set() {
    let train = common::faq_pairs("train", 80);
    let val = common::faq_pairs("val", 50);
    let trainer = Trainer::new(config(2)).with_metrics(vec![
        Box::new(RetrievalPrecision { k: 1 }),
        Box::new(MapAtR),
    ]);
    let report = trainer.fit(&mut model(), &train, Some(&val)).unwrap();
    let last = report.epochs.last().unwrap();
    let names: Vec<&str> = last.train_metrics.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["train_precision@1", "train_map@r"]);
    assert!(
        last.train_metrics
            .iter()
            .all(|(_, v)| (0.0..=1.0).contains(v))
    );
    let val_eval = last.validation.as_ref().unwrap();
    // `RetrievalPrecision { k: 1 }` is the kind's own precision@1: one name, one value.
    let names: Vec<&str> = val_eval.metrics.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["precision@1", "mrr", "map@r"]);
    assert!(
        val_eval
            .metrics
            .iter()
            .all(|(_, v)| (0.0..=1.0).contains(v))
    );
}

/// `fit`, `evaluate` and `LossKind::evaluate` report the same values, and they are the
/// question → answer ranks computed here by hand: each question against all answers,
/// rank = answers strictly nearer than its own (cosine; no two answers tie here).
#[test]
fn evaluate_fit_and_the_loss_kind_agree_with_ranks_by_hand() {
    use similarity_core::distance::Distance;
    use similarity_core::loss::{LossKind, PairKind};
    let train = common::faq_pairs("train", 80);
    let val = common::faq_pairs("val", 60);
    let trainer = Trainer::new(config(1)).with_metrics(vec![Box::new(RetrievalPrecision { k: 1 })]);
    let mut m = model();
    let report = trainer.fit(&mut m, &train, Some(&val)).unwrap();
    let from_fit = report.epochs[0].validation.clone().unwrap().metrics;
    let from_evaluate = trainer.evaluate(&mut m, &val).unwrap().metrics;
    assert_eq!(from_fit, from_evaluate);

    let questions: Vec<String> = val.iter().map(|p| p.obj_a.clone()).collect();
    let answers: Vec<String> = val.iter().map(|p| p.obj_b.clone()).collect();
    let (q, a) = (
        m.encode(&questions, 64).unwrap(),
        m.encode(&answers, 64).unwrap(),
    );
    let metas = similarity_core::data::metas(&val).unwrap();
    let both = Tensor::cat(&[&q, &a], 0).unwrap();
    let from_kind = PairKind::evaluate(&both, &metas, Distance::Cosine).unwrap();
    assert_eq!(from_kind.len(), 2);
    for ((name, v), (want_name, want)) in from_kind.iter().zip(&from_evaluate) {
        assert_eq!(name, want_name);
        assert!((v - want).abs() < 1e-9, "{name}: {v} vs {want}");
    }

    let d = Distance::Cosine
        .distance_matrix(&q, Some(&a))
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let ranks: Vec<usize> = d
        .iter()
        .enumerate()
        .map(|(i, row)| row.iter().filter(|&&x| x < row[i]).count())
        .collect();
    let n = ranks.len() as f64;
    let p1 = ranks.iter().filter(|&&r| r == 0).count() as f64 / n;
    let mrr = ranks.iter().map(|&r| 1.0 / (r as f64 + 1.0)).sum::<f64>() / n;
    assert_eq!(from_evaluate[0].0, "precision@1");
    assert!(
        (from_evaluate[0].1 - p1).abs() < 1e-12,
        "{from_evaluate:?} vs {p1}"
    );
    assert_eq!(from_evaluate[1].0, "mrr");
    assert!(
        (from_evaluate[1].1 - mrr).abs() < 1e-12,
        "{from_evaluate:?} vs {mrr}"
    );
    assert!(p1 > 0.0 && p1 < 1.0);
}

/// MNRL whose gradient is NaN on the training calls in `bad.0..bad.1` (counted from 0)
/// while its value stays finite: `sqrt(e ⊙ 0)` adds 0 to the loss, and its backward pass
/// is `(1 / 2·sqrt(0)) · 0 = ∞ · 0`.
#[derive(Debug)]
struct NanGradient {
    inner: similarity_core::loss::MultipleNegativesRankingLoss,
    calls: std::sync::atomic::AtomicUsize,
    bad: (usize, usize),
}

impl SimilarityLoss for NanGradient {
    type Kind = similarity_core::loss::PairKind;
    type Config = (usize, usize);
    const NAME: &'static str = "NanGradient";

    fn new(
        d: usize,
        bad: (usize, usize),
        params: &mut similarity_core::nn::ParamScope,
    ) -> similarity_core::Result<Self> {
        Ok(NanGradient {
            inner: SimilarityLoss::new(d, Default::default(), params)?,
            calls: Default::default(),
            bad,
        })
    }
    fn config(&self) -> &(usize, usize) {
        &self.bad
    }
    fn distance(&self) -> similarity_core::distance::Distance {
        self.inner.distance()
    }
    fn forward(
        &self,
        e: &Tensor,
        t: &similarity_core::data::PairTargets,
    ) -> similarity_core::Result<Tensor> {
        let loss = self.inner.forward(e, t)?;
        let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if !(self.bad.0..self.bad.1).contains(&call) {
            return Ok(loss);
        }
        let poison = e.mul(&e.zeros_like()?)?.sqrt()?.sum_all()?;
        Ok((loss + poison)?)
    }
}

#[trainable_model]
struct BadGradient {
    #[encoder(cache = "auto")]
    text: HashedNgramEncoder,
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: NanGradient,
}

fn bad_gradient(from: usize, to: usize) -> BadGradient {
    let mut m = BadGradient::new(HashedNgramEncoder::default(), &common::options()).unwrap();
    m.loss.bad = (from, to);
    m
}

fn all_finite(m: &impl TrainableModel) -> bool {
    m.state().named_trainable_vars().iter().all(|(_, v)| {
        v.as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|x| x.is_finite())
    })
}

#[test]
fn a_non_finite_gradient_stops_training_naming_epoch_step_and_variable() {
    let train = common::faq_pairs("train", 80); // 2 steps per epoch at batch 40
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(3);
    cfg.checkpoints = Some(CheckpointConfig {
        dir: dir.path().to_path_buf(),
        every_n_epochs: 1,
        save_best: true,
    });
    // Training calls only (no validation): call 3 is epoch 1, step 1.
    let mut m = bad_gradient(3, 4);
    let first = m.state().named_trainable_vars()[0].0.clone();
    let e = Trainer::new(cfg).fit(&mut m, &train, None).unwrap_err();
    let text = e.to_string();
    assert!(
        matches!(&e, similarity_core::Error::NonFiniteGradient { epoch: 1, step: 1, variable, .. } if *variable == first),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "non-finite gradient of `{first}` at epoch 1, step 1: NaN"
        )) && text.contains("non_finite = SkipStep"),
        "{text}"
    );
    assert!(all_finite(&m), "the bad step was not taken");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("last/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["trainer"]["history"].as_array().unwrap().len(), 1);
}

#[test]
fn skip_step_counts_the_skipped_step_and_leaves_the_weights_finite() {
    let train = common::faq_pairs("train", 80);
    let cfg = TrainerConfig {
        non_finite: similarity_core::train::NonFinitePolicy::SkipStep,
        ..config(3)
    };
    let mut m = bad_gradient(1, 2); // epoch 0, step 1
    let mut hooked = 0;
    let report = Trainer::new(cfg.clone())
        .fit_with_hook(&mut m, &train, None, &mut |_| hooked += 1)
        .unwrap();
    let skipped: Vec<usize> = report.epochs.iter().map(|e| e.skipped_steps).collect();
    assert_eq!(skipped, [1, 0, 0]);
    assert_eq!(hooked, 5, "a skipped step is not a step");
    assert!(all_finite(&m));
    assert!(report.epochs.iter().all(|e| e.train_loss.is_finite()));
    // The same run without the bad step differs only by that step: the weights differ.
    let mut clean = bad_gradient(0, 0);
    Trainer::new(cfg.clone())
        .fit(&mut clean, &train, None)
        .unwrap();
    assert_ne!(weights(&clean), weights(&m));

    // An epoch in which every step is skipped learnt nothing: an error that says so.
    let mut m = bad_gradient(2, 4); // all of epoch 1
    let e = Trainer::new(cfg)
        .fit(&mut m, &train, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("TrainerConfig.non_finite")
            && e.contains("every one of the 2 steps of epoch 1")
            && e.contains("non-finite gradient of `"),
        "{e}"
    );
}

#[test]
fn weights_that_overflow_are_never_checkpointed() {
    let train = common::faq_pairs("train", 40); // one step per epoch
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainerConfig {
        // Finite in f64, infinite once the f32 update applies it.
        optimizer: OptimizerConfig::adam(1e300),
        checkpoints: Some(CheckpointConfig {
            dir: dir.path().to_path_buf(),
            every_n_epochs: 1,
            save_best: true,
        }),
        ..config(2)
    };
    let e = Trainer::new(cfg)
        .fit(&mut model(), &train, None)
        .unwrap_err();
    assert!(
        matches!(e, similarity_core::Error::NonFiniteWeights { .. }),
        "{e}"
    );
    let text = e.to_string();
    assert!(
        text.contains("trainable variable `head.") && text.contains("after epoch 0"),
        "{text}"
    );
    for name in ["last", "best", "epoch-0001"] {
        assert!(!dir.path().join(name).exists(), "{name} was written");
    }
}

#[test]
fn options_are_checked_before_fit_and_name_the_trainer_field() {
    let train = common::faq_pairs("train", 40);
    let cases = [
        (
            TrainerConfig {
                batch_size: 0,
                ..config(1)
            },
            "TrainerConfig.batch_size",
        ),
        (
            TrainerConfig {
                clip_grad_norm: Some(-1.0),
                ..config(1)
            },
            "TrainerConfig.clip_grad_norm: must be > 0 and finite, got -1",
        ),
        (
            TrainerConfig {
                schedule: LrSchedule::Step {
                    every_epochs: 1,
                    gamma: -0.5,
                },
                ..config(1)
            },
            "TrainerConfig.schedule (Step).gamma",
        ),
        (
            TrainerConfig {
                drop_last: true,
                batch_size: 64,
                ..config(1)
            },
            "TrainerConfig.drop_last",
        ),
    ];
    for (cfg, want) in cases {
        let e = Trainer::new(cfg)
            .fit(&mut model(), &train, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains(want) && !e.contains("DataLoader"), "{e}");
    }
}

/// A frozen encoder that declares a wider embedding than it returns.
struct Misdeclared(HashedNgramEncoder);

impl Encoder for Misdeclared {
    type Input = String;
    type Batch = <HashedNgramEncoder as Encoder>::Batch;
    const NAME: &'static str = "Misdeclared";

    fn embedding_size(&self) -> usize {
        self.0.embedding_size() + 16
    }
    fn collate(
        &self,
        inputs: &[&String],
        device: &similarity_core::candle_core::Device,
    ) -> similarity_core::Result<Self::Batch> {
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
    fn load(
        dir: &Path,
        device: &similarity_core::candle_core::Device,
    ) -> similarity_core::Result<Self> {
        Ok(Misdeclared(HashedNgramEncoder::load(dir, device)?))
    }
}

impl FrozenEncoder for Misdeclared {}

#[trainable_model]
struct MisdeclaredModel {
    #[encoder(cache = "auto")]
    text: Misdeclared,
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: MultipleNegativesRankingLoss,
}

#[test]
fn a_cached_encoder_of_the_wrong_width_is_named_not_the_head() {
    let train = common::faq_pairs("train", 40);
    let mut m = MisdeclaredModel::new(
        Misdeclared(HashedNgramEncoder::default()),
        &common::options(),
    )
    .unwrap();
    let e = Trainer::new(config(1))
        .fit(&mut m, &train, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("encoder `text` (Misdeclared)")
            && e.contains("embedding cache")
            && e.contains("embedding_size() = 400")
            && !e.contains("Head"),
        "{e}"
    );
}
