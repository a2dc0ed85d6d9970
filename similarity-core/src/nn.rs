//! Trainable building blocks shared by heads, losses and encoders.
//!
//! * [`Params`]: the store of a model's trainable variables, initialised from a seeded
//!   generator so that a run is reproducible (Candle's CPU generator cannot be seeded).
//!   Names are dotted paths (`head.fc_0.weight`) in a sorted map, which fixes both the
//!   optimiser's order and the layout of saved weights.
//! * [`Mode`]: whether a forward pass trains (dropout active, with its own seeded
//!   generator) or evaluates.
//! * [`dropout`] and [`Linear`]: `y = x Wᵀ + b` with `W: (out, in)`, PyTorch's layout and
//!   PyTorch's default initialisation `U(-1/√in, 1/√in)` for `W` and `b`.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::limits;

/// How a trainable variable is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Every element equal to the value.
    Const(f64),
    /// Uniform on `[lo, hi)`.
    Uniform {
        /// Lower bound.
        lo: f64,
        /// Upper bound.
        hi: f64,
    },
    /// Normal with the given mean and standard deviation (Box–Muller).
    Normal {
        /// Mean.
        mean: f64,
        /// Standard deviation.
        std: f64,
    },
}

/// The trainable variables of a model, by dotted name.
#[derive(Debug)]
pub struct Params {
    vars: BTreeMap<String, Var>,
    /// Scalars in `vars`, at most [`limits::MAX_PARAMETERS`].
    numel: usize,
    device: Device,
    rng: StdRng,
}

impl Params {
    /// An empty store whose variables live on `device`, initialised from `seed`.
    pub fn new(device: &Device, seed: u64) -> Self {
        Params {
            vars: BTreeMap::new(),
            numel: 0,
            device: device.clone(),
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// The device variables are created on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A view that prefixes every name with `prefix.`.
    pub fn scope(&mut self, prefix: &str) -> ParamScope<'_> {
        ParamScope {
            params: self,
            prefix: prefix.to_string(),
        }
    }

    /// Creates the variable `name` with `shape`, initialised by `init`, and returns a
    /// tensor sharing its storage (optimiser updates are seen through it).
    ///
    /// A store holds at most [`limits::MAX_PARAMETERS`] scalars: a shape that would take
    /// it past that (or whose element count overflows) is an error before anything is
    /// allocated. Components check their own sizes first, with the option's name; this is
    /// the backstop for those that do not.
    pub fn var(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        if self.vars.contains_key(name) {
            return Err(Error::invalid(
                format!("parameter `{name}`"),
                "declared twice; every trainable variable needs a unique name",
            ));
        }
        let n = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .filter(|&n| n <= limits::MAX_PARAMETERS - self.numel)
            .ok_or_else(|| {
                Error::invalid(
                    format!("parameter `{name}`"),
                    format!(
                        "shape {shape:?} would take the model past {} parameters \
                         (similarity_core::limits::MAX_PARAMETERS)",
                        limits::MAX_PARAMETERS
                    ),
                )
            })?;
        let values: Vec<f32> = match init {
            Init::Const(v) => vec![v as f32; n],
            Init::Uniform { lo, hi } => (0..n)
                .map(|_| (lo + (hi - lo) * self.rng.random::<f64>()) as f32)
                .collect(),
            Init::Normal { mean, std } => (0..n)
                .map(|_| (mean + std * standard_normal(&mut self.rng)) as f32)
                .collect(),
        };
        let tensor = Tensor::from_vec(values, shape, &self.device)?;
        let var = Var::from_tensor(&tensor)?;
        let out = var.as_tensor().clone();
        self.vars.insert(name.to_string(), var);
        self.numel += n;
        Ok(out)
    }

    /// The variables, in name order.
    pub fn vars(&self) -> Vec<Var> {
        self.vars.values().cloned().collect()
    }

    /// The variables by name.
    pub fn named_vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    /// Number of scalar parameters.
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// Writes every variable to a safetensors file.
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        let tensors: std::collections::HashMap<String, Tensor> = self
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        crate::files::write_tensors(path, &tensors)
    }

