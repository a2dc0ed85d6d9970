//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::io::BufRead;
use std::path::Path;

use similarity_core::data::SimilarityPairSample;

/// The first `n` pairs of a cloud-FAQ split (`"train"` or `"val"`).
pub fn faq_pairs(split: &str, n: usize) -> Vec<SimilarityPairSample<String>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data/cloud-faq")
        .join(format!("{split}_cloud_faq_dataset.jsonl.gz"));
    let file = std::fs::File::open(&path).expect("data/cloud-faq is part of the repository");
    std::io::BufReader::new(flate2::read::GzDecoder::new(file))
        .lines()
        .take(n)
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
            SimilarityPairSample::positive(
                v["question"].as_str().unwrap().to_string(),
                v["answer"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}
