//! A weights file of arbitrary bytes loaded into a model's parameters, and into a
//! cross-batch memory's state.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use similarity_core::prelude::*;
use similarity_core::xbm::XbmConfig;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    std::fs::write(&path, data).unwrap();
    let model = common::tiny();
    let _ = model.state().params().load_safetensors(&path);
    if let Ok(tensors) = similarity_core::candle_core::safetensors::load(&path, &Device::Cpu) {
        let mut memory = Xbm::new(
            XbmConfig {
                size: 4,
                ..Default::default()
            },
            &Device::Cpu,
        )
        .unwrap();
        let _ = memory.load_state(&tensors, 3);
    }
});
