//! Parity of the retrieval metrics with Quaterion 0.1.35 (`tests/parity/metric_*.json`,
//! see `SCHEMA.md`).
//!
//! `raw/*` cases feed Quaterion's own distance and label matrices to our raw functions and
//! must match exactly (up to f32 rounding). `compute/<distance>` cases start from the
//! embeddings: our [`Evaluator`] computes the distances block by block with the query
//! masked, as Quaterion's `precompute` masks the diagonal with `max + 1`, and makes no
//! query of an object with nothing relevant (Quaterion counts it as a miss: precision
//! differs by that factor, named where it is asserted). Our cosine
//! distance is `1 − cos` where Quaterion's matrix form is `(1 − cos) / 2`; the ranking is
//! identical, so these rank-based metrics match, and the distance matrices are compared
//! after halving ours.

mod common;

use common::parity::{assert_close, load, lookup, tensor, values};
use serde_json::Value;
use similarity_core::Tensor;
use similarity_core::distance::Distance;
use similarity_core::metric::{
    Evaluator, Metric, Relevance, RetrievalPrecision, RetrievalRPrecision, RetrievalReciprocalRank,
    retrieval_precision, retrieval_r_precision, retrieval_reciprocal_rank,
};

const TOL: f64 = 1e-5;

fn input(file: &Value, case: &Value, name: &str) -> Tensor {
    tensor(lookup(file, case["inputs"][name].as_str().unwrap()))
}

fn close(got: f64, want: &Value, what: &str) {
    let want = want.as_f64().unwrap();
    assert!(
        (got - want).abs() < TOL,
        "{what}: got {got}, Quaterion {want}"
    );
}

fn close_vec(got: &[f64], want: &Value, what: &str) {
    let (want, shape) = values(want);
    assert_eq!(vec![got.len()], shape, "{what}: length");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - f64::from(*w)).abs() < TOL,
            "{what}[{i}]: got {g}, Quaterion {w}"
        );
    }
}

fn distance(case: &Value) -> Distance {
    serde_json::from_value(case["params"]["distance_metric_name"].clone()).unwrap()
}

fn ints(t: &Value) -> Vec<usize> {
    values(t).0.into_iter().map(|v| v as usize).collect()
}

/// The pairs and scores of a `compute` case.
fn pairs(file: &Value, case: &Value) -> (Vec<(usize, usize)>, Vec<f32>) {
    let flat = ints(lookup(file, case["inputs"]["pairs"].as_str().unwrap()));
    let pairs = flat.chunks(2).map(|p| (p[0], p[1])).collect();
    let scores = values(lookup(file, case["inputs"]["labels"].as_str().unwrap())).0;
    (pairs, scores)
}

/// Our distance matrix of the case's embeddings matches Quaterion's off the diagonal
/// (ours halved for cosine), and our dense relevance matches its labels.
fn check_precomputed(case: &Value, embeddings: &Tensor, relevance: &Relevance<'_>) {
    let expected = &case["expected"];
    let id = case["id"].as_str().unwrap();
    let n = embeddings.dim(0).unwrap();
    assert_close(
        &relevance.dense(n).unwrap(),
        &expected["precomputed_labels"],
        0.0,
        &format!("{id} labels"),
    );
    let d = distance(case);
    let mut ours = d.distance_matrix(embeddings, None).unwrap();
    if d == Distance::Cosine {
        ours = (ours * 0.5).unwrap();
    }
    let ours = ours.to_vec2::<f32>().unwrap();
    let theirs = tensor(&expected["precomputed_distance_matrix"])
        .to_vec2::<f32>()
        .unwrap();
    for i in 0..n {
        for j in (0..n).filter(|&j| j != i) {
            let (a, b) = (ours[i][j], theirs[i][j]);
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                "{id} distance [{i}, {j}]: got {a}, Quaterion {b}"
            );
        }
    }
}

fn evaluate(case: &Value, embeddings: &Tensor, rel: &Relevance<'_>, m: &dyn Metric) -> f64 {
    let got = Evaluator::new(distance(case))
        .evaluate(embeddings, rel, &[m])
        .unwrap();
    got[0].1
}

