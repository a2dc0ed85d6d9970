//! Upper bounds on every size a configuration can hold, decided in code.
//!
//! A size read from a file (a saved model's `config.json`, an encoder's config, a
//! transformer's `config.json`) or given to a constructor decides allocations and loops:
//! an embedding width sizes every vector, a layer count the number of weight matrices, an
//! n-gram range the number of passes over a text. Unchecked, 2⁶² overflows a capacity or
//! a product (a panic), 10⁶ layers allocate until the process is killed, and an n-gram
//! range `[1, 2⁶²]` loops for ever. So every constructor checks its sizes against the
//! bounds below, and its parameter count as a product with [`ParamCount`] (no
//! overflow), **before** it allocates anything; a loader turns a failed check into an
//! [`Error::Format`] naming the file ([`Error::in_file`]).
//!
//! The bounds refuse what no real model has, far above what this crate's users build
//! (the figures in each constant's docs); they are not a memory policy: a model within
//! them can still be too large for a given machine.
//!
//! ```
//! use similarity_core::limits::{self, ParamCount};
//! // A 384 → 384 linear layer with bias, counted before it is built:
//! let mut count = ParamCount::new("MyHead");
//! count.add(1, &[384, 384])?;
//! count.add(1, &[384])?;
//! assert_eq!(count.total(), 384 * 384 + 384);
//! // A width read from a file:
//! let e = limits::check_size("MyHeadConfig.width", 1 << 62, limits::MAX_WIDTH).unwrap_err();
//! assert_eq!(
//!     e.to_string(),
//!     "invalid input in MyHeadConfig.width: must be at most 65536, got 4611686018427387904"
//! );
//! # Ok::<(), similarity_core::Error>(())
//! ```

use crate::error::{Error, Result};

/// Largest JSON file read (a configuration, manifest, checkpoint state or cache header):
/// 64 MiB. The largest JSON this library reads is a tokenizer's vocabulary, which has its
/// own bound.
pub const MAX_JSON_BYTES: u64 = 64 << 20;

/// Largest `tokenizer.json` read: 256 MiB (a few MiB for BERT-family models, tens of MiB
/// for the largest multilingual vocabularies).
pub const MAX_TOKENIZER_BYTES: u64 = 256 << 20;

/// Largest safetensors file read (weights, optimiser moments, memory): 64 GiB, four times
/// [`MAX_PARAMETERS`] in f32.
pub const MAX_TENSOR_FILE_BYTES: u64 = 64 << 30;

/// Largest marker or lock file read: 4 KiB (they hold a kind and an id).
pub const MAX_MARKER_BYTES: u64 = 4 << 10;

/// Widest vector: an embedding, a hidden or intermediate layer, a head's input (the
/// encoders' embeddings concatenated) or output. 2¹⁶ = 65,536: the widest layers in use
/// are an LLM's feed-forward (53,248 in Llama 3.1 405B; its hidden size is 16,384);
/// sentence embeddings are at most 4,096 wide.
pub const MAX_WIDTH: usize = 1 << 16;

/// Most layers in one component: a head's blocks or layers (a `SequentialHead`'s list
/// entries), a transformer's layers, a `SwitchHead`'s options. 1,024: the deepest
/// transformers have about 130 layers, heads a handful.
pub const MAX_LAYERS: usize = 1 << 10;

/// Longest n-gram, in words or characters. 32: fastText uses character n-grams of 3 to
/// 6 and word n-grams up to 5. Each order is one pass over a text, building keys of that
/// length, so this bounds the work per text to a small multiple of its length.
pub const MAX_NGRAM_ORDER: usize = 32;

/// Most classes (groups) of a class-logit loss (`ArcFaceLoss`, `CosFaceLoss`,
/// `SoftmaxLoss`, `CenterLoss`). 2²⁴ = 16,777,216: the largest face data sets have about
/// 2 million identities (WebFace42M). The class table's size is checked as well, against
/// [`MAX_PARAMETERS`].
pub const MAX_CLASSES: usize = 1 << 24;

/// Most hash buckets of the hashed n-gram encoder. 2³²: more buckets give no fewer
/// collisions for any real vocabulary (10⁷ features in 2³² buckets collide with
/// probability 0.2 %), and the sign of a feature is the top bit of the same 64-bit hash,
/// so buckets must stay far below 2⁶³ for sign and bucket to be independent. (Buckets are
/// never allocated.)
pub const MAX_HASH_BUCKETS: u64 = 1 << 32;

/// Largest vocabulary (and token-type vocabulary) of a transformer. 2²⁰ = 1,048,576: the
/// largest in use have about 256,000 tokens (Gemma, XLM-RoBERTa).
pub const MAX_VOCAB: usize = 1 << 20;

/// Most position embeddings (the longest sequence) of a transformer. 2¹⁷ = 131,072:
/// long-context encoders have 8,192 (ModernBERT, nomic-embed), LLMs 131,072.
pub const MAX_POSITIONS: usize = 1 << 17;

