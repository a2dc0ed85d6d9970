//! The fused CPU kernels outside the losses, held against the composite forms on the test
//! device: the SkipConnectionHead block (forward and backward), an Adam and an AdamW step,
//! and the cached-row gather. Each runs in f32 on the test device and in f64 on the CPU;
//! on the CPU the f32 run takes the fused kernels and the f64 run the composite forms, and
//! under `SIMILARITY_TEST_DEVICE=cuda` the f32 run is the composite forms on the GPU. (The
//! losses' kernels are checked the same way in `tests/degenerate.rs`.)

mod common;

use similarity_core::cache::{CacheType, EncoderCache};
use similarity_core::candle_core::{DType, Device, Tensor, Var};
use similarity_core::head::{Head, SkipConnectionHead, SkipConnectionHeadConfig};
use similarity_core::nn::{Mode, Params};
use similarity_core::train::{Optimizer, OptimizerConfig};

const N: usize = 9;
const D: usize = 16;

fn values(n: usize, salt: f64) -> Vec<f64> {
    (0..n).map(|i| ((i as f64 + salt) * 0.731).sin()).collect()
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// `got` (f32, test device) against `want` (f64, CPU), relative to `want`'s largest entry.
fn assert_close(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        // f32 rounding over sums of D products, with room to spare.
        assert!(
            (a - b).abs() <= 1e-5 * (1.0 + scale),
            "{what}[{i}]: {a} on the test device vs {b} on the CPU in f64"
        );
    }
}

/// A SkipConnectionHead of two blocks on `device` (f32, gates opened so the branch
/// counts), its output for a fixed input, and the gradients of a fixed weighting of that
/// output with respect to the input and every variable (by name); also the weights.
#[allow(clippy::type_complexity)]
fn head_run(device: &Device) -> (Vec<f64>, Vec<(String, Vec<f64>)>, Vec<(String, Vec<f64>)>) {
    let mut params = Params::new(device, 3);
    let head = SkipConnectionHead::new(
        D,
        SkipConnectionHeadConfig {
            n_layers: 2,
            ..Default::default()
        },
        &mut params.scope("head"),
    )
    .unwrap();
    for (name, var) in params.named_vars() {
        if name.contains("gates") {
            var.set(&(var.as_tensor().ones_like().unwrap() * 0.5).unwrap())
                .unwrap();
        }
    }
    let input = Tensor::from_vec(values(N * D, 0.0), (N, D), device)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let x = Var::from_tensor(&input).unwrap();
    let y = head.forward(x.as_tensor(), &mut Mode::Eval).unwrap();
    let w = Tensor::from_vec(values(N * D, 7.0), (N, D), device)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let mut g = vec![("input".to_string(), flat(grads.get(&x).unwrap()))];
    let mut weights = Vec::new();
    for (name, var) in params.named_vars() {
        g.push((name.clone(), grads.get(var).map(flat).unwrap_or_default()));
        weights.push((name.clone(), flat(var.as_tensor())));
    }
    (flat(&y), g, weights)
}

