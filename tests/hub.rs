//! `HubModel` and `SentenceTransformer::from_hub` (feature `hf-hub`), without network:
//! a Hugging Face cache laid out as `huggingface_hub` writes it is built from the
//! all-MiniLM-L6-v2 directory that `scripts/fetch-minilm.sh` fetches, and the Hub client
//! is pointed at a closed local port, so any attempt to download fails loudly.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use similarity_core::Error;
use similarity_core::candle_core::Device;
use similarity_core::encoder::encode_all;
use similarity_core::prelude::*;

const REPO: &str = "sentence-transformers/all-MiniLM-L6-v2";
const COMMIT: &str = "c9745ed1d9f207416be6d2e6f8de32d1f16199bf";
/// Nothing listens on port 9 (discard) here: a download attempt gets "connection refused".
const CLOSED: &str = "http://127.0.0.1:9";

/// A Hub cache (`models--owner--name/{refs,blobs,snapshots}`) holding `files` of the
/// model, with `refs/main` pointing at `COMMIT`.
fn hub_cache(files: &[&str]) -> tempfile::TempDir {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache
        .path()
        .join("models--sentence-transformers--all-MiniLM-L6-v2");
    fs::create_dir_all(repo.join("refs")).unwrap();
    fs::write(repo.join("refs/main"), COMMIT).unwrap();
    let snapshot = repo.join("snapshots").join(COMMIT);
    for file in files {
        let to = snapshot.join(file);
        fs::create_dir_all(to.parent().unwrap()).unwrap();
        fs::copy(common::minilm_dir().join(file), &to).unwrap();
    }
    cache
}

const ALL: [&str; 6] = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "1_Pooling/config.json",
    "sentence_bert_config.json",
    "modules.json",
];

fn present(files: &[&'static str]) -> Vec<&'static str> {
    files
        .iter()
        .copied()
        .filter(|f| common::minilm_dir().join(f).is_file())
        .collect()
}

fn embed(enc: &SentenceTransformer) -> Vec<Vec<f32>> {
    let texts: Vec<String> = ["How do I reset my password?", "Billing happens monthly."]
        .map(String::from)
        .to_vec();
    let refs: Vec<&String> = texts.iter().collect();
    encode_all(enc, &refs, 8, &Device::Cpu)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn snapshot(cache: &Path) -> PathBuf {
    cache
        .join("models--sentence-transformers--all-MiniLM-L6-v2/snapshots")
        .join(COMMIT)
}

#[test]
fn offline_download_resolves_the_cached_snapshot_and_loads_the_same_model() {
    let cache = hub_cache(&present(&ALL));
    let dir = HubModel::new(REPO)
        .cache_dir(cache.path())
        .offline(true)
        .download()
        .unwrap();
    assert_eq!(dir, snapshot(cache.path()));
    let from_cache = SentenceTransformer::from_pretrained(&dir, &Device::Cpu).unwrap();
    let direct = SentenceTransformer::from_pretrained(common::minilm_dir(), &Device::Cpu).unwrap();
    assert_eq!(embed(&from_cache), embed(&direct));
    assert_eq!(from_cache.normalize(), direct.normalize());
    assert_eq!(from_cache.max_seq_length(), direct.max_seq_length());
}

#[test]
fn online_mode_uses_cached_files_without_touching_the_network() {
    let cache = hub_cache(&present(&ALL));
    let dir = HubModel::new(REPO)
        .cache_dir(cache.path())
        .endpoint(CLOSED)
        .offline(false)
        .progress(false)
        .download()
        .unwrap();
    assert_eq!(dir, snapshot(cache.path()));
}

#[test]
fn offline_mode_names_the_missing_required_file() {
    let cache = hub_cache(&["config.json", "model.safetensors", "1_Pooling/config.json"]);
    let err = HubModel::new(REPO)
        .cache_dir(cache.path())
        .offline(true)
        .download()
        .unwrap_err();
    match &err {
        Error::Hub { repo, file, .. } => {
            assert_eq!(repo, "sentence-transformers/all-MiniLM-L6-v2@main");
            assert_eq!(file, "tokenizer.json");
        }
        other => panic!("expected Error::Hub, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("tokenizer.json") && msg.contains("offline"),
        "{msg}"
    );
}

#[test]
fn a_revision_that_is_not_cached_is_an_error_offline() {
    let cache = hub_cache(&present(&ALL));
    let err = HubModel::new(REPO)
        .revision("v9.9")
        .cache_dir(cache.path())
        .offline(true)
        .download()
        .unwrap_err();
    assert!(err.to_string().contains("all-MiniLM-L6-v2@v9.9"), "{err}");
}

#[test]
fn a_network_failure_is_an_error_naming_the_file_not_a_panic() {
    let empty = tempfile::tempdir().unwrap();
    let err = HubModel::new(REPO)
        .cache_dir(empty.path())
        .endpoint(CLOSED)
        .offline(false)
        .progress(false)
        .download()
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, Error::Hub { file, .. } if file == "config.json"),
        "{msg}"
    );
    assert!(msg.contains("request failed"), "{msg}");
}

#[test]
fn malformed_repository_ids_are_rejected_before_any_lookup() {
    for id in ["", "/name", "owner/", "owner//name", "../etc"] {
        let err = HubModel::new(id).offline(true).download().unwrap_err();
        assert!(err.to_string().contains("repository id"), "{id:?}: {err}");
    }
}
