//! `ContrastiveLoss` (Hadsell, Chopra & LeCun, 2006,
//! <http://yann.lecun.com/exdb/publis/pdf/hadsell-chopra-lecun-06.pdf>).
//!
//! For `P` scored pairs `(aᵢ, bᵢ)` with score `yᵢ ∈ [0, 1]` and `dᵢ = d(aᵢ, bᵢ)` (the
//! row-wise distance):
//!
//! ```text
//! ℓᵢ = ½ · [ yᵢ · dᵢ² + (1 − yᵢ) · relu(margin − dᵢ)² ] + hᵢ
//! L  = mean_i ℓᵢ   (size_average = true)   or   Σᵢ ℓᵢ   (size_average = false)
//! ```
//!
//! Scores between 0 and 1 are soft labels: they weight the pulling and the pushing term.
//!
//! `hᵢ` ("hard negatives from other subgroups") is only present when the batch holds more
//! than one subgroup. With `D` the distance matrix of all `2P` embeddings and `nₖ` the
//! distance from embedding `k` to its closest embedding of *another* subgroup,
//!
//! ```text
//! nₖ = min_{j : subgroup(j) ≠ subgroup(k)} D_kj
//! hᵢ = relu(margin − n_{aᵢ})² + relu(margin − n_{bᵢ})²
//! ```
//!
//! so each object of a pair is also pushed away from its hardest negative among the pairs
//! of other subgroups (objects of one subgroup are never each other's negatives).
//!
//! Options and defaults (Quaterion's): `distance` cosine, `margin` 0.5, `size_average`
//! true.
//!
//! **Differences from Quaterion.**
//! * Its subgroup term uses its cosine distance *matrix*, `(1 − cos)/2`, while the pair term
//!   uses the row-wise `1 − cos`; so with cosine its hard-negative term compares half
//!   distances with the full margin. Here both terms use `1 − cos`.
//! * It masks same-subgroup entries by writing the dtype's maximum into the distance matrix
//!   in place, which makes the Euclidean backward fail (`torch.cdist` needs its output).
//!   Here the mask is arithmetic (a finite offset larger than every distance), so every
//!   distance has a gradient; it equals Quaterion's gradient with the matrix cloned.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{PairKind, SimilarityLoss, masks};
use crate::data::PairTargets;
use crate::distance::Distance;
use crate::error::{Error, Result};
use crate::nn::ParamScope;

/// Options of [`ContrastiveLoss`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContrastiveLossConfig {
    /// Distance between embeddings. Default cosine.
    pub distance: Distance,
    /// Negative pairs (and hard negatives) are pushed to at least this distance.
    /// Default 0.5.
    pub margin: f64,
    /// Average the per-pair losses (true) or sum them (false). Default true.
    pub size_average: bool,
}

impl Default for ContrastiveLossConfig {
    fn default() -> Self {
        ContrastiveLossConfig {
            distance: Distance::Cosine,
            margin: 0.5,
            size_average: true,
        }
    }
}

/// Contrastive loss over scored pairs; see the module docs.
#[derive(Debug, Clone)]
pub struct ContrastiveLoss {
    config: ContrastiveLossConfig,
}

#[diagnostic::do_not_recommend]
impl SimilarityLoss for ContrastiveLoss {
    type Kind = PairKind;
    type Config = ContrastiveLossConfig;
    const NAME: &'static str = "ContrastiveLoss";

    fn new(_embedding_size: usize, config: Self::Config, _params: &mut ParamScope) -> Result<Self> {
        if !config.margin.is_finite() {
            return Err(Error::invalid(
                "ContrastiveLoss option `margin`",
                format!("must be a finite number, got {}", config.margin),
            ));
        }
        Ok(ContrastiveLoss { config })
    }

    fn config(&self) -> &Self::Config {
        &self.config
    }

    fn distance(&self) -> Distance {
        self.config.distance
    }

