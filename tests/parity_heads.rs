//! Parity of every head with Quaterion (quaterion-models 0.1.19): `tests/parity/head_*.json`
//! holds inputs, exported weights, outputs and gradients (see `tests/parity/SCHEMA.md`).
//!
//! For every case the exported state dict is loaded into the variables by name, and the
//! output (1e-5 relative) and the gradients of `sum(output · cotangent)` with respect to
//! the input and every parameter (1e-4) are compared. Torch's RNG cannot be reproduced,
//! so `default_init` cases also check that this crate's own initialisation follows the
//! same constants and distributions as the exported default weights.
//!
//! The second half checks that every trainable variable of each head receives a gradient,
//! and that each head trains inside a `#[trainable_model]`.

mod common;

use std::collections::BTreeMap;

use serde_json::Value;
use similarity_core::candle_core::Var;
use similarity_core::head::*;
use similarity_core::nn::{Mode, Params};
use similarity_core::prelude::*;

use common::parity::{assert_close, load, tensor, values};

/// Builds `H` for a case, loads the exported weights, compares output and gradients;
/// for `default_init` cases also checks the own initialisation against the export.
fn check_file<H: Head>(
    file_name: &str,
    config_of: impl Fn(&Value) -> H::Config,
    forward: impl Fn(&H, &Tensor, &Value) -> Tensor,
) -> usize {
    let file = load(file_name);
    let x_value = &file["inputs"]["x"];
    let input_size = values(x_value).1[1];
    let cases = file["cases"].as_array().unwrap();
    assert!(!cases.is_empty(), "{file_name}: no cases");
    for case in cases {
        let id = case["id"].as_str().unwrap();
        let config = config_of(&case["params"]);
        let mut params = Params::new(&common::device(), 0);
        let head = H::new(input_size, config.clone(), &mut params.scope("head")).unwrap();
        assert_eq!(
            head.output_size() as u64,
            case["output_size"].as_u64().unwrap(),
            "{id}: output size"
        );
        let weights = case["weights"].as_object().unwrap();
        let ours: Vec<&String> = params.named_vars().keys().collect();
        let theirs: Vec<String> = {
            let mut v: Vec<String> = weights.keys().map(|k| format!("head.{k}")).collect();
            v.sort();
            v
        };
        assert_eq!(
            ours,
            theirs.iter().collect::<Vec<_>>(),
            "{id}: variable names"
        );

        if id.ends_with("/default_init") {
            check_default_init(id, &params, weights);
        }

        for (name, w) in weights {
            params.named_vars()[&format!("head.{name}")]
                .set(&tensor(w))
                .unwrap();
        }
        let x = Var::from_tensor(&tensor(x_value)).unwrap();
        let out = forward(&head, x.as_tensor(), &file["inputs"]);
        let e = &case["expected"];
        assert_close(&out, &e["output"], 1e-5, &format!("{id} output"));
        let grads = (out * tensor(&e["cotangent"]))
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_close(
            grads.get(&x).unwrap(),
            &e["grad_input_of_sum_output_times_cotangent"],
            1e-4,
            &format!("{id} grad x"),
        );
        let grad_params = e["grad_params_of_sum_output_times_cotangent"]
            .as_object()
            .unwrap();
        assert_eq!(
            grad_params.len(),
            weights.len(),
            "{id}: gradient per parameter"
        );
        for (name, g) in grad_params {
            let var = &params.named_vars()[&format!("head.{name}")];
            assert_close(
                grads.get(var).unwrap(),
                g,
                1e-4,
                &format!("{id} grad {name}"),
            );
        }
    }
    cases.len()
}

