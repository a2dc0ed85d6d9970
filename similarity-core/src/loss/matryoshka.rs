//! `MatryoshkaLoss`: an inner loss applied to nested prefixes of the embedding
//! (Kusupati et al. 2022, "Matryoshka Representation Learning",
//! <https://arxiv.org/abs/2205.13147>; sentence-transformers' `MatryoshkaLoss`).
//!
//! For embeddings `E: (n, d)`, dimensions `d₁ > d₂ > … > d_k` (each `≤ d`) and weights
//! `w₁ … w_k`:
//!
//! ```text
//! L(E, targets) = Σ_j  w_j · L_inner_j( E[:, :d_j], targets )
//! ```
//!
//! so the first `d_j` coordinates of an embedding are a usable embedding on their own,
//! and a served model can be truncated to any trained `d_j` (see
//! [`truncate_embeddings`](crate::model::truncate_embeddings): the prefix, L2-normalised).
//! Each prefix has its own inner loss, built with `embedding_size = d_j` in the parameter
//! scope `d{d_j}` (a loss with parameters, such as `ArcFaceLoss`, gets a kernel per
//! prefix; a loss without any, such as `MultipleNegativesRankingLoss`, is the same
//! function at every prefix). The distance (for retrieval metrics) is the inner loss's.
//!
//! Defaults, as in sentence-transformers: every weight 1. An empty `dims` means
//! `d, d/2, d/4, d/8` (those ≥ 1, without repeats).
//!
//! ```
//! use similarity_core::prelude::*;
//! use similarity_core::loss::{MatryoshkaLoss, MatryoshkaLossConfig, MultipleNegativesRankingLossConfig};
//!
//! let mut params = Params::new(&Device::Cpu, 0);
//! let config = MatryoshkaLossConfig::<MultipleNegativesRankingLossConfig> {
//!     dims: vec![8, 4, 2],
//!     ..Default::default()
//! };
//! let loss = MatryoshkaLoss::<MultipleNegativesRankingLoss>::new(8, config, &mut params.scope("loss"))?;
//! assert_eq!(loss.dims(), &[8, 4, 2]);
//! # Ok::<(), similarity_core::Error>(())
//! ```

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{LossKind, SimilarityLoss};
use crate::distance::Distance;
use crate::error::{Error, Result};
use crate::nn::ParamScope;

/// Options of [`MatryoshkaLoss`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MatryoshkaLossConfig<C> {
    /// The prefix sizes, each in `1..=d`, distinct. Default (empty): `d, d/2, d/4, d/8`.
    #[serde(default)]
    pub dims: Vec<usize>,
    /// One weight per entry of `dims`, each finite and `≥ 0`. Default (empty): all 1.
    #[serde(default)]
    pub weights: Vec<f64>,
    /// The inner loss's options, shared by every prefix.
    pub inner: C,
}

/// An inner loss summed over nested embedding prefixes; see the module docs.
#[derive(Debug, Clone)]
pub struct MatryoshkaLoss<L: SimilarityLoss> {
    config: MatryoshkaLossConfig<L::Config>,
    dims: Vec<usize>,
    weights: Vec<f64>,
    inners: Vec<L>,
}

impl<L: SimilarityLoss> MatryoshkaLoss<L> {
    /// The prefix sizes, in the order given (or the default ones).
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// The weight of each prefix.
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    /// The inner loss of each prefix.
    pub fn inner_losses(&self) -> &[L] {
        &self.inners
    }
}

/// `d, d/2, d/4, d/8` without zeros and repeats.
fn default_dims(d: usize) -> Vec<usize> {
    let mut dims: Vec<usize> = [1, 2, 4, 8]
        .iter()
        .map(|f| d / f)
        .filter(|&x| x > 0)
        .collect();
    dims.dedup();
    dims
}

