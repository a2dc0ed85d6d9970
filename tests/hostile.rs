//! Hostile input: every way a data set, an option, a model directory, a checkpoint, a
//! cache, a logs directory or an export target can be wrong, as one table. Each case
//! sets up a directory, breaks one thing, runs one operation in a watchdog thread, and
//! asserts the outcome: an error (never a panic, a hang or an abort) whose text names
//! what is wrong and where, and a directory tree byte-for-byte as it was (a failed write
//! may leave only its `.<name>.lock` file). Adding a case is adding one row.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use similarity_core::candle_core::{DType, Tensor};
use similarity_core::model::{write_npy, write_points_jsonl};
use similarity_core::prelude::*;
use similarity_core::train::{CheckpointConfig, EarlyStopping, LrSchedule, MonitorMode};

#[trainable_model]
struct FaqModel {
    #[encoder(cache = "auto")]
    text: HashedNgramEncoder,
    #[head(n_layers = 2)]
    head: SkipConnectionHead,
    #[loss(symmetric = true)]
    loss: MultipleNegativesRankingLoss,
}

#[trainable_model]
struct GroupModel {
    #[encoder(cache = "auto")]
    text: HashedNgramEncoder,
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: TripletLoss,
    #[xbm(size = 64, start_iteration = 0)]
    memory: Xbm,
}

fn encoder() -> HashedNgramEncoder {
    HashedNgramEncoder::new(HashedNgramConfig {
        dim: 32,
        ..Default::default()
    })
    .unwrap()
}

fn faq() -> FaqModel {
    FaqModel::new(encoder(), &common::options()).unwrap()
}

fn group_model() -> GroupModel {
    GroupModel::new(encoder(), &common::options()).unwrap()
}

fn pairs() -> Vec<SimilarityPairSample<String>> {
    common::faq_pairs("train", 24)
}

fn groups() -> Vec<SimilarityGroupSample<String>> {
    pairs()
        .into_iter()
        .enumerate()
        .flat_map(|(i, p)| {
            [
                SimilarityGroupSample::new(p.obj_a, i as i64),
                SimilarityGroupSample::new(p.obj_b, i as i64),
            ]
        })
        .collect()
}

fn config() -> TrainerConfig {
    TrainerConfig {
        epochs: 2,
        batch_size: 8,
        progress: false,
        ..Default::default()
    }
}

fn checkpoints(root: &Path) -> CheckpointConfig {
    CheckpointConfig {
        dir: root.join("ckpt"),
        every_n_epochs: 0,
        save_best: false,
    }
}

type Outcome = similarity_core::Result<()>;

// ---- the harness -------------------------------------------------------------------------

/// One entry of a directory tree: kind, and length and content for regular files.
#[derive(Debug, PartialEq)]
enum Entry {
    Dir,
    File(u64, u64),
    Link(PathBuf),
    Special,
}

fn snapshot(root: &Path) -> BTreeMap<PathBuf, Entry> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Entry>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            // The only trace a failed write may leave: its lock file.
            if name.starts_with('.') && name.ends_with(".lock") {
                continue;
            }
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let t = meta.file_type();
            let entry = if t.is_symlink() {
                Entry::Link(std::fs::read_link(&path).unwrap())
            } else if t.is_dir() {
                walk(root, &path, out);
                Entry::Dir
            } else if t.is_file() {
                let hash = if meta.len() <= 1 << 24 {
                    xxhash(&std::fs::read(&path).unwrap())
                } else {
                    0
                };
                Entry::File(meta.len(), hash)
            } else {
                Entry::Special
            };
            out.insert(rel, entry);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn xxhash(bytes: &[u8]) -> u64 {
    // FNV-1a: enough to tell contents apart in a test.
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

struct Case {
    name: &'static str,
    /// Builds the directory and breaks one thing in it.
    setup: fn(&Path),
    /// The operation, which must fail.
    act: fn(&Path) -> Outcome,
    /// Every one of these must appear in the error text.
    expect: &'static [&'static str],
}

const fn case(
    name: &'static str,
    setup: fn(&Path),
    act: fn(&Path) -> Outcome,
    expect: &'static [&'static str],
) -> Case {
    Case {
        name,
        setup,
        act,
        expect,
    }
}

