//! Faults: a process killed while it writes a servable model or a checkpoint leaves the
//! previous one intact. The test re-runs this test binary as a child that writes in a
//! loop, kills it (SIGKILL) at varying moments, and checks what is on disk.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use similarity_core::prelude::*;
use similarity_core::train::CheckpointConfig;

#[trainable_model]
struct FaqModel {
    #[encoder(cache = "auto")]
    text: HashedNgramEncoder,
    #[head(n_layers = 2)]
    head: SkipConnectionHead,
    #[loss(symmetric = true)]
    loss: MultipleNegativesRankingLoss,
}

const CHILD_ENV: &str = "SIMILARITY_FAULT_CHILD";

fn model(seed: u64) -> FaqModel {
    FaqModel::new(
        HashedNgramEncoder::default(),
        &ModelOptions {
            seed,
            ..Default::default()
        },
    )
    .unwrap()
}

/// In the child: save models (seeds 0, 1, 2, …) to the directory forever, or train with a
/// checkpoint every epoch. Does nothing when run as an ordinary test.
#[test]
fn fault_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (mode, dir) = spec.split_once(':').unwrap();
    let dir = Path::new(dir);
    match mode {
        "servable" => {
            for seed in 0.. {
                model(seed).save(&dir.join("model")).unwrap();
                std::fs::write(dir.join("saved"), seed.to_string()).unwrap();
            }
        }
        "checkpoint" => {
            let cfg = TrainerConfig {
                epochs: 100_000,
                batch_size: 20,
                progress: false,
                checkpoints: Some(CheckpointConfig {
                    dir: dir.join("ckpt"),
                    every_n_epochs: 0,
                    save_best: false,
                }),
                ..Default::default()
            };
            let _ = Trainer::new(cfg).fit(&mut model(0), &common::faq_pairs("train", 40), None);
        }
        "cache" => {
            for run in 0usize.. {
                let cfg = TrainerConfig {
                    epochs: 1,
                    batch_size: 20,
                    progress: false,
                    cache_dir: Some(dir.join("cache")),
                    ..Default::default()
                };
                // A different key set every run, so the cache file is rewritten each time.
                let data = common::faq_pairs("train", 40 + run % 40);
                Trainer::new(cfg).fit(&mut model(0), &data, None).unwrap();
                std::fs::write(dir.join("saved"), run.to_string()).unwrap();
            }
        }
        other => panic!("unknown mode {other}"),
    }
}

fn run_and_kill(mode: &str, dir: &Path, after: Duration, ready: impl Fn() -> bool) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "fault_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_ENV, format!("{mode}:{}", dir.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the child never wrote anything"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(after);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_killed_save_leaves_a_loadable_model() {
    for (round, delay) in [3u64, 11, 29, 47].into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        run_and_kill("servable", dir.path(), Duration::from_millis(delay), || {
            dir.path().join("saved").exists()
        });
        let loaded = FaqModel::load(&dir.path().join("model"), &Device::Cpu)
            .unwrap_or_else(|e| panic!("round {round}: the model on disk does not load: {e}"));
        // It is exactly one of the models that were saved completely.
        let texts = vec!["how do I resize a disk".to_string()];
        let got = loaded.encode(&texts, 1).unwrap().to_vec2::<f32>().unwrap();
        let last: u64 = std::fs::read_to_string(dir.path().join("saved"))
            .unwrap()
            .parse()
            .unwrap();
        let matches = (0..=last + 1).any(|seed| {
            model(seed)
                .encode(&texts, 1)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
                == got
        });
        assert!(
            matches,
            "round {round}: the model on disk is none of the saved ones"
        );
    }
}

#[test]
fn a_killed_training_run_leaves_a_checkpoint_it_can_resume_from() {
    for delay in [7u64, 23, 61] {
        let dir = tempfile::tempdir().unwrap();
        let last = dir.path().join("ckpt/last");
        run_and_kill(
            "checkpoint",
            dir.path(),
            Duration::from_millis(delay),
            || last.join("state.json").exists(),
        );
        let cfg = TrainerConfig {
            epochs: 1,
            batch_size: 20,
            progress: false,
            ..Default::default()
        };
        // Whatever epoch it reached, the checkpoint is complete and resumable.
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(last.join("state.json")).unwrap()).unwrap();
        let epochs_done = state["trainer"]["history"].as_array().unwrap().len();
        assert!(epochs_done >= 1);
        let cfg = TrainerConfig {
            epochs: epochs_done + 1,
            ..cfg
        };
        let report = Trainer::new(cfg)
            .resume(&mut model(0), &last, &common::faq_pairs("train", 40), None)
            .unwrap();
        assert_eq!(report.epochs.len(), epochs_done + 1);
    }
}

#[test]
fn a_killed_cache_write_leaves_a_usable_cache() {
    for delay in [5u64, 19, 43] {
        let dir = tempfile::tempdir().unwrap();
        run_and_kill("cache", dir.path(), Duration::from_millis(delay), || {
            dir.path().join("saved").exists()
        });
        // The next run reads the cache (or finds it stale and re-encodes): never an error.
        let cfg = TrainerConfig {
            epochs: 1,
            batch_size: 20,
            progress: false,
            cache_dir: Some(dir.path().join("cache")),
            ..Default::default()
        };
        Trainer::new(cfg)
            .fit(&mut model(0), &common::faq_pairs("train", 60), None)
            .unwrap();
    }
}
