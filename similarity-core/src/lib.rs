//! # similarity
//!
//! Similarity learning on [Candle](https://github.com/huggingface/candle): fine-tune
//! embeddings so that similar objects end up close. Declare a model as a struct, annotate
//! it with [`trainable_model`], and the macro writes the trainer wiring: the record type,
//! the collation, the caches of frozen encoders, the constructor that sizes the head,
//! and the [`TrainableModel`] implementation that [`Trainer`] drives.
//!
//! ```text
//! records → collate → encoders (or their caches) → concat → head → loss → optimiser
//! ```
//!
//! Quaterion (Qdrant's Python framework) is the reference for components, parameters and
//! defaults; where it is wrong this crate is right and says so in the item's docs.
//!
//! ```
//! use similarity_core::prelude::*;
//!
//! #[trainable_model]
//! pub struct FaqModel {
//!     /// Lexical text encoder; its embeddings are computed once and cached.
//!     #[encoder(cache = "auto")]
//!     text: HashedNgramEncoder,
//!     #[head(n_layers = 1)]
//!     head: SkipConnectionHead,
//!     #[loss(scale = 20.0, symmetric = true)]
//!     loss: MultipleNegativesRankingLoss,
//! }
//!
//! # fn main() -> similarity_core::Result<()> {
//! let mut model = FaqModel::new(HashedNgramEncoder::default(), &ModelOptions::default())?;
//! let pairs = vec![
//!     SimilarityPairSample::positive("how do I resize a disk?".to_string(), "use the resize command".to_string()),
//!     SimilarityPairSample::positive("what does storage cost?".to_string(), "see the pricing page".to_string()),
//! ];
//! let config = TrainerConfig { epochs: 2, batch_size: 2, progress: false, ..Default::default() };
//! let report = Trainer::new(config).fit(&mut model, &pairs, Some(&pairs))?;
//! assert_eq!(report.epochs.len(), 2);
//! let embeddings = model.encode(&["how big can a disk be?".to_string()], 32)?;
//! assert_eq!(embeddings.dims(), &[1, 384]);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

// Lets the macro's absolute `::similarity_core::...` paths resolve inside this crate too.
extern crate self as similarity_core;

pub mod cache;
pub mod data;
pub mod distance;
pub mod distributed;
pub mod encoder;
pub mod error;
pub mod files;
pub mod head;
mod kernels;
pub mod limits;
pub mod loss;
pub mod metric;
pub mod model;
pub mod nn;
mod roles;
pub mod train;
pub mod xbm;

pub use candle_core::{self, DType, Device, Tensor};
pub use error::{Error, Result};
pub use similarity_macros::trainable_model;
pub use train::{TrainableModel, Trainer, TrainerConfig};

