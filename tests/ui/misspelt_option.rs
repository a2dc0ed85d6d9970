//! A misspelt struct option is read as the option it resembles, so the misspelling is
//! the only error.
use similarity_core::prelude::*;

pub struct Product {
    title: String,
}

impl Product {
    fn title(&self) -> &String {
        &self.title
    }
}

#[trainable_model(recrod = Product)]
struct Model {
    #[encoder(cache = "auto", input = Product::title)]
    title: HashedNgramEncoder,
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: MultipleNegativesRankingLoss,
}

fn main() {
    let _ = Model::new(HashedNgramEncoder::default(), &ModelOptions::default());
    let _ = Product {
        title: String::new(),
    }
    .title();
}
