//! Class-based group losses: parity with Quaterion 0.1.35 for `SoftmaxLoss` and
//! `ArcFaceLoss` (`tests/parity/loss_{softmax,arcface}.json`), independent f64 references
//! for `CosFaceLoss` (where Quaterion is wrong), `CenterLoss` and `SupConLoss`, and
//! finite-difference gradient checks for every loss (parameters included).

mod common;

use serde_json::Value;
use similarity_core::Tensor;
use similarity_core::candle_core::{DType, Var};
use similarity_core::data::GroupTargets;
use similarity_core::loss::{
    ArcFaceLoss, ArcFaceLossConfig, CenterLoss, CenterLossConfig, CombinedLoss, CombinedLossConfig,
    CosFaceLoss, CosFaceLossConfig, MemoryLoss, SimilarityLoss, SoftmaxLoss, SoftmaxLossConfig,
    SupConLoss, SupConLossConfig,
};
use similarity_core::nn::Params;

use common::parity::{assert_close, load, lookup, tensor, values};

fn groups_of(file: &Value, reference: &str) -> Tensor {
    tensor(lookup(file, reference))
        .to_dtype(DType::I64)
        .unwrap()
}

fn scalar_f64(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn assert_rel(got: f64, want: f64, rel: f64, what: &str) {
    assert!(
        (got - want).abs() <= rel * want.abs().max(1e-6),
        "{what}: got {got}, expected {want} (rel {rel})"
    );
}

/// Runs every case of a class-loss parity file: loads the case's kernel into the loss's
/// `kernel` variable, checks the f32 loss, the f64 loss against `loss_f64`, and the
/// gradients with respect to the embeddings and the kernel.
fn class_loss_parity<L: SimilarityLoss<Kind = similarity_core::loss::GroupKind>>(
    file: &str,
    config: impl Fn(&Value) -> L::Config,
    value_rel: impl Fn(&Value) -> f64,
) {
    let file = load(file);
    let cases = file["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let id = case["id"].as_str().unwrap();
        assert!(case["error"].is_null(), "{id}: Quaterion raised");
        let p = &case["params"];
        let embedding_size = p["embedding_size"].as_u64().unwrap() as usize;
        let mut params = Params::new(&common::device(), 0);
        let loss = L::new(embedding_size, config(p), &mut params.scope("loss")).unwrap();
        let kernel = &params.named_vars()["loss.kernel"];
        kernel
            .set(&tensor(&case["module_parameters"]["kernel"]))
            .unwrap();
        let inputs = &case["inputs"];
        let x = Var::from_tensor(&tensor(lookup(
            &file,
            inputs["embeddings"].as_str().unwrap(),
        )))
        .unwrap();
        let targets = GroupTargets {
            groups: groups_of(&file, inputs["groups"].as_str().unwrap()),
        };
        let e = &case["expected"];
        let rel = value_rel(p);
        let out = loss.forward(x.as_tensor(), &targets).unwrap();
        assert_rel(scalar_f64(&out), e["loss"].as_f64().unwrap(), rel, id);
        let out64 = loss
            .forward(&x.as_tensor().to_dtype(DType::F64).unwrap(), &targets)
            .unwrap();
        assert_eq!(out64.dtype(), DType::F64);
        assert_rel(
            scalar_f64(&out64),
            e["loss_f64"].as_f64().unwrap(),
            rel,
            &format!("{id} f64"),
        );
        let grads = out.backward().unwrap();
        assert_close(
            grads.get(&x).unwrap(),
            &e["grad_embeddings"],
            1e-4,
            &format!("{id} grad embeddings"),
        );
        assert_close(
            grads.get(kernel).unwrap(),
            &e["grad_kernel"],
            1e-4,
            &format!("{id} grad kernel"),
        );
    }
}

#[test]
fn softmax_loss_matches_quaterion_values_and_gradients() {
    class_loss_parity::<SoftmaxLoss>(
        "loss_softmax.json",
        |p| SoftmaxLossConfig {
            num_groups: p["num_groups"].as_u64().unwrap() as usize,
            temperature: p["temperature"].as_f64().unwrap(),
        },
        |_| 1e-5,
    );
}

#[test]
fn arcface_loss_matches_quaterion_values_and_gradients() {
    class_loss_parity::<ArcFaceLoss>(
        "loss_arcface.json",
        |p| ArcFaceLossConfig {
            num_groups: p["num_groups"].as_u64().unwrap() as usize,
            scale: p["scale"].as_f64().unwrap(),
            margin: p["margin"].as_f64().unwrap(),
        },
        // scale 64 multiplies the f32 round-off of the cosines
        |p| {
            if p["scale"].as_f64().unwrap() >= 64.0 {
                1e-4
            } else {
                1e-5
            }
        },
    );
}

#[test]
fn arcface_rejects_group_ids_that_are_not_class_indices() {
    let mut params = Params::new(&common::device(), 0);
    let cfg = ArcFaceLossConfig {
        num_groups: 3,
        ..Default::default()
    };
    let loss = ArcFaceLoss::new(4, cfg, &mut params.scope("loss")).unwrap();
    let x = Tensor::ones((2, 4), DType::F32, &common::device()).unwrap();
    let targets = GroupTargets {
        groups: Tensor::new(&[1i64, 7], &common::device()).unwrap(),
    };
    let err = loss.forward(&x, &targets).unwrap_err().to_string();
    assert!(
        err.contains("group id 7") && err.contains("num_groups = 3") && err.contains("object 1"),
        "{err}"
    );
    let err = ArcFaceLoss::new(4, Default::default(), &mut params.scope("other"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("num_groups"), "{err}");
}

// ---- independent f64 references ------------------------------------------------------

fn rows(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap()
}

fn unit(v: &[f64]) -> Vec<f64> {
    let n = v.iter().map(|a| a * a).sum::<f64>().sqrt();
    v.iter().map(|a| a / n).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn cross_entropy(logits: &[f64], target: usize) -> f64 {
    let max = logits.iter().cloned().fold(f64::MIN, f64::max);
    let lse = max + logits.iter().map(|z| (z - max).exp()).sum::<f64>().ln();
    lse - logits[target]
}

/// CosFace from the paper, or Quaterion 0.1.35's double cosine when `quaterion`.
fn cos_face_reference(
    x: &[Vec<f64>],
    kernel: &[Vec<f64>],
    groups: &[i64],
    s: f64,
    m: f64,
    quaterion: bool,
) -> f64 {
    let classes = kernel[0].len();
    let columns: Vec<Vec<f64>> = (0..classes)
        .map(|c| unit(&kernel.iter().map(|r| r[c]).collect::<Vec<_>>()))
        .collect();
    let total: f64 = x
        .iter()
        .zip(groups)
        .map(|(xi, &g)| {
            let xi = unit(xi);
            let logits: Vec<f64> = columns
                .iter()
                .enumerate()
                .map(|(c, w)| {
                    let margin = if c == g as usize { m } else { 0.0 };
                    let z = dot(&xi, w) - margin;
                    if quaterion { s * z.cos() } else { s * z }
                })
                .collect();
            cross_entropy(&logits, g as usize)
        })
        .sum();
    total / x.len() as f64
}

#[test]
fn cos_face_is_the_papers_loss_not_quaterions_double_cosine() {
    // Quaterion computes s·cos(cos θ − m·[c = g]) (cos applied twice); the paper's loss,
    // asserted here, is s·(cos θ − m·[c = g]). Inputs and kernel: the softmax parity set.
    let file = load("loss_softmax.json");
    for case in file["cases"].as_array().unwrap().iter().step_by(2) {
        let id = case["id"].as_str().unwrap();
        let p = &case["params"];
        let x = tensor(lookup(
            &file,
            case["inputs"]["embeddings"].as_str().unwrap(),
        ));
        let groups = groups_of(&file, case["inputs"]["groups"].as_str().unwrap());
        let kernel = tensor(&case["module_parameters"]["kernel"]);
        for (s, m) in [(64.0, 0.35), (30.0, 0.2)] {
            let cfg = CosFaceLossConfig {
                num_groups: p["num_groups"].as_u64().unwrap() as usize,
                scale: s,
                margin: m,
            };
            let mut params = Params::new(&common::device(), 0);
            let loss = CosFaceLoss::new(x.dim(1).unwrap(), cfg, &mut params.scope("loss")).unwrap();
            params.named_vars()["loss.kernel"].set(&kernel).unwrap();
            let targets = GroupTargets {
                groups: groups.clone(),
            };
            let g = groups.to_vec1::<i64>().unwrap();
            let paper = cos_face_reference(&rows(&x), &rows(&kernel), &g, s, m, false);
            let quaterion = cos_face_reference(&rows(&x), &rows(&kernel), &g, s, m, true);
            let got = scalar_f64(&loss.forward(&x, &targets).unwrap());
            assert_rel(got, paper, 1e-5, &format!("{id} s{s} m{m} f32"));
            let got64 = scalar_f64(
                &loss
                    .forward(&x.to_dtype(DType::F64).unwrap(), &targets)
                    .unwrap(),
            );
            assert_rel(got64, paper, 1e-10, &format!("{id} s{s} m{m} f64"));
            assert!(
                (paper - quaterion).abs() > 0.1,
                "{id}: the corrected value should differ from Quaterion's ({paper} vs {quaterion})"
            );
        }
    }
}

#[test]
fn center_loss_matches_an_f64_reference() {
    let file = load("loss_softmax.json");
    let x = tensor(lookup(&file, "main.embeddings"));
    let groups = groups_of(&file, "main.groups");
    let cfg = CenterLossConfig {
        num_groups: 5,
        lambda_c: 0.3,
    };
    let mut params = Params::new(&common::device(), 11);
    let loss = CenterLoss::new(12, cfg, &mut params.scope("loss")).unwrap();
    let centers = rows(loss.centers());
    let g = groups.to_vec1::<i64>().unwrap();
    let xs = rows(&x);
    let sum: f64 = xs
        .iter()
        .zip(&g)
        .map(|(xi, &gi)| {
            unit(xi)
                .iter()
                .zip(&centers[gi as usize])
                .map(|(a, c)| (a - c).powi(2))
                .sum::<f64>()
        })
        .sum();
    let want = 0.3 * sum / (xs.len() * 12) as f64;
    let got = scalar_f64(&loss.forward(&x, &GroupTargets { groups }).unwrap());
    assert_rel(got, want, 1e-5, "CenterLoss");
}

/// SupCon (Khosla et al. 2020, L_out) straight from the definition, in f64.
fn supcon_reference(
    x: &[Vec<f64>],
    gx: &[i64],
    y: &[Vec<f64>],
    gy: &[i64],
    exclude_self: bool,
    t: f64,
) -> f64 {
    let (mut total, mut anchors) = (0.0, 0);
    for (i, xi) in x.iter().enumerate() {
        let candidates: Vec<usize> = (0..y.len())
            .filter(|&j| !(exclude_self && j == i))
            .collect();
        let sim = |j: usize| dot(&unit(xi), &unit(&y[j])) / t;
        let positives: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&j| gy[j] == gx[i])
            .collect();
        if positives.is_empty() {
            continue;
        }
        let denom = candidates.iter().map(|&j| sim(j).exp()).sum::<f64>().ln();
        let l: f64 =
            positives.iter().map(|&p| sim(p) - denom).sum::<f64>() / positives.len() as f64;
        total -= l;
        anchors += 1;
    }
    total / anchors as f64
}

#[test]
fn supcon_matches_an_f64_reference_in_batch_and_against_memory() {
    let file = load("loss_triplet.json");
    let loss = SupConLoss::new(
        12,
        SupConLossConfig::default(),
        &mut Params::new(&common::device(), 0).scope("loss"),
    )
    .unwrap();
    // `edge` has singleton groups: those anchors are excluded.
    for set in ["main", "edge"] {
        let x = tensor(lookup(&file, &format!("{set}.embeddings")));
        let groups = groups_of(&file, &format!("{set}.groups"));
        let g = groups.to_vec1::<i64>().unwrap();
        let want = supcon_reference(&rows(&x), &g, &rows(&x), &g, true, 0.1);
        let got = scalar_f64(&loss.forward(&x, &GroupTargets { groups }).unwrap());
        assert_rel(got, want, 1e-5, set);
    }
    let x = tensor(lookup(&file, "main.embeddings"));
    let g = groups_of(&file, "main.groups");
    let m = tensor(lookup(&file, "memory.embeddings"));
    let mg = groups_of(&file, "memory.groups");
    let want = supcon_reference(
        &rows(&x),
        &g.to_vec1::<i64>().unwrap(),
        &rows(&m),
        &mg.to_vec1::<i64>().unwrap(),
        false,
        0.1,
    );
    let got = scalar_f64(&loss.forward_memory(&x, &g, &m, &mg).unwrap());
    assert_rel(got, want, 1e-5, "memory");
}

#[test]
fn combined_loss_is_the_weighted_sum_of_its_parts() {
    let file = load("loss_softmax.json");
    let x = tensor(lookup(&file, "main.embeddings"));
    let targets = GroupTargets {
        groups: groups_of(&file, "main.groups"),
    };
    type Three = CombinedLoss<ArcFaceLoss, CombinedLoss<SupConLoss, CenterLoss>>;
    let cfg = CombinedLossConfig {
        first: ArcFaceLossConfig {
            num_groups: 5,
            scale: 30.0,
            margin: 0.2,
        },
        second: CombinedLossConfig {
            first: SupConLossConfig::default(),
            second: CenterLossConfig {
                num_groups: 5,
                lambda_c: 0.5,
            },
            weights: (0.5, 3.0),
        },
        weights: (0.1, 2.0),
    };
    let mut params = Params::new(&common::device(), 5);
    let loss = Three::new(12, cfg, &mut params.scope("loss")).unwrap();
    let names: Vec<&String> = params.named_vars().keys().collect();
    assert_eq!(names, ["loss.0.kernel", "loss.1.1.centers"]);
    let parts = [
        scalar_f64(&loss.first().forward(&x, &targets).unwrap()),
        scalar_f64(&loss.second().first().forward(&x, &targets).unwrap()),
        scalar_f64(&loss.second().second().forward(&x, &targets).unwrap()),
    ];
    let want = 0.1 * parts[0] + 2.0 * (0.5 * parts[1] + 3.0 * parts[2]);
    let got = scalar_f64(&loss.forward(&x, &targets).unwrap());
    assert_rel(got, want, 1e-6, "combined");
    // Trained together: the gradient reaches both parts' parameters.
    let grads = loss.forward(&x, &targets).unwrap().backward().unwrap();
    for var in params.vars() {
        assert!(nonzero(
            grads.get(&var).expect("gradient reaches the parameter")
        ));
    }
}

// ---- finite-difference gradient checks ---------------------------------------------

/// Deterministic pseudo-random values in (−1, 1).
fn random(n: usize, d: usize, seed: u64) -> Tensor {
    let v: Vec<f64> = (0..n * d)
        .map(|i| {
            let t = ((i as f64 + 1.0) * 12.9898 + seed as f64 * 78.233).sin() * 43758.5453;
            2.0 * (t - t.floor()) - 1.0
        })
        .collect();
    Tensor::from_vec(v, (n, d), &common::device()).unwrap()
}

fn nonzero(g: &Tensor) -> bool {
    g.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        > 1e-8
}

fn check_loss<L: SimilarityLoss<Kind = similarity_core::loss::GroupKind>>(
    name: &str,
    config: L::Config,
) {
    let (n, d) = (7, 5);
    let x = random(n, d, 1);
    let targets = GroupTargets {
        groups: Tensor::new(&[0i64, 1, 2, 0, 1, 0, 2], &common::device()).unwrap(),
    };
    let mut params = Params::new(&common::device(), 3);
    let loss = L::new(d, config, &mut params.scope("loss")).unwrap();
    // Class kernels start tiny (std 0.01); larger ones make the check meaningful.
    for (i, var) in params.vars().iter().enumerate() {
        let (r, c) = var.dims2().unwrap();
        var.set(&random(r, c, 10 + i as u64).to_dtype(DType::F32).unwrap())
            .unwrap();
    }
    common::check_gradient(name, &x, 1e-5, |e| loss.forward(e, &targets).unwrap());
    let grads = loss.forward(&x, &targets).unwrap().backward().unwrap();
    for (pname, var) in params.named_vars() {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name}: no gradient reaches {pname}"));
        assert!(nonzero(g), "{name}: zero gradient for {pname}");
    }
}

#[test]
fn every_loss_gradient_matches_finite_differences() {
    check_loss::<SoftmaxLoss>(
        "SoftmaxLoss",
        SoftmaxLossConfig {
            num_groups: 3,
            temperature: 0.5,
        },
    );
    for (scale, margin) in [(64.0, 0.5), (10.0, 0.2)] {
        check_loss::<ArcFaceLoss>(
            "ArcFaceLoss",
            ArcFaceLossConfig {
                num_groups: 3,
                scale,
                margin,
            },
        );
    }
    check_loss::<CosFaceLoss>(
        "CosFaceLoss",
        CosFaceLossConfig {
            num_groups: 3,
            ..Default::default()
        },
    );
    check_loss::<CenterLoss>(
        "CenterLoss",
        CenterLossConfig {
            num_groups: 3,
            ..Default::default()
        },
    );
    check_loss::<SupConLoss>("SupConLoss", SupConLossConfig { temperature: 0.5 });
    check_loss::<CombinedLoss<SoftmaxLoss, CenterLoss>>(
        "CombinedLoss",
        CombinedLossConfig {
            first: SoftmaxLossConfig {
                num_groups: 3,
                temperature: 1.0,
            },
            second: CenterLossConfig {
                num_groups: 3,
                lambda_c: 0.5,
            },
            weights: (0.5, 2.0),
        },
    );
}

#[test]
fn supcon_memory_gradient_matches_finite_differences() {
    let loss = SupConLoss::new(
        4,
        SupConLossConfig { temperature: 0.3 },
        &mut Params::new(&common::device(), 0).scope("loss"),
    )
    .unwrap();
    let x = random(4, 4, 2);
    let g = Tensor::new(&[0i64, 1, 2, 0], &common::device()).unwrap();
    let m = random(6, 4, 3);
    let mg = Tensor::new(&[0i64, 0, 1, 3, 2, 1], &common::device()).unwrap();
    common::check_gradient("SupConLoss memory", &x, 1e-5, |e| {
        loss.forward_memory(e, &g, &m, &mg).unwrap()
    });
}

#[test]
fn arcface_parity_group_ids_are_class_indices() {
    // The edge set has 22 groups so that its ids are valid ArcFace class indices.
    let file = load("loss_arcface.json");
    let (g, _) = values(lookup(&file, "edge.groups"));
    assert!(g.iter().all(|&v| (0.0..22.0).contains(&v)));
}

// ---- in a model: the trainer optimises the losses' parameters -----------------------

mod in_a_model {
    use similarity_core::loss::{CenterLossConfig, SoftmaxLossConfig};
    use similarity_core::prelude::*;

    #[trainable_model]
    struct TopicModel {
        #[encoder(cache = "auto")]
        text: HashedNgramEncoder,
        #[head]
        head: SkipConnectionHead,
        #[loss(
            first = SoftmaxLossConfig { num_groups: 3, ..Default::default() },
            second = CenterLossConfig { num_groups: 3, ..Default::default() },
            weights = (1.0, 0.5)
        )]
        loss: CombinedLoss<SoftmaxLoss, CenterLoss>,
    }

    #[test]
    fn combined_class_loss_parameters_are_trained() {
        let topics = [
            [
                "disk resize volume",
                "disk snapshot backup",
                "volume storage size",
            ],
            [
                "price billing invoice",
                "cost per month",
                "billing plan price",
            ],
            [
                "login password reset",
                "account access token",
                "password change login",
            ],
        ];
        let samples: Vec<SimilarityGroupSample<String>> = topics
            .iter()
            .enumerate()
            .flat_map(|(g, texts)| {
                texts
                    .iter()
                    .map(move |t| SimilarityGroupSample::new(t.to_string(), g as i64))
            })
            .collect();
        let mut model =
            TopicModel::new(HashedNgramEncoder::default(), &ModelOptions::default()).unwrap();
        let vars = model.state().params().named_vars();
        let before: Vec<Vec<f32>> = ["loss.0.kernel", "loss.1.centers"]
            .iter()
            .map(|n| vars[*n].flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        let config = TrainerConfig {
            epochs: 2,
            batch_size: 9,
            progress: false,
            ..Default::default()
        };
        Trainer::new(config)
            .fit(&mut model, &samples, None)
            .unwrap();
        let vars = model.state().params().named_vars();
        for (name, old) in ["loss.0.kernel", "loss.1.centers"].iter().zip(before) {
            let new: Vec<f32> = vars[*name].flatten_all().unwrap().to_vec1().unwrap();
            assert_ne!(new, old, "{name} was not updated by the optimiser");
        }
    }
}
