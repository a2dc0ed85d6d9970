//! Hard negatives mined from the whole training set during training, for pair data.
//!
//! sentence-transformers mines hard negatives once, offline, with the model as it was
//! (`mine_hard_negatives`). Here every object's embedding is one pass through the head
//! over the frozen encoder's cache, so mining is re-run every `every_epochs` epochs with
//! the model as it is (ANCE, Xiong et al. 2021, <https://arxiv.org/abs/2007.00808>, does
//! this asynchronously). For `P` training pairs `(aᵢ, bᵢ)` with embeddings `A, B: (P, d)`
//! and `s_ij = sim(aᵢ, b_j)` (the loss's distance's similarity):
//!
//! ```text
//! t_i   = min( s_ii − absolute_margin,  s_ii · (1 − relative_margin),  max_score )
//! neg_i = the num_negatives j with the largest s_ij  among  j ≠ i,  s_ij ≤ t_i,
//!         b_j not equal to bᵢ and a_j not equal to aᵢ
//! ```
//!
//! The threshold `t_i` is the false-negative guard: a candidate that scores about as high
//! as the positive is more likely an unlabelled positive than a negative (the margins and
//! `max_score` are sentence-transformers' `absolute_margin`, `relative_margin` and
//! `max_score`; an option left `None` drops out of the `min`). Objects whose embeddings are
//! bit-identical to the query's positive or anchor (a duplicate answer, a question asked
//! twice) are positives, never negatives. Scores are computed for a block of `r` queries at
//! a time, `r = clamp(block_bytes / (4 P), 1, P)`, so a block's `(r, P)` f32 matrix takes at
//! most `block_bytes`; the top-k per row is a linear scan (`O(P · k)`), never a sort.
//!
//! **In the trainer** ([`TrainerConfig::hard_negatives`](super::TrainerConfig::hard_negatives)):
//! at the start of every epoch `e` with `e % every_epochs == 0` (and the first epoch of a
//! resumed run) the whole training set is embedded in evaluation mode and mined; each
//! training batch then carries, besides its pairs, the mined negatives of its anchors
//! (each once, and none that is a pair of the batch, whose answer is already an in-batch
//! negative), and the loss is
//! [`forward_with_negatives`](crate::loss::SimilarityLoss::forward_with_negatives):
//! MultipleNegativesRankingLoss ranks each anchor against the batch's positives and all
//! those negatives ([`crate::loss::mined_negatives`]). Pair data only.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{Prepared, TrainableModel};
use crate::distance::Distance;
use crate::error::{Error, Result};
use crate::loss::SimilarityLoss;
use crate::nn::Mode;

/// Options of hard-negative mining ([`TrainerConfig::hard_negatives`](super::TrainerConfig::hard_negatives)).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HardNegatives {
    /// Mine at the start of every this many epochs, at least 1. Default 1.
    pub every_epochs: usize,
    /// Negatives kept per query, at least 1. Default 1.
    pub num_negatives: usize,
    /// Skip candidates with `s_ij > s_ii − absolute_margin` (finite). Default none.
    pub absolute_margin: Option<f64>,
    /// Skip candidates with `s_ij > s_ii · (1 − relative_margin)`, in `[0, 1)`. Default
    /// 0.05 (sentence-transformers' suggestion, after NV-Retriever's "95% of the positive").
    pub relative_margin: Option<f64>,
    /// Skip candidates with `s_ij > max_score` (finite). Default none.
    pub max_score: Option<f64>,
    /// Bytes of one block's `(r, P)` score matrix. Default 64 MiB.
    pub block_bytes: usize,
}

impl Default for HardNegatives {
    fn default() -> Self {
        HardNegatives {
            every_epochs: 1,
            num_negatives: 1,
            absolute_margin: None,
            relative_margin: Some(0.05),
            max_score: None,
            block_bytes: 64 << 20,
        }
    }
}

