//! Group masks shared by the group losses.
//!
//! For group ids `a: (n)` and `b: (m)` (or `b = a`), as `{0, 1}` tensors of a float
//! `dtype` so that they multiply into distance matrices:
//!
//! ```text
//! positive[i, j] = [aᵢ = bⱼ] ∧ ¬(b = a ∧ i = j)     same group, never the anchor itself
//! negative[i, j] = [aᵢ ≠ bⱼ]
//! ```
//!
//! Shapes: `(n, m)`. For f32 on the CPU with `i64` ids, [`group_masks`] is one pass of the
//! fused kernels; elsewhere the masks come from a broadcast comparison.

use candle_core::{DType, Tensor};

use crate::error::Result;

/// `[aᵢ = bⱼ]` as `u8`, `(n, m)`.
pub fn same_group(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(a.unsqueeze(1)?.broadcast_eq(&b.unsqueeze(0)?)?)
}

/// Anchor–positive mask: same group, and not the anchor itself when `b` is `None`.
pub fn positive_mask(a: &Tensor, b: Option<&Tensor>, dtype: DType) -> Result<Tensor> {
    let same = same_group(a, b.unwrap_or(a))?.to_dtype(dtype)?;
    Ok(match b {
        Some(_) => same,
        None => (same - Tensor::eye(a.dim(0)?, dtype, a.device())?)?,
    })
}

/// Both masks from one group comparison: `(positive, negative)` as
/// [`positive_mask`] and [`negative_mask`] give them.
pub fn group_masks(a: &Tensor, b: Option<&Tensor>, dtype: DType) -> Result<(Tensor, Tensor)> {
    if let Some(masks) = crate::kernels::group_masks(a, b, dtype)? {
        return Ok(masks);
    }
    let same = same_group(a, b.unwrap_or(a))?.to_dtype(dtype)?;
    let negative = (1.0 - &same)?;
    let positive = match b {
        Some(_) => same,
        None => (same - Tensor::eye(a.dim(0)?, dtype, a.device())?)?,
    };
    Ok((positive, negative))
}

/// Anchor–negative mask: different groups.
pub fn negative_mask(a: &Tensor, b: Option<&Tensor>, dtype: DType) -> Result<Tensor> {
    let same = same_group(a, b.unwrap_or(a))?.to_dtype(dtype)?;
    Ok((1.0 - same)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn group_masks_equal_the_separate_masks() {
        let a = Tensor::new(&[1i64, 2, 1, 3], &Device::Cpu).unwrap();
        let b = Tensor::new(&[1i64, 3, 3], &Device::Cpu).unwrap();
        for other in [None, Some(&b)] {
            let (p, n) = group_masks(&a, other, DType::F32).unwrap();
            let want_p = positive_mask(&a, other, DType::F32).unwrap();
            let want_n = negative_mask(&a, other, DType::F32).unwrap();
            assert_eq!(
                p.to_vec2::<f32>().unwrap(),
                want_p.to_vec2::<f32>().unwrap()
            );
            assert_eq!(
                n.to_vec2::<f32>().unwrap(),
                want_n.to_vec2::<f32>().unwrap()
            );
        }
    }

    #[test]
    fn masks_by_hand() {
        let g = Tensor::new(&[1i64, 2, 1], &Device::Cpu).unwrap();
        let p = positive_mask(&g, None, DType::F32)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(
            p,
            vec![
                vec![0.0, 0.0, 1.0],
                vec![0.0, 0.0, 0.0],
                vec![1.0, 0.0, 0.0]
            ]
        );
        let other = Tensor::new(&[1i64, 3], &Device::Cpu).unwrap();
        let p = positive_mask(&g, Some(&other), DType::F32)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(p, vec![vec![1.0, 0.0], vec![0.0, 0.0], vec![1.0, 0.0]]);
        let n = negative_mask(&g, None, DType::F32)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(
            n,
            vec![
                vec![0.0, 1.0, 0.0],
                vec![1.0, 0.0, 1.0],
                vec![0.0, 1.0, 0.0]
            ]
        );
    }
}
