//! Data pipeline: class-balanced batches, datasets streamed from an iterator, and
//! embedding caches persisted between runs.

mod common;

use common::Counting;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use similarity_core::data::{GroupTargets, Sampler};
use similarity_core::prelude::*;

#[trainable_model]
struct Groups {
    #[encoder(cache = "auto")]
    text: Counting,
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: TripletLoss,
}

#[trainable_model]
struct Pairs {
    #[encoder(cache = "auto")]
    text: HashedNgramEncoder,
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: MultipleNegativesRankingLoss,
}

/// A trainable-path model: the encoder is not cached, so records are needed every batch.
#[trainable_model]
struct Uncached {
    #[encoder]
    text: HashedNgramEncoder,
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: MultipleNegativesRankingLoss,
}

fn groups(n: usize, classes: i64) -> Vec<SimilarityGroupSample<String>> {
    common::faq_pairs("train", n)
        .into_iter()
        .enumerate()
        .flat_map(|(i, p)| {
            [
                SimilarityGroupSample::new(p.obj_a, i as i64 % classes),
                SimilarityGroupSample::new(p.obj_b, i as i64 % classes),
            ]
        })
        .collect()
}

fn group_model(seed: u64) -> (Groups, Arc<AtomicUsize>) {
    let objects = Arc::new(AtomicUsize::new(0));
    let m = Groups::new(Counting::new(seed, objects.clone()), &common::options()).unwrap();
    (m, objects)
}

fn config(epochs: usize, batch_size: usize) -> TrainerConfig {
    TrainerConfig {
        epochs,
        batch_size,
        cache_batch_size: 10,
        progress: false,
        optimizer: OptimizerConfig::adam(1e-2),
        ..Default::default()
    }
}

// ---- class-balanced sampling ----------------------------------------------------------

#[test]
fn class_balanced_batches_hold_m_items_of_batch_size_over_m_classes() {
    let data = groups(32, 7); // 64 samples, 7 classes of 8 or 10
    let (mut model, _) = group_model(0);
    let cfg = TrainerConfig {
        sampler: Sampler::ClassBalanced { m: 4 },
        ..config(2, 12)
    };
    let mut batches: Vec<Vec<i64>> = Vec::new();
    Trainer::new(cfg)
        .fit_with_hook(&mut model, &data, None, &mut |out| {
            let t: &GroupTargets = out.targets;
            batches.push(t.groups.to_vec1::<i64>().unwrap());
        })
        .unwrap();
    assert_eq!(
        batches.len(),
        2 * (64 / 12),
        "⌊n / batch_size⌋ steps per epoch"
    );
    for b in &batches {
        assert_eq!(b.len(), 12);
        let mut counts = std::collections::HashMap::new();
        for g in b {
            *counts.entry(*g).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 3, "{b:?}");
        assert!(counts.values().all(|&c| c == 4), "{b:?}");
    }
}

#[test]
fn class_balanced_errors_name_the_option() {
    let pairs = common::faq_pairs("train", 20);
    let mut model = Pairs::new(HashedNgramEncoder::default(), &common::options()).unwrap();
    let cfg = TrainerConfig {
        sampler: Sampler::ClassBalanced { m: 2 },
        ..config(1, 8)
    };
    let e = Trainer::new(cfg)
        .fit(&mut model, &pairs, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sampler") && e.contains("pairs"), "{e}");

    let (mut model, _) = group_model(0);
    let cfg = TrainerConfig {
        sampler: Sampler::ClassBalanced { m: 5 },
        ..config(1, 12)
    };
    let e = Trainer::new(cfg)
        .fit(&mut model, &groups(16, 4), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("sampler") && e.contains("multiple of m = 5"),
        "{e}"
    );
}

// ---- streamed datasets ----------------------------------------------------------------

#[test]
fn fit_iter_matches_fit_with_cached_encoders() {
    let data = groups(40, 5);
    let (mut a, _) = group_model(0);
    let (mut b, objects) = group_model(0);
    let trainer = Trainer::new(config(2, 16));
    let ra = trainer.fit(&mut a, &data, None).unwrap();
    let rb = trainer
        .fit_iter(&mut b, data.clone().into_iter().map(Ok), None)
        .unwrap();
    let losses = |r: &similarity_core::train::FitReport| {
        r.epochs.iter().map(|e| e.train_loss).collect::<Vec<_>>()
    };
    assert_eq!(losses(&ra), losses(&rb));
    let unique: std::collections::HashSet<&String> = data.iter().map(|s| &s.obj).collect();
    assert_eq!(
        objects.load(Ordering::SeqCst),
        unique.len(),
        "each object encoded once"
    );
}

#[test]
fn fit_iter_keeps_records_for_uncached_encoders() {
    let pairs = common::faq_pairs("train", 60);
    let build = || Uncached::new(HashedNgramEncoder::default(), &common::options()).unwrap();
    let (mut a, mut b) = (build(), build());
    let trainer = Trainer::new(config(2, 16));
    let ra = trainer.fit(&mut a, &pairs, None).unwrap();
    let rb = trainer
        .fit_iter(&mut b, pairs.clone().into_iter().map(Ok), None)
        .unwrap();
    assert_eq!(ra.epochs[1].train_loss, rb.epochs[1].train_loss);
}

#[test]
fn fit_iter_reports_stream_errors_and_empty_streams() {
    let data = groups(10, 3);
    let (mut model, _) = group_model(0);
    let trainer = Trainer::new(config(1, 8));
    let stream =
        data.into_iter()
            .map(Ok)
            .chain(std::iter::once(Err(similarity_core::Error::invalid(
                "data.jsonl line 21",
                "expected `group`",
            ))));
    let e = trainer
        .fit_iter(&mut model, stream, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("data.jsonl line 21") && e.contains("item 20 of the stream"),
        "{e}"
    );
    let e = trainer
        .fit_iter(&mut model, std::iter::empty(), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("training set") && e.contains("empty"), "{e}");
}

// ---- persisted caches -----------------------------------------------------------------

fn cached_run(
    dir: &Path,
    seed: u64,
    data: &[SimilarityGroupSample<String>],
) -> similarity_core::Result<(usize, f64)> {
    let (mut model, objects) = group_model(seed);
    let cfg = TrainerConfig {
        cache_dir: Some(dir.to_path_buf()),
        ..config(1, 16)
    };
    let report = Trainer::new(cfg).fit(&mut model, data, Some(&data[..10]))?;
    Ok((objects.load(Ordering::SeqCst), report.epochs[0].train_loss))
}

#[test]
fn persisted_cache_hit_encodes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = groups(30, 5);
    let (first, loss1) = cached_run(tmp.path(), 0, &data).unwrap();
    assert!(first > 0);
    assert!(tmp.path().join("text/fingerprint.json").exists());
    assert!(tmp.path().join("text/rows.bin").exists());
    let (second, loss2) = cached_run(tmp.path(), 0, &data).unwrap();
    assert_eq!(second, 0, "second run served entirely from the saved cache");
    assert_eq!(loss1, loss2, "the reloaded rows are the encoded ones");
}

