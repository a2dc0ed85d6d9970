//! Data-parallel training across processes, on engines people already run: MPI on CPUs
//! (feature `mpi`, the `mpi` crate on Open MPI) and NCCL on GPUs (feature `nccl`).
//!
//! A [`Communicator`] is the handful of collectives the trainer needs: rank, world size,
//! all-reduce, all-gather (with a count per rank), broadcast, barrier, abort.
//! [`SingleProcess`] (world size 1, no dependency) is what every path uses unless
//! [`Trainer::with_communicator`](crate::Trainer::with_communicator) is given another.
//!
//! # The global batch, and why its gradient is exact
//!
//! Every rank holds the whole data set, draws the same seeded permutation and takes a
//! contiguous shard of each global batch of `B` samples ([`shard_sizes`]: the first
//! `B mod W` ranks take one more). Rank `r` embeds its `b_r` samples (`K` objects each,
//! slot-major, `(K·b_r, d)`), and the shards are all-gathered into the global batch
//! `E = (K·B, d)` in exactly the order one process would have embedded it
//! ([`gather_global_batch`]): for each slot, rank 0's rows, then rank 1's, ... Rank `r`'s
//! own rows stay in its autograd graph; the other ranks' rows are constants.
//!
//! Every rank then computes the same loss `L(E)` on the global batch (pair losses see all
//! `B` in-batch negatives, group losses mine over the whole batch, the cross-batch memory
//! sees and enqueues the same rows in the same order), and backpropagates. The chain rule
//! splits the gradient of a parameter `θ` of the encoders or the head by rank,
//!
//! ```text
//! ∂L/∂θ = Σ_r (∂L/∂E_r) · (∂E_r/∂θ)
//! ```
//!
//! and rank `r`'s backward pass yields exactly the `r`-th term (only `E_r` carries its
//! graph). Summing the ranks' gradients (an all-reduce with **sum**, not the mean that
//! classic data parallelism uses: dividing by `W` here is the 1/world-size bug) gives
//! the single-process gradient of the global batch. A parameter of the loss itself (the
//! class centres of ArcFace, say) receives the full gradient on every rank, so its
//! reduction is the mean. This is the "every rank computes the global loss" design: it
//! needs no custom backward and is exact for every loss, mined and non-decomposable
//! ones included, at the price of each rank computing the `O(B²·d)` loss redundantly —
//! small next to encoders, which are what the ranks share out.
//!
//! [`GatherMode::Local`] is the other, cheaper form (each rank's loss on its own shard,
//! gradients averaged): its in-batch negatives are only the `b_r` of the shard.
//!
//! # What is communicated
//!
//! Per training step: one all-gather of the shards' embeddings (`K·B·d` f32 in all,
//! `K·B·d·4` bytes received by every rank) and one all-reduce of every gradient in one
//! flat f32 buffer (`P + V` elements for `P` trainable parameters in `V` variables: a
//! presence flag per variable). Once per fit: a fingerprint check of data and options
//! (a few bytes), and for a sharded cache fill one all-gather of the encoded rows
//! (`u·d` f32 for `u` unique objects). Per validation: one all-gather of the validation
//! embeddings (each rank embeds a contiguous share of the objects), and two small f64
//! all-reduces: the loss over the batches each rank took (batch `i` on rank `i mod W`)
//! and the metrics' running sums over the queries each rank ranked (a contiguous share);
//! the result is the whole set's on every rank. With
//! [`TrainerConfig::hard_negatives`](crate::TrainerConfig::hard_negatives), per mining
//! pass: one all-gather of every training object's embedding and one of the mined
//! indices (each rank mines a share of the queries); per step, the mined answers of pair
//! data are gathered after the batch like it. With
//! [`TrainerConfig::grad_cache`](crate::TrainerConfig::grad_cache) the step's all-gather
//! carries detached rows, and each rank backpropagates its own rows of the global
//! gradient ([`crate::train::grad_cache`]).
//!
//! # Failures
//!
//! A rank that fails must not leave the others waiting in a collective. In a run of more
//! than one rank the trainer hands its error to [`Communicator::abort`]: the failing rank
//! prints `rank r of W: <error>` and ends every rank (MPI: `MPI_Abort`, after which
//! `mpirun` ends the job). A rank that dies (killed, crashed) is noticed by `mpirun`,
//! which ends the others.

