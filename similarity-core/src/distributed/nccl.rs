//! The NCCL engine (feature `nccl`): one GPU per rank, through candle-core's `nccl`
//! feature (cudarc's communicator).
//!
//! NCCL needs a unique id shared by every rank before it can build a communicator. Rank
//! 0 creates it and hands it to the others either over another communicator
//! ([`Nccl::bootstrap`], e.g. over [`Mpi`](super::Mpi): `mpirun` starts the processes,
//! NCCL moves the tensors) or through a file in a directory every rank sees
//! ([`Nccl::from_file`], as candle's own multi-process example does: rank 0 writes the
//! id atomically, the others wait for it, for at most a given time).
//!
//! The per-step gradient all-reduce runs on the device ([`Communicator::all_reduce_sum_tensor`]);
//! the other collectives (embedding rows, bytes) are staged through host memory. NCCL
//! has no varying-count all-gather: rows are padded to the largest count, gathered, and
//! unpadded. NCCL refuses two ranks on one GPU.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Shape, Tensor};

use super::{Communicator, check_counts, check_root};
use crate::Device;
use crate::error::{Error, Result};

/// An NCCL communicator over one GPU per rank.
pub struct Nccl {
    comm: Mutex<Comm>,
    stream: Arc<CudaStream>,
    rank: usize,
    size: usize,
    /// The communicator that bootstrapped this one: its `abort` ends every rank.
    launcher: Option<Arc<dyn Communicator>>,
}

// SAFETY: the raw NCCL communicator is only used under `comm`'s lock, one call at a time,
// on the stream it was created with.
unsafe impl Send for Nccl {}
// SAFETY: as above.
unsafe impl Sync for Nccl {}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish()
    }
}

fn nccl_error(rank: usize, size: usize, what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Distributed {
        rank,
        world: size,
        message: format!("NCCL {what} failed: {e:?}"),
    }
}

fn cuda_stream(device: &Device, at: &str) -> Result<Arc<CudaStream>> {
    match device {
        Device::Cuda(cuda) => Ok(cuda.cuda_stream()),
        other => Err(Error::invalid(
            at,
            format!("NCCL needs a CUDA device, got {other:?}"),
        )),
    }
}

impl Nccl {
    fn from_id(
        id: Id,
        rank: usize,
        size: usize,
        device: &Device,
        launcher: Option<Arc<dyn Communicator>>,
    ) -> Result<Arc<Nccl>> {
        let stream = cuda_stream(device, "Nccl")?;
        let comm = Comm::from_rank(stream.clone(), rank, size, id)
            .map_err(|e| nccl_error(rank, size, "communicator init", e))?;
        Ok(Arc::new(Nccl {
            comm: Mutex::new(comm),
            stream,
            rank,
            size,
            launcher,
        }))
    }

