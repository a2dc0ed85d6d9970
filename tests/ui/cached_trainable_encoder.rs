use std::path::Path;

use similarity_core::nn::Mode;
use similarity_core::prelude::*;

struct Trainable;

impl Encoder for Trainable {
    type Input = String;
    type Batch = ();
    const NAME: &'static str = "Trainable";
    fn embedding_size(&self) -> usize {
        4
    }
    fn collate(&self, _: &[&String], _: &Device) -> similarity_core::Result<()> {
        Ok(())
    }
    fn forward(&self, _: &(), _: &mut Mode) -> similarity_core::Result<Tensor> {
        unimplemented!()
    }
    fn save(&self, _: &Path) -> similarity_core::Result<()> {
        Ok(())
    }
    fn load(_: &Path, _: &Device) -> similarity_core::Result<Self> {
        Ok(Trainable)
    }
}

#[trainable_model]
struct Model {
    #[encoder(cache = "cpu")]
    text: Trainable,
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: MultipleNegativesRankingLoss,
}

fn main() {}