#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;

#[cfg(feature = "mpi")]
pub use self::mpi::Mpi;
#[cfg(feature = "nccl")]
pub use self::nccl::Nccl;

use std::fmt::Debug;
use std::ops::Range;
use std::sync::Arc;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The collectives of a data-parallel run. Every method is collective: every rank calls
/// it, in the same order, with buffers of the agreed sizes (the trainer guarantees this;
/// see the [module docs](self)).
pub trait Communicator: Send + Sync + Debug {
    /// This process's rank, `0..world_size()`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn world_size(&self) -> usize;
    /// The engine: `"single"`, `"mpi"` or `"nccl"`.
    fn backend(&self) -> &'static str;
    /// Element-wise sum of `buf` over every rank, in place; `buf` has the same length on
    /// every rank.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// [`all_reduce_sum`](Self::all_reduce_sum) in f64 (statistics, not gradients).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Every rank's `local`, concatenated in rank order; rank `r` contributes
    /// `counts[r]` elements (`counts` is the same on every rank; a count may be 0).
    fn all_gather_varcount(&self, local: &[f32], counts: &[usize]) -> Result<Vec<f32>>;
    /// Every rank's bytes, in rank order (lengths may differ; they are gathered first).
    fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Rank `root`'s `buf` on every rank (the others' contents and lengths are replaced).
    fn broadcast_bytes(&self, root: usize, buf: &mut Vec<u8>) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// Ends every rank of the run after printing `error` with this rank: the way out of
    /// an error that the other ranks cannot know of (they may be waiting in a collective).
    fn abort(&self, error: &Error) -> !;

    /// Element-wise sum of a tensor over every rank (same shape everywhere), on its
    /// device. The default goes through host memory; a device engine (NCCL) overrides it.
    fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Tensor> {
        if t.dtype() == candle_core::DType::F64 {
            let mut host = t.flatten_all()?.to_vec1::<f64>()?;
            self.all_reduce_sum_f64(&mut host)?;
            return Ok(Tensor::from_vec(host, t.shape(), t.device())?);
        }
        let mut host = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        self.all_reduce_sum(&mut host)?;
        Ok(Tensor::from_vec(host, t.shape(), t.device())?.to_dtype(t.dtype())?)
    }

    /// The rows `(counts[r], d)` of every rank concatenated in rank order,
    /// `(Σ counts, d)`, detached, on `t`'s device.
    fn all_gather_rows(&self, t: &Tensor, counts: &[usize]) -> Result<Tensor> {
        let (n, d) = t.dims2()?;
        if counts.get(self.rank()) != Some(&n) || counts.len() != self.world_size() {
            return Err(self.error(format!(
                "all-gather of rows: this rank has {n} rows but the agreed counts are \
                 {counts:?} for {} ranks",
                self.world_size()
            )));
        }
        let host = t
            .detach()
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let element_counts: Vec<usize> = counts.iter().map(|c| c * d).collect();
        let all = self.all_gather_varcount(&host, &element_counts)?;
        let total: usize = counts.iter().sum();
        Ok(Tensor::from_vec(all, (total, d), t.device())?.to_dtype(t.dtype())?)
    }

    /// An [`Error::Distributed`] of this rank.
    fn error(&self, message: String) -> Error {
        Error::Distributed {
            rank: self.rank(),
            world: self.world_size(),
            message,
        }
    }
}

/// How the loss of a distributed step sees the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GatherMode {
    /// Every rank computes the loss of the whole global batch (all-gathered
    /// embeddings), gradients summed: the single-process result at the same global batch.
    #[default]
    Global,
    /// Every rank computes the loss of its own shard only (classic data parallelism,
    /// gradients averaged): no embedding all-gather, but only the shard's `b_r` in-batch
    /// negatives, so results differ from one process at the same global batch.
    Local,
}

