//! The archive's error type: every failure names the store, the object and
//! what to do about it. Secrets (credentials, keys) never appear in it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("archive config: {0}")]
    Config(String),

    /// A request to the store failed (after the client's own retries).
    /// `cause` keeps the store client's error, so callers can tell a store
    /// that may answer later from one that never will ([`ArchiveError::retryable`]).
    #[error("object store {url}: {op} {key}: {cause}{hint}")]
    Store {
        url: String,
        op: &'static str,
        key: String,
        cause: Box<StoreCause>,
        /// What to check, for the failures an operator fixes (credentials, bucket).
        hint: &'static str,
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

/// The store client's own error, kept whole.
#[derive(Debug, thiserror::Error)]
pub enum StoreCause {
    #[error(transparent)]
    Client(object_store::Error),
    /// From the signed requests triad sends itself (Object Lock).
    #[error(transparent)]
    Lock(crate::lock::LockError),
}

impl ArchiveError {
    /// Whether trying the same thing later may succeed: a store that timed
    /// out, dropped the connection or answered 5xx. Wrong credentials, a
    /// missing bucket or object, and anything damaged stay as they are until
    /// someone acts, so they are reported as needing the operator.
    pub fn retryable(&self) -> bool {
        match self {
            ArchiveError::Store { cause, .. } => match cause.as_ref() {
                StoreCause::Client(e) => {
                    !matches!(
                        e,
                        object_store::Error::NotFound { .. }
                            | object_store::Error::AlreadyExists { .. }
                            | object_store::Error::Precondition { .. }
                            | object_store::Error::NotSupported { .. }
                            | object_store::Error::NotImplemented
                            | object_store::Error::PermissionDenied { .. }
                            | object_store::Error::Unauthenticated { .. }
                            | object_store::Error::InvalidPath { .. }
                            | object_store::Error::UnknownConfigurationKey { .. }
                    ) && !permanent_words(&e.to_string())
                }
                StoreCause::Lock(e) => match e.status {
                    Some(s) => s >= 500 || s == 408 || s == 429,
                    None => true,
                },
            },
            ArchiveError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::WouldBlock
            ),
            _ => false,
        }
    }

    pub(crate) fn io(context: &'static str, path: impl Into<PathBuf>, e: std::io::Error) -> Self {
        ArchiveError::Io {
            context,
            path: path.into(),
            source: e,
        }
    }
}

/// S3 error codes that mean the request will never succeed as it is, which
/// object_store reports as generic errors.
pub(crate) const PERMANENT_CODES: &[&str] = &[
    "NoSuchBucket",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "NotSignedUp",
    "AccessDenied",
    "403 Forbidden",
    "401 Unauthorized",
];

fn permanent_words(s: &str) -> bool {
    PERMANENT_CODES.iter().any(|c| s.contains(c))
}

pub type Result<T, E = ArchiveError> = std::result::Result<T, E>;
