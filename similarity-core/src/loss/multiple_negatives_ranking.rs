//! `MultipleNegativesRankingLoss` (Henderson et al., 2017, <https://arxiv.org/abs/1705.00652>).
//!
//! For `P` positive pairs `(aᵢ, bᵢ)`, every other `bⱼ` of the batch is a negative for
//! `aᵢ`. With `S = scale · sim(A, B): (P, P)`:
//!
//! ```text
//! L = mean_i [ logsumexp_j S_ij − S_ii ]                 (anchor → positive)
//! L_sym = ( L + mean_j [ logsumexp_i S_ij − S_jj ] ) / 2  (symmetric = true)
//! ```
//!
//! `sim` is the loss's distance's similarity ([`crate::distance`]); for cosine it is
//! `cos`, so `scale` means what it means in sentence-transformers (default 20).
//! **Difference from Quaterion**: its cosine similarity matrix is `(1 + cos) / 2`, so the
//! same `scale` is half as sharp there (20 acts as 10·cos).
//!
//! Inputs: `embeddings: (2P, d)`, `pairs: (P, 2)`; every label must be 1 (the loss has no
//! notion of a negative pair: an error says which pair is not positive). Subgroups are
//! ignored, as in Quaterion.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{PairKind, SimilarityLoss, diagonal_cross_entropy};
use crate::data::PairTargets;
use crate::distance::Distance;
use crate::error::{Error, Result};
use crate::nn::ParamScope;

/// Options of [`MultipleNegativesRankingLoss`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultipleNegativesRankingLossConfig {
    /// Multiplies the similarities before the softmax. Default 20.
    pub scale: f64,
    /// Distance whose similarity is used. Default cosine.
    pub distance: Distance,
    /// Also rank anchors for each positive. Default false.
    pub symmetric: bool,
}

impl Default for MultipleNegativesRankingLossConfig {
    fn default() -> Self {
        MultipleNegativesRankingLossConfig {
            scale: 20.0,
            distance: Distance::Cosine,
            symmetric: false,
        }
    }
}

/// In-batch negatives ranking loss; see the module docs.
#[derive(Debug, Clone)]
pub struct MultipleNegativesRankingLoss {
    config: MultipleNegativesRankingLossConfig,
}

#[diagnostic::do_not_recommend]
impl SimilarityLoss for MultipleNegativesRankingLoss {
    type Kind = PairKind;
    type Config = MultipleNegativesRankingLossConfig;
    const NAME: &'static str = "MultipleNegativesRankingLoss";

    fn new(_embedding_size: usize, config: Self::Config, _params: &mut ParamScope) -> Result<Self> {
        if !config.scale.is_finite() || config.scale <= 0.0 {
            return Err(Error::invalid(
                "MultipleNegativesRankingLoss option `scale`",
                format!("must be a positive number, got {}", config.scale),
            ));
        }
        Ok(MultipleNegativesRankingLoss { config })
    }

    fn config(&self) -> &Self::Config {
        &self.config
    }

    fn distance(&self) -> Distance {
        self.config.distance
    }

    fn forward(&self, embeddings: &Tensor, targets: &PairTargets) -> Result<Tensor> {
        super::check_pairs(Self::NAME, embeddings, targets)?;
        let labels = targets.labels.to_vec1::<f32>()?;
        if let Some(i) = labels.iter().position(|&l| l != 1.0) {
            return Err(Error::invalid(
                format!("MultipleNegativesRankingLoss, pair {i} of the batch"),
                format!(
                    "score is {}, but this loss only takes positive pairs (score 1); \
                     use ContrastiveLoss for scored pairs",
                    labels[i]
                ),
            ));
        }
        if self.config.distance == Distance::Cosine {
            // The fused op reads the pairs' rows by index (no gathered copies).
            let pairs = targets
                .pairs
                .to_dtype(candle_core::DType::U32)?
                .to_vec2::<u32>()?;
            let (a, p) = pairs.iter().map(|r| (r[0], r[1])).unzip();
            if let Some(loss) = crate::kernels::cosine_mnrl(
                embeddings,
                a,
                p,
                self.config.scale,
                self.config.symmetric,
            )? {
                return Ok(loss);
            }
        }
        let anchors = embeddings.index_select(&targets.pairs.narrow(1, 0, 1)?.squeeze(1)?, 0)?;
        let positives = embeddings.index_select(&targets.pairs.narrow(1, 1, 1)?.squeeze(1)?, 0)?;
        let logits = (self
            .config
            .distance
            .similarity_matrix(&anchors, Some(&positives))?
            * self.config.scale)?;
        diagonal_cross_entropy(&logits, self.config.symmetric)
    }

    /// See [`mined_negatives`](super::mined_negatives): each anchor also ranks against
    /// every row of `negatives`.
    fn forward_with_negatives(
        &self,
        embeddings: &Tensor,
        targets: &PairTargets,
        negatives: &Tensor,
    ) -> Result<Tensor> {
        super::mined_negatives::mnrl_with_negatives(&self.config, embeddings, targets, negatives)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::data::{PairMeta, SimilarityPairSample, SimilaritySample};
    use crate::loss::scalar;
    use crate::nn::Params;
    use candle_core::Device;

    /// The targets of `p` positive pairs in subgroup 0.
    pub(crate) fn targets(p: usize) -> PairTargets {
        let metas = vec![
            PairMeta {
                score: 1.0,
                subgroup: 0
            };
            p
        ];
        SimilarityPairSample::<()>::targets(&metas, &Device::Cpu).unwrap()
    }

    fn loss(cfg: MultipleNegativesRankingLossConfig) -> MultipleNegativesRankingLoss {
        MultipleNegativesRankingLoss::new(2, cfg, &mut Params::new(&Device::Cpu, 0).scope("loss"))
            .unwrap()
    }

    #[test]
    fn hand_computed_two_pairs() {
        // a = [e1, e2], b = [e1, e2] (orthogonal): S = scale·I, so the loss is
        // logsumexp(s, 0) − s = ln(1 + e^{−s}) for each row, symmetric or not.
        let e = Tensor::new(
            &[[1.0f32, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]],
            &Device::Cpu,
        )
        .unwrap();
        let expected = (1.0 + (-20.0f32).exp()).ln();
        let l = loss(Default::default());
        assert!((scalar(&l.forward(&e, &targets(2)).unwrap()) - expected).abs() < 1e-7);
        // a = [e1, e2], b = [e2, e1] with scale 1: each row's positive has cos 0 and the
        // negative cos 1 → ln(1 + e) − 0.
        let e = Tensor::new(
            &[[1.0f32, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]],
            &Device::Cpu,
        )
        .unwrap();
        let l = loss(MultipleNegativesRankingLossConfig {
            scale: 1.0,
            symmetric: true,
            ..Default::default()
        });
        let got = scalar(&l.forward(&e, &targets(2)).unwrap());
        assert!((got - (1.0 + 1f32.exp()).ln()).abs() < 1e-6, "{got}");
    }

    #[test]
    fn negative_pair_is_rejected_by_index() {
        let e = Tensor::zeros((4, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let metas = [
            PairMeta {
                score: 1.0,
                subgroup: 0,
            },
            PairMeta {
                score: 0.0,
                subgroup: 0,
            },
        ];
        let t = SimilarityPairSample::<()>::targets(&metas, &Device::Cpu).unwrap();
        let err = loss(Default::default())
            .forward(&e, &t)
            .unwrap_err()
            .to_string();
        assert!(err.contains("pair 1") && err.contains("positive"), "{err}");
    }
}
