//! NCCL at world size 1 (feature `nccl`): a communicator on the test GPU
//! (`SIMILARITY_TEST_DEVICE=cuda`), an all-reduce and an all-gather through it. This is
//! the check `scripts/gpu-check.sh` runs on a GPU machine; on a machine without a GPU the
//! binary is only built (CI), and running it without `SIMILARITY_TEST_DEVICE` fails.

mod common;

use similarity_core::Device;
use similarity_core::candle_core::cuda_backend::cudarc::nccl::{Comm, Id, ReduceOp};

#[test]
fn a_world_of_one_reduces_and_gathers_to_itself() {
    let Device::Cuda(cuda) = common::device() else {
        panic!("the NCCL check needs SIMILARITY_TEST_DEVICE=cuda");
    };
    let stream = cuda.cuda_stream();
    let comm = Comm::from_rank(stream.clone(), 0, 1, Id::new().unwrap()).unwrap();
    assert_eq!((comm.rank(), comm.world_size()), (0, 1));
    let values = [1.5f32, -2.0, 3.25];
    let send = stream.clone_htod(&values).unwrap();
    let mut sum = stream.alloc_zeros::<f32>(values.len()).unwrap();
    comm.all_reduce(&send, &mut sum, &ReduceOp::Sum).unwrap();
    assert_eq!(stream.clone_dtoh(&sum).unwrap(), values);
    let mut gathered = stream.alloc_zeros::<f32>(values.len()).unwrap();
    comm.all_gather(&send, &mut gathered).unwrap();
    assert_eq!(stream.clone_dtoh(&gathered).unwrap(), values);
}
