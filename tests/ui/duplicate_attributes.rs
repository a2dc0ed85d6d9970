use similarity_core::prelude::*;

#[trainable_model]
struct Model {
    #[encoder(cache = "auto", cache = "cpu")]
    #[encoder]
    text: HashedNgramEncoder,
    #[head(n_layers = 1, n_layers = 2)]
    head: SkipConnectionHead,
    #[loss]
    loss: MultipleNegativesRankingLoss,
    #[loss]
    second_loss: MultipleNegativesRankingLoss,
}

fn main() {}
