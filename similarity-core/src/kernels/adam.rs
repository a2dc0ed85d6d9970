//! The Adam / AdamW update of one f32 variable in place, moments in host vectors.
//!
//! ```text
//! g ← s·g (+ λθ for Adam's L2),  m ← β₁m + (1−β₁)g,  v ← β₂v + (1−β₂)g²
//! θ ← θ·(1 − ηλ if AdamW) − η · (m / (1−β₁ᵗ)) / (sqrt(v / (1−β₂ᵗ)) + ε)
//! ```

use super::*;

/// Hyper-parameters of one Adam/AdamW update.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled (AdamW) or L2 (Adam) weight decay.
    pub weight_decay: f32,
    pub decoupled: bool,
    /// `1 − β₁ᵗ` and `1 − β₂ᵗ`.
    pub bias1: f32,
    pub bias2: f32,
    /// Factor on the gradient (clipping).
    pub grad_scale: f32,
}

/// The Adam update of one variable in place, moments kept in host vectors.
pub(super) struct AdamKernel<'a> {
    step: AdamStep,
    moments: Mutex<(&'a mut [f32], &'a mut [f32])>,
}

impl InplaceOp2 for AdamKernel<'_> {
    fn name(&self) -> &'static str {
        "adam-step"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let g = slice(s2, l2, self.name())?;
        let Some((start, end)) = l1.contiguous_offsets() else {
            candle_core::bail!("adam-step: the variable is not contiguous")
        };
        let CpuStorage::F32(theta) = s1 else {
            candle_core::bail!("adam-step: the variable is not f32")
        };
        let theta = &mut theta[start..end];
        let mut guard = self.moments.lock().expect("adam-step moments");
        let (m, v) = &mut *guard;
        if theta.len() != g.len() || m.len() != g.len() || v.len() != g.len() {
            candle_core::bail!("adam-step: variable, gradient and moments differ in size");
        }
        let s = self.step;
        let (c1, c2) = (1.0 - s.beta1, 1.0 - s.beta2);
        let decay = if s.decoupled {
            1.0 - s.lr * s.weight_decay
        } else {
            1.0
        };
        let l2 = if s.decoupled { 0.0 } else { s.weight_decay };
        let (inv1, inv2) = (1.0 / s.bias1, 1.0 / s.bias2);
        for (((t, &gi), mi), vi) in theta.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let gi = gi * s.grad_scale + l2 * *t;
            *mi = s.beta1 * *mi + c1 * gi;
            *vi = s.beta2 * *vi + c2 * gi * gi;
            let update = (*mi * inv1) / ((*vi * inv2).sqrt() + s.eps);
            *t = *t * decay - s.lr * update;
        }
        Ok(())
    }
}

/// Applies one Adam update to `var` in place with host-side moments `m`, `v` (as long as
/// the variable). Returns `false` (and changes nothing) where the kernel does not apply.
pub(crate) fn adam_step(
    var: &Tensor,
    grad: &Tensor,
    m: &mut [f32],
    v: &mut [f32],
    step: AdamStep,
) -> Result<bool> {
    if !applies(&[var, grad]) || !var.is_contiguous() || m.len() != var.elem_count() {
        return Ok(false);
    }
    let grad = grad.contiguous()?;
    let kernel = AdamKernel {
        step,
        moments: Mutex::new((m, v)),
    };
    var.inplace_op2(&grad, &kernel)?;
    Ok(true)
}

/// Whether the Adam kernel can update `var` (f32, contiguous, on the CPU).
pub(crate) fn adam_applies(var: &Tensor) -> bool {
    applies(&[var]) && var.is_contiguous()
}
