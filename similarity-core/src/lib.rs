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

/// Everything a model definition and a training script need.
pub mod prelude {
    pub use crate::cache::CacheType;
    pub use crate::data::{SimilarityGroupSample, SimilarityPairSample};
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
        FastAPLoss, MemoryLoss, MultiSimilarityLoss, MultipleNegativesRankingLoss,
        OnlineContrastiveLoss, SimilarityLoss, SoftmaxLoss, SupConLoss, TripletLoss,
    };
    pub use crate::metric::{
        Evaluator, MapAtR, MeanReciprocalRank, Metric, Ndcg, RecallAtK, Relevance,
        RetrievalPrecision, RetrievalRPrecision, RetrievalReciprocalRank,
    };
    pub use crate::train::{ModelOptions, OptimizerConfig, TrainableModel, Trainer, TrainerConfig};
    pub use crate::trainable_model;
    pub use crate::xbm::Xbm;
    pub use crate::{Device, Tensor};
}

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
