//! Persistent embedding caches: a filled [`EncoderCache`](super::EncoderCache) saved to
//! disk and reused by the next run when it provably belongs to the same encoder.
//!
//! # Layout
//!
//! One directory per cached encoder field, `<cache_dir>/<field>/`, written atomically by
//! [`files::write_dir`] (a crash leaves the previous directory or
//! the new one; a second process writing the same cache is told it is in use) and read as
//! one version of the directory:
//!
//! ```text
//! fingerprint.json   format_version, encoder type, encoder content hash, embedding size d,
//!                    item count u, xxh3-128 checksum of rows.bin
//! rows.bin           b"SIMCACHE" · u keys (u128 LE, strictly increasing) · u·d f32 LE rows
//! ```
//!
//! # When a file is reused
//!
//! A row is a pure function of (encoder, object key). A file is used only when its
//! *encoder fingerprint* matches exactly: same type name, same embedding size and same
//! [`Encoder::fingerprint`] (by default a hash of
//! everything [`Encoder::save`] writes: config and
//! weights). Otherwise the file is *stale*: a warning is logged and every object is
//! encoded again.
//!
//! The *dataset keys* are the second half of the fingerprint: the file records exactly
//! the keys the run that wrote it prepared. When the current run's keys differ, the
//! difference is detected: keys the file holds are served from it (their rows are exact
//! for this encoder), new keys are encoded, and the file is rewritten with exactly the
//! current run's keys (removed objects are dropped). A run that encodes nothing and whose
//! key set equals the file's leaves the file untouched. The key of an object must be a
//! pure function of it (the default key hashes the whole record); changing a custom
//! `key = ...` function so that one key now names another object cannot be detected.
//!
//! # Damaged files
//!
//! A missing directory is a plain miss. A file that exists but is unreadable, truncated,
//! over-long, fails its checksum, holds non-finite values or unsorted keys is an
//! [`Error::Format`] naming the file and saying to delete the directory; it is never
//! silently rebuilt (writes are atomic, so damage means something outside this library
//! changed the file) and never panics. The size of `rows.bin` is checked against the
//! header (with overflow-checked arithmetic) *before* anything is allocated, so a hostile
//! count cannot drive an allocation larger than the file itself.

use std::collections::HashSet;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{Xxh3Default, xxh3_128};

use super::CacheKey;
use crate::encoder::Encoder;
use crate::error::{Error, Result};
use crate::files::{self, read_json, write_json};

/// Version of the on-disk cache layout.
pub const CACHE_FORMAT_VERSION: u32 = 1;
const FINGERPRINT: &str = "fingerprint.json";
const ROWS: &str = "rows.bin";
const MAGIC: &[u8; 8] = b"SIMCACHE";

/// What identifies the encoder that produced a cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncoderFingerprint {
    /// The encoder's type name ([`Encoder::NAME`]).
    pub encoder_type: String,
    /// [`Encoder::fingerprint`] as 32 hex digits.
    pub encoder_hash: String,
    /// Embedding size `d`.
    pub embedding_size: usize,
}

impl EncoderFingerprint {
    /// The fingerprint of `encoder` (runs [`Encoder::fingerprint`]).
    pub fn of<E: Encoder>(encoder: &E) -> Result<Self> {
        Ok(EncoderFingerprint {
            encoder_type: E::NAME.to_string(),
            encoder_hash: format!("{:032x}", encoder.fingerprint()?),
            embedding_size: encoder.embedding_size(),
        })
    }
}

/// `fingerprint.json` of a saved cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheHeader {
    /// See [`CACHE_FORMAT_VERSION`].
    pub format_version: u32,
    /// The encoder that produced the rows.
    pub encoder: EncoderFingerprint,
    /// Number of cached objects `u`.
    pub items: usize,
    /// xxh3-128 of `rows.bin`, as 32 hex digits.
    pub checksum: String,
}

/// A cache read back from disk: `keys` (sorted, distinct) and their `rows`, `(u, d)`.
#[derive(Debug)]
pub struct LoadedCache {
    /// The object keys, strictly increasing.
    pub keys: Vec<CacheKey>,
    /// Their embeddings, `(keys.len(), d)`, `f32`, on the requested device.
    pub rows: Tensor,
}

/// The outcome of [`load`].
#[derive(Debug)]
pub enum Loaded {
    /// No cache directory.
    Missing,
    /// A cache of another encoder (or layout version); the reason, for the log.
    Stale(String),
    /// A valid cache of this encoder.
    Hit(LoadedCache),
}

