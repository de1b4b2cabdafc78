//! The archive's error type: every failure names the store, the object and
//! what to do about it. Secrets (credentials, keys) never appear in it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("archive config: {0}")]
    Config(String),

    #[error("object store {url}: {op} {key}: {message}")]
    Store {
        url: String,
        op: &'static str,
        key: String,
        message: String,
    },

    #[error("archive object {key} is damaged: {reason}")]
    Damaged { key: String, reason: String },

    #[error("archive object {key} is missing: {reason}")]
    Missing { key: String, reason: String },

    #[error("cannot restore: {0}")]
    NoRestorePoint(String),

    #[error("{context}: {path}: {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("archive index {path}: {source}")]
    Index {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },

    #[error(transparent)]
    Vault(#[from] vault::VaultError),

    #[error("the dataset refused the archived records: {0}")]
    Submit(String),

    #[error("stopped: {0}")]
    Stopped(String),
}

impl ArchiveError {
    pub(crate) fn io(context: &'static str, path: impl Into<PathBuf>, e: std::io::Error) -> Self {
        ArchiveError::Io {
            context,
            path: path.into(),
            source: e,
        }
    }
}

pub type Result<T, E = ArchiveError> = std::result::Result<T, E>;
