//! `StackedProjectionHead`: linear layers with an activation between them (Quaterion's
//! `StackedProjectionHead`).
//!
//! With `output_sizes = [n₁, …, n_L]`, `h₀ = dropout(x)` and `act` the named activation:
//!
//! ```text
//! h₁ = fc₁(h₀),   hᵢ = fcᵢ(act(hᵢ₋₁)) for i = 2..L,   y = h_L
//! ```
//!
//! `fcᵢ` maps `nᵢ₋₁ → nᵢ` (`n₀ = d`) with PyTorch's default initialisation
//! `U(−1/√nᵢ₋₁, 1/√nᵢ₋₁)` for weight and bias. There is no activation after the last
//! layer. Shapes: `(batch, d)` → `(batch, n_L)`.
//!
//! Defaults: `output_sizes` is required (Quaterion has no default; `Default` leaves it
//! empty and `new` rejects that), `activation_fn = "relu"` (any name of
//! [`Activation::NAMES`]; `"gelu"` is the exact erf form, torch's default), `dropout = 0`.
//!
//! Variables: `_stack.{2i}.weight`, `_stack.{2i}.bias` for `i = 0..L` (the activations
//! take the odd indices of Quaterion's `nn.Sequential`).

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{Activation, Head, Plan, check_dropout, check_input, check_input_size, check_width};
use crate::error::{Error, Result};
use crate::limits::{self, ParamCount};
use crate::nn::{Linear, Mode, ParamScope, dropout};

/// Options of [`StackedProjectionHead`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StackedProjectionHeadConfig {
    /// Output size of each layer, in order. Required, non-empty.
    pub output_sizes: Vec<usize>,
    /// Activation between the layers, by name. Default `"relu"`.
    pub activation_fn: String,
    /// Dropout on the head's input. Default 0.
    pub dropout: f64,
}

impl Default for StackedProjectionHeadConfig {
    fn default() -> Self {
        StackedProjectionHeadConfig {
            output_sizes: Vec::new(),
            activation_fn: "relu".to_string(),
            dropout: 0.0,
        }
    }
}

/// Linear layers `input → sizes[0] → … → sizes[L-1]` with an activation between them,
/// its variables named `_stack.{2i}.*`. Shared by [`StackedProjectionHead`] and
/// [`super::WideningHead`].
#[derive(Debug, Clone)]
pub(crate) struct Stack {
    layers: Vec<Linear>,
    activation: Activation,
}

impl Stack {
    /// Counts the layers' parameters into `params`, checking the sizes first: the input
    /// and every layer in `1..=MAX_WIDTH`, at most `MAX_LAYERS` layers (option
    /// `output_sizes` of `head` in errors).
    pub(crate) fn plan(
        head: &str,
        input_size: usize,
        sizes: &[usize],
        params: &mut ParamCount,
    ) -> Result<()> {
        check_input_size(head, input_size)?;
        if sizes.len() > limits::MAX_LAYERS {
            return Err(Error::invalid(
                format!("{head} option `output_sizes`"),
                format!(
                    "must have at most {} layers, got {}",
                    limits::MAX_LAYERS,
                    sizes.len()
                ),
            ));
        }
        let mut prev = input_size;
        for (i, &n) in sizes.iter().enumerate() {
            check_width(head, &format!("output_sizes[{i}]"), n)?;
            params.add(1, &[n, prev])?;
            params.add(1, &[n])?;
            prev = n;
        }
        Ok(())
    }

    /// Builds the layers; `plan` has checked the sizes.
    pub(crate) fn new(
        input_size: usize,
        sizes: &[usize],
        activation: Activation,
        params: &mut ParamScope,
    ) -> Result<Self> {
        let mut layers = Vec::with_capacity(sizes.len());
        let mut prev = input_size;
        for (i, &n) in sizes.iter().enumerate() {
            let mut scope = params.scope(&format!("_stack.{}", 2 * i));
            layers.push(Linear::new(prev, n, true, &mut scope)?);
            prev = n;
        }
        Ok(Stack { layers, activation })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.layers[0].forward(x)?;
        for layer in &self.layers[1..] {
            h = layer.forward(&self.activation.apply(&h)?)?;
        }
        Ok(h)
    }
}

