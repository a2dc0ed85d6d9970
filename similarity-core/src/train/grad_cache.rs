//! GradCache: the exact gradient of a batch loss, computed a mini-batch at a time, so a
//! batch of in-batch negatives far larger than memory allows can train a trainable
//! encoder (Gao, Zhang, Han and Callan 2021, "Scaling Deep Contrastive Learning Batch Size
//! under Memory Limited Setup", <https://arxiv.org/abs/2101.06983>; sentence-transformers'
//! `CachedMultipleNegativesRankingLoss`).
//!
//! A batch loss `L(f_θ(x₁), …, f_θ(x_n))` (MNRL couples every embedding with every other)
//! has, by the chain rule,
//!
//! ```text
//! ∂L/∂θ = Σ_i  (∂L/∂e_i)ᵀ · ∂e_i/∂θ,        e_i = f_θ(x_i)
//! ```
//!
//! so it is computed in three passes over mini-batches `B₁ … B_k` of at most `m` objects:
//! 1. embed every `B_j` **without keeping its graph** (the embeddings are detached as soon
//!    as they exist): `E: (n, d)`, one mini-batch's activations alive at a time;
//! 2. the loss on the whole `E` (a leaf variable), and its gradient `G = ∂L/∂E: (n, d)`;
//!    the loss's own parameters (ArcFace's kernel, …) get their gradient here;
//! 3. embed every `B_j` again **with** its graph and backpropagate the surrogate
//!    `Σ ⟨E_j, G_j⟩` (`G_j` constant), summing the parameter gradients over mini-batches.
//!
//! The result equals the plain loss's gradient up to float rounding (the test checks it):
//! peak memory is one mini-batch's graph plus `E` and `G` (`2 · n · d` floats) instead of
//! the whole batch's graph, for the cost of a second forward pass. Dropout masks of pass 3
//! replay pass 1's (the generator is restored before it), so both passes embed the same
//! function; they differ from the masks a single whole-batch pass would draw.
//!
//! With a cached (frozen) encoder only the head is in the graph, which is small: GradCache
//! is for trainable encoders ([`TrainerConfig::grad_cache`](super::TrainerConfig::grad_cache)).
//!
//! **Over several ranks** (the global batch, [`crate::distributed`]): each rank runs pass 1
//! on its shard, the shards' embeddings are all-gathered into the global `E`, every rank
//! computes the loss and `G` on the whole of it, and pass 3 backpropagates each rank's own
//! rows of `G`, `G[pos]` (`pos`: where its rows sit in the global batch), so each rank's
//! gradient is its shard's share of the global one, which the trainer's all-reduce sums.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use rand::rngs::StdRng;

use super::model::{EncoderBatch, TrainableModel};
use crate::error::{Error, Result};
use crate::nn::Mode;

/// One step's embeddings (detached), loss, and gradients: `None` when the loss is not
/// finite (nothing is backpropagated, as in the plain step).
pub struct CachedStep {
    /// `(n, d)`: the batch's embeddings (the global batch's over several ranks), without
    /// graph.
    pub embeddings: Tensor,
    /// The scalar loss (its graph ends at the embeddings).
    pub loss: Tensor,
    /// The gradient of every trainable variable (head, encoders, loss), where it has one.
    pub grads: Option<GradStore>,
}

/// The number of objects in `batch`.
fn batch_len<R>(batch: &EncoderBatch<'_, R>) -> Result<usize> {
    if let Some(records) = batch.records {
        return Ok(records.len());
    }
    match batch.rows.iter().flatten().next() {
        Some(rows) => Ok(rows.dim(0)?),
        None => Err(Error::invalid(
            "GradCache batch",
            "has neither records nor cache rows",
        )),
    }
}

/// Objects `start .. start + len` of `batch`.
fn slice<'a, R>(
    batch: &EncoderBatch<'a, R>,
    start: usize,
    len: usize,
) -> Result<EncoderBatch<'a, R>> {
    Ok(EncoderBatch {
        records: batch.records.map(|r| &r[start..start + len]),
        rows: batch
            .rows
            .iter()
            .map(|r| r.as_ref().map(|t| t.narrow(0, start, len)).transpose())
            .collect::<std::result::Result<_, _>>()?,
    })
}

