//! The servable model: save to a directory, load it back, encode.
//!
//! Layout of a saved model (`format_version` 1):
//!
//! ```text
//! dir/
//!   config.json            manifest: format version, model type, encoders, head, loss
//!   weights.safetensors    head and loss variables, by dotted name (`head.fc_0.weight`)
//!   encoders/<field>/      each encoder's own files (Encoder::save)
//! ```
//!
//! Writes go through [`files::write_dir`](crate::files::write_dir): atomic at the
//! directory level (a crash leaves the previous model or the new one, never a mix), only
//! over a directory this library wrote (or an empty one), one writer at a time, and never
//! with NaN or infinite weights. The generated `load` runs its [`ServableReader`] inside
//! [`files::read_dir_consistently`](crate::files::read_dir_consistently), so it reads one
//! version of the directory (a save waits for it, or it reads again), checks the format
//! version, the model type and each encoder's name, type and embedding size, and names
//! the file at fault.

pub mod export;
pub mod quantize;
mod truncate;

use std::fs;
use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::encoder::Encoder;
use crate::error::{Error, Result};
use crate::files::{DirKind, DirWriter};
use crate::head::Head;
use crate::limits;
use crate::loss::SimilarityLoss;
use crate::train::ModelState;

pub use export::{write_npy, write_points_jsonl};
pub use truncate::truncate_embeddings;

/// The version of the directory layout this library writes and reads.
pub const FORMAT_VERSION: u32 = 1;
const MANIFEST: &str = "config.json";
const WEIGHTS: &str = "weights.safetensors";

/// `config.json` of a saved model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Layout version; see [`FORMAT_VERSION`].
    pub format_version: u32,
    /// The model type's name.
    pub model: String,
    /// The encoders, in declaration order.
    pub encoders: Vec<EncoderEntry>,
    /// The head.
    pub head: ComponentEntry,
    /// The loss.
    pub loss: ComponentEntry,
}

/// An encoder in a [`Manifest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncoderEntry {
    /// Field name; its files are in `encoders/<name>/`.
    pub name: String,
    /// Encoder type name.
    #[serde(rename = "type")]
    pub kind: String,
    /// Embedding size.
    pub embedding_size: usize,
}

/// A head or loss in a [`Manifest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentEntry {
    /// Type name.
    #[serde(rename = "type")]
    pub kind: String,
    /// Its options, as its `Config` serialises them.
    pub config: serde_json::Value,
    /// Input size.
    pub input_size: usize,
    /// Output size (for a loss: the embedding size it was built for).
    pub output_size: usize,
}

pub use crate::files::{read_json, write_json};

/// Builds a saved model in a hidden sibling directory, then moves it into place.
#[derive(Debug)]
pub struct ServableWriter {
    dir: DirWriter,
    target: PathBuf,
    encoders: Vec<EncoderEntry>,
}

impl ServableWriter {
    /// Starts writing a model that will end up at `dir`. Nothing is written until
    /// [`finish`](Self::finish), which writes the whole directory atomically.
    pub fn create(dir: &Path) -> Result<Self> {
        let writer = DirWriter::begin(dir, DirKind::Model)?;
        let encoders = writer.path().join("encoders");
        fs::create_dir(&encoders).map_err(|e| Error::io("cannot create", &encoders, e))?;
        Ok(ServableWriter {
            dir: writer,
            target: dir.to_path_buf(),
            encoders: Vec::new(),
        })
    }

    /// Saves encoder `name` into `encoders/<name>/`.
    pub fn encoder<E: Encoder>(&mut self, name: &str, encoder: &E) -> Result<()> {
        let dir = self.dir.path().join("encoders").join(name);
        fs::create_dir_all(&dir).map_err(|e| Error::io("cannot create", &dir, e))?;
        encoder.save(&dir)?;
        self.encoders.push(EncoderEntry {
            name: name.to_string(),
            kind: E::NAME.to_string(),
            embedding_size: encoder.embedding_size(),
        });
        Ok(())
    }

