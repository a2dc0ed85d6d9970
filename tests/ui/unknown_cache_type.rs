use similarity_core::prelude::*;

#[trainable_model]
struct Model {
    #[encoder(cache = "gpuu")]
    text: HashedNgramEncoder,
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: MultipleNegativesRankingLoss,
}

fn main() {}
