use similarity_core::prelude::*;

#[trainable_model]
struct Model {
    #[encoder(cache = "auto")]
    text: HashedNgramEncoder,
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: TripletLoss,
    #[xbm(size = 0)]
    memory: Xbm,
    #[metric(k = 0)]
    precision: RetrievalPrecision,
}

fn main() {}
