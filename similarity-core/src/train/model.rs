//! The contract between a model and the trainer, and the runtime state that
//! `#[trainable_model]` adds to a model struct.
//!
//! The flow of one batch, for a model with encoders `e₁ … e_k`:
//!
//! ```text
//! records ─┬─ eᵢ cached?  yes: cache rows ──lookup──▶ (B, dᵢ) ─┐
//!          └─             no:  collate ──forward──▶   (B, dᵢ) ─┴─ concat (B, Σdᵢ) ─▶ head ─▶ (B, d_out) ─▶ loss
//! ```
//!
//! [`TrainableModel`] is what the macro implements; [`ModelState`] holds what the user
//! never declares: the trainable variables, the encoders' caches and the device.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};

use crate::cache::store::{self, EncoderFingerprint, Loaded, Session, SlotSession};
use crate::cache::{CacheKey, CacheType, EncoderCache};
use crate::encoder::Encoder;
use crate::error::{Error, Result};
use crate::loss::{LossKind, SimilarityLoss};
use crate::nn::{Mode, Params};

/// The sample type a model trains on: its loss kind's sample over its record type.
pub type SampleOf<M> = <<<M as TrainableModel>::Loss as SimilarityLoss>::Kind as LossKind>::Sample<
    <M as TrainableModel>::Record,
>;

/// A model the [`Trainer`](super::Trainer) can fit; implemented by `#[trainable_model]`.
pub trait TrainableModel: Sized + Send + Sync {
    /// One object as the model consumes it (the encoder's input for one encoder, a
    /// generated struct with a field per encoder otherwise).
    type Record: Send + Sync;
    /// The loss, which fixes the kind of samples the model trains on.
    type Loss: SimilarityLoss;
    /// The model's type name, written into a saved model and checked on load.
    const NAME: &'static str;

    /// The runtime state (variables, caches, device).
    fn state(&self) -> &ModelState;

    /// The loss.
    fn loss(&self) -> &Self::Loss;

