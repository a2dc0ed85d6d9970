use similarity_core::prelude::*;

#[trainable_model]
struct Model {
    #[encoder(cache = "auto")]
    text: HashedNgramEncoder,
    #[head]
    head: MultipleNegativesRankingLoss,
    #[loss(scale = 20.0)]
    loss: SkipConnectionHead,
}

fn main() {
    let _ = Model::new(HashedNgramEncoder::default(), &ModelOptions::default());
}
