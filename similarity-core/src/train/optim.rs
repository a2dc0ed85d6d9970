//! Optimisers, learning-rate schedules and gradient clipping.
//!
//! Candle ships AdamW and momentum-free SGD without schedules, parameter groups or
//! clipping; the trainer needs all of them and needs to checkpoint the optimiser's state,
//! so they are written here once. For a variable `θ` with gradient `g` at step `t`
//! (1-based) and learning rate `η = η₀ · schedule(t) · group_factor`:
//!
//! ```text
//! Adam   (L2 weight decay λ, as PyTorch's Adam):  g ← g + λθ
//!        m ← β₁m + (1−β₁)g,  v ← β₂v + (1−β₂)g²,  θ ← θ − η · m̂ / (√v̂ + ε)
//!        with m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ), β = (0.9, 0.999), ε = 1e-8
//! AdamW  (decoupled, Loshchilov & Hutter):  θ ← θ(1 − ηλ), then the Adam update without L2
//! SGD    (momentum μ, PyTorch's form):  g ← g + λθ,  b ← μb + g (b = g at t = 1),  θ ← θ − ηb
//! ```
//!
//! Clipping scales every gradient by `min(1, max_norm / ‖g‖₂)`, the norm taken over all
//! trainable variables together (PyTorch's `clip_grad_norm_`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kernels;

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

/// The optimiser and its base learning rate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerConfig {
    /// Adam (Kingma & Ba 2015) with PyTorch's defaults; `weight_decay` is L2 (default 0).
    Adam {
        /// Learning rate.
        lr: f64,
        /// L2 penalty added to the gradient.
        #[serde(default)]
        weight_decay: f64,
    },
    /// AdamW: Adam with decoupled weight decay.
    AdamW {
        /// Learning rate.
        lr: f64,
        /// Decoupled weight decay (PyTorch's default is 0.01).
        weight_decay: f64,
    },
    /// Stochastic gradient descent with (optional) momentum.
    Sgd {
        /// Learning rate.
        lr: f64,
        /// Momentum `μ` (0 for plain SGD).
        #[serde(default)]
        momentum: f64,
        /// L2 penalty added to the gradient.
        #[serde(default)]
        weight_decay: f64,
    },
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig::Adam {
            lr: 1e-3,
            weight_decay: 0.0,
        }
    }
}

impl OptimizerConfig {
    /// Adam at `lr`, no weight decay.
    pub fn adam(lr: f64) -> Self {
        OptimizerConfig::Adam {
            lr,
            weight_decay: 0.0,
        }
    }

    /// The base learning rate.
    pub fn lr(&self) -> f64 {
        match *self {
            OptimizerConfig::Adam { lr, .. }
            | OptimizerConfig::AdamW { lr, .. }
            | OptimizerConfig::Sgd { lr, .. } => lr,
        }
    }

    /// Checks the options; errors name the field under `at` (e.g.
    /// `TrainerConfig.optimizer.lr`).
    pub(crate) fn check(&self, at: &str) -> Result<()> {
        let (lr, weight_decay, momentum) = match *self {
            OptimizerConfig::Adam { lr, weight_decay }
            | OptimizerConfig::AdamW { lr, weight_decay } => (lr, weight_decay, None),
            OptimizerConfig::Sgd {
                lr,
                momentum,
                weight_decay,
            } => (lr, weight_decay, Some(momentum)),
        };
        if !(lr.is_finite() && lr > 0.0) {
            return Err(Error::invalid(
                format!("{at}.lr"),
                format!("must be > 0 and finite, got {lr}"),
            ));
        }
        if !(weight_decay.is_finite() && weight_decay >= 0.0) {
            return Err(Error::invalid(
                format!("{at}.weight_decay"),
                format!("must be >= 0 and finite, got {weight_decay}"),
            ));
        }
        if let Some(m) = momentum
            && !(0.0..1.0).contains(&m)
        {
            return Err(Error::invalid(
                format!("{at}.momentum"),
                format!("must be in [0, 1), got {m}"),
            ));
        }
        Ok(())
    }
}

/// Variables whose name starts with `prefix` train at `lr_factor` times the learning rate
/// (e.g. a loss's own parameters: prefix `"loss."`). The first matching group wins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamGroup {
    /// Name prefix, e.g. `"loss."`, `"head.fc_0."`, `"encoders.photo."`.
    pub prefix: String,
    /// Multiplies the learning rate.
    pub lr_factor: f64,
}