    /// A communicator on `device` with the rank and world size of `over`, whose rank 0
    /// creates the NCCL id and broadcasts it through `over`; an abort goes through
    /// `over` (so `MPI_Abort` ends every rank).
    pub fn bootstrap(over: Arc<dyn Communicator>, device: &Device) -> Result<Arc<Nccl>> {
        let (rank, size) = (over.rank(), over.world_size());
        let mut bytes = if rank == 0 {
            let id = Id::new().map_err(|e| nccl_error(rank, size, "unique id", e))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        over.broadcast_bytes(0, &mut bytes)?;
        Self::from_id(id_of(&bytes, rank, size)?, rank, size, device, Some(over))
    }

    /// A communicator of rank `rank` of `size` on `device`, rendezvous through the file
    /// `path`: rank 0 creates the id and writes it there (atomically); the others wait
    /// for the file for at most `timeout`, then fail naming it. Remove a stale file from
    /// an earlier run before starting (rank 0 replaces it, but another rank could read
    /// the old id first).
    pub fn from_file(
        path: &Path,
        rank: usize,
        size: usize,
        device: &Device,
        timeout: Duration,
    ) -> Result<Arc<Nccl>> {
        if rank >= size {
            return Err(Error::invalid(
                "Nccl::from_file",
                format!("rank {rank} is not below the world size {size}"),
            ));
        }
        let bytes = if rank == 0 {
            let id = Id::new().map_err(|e| nccl_error(rank, size, "unique id", e))?;
            let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            crate::files::write_bytes(path, &bytes)?;
            bytes
        } else {
            let start = Instant::now();
            loop {
                if path.exists() {
                    break crate::files::read_bytes(path, 128)?;
                }
                if start.elapsed() > timeout {
                    return Err(Error::Distributed {
                        rank,
                        world: size,
                        message: format!(
                            "no NCCL id appeared at `{}` within {timeout:?}: is rank 0 running, \
                             and do the ranks see the same directory?",
                            path.display()
                        ),
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        Self::from_id(id_of(&bytes, rank, size)?, rank, size, device, None)
    }

    fn comm(&self) -> MutexGuard<'_, Comm> {
        self.comm
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn all_reduce_host<T>(&self, buf: &mut [T]) -> Result<()>
    where
        T: candle_core::cuda_backend::cudarc::driver::DeviceRepr
            + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits
            + candle_core::cuda_backend::cudarc::nccl::NcclType
            + Copy,
    {
        if buf.is_empty() {
            return Ok(());
        }
        let err = |what, e| nccl_error(self.rank, self.size, what, e);
        let send = self
            .stream
            .clone_htod(&*buf)
            .map_err(|e| err("copy to device", format!("{e:?}")))?;
        let mut recv = self
            .stream
            .alloc_zeros::<T>(buf.len())
            .map_err(|e| err("alloc", format!("{e:?}")))?;
        self.comm()
            .all_reduce(&send, &mut recv, &ReduceOp::Sum)
            .map_err(|e| err("all-reduce", format!("{e:?}")))?;
        let host = self
            .stream
            .clone_dtoh(&recv)
            .map_err(|e| err("copy to host", format!("{e:?}")))?;
        buf.copy_from_slice(&host);
        Ok(())
    }

    /// Every rank's `local` (each padded to `max` elements) concatenated in rank order.
    fn all_gather_padded<T>(&self, local: &[T], max: usize) -> Result<Vec<T>>
    where
        T: candle_core::cuda_backend::cudarc::driver::DeviceRepr
            + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits
            + candle_core::cuda_backend::cudarc::nccl::NcclType
            + Copy
            + Default,
    {
        let err = |what, e| nccl_error(self.rank, self.size, what, e);
        let mut padded = local.to_vec();
        padded.resize(max.max(1), T::default());
        let send = self
            .stream
            .clone_htod(&padded)
            .map_err(|e| err("copy to device", format!("{e:?}")))?;
        let mut recv = self
            .stream
            .alloc_zeros::<T>(padded.len() * self.size)
            .map_err(|e| err("alloc", format!("{e:?}")))?;
        self.comm()
            .all_gather(&send, &mut recv)
            .map_err(|e| err("all-gather", format!("{e:?}")))?;
        self.stream
            .clone_dtoh(&recv)
            .map_err(|e| err("copy to host", format!("{e:?}")))
    }
}

fn id_of(bytes: &[u8], rank: usize, size: usize) -> Result<Id> {
    let internal: [std::ffi::c_char; 128] = bytes
        .iter()
        .map(|&b| b as std::ffi::c_char)
        .collect::<Vec<_>>()
        .try_into()
        .map_err(|_| Error::Distributed {
            rank,
            world: size,
            message: format!("an NCCL id has 128 bytes, got {}", bytes.len()),
        })?;
    Ok(Id::uninit(internal))
}

/// The device-side sum of a contiguous f32 tensor over every rank.
struct AllReduce<'a>(&'a Nccl);

impl CustomOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the NCCL all-reduce runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("the NCCL all-reduce needs a contiguous tensor")
        };
        let slice = storage.as_cuda_slice::<f32>()?.slice(start..end);
        let mut out = self
            .0
            .stream
            .alloc_zeros::<f32>(end - start)
            .map_err(|e| candle_core::Error::Msg(format!("alloc: {e:?}")))?;
        self.0
            .comm()
            .all_reduce(&slice, &mut out, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, storage.device.clone()),
            layout.shape().clone(),
        ))
    }
}

impl Communicator for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce_host(buf)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.all_reduce_host(buf)
    }
    fn all_gather_varcount(&self, local: &[f32], counts: &[usize]) -> Result<Vec<f32>> {
        check_counts(self, local.len(), counts)?;
        let max = counts.iter().max().copied().unwrap_or(0).max(1);
        let all = self.all_gather_padded(local, max)?;
        Ok(counts
            .iter()
            .enumerate()
            .flat_map(|(r, &c)| all[r * max..r * max + c].iter().copied())
            .collect())
    }
    fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>> {
        let lens = self.all_gather_padded(&[local.len() as u64], 1)?;
        let max = lens.iter().max().copied().unwrap_or(0).max(1) as usize;
        let all = self.all_gather_padded(local, max)?;
        Ok(lens
            .iter()
            .enumerate()
            .map(|(r, &c)| all[r * max..r * max + c as usize].to_vec())
            .collect())
    }
    fn broadcast_bytes(&self, root: usize, buf: &mut Vec<u8>) -> Result<()> {
        check_root(self, root)?;
        let all = self.all_gather_bytes(buf)?;
        *buf = all[root].clone();
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.all_reduce_host(&mut [0f32])
    }
    fn abort(&self, error: &Error) -> ! {
        if let Some(launcher) = &self.launcher {
            launcher.abort(error)
        }
        eprintln!(
            "rank {} of {}: {error}\nrank {}: exiting; a launcher (mpirun) ends the other ranks",
            self.rank, self.size, self.rank
        );
        std::process::exit(1)
    }
    fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Tensor> {
        if !t.device().is_cuda() || t.dtype() != candle_core::DType::F32 {
            let mut host = t
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            self.all_reduce_sum(&mut host)?;
            return Ok(Tensor::from_vec(host, t.shape(), t.device())?.to_dtype(t.dtype())?);
        }
        Ok(t.contiguous()?.apply_op1_no_bwd(&AllReduce(self))?)
    }
}