/// Own initialisation versus the exported `default_init` weights: gates are the same
/// constants exactly; linear weights and biases both lie in PyTorch's default
/// `U(−1/√in, 1/√in)` and spread over it alike.
fn check_default_init(id: &str, params: &Params, weights: &serde_json::Map<String, Value>) {
    let vars = params.named_vars();
    for (name, w) in weights {
        let (theirs, shape) = values(w);
        let mine = vars[&format!("head.{name}")]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let leaf = name.rsplit('.').next().unwrap();
        if leaf.starts_with("gates") {
            assert_eq!(mine, theirs, "{id}: {name} is Quaterion's constant");
            continue;
        }
        // weight (out, in): fan-in is the second dimension; the bias shares the weight's.
        let fan_in = if leaf == "weight" {
            shape[1]
        } else {
            let weight = format!("{}.weight", name.strip_suffix(".bias").unwrap());
            values(&weights[&weight]).1[1]
        };
        let bound = 1.0 / (fan_in as f32).sqrt();
        for (who, v) in [("Quaterion", &theirs), ("ours", &mine)] {
            assert!(
                v.iter().all(|e| e.abs() <= bound * (1.0 + 1e-6)),
                "{id}: {who} {name} outside U(±{bound})"
            );
        }
        if theirs.len() >= 48 {
            // Uniform: mean |v| ≈ bound/2 for both.
            let mean_abs = |v: &[f32]| v.iter().map(|e| e.abs()).sum::<f32>() / v.len() as f32;
            for (who, v) in [("Quaterion", &theirs), ("ours", &mine)] {
                let m = mean_abs(v) / bound;
                assert!(
                    (0.35..0.65).contains(&m),
                    "{id}: {who} {name} mean |v| = {m}·bound"
                );
            }
        }
    }
}

fn eval<H: Head>(head: &H, x: &Tensor, _inputs: &Value) -> Tensor {
    head.forward(x, &mut Mode::Eval).unwrap()
}

fn usize_param(p: &Value, name: &str) -> usize {
    p[name].as_u64().unwrap_or_else(|| panic!("param {name}")) as usize
}

#[test]
fn empty_head_matches_quaterion() {
    assert_eq!(
        check_file::<EmptyHead>("head_empty_head.json", |_| Default::default(), eval),
        2
    );
}

#[test]
fn gated_head_matches_quaterion() {
    assert_eq!(
        check_file::<GatedHead>("head_gated_head.json", |_| Default::default(), eval),
        2
    );
}

#[test]
fn skip_connection_head_matches_quaterion() {
    let n = check_file::<SkipConnectionHead>(
        "head_skip_connection_head.json",
        |p| SkipConnectionHeadConfig {
            n_layers: usize_param(p, "n_layers"),
            ..Default::default()
        },
        eval,
    );
    assert_eq!(n, 4);
}

#[test]
fn softmax_embeddings_head_matches_quaterion() {
    let n = check_file::<SoftmaxEmbeddingsHead>(
        "head_softmax_embeddings_head.json",
        |p| SoftmaxEmbeddingsHeadConfig {
            output_groups: usize_param(p, "output_groups"),
            output_size_per_group: usize_param(p, "output_size_per_group"),
            ..Default::default()
        },
        eval,
    );
    assert_eq!(n, 2);
}

