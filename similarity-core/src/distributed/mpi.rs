//! The MPI engine (feature `mpi`): the `mpi` crate over the system's MPI library (Open
//! MPI on Debian: packages `libopenmpi-dev openmpi-bin libclang-dev`).
//!
//! [`Mpi::init`] initialises MPI once per process (at `MPI_THREAD_SERIALIZED`: any thread
//! may call, one at a time, which the communicator's lock ensures) over
//! `MPI_COMM_WORLD`; the last clone dropped finalises it. Started without `mpirun` a
//! process is a world of one. Collectives over more than 2²⁸ elements per rank go in
//! rounds, since MPI counts are 32-bit.

use std::sync::{Arc, Mutex, MutexGuard};

use ::mpi::Threading;
use ::mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use ::mpi::datatype::PartitionMut;
use ::mpi::environment::Universe;
use ::mpi::topology::{Communicator as _, SimpleCommunicator};

use super::{Communicator, check_counts, check_root};
use crate::error::{Error, Result};

/// Elements per rank in one MPI call (counts are `i32`).
const ROUND: usize = 1 << 28;

/// `MPI_COMM_WORLD` as a [`Communicator`].
pub struct Mpi {
    world: Mutex<SimpleCommunicator>,
    rank: usize,
    size: usize,
    // Dropped last: finalises MPI.
    _universe: Universe,
}

// SAFETY: MPI is initialised at MPI_THREAD_SERIALIZED (checked in `init`) and every call
// goes through `world`'s lock, so calls from different threads never overlap.
unsafe impl Send for Mpi {}
// SAFETY: as above.
unsafe impl Sync for Mpi {}

impl std::fmt::Debug for Mpi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mpi")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish()
    }
}

impl Mpi {
    /// Initialises MPI and returns the world communicator. An error when MPI was already
    /// initialised in this process (keep the first one; clone the `Arc`) or the library
    /// cannot serialise calls from several threads.
    pub fn init() -> Result<Arc<Mpi>> {
        let (universe, threading) = ::mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| {
                Error::invalid(
                    "Mpi::init",
                    "MPI is already initialised in this process; keep the first \
                     communicator (an Arc) and clone it",
                )
            })?;
        if !matches!(threading, Threading::Serialized | Threading::Multiple) {
            return Err(Error::invalid(
                "Mpi::init",
                format!(
                    "the MPI library offers thread level {threading:?}; the trainer needs \
                     MPI_THREAD_SERIALIZED (Open MPI provides it)"
                ),
            ));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(Arc::new(Mpi {
            world: Mutex::new(world),
            rank,
            size,
            _universe: universe,
        }))
    }

    /// The element-wise sum of `buf` over every rank, in place, in rounds.
    fn sum_in_place<T: ::mpi::datatype::Equivalence + Copy>(&self, buf: &mut [T]) {
        let world = self.world();
        for chunk in buf.chunks_mut(ROUND) {
            let send = chunk.to_vec();
            world.all_reduce_into(&send[..], chunk, SystemOperation::sum());
        }
    }

    fn world(&self) -> MutexGuard<'_, SimpleCommunicator> {
        self.world
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The per-rank element counts and displacements of one round of a varying-count
    /// gather: `offset` elements of every rank are already gathered.
    fn round(counts: &[usize], offset: usize) -> (Vec<i32>, Vec<i32>) {
        let this: Vec<usize> = counts
            .iter()
            .map(|&c| c.saturating_sub(offset).min(ROUND))
            .collect();
        let displs = super::offsets(&this).iter().map(|&d| d as i32).collect();
        (this.iter().map(|&c| c as i32).collect(), displs)
    }
}

impl Communicator for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn backend(&self) -> &'static str {
        "mpi"
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.sum_in_place(buf);
        Ok(())
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.sum_in_place(buf);
        Ok(())
    }

    fn all_gather_varcount(&self, local: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
        check_counts(self, local.len(), counts)?;
        let total: usize = counts.iter().sum();
        let starts = super::offsets(counts);
        let mut out = vec![0f32; total];
        let world = self.world();
        let rounds = counts.iter().max().copied().unwrap_or(0).div_ceil(ROUND);
        for round in 0..rounds {
            let offset = round * ROUND;
            let (c, d) = Self::round(counts, offset);
            let mine = &local[offset.min(local.len())..(offset + ROUND).min(local.len())];
            let mut recv = vec![0f32; c.iter().map(|&c| c as usize).sum()];
            {
                let mut part = PartitionMut::new(&mut recv[..], &c[..], &d[..]);
                world.all_gather_varcount_into(mine, &mut part);
            }
            for r in 0..counts.len() {
                let (n, at) = (c[r] as usize, d[r] as usize);
                out[starts[r] + offset..starts[r] + offset + n].copy_from_slice(&recv[at..at + n]);
            }
        }
        Ok(out)
    }

    fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>> {
        let world = self.world();
        let mut lens = vec![0u64; self.size];
        world.all_gather_into(&(local.len() as u64), &mut lens[..]);
        let counts: Vec<usize> = lens.iter().map(|&l| l as usize).collect();
        if counts.iter().any(|&c| c > ROUND) {
            return Err(self.error(format!(
                "all-gather of bytes: counts {counts:?} exceed {ROUND} per rank"
            )));
        }
        let (c, d) = Self::round(&counts, 0);
        let mut recv = vec![0u8; counts.iter().sum()];
        {
            let mut part = PartitionMut::new(&mut recv[..], &c[..], &d[..]);
            world.all_gather_varcount_into(local, &mut part);
        }
        Ok((0..self.size)
            .map(|r| recv[d[r] as usize..d[r] as usize + c[r] as usize].to_vec())
            .collect())
    }

    fn broadcast_bytes(&self, root: usize, buf: &mut Vec<u8>) -> Result<()> {
        check_root(self, root)?;
        let world = self.world();
        let root_process = world.process_at_rank(root as i32);
        let mut len = buf.len() as u64;
        root_process.broadcast_into(&mut len);
        buf.resize(len as usize, 0);
        for chunk in buf.chunks_mut(ROUND) {
            root_process.broadcast_into(chunk);
        }
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.world().barrier();
        Ok(())
    }

    fn abort(&self, error: &Error) -> ! {
        eprintln!(
            "rank {} of {}: {error}\nrank {}: aborting every rank (MPI_Abort)",
            self.rank, self.size, self.rank
        );
        // Not through the lock: another thread may hold it inside a collective that will
        // never complete.
        SimpleCommunicator::world().abort(1)
    }
}
