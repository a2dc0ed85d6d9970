//! Scoring a whole embedded dataset, block by block: the one retrieval implementation
//! behind `Trainer::fit`, `Trainer::evaluate` and [`LossKind::evaluate`].
//!
//! What is relevant, and what is ranked, comes from [`Relevance`]:
//! * [`Relevance::Groups`]: every object queries all `n` objects; the other members of
//!   its group are relevant (gain 1).
//! * [`Relevance::Pairs`]: every object queries all `n` objects; its pair partners are
//!   relevant, the pair score as gain (Quaterion's `PairSampler`).
//! * [`Relevance::QueryCandidate`]: the first object of each pair is a query, ranked
//!   against the second objects of all pairs only (a question against the answers:
//!   Quaterion's `PairSampler(distinguish=True)`); what the pair loss kind uses.
//!
//! The query itself is always masked (distance `+∞`, irrelevant), as Quaterion's
//! `precompute` does with its `max + 1` diagonal. An object with nothing relevant (a
//! singleton group, an object only in negative pairs) is not a query: it could only count
//! as a miss. The queries are those objects (or a seeded random sample of `s` of them).
//!
//! Distances are computed for `b` query rows at a time against the `m` candidates,
//! `(b, m)`, with `b = clamp(block_bytes / (4 m), 1, m)`, so a block's f32 distance matrix
//! takes at most `b × m × 4 ≤ block_bytes` bytes (or one row, `4 m`, when a row alone
//! exceeds it). A
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
//! (with `m` for `n` where the candidates are a subset) and never an `n × n` matrix. With
//! the default 64 MiB blocks, 100,000 × 64 embeddings evaluate in a few hundred MiB.
//! Ranking is done on the host, rows split across threads.
//!
//! **Difference from Quaterion's samplers.** Quaterion's `GroupSampler` masks entry
//! `[i, i]` of the *sampled* `(s, n)` matrix, which is not the query's own column, so the
//! query's zero self-distance stays in and retrieves itself (an irrelevant hit), deflating
//! every score; here the query's own column is always masked. Its `RetrievalPrecision`
//! also counts every object with nothing relevant as a query that missed, which deflates
//! it further; here those objects are not queries (other metrics skip them in both).
//!
//! [`LossKind::evaluate`]: crate::loss::LossKind::evaluate

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::ranking::{Metric, Partial, RankedRow};
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
    /// Pair `(q, c)` makes object `c` a candidate, relevant to query `q` with gain `score`
    /// when `score > 0`. The queries are the `q` of those pairs; each is ranked against
    /// the `c` of all pairs (whatever their score), never against other queries. A
    /// repeated pair keeps its last score.
    QueryCandidate {
        /// `(query, candidate)` object indices.
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
    /// See [`Relevance::QueryCandidate`].
    QueryCandidate {
        /// `(query, candidate)` object indices.
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
            OwnedRelevance::QueryCandidate { pairs, scores } => {
                Relevance::QueryCandidate { pairs, scores }
            }
        }
    }
}

/// Who is ranked against whom, built once per evaluation: the candidate rows, and each
/// object's relevant candidates as `(column, gain)` (column `j` is candidate `j`).
struct Plan {
    /// The candidates' rows, `None` for all `n` objects (column `j` is object `j`).
    candidates: Option<Vec<usize>>,
    /// The column of each object among the candidates, where it is one.
    column: Vec<Option<usize>>,
    lists: Lists,
}

enum Lists {
    Groups {
        groups: Vec<i64>,
        members: HashMap<i64, Vec<usize>>,
    },
    /// Relevant `(column, gain)` of each object, repeated pairs keeping the last gain.
    Adjacent(Vec<Vec<(usize, f32)>>),
}

impl Plan {
    /// Number of candidates `m`.
    fn candidate_count(&self, n: usize) -> usize {
        self.candidates.as_ref().map_or(n, Vec::len)
    }

