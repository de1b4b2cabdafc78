//! The vault's error type: every failure names what it was doing and on which
//! file, segment or chunk, and says whether retrying can help.

use std::path::PathBuf;

use crate::id::ChunkId;

/// Errors from a site's copy: keys, chunks, the change log and the state.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("{context}: {path}: {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("key file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },

    #[error(
        "key file {path} is wrapped by a key in a cryptographic device, which cannot give it: \
         {reason}; with the device back this works again, and without it only the offline copy \
         of the plain key file can (`triad key show` checks the device)"
    )]
    KeyDevice { path: PathBuf, reason: String },

    #[error(
        "wrong key for dataset {dataset}: the key file has key id {found}, but this dataset was \
         created with key id {expected}; point key_file at the dataset's original key \
         (nothing was written)"
    )]
    WrongKey {
        dataset: String,
        expected: String,
        found: String,
    },

    #[error(
        "corrupt change log: segment {segment} offset {offset}: {reason}; this is damage to \
         records that were acknowledged, not a torn write, so triad will not cut it off; keep the \
         file for inspection and rebuild this site's copy from a healthy one"
    )]
    CorruptSegment {
        segment: PathBuf,
        offset: u64,
        reason: String,
    },

    #[error("change log {dir}: {reason}")]
    LogGap { dir: PathBuf, reason: String },

    #[error(
        "DIVERGED at seq {seq}: the upstream's record follows chain hash {theirs} but this site's \
         log is at {ours}; this site stopped applying and keeps what it has for inspection"
    )]
    Diverged {
        seq: u64,
        ours: String,
        theirs: String,
    },

    #[error("chunk {id}: {reason}")]
    BadChunk { id: ChunkId, reason: String },

    #[error("record seq {seq}: {reason}")]
    BadRecord { seq: u64, reason: String },

    #[error("state database {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },

    #[error("state database {path}: {reason}")]
    StateCorrupt { path: PathBuf, reason: String },

    /// A local change at a site that may not write now: another site holds
    /// a newer epoch, or this one has not confirmed it still holds its own.
    #[error("this site is FENCED and takes no changes: {0}")]
    Fenced(String),

    /// A replicated record of an epoch its seq does not belong to.
    #[error("record seq {seq}: {reason}")]
    Epoch { seq: u64, reason: String },

    #[error("the change log is closed: {0}")]
    Closed(String),

    #[error("standby tree {path}: {reason}")]
    Standby { path: PathBuf, reason: String },

    #[error("cannot encode or decode {what}: {reason}")]
    Codec { what: &'static str, reason: String },
}

impl VaultError {
    pub(crate) fn io(
        context: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        VaultError::Io {
            context,
            path: path.into(),
            source,
        }
    }

    /// True when the same call may succeed later without anyone changing
    /// anything (a full disk being emptied counts: the log stays consistent).
    pub fn is_transient(&self) -> bool {
        matches!(self, VaultError::Io { .. })
    }
}

pub type Result<T, E = VaultError> = std::result::Result<T, E>;
