//! A user's program written from the README alone (first built as a crate of its own
//! outside the workspace, with a path dependency and the README's profile section): an
//! encoder of its own, a model of two encoders of different kinds, and a group model with
//! cross-batch memory; all from the prelude, with the library's file helpers.
#![deny(warnings)]

use std::path::Path;

use similarity_core::model::{read_json, write_json};
use similarity_core::prelude::*;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SpecConfig {
    pub inputs: usize,
    pub dim: usize,
    pub seed: u64,
}

pub struct SpecEncoder {
    config: SpecConfig,
    params: Params,
    layer: Linear,
}

impl SpecEncoder {
    pub fn new(config: SpecConfig, device: &Device) -> similarity_core::Result<Self> {
        let mut params = Params::new(device, config.seed);
        let layer = Linear::new(config.inputs, config.dim, true, &mut params.scope("layer"))?;
        Ok(SpecEncoder {
            config,
            params,
            layer,
        })
    }
}

impl Encoder for SpecEncoder {
    type Input = Vec<f32>;
    type Batch = Tensor;
    const NAME: &'static str = "SpecEncoder";
    fn embedding_size(&self) -> usize {
        self.config.dim
    }
    fn collate(&self, inputs: &[&Vec<f32>], device: &Device) -> similarity_core::Result<Tensor> {
        let flat: Vec<f32> = inputs.iter().flat_map(|x| x.iter().copied()).collect();
        Ok(Tensor::from_vec(
            flat,
            (inputs.len(), self.config.inputs),
            device,
        )?)
    }
    fn forward(&self, batch: &Tensor, _mode: &mut Mode) -> similarity_core::Result<Tensor> {
        self.layer.forward(batch)
    }
    fn trainable_vars(&self) -> Vec<Var> {
        self.params.vars()
    }
    fn save(&self, dir: &Path) -> similarity_core::Result<()> {
        write_json(&dir.join("config.json"), &self.config)?;
        self.params
            .save_safetensors(&dir.join("weights.safetensors"))
    }
    fn load(dir: &Path, device: &Device) -> similarity_core::Result<Self> {
        let e = SpecEncoder::new(read_json(&dir.join("config.json"))?, device)?;
        e.params
            .load_safetensors(&dir.join("weights.safetensors"))?;
        Ok(e)
    }
}

/// Title (cached) + spec vector (trained).
#[trainable_model]
pub struct ProductModel {
    #[encoder(cache = "auto")]
    title: HashedNgramEncoder,
    #[encoder]
    spec: SpecEncoder,
    #[head(dropout = 0.1)]
    head: SkipConnectionHead,
    #[loss(scale = 20.0, symmetric = true)]
    loss: MultipleNegativesRankingLoss,
    #[metric(k = 1)]
    precision: RetrievalPrecision,
}

/// Groups with cross-batch memory.
#[trainable_model]
pub struct GroupModel {
    #[encoder(cache = "auto")]
    text: HashedNgramEncoder,
    #[head]
    head: GatedHead,
    #[loss(margin = 0.5, mining = TripletMining::Hard)]
    loss: TripletLoss,
    #[xbm(size = 64, weight = 1.0, start_iteration = 2)]
    memory: Xbm,
}

fn main() -> similarity_core::Result<()> {
    let record = |t: &str, s: f32| ProductModelRecord {
        title: t.to_string(),
        spec: vec![s, 1.0 - s],
    };
    let pairs: Vec<_> = (0..8)
        .map(|i| {
            let s = i as f32 / 8.0;
            SimilarityPairSample::positive(
                record(&format!("item {i}"), s),
                record(&format!("ITEM {i}"), s + 0.01),
            )
        })
        .collect();
    let spec = SpecEncoder::new(
        SpecConfig {
            inputs: 2,
            dim: 4,
            seed: 3,
        },
        &Device::Cpu,
    )?;
    let mut model = ProductModel::new(
        HashedNgramEncoder::default(),
        spec,
        &ModelOptions::default(),
    )?;
    let trainer = Trainer::new(TrainerConfig {
        epochs: 3,
        batch_size: 4,
        progress: false,
        early_stopping: Some(EarlyStopping {
            monitor: "precision@1".into(),
            mode: MonitorMode::Max,
            patience: 5,
            min_delta: 0.0,
        }),
        ..Default::default()
    });
    let report = trainer.fit(&mut model, &pairs, Some(&pairs))?;
    let validation = report.epochs.last().unwrap().validation.clone().unwrap();
    assert!(validation.metric("precision@1").is_some() && validation.metric("mrr").is_some());
    let dir = std::env::temp_dir().join(format!("readme-user-crate-{}", std::process::id()));
    model.save(&dir)?;
    let loaded = ProductModel::load(&dir, &Device::Cpu)?;
    let e = loaded.encode(&[pairs[0].obj_a.clone()], 4)?;
    assert_eq!(e.dims(), &[1, 388]);
    std::fs::remove_dir_all(&dir).ok();

    let data: Vec<_> = (0..12)
        .map(|i| SimilarityGroupSample::new(format!("group {} item {i}", i % 3), (i % 3) as i64))
        .collect();
    let mut gm = GroupModel::new(HashedNgramEncoder::default(), &ModelOptions::default())?;
    let report = Trainer::new(TrainerConfig {
        epochs: 3,
        batch_size: 6,
        progress: false,
        ..Default::default()
    })
    .fit(&mut gm, &data, Some(&data))?;
    let validation = report.epochs.last().unwrap().validation.clone().unwrap();
    assert!(validation.metric("r_precision").is_some());
    Ok(())
}
