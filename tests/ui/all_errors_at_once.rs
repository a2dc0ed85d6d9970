use similarity_core::prelude::*;

#[trainable_model]
struct Model {
    #[encoder(cache = "cpux", batch = 3)]
    #[head]
    text: HashedNgramEncoder,
    untagged: u32,
}

fn main() {}
