//! Parity with the real Quaterion 0.1.35: `tests/parity/*.json` holds its inputs, outputs
//! and gradients (see `tests/parity/SCHEMA.md`). Where Quaterion is wrong the test asserts
//! the corrected value, computed independently, and says why.

mod common;

use similarity_core::Tensor;
use similarity_core::candle_core::{DType, Var};
use similarity_core::data::PairTargets;
use similarity_core::distance::Distance;
use similarity_core::loss::{
    MultipleNegativesRankingLoss, MultipleNegativesRankingLossConfig, SimilarityLoss,
};
use similarity_core::nn::Params;

use common::parity::{assert_close, load, lookup, tensor, values};

fn mnrl_reference(emb: &[f32], dim: usize, scale: f64, symmetric: bool) -> f64 {
    let rows: Vec<Vec<f64>> = emb
        .chunks(dim)
        .map(|r| r.iter().map(|&v| f64::from(v)).collect())
        .collect();
    let p = rows.len() / 2;
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let cos = |a: &[f64], b: &[f64]| {
        a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>() / (norm(a) * norm(b))
    };
    let s: Vec<Vec<f64>> = (0..p)
        .map(|i| {
            (0..p)
                .map(|j| scale * cos(&rows[i], &rows[p + j]))
                .collect()
        })
        .collect();
    let ce = |row: &dyn Fn(usize) -> Vec<f64>| {
        (0..p)
            .map(|i| {
                let r = row(i);
                let m = r.iter().cloned().fold(f64::MIN, f64::max);
                m + r.iter().map(|v| (v - m).exp()).sum::<f64>().ln() - r[i]
            })
            .sum::<f64>()
            / p as f64
    };
    let forward = ce(&|i| s[i].clone());
    if !symmetric {
        return forward;
    }
    (forward + ce(&|j| (0..p).map(|i| s[i][j]).collect())) / 2.0
}

#[test]
fn multiple_negatives_ranking_loss_matches_quaterion_up_to_its_cosine_scale() {
    let file = load("loss_multiple_negatives_ranking.json");
    for case in file["cases"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        let p = &case["params"];
        let scale = p["scale"].as_f64().unwrap();
        let symmetric = p["symmetric"].as_bool().unwrap();
        let distance: Distance = serde_json::from_value(p["distance_metric_name"].clone()).unwrap();
        let inputs = &case["inputs"];
        let emb_value = lookup(&file, inputs["embeddings"].as_str().unwrap());
        let (pairs, pshape) = values(lookup(&file, inputs["pairs"].as_str().unwrap()));
        let targets = PairTargets {
            pairs: Tensor::from_vec(
                pairs.iter().map(|&v| v as u32).collect::<Vec<u32>>(),
                pshape,
                &common::device(),
            )
            .unwrap(),
            labels: tensor(lookup(&file, inputs["labels"].as_str().unwrap())),
            subgroups: tensor(lookup(&file, inputs["subgroups"].as_str().unwrap()))
                .to_dtype(DType::I64)
                .unwrap(),
        };
        let build = |scale: f64| {
            let config = MultipleNegativesRankingLossConfig {
                scale,
                distance,
                symmetric,
            };
            MultipleNegativesRankingLoss::new(
                16,
                config,
                &mut Params::new(&common::device(), 0).scope("loss"),
            )
            .unwrap()
        };
        // Quaterion's cosine similarity matrix is (1 + cos)/2: its `scale` s is our s/2
        // (the constant s/2 cancels in the softmax). The other metrics agree as they are.
        let equivalent = if distance == Distance::Cosine {
            scale / 2.0
        } else {
            scale
        };
        let emb = Var::from_tensor(&tensor(emb_value)).unwrap();
        let loss = build(equivalent)
            .forward(emb.as_tensor(), &targets)
            .unwrap();
        let e = &case["expected"];
        let want = e["loss"].as_f64().unwrap() as f32;
        let got = loss.to_scalar::<f32>().unwrap();
        assert!(
            (got - want).abs() <= 1e-4 * want.abs().max(1.0),
            "{id}: got {got}, Quaterion {want}"
        );
        let grads = loss.backward().unwrap();
        assert_close(
            grads.get(&emb).unwrap(),
            &e["grad_embeddings"],
            1e-3,
            &format!("{id} grad"),
        );

        if distance == Distance::Cosine {
            // With our own scale, the loss is the definition's value (sentence-transformers).
            let (flat, shape) = values(emb_value);
            let reference = mnrl_reference(&flat, shape[1], scale, symmetric);
            let ours = build(scale)
                .forward(emb.as_tensor(), &targets)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                (f64::from(ours) - reference).abs() <= 1e-4 * reference.abs().max(1.0),
                "{id}: {ours} vs {reference}"
            );
            assert!(
                (ours - want).abs() > 1e-3,
                "{id}: the corrected value differs from Quaterion's"
            );
        }
    }
}

#[test]
fn multiple_negatives_ranking_loss_gradient_matches_finite_differences() {
    use similarity_core::data::{PairMeta, SimilarityPairSample, SimilaritySample};
    let x = Tensor::randn(0f64, 1.0, (8, 5), &common::device()).unwrap();
    let metas = vec![
        PairMeta {
            score: 1.0,
            subgroup: 0
        };
        4
    ];
    let targets = SimilarityPairSample::<()>::targets(&metas, &common::device()).unwrap();
    for (distance, symmetric) in [
        (Distance::Cosine, true),
        (Distance::Euclidean, false),
        (Distance::DotProduct, true),
    ] {
        let config = MultipleNegativesRankingLossConfig {
            scale: 5.0,
            distance,
            symmetric,
        };
        let loss = MultipleNegativesRankingLoss::new(
            5,
            config,
            &mut Params::new(&common::device(), 0).scope("loss"),
        )
        .unwrap();
        common::check_gradient(&format!("MNRL {distance:?}"), &x, 1e-5, |e| {
            loss.forward(e, &targets).unwrap()
        });
    }
}

#[test]
fn group_masks_match_quaterion() {
    use similarity_core::loss::masks::{negative_mask, positive_mask};
    let file = load("utils_masks.json");
    let groups = |name: &str| tensor(lookup(&file, name)).to_dtype(DType::I64).unwrap();
    for case in file["cases"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        let inputs = case["inputs"].as_object().unwrap();
        let Some(a) = inputs.get("labels_a") else {
            continue; // the triplet mask belongs to TripletLoss's tests
        };
        let a = groups(a.as_str().unwrap());
        let b = inputs.get("labels_b").map(|r| groups(r.as_str().unwrap()));
        let mask = match id.split('/').next().unwrap() {
            "anchor_positive" => positive_mask(&a, b.as_ref(), DType::F32).unwrap(),
            "anchor_negative" => negative_mask(&a, b.as_ref(), DType::F32).unwrap(),
            other => panic!("unexpected case {other}"),
        };
        assert_close(&mask, &case["expected"]["mask"], 0.0, id);
    }
}