#[test]
fn retrieval_precision_matches_quaterion() {
    let file = load("metric_retrieval_precision.json");
    let cases = file["cases"].as_array().unwrap();
    let (mut raw, mut computed) = (0, 0);
    for case in cases {
        let id = case["id"].as_str().unwrap();
        let k = case["params"]["k"].as_u64().unwrap() as usize;
        let expected = &case["expected"];
        if id.starts_with("raw/") {
            let dm = input(&file, case, "distance_matrix");
            let labels = input(&file, case, "labels");
            let per_row = retrieval_precision(&dm, &labels, k).unwrap();
            close_vec(&per_row, &expected["per_row"], id);
            close(
                RetrievalPrecision { k }.compute(&dm, &labels).unwrap(),
                &expected["value"],
                id,
            );
            raw += 1;
        } else {
            let x = input(&file, case, "embeddings");
            let (pairs, scores) = pairs(&file, case);
            let rel = Relevance::Pairs {
                pairs: &pairs,
                scores: &scores,
            };
            check_precomputed(case, &x, &rel);
            let v = evaluate(case, &x, &rel, &RetrievalPrecision { k });
            // Quaterion makes a query of every object and counts those in no positive
            // pair (nothing to retrieve) as misses; ours leaves them out, so its mean is
            // over the `q` others: ours = Quaterion's · n / q.
            let n = x.dim(0).unwrap();
            let mut queries: Vec<usize> = pairs
                .iter()
                .zip(&scores)
                .filter(|(_, s)| **s > 0.0)
                .flat_map(|(&(a, b), _)| [a, b])
                .collect();
            queries.sort_unstable();
            queries.dedup();
            assert!(
                queries.len() < n,
                "{id}: the case has objects without a positive pair"
            );
            let theirs = expected["value"].as_f64().unwrap();
            close(
                v,
                &Value::from(theirs * n as f64 / queries.len() as f64),
                id,
            );
            computed += 1;
        }
    }
    assert_eq!((raw, computed), (8, 8));
}

#[test]
fn retrieval_reciprocal_rank_matches_quaterion() {
    let file = load("metric_retrieval_reciprocal_rank.json");
    let cases = file["cases"].as_array().unwrap();
    let (mut raw, mut computed) = (0, 0);
    for case in cases {
        let id = case["id"].as_str().unwrap();
        let expected = &case["expected"];
        if id.starts_with("raw/") {
            let dm = input(&file, case, "distance_matrix");
            let labels = input(&file, case, "labels");
            let items = retrieval_reciprocal_rank(&dm, &labels).unwrap();
            close_vec(&items, &expected["per_relevant_item"], id);
            close(
                RetrievalReciprocalRank.compute(&dm, &labels).unwrap(),
                &expected["value"],
                id,
            );
            raw += 1;
        } else {
            let x = input(&file, case, "embeddings");
            let (pairs, scores) = pairs(&file, case);
            let rel = Relevance::Pairs {
                pairs: &pairs,
                scores: &scores,
            };
            let v = evaluate(case, &x, &rel, &RetrievalReciprocalRank);
            close(v, &expected["value"], id);
            computed += 1;
        }
    }
    assert_eq!((raw, computed), (2, 4));
}

#[test]
fn retrieval_r_precision_matches_quaterion() {
    let file = load("metric_retrieval_r_precision.json");
    let cases = file["cases"].as_array().unwrap();
    let (mut raw, mut computed) = (0, 0);
    for case in cases {
        let id = case["id"].as_str().unwrap();
        let expected = &case["expected"];
        if id.starts_with("raw/") {
            let dm = input(&file, case, "distance_matrix");
            let labels = input(&file, case, "labels");
            close(
                retrieval_r_precision(&dm, &labels).unwrap(),
                &expected["value"],
                id,
            );
            raw += 1;
        } else {
            let x = input(&file, case, "embeddings");
            let groups: Vec<i64> = ints(lookup(&file, case["inputs"]["groups"].as_str().unwrap()))
                .into_iter()
                .map(|g| g as i64)
                .collect();
            let rel = Relevance::Groups(&groups);
            check_precomputed(case, &x, &rel);
            let v = evaluate(case, &x, &rel, &RetrievalRPrecision);
            close(v, &expected["value"], id);
            computed += 1;
        }
    }
    assert_eq!((raw, computed), (1, 4));
}
