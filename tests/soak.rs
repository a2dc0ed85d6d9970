//! Load: thousands of steps over a cached data set hold steady memory. Runs in its own
//! test binary so nothing else moves the process's resident size.

mod common;

use similarity_core::prelude::*;

#[trainable_model]
struct FaqModel {
    #[encoder(cache = "auto")]
    text: HashedNgramEncoder,
    #[head]
    head: SkipConnectionHead,
    #[loss(symmetric = true)]
    loss: MultipleNegativesRankingLoss,
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn thousands_of_cached_steps_hold_steady_memory() {
    let encoder = HashedNgramEncoder::new(HashedNgramConfig {
        dim: 64,
        ..Default::default()
    })
    .unwrap();
    let mut model = FaqModel::new(encoder, &ModelOptions::default()).unwrap();
    let train = common::faq_pairs("train", 256);
    let config = |epochs| TrainerConfig {
        epochs,
        batch_size: 32,
        progress: false,
        ..Default::default()
    };
    // The working set of a running loop is reached within the first epochs; after that,
    // resident memory must stay flat (no growth per step).
    let mut samples: Vec<(usize, u64)> = Vec::new();
    let mut steps = 0;
    Trainer::new(config(500))
        .fit_with_hook(&mut model, &train, None, &mut |_| {
            steps += 1;
            if steps % 500 == 0 {
                samples.push((steps, rss_kib()));
            }
        })
        .unwrap();
    assert_eq!(steps, 500 * 8);
    let (_, warm) = samples[0];
    let peak = samples.iter().map(|(_, r)| *r).max().unwrap();
    println!("RSS by step (KiB): {samples:?}");
    assert!(
        peak - warm < 4 * 1024,
        "resident memory grew by {} KiB between step 500 and step {steps}",
        peak - warm
    );
}
