use similarity_core::prelude::*;

#[trainable_model]
struct Model<E> {
    #[encoder]
    text: E,
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: MultipleNegativesRankingLoss,
}

fn main() {}