impl HardNegatives {
    /// Checks every option; errors name `field.option`.
    pub fn check(&self, field: &str) -> Result<()> {
        let bad =
            |name: &str, message: String| Err(Error::invalid(format!("{field}.{name}"), message));
        if self.every_epochs == 0 {
            return bad("every_epochs", "must be at least 1, got 0".into());
        }
        if self.num_negatives == 0 {
            return bad("num_negatives", "must be at least 1, got 0".into());
        }
        if self.block_bytes == 0 {
            return bad("block_bytes", "must be at least 1, got 0".into());
        }
        for (name, v) in [
            ("absolute_margin", self.absolute_margin),
            ("max_score", self.max_score),
        ] {
            if let Some(v) = v
                && !v.is_finite()
            {
                return bad(name, format!("must be finite, got {v}"));
            }
        }
        if let Some(r) = self.relative_margin
            && !(0.0..1.0).contains(&r)
        {
            return bad("relative_margin", format!("must be in [0, 1), got {r}"));
        }
        Ok(())
    }

    /// The guard's threshold `t_i` for a positive scoring `positive`.
    fn threshold(&self, positive: f32) -> f32 {
        let mut t = f32::INFINITY;
        if let Some(m) = self.absolute_margin {
            t = t.min(positive - m as f32);
        }
        if let Some(r) = self.relative_margin {
            t = t.min(positive * (1.0 - r as f32));
        }
        if let Some(m) = self.max_score {
            t = t.min(m as f32);
        }
        t
    }
}

/// The result of one mining pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Mined {
    /// Per pair `i`, the pairs `j` whose second object is a hard negative of `aᵢ`, hardest
    /// first (fewer than `num_negatives` where the guard left fewer).
    pub negatives: Vec<Vec<usize>>,
    /// Candidates the false-negative guard skipped, over all queries.
    pub guarded: usize,
    /// Seconds the pass took (scores and selection; not the embedding).
    pub seconds: f64,
}

impl Mined {
    /// The mined negatives of the anchors of `samples` (pair indices), each once, in order
    /// of first appearance, leaving out pairs that are in `samples`.
    pub fn batch_negatives(&self, samples: &[usize]) -> Vec<usize> {
        let mut seen: std::collections::HashSet<usize> = samples.iter().copied().collect();
        let mut out = Vec::new();
        for &i in samples {
            for &j in self.negatives.get(i).map(Vec::as_slice).unwrap_or(&[]) {
                if seen.insert(j) {
                    out.push(j);
                }
            }
        }
        out
    }
}

/// A class id per row: rows with bit-identical values share one.
fn duplicate_classes(rows: &[Vec<f32>]) -> Vec<usize> {
    let mut ids: HashMap<Vec<u32>, usize> = HashMap::new();
    rows.iter()
        .map(|r| {
            let key: Vec<u32> = r.iter().map(|v| v.to_bits()).collect();
            let next = ids.len();
            *ids.entry(key).or_insert(next)
        })
        .collect()
}

