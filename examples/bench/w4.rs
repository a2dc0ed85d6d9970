//! W4: forward + backward of every loss on `--w4-batch` × `--dim` N(0, 1) embeddings
//! (pair losses: half as many pairs), `--classes` random groups; the median of 50 calls
//! after 5 warm-ups (1 and 3 where a call takes over a second).

use std::time::Instant;

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use similarity_core::candle_core::{DType, Var};
use similarity_core::data::{GroupTargets, SimilaritySample};
use similarity_core::loss::{
    ArcFaceLossConfig, CenterLossConfig, CircleLossConfig, CombinedLossConfig, CosFaceLossConfig,
    LossKind, OnlineContrastiveLossConfig, PairMining, SoftmaxLossConfig, TripletLossConfig,
    TripletMining,
};
use similarity_core::nn::Params;
use similarity_core::prelude::*;

use crate::common::*;

pub(crate) fn embeddings(n: usize, seed: u64) -> Result<Var> {
    let mut rng = StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..n * sizes().dim).map(|_| normal(&mut rng)).collect();
    Ok(Var::from_tensor(&Tensor::from_vec(
        v,
        (n, sizes().dim),
        &Device::Cpu,
    )?)?)
}

pub(crate) fn group_targets(n: usize, seed: u64) -> Result<GroupTargets> {
    let mut rng = StdRng::seed_from_u64(seed);
    let g: Vec<i64> = (0..n)
        .map(|_| rng.random_range(0..sizes().classes as i64))
        .collect();
    Ok(GroupTargets {
        groups: Tensor::from_vec(g, n, &Device::Cpu)?,
    })
}

/// `p` pairs with random subgroups; scores 0 or 1 at random, or all 1 (`positive_only`).
pub(crate) fn pair_targets(
    p: usize,
    seed: u64,
    positive_only: bool,
) -> Result<similarity_core::data::PairTargets> {
    let mut rng = StdRng::seed_from_u64(seed);
    let metas: Vec<_> = (0..p)
        .map(|_| similarity_core::data::PairMeta {
            score: if positive_only || rng.random_bool(0.5) {
                1.0
            } else {
                0.0
            },
            subgroup: rng.random_range(0..sizes().classes as i64),
        })
        .collect();
    Ok(SimilarityPairSample::<()>::targets(&metas, &Device::Cpu)?)
}

pub(crate) fn time_loss<L: SimilarityLoss>(
    name: &str,
    config: L::Config,
    e: &Var,
    targets: &<L::Kind as LossKind>::Targets,
) -> Result<Value> {
    // `--w4-only NAME` times one loss (the others are skipped and not printed).
    if arg("--w4-only").is_some_and(|only| only != name) {
        return Ok(Value::Null);
    }
    let load = Load::start();
    let mut params = Params::new(&Device::Cpu, 0);
    let loss = L::new(sizes().dim, config, &mut params.scope("loss"))?;
    let call = || -> Result<(f64, f64)> {
        let t = Instant::now();
        let l = loss.forward(e.as_tensor(), targets)?;
        let grads = l.backward()?;
        let g = grads.get(e.as_tensor()).context("no gradient")?;
        let _ = g.dims();
        let value = l.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        Ok((t.elapsed().as_secs_f64() * 1e3, value))
    };
    let (first_ms, value) = call()?;
    let (warmup, iters) = if first_ms > 1000.0 { (1, 3) } else { (5, 50) };
    for _ in 1..warmup {
        call()?;
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        times.push(call()?.0);
    }
    let min = times.iter().cloned().fold(f64::INFINITY, f64::min);
    let out = json!({
        "measurement": "w4_loss",
        "workload": "w4",
        "loss": name,
        "batch": e.dim(0)?,
        "median_ms": round(median(times.clone()), 3),
        "min_ms": round(min, 3),
        "iters": iters,
        "warmup": warmup,
        "first_call_ms": round(first_ms, 3),
        "loss_value": value,
        "candle_num_threads_env": candle_threads_env(),
        "rayon_num_threads_env": std::env::var("RAYON_NUM_THREADS").ok(),
        "sizes": sizes().json(),
        "malloc_env": malloc_env(),
        "machine_load": load.finish(),
    });
    print(&out);
    Ok(out)
}

