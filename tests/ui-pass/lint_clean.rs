//! Expansions compile without warnings, with prelude names shadowed on purpose: every
//! path the macro emits must be absolute.
#![deny(warnings, unused_qualifications)]

use similarity_core::prelude::*;

#[allow(dead_code)]
struct Result;
#[allow(dead_code)]
struct Option;
#[allow(dead_code)]
struct Ok;
#[allow(dead_code)]
struct Default;

/// A documented model with two encoders.
#[trainable_model]
pub struct Documented {
    /// Words.
    #[encoder(cache = "auto")]
    words: HashedNgramEncoder,
    /// Characters only.
    #[encoder(cache = "cpu", key = str::len)]
    chars: Frozen<HashedNgramEncoder>,
    /// The head.
    #[head(n_layers = 2, dropout = 0.1)]
    head: SkipConnectionHead,
    /// The loss.
    #[loss(scale = 20.0, symmetric = true)]
    loss: MultipleNegativesRankingLoss,
}

fn main() {
    let _ = Documented::new(
        HashedNgramEncoder::default(),
        Frozen(HashedNgramEncoder::default()),
        &ModelOptions::default(),
    );
    let _ = DocumentedRecord { words: String::new(), chars: String::new() };
}
