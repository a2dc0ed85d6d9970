//! Faults: a process killed while it writes a servable model, a checkpoint, a persisted
//! cache or its logs leaves the previous version intact, and the next write sweeps what
//! the killed one left. The test re-runs this test binary as a child that writes in a
//! loop, kills it (SIGKILL) at varying moments, and checks what is on disk.
//!
//! Each loop runs a few rounds in the test suite; `SIMILARITY_FAULT_ROUNDS=N` runs `N`
//! rounds of each (the long loop of docs/robustness.md).

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
                similarity_core::files::write_bytes(
                    &dir.join("saved"),
                    seed.to_string().as_bytes(),
                )
                .unwrap();
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
                similarity_core::files::write_bytes(&dir.join("saved"), run.to_string().as_bytes())
                    .unwrap();
            }
        }
        "logs" => {
            let cfg = TrainerConfig {
                epochs: 100_000,
                batch_size: 20,
                progress: false,
                logs_dir: Some(dir.join("logs")),
                ..Default::default()
            };
            let _ = Trainer::new(cfg).fit(&mut model(0), &common::faq_pairs("train", 40), None);
        }
        other => panic!("unknown mode {other}"),
    }
}

/// Kill delays in milliseconds for a loop: `default` rounds, or
/// `SIMILARITY_FAULT_ROUNDS`, spread over 0..80 ms.
fn delays(default: usize) -> Vec<u64> {
    let n = std::env::var("SIMILARITY_FAULT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    (0..n as u64).map(|i| 3 + (i * 37) % 80).collect()
}

/// The names in `dir`, sorted, hidden ones included.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn run_and_kill(mode: &str, dir: &Path, after: Duration, ready: impl Fn() -> bool) {
    let mut child = spawn_writer(mode, dir, ready);
    std::thread::sleep(after);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_killed_save_leaves_a_loadable_model() {
    for (round, delay) in delays(4).into_iter().enumerate() {
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
        // The next save sweeps what the killed one left: the model and its lock remain.
        model(0).save(&dir.path().join("model")).unwrap();
        // (The child's own progress file may leave a temporary beside it.)
        let left: Vec<String> = names(dir.path())
            .into_iter()
            .filter(|n| !n.starts_with(".saved."))
            .collect();
        assert_eq!(left, [".model.lock", "model", "saved"], "round {round}");
        // A model the user deletes stays deleted.
        std::fs::remove_dir_all(dir.path().join("model")).unwrap();
        assert!(FaqModel::load(&dir.path().join("model"), &Device::Cpu).is_err());
    }
}

#[test]
fn a_killed_training_run_leaves_a_checkpoint_it_can_resume_from() {
    for delay in delays(3) {
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
        // Resuming from `last` wrote nothing; a run that checkpoints sweeps the leftovers.
        let cfg = TrainerConfig {
            epochs: 1,
            batch_size: 20,
            progress: false,
            checkpoints: Some(CheckpointConfig {
                dir: dir.path().join("ckpt"),
                every_n_epochs: 0,
                save_best: false,
            }),
            ..Default::default()
        };
        Trainer::new(cfg)
            .fit(&mut model(0), &common::faq_pairs("train", 40), None)
            .unwrap();
        assert_eq!(names(&dir.path().join("ckpt")), [".last.lock", "last"]);
    }
}

#[test]
fn a_killed_cache_write_leaves_a_usable_cache() {
    for delay in delays(3) {
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
        // That run rewrote the cache (a new key set) and swept the killed write's leftovers.
        assert_eq!(names(&dir.path().join("cache")), [".text.lock", "text"]);
    }
}

#[test]
fn killed_log_writes_leave_complete_logs_that_agree() {
    for (round, delay) in delays(3).into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        run_and_kill("logs", dir.path(), Duration::from_millis(delay), || {
            logs.join("metrics.jsonl").exists()
        });
        let read = |name: &str| std::fs::read_to_string(logs.join(name)).unwrap();
        let (csv, jsonl, svg) = (
            read("metrics.csv"),
            read("metrics.jsonl"),
            read("curves.svg"),
        );
        let epochs = jsonl.lines().count();
        assert!(epochs >= 1, "round {round}: empty logs");
        for line in jsonl.lines() {
            serde_json::from_str::<serde_json::Value>(line)
                .unwrap_or_else(|e| panic!("round {round}: torn metrics.jsonl: {e}"));
        }
        assert_eq!(
            csv.lines().count(),
            epochs + 1,
            "round {round}: csv and jsonl disagree"
        );
        assert!(
            svg.trim_end().ends_with("</svg>"),
            "round {round}: torn curves.svg"
        );
        // At most the killed write's temporary directory is left, and the next run
        // sweeps it.
        assert!(
            names(dir.path()).len() <= 3,
            "round {round}: {:?}",
            names(dir.path())
        );
        let cfg = TrainerConfig {
            epochs: 1,
            batch_size: 20,
            progress: false,
            logs_dir: Some(logs.clone()),
            ..Default::default()
        };
        Trainer::new(cfg)
            .fit(&mut model(0), &common::faq_pairs("train", 40), None)
            .unwrap();
        assert_eq!(names(dir.path()), [".logs.lock", "logs"], "round {round}");
    }
}