#[test]
fn stacked_projection_head_matches_quaterion() {
    let n = check_file::<StackedProjectionHead>(
        "head_stacked_projection_head.json",
        |p| StackedProjectionHeadConfig {
            output_sizes: p["output_sizes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect(),
            activation_fn: p["activation_fn"].as_str().unwrap().to_string(),
            ..Default::default()
        },
        eval,
    );
    assert_eq!(n, 4);
}

#[test]
fn widening_head_matches_quaterion() {
    let n = check_file::<WideningHead>(
        "head_widening_head.json",
        |p| WideningHeadConfig {
            expansion_factor: p["expansion_factor"].as_f64().unwrap(),
            activation_fn: p["activation_fn"].as_str().unwrap().to_string(),
            ..Default::default()
        },
        eval,
    );
    assert_eq!(n, 4);
}

/// `"Linear(12,10)"`, `"ReLU"`, … as the parity file writes the torch modules.
fn layer_of(spec: &str) -> Layer {
    match spec {
        "ReLU" => Layer::Relu,
        "GELU" => Layer::Gelu,
        "Tanh" => Layer::Tanh,
        "Sigmoid" => Layer::Sigmoid,
        s if s.starts_with("Linear(") => {
            let out = s.trim_end_matches(')').rsplit(',').next().unwrap();
            Layer::linear(out.trim().parse().unwrap())
        }
        other => panic!("layer spec {other}"),
    }
}

#[test]
fn sequential_head_matches_quaterion() {
    let n = check_file::<SequentialHead>(
        "head_sequential_head.json",
        |p| SequentialHeadConfig {
            layers: p["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| layer_of(l.as_str().unwrap()))
                .collect(),
            output_size: Some(usize_param(p, "output_size")),
        },
        eval,
    );
    assert_eq!(n, 2);
}

fn switch_option_of(spec: &str) -> SwitchOption {
    match spec.split('(').next().unwrap() {
        "GatedHead" => SwitchOption::GatedHead(Default::default()),
        "SkipConnectionHead" => SwitchOption::SkipConnectionHead(Default::default()),
        "EmptyHead" => SwitchOption::EmptyHead(Default::default()),
        other => panic!("switch option {other}"),
    }
}

#[test]
fn switch_head_matches_quaterion_routing_by_meta() {
    let n = check_file::<SwitchHead>(
        "head_switch_head.json",
        |p| SwitchHeadConfig {
            options: p["options"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), switch_option_of(v.as_str().unwrap())))
                .collect::<BTreeMap<_, _>>(),
            ..Default::default()
        },
        |head, x, inputs| {
            let keys: Vec<&str> = inputs["meta"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["encoder"].as_str().unwrap())
                .collect();
            assert!(keys.contains(&"a") && keys.contains(&"b"));
            head.forward_keys(x, &keys, &mut Mode::Eval).unwrap()
        },
    );
    assert_eq!(n, 2);
}

// ---------------------------------------------------------------------------------------
// Every variable gets a gradient.

fn random(shape: (usize, usize), seed: u64) -> Tensor {
    let mut p = Params::new(&common::device(), seed);
    p.var(
        "x",
        &[shape.0, shape.1],
        similarity_core::nn::Init::Normal {
            mean: 0.0,
            std: 1.0,
        },
    )
    .unwrap()
    .detach()
}

fn assert_all_vars_get_gradients<H: Head + 'static>(config: H::Config, route: Option<&[usize]>) {
    let mut params = Params::new(&common::device(), 3);
    let head = H::new(6, config, &mut params.scope("head")).unwrap();
    let x = random((8, 6), 11);
    let out = match route {
        None => head.forward(&x, &mut Mode::Eval).unwrap(),
        Some(r) => {
            let any: &dyn std::any::Any = &head;
            let switch = any.downcast_ref::<SwitchHead>().unwrap();
            switch.forward_routed(&x, r, &mut Mode::Eval).unwrap()
        }
    };
    let c = random((8, head.output_size()), 12);
    let grads = (out * c).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, var) in params.named_vars() {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("{}: no gradient for {name}", H::NAME));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{}: {name} gradient {norm}",
            H::NAME
        );
    }
}

#[test]
fn every_trainable_variable_of_every_head_gets_a_gradient() {
    assert_all_vars_get_gradients::<EmptyHead>(Default::default(), None);
    assert_all_vars_get_gradients::<GatedHead>(Default::default(), None);
    assert_all_vars_get_gradients::<LinearHead>(Default::default(), None);
    assert_all_vars_get_gradients::<SkipConnectionHead>(
        SkipConnectionHeadConfig {
            n_layers: 3,
            ..Default::default()
        },
        None,
    );
    assert_all_vars_get_gradients::<SoftmaxEmbeddingsHead>(
        SoftmaxEmbeddingsHeadConfig {
            output_groups: 2,
            output_size_per_group: 3,
            dropout: 0.0,
        },
        None,
    );
    for act in Activation::NAMES {
        assert_all_vars_get_gradients::<StackedProjectionHead>(
            StackedProjectionHeadConfig {
                output_sizes: vec![7, 5, 4],
                activation_fn: act.to_string(),
                dropout: 0.0,
            },
            None,
        );
    }
    assert_all_vars_get_gradients::<WideningHead>(Default::default(), None);
    assert_all_vars_get_gradients::<SequentialHead>(
        SequentialHeadConfig {
            layers: vec![
                Layer::linear(9),
                Layer::Gelu,
                Layer::Dropout { p: 0.2 },
                Layer::Linear {
                    out: 4,
                    bias: false,
                },
            ],
            output_size: Some(4),
        },
        None,
    );
    let mut options = BTreeMap::new();
    options.insert("a".to_string(), SwitchOption::GatedHead(Default::default()));
    options.insert(
        "b".to_string(),
        SwitchOption::SkipConnectionHead(Default::default()),
    );
    options.insert(
        "c".to_string(),
        SwitchOption::WideningHead(Default::default()),
    );
    assert_all_vars_get_gradients::<SwitchHead>(
        SwitchHeadConfig {
            options,
            ..Default::default()
        },
        Some(&[2, 0, 1, 1, 0, 2, 2, 1]),
    );
}