    /// Embeds a batch of objects through encoders (or their caches), concatenation and
    /// head: `(batch, output_size)`.
    fn embed(&self, batch: &EncoderBatch<'_, Self::Record>, mode: &mut Mode) -> Result<Tensor>;

    /// Fills the cache of every cached encoder with `records` and returns, per encoder,
    /// each record's cache row.
    fn fill_caches(
        &mut self,
        records: &[&Self::Record],
        batch_size: usize,
        progress: &mut dyn FnMut(&'static str, usize, usize),
    ) -> Result<CachedRows>;

    /// Writes the servable model (encoders, head, loss config, weights) to `dir`
    /// atomically: after a crash `dir` holds the previous model or the new one.
    fn save(&self, dir: &Path) -> Result<()>;

    /// Reads a model written by [`save`](Self::save), placing it on `device`. The
    /// directory must come from the same model type with the same encoders.
    fn load(dir: &Path, device: &Device) -> Result<Self>;

    /// The cross-batch-memory loss of a training batch at optimiser step `step` (already
    /// weighted), or `None` when the model has no memory or it is not active yet.
    fn memory_loss(
        &self,
        _embeddings: &Tensor,
        _targets: &<<Self::Loss as SimilarityLoss>::Kind as LossKind>::Targets,
        _step: usize,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Enqueues a training batch into the cross-batch memory, if the model has one.
    fn memory_enqueue(
        &mut self,
        _embeddings: &Tensor,
        _targets: &<<Self::Loss as SimilarityLoss>::Kind as LossKind>::Targets,
    ) -> Result<()> {
        Ok(())
    }

    /// State beyond the trainable variables that a checkpoint must keep (the memory).
    fn extra_state(&self) -> HashMap<String, Tensor> {
        HashMap::new()
    }

    /// Restores [`extra_state`](Self::extra_state).
    fn load_extra_state(&mut self, _state: &HashMap<String, Tensor>) -> Result<()> {
        Ok(())
    }

    /// Metrics declared on the model with `#[metric]`, each with its `prog_bar` flag.
    fn metrics(&self) -> Vec<(&dyn crate::metric::Metric, bool)> {
        Vec::new()
    }

    /// The optimiser declared with `#[trainable_model(optimizer = ...)]`; it takes
    /// precedence over [`TrainerConfig::optimizer`](super::TrainerConfig::optimizer).
    fn optimizer() -> Option<super::OptimizerConfig> {
        None
    }

    /// Embeds `records` without caches (the serving path), `batch_size` at a time:
    /// `(records.len(), output_size)`.
    ///
    /// Inputs of more than [`ENCODE_PROGRESS_MIN`] records show a progress bar on a terminal.
    fn encode(&self, records: &[Self::Record], batch_size: usize) -> Result<Tensor> {
        let refs: Vec<&Self::Record> = records.iter().collect();
        let bar = if records.len() > ENCODE_PROGRESS_MIN {
            let bar = indicatif::ProgressBar::new(records.len() as u64);
            if let Ok(style) =
                indicatif::ProgressStyle::with_template("encoding [{bar:30}] {pos}/{len} ({eta})")
            {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        } else {
            indicatif::ProgressBar::hidden()
        };
        let mut parts = Vec::new();
        for chunk in refs.chunks(batch_size.max(1)) {
            let batch = EncoderBatch::records(chunk, self.state().encoders());
            parts.push(self.embed(&batch, &mut Mode::Eval)?.detach());
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        if parts.is_empty() {
            return Err(Error::invalid("encode", "no records to encode"));
        }
        Ok(Tensor::cat(&parts, 0)?)
    }
}

/// [`TrainableModel::encode`] shows a progress bar above this many records.
pub const ENCODE_PROGRESS_MIN: usize = 10_000;

/// What the model needs to know about each declared encoder.
#[derive(Debug, Clone)]
pub struct EncoderSlot {
    /// The field name.
    pub name: &'static str,
    /// The encoder's type name.
    pub kind: &'static str,
    /// Its embedding size.
    pub embedding_size: usize,
}

/// Options for building a model.
#[derive(Debug, Clone)]
pub struct ModelOptions {
    /// Device of the head, the loss and the caches (`auto`). Default CPU.
    pub device: Device,
    /// Seed of the parameter initialisation. Default 0.
    pub seed: u64,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            device: Device::Cpu,
            seed: 0,
        }
    }
}

/// The state `#[trainable_model]` adds to a model: variables, caches, device.
#[derive(Debug)]
pub struct ModelState {
    params: Params,
    encoders: Vec<EncoderSlot>,
    encoder_vars: Vec<(String, Var)>,
    caches: Vec<Option<EncoderCache>>,
    /// The open cache-persistence session, if any (see `begin_cache_store`).
    store: std::sync::Mutex<Option<Session>>,
}

impl ModelState {
    /// A state around the head's and loss's variables.
    pub fn new(params: Params) -> Self {
        ModelState {
            params,
            encoders: Vec::new(),
            encoder_vars: Vec::new(),
            caches: Vec::new(),
            store: std::sync::Mutex::new(None),
        }
    }

    /// Opens a cache-persistence session on `dir`: until
    /// [`finish_cache_store`](Self::finish_cache_store), the first fill of each cached
    /// encoder loads `dir/<field>/` into its (empty) cache when the encoder fingerprint
    /// matches, and the keys every fill asks for are recorded. See
    /// [`cache::store`](crate::cache::store) for the rules.
    pub fn begin_cache_store(&self, dir: &Path) {
        *self
            .store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Session {
            dir: dir.to_path_buf(),
            slots: Vec::new(),
        });
    }

    /// Closes the session without writing anything (preparation failed).
    pub fn cancel_cache_store(&self) {
        *self
            .store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    /// Closes the session and writes back each cache the session touched whose content
    /// differs from its file (something was encoded, or the run's key set is not the
    /// file's): exactly the keys the run asked for, atomically. Returns, per encoder
    /// field touched, how many objects were encoded during the session.
    pub fn finish_cache_store(&self) -> Result<Vec<(&'static str, usize)>> {
        let session = self
            .store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let Some(session) = session else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (slot, s) in session.slots.into_iter().enumerate() {
            let (Some(s), Some(cache)) = (s, self.cache(slot)) else {
                continue;
            };
            let name = self.encoders[slot].name;
            out.push((name, s.encoded));
            if s.encoded == 0 && s.file_items == Some(s.seen.len()) {
                continue;
            }
            let mut keys: Vec<CacheKey> = s.seen.into_iter().collect();
            keys.sort_unstable();
            let rows = cache.rows_of(&keys)?;
            store::save(&session.dir.join(name), &s.fingerprint, &keys, &rows)?;
        }
        Ok(out)
    }

    /// Registers the next encoder (in declaration order): its trainable variables and
    /// its cache.
    pub fn add_encoder<E: Encoder>(
        &mut self,
        name: &'static str,
        encoder: &E,
        cache: CacheType,
    ) -> Result<()> {
        self.encoders.push(EncoderSlot {
            name,
            kind: E::NAME,
            embedding_size: encoder.embedding_size(),
        });
        self.encoder_vars.extend(
            encoder
                .trainable_vars()
                .into_iter()
                .enumerate()
                .map(|(i, v)| (format!("encoders.{name}.{i}"), v)),
        );
        self.caches.push(
            EncoderCache::new(cache, self.params.device()).map_err(|e| match e {
                Error::InvalidInput { location, message } => {
                    Error::invalid(format!("encoder `{name}`, {location}"), message)
                }
                other => other,
            })?,
        );
        Ok(())
    }

    /// The model's device.
    pub fn device(&self) -> &Device {
        self.params.device()
    }

    /// Head and loss variables.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// The declared encoders, in order.
    pub fn encoders(&self) -> &[EncoderSlot] {
        &self.encoders
    }

    /// Everything the optimiser updates: head, loss and trainable encoder variables.
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.named_trainable_vars()
            .into_iter()
            .map(|(_, v)| v)
            .collect()
    }

    /// [`trainable_vars`](Self::trainable_vars) with their names: `head.*`, `loss.*`,
    /// and `encoders.<field>.<i>` for the `i`-th variable of a trainable encoder.
    pub fn named_trainable_vars(&self) -> Vec<(String, Var)> {
        let mut v: Vec<(String, Var)> = self
            .params
            .named_vars()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        v.extend(self.encoder_vars.iter().cloned());
        v
    }

    /// The cache of encoder `slot`, if it is cached.
    pub fn cache(&self, slot: usize) -> Option<&EncoderCache> {
        self.caches.get(slot).and_then(Option::as_ref)
    }

    /// Embeds encoder `slot`'s part of a batch: from the cache when the batch carries
    /// cache rows for it, by running the encoder otherwise.
    pub fn embed_encoder<R, E: Encoder>(
        &self,
        slot: usize,
        encoder: &E,
        batch: &EncoderBatch<'_, R>,
        input: impl for<'r> Fn(&'r R) -> &'r E::Input,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        if let (Some(rows), Some(cache)) = (
            batch.rows.get(slot).and_then(Option::as_ref),
            self.cache(slot),
        ) {
            return cache.lookup(rows, self.device());
        }
        let records = batch.records.ok_or_else(|| {
            Error::invalid(
                format!("encoder `{}`", self.encoders[slot].name),
                "the batch has neither cache rows nor records for this encoder",
            )
        })?;
        let inputs: Vec<&E::Input> = records.iter().map(|r| input(r)).collect();
        let name = self.encoders[slot].name;
        let collated = encoder
            .collate(&inputs, self.device())
            .map_err(|e| in_context(e, format!("encoder `{name}`, a batch")))?;
        let out = encoder.forward(&collated, mode)?;
        check_finite(&out, self.encoders[slot].name, |row| {
            format!("record {row} of the batch")
        })?;
        let d = encoder.embedding_size();
        if out.dims() != [inputs.len(), d] {
            return Err(Error::shape(
                format!("output of encoder `{}`", self.encoders[slot].name),
                format!("({}, {d})", inputs.len()),
                out.dims(),
            ));
        }
        Ok(out)
    }

