//! Embedding caches for frozen encoders.
//!
//! A frozen encoder's output never changes, so each distinct object is encoded once,
//! before training, and every later batch is a row lookup:
//!
//! ```text
//! fill:    keys (n) ──dedup──▶ u unique objects ──encode in batches──▶ rows (u, d)
//! lookup:  row ids (batch) ──index_select──▶ (batch, d)
//! ```
//!
//! Objects are identified by a [`CacheKey`]: a 128-bit xxh3 hash of the record (or of a
//! custom key the user derives from it), so an object that appears in many pairs is
//! encoded once. The rows live in one contiguous tensor on the device chosen by the
//! [`CacheType`].
//!
//! # Memory
//!
//! For `u` unique objects of dimension `d` the cache holds exactly `u · d · 4` bytes of
//! rows plus the key index, a `HashMap<u128, u32>`: one bucket is 32 bytes (the
//! `(u128, u32)` entry padded to the `u128` alignment) plus 1 control byte, and the
//! table keeps at most 7/8 of its power-of-two bucket count full. So the index costs
//! between ~38 and ~66 bytes per object (just after a resize), i.e. at most
//! `66 / (4 d)` of the rows: 4.3 % for `d = 384`, 2.1 % for `d = 768`.
//!
//! Worked figure, `u = 1 000 000`, `d = 384`: rows `1 536 000 000` B; the index needs
//! `⌈10⁶ · 8/7⌉ → 2²¹ = 2 097 152` buckets × 33 B = `69 206 016` B; total
//! `1 605 206 016` B = **1.045 ×** the rows, within the 1.1 × budget
//! ([`EncoderCache::memory_bytes`] reports this figure; a unit test checks it). The
//! bound `1 + 66 / (4 d) ≤ 1.1` holds for every `d ≥ 165`; small test dimensions pay
//! relatively more index.
//!
//! Filling a cache kept on the CPU appends each encoded batch to one buffer reserved
//! for all missing objects, which becomes the rows tensor without a copy, so the peak
//! during a first fill is the final size plus one batch. A later fill that adds objects
//! (or a cache on an accelerator, which concatenates batch tensors) briefly holds the
//! old and the new rows together (2 ×).
//!
//! [`store`] saves a filled cache to disk and loads it back, guarded by a fingerprint.

pub mod store;

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3Default;

use crate::error::{Error, Result};

/// Where a cached encoder's embeddings are kept (Quaterion's `CacheType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheType {
    /// On the model's device.
    #[default]
    Auto,
    /// In host memory; batches are copied to the model's device.
    Cpu,
    /// On the accelerator; an error when the model has none.
    Gpu,
    /// Not cached: the encoder runs on every batch.
    None,
}

impl CacheType {
    /// The cache's storage device for a model on `model_device`, or `None` for
    /// [`CacheType::None`].
    pub fn storage_device(self, model_device: &Device) -> Result<Option<Device>> {
        Ok(match self {
            CacheType::None => None,
            CacheType::Auto => Some(model_device.clone()),
            CacheType::Cpu => Some(Device::Cpu),
            CacheType::Gpu if model_device.is_cpu() => {
                return Err(Error::invalid(
                    "cache = \"gpu\"",
                    "the model runs on the CPU, so there is no GPU to keep the cache on; \
                     use cache = \"auto\" or \"cpu\", or build the model on a CUDA/Metal device",
                ));
            }
            CacheType::Gpu => Some(model_device.clone()),
        })
    }
}

/// Identity of a cached object: a 128-bit hash of its key.
pub type CacheKey = u128;

/// The [`CacheKey`] of any hashable value.
pub fn cache_key<T: Hash + ?Sized>(value: &T) -> CacheKey {
    let mut h = Xxh3Default::new();
    value.hash(&mut h);
    h.digest128()
}

/// One encoder's cache: a key index and the rows it points into.
#[derive(Debug)]
pub struct EncoderCache {
    cache_type: CacheType,
    device: Device,
    index: HashMap<CacheKey, u32>,
    rows: Option<Tensor>,
}

