//! W2: pairs with ContrastiveLoss (Quaterion's defaults), cached: `--items` pairs, half
//! positive, subgroup = class of the first object.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use similarity_core::metric::{Evaluator, Relevance, RetrievalPrecision};
use similarity_core::prelude::*;

use crate::common::*;

#[trainable_model]
struct W2Pairs {
    #[encoder(cache = "auto")]
    mlp: FrozenMlp,
    #[head]
    head: SkipConnectionHead,
    /// Defaults: cosine, margin 0.5.
    #[loss]
    loss: ContrastiveLoss,
}

/// 20,000 pairs, half positive (obj_b of the same class), half negative (obj_b of another
pub(crate) fn make_pairs(
    range: std::ops::Range<usize>,
    n: usize,
    classes: &[i64],
    seed: u64,
) -> Vec<SimilarityPairSample<u32>> {
    let mut by_class: Vec<Vec<u32>> = vec![Vec::new(); sizes().classes];
    for i in range.clone() {
        by_class[classes[i] as usize].push(i as u32);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let items: Vec<u32> = range.map(|i| i as u32).collect();
    (0..n)
        .map(|k| {
            let a = items[rng.random_range(0..items.len())];
            let ca = classes[a as usize];
            let positive = k % 2 == 0;
            let b = loop {
                let b = if positive {
                    let same = &by_class[ca as usize];
                    same[rng.random_range(0..same.len())]
                } else {
                    items[rng.random_range(0..items.len())]
                };
                let ok = if positive {
                    b != a
                } else {
                    classes[b as usize] != ca
                };
                if ok {
                    break b;
                }
            };
            SimilarityPairSample {
                obj_a: a,
                obj_b: b,
                score: if positive { 1.0 } else { 0.0 },
                subgroup: ca,
            }
        })
        .collect()
}

pub(crate) fn w2(matrix: Arc<Tensor>, classes: &[i64], epochs: usize) -> Result<Value> {
    let train = make_pairs(0..sizes().items, sizes().items, classes, 44);
    let val_pairs = make_pairs(
        sizes().items..sizes().items + sizes().val_items,
        sizes().val_items,
        classes,
        45,
    );
    let val_ids: Vec<u32> = (sizes().items..sizes().items + sizes().val_items)
        .map(|i| i as u32)
        .collect();
    let val_groups = &classes[sizes().items..];
    let mut model = W2Pairs::new(FrozenMlp::new(matrix)?, &model_options()?)?;
    let group_p1 = |m: &W2Pairs| -> Result<f64> {
        let e = m.encode(&val_ids, 1024)?;
        let scores = Evaluator::new(Distance::Cosine).evaluate(
            &e,
            &Relevance::Groups(val_groups),
            &[&RetrievalPrecision { k: 1 }],
        )?;
        Ok(scores[0].1)
    };
    let t = trainer(epochs);
    let before_pairs = t.evaluate(&mut model, &val_pairs)?;
    let before = group_p1(&model)?;
    let start = Instant::now();
    let report = t.fit(&mut model, &train, None)?;
    let fit_wall = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let after_pairs = t.evaluate(&mut model, &val_pairs)?;
    let val_s = start.elapsed().as_secs_f64();
    let after = group_p1(&model)?;
    let mut out = json!({
        "workload": "w2",
        "fit_wall_s": round(fit_wall, 4),
        "validation_pass_s": round(val_s, 4),
        "validation_pass_note": "Trainer::evaluate on 2,000 validation pairs (loss + pair retrieval)",
        "q_before": {"val_group_precision_at_1": round(before, 4), "val_pair_precision_at_1": round(p1(&before_pairs), 4)},
        "q_after": {"val_group_precision_at_1": round(after, 4), "val_pair_precision_at_1": round(p1(&after_pairs), 4), "val_loss": round(after_pairs.loss, 6)},
        "positive_share_train": train.iter().filter(|p| p.score > 0.0).count() as f64 / train.len() as f64,
        // The cache is de-duplicated: the fill encodes each distinct item once.
        "cache_objects": train.iter().flat_map(|p| [p.obj_a, p.obj_b]).collect::<std::collections::HashSet<_>>().len(),
    });
    merge(&mut out, epoch_figures(&report));
    Ok(out)
}
