//! One model using every kind of component the macro knows: the user's own record type,
//! a cached frozen encoder with a custom key, a trainable encoder, a head with options, a
//! combined group loss with a memory form, cross-batch memory, metrics and the model's
//! own optimiser. It must compile from the macro alone, and train.
#![deny(warnings)]

use std::path::Path;

use similarity_core::loss::{SupConLossConfig, TripletLossConfig, TripletMining};
use similarity_core::nn::{Init, Mode, Params};
use similarity_core::prelude::*;
use similarity_core::candle_core::Var;

/// An item of a catalogue.
pub struct Item {
    title: String,
    pixels: Vec<f32>,
}

fn title(item: &Item) -> &String {
    &item.title
}

fn pixels(item: &Item) -> &Vec<f32> {
    &item.pixels
}

/// A trainable linear encoder of 4 features.
pub struct Linear4(Var);

impl Encoder for Linear4 {
    type Input = Vec<f32>;
    type Batch = Tensor;
    const NAME: &'static str = "Linear4";
    fn embedding_size(&self) -> usize {
        3
    }
    fn collate(&self, inputs: &[&Vec<f32>], device: &Device) -> similarity_core::Result<Tensor> {
        let flat: Vec<f32> = inputs.iter().flat_map(|x| x.iter().copied()).collect();
        Ok(Tensor::from_vec(flat, (inputs.len(), 4), device)?)
    }
    fn forward(&self, batch: &Tensor, _: &mut Mode) -> similarity_core::Result<Tensor> {
        Ok(batch.matmul(self.0.as_tensor())?)
    }
    fn trainable_vars(&self) -> Vec<Var> {
        vec![self.0.clone()]
    }
    fn save(&self, _: &Path) -> similarity_core::Result<()> {
        Ok(())
    }
    fn load(_: &Path, _: &Device) -> similarity_core::Result<Self> {
        Ok(Linear4(Var::zeros((4, 3), similarity_core::DType::F32, &Device::Cpu)?))
    }
}

/// Every component at once.
#[trainable_model(record = Item, optimizer = OptimizerConfig::AdamW { lr: 1e-2, weight_decay: 0.01 })]
pub struct Everything {
    /// Cached by its lower-cased title.
    #[encoder(cache = "cpu", input = title, key = str::to_lowercase)]
    title: Frozen<HashedNgramEncoder>,
    /// Trained with the head.
    #[encoder(input = pixels)]
    pixels: Linear4,
    #[head(n_layers = 2, dropout = 0.1, skip_dropout = 0.1)]
    head: SkipConnectionHead,
    #[loss(
        first = TripletLossConfig { mining: TripletMining::Hard, ..Default::default() },
        second = SupConLossConfig { temperature: 0.2 },
        weights = (1.0, 0.5),
    )]
    loss: CombinedLoss<TripletLoss, SupConLoss>,
    #[xbm(size = 64, weight = 0.5, start_iteration = 2)]
    memory: Xbm,
    #[metric(k = 1, prog_bar)]
    precision: RetrievalPrecision,
    #[metric]
    map: MapAtR,
}

fn main() -> similarity_core::Result<()> {
    let mut params = Params::new(&Device::Cpu, 1);
    params.var("w", &[4, 3], Init::Normal { mean: 0.0, std: 0.5 })?;
    let linear = Linear4(params.named_vars()["w"].clone());
    let mut model = Everything::new(Frozen(HashedNgramEncoder::default()), linear, &ModelOptions::default())?;
    let data: Vec<SimilarityGroupSample<Item>> = (0..24)
        .map(|i| {
            let item = Item { title: format!("Item {}", i % 4), pixels: vec![i as f32 % 3.0, 1.0, 0.5, (i % 4) as f32] };
            SimilarityGroupSample::new(item, (i % 4) as i64)
        })
        .collect();
    let config = TrainerConfig { epochs: 2, batch_size: 8, progress: false, ..Default::default() };
    let report = Trainer::new(config).fit(&mut model, &data, Some(&data))?;
    assert_eq!(report.epochs[1].train_metrics.len(), 2);
    Ok(())
}