    /// Writes the manifest and the weights, then moves the directory into place.
    pub fn finish<H: Head, L: SimilarityLoss>(
        mut self,
        model: &str,
        head: &H,
        loss: &L,
        state: &ModelState,
    ) -> Result<()> {
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            model: model.to_string(),
            encoders: std::mem::take(&mut self.encoders),
            head: ComponentEntry {
                kind: H::NAME.to_string(),
                config: to_value(&self.target, head.config())?,
                input_size: head.input_size(),
                output_size: head.output_size(),
            },
            loss: ComponentEntry {
                kind: L::NAME.to_string(),
                config: to_value(&self.target, loss.config())?,
                input_size: head.output_size(),
                output_size: head.output_size(),
            },
        };
        if let Some(variable) = state.first_non_finite_var()? {
            return Err(Error::NonFiniteWeights {
                variable,
                context: format!("; the model was not saved to `{}`", self.target.display()),
            });
        }
        state
            .params()
            .save_safetensors(&self.dir.path().join(WEIGHTS))?;
        write_json(&self.dir.path().join(MANIFEST), &manifest)?;
        self.dir.commit().map(drop)
    }
}

/// Reads a saved model, checking it against the code that loads it. Run it inside
/// [`files::read_dir_consistently`](crate::files::read_dir_consistently), as the generated
/// `load` does, so that every file comes from one version of the directory.
#[derive(Debug)]
pub struct ServableReader {
    dir: PathBuf,
    manifest: Manifest,
}

