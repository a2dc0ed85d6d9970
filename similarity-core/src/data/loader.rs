//! Batching: which samples form each batch of an epoch.
//!
//! The order of epoch `e` is a permutation drawn from a generator seeded with
//! `(seed, e)`, so an epoch's batches do not depend on what ran before it (a resumed run
//! sees the same batches as an uninterrupted one).

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::error::{Error, Result};

/// Splits `n` samples into batches, shuffled per epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct DataLoader {
    /// Samples per batch.
    pub batch_size: usize,
    /// Draw a new order every epoch (training); keep the data order otherwise.
    pub shuffle: bool,
    /// Drop the last batch when it is smaller than `batch_size`.
    pub drop_last: bool,
    /// Seed of the shuffling.
    pub seed: u64,
}

impl DataLoader {
    /// A loader of `batch_size`, shuffled, keeping the last partial batch.
    pub fn new(batch_size: usize, seed: u64) -> Self {
        DataLoader {
            batch_size,
            shuffle: true,
            drop_last: false,
            seed,
        }
    }

    /// The batches of epoch `epoch` over `n` samples, as sample indices.
    pub fn batches(&self, n: usize, epoch: usize) -> Result<Vec<Vec<usize>>> {
        if self.batch_size == 0 {
            return Err(Error::invalid(
                "DataLoader.batch_size",
                "must be at least 1",
            ));
        }
        if n == 0 {
            return Err(Error::invalid(
                "dataset",
                "is empty: there is nothing to train on",
            ));
        }
        let mut order: Vec<usize> = (0..n).collect();
        if self.shuffle {
            let seed = self.seed ^ (epoch as u64).wrapping_mul(0xA076_1D64_78BD_642F);
            order.shuffle(&mut StdRng::seed_from_u64(seed));
        }
        let mut out: Vec<Vec<usize>> = order
            .chunks(self.batch_size)
            .map(<[usize]>::to_vec)
            .collect();
        if self.drop_last && out.last().is_some_and(|b| b.len() < self.batch_size) {
            out.pop();
        }
        if out.is_empty() {
            return Err(Error::invalid(
                "DataLoader.drop_last",
                format!(
                    "batch size {} is larger than the dataset ({n} samples), so no full batch remains",
                    self.batch_size
                ),
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_per_epoch_and_covers_everything() {
        let l = DataLoader::new(4, 9);
        let a = l.batches(10, 3).unwrap();
        assert_eq!(a, l.batches(10, 3).unwrap());
        assert_ne!(a, l.batches(10, 4).unwrap());
        assert_eq!(a.iter().map(Vec::len).collect::<Vec<_>>(), vec![4, 4, 2]);
        let mut all: Vec<usize> = a.concat();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn drop_last_and_edge_cases() {
        let l = DataLoader {
            drop_last: true,
            ..DataLoader::new(4, 0)
        };
        assert_eq!(l.batches(10, 0).unwrap().len(), 2);
        assert!(
            l.batches(3, 0)
                .unwrap_err()
                .to_string()
                .contains("larger than the dataset")
        );
        assert!(
            DataLoader::new(4, 0)
                .batches(0, 0)
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
    }
}
