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
    check_each(got, want, shape, rel, |_, _, _| atol, what);
}

/// [`check`] with an absolute tolerance per entry: `atol(index, got, want)`.
fn check_each(
    got: &Tensor,
    want: &[f32],
    shape: &[usize],
    rel: f32,
    atol: impl Fn(usize, f32, f32) -> f32,
    what: &str,
) {
    assert_eq!(got.dims(), shape, "{what}: shape");
    let got = got
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = rel * w.abs().max(1e-6) + atol(i, g, w);
        assert!(
            (g - w).abs() <= tol,
            "{what}[{i}]: got {g}, expected (from Quaterion) {w}, tolerance {tol:e}"
        );
    }
}

/// The round-off bound of an f32 Euclidean distance matrix entry `(i, j)` of `x` against
/// `y`, ours against Quaterion's, for entry values `got` and `want`.
///
/// Both compute the squared distance from float32 inputs and take its square root. In the
/// form `|x|² + |y|² − 2x·y` (torch's `cdist` above 25 rows, and ours on points centred
/// on y's mean) each dot product of length `d` is within `(d/2)·ε` of its terms' sum and
/// the two additions add `ε` of theirs, so the squared distance is within
/// `δ = (d + 2)·ε·(|x|² + |y|²)`; `cdist`'s direct form `Σ(x − y)²` is within less. Ours
/// also sets squared distances below `8·ε·(|x|² + |y|²)` (its round-off floor) to 0 and adds
/// `10⁻¹²` under the root (at most `10⁻⁶` on the distance). Two squared distances `δ`
/// apart have square roots at most `min(√δ, δ / max(√a, √b))` apart: `√δ` where the
/// distance is (near) 0, where the matmul form's cancellation leaves the square root of
/// round-off, and about `δ / (2·distance)` elsewhere. A similarity `1 / (1 + d)` moves by
/// less than its distance. Norms are taken uncentred and centred, whichever is larger.
fn euclidean_tolerance(
    x: &[Vec<f64>],
    y: &[Vec<f64>],
    i: usize,
    j: usize,
    got: f32,
    want: f32,
) -> f32 {
    let d = x[0].len();
    let eps = f64::from(f32::EPSILON);
    let mean: Vec<f64> = (0..d)
        .map(|k| y.iter().map(|r| r[k]).sum::<f64>() / y.len() as f64)
        .collect();
    let sq = |v: &[f64], centre: bool| -> f64 {
        v.iter()
            .zip(&mean)
            .map(|(a, m)| if centre { a - m } else { *a }.powi(2))
            .sum()
    };
    let norms = |centre: bool| sq(&x[i], centre) + sq(&y[j], centre);
    let n = norms(false).max(norms(true));
    // Quaterion's side, ours, and our floor.
    let delta = 2.0 * (d + 2) as f64 * eps * n + 8.0 * eps * n;
    let w = f64::from(got.max(want)).max(0.0);
    let root = if w > 0.0 {
        delta.sqrt().min(delta / w)
    } else {
        delta.sqrt()
    };
    // The rounding of each square root, and our 10⁻¹² under it.
    (root + 2.0 * eps * w + 1e-6) as f32
}