pub(crate) fn w4() -> Result<Vec<Value>> {
    let n = sizes().w4_batch;
    let e = embeddings(n, 11)?;
    let g = group_targets(n, 12)?;
    let p = pair_targets(n / 2, 13, false)?;
    let positive = pair_targets(n / 2, 13, true)?;
    let e128 = embeddings(128, 14)?;
    let g128 = group_targets(128, 15)?;
    let e256 = embeddings(256, 16)?;
    let g256 = group_targets(256, 17)?;
    let triplet = |mining| TripletLossConfig {
        mining,
        ..Default::default()
    };
    let mut out = vec![
        time_loss::<TripletLoss>("TripletLoss_hard", triplet(TripletMining::Hard), &e, &g)?,
        time_loss::<TripletLoss>(
            "TripletLoss_semi_hard",
            triplet(TripletMining::SemiHard),
            &e,
            &g,
        )?,
        time_loss::<TripletLoss>(
            "TripletLoss_semi_hard_b128",
            triplet(TripletMining::SemiHard),
            &e128,
            &g128,
        )?,
        // Batch-all builds (N, N, N) tensors: 4 GB each at N = 1024, more than this
        // machine can hold for the forward and backward pass, so N = 256 here.
        time_loss::<TripletLoss>(
            "TripletLoss_all_b256",
            triplet(TripletMining::All),
            &e256,
            &g256,
        )?,
        time_loss::<ContrastiveLoss>("ContrastiveLoss", Default::default(), &e, &p)?,
        time_loss::<MultipleNegativesRankingLoss>(
            "MultipleNegativesRankingLoss",
            Default::default(),
            &e,
            &positive,
        )?,
        time_loss::<OnlineContrastiveLoss>(
            "OnlineContrastiveLoss_hard",
            OnlineContrastiveLossConfig {
                mining: PairMining::Hard,
                ..Default::default()
            },
            &e,
            &g,
        )?,
        time_loss::<OnlineContrastiveLoss>(
            "OnlineContrastiveLoss_all",
            OnlineContrastiveLossConfig {
                mining: PairMining::All,
                ..Default::default()
            },
            &e,
            &g,
        )?,
        time_loss::<ArcFaceLoss>(
            "ArcFaceLoss",
            ArcFaceLossConfig {
                num_groups: sizes().classes,
                ..Default::default()
            },
            &e,
            &g,
        )?,
        time_loss::<CosFaceLoss>(
            "CosFaceLoss",
            CosFaceLossConfig {
                num_groups: sizes().classes,
                ..Default::default()
            },
            &e,
            &g,
        )?,
        time_loss::<SoftmaxLoss>(
            "SoftmaxLoss",
            SoftmaxLossConfig {
                num_groups: sizes().classes,
                ..Default::default()
            },
            &e,
            &g,
        )?,
        time_loss::<CenterLoss>(
            "CenterLoss",
            CenterLossConfig {
                num_groups: sizes().classes,
                ..Default::default()
            },
            &e,
            &g,
        )?,
        // Quaterion's form (one softplus over the batch's pairs): the work Quaterion's W4
        // times, and the form of every CircleLoss figure in BENCHMARKS.md.
        time_loss::<CircleLoss>(
            "CircleLoss",
            CircleLossConfig {
                pooled: true,
                ..Default::default()
            },
            &e,
            &g,
        )?,
        // The paper's form, one softplus per anchor (pytorch-metric-learning's).
        time_loss::<CircleLoss>("CircleLoss_per_anchor", Default::default(), &e, &g)?,
        time_loss::<FastAPLoss>("FastAPLoss", Default::default(), &e, &g)?,
        time_loss::<MultiSimilarityLoss>("MultiSimilarityLoss", Default::default(), &e, &g)?,
        time_loss::<SupConLoss>("SupConLoss", Default::default(), &e, &g)?,
        time_loss::<CombinedLoss<TripletLoss, CenterLoss>>(
            "CombinedLoss_TripletHard_Center",
            CombinedLossConfig {
                first: triplet(TripletMining::Hard),
                second: CenterLossConfig {
                    num_groups: sizes().classes,
                    ..Default::default()
                },
                weights: (1.0, 1.0),
            },
            &e,
            &g,
        )?,
    ];
    out.retain(|v| !v.is_null());
    Ok(out)
}
