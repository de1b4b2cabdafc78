//! A chunk's id: a plain value with no dependencies, so that errors can
//! name chunks without the error module depending on chunking. It is made
//! by `ChunkId::of` in [`crate::chunk`], under the dataset's chunk-id key.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Keyed BLAKE3 hash of a chunk's plaintext.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    pub fn short(&self) -> String {
        hex::encode(&self.0[..8])
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.short())
    }
}
