//! Peak memory of a 100,000-item evaluation, read from `/proc/self/status` (`VmHWM`).
//!
//! Its own test binary with one test, so nothing else raises the high-water mark.

use similarity_core::distance::Distance;
use similarity_core::metric::{Evaluator, RecallAtK, Relevance, RetrievalRPrecision};
use similarity_core::{Device, Tensor};

/// Peak resident set size in bytes, when the platform reports it.
fn peak_rss() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[test]
fn hundred_thousand_by_64_evaluates_in_under_a_gibibyte() {
    let (n, dim, groups) = (100_000usize, 64usize, 1_000usize);
    // Group g points along its own mix of axes, plus a small deterministic wobble.
    let mut v = Vec::with_capacity(n * dim);
    for i in 0..n {
        let g = i % groups;
        for c in 0..dim {
            let axis = if c == g % dim || c == (g / dim) % dim {
                1.0
            } else {
                0.0
            };
            v.push(axis + ((i * 31 + c * 17) % 97) as f32 * 1e-4);
        }
    }
    let x = Tensor::from_vec(v, (n, dim), &Device::Cpu).unwrap();
    let ids: Vec<i64> = (0..n).map(|i| (i % groups) as i64).collect();
    let ev = Evaluator::new(Distance::Cosine).with_sample(500, 1);
    let bound = ev.peak_block_bytes(n);
    let got = ev
        .evaluate(
            &x,
            &Relevance::Groups(&ids),
            &[&RetrievalRPrecision, &RecallAtK { k: 10 }],
        )
        .unwrap();
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|(_, v)| (0.0..=1.0).contains(v)), "{got:?}");
    let embeddings = n * dim * 4;
    assert!(bound + embeddings < 1 << 30, "bound {bound} B");
    if let Some(peak) = peak_rss() {
        eprintln!(
            "peak RSS {} MiB (block bound {} MiB, embeddings {} MiB)",
            peak >> 20,
            bound >> 20,
            embeddings >> 20
        );
        assert!(peak < 1 << 30, "peak RSS {peak} B is over 1 GiB");
    }
}
