//! What `#[trainable_model]` asks of each field's type.
//!
//! The macro writes one `where` predicate per field on every item it generates, spanned
//! at the field's type: `Encoder` (`EncoderField` where the input goes into the model's
//! record), `CachedEncoderField` or `CachedByInputField` for a cached encoder, `Head`,
//! `SimilarityLoss` (and `MemoryLoss` with `#[xbm]`), [`XbmField`], [`MetricField`]. A
//! type that does not fit its role then gives exactly one error, at the field: rustc
//! reports a false predicate of a non-generic item once (the copies on the other items
//! are the same diagnostic, and are merged), and the items' bodies assume it, so no use
//! of the type adds another. rustc reports the first trait of the bundle that fails
//! (`Encoder` for a type that is not an encoder, `FrozenEncoder` for a trainable one,
//! [`HashKey`] for an input that is not `Hash`), so each of those traits carries the
//! `on_unimplemented` message that names the fix, and the library's implementations are
//! `do_not_recommend`, so that no list of implementors is printed instead.

use std::hash::Hash;

use candle_core::{Device, Tensor};

use crate::cache::{CacheKey, cache_key};
use crate::encoder::{Encoder, FrozenEncoder};
use crate::error::Result;
use crate::loss::{LossKind, MemoryLoss};
use crate::metric::Metric;
use crate::xbm::{Xbm, XbmConfig};

/// An `#[encoder]` field whose input is (part of) the model's record, which the trainer
/// shares between threads.
pub trait EncoderField: Encoder<Input: Send + Sync> {}

impl<E> EncoderField for E
where
    E: Encoder,
    E::Input: Send + Sync,
{
}

/// A cached `#[encoder(cache = ..., key = ...)]` field.
pub trait CachedEncoderField: EncoderField + FrozenEncoder {}

impl<E: EncoderField + FrozenEncoder> CachedEncoderField for E {}

/// A cached `#[encoder(cache = ...)]` field without `key`: its input is its own cache key.
pub trait CachedByInputField: CachedEncoderField + Encoder<Input: HashKey> {}

impl<E> CachedByInputField for E
where
    E: CachedEncoderField,
    E::Input: HashKey,
{
}

/// The cache key of an input that is its own key: its hash.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not `Hash`, so a cached encoder's input of this type cannot be its own cache key",
    label = "a cached encoder needs a cache key",
    note = "name a key function in the field's attribute, `#[encoder(cache = \"auto\", key = your_fn)]`, with `fn your_fn(input: &{Self}) -> impl Hash` (an id, a string); objects with equal keys are encoded once"
)]
pub trait HashKey {
    /// The key of `self` ([`cache_key`]).
    fn hash_key(&self) -> CacheKey;
}

#[diagnostic::do_not_recommend]
impl<T: Hash + ?Sized> HashKey for T {
    fn hash_key(&self) -> CacheKey {
        cache_key(self)
    }
}

/// The type of the `#[xbm]` field: [`Xbm`] itself (its options are the attribute's).
#[diagnostic::on_unimplemented(
    message = "the type of an #[xbm] field is `Xbm`, not `{Self}`",
    label = "write `Xbm` here",
    note = "the memory's options go in the attribute: `#[xbm(size = 4096, weight = 1.0, start_iteration = 100)] memory: Xbm`"
)]
pub trait XbmField: Sized {
    /// Builds the memory from the attribute's options.
    fn build(config: XbmConfig, device: &Device) -> Result<Self>;
    /// The memory.
    fn xbm(&self) -> &Xbm;
    /// The memory, to enqueue into.
    fn xbm_mut(&mut self) -> &mut Xbm;
}

#[diagnostic::do_not_recommend]
impl XbmField for Xbm {
    fn build(config: XbmConfig, device: &Device) -> Result<Self> {
        Xbm::new(config, device)
    }
    fn xbm(&self) -> &Xbm {
        self
    }
    fn xbm_mut(&mut self) -> &mut Xbm {
        self
    }
}

/// The type of a `#[metric]` field: built from `Default` and the attribute's options.
pub trait MetricField: Metric + Default + 'static {}

impl<M: Metric + Default + 'static> MetricField for M {}

/// The memory loss of a batch: `xbm`'s loss against `targets`' groups (see [`Xbm::loss`]).
/// Generic, so that the expansion never reads group targets off a loss of another kind.
pub fn memory_loss<L: MemoryLoss>(
    xbm: &Xbm,
    loss: &L,
    embeddings: &Tensor,
    targets: &<L::Kind as LossKind>::Targets,
    step: usize,
) -> Result<Option<Tensor>> {
    xbm.loss(loss, embeddings, &targets.groups, step)
}

/// Enqueues a batch's embeddings with `targets`' groups (see [`Xbm::enqueue`]).
pub fn memory_enqueue<L: MemoryLoss>(
    xbm: &mut Xbm,
    embeddings: &Tensor,
    targets: &<L::Kind as LossKind>::Targets,
) -> Result<()> {
    xbm.enqueue(embeddings, &targets.groups)
}