/// Checks a group's `lr_factor` (`at` names the group).
pub(crate) fn check_lr_factor(group: &ParamGroup, at: &str) -> Result<()> {
    if !(group.lr_factor.is_finite() && group.lr_factor >= 0.0) {
        return Err(Error::invalid(
            format!("{at}.lr_factor (prefix `{}`)", group.prefix),
            format!("must be >= 0 and finite, got {}", group.lr_factor),
        ));
    }
    Ok(())
}

/// How the learning rate changes over training, as a factor of the base rate.
///
/// The step-based schedules count optimiser steps over the whole run, `total_steps =
/// epochs × steps per epoch` (from the current [`TrainerConfig`](super::TrainerConfig) and
/// data). A resumed run continues the step count of its checkpoint but takes
/// `total_steps` from the config it is resumed with: with a different `epochs` (or data
/// size), [`WarmupCosine`](Self::WarmupCosine) jumps to the factor the new length gives
/// at that step (up with more epochs, down with fewer; at or past the new end it stays at
/// `min_factor`), where the uninterrupted run would have continued smoothly. `Warmup`
/// counts steps only and `Step` counts epochs only, so they are unaffected.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// Always 1.
    #[default]
    Constant,
    /// Linear warm-up from 0 over `warmup_steps`, then 1.
    Warmup {
        /// Steps of warm-up.
        warmup_steps: usize,
    },
    /// Linear warm-up, then cosine decay to `min_factor` at the last step.
    WarmupCosine {
        /// Steps of warm-up.
        warmup_steps: usize,
        /// Factor at the end of training.
        min_factor: f64,
    },
    /// Multiply by `gamma` every `every_epochs` epochs (PyTorch's `StepLR`).
    Step {
        /// Epochs between decays.
        every_epochs: usize,
        /// Decay factor.
        gamma: f64,
    },
}

impl LrSchedule {
    /// Checks the schedule's fields; errors name the field under `at` (e.g.
    /// `TrainerConfig.schedule.gamma`).
    pub(crate) fn check(&self, at: &str) -> Result<()> {
        match *self {
            LrSchedule::Constant | LrSchedule::Warmup { .. } => Ok(()),
            LrSchedule::WarmupCosine { min_factor, .. } => {
                if (0.0..=1.0).contains(&min_factor) {
                    Ok(())
                } else {
                    Err(Error::invalid(
                        format!("{at} (WarmupCosine).min_factor"),
                        format!("must be in [0, 1], got {min_factor}"),
                    ))
                }
            }
            LrSchedule::Step {
                every_epochs,
                gamma,
            } => {
                if every_epochs == 0 {
                    return Err(Error::invalid(
                        format!("{at} (Step).every_epochs"),
                        "must be at least 1",
                    ));
                }
                if !(gamma.is_finite() && gamma > 0.0) {
                    return Err(Error::invalid(
                        format!("{at} (Step).gamma"),
                        format!(
                            "must be > 0 and finite (a negative factor makes the learning rate \
                             negative, 0 stops training), got {gamma}"
                        ),
                    ));
                }
                Ok(())
            }
        }
    }

    /// The factor at optimiser step `step` (0-based) of `total_steps`, in `epoch`.
    pub fn factor(&self, step: usize, epoch: usize, total_steps: usize) -> f64 {
        let warm = |w: usize| {
            if w > 0 && step < w {
                (step + 1) as f64 / w as f64
            } else {
                1.0
            }
        };
        match *self {
            LrSchedule::Constant => 1.0,
            LrSchedule::Warmup { warmup_steps } => warm(warmup_steps),
            LrSchedule::WarmupCosine {
                warmup_steps,
                min_factor,
            } => {
                if step < warmup_steps {
                    return warm(warmup_steps);
                }
                let span = total_steps.saturating_sub(warmup_steps).max(1) as f64;
                let progress = ((step - warmup_steps) as f64 / span).min(1.0);
                min_factor
                    + (1.0 - min_factor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            LrSchedule::Step {
                every_epochs,
                gamma,
            } => gamma.powi((epoch / every_epochs.max(1)) as i32),
        }
    }
}

/// What [`Optimizer::checked_grad_norm`] found.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum GradNorm {
    /// Every gradient is finite; their global L2 norm.
    Finite(f64),
    /// The first variable whose gradient is not, and one of its non-finite elements.
    NonFinite { variable: String, value: f64 },
}

struct Slot {
    name: String,
    var: Var,
    lr_factor: f64,
    /// Adam: (m, v); SGD: (momentum buffer, unused).
    state: Option<(Tensor, Tensor)>,
    /// Adam moments of an f32 CPU variable, updated in place by the fused kernel
    /// (`kernels::adam_step`); when set, `state` is `None`.
    host: Option<(Vec<f32>, Vec<f32>)>,
}

/// An optimiser over named variables.
pub struct Optimizer {
    config: OptimizerConfig,
    slots: Vec<Slot>,
    step: usize,
}

impl std::fmt::Debug for Optimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Optimizer")
            .field("config", &self.config)
            .field("vars", &self.slots.len())
            .field("step", &self.step)
            .finish()
    }
}

