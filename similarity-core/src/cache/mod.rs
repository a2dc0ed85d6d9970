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
//! [`CacheType`]. Memory: `u · d · 4` bytes plus ~40 bytes of index per unique object.

use std::collections::HashMap;
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

    /// Makes sure every key is cached and returns each key's row. Keys not yet cached are
    /// de-duplicated and encoded by `encode`, which receives positions into `keys`
    /// (at most `batch_size` at a time) and returns their embeddings `(len, d)`;
    /// `progress(encoded, to_encode)` follows each batch.
    pub fn fill(
        &mut self,
        keys: &[CacheKey],
        batch_size: usize,
        mut encode: impl FnMut(&[usize]) -> Result<Tensor>,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Vec<u32>> {
        // New keys get rows after the existing ones; nothing is committed to the index
        // until every new row is encoded, so a failed fill leaves the cache as it was.
        let mut pending: HashMap<CacheKey, u32> = HashMap::new();
        let mut missing: Vec<usize> = Vec::new();
        let base = self.index.len() as u32;
        for (pos, key) in keys.iter().enumerate() {
            if !self.index.contains_key(key) && !pending.contains_key(key) {
                pending.insert(*key, base + missing.len() as u32);
                missing.push(pos);
            }
        }
        if !missing.is_empty() {
            let mut parts: Vec<Tensor> = self.rows.iter().cloned().collect();
            for chunk in missing.chunks(batch_size.max(1)) {
                let emb = encode(chunk)?;
                if emb.dims().first() != Some(&chunk.len()) || emb.rank() != 2 {
                    return Err(Error::shape(
                        "encoder output while filling the cache",
                        format!("({}, d)", chunk.len()),
                        emb.dims(),
                    ));
                }
                parts.push(emb.detach().to_device(&self.device)?);
                progress(chunk.len(), missing.len());
            }
            self.rows = Some(Tensor::cat(&parts, 0)?);
            self.index.extend(pending);
        }
        Ok(keys.iter().map(|k| self.index[k]).collect())
    }

    /// The embeddings of `rows` (`u32` row ids on any device), on `device`: `(len, d)`.
    pub fn lookup(&self, rows: &Tensor, device: &Device) -> Result<Tensor> {
        let store = self
            .rows
            .as_ref()
            .ok_or_else(|| Error::invalid("embedding cache", "looked up before it was filled"))?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
