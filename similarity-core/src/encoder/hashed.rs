//! A frozen lexical text encoder that needs no download.
//!
//! For a text `t`:
//! 1. Features: lower-cased words (runs of alphanumeric characters), word n-grams for
//!    `n ∈ word_ngrams`, and character n-grams `n ∈ char_ngrams` of each word padded as
//!    `<word>` (as fastText does), so that inflections and typos share features.
//! 2. Feature hashing with signs (Weinberger et al., 2009): feature `f` adds
//!    `sign(f) · (1 + ln tf(f))` (sublinear term frequency) to bucket `h(f) mod n_features`.
//!    The hashed vector `x` is L2-normalised.
//! 3. A fixed, seeded random projection to `dim` dimensions (Achlioptas, 2003):
//!    `e = Rᵀ x`, where row `b` of `R: (n_features, dim)` has entries `±1/√dim` drawn
//!    from a generator seeded with `(seed, b)`. `R` is never stored: a row is generated
//!    when its bucket occurs, so the encoder is a few bytes of config, and by the
//!    Johnson–Lindenstrauss lemma `e` keeps the cosine geometry of `x` (`‖e‖ ≈ 1`).
//!
//! Output: `(batch, dim)`, `f32`. It has no trainable state, so it implements
//! [`FrozenEncoder`] and can be cached without a [`Frozen`](super::Frozen) wrapper.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::{Encoder, FrozenEncoder};
use crate::error::{Error, Result};
use crate::limits;
use crate::nn::Mode;

/// Configuration of [`HashedNgramEncoder`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HashedNgramConfig {
    /// Output embedding size, at most [`MAX_WIDTH`](limits::MAX_WIDTH). Default 384 (the
    /// size of all-MiniLM-L6-v2).
    pub dim: usize,
    /// Number of hash buckets, at most [`MAX_HASH_BUCKETS`](limits::MAX_HASH_BUCKETS).
    /// Default 2²⁰.
    pub n_features: u64,
    /// Inclusive range of word n-gram lengths, at most
    /// [`MAX_NGRAM_ORDER`](limits::MAX_NGRAM_ORDER). Default `(1, 2)`.
    pub word_ngrams: (usize, usize),
    /// Inclusive range of character n-gram lengths; `(0, 0)` disables them. Default `(3, 5)`.
    pub char_ngrams: (usize, usize),
    /// Seed of the hash functions and of the projection. Default 0.
    pub seed: u64,
}

impl Default for HashedNgramConfig {
    fn default() -> Self {
        HashedNgramConfig {
            dim: 384,
            n_features: 1 << 20,
            word_ngrams: (1, 2),
            char_ngrams: (3, 5),
            seed: 0,
        }
    }
}

impl HashedNgramConfig {
    /// Checks every option against its range and the bounds of [`crate::limits`]:
    /// `dim` in `1..=MAX_WIDTH`, `n_features` in `1..=MAX_HASH_BUCKETS`, n-gram ranges
    /// `1 <= min <= max <= MAX_NGRAM_ORDER` (`char_ngrams` may also be `(0, 0)`). The
    /// error names the option (`HashedNgramConfig.dim`).
    pub fn check(&self) -> Result<()> {
        limits::check_size("HashedNgramConfig.dim", self.dim, limits::MAX_WIDTH)?;
        if self.n_features == 0 {
            return Err(Error::invalid(
                "HashedNgramConfig.n_features",
                "must be at least 1, got 0",
            ));
        }
        limits::check_at_most(
            "HashedNgramConfig.n_features",
            self.n_features,
            limits::MAX_HASH_BUCKETS,
        )?;
        check_range("word_ngrams", self.word_ngrams, false)?;
        check_range("char_ngrams", self.char_ngrams, true)
    }
}

/// Checks an inclusive n-gram range `(min, max)`, option `option`: `(0, 0)` (when
/// `may_be_off`) or `1 <= min <= max <= MAX_NGRAM_ORDER`.
fn check_range(option: &str, (min, max): (usize, usize), may_be_off: bool) -> Result<()> {
    let location = format!("HashedNgramConfig.{option}");
    if may_be_off && (min, max) == (0, 0) {
        return Ok(());
    }
    if min == 0 || min > max {
        let off = if may_be_off { "(0, 0) or " } else { "" };
        return Err(Error::invalid(
            location,
            format!("must be {off}1 <= min <= max, got ({min}, {max})"),
        ));
    }
    if max > limits::MAX_NGRAM_ORDER {
        return Err(Error::invalid(
            location,
            format!(
                "must have max at most {}, got ({min}, {max})",
                limits::MAX_NGRAM_ORDER
            ),
        ));
    }
    Ok(())
}

/// Hashed word and character n-grams with a seeded random projection.
#[derive(Debug, Clone, Default)]
pub struct HashedNgramEncoder {
    config: HashedNgramConfig,
}

/// The sparse L2-normalised hashed vectors of a batch: `(bucket, value)` per text.
#[derive(Debug, Clone)]
pub struct HashedBatch {
    rows: Vec<Vec<(u64, f32)>>,
    device: Device,
}

