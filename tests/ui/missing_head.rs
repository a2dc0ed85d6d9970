use similarity_core::prelude::*;

#[trainable_model]
struct Model {
    #[encoder(cache = "auto")]
    text: HashedNgramEncoder,
    #[loss]
    loss: MultipleNegativesRankingLoss,
}

fn main() {}
