//! `SequentialHead`: a user-defined list of layers (Quaterion's `SequentialHead`).
//!
//! Quaterion's takes arbitrary `torch.nn.Module`s; here the layers are a serialisable list
//! of [`Layer`] specs, so a saved model can rebuild the head and `#[trainable_model]` can
//! build it from a literal:
//!
//! ```text
//! h₀ = x,   hₖ₊₁ = layerₖ(hₖ),   y = h_L
//! ```
//!
//! * [`Layer::Linear`] `{ out, bias }`: `h Wᵀ + b`, `W: (out, in)`, with PyTorch's default
//!   initialisation `U(−1/√in, 1/√in)`; `in` is the previous layer's width (`d` first).
//! * [`Layer::Relu`], [`Layer::Gelu`] (exact erf form), [`Layer::Tanh`],
//!   [`Layer::Sigmoid`], or any [`Activation`] by name with [`Layer::Activation`].
//! * [`Layer::Dropout`] `{ p }`: inverted dropout, active in training only.
//!
//! As in Quaterion there is no implicit input dropout (start the list with a `Dropout`
//! for one). Shapes: `(batch, d)` → `(batch, output_size)`, where the output size is the
//! last `Linear`'s `out` (or `d` without one). Quaterion requires `output_size` and
//! trusts it; here it is optional and, when given, checked against the layers.
//!
//! Defaults: `layers = []` (the identity), `output_size = None`.
//!
//! Variables: `_sequential.{k}.weight`, `_sequential.{k}.bias` for each `Linear` at index
//! `k` of the list (indices count every layer, as `nn.Sequential` does).
//!
//! ```
//! use similarity_core::head::{Layer, SequentialHeadConfig};
//! let config = SequentialHeadConfig {
//!     layers: vec![Layer::linear(10), Layer::Relu, Layer::linear(8)],
//!     output_size: Some(8),
//! };
//! # let _ = config;
//! ```

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{Activation, Head, Plan, check_dropout, check_input, check_input_size, check_width};
use crate::error::{Error, Result};
use crate::limits::{self, ParamCount};
use crate::nn::{Linear, Mode, ParamScope, dropout};

/// One layer of a [`SequentialHead`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum Layer {
    /// Fully connected layer to `out` units.
    Linear {
        /// Output width.
        out: usize,
        /// Whether it has a bias (PyTorch's default: true).
        bias: bool,
    },
    /// `max(x, 0)`.
    Relu,
    /// Exact GELU (torch's default).
    Gelu,
    /// `tanh(x)`.
    Tanh,
    /// Logistic sigmoid.
    Sigmoid,
    /// Any activation by name (see [`Activation::NAMES`]).
    Activation {
        /// The activation's name.
        name: String,
    },
    /// Inverted dropout with probability `p`, in training only.
    Dropout {
        /// Probability of zeroing an element, in `[0, 1)`.
        p: f64,
    },
}

impl Layer {
    /// `Linear { out, bias: true }`, as `nn.Linear(in, out)`.
    pub fn linear(out: usize) -> Self {
        Layer::Linear { out, bias: true }
    }
}

/// Options of [`SequentialHead`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SequentialHeadConfig {
    /// The layers, applied in order. Default empty (the identity).
    pub layers: Vec<Layer>,
    /// Expected output size, checked against the layers when given. Default `None`.
    pub output_size: Option<usize>,
}

#[derive(Debug, Clone)]
enum Built {
    Linear(Linear),
    Act(Activation),
    Dropout(f64),
}

/// A list of layers; see the module docs.
#[derive(Debug, Clone)]
pub struct SequentialHead {
    config: SequentialHeadConfig,
    size: usize,
    out: usize,
    layers: Vec<Built>,
}

#[diagnostic::do_not_recommend]
impl Head for SequentialHead {
    type Config = SequentialHeadConfig;
    const NAME: &'static str = "SequentialHead";

    fn new(input_size: usize, config: Self::Config, params: &mut ParamScope) -> Result<Self> {
        let out = Self::plan(input_size, &config)?.output_size;
        let mut width = input_size;
        let mut layers = Vec::with_capacity(config.layers.len());
        for (k, layer) in config.layers.iter().enumerate() {
            layers.push(match layer {
                Layer::Linear { out, bias } => {
                    let mut scope = params.scope(&format!("_sequential.{k}"));
                    let linear = Linear::new(width, *out, *bias, &mut scope)?;
                    width = *out;
                    Built::Linear(linear)
                }
                Layer::Relu => Built::Act(Activation::Relu),
                Layer::Gelu => Built::Act(Activation::Gelu),
                Layer::Tanh => Built::Act(Activation::Tanh),
                Layer::Sigmoid => Built::Act(Activation::Sigmoid),
                Layer::Activation { name } => Built::Act(Activation::from_name(
                    name,
                    &format!("SequentialHead option `layers[{k}]`"),
                )?),
                Layer::Dropout { p } => Built::Dropout(*p),
            });
        }
        Ok(SequentialHead {
            config,
            size: input_size,
            out,
            layers,
        })
    }