/// Runs every case; collects every failure, so one run reports them all.
fn run(cases: &[Case]) {
    let mut failures = Vec::new();
    for c in cases {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        (c.setup)(&root);
        let before = snapshot(&root);
        let (tx, rx) = mpsc::channel();
        let act = c.act;
        let dir = root.clone();
        std::thread::spawn(move || {
            let result = std::panic::catch_unwind(|| act(&dir));
            let _ = tx.send(result);
        });
        let outcome = match rx.recv_timeout(Duration::from_secs(60)) {
            Err(_) => Err("hung (no answer within 60 s)".to_string()),
            Ok(Err(_)) => Err("panicked".to_string()),
            Ok(Ok(Ok(()))) => Err("succeeded, an error was expected".to_string()),
            Ok(Ok(Err(e))) => {
                let text = e.to_string();
                let missing: Vec<&&str> = c.expect.iter().filter(|n| !text.contains(**n)).collect();
                if missing.is_empty() {
                    Ok(())
                } else {
                    Err(format!("error does not name {missing:?}: {text}"))
                }
            }
        };
        if let Err(why) = outcome {
            failures.push(format!("{}: {why}", c.name));
            continue;
        }
        let after = snapshot(&root);
        if after != before {
            let changed: Vec<&PathBuf> = before
                .keys()
                .chain(after.keys())
                .filter(|k| before.get(*k) != after.get(*k))
                .collect();
            failures.push(format!("{}: changed on disk: {changed:?}", c.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    eprintln!("{} hostile cases passed", cases.len());
}

// ---- ways to break a file ------------------------------------------------------------------

fn fifo(path: &Path) {
    let _ = std::fs::remove_file(path);
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

fn to_dev_zero(path: &Path) {
    let _ = std::fs::remove_file(path);
    std::os::unix::fs::symlink("/dev/zero", path).unwrap();
}

fn truncate(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    std::fs::write(path, &bytes[..bytes.len() / 2]).unwrap();
}

fn garbage(path: &Path) {
    std::fs::write(path, [0xffu8, 0x00, 0x13, 0x37, b'{', 0x80]).unwrap();
}

fn empty(path: &Path) {
    std::fs::write(path, b"").unwrap();
}

fn huge_sparse(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(100 << 30).unwrap();
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

fn edit_tensors(path: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let mut t = similarity_core::candle_core::safetensors::load(path, &common::device()).unwrap();
    edit(&mut t);
    similarity_core::candle_core::safetensors::save(&t, path).unwrap();
}

/// The first tensor name of `path` starting with `prefix`.
fn first_tensor(path: &Path, prefix: &str) -> String {
    let t = similarity_core::candle_core::safetensors::load(path, &common::device()).unwrap();
    let mut names: Vec<&String> = t.keys().filter(|k| k.starts_with(prefix)).collect();
    names.sort();
    names[0].clone()
}

fn replace_first(path: &Path, prefix: &str, f: impl FnOnce(&Tensor) -> Tensor) {
    let name = first_tensor(path, prefix);
    edit_tensors(path, |t| {
        let new = f(&t[&name]);
        t.insert(name, new);
    });
}

fn nan_like(t: &Tensor) -> Tensor {
    let mut v = t
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    v[0] = f32::NAN;
    Tensor::from_vec(v, t.shape(), &common::device()).unwrap()
}

// ---- model directories ------------------------------------------------------------------------

fn saved(root: &Path) {
    faq().save(&root.join("model")).unwrap();
}

fn load(root: &Path) -> Outcome {
    FaqModel::load(&root.join("model"), &common::device()).map(drop)
}

fn model_file(root: &Path, name: &str) -> PathBuf {
    root.join("model").join(name)
}

fn model_cases() -> Vec<Case> {
    vec![
        case(
            "model: config.json missing",
            |r| {
                saved(r);
                std::fs::remove_file(model_file(r, "config.json")).unwrap()
            },
            load,
            &["config.json"],
        ),
        case(
            "model: config.json empty",
            |r| {
                saved(r);
                empty(&model_file(r, "config.json"))
            },
            load,
            &["config.json"],
        ),
        case(
            "model: config.json truncated",
            |r| {
                saved(r);
                truncate(&model_file(r, "config.json"))
            },
            load,
            &["config.json"],
        ),
        case(
            "model: config.json garbage",
            |r| {
                saved(r);
                garbage(&model_file(r, "config.json"))
            },
            load,
            &["config.json"],
        ),
        case(
            "model: config.json a FIFO",
            |r| {
                saved(r);
                fifo(&model_file(r, "config.json"))
            },
            load,
            &["config.json", "FIFO"],
        ),
        case(
            "model: config.json -> /dev/zero",
            |r| {
                saved(r);
                to_dev_zero(&model_file(r, "config.json"))
            },
            load,
            &["config.json", "character device"],
        ),
        case(
            "model: config.json a directory",
            |r| {
                saved(r);
                let p = model_file(r, "config.json");
                std::fs::remove_file(&p).unwrap();
                std::fs::create_dir(&p).unwrap()
            },
            load,
            &["config.json", "directory"],
        ),
        case(
            "model: config.json 100 GiB",
            |r| {
                saved(r);
                huge_sparse(&model_file(r, "config.json"))
            },
            load,
            &["config.json", "more than"],
        ),
        case(
            "model: format_version 99",
            |r| {
                saved(r);
                edit_json(&model_file(r, "config.json"), |v| {
                    v["format_version"] = 99.into()
                })
            },
            load,
            &["config.json", "format_version 99"],
        ),
        case(
            "model: format_version missing",
            |r| {
                saved(r);
                edit_json(&model_file(r, "config.json"), |v| {
                    v.as_object_mut().unwrap().remove("format_version");
                })
            },
            load,
            &["config.json", "format_version"],
        ),
        case(
            "model: another model type",
            |r| {
                saved(r);
                edit_json(&model_file(r, "config.json"), |v| {
                    v["model"] = "Other".into()
                })
            },
            load,
            &["config.json", "Other"],
        ),
        case(
            "model: no encoders",
            |r| {
                saved(r);
                edit_json(&model_file(r, "config.json"), |v| {
                    v["encoders"] = serde_json::json!([])
                })
            },
            load,
            &["config.json", "text"],
        ),
        case(
            "model: encoder type changed",
            |r| {
                saved(r);
                edit_json(&model_file(r, "config.json"), |v| {
                    v["encoders"][0]["type"] = "Other".into()
                })
            },
            load,
            &["config.json", "Other"],
        ),
        case(
            "model: encoder size in manifest",
            |r| {
                saved(r);
                edit_json(&model_file(r, "config.json"), |v| {
                    v["encoders"][0]["embedding_size"] = 31.into()
                })
            },
            load,
            &["config.json", "31"],
        ),
        case(
            "model: head type changed",
            |r| {
                saved(r);
                edit_json(&model_file(r, "config.json"), |v| {
                    v["head"]["type"] = "GatedHead".into()
                })
            },
            load,
            &["config.json", "GatedHead"],
        ),
        case(
            "model: head option of the wrong type",
            |r| {
                saved(r);
                edit_json(&model_file(r, "config.json"), |v| {
                    v["head"]["config"]["n_layers"] = "two".into()
                })
            },
            load,
            &["config.json", "head"],
        ),
        case(
            "model: head input size",
            |r| {
                saved(r);
                edit_json(&model_file(r, "config.json"), |v| {
                    v["head"]["input_size"] = 7.into()
                })
            },
            load,
            &["config.json", "7"],
        ),
        case(
            "model: loss option of the wrong type",
            |r| {
                saved(r);
                edit_json(&model_file(r, "config.json"), |v| {
                    v["loss"]["config"]["scale"] = "big".into()
                })
            },
            load,
            &["config.json", "loss"],
        ),
        case(
            "model: weights missing",
            |r| {
                saved(r);
                std::fs::remove_file(model_file(r, "weights.safetensors")).unwrap()
            },
            load,
            &["weights.safetensors"],
        ),
        case(
            "model: weights truncated",
            |r| {
                saved(r);
                truncate(&model_file(r, "weights.safetensors"))
            },
            load,
            &["weights.safetensors"],
        ),
        case(
            "model: weights garbage",
            |r| {
                saved(r);
                garbage(&model_file(r, "weights.safetensors"))
            },
            load,
            &["weights.safetensors"],
        ),
        case(
            "model: weights a FIFO",
            |r| {
                saved(r);
                fifo(&model_file(r, "weights.safetensors"))
            },
            load,
            &["weights.safetensors", "FIFO"],
        ),
        case(
            "model: weights -> /dev/zero",
            |r| {
                saved(r);
                to_dev_zero(&model_file(r, "weights.safetensors"))
            },
            load,
            &["weights.safetensors", "character device"],
        ),
        case(
            "model: weights 100 GiB",
            |r| {
                saved(r);
                huge_sparse(&model_file(r, "weights.safetensors"))
            },
            load,
            &["weights.safetensors", "more than"],
        ),
        case(
            "model: weights header length u64::MAX",
            |r| {
                saved(r);
                let p = model_file(r, "weights.safetensors");
                let mut b = std::fs::read(&p).unwrap();
                b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
                std::fs::write(&p, b).unwrap()
            },
            load,
            &["weights.safetensors"],
        ),
        case(
            "model: a NaN weight",
            |r| {
                saved(r);
                replace_first(&model_file(r, "weights.safetensors"), "head", nan_like)
            },
            load,
            &["weights.safetensors", "NaN"],
        ),
        case(
            "model: a weight missing",
            |r| {
                saved(r);
                let p = model_file(r, "weights.safetensors");
                let n = first_tensor(&p, "head");
                edit_tensors(&p, |t| {
                    t.remove(&n);
                })
            },
            load,
            &["weights.safetensors", "missing"],
        ),
        case(
            "model: an extra weight",
            |r| {
                saved(r);
                edit_tensors(&model_file(r, "weights.safetensors"), |t| {
                    t.insert(
                        "head.extra".into(),
                        Tensor::zeros(3, DType::F32, &common::device()).unwrap(),
                    );
                })
            },
            load,
            &["weights.safetensors", "head.extra"],
        ),
        case(
            "model: a weight of another shape",
            |r| {
                saved(r);
                replace_first(&model_file(r, "weights.safetensors"), "head", |_| {
                    Tensor::zeros(3, DType::F32, &common::device()).unwrap()
                })
            },
            load,
            &["weights.safetensors", "shape"],
        ),
        case(
            "model: an integer weight",
            |r| {
                saved(r);
                replace_first(&model_file(r, "weights.safetensors"), "head", |t| {
                    t.to_dtype(DType::I64).unwrap()
                })
            },
            load,
            &["weights.safetensors", "dtype"],
        ),
        case(
            "model: encoder config garbage",
            |r| {
                saved(r);
                garbage(&model_file(r, "encoders/text/config.json"))
            },
            load,
            &["encoders/text/config.json"],
        ),
        case(
            "model: encoder config a FIFO",
            |r| {
                saved(r);
                fifo(&model_file(r, "encoders/text/config.json"))
            },
            load,
            &["encoders/text/config.json", "FIFO"],
        ),
        case(
            "model: encoder directory missing",
            |r| {
                saved(r);
                std::fs::remove_dir_all(model_file(r, "encoders/text")).unwrap()
            },
            load,
            &["encoders/text"],
        ),
        case(
            "model: the directory is a regular file",
            |r| std::fs::write(r.join("model"), b"x").unwrap(),
            load,
            &["model"],
        ),
        case("model: the directory is missing", |_| {}, load, &["model"]),
    ]
}

// ---- saving a model -----------------------------------------------------------------------------

fn save_to(root: &Path) -> Outcome {
    faq().save(&root.join("model"))
}

fn save_cases() -> Vec<Case> {
    vec![
        case(
            "save: the lock file is a directory",
            |r| std::fs::create_dir(r.join(".model.lock")).unwrap(),
            save_to,
            &[".model.lock", "not a regular file"],
        ),
        case(
            "save: the lock file is a FIFO",
            |r| fifo(&r.join(".model.lock")),
            save_to,
            &[".model.lock", "FIFO"],
        ),
        case(
            "save: over a model whose marker is a FIFO",
            |r| {
                saved(r);
                fifo(&model_file(r, ".similarity"))
            },
            save_to,
            &["model", "did not write"],
        ),
        case(
            "save: over a directory of the user's",
            |r| {
                std::fs::create_dir(r.join("model")).unwrap();
                std::fs::write(r.join("model/notes.txt"), b"mine").unwrap()
            },
            save_to,
            &["model", "did not write"],
        ),
        case(
            "save: over a regular file",
            |r| std::fs::write(r.join("model"), b"mine").unwrap(),
            save_to,
            &["model", "regular file"],
        ),
        case(
            "save: over a symbolic link",
            |r| {
                std::fs::create_dir(r.join("real")).unwrap();
                std::os::unix::fs::symlink(r.join("real"), r.join("model")).unwrap()
            },
            save_to,
            &["model", "symbolic link"],
        ),
        case(
            "save: over a FIFO",
            |r| fifo(&r.join("model")),
            save_to,
            &["model", "FIFO"],
        ),
        case(
            "save: over a logs directory",
            |r| {
                let cfg = TrainerConfig {
                    logs_dir: Some(r.join("model")),
                    ..config()
                };
                Trainer::new(cfg).fit(&mut faq(), &pairs(), None).unwrap();
            },
            save_to,
            &["model", "logs"],
        ),
        case(
            "save: over a checkpoint",
            |r| {
                let cfg = TrainerConfig {
                    checkpoints: Some(checkpoints(r)),
                    ..config()
                };
                Trainer::new(cfg).fit(&mut faq(), &pairs(), None).unwrap();
                std::fs::rename(r.join("ckpt/last"), r.join("model")).unwrap();
            },
            save_to,
            &["model", "checkpoint"],
        ),
        case(
            "save: NaN weights",
            |_| {},
            |r| {
                let model = faq();
                let (_, var) = model
                    .state()
                    .named_trainable_vars()
                    .into_iter()
                    .next()
                    .unwrap();
                var.set(&nan_like(var.as_tensor())).unwrap();
                model.save(&r.join("model"))
            },
            &["model", "non-finite", "not saved"],
        ),
        case(
            "save: while another writer holds it",
            |_| {},
            |r| {
                let _held = similarity_core::files::PathLock::acquire(&r.join("model"))?;
                save_to(r)
            },
            &["model", "in use by process"],
        ),
        case(
            "save: under a regular file",
            |r| std::fs::write(r.join("file"), b"x").unwrap(),
            |r| faq().save(&r.join("file/model")),
            &["file"],
        ),
        case(
            "save: to a path with no name",
            |_| {},
            |r| faq().save(&r.join("model/..")),
            &["no final component"],
        ),
    ]
}

// ---- checkpoints ---------------------------------------------------------------------------------

fn trained_checkpoint(root: &Path) {
    let cfg = TrainerConfig {
        checkpoints: Some(checkpoints(root)),
        ..config()
    };
    Trainer::new(cfg).fit(&mut faq(), &pairs(), None).unwrap();
}

fn group_checkpoint(root: &Path) {
    let cfg = TrainerConfig {
        checkpoints: Some(checkpoints(root)),
        ..config()
    };
    Trainer::new(cfg)
        .fit(&mut group_model(), &groups(), None)
        .unwrap();
}

fn weights_of<M: TrainableModel>(model: &M) -> Vec<Vec<f32>> {
    common::weights(model)
}

/// Resumes a fresh model from `ckpt/last`; also checks that the failure left the model's
/// weights as they were.
fn resume(root: &Path) -> Outcome {
    let mut model = faq();
    let before = weights_of(&model);
    let cfg = TrainerConfig {
        epochs: 3,
        ..config()
    };
    let result = Trainer::new(cfg).resume(&mut model, &root.join("ckpt/last"), &pairs(), None);
    assert_eq!(
        weights_of(&model),
        before,
        "a failed resume changed the model"
    );
    result.map(drop)
}

fn resume_group(root: &Path) -> Outcome {
    let mut model = group_model();
    let before = weights_of(&model);
    let cfg = TrainerConfig {
        epochs: 3,
        ..config()
    };
    let result = Trainer::new(cfg).resume(&mut model, &root.join("ckpt/last"), &groups(), None);
    assert_eq!(
        weights_of(&model),
        before,
        "a failed resume changed the model"
    );
    result.map(drop)
}

fn ckpt(root: &Path, name: &str) -> PathBuf {
    root.join("ckpt/last").join(name)
}

fn checkpoint_cases() -> Vec<Case> {
    vec![
        case(
            "checkpoint: state.json missing",
            |r| {
                trained_checkpoint(r);
                std::fs::remove_file(ckpt(r, "state.json")).unwrap()
            },
            resume,
            &["state.json"],
        ),
        case(
            "checkpoint: state.json garbage",
            |r| {
                trained_checkpoint(r);
                garbage(&ckpt(r, "state.json"))
            },
            resume,
            &["state.json"],
        ),
        case(
            "checkpoint: state.json a FIFO",
            |r| {
                trained_checkpoint(r);
                fifo(&ckpt(r, "state.json"))
            },
            resume,
            &["state.json", "FIFO"],
        ),
        case(
            "checkpoint: format_version 7",
            |r| {
                trained_checkpoint(r);
                edit_json(&ckpt(r, "state.json"), |v| v["format_version"] = 7.into())
            },
            resume,
            &["state.json", "format_version 7"],
        ),
        case(
            "checkpoint: another model type",
            |r| {
                trained_checkpoint(r);
                edit_json(&ckpt(r, "state.json"), |v| v["model"] = "Other".into())
            },
            resume,
            &["state.json", "Other"],
        ),
        case(
            "checkpoint: weights missing",
            |r| {
                trained_checkpoint(r);
                std::fs::remove_file(ckpt(r, "weights.safetensors")).unwrap()
            },
            resume,
            &["weights.safetensors", "missing"],
        ),
        case(
            "checkpoint: weights -> /dev/zero",
            |r| {
                trained_checkpoint(r);
                to_dev_zero(&ckpt(r, "weights.safetensors"))
            },
            resume,
            &["weights.safetensors", "character device"],
        ),
        case(
            "checkpoint: a weight missing",
            |r| {
                trained_checkpoint(r);
                let p = ckpt(r, "weights.safetensors");
                let n = first_tensor(&p, "head");
                edit_tensors(&p, |t| {
                    t.remove(&n);
                })
            },
            resume,
            &["weights.safetensors", "missing variable"],
        ),
        case(
            "checkpoint: a weight of another shape",
            |r| {
                trained_checkpoint(r);
                replace_first(&ckpt(r, "weights.safetensors"), "head", |_| {
                    Tensor::zeros((2, 2), DType::F32, &common::device()).unwrap()
                })
            },
            resume,
            &["weights.safetensors", "shape"],
        ),
        case(
            "checkpoint: a NaN weight",
            |r| {
                trained_checkpoint(r);
                replace_first(&ckpt(r, "weights.safetensors"), "head", nan_like)
            },
            resume,
            &["weights.safetensors", "NaN"],
        ),
        case(
            "checkpoint: an extra weight",
            |r| {
                trained_checkpoint(r);
                edit_tensors(&ckpt(r, "weights.safetensors"), |t| {
                    t.insert(
                        "head.extra".into(),
                        Tensor::zeros(2, DType::F32, &common::device()).unwrap(),
                    );
                })
            },
            resume,
            &["weights.safetensors", "head.extra"],
        ),
        case(
            "checkpoint: an integer weight",
            |r| {
                trained_checkpoint(r);
                replace_first(&ckpt(r, "weights.safetensors"), "head", |t| {
                    t.to_dtype(DType::I64).unwrap()
                })
            },
            resume,
            &["weights.safetensors", "dtype"],
        ),
        case(
            "checkpoint: a moment of the wrong length",
            |r| {
                trained_checkpoint(r);
                replace_first(&ckpt(r, "optimizer.safetensors"), "m.", |_| {
                    Tensor::zeros(5, DType::F32, &common::device()).unwrap()
                })
            },
            resume,
            &["optimizer.safetensors", "shape"],
        ),
        case(
            "checkpoint: one moment of a pair missing",
            |r| {
                trained_checkpoint(r);
                let p = ckpt(r, "optimizer.safetensors");
                let n = first_tensor(&p, "v.");
                edit_tensors(&p, |t| {
                    t.remove(&n);
                })
            },
            resume,
            &["optimizer.safetensors", "only one of the moments"],
        ),
        case(
            "checkpoint: both moments of a variable missing",
            |r| {
                trained_checkpoint(r);
                let p = ckpt(r, "optimizer.safetensors");
                let m = first_tensor(&p, "m.");
                let v = format!("v.{}", &m[2..]);
                edit_tensors(&p, |t| {
                    t.remove(&m);
                    t.remove(&v);
                })
            },
            resume,
            &["optimizer.safetensors", "missing the moments"],
        ),
        case(
            "checkpoint: a NaN moment",
            |r| {
                trained_checkpoint(r);
                replace_first(&ckpt(r, "optimizer.safetensors"), "m.", nan_like)
            },
            resume,
            &["optimizer.safetensors", "NaN"],
        ),
        case(
            "checkpoint: an unknown moment",
            |r| {
                trained_checkpoint(r);
                edit_tensors(&ckpt(r, "optimizer.safetensors"), |t| {
                    t.insert(
                        "m.nothing".into(),
                        Tensor::zeros(2, DType::F32, &common::device()).unwrap(),
                    );
                })
            },
            resume,
            &["optimizer.safetensors", "m.nothing"],
        ),
        case(
            "checkpoint: optimizer file missing",
            |r| {
                trained_checkpoint(r);
                std::fs::remove_file(ckpt(r, "optimizer.safetensors")).unwrap()
            },
            resume,
            &["optimizer.safetensors", "missing"],
        ),
        case(
            "checkpoint: optimizer file truncated",
            |r| {
                trained_checkpoint(r);
                truncate(&ckpt(r, "optimizer.safetensors"))
            },
            resume,
            &["optimizer.safetensors"],
        ),
        case(
            "checkpoint: optimizer file a FIFO",
            |r| {
                trained_checkpoint(r);
                fifo(&ckpt(r, "optimizer.safetensors"))
            },
            resume,
            &["optimizer.safetensors", "FIFO"],
        ),
        case(
            "checkpoint: state.json lists a memory tensor the file lacks",
            |r| {
                group_checkpoint(r);
                edit_json(&ckpt(r, "state.json"), |v| {
                    v["extra_tensors"]
                        .as_array_mut()
                        .unwrap()
                        .push("xbm.bogus".into())
                })
            },
            resume_group,
            &["extra.safetensors", "xbm.bogus"],
        ),
        case(
            "checkpoint: memory file missing",
            |r| {
                group_checkpoint(r);
                std::fs::remove_file(ckpt(r, "extra.safetensors")).unwrap()
            },
            resume_group,
            &["extra.safetensors", "missing"],
        ),
        case(
            "checkpoint: memory of another width",
            |r| {
                group_checkpoint(r);
                edit_tensors(&ckpt(r, "extra.safetensors"), |t| {
                    t.insert(
                        "xbm.embeddings".into(),
                        Tensor::zeros((64, 5), DType::F32, &common::device()).unwrap(),
                    );
                })
            },
            resume_group,
            &["extra.safetensors", "xbm.embeddings", "(64, 32)"],
        ),
        case(
            "checkpoint: memory holding NaN",
            |r| {
                group_checkpoint(r);
                let p = ckpt(r, "extra.safetensors");
                edit_tensors(&p, |t| {
                    let e = nan_like(&t["xbm.embeddings"]);
                    t.insert("xbm.embeddings".into(), e);
                })
            },
            resume_group,
            &["extra.safetensors", "xbm.embeddings"],
        ),
        case(
            "checkpoint: memory pointer out of range",
            |r| {
                group_checkpoint(r);
                edit_tensors(&ckpt(r, "extra.safetensors"), |t| {
                    t.insert(
                        "xbm.pointer_len".into(),
                        Tensor::new(&[64i64, 3], &common::device()).unwrap(),
                    );
                })
            },
            resume_group,
            &["extra.safetensors", "pointer 64"],
        ),
        case(
            "checkpoint: memory groups as floats",
            |r| {
                group_checkpoint(r);
                edit_tensors(&ckpt(r, "extra.safetensors"), |t| {
                    t.insert(
                        "xbm.groups".into(),
                        Tensor::zeros(64, DType::F32, &common::device()).unwrap(),
                    );
                })
            },
            resume_group,
            &["extra.safetensors", "xbm.groups"],
        ),
        case(
            "checkpoint: the directory is a regular file",
            |r| {
                std::fs::create_dir_all(r.join("ckpt")).unwrap();
                std::fs::write(r.join("ckpt/last"), b"x").unwrap()
            },
            resume,
            &["state.json"],
        ),
        case(
            "checkpoint: a second run on the same directory",
            trained_checkpoint,
            |r| {
                let _held = similarity_core::files::PathLock::acquire(&r.join("ckpt"))?;
                let cfg = TrainerConfig {
                    checkpoints: Some(checkpoints(r)),
                    ..config()
                };
                Trainer::new(cfg).fit(&mut faq(), &pairs(), None).map(drop)
            },
            &["ckpt", "in use by process"],
        ),
    ]
}

// ---- persisted caches -------------------------------------------------------------------------

fn cached(root: &Path) {
    let cfg = TrainerConfig {
        cache_dir: Some(root.join("cache")),
        ..config()
    };
    Trainer::new(cfg).fit(&mut faq(), &pairs(), None).unwrap();
}

fn fit_cached(root: &Path) -> Outcome {
    let cfg = TrainerConfig {
        cache_dir: Some(root.join("cache")),
        ..config()
    };
    Trainer::new(cfg).fit(&mut faq(), &pairs(), None).map(drop)
}

fn cache(root: &Path, name: &str) -> PathBuf {
    root.join("cache/text").join(name)
}

/// Rewrites `rows.bin` through `edit` and fixes the checksum, so that only the edit is
/// wrong.
fn edit_rows(root: &Path, edit: impl FnOnce(&mut Vec<u8>)) {
    let rows = cache(root, "rows.bin");
    let mut b = std::fs::read(&rows).unwrap();
    edit(&mut b);
    std::fs::write(&rows, &b).unwrap();
    let sum = format!("{:032x}", xxhash_rust_128(&b));
    edit_json(&cache(root, "fingerprint.json"), |v| {
        v["checksum"] = sum.into()
    });
}

fn xxhash_rust_128(b: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(b)
}

fn cache_cases() -> Vec<Case> {
    vec![
        case(
            "cache: fingerprint garbage",
            |r| {
                cached(r);
                garbage(&cache(r, "fingerprint.json"))
            },
            fit_cached,
            &["fingerprint.json"],
        ),
        case(
            "cache: fingerprint a FIFO",
            |r| {
                cached(r);
                fifo(&cache(r, "fingerprint.json"))
            },
            fit_cached,
            &["fingerprint.json", "FIFO"],
        ),
        case(
            "cache: rows truncated",
            |r| {
                cached(r);
                truncate(&cache(r, "rows.bin"))
            },
            fit_cached,
            &["rows.bin", "delete"],
        ),
        case(
            "cache: a flipped byte",
            |r| {
                cached(r);
                let p = cache(r, "rows.bin");
                let mut b = std::fs::read(&p).unwrap();
                let n = b.len() - 3;
                b[n] ^= 1;
                std::fs::write(&p, b).unwrap()
            },
            fit_cached,
            &["rows.bin", "checksum"],
        ),
        case(
            "cache: rows a FIFO",
            |r| {
                cached(r);
                fifo(&cache(r, "rows.bin"))
            },
            fit_cached,
            &["rows.bin", "FIFO"],
        ),
        case(
            "cache: rows -> /dev/zero",
            |r| {
                cached(r);
                to_dev_zero(&cache(r, "rows.bin"))
            },
            fit_cached,
            &["rows.bin", "character device"],
        ),
        case(
            "cache: a huge item count",
            |r| {
                cached(r);
                edit_json(&cache(r, "fingerprint.json"), |v| {
                    v["items"] = (usize::MAX / 4).into()
                })
            },
            fit_cached,
            &["rows.bin"],
        ),
        case(
            "cache: a NaN row",
            |r| {
                cached(r);
                edit_rows(r, |b| {
                    let n = b.len() - 4;
                    b[n..].copy_from_slice(&f32::NAN.to_le_bytes());
                })
            },
            fit_cached,
            &["rows.bin", "non-finite"],
        ),
        case(
            "cache: unsorted keys",
            |r| {
                cached(r);
                edit_rows(r, |b| {
                    let (a, c) = (8, 24);
                    let k: Vec<u8> = b[a..a + 16].to_vec();
                    let k2: Vec<u8> = b[c..c + 16].to_vec();
                    b[a..a + 16].copy_from_slice(&k2);
                    b[c..c + 16].copy_from_slice(&k);
                })
            },
            fit_cached,
            &["rows.bin", "increasing"],
        ),
        case(
            "cache: bad magic",
            |r| {
                cached(r);
                edit_rows(r, |b| b[0] = b'X')
            },
            fit_cached,
            &["rows.bin", "SIMCACHE"],
        ),
        case(
            "cache: a directory of the user's in its place",
            |r| {
                std::fs::create_dir_all(r.join("cache/text")).unwrap();
                std::fs::write(r.join("cache/text/notes.txt"), b"mine").unwrap()
            },
            fit_cached,
            &["text", "did not write"],
        ),
        case(
            "cache: a regular file in its place",
            |r| {
                std::fs::create_dir_all(r.join("cache")).unwrap();
                std::fs::write(r.join("cache/text"), b"mine").unwrap()
            },
            fit_cached,
            &["text", "regular file"],
        ),
    ]
}

// ---- logs ------------------------------------------------------------------------------------------

fn fit_logs(root: &Path) -> Outcome {
    let cfg = TrainerConfig {
        logs_dir: Some(root.join("logs")),
        ..config()
    };
    Trainer::new(cfg).fit(&mut faq(), &pairs(), None).map(drop)
}

fn log_cases() -> Vec<Case> {
    vec![
        case(
            "logs: a directory of the user's",
            |r| {
                std::fs::create_dir(r.join("logs")).unwrap();
                std::fs::write(r.join("logs/metrics.csv"), b"mine").unwrap()
            },
            fit_logs,
            &["logs", "did not write"],
        ),
        case(
            "logs: a regular file",
            |r| std::fs::write(r.join("logs"), b"mine").unwrap(),
            fit_logs,
            &["logs", "regular file"],
        ),
        case(
            "logs: a saved model",
            |r| faq().save(&r.join("logs")).unwrap(),
            fit_logs,
            &["logs", "model"],
        ),
        case(
            "logs: a symbolic link",
            |r| {
                std::fs::create_dir(r.join("real")).unwrap();
                std::os::unix::fs::symlink(r.join("real"), r.join("logs")).unwrap()
            },
            fit_logs,
            &["logs", "symbolic link"],
        ),
        case(
            "logs: the checkpoint directory",
            |_| {},
            |r| {
                let cfg = TrainerConfig {
                    logs_dir: Some(r.join("ckpt")),
                    checkpoints: Some(checkpoints(r)),
                    ..config()
                };
                Trainer::new(cfg).fit(&mut faq(), &pairs(), None).map(drop)
            },
            &["TrainerConfig.logs_dir", "ckpt"],
        ),
        case(
            "logs: held by another run",
            |_| {},
            |r| {
                let _held = similarity_core::files::PathLock::acquire(&r.join("logs"))?;
                fit_logs(r)
            },
            &["logs", "in use by process"],
        ),
    ]
}

// ---- exports -----------------------------------------------------------------------------------------

fn rows() -> Tensor {
    Tensor::zeros((3, 4), DType::F32, &common::device()).unwrap()
}

fn export_cases() -> Vec<Case> {
    vec![
        case(
            "export: npy over a directory",
            |r| std::fs::create_dir(r.join("out.npy")).unwrap(),
            |r| write_npy(&r.join("out.npy"), &rows()),
            &["out.npy", "directory"],
        ),
        case(
            "export: npy over a FIFO",
            |r| fifo(&r.join("out.npy")),
            |r| write_npy(&r.join("out.npy"), &rows()),
            &["out.npy", "FIFO"],
        ),
        case(
            "export: npy over a symbolic link",
            |r| {
                std::fs::write(r.join("real"), b"mine").unwrap();
                std::os::unix::fs::symlink(r.join("real"), r.join("out.npy")).unwrap()
            },
            |r| write_npy(&r.join("out.npy"), &rows()),
            &["out.npy", "symbolic link"],
        ),
        case(
            "export: npy under a regular file",
            |r| std::fs::write(r.join("file"), b"x").unwrap(),
            |r| write_npy(&r.join("file/out.npy"), &rows()),
            &["file"],
        ),
        case(
            "export: points with too few ids",
            |_| {},
            |r| write_points_jsonl(&r.join("p.jsonl"), &[1, 2], &rows(), None),
            &["p.jsonl"],
        ),
        case(
            "export: points over a FIFO",
            |r| fifo(&r.join("p.jsonl")),
            |r| write_points_jsonl(&r.join("p.jsonl"), &[1, 2, 3], &rows(), None),
            &["p.jsonl", "FIFO"],
        ),
    ]
}

// ---- options ---------------------------------------------------------------------------------------------

fn fit_with(root: &Path, cfg: TrainerConfig) -> Outcome {
    let _ = root;
    Trainer::new(cfg).fit(&mut faq(), &pairs(), None).map(drop)
}

fn option_cases() -> Vec<Case> {
    fn none(_: &Path) {}
    vec![
        case(
            "option: epochs 0",
            none,
            |r| {
                fit_with(
                    r,
                    TrainerConfig {
                        epochs: 0,
                        ..config()
                    },
                )
            },
            &["TrainerConfig.epochs"],
        ),
        case(
            "option: batch_size 0",
            none,
            |r| {
                fit_with(
                    r,
                    TrainerConfig {
                        batch_size: 0,
                        ..config()
                    },
                )
            },
            &["TrainerConfig.batch_size"],
        ),
        case(
            "option: cache_batch_size 0",
            none,
            |r| {
                fit_with(
                    r,
                    TrainerConfig {
                        cache_batch_size: 0,
                        ..config()
                    },
                )
            },
            &["TrainerConfig.cache_batch_size"],
        ),
        case(
            "option: clip_grad_norm -1",
            none,
            |r| {
                fit_with(
                    r,
                    TrainerConfig {
                        clip_grad_norm: Some(-1.0),
                        ..config()
                    },
                )
            },
            &["TrainerConfig.clip_grad_norm", "-1"],
        ),
        case(
            "option: clip_grad_norm 0",
            none,
            |r| {
                fit_with(
                    r,
                    TrainerConfig {
                        clip_grad_norm: Some(0.0),
                        ..config()
                    },
                )
            },
            &["TrainerConfig.clip_grad_norm"],
        ),
        case(
            "option: clip_grad_norm NaN",
            none,
            |r| {
                fit_with(
                    r,
                    TrainerConfig {
                        clip_grad_norm: Some(f64::NAN),
                        ..config()
                    },
                )
            },
            &["TrainerConfig.clip_grad_norm", "NaN"],
        ),
        case(
            "option: lr 0",
            none,
            |r| {
                fit_with(
                    r,
                    TrainerConfig {
                        optimizer: OptimizerConfig::adam(0.0),
                        ..config()
                    },
                )
            },
            &["lr"],
        ),
        case(
            "option: lr NaN",
            none,
            |r| {
                fit_with(
                    r,
                    TrainerConfig {
                        optimizer: OptimizerConfig::adam(f64::NAN),
                        ..config()
                    },
                )
            },
            &["lr"],
        ),
        case(
            "option: step gamma < 0",
            none,
            |r| {
                fit_with(
                    r,
                    TrainerConfig {
                        schedule: LrSchedule::Step {
                            every_epochs: 1,
                            gamma: -0.5,
                        },
                        ..config()
                    },
                )
            },
            &["gamma"],
        ),
        case(
            "option: step every 0 epochs",
            none,
            |r| {
                fit_with(
                    r,
                    TrainerConfig {
                        schedule: LrSchedule::Step {
                            every_epochs: 0,
                            gamma: 0.5,
                        },
                        ..config()
                    },
                )
            },
            &["every_epochs"],
        ),
        case(
            "option: cosine min_factor < 0",
            none,
            |r| {
                fit_with(
                    r,
                    TrainerConfig {
                        schedule: LrSchedule::WarmupCosine {
                            warmup_steps: 0,
                            min_factor: -0.5,
                        },
                        ..config()
                    },
                )
            },
            &["min_factor"],
        ),
        case(
            "option: min_delta NaN",
            none,
            |r| {
                fit_with(
                    r,
                    TrainerConfig {
                        early_stopping: Some(EarlyStopping {
                            monitor: "train_loss".into(),
                            mode: MonitorMode::Min,
                            patience: 1,
                            min_delta: f64::NAN,
                        }),
                        ..config()
                    },
                )
            },
            &["min_delta"],
        ),
        case(
            "option: monitor needing a validation set",
            none,
            |r| {
                fit_with(
                    r,
                    TrainerConfig {
                        early_stopping: Some(EarlyStopping {
                            monitor: "val_loss".into(),
                            mode: MonitorMode::Min,
                            patience: 1,
                            min_delta: 0.0,
                        }),
                        ..config()
                    },
                )
            },
            &["TrainerConfig.early_stopping", "val_loss"],
        ),
        case(
            "option: a negative lr factor",
            none,
            |r| {
                fit_with(
                    r,
                    TrainerConfig {
                        param_groups: vec![similarity_core::train::ParamGroup {
                            prefix: "head".into(),
                            lr_factor: -1.0,
                        }],
                        ..config()
                    },
                )
            },
            &["head", "lr_factor"],
        ),
        case(
            "option: a group matching nothing",
            none,
            |r| {
                fit_with(
                    r,
                    TrainerConfig {
                        param_groups: vec![similarity_core::train::ParamGroup {
                            prefix: "nothing".into(),
                            lr_factor: 1.0,
                        }],
                        ..config()
                    },
                )
            },
            &["nothing"],
        ),
        case(
            "option: class-balanced batches of pairs",
            none,
            |r| {
                fit_with(
                    r,
                    TrainerConfig {
                        sampler: similarity_core::data::Sampler::ClassBalanced { m: 2 },
                        ..config()
                    },
                )
            },
            &["TrainerConfig.sampler"],
        ),
    ]
}

// ---- data ----------------------------------------------------------------------------------------------------

fn data_cases() -> Vec<Case> {
    fn none(_: &Path) {}
    vec![
        case(
            "data: an empty training set",
            none,
            |_| Trainer::new(config()).fit(&mut faq(), &[], None).map(drop),
            &["training set", "empty"],
        ),
        case(
            "data: an empty validation set",
            none,
            |_| {
                Trainer::new(config())
                    .fit(&mut faq(), &pairs(), Some(&[]))
                    .map(drop)
            },
            &["validation set", "empty"],
        ),
        case(
            "data: a score outside [0, 1]",
            none,
            |_| {
                let mut data = pairs();
                data[2].score = -0.5;
                Trainer::new(config())
                    .fit(&mut faq(), &data, None)
                    .map(drop)
            },
            &["sample 2", "score"],
        ),
        case(
            "data: a stream that fails",
            none,
            |_| {
                let items = pairs()
                    .into_iter()
                    .map(Ok)
                    .chain([Err(similarity_core::Error::invalid("line 25", "not JSON"))]);
                Trainer::new(config())
                    .fit_iter(&mut faq(), items, None)
                    .map(drop)
            },
            &["line 25", "item 24 of the stream"],
        ),
        case(
            "data: groups of one item each",
            none,
            |_| {
                let data: Vec<_> = pairs()
                    .into_iter()
                    .enumerate()
                    .map(|(i, p)| SimilarityGroupSample::new(p.obj_a, i as i64))
                    .collect();
                Trainer::new(config())
                    .fit(&mut group_model(), &data, None)
                    .map(drop)
            },
            &["training set", "single item"],
        ),
        case(
            "data: evaluation of an empty set",
            none,
            |_| Trainer::new(config()).evaluate(&mut faq(), &[]).map(drop),
            &["evaluation set", "empty"],
        ),
        case(
            "data: drop_last with a batch larger than the set",
            none,
            |_| {
                Trainer::new(TrainerConfig {
                    batch_size: 100,
                    drop_last: true,
                    ..config()
                })
                .fit(&mut faq(), &pairs(), None)
                .map(drop)
            },
            &["drop_last"],
        ),
    ]
}

#[test]
fn hostile_model_directories() {
    run(&model_cases());
}

#[test]
fn hostile_saves() {
    run(&save_cases());
}

#[test]
fn hostile_checkpoints() {
    run(&checkpoint_cases());
}

#[test]
fn hostile_caches() {
    run(&cache_cases());
}

#[test]
fn hostile_logs_and_exports() {
    run(&log_cases());
    run(&export_cases());
}

#[test]
fn hostile_options_and_data() {
    run(&option_cases());
    run(&data_cases());
}

#[test]
fn the_suite_has_at_least_80_cases() {
    let n = [
        model_cases().len(),
        save_cases().len(),
        checkpoint_cases().len(),
        cache_cases().len(),
        log_cases().len(),
        export_cases().len(),
        option_cases().len(),
        data_cases().len(),
    ];
    assert!(n.iter().sum::<usize>() >= 80, "{n:?}");
}
