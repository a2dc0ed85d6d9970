//! A checkpoint directory whose files are arbitrary bytes: resuming must return an error
//! (or train), never panic.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use similarity_core::prelude::*;
use similarity_core::train::CheckpointConfig;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let pairs = vec![
        SimilarityPairSample::positive("a b".to_string(), "c d".to_string()),
        SimilarityPairSample::positive("e f".to_string(), "g h".to_string()),
    ];
    let config = TrainerConfig {
        epochs: 1,
        batch_size: 2,
        progress: false,
        checkpoints: Some(CheckpointConfig {
            dir: dir.path().to_path_buf(),
            every_n_epochs: 0,
            save_best: false,
        }),
        ..Default::default()
    };
    Trainer::new(config.clone())
        .fit(&mut common::tiny(), &pairs, None)
        .unwrap();
    let last = dir.path().join("last");
    let parts = common::split(data, 3);
    std::fs::write(last.join("state.json"), parts[0]).unwrap();
    std::fs::write(last.join("weights.safetensors"), parts[1]).unwrap();
    std::fs::write(last.join("optimizer.safetensors"), parts[2]).unwrap();
    let config = TrainerConfig {
        epochs: 2,
        ..config
    };
    let _ = Trainer::new(config).resume(&mut common::tiny(), &last, &pairs, None);
});
