//! One SkipConnectionHead block as a single op.
//!
//! ```text
//! y = x + (x Wᵀ + b) ⊙ σ(gate)        x: (n, d), W: (d, d), b, gate: (d)
//! Gs = ∂y ⊙ σ(gate)   ∂W = Gsᵀ x   ∂b = Σ_rows Gs   ∂gate = Σ_rows (∂y ⊙ z) ⊙ σ(1 − σ)   ∂x = ∂y + Gs W
//! ```

use super::*;

/// What the backward pass of a [`SkipLayer`] needs from its forward pass.
pub(super) struct SkipCache {
    /// `z = x Wᵀ + b`, `(n, d)`.
    z: Vec<f32>,
    /// `σ(gate)`, `(d)`.
    s: Vec<f32>,
}

/// One gated residual block of SkipConnectionHead, `y = x + (x Wᵀ + b) ⊙ σ(gate)`, over
/// `(x: (n, d), W: (d, d), [b; gate]: (2, d))`.
pub(super) struct SkipLayer {
    cache: Mutex<Option<std::sync::Arc<SkipCache>>>,
}

impl FusedOp<3> for SkipLayer {
    const NAME: &'static str = "skip-connection-layer";

    fn forward(&self, [s1, s2, s3]: [Input<'_>; 3]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (n, d) = s1.dims2()?;
        let x = s1.data;
        let w = s2.data;
        let bg = s3.data;
        if w.len() != d * d || bg.len() != 2 * d {
            candle_core::bail!("skip-connection-layer: weights do not match the input width {d}");
        }
        let (b, gate) = bg.split_at(d);
        let s: Vec<f32> = gate.iter().map(|&g| 1.0 / (1.0 + exp_f32(-g))).collect();
        let mut z = vec![0.0f32; n * d];
        gemm(&mut z, x, w, n, d, d, false, true);
        let mut y = vec![0.0f32; n * d];
        for ((zr, yr), xr) in z
            .chunks_exact_mut(d)
            .zip(y.chunks_exact_mut(d))
            .zip(x.chunks_exact(d))
        {
            for j in 0..d {
                zr[j] += b[j];
                yr[j] = xr[j] + zr[j] * s[j];
            }
        }
        *self.cache.lock().expect("skip-connection-layer state") =
            Some(std::sync::Arc::new(SkipCache { z, s }));
        Ok((y, Shape::from((n, d))))
    }

    fn backward(
        &self,
        [x, w, _bg]: [&Tensor; 3],
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 3]> {
        let cache = self
            .cache
            .lock()
            .expect("skip-connection-layer state")
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("skip-connection-layer: no forward".into()))?;
        let (n, d) = x.dims2()?;
        let with_x = x.track_op();
        let packed = x.apply_op3_no_bwd(
            w,
            &grad.contiguous()?,
            &Fused(SkipLayerBackward { cache, with_x }),
        )?;
        let gw = packed.narrow(0, 0, d * d)?.reshape((d, d))?;
        let gbg = packed.narrow(0, d * d, 2 * d)?.reshape((2, d))?;
        let gx = if with_x {
            Some(packed.narrow(0, d * d + 2 * d, n * d)?.reshape((n, d))?)
        } else {
            None
        };
        Ok([gx, Some(gw), Some(gbg)])
    }
}

/// The gradients of a [`SkipLayer`] from `(x, W, G)`, packed flat as
/// `[∂W (d·d) | ∂b (d) | ∂gate (d) | ∂x (n·d), when asked for]`:
///
/// ```text
/// Gs = G ⊙ σ(gate)    ∂W = Gsᵀ x    ∂b = Σ_rows Gs    ∂gate = Σ_rows (G ⊙ z) ⊙ σ(1 − σ)
/// ∂x = G + Gs W
/// ```
pub(super) struct SkipLayerBackward {
    cache: std::sync::Arc<SkipCache>,
    with_x: bool,
}

simd_fn! {
    /// Per row of width `d = s.len()`: `gs = g ⊙ s`; summed over the rows, `gb += gs` and
    /// `ggate += g ⊙ z` (the gate's gradient before the sigmoid's derivative).
    fn gate_grads(g: &[f32], z: &[f32], s: &[f32], gs: &mut [f32], gb: &mut [f32], ggate: &mut [f32]) {
        let d = s.len();
        for ((gsr, gr), zr) in gs
            .chunks_exact_mut(d)
            .zip(g.chunks_exact(d))
            .zip(z.chunks_exact(d))
        {
            for j in 0..d {
                gsr[j] = gr[j] * s[j];
                gb[j] += gsr[j];
                ggate[j] += gr[j] * zr[j];
            }
        }
    }
}

impl FusedOp<3> for SkipLayerBackward {
    const NAME: &'static str = "skip-connection-layer-backward";

    fn forward(&self, [s1, s2, s3]: [Input<'_>; 3]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (n, d) = s1.dims2()?;
        let x = s1.data;
        let w = s2.data;
        let g = s3.data;
        let SkipCache { z, s } = &*self.cache;
        let total = d * d + 2 * d + if self.with_x { n * d } else { 0 };
        let mut out = vec![0.0f32; total];
        let (gw, rest) = out.split_at_mut(d * d);
        let (gbg, gx) = rest.split_at_mut(2 * d);
        let (gb, ggate) = gbg.split_at_mut(d);
        let mut gs = vec![0.0f32; n * d];
        gate_grads(g, z, s, &mut gs, gb, ggate);
        for (gg, &sj) in ggate.iter_mut().zip(s) {
            *gg *= sj * (1.0 - sj);
        }
        // ∂W (d × d) = Gsᵀ (d × n) · x (n × d).
        gemm(gw, &gs, x, d, d, n, true, false);
        if self.with_x {
            // ∂x = Gs (n × d) · W (d × d) + G.
            gemm(gx, &gs, w, n, d, d, false, false);
            for (o, &gi) in gx.iter_mut().zip(g) {
                *o += gi;
            }
        }
        Ok((out, Shape::from(total)))
    }
}

/// One SkipConnectionHead block `x + (x Wᵀ + b) ⊙ σ(gate)` as one fused op, or `None`
/// where the kernel does not apply.
pub(crate) fn skip_connection_layer(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    gate: &Tensor,
) -> Result<Option<Tensor>> {
    if !applies(&[x, weight, bias, gate]) {
        return Ok(None);
    }
    let bg = Tensor::stack(&[bias, gate], 0)?;
    let op = SkipLayer {
        cache: Mutex::new(None),
    };
    Ok(Some(x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bg,
        Fused(op),
    )?))
}
