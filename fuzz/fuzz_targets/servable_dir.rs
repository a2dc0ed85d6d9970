//! A saved model directory whose files are arbitrary bytes: loading must return an error
//! (or a model), never panic or allocate by a length read from the file.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use similarity_core::TrainableModel;
use similarity_core::prelude::*;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    common::tiny().save(&model).unwrap();
    let parts = common::split(data, 3);
    std::fs::write(model.join("config.json"), parts[0]).unwrap();
    std::fs::write(model.join("weights.safetensors"), parts[1]).unwrap();
    std::fs::write(model.join("encoders/text/config.json"), parts[2]).unwrap();
    let _ = common::Tiny::load(&model, &Device::Cpu);
});
