//! Shared by the fuzz targets: a tiny model, and splitting one input into several files.

use similarity_core::prelude::*;

#[trainable_model]
pub struct Tiny {
    #[encoder(cache = "auto")]
    pub text: HashedNgramEncoder,
    #[head]
    pub head: SkipConnectionHead,
    #[loss]
    pub loss: MultipleNegativesRankingLoss,
}

pub fn tiny() -> Tiny {
    let encoder = HashedNgramEncoder::new(HashedNgramConfig {
        dim: 8,
        ..Default::default()
    })
    .unwrap();
    Tiny::new(encoder, &ModelOptions::default()).unwrap()
}

/// Splits `data` into `n` parts at lengths given by its first bytes, so one fuzz input
/// drives several files of a directory.
pub fn split(data: &[u8], n: usize) -> Vec<&[u8]> {
    let (lens, mut rest) = data.split_at(n.min(data.len()));
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let len = lens
            .get(i)
            .map_or(0, |&b| (b as usize) * 16)
            .min(rest.len());
        let (part, tail) = if i + 1 == n {
            (rest, &rest[rest.len()..])
        } else {
            rest.split_at(len)
        };
        out.push(part);
        rest = tail;
    }
    out
}
