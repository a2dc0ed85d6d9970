//! The shared part of the class-logit losses (SoftmaxLoss, ArcFaceLoss, CosFaceLoss) and of
//! CenterLoss: the checks of their options and group ids, the class table they train, the
//! logits and the cross-entropy.
//!
//! For embeddings `X: (N, d)`, a trainable kernel `W: (d, C)` and group ids `gᵢ ∈ [0, C)`:
//!
//! ```text
//! Softmax:  Z_ic = x_i · w_c / temperature
//! cosines:  cos θ_ic = clamp(x̂_i · ŵ_c, −1, 1)   (rows of X and columns of W at unit norm)
//! CosFace:  Z_ic = s · (cos θ_ic − m [c = gᵢ])
//! ArcFace:  Z_ic = s · cos(θ_ic + m [c = gᵢ]),  cos(θ + m) = cos θ cos m − sin θ sin m,
//!           sin θ = √clamp(1 − cos² θ, 10⁻¹², 1)
//! L = mean_i [ logsumexp_c Z_ic − Z_i,gᵢ ]
//! ```
//!
//! [`class_loss`] computes `L` for one [`ClassLogits`]: f32 on the CPU as one fused op on
//! the embeddings and the kernel (`kernels::class_cross_entropy`: scores, logits,
//! cross-entropy and both gradients); elsewhere as the composite Candle form below, which
//! is the reference the kernel is tested against.

use candle_core::{DType, Tensor};

use crate::distance::normalize;
use crate::error::{Error, Result};
use crate::nn::{Init, ParamScope};

/// How a class-logit loss turns class scores into logits.
#[derive(Debug, Clone, Copy)]
pub(super) enum ClassLogits {
    /// `x · w_c / temperature` (SoftmaxLoss).
    Linear { temperature: f64 },
    /// `s · (cos θ − m)` on the target class, `s · cos θ` elsewhere (CosFaceLoss).
    CosFace { scale: f64, margin: f64 },
    /// `s · cos(θ + m)` on the target class, `s · cos θ` elsewhere (ArcFaceLoss).
    ArcFace { scale: f64, margin: f64 },
}

/// Rejects `num_groups = 0` (the default of every class loss's config, which must be set).
pub(super) fn check_num_groups(loss: &str, num_groups: usize) -> Result<()> {
    if num_groups == 0 {
        return Err(Error::invalid(
            format!("{loss} option `num_groups`"),
            "must be set to the number of groups (classes) in the data, a positive \
             number; it has no default",
        ));
    }
    Ok(())
}

/// Validates `scale` (positive) and `margin` (finite, non-negative) of a margin loss.
pub(super) fn check_scale_margin(loss: &str, scale: f64, margin: f64) -> Result<()> {
    if !scale.is_finite() || scale <= 0.0 {
        return Err(Error::invalid(
            format!("{loss} option `scale`"),
            format!("must be a positive number, got {scale}"),
        ));
    }
    if !margin.is_finite() || margin < 0.0 {
        return Err(Error::invalid(
            format!("{loss} option `margin`"),
            format!("must be a non-negative number, got {margin}"),
        ));
    }
    Ok(())
}

/// Creates the `N(0, 0.01²)` kernel `(embedding_size, num_groups)` of a class loss.
pub(super) fn class_kernel(
    embedding_size: usize,
    num_groups: usize,
    params: &mut ParamScope,
) -> Result<Tensor> {
    params.var(
        "kernel",
        &[embedding_size, num_groups],
        Init::Normal {
            mean: 0.0,
            std: 0.01,
        },
    )
}

/// The group ids as class indices, each checked to lie in `[0, num_groups)` (an error
/// names the first that does not). The ids are read back to the host once.
pub(super) fn class_ids(loss: &str, groups: &Tensor, num_groups: usize) -> Result<Vec<u32>> {
    let ids = groups.to_dtype(DType::I64)?.to_vec1::<i64>()?;
    if let Some((i, &g)) = ids
        .iter()
        .enumerate()
        .find(|&(_, &g)| g < 0 || g >= num_groups as i64)
    {
        return Err(Error::invalid(
            format!("{loss}, object {i} of the batch"),
            format!(
                "group id {g} is not a class index: this loss needs group ids in \
                 [0, num_groups) with num_groups = {num_groups}"
            ),
        ));
    }
    Ok(ids.into_iter().map(|g| g as u32).collect())
}