    /// Fills encoder `slot`'s cache (if it has one) with `records`, recording each
    /// record's row in `rows`. `key` gives each record's cache key.
    #[allow(clippy::too_many_arguments)]
    pub fn fill_encoder<R, E: Encoder>(
        &mut self,
        slot: usize,
        encoder: &E,
        records: &[&R],
        input: impl for<'r> Fn(&'r R) -> &'r E::Input,
        key: impl Fn(&R) -> CacheKey,
        batch_size: usize,
        progress: &mut dyn FnMut(&'static str, usize, usize),
        rows: &mut CachedRows,
    ) -> Result<()> {
        let name = self.encoders[slot].name;
        let device = self.device().clone();
        let Some(cache) = self.caches.get_mut(slot).and_then(Option::as_mut) else {
            return Ok(());
        };
        let keys: Vec<CacheKey> = records.iter().map(|r| key(r)).collect();
        let session = self
            .store
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_mut();
        let before = cache.len();
        let mut tracked = None;
        if let Some(session) = session {
            if session.slots.len() <= slot {
                session.slots.resize_with(slot + 1, || None);
            }
            if session.slots[slot].is_none() {
                session.slots[slot] = Some(open_slot(&session.dir, name, encoder, cache, &device)?);
            }
            tracked = session.slots[slot].as_mut();
        }
        if let Some(t) = tracked.as_mut() {
            t.seen.extend(keys.iter().copied());
        }
        let mut done = 0;
        let out = cache.fill(
            &keys,
            batch_size,
            |positions| {
                let inputs: Vec<&E::Input> = positions.iter().map(|&p| input(records[p])).collect();
                // The encoder names the record within this chunk; say where the chunk starts.
                let collated = encoder.collate(&inputs, &device).map_err(|e| {
                    in_context(
                        e,
                        format!(
                            "encoder `{name}`, cache fill from object {} of the data set",
                            positions[0]
                        ),
                    )
                })?;
                let out = encoder.forward(&collated, &mut Mode::Eval)?;
                check_finite(&out, name, |row| {
                    format!(
                        "object {} of the data set (objects are in sample order: for pairs, \
                         sample i holds objects 2i and 2i + 1)",
                        positions[row]
                    )
                })?;
                Ok(out)
            },
            |n, total| {
                done += n;
                progress(name, done, total);
            },
        )?;
        if let Some(t) = tracked {
            t.encoded += cache.len() - before;
        }
        rows.set(slot, out);
        Ok(())
    }
}