    fn forward(&self, embeddings: &Tensor, targets: &PairTargets) -> Result<Tensor> {
        super::check_pairs(Self::NAME, embeddings, targets)?;
        let margin = self.config.margin;
        let distance = self.config.distance;
        let dtype = embeddings.dtype();
        let first = targets.pairs.narrow(1, 0, 1)?.squeeze(1)?;
        let second = targets.pairs.narrow(1, 1, 1)?.squeeze(1)?;
        let a = embeddings.index_select(&first, 0)?;
        let b = embeddings.index_select(&second, 0)?;
        let d = distance.distance(&a, &b)?;
        let y = targets.labels.to_dtype(dtype)?;
        // ½ [y d² + (1 − y) relu(m − d)²]: soft labels weight both terms.
        let pull = (&y * d.sqr()?)?;
        let push = ((1.0 - &y)? * hinge_sq(&d, margin)?)?;
        let mut losses = ((pull + push)? * 0.5)?;

        // The subgroup branch only exists when there is someone to be a negative.
        let subgroups = targets.subgroups.to_vec1::<i64>()?;
        if subgroups.iter().any(|&s| s != subgroups[0]) {
            if distance == Distance::Cosine
                && let Some(hard) = nearest_other_subgroup_cosine(embeddings, targets, margin)?
            {
                losses = (losses + hard)?;
                return Ok(if self.config.size_average {
                    losses.mean_all()?
                } else {
                    losses.sum_all()?
                });
            }
            let matrix = distance.distance_matrix(embeddings, None)?;
            let same =
                masks::same_group(&targets.subgroups, &targets.subgroups)?.to_dtype(dtype)?;
            // Same-subgroup entries (the object itself and its pair partner included) are
            // lifted above every real distance, so the row minimum is a real negative. The
            // column is chosen on the detached matrix and read with a gather: two `(n, 1)`
            // nodes in the graph instead of `n × n` work.
            // A row without a negative keeps its lifted value (its hinge is then 0).
            let lift = (same * mask_offset(&matrix, margin)?)?;
            let column = (matrix.detach() + &lift)?.argmin_keepdim(1)?;
            let nearest = (matrix.gather(&column, 1)? + lift.gather(&column, 1)?)?.squeeze(1)?;
            let hard = (hinge_sq(&nearest.index_select(&first, 0)?, margin)?
                + hinge_sq(&nearest.index_select(&second, 0)?, margin)?)?;
            losses = (losses + hard)?;
        }
        Ok(if self.config.size_average {
            losses.mean_all()?
        } else {
            losses.sum_all()?
        })
    }
}

/// The subgroup term `hᵢ` for the cosine distance on the fused kernels: the nearest
/// other-subgroup object of every embedding is mined on the detached similarities and only
/// those pairs are recomputed with gradient (`O(n·d)` backward, no `n × n` matrix in the
/// graph); an embedding without one contributes 0, as the lifted row of the matrix form.
/// `None` where the kernels do not apply.
fn nearest_other_subgroup_cosine(
    embeddings: &Tensor,
    targets: &PairTargets,
    margin: f64,
) -> Result<Option<Tensor>> {
    let Some(h) = crate::kernels::cosine_hardest(embeddings, None, &targets.subgroups, None)?
    else {
        return Ok(None);
    };
    let per_object = hinge_sq(&h.neg, margin)?.mul(&h.has_neg)?;
    let first = targets.pairs.narrow(1, 0, 1)?.squeeze(1)?;
    let second = targets.pairs.narrow(1, 1, 1)?.squeeze(1)?;
    Ok(Some(
        (per_object.index_select(&first, 0)? + per_object.index_select(&second, 0)?)?,
    ))
}

/// `relu(margin − d)²`.
fn hinge_sq(d: &Tensor, margin: f64) -> Result<Tensor> {
    Ok(d.neg()?.affine(1.0, margin)?.relu()?.sqr()?)
}

