use similarity_core::prelude::*;

#[trainable_model]
struct Model {
    #[encoder(cahce = "auto")]
    text: HashedNgramEncoder,
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: MultipleNegativesRankingLoss,
}

fn main() {
    let _ = Model::new(HashedNgramEncoder::default(), &ModelOptions::default());
}
