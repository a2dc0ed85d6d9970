use similarity_core::prelude::*;

#[trainable_model]
struct Model {
    #[encoder(cache = "auto")]
    text: HashedNgramEncoder,
    #[head(n_layer = 2)]
    head: SkipConnectionHead,
    #[loss(symmetric = 1.0)]
    loss: MultipleNegativesRankingLoss,
}

fn main() {}