impl EncoderCache {
    /// An empty cache of `cache_type` for a model on `model_device`; `None` when the type
    /// is [`CacheType::None`].
    pub fn new(cache_type: CacheType, model_device: &Device) -> Result<Option<Self>> {
        Ok(cache_type
            .storage_device(model_device)?
            .map(|device| EncoderCache {
                cache_type,
                device,
                index: HashMap::new(),
                rows: None,
            }))
    }

    /// The configured type.
    pub fn cache_type(&self) -> CacheType {
        self.cache_type
    }

    /// Number of distinct objects cached.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Bytes held by the embedding rows.
    pub fn bytes(&self) -> usize {
        self.rows
            .as_ref()
            .map_or(0, |t| t.elem_count() * t.dtype().size_in_bytes())
    }

    /// Bytes held by the rows plus the key index (its allocated buckets, 33 bytes each);
    /// see the [module docs](self) for the bound.
    pub fn memory_bytes(&self) -> usize {
        self.bytes() + index_bytes(self.index.capacity())
    }

    /// The embedding size, once something is cached.
    pub fn dim(&self) -> Option<usize> {
        self.rows.as_ref().and_then(|t| t.dims().get(1).copied())
    }

    /// True when `key` is cached.
    pub fn contains(&self, key: &CacheKey) -> bool {
        self.index.contains_key(key)
    }

