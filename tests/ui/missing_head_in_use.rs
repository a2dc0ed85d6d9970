//! A model with an error still has its `new` and its `TrainableModel` impl (stubs), so
//! the code that builds and trains it adds no error of its own.
use similarity_core::prelude::*;

#[trainable_model]
struct Model {
    #[encoder(cache = "auto")]
    question: HashedNgramEncoder,
    #[encoder]
    answer: Frozen<HashedNgramEncoder>,
    #[loss]
    loss: MultipleNegativesRankingLoss,
}

fn main() {
    let encoder = HashedNgramEncoder::default();
    let mut model = Model::new(encoder.clone(), Frozen(encoder), &ModelOptions::default()).unwrap();
    let record = ModelRecord {
        question: "q".to_string(),
        answer: "a".to_string(),
    };
    let pairs = vec![SimilarityPairSample::positive(record.clone(), record)];
    let _ = Trainer::new(TrainerConfig::default()).fit(&mut model, &pairs, None);
}