/// World size 1: every collective returns its input. The default communicator.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "single"
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_gather_varcount(&self, local: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
        check_counts(self, local.len(), counts)?;
        Ok(local.to_vec())
    }
    fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![local.to_vec()])
    }
    fn broadcast_bytes(&self, root: usize, _buf: &mut Vec<u8>) -> Result<()> {
        check_root(self, root)
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, error: &Error) -> ! {
        eprintln!("rank 0 of 1: {error}");
        std::process::exit(1)
    }
    fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn all_gather_rows(&self, t: &Tensor, counts: &[usize]) -> Result<Tensor> {
        check_counts(self, t.dims2()?.0, counts)?;
        Ok(t.detach())
    }
}

/// The single-process communicator, shared.
pub fn single() -> Arc<dyn Communicator> {
    Arc::new(SingleProcess)
}

/// An error unless `counts` has one entry per rank and this rank's is `len`.
pub(crate) fn check_counts(comm: &dyn Communicator, len: usize, counts: &[usize]) -> Result<()> {
    if counts.len() != comm.world_size() || counts[comm.rank()] != len {
        return Err(comm.error(format!(
            "all-gather: this rank contributes {len} elements, but the agreed counts are \
             {counts:?} for {} ranks",
            comm.world_size()
        )));
    }
    Ok(())
}

/// An error unless `root` is a rank.
pub(crate) fn check_root(comm: &dyn Communicator, root: usize) -> Result<()> {
    if root >= comm.world_size() {
        return Err(comm.error(format!(
            "broadcast from rank {root}, but the world has {} ranks",
            comm.world_size()
        )));
    }
    Ok(())
}

/// Where each of `counts` starts when they are laid end to end: `[0, c₀, c₀ + c₁, …]`.
pub(crate) fn offsets(counts: &[usize]) -> Vec<usize> {
    counts
        .iter()
        .scan(0, |acc, &c| {
            let start = *acc;
            *acc += c;
            Some(start)
        })
        .collect()
}

/// How `n` items split over `world` ranks: contiguous, the first `n mod world` ranks one
/// more than the others (`[4, 3, 3]` for 10 over 3).
pub fn shard_sizes(n: usize, world: usize) -> Vec<usize> {
    let world = world.max(1);
    (0..world)
        .map(|r| n / world + usize::from(r < n % world))
        .collect()
}

/// Rank `rank`'s items of `n` under [`shard_sizes`].
pub fn shard(n: usize, world: usize, rank: usize) -> Range<usize> {
    let sizes = shard_sizes(n, world);
    let start: usize = sizes[..rank.min(sizes.len())].iter().sum();
    start..start + sizes.get(rank).copied().unwrap_or(0)
}

