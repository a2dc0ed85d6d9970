//! A misspelt role is read as the role it resembles: no "field has no role", no
//! "needs exactly one #[head]", no "cannot find attribute", and the model still builds.
use similarity_core::prelude::*;

#[trainable_model]
struct Model {
    #[encoder(cache = "auto")]
    text: HashedNgramEncoder,
    #[haed(n_layers = 2)]
    head: SkipConnectionHead,
    #[loss]
    loss: MultipleNegativesRankingLoss,
}

fn main() {
    let _ = Model::new(HashedNgramEncoder::default(), &ModelOptions::default());
}