    /// The relevant candidates of query `q` (never `q` itself), gains `> 0`.
    fn relevant(&self, q: usize) -> Vec<(usize, f32)> {
        let own = self.column[q];
        match &self.lists {
            Lists::Groups { groups, members } => members[&groups[q]]
                .iter()
                .filter(|&&j| j != q)
                .map(|&j| (j, 1.0))
                .collect(),
            Lists::Adjacent(adj) => adj[q]
                .iter()
                .copied()
                .filter(|&(j, g)| Some(j) != own && g > 0.0)
                .collect(),
        }
    }

    /// The objects that have something relevant: the queries, ascending.
    fn queries(&self, n: usize) -> Vec<usize> {
        (0..n)
            .filter(|&q| match &self.lists {
                Lists::Groups { groups, members } => members[&groups[q]].len() > 1,
                Lists::Adjacent(adj) => adj[q]
                    .iter()
                    .any(|&(j, g)| Some(j) != self.column[q] && g > 0.0),
            })
            .collect()
    }
}

/// `adj[x]` gets `(y, score)`, or its entry for `y` the new score.
fn link(adj: &mut [Vec<(usize, f32)>], x: usize, y: usize, score: f32) {
    match adj[x].iter_mut().find(|e| e.0 == y) {
        Some(e) => e.1 = score,
        None => adj[x].push((y, score)),
    }
}

impl Relevance<'_> {
    fn check_pairs(pairs: &[(usize, usize)], scores: &[f32], n: usize) -> Result<()> {
        if pairs.len() != scores.len() {
            return Err(Error::shape(
                "Evaluator relevance",
                format!("one score per pair ({} pairs)", pairs.len()),
                scores.len(),
            ));
        }
        if let Some((p, &(a, b))) = pairs
            .iter()
            .enumerate()
            .find(|(_, (a, b))| *a >= n || *b >= n)
        {
            return Err(Error::invalid(
                format!("Evaluator relevance, pair {p}"),
                format!("objects ({a}, {b}) out of range for {n} embeddings"),
            ));
        }
        Ok(())
    }

    fn plan(&self, n: usize) -> Result<Plan> {
        let all = || (0..n).map(Some).collect();
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
                Ok(Plan {
                    candidates: None,
                    column: all(),
                    lists: Lists::Groups {
                        groups: groups.to_vec(),
                        members,
                    },
                })
            }
            Relevance::Pairs { pairs, scores } => {
                Self::check_pairs(pairs, scores, n)?;
                let mut adj: Vec<Vec<(usize, f32)>> = vec![Vec::new(); n];
                for (&(a, b), &s) in pairs.iter().zip(scores) {
                    link(&mut adj, a, b, s);
                    link(&mut adj, b, a, s);
                }
                Ok(Plan {
                    candidates: None,
                    column: all(),
                    lists: Lists::Adjacent(adj),
                })
            }
            Relevance::QueryCandidate { pairs, scores } => {
                Self::check_pairs(pairs, scores, n)?;
                let mut candidates: Vec<usize> = pairs.iter().map(|&(_, c)| c).collect();
                candidates.sort_unstable();
                candidates.dedup();
                let mut column = vec![None; n];
                for (j, &c) in candidates.iter().enumerate() {
                    column[c] = Some(j);
                }
                let mut adj: Vec<Vec<(usize, f32)>> = vec![Vec::new(); n];
                for (&(q, c), &s) in pairs.iter().zip(scores) {
                    link(
                        &mut adj,
                        q,
                        column[c].expect("every candidate has a column"),
                        s,
                    );
                }
                Ok(Plan {
                    candidates: Some(candidates),
                    column,
                    lists: Lists::Adjacent(adj),
                })
            }
        }
    }

    /// The dense relevance matrix `(n, n)`: entry `[q, j]` is object `j`'s gain for
    /// query `q` (0 when irrelevant, and on the diagonal): Quaterion's `prepare_labels`.
    /// `n × n`, so for small sets and tests only.
    pub fn dense(&self, n: usize) -> Result<Tensor> {
        let plan = self.plan(n)?;
        let object = |j: usize| plan.candidates.as_ref().map_or(j, |c| c[j]);
        let mut m = vec![0f32; n * n];
        for q in 0..n {
            for (j, g) in plan.relevant(q) {
                m[q * n + object(j)] = g;
            }
        }
        Ok(Tensor::from_vec(m, (n, n), &candle_core::Device::Cpu)?)
    }
}