    /// Sets every variable from a safetensors file, which must hold exactly these names
    /// with these shapes. The values are moved to this store's device.
    pub fn load_safetensors(&self, path: &Path) -> Result<()> {
        let loaded = crate::files::read_tensors(path)?;
        // Every tensor is checked before any variable is set, so a bad file leaves the
        // variables as they were.
        let mut values = Vec::with_capacity(self.vars.len());
        for (name, var) in &self.vars {
            let t = loaded
                .get(name)
                .ok_or_else(|| Error::format(path, format!("missing tensor `{name}`")))?;
            if t.dims() != var.dims() {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor `{name}` has shape {:?}, the model expects {:?}",
                        t.dims(),
                        var.dims()
                    ),
                ));
            }
            let t = checked_tensor(path, name, t)?;
            values.push((var, t.to_device(&self.device)?));
        }
        if let Some(extra) = loaded.keys().find(|k| !self.vars.contains_key(*k)) {
            return Err(Error::format(
                path,
                format!("unexpected tensor `{extra}`: the file was saved by another model"),
            ));
        }
        for (var, t) in values {
            var.set(&t)?;
        }
        Ok(())
    }
}

/// `t` as `f32`, when it is a floating-point tensor whose values are all finite;
/// otherwise an error naming the file and the tensor.
pub(crate) fn checked_tensor(path: &Path, name: &str, t: &Tensor) -> Result<Tensor> {
    if !t.dtype().is_float() {
        return Err(Error::format(
            path,
            format!(
                "tensor `{name}` has dtype {:?}, a floating-point one is expected",
                t.dtype()
            ),
        ));
    }
    let t = t.to_dtype(DType::F32)?;
    if !all_finite(&t)? {
        return Err(Error::format(
            path,
            format!("tensor `{name}` holds NaN or infinite values"),
        ));
    }
    Ok(t)
}

/// Whether every value of the floating-point tensor `t` is finite: `Σ 0·t` is 0 exactly
/// when every entry is finite and NaN otherwise, and cannot overflow (the test of
/// [`ModelState::first_non_finite_var`](crate::train::ModelState::first_non_finite_var)).
pub(crate) fn all_finite(t: &Tensor) -> Result<bool> {
    Ok((t * 0.0)?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?
        .is_finite())
}

/// A prefixed view of [`Params`], handed to a component's constructor.
#[derive(Debug)]
pub struct ParamScope<'a> {
    params: &'a mut Params,
    prefix: String,
}

impl ParamScope<'_> {
    /// Creates `prefix.name` (see [`Params::var`]).
    pub fn var(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let full = format!("{}.{}", self.prefix, name);
        self.params.var(&full, shape, init)
    }

    /// A nested scope `prefix.sub`.
    pub fn scope(&mut self, sub: &str) -> ParamScope<'_> {
        ParamScope {
            prefix: format!("{}.{}", self.prefix, sub),
            params: &mut *self.params,
        }
    }

    /// The device variables are created on.
    pub fn device(&self) -> &Device {
        self.params.device()
    }
}

/// Whether a forward pass trains or evaluates.
#[derive(Debug)]
pub enum Mode<'a> {
    /// Evaluation: dropout is the identity.
    Eval,
    /// Training: dropout masks are drawn from this generator.
    Train(&'a mut StdRng),
}

impl Mode<'_> {
    /// True in training mode.
    pub fn is_train(&self) -> bool {
        matches!(self, Mode::Train(_))
    }
}

/// Inverted dropout: in training, zeroes each element with probability `p` and scales the
/// rest by `1 / (1 - p)`; in evaluation, the identity. The mask comes from the seeded
/// generator in `mode`, so training is reproducible.
pub fn dropout(x: &Tensor, p: f64, mode: &mut Mode) -> Result<Tensor> {
    let Mode::Train(rng) = mode else {
        return Ok(x.clone());
    };
    if p <= 0.0 {
        return Ok(x.clone());
    }
    if !(0.0..1.0).contains(&p) {
        return Err(Error::invalid(
            "dropout",
            format!("probability must be in [0, 1), got {p}"),
        ));
    }
    let scale = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.random::<f64>() < p { 0.0 } else { scale })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok(x.mul(&mask)?)
}

