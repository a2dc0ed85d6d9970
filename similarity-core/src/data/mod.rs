//! Training data: samples, their targets, and the loader that batches them.
//!
//! A *sample* holds one or more *objects* (records an encoder can embed) and the targets
//! that relate them. A [`SimilarityPairSample`] holds `obj_a`, `obj_b`, a `score` in
//! `[0, 1]` and a `subgroup`; a [`SimilarityGroupSample`] holds one `obj` and its `group`
//! (a class id: objects of one group are similar). A batch of `N` group samples embeds
//! `N` objects and the loss receives [`GroupTargets`]: `groups: (N)`.
//!
//! Batches are laid out as Quaterion's `PairsSimilarityDataLoader` lays them out: for a
//! batch of `P` pairs the model embeds `2P` objects, first every `obj_a`, then every
//! `obj_b` (*slot-major* order), and the loss receives [`PairTargets`]:
//! `pairs: (P, 2)` with `pairs[i] = [i, i + P]`, `labels: (P)` (the scores) and
//! `subgroups: (2P)` (each pair's subgroup, repeated for `a` and `b`).
//!
//! A sample's targets are copied out once into a small [`SimilaritySample::Meta`] value,
//! so that a cached epoch builds targets without touching user records.
//!
//! Which samples form a training batch is decided by a [`DataLoader`] (uniform shuffle)
//! or, for group samples, a [`ClassBalancedSampler`] (`P` classes × `m` items per batch,
//! using [`SimilaritySample::class`]); [`Sampler`] picks one in the trainer's config.

mod loader;
mod sampler;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

pub use loader::DataLoader;
pub use sampler::{ClassBalancedSampler, Sampler};

use crate::error::{Error, Result};

/// A training sample: objects for the encoders plus the targets that relate them.
pub trait SimilaritySample: Send + Sync {
    /// The record type of each object.
    type Record;
    /// The targets of one sample, copied out of it (cheap, `Copy`).
    type Meta: Copy + Send + Sync + std::fmt::Debug;
    /// The targets of a batch, as the loss consumes them.
    type Targets;
    /// Objects per sample (2 for pairs).
    const OBJECTS: usize;

    /// Object `slot` (`0..OBJECTS`).
    fn object(&self, slot: usize) -> &Self::Record;

    /// The sample's targets. An error names what is invalid (e.g. a score outside
    /// `[0, 1]`).
    fn meta(&self) -> Result<Self::Meta>;

    /// The targets of a batch of samples whose objects are laid out slot-major.
    fn targets(batch: &[Self::Meta], device: &Device) -> Result<Self::Targets>;

    /// The sample's class, for class-balanced sampling: the group of a group sample,
    /// `None` for samples without one (pairs).
    fn class(_meta: &Self::Meta) -> Option<i64> {
        None
    }

    /// Moves the sample's objects into `out`, in slot order (`OBJECTS` records); used to
    /// keep the records of a streamed dataset without cloning them.
    fn into_objects(self, out: &mut Vec<Self::Record>)
    where
        Self: Sized;
}

/// Two objects and how similar they are (Quaterion's `SimilarityPairSample`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimilarityPairSample<R> {
    /// The first object (e.g. a question).
    pub obj_a: R,
    /// The second object (e.g. its answer).
    pub obj_b: R,
    /// Similarity in `[0, 1]`; `1` for a positive pair.
    pub score: f32,
    /// Pairs of one subgroup are not used as each other's negatives by losses that mine
    /// negatives across pairs. Default 0.
    pub subgroup: i64,
}

impl<R> SimilarityPairSample<R> {
    /// A positive pair (`score = 1`) in subgroup 0.
    pub fn positive(obj_a: R, obj_b: R) -> Self {
        SimilarityPairSample {
            obj_a,
            obj_b,
            score: 1.0,
            subgroup: 0,
        }
    }
}

/// The targets of one pair sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairMeta {
    /// The pair's score.
    pub score: f32,
    /// The pair's subgroup.
    pub subgroup: i64,
}

/// The targets of a batch of `P` pairs whose `2P` embeddings are `[a₀..a_P, b₀..b_P]`.
#[derive(Debug, Clone)]
pub struct PairTargets {
    /// `(P, 2)`, `u32`: `pairs[i] = [i, i + P]`.
    pub pairs: Tensor,
    /// `(P)`, `f32`: the scores.
    pub labels: Tensor,
    /// `(2P)`, `i64`: the subgroup of every embedding.
    pub subgroups: Tensor,
}

impl<R: Send + Sync> SimilaritySample for SimilarityPairSample<R> {
    type Record = R;
    type Meta = PairMeta;
    type Targets = PairTargets;
    const OBJECTS: usize = 2;

