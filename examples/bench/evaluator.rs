//! The `Evaluator` alone: precision@1 and R-precision (the group kind's metrics, what
//! `Trainer::evaluate` computes) over `--items` synthetic `--dim`-wide embeddings in
//! `--classes` groups, cosine distance, every object a query (or a seeded sample of
//! `--eval-queries` of them, each still ranked against all `--items`).
//!
//! The embeddings: one centroid per class, N(0, 0.25²) in every dimension, plus N(0, 1)
//! noise per item (seed 51 for the centroids, 52 for the items), so that the ranking is
//! neither trivial nor random. Their generation is not timed.
//!
//! Work: `queries × items × dim` multiply-adds for the distances (the matmul floor, at
//! the throughput the parent measured) plus a ranking pass over each query's row.

use std::time::Instant;

use anyhow::Result;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use similarity_core::loss::{GroupKind, LossKind};
use similarity_core::metric::{Evaluator, Relevance};
use similarity_core::prelude::*;

use crate::common::*;

/// `--eval-queries`: the query sample (all items when absent or not smaller).
pub(crate) fn eval_queries() -> Result<Option<usize>> {
    Ok(arg("--eval-queries").map(|q| q.parse()).transpose()?)
}

/// Queries the evaluation ranks: the sample size, capped at the items.
pub(crate) fn query_count() -> Result<usize> {
    let n = sizes().items;
    Ok(eval_queries()?.map_or(n, |q| q.min(n)))
}

/// FLOPs of the distance matrix the evaluation computes (`2 · queries · items · dim`).
pub(crate) fn evaluator_flops() -> Result<f64> {
    Ok(2.0 * query_count()? as f64 * sizes().items as f64 * sizes().dim as f64)
}

/// `VmRSS` of this process in MiB.
fn vm_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?.to_string();
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// One evaluation, timed; the caller adds the peak RSS.
pub(crate) fn evaluator() -> Result<Value> {
    let (n, d, c) = (sizes().items, sizes().dim, sizes().classes);
    let mut rng = StdRng::seed_from_u64(51);
    let centroids: Vec<f32> = (0..c * d).map(|_| 0.25 * normal(&mut rng)).collect();
    let mut rng = StdRng::seed_from_u64(52);
    let mut groups = Vec::with_capacity(n);
    let mut x = Vec::with_capacity(n * d);
    for _ in 0..n {
        let g = rng.random_range(0..c);
        groups.push(g as i64);
        let centre = &centroids[g * d..(g + 1) * d];
        x.extend(centre.iter().map(|v| v + normal(&mut rng)));
    }
    let embeddings = Tensor::from_vec(x, (n, d), &Device::Cpu)?;
    let rss_before = vm_rss_mb();
    let mut evaluator = Evaluator::new(Distance::Cosine);
    if let Some(q) = eval_queries()? {
        evaluator = evaluator.with_sample(q, 0);
    }
    let metrics = GroupKind::metrics();
    let list: Vec<&dyn similarity_core::metric::Metric> =
        metrics.iter().map(|m| m.as_ref()).collect();
    let start = Instant::now();
    let values = evaluator.evaluate(&embeddings, &Relevance::Groups(&groups), &list)?;
    let secs = start.elapsed().as_secs_f64();
    let values: serde_json::Map<String, Value> = values
        .into_iter()
        .map(|(k, v)| (k, json!(round(v, 4))))
        .collect();
    Ok(json!({
        "workload": "evaluator",
        "queries": query_count()?,
        "evaluate_s": round(secs, 4),
        "metrics": values,
        "embeddings_mb": round((n * d * 4) as f64 / (1u64 << 20) as f64, 1),
        "rss_before_evaluate_mb": round(rss_before, 1),
        "block_bytes": evaluator.block_bytes,
        "peak_block_bytes_bound": evaluator.peak_block_bytes(n),
    }))
}
