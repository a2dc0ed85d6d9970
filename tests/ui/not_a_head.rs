use similarity_core::prelude::*;

#[trainable_model]
struct Model {
    #[encoder(cache = "auto")]
    text: HashedNgramEncoder,
    #[head]
    head: TripletLoss,
    #[loss]
    loss: MultipleNegativesRankingLoss,
}

fn main() {}
