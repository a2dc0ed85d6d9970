//! Parity of `similarity_core::distance` with Quaterion 0.1.35's distances
//! (`tests/parity/distance_*.json`, see `tests/parity/SCHEMA.md`).
//!
//! Every form matches Quaterion directly except the cosine matrices: Quaterion's cosine
//! `distance_matrix` is `(1 − cos)/2` and its `similarity_matrix` `(1 + cos)/2`, while ours
//! are `1 − cos` and `cos` (the same as the row-wise forms, which agree). For those the
//! test asserts the corrected transform of Quaterion's value: `ours = 2·theirs` for the
//! distance matrix (and its gradient), `ours = 2·theirs − 1` for the similarity matrix.

mod common;

use serde_json::Value;
use similarity_core::Tensor;
use similarity_core::candle_core::{DType, Var};
use similarity_core::distance::Distance;

use common::parity::{load, lookup, tensor, values};

/// `got` against `want` (Quaterion's values, already transformed where ours differ):
/// `|g − w| ≤ rel · max(|w|, 1e-6) + atol`.
fn check(got: &Tensor, want: &[f32], shape: &[usize], rel: f32, atol: f32, what: &str) {
    assert_eq!(got.dims(), shape, "{what}: shape");
    let got = got
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= rel * w.abs().max(1e-6) + atol,
            "{what}[{i}]: got {g}, expected (from Quaterion) {w}"
        );
    }
}

/// How Quaterion's value maps to ours.
type Transform = dyn Fn(f32) -> f32;

fn transformed(v: &Value, f: impl Fn(f32) -> f32) -> (Vec<f32>, Vec<usize>) {
    let (v, shape) = values(v);
    (v.into_iter().map(f).collect(), shape)
}

fn run(file: &str, metric: Distance) {
    let file = load(file);
    let cosine = metric == Distance::Cosine;
    for case in file["cases"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        let input = |k: &str| tensor(lookup(&file, case["inputs"][k].as_str().unwrap()));
        let (x, y, y_rect) = (input("x"), input("y"), input("y_rect"));
        let e = &case["expected"];
        let same = |v: f32| v;
        // Quaterion's cosine matrix forms are half-scale; see the module docs.
        let dist_m = move |v: f32| if cosine { 2.0 * v } else { v };
        let sim_m = move |v: f32| if cosine { 2.0 * v - 1.0 } else { v };
        // Euclidean self-distances that are 0 in exact arithmetic (the diagonal, the
        // equal rows 3 and 5 of set `a`) are ~1e-6 here (sqrt(0 + 1e-12)) but up to 4e-3
        // in Quaterion's 32-row set `b`, where `torch.cdist` takes its matmul path and keeps
        // the square root of f32 round-off. Elsewhere relative 1e-5 holds.
        let atol = if metric == Distance::Euclidean {
            5e-3
        } else {
            1e-6
        };
        let cases: [(&str, Tensor, &Transform, f32); 6] = [
            ("distance", metric.distance(&x, &y).unwrap(), &same, 1e-6),
            (
                "similarity",
                metric.similarity(&x, &y).unwrap(),
                &same,
                1e-6,
            ),
            (
                "distance_matrix_self",
                metric.distance_matrix(&x, None).unwrap(),
                &dist_m,
                atol,
            ),
            (
                "similarity_matrix_self",
                metric.similarity_matrix(&x, None).unwrap(),
                &sim_m,
                atol,
            ),
            (
                "distance_matrix_xy",
                metric.distance_matrix(&x, Some(&y_rect)).unwrap(),
                &dist_m,
                1e-6,
            ),
            (
                "similarity_matrix_xy",
                metric.similarity_matrix(&x, Some(&y_rect)).unwrap(),
                &sim_m,
                1e-6,
            ),
        ];
        for (key, got, f, atol) in cases {
            let (want, shape) = transformed(&e[key], f);
            check(&got, &want, &shape, 1e-5, atol, &format!("{id} {key}"));
        }

        // Backward: d/dx Σ W ⊙ distance_matrix(x).
        let b = &case["backward"];
        assert!(b["error"].is_null(), "{id}: Quaterion's backward failed");
        let var = Var::from_tensor(&x).unwrap();
        let grads = (metric.distance_matrix(var.as_tensor(), None).unwrap()
            * tensor(&b["cotangent_W"]))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
        let (want, shape) = transformed(&b["grad_x_of_sum_W_times_distance_matrix_self"], dist_m);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        // Gradients relative to the largest component (1e-4), as for the losses.
        check(
            grads.get(&var).unwrap(),
            &want,
            &shape,
            0.0,
            1e-4 * scale,
            &format!("{id} grad_x"),
        );
    }
}

#[test]
fn cosine_matches_quaterion_up_to_its_matrix_scale() {
    run("distance_cosine.json", Distance::Cosine);
}

#[test]
fn euclidean_matches_quaterion() {
    run("distance_euclidean.json", Distance::Euclidean);
}

#[test]
fn manhattan_matches_quaterion() {
    run("distance_manhattan.json", Distance::Manhattan);
}

#[test]
fn dot_product_matches_quaterion() {
    run("distance_dot_product.json", Distance::DotProduct);
}
