use similarity_core::prelude::*;

#[trainable_model]
struct Model {
    #[encoder(cache = "auto")]
    text: HashedNgramEncoder,
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: MultipleNegativesRankingLoss,
    #[xbm(size = 1024)]
    memory: Xbm,
}

fn main() {}