#[test]
fn persisted_cache_is_used_after_an_evaluation_filled_the_cache() {
    // An evaluation without the cache directory (a baseline score) puts the validation
    // objects in the cache; `fit` must still take the rest from the file, not encode the
    // training set again.
    let tmp = tempfile::tempdir().unwrap();
    let data = groups(30, 5);
    let (first, loss1) = cached_run(tmp.path(), 0, &data).unwrap();
    assert!(first > 0);
    let (mut model, objects) = group_model(0);
    let trainer = Trainer::new(TrainerConfig {
        cache_dir: Some(tmp.path().to_path_buf()),
        ..config(1, 16)
    });
    Trainer::new(config(1, 16))
        .evaluate(&mut model, &data[..10])
        .unwrap();
    let by_evaluation = objects.load(Ordering::SeqCst);
    assert!(by_evaluation > 0);
    let report = trainer.fit(&mut model, &data, Some(&data[..10])).unwrap();
    assert_eq!(
        objects.load(Ordering::SeqCst),
        by_evaluation,
        "fit encoded nothing: the saved rows filled the rest"
    );
    assert_eq!(report.epochs[0].train_loss, loss1);
}

#[test]
fn evaluate_reads_a_persisted_cache_without_rewriting_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = groups(30, 5);
    cached_run(tmp.path(), 0, &data).unwrap();
    let rows = tmp.path().join("text/rows.bin");
    let before = std::fs::read(&rows).unwrap();
    let (mut model, objects) = group_model(0);
    let trainer = Trainer::new(TrainerConfig {
        cache_dir: Some(tmp.path().to_path_buf()),
        ..config(1, 16)
    });
    trainer.evaluate(&mut model, &data[..10]).unwrap();
    assert_eq!(objects.load(Ordering::SeqCst), 0, "served from the file");
    // Objects the file lacks are encoded, and the file keeps fit's key set.
    let mut other = groups(3, 5);
    other[0].obj = "an object the cache has never seen".into();
    trainer.evaluate(&mut model, &other).unwrap();
    assert_eq!(objects.load(Ordering::SeqCst), 1);
    assert_eq!(
        std::fs::read(&rows).unwrap(),
        before,
        "evaluate never rewrites the file"
    );
}

#[test]
fn persisted_cache_miss_on_changed_encoder_config() {
    let tmp = tempfile::tempdir().unwrap();
    let data = groups(30, 5);
    let (first, _) = cached_run(tmp.path(), 0, &data).unwrap();
    let (changed, _) = cached_run(tmp.path(), 1, &data).unwrap();
    assert_eq!(
        changed, first,
        "another encoder seed: everything encoded again"
    );
    let (again, _) = cached_run(tmp.path(), 1, &data).unwrap();
    assert_eq!(again, 0, "the rebuilt cache was saved");
}

#[test]
fn persisted_cache_detects_changed_data_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let mut data = groups(30, 5);
    cached_run(tmp.path(), 0, &data).unwrap();
    data[3].obj = "an object the cache has never seen".into();
    data.pop();
    let (changed, _) = cached_run(tmp.path(), 0, &data).unwrap();
    assert_eq!(changed, 1, "only the new object is encoded");
    let (again, _) = cached_run(tmp.path(), 0, &data).unwrap();
    assert_eq!(again, 0, "the file was rewritten with the new key set");
    let header: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("text/fingerprint.json")).unwrap())
            .unwrap();
    let unique: std::collections::HashSet<&String> = data.iter().map(|s| &s.obj).collect();
    assert_eq!(header["items"], unique.len(), "exactly this run's keys");
}

#[test]
fn corrupt_persisted_cache_is_an_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let data = groups(30, 5);
    cached_run(tmp.path(), 0, &data).unwrap();
    let rows = tmp.path().join("text/rows.bin");
    let bytes = std::fs::read(&rows).unwrap();
    std::fs::write(&rows, &bytes[..bytes.len() - 7]).unwrap();
    let e = cached_run(tmp.path(), 0, &data).unwrap_err().to_string();
    assert!(e.contains("rows.bin") && e.contains("bytes"), "{e}");

    std::fs::write(tmp.path().join("text/fingerprint.json"), b"{ not json").unwrap();
    let e = cached_run(tmp.path(), 0, &data).unwrap_err().to_string();
    assert!(e.contains("fingerprint.json"), "{e}");
}
