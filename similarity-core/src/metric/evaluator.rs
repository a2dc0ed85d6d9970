//! Scoring a whole embedded dataset, block by block.
//!
//! Every object `q` of `embeddings: (n, d)` (or a seeded random sample of `s` of them) is a
//! query against all `n` objects; the query itself is masked (distance `+∞`, irrelevant),
//! as Quaterion's `precompute` does with its `max + 1` diagonal. What is relevant comes
//! from [`Relevance`]: the other members of the query's group, or its pair partners with
//! the pair score as gain.
//!
//! Distances are computed for `b` query rows at a time, `(b, n)`, with
//! `b = clamp(block_bytes / (4 n), 1, n)`, so a block's f32 distance matrix takes at most
//! `b × n × 4 ≤ block_bytes` bytes (or one row, `4 n`, when a row alone exceeds it). A
//! block's computation holds at most [`Evaluator::BLOCK_BUFFERS`] such buffers at once
//! (Candle's intermediate matrices of the distance expression plus the host copy), so the
//! evaluator's peak extra memory is bounded by
//!
//! ```text
//! BLOCK_BUFFERS · b · n · 4 bytes  +  O(n) bookkeeping  +  what the distance needs per
//!                                                         candidate (a normalised copy of
//!                                                         the embeddings for cosine)
//! ```
//!
//! and never an `n × n` matrix. With the default 64 MiB blocks, 100,000 × 64 embeddings
//! evaluate in a few hundred MiB. Ranking is done on the host, rows split across threads.
//!
//! **Difference from Quaterion's samplers.** Quaterion's `GroupSampler` masks entry
//! `[i, i]` of the *sampled* `(s, n)` matrix, which is not the query's own column, so the
//! query's zero self-distance stays in and retrieves itself (an irrelevant hit), deflating
//! every score; here the query's own column is always masked.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::ranking::{Metric, Partial, RankedRow, finish};
use crate::distance::Distance;
use crate::error::{Error, Result};

/// What each object finds relevant.
#[derive(Debug, Clone, Copy)]
pub enum Relevance<'a> {
    /// `groups[i]` is object `i`'s group; the other members of its group are relevant
    /// (gain 1).
    Groups(&'a [i64]),
    /// Objects `a` and `b` of each pair are relevant to each other with gain `score`
    /// (pairs with `score ≤ 0` make nothing relevant). A repeated pair keeps its last score.
    Pairs {
        /// `(a, b)` object indices.
        pairs: &'a [(usize, usize)],
        /// One score per pair.
        scores: &'a [f32],
    },
}

/// [`Relevance`] with owned data, as a loss kind builds it for a batch or a data set.
#[derive(Debug, Clone, PartialEq)]
pub enum OwnedRelevance {
    /// See [`Relevance::Groups`].
    Groups(Vec<i64>),
    /// See [`Relevance::Pairs`].
    Pairs {
        /// `(a, b)` object indices.
        pairs: Vec<(usize, usize)>,
        /// One score per pair.
        scores: Vec<f32>,
    },
}

impl OwnedRelevance {
    /// The borrowed view the [`Evaluator`] takes.
    pub fn as_relevance(&self) -> Relevance<'_> {
        match self {
            OwnedRelevance::Groups(g) => Relevance::Groups(g),
            OwnedRelevance::Pairs { pairs, scores } => Relevance::Pairs { pairs, scores },
        }
    }
}

/// Relevant `(object, gain)` lists, built once per evaluation.
enum Lists {
    Groups {
        groups: Vec<i64>,
        members: HashMap<i64, Vec<usize>>,
    },
    Pairs(Vec<Vec<(usize, f32)>>),
}

impl Lists {
    fn relevant(&self, q: usize) -> Vec<(usize, f32)> {
        match self {
            Lists::Groups { groups, members } => members[&groups[q]]
                .iter()
                .filter(|&&j| j != q)
                .map(|&j| (j, 1.0))
                .collect(),
            Lists::Pairs(adj) => adj[q].iter().copied().filter(|&(j, _)| j != q).collect(),
        }
    }
}