// ---------------------------------------------------------------------------------------
// Each head inside `#[trainable_model]`.

macro_rules! head_model {
    ($name:ident, $head:ty $(, $opt:ident = $val:expr)*) => {
        #[trainable_model]
        struct $name {
            #[encoder]
            text: HashedNgramEncoder,
            #[head($($opt = $val),*)]
            head: $head,
            #[loss(scale = 10.0)]
            loss: MultipleNegativesRankingLoss,
        }
    };
}

head_model!(EmptyModel, EmptyHead);
head_model!(GatedModel, GatedHead, dropout = 0.1);
head_model!(LinearModel, LinearHead, output_size = Some(8));
head_model!(
    SoftmaxModel,
    SoftmaxEmbeddingsHead,
    output_groups = 4,
    output_size_per_group = 4
);
head_model!(
    StackedModel,
    StackedProjectionHead,
    output_sizes = vec![12, 8],
    activation_fn = "gelu".into()
);
head_model!(
    WideningModel,
    WideningHead,
    expansion_factor = 2.0,
    activation_fn = "tanh".into()
);
head_model!(
    SequentialModel,
    SequentialHead,
    layers = vec![
        Layer::linear(12),
        Layer::Relu,
        Layer::Dropout { p: 0.1 },
        Layer::linear(8)
    ],
    output_size = Some(8)
);
head_model!(
    SwitchModel,
    SwitchHead,
    options = [
        (
            "gated".to_string(),
            SwitchOption::GatedHead(Default::default())
        ),
        (
            "skip".to_string(),
            SwitchOption::SkipConnectionHead(Default::default())
        ),
    ]
    .into_iter()
    .collect(),
    default_route = Some("skip".into())
);

fn encoder() -> HashedNgramEncoder {
    HashedNgramEncoder::new(HashedNgramConfig {
        dim: 16,
        n_features: 1 << 12,
        ..Default::default()
    })
    .unwrap()
}

fn one_epoch<M: TrainableModel<Record = String, Loss = MultipleNegativesRankingLoss>>(
    model: &mut M,
) {
    let train = common::faq_pairs("train", 40);
    let trainer = Trainer::new(TrainerConfig {
        epochs: 1,
        batch_size: 20,
        optimizer: OptimizerConfig::adam(1e-2),
        progress: false,
        ..Default::default()
    });
    let report = trainer.fit(model, &train, None).unwrap();
    let loss = report.epochs[0].train_loss;
    assert!(loss.is_finite(), "loss {loss}");
}

#[test]
fn every_head_trains_in_a_trainable_model() {
    let o = ModelOptions::default();
    one_epoch(&mut EmptyModel::new(encoder(), &o).unwrap());
    one_epoch(&mut GatedModel::new(encoder(), &o).unwrap());
    one_epoch(&mut LinearModel::new(encoder(), &o).unwrap());
    one_epoch(&mut SoftmaxModel::new(encoder(), &o).unwrap());
    one_epoch(&mut StackedModel::new(encoder(), &o).unwrap());
    one_epoch(&mut WideningModel::new(encoder(), &o).unwrap());
    one_epoch(&mut SequentialModel::new(encoder(), &o).unwrap());
    one_epoch(&mut SwitchModel::new(encoder(), &o).unwrap());
}
