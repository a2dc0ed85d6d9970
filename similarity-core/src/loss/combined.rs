//! `CombinedLoss`: a weighted sum of two losses of the same kind on the same embeddings
//! (asked for in Quaterion, never provided there).
//!
//! ```text
//! L = w₀ · L_first(embeddings, targets) + w₁ · L_second(embeddings, targets)
//! ```
//!
//! Parameters:
//! * `first`, `second`: the parts' own configs (each part's defaults).
//! * `weights` `(w₀, w₁)`: default `(1, 1)`; finite and non-negative.
//!
//! More than two losses nest: `CombinedLoss<A, CombinedLoss<B, C>>`. Each part's trainable
//! parameters live in its own sub-scope, `0` for `first` and `1` for `second` (so the
//! kernel of a `SoftmaxLoss` first part of a model's loss is `loss.0.kernel`).
//! [`SimilarityLoss::distance`] is the first part's. When both parts are [`MemoryLoss`]es,
//! so is the combination (the same weighted sum against the memory).
//!
//! The parts' configs must be `Send + Sync` (every config of this crate is).
//!
//! In a `#[trainable_model]` the options are set as a typed config literal, e.g.
//! `#[loss(first = SoftmaxLossConfig { num_groups: 10, ..Default::default() },
//! weights = (1.0, 0.01))]` on a field of type `CombinedLoss<SoftmaxLoss, CenterLoss>`.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{LossKind, MemoryLoss, SimilarityLoss};
use crate::distance::Distance;
use crate::error::{Error, Result};
use crate::nn::ParamScope;

/// Options of [`CombinedLoss`]: the parts' configs and their weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CombinedLossConfig<A, B> {
    /// Options of the first loss.
    pub first: A,
    /// Options of the second loss.
    pub second: B,
    /// Weights of the first and second loss. Default `(1, 1)`.
    pub weights: (f64, f64),
}

impl<A: Default, B: Default> Default for CombinedLossConfig<A, B> {
    fn default() -> Self {
        CombinedLossConfig {
            first: A::default(),
            second: B::default(),
            weights: (1.0, 1.0),
        }
    }
}

/// A weighted sum of two losses of one kind; see the module docs.
#[derive(Debug, Clone)]
pub struct CombinedLoss<A: SimilarityLoss, B: SimilarityLoss<Kind = A::Kind>> {
    config: CombinedLossConfig<A::Config, B::Config>,
    first: A,
    second: B,
}

impl<A: SimilarityLoss, B: SimilarityLoss<Kind = A::Kind>> CombinedLoss<A, B> {
    /// The first loss.
    pub fn first(&self) -> &A {
        &self.first
    }

    /// The second loss.
    pub fn second(&self) -> &B {
        &self.second
    }
}

#[diagnostic::do_not_recommend]
impl<A, B> SimilarityLoss for CombinedLoss<A, B>
where
    A: SimilarityLoss,
    B: SimilarityLoss<Kind = A::Kind>,
    A::Config: Send + Sync,
    B::Config: Send + Sync,
{
    type Kind = A::Kind;
    type Config = CombinedLossConfig<A::Config, B::Config>;
    const NAME: &'static str = "CombinedLoss";

    fn new(embedding_size: usize, config: Self::Config, params: &mut ParamScope) -> Result<Self> {
        let (w0, w1) = config.weights;
        if !(w0.is_finite() && w1.is_finite() && w0 >= 0.0 && w1 >= 0.0) {
            return Err(Error::invalid(
                "CombinedLoss option `weights`",
                format!("must be two finite non-negative numbers, got ({w0}, {w1})"),
            ));
        }
        let first = A::new(embedding_size, config.first.clone(), &mut params.scope("0"))?;
        let second = B::new(
            embedding_size,
            config.second.clone(),
            &mut params.scope("1"),
        )?;
        Ok(CombinedLoss {
            config,
            first,
            second,
        })
    }

    fn config(&self) -> &Self::Config {
        &self.config
    }

    fn distance(&self) -> Distance {
        self.first.distance()
    }

    fn forward(
        &self,
        embeddings: &Tensor,
        targets: &<Self::Kind as LossKind>::Targets,
    ) -> Result<Tensor> {
        let a = self.first.forward(embeddings, targets)?;
        let b = self.second.forward(embeddings, targets)?;
        self.weigh(a, b)
    }
}

impl<A: SimilarityLoss, B: SimilarityLoss<Kind = A::Kind>> CombinedLoss<A, B> {
    fn weigh(&self, a: Tensor, b: Tensor) -> Result<Tensor> {
        let (w0, w1) = self.config.weights;
        let b = b.to_dtype(a.dtype())?;
        Ok(((a * w0)? + (b * w1)?)?)
    }
}

#[diagnostic::do_not_recommend]
impl<A, B> MemoryLoss for CombinedLoss<A, B>
where
    A: MemoryLoss,
    B: MemoryLoss,
    A::Config: Send + Sync,
    B::Config: Send + Sync,
{
    fn forward_memory(
        &self,
        embeddings: &Tensor,
        groups: &Tensor,
        memory_embeddings: &Tensor,
        memory_groups: &Tensor,
    ) -> Result<Tensor> {
        let a = self
            .first
            .forward_memory(embeddings, groups, memory_embeddings, memory_groups)?;
        let b = self
            .second
            .forward_memory(embeddings, groups, memory_embeddings, memory_groups)?;
        self.weigh(a, b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::GroupTargets;
    use crate::loss::{CenterLoss, CenterLossConfig, SoftmaxLoss, SoftmaxLossConfig, scalar};
    use crate::nn::Params;
    use candle_core::Device;

    #[test]
    fn weighted_sum_of_parts_with_scoped_params() {
        let dev = Device::Cpu;
        let cfg = CombinedLossConfig {
            first: SoftmaxLossConfig {
                num_groups: 3,
                temperature: 0.5,
            },
            second: CenterLossConfig {
                num_groups: 3,
                lambda_c: 0.5,
            },
            weights: (0.7, 2.0),
        };
        let mut params = Params::new(&dev, 3);
        let combined =
            CombinedLoss::<SoftmaxLoss, CenterLoss>::new(4, cfg.clone(), &mut params.scope("loss"))
                .unwrap();
        let names: Vec<&String> = params.named_vars().keys().collect();
        assert_eq!(names, ["loss.0.kernel", "loss.1.centers"]);
        // The same parts, built alone on the same generator, give the same parameters.
        let mut alone = Params::new(&dev, 3);
        let a = SoftmaxLoss::new(4, cfg.first.clone(), &mut alone.scope("a")).unwrap();
        let b = CenterLoss::new(4, cfg.second.clone(), &mut alone.scope("b")).unwrap();
        let x = Tensor::new(
            &[
                [0.3f32, -1.0, 0.2, 0.5],
                [1.0, 0.1, -0.4, 0.0],
                [0.2, 0.2, 0.9, -0.3],
            ],
            &dev,
        )
        .unwrap();
        let t = GroupTargets {
            groups: Tensor::new(&[0i64, 2, 2], &dev).unwrap(),
        };
        let got = scalar(&combined.forward(&x, &t).unwrap());
        let want =
            0.7 * scalar(&a.forward(&x, &t).unwrap()) + 2.0 * scalar(&b.forward(&x, &t).unwrap());
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        assert_eq!(combined.distance(), Distance::Cosine);
        let json = serde_json::to_string(combined.config()).unwrap();
        let back: CombinedLossConfig<SoftmaxLossConfig, CenterLossConfig> =
            serde_json::from_str(&json).unwrap();
        assert_eq!(back, cfg);
    }
}