impl Relevance<'_> {
    fn lists(&self, n: usize) -> Result<Lists> {
        match *self {
            Relevance::Groups(groups) => {
                if groups.len() != n {
                    return Err(Error::shape(
                        "Evaluator relevance",
                        format!("one group id per embedding row ({n})"),
                        groups.len(),
                    ));
                }
                let mut members: HashMap<i64, Vec<usize>> = HashMap::new();
                for (i, g) in groups.iter().enumerate() {
                    members.entry(*g).or_default().push(i);
                }
                Ok(Lists::Groups {
                    groups: groups.to_vec(),
                    members,
                })
            }
            Relevance::Pairs { pairs, scores } => {
                if pairs.len() != scores.len() {
                    return Err(Error::shape(
                        "Evaluator relevance",
                        format!("one score per pair ({} pairs)", pairs.len()),
                        scores.len(),
                    ));
                }
                let mut adj: Vec<Vec<(usize, f32)>> = vec![Vec::new(); n];
                for (p, (&(a, b), &s)) in pairs.iter().zip(scores).enumerate() {
                    if a >= n || b >= n {
                        return Err(Error::invalid(
                            format!("Evaluator relevance, pair {p}"),
                            format!("objects ({a}, {b}) out of range for {n} embeddings"),
                        ));
                    }
                    for (x, y) in [(a, b), (b, a)] {
                        match adj[x].iter_mut().find(|e| e.0 == y) {
                            Some(e) => e.1 = s,
                            None => adj[x].push((y, s)),
                        }
                    }
                }
                Ok(Lists::Pairs(adj))
            }
        }
    }

    /// The dense relevance matrix `(n, n)` (self entries 0): Quaterion's
    /// `prepare_labels`. `n × n`, so for small sets and tests only.
    pub fn dense(&self, n: usize) -> Result<Tensor> {
        let lists = self.lists(n)?;
        let mut m = vec![0f32; n * n];
        for q in 0..n {
            for (j, g) in lists.relevant(q) {
                m[q * n + j] = g.max(0.0);
            }
        }
        Ok(Tensor::from_vec(m, (n, n), &candle_core::Device::Cpu)?)
    }
}

/// Scores retrieval over a whole embedded dataset in blocks of query rows (see the module
/// docs for the memory bound).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluator {
    /// Distance used to rank candidates.
    pub distance: Distance,
    /// Byte budget of one block's `(b, n)` f32 distance matrix. Default 64 MiB.
    pub block_bytes: usize,
    /// Evaluate only this many queries, drawn at random without replacement (all when
    /// `None` or not smaller than `n`). They are still ranked against all `n` objects.
    pub sample_size: Option<usize>,
    /// Seed of the query sample.
    pub seed: u64,
}

impl Default for Evaluator {
    fn default() -> Self {
        Evaluator::new(Distance::default())
    }
}

impl Evaluator {
    /// Upper bound on the `(b, n)`-sized buffers alive at once while one block is computed.
    pub const BLOCK_BUFFERS: usize = 6;

    /// Default [`Evaluator::block_bytes`]: 64 MiB.
    pub const DEFAULT_BLOCK_BYTES: usize = 64 << 20;

    /// All queries, 64 MiB blocks.
    pub fn new(distance: Distance) -> Self {
        Evaluator {
            distance,
            block_bytes: Self::DEFAULT_BLOCK_BYTES,
            sample_size: None,
            seed: 0,
        }
    }

    /// Evaluates a seeded random sample of `sample_size` queries.
    pub fn with_sample(mut self, sample_size: usize, seed: u64) -> Self {
        self.sample_size = Some(sample_size);
        self.seed = seed;
        self
    }

    /// Query rows per block for `n` candidates: `clamp(block_bytes / (4 n), 1, n)`.
    pub fn block_rows(&self, n: usize) -> usize {
        (self.block_bytes / (4 * n.max(1))).clamp(1, n.max(1))
    }