/// Prefixes the location of an invalid-input error with `context`.
fn in_context(error: Error, context: String) -> Error {
    match error {
        Error::InvalidInput { location, message } => {
            Error::invalid(format!("{context}, {location}"), message)
        }
        other => other,
    }
}

/// An error naming the encoder and the object when its output holds NaN or ±∞ (every
/// later loss would be NaN, and a cache would keep the bad rows). `object(row)` maps an
/// output row to the object index the user knows.
fn check_finite(out: &Tensor, encoder: &str, object: impl Fn(usize) -> String) -> Result<()> {
    let total = out
        .sum_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?;
    if total.is_finite() {
        return Ok(());
    }
    // Only on this path: find the row (a finite sum can overflow, so confirm one exists).
    let rows = out.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
    match rows.iter().position(|r| r.iter().any(|v| !v.is_finite())) {
        Some(row) => Err(Error::invalid(
            format!("encoder `{encoder}`, {}", object(row)),
            "produced NaN or infinite embeddings; check that record's input for NaN/Inf values",
        )),
        None => Ok(()),
    }
}

/// The first touch of a cached encoder in a persistence session: loads its file into the
/// cache when the cache is empty and the file was written for this encoder.
fn open_slot<E: Encoder>(
    dir: &Path,
    name: &str,
    encoder: &E,
    cache: &mut EncoderCache,
    device: &Device,
) -> Result<SlotSession> {
    let fingerprint = EncoderFingerprint::of(encoder)?;
    let mut file_items = None;
    if cache.is_empty() {
        let path = dir.join(name);
        match store::load(&path, &fingerprint, device)? {
            Loaded::Missing => {}
            Loaded::Stale(reason) => tracing::warn!(
                cache = %path.display(),
                %reason,
                "stale embedding cache: encoding everything again"
            ),
            Loaded::Hit(c) => {
                file_items = Some(c.keys.len());
                cache.load(&c.keys, c.rows)?;
            }
        }
    }
    Ok(SlotSession {
        fingerprint,
        file_items,
        seen: Default::default(),
        encoded: 0,
    })
}

/// Per encoder, the cache row of every prepared object (`None` for uncached encoders).
#[derive(Debug, Clone, Default)]
pub struct CachedRows {
    per_encoder: Vec<Option<Vec<u32>>>,
}

impl CachedRows {
    /// Rows for `encoders` encoders, none filled yet.
    pub fn new(encoders: usize) -> Self {
        CachedRows {
            per_encoder: vec![None; encoders],
        }
    }

    fn set(&mut self, slot: usize, rows: Vec<u32>) {
        self.per_encoder[slot] = Some(rows);
    }

    /// Appends `other`'s rows (objects prepared after this one's), encoder by encoder.
    pub fn append(&mut self, other: CachedRows) {
        if self.per_encoder.is_empty() {
            *self = other;
            return;
        }
        for (mine, theirs) in self.per_encoder.iter_mut().zip(other.per_encoder) {
            if let (Some(m), Some(t)) = (mine.as_mut(), theirs) {
                m.extend(t);
            }
        }
    }

    /// True when some encoder runs on records (it is not cached).
    pub fn needs_records(&self) -> bool {
        self.per_encoder.iter().any(Option::is_none)
    }

    /// Per encoder, the rows of the objects `ids`, as tensors on each cache's device.
    pub fn select(&self, state: &ModelState, ids: &[usize]) -> Result<Vec<Option<Tensor>>> {
        self.per_encoder
            .iter()
            .enumerate()
            .map(|(slot, rows)| match (rows, state.cache(slot)) {
                (Some(rows), Some(cache)) => cache
                    .row_tensor(ids.iter().map(|&i| rows[i]).collect())
                    .map(Some),
                _ => Ok(None),
            })
            .collect()
    }
}

/// One batch of objects, as the encoders see it: cache rows for cached encoders, the
/// records themselves for the others.
#[derive(Debug)]
pub struct EncoderBatch<'a, R> {
    /// The records, in batch order; `None` when every encoder is served from its cache.
    pub records: Option<&'a [&'a R]>,
    /// Per encoder, `u32` cache rows in batch order, or `None` to run the encoder.
    pub rows: Vec<Option<Tensor>>,
}

impl<'a, R> EncoderBatch<'a, R> {
    /// A batch that runs every encoder on `records` (no cache).
    pub fn records(records: &'a [&'a R], encoders: &[EncoderSlot]) -> Self {
        EncoderBatch {
            records: Some(records),
            rows: vec![None; encoders.len()],
        }
    }
}