/// Moments checked against an optimiser's variables, one entry per variable.
pub(crate) struct CheckedState(Vec<Option<(Tensor, Tensor)>>);

impl Optimizer {
    /// An optimiser for `vars` (name, variable), with learning-rate `groups`.
    pub fn new(
        config: OptimizerConfig,
        vars: Vec<(String, Var)>,
        groups: &[ParamGroup],
    ) -> Result<Self> {
        config.check("OptimizerConfig")?;
        for (i, g) in groups.iter().enumerate() {
            check_lr_factor(g, &format!("parameter group {i}"))?;
            if !vars.iter().any(|(n, _)| n.starts_with(&g.prefix)) {
                let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
                return Err(Error::invalid(
                    format!("parameter group `{}`", g.prefix),
                    format!("matches no variable; the model's variables are {names:?}"),
                ));
            }
        }
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let lr_factor = groups
                    .iter()
                    .find(|g| name.starts_with(&g.prefix))
                    .map_or(1.0, |g| g.lr_factor);
                Slot {
                    name,
                    var,
                    lr_factor,
                    state: None,
                    host: None,
                }
            })
            .collect();
        Ok(Optimizer {
            config,
            slots,
            step: 0,
        })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// The global L2 norm of the gradients of the optimiser's variables (read back once).
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        match self.checked_grad_norm(grads)? {
            GradNorm::Finite(norm) => Ok(norm),
            GradNorm::NonFinite { value, .. } => Ok(value.abs()),
        }
    }

    /// The global gradient norm, or the first variable (in the order the optimiser was
    /// given them) whose gradient holds NaN or ±∞. One scalar is read back per step: the
    /// sum of squares of every gradient; the variables are searched only when it is not
    /// finite (and when none holds a non-finite value, the f32 squares overflowed: the
    /// norm is then summed again in f64).
    pub(crate) fn checked_grad_norm(&self, grads: &GradStore) -> Result<GradNorm> {
        let with_grad: Vec<(&str, &Tensor)> = self
            .slots
            .iter()
            .filter_map(|s| grads.get(&s.var).map(|g| (s.name.as_str(), g)))
            .collect();
        // On the CPU a fused pass per variable; elsewhere the squares are summed on the
        // device and read back once.
        let (mut host, mut device): (f64, Option<Tensor>) = (0.0, None);
        for (_, g) in &with_grad {
            if let Some(sq) = kernels::sum_of_squares(g)? {
                host += sq;
                continue;
            }
            let sq = g.sqr()?.sum_all()?.to_dtype(DType::F64)?;
            device = Some(match device {
                Some(t) => (t + sq)?,
                None => sq,
            });
        }
        let total = match device {
            Some(t) => host + t.to_scalar::<f64>()?,
            None => host,
        };
        if total.is_finite() {
            return Ok(GradNorm::Finite(total.sqrt()));
        }
        let mut exact = 0.0;
        for (name, g) in with_grad {
            let values = g.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            if let Some(&value) = values.iter().find(|v| !v.is_finite()) {
                return Ok(GradNorm::NonFinite {
                    variable: name.to_string(),
                    value,
                });
            }
            exact += values.iter().map(|v| v * v).sum::<f64>();
        }
        Ok(GradNorm::Finite(exact.sqrt()))
    }

    /// One update at learning-rate factor `lr_factor`, gradients scaled by `grad_scale`
    /// (clipping). Variables without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr_factor: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        for s in &mut self.slots {
            let Some(g) = grads.get(&s.var) else { continue };
            let theta = s.var.as_tensor();
            let mut g = if grad_scale == 1.0 {
                g.clone()
            } else {
                (g * grad_scale)?
            };
            let lr = self.config.lr() * lr_factor * s.lr_factor;
            let next = match self.config {
                OptimizerConfig::Adam { weight_decay, .. }
                | OptimizerConfig::AdamW { weight_decay, .. } => {
                    let decoupled = matches!(self.config, OptimizerConfig::AdamW { .. });
                    if kernels::adam_applies(theta) {
                        if s.host.is_none() {
                            let n = theta.elem_count();
                            s.host = Some(match s.state.take() {
                                Some((m, v)) => (
                                    m.flatten_all()?.to_vec1::<f32>()?,
                                    v.flatten_all()?.to_vec1::<f32>()?,
                                ),
                                None => (vec![0.0; n], vec![0.0; n]),
                            });
                        }
                        let (m, v) = s.host.as_mut().expect("set above");
                        let step = kernels::AdamStep {
                            lr: lr as f32,
                            beta1: BETA1 as f32,
                            beta2: BETA2 as f32,
                            eps: EPS as f32,
                            weight_decay: weight_decay as f32,
                            decoupled,
                            bias1: (1.0 - BETA1.powi(t)) as f32,
                            bias2: (1.0 - BETA2.powi(t)) as f32,
                            grad_scale: grad_scale as f32,
                        };
                        if kernels::adam_step(
                            theta,
                            grads.get(&s.var).expect("checked"),
                            m,
                            v,
                            step,
                        )? {
                            continue;
                        }
                    }
                    if !decoupled && weight_decay > 0.0 {
                        g = (g + (theta * weight_decay)?)?;
                    }
                    let (m, v) = match &s.state {
                        Some((m, v)) => (
                            ((m * BETA1)? + (&g * (1.0 - BETA1))?)?,
                            ((v * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?,
                        ),
                        None => ((&g * (1.0 - BETA1))?, (g.sqr()? * (1.0 - BETA2))?),
                    };
                    let m_hat = (&m / (1.0 - BETA1.powi(t)))?;
                    let v_hat = (&v / (1.0 - BETA2.powi(t)))?;
                    let base = if decoupled && weight_decay > 0.0 {
                        (theta * (1.0 - lr * weight_decay))?
                    } else {
                        theta.clone()
                    };
                    // Detached: otherwise each step's moments keep the previous step's alive
                    // through the op graph, and memory grows with every step.
                    s.state = Some((m.detach(), v.detach()));
                    (base - ((m_hat / (v_hat.sqrt()? + EPS)?)? * lr)?)?
                }
                OptimizerConfig::Sgd {
                    momentum,
                    weight_decay,
                    ..
                } => {
                    if weight_decay > 0.0 {
                        g = (g + (theta * weight_decay)?)?;
                    }
                    let update = if momentum > 0.0 {
                        let buf = match &s.state {
                            Some((b, _)) => ((b * momentum)? + &g)?,
                            None => g.clone(),
                        };
                        s.state = Some((buf.detach(), buf.zeros_like()?));
                        buf
                    } else {
                        g
                    };
                    (theta - (update * lr)?)?
                }
            };
            s.var.set(&next.detach())?;
        }
        Ok(())
    }

    /// The state to checkpoint: `m.<name>`/`v.<name>` per variable that has stepped.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for s in &self.slots {
            if let Some((a, b)) = &s.state {
                out.insert(format!("m.{}", s.name), a.clone());
                out.insert(format!("v.{}", s.name), b.clone());
            }
            if let Some((a, b)) = &s.host {
                let shape = s.var.shape();
                let device = s.var.device();
                for (key, data) in [("m", a), ("v", b)] {
                    out.insert(
                        format!("{key}.{}", s.name),
                        Tensor::from_slice(data, shape, device)?,
                    );
                }
            }
        }
        Ok(out)
    }

    /// Restores a checkpointed state taken after `steps` steps, read from `path`.
    /// Every tensor is checked first (each `m.<name>` has its `v.<name>`, names a
    /// variable of this optimiser, has its shape and holds finite floats; no other
    /// tensor is present; when `expected` is given, exactly those names are present), so
    /// a bad state leaves the optimiser as it was.
    pub fn load_state(
        &mut self,
        path: &Path,
        tensors: &HashMap<String, Tensor>,
        expected: Option<&[String]>,
        steps: usize,
    ) -> Result<()> {
        let state = self.checked_state(path, tensors, expected)?;
        self.set_state(state, steps);
        Ok(())
    }

    /// The moments of [`load_state`](Self::load_state), checked, without setting them.
    pub(crate) fn checked_state(
        &self,
        path: &Path,
        tensors: &HashMap<String, Tensor>,
        expected: Option<&[String]>,
    ) -> Result<CheckedState> {
        let mut next = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let (mk, vk) = (format!("m.{}", s.name), format!("v.{}", s.name));
            let state = match (tensors.get(&mk), tensors.get(&vk)) {
                (Some(m), Some(v)) => {
                    let mut pair = Vec::with_capacity(2);
                    for (key, t) in [(&mk, m), (&vk, v)] {
                        if t.dims() != s.var.dims() {
                            return Err(Error::format(
                                path,
                                format!(
                                    "moment `{key}` has shape {:?}, the variable has {:?}",
                                    t.dims(),
                                    s.var.dims()
                                ),
                            ));
                        }
                        pair.push(
                            crate::nn::checked_tensor(path, key, t)?
                                .to_dtype(s.var.dtype())?
                                .to_device(s.var.device())?,
                        );
                    }
                    let v = pair.pop();
                    let m = pair.pop();
                    m.zip(v)
                }
                (None, None) => None,
                (Some(_), None) | (None, Some(_)) => {
                    return Err(Error::format(
                        path,
                        format!("holds only one of the moments `{mk}` and `{vk}`"),
                    ));
                }
            };
            next.push(state);
        }
        if let Some(extra) = tensors.keys().find(|k| {
            !self
                .slots
                .iter()
                .any(|s| **k == format!("m.{}", s.name) || **k == format!("v.{}", s.name))
        }) {
            return Err(Error::format(
                path,
                format!("unexpected tensor `{extra}`: the optimiser has no such variable"),
            ));
        }
        if let Some(expected) = expected {
            let mut have: Vec<&String> = tensors.keys().collect();
            let mut want: Vec<&String> = expected.iter().collect();
            have.sort();
            want.sort();
            if have != want {
                let missing: Vec<&&String> = want.iter().filter(|k| !have.contains(k)).collect();
                return Err(Error::format(
                    path,
                    format!("is missing the moments {missing:?} that state.json lists"),
                ));
            }
        }
        Ok(CheckedState(next))
    }

    /// Sets moments checked by [`checked_state`](Self::checked_state).
    pub(crate) fn set_state(&mut self, state: CheckedState, steps: usize) {
        for (s, state) in self.slots.iter_mut().zip(state.0) {
            s.state = state;
            s.host = None;
        }
        self.step = steps;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn quadratic_steps(config: OptimizerConfig, steps: usize) -> Vec<f32> {
        // f(θ) = ½‖θ‖², so g = θ.
        let var = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let mut opt = Optimizer::new(config, vec![("w".into(), var.clone())], &[]).unwrap();
        for _ in 0..steps {
            let loss = (var.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
            opt.step(&loss.backward().unwrap(), 1.0, 1.0).unwrap();
        }
        var.as_tensor().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn adam_first_step_moves_by_lr_in_sign_direction() {
        // At t = 1, m̂ = g and v̂ = g², so θ moves by lr·g/(|g| + ε) ≈ lr·sign(g).
        let w = quadratic_steps(OptimizerConfig::adam(0.1), 1);
        assert!(
            (w[0] - 0.9).abs() < 1e-6 && (w[1] + 1.9).abs() < 1e-6,
            "{w:?}"
        );
    }

    #[test]
    fn sgd_momentum_matches_hand_computation() {
        // θ₀ = 1, g = θ: b₁ = 1, θ₁ = 1 − 0.1 = 0.9; b₂ = 0.5·1 + 0.9 = 1.4, θ₂ = 0.9 − 0.14 = 0.76.
        let w = quadratic_steps(
            OptimizerConfig::Sgd {
                lr: 0.1,
                momentum: 0.5,
                weight_decay: 0.0,
            },
            2,
        );
        assert!((w[0] - 0.76).abs() < 1e-6, "{w:?}");
    }

    #[test]
    fn adamw_decays_decoupled() {
        // With g = θ and decoupled decay: θ₁ = θ₀(1 − ηλ) − η·sign(θ₀).
        let w = quadratic_steps(
            OptimizerConfig::AdamW {
                lr: 0.1,
                weight_decay: 0.5,
            },
            1,
        );
        assert!((w[0] - (0.95 - 0.1)).abs() < 1e-6, "{w:?}");
    }

    #[test]
    fn schedules() {
        let c = LrSchedule::WarmupCosine {
            warmup_steps: 10,
            min_factor: 0.0,
        };
        assert!((c.factor(0, 0, 110) - 0.1).abs() < 1e-12);
        assert!((c.factor(9, 0, 110) - 1.0).abs() < 1e-12);
        assert!((c.factor(60, 0, 110) - 0.5).abs() < 1e-12);
        assert!(c.factor(110, 0, 110).abs() < 1e-12);
        let s = LrSchedule::Step {
            every_epochs: 2,
            gamma: 0.5,
        };
        assert_eq!(
            (s.factor(0, 1, 0), s.factor(0, 2, 0), s.factor(0, 5, 0)),
            (1.0, 0.5, 0.25)
        );
    }

    #[test]
    fn checked_grad_norm_names_the_first_bad_variable_and_survives_overflow() {
        let a = Var::new(&[3.0f32, 4.0], &Device::Cpu).unwrap();
        let b = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let c = Var::new(&[2.0f32], &Device::Cpu).unwrap();
        let opt = Optimizer::new(
            OptimizerConfig::adam(0.1),
            vec![
                ("a".into(), a.clone()),
                ("b".into(), b.clone()),
                ("c".into(), c.clone()),
            ],
            &[],
        )
        .unwrap();
        // L = ½‖a‖² + sqrt(b − 1) + sqrt(c − 2): at b = 1, c = 2 the loss is finite and
        // ∂L/∂b = ∂L/∂c = 1 / (2 sqrt(0)) = ∞; `b` comes first.
        let root = |v: &Var, at: f64| {
            (v.as_tensor() - at)
                .unwrap()
                .sqrt()
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let loss = ((a.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap()
            + root(&b, 1.0)
            + root(&c, 2.0))
        .unwrap();
        let grads = loss.backward().unwrap();
        match opt.checked_grad_norm(&grads).unwrap() {
            GradNorm::NonFinite { variable, value } => {
                assert_eq!(variable, "b");
                assert_eq!(value, f64::INFINITY);
            }
            other => panic!("{other:?}"),
        }
        // ∂L/∂a = a = (3e20, 4e20): the f32 squares overflow, the norm (5e20) does not.
        a.set(&Tensor::new(&[3e20f32, 4e20], &Device::Cpu).unwrap())
            .unwrap();
        let loss = (a.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
        let grads = loss.backward().unwrap();
        match opt.checked_grad_norm(&grads).unwrap() {
            GradNorm::Finite(norm) => assert!((norm / 5e20 - 1.0).abs() < 1e-6, "{norm}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn groups_and_clipping() {
        let a = Var::new(&[3.0f32], &Device::Cpu).unwrap();
        let b = Var::new(&[4.0f32], &Device::Cpu).unwrap();
        let groups = [ParamGroup {
            prefix: "loss.".into(),
            lr_factor: 0.0,
        }];
        let cfg = OptimizerConfig::Sgd {
            lr: 1.0,
            momentum: 0.0,
            weight_decay: 0.0,
        };
        let mut opt = Optimizer::new(
            cfg,
            vec![("head.w".into(), a.clone()), ("loss.c".into(), b.clone())],
            &groups,
        )
        .unwrap();
        let loss = ((a.as_tensor().sqr().unwrap() + b.as_tensor().sqr().unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            * 0.5)
            .unwrap();
        let grads = loss.backward().unwrap();
        assert!((opt.grad_norm(&grads).unwrap() - 5.0).abs() < 1e-6);
        opt.step(&grads, 1.0, 0.2).unwrap(); // clipped to norm 1
        assert!((a.as_tensor().to_vec1::<f32>().unwrap()[0] - 2.4).abs() < 1e-6);
        assert_eq!(
            b.as_tensor().to_vec1::<f32>().unwrap()[0],
            4.0,
            "frozen by its group"
        );
        let bad = [ParamGroup {
            prefix: "lose.".into(),
            lr_factor: 1.0,
        }];
        let e = Optimizer::new(cfg, vec![("loss.c".into(), b)], &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("lose.") && e.contains("loss.c"), "{e}");
    }
}
