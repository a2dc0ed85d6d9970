use similarity_core::prelude::*;
use similarity_core::xbm::XbmConfig;

#[trainable_model]
struct Model {
    #[encoder(cache = "auto")]
    text: HashedNgramEncoder,
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: TripletLoss,
    #[xbm(size = 1024)]
    memory: XbmConfig,
}

fn main() {}