/// Starts the child writing in `mode` and returns it once it has written once.
fn spawn_writer(mode: &str, dir: &Path, ready: impl Fn() -> bool) -> std::process::Child {
    let child = Command::new(std::env::current_exe().unwrap())
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
    child
}

#[test]
fn two_processes_saving_one_model_never_damage_it() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("model");
    let mut child = spawn_writer("servable", dir.path(), || dir.path().join("saved").exists());
    let (mut saved, mut busy, mut loaded) = (0, 0, 0);
    for i in 0..40 {
        match model(1000 + i).save(&target) {
            Ok(()) => saved += 1,
            Err(similarity_core::Error::InUse { pid, .. }) => {
                assert_eq!(pid, Some(child.id()), "the lock names the writer");
                busy += 1;
            }
            Err(e) => panic!("save {i}: {e}"),
        }
        // A reader racing the writer reads one whole model.
        FaqModel::load(&target, &Device::Cpu).unwrap_or_else(|e| panic!("load {i}: {e}"));
        loaded += 1;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(saved + busy, 40);
    assert_eq!(loaded, 40);
    FaqModel::load(&target, &Device::Cpu).unwrap();
}

#[test]
fn a_second_run_on_a_checkpoint_directory_in_use_is_refused_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let last = dir.path().join("ckpt/last");
    let mut child = spawn_writer("checkpoint", dir.path(), || {
        last.join("state.json").exists()
    });
    let cfg = TrainerConfig {
        epochs: 1,
        batch_size: 20,
        progress: false,
        checkpoints: Some(CheckpointConfig {
            dir: dir.path().join("ckpt"),
            every_n_epochs: 0,
            save_best: false,
        }),
        ..Default::default()
    };
    let err = Trainer::new(cfg)
        .fit(&mut model(0), &common::faq_pairs("train", 40), None)
        .unwrap_err();
    child.kill().unwrap();
    child.wait().unwrap();
    let text = err.to_string();
    assert!(
        text.contains("ckpt") && text.contains(&format!("process {}", child.id())),
        "{text}"
    );
}

#[test]
fn runs_sharing_a_cache_directory_with_a_writer_never_see_damage() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_writer("cache", dir.path(), || dir.path().join("saved").exists());
    for run in 0..6 {
        let cfg = TrainerConfig {
            epochs: 1,
            batch_size: 20,
            progress: false,
            cache_dir: Some(dir.path().join("cache")),
            ..Default::default()
        };
        let data = common::faq_pairs("train", 45 + run * 7);
        Trainer::new(cfg.clone())
            .fit(&mut model(0), &data, None)
            .unwrap_or_else(|e| panic!("fit {run}: {e}"));
        Trainer::new(cfg)
            .evaluate(&mut model(0), &data)
            .unwrap_or_else(|e| panic!("evaluate {run}: {e}"));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}