/// A fully connected layer `y = x Wᵀ + b`, `W: (out, in)`, `b: (out)`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Creates `scope.weight` and (when `bias`) `scope.bias` with PyTorch's default
    /// initialisation, `U(-1/√in, 1/√in)`.
    pub fn new(input: usize, output: usize, bias: bool, scope: &mut ParamScope) -> Result<Self> {
        let bound = 1.0 / (input as f64).sqrt();
        let init = Init::Uniform {
            lo: -bound,
            hi: bound,
        };
        let weight = scope.var("weight", &[output, input], init)?;
        let bias = if bias {
            Some(scope.var("bias", &[output], init)?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// `x: (batch, in)` → `(batch, out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.weight.t()?)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// The weight, `(out, in)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, `(out)`, when the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

fn standard_normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // in (0, 1], so ln is finite
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_init_and_names_are_unique() {
        let mut a = Params::new(&Device::Cpu, 7);
        let mut b = Params::new(&Device::Cpu, 7);
        let init = Init::Uniform { lo: -1.0, hi: 1.0 };
        let ta = a.scope("head").var("w", &[3, 4], init).unwrap();
        let tb = b.scope("head").var("w", &[3, 4], init).unwrap();
        assert_eq!(
            ta.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            tb.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert!(a.named_vars().contains_key("head.w"));
        assert!(a.var("head.w", &[1], Init::Const(0.0)).is_err());
    }

    #[test]
    fn a_shape_past_the_parameter_bound_is_refused_before_allocating() {
        let mut p = Params::new(&Device::Cpu, 0);
        p.var("a", &[2, 3], Init::Const(0.0)).unwrap();
        for shape in [
            vec![1 << 62, 1 << 62],
            vec![usize::MAX, 2],
            vec![limits::MAX_PARAMETERS],
        ] {
            let e = p
                .var("b", &shape, Init::Const(0.0))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("parameter `b`") && e.contains("MAX_PARAMETERS"),
                "{e}"
            );
        }
        assert_eq!(p.numel(), 6);
        assert!(p.named_vars().len() == 1);
    }

    #[test]
    fn dropout_is_identity_in_eval_and_scales_in_train() {
        let x = Tensor::ones((100, 10), DType::F32, &Device::Cpu).unwrap();
        let y = dropout(&x, 0.5, &mut Mode::Eval).unwrap();
        assert_eq!(y.sum_all().unwrap().to_scalar::<f32>().unwrap(), 1000.0);
        let mut rng = StdRng::seed_from_u64(1);
        let y = dropout(&x, 0.5, &mut Mode::Train(&mut rng)).unwrap();
        let v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|&e| e == 0.0 || e == 2.0));
        let kept = v.iter().filter(|&&e| e == 2.0).count();
        assert!((400..600).contains(&kept), "kept {kept} of 1000");
    }

    #[test]
    fn linear_matches_hand_computation() {
        let mut p = Params::new(&Device::Cpu, 0);
        let lin = Linear::new(2, 1, true, &mut p.scope("l")).unwrap();
        let w = lin.weight().to_vec2::<f32>().unwrap();
        let b = p.named_vars()["l.bias"].to_vec1::<f32>().unwrap();
        let x = Tensor::new(&[[1.0f32, 2.0]], &Device::Cpu).unwrap();
        let y = lin.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        assert!((y[0][0] - (w[0][0] + 2.0 * w[0][1] + b[0])).abs() < 1e-6);
        let bound = 1.0 / 2f32.sqrt();
        assert!(w[0].iter().chain(&b).all(|v| v.abs() <= bound));
    }
}
