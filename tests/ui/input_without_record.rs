use similarity_core::prelude::*;

#[trainable_model]
struct Model {
    #[encoder(cache = "auto", input = String::as_str)]
    text: HashedNgramEncoder,
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: TripletLoss,
}

fn main() {}