    fn check_config(input_size: usize, config: &Self::Config) -> Result<()> {
        Self::plan(input_size, config).map(drop)
    }

    fn config(&self) -> &Self::Config {
        &self.config
    }

    fn input_size(&self) -> usize {
        self.size
    }

    fn output_size(&self) -> usize {
        self.out
    }

    fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        check_input(x, self.size, Self::NAME)?;
        self.transform(x, mode)
    }
}

impl SequentialHead {
    /// The output size and parameter count for `config` on inputs of `input_size`, every
    /// option checked first (see [`Head::check_config`]).
    pub(crate) fn plan(input_size: usize, config: &SequentialHeadConfig) -> Result<Plan> {
        check_input_size(Self::NAME, input_size)?;
        if config.layers.len() > limits::MAX_LAYERS {
            return Err(Error::invalid(
                "SequentialHead option `layers`",
                format!(
                    "must have at most {} layers, got {}",
                    limits::MAX_LAYERS,
                    config.layers.len()
                ),
            ));
        }
        let mut params = ParamCount::new(Self::NAME);
        let mut width = input_size;
        for (k, layer) in config.layers.iter().enumerate() {
            let option = format!("layers[{k}]");
            match layer {
                Layer::Linear { out, bias } => {
                    check_width(Self::NAME, &format!("{option}.out"), *out)?;
                    params.add(1, &[*out, width])?;
                    if *bias {
                        params.add(1, &[*out])?;
                    }
                    width = *out;
                }
                Layer::Activation { name } => {
                    Activation::from_name(name, &format!("SequentialHead option `{option}`"))?;
                }
                Layer::Dropout { p } => check_dropout(Self::NAME, &option, *p)?,
                Layer::Relu | Layer::Gelu | Layer::Tanh | Layer::Sigmoid => {}
            }
        }
        if let Some(expected) = config.output_size
            && expected != width
        {
            return Err(Error::invalid(
                "SequentialHead option `output_size`",
                format!("is {expected}, but the layers output {width}"),
            ));
        }
        Ok(Plan {
            output_size: width,
            params,
        })
    }

    /// The layers in order (there is no separate input dropout).
    pub(crate) fn transform(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let mut h = x.clone();
        for layer in &self.layers {
            h = match layer {
                Built::Linear(l) => l.forward(&h)?,
                Built::Act(a) => a.apply(&h)?,
                Built::Dropout(p) => dropout(&h, *p, mode)?,
            };
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Params;
    use candle_core::Device;

    #[test]
    fn builds_named_layers_and_checks_output_size() {
        let mut p = Params::new(&Device::Cpu, 0);
        let config = SequentialHeadConfig {
            layers: vec![
                Layer::Dropout { p: 0.1 },
                Layer::linear(6),
                Layer::Activation {
                    name: "silu".into(),
                },
                Layer::Linear {
                    out: 2,
                    bias: false,
                },
            ],
            output_size: Some(2),
        };
        let head = SequentialHead::new(4, config.clone(), &mut p.scope("head")).unwrap();
        let names: Vec<_> = p.named_vars().keys().cloned().collect();
        assert_eq!(
            names,
            [
                "head._sequential.1.bias",
                "head._sequential.1.weight",
                "head._sequential.3.weight"
            ]
        );
        let x = Tensor::ones((3, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(head.forward(&x, &mut Mode::Eval).unwrap().dims(), [3, 2]);

        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(
            serde_json::from_str::<SequentialHeadConfig>(&json).unwrap(),
            config
        );

        let wrong = SequentialHeadConfig {
            output_size: Some(3),
            ..config
        };
        let e = SequentialHead::new(4, wrong, &mut p.scope("h2"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("output_size") && e.contains('2'), "{e}");
        let bad = SequentialHeadConfig {
            layers: vec![Layer::Activation {
                name: "nope".into(),
            }],
            output_size: None,
        };
        let e = SequentialHead::new(4, bad, &mut p.scope("h3"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("layers[0]") && e.contains("relu"), "{e}");
    }

    #[test]
    fn empty_list_is_the_identity() {
        let mut p = Params::new(&Device::Cpu, 0);
        let head = SequentialHead::new(3, Default::default(), &mut p.scope("head")).unwrap();
        let x = Tensor::new(&[[1.0f32, 2.0, 3.0]], &Device::Cpu).unwrap();
        let y = head.forward(&x, &mut Mode::Eval).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), [[1.0, 2.0, 3.0]]);
        assert_eq!(head.output_size(), 3);
    }
}
