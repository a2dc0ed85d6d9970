//! Fetching sentence-transformers models from the Hugging Face Hub.
//!
//! *Requires the `hf-hub` feature (which turns on `transformers`).*
//!
//! A Hub model repository is a sentence-transformers directory (see
//! [`transformer`](super::transformer)); [`HubModel::download`] brings the files the
//! encoder reads into the local Hugging Face cache and returns the snapshot directory
//! that holds them:
//!
//! ```text
//! $HF_HOME/hub/models--{owner}--{name}/
//!   refs/{revision}                      the commit the revision resolved to
//!   snapshots/{commit}/config.json       ...one file per fetched file (links to blobs/)
//! ```
//!
//! The cache is the one `huggingface_hub` (Python) and the `hf-hub` crate share, so a
//! model already downloaded by either is found without network. Files already in the
//! cache are never downloaded again; in offline mode (`HF_HUB_OFFLINE=1`, or
//! [`HubModel::offline`]) only the cache is read and a missing file is an error naming it.
//!
//! Required files: `config.json`, `model.safetensors`, `tokenizer.json`,
//! `1_Pooling/config.json`. Optional (skipped when the repository has none):
//! `sentence_bert_config.json`, `modules.json`.
//!
//! ```no_run
//! # fn main() -> similarity_core::Result<()> {
//! use similarity_core::candle_core::Device;
//! use similarity_core::encoder::{HubModel, SentenceTransformer};
//!
//! // Shorthand: latest revision, cache from the environment.
//! let frozen = SentenceTransformer::from_hub("sentence-transformers/all-MiniLM-L6-v2", &Device::Cpu)?;
//!
//! // Pinned revision, own cache directory, then a trainable copy.
//! let dir = HubModel::new("sentence-transformers/all-MiniLM-L6-v2")
//!     .revision("main")
//!     .cache_dir("models/hf")
//!     .download()?;
//! let trainable = SentenceTransformer::from_pretrained_trainable(&dir, &Device::Cpu)?;
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use candle_core::Device;
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

use super::SentenceTransformer;
use crate::error::{Error, Result};

/// Files a sentence-transformers directory must have.
const REQUIRED: [&str; 4] = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "1_Pooling/config.json",
];
/// Files read when present.
const OPTIONAL: [&str; 2] = ["sentence_bert_config.json", "modules.json"];

/// A model repository on the Hugging Face Hub, and how to fetch it.
///
/// Defaults: revision `main`, the cache of the environment (`HF_HOME`, else
/// `~/.cache/huggingface/hub`), the endpoint of the environment (`HF_ENDPOINT`, else
/// `https://huggingface.co`), offline when `HF_HUB_OFFLINE` is `1`/`true`/`yes`, the token
/// of the cache (`huggingface-cli login`), a progress bar per downloaded file.
#[derive(Debug, Clone)]
pub struct HubModel {
    repo_id: String,
    revision: String,
    cache_dir: Option<PathBuf>,
    endpoint: Option<String>,
    offline: Option<bool>,
    progress: bool,
}

impl HubModel {
    /// The model repository `repo_id`, e.g. `"sentence-transformers/all-MiniLM-L6-v2"`.
    pub fn new(repo_id: impl Into<String>) -> Self {
        Self {
            repo_id: repo_id.into(),
            revision: "main".into(),
            cache_dir: None,
            endpoint: None,
            offline: None,
            progress: true,
        }
    }

    /// A branch, tag or commit hash (default `main`). Pin a commit for reproducible runs.
    pub fn revision(mut self, revision: impl Into<String>) -> Self {
        self.revision = revision.into();
        self
    }