/// Mines hard negatives for pairs with `anchors, positives: (P, d)` under `distance`;
/// see the module docs.
pub fn mine(
    anchors: &Tensor,
    positives: &Tensor,
    distance: Distance,
    options: &HardNegatives,
) -> Result<Mined> {
    options.check("HardNegatives")?;
    let started = Instant::now();
    let (p, d) = anchors
        .dims2()
        .map_err(|_| Error::shape("hard-negative mining, anchors", "(P, d)", anchors.dims()))?;
    if positives.dims() != [p, d] {
        return Err(Error::shape(
            "hard-negative mining, positives",
            format!("({p}, {d}) like the anchors"),
            positives.dims(),
        ));
    }
    let anchor_class = duplicate_classes(&anchors.to_vec2::<f32>()?);
    let positive_class = duplicate_classes(&positives.to_vec2::<f32>()?);
    let k = options.num_negatives;
    let block = (options.block_bytes / (4 * p.max(1))).clamp(1, p.max(1));
    let mut negatives = Vec::with_capacity(p);
    let mut guarded = 0usize;
    for start in (0..p).step_by(block) {
        let len = block.min(p - start);
        let scores = distance
            .similarity_matrix(&anchors.narrow(0, start, len)?, Some(positives))?
            .to_vec2::<f32>()?;
        for (r, row) in scores.iter().enumerate() {
            let i = start + r;
            let t = options.threshold(row[i]);
            // The k best (score, j), best first.
            let mut best: Vec<(f32, usize)> = Vec::with_capacity(k + 1);
            for (j, &s) in row.iter().enumerate() {
                if j == i
                    || positive_class[j] == positive_class[i]
                    || anchor_class[j] == anchor_class[i]
                    || s.is_nan()
                {
                    continue;
                }
                if s > t {
                    guarded += 1;
                    continue;
                }
                if best.len() == k && s <= best[k - 1].0 {
                    continue;
                }
                let at = best.partition_point(|&(b, _)| b >= s);
                best.insert(at, (s, j));
                best.truncate(k);
            }
            negatives.push(best.into_iter().map(|(_, j)| j).collect());
        }
    }
    Ok(Mined {
        negatives,
        guarded,
        seconds: started.elapsed().as_secs_f64(),
    })
}

impl super::Trainer {
    /// One mining pass over the prepared training set: every object through the encoders
    /// (or their caches) and the head in evaluation mode, `cache_batch_size` at a time,
    /// then [`mine`] with the loss's distance.
    pub(super) fn mine<M: TrainableModel>(
        &self,
        model: &M,
        data: &Prepared<'_, M>,
        options: &HardNegatives,
    ) -> Result<Mined> {
        if Prepared::<M>::K != 2 {
            return Err(Error::invalid(
                "TrainerConfig.hard_negatives",
                "mines the answers of other pairs, so it needs pair data (SimilarityPairSample)",
            ));
        }
        let started = Instant::now();
        let n = data.metas.len();
        let all: Vec<usize> = (0..n).collect();
        let ids = Prepared::<M>::object_ids(&all);
        let mut scratch = Vec::new();
        let mut parts = Vec::new();
        for chunk in ids.chunks(self.config().cache_batch_size.max(1)) {
            let batch = data.batch(model, chunk, &mut scratch)?;
            parts.push(model.embed(&batch, &mut Mode::Eval)?.detach());
        }
        let embeddings = Tensor::cat(&parts, 0)?;
        let embed_seconds = started.elapsed().as_secs_f64();
        let mined = mine(
            &embeddings.narrow(0, 0, n)?,
            &embeddings.narrow(0, n, n)?,
            model.loss().distance(),
            options,
        )?;
        tracing::info!(
            pairs = n,
            embed_seconds,
            mine_seconds = mined.seconds,
            guarded = mined.guarded,
            "hard negatives mined"
        );
        Ok(mined)
    }
}

