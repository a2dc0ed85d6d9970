//! W1 and W3: group training with TripletLoss (hard mining, cosine), cached (W1 also
//! uncached), W3 with a cross-batch memory of `--xbm-size` entries that starts at once.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, bail};
use serde_json::json;
use similarity_core::prelude::*;

use crate::common::*;

#[trainable_model]
struct W1Cached {
    #[encoder(cache = "auto")]
    mlp: FrozenMlp,
    #[head]
    head: SkipConnectionHead,
    /// Defaults: margin 0.5, hard mining, cosine.
    #[loss]
    loss: TripletLoss,
}

#[trainable_model]
struct W1Uncached {
    #[encoder]
    mlp: FrozenMlp,
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: TripletLoss,
}

#[trainable_model]
struct W3Xbm1k {
    #[encoder(cache = "auto")]
    mlp: FrozenMlp,
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: TripletLoss,
    #[xbm(size = 1024, start_iteration = 0)]
    memory: Xbm,
}

#[trainable_model]
struct W3Xbm4k {
    #[encoder(cache = "auto")]
    mlp: FrozenMlp,
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: TripletLoss,
    #[xbm(size = 4096, start_iteration = 0)]
    memory: Xbm,
}

#[trainable_model]
struct W3Xbm16k {
    #[encoder(cache = "auto")]
    mlp: FrozenMlp,
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: TripletLoss,
    #[xbm(size = 16384, start_iteration = 0)]
    memory: Xbm,
}

#[trainable_model]
struct W3Xbm64k {
    #[encoder(cache = "auto")]
    mlp: FrozenMlp,
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: TripletLoss,
    #[xbm(size = 65536, start_iteration = 0)]
    memory: Xbm,
}

macro_rules! group_workload {
    ($ty:ty, $name:expr, $data:expr, $classes:expr, $epochs:expr) => {{
        let data: Arc<Tensor> = $data;
        let classes: &[i64] = $classes;
        let train: Vec<SimilarityGroupSample<u32>> = (0..sizes().items)
            .map(|i| SimilarityGroupSample::new(i as u32, classes[i]))
            .collect();
        let val: Vec<SimilarityGroupSample<u32>> = (sizes().items..sizes().items + sizes().val_items)
            .map(|i| SimilarityGroupSample::new(i as u32, classes[i]))
            .collect();
        let mut model = <$ty>::new(FrozenMlp::new(data)?, &model_options()?)?;
        let t = trainer($epochs);
        let before = t.evaluate(&mut model, &val)?;
        let start = Instant::now();
        let report = t.fit(&mut model, &train, None)?;
        let fit_wall = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let after = t.evaluate(&mut model, &val)?;
        let val_s = start.elapsed().as_secs_f64();
        let mut out = json!({
            "workload": $name,
            "fit_wall_s": round(fit_wall, 4),
            "validation_pass_s": round(val_s, 4),
            "q_before": {"val_precision_at_1": round(p1(&before), 4)},
            "q_after": {"val_precision_at_1": round(p1(&after), 4), "val_loss": round(after.loss, 6)},
        });
        merge(&mut out, epoch_figures(&report));
        out
    }};
}

/// The group workload `name` (`w1_cached`, `w1_uncached`, `w3`) on the items of `matrix`
/// with their `classes`.
pub(crate) fn run(
    name: &str,
    matrix: Arc<Tensor>,
    classes: &[i64],
    epochs: usize,
) -> Result<serde_json::Value> {
    Ok(match (name, sizes().xbm) {
        ("w1_cached", _) => group_workload!(W1Cached, name, matrix, classes, epochs),
        ("w1_uncached", _) => group_workload!(W1Uncached, name, matrix, classes, epochs),
        ("w3", 1024) => group_workload!(W3Xbm1k, name, matrix, classes, epochs),
        ("w3", 4096) => group_workload!(W3Xbm4k, name, matrix, classes, epochs),
        ("w3", 16384) => group_workload!(W3Xbm16k, name, matrix, classes, epochs),
        ("w3", 65536) => group_workload!(W3Xbm64k, name, matrix, classes, epochs),
        (other, xbm) => bail!("unknown group workload {other} (XBM size {xbm})"),
    })
}
