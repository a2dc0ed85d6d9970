use std::path::Path;

use similarity_core::nn::Mode;
use similarity_core::prelude::*;

/// A frozen encoder of a numeric spec vector, whose input (`Vec<f32>`) is not `Hash`.
struct SpecEncoder;

impl Encoder for SpecEncoder {
    type Input = Vec<f32>;
    type Batch = Tensor;
    const NAME: &'static str = "SpecEncoder";
    fn embedding_size(&self) -> usize {
        4
    }
    fn collate(&self, _: &[&Vec<f32>], _: &Device) -> similarity_core::Result<Tensor> {
        unimplemented!()
    }
    fn forward(&self, batch: &Tensor, _: &mut Mode) -> similarity_core::Result<Tensor> {
        Ok(batch.clone())
    }
    fn save(&self, _: &Path) -> similarity_core::Result<()> {
        Ok(())
    }
    fn load(_: &Path, _: &Device) -> similarity_core::Result<Self> {
        Ok(SpecEncoder)
    }
}

impl FrozenEncoder for SpecEncoder {}

#[trainable_model]
struct Model {
    #[encoder(cache = "auto")]
    title: HashedNgramEncoder,
    #[encoder(cache = "cpu")]
    spec: SpecEncoder,
    #[head]
    head: SkipConnectionHead,
    #[loss]
    loss: MultipleNegativesRankingLoss,
}

fn main() {}
