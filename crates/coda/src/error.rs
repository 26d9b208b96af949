//! The library's error type: every failure names the file, key or value that caused it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: no such file or directory")]
    NotFound { path: PathBuf },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: cannot read image: {reason}")]
    Image { path: PathBuf, reason: String },

    #[error("{path}: cannot read checkpoint: {reason}")]
    Checkpoint { path: PathBuf, reason: String },

    /// Missing, unexpected or mis-shaped tensors, listed so that nothing loads silently wrong.
    #[error("{path}: checkpoint does not match the architecture:\n{report}")]
    CheckpointMismatch { path: PathBuf, report: String },

    #[error("{path}: bad config: {reason}")]
    Config { path: PathBuf, reason: String },

    /// A job whose estimated memory is above the limit (see [`crate::limits`]).
    #[error("{what} needs about {need} of memory, above the limit of {limit}; use a smaller size or batch, or raise the limit with --max-memory SIZE (or CODA_MAX_MEMORY) if the machine has the memory")]
    Memory {
        what: String,
        need: String,
        limit: String,
    },

    #[error("invalid input: {0}")]
    Invalid(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound { path }
        } else {
            Error::Io { path, source }
        }
    }
}