/// Most histogram bins of `FastAPLoss`. 1,024, a hundred times Quaterion's default of
/// 10: each batch of `N` builds a `(bins + 1, N, N)` histogram.
pub const MAX_HISTOGRAM_BINS: usize = 1 << 10;

/// Most embeddings a cross-batch memory (XBM) keeps. 2²⁴ = 16,777,216: the XBM paper's
/// memories hold tens of thousands (Quaterion's default is 10,000). The memory is
/// `(size, d)`, checked against [`MAX_PARAMETERS`] when it is first filled.
pub const MAX_MEMORY_SIZE: usize = 1 << 24;

/// Most scalar parameters of one component (an encoder, a head, a loss) and of one
/// [`Params`](crate::nn::Params) store; also the most scalars of a cross-batch memory.
/// 2³² ≈ 4.3 billion, 16 GiB as `f32`: BERT-large has 0.34 billion, an ArcFace table of
/// 2 million identities × 512 one billion; a head is usually below a few million.
pub const MAX_PARAMETERS: usize = 1 << 32;

/// Checks that `value`, the option at `location` (e.g. `"HashedNgramConfig.dim"`), is in
/// `1..=max`. The error names the option, the bound and the value.
pub fn check_size(location: &str, value: usize, max: usize) -> Result<()> {
    if value == 0 {
        return Err(Error::invalid(location, "must be at least 1, got 0"));
    }
    check_at_most(location, value, max)
}

/// Checks that `value`, the option at `location`, is at most `max` (0 allowed).
pub fn check_at_most<T: PartialOrd + std::fmt::Display>(
    location: &str,
    value: T,
    max: T,
) -> Result<()> {
    if value > max {
        return Err(Error::invalid(
            location,
            format!("must be at most {max}, got {value}"),
        ));
    }
    Ok(())
}

/// Checks the class table of the class-logit loss `loss` before it is allocated:
/// `num_groups` at most [`MAX_CLASSES`] (0 is the loss's own error: the option is
/// required), the embedding size at most [`MAX_WIDTH`], and `num_groups × embedding_size`
/// at most [`MAX_PARAMETERS`].
pub fn check_class_table(loss: &str, num_groups: usize, embedding_size: usize) -> Result<()> {
    check_at_most(
        &format!("{loss} option `num_groups`"),
        num_groups,
        MAX_CLASSES,
    )?;
    check_at_most(&format!("{loss} embedding size"), embedding_size, MAX_WIDTH)?;
    ParamCount::new(loss).add(1, &[num_groups, embedding_size])
}

/// The number of scalar parameters of a component, summed with overflow checks and kept
/// at most [`MAX_PARAMETERS`]: add every tensor a constructor will create, before it
/// creates any.
#[derive(Debug, Clone)]
pub struct ParamCount {
    component: String,
    total: usize,
}

impl ParamCount {
    /// An empty count for `component` (its name appears in the error).
    pub fn new(component: impl Into<String>) -> Self {
        ParamCount {
            component: component.into(),
            total: 0,
        }
    }

    /// Adds `copies` tensors of `shape` (e.g. one weight matrix per layer); an error when
    /// the total would exceed [`MAX_PARAMETERS`] or overflow.
    pub fn add(&mut self, copies: usize, shape: &[usize]) -> Result<()> {
        let n = shape
            .iter()
            .try_fold(copies, |n, &d| n.checked_mul(d))
            .and_then(|n| n.checked_add(self.total))
            .filter(|&n| n <= MAX_PARAMETERS);
        match n {
            Some(n) => {
                self.total = n;
                Ok(())
            }
            None => Err(self.too_many()),
        }
    }

    /// Adds another count (e.g. a sub-component's).
    pub fn add_count(&mut self, other: &ParamCount) -> Result<()> {
        self.add(other.total, &[])
    }

    /// The total so far.
    pub fn total(&self) -> usize {
        self.total
    }

