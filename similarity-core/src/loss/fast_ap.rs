//! `FastAPLoss` (Cakir, He, Xia, Kulis, Sclaroff, "Deep Metric Learning to Rank", CVPR 2019,
//! <https://cs-people.bu.edu/fcakir/papers/fastap_cvpr2019.pdf>).
//!
//! Average precision through soft histograms of distances. Embeddings are L2-normalised and
//! compared by squared Euclidean distance `D_ij = ‖x̂ᵢ − x̂ⱼ‖² ∈ [0, 4]`. With `B = num_bins`
//! bin centres `c_k = 4k / B` (`k = 0..=B`) and width `Δ = 4 / B`:
//!
//! ```text
//! δ_ijk  = [1 − |D_ij − c_k| / Δ]_+                       (triangular soft bin)
//! h⁺_ik  = Σ_j pos_ij δ_ijk ,   h_ik = Σ_j (pos_ij + neg_ij) δ_ijk
//! H⁺_ik  = Σ_{l ≤ k} h⁺_il ,    H_ik = Σ_{l ≤ k} h_il
//! FastAP_i = (1 / n⁺_i) Σ_k h⁺_ik H⁺_ik / H_ik            (a term with H_ik = 0 is 0)
//! L = mean_{i : n⁺_i > 0} (1 − FastAP_i)
//! ```
//!
//! Parameters and defaults (Quaterion's): `num_bins = 10`. The distance is always Euclidean
//! (on the normalised embeddings), as in Quaterion. A batch in which no anchor has a
//! positive gives `0`. Memory: `O((B + 1)·N²)` (composite form; see below).
//!
//! **Difference from Quaterion** (0.1.35): Quaterion divides by `n⁺_i` and then drops the
//! NaN rows of anchors without a positive; the value is the same as here, but the 0/0 rows
//! still send NaN into every gradient. Here those rows are masked before dividing, so the
//! gradient is finite. Quaterion's all-empty batch gives NaN; here 0.
//!
//! In f32 on the CPU the loss is one fused op (`kernels::group_loss`: two soft-histogram
//! bins per pair, `O(N²)` memory instead of `O((B + 1)·N²)`); the composite form below is
//! the reference it is tested against.

use candle_core::{D, Tensor};
use serde::{Deserialize, Serialize};

use super::masks::group_masks;
use super::triplet::{check_groups, weighted_mean};
use super::{GroupKind, SimilarityLoss};
use crate::data::GroupTargets;
use crate::distance::{Distance, normalize};
use crate::error::{Error, Result};
use crate::nn::ParamScope;

/// Options of [`FastAPLoss`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FastAPLossConfig {
    /// Number of histogram bins over the distance range `[0, 4]`. Default 10.
    pub num_bins: usize,
}

impl Default for FastAPLossConfig {
    fn default() -> Self {
        FastAPLossConfig { num_bins: 10 }
    }
}

/// FastAP loss; see the module docs.
#[derive(Debug, Clone)]
pub struct FastAPLoss {
    config: FastAPLossConfig,
}

#[diagnostic::do_not_recommend]
impl SimilarityLoss for FastAPLoss {
    type Kind = GroupKind;
    type Config = FastAPLossConfig;
    const NAME: &'static str = "FastAPLoss";

    fn new(_embedding_size: usize, config: Self::Config, _params: &mut ParamScope) -> Result<Self> {
        crate::limits::check_at_most(
            "FastAPLoss option `num_bins`",
            config.num_bins,
            crate::limits::MAX_HISTOGRAM_BINS,
        )?;
        if config.num_bins == 0 {
            return Err(Error::invalid(
                "FastAPLoss option `num_bins`",
                "must be at least 1, got 0",
            ));
        }
        Ok(FastAPLoss { config })
    }

    fn config(&self) -> &Self::Config {
        &self.config
    }

    /// Always Euclidean (on L2-normalised embeddings).
    fn distance(&self) -> Distance {
        Distance::Euclidean
    }