    /// Bound on the extra bytes the block buffers take for `n` objects:
    /// `BLOCK_BUFFERS · block_rows(n) · n · 4`.
    pub fn peak_block_bytes(&self, n: usize) -> usize {
        Self::BLOCK_BUFFERS * self.block_rows(n) * n * 4
    }

    /// The query rows evaluated for `n` objects, ascending.
    pub fn queries(&self, n: usize) -> Vec<usize> {
        match self.sample_size {
            Some(s) if s < n => {
                let mut rng = StdRng::seed_from_u64(self.seed);
                let mut q = rand::seq::index::sample(&mut rng, n, s).into_vec();
                q.sort_unstable();
                q
            }
            _ => (0..n).collect(),
        }
    }

    /// Every metric of `metrics` over `embeddings: (n, d)` with `relevance`, as
    /// `(name, value)` in the order given. Errors on shape mismatches, invalid options
    /// (e.g. `k = 0`, `k > n`), or a metric that no query could score.
    pub fn evaluate(
        &self,
        embeddings: &Tensor,
        relevance: &Relevance<'_>,
        metrics: &[&dyn Metric],
    ) -> Result<Vec<(String, f64)>> {
        if embeddings.rank() != 2 {
            return Err(Error::shape(
                "Evaluator embeddings",
                "(n, d)",
                embeddings.dims(),
            ));
        }
        let n = embeddings.dim(0)?;
        if n == 0 {
            return Err(Error::invalid(
                "Evaluator embeddings",
                "no embeddings to evaluate",
            ));
        }
        if self.block_bytes == 0 {
            return Err(Error::invalid(
                "Evaluator.block_bytes",
                "must be at least 1",
            ));
        }
        for m in metrics {
            m.check(n)?;
        }
        let lists = relevance.lists(n)?;
        let queries = self.queries(n);
        let mut totals = vec![Partial::default(); metrics.len()];
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
        for block in queries.chunks(self.block_rows(n)) {
            let ids: Vec<u32> = block.iter().map(|&q| q as u32).collect();
            let idx = Tensor::new(ids.as_slice(), embeddings.device())?;
            let d = {
                let q = embeddings.index_select(&idx, 0)?;
                self.distance
                    .distance_matrix(&q, Some(embeddings))?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
            };
            let per = block.len().div_ceil(threads);
            let parts: Vec<Vec<Partial>> = std::thread::scope(|s| {
                let handles: Vec<_> = block
                    .chunks(per)
                    .zip(d.chunks(per * n))
                    .map(|(qs, rows)| {
                        let lists = &lists;
                        s.spawn(move || {
                            let mut acc = vec![Partial::default(); metrics.len()];
                            let mut row = vec![0f32; n];
                            for (&q, dist) in qs.iter().zip(rows.chunks(n)) {
                                row.copy_from_slice(dist);
                                row[q] = f32::INFINITY;
                                let ranked = RankedRow::from_relevant(&row, lists.relevant(q));
                                for (a, m) in acc.iter_mut().zip(metrics) {
                                    *a += m.row(&ranked);
                                }
                            }
                            acc
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("a ranking thread panicked"))
                    .collect()
            });
            for part in parts {
                for (t, p) in totals.iter_mut().zip(part) {
                    *t += p;
                }
            }
        }
        metrics
            .iter()
            .zip(totals)
            .map(|(m, t)| Ok((m.name(), finish(*m, t)?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metric::{MapAtR, RecallAtK, RetrievalPrecision, RetrievalRPrecision};
    use candle_core::Device;

    fn points(n: usize, dim: usize, groups: usize) -> (Tensor, Vec<i64>) {
        // Group g sits near g · e_0 with a small deterministic wobble.
        let mut v = Vec::with_capacity(n * dim);
        for i in 0..n {
            for c in 0..dim {
                let base = if c == 0 { (i % groups) as f32 } else { 0.0 };
                v.push(base + ((i * 31 + c * 17) % 97) as f32 * 1e-3);
            }
        }
        let t = Tensor::from_vec(v, (n, dim), &Device::Cpu).unwrap();
        (t, (0..n).map(|i| (i % groups) as i64).collect())
    }

    #[test]
    fn blocks_agree_with_the_dense_matrix() {
        let (x, groups) = points(50, 3, 7);
        // Noise bigger than the group spacing, so the scores are not trivial.
        let noise = Tensor::from_vec(
            (0..150)
                .map(|i| ((i * 7919) % 101) as f32 / 40.0)
                .collect::<Vec<_>>(),
            (50, 3),
            &Device::Cpu,
        )
        .unwrap();
        let x = (x + noise).unwrap();
        let rel = Relevance::Groups(&groups);
        let dense = rel.dense(50).unwrap();
        let dm = Distance::Euclidean.distance_matrix(&x, None).unwrap();
        let masked = dm
            .broadcast_add(&(Tensor::eye(50, DType::F32, &Device::Cpu).unwrap() * 1e9).unwrap())
            .unwrap();
        let metrics: [&dyn Metric; 3] =
            [&RetrievalPrecision { k: 3 }, &RetrievalRPrecision, &MapAtR];
        let tiny = Evaluator {
            block_bytes: 4 * 50 * 7, // 7 rows per block
            ..Evaluator::new(Distance::Euclidean)
        };
        assert_eq!(tiny.block_rows(50), 7);
        let got = tiny.evaluate(&x, &rel, &metrics).unwrap();
        for ((name, v), m) in got.iter().zip(metrics) {
            let want = m.compute(&masked, &dense).unwrap();
            assert!((v - want).abs() < 1e-12, "{name}: {v} vs {want}");
            assert!(*v > 0.0 && *v < 1.0, "{name} = {v}");
        }
    }

    #[test]
    fn sampled_hundred_thousand_items_stay_within_the_block_bound() {
        let n = 100_000;
        let (x, groups) = points(n, 4, 1000);
        let ev = Evaluator::new(Distance::Euclidean).with_sample(200, 7);
        // By construction: one block's matrix fits the budget, and all block buffers
        // together stay far below 1 GiB.
        assert!(ev.block_rows(n) * n * 4 <= ev.block_bytes);
        assert!(ev.peak_block_bytes(n) < 1 << 30);
        assert_eq!(ev.queries(n).len(), 200);
        assert_eq!(ev.queries(n), ev.queries(n));
        let got = ev
            .evaluate(&x, &Relevance::Groups(&groups), &[&RecallAtK { k: 99 }])
            .unwrap();
        // Groups are 1 apart with wobble below 0.1: every neighbour is in the group.
        assert_eq!(got, vec![("recall@99".to_string(), 1.0)]);
    }

    #[test]
    fn pairs_self_masked_and_checked() {
        // Objects 0..4 on a line; pairs (0, 1) and (2, 3) positive, (0, 3) negative.
        let x = Tensor::new(&[[0.0f32], [0.1], [5.0], [5.2]], &Device::Cpu).unwrap();
        let pairs = [(0, 1), (2, 3), (0, 3)];
        let rel = Relevance::Pairs {
            pairs: &pairs,
            scores: &[1.0, 1.0, 0.0],
        };
        let ev = Evaluator::new(Distance::Euclidean);
        let got = ev
            .evaluate(&x, &rel, &[&RetrievalPrecision { k: 1 }])
            .unwrap();
        assert_eq!(got[0].1, 1.0);
        let bad = Relevance::Pairs {
            pairs: &[(0, 9)],
            scores: &[1.0],
        };
        let e = ev
            .evaluate(&x, &bad, &[&RetrievalPrecision { k: 1 }])
            .unwrap_err()
            .to_string();
        assert!(e.contains("(0, 9)") && e.contains("4 embeddings"), "{e}");
        let e = ev
            .evaluate(&x, &rel, &[&RetrievalPrecision { k: 0 }])
            .unwrap_err()
            .to_string();
        assert!(e.contains("k = 0"), "{e}");
    }
}