    fn object(&self, slot: usize) -> &R {
        if slot == 0 { &self.obj_a } else { &self.obj_b }
    }

    fn into_objects(self, out: &mut Vec<R>) {
        out.push(self.obj_a);
        out.push(self.obj_b);
    }

    fn meta(&self) -> Result<PairMeta> {
        if !(0.0..=1.0).contains(&self.score) {
            return Err(Error::invalid(
                "SimilarityPairSample.score",
                format!("must be in [0, 1], got {}", self.score),
            ));
        }
        Ok(PairMeta {
            score: self.score,
            subgroup: self.subgroup,
        })
    }

    fn targets(batch: &[PairMeta], device: &Device) -> Result<PairTargets> {
        let p = batch.len();
        let pairs: Vec<u32> = (0..p as u32).flat_map(|i| [i, i + p as u32]).collect();
        let labels: Vec<f32> = batch.iter().map(|m| m.score).collect();
        let subgroups: Vec<i64> = batch.iter().chain(batch).map(|m| m.subgroup).collect();
        Ok(PairTargets {
            pairs: Tensor::from_vec(pairs, (p, 2), device)?,
            labels: Tensor::from_vec(labels, p, device)?,
            subgroups: Tensor::from_vec(subgroups, 2 * p, device)?,
        })
    }
}

/// One object and its group (Quaterion's `SimilarityGroupSample`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimilarityGroupSample<R> {
    /// The object.
    pub obj: R,
    /// Its group (class) id; objects of one group are similar.
    pub group: i64,
}

impl<R> SimilarityGroupSample<R> {
    /// `obj` in `group`.
    pub fn new(obj: R, group: i64) -> Self {
        SimilarityGroupSample { obj, group }
    }
}

/// The target of one group sample: its group id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GroupMeta {
    /// The group id.
    pub group: i64,
}

/// The targets of a batch of `N` group samples.
#[derive(Debug, Clone)]
pub struct GroupTargets {
    /// `(N)`, `i64`: the group of every embedding.
    pub groups: Tensor,
}

impl<R: Send + Sync> SimilaritySample for SimilarityGroupSample<R> {
    type Record = R;
    type Meta = GroupMeta;
    type Targets = GroupTargets;
    const OBJECTS: usize = 1;

    fn object(&self, _slot: usize) -> &R {
        &self.obj
    }

    fn into_objects(self, out: &mut Vec<R>) {
        out.push(self.obj);
    }

    fn class(meta: &GroupMeta) -> Option<i64> {
        Some(meta.group)
    }

    fn meta(&self) -> Result<GroupMeta> {
        Ok(GroupMeta { group: self.group })
    }

    fn targets(batch: &[GroupMeta], device: &Device) -> Result<GroupTargets> {
        let groups: Vec<i64> = batch.iter().map(|m| m.group).collect();
        Ok(GroupTargets {
            groups: Tensor::from_vec(groups, batch.len(), device)?,
        })
    }
}

/// Reads every sample's [`Meta`](SimilaritySample::Meta); an error names the sample.
pub fn metas<S: SimilaritySample>(samples: &[S]) -> Result<Vec<S::Meta>> {
    samples
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.meta().map_err(|e| match e {
                Error::InvalidInput { location, message } => {
                    Error::invalid(format!("sample {i}, {location}"), message)
                }
                other => other,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_targets_follow_quaterion_layout() {
        let metas = [
            PairMeta {
                score: 1.0,
                subgroup: 3,
            },
            PairMeta {
                score: 0.0,
                subgroup: 5,
            },
        ];
        let t = SimilarityPairSample::<String>::targets(&metas, &Device::Cpu).unwrap();
        assert_eq!(
            t.pairs.to_vec2::<u32>().unwrap(),
            vec![vec![0, 2], vec![1, 3]]
        );
        assert_eq!(t.labels.to_vec1::<f32>().unwrap(), vec![1.0, 0.0]);
        assert_eq!(t.subgroups.to_vec1::<i64>().unwrap(), vec![3, 5, 3, 5]);
    }

    #[test]
    fn bad_score_names_the_sample() {
        let s = vec![
            SimilarityPairSample::positive("a".to_string(), "b".to_string()),
            SimilarityPairSample {
                score: 1.5,
                ..SimilarityPairSample::positive("c".into(), "d".into())
            },
        ];
        let e = metas(&s).unwrap_err().to_string();
        assert!(
            e.contains("sample 1") && e.contains("score") && e.contains("1.5"),
            "{e}"
        );
    }
}
