//! What a data-parallel FAQ step communicates, and how long it takes (feature `mpi`):
//! the two collectives of every training step, at the FAQ model's sizes, timed alone.
//!
//! ```text
//! cargo build --release --features mpi --example comm_bench
//! mpirun -np 2 target/release/examples/comm_bench [--batch 1024 --iters 200]
//! ```
//!
//! Per step the trainer all-gathers the shards' embeddings (`2·B` rows of the head's
//! output width for `B` pairs) and all-reduces one flat buffer of every gradient (the
//! head's parameters, a presence flag per variable, the loss and a non-finite count).
//! Rank 0 prints one JSON line per collective: bytes each rank sends and receives, and
//! the median, min and max time over `--iters` runs after 10 warm-up runs.

// The FAQ model only: the data readers of the shared module go unused here.
#[allow(dead_code)]
#[path = "common/faq_task.rs"]
mod faq_task;

use std::time::Instant;

use anyhow::Result;
use faq_task::FaqModel;
use similarity_core::distributed::{self, Communicator};
use similarity_core::prelude::*;

fn arg(name: &str, default: usize) -> Result<usize> {
    let args: Vec<String> = std::env::args().collect();
    Ok(match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .ok_or_else(|| anyhow::anyhow!("{name} needs a value"))?
            .parse()?,
        None => default,
    })
}

/// Median, min and max of `f`'s wall time in ms over `iters` runs (after a warm-up),
/// each started together on every rank (a barrier first).
fn time(
    comm: &dyn Communicator,
    iters: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<[f64; 3]> {
    for _ in 0..10 {
        f()?;
    }
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters {
        comm.barrier()?;
        let start = Instant::now();
        f()?;
        ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok([ms[ms.len() / 2], ms[0], ms[ms.len() - 1]])
}

fn main() -> Result<()> {
    let comm: std::sync::Arc<dyn Communicator> = distributed::Mpi::init()?;
    let (batch, iters) = (arg("--batch", 1024)?, arg("--iters", 200)?);
    let model = FaqModel::new(HashedNgramEncoder::default(), &ModelOptions::default())?;
    let vars = model.state().named_trainable_vars();
    let params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let width = model.state().params().named_vars()["head.fc_0.weight"].dim(0)?;
    let (world_size, rank) = (comm.world_size(), comm.rank());
    let rows = distributed::shard_sizes(batch, world_size);
    let local = Tensor::randn(0f32, 1.0, (2 * rows[rank], width), &Device::Cpu)?;
    let gathered_bytes = 2 * batch * width * 4;
    let gather = time(&*comm, iters, || {
        distributed::gather_global_batch(&*comm, &local, &rows, 2, true)?;
        Ok(())
    })?;
    let flat = Tensor::randn(0f32, 1.0, params + vars.len() + 2, &Device::Cpu)?;
    let reduce = time(&*comm, iters, || {
        comm.all_reduce_sum_tensor(&flat)?;
        Ok(())
    })?;
    if rank == 0 {
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        for (what, bytes, [median, min, max]) in [
            ("all_gather_embeddings", gathered_bytes, gather),
            (
                "all_reduce_gradients",
                (params + vars.len() + 2) * 4,
                reduce,
            ),
        ] {
            println!(
                "{{\"collective\":\"{what}\",\"backend\":\"{}\",\"world\":{world_size},\
                 \"batch_pairs\":{batch},\"width\":{width},\"params\":{params},\
                 \"bytes\":{bytes},\"iters\":{iters},\"median_ms\":{median:.4},\
                 \"min_ms\":{min:.4},\"max_ms\":{max:.4},\"loadavg\":\"{}\"}}",
                comm.backend(),
                load.trim()
            );
        }
    }
    Ok(())
}