/// The one-hot matrix `(N, num_groups)` of `dtype` of checked class ids.
pub(super) fn one_hot(
    ids: &[u32],
    num_groups: usize,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let ids = Tensor::new(ids, device)?.to_dtype(DType::I64)?;
    let classes = Tensor::arange(0i64, num_groups as i64, device)?;
    Ok(ids
        .unsqueeze(1)?
        .broadcast_eq(&classes.unsqueeze(0)?)?
        .to_dtype(dtype)?)
}

/// `cos θ = x̂ ŵ: (N, C)`: rows of `embeddings` and columns of `kernel` scaled to unit
/// norm (unclamped), the composite form.
fn class_cosines(embeddings: &Tensor, kernel: &Tensor) -> Result<Tensor> {
    let kernel = normalize(&kernel.t()?)?.t()?;
    Ok(normalize(embeddings)?.matmul(&kernel)?)
}

/// The class-logit loss `L` (module docs) of `embeddings: (N, d)` with the trainable
/// `kernel: (d, C)` and group ids `groups: (N)`, each checked to be a class index.
pub(super) fn class_loss(
    loss: &str,
    logits: ClassLogits,
    embeddings: &Tensor,
    kernel: &Tensor,
    groups: &Tensor,
) -> Result<Tensor> {
    let num_groups = kernel.dim(1)?;
    let ids = class_ids(loss, groups, num_groups)?;
    let target = match logits {
        ClassLogits::Linear { temperature } => crate::kernels::TargetLogit::Plain {
            scale: (1.0 / temperature) as f32,
        },
        ClassLogits::CosFace { scale, margin } => crate::kernels::TargetLogit::CosFace {
            scale: scale as f32,
            margin: margin as f32,
        },
        ClassLogits::ArcFace { scale, margin } => crate::kernels::TargetLogit::ArcFace {
            scale: scale as f32,
            cos_m: margin.cos() as f32,
            sin_m: margin.sin() as f32,
        },
    };
    if let Some(l) = crate::kernels::class_cross_entropy(embeddings, kernel, ids.clone(), target)? {
        return Ok(l);
    }
    let kernel = kernel.to_dtype(embeddings.dtype())?;
    let scores = match logits {
        ClassLogits::Linear { .. } => embeddings.matmul(&kernel)?,
        ClassLogits::CosFace { .. } | ClassLogits::ArcFace { .. } => {
            class_cosines(embeddings, &kernel)?
        }
    };
    let one_hot = one_hot(&ids, num_groups, embeddings.dtype(), embeddings.device())?;
    let z = match logits {
        ClassLogits::Linear { temperature } => (scores / temperature)?,
        ClassLogits::CosFace { scale, margin } => {
            let cos = scores.clamp(-1.0, 1.0)?;
            ((cos - (&one_hot * margin)?)? * scale)?
        }
        ClassLogits::ArcFace { scale, margin } => {
            let cos = scores.clamp(-1.0, 1.0)?;
            let sin = (1.0 - cos.sqr()?)?.clamp(1e-12, 1.0)?.sqrt()?;
            // cos(θ + m) = cos θ cos m − sin θ sin m on the target column, cos θ elsewhere.
            let shifted = ((&cos * margin.cos())? - (sin * margin.sin())?)?;
            ((((shifted - &cos)? * &one_hot)? + &cos)? * scale)?
        }
    };
    cross_entropy(&z, &one_hot)
}

/// `mean_i [ logsumexp_c Z_ic − Σ_c Y_ic Z_ic ]` for logits `Z: (N, C)` and one-hot
/// targets `Y: (N, C)`: the composite form, stable (the row max is subtracted, detached).
fn cross_entropy(logits: &Tensor, one_hot: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(1)?.detach();
    let lse = logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(1)?
        .log()?
        .add(&max)?;
    let target = logits.mul(one_hot)?.sum_keepdim(1)?;
    Ok(lse.sub(&target)?.mean_all()?)
}