/// The default [`Encoder::fingerprint`]: saves `encoder` into a fresh temporary
/// directory and hashes every file (relative path, length, bytes) in path order.
pub fn fingerprint_by_saving<E: Encoder>(encoder: &E) -> Result<u128> {
    let dir = files::ScratchDir::new("fingerprint")?;
    encoder.save(dir.path())?;
    hash_dir(dir.path())
}

/// xxh3-128 over every file under `dir`: relative path, length and bytes, in path order
/// (this library's [`MARKER`](files::MARKER) files excluded; anything but regular files
/// and directories is an error).
pub fn hash_dir(dir: &Path) -> Result<u128> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let entries = fs::read_dir(dir).map_err(|e| Error::io("cannot list", dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("cannot list", dir, e))?;
            let path = entry.path();
            let kind = entry
                .file_type()
                .map_err(|e| Error::io("cannot stat", &path, e))?;
            if kind.is_dir() {
                walk(root, &path, out)?;
            } else if entry.file_name() != files::MARKER {
                out.push(path.strip_prefix(root).unwrap_or(&path).to_path_buf());
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(dir, dir, &mut files)?;
    files.sort();
    let mut h = Xxh3Default::new();
    for rel in files {
        let path = dir.join(&rel);
        let bytes = files::read_bytes(&path, crate::limits::MAX_TENSOR_FILE_BYTES)?;
        h.update(rel.to_string_lossy().as_bytes());
        h.update(&[0]);
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    Ok(h.digest128())
}

/// Writes `keys` (strictly increasing) and their `rows` `(u, d)` to `dir` atomically.
pub fn save(
    dir: &Path,
    encoder: &EncoderFingerprint,
    keys: &[CacheKey],
    rows: &Tensor,
) -> Result<()> {
    let (u, d) = rows.dims2()?;
    if u != keys.len() || d != encoder.embedding_size {
        return Err(Error::shape(
            format!("cache rows saved to `{}`", dir.display()),
            format!("({}, {})", keys.len(), encoder.embedding_size),
            rows.dims(),
        ));
    }
    let values = rows
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_device(&Device::Cpu)?
        .to_vec1::<f32>()?;
    let mut bytes = Vec::with_capacity(MAGIC.len() + u * 16 + values.len() * 4);
    bytes.extend_from_slice(MAGIC);
    for k in keys {
        bytes.extend_from_slice(&k.to_le_bytes());
    }
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    let header = CacheHeader {
        format_version: CACHE_FORMAT_VERSION,
        encoder: encoder.clone(),
        items: u,
        checksum: format!("{:032x}", xxh3_128(&bytes)),
    };
    files::write_dir(dir, files::DirKind::Cache, |tmp| {
        files::write_bytes(&tmp.join(ROWS), &bytes)?;
        write_json(&tmp.join(FINGERPRINT), &header)
    })
}

/// Reads the cache in `dir` if it was written for `encoder`, placing rows on `device`.
pub fn load(dir: &Path, encoder: &EncoderFingerprint, device: &Device) -> Result<Loaded> {
    files::read_dir_consistently(dir, |dir| load_once(dir, encoder, device))
}

fn load_once(dir: &Path, encoder: &EncoderFingerprint, device: &Device) -> Result<Loaded> {
    let header_path = dir.join(FINGERPRINT);
    if !header_path.exists() {
        return Ok(Loaded::Missing);
    }
    let raw: serde_json::Value = read_json(&header_path)?;
    let version = raw
        .get("format_version")
        .and_then(serde_json::Value::as_u64);
    if version != Some(u64::from(CACHE_FORMAT_VERSION)) {
        return Ok(Loaded::Stale(format!(
            "layout version {version:?}, this library writes {CACHE_FORMAT_VERSION}"
        )));
    }
    let header: CacheHeader = serde_json::from_value(raw).map_err(|e| {
        Error::format(
            &header_path,
            format!("{e}; delete `{}` to rebuild", dir.display()),
        )
    })?;
    if header.encoder != *encoder {
        return Ok(Loaded::Stale(format!(
            "written for {:?}, the model's encoder is {:?}",
            header.encoder, encoder
        )));
    }
    let path = dir.join(ROWS);
    let bad = |msg: String| {
        Error::format(
            &path,
            format!("{msg}; delete `{}` to rebuild", dir.display()),
        )
    };
    let (u, d) = (header.items, encoder.embedding_size);
    let expected = u
        .checked_mul(d)
        .and_then(|x| x.checked_mul(4))
        .and_then(|x| x.checked_add(u.checked_mul(16)?))
        .and_then(|x| x.checked_add(MAGIC.len()))
        .ok_or_else(|| {
            bad(format!(
                "{u} items of dimension {d} overflow the address space"
            ))
        })?;
    let (file, actual) = files::open_regular(&path, crate::limits::MAX_TENSOR_FILE_BYTES)?;
    if actual != expected as u64 {
        return Err(bad(format!(
            "is {actual} bytes, but {u} items of dimension {d} take {expected}"
        )));
    }
    // The allocation is bounded by the file's real size, checked just above.
    let mut bytes = Vec::with_capacity(expected);
    file.take(expected as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io("cannot read", &path, e))?;
    if bytes.len() != expected {
        return Err(bad(format!(
            "changed size while being read ({} bytes)",
            bytes.len()
        )));
    }
    if format!("{:032x}", xxh3_128(&bytes)) != header.checksum {
        return Err(bad("checksum mismatch: the file is damaged".into()));
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(bad("does not start with SIMCACHE".into()));
    }
    let (key_bytes, row_bytes) = bytes[MAGIC.len()..].split_at(u * 16);
    let keys: Vec<CacheKey> = key_bytes
        .chunks_exact(16)
        .map(|c| u128::from_le_bytes(c.try_into().unwrap_or([0; 16])))
        .collect();
    if keys.windows(2).any(|w| w[0] >= w[1]) {
        return Err(bad("keys are not strictly increasing".into()));
    }
    let values: Vec<f32> = row_bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap_or([0; 4])))
        .collect();
    drop(bytes);
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(bad(format!(
            "row {} holds a non-finite value",
            i / d.max(1)
        )));
    }
    let rows = Tensor::from_vec(values, (u, d), &Device::Cpu)?.to_device(device)?;
    Ok(Loaded::Hit(LoadedCache { keys, rows }))
}