    fn too_many(&self) -> Error {
        Error::invalid(
            self.component.clone(),
            format!(
                "would have more than {MAX_PARAMETERS} parameters (similarity_core::limits::MAX_PARAMETERS)"
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_refused_outside_one_to_the_bound() {
        assert!(check_size("x", 1, 8).is_ok());
        assert!(check_size("x", 8, 8).is_ok());
        for bad in [0, 9, 1 << 62, usize::MAX] {
            let e = check_size("Cfg.x", bad, 8).unwrap_err().to_string();
            assert!(e.contains("Cfg.x") && e.contains(&bad.to_string()), "{e}");
        }
        assert!(check_at_most("x", 0u64, 8).is_ok());
        assert!(check_at_most("x", 9u64, 8).is_err());
    }

    #[test]
    fn parameter_counts_never_overflow() {
        let mut c = ParamCount::new("Head");
        c.add(2, &[3, 4]).unwrap();
        c.add(1, &[]).unwrap();
        assert_eq!(c.total(), 25);
        // 2^62 layers of 2^16 × 2^16: the product overflows u64; the total is unchanged.
        let e = c.add(1 << 62, &[1 << 16, 1 << 16]).unwrap_err().to_string();
        assert!(e.contains("Head") && e.contains("4294967296"), "{e}");
        assert_eq!(c.total(), 25);
        assert!(c.add(usize::MAX, &[1]).is_err());
        assert!(c.add(1, &[usize::MAX, 2]).is_err());
        // Exactly at the bound, then one more.
        let mut c = ParamCount::new("Loss");
        c.add(1, &[1 << 16, 1 << 16]).unwrap();
        assert_eq!(c.total(), MAX_PARAMETERS);
        assert!(c.add(1, &[1]).is_err());
        let mut d = ParamCount::new("Outer");
        d.add(1, &[1]).unwrap();
        assert!(d.add_count(&c).is_err());
    }

    #[test]
    fn class_tables_are_bounded() {
        assert!(check_class_table("L", MAX_CLASSES, 256).is_ok());
        // 0 classes is the loss's own error (the option is required).
        assert!(check_class_table("L", 0, 8).is_ok());
        for v in [MAX_CLASSES + 1, 1 << 62, usize::MAX] {
            let e = check_class_table("L", v, 8).unwrap_err().to_string();
            assert!(
                e.contains("L option `num_groups`") && e.contains(&v.to_string()),
                "{e}"
            );
        }
        let e = check_class_table("L", 8, MAX_WIDTH + 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("L embedding size"), "{e}");
        // Each within its bound, the table past the parameter bound.
        let e = check_class_table("L", MAX_CLASSES, MAX_WIDTH)
            .unwrap_err()
            .to_string();
        assert!(e.contains("MAX_PARAMETERS"), "{e}");
    }

    /// Every loss whose constructor sizes something from its options refuses an option
    /// past its bound before it creates a variable.
    #[test]
    fn sized_losses_check_before_allocating() {
        use crate::loss::{
            ArcFaceLoss, ArcFaceLossConfig, CenterLoss, CenterLossConfig, CosFaceLoss,
            CosFaceLossConfig, FastAPLoss, FastAPLossConfig, SimilarityLoss, SoftmaxLoss,
            SoftmaxLossConfig,
        };
        use crate::nn::Params;

        fn refused<L: SimilarityLoss>(config: L::Config, option: &str, v: usize) {
            let mut p = Params::new(&candle_core::Device::Cpu, 0);
            let e = match L::new(8, config, &mut p.scope("loss")) {
                Ok(_) => panic!("{} {option} = {v} was accepted", L::NAME),
                Err(e) => e.to_string(),
            };
            let want = format!("{} option `{option}`", L::NAME);
            assert!(e.contains(&want) && e.contains(&v.to_string()), "{e}");
            assert_eq!(p.numel(), 0);
        }
        for v in [MAX_CLASSES + 1, 1 << 62, usize::MAX] {
            let num_groups = v;
            refused::<ArcFaceLoss>(
                ArcFaceLossConfig {
                    num_groups,
                    ..Default::default()
                },
                "num_groups",
                v,
            );
            refused::<CosFaceLoss>(
                CosFaceLossConfig {
                    num_groups,
                    ..Default::default()
                },
                "num_groups",
                v,
            );
            refused::<SoftmaxLoss>(
                SoftmaxLossConfig {
                    num_groups,
                    ..Default::default()
                },
                "num_groups",
                v,
            );
            refused::<CenterLoss>(
                CenterLossConfig {
                    num_groups,
                    ..Default::default()
                },
                "num_groups",
                v,
            );
        }
        for v in [MAX_HISTOGRAM_BINS + 1, 1 << 62, usize::MAX] {
            refused::<FastAPLoss>(FastAPLossConfig { num_bins: v }, "num_bins", v);
        }
        let mut p = Params::new(&candle_core::Device::Cpu, 0);
        assert!(
            FastAPLoss::new(
                8,
                FastAPLossConfig {
                    num_bins: MAX_HISTOGRAM_BINS
                },
                &mut p.scope("f")
            )
            .is_ok()
        );
    }

    #[test]
    fn memories_are_bounded() {
        use crate::xbm::{Xbm, XbmConfig};
        let device = candle_core::Device::Cpu;
        let xbm = |size| {
            Xbm::new(
                XbmConfig {
                    size,
                    ..Default::default()
                },
                &device,
            )
        };
        assert!(xbm(MAX_MEMORY_SIZE).is_ok());
        for v in [0, MAX_MEMORY_SIZE + 1, 1 << 62, usize::MAX] {
            let e = xbm(v).unwrap_err().to_string();
            assert!(
                e.contains("XBM option `size`") && e.contains(&v.to_string()),
                "{e}"
            );
        }
        // Within its bound, but (size, d) past the bound: refused at the first enqueue,
        // before the memory is allocated.
        let mut memory = xbm(MAX_MEMORY_SIZE).unwrap();
        let embeddings =
            candle_core::Tensor::zeros((1, 512), candle_core::DType::F32, &device).unwrap();
        let groups = candle_core::Tensor::zeros(1, candle_core::DType::I64, &device).unwrap();
        let e = memory
            .enqueue(&embeddings, &groups)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("XBM memory") && e.contains("MAX_PARAMETERS"),
            "{e}"
        );
    }
}