/// The global batch from every rank's shard, in single-process order, with this rank's
/// rows still in their graph (see the [module docs](self)).
///
/// `local` is `(objects_per_sample · samples[rank], d)`, slot-major (all first objects of
/// the shard's samples, then all second objects, ...); `samples[r]` is rank `r`'s sample
/// count. The result is `(objects_per_sample · Σ samples, d)`, slot-major over the global
/// batch. With `keep_graph = false` every row is a constant, this rank's too: a gathered
/// batch without its gradient (what a naive all-gather gives; kept for tests that show
/// the difference).
pub fn gather_global_batch(
    comm: &dyn Communicator,
    local: &Tensor,
    samples: &[usize],
    objects_per_sample: usize,
    keep_graph: bool,
) -> Result<Tensor> {
    let k = objects_per_sample;
    let rows: Vec<usize> = samples.iter().map(|s| s * k).collect();
    if comm.world_size() == 1 {
        check_counts(comm, local.dims2()?.0, &rows)?;
        return Ok(if keep_graph {
            local.clone()
        } else {
            local.detach()
        });
    }
    let all = comm.all_gather_rows(local, &rows)?;
    let me = comm.rank();
    let starts = offsets(&rows);
    let mut parts = Vec::with_capacity(k * samples.len());
    for slot in 0..k {
        for (r, &b) in samples.iter().enumerate() {
            if b == 0 {
                continue;
            }
            parts.push(if r == me && keep_graph {
                local.narrow(0, slot * b, b)?
            } else {
                all.narrow(0, starts[r] + slot * b, b)?
            });
        }
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// Sets every rank's `vars` to rank 0's (at the start of a run, as data-parallel
/// trainers do: a model initialised differently on one machine would otherwise train a
/// different model there). One broadcast per variable, of its bytes.
pub fn broadcast_vars(comm: &dyn Communicator, vars: &[(String, candle_core::Var)]) -> Result<()> {
    use candle_core::DType;
    if comm.world_size() == 1 {
        return Ok(());
    }
    for (name, var) in vars {
        let t = var.as_tensor();
        let wide = t.dtype() == DType::F64;
        let mut bytes: Vec<u8> = if comm.rank() == 0 {
            if wide {
                t.flatten_all()?
                    .to_vec1::<f64>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect()
            } else {
                let f = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                f.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
        } else {
            Vec::new()
        };
        comm.broadcast_bytes(0, &mut bytes)?;
        let width = if wide { 8 } else { 4 };
        if bytes.len() != t.elem_count() * width {
            return Err(comm.error(format!(
                "variable `{name}` has {} elements here but rank 0 sent {} bytes for it: the \
                 ranks build different models",
                t.elem_count(),
                bytes.len()
            )));
        }
        let value = if wide {
            let v: Vec<f64> = bytes
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect();
            Tensor::from_vec(v, t.shape(), t.device())?
        } else {
            let v: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect();
            Tensor::from_vec(v, t.shape(), t.device())?.to_dtype(t.dtype())?
        };
        var.set(&value)?;
    }
    Ok(())
}

/// Checks that every rank has the same `values` (data sizes, options, fingerprints):
/// an error on every rank, naming the first value that differs and each rank's, when not.
pub fn check_agreement(comm: &dyn Communicator, values: &[(&str, u64)]) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    let local: Vec<u8> = values.iter().flat_map(|(_, v)| v.to_le_bytes()).collect();
    let all = comm.all_gather_bytes(&local)?;
    for (i, (name, _)) in values.iter().enumerate() {
        let per_rank: Vec<Option<u64>> = all
            .iter()
            .map(|b| {
                b.get(i * 8..i * 8 + 8)
                    .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
            })
            .collect();
        if per_rank.windows(2).any(|w| w[0] != w[1]) {
            let shown: Vec<String> = per_rank
                .iter()
                .enumerate()
                .map(|(r, v)| match v {
                    Some(v) => format!("rank {r}: {v:#x}"),
                    None => format!("rank {r}: missing"),
                })
                .collect();
            return Err(comm.error(format!(
                "the ranks disagree on {name} ({}); every rank must be given the same data \
                 and options",
                shown.join(", ")
            )));
        }
    }
    if all.iter().any(|b| b.len() != local.len()) {
        return Err(comm.error(
            "the ranks check different lists of values: they run different versions of the \
             program"
                .into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn shards_cover_the_batch_in_order() {
        assert_eq!(shard_sizes(10, 3), vec![4, 3, 3]);
        assert_eq!(shard_sizes(2, 3), vec![1, 1, 0]);
        assert_eq!(shard(10, 3, 0), 0..4);
        assert_eq!(shard(10, 3, 1), 4..7);
        assert_eq!(shard(10, 3, 2), 7..10);
        for n in 0..20 {
            for w in 1..5 {
                let mut next = 0;
                for r in 0..w {
                    let s = shard(n, w, r);
                    assert_eq!(s.start, next);
                    next = s.end;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn world_of_one_gathers_itself_with_or_without_graph() {
        let comm = SingleProcess;
        let v = Var::new(&[[1.0f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let g = gather_global_batch(&comm, v.as_tensor(), &[1], 2, true).unwrap();
        let grads = g.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(v.as_tensor()).is_some());
        let d = gather_global_batch(&comm, v.as_tensor(), &[1], 2, false).unwrap();
        assert!(d.sum_all().unwrap().backward().unwrap().get(&v).is_none());
        let e = gather_global_batch(&comm, v.as_tensor(), &[2], 2, true).unwrap_err();
        assert!(e.to_string().contains("agreed counts are [4]"), "{e}");
        check_agreement(&comm, &[("x", 1)]).unwrap();
    }
}