/// `(name, value)` of each metric, `None` for one that no query could score.
type Scores = Vec<(String, Option<f64>)>;

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

    /// Query rows per block for `m` candidates: `clamp(block_bytes / (4 m), 1, m)`.
    pub fn block_rows(&self, m: usize) -> usize {
        (self.block_bytes / (4 * m.max(1))).clamp(1, m.max(1))
    }

    /// Bound on the extra bytes the block buffers take for `m` candidates:
    /// `BLOCK_BUFFERS · block_rows(m) · m · 4`.
    pub fn peak_block_bytes(&self, m: usize) -> usize {
        Self::BLOCK_BUFFERS * self.block_rows(m) * m * 4
    }

    /// Which of `n` queries are evaluated, as positions `0..n`, ascending: all of them, or
    /// the seeded sample of [`sample_size`](Self::sample_size).
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
    /// (e.g. `k = 0`, `k` above the number of candidates), or when no object has anything
    /// relevant.
    pub fn evaluate(
        &self,
        embeddings: &Tensor,
        relevance: &Relevance<'_>,
        metrics: &[&dyn Metric],
    ) -> Result<Vec<(String, f64)>> {
        self.evaluate_shared(
            embeddings,
            relevance,
            metrics,
            &crate::distributed::SingleProcess,
        )
    }

    /// [`evaluate`](Self::evaluate) shared out over the ranks of `comm`, each of which
    /// holds the same `embeddings`: rank `r` ranks a contiguous share of the queries, and
    /// the metrics' running sums are all-reduced (in f64), so every rank returns the
    /// values of the whole set. Collective: every rank calls it with the same arguments.
    pub fn evaluate_shared(
        &self,
        embeddings: &Tensor,
        relevance: &Relevance<'_>,
        metrics: &[&dyn Metric],
        comm: &dyn crate::distributed::Communicator,
    ) -> Result<Vec<(String, f64)>> {
        let (queries, values) = self.run(embeddings, relevance, metrics, comm)?;
        if queries == 0 {
            return Err(Error::invalid(
                "Evaluator relevance",
                "no object has a relevant candidate (every group has one member, or no pair is positive)",
            ));
        }
        values
            .into_iter()
            .zip(metrics)
            .map(|((name, value), metric)| match value {
                Some(v) => Ok((name, v)),
                None => Err(Error::invalid(
                    metric.name(),
                    "no query row could be scored: no query has a relevant candidate",
                )),
            })
            .collect()
    }

    /// As [`evaluate`](Self::evaluate), but a metric that no query could score (a
    /// training batch without a positive pair, or without two members of one group) is
    /// `None` instead of an error.
    pub fn scores(
        &self,
        embeddings: &Tensor,
        relevance: &Relevance<'_>,
        metrics: &[&dyn Metric],
    ) -> Result<Vec<(String, Option<f64>)>> {
        Ok(self
            .run(
                embeddings,
                relevance,
                metrics,
                &crate::distributed::SingleProcess,
            )?
            .1)
    }

    /// The number of queries and every metric's value (`None` where none was scored).
    fn run(
        &self,
        embeddings: &Tensor,
        relevance: &Relevance<'_>,
        metrics: &[&dyn Metric],
        comm: &dyn crate::distributed::Communicator,
    ) -> Result<(usize, Scores)> {
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
        let plan = relevance.plan(n)?;
        let m = plan.candidate_count(n);
        for metric in metrics {
            metric.check(m)?;
        }
        let eligible = plan.queries(n);
        let queries: Vec<usize> = self
            .queries(eligible.len())
            .into_iter()
            .map(|i| eligible[i])
            .collect();
        let candidates = match &plan.candidates {
            None => embeddings.clone(),
            Some(rows) => {
                let ids: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
                embeddings.index_select(&Tensor::new(ids.as_slice(), embeddings.device())?, 0)?
            }
        };
        let all_queries = queries.len();
        let world = comm.world_size();
        let queries = &queries[crate::distributed::shard(all_queries, world, comm.rank())];
        let mut totals = vec![Partial::default(); metrics.len()];
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
        for block in queries.chunks(self.block_rows(m)) {
            let ids: Vec<u32> = block.iter().map(|&q| q as u32).collect();
            let idx = Tensor::new(ids.as_slice(), embeddings.device())?;
            let d = {
                let q = embeddings.index_select(&idx, 0)?;
                self.distance
                    .distance_matrix(&q, Some(&candidates))?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
            };
            let per = block.len().div_ceil(threads);
            let parts: Vec<Vec<Partial>> = std::thread::scope(|s| {
                let handles: Vec<_> = block
                    .chunks(per)
                    .zip(d.chunks(per * m))
                    .map(|(qs, rows)| {
                        let plan = &plan;
                        s.spawn(move || {
                            let mut acc = vec![Partial::default(); metrics.len()];
                            let mut row = vec![0f32; m];
                            for (&q, dist) in qs.iter().zip(rows.chunks(m)) {
                                row.copy_from_slice(dist);
                                if let Some(own) = plan.column[q] {
                                    row[own] = f32::INFINITY;
                                }
                                let ranked = RankedRow::from_relevant(&row, plan.relevant(q));
                                for (a, metric) in acc.iter_mut().zip(metrics) {
                                    *a += metric.row(&ranked);
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
        if world > 1 {
            let mut flat: Vec<f64> = totals.iter().flat_map(|t| [t.sum, t.count]).collect();
            comm.all_reduce_sum_f64(&mut flat)?;
            for (t, s) in totals.iter_mut().zip(flat.chunks(2)) {
                *t = Partial::new(s[0], s[1]);
            }
        }
        let values = metrics
            .iter()
            .zip(totals)
            .map(|(metric, t)| (metric.name(), t.value()))
            .collect();
        Ok((all_queries, values))
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
    fn query_candidate_ranks_queries_against_candidates_only() {
        // Questions 0..3 and their answers 3..6 on a line; question 1 sits on answer 3 of
        // question 0, and question 2's pair is negative, so it is not a query.
        let x = Tensor::new(
            &[[0.0f32], [1.0], [2.0], [1.05], [5.0], [9.0]],
            &Device::Cpu,
        )
        .unwrap();
        let pairs = [(0, 3), (1, 4), (2, 5)];
        let rel = Relevance::QueryCandidate {
            pairs: &pairs,
            scores: &[1.0, 1.0, 0.0],
        };
        let ev = Evaluator::new(Distance::Euclidean);
        let got = ev
            .evaluate(
                &x,
                &rel,
                &[
                    &RetrievalPrecision { k: 1 },
                    &crate::metric::MeanReciprocalRank,
                ],
            )
            .unwrap();
        // Query 0: answer 3 is nearest (a hit; question 1, nearer, is not a candidate).
        // Query 1: answer 3 (0.05 away) before its own answer 4: rank 1.
        assert_eq!(got[0], ("precision@1".to_string(), 0.5));
        assert_eq!(got[1], ("mrr".to_string(), (1.0 + 0.5) / 2.0));
        // The relevance holds the query → candidate direction only.
        let dense = rel.dense(6).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!((dense[0][3], dense[3][0], dense[2][5]), (1.0, 0.0, 0.0));
    }

    #[test]
    fn objects_with_nothing_relevant_are_not_queries() {
        // Group 9 has one member (object 4): it is left out, not counted as a miss.
        let x = Tensor::new(&[[0.0f32], [0.1], [5.0], [5.1], [0.05]], &Device::Cpu).unwrap();
        let ev = Evaluator::new(Distance::Euclidean);
        let got = ev
            .evaluate(
                &x,
                &Relevance::Groups(&[7, 7, 8, 8, 9]),
                &[&RetrievalPrecision { k: 1 }],
            )
            .unwrap();
        // Object 0's nearest is the singleton 4: a miss; 1 → 4 miss too; 2, 3 hit.
        assert_eq!(got[0].1, 0.5);
        let e = ev
            .evaluate(
                &x,
                &Relevance::Groups(&[1, 2, 3, 4, 5]),
                &[&RetrievalPrecision { k: 1 }],
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("no object has a relevant candidate"), "{e}");
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
