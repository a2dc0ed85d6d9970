use similarity_core::prelude::*;

#[trainable_model]
struct Model {
    #[cfg(unix)]
    #[encoder(cache = "auto")]
    text: HashedNgramEncoder,
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: MultipleNegativesRankingLoss,
}

fn main() {}