/// The step of `batch` by GradCache with mini-batches of `mini_batch` objects: `loss`
/// maps the batch's `(n, d)` embeddings (in batch order) to the scalar loss; see the
/// module docs. Training mode, dropout drawn from `rng`.
pub fn step<M: TrainableModel>(
    model: &M,
    batch: &EncoderBatch<'_, M::Record>,
    mini_batch: usize,
    rng: &mut StdRng,
    loss: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<CachedStep> {
    step_gathered(model, batch, mini_batch, rng, None, loss)
}

/// How a rank's embeddings become the global batch's: `gather` maps this rank's `(n, d)`
/// detached embeddings to the global `(N, d)` ones, in which this rank's row `i` is row
/// `positions[i]`.
pub struct Gather<'g> {
    /// This rank's rows → the global batch (a collective: every rank calls it).
    pub gather: &'g dyn Fn(&Tensor) -> Result<Tensor>,
    /// `(n)`, `u32`: where this rank's rows sit in the global batch.
    pub positions: Tensor,
}

/// [`step`] over the global batch of several ranks (see the module docs); `None` is
/// [`step`]. The returned embeddings are the global batch's.
pub fn step_gathered<M: TrainableModel>(
    model: &M,
    batch: &EncoderBatch<'_, M::Record>,
    mini_batch: usize,
    rng: &mut StdRng,
    gather: Option<&Gather<'_>>,
    loss: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<CachedStep> {
    if mini_batch == 0 {
        return Err(Error::invalid(
            "TrainerConfig.grad_cache",
            "the mini-batch size must be at least 1, got 0",
        ));
    }
    let n = batch_len(batch)?;
    let chunks: Vec<(usize, usize)> = (0..n)
        .step_by(mini_batch)
        .map(|s| (s, mini_batch.min(n - s)))
        .collect();
    let replay = rng.clone();
    // 1. Embeddings without graph.
    let mut parts = Vec::with_capacity(chunks.len());
    for &(start, len) in &chunks {
        let sub = slice(batch, start, len)?;
        parts.push(model.embed(&sub, &mut Mode::Train(&mut *rng))?.detach());
    }
    let mut embeddings = Tensor::cat(&parts, 0)?;
    drop(parts);
    if let Some(g) = gather {
        embeddings = (g.gather)(&embeddings)?.detach();
    }
    // 2. The loss and its gradient at the embeddings.
    let leaf = Var::from_tensor(&embeddings)?;
    let value = loss(leaf.as_tensor())?;
    let finite = value
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?
        .is_finite();
    if !finite {
        return Ok(CachedStep {
            embeddings,
            loss: value,
            grads: None,
        });
    }
    let mut grads = value.backward()?;
    let Some(upstream) = grads.remove(leaf.as_tensor()) else {
        // The loss does not depend on the embeddings: only the loss's own parameters
        // (if any) have gradients.
        return Ok(CachedStep {
            embeddings,
            loss: value.detach(),
            grads: Some(grads),
        });
    };
    // 3. Each mini-batch again, with graph, against its slice of the upstream gradient
    //    (of this rank's rows of the global batch).
    let upstream = match gather {
        Some(g) => upstream.index_select(&g.positions, 0)?,
        None => upstream,
    };
    let vars = model.state().trainable_vars();
    let mut rng = replay;
    for &(start, len) in &chunks {
        let sub = slice(batch, start, len)?;
        let e = model.embed(&sub, &mut Mode::Train(&mut rng))?;
        let surrogate = (e * upstream.narrow(0, start, len)?)?.sum_all()?;
        let part = surrogate.backward()?;
        for var in &vars {
            if let Some(g) = part.get(var.as_tensor()) {
                let sum = match grads.get(var.as_tensor()) {
                    Some(acc) => (acc + g)?,
                    None => g.clone(),
                };
                grads.insert(var.as_tensor(), sum);
            }
        }
    }
    Ok(CachedStep {
        embeddings,
        loss: value.detach(),
        grads: Some(grads),
    })
}
