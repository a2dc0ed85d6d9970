//! The one error type of the crate.
//!
//! Every fallible function returns [`Result<T>`]. Variants are grouped by kind: tensor
//! errors from Candle, file errors (which always name the file), invalid input (which
//! names the record, field or option at fault), and numerical failures.

use std::path::PathBuf;

/// Errors raised by `similarity_core`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // ---- tensors -------------------------------------------------------------------
    /// A tensor operation failed inside Candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// Two tensors (or a tensor and a declared size) disagree in shape.
    #[error("shape mismatch in {context}: expected {expected}, got {got}")]
    Shape {
        /// Where the mismatch was found, e.g. `"SkipConnectionHead input"`.
        context: String,
        /// The expected shape, in words or as `(batch, dim)`.
        expected: String,
        /// The shape that was found.
        got: String,
    },

    // ---- files ---------------------------------------------------------------------
    /// Reading or writing a file or directory failed.
    #[error("{action} `{path}`: {source}")]
    Io {
        /// What was being done, e.g. `"cannot write"`.
        action: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },

    /// A file exists but its content is not what it must be (bad JSON, wrong version,
    /// missing tensor, a model saved by another model type).
    #[error("invalid file `{path}`: {message}")]
    Format {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// Another writer holds the lock of a file or directory this library was about to
    /// write (see [`files`](crate::files)).
    #[error("`{path}` is in use by {}: another writer holds its lock; wait for it to finish, or write elsewhere", pid.map_or_else(|| "another process".to_string(), |p| format!("process {p}")))]
    InUse {
        /// The file or directory being written.
        path: PathBuf,
        /// The process holding the lock, when it could be read.
        pid: Option<u32>,
    },

    /// A model repository could not be fetched from the Hugging Face Hub (feature
    /// `hf-hub`).
    #[error("cannot fetch `{file}` of `{repo}` from the Hugging Face Hub: {message}")]
    Hub {
        /// `owner/name@revision`.
        repo: String,
        /// The file being fetched (`-` when the failure concerns the whole repository).
        file: String,
        /// What went wrong, and how to fix it when that is known.
        message: String,
    },
    // ---- input ---------------------------------------------------------------------
    /// A record, sample, option or argument is invalid.
    #[error("invalid input in {location}: {message}")]
    InvalidInput {
        /// Where: a record index, a field, an option name.
        location: String,
        /// What is wrong, and how to fix it when that is known.
        message: String,
    },

    // ---- numerics ------------------------------------------------------------------
    /// A loss or metric became NaN or infinite during training.
    #[error("non-finite {what} at epoch {epoch}, step {step}: {value}")]
    NonFinite {
        /// What became non-finite, e.g. `"training loss"`.
        what: &'static str,
        /// 0-based epoch.
        epoch: usize,
        /// 0-based step within the epoch.
        step: usize,
        /// The value seen.
        value: f64,
    },

    /// A gradient held NaN or ±∞ after a training step's backward pass, so the optimiser
    /// step was not taken (`TrainerConfig.non_finite = Error`, the default).
    #[error(
        "non-finite gradient of `{variable}` at epoch {epoch}, step {step}: {value} (the loss \
         was {loss}); the step was not taken. Set TrainerConfig.non_finite = SkipStep to skip \
         such steps instead"
    )]
    NonFiniteGradient {
        /// The first trainable variable, in [`named_trainable_vars`] order, whose gradient
        /// is not finite (e.g. `head.fc_0.weight`).
        ///
        /// [`named_trainable_vars`]: crate::train::ModelState::named_trainable_vars
        variable: String,
        /// 0-based epoch.
        epoch: usize,
        /// 0-based step within the epoch.
        step: usize,
        /// A non-finite element of that gradient.
        value: f64,
        /// The step's (finite) loss.
        loss: f64,
    },

    /// A trainable variable holds NaN or ±∞, so nothing is written from the model
    /// (checkpoint, servable model).
    #[error("trainable variable `{variable}` holds non-finite values {context}")]
    NonFiniteWeights {
        /// The first such variable, in [`named_trainable_vars`] order.
        ///
        /// [`named_trainable_vars`]: crate::train::ModelState::named_trainable_vars
        variable: String,
        /// When it was found and what was refused, e.g. `"after epoch 3; no checkpoint is
        /// written"`.
        context: String,
    },

    // ---- distributed runs ------------------------------------------------------------
    /// A collective operation failed, or the ranks of a distributed run disagree (on the
    /// data, the options, or a buffer's layout).
    #[error("distributed run, rank {rank} of {world}: {message}")]
    Distributed {
        /// This process's rank, 0-based.
        rank: usize,
        /// The number of ranks.
        world: usize,
        /// What failed, naming the operation or the value the ranks disagree on.
        message: String,
    },
}

impl Error {
    /// An [`Error::InvalidInput`] at `location`.
    pub fn invalid(location: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidInput {
            location: location.into(),
            message: message.into(),
        }
    }

    /// An [`Error::Format`] for `path`.
    pub fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            message: message.into(),
        }
    }

    /// This error as the fault of the file `path` it was read from: an
    /// [`Error::InvalidInput`] (an option out of range, e.g. from a config's `check`)
    /// becomes an [`Error::Format`] naming `path`, the option and the fault
    /// (`` invalid file `…/config.json`: HashedNgramConfig.dim must be at most 65536, got
    /// 4611686018427387904 ``). Every other error is returned as it is: it names its own
    /// file, or is not about the file's content.
    pub fn in_file(self, path: impl Into<PathBuf>) -> Self {
        match self {
            Error::InvalidInput { location, message } => Error::Format {
                path: path.into(),
                message: format!("{location} {message}"),
            },
            other => other,
        }
    }

    /// An [`Error::Io`] for `path`.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// An [`Error::Shape`].
    pub fn shape(
        context: impl Into<String>,
        expected: impl Into<String>,
        got: impl std::fmt::Debug,
    ) -> Self {
        Error::Shape {
            context: context.into(),
            expected: expected.into(),
            got: format!("{got:?}"),
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
