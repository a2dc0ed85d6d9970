//! Encoders: typed inputs in, embeddings `(batch, embedding_size)` out.
//!
//! An [`Encoder`] turns a batch of its own input type into embeddings in two steps:
//! [`collate`](Encoder::collate) (records → the encoder's batch, e.g. token ids or
//! features) and [`forward`](Encoder::forward) (batch → `(batch, embedding_size)` tensor).
//! Whether an encoder is frozen is known at compile time: frozen encoders implement
//! [`FrozenEncoder`], which is what makes them cacheable. [`Frozen<E>`] freezes any
//! encoder: it never exposes variables to the optimiser and detaches its output.
//!
//! Encoders save themselves into a directory of their own (inside a servable model's
//! directory) and load back from it with [`Encoder::load`].

mod hashed;
#[cfg(feature = "hf-hub")]
pub mod hub;
mod switch;
#[cfg(feature = "transformers")]
pub mod transformer;

use std::path::Path;

use candle_core::{Device, Tensor, Var};

pub use hashed::{HashedNgramConfig, HashedNgramEncoder};
#[cfg(feature = "hf-hub")]
pub use hub::HubModel;
pub use switch::{Route, SwitchBatch, SwitchEncoder};
#[cfg(feature = "transformers")]
pub use transformer::{SentenceTransformer, TransformerBatch};

use crate::error::Result;
use crate::nn::Mode;

/// A model that maps records of type [`Input`](Encoder::Input) to embeddings.
pub trait Encoder: Sized + Send + Sync {
    /// One record, as the encoder consumes it (e.g. `String` for a text encoder).
    type Input;
    /// A collated batch of inputs, ready for [`forward`](Encoder::forward).
    type Batch;
    /// A stable type name, written into a saved model's config and checked on load.
    const NAME: &'static str;

    /// Size `d` of the embeddings this encoder produces.
    fn embedding_size(&self) -> usize;

    /// Turns records into one batch. An error names the record (its index in `inputs`)
    /// and what could not be collated.
    fn collate(&self, inputs: &[&Self::Input], device: &Device) -> Result<Self::Batch>;

    /// Embeds a batch: `(batch, embedding_size)`, `f32`.
    fn forward(&self, batch: &Self::Batch, mode: &mut Mode) -> Result<Tensor>;

    /// The variables the optimiser may change. Frozen encoders return none.
    fn trainable_vars(&self) -> Vec<Var> {
        Vec::new()
    }

    /// Writes the encoder (config and weights) into `dir`, which exists and is empty.
    fn save(&self, dir: &Path) -> Result<()>;

    /// Reads an encoder written by [`save`](Encoder::save), placing tensors on `device`.
    fn load(dir: &Path, device: &Device) -> Result<Self>;

    /// A 128-bit hash of everything that determines this encoder's output (config and
    /// weights), used to tell whether a persisted embedding cache belongs to it. The
    /// default saves the encoder into a temporary directory and hashes the files
    /// ([`fingerprint_by_saving`](crate::cache::store::fingerprint_by_saving)); an
    /// encoder with large weights may override it with something cheaper that still
    /// changes whenever its output would.
    fn fingerprint(&self) -> Result<u128> {
        crate::cache::store::fingerprint_by_saving(self)
    }
}

/// Marker for encoders whose output never changes during training, so it can be cached.
///
/// Implemented by [`Frozen<E>`] and by encoders that have no trainable state.
#[diagnostic::on_unimplemented(
    message = "encoder `{Self}` is trainable, so its embeddings cannot be cached",
    label = "a cached encoder must be frozen",
    note = "wrap the field's type in `Frozen<...>`, or remove the `cache` option"
)]
pub trait FrozenEncoder: Encoder {}

/// Freezes an encoder: no trainable variables, output detached from the graph, always
/// run in evaluation mode (no dropout).
#[derive(Debug, Clone)]
pub struct Frozen<E>(pub E);

impl<E> Frozen<E> {
    /// Wraps `encoder`.
    pub fn new(encoder: E) -> Self {
        Frozen(encoder)
    }

    /// The wrapped encoder.
    pub fn inner(&self) -> &E {
        &self.0
    }
}

impl<E: Encoder> Encoder for Frozen<E> {
    type Input = E::Input;
    type Batch = E::Batch;
    const NAME: &'static str = E::NAME;

    fn embedding_size(&self) -> usize {
        self.0.embedding_size()
    }

    fn collate(&self, inputs: &[&Self::Input], device: &Device) -> Result<Self::Batch> {
        self.0.collate(inputs, device)
    }

    fn forward(&self, batch: &Self::Batch, _mode: &mut Mode) -> Result<Tensor> {
        Ok(self.0.forward(batch, &mut Mode::Eval)?.detach())
    }

    fn save(&self, dir: &Path) -> Result<()> {
        self.0.save(dir)
    }

    fn load(dir: &Path, device: &Device) -> Result<Self> {
        E::load(dir, device).map(Frozen)
    }

    fn fingerprint(&self) -> Result<u128> {
        self.0.fingerprint()
    }
}

impl<E: Encoder> FrozenEncoder for Frozen<E> {}

/// Collates and embeds `inputs` in batches of `batch_size`, concatenating the results:
/// `(inputs.len(), embedding_size)`. Runs in evaluation mode.
pub fn encode_all<E: Encoder>(
    encoder: &E,
    inputs: &[&E::Input],
    batch_size: usize,
    device: &Device,
) -> Result<Tensor> {
    let batch_size = batch_size.max(1);
    let mut parts = Vec::with_capacity(inputs.len().div_ceil(batch_size));
    for chunk in inputs.chunks(batch_size) {
        let batch = encoder.collate(chunk, device)?;
        parts.push(encoder.forward(&batch, &mut Mode::Eval)?.detach());
    }
    if parts.is_empty() {
        return Ok(Tensor::zeros(
            (0, encoder.embedding_size()),
            candle_core::DType::F32,
            device,
        )?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}