    /// The cached keys, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = &CacheKey> {
        self.index.keys()
    }

    /// The rows of `keys` (all cached), `(keys.len(), d)`, on the cache's device.
    pub fn rows_of(&self, keys: &[CacheKey]) -> Result<Tensor> {
        let ids: Vec<u32> = keys
            .iter()
            .map(|k| {
                self.index.get(k).copied().ok_or_else(|| {
                    Error::invalid("embedding cache", format!("key {k:032x} is not cached"))
                })
            })
            .collect::<Result<_>>()?;
        self.lookup(&self.row_tensor(ids)?, &self.device)
    }

    /// Adds `keys` (distinct) with their `rows` `(keys.len(), d)`; keys already cached keep
    /// the rows they have.
    pub fn load(&mut self, keys: &[CacheKey], rows: Tensor) -> Result<()> {
        if rows.rank() != 2 || rows.dims()[0] != keys.len() {
            return Err(Error::shape(
                "rows loaded into the cache",
                format!("({}, d)", keys.len()),
                rows.dims(),
            ));
        }
        if let Some(current) = &self.rows
            && current.dim(1)? != rows.dim(1)?
        {
            return Err(Error::shape(
                "rows loaded into the cache",
                format!("(n, {}) like the cached rows", current.dim(1)?),
                rows.dims(),
            ));
        }
        let new: Vec<u32> = (0..keys.len() as u32)
            .filter(|&i| !self.index.contains_key(&keys[i as usize]))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        let rows = rows.to_device(&self.device)?;
        let rows = if new.len() == keys.len() {
            rows
        } else {
            rows.index_select(&Tensor::new(new.as_slice(), &self.device)?, 0)?
        };
        let first = self.index.len() as u32;
        for (i, &k) in new.iter().enumerate() {
            self.index.insert(keys[k as usize], first + i as u32);
        }
        self.rows = Some(match self.rows.take() {
            Some(current) => Tensor::cat(&[&current, &rows], 0)?,
            None => rows,
        });
        Ok(())
    }

    /// Makes sure every key is cached and returns each key's row. Keys not yet cached are
    /// de-duplicated and encoded by `encode`, which receives positions into `keys`
    /// (at most `batch_size` at a time) and returns their embeddings `(len, d)`;
    /// `progress(encoded, to_encode)` follows each batch.
    pub fn fill(
        &mut self,
        keys: &[CacheKey],
        batch_size: usize,
        encode: impl FnMut(&[usize]) -> Result<Tensor>,
        progress: impl FnMut(usize, usize),
    ) -> Result<Vec<u32>> {
        self.fill_by_cost(keys, batch_size, |_| None, encode, progress)
    }

    /// [`fill`](Self::fill), encoding the missing objects in decreasing `cost(position)`
    /// order (stable; `None` costs least), so that each batch holds objects of similar
    /// cost: texts of similar length pad little. Rows are assigned in encoding order;
    /// the returned row of each key is what counts.
    pub fn fill_by_cost(
        &mut self,
        keys: &[CacheKey],
        batch_size: usize,
        cost: impl Fn(usize) -> Option<usize>,
        encode: impl FnMut(&[usize]) -> Result<Tensor>,
        progress: impl FnMut(usize, usize),
    ) -> Result<Vec<u32>> {
        self.fill_sharded(
            keys,
            batch_size,
            cost,
            encode,
            progress,
            &crate::distributed::SingleProcess,
        )
    }

    /// [`fill_by_cost`](Self::fill_by_cost) shared out over the ranks of `comm`: every
    /// rank finds the same missing objects in the same order (the same keys, the same
    /// cache), takes every `world`-th batch of `batch_size` (rank `r` batches `r`,
    /// `r + W`, ...; the batches are those one process would form, so a deterministic
    /// encoder gives the same rows), and the encoded rows are all-gathered, so every rank
    /// ends with the same key → row map and rows. `progress` counts this rank's objects.
    /// Every rank must call it with the same keys (it is collective).
    pub fn fill_sharded(
        &mut self,
        keys: &[CacheKey],
        batch_size: usize,
        cost: impl Fn(usize) -> Option<usize>,
        mut encode: impl FnMut(&[usize]) -> Result<Tensor>,
        mut progress: impl FnMut(usize, usize),
        comm: &dyn crate::distributed::Communicator,
    ) -> Result<Vec<u32>> {
        let mut fresh: HashSet<CacheKey> = HashSet::new();
        let mut missing: Vec<usize> = keys
            .iter()
            .enumerate()
            .filter(|(_, key)| !self.index.contains_key(*key) && fresh.insert(**key))
            .map(|(pos, _)| pos)
            .collect();
        if let Some(order) = crate::encoder::cost_order(missing.len(), |i| cost(missing[i])) {
            missing = order.into_iter().map(|i| missing[i]).collect();
        }
        let first = self.index.len() as u32;
        for (i, &pos) in missing.iter().enumerate() {
            self.index.insert(keys[pos], first + i as u32);
        }
        // Every rank has the same `missing` (a world of one: `comm` never communicates).
        if !missing.is_empty() {
            let encoded = if comm.world_size() > 1 {
                self.encode_rows_sharded(&missing, batch_size, &mut encode, &mut progress, comm)
            } else {
                self.encode_rows(&missing, batch_size, &mut encode, &mut progress)
            };
            match encoded {
                Ok(rows) => self.rows = Some(rows),
                Err(e) => {
                    // Leave the cache as it was: drop the keys that never got rows.
                    for &pos in &missing {
                        self.index.remove(&keys[pos]);
                    }
                    return Err(e);
                }
            }
        }
        Ok(keys.iter().map(|k| self.index[k]).collect())
    }

    /// The current rows followed by the embeddings of `missing`, `(len + missing, d)`.
    fn encode_rows(
        &self,
        missing: &[usize],
        batch_size: usize,
        encode: &mut impl FnMut(&[usize]) -> Result<Tensor>,
        progress: &mut impl FnMut(usize, usize),
    ) -> Result<Tensor> {
        let check = |emb: &Tensor, n: usize, d: Option<usize>| -> Result<()> {
            if emb.rank() != 2 || emb.dims()[0] != n || d.is_some_and(|d| emb.dims()[1] != d) {
                return Err(Error::shape(
                    "encoder output while filling the cache",
                    format!("({n}, {})", d.map_or("d".into(), |d| d.to_string())),
                    emb.dims(),
                ));
            }
            Ok(())
        };
        let mut d = self.dim();
        if self.device.is_cpu() {
            // One buffer for every row: it becomes the tensor without a copy.
            let mut buf: Vec<f32> = match &self.rows {
                Some(old) => old.flatten_all()?.to_vec1::<f32>()?,
                None => Vec::new(),
            };
            for chunk in missing.chunks(batch_size.max(1)) {
                let emb = encode(chunk)?;
                check(&emb, chunk.len(), d)?;
                if d.is_none() {
                    d = Some(emb.dims()[1]);
                    buf.reserve_exact(missing.len() * emb.dims()[1]);
                }
                buf.extend(
                    emb.detach()
                        .to_dtype(candle_core::DType::F32)?
                        .flatten_all()?
                        .to_vec1::<f32>()?,
                );
                progress(chunk.len(), missing.len());
            }
            let d = d.unwrap_or(0);
            let n = buf.len().checked_div(d).unwrap_or(0);
            Ok(Tensor::from_vec(buf, (n, d), &self.device)?)
        } else {
            let mut parts: Vec<Tensor> = self.rows.iter().cloned().collect();
            for chunk in missing.chunks(batch_size.max(1)) {
                let emb = encode(chunk)?;
                check(&emb, chunk.len(), d)?;
                d = Some(emb.dims()[1]);
                parts.push(emb.detach().to_device(&self.device)?);
                progress(chunk.len(), missing.len());
            }
            Ok(Tensor::cat(&parts, 0)?)
        }
    }

    /// [`encode_rows`](Self::encode_rows) over the ranks of `comm`: this rank encodes
    /// batches `rank, rank + W, ...`, and the rows of every batch are all-gathered back
    /// into batch order.
    fn encode_rows_sharded(
        &self,
        missing: &[usize],
        batch_size: usize,
        encode: &mut impl FnMut(&[usize]) -> Result<Tensor>,
        progress: &mut impl FnMut(usize, usize),
        comm: &dyn crate::distributed::Communicator,
    ) -> Result<Tensor> {
        let (rank, world) = (comm.rank(), comm.world_size());
        let batches: Vec<&[usize]> = missing.chunks(batch_size.max(1)).collect();
        let mine: usize = batches
            .iter()
            .skip(rank)
            .step_by(world)
            .map(|b| b.len())
            .sum();
        let mut local: Vec<f32> = Vec::new();
        let mut d = self.dim();
        for batch in batches.iter().skip(rank).step_by(world) {
            let emb = encode(batch)?;
            if emb.rank() != 2
                || emb.dims()[0] != batch.len()
                || d.is_some_and(|d| emb.dims()[1] != d)
            {
                return Err(Error::shape(
                    "encoder output while filling the cache",
                    format!(
                        "({}, {})",
                        batch.len(),
                        d.map_or("d".into(), |d| d.to_string())
                    ),
                    emb.dims(),
                ));
            }
            d = Some(emb.dims()[1]);
            local.extend(
                emb.detach()
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
            progress(batch.len(), mine);
        }
        // The width: each rank's, agreed (a rank without a batch has none to say).
        let widths = comm.all_gather_bytes(&(d.unwrap_or(0) as u64).to_le_bytes())?;
        let widths: Vec<usize> = widths
            .iter()
            .map(|b| {
                b.get(..8)
                    .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8")) as usize)
            })
            .collect();
        let d = widths.iter().copied().max().unwrap_or(0);
        if let Some(r) = widths.iter().position(|&w| w != 0 && w != d) {
            return Err(comm.error(format!(
                "the encoder gives rows of width {} on rank {r} but {d} on another rank",
                widths[r]
            )));
        }
        let counts: Vec<usize> = (0..world)
            .map(|r| {
                batches
                    .iter()
                    .skip(r)
                    .step_by(world)
                    .map(|b| b.len() * d)
                    .sum()
            })
            .collect();
        let all = comm.all_gather_varcount(&local, &counts)?;
        // Rank r's segment starts at the sum of the counts before it; batch i is the
        // next one of rank i mod W.
        let mut next = crate::distributed::offsets(&counts);
        let mut buf: Vec<f32> = match &self.rows {
            Some(old) => old.flatten_all()?.to_vec1::<f32>()?,
            None => Vec::new(),
        };
        buf.reserve_exact(missing.len() * d);
        for (i, batch) in batches.iter().enumerate() {
            let r = i % world;
            let n = batch.len() * d;
            buf.extend_from_slice(&all[next[r]..next[r] + n]);
            next[r] += n;
        }
        let n = buf.len().checked_div(d).unwrap_or(0);
        Ok(Tensor::from_vec(buf, (n, d), &Device::Cpu)?.to_device(&self.device)?)
    }

    /// The embeddings of `rows` (`u32` row ids on any device), on `device`: `(len, d)`.
    pub fn lookup(&self, rows: &Tensor, device: &Device) -> Result<Tensor> {
        let store = self
            .rows
            .as_ref()
            .ok_or_else(|| Error::invalid("embedding cache", "looked up before it was filled"))?;
        if rows.device().is_cpu()
            && rows.dtype() == candle_core::DType::U32
            && let Some(out) = crate::kernels::gather_rows(store, &rows.to_vec1::<u32>()?)?
        {
            return Ok(out.to_device(device)?);
        }
        Ok(store
            .index_select(&rows.to_device(&self.device)?, 0)?
            .to_device(device)?)
    }

    /// Row ids as a tensor on this cache's device, ready for [`lookup`](Self::lookup).
    pub fn row_tensor(&self, rows: Vec<u32>) -> Result<Tensor> {
        let n = rows.len();
        Ok(Tensor::from_vec(rows, n, &self.device)?)
    }
}