/// Everything a model definition and a training script need: `use
/// similarity_core::prelude::*;`.
///
/// * the macro and the components: [`trainable_model`], every built-in encoder, head,
///   loss and metric, [`Xbm`](crate::xbm::Xbm), the traits they implement, and the enums
///   their options take ([`Distance`](crate::distance::Distance),
///   [`TripletMining`](crate::loss::TripletMining), [`PairMining`](crate::loss::PairMining),
///   [`CacheType`](crate::cache::CacheType));
/// * what an encoder of your own is written with: [`Params`](crate::nn::Params),
///   [`ParamScope`](crate::nn::ParamScope), [`Init`](crate::nn::Init),
///   [`Linear`](crate::nn::Linear), [`Mode`](crate::nn::Mode), [`Tensor`], [`Var`],
///   [`Device`], [`DType`];
/// * the data and the trainer: the samples, [`Sampler`](crate::data::Sampler),
///   [`ClassBalancedSampler`](crate::data::ClassBalancedSampler), [`Trainer`],
///   [`TrainerConfig`] and the types of its fields ([`OptimizerConfig`](crate::train::OptimizerConfig),
///   [`LrSchedule`](crate::train::LrSchedule), [`ParamGroup`](crate::train::ParamGroup),
///   [`CheckpointConfig`](crate::train::CheckpointConfig),
///   [`EarlyStopping`](crate::train::EarlyStopping), [`MonitorMode`](crate::train::MonitorMode),
///   [`NonFinitePolicy`](crate::train::NonFinitePolicy)), what it returns
///   ([`FitReport`](crate::train::FitReport), [`Evaluation`](crate::train::Evaluation)) and
///   [`ModelOptions`](crate::train::ModelOptions).
///
/// Not in it: [`Result`] and [`Error`] (they would shadow yours; write
/// `similarity_core::Result`), and the file helpers of an encoder's `save`/`load`
/// ([`model::write_json`], [`model::read_json`]).
///
/// [`Var`]: candle_core::Var
pub mod prelude {
    pub use crate::cache::CacheType;
    pub use crate::data::{
        ClassBalancedSampler, Sampler, SimilarityGroupSample, SimilarityPairSample,
    };
    pub use crate::distance::Distance;
    #[cfg(feature = "hf-hub")]
    pub use crate::encoder::HubModel;
    #[cfg(feature = "transformers")]
    pub use crate::encoder::SentenceTransformer;
    pub use crate::encoder::{
        Encoder, Frozen, FrozenEncoder, HashedNgramConfig, HashedNgramEncoder, Route, SwitchEncoder,
    };
    pub use crate::head::{
        Activation, EmptyHead, GatedHead, Head, Layer, LinearHead, SequentialHead,
        SkipConnectionHead, SoftmaxEmbeddingsHead, StackedProjectionHead, SwitchHead, SwitchOption,
        WideningHead,
    };
    pub use crate::loss::{
        ArcFaceLoss, CenterLoss, CircleLoss, CombinedLoss, ContrastiveLoss, CosFaceLoss,
        FastAPLoss, MatryoshkaLoss, MemoryLoss, MultiSimilarityLoss, MultipleNegativesRankingLoss,
        OnlineContrastiveLoss, PairMining, SimilarityLoss, SoftmaxLoss, SupConLoss, TripletLoss,
        TripletMining,
    };
    pub use crate::metric::{
        Evaluator, MapAtR, MeanReciprocalRank, Metric, Ndcg, RPrecision, RecallAtK, Relevance,
        RetrievalPrecision, RetrievalRPrecision, RetrievalReciprocalRank,
    };
    pub use crate::nn::{Init, Linear, Mode, ParamScope, Params};
    pub use crate::train::{
        CheckpointConfig, EarlyStopping, Evaluation, FitReport, LrSchedule, ModelOptions,
        MonitorMode, NonFinitePolicy, OptimizerConfig, ParamGroup, TrainableModel, Trainer,
        TrainerConfig,
    };
    pub use crate::trainable_model;
    pub use crate::xbm::Xbm;
    pub use crate::{DType, Device, Tensor};
    pub use candle_core::Var;
}

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

/// What `#[trainable_model]` expansions refer to. Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::cache::{CacheType, cache_key};
    pub use crate::encoder::{Encoder, FrozenEncoder};
    pub use crate::files::read_dir_consistently;
    pub use crate::head::Head;
    pub use crate::loss::{LossKind, MemoryLoss, SimilarityLoss};
    pub use crate::metric::Metric;
    pub use crate::model::{ServableReader, ServableWriter};
    pub use crate::nn::{Mode, Params};
    pub use crate::train::{
        CachedRows, EncoderBatch, ModelOptions, ModelState, OptimizerConfig, TrainableModel,
    };
    pub use crate::xbm::{Xbm, XbmConfig};
    pub use crate::{Device, Error, Result, Tensor};
    pub use ::core::default::Default;
    pub use ::core::ops::FnMut;
    pub use ::std::collections::HashMap;
    pub use ::std::path::Path;

    pub use crate::roles::{
        CachedByInputField, CachedEncoderField, EncoderField, HashKey, MetricField, XbmField,
        memory_enqueue, memory_loss,
    };
}
