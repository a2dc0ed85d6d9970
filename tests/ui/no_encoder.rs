use similarity_core::prelude::*;

#[trainable_model]
struct Model {
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: MultipleNegativesRankingLoss,
}

fn main() {}