    fn forward(&self, embeddings: &Tensor, targets: &GroupTargets) -> Result<Tensor> {
        check_groups("FastAPLoss", embeddings, &targets.groups)?;
        let fused = crate::kernels::GroupMatrixLoss::FastAp {
            bins: self.config.num_bins,
        };
        if let Some(l) =
            crate::kernels::cosine_group_loss(embeddings, &targets.groups, None, fused)?
        {
            return Ok(l);
        }
        let dtype = embeddings.dtype();
        let device = embeddings.device();
        let (pos, neg) = group_masks(&targets.groups, None, dtype)?;
        let n_pos = pos.sum(1)?;

        let x = normalize(embeddings)?;
        let sq = x.sqr()?.sum_keepdim(1)?;
        let dist = sq
            .broadcast_add(&sq.t()?)?
            .sub(&(x.matmul(&x.t()?)? * 2.0)?)?
            .relu()?;

        let bins = self.config.num_bins;
        let delta = 4.0 / bins as f64;
        let centres: Vec<f64> = (0..=bins).map(|k| k as f64 * delta).collect();
        let centres = Tensor::from_vec(centres, (bins + 1, 1, 1), device)?.to_dtype(dtype)?;
        // (B + 1, N, N)
        let pulse = dist
            .unsqueeze(0)?
            .broadcast_sub(&centres)?
            .abs()?
            .affine(-1.0 / delta, 1.0)?
            .relu()?;
        let hist = |mask: &Tensor| -> Result<Tensor> {
            Ok(pulse
                .broadcast_mul(&mask.unsqueeze(0)?)?
                .sum(D::Minus1)?
                .t()?)
        };
        let h_pos = hist(&pos)?; // (N, B + 1)
        let h_all = h_pos.add(&hist(&neg)?)?;
        let cum_pos = h_pos.cumsum(1)?;
        let cum_all = h_all.cumsum(1)?;
        let empty = cum_all.le(0.0)?.to_dtype(dtype)?;
        let ratio = h_pos.mul(&cum_pos)?.div(&cum_all.add(&empty)?)?;
        let has_pos = n_pos.gt(0.0)?.to_dtype(dtype)?;
        let no_pos = (1.0 - &has_pos)?;
        let fast_ap = ratio.sum(1)?.div(&n_pos.add(&no_pos)?)?;
        weighted_mean(&(1.0 - fast_ap)?, &has_pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Params;
    use candle_core::{DType, Device};

    fn val(t: &Tensor) -> f64 {
        t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    #[test]
    fn perfect_ranking_and_empty_batch() {
        // Two groups at opposite poles: positives at distance 0 (bin 0), negatives at 4
        // (last bin): AP = 1 for every anchor → loss 0.
        let e = Tensor::new(
            &[[1.0f64, 0.0], [2.0, 0.0], [-1.0, 0.0], [-3.0, 0.0]],
            &Device::Cpu,
        )
        .unwrap();
        let l = FastAPLoss::new(
            2,
            Default::default(),
            &mut Params::new(&Device::Cpu, 0).scope("loss"),
        )
        .unwrap();
        let t = |g: &[i64]| GroupTargets {
            groups: Tensor::new(g, &Device::Cpu).unwrap(),
        };
        assert!(val(&l.forward(&e, &t(&[0, 0, 1, 1])).unwrap()).abs() < 1e-7);
        // Three points, groups [0, 1, 0]: anchor 0 has its positive at 4 and its negative
        // at 0 → H = 2 where h⁺ = H⁺ = 1 → AP 1/2; anchor 2 has both at 4 → AP 1/2;
        // anchor 1 has no positive and is left out → loss 1/2.
        let three = e.narrow(0, 0, 3).unwrap();
        let got = val(&l.forward(&three, &t(&[0, 1, 0])).unwrap());
        assert!((got - 0.5).abs() < 1e-6, "{got}");
        assert_eq!(val(&l.forward(&e, &t(&[0, 1, 2, 3])).unwrap()), 0.0);
    }
}
