use similarity_core::prelude::*;

#[trainable_model]
struct Model {
    #[encoder(cache = "auto")]
    text: HashedNgramEncoder,
    #[head]
    head: SkipConnectionHead,
    #[head]
    second: SkipConnectionHead,
    #[loss]
    loss: MultipleNegativesRankingLoss,
}

fn main() {}