/// Rows of a `(n, d)` tensor in f64.
fn rows(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(DType::F64).unwrap().to_vec2().unwrap()
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
        // Euclidean matrices: the round-off bound of `euclidean_tolerance`. Self-distances
        // that are 0 in exact arithmetic (the diagonal, the equal rows 3 and 5 of set `a`)
        // are ~1e-6 here (sqrt(0 + 1e-12)) but up to 4e-3 in Quaterion's 32-row set `b`,
        // where `torch.cdist` takes its matmul path and keeps the square root of f32
        // round-off; the bound allows that from the norms of the rows, not from the file.
        let euclidean = metric == Distance::Euclidean;
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
                1e-6,
            ),
            (
                "similarity_matrix_self",
                metric.similarity_matrix(&x, None).unwrap(),
                &sim_m,
                1e-6,
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
        let (xr, rr) = (rows(&x), rows(&y_rect));
        for (key, got, f, atol) in cases {
            let (want, shape) = transformed(&e[key], f);
            let what = format!("{id} {key}");
            let other = match key {
                _ if !euclidean || !key.contains("matrix") => None,
                _ if key.ends_with("_self") => Some(&xr),
                _ => Some(&rr),
            };
            match other {
                Some(yy) => {
                    let m = yy.len();
                    // A similarity 1 / (1 + d): the bound of its distance 1/s − 1.
                    let similarity = key.starts_with("similarity");
                    let bound = |k: usize, g: f32, w: f32| {
                        let (g, w) = match similarity {
                            true => (1.0 / g - 1.0, 1.0 / w - 1.0),
                            false => (g, w),
                        };
                        euclidean_tolerance(&xr, yy, k / m, k % m, g, w)
                    };
                    check_each(&got, &want, &shape, 0.0, bound, &what);
                }
                None => check(&got, &want, &shape, 1e-5, atol, &what),
            }
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
        let what = format!("{id} grad_x");
        let got = grads.get(&var).unwrap();
        if euclidean {
            let w = rows(&tensor(&b["cotangent_W"]));
            let quaterion = rows(&tensor(&e["distance_matrix_self"]));
            let d = xr[0].len();
            let bound = |k: usize, _: f32, _: f32| {
                euclidean_gradient_tolerance(&xr, &w, &quaterion, k / d, k % d)
            };
            check_each(got, &want, &shape, 0.0, bound, &what);
        } else {
            // Gradients relative to the largest component (1e-4), as for the losses.
            check(got, &want, &shape, 0.0, 1e-4 * scale, &what);
        }
    }
}

/// The round-off bound of component `(i, k)` of `d/dx Σ W ⊙ D(x)` for the f32 Euclidean
/// self-distance matrix `D`, ours against Quaterion's (`quaterion`: its `D`).
///
/// The component is `Σ_j (W_ij + W_ji) (x_ik − x_jk) / D_ij`. In the matmul form
/// (`torch.cdist` above 25 rows, ours) its backward does not form `x_i − x_j`: it sums
/// `G_ij x_ik` and `G_ij x_jk` (`G = (W + Wᵀ) / D`) separately over `n` terms each and
/// subtracts, so the result is within `(n + 2)·ε·Σ_j |G_ij| (|x_ik| + |x_jk|)` of its exact
/// value for the `D` it used. That is where Quaterion's `D_ii` is not 0 (the square root of
/// the forward's round-off, up to 4e-3 in set `b`): the exact contribution is 0, and the
/// two sums cancel only to that bound. Ours sets those entries to 0 with a zero gradient,
/// and so does `cdist`'s direct form (set `a`). Where the rows differ, `D_ij` itself is off
/// by `euclidean_tolerance`, which moves the term `(x_ik − x_jk) / D_ij` by that over `D_ij`
/// relative; both sides are counted.
fn euclidean_gradient_tolerance(
    x: &[Vec<f64>],
    w: &[Vec<f64>],
    quaterion: &[Vec<f64>],
    i: usize,
    k: usize,
) -> f32 {
    let n = x.len();
    let eps = f64::from(f32::EPSILON);
    let mut tol = 0.0;
    for j in 0..n {
        let weight = (w[i][j] + w[j][i]).abs();
        let (xi, xj) = (x[i][k], x[j][k]);
        let q = quaterion[i][j];
        if q > 0.0 {
            tol += 2.0 * (n + 2) as f64 * eps * weight * (xi.abs() + xj.abs()) / q;
        }
        let exact = x[i]
            .iter()
            .zip(&x[j])
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        if exact > 0.0 {
            let dd = f64::from(euclidean_tolerance(x, x, i, j, q as f32, exact as f32));
            let off = 2.0 * dd / (exact - dd).max(exact / 2.0);
            tol += weight * (xi - xj).abs() / exact * off;
        }
    }
    tol as f32
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
