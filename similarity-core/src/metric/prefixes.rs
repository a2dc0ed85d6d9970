//! Scoring embeddings at several prefix sizes (Matryoshka evaluation).
//!
//! For each size `m` of `dims`, the embeddings are cut to their first `m` coordinates and
//! L2-normalised ([`truncate_embeddings`]), then scored by the same [`Evaluator`] as the
//! full embeddings: what a model served at `m` dimensions would retrieve. Memory per size
//! is the evaluator's bound plus one `(n, m)` copy.

use candle_core::Tensor;

use super::{Evaluator, Metric, Relevance};
use crate::error::Result;
use crate::model::truncate_embeddings;

/// Per prefix size `m`, every metric's `(name, value)`.
pub type PrefixScores = Vec<(usize, Vec<(String, f64)>)>;

impl Evaluator {
    /// Every metric at every prefix size: `(m, [(name, value)])` for each `m` of `dims`,
    /// in that order. `embeddings: (n, d)`, each `m` in `1..=d`.
    pub fn evaluate_prefixes(
        &self,
        embeddings: &Tensor,
        relevance: &Relevance<'_>,
        metrics: &[&dyn Metric],
        dims: &[usize],
    ) -> Result<PrefixScores> {
        dims.iter()
            .map(|&m| {
                let truncated = truncate_embeddings(embeddings, m)?;
                Ok((m, self.evaluate(&truncated, relevance, metrics)?))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distance::Distance;
    use crate::metric::RetrievalPrecision;
    use candle_core::Device;

    #[test]
    fn a_prefix_can_rank_differently_from_the_whole() {
        // Queries 0, 1 with candidates 2, 3. At 3 dims each query equals its own
        // candidate: precision@1 1.0. At 1 dim query 1 is (0), which normalises to zero
        // and ties with both candidates (cos 0); the first, candidate 2, wins: a miss, so
        // precision@1 is 0.5.
        let e = Tensor::new(
            &[
                [1.0f32, 0.0, 0.0],
                [0.0, 1.0, 0.0],
                [1.0, 0.0, 0.0],
                [0.0, 1.0, 0.0],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let pairs = [(0, 2), (1, 3)];
        let scores = [1.0, 1.0];
        let relevance = Relevance::QueryCandidate {
            pairs: &pairs,
            scores: &scores,
        };
        let p1 = RetrievalPrecision { k: 1 };
        let got = Evaluator::new(Distance::Cosine)
            .evaluate_prefixes(&e, &relevance, &[&p1], &[3, 1])
            .unwrap();
        assert_eq!(got[0], (3, vec![("precision@1".to_string(), 1.0)]));
        assert_eq!(got[1], (1, vec![("precision@1".to_string(), 0.5)]));
        let err = Evaluator::new(Distance::Cosine)
            .evaluate_prefixes(&e, &relevance, &[&p1], &[4])
            .unwrap_err()
            .to_string();
        assert!(err.contains("1..=3"), "{err}");
    }
}
