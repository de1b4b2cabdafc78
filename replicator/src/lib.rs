//! Moving the change log between sites.
//!
//! - [`certs`]: a CA and per-site certificates for a deployment
//! - [`tls`]: loading them, the mutual-TLS acceptor that refuses strangers
//!   before any byte reaches gRPC, and the client configuration
//! - [`upstream`]: the gRPC service that streams a dataset's log to followers
//!   and tracks what each has acknowledged (lag in records, bytes, seconds)
//! - [`seated`]: that service for the whole process, across seat changes,
//!   answering the takeover group's calls at every moment
//! - [`follower`]: the loop that dials the upstream, appends what it receives
//!   to this site's log and acknowledges it, reconnecting by itself
//!
//! A follower receives records exactly as they lie in its upstream's log and
//! appends them only if they continue its own hash chain, so every site holds
//! the same records (payloads, seqs, chain hashes); frame headers and segment
//! boundaries are each site's own. A follower can itself be an upstream
//! (cascade).

pub mod certs;
pub mod follower;
pub mod seated;
pub mod tls;
pub mod upstream;

/// Generated from proto/replication.proto.
#[allow(clippy::all)]
pub mod pb {
    tonic::include_proto!("triad.replication.v1");
}

/// A call to another site (checkpoints, status, chunks, an admin action)
/// that did not get an answer. [`CallError::retryable`] tells a site that may
/// answer later (down, cut off, busy) from a refusal that will stand.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// This site's own TLS files or the peer's address are unusable.
    #[error("{site}: {message}")]
    Setup { site: String, message: String },
    /// No connection: the site is down, or the network between is cut.
    /// The message shows the transport error's Debug form, because its
    /// Display hides the cause; it is not also chained as a source, which
    /// would print it twice.
    #[error("connecting to {site} at {address}: {cause:?}")]
    Connect {
        site: String,
        address: String,
        cause: tonic::transport::Error,
    },
    /// The site answered with an error status.
    #[error("{site}: {}", status.message())]
    Refused {
        site: String,
        status: Box<tonic::Status>,
    },
}

impl CallError {
    pub fn retryable(&self) -> bool {
        use tonic::Code;
        match self {
            CallError::Setup { .. } => false,
            CallError::Connect { .. } => true,
            CallError::Refused { status, .. } => matches!(
                status.code(),
                Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::ResourceExhausted
                    | Code::Aborted
                    | Code::Unknown
            ),
        }
    }
}

/// Errors setting up replication.
#[derive(Debug, thiserror::Error)]
pub enum ReplError {
    #[error("{what} {path}: {reason}")]
    File {
        what: &'static str,
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("certificate generation: {0}")]
    Certs(String),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}
