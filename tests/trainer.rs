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
            ..Default::default()
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

fn weights(m: &FaqModel) -> Vec<Vec<f32>> {
    m.state()
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
            ..Default::default()
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
        "epoch,train_loss,val_loss,lr,seconds,precision@1,reciprocal_rank"
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
