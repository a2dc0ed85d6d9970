//! Losses with extra, mined negatives: `MultipleNegativesRankingLoss` over
//! `(anchor, positive, negatives)`, as sentence-transformers trains on the triplets its
//! `mine_hard_negatives` writes.
//!
//! For a batch of `P` pairs `(aᵢ, bᵢ)` and `N` extra negatives `n₁ … n_N` (hard negatives
//! of the batch's anchors, mined by [`crate::train::hard_negatives`]), every anchor ranks
//! its positive against every other positive **and every negative**:
//!
//! ```text
//! C = [b₁ … b_P, n₁ … n_N]                        (P + N, d) candidates
//! S = scale · sim(A, C)                            (P, P + N)
//! L = mean_i [ logsumexp_j S_ij − S_ii ]
//! L_sym = ( L + mean_j [ logsumexp_i S_ij − S_jj ] ) / 2     (symmetric = true)
//! ```
//!
//! The symmetric term ranks each positive against the anchors only (the `P × P` block):
//! a negative has no anchor of its own. With `N = 0` this is the plain loss. Shapes:
//! `embeddings: (2P, d)` with `pairs: (P, 2)` as for the plain loss, `negatives: (N, d)`.

use candle_core::Tensor;

use super::MultipleNegativesRankingLossConfig;
use crate::data::PairTargets;
use crate::error::{Error, Result};

