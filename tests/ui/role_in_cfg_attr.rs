use similarity_core::prelude::*;

#[trainable_model]
struct Model {
    #[encoder(cache = "auto")]
    text: HashedNgramEncoder,
    #[head]
    head: SkipConnectionHead,
    #[cfg_attr(unix, loss(scale = 20.0))]
    loss: MultipleNegativesRankingLoss,
}

fn main() {
    let _ = Model::new(HashedNgramEncoder::default(), &ModelOptions::default());
}
