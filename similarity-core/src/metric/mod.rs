//! Retrieval metrics.
//!
//! Shapes: a query block is a distance matrix `distances: (n, m)` (row `i` holds query
//! `i`'s distance to each of `m` candidates; smaller is nearer) and a relevance matrix
//! `relevance: (n, m)` of the same shape (`> 0` relevant, the value being its gain: 1 for
//! groups, the pair score for pairs), as Quaterion's `raw_compute` takes them.
//!
//! | metric                      | name            | per query row (R relevant, `rank_p` 0-based) | over rows      |
//! |-----------------------------|-----------------|----------------------------------------------|----------------|
//! | [`RetrievalPrecision`]`{k}` | `precision@k`   | `Σ_{top k} rel / k`                          | mean           |
//! | [`RecallAtK`]`{k}`          | `recall@k`      | `|relevant ∩ top k| / R`                     | mean, `R ≥ 1`  |
//! | [`RPrecision`]              | `r_precision`   | `r / R`, `r = |relevant ∩ top R|`            | mean, `R ≥ 1`  |
//! | [`RetrievalRPrecision`]     | `retrieval_r_precision` | `r`, over `R` (Quaterion 0.1.35)     | `Σ r / Σ R`    |
//! | [`MapAtR`]                  | `map@r`         | `(1/R) Σ_{rank_p < R} (p + 1)/(rank_p + 1)`  | mean, `R ≥ 1`  |
//! | [`Ndcg`]`{k}`               | `ndcg@k`        | `DCG@k / IDCG@k`, discount `1/log2(pos + 2)` | mean, `R ≥ 1`  |
//! | [`MeanReciprocalRank`]      | `mrr`           | `1/(rank_0 + 1)` (first relevant)            | mean, `R ≥ 1`  |
//! | [`RetrievalReciprocalRank`] | `retrieval_reciprocal_rank` | `Σ_p 1/(rank_p + 1)` (Quaterion 0.1.35, every relevant) | `/ Σ R` |
//!
//! The name is what [`Metric::name`] returns, what `Evaluation::metric` and early stopping
//! look a value up by, and the column in the logs (training-batch values get a `train_`
//! prefix). The `retrieval_` names are Quaterion's pooled forms, kept for parity; the
//! others are the standard definitions.
//!
//! Candidates are ranked by `(distance, index)`; see [`RankedRow`] for the exact tie
//! rule. The raw functions ([`retrieval_precision`], [`retrieval_reciprocal_rank`],
//! [`retrieval_r_precision`], [`recall_at_k`], [`map_at_r`], [`ndcg_at_k`], …) score a
//! dense block; the [`Metric`] structs are what users attach, scored on a dense block with
//! [`Metric::compute`] or over a whole embedded dataset with [`Evaluator`], which computes
//! distances a block of query rows at a time (never `n × n`) with the query itself masked,
//! for groups ([`Relevance::Groups`]) and pairs ([`Relevance::Pairs`],
//! [`Relevance::QueryCandidate`]).
//!
//! **What `fit` and `evaluate` report.** One implementation: the [`Evaluator`] over the
//! whole validation set, with the loss kind's relevance and metrics
//! ([`LossKind`](crate::loss::LossKind)) followed by the attached ones (`#[metric]` fields
//! and `Trainer::with_metrics`; one with the name of a kind's metric is that metric, so it
//! is reported once). Pair data: every positive pair's first object is a query ranked
//! against the second objects of all pairs (a question against all answers), so
//! `precision@1` is the fraction of questions whose own answer is the nearest and `mrr`
//! the mean of `1/(rank + 1)` (one relevant answer each: standard and Quaterion's forms
//! agree). Group data: every object with another member in its group queries all the
//! others; `precision@1` and `r_precision`. Attached metrics are also computed within
//! every training batch, as `train_<name>`.
//!
//! Distances: our cosine distance is `1 − cos`, Quaterion's matrix form `(1 − cos) / 2`.
//! The ranking is the same, so every metric here (all rank-based) agrees.

mod evaluator;
mod map_at_r;
mod ndcg;
mod precision;
mod prefixes;
mod r_precision;
mod ranking;
mod recall;
mod reciprocal_rank;

pub use evaluator::{Evaluator, OwnedRelevance, Relevance};
pub use map_at_r::{MapAtR, map_at_r};
pub use ndcg::{Ndcg, ndcg_at_k};
pub use precision::{RetrievalPrecision, retrieval_precision};
pub use prefixes::PrefixScores;
pub use r_precision::{
    RPrecision, RetrievalRPrecision, r_precision_per_row, retrieval_r_precision,
};
pub use ranking::{Metric, Partial, RankedRow, ranked_rows};
pub use recall::{RecallAtK, recall_at_k};
pub use reciprocal_rank::{
    MeanReciprocalRank, RetrievalReciprocalRank, mean_reciprocal_rank, retrieval_reciprocal_rank,
};