impl ServableReader {
    /// Opens `dir`, which must hold a model of type `model`.
    pub fn open(dir: &Path, model: &str) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let raw: serde_json::Value = read_json(&path)?;
        let version = raw
            .get("format_version")
            .and_then(serde_json::Value::as_u64);
        match version {
            Some(v) if v == u64::from(FORMAT_VERSION) => {}
            Some(v) => {
                return Err(Error::format(
                    &path,
                    format!(
                        "format_version {v} is not supported: this library reads version {FORMAT_VERSION}"
                    ),
                ));
            }
            None => {
                return Err(Error::format(
                    &path,
                    "no integer `format_version`: not a saved model",
                ));
            }
        }
        let manifest: Manifest =
            serde_json::from_value(raw).map_err(|e| Error::format(&path, e.to_string()))?;
        if manifest.model != model {
            return Err(Error::format(
                &path,
                format!("holds a `{}` model, not a `{model}`", manifest.model),
            ));
        }
        Ok(ServableReader {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Loads encoder `name` (declared as type `E`) from `encoders/<name>/`. The saved
    /// embedding size is checked against [`MAX_WIDTH`](crate::limits::MAX_WIDTH) first,
    /// and an encoder's own error about an option names its directory.
    pub fn encoder<E: Encoder>(&self, name: &str, device: &Device) -> Result<E> {
        let path = self.dir.join(MANIFEST);
        let (i, entry) = self
            .manifest
            .encoders
            .iter()
            .enumerate()
            .find(|(_, e)| e.name == name)
            .ok_or_else(|| {
                Error::format(
                    &path,
                    format!("has no encoder `{name}`, which the model declares"),
                )
            })?;
        if entry.kind != E::NAME {
            return Err(Error::format(
                &path,
                format!(
                    "encoder `{name}` was saved as `{}`, the model declares `{}`",
                    entry.kind,
                    E::NAME
                ),
            ));
        }
        limits::check_size(
            &format!("encoders[{i}].embedding_size"),
            entry.embedding_size,
            limits::MAX_WIDTH,
        )
        .map_err(|e| e.in_file(&path))?;
        let dir = self.dir.join("encoders").join(name);
        let encoder = E::load(&dir, device).map_err(|e| e.in_file(&dir))?;
        if encoder.embedding_size() != entry.embedding_size {
            return Err(Error::format(
                &path,
                format!(
                    "encoder `{name}` was saved with embedding size {}, it loads with {}",
                    entry.embedding_size,
                    encoder.embedding_size()
                ),
            ));
        }
        Ok(encoder)
    }

    /// The saved options of the head, declared as type `H`, for inputs of `input_size`
    /// (the loaded encoders' embedding sizes summed). Before anything is built from
    /// them: the manifest's `head.input_size` must be `input_size`, its `head.output_size`
    /// at most [`MAX_WIDTH`](crate::limits::MAX_WIDTH), and the options must pass
    /// [`Head::check_config`] (the bounds of [`crate::limits`]). Errors name the
    /// manifest.
    pub fn head_config<H: Head>(&self, input_size: usize) -> Result<H::Config> {
        let path = self.dir.join(MANIFEST);
        let entry = &self.manifest.head;
        let config = self.component_config(entry, H::NAME, "head")?;
        let sizes = || -> Result<()> {
            limits::check_size("head.input_size", entry.input_size, limits::MAX_WIDTH)?;
            limits::check_size("head.output_size", entry.output_size, limits::MAX_WIDTH)?;
            if entry.input_size != input_size {
                return Err(Error::invalid(
                    "head.input_size",
                    format!(
                        "is {}, but the encoders' embedding sizes sum to {input_size}",
                        entry.input_size
                    ),
                ));
            }
            H::check_config(input_size, &config)
        };
        sizes().map_err(|e| e.in_file(&path))?;
        Ok(config)
    }

    /// The saved options of the loss, declared as type `L`. The manifest's
    /// `loss.input_size` and `loss.output_size` must be the head's output size; the
    /// loss's own bounds are checked by its constructor, before it allocates (map its
    /// errors with [`ServableReader::in_manifest`]).
    pub fn loss_config<L: SimilarityLoss>(&self) -> Result<L::Config> {
        let path = self.dir.join(MANIFEST);
        let config = self.component_config(&self.manifest.loss, L::NAME, "loss")?;
        let head_output = self.manifest.head.output_size;
        for (field, size) in [
            ("loss.input_size", self.manifest.loss.input_size),
            ("loss.output_size", self.manifest.loss.output_size),
        ] {
            limits::check_size(field, size, limits::MAX_WIDTH).map_err(|e| e.in_file(&path))?;
            if size != head_output {
                return Err(Error::format(
                    &path,
                    format!("{field} is {size}, but head.output_size is {head_output}"),
                ));
            }
        }
        Ok(config)
    }

    /// An error raised while building the head or the loss from the manifest's options
    /// (an option out of range) as the manifest's fault, naming it; see
    /// [`Error::in_file`].
    pub fn in_manifest(&self, error: Error) -> Error {
        error.in_file(self.dir.join(MANIFEST))
    }

    fn component_config<C: DeserializeOwned>(
        &self,
        entry: &ComponentEntry,
        kind: &str,
        what: &str,
    ) -> Result<C> {
        let path = self.dir.join(MANIFEST);
        if entry.kind != kind {
            return Err(Error::format(
                &path,
                format!(
                    "{what} was saved as `{}`, the model declares `{kind}`",
                    entry.kind
                ),
            ));
        }
        serde_json::from_value(entry.config.clone())
            .map_err(|e| Error::format(&path, format!("{what} config: {e}")))
    }

    /// Checks the rebuilt model's encoders and head against the manifest and loads the
    /// weights into it.
    pub fn finish(&self, state: &ModelState, head_input: usize, head_output: usize) -> Result<()> {
        let path = self.dir.join(MANIFEST);
        let names: Vec<&str> = state.encoders().iter().map(|e| e.name).collect();
        let saved: Vec<&str> = self
            .manifest
            .encoders
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        if names != saved {
            return Err(Error::format(
                &path,
                format!("saved encoders {saved:?} differ from the model's {names:?}"),
            ));
        }
        let h = &self.manifest.head;
        if (h.input_size, h.output_size) != (head_input, head_output) {
            return Err(Error::format(
                &path,
                format!(
                    "head was saved as {} → {}, the model builds {head_input} → {head_output}",
                    h.input_size, h.output_size
                ),
            ));
        }
        state.params().load_safetensors(&self.dir.join(WEIGHTS))
    }
}

fn to_value<T: Serialize>(path: &Path, config: &T) -> Result<serde_json::Value> {
    serde_json::to_value(config)
        .map_err(|e| Error::format(path, format!("cannot serialise config: {e}")))
}