/// Splits a training batch's embeddings into the pairs' `n_main` rows and the mined
/// negatives after them (`None` when there are none).
pub(crate) fn split(embeddings: &Tensor, n_main: usize) -> Result<(Tensor, Option<Tensor>)> {
    let n = embeddings.dim(0)?;
    if n == n_main {
        return Ok((embeddings.clone(), None));
    }
    Ok((
        embeddings.narrow(0, 0, n_main)?,
        Some(embeddings.narrow(0, n_main, n - n_main)?),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(rows: &[[f32; 2]]) -> Tensor {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (rows.len(), 2), &Device::Cpu).unwrap()
    }

    /// Angles in degrees → unit vectors, so cosine scores are cos(Δangle).
    fn at(deg: &[f32]) -> Tensor {
        let rows: Vec<[f32; 2]> = deg
            .iter()
            .map(|d| [d.to_radians().cos(), d.to_radians().sin()])
            .collect();
        t(&rows)
    }

    #[test]
    fn hardest_non_positives_by_hand_with_the_guard() {
        // Anchors and positives on the unit circle. Query 0 at 0°, its positive at 30°
        // (s = 0.866); other positives at 10° (s = 0.985, above the positive: guarded by
        // relative margin 0.05, threshold 0.823), 40° (0.766), 90° (0), 180° (−1).
        let anchors = at(&[0.0, 200.0, 300.0, 100.0, 150.0]);
        let positives = at(&[30.0, 10.0, 40.0, 90.0, 180.0]);
        let mined = mine(
            &anchors,
            &positives,
            Distance::Cosine,
            &HardNegatives {
                num_negatives: 2,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(mined.negatives[0], vec![2, 3]);
        // Without the guard, the 10° positive is the hardest.
        let open = mine(
            &anchors,
            &positives,
            Distance::Cosine,
            &HardNegatives {
                num_negatives: 2,
                relative_margin: None,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(open.negatives[0], vec![1, 2]);
        assert!(mined.guarded > open.guarded);
        // An absolute margin of 0.15 (threshold 0.716) also skips 40°; max_score −0.5
        // leaves only 180°.
        let abs = |absolute_margin, max_score| {
            mine(
                &anchors,
                &positives,
                Distance::Cosine,
                &HardNegatives {
                    num_negatives: 2,
                    relative_margin: None,
                    absolute_margin,
                    max_score,
                    ..Default::default()
                },
            )
            .unwrap()
            .negatives[0]
                .clone()
        };
        assert_eq!(abs(Some(0.15), None), vec![3, 4]);
        assert_eq!(abs(None, Some(-0.5)), vec![4]);
    }

    #[test]
    fn duplicates_are_positives_and_blocks_do_not_matter() {
        // Pair 2 repeats pair 0's answer and pair 3 its question: neither is a negative of
        // query 0, however close.
        let anchors = at(&[0.0, 90.0, 180.0, 0.0]);
        let positives = at(&[20.0, 100.0, 20.0, 270.0]);
        let options = HardNegatives {
            num_negatives: 3,
            relative_margin: None,
            ..Default::default()
        };
        let whole = mine(&anchors, &positives, Distance::Cosine, &options).unwrap();
        assert_eq!(whole.negatives[0], vec![1]);
        assert!(!whole.negatives[2].contains(&0));
        // One query row per block gives the same answer.
        let rowwise = mine(
            &anchors,
            &positives,
            Distance::Cosine,
            &HardNegatives {
                block_bytes: 1,
                ..options
            },
        )
        .unwrap();
        assert_eq!(rowwise.negatives, whole.negatives);
    }

    #[test]
    fn batch_negatives_are_unique_and_outside_the_batch() {
        let mined = Mined {
            negatives: vec![vec![3, 1], vec![3, 4], vec![0], vec![], vec![]],
            guarded: 0,
            seconds: 0.0,
        };
        assert_eq!(mined.batch_negatives(&[0, 1]), vec![3, 4]);
        assert_eq!(mined.batch_negatives(&[2, 4]), vec![0]);
    }

    #[test]
    fn bad_options_are_named() {
        let msg = |o: HardNegatives| {
            o.check("TrainerConfig.hard_negatives")
                .unwrap_err()
                .to_string()
        };
        assert!(
            msg(HardNegatives {
                every_epochs: 0,
                ..Default::default()
            })
            .contains("hard_negatives.every_epochs")
        );
        assert!(
            msg(HardNegatives {
                num_negatives: 0,
                ..Default::default()
            })
            .contains("num_negatives")
        );
        assert!(
            msg(HardNegatives {
                relative_margin: Some(1.0),
                ..Default::default()
            })
            .contains("relative_margin")
        );
        assert!(
            msg(HardNegatives {
                max_score: Some(f64::NAN),
                ..Default::default()
            })
            .contains("max_score")
        );
        let e = t(&[[1.0, 0.0]]);
        let wrong = t(&[[1.0, 0.0], [0.0, 1.0]]);
        let err = mine(&e, &wrong, Distance::Cosine, &HardNegatives::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("positives"), "{err}");
    }
}