/// Stacked projections; see the module docs for the formula.
#[derive(Debug, Clone)]
pub struct StackedProjectionHead {
    config: StackedProjectionHeadConfig,
    size: usize,
    stack: Stack,
}

#[diagnostic::do_not_recommend]
impl Head for StackedProjectionHead {
    type Config = StackedProjectionHeadConfig;
    const NAME: &'static str = "StackedProjectionHead";

    fn new(input_size: usize, config: Self::Config, params: &mut ParamScope) -> Result<Self> {
        Self::plan(input_size, &config)?;
        let activation = Activation::from_name(
            &config.activation_fn,
            "StackedProjectionHead option `activation_fn`",
        )?;
        let stack = Stack::new(input_size, &config.output_sizes, activation, params)?;
        Ok(StackedProjectionHead {
            config,
            size: input_size,
            stack,
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
        *self.config.output_sizes.last().expect("checked non-empty")
    }

    fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        check_input(x, self.size, Self::NAME)?;
        self.transform(&dropout(x, self.config.dropout, mode)?)
    }
}

impl StackedProjectionHead {
    /// The output size and parameter count for `config` on inputs of `input_size`, every
    /// option checked first (see [`Head::check_config`]).
    pub(crate) fn plan(input_size: usize, config: &StackedProjectionHeadConfig) -> Result<Plan> {
        check_dropout(Self::NAME, "dropout", config.dropout)?;
        let Some(&output_size) = config.output_sizes.last() else {
            return Err(Error::invalid(
                "StackedProjectionHead option `output_sizes`",
                "is required: give at least one layer size",
            ));
        };
        Activation::from_name(
            &config.activation_fn,
            "StackedProjectionHead option `activation_fn`",
        )?;
        let mut params = ParamCount::new(Self::NAME);
        Stack::plan(Self::NAME, input_size, &config.output_sizes, &mut params)?;
        Ok(Plan {
            output_size,
            params,
        })
    }

    /// The stack without the input dropout (Quaterion's `transform`).
    pub(crate) fn transform(&self, x: &Tensor) -> Result<Tensor> {
        self.stack.forward(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Params;
    use candle_core::Device;

    #[test]
    fn names_follow_the_sequential_indices() {
        let mut p = Params::new(&Device::Cpu, 0);
        let config = StackedProjectionHeadConfig {
            output_sizes: vec![5, 4, 2],
            ..Default::default()
        };
        let head = StackedProjectionHead::new(3, config, &mut p.scope("head")).unwrap();
        let names: Vec<_> = p.named_vars().keys().cloned().collect();
        assert_eq!(
            names,
            [
                "head._stack.0.bias",
                "head._stack.0.weight",
                "head._stack.2.bias",
                "head._stack.2.weight",
                "head._stack.4.bias",
                "head._stack.4.weight"
            ]
        );
        assert_eq!(head.output_size(), 2);
        let x = Tensor::zeros((7, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(head.forward(&x, &mut Mode::Eval).unwrap().dims(), [7, 2]);
    }

    #[test]
    fn bad_options_are_named() {
        let mut p = Params::new(&Device::Cpu, 0);
        let e = StackedProjectionHead::new(3, Default::default(), &mut p.scope("a"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("output_sizes"), "{e}");
        let config = StackedProjectionHeadConfig {
            output_sizes: vec![2],
            activation_fn: "relu6x".into(),
            dropout: 0.0,
        };
        let e = StackedProjectionHead::new(3, config, &mut p.scope("b"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("activation_fn") && e.contains("relu, gelu"),
            "{e}"
        );
    }
}