/// One encoder's part of a persistence session (see `ModelState::begin_cache_store`).
#[derive(Debug)]
pub(crate) struct SlotSession {
    pub(crate) fingerprint: EncoderFingerprint,
    /// Keys of the file loaded into the cache, when one was.
    pub(crate) file_items: Option<usize>,
    /// Every key the run asked for.
    pub(crate) seen: HashSet<CacheKey>,
    /// Objects encoded during the session.
    pub(crate) encoded: usize,
}

/// A persistence session: caches are loaded on first use and saved at its end.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) dir: PathBuf,
    pub(crate) slots: Vec<Option<SlotSession>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp() -> EncoderFingerprint {
        EncoderFingerprint {
            encoder_type: "T".into(),
            encoder_hash: "0".repeat(32),
            embedding_size: 3,
        }
    }

    #[test]
    fn round_trip_and_damage() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("enc");
        assert!(matches!(
            load(&dir, &fp(), &Device::Cpu).unwrap(),
            Loaded::Missing
        ));
        let rows = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        save(&dir, &fp(), &[3, 9], &rows).unwrap();
        let Loaded::Hit(c) = load(&dir, &fp(), &Device::Cpu).unwrap() else {
            panic!("hit expected")
        };
        assert_eq!(c.keys, vec![3, 9]);
        assert_eq!(c.rows.to_vec2::<f32>().unwrap()[1], vec![3.0, 4.0, 5.0]);
        let other = EncoderFingerprint {
            embedding_size: 4,
            ..fp()
        };
        assert!(matches!(
            load(&dir, &other, &Device::Cpu).unwrap(),
            Loaded::Stale(_)
        ));

        // A header claiming a huge count is rejected before any allocation.
        let header_path = dir.join(FINGERPRINT);
        let mut h: CacheHeader = read_json(&header_path).unwrap();
        h.items = usize::MAX / 8;
        write_json(&header_path, &h).unwrap();
        let e = load(&dir, &fp(), &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("rows.bin") && e.contains("delete"), "{e}");

        // A flipped byte fails the checksum.
        save(&dir, &fp(), &[3, 9], &rows).unwrap();
        let mut b = fs::read(dir.join(ROWS)).unwrap();
        b[30] ^= 1;
        fs::write(dir.join(ROWS), &b).unwrap();
        let e = load(&dir, &fp(), &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("checksum") && e.contains("rows.bin"), "{e}");
    }

    #[test]
    fn hash_dir_sees_content_and_names() {
        let a = tempfile::tempdir().unwrap();
        fs::write(a.path().join("x"), b"1").unwrap();
        let h1 = hash_dir(a.path()).unwrap();
        fs::write(a.path().join("x"), b"2").unwrap();
        let h2 = hash_dir(a.path()).unwrap();
        assert_ne!(h1, h2);
        fs::rename(a.path().join("x"), a.path().join("y")).unwrap();
        assert_ne!(h2, hash_dir(a.path()).unwrap());
    }
}
