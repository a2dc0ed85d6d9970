//! The `#[trainable_model]` attribute macro of the similarity framework.
//!
//! The pipeline, one file per phase: `ast` parses the struct and its field attributes
//! (`attr`) into an owned spec that keeps spans; `validate` checks every rule and
//! accumulates all errors; `expand` generates the code. The attribute is documented
//! on [`trainable_model`]; `docs/macro-guide.md` walks through one expansion.

mod ast;
mod attr;
mod ctxt;
mod expand;
mod validate;

use proc_macro::TokenStream;

/// Turns an annotated struct into a trainable similarity model.
///
/// ```ignore
/// #[trainable_model]
/// pub struct FaqModel {
///     #[encoder(cache = "auto")]
///     text: HashedNgramEncoder,
///     #[head(n_layers = 1)]
///     head: SkipConnectionHead,
///     #[loss(scale = 20.0, symmetric = true)]
///     loss: MultipleNegativesRankingLoss,
/// }
/// ```
///
/// Every field has exactly one role attribute. Options written `name = value` on `#[head]`,
/// `#[loss]`, `#[xbm]` and `#[metric]` are assignments to fields of the component's typed
/// config, so a misspelt name or a value of the wrong type is a compile error at the option.
///
/// # Struct options: `#[trainable_model(...)]`
///
/// | option | type | default | meaning |
/// |---|---|---|---|
/// | `optimizer = expr` | `OptimizerConfig` | the trainer's | the model's optimiser, e.g. `OptimizerConfig::adam(1e-3)`; wins over `TrainerConfig::optimizer` |
/// | `record = Type` | a type | generated | use your own record type; each encoder reads its input with `input = fn` or from the field of the encoder's name |
///
/// # Field roles
///
/// **`#[encoder(...)]`** (at least one; concatenated in field order; the type implements
/// `Encoder`):
///
/// | option | type | default | meaning |
/// |---|---|---|---|
/// | `cache = "..."` | `"auto"`, `"cpu"`, `"gpu"`, `"none"` | `"none"` | keep the encoder's embeddings: on the model's device, in host memory, on the GPU (an error without one), or not at all; a cached encoder must implement `FrozenEncoder` (wrap it in `Frozen<...>`) |
/// | `key = path` | `fn(&Input) -> impl Hash` | the input itself | the cache key; objects with equal keys are encoded once |
/// | `input = path` | `fn(&Record) -> &Input` | the record's field of the encoder's name | with `record = Type`: how to read this encoder's input |
///
/// Without `record`, one encoder consumes its own input type (`String` for a text
/// encoder); several encoders get a generated `<Model>Record` struct with one public field
/// per encoder, named like the encoder fields, in field order (the order in which the
/// embeddings are concatenated). It is generic over the inputs, each parameter defaulted
/// to its encoder's `Input` (so `<Model>Record` names the record of the model's inputs),
/// and implements `Clone`, `Debug` and `PartialEq` whenever every input does.
///
/// **`#[head(...)]`** (exactly one; the type implements `Head`): any field of
/// `<Head as Head>::Config`, e.g. `SkipConnectionHead`: `dropout: f64 = 0.0`,
/// `skip_dropout: f64 = 0.0`, `n_layers: usize = 1`. The head's input size is the sum of
/// the encoders' embedding sizes; you never write it.
///
/// **`#[loss(...)]`** (exactly one; the type implements `SimilarityLoss`): any field of its
/// `Config`, e.g. `MultipleNegativesRankingLoss`: `scale: f64 = 20.0`,
/// `distance: Distance = Cosine`, `symmetric: bool = false`; `TripletLoss`: `margin`,
/// `distance`, `mining: TripletMining`, `soft`, `scale_by_mean_negative`. The loss fixes the
/// data kind: pair losses train on `SimilarityPairSample`, group losses on
/// `SimilarityGroupSample`. Loss parameters (class weights, centres) are trained too.
///
/// **`#[xbm(...)]`** (at most one; the field's type is `Xbm`): cross-batch memory.
/// `size: usize = 10_000` (at least 1), `weight: f64 = 1.0`, `start_iteration: usize = 1_000`.
/// The loss must implement `MemoryLoss` (a group loss with a memory form).
///
/// **`#[metric(...)]`** (any number; the type implements `Metric` and `Default`): computed on
/// every training batch and over the whole validation set; any field of the metric (e.g.
/// `k = 1`, at least 1), and the flag `prog_bar` to show it on the progress bar. Metrics
/// rank by the loss's distance and work for pair and group data alike (relevance comes
/// from the pair partner or the group), so no metric can mismatch the loss kind.
///
/// # Generated
///
/// The struct (your attributes removed, doc comments kept, plus a hidden `__similarity`
/// state field), `<Model>Record` for several encoders, `Model::new(encoders…,
/// &ModelOptions)`, and `impl TrainableModel` (embedding through caches or encoders, cache
/// fill, save/load of the servable model, the memory loss, metrics, optimiser).
///
/// # Compile-time checks
///
/// On the attributes: no encoder; no or two heads or losses; two `#[xbm]`; a field with no
/// role or two; the same role or option twice; unknown encoder or struct options and
/// misspelt roles (`#[haed]`), with the nearest name ("did you mean"); an unknown cache
/// type (with the nearest suggestion); `size = 0` or `k = 0`; `input` without `record`;
/// `#[cfg]` on fields and roles inside `#[cfg_attr]`; head and loss types swapped; generic
/// parameters or lifetimes. All are reported in one build.
///
/// On the types, at the field's type, each with a message that names the fix: an
/// `#[encoder]`, `#[head]`, `#[loss]` or `#[metric]` field whose type does not implement
/// `Encoder`, `Head`, `SimilarityLoss` or `Metric`; an `#[xbm]` field that is not `Xbm`
/// (`XbmConfig`); `#[xbm]` with a loss without a memory form; a cached encoder that is not
/// frozen, or whose input is not `Hash` and has no `key`. Every generated item carries
/// one `where` predicate per field, so a type that does not fit its role is one error,
/// and nothing that uses the type (or the model) adds another.
///
/// A misspelt role or option is read as the one it resembles, and with any attribute
/// error the model's items are still generated (a `new` that never runs where the model
/// cannot be built), so code using the model adds no error of its own.
#[proc_macro_attribute]
pub fn trainable_model(args: TokenStream, input: TokenStream) -> TokenStream {
    expand::trainable_model(args.into(), input.into()).into()
}
