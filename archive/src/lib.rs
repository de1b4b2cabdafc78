//! A site's archive in an S3-compatible object store: log shipping,
//! snapshots, retention and prune, and point-in-time restore from the
//! archive alone.
//!
//! - [`store`]: opening the store (`s3://` or `file://`), retries, errors
//! - [`objects`]: object names and encodings (pieces, manifests, pages)
//! - [`lock`]: S3 Object Lock on the history objects
//! - [`packs`]: chunks packed into large objects, and reading chunks back
//!   wherever they are stored
//! - [`index`]: the local index of chunks already in the store
//! - [`archiver`]: shipping the log, snapshots, retention, prune
//! - [`lease`]: readers' leases, which prune waits for
//! - [`restore`]: planning and carrying out a restore from the archive
//! - [`schedule`]: cron schedules for snapshots

pub mod archiver;
pub mod error;
pub mod index;
pub mod lease;
pub mod lock;
pub mod objects;
pub mod packs;
pub mod restore;
pub mod schedule;
pub mod store;

pub use archiver::{Archiver, PruneReport, RetentionPolicy, SnapshotReport};
pub use error::{ArchiveError, Result, StoreCause};
pub use lock::{LockMode, ObjectLock};
pub use restore::{ArchiveRestore, At, Progress, Restorer};
pub use store::{Store, StoreConfig};