/// Bytes of a `HashMap<CacheKey, u32>` with `capacity` usable slots: its power-of-two
/// bucket count (capacity ≈ 7/8 of the buckets) × (entry + 1 control byte).
fn index_bytes(capacity: usize) -> usize {
    if capacity == 0 {
        return 0;
    }
    let buckets = (capacity * 8 / 7).next_power_of_two();
    buckets * (std::mem::size_of::<(CacheKey, u32)>() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_for_a_million_items_of_dim_384_is_within_1_1() {
        // The documented figure, computed from the same formula the cache reports.
        let (u, d) = (1_000_000usize, 384usize);
        let rows = u * d * 4;
        let mut index: HashMap<CacheKey, u32> = HashMap::new();
        index.reserve(u);
        let total = rows + index_bytes(index.capacity());
        assert_eq!(std::mem::size_of::<(CacheKey, u32)>(), 32);
        assert_eq!(index_bytes(index.capacity()), 2_097_152 * 33);
        let ratio = total as f64 / rows as f64;
        assert!(ratio < 1.05, "{ratio} (budget 1.1)");
    }

    #[test]
    fn filled_cache_costs_at_most_1_1_of_its_rows() {
        let (u, d) = (20_000usize, 384usize);
        let mut c = EncoderCache::new(CacheType::Cpu, &Device::Cpu)
            .unwrap()
            .unwrap();
        let keys: Vec<CacheKey> = (0..u as u64).map(|i| cache_key(&i)).collect();
        c.fill(
            &keys,
            4096,
            |pos| {
                Ok(Tensor::zeros(
                    (pos.len(), d),
                    candle_core::DType::F32,
                    &Device::Cpu,
                )?)
            },
            |_, _| {},
        )
        .unwrap();
        let rows = u * d * 4;
        assert_eq!(c.bytes(), rows);
        assert!(
            c.memory_bytes() as f64 <= 1.1 * rows as f64,
            "{}",
            c.memory_bytes()
        );
    }

    #[test]
    fn fill_dedups_and_lookup_returns_rows() {
        let mut c = EncoderCache::new(CacheType::Auto, &Device::Cpu)
            .unwrap()
            .unwrap();
        let texts = ["a", "b", "a", "c", "b"];
        let keys: Vec<CacheKey> = texts.iter().map(cache_key).collect();
        let mut encoded = Vec::new();
        let rows = c
            .fill(
                &keys,
                2,
                |pos| {
                    encoded.extend(pos.iter().map(|&p| texts[p]));
                    let v: Vec<f32> = pos.iter().map(|&p| texts[p].as_bytes()[0] as f32).collect();
                    Ok(Tensor::from_vec(v, (pos.len(), 1), &Device::Cpu)?)
                },
                |_, _| {},
            )
            .unwrap();
        assert_eq!(
            encoded,
            vec!["a", "b", "c"],
            "each distinct object encoded once"
        );
        assert_eq!(rows, vec![0, 1, 0, 2, 1]);
        let got = c
            .lookup(&c.row_tensor(vec![2, 0]).unwrap(), &Device::Cpu)
            .unwrap();
        assert_eq!(got.to_vec2::<f32>().unwrap(), vec![vec![99.0], vec![97.0]]);
        // A second fill only encodes what is new.
        let mut calls = 0;
        let rows = c
            .fill(
                &[cache_key("c"), cache_key("d")],
                8,
                |pos| {
                    calls += pos.len();
                    Ok(Tensor::zeros(
                        (pos.len(), 1),
                        candle_core::DType::F32,
                        &Device::Cpu,
                    )?)
                },
                |_, _| {},
            )
            .unwrap();
        assert_eq!((rows, calls, c.len()), (vec![2, 3], 1, 4));
    }

    #[test]
    fn fill_by_cost_batches_costly_objects_first_and_keeps_each_keys_row() {
        let mut c = EncoderCache::new(CacheType::Auto, &Device::Cpu)
            .unwrap()
            .unwrap();
        // Already cached: never re-encoded, keeps row 0.
        c.fill(
            &[cache_key("zz")],
            4,
            |pos| Ok(Tensor::full(-1f32, (pos.len(), 1), &Device::Cpu)?),
            |_, _| {},
        )
        .unwrap();
        let texts = ["bb", "a", "dddd", "zz", "ccc", "a", "ee"];
        let keys: Vec<CacheKey> = texts.iter().map(cache_key).collect();
        let mut batches: Vec<Vec<&str>> = Vec::new();
        let rows = c
            .fill_by_cost(
                &keys,
                2,
                |p| Some(texts[p].len()),
                |pos| {
                    batches.push(pos.iter().map(|&p| texts[p]).collect());
                    let v: Vec<f32> = pos.iter().map(|&p| texts[p].len() as f32).collect();
                    Ok(Tensor::from_vec(v, (pos.len(), 1), &Device::Cpu)?)
                },
                |_, _| {},
            )
            .unwrap();
        // Decreasing length, ties in data order, each distinct object once.
        assert_eq!(
            batches,
            vec![vec!["dddd", "ccc"], vec!["bb", "ee"], vec!["a"]]
        );
        let got: Vec<f32> = c
            .lookup(&c.row_tensor(rows.clone()).unwrap(), &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got, vec![2.0, 1.0, 4.0, -1.0, 3.0, 1.0, 2.0]);
        assert_eq!(rows[3], 0);
        assert_eq!(rows[1], rows[5]);
    }

    #[test]
    fn a_failed_fill_leaves_the_cache_unchanged() {
        let mut c = EncoderCache::new(CacheType::Cpu, &Device::Cpu)
            .unwrap()
            .unwrap();
        let one = |pos: &[usize]| -> Result<Tensor> {
            Ok(Tensor::ones(
                (pos.len(), 2),
                candle_core::DType::F32,
                &Device::Cpu,
            )?)
        };
        c.fill(&[1, 2], 8, one, |_, _| {}).unwrap();
        let mut calls = 0;
        let e = c.fill(
            &[2, 3, 4],
            1,
            |pos| {
                calls += 1;
                if calls == 2 {
                    Err(Error::invalid("record 4", "cannot collate"))
                } else {
                    one(pos)
                }
            },
            |_, _| {},
        );
        assert!(e.unwrap_err().to_string().contains("record 4"));
        assert_eq!((c.len(), c.bytes()), (2, 16));
        assert!(!c.contains(&3) && c.contains(&2));
        assert_eq!(c.fill(&[3], 8, one, |_, _| {}).unwrap(), vec![2]);
    }

    #[test]
    fn gpu_cache_on_cpu_model_is_a_clear_error() {
        let e = EncoderCache::new(CacheType::Gpu, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("gpu") && e.contains("auto"), "{e}");
        assert!(
            EncoderCache::new(CacheType::None, &Device::Cpu)
                .unwrap()
                .is_none()
        );
    }
}
