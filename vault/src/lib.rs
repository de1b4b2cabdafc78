//! A site's copy of a dataset: chunking, sealing, the change log and the
//! RocksDB state that the log is applied to.
//!
//! - [`keys`]: the dataset key and its derived sub-keys
//! - [`crypto`]: SM4-GCM (on libgcrypt, or the portable fallback) and HMAC-SM3
//! - [`id`]: the chunk id, a plain value
//! - [`chunk`]: FastCDC cutting, making chunk ids, sealing
//! - [`fs`]: files replaced atomically, directories synced
//! - [`lthash`]: the homomorphic namespace digest
//! - [`ops`]: namespace entries and the ops records carry
//! - [`meta`]: owners, extended attributes, ACLs, hard links and special
//!   files: captured, recorded, put back
//! - [`path`]: the validation every namespace path passes
//! - [`record`]: record layout, sealing and the hash chain
//! - [`wal`]: segment files, group-committed appends, crash recovery
//! - [`state`]: RocksDB state and applying records to it
//! - [`pin`]: pinned copies of the state for readers in other processes
//! - [`dataset`]: an open dataset: identity, committer thread, read views
//! - [`beneath`]: writing a tree beneath one directory descriptor
//! - [`restore`]: rebuilding a tree and digesting a tree on disk
//! - [`standby`]: a follower's hot standby tree, kept equal to the dataset

pub mod beneath;
pub mod chunk;
pub mod crypto;
pub mod dataset;
pub mod error;
pub mod fs;
pub mod id;
pub mod kek;
pub mod keys;
pub mod lthash;
pub mod meta;
pub mod ops;
pub mod path;
pub mod pin;
pub mod record;
pub mod restore;
pub mod signing;
pub mod standby;
pub mod state;
pub mod wal;

pub use chunk::{ChunkId, SealedChunk};
pub use dataset::{Committed, Dataset, Fence, Options, Status, SubmitError, View};
pub use error::{Result, VaultError};
pub use keys::{DatasetKey, Keys};
pub use ops::{ChunkRef, Entry, Node, Op};
pub use path::{PathError, RelPath};