/// `MultipleNegativesRankingLoss` with `config` on a pair batch and `negatives: (N, d)`;
/// see the module docs.
pub fn mnrl_with_negatives(
    config: &MultipleNegativesRankingLossConfig,
    embeddings: &Tensor,
    targets: &PairTargets,
    negatives: &Tensor,
) -> Result<Tensor> {
    const NAME: &str = "MultipleNegativesRankingLoss with mined negatives";
    super::check_pairs(NAME, embeddings, targets)?;
    let d = embeddings.dim(1)?;
    if negatives.rank() != 2 || negatives.dim(1)? != d {
        return Err(Error::shape(
            format!("{NAME}, negatives"),
            format!("(N, {d}) like the embeddings"),
            negatives.dims(),
        ));
    }
    let labels = targets.labels.to_vec1::<f32>()?;
    if let Some(i) = labels.iter().position(|&l| l != 1.0) {
        return Err(Error::invalid(
            format!("{NAME}, pair {i} of the batch"),
            format!(
                "score is {}, but this loss only takes positive pairs",
                labels[i]
            ),
        ));
    }
    let anchors = embeddings.index_select(&targets.pairs.narrow(1, 0, 1)?.squeeze(1)?, 0)?;
    let positives = embeddings.index_select(&targets.pairs.narrow(1, 1, 1)?.squeeze(1)?, 0)?;
    let p = anchors.dim(0)?;
    let candidates = if negatives.dim(0)? == 0 {
        positives
    } else {
        Tensor::cat(&[&positives, negatives], 0)?
    };
    let logits = (config
        .distance
        .similarity_matrix(&anchors, Some(&candidates))?
        * config.scale)?;
    let mean_lse = |m: &Tensor, dim: usize| -> Result<Tensor> {
        let max = m.max_keepdim(dim)?.detach();
        Ok(m.broadcast_sub(&max)?
            .exp()?
            .sum_keepdim(dim)?
            .log()?
            .add(&max)?
            .mean_all()?)
    };
    let block = logits.narrow(1, 0, p)?.contiguous()?;
    let idx = Tensor::arange(0u32, p as u32, logits.device())?.unsqueeze(1)?;
    let diag = block.gather(&idx, 1)?.squeeze(1)?.mean_all()?;
    let rows = mean_lse(&logits, 1)?;
    if !config.symmetric {
        return Ok(rows.sub(&diag)?);
    }
    let cols = mean_lse(&block, 0)?;
    Ok(((rows + cols)? * 0.5)?.sub(&diag)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::{MultipleNegativesRankingLoss, SimilarityLoss, scalar};
    use crate::nn::Params;
    use candle_core::{Device, Var};

    use crate::loss::multiple_negatives_ranking::tests::targets;

    fn config(scale: f64, symmetric: bool) -> MultipleNegativesRankingLossConfig {
        MultipleNegativesRankingLossConfig {
            scale,
            symmetric,
            ..Default::default()
        }
    }

    #[test]
    fn hand_computed_with_one_negative() {
        // a = [e1, e2], b = [e1, e2], one negative n = e1 + e2 (cos 1/√2 to both anchors),
        // scale 1. Row i: logsumexp(1, 0, 1/√2) − 1; the columns see only the 2 × 2 block:
        // logsumexp(1, 0) − 1.
        let e = Tensor::new(
            &[[1.0f32, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]],
            &Device::Cpu,
        )
        .unwrap();
        let n = Tensor::new(&[[1.0f32, 1.0]], &Device::Cpu).unwrap();
        let r = std::f64::consts::FRAC_1_SQRT_2;
        let row = (1f64.exp() + 1.0 + r.exp()).ln() - 1.0;
        let col = (1f64.exp() + 1.0).ln() - 1.0;
        let one_way =
            scalar(&mnrl_with_negatives(&config(1.0, false), &e, &targets(2), &n).unwrap());
        assert!((one_way as f64 - row).abs() < 1e-6, "{one_way}");
        let both = scalar(&mnrl_with_negatives(&config(1.0, true), &e, &targets(2), &n).unwrap());
        assert!((both as f64 - (row + col) / 2.0).abs() < 1e-6, "{both}");
    }

    #[test]
    fn no_negatives_is_the_plain_loss() {
        let v: Vec<f32> = (0..24).map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0).collect();
        let e = Tensor::from_vec(v, (6, 4), &Device::Cpu).unwrap();
        let none = Tensor::zeros((0, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        for symmetric in [false, true] {
            let cfg = config(20.0, symmetric);
            let plain = MultipleNegativesRankingLoss::new(
                4,
                cfg.clone(),
                &mut Params::new(&Device::Cpu, 0).scope("l"),
            )
            .unwrap();
            let a = scalar(&plain.forward(&e, &targets(3)).unwrap());
            let b = scalar(&mnrl_with_negatives(&cfg, &e, &targets(3), &none).unwrap());
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let v: Vec<f32> = (0..18).map(|i| ((i * 5 % 13) as f32 - 6.0) / 5.0).collect();
        let n0: Vec<f32> = (0..6).map(|i| ((i * 3 % 7) as f32 - 3.0) / 3.0).collect();
        let e =
            Var::from_tensor(&Tensor::from_vec(v.clone(), (6, 3), &Device::Cpu).unwrap()).unwrap();
        let n =
            Var::from_tensor(&Tensor::from_vec(n0.clone(), (2, 3), &Device::Cpu).unwrap()).unwrap();
        let cfg = config(5.0, true);
        let t = targets(3);
        let grads = mnrl_with_negatives(&cfg, e.as_tensor(), &t, n.as_tensor())
            .unwrap()
            .backward()
            .unwrap();
        let f = |ev: &[f32], nv: &[f32]| -> f64 {
            let e = Tensor::from_vec(ev.to_vec(), (6, 3), &Device::Cpu).unwrap();
            let n = Tensor::from_vec(nv.to_vec(), (2, 3), &Device::Cpu).unwrap();
            scalar(&mnrl_with_negatives(&cfg, &e, &t, &n).unwrap()) as f64
        };
        let h = 1e-2f32;
        let ge = grads
            .get(e.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let gn = grads
            .get(n.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for i in 0..v.len() {
            let (mut up, mut down) = (v.clone(), v.clone());
            up[i] += h;
            down[i] -= h;
            let fd = (f(&up, &n0) - f(&down, &n0)) / (2.0 * h as f64);
            assert!(
                (fd - ge[i] as f64).abs() < 2e-2 * (1.0 + fd.abs()),
                "e[{i}] {fd} vs {}",
                ge[i]
            );
        }
        for i in 0..n0.len() {
            let (mut up, mut down) = (n0.clone(), n0.clone());
            up[i] += h;
            down[i] -= h;
            let fd = (f(&v, &up) - f(&v, &down)) / (2.0 * h as f64);
            assert!(
                (fd - gn[i] as f64).abs() < 2e-2 * (1.0 + fd.abs()),
                "n[{i}] {fd} vs {}",
                gn[i]
            );
        }
    }

    #[test]
    fn negatives_of_the_wrong_width_are_named() {
        let e = Tensor::zeros((4, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let n = Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let err = mnrl_with_negatives(&config(20.0, false), &e, &targets(2), &n)
            .unwrap_err()
            .to_string();
        assert!(err.contains("negatives") && err.contains("(N, 3)"), "{err}");
    }
}
