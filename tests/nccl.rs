//! NCCL at world size 1 (feature `nccl`): a communicator on the test GPU
//! (`SIMILARITY_TEST_DEVICE=cuda`), an all-reduce and an all-gather through it, and the
//! trainer over the `Nccl` communicator, bit-identical to the plain trainer. This is
//! the check `scripts/gpu-check.sh` runs on a GPU machine; on a machine without a GPU the
//! binary is only built (CI), and running it without `SIMILARITY_TEST_DEVICE` fails.

mod common;

use similarity_core::Device;
use similarity_core::candle_core::cuda_backend::cudarc::nccl::{Comm, Id, ReduceOp};
use similarity_core::prelude::*;

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

#[trainable_model]
struct Pairs {
    #[encoder(cache = "auto")]
    text: HashedNgramEncoder,
    #[head]
    head: SkipConnectionHead,
    #[loss(scale = 20.0, symmetric = true)]
    loss: MultipleNegativesRankingLoss,
}

/// The `Nccl` communicator of a world of one, from the file rendezvous: its collectives
/// return their input, and the trainer given it trains exactly as without it.
#[test]
fn the_trainer_over_an_nccl_world_of_one_matches_the_plain_trainer() {
    use similarity_core::distributed::{Communicator, Nccl};

    let device = common::device();
    assert!(
        device.is_cuda(),
        "the NCCL check needs SIMILARITY_TEST_DEVICE=cuda"
    );
    let dir = tempfile::tempdir().unwrap();
    let comm = Nccl::from_file(
        &dir.path().join("nccl-id"),
        0,
        1,
        &device,
        std::time::Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(
        (comm.rank(), comm.world_size(), comm.backend()),
        (0, 1, "nccl")
    );
    let mut v = vec![1.0f32, -2.5];
    comm.all_reduce_sum(&mut v).unwrap();
    assert_eq!(v, [1.0, -2.5]);
    let t = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &device).unwrap();
    let r = comm.all_reduce_sum_tensor(&t).unwrap();
    assert_eq!(r.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
    let mut bytes = b"id".to_vec();
    comm.broadcast_bytes(0, &mut bytes).unwrap();
    assert_eq!(bytes, b"id");

    let data = common::faq_pairs("train", 64);
    let config = TrainerConfig {
        epochs: 2,
        batch_size: 16,
        progress: false,
        ..Default::default()
    };
    let train = |trainer: Trainer| {
        let mut m = Pairs::new(HashedNgramEncoder::default(), &common::options()).unwrap();
        trainer.fit(&mut m, &data, None).unwrap();
        m.state()
            .named_trainable_vars()
            .into_iter()
            .map(|(_, v)| v.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect::<Vec<_>>()
    };
    let plain = train(Trainer::new(config.clone()));
    let over_nccl = train(Trainer::new(config).with_communicator(comm));
    assert_eq!(plain, over_nccl);
}