    /// The cache directory (the `hub` folder itself, not `HF_HOME`).
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_dir = Some(dir.into());
        self
    }

    /// The Hub's base URL, for mirrors.
    pub fn endpoint(mut self, url: impl Into<String>) -> Self {
        self.endpoint = Some(url.into());
        self
    }

    /// Reads only the local cache when `true`; overrides `HF_HUB_OFFLINE`.
    pub fn offline(mut self, offline: bool) -> Self {
        self.offline = Some(offline);
        self
    }

    /// Shows a progress bar per downloaded file (default `true`).
    pub fn progress(mut self, progress: bool) -> Self {
        self.progress = progress;
        self
    }

    /// The repository id.
    pub fn repo_id(&self) -> &str {
        &self.repo_id
    }

    fn is_offline(&self) -> bool {
        self.offline.unwrap_or_else(|| {
            std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
                matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes")
            })
        })
    }

    fn cache(&self) -> Cache {
        match &self.cache_dir {
            Some(dir) => Cache::new(dir.clone()),
            None => Cache::from_env(),
        }
    }

    fn repo(&self) -> Repo {
        Repo::with_revision(self.repo_id.clone(), RepoType::Model, self.revision.clone())
    }

    fn error(&self, file: &str, message: impl Into<String>) -> Error {
        Error::Hub {
            repo: format!("{}@{}", self.repo_id, self.revision),
            file: file.into(),
            message: message.into(),
        }
    }

    /// Makes sure the encoder's files are in the local cache (downloading what is missing
    /// unless offline) and returns the snapshot directory holding them, ready for
    /// [`SentenceTransformer::from_pretrained`].
    ///
    /// Errors ([`Error::Hub`]) name the repository, revision and file: a required file
    /// missing from the repository or (offline) from the cache, a network failure, or a
    /// revision that moved to another commit in the middle of the download.
    pub fn download(&self) -> Result<PathBuf> {
        if self.repo_id.split('/').any(str::is_empty) || self.repo_id.contains("..") {
            return Err(self.error(
                "-",
                "a repository id is `name` or `owner/name` with non-empty parts",
            ));
        }
        let mut paths = Vec::with_capacity(REQUIRED.len() + OPTIONAL.len());
        if self.is_offline() {
            let cached = self.cache().repo(self.repo());
            for file in REQUIRED {
                let path = cached.get(file).ok_or_else(|| {
                    self.error(
                        file,
                        format!(
                            "not in the local cache `{}` and offline mode is on \
                             (HF_HUB_OFFLINE or HubModel::offline)",
                            self.cache().path().display()
                        ),
                    )
                })?;
                paths.push((file, path));
            }
            for file in OPTIONAL {
                if let Some(path) = cached.get(file) {
                    paths.push((file, path));
                }
            }
        } else {
            let mut builder = ApiBuilder::from_env().with_progress(self.progress);
            if let Some(dir) = &self.cache_dir {
                builder = builder.with_cache_dir(dir.clone());
            }
            if let Some(url) = &self.endpoint {
                builder = builder.with_endpoint(url.clone());
            }
            let api = builder
                .build()
                .map_err(|e| self.error("-", format!("cannot set up the Hub client: {e}")))?;
            let repo = api.repo(self.repo());
            for file in REQUIRED.iter().chain(&OPTIONAL) {
                match repo.get(file) {
                    Ok(path) => paths.push((file, path)),
                    Err(e) if OPTIONAL.contains(file) && is_not_found(&e) => {}
                    Err(e) => return Err(self.error(file, describe(&e))),
                }
            }
        }
        self.snapshot_dir(&paths)
    }

    /// The directory all fetched files share (a file `a/b` lies two levels below it).
    fn snapshot_dir(&self, paths: &[(&str, PathBuf)]) -> Result<PathBuf> {
        let root = |file: &str, path: &Path| -> Option<PathBuf> {
            let mut dir = path.to_path_buf();
            for _ in 0..Path::new(file).components().count() {
                dir = dir.parent()?.to_path_buf();
            }
            Some(dir)
        };
        let (first, first_path) = &paths[0];
        let dir = root(first, first_path)
            .ok_or_else(|| self.error(first, "the cache returned a path without a parent"))?;
        for (file, path) in &paths[1..] {
            if root(file, path).as_deref() != Some(dir.as_path()) {
                return Err(self.error(
                    file,
                    format!(
                        "landed in another snapshot than `{first}` ({}): the revision moved \
                         during the download; retry, or pin a commit with HubModel::revision",
                        path.display()
                    ),
                ));
            }
        }
        Ok(dir)
    }
}

fn is_not_found(e: &ApiError) -> bool {
    matches!(e, ApiError::RequestError(inner) if matches!(**inner, ureq::Error::Status(404, _)))
}

fn describe(e: &ApiError) -> String {
    match e {
        ApiError::RequestError(inner) => match &**inner {
            ureq::Error::Status(404, _) => {
                "not found (404): no such repository, revision or file, or a private \
                 repository without a token"
                    .into()
            }
            ureq::Error::Status(code @ (401 | 403), _) => {
                format!(
                    "access denied ({code}): log in with `huggingface-cli login` or set HF_TOKEN"
                )
            }
            other => format!("request failed: {other}"),
        },
        other => other.to_string(),
    }
}

impl SentenceTransformer {
    /// Loads a frozen encoder from the Hugging Face Hub, e.g.
    /// `"sentence-transformers/all-MiniLM-L6-v2"`, through the local cache (see
    /// [`HubModel`] for the revision, cache directory and offline mode).
    pub fn from_hub(repo_id: &str, device: &Device) -> Result<Self> {
        Self::from_pretrained(HubModel::new(repo_id).download()?, device)
    }

    /// Loads a trainable encoder from the Hugging Face Hub (see [`from_hub`](Self::from_hub)).
    pub fn from_hub_trainable(repo_id: &str, device: &Device) -> Result<Self> {
        Self::from_pretrained_trainable(HubModel::new(repo_id).download()?, device)
    }
}