impl HashedNgramEncoder {
    /// An encoder with `config`, checked.
    pub fn new(config: HashedNgramConfig) -> Result<Self> {
        config.check()?;
        Ok(HashedNgramEncoder { config })
    }

    /// The configuration.
    pub fn config(&self) -> &HashedNgramConfig {
        &self.config
    }

    /// The L2-normalised hashed feature vector of `text`, as sorted `(bucket, value)`.
    pub fn features(&self, text: &str) -> Vec<(u64, f32)> {
        let c = &self.config;
        let lower = text.to_lowercase();
        let words: Vec<&str> = lower
            .split(|ch: char| !ch.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .collect();
        let mut tf: HashMap<u64, u32> = HashMap::new();
        // Tag bytes keep a word and a character n-gram with the same text apart.
        let mut key = String::new();
        for n in c.word_ngrams.0..=c.word_ngrams.1 {
            for gram in words.windows(n) {
                key.clear();
                key.push('w');
                for (i, w) in gram.iter().enumerate() {
                    if i > 0 {
                        key.push(' ');
                    }
                    key.push_str(w);
                }
                *tf.entry(xxh3_64_with_seed(key.as_bytes(), c.seed))
                    .or_default() += 1;
            }
        }
        if c.char_ngrams != (0, 0) {
            let mut chars: Vec<char> = Vec::new();
            for w in &words {
                chars.clear();
                chars.push('<');
                chars.extend(w.chars());
                chars.push('>');
                for n in c.char_ngrams.0..=c.char_ngrams.1 {
                    for gram in chars.windows(n) {
                        key.clear();
                        key.push('c');
                        key.extend(gram);
                        *tf.entry(xxh3_64_with_seed(key.as_bytes(), c.seed))
                            .or_default() += 1;
                    }
                }
            }
        }
        // Sorted, so that every sum below runs in one order and a text always gets
        // bit-identical features (a HashMap's iteration order is random per instance).
        let mut hashes: Vec<(u64, u32)> = tf.into_iter().collect();
        hashes.sort_unstable_by_key(|&(h, _)| (h % c.n_features, h));
        let mut out: Vec<(u64, f32)> = Vec::with_capacity(hashes.len());
        for (h, count) in hashes {
            let sign = if h >> 63 == 1 { -1.0 } else { 1.0 };
            let value = sign * (1.0 + (count as f32).ln());
            match out.last_mut() {
                Some((b, v)) if *b == h % c.n_features => *v += value,
                _ => out.push((h % c.n_features, value)),
            }
        }
        out.retain(|(_, v)| *v != 0.0);
        let norm = out.iter().map(|(_, v)| v * v).sum::<f32>().sqrt();
        for (_, v) in &mut out {
            *v /= norm;
        }
        out
    }

    /// Adds `value · R[bucket]` to `out` (length `dim`).
    fn project_into(&self, bucket: u64, value: f32, out: &mut [f32]) {
        let scale = value / (self.config.dim as f32).sqrt();
        let mut state = self.config.seed ^ bucket.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for chunk in out.chunks_mut(64) {
            let bits = splitmix64(&mut state);
            for (j, o) in chunk.iter_mut().enumerate() {
                *o += if (bits >> j) & 1 == 1 { scale } else { -scale };
            }
        }
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[diagnostic::do_not_recommend]
impl Encoder for HashedNgramEncoder {
    type Input = String;
    type Batch = HashedBatch;
    const NAME: &'static str = "HashedNgramEncoder";

    fn embedding_size(&self) -> usize {
        self.config.dim
    }

    fn collate(&self, inputs: &[&String], device: &Device) -> Result<HashedBatch> {
        Ok(HashedBatch {
            rows: inputs.iter().map(|t| self.features(t)).collect(),
            device: device.clone(),
        })
    }

    fn forward(&self, batch: &HashedBatch, _mode: &mut Mode) -> Result<Tensor> {
        let dim = self.config.dim;
        let mut out = vec![0f32; batch.rows.len() * dim];
        for (row, feats) in out.chunks_mut(dim).zip(&batch.rows) {
            for &(bucket, value) in feats {
                self.project_into(bucket, value, row);
            }
        }
        Ok(Tensor::from_vec(
            out,
            (batch.rows.len(), dim),
            &batch.device,
        )?)
    }

    fn save(&self, dir: &Path) -> Result<()> {
        crate::files::write_json(&dir.join("config.json"), &self.config)
    }

    fn load(dir: &Path, _device: &Device) -> Result<Self> {
        let path = dir.join("config.json");
        let config: HashedNgramConfig = crate::files::read_json(&path)?;
        config.check().map_err(|e| e.in_file(&path))?;
        Ok(HashedNgramEncoder { config })
    }
}

#[diagnostic::do_not_recommend]
impl FrozenEncoder for HashedNgramEncoder {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distance::Distance;

    fn embed(enc: &HashedNgramEncoder, texts: &[&str]) -> Tensor {
        let owned: Vec<String> = texts.iter().map(|s| s.to_string()).collect();
        let refs: Vec<&String> = owned.iter().collect();
        let b = enc.collate(&refs, &Device::Cpu).unwrap();
        enc.forward(&b, &mut Mode::Eval).unwrap()
    }

    #[test]
    fn features_are_l2_normalised_with_sublinear_tf() {
        let enc = HashedNgramEncoder::new(HashedNgramConfig {
            char_ngrams: (0, 0),
            word_ngrams: (1, 1),
            ..Default::default()
        })
        .unwrap();
        // "a a b": tf(a) = 2 → 1 + ln 2, tf(b) = 1 → 1; normalised by their norm.
        let f = enc.features("A a, b");
        assert_eq!(f.len(), 2);
        let mut vals: Vec<f32> = f.iter().map(|(_, v)| v.abs()).collect();
        vals.sort_by(f32::total_cmp);
        let (wa, wb) = (1.0 + 2f32.ln(), 1.0f32);
        let n = (wa * wa + wb * wb).sqrt();
        assert!((vals[0] - wb / n).abs() < 1e-6 && (vals[1] - wa / n).abs() < 1e-6);
    }

    #[test]
    fn projection_keeps_cosine_geometry_and_is_deterministic() {
        let enc = HashedNgramEncoder::default();
        let e = embed(
            &enc,
            &[
                "how do I resize a disk",
                "how can I resize my disk",
                "pricing of object storage",
            ],
        );
        assert_eq!(e.dims(), &[3, 384]);
        let again = embed(&enc, &["how do I resize a disk"]);
        assert_eq!(
            e.get(0).unwrap().to_vec1::<f32>().unwrap(),
            again.get(0).unwrap().to_vec1::<f32>().unwrap()
        );
        let norms = e
            .sqr()
            .unwrap()
            .sum(1)
            .unwrap()
            .sqrt()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(norms.iter().all(|n| (n - 1.0).abs() < 0.2), "{norms:?}");
        let s = Distance::Cosine
            .similarity_matrix(&e, None)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!(
            s[0][1] > 0.4 && s[0][2] < 0.2,
            "related {} unrelated {}",
            s[0][1],
            s[0][2]
        );
    }

    #[test]
    fn empty_text_gives_zero_vector_and_bad_config_is_named() {
        let enc = HashedNgramEncoder::default();
        let e = embed(&enc, &[""]);
        assert_eq!(
            e.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        let err = HashedNgramEncoder::new(HashedNgramConfig {
            word_ngrams: (2, 1),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("word_ngrams"), "{err}");
    }

    /// Every sized option at 0, at its bound, past it, at 2^62 and at the maximum: only
    /// values within the bound build an encoder, and an error names the option and the
    /// value.
    #[test]
    fn every_size_is_bounded() {
        type Set = fn(&mut HashedNgramConfig, u64);
        let table: [(&str, u64, Set); 4] = [
            ("dim", limits::MAX_WIDTH as u64, |c, v| c.dim = v as usize),
            ("n_features", limits::MAX_HASH_BUCKETS, |c, v| {
                c.n_features = v
            }),
            ("word_ngrams", limits::MAX_NGRAM_ORDER as u64, |c, v| {
                c.word_ngrams = (1, v as usize)
            }),
            ("char_ngrams", limits::MAX_NGRAM_ORDER as u64, |c, v| {
                c.char_ngrams = (1, v as usize)
            }),
        ];
        for (field, bound, set) in table {
            for (v, ok) in [
                (0, false),
                (bound, true),
                (bound + 1, false),
                (1 << 62, false),
                (u64::MAX, false),
            ] {
                let mut config = HashedNgramConfig::default();
                set(&mut config, v);
                match HashedNgramEncoder::new(config) {
                    Ok(_) => assert!(ok, "{field} = {v} was accepted"),
                    Err(e) => {
                        let e = e.to_string();
                        assert!(!ok, "{field} = {v} was refused: {e}");
                        let want = format!("HashedNgramConfig.{field}");
                        assert!(e.contains(&want) && e.contains(&v.to_string()), "{e}");
                    }
                }
            }
        }
        // A range must start at 1 (characters may also be off), and be ordered.
        let with = |word_ngrams, char_ngrams| {
            HashedNgramEncoder::new(HashedNgramConfig {
                word_ngrams,
                char_ngrams,
                ..Default::default()
            })
        };
        assert!(with((1, 1), (0, 0)).is_ok());
        assert!(with((0, 1), (3, 5)).is_err());
        assert!(with((0, 0), (3, 5)).is_err());
        assert!(with((1, 2), (0, 5)).is_err());
        assert!(with((1, 2), (5, 3)).is_err());
    }

    #[test]
    fn a_config_file_out_of_bounds_is_named_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let config = HashedNgramConfig {
            dim: 1 << 62,
            ..Default::default()
        };
        crate::files::write_json(&dir.path().join("config.json"), &config).unwrap();
        let e = HashedNgramEncoder::load(dir.path(), &Device::Cpu)
            .unwrap_err()
            .to_string();
        let path = dir.path().join("config.json");
        assert_eq!(
            e,
            format!(
                "invalid file `{}`: HashedNgramConfig.dim must be at most 65536, got 4611686018427387904",
                path.display()
            )
        );
    }
}