/// The same head written out from its formula, `x <- fc(x) * sigmoid(gates) + x` per
/// block, in f64 on the CPU with `weights` (by name), and the same gradients.
fn head_reference(weights: &[(String, Vec<f64>)]) -> (Vec<f64>, Vec<(String, Vec<f64>)>) {
    let cpu = Device::Cpu;
    let var = |name: &str, shape: &[usize]| {
        let (_, v) = weights.iter().find(|(n, _)| n == name).unwrap();
        Var::from_tensor(&Tensor::from_vec(v.clone(), shape, &cpu).unwrap()).unwrap()
    };
    let x = Var::from_tensor(&Tensor::from_vec(values(N * D, 0.0), (N, D), &cpu).unwrap()).unwrap();
    let mut vars = Vec::new();
    let mut h = x.as_tensor().clone();
    for i in 0..2 {
        let fw = var(&format!("head.fc_{i}.weight"), &[D, D]);
        let fb = var(&format!("head.fc_{i}.bias"), &[D]);
        let gates = var(&format!("head.gates_{i}"), &[D]);
        let fc = h
            .matmul(&fw.as_tensor().t().unwrap())
            .unwrap()
            .broadcast_add(fb.as_tensor())
            .unwrap();
        let sigma = (gates.as_tensor().neg().unwrap().exp().unwrap() + 1.0)
            .unwrap()
            .recip()
            .unwrap();
        h = (fc.broadcast_mul(&sigma).unwrap() + &h).unwrap();
        vars.extend([
            (format!("head.fc_{i}.weight"), fw),
            (format!("head.fc_{i}.bias"), fb),
            (format!("head.gates_{i}"), gates),
        ]);
    }
    let w = Tensor::from_vec(values(N * D, 7.0), (N, D), &cpu).unwrap();
    let grads = (&h * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let mut g = vec![("input".to_string(), flat(grads.get(&x).unwrap()))];
    for (name, v) in &vars {
        g.push((name.clone(), flat(grads.get(v).unwrap())));
    }
    (flat(&h), g)
}

#[test]
fn the_skip_connection_block_matches_its_formula_on_every_device() {
    let (y, grads, weights) = head_run(&common::device());
    let (y64, grads64) = head_reference(&weights);
    assert_close(&y, &y64, "head output");
    assert_eq!(grads.len(), grads64.len(), "every variable has a gradient");
    for (name, want) in &grads64 {
        let (_, got) = grads.iter().find(|(n, _)| n == name).unwrap();
        assert_close(got, want, &format!("gradient of {name}"));
    }
}

/// Three optimiser steps on f(θ) = Σ c·θ³ (gradients that change sign and size).
fn optimizer_run(config: OptimizerConfig, device: &Device, dtype: DType) -> Vec<f64> {
    let theta = Var::from_tensor(
        &Tensor::from_vec(values(N * D, 1.0), (N, D), device)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
    )
    .unwrap();
    let mut opt = Optimizer::new(config, vec![("w".into(), theta.clone())], &[]).unwrap();
    for step in 0..3 {
        let loss = (theta.as_tensor().powf(3.0).unwrap() * (1.0 + step as f64 * 0.5))
            .unwrap()
            .sum_all()
            .unwrap();
        opt.step(&loss.backward().unwrap(), 0.7, 0.9).unwrap();
    }
    flat(theta.as_tensor())
}

#[test]
fn adam_and_adamw_steps_match_across_devices() {
    for config in [
        OptimizerConfig::adam(0.01),
        OptimizerConfig::AdamW {
            lr: 0.01,
            weight_decay: 0.1,
        },
    ] {
        assert_close(
            &optimizer_run(config, &common::device(), DType::F32),
            &optimizer_run(config, &Device::Cpu, DType::F64),
            &format!("{config:?}"),
        );
    }
}

#[test]
fn cached_rows_are_gathered_alike_on_every_device() {
    let rows = Tensor::from_vec(values(N * D, 2.0), (N, D), &Device::Cpu).unwrap();
    let keys: Vec<u128> = (0..N as u128).map(|k| k * 7 + 1).collect();
    let ids = vec![4u32, 0, 8, 4, 2];
    let expected: Vec<f64> = ids
        .iter()
        .flat_map(|&i| flat(&rows.get(i as usize).unwrap()))
        .collect();
    for cache_type in [CacheType::Cpu, CacheType::Auto] {
        let device = common::device();
        let mut cache = EncoderCache::new(cache_type, &device).unwrap().unwrap();
        cache
            .load(&keys, rows.to_dtype(DType::F32).unwrap())
            .unwrap();
        let got = cache
            .lookup(&cache.row_tensor(ids.clone()).unwrap(), &device)
            .unwrap();
        assert!(got.device().same_device(&device), "{cache_type:?}");
        assert_close(&flat(&got), &expected, &format!("{cache_type:?} gather"));
    }
}
