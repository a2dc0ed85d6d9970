//! Class-balanced batches for group losses (P×M sampling): see [`ClassBalancedSampler`].

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How the trainer forms training batches (`TrainerConfig.sampler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampler {
    /// Shuffle all samples every epoch and cut them into batches
    /// ([`DataLoader`](super::DataLoader)); honours `drop_last`.
    #[default]
    Shuffle,
    /// `batch_size / m` classes with `m` items each per batch
    /// ([`ClassBalancedSampler`]); needs samples with a class (group samples).
    ClassBalanced {
        /// Items per class in a batch (at least 1; `batch_size` must be a multiple).
        m: usize,
    },
}

/// Builds class-balanced batches for group losses (P×M sampling).
///
/// Group losses (triplet, multi-similarity, SupCon, …) only learn from anchors that have
/// a positive in the batch. A uniformly shuffled batch of `B` items drawn from `C`
/// classes holds, for large `C`, mostly singletons. A [`ClassBalancedSampler`] instead
/// builds every batch from `P = batch_size / m` distinct classes with `m` items each, so
/// every anchor has `m − 1` positives and `(P − 1)·m` negatives.
///
/// # What an epoch is
///
/// An epoch has `max(1, ⌊n / batch_size⌋)` batches, all of exactly `batch_size` items,
/// so it sees about as many items as one pass of the plain loader with `drop_last`
/// (`drop_last` has no meaning here: there is never a partial batch).
///
/// * **Classes** are visited in a shuffled cyclic order: the class list is shuffled,
///   consumed `P` at a time, and reshuffled when fewer than `P` remain. The classes of
///   one batch are therefore distinct, and over an epoch every class is drawn about
///   `steps · P / C` times.
/// * **Items of a class with at least `m` items** come from a shuffled per-class queue,
///   `m` at a time, without replacement; when fewer than `m` remain the class is
///   reshuffled (the leftover items wait for the next cycle). The `m` items of a batch
///   are distinct.
/// * **Items of a class with fewer than `m` items** (`k < m`): all `k` are taken, and
///   the other `m − k` slots are drawn uniformly *with replacement* from the same `k`.
///   The batch then holds an object twice; a duplicate is a positive at distance 0,
///   which contributes no gradient to margin losses and is harmless to the others. A
///   class of one item thus gives an anchor whose only positive is itself.
///
/// # Determinism
///
/// Epoch `e`'s batches come from a generator seeded with `(seed, e)` and fresh queues,
/// so they depend only on `(seed, e)` and the classes: a resumed run sees the same
/// batches as an uninterrupted one, as with the [`DataLoader`](super::DataLoader).
#[derive(Debug, Clone)]
pub struct ClassBalancedSampler {
    batch_size: usize,
    m: usize,
    seed: u64,
    n: usize,
    /// Sample indices of each class, in class-id order.
    classes: Vec<Vec<usize>>,
}

impl ClassBalancedSampler {
    /// A sampler over samples whose classes are `classes[i]` (sample `i`). Errors: `m`
    /// is 0, `batch_size` is not a positive multiple of `m`, fewer than 2 classes, or
    /// fewer classes than a batch needs (`batch_size / m`).
    pub fn new(classes: &[i64], batch_size: usize, m: usize, seed: u64) -> Result<Self> {
        const WHERE: &str = "TrainerConfig.sampler (ClassBalanced { m })";
        if m == 0 {
            return Err(Error::invalid(WHERE, "m must be at least 1"));
        }
        if batch_size == 0 || !batch_size.is_multiple_of(m) {
            return Err(Error::invalid(
                WHERE,
                format!(
                    "batch_size {batch_size} must be a positive multiple of m = {m} \
                     (each batch holds batch_size / m classes of m items)"
                ),
            ));
        }
        let mut by_class: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
        for (i, &c) in classes.iter().enumerate() {
            by_class.entry(c).or_default().push(i);
        }
        let per_batch = batch_size / m;
        if by_class.len() < 2 {
            return Err(Error::invalid(
                WHERE,
                format!(
                    "the data has {} class(es); class-balanced batches need at least 2",
                    by_class.len()
                ),
            ));
        }
        if by_class.len() < per_batch {
            return Err(Error::invalid(
                WHERE,
                format!(
                    "a batch needs batch_size / m = {batch_size} / {m} = {per_batch} distinct \
                     classes but the data has only {}; lower batch_size or raise m",
                    by_class.len()
                ),
            ));
        }
        Ok(ClassBalancedSampler {
            batch_size,
            m,
            seed,
            n: classes.len(),
            classes: by_class.into_values().collect(),
        })
    }

    /// Number of distinct classes.
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// Batches per epoch: `max(1, ⌊n / batch_size⌋)`.
    pub fn steps_per_epoch(&self) -> usize {
        (self.n / self.batch_size).max(1)
    }

    /// The batches of epoch `epoch`, as sample indices: `steps_per_epoch()` batches of
    /// `batch_size`, laid out class by class (`m` consecutive indices per class).
    pub fn batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        let seed = self.seed ^ 0xC1A5_5BA1 ^ (epoch as u64).wrapping_mul(0xA076_1D64_78BD_642F);
        let mut rng = StdRng::seed_from_u64(seed);
        let per_batch = self.batch_size / self.m;
        let mut class_order: Vec<usize> = Vec::new();
        let mut queues: Vec<Vec<usize>> = vec![Vec::new(); self.classes.len()];
        let mut out = Vec::with_capacity(self.steps_per_epoch());
        for _ in 0..self.steps_per_epoch() {
            if class_order.len() < per_batch {
                class_order = (0..self.classes.len()).collect();
                class_order.shuffle(&mut rng);
            }
            let mut batch = Vec::with_capacity(self.batch_size);
            for c in class_order.split_off(class_order.len() - per_batch) {
                let items = &self.classes[c];
                if items.len() < self.m {
                    let start = batch.len();
                    batch.extend_from_slice(items);
                    batch[start..].shuffle(&mut rng);
                    for _ in items.len()..self.m {
                        batch.push(items[rng.random_range(0..items.len())]);
                    }
                    continue;
                }
                let queue = &mut queues[c];
                if queue.len() < self.m {
                    queue.clone_from(items);
                    queue.shuffle(&mut rng);
                }
                batch.extend(queue.drain(queue.len() - self.m..));
            }
            out.push(batch);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    fn classes(sizes: &[usize]) -> Vec<i64> {
        sizes
            .iter()
            .enumerate()
            .flat_map(|(c, &k)| std::iter::repeat_n(c as i64 * 10, k))
            .collect()
    }

    #[test]
    fn every_batch_has_p_classes_of_m_distinct_items() {
        let cls = classes(&[7, 5, 9, 4, 6, 8]);
        let s = ClassBalancedSampler::new(&cls, 12, 4, 3).unwrap();
        let epoch = s.batches(2);
        assert_eq!(epoch.len(), cls.len() / 12);
        for b in &epoch {
            assert_eq!(b.len(), 12);
            let mut per: HashMap<i64, HashSet<usize>> = HashMap::new();
            for chunk in b.chunks(4) {
                let c = cls[chunk[0]];
                assert!(chunk.iter().all(|&i| cls[i] == c), "{chunk:?}");
                per.entry(c).or_default().extend(chunk.iter().copied());
            }
            assert_eq!(per.len(), 3, "3 distinct classes");
            assert!(per.values().all(|items| items.len() == 4), "distinct items");
        }
        assert_eq!(epoch, s.batches(2), "depends only on (seed, epoch)");
        assert_ne!(epoch, s.batches(3));
    }

    #[test]
    fn small_classes_are_filled_with_replacement() {
        let cls = classes(&[1, 2, 2]);
        let s = ClassBalancedSampler::new(&cls, 6, 3, 0).unwrap();
        assert_eq!(
            s.steps_per_epoch(),
            1,
            "n < batch_size still gives one batch"
        );
        let b = &s.batches(0)[0];
        assert_eq!(b.len(), 6);
        for chunk in b.chunks(3) {
            let c = cls[chunk[0]];
            assert!(chunk.iter().all(|&i| cls[i] == c));
            let all: HashSet<usize> = (0..cls.len()).filter(|&i| cls[i] == c).collect();
            assert_eq!(chunk.iter().copied().collect::<HashSet<_>>(), all);
        }
    }

    #[test]
    fn errors_name_the_option() {
        let cls = classes(&[4, 4, 4]);
        let e = |b, m, c: &[i64]| {
            ClassBalancedSampler::new(c, b, m, 0)
                .unwrap_err()
                .to_string()
        };
        let m0 = e(8, 0, &cls);
        assert!(m0.contains("sampler") && m0.contains("m must be"), "{m0}");
        let mult = e(10, 4, &cls);
        assert!(mult.contains("multiple of m = 4"), "{mult}");
        let one = e(4, 2, &classes(&[5]));
        assert!(one.contains("at least 2"), "{one}");
        let few = e(16, 4, &cls);
        assert!(
            few.contains("4 distinct classes") && few.contains("only 3"),
            "{few}"
        );
    }
}
