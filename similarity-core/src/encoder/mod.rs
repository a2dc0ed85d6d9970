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
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an encoder",
    label = "`Encoder` is not implemented for `{Self}`",
    note = "an #[encoder] field holds an encoder: a built-in one such as `HashedNgramEncoder`, or a type of yours that implements `Encoder` (README, \"Your own encoder\")"
)]
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

    /// How costly `input` is to embed next to other inputs, e.g. a text's length, or
    /// `None` (the default) when all inputs cost the same.
    ///
    /// Batched inference (the cache fill, [`encode_all`]) embeds inputs in decreasing
    /// cost order so that inputs padded into one batch have similar sizes (a transformer
    /// pads every text to the batch's longest); results keep the input order.
    fn cost_hint(&self, input: &Self::Input) -> Option<usize> {
        let _ = input;
        None
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
    message = "`{Self}` is not a frozen encoder, so its embeddings cannot be cached",
    label = "a cached encoder must be frozen",
    note = "wrap a trainable encoder in `Frozen<...>`, or remove the `cache` option; an encoder of yours with nothing to train implements `FrozenEncoder` (an empty impl)"
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

#[diagnostic::do_not_recommend]
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

    fn cost_hint(&self, input: &Self::Input) -> Option<usize> {
        self.0.cost_hint(input)
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

#[diagnostic::do_not_recommend]
impl<E: Encoder> FrozenEncoder for Frozen<E> {}

/// Collates and embeds `inputs` in batches of `batch_size`, concatenating the results:
/// `(inputs.len(), embedding_size)`, row `i` for `inputs[i]`. Runs in evaluation mode.
/// Batches are formed in decreasing [`cost_hint`](Encoder::cost_hint) order when the
/// encoder gives one.
pub fn encode_all<E: Encoder>(
    encoder: &E,
    inputs: &[&E::Input],
    batch_size: usize,
    device: &Device,
) -> Result<Tensor> {
    let batch_size = batch_size.max(1);
    let order = cost_order(inputs.len(), |i| encoder.cost_hint(inputs[i]));
    let ordered: Vec<&E::Input> = match &order {
        Some(order) => order.iter().map(|&i| inputs[i]).collect(),
        None => inputs.to_vec(),
    };
    let mut parts = Vec::with_capacity(inputs.len().div_ceil(batch_size));
    for chunk in ordered.chunks(batch_size) {
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
    restore_order(Tensor::cat(&parts, 0)?, order.as_deref())
}

/// Rows embedded in `order` (row `k` belongs to input `order[k]`) put back in input order.
pub(crate) fn restore_order(rows: Tensor, order: Option<&[usize]>) -> Result<Tensor> {
    let Some(order) = order else {
        return Ok(rows);
    };
    let mut back = vec![0u32; order.len()];
    for (k, &i) in order.iter().enumerate() {
        back[i] = k as u32;
    }
    let back = Tensor::from_vec(back, order.len(), rows.device())?;
    Ok(rows.index_select(&back, 0)?)
}

/// Positions `0..n` sorted by decreasing `cost` (stable), or `None` when no position has
/// a cost or the order would not change.
pub(crate) fn cost_order(n: usize, cost: impl Fn(usize) -> Option<usize>) -> Option<Vec<usize>> {
    let costs: Vec<Option<usize>> = (0..n).map(cost).collect();
    if costs.iter().all(Option::is_none) {
        return None;
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(costs[i]));
    (order.iter().enumerate().any(|(k, &i)| k != i)).then_some(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Embeds a string as `[len, first byte]`; its cost is its length.
    struct ByLength;

    impl Encoder for ByLength {
        type Input = String;
        type Batch = Vec<String>;
        const NAME: &'static str = "ByLength";
        fn embedding_size(&self) -> usize {
            2
        }
        fn cost_hint(&self, input: &String) -> Option<usize> {
            Some(input.len())
        }
        fn collate(&self, inputs: &[&String], _device: &Device) -> Result<Vec<String>> {
            Ok(inputs.iter().map(|s| (*s).clone()).collect())
        }
        fn forward(&self, batch: &Vec<String>, _mode: &mut Mode) -> Result<Tensor> {
            // Every row of a batch must be as long as the batch's longest: a stand-in for
            // padding, so a mixed batch shows up in the output.
            let longest = batch.iter().map(String::len).max().unwrap_or(0);
            let v: Vec<f32> = batch
                .iter()
                .flat_map(|s| [longest as f32, s.as_bytes()[0] as f32])
                .collect();
            Ok(Tensor::from_vec(v, (batch.len(), 2), &Device::Cpu)?)
        }
        fn save(&self, _dir: &Path) -> Result<()> {
            Ok(())
        }
        fn load(_dir: &Path, _device: &Device) -> Result<Self> {
            Ok(ByLength)
        }
    }

    #[test]
    fn encode_all_batches_by_cost_and_returns_rows_in_input_order() {
        let texts: Vec<String> = ["bb", "a", "dddd", "ccc", "e"].map(String::from).to_vec();
        let refs: Vec<&String> = texts.iter().collect();
        let out = encode_all(&ByLength, &refs, 2, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        // Batches: [dddd, ccc], [bb, a], [e]: each row padded to its batch's longest.
        let want: Vec<Vec<f32>> = [(2, b'b'), (2, b'a'), (4, b'd'), (4, b'c'), (1, b'e')]
            .iter()
            .map(|&(len, first)| vec![len as f32, first as f32])
            .collect();
        assert_eq!(out, want);
    }

    #[test]
    fn cost_order_is_stable_and_none_when_nothing_changes() {
        assert_eq!(cost_order(3, |_| None), None);
        assert_eq!(cost_order(3, |i| Some(3 - i)), None);
        assert_eq!(
            cost_order(4, |i| Some([1, 5, 1, 7][i])),
            Some(vec![3, 1, 0, 2])
        );
    }
}
