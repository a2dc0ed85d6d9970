//! A persisted embedding cache whose files are arbitrary bytes: loading must return an
//! error, a stale verdict or a cache, never panic or allocate by a length read from the
//! file before it is checked against the file's size.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use similarity_core::cache::store::{self, EncoderFingerprint};
use similarity_core::prelude::*;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("text");
    let model = common::tiny();
    let fingerprint = EncoderFingerprint::of(&model.text).unwrap();
    let rows = Tensor::zeros((2, 8), similarity_core::DType::F32, &Device::Cpu).unwrap();
    store::save(&cache, &fingerprint, &[1, 2], &rows).unwrap();
    let parts = common::split(data, 2);
    std::fs::write(cache.join("fingerprint.json"), parts[0]).unwrap();
    std::fs::write(cache.join("rows.bin"), parts[1]).unwrap();
    let _ = store::load(&cache, &fingerprint, &Device::Cpu);
});