#[diagnostic::do_not_recommend]
impl<L: SimilarityLoss> SimilarityLoss for MatryoshkaLoss<L>
where
    L::Config: Send + Sync,
{
    type Kind = L::Kind;
    type Config = MatryoshkaLossConfig<L::Config>;
    const NAME: &'static str = "MatryoshkaLoss";

    fn new(embedding_size: usize, config: Self::Config, params: &mut ParamScope) -> Result<Self> {
        let dims = if config.dims.is_empty() {
            default_dims(embedding_size)
        } else {
            config.dims.clone()
        };
        if dims.is_empty() {
            return Err(Error::invalid(
                "MatryoshkaLoss option `dims`",
                format!("no prefix of an embedding of size {embedding_size}"),
            ));
        }
        for (i, &dim) in dims.iter().enumerate() {
            if dim == 0 || dim > embedding_size {
                return Err(Error::invalid(
                    format!("MatryoshkaLoss option `dims[{i}]`"),
                    format!("must be in 1..={embedding_size} (the embedding size), got {dim}"),
                ));
            }
            if dims[..i].contains(&dim) {
                return Err(Error::invalid(
                    format!("MatryoshkaLoss option `dims[{i}]`"),
                    format!("{dim} is given twice; each prefix size once"),
                ));
            }
        }
        let weights = if config.weights.is_empty() {
            vec![1.0; dims.len()]
        } else {
            config.weights.clone()
        };
        if weights.len() != dims.len() {
            return Err(Error::invalid(
                "MatryoshkaLoss option `weights`",
                format!(
                    "{} weights for {} dims; give one weight per prefix (or none for all 1)",
                    weights.len(),
                    dims.len()
                ),
            ));
        }
        if let Some((i, w)) = weights
            .iter()
            .enumerate()
            .find(|(_, w)| !(w.is_finite() && **w >= 0.0))
        {
            return Err(Error::invalid(
                format!("MatryoshkaLoss option `weights[{i}]`"),
                format!("must be finite and >= 0, got {w}"),
            ));
        }
        let inners = dims
            .iter()
            .map(|&dim| {
                L::new(
                    dim,
                    config.inner.clone(),
                    &mut params.scope(&format!("d{dim}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(MatryoshkaLoss {
            config,
            dims,
            weights,
            inners,
        })
    }

    fn config(&self) -> &Self::Config {
        &self.config
    }

    fn distance(&self) -> Distance {
        self.inners[0].distance()
    }

    fn forward(
        &self,
        embeddings: &Tensor,
        targets: &<Self::Kind as LossKind>::Targets,
    ) -> Result<Tensor> {
        self.sum_over_prefixes(embeddings, None, |inner, e, _| inner.forward(e, targets))
    }

    /// The weighted sum over prefixes of the inner loss with the negatives' prefixes.
    fn forward_with_negatives(
        &self,
        embeddings: &Tensor,
        targets: &<Self::Kind as LossKind>::Targets,
        negatives: &Tensor,
    ) -> Result<Tensor> {
        self.sum_over_prefixes(embeddings, Some(negatives), |inner, e, n| {
            inner.forward_with_negatives(e, targets, n.unwrap_or(e))
        })
    }
}

impl<L: SimilarityLoss> MatryoshkaLoss<L> {
    /// `Σ_j w_j · f(inner_j, E[:, :d_j], N[:, :d_j])`.
    fn sum_over_prefixes(
        &self,
        embeddings: &Tensor,
        negatives: Option<&Tensor>,
        f: impl Fn(&L, &Tensor, Option<&Tensor>) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (_, d) = embeddings
            .dims2()
            .map_err(|_| Error::shape("MatryoshkaLoss embeddings", "(n, d)", embeddings.dims()))?;
        if let Some(&dim) = self.dims.iter().find(|&&dim| dim > d) {
            return Err(Error::invalid(
                "MatryoshkaLoss embeddings",
                format!("have {d} dimensions, fewer than the prefix size {dim}"),
            ));
        }
        let mut total: Option<Tensor> = None;
        for ((&dim, &w), inner) in self.dims.iter().zip(&self.weights).zip(&self.inners) {
            let prefix = if dim == d {
                embeddings.clone()
            } else {
                embeddings.narrow(1, 0, dim)?.contiguous()?
            };
            let negatives = negatives
                .map(|n| -> Result<Tensor> {
                    if dim == d {
                        Ok(n.clone())
                    } else {
                        Ok(n.narrow(1, 0, dim)?.contiguous()?)
                    }
                })
                .transpose()?;
            let term = (f(inner, &prefix, negatives.as_ref())? * w)?;
            total = Some(match total {
                None => term,
                Some(t) => (t + term)?,
            });
        }
        total.ok_or_else(|| Error::invalid("MatryoshkaLoss", "no prefix to apply the loss to"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{PairMeta, PairTargets, SimilarityPairSample, SimilaritySample};
    use crate::loss::{
        MultipleNegativesRankingLoss, MultipleNegativesRankingLossConfig, TripletLoss, scalar,
    };
    use crate::nn::Params;
    use candle_core::{Device, Var};

    fn pair_targets(p: usize) -> PairTargets {
        let metas = vec![
            PairMeta {
                score: 1.0,
                subgroup: 0
            };
            p
        ];
        SimilarityPairSample::<()>::targets(&metas, &Device::Cpu).unwrap()
    }

    fn mnrl(d: usize) -> MultipleNegativesRankingLoss {
        MultipleNegativesRankingLoss::new(
            d,
            MultipleNegativesRankingLossConfig {
                symmetric: true,
                ..Default::default()
            },
            &mut Params::new(&Device::Cpu, 0).scope("loss"),
        )
        .unwrap()
    }

    fn matryoshka(
        d: usize,
        dims: Vec<usize>,
        weights: Vec<f64>,
    ) -> Result<MatryoshkaLoss<MultipleNegativesRankingLoss>> {
        MatryoshkaLoss::new(
            d,
            MatryoshkaLossConfig {
                dims,
                weights,
                inner: MultipleNegativesRankingLossConfig {
                    symmetric: true,
                    ..Default::default()
                },
            },
            &mut Params::new(&Device::Cpu, 0).scope("loss"),
        )
    }

    fn embeddings(n: usize, d: usize) -> Tensor {
        let v: Vec<f32> = (0..n * d)
            .map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 0.7)
            .collect();
        Tensor::from_vec(v, (n, d), &Device::Cpu).unwrap()
    }

    /// The composite reference: Σ w_j · MNRL(E[:, :d_j]) computed prefix by prefix.
    #[test]
    fn equals_the_weighted_sum_of_prefix_losses() {
        let e = embeddings(8, 6);
        let t = pair_targets(4);
        let loss = matryoshka(6, vec![6, 3, 2], vec![1.0, 0.5, 2.0]).unwrap();
        let got = scalar(&loss.forward(&e, &t).unwrap());
        let expected: f32 = [(6, 1.0f32), (3, 0.5), (2, 2.0)]
            .iter()
            .map(|&(d, w)| {
                let prefix = e.narrow(1, 0, d).unwrap().contiguous().unwrap();
                w * scalar(&mnrl(d).forward(&prefix, &t).unwrap())
            })
            .sum();
        assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
        // One prefix, the whole embedding, weight 1: the inner loss itself.
        let single = matryoshka(6, vec![6], vec![]).unwrap();
        let inner = scalar(&mnrl(6).forward(&e, &t).unwrap());
        assert!((scalar(&single.forward(&e, &t).unwrap()) - inner).abs() < 1e-6);
    }

    #[test]
    fn hand_computed_prefixes() {
        // a = [e1+e3, e2], b = [e1, e2+e3] in 3-d, scale 20, symmetric. Prefix 2 sees
        // a = b = [e1, e2] (orthogonal): each direction ln(1 + e^{-20}). Prefix 3: row 0
        // cos(a0, b0) = 1/√2, cos(a0, b1) = 1/2; row 1 cos(a1, b1) = 1/√2, cos(a1, b0) = 0.
        let e = Tensor::new(
            &[
                [1.0f32, 0.0, 1.0],
                [0.0, 1.0, 0.0],
                [1.0, 0.0, 0.0],
                [0.0, 1.0, 1.0],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let t = pair_targets(2);
        let s = 20.0f64;
        let lse = |pos: f64, neg: f64| ((s * pos).exp() + (s * neg).exp()).ln() - s * pos;
        let r = std::f64::consts::FRAC_1_SQRT_2;
        // rows: a0 → (pos r, neg 1/2), a1 → (pos r, neg 0); columns: b0 → (pos r, neg 0),
        // b1 → (pos r, neg 1/2).
        let full = (lse(r, 0.5) + lse(r, 0.0) + lse(r, 0.0) + lse(r, 0.5)) / 4.0;
        let two = (1.0 + (-s).exp()).ln();
        let loss = matryoshka(3, vec![3, 2], vec![1.0, 3.0]).unwrap();
        let got = scalar(&loss.forward(&e, &t).unwrap()) as f64;
        assert!((got - (full + 3.0 * two)).abs() < 1e-5, "{got}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        let e0 = embeddings(6, 4);
        let t = pair_targets(3);
        let loss = matryoshka(4, vec![4, 2], vec![1.0, 0.5]).unwrap();
        let var = Var::from_tensor(&e0).unwrap();
        let grads = loss
            .forward(var.as_tensor(), &t)
            .unwrap()
            .backward()
            .unwrap();
        let g = grads
            .get(var.as_tensor())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let base = e0.to_vec2::<f32>().unwrap();
        let h = 1e-2f32;
        let f = |v: &Vec<Vec<f32>>| -> f64 {
            let t2 = Tensor::new(v.clone(), &Device::Cpu).unwrap();
            scalar(&loss.forward(&t2, &t).unwrap()) as f64
        };
        for i in 0..6 {
            for j in 0..4 {
                let (mut up, mut down) = (base.clone(), base.clone());
                up[i][j] += h;
                down[i][j] -= h;
                let fd = (f(&up) - f(&down)) / (2.0 * h as f64);
                assert!(
                    (fd - g[i][j] as f64).abs() < 2e-2 * (1.0 + fd.abs()),
                    "[{i},{j}] fd {fd} vs {}",
                    g[i][j]
                );
            }
        }
    }

    #[test]
    fn defaults_and_bad_options() {
        let loss = matryoshka(384, vec![], vec![]).unwrap();
        assert_eq!(loss.dims(), &[384, 192, 96, 48]);
        assert_eq!(loss.weights(), &[1.0; 4]);
        assert_eq!(matryoshka(3, vec![], vec![]).unwrap().dims(), &[3, 1]);
        let err = |dims, weights| matryoshka(8, dims, weights).unwrap_err().to_string();
        assert!(err(vec![8, 16], vec![]).contains("dims[1]"));
        assert!(err(vec![8, 0], vec![]).contains("dims[1]"));
        assert!(err(vec![8, 4, 4], vec![]).contains("given twice"));
        assert!(err(vec![8, 4], vec![1.0]).contains("1 weights for 2 dims"));
        assert!(err(vec![8, 4], vec![1.0, f64::NAN]).contains("weights[1]"));
        // Narrower embeddings than a prefix at forward time.
        let loss = matryoshka(8, vec![8, 4], vec![]).unwrap();
        let e = embeddings(4, 6);
        let msg = loss.forward(&e, &pair_targets(2)).unwrap_err().to_string();
        assert!(msg.contains("6 dimensions") && msg.contains("8"), "{msg}");
    }

    #[test]
    fn wraps_a_group_loss_with_parameters_per_prefix() {
        // A group loss works the same way (TripletLoss: distance of the inner loss).
        let mut params = Params::new(&Device::Cpu, 0);
        let loss = MatryoshkaLoss::<TripletLoss>::new(
            4,
            MatryoshkaLossConfig {
                dims: vec![4, 2],
                ..Default::default()
            },
            &mut params.scope("loss"),
        )
        .unwrap();
        let groups = Tensor::new(&[0i64, 0, 1, 1], &Device::Cpu).unwrap();
        let t = crate::data::GroupTargets { groups };
        let e = embeddings(4, 4);
        let got = scalar(&loss.forward(&e, &t).unwrap());
        let expected: f32 = [4usize, 2]
            .iter()
            .map(|&d| {
                let inner = TripletLoss::new(
                    d,
                    Default::default(),
                    &mut Params::new(&Device::Cpu, 0).scope("x"),
                )
                .unwrap();
                scalar(
                    &inner
                        .forward(&e.narrow(1, 0, d).unwrap().contiguous().unwrap(), &t)
                        .unwrap(),
                )
            })
            .sum();
        assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
        // Serialised config round-trips (it is saved with a servable model).
        let json = serde_json::to_string(loss.config()).unwrap();
        let back: MatryoshkaLossConfig<crate::loss::TripletLossConfig> =
            serde_json::from_str(&json).unwrap();
        assert_eq!(&back, loss.config());
    }
}
