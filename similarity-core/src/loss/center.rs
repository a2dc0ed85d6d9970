//! `CenterLoss` (Wen et al. 2016, "A Discriminative Feature Learning Approach for Deep
//! Face Recognition", <https://ydwen.github.io/papers/WenECCV16.pdf>): pulls every
//! embedding towards a trainable centre of its group.
//!
//! With unit-norm embeddings `x̂ᵢ: (N, d)`, the centres `C: (num_groups, d)` and group ids
//! `gᵢ ∈ [0, num_groups)`:
//!
//! ```text
//! L = λ_c · mean_{i,k} (x̂_ik − C_gᵢ,k)²  =  λ_c / (N·d) · Σᵢ ‖x̂ᵢ − C_gᵢ‖²
//! ```
//!
//! Parameters (defaults are Quaterion's):
//! * `num_groups`: number of groups; required (the default 0 is rejected by `new`).
//! * `lambda_c`: weight of the loss; default 0.5.
//!
//! The centres are the trainable variable `centers: (num_groups, d)`, initialised
//! Xavier-uniform (`U(±√(6 / (num_groups + d)))`) as in Quaterion, and moved by the
//! trainer's optimiser together with the model. Group ids must be valid indices into the
//! centres (an id outside `[0, num_groups)` is an error naming it). The gather of each
//! row's centre is a one-hot `(N, num_groups)` matrix product (f32 on the CPU: one fused
//! op, `kernels::center_distance`). The option and id checks are the class-logit losses'
//! (`class_logits`). Retrieval metrics use the cosine distance.
//!
//! As in Quaterion, and unlike the paper: embeddings are L2-normalised first, the squared
//! distance is averaged over all `N·d` elements (the paper's `½ Σᵢ ‖xᵢ − c_gᵢ‖²` is this
//! loss with `λ_c = N·d/2`), and the centres are learnt by gradient descent rather than
//! the paper's separate moving-average update. On its own the loss can collapse all
//! centres together; the paper pairs it with a softmax loss (see `CombinedLoss`).

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::class_logits::{check_num_groups, class_ids, one_hot};
use super::{GroupKind, SimilarityLoss};
use crate::data::GroupTargets;
use crate::distance::{Distance, normalize};
use crate::error::{Error, Result};
use crate::nn::{Init, ParamScope};

/// Options of [`CenterLoss`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CenterLossConfig {
    /// Number of groups (classes). Required: must be set to a positive value.
    pub num_groups: usize,
    /// Weight of the loss. Default 0.5.
    pub lambda_c: f64,
}

impl Default for CenterLossConfig {
    fn default() -> Self {
        CenterLossConfig {
            num_groups: 0,
            lambda_c: 0.5,
        }
    }
}

/// Distance of each embedding to its group's trainable centre; see the module docs.
#[derive(Debug, Clone)]
pub struct CenterLoss {
    config: CenterLossConfig,
    centers: Tensor,
}

impl CenterLoss {
    /// The trainable centres, `(num_groups, embedding_size)`, `f32`.
    pub fn centers(&self) -> &Tensor {
        &self.centers
    }
}

#[diagnostic::do_not_recommend]
impl SimilarityLoss for CenterLoss {
    type Kind = GroupKind;
    type Config = CenterLossConfig;
    const NAME: &'static str = "CenterLoss";

    fn new(embedding_size: usize, config: Self::Config, params: &mut ParamScope) -> Result<Self> {
        crate::limits::check_class_table(Self::NAME, config.num_groups, embedding_size)?;
        check_num_groups(Self::NAME, config.num_groups)?;
        if !config.lambda_c.is_finite() || config.lambda_c <= 0.0 {
            return Err(Error::invalid(
                "CenterLoss option `lambda_c`",
                format!("must be a positive number, got {}", config.lambda_c),
            ));
        }
        let bound = (6.0 / (config.num_groups + embedding_size) as f64).sqrt();
        let centers = params.var(
            "centers",
            &[config.num_groups, embedding_size],
            Init::Uniform {
                lo: -bound,
                hi: bound,
            },
        )?;
        Ok(CenterLoss { config, centers })
    }

    fn config(&self) -> &Self::Config {
        &self.config
    }

    fn distance(&self) -> Distance {
        Distance::Cosine
    }

    fn forward(&self, embeddings: &Tensor, targets: &GroupTargets) -> Result<Tensor> {
        let ids = class_ids(Self::NAME, &targets.groups, self.config.num_groups)?;
        let lambda = self.config.lambda_c as f32;
        if let Some(l) =
            crate::kernels::center_distance(embeddings, &self.centers, ids.clone(), lambda)?
        {
            return Ok(l);
        }
        let one_hot = one_hot(
            &ids,
            self.config.num_groups,
            embeddings.dtype(),
            embeddings.device(),
        )?;
        let centers = one_hot.matmul(&self.centers.to_dtype(embeddings.dtype())?)?;
        let diff = (normalize(embeddings)? - centers)?;
        Ok((diff.sqr()?.mean_all()? * self.config.lambda_c)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::scalar;
    use crate::nn::Params;
    use candle_core::Device;

    #[test]
    fn hand_computed() {
        let mut params = Params::new(&Device::Cpu, 0);
        let cfg = CenterLossConfig {
            num_groups: 2,
            lambda_c: 0.5,
        };
        let loss = CenterLoss::new(2, cfg, &mut params.scope("loss")).unwrap();
        let c = params.named_vars()["loss.centers"]
            .to_vec2::<f32>()
            .unwrap();
        let bound = (6.0f32 / 4.0).sqrt();
        assert!(c.iter().flatten().all(|v| v.abs() <= bound));
        params.named_vars()["loss.centers"]
            .set(&Tensor::new(&[[1.0f32, 0.0], [0.0, 0.0]], &Device::Cpu).unwrap())
            .unwrap();
        // x̂ = [(1, 0), (0.6, 0.8)], groups [0, 1]: squared diffs 0, 0, 0.36, 0.64 → mean 0.25.
        let x = Tensor::new(&[[3.0f32, 0.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let groups = Tensor::new(&[0i64, 1], &Device::Cpu).unwrap();
        let got = scalar(&loss.forward(&x, &GroupTargets { groups }).unwrap());
        assert!((got - 0.125).abs() < 1e-6, "{got}");
    }
}
