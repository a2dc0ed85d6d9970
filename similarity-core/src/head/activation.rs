//! Activation functions chosen by name, as Quaterion's `ActivationFromFnName` picks an
//! attribute of `torch.nn.functional`.
//!
//! Every form is built from differentiable Candle ops, so gradients flow through it:
//!
//! | name | formula |
//! |------|---------|
//! | `relu` | `max(x, 0)` |
//! | `gelu` | `x · Φ(x) = x/2 · (1 + erf(x/√2))`, the exact form (torch's default) |
//! | `gelu_tanh` | `x/2 · (1 + tanh(√(2/π)(x + 0.044715x³)))` (torch's `approximate="tanh"`) |
//! | `tanh` | `tanh(x)` |
//! | `sigmoid` | `1 / (1 + e⁻ˣ)` |
//! | `silu` | `x · σ(x)` |
//! | `elu` | `x` if `x > 0`, else `eˣ − 1` (α = 1) |
//! | `leaky_relu` | `max(x, 0) − 0.01 · max(−x, 0)` (slope 0.01) |
//! | `softplus` | `ln(1 + eˣ)`, computed as `max(x, 0) + ln(1 + e^{−|x|})` |
//! | `mish` | `x · tanh(softplus(x))` |
//! | `identity` | `x` |
//!
//! Shapes: any; applied element-wise.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// An element-wise activation; see the module docs for the formulas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `max(x, 0)`.
    Relu,
    /// Exact GELU, `x · Φ(x)`.
    Gelu,
    /// GELU's tanh approximation.
    GeluTanh,
    /// `tanh(x)`.
    Tanh,
    /// Logistic sigmoid.
    Sigmoid,
    /// `x · σ(x)` (swish).
    Silu,
    /// ELU with α = 1.
    Elu,
    /// Leaky ReLU with negative slope 0.01.
    LeakyRelu,
    /// `ln(1 + eˣ)`.
    Softplus,
    /// `x · tanh(softplus(x))`.
    Mish,
    /// `x`.
    Identity,
}

impl Activation {
    /// Every activation, in the order of [`Activation::NAMES`].
    pub const ALL: [Activation; 11] = [
        Activation::Relu,
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::Tanh,
        Activation::Sigmoid,
        Activation::Silu,
        Activation::Elu,
        Activation::LeakyRelu,
        Activation::Softplus,
        Activation::Mish,
        Activation::Identity,
    ];

    /// The accepted names (torch.nn.functional's).
    pub const NAMES: [&'static str; 11] = [
        "relu",
        "gelu",
        "gelu_tanh",
        "tanh",
        "sigmoid",
        "silu",
        "elu",
        "leaky_relu",
        "softplus",
        "mish",
        "identity",
    ];

    /// Its name, as accepted by [`Activation::from_name`].
    pub fn name(self) -> &'static str {
        let i = Self::ALL.iter().position(|&a| a == self).expect("listed");
        Self::NAMES[i]
    }

    /// Parses `name`; `option` names the configuration option the name came from, for
    /// the error, which lists the valid names.
    pub fn from_name(name: &str, option: &str) -> Result<Self> {
        Self::NAMES
            .iter()
            .position(|&n| n == name)
            .map(|i| Self::ALL[i])
            .ok_or_else(|| {
                Error::invalid(
                    option.to_string(),
                    format!(
                        "unknown activation `{name}`; valid names: {}",
                        Self::NAMES.join(", ")
                    ),
                )
            })
    }

    /// Applies it element-wise.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Relu => x.relu()?,
            Activation::Gelu => x.gelu_erf()?,
            Activation::GeluTanh => x.gelu()?,
            Activation::Tanh => x.tanh()?,
            Activation::Sigmoid => candle_nn::ops::sigmoid(x)?,
            Activation::Silu => x.mul(&candle_nn::ops::sigmoid(x)?)?,
            Activation::Elu => x.elu(1.0)?,
            Activation::LeakyRelu => (x.relu()? - (x.neg()?.relu()? * 0.01)?)?,
            Activation::Softplus => softplus(x)?,
            Activation::Mish => x.mul(&softplus(x)?.tanh()?)?,
            Activation::Identity => x.clone(),
        })
    }
}

fn softplus(x: &Tensor) -> Result<Tensor> {
    let tail = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok(x.relu()?.add(&tail)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn reference(a: Activation, x: f64) -> f64 {
        let sp = |x: f64| (1.0 + x.exp()).ln();
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        match a {
            Activation::Relu => x.max(0.0),
            Activation::Gelu => {
                // Φ via the complementary error function's series is overkill; use a
                // high-precision numerical integral of the normal density.
                let n = 20_000;
                let (lo, h) = (-12.0, (x + 12.0) / n as f64);
                let pdf = |t: f64| (-t * t / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
                let mut s = pdf(lo) + pdf(x);
                for i in 1..n {
                    s += pdf(lo + i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
                }
                x * s * h / 3.0
            }
            Activation::GeluTanh => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * x * (1.0 + (c * (x + 0.044715 * x.powi(3))).tanh())
            }
            Activation::Tanh => x.tanh(),
            Activation::Sigmoid => sig(x),
            Activation::Silu => x * sig(x),
            Activation::Elu => {
                if x > 0.0 {
                    x
                } else {
                    x.exp() - 1.0
                }
            }
            Activation::LeakyRelu => {
                if x > 0.0 {
                    x
                } else {
                    0.01 * x
                }
            }
            Activation::Softplus => sp(x),
            Activation::Mish => x * sp(x).tanh(),
            Activation::Identity => x,
        }
    }

    #[test]
    fn values_and_gradients_match_the_formulas() {
        let xs = [-3.1f64, -1.2, -0.4, 0.3, 0.9, 2.5];
        for a in Activation::ALL {
            let v = Var::new(&xs.map(|x| x as f32), &Device::Cpu).unwrap();
            let y = a.apply(v.as_tensor()).unwrap();
            let got = y.to_vec1::<f32>().unwrap();
            let grad = y.sum_all().unwrap().backward().unwrap();
            let g = grad.get(&v).unwrap().to_vec1::<f32>().unwrap();
            for (i, &x) in xs.iter().enumerate() {
                let want = reference(a, x);
                assert!((f64::from(got[i]) - want).abs() < 1e-5, "{a:?}({x})");
                let h = 1e-5;
                let d = (reference(a, x + h) - reference(a, x - h)) / (2.0 * h);
                assert!(
                    (f64::from(g[i]) - d).abs() < 1e-3,
                    "{a:?}'({x}): {} vs {d}",
                    g[i]
                );
            }
        }
    }

    #[test]
    fn names_round_trip_and_unknown_lists_valid_ones() {
        for a in Activation::ALL {
            assert_eq!(Activation::from_name(a.name(), "opt").unwrap(), a);
            let json = serde_json::to_string(&a).unwrap();
            assert_eq!(json, format!("\"{}\"", a.name()));
        }
        let e = Activation::from_name("swishy", "activation_fn")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("activation_fn") && e.contains("swishy") && e.contains("gelu"),
            "{e}"
        );
    }
}