/// A finite offset that, added to masked entries of `matrix`, puts them above every
/// unmasked entry and above `margin` (and, subtracted, below every entry): the value range
/// of the matrix plus `|margin| + 1`. A finite offset (unlike the dtype's maximum) keeps
/// the arithmetic, and so the gradients, finite; it is a constant for autograd.
pub(crate) fn mask_offset(matrix: &Tensor, margin: f64) -> Result<f64> {
    let range =
        |t: Tensor| -> Result<f64> { Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?) };
    let hi = range(matrix.max_all()?)?;
    let lo = range(matrix.min_all()?)?;
    Ok((hi - lo).abs() + margin.abs() + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{PairMeta, SimilarityPairSample, SimilaritySample};
    use crate::loss::scalar;
    use crate::nn::Params;
    use candle_core::Device;

    fn targets(scores: &[(f32, i64)]) -> PairTargets {
        let metas: Vec<PairMeta> = scores
            .iter()
            .map(|&(score, subgroup)| PairMeta { score, subgroup })
            .collect();
        SimilarityPairSample::<()>::targets(&metas, &Device::Cpu).unwrap()
    }

    fn loss(cfg: ContrastiveLossConfig) -> ContrastiveLoss {
        ContrastiveLoss::new(2, cfg, &mut Params::new(&Device::Cpu, 0).scope("loss")).unwrap()
    }

    #[test]
    fn hand_computed_soft_labels() {
        // Pairs: (e1, e1) score 1 → d = 0; (e1, e2) score 0.25 → d = 1 (cosine).
        // ℓ₀ = 0; ℓ₁ = ½ [0.25·1 + 0.75·relu(0.5 − 1)²] = 0.125; mean 0.0625.
        let e = Tensor::new(
            &[[1.0f32, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]],
            &Device::Cpu,
        )
        .unwrap();
        let t = targets(&[(1.0, 0), (0.25, 0)]);
        let got = scalar(&loss(Default::default()).forward(&e, &t).unwrap());
        assert!((got - 0.0625).abs() < 1e-6, "{got}");
        // Margin 1.5, sum: ℓ₁ = ½ [0.25 + 0.75·0.25] = 0.21875.
        let l = loss(ContrastiveLossConfig {
            margin: 1.5,
            size_average: false,
            ..Default::default()
        });
        let got = scalar(&l.forward(&e, &t).unwrap());
        assert!((got - 0.21875).abs() < 1e-6, "{got}");
    }

    #[test]
    fn other_subgroups_are_hard_negatives() {
        // Two positive pairs at d = 0 in different subgroups; the closest other-subgroup
        // object of each is at cosine distance 1 − cos 60° = 0.5, so with margin 1 every
        // object adds relu(1 − 0.5)² = 0.25: ℓᵢ = 0.5, mean 0.5.
        let (c, s) = (0.5f32, 3f32.sqrt() / 2.0);
        let e = Tensor::new(&[[1.0f32, 0.0], [c, s], [1.0, 0.0], [c, s]], &Device::Cpu).unwrap();
        let cfg = ContrastiveLossConfig {
            margin: 1.0,
            ..Default::default()
        };
        let got = scalar(
            &loss(cfg.clone())
                .forward(&e, &targets(&[(1.0, 0), (1.0, 1)]))
                .unwrap(),
        );
        assert!((got - 0.5).abs() < 1e-6, "{got}");
        // One subgroup: no hard-negative term.
        let got = scalar(
            &loss(cfg)
                .forward(&e, &targets(&[(1.0, 0), (1.0, 0)]))
                .unwrap(),
        );
        assert!(got.abs() < 1e-6, "{got}");
    }

    #[test]
    fn infinite_margin_is_rejected() {
        let err = ContrastiveLoss::new(
            2,
            ContrastiveLossConfig {
                margin: f64::NAN,
                ..Default::default()
            },
            &mut Params::new(&Device::Cpu, 0).scope("loss"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("margin"), "{err}");
    }
}
