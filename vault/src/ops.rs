//! What a change-log record says: namespace entries and the operations on them.
//!
//! Paths are relative to the dataset root, as raw Unix bytes with `/`
//! separators and no leading slash. Ops are encoded with postcard (a stable,
//! documented wire format) and sealed before they reach the log.

use serde::{Deserialize, Serialize};

use crate::chunk::ChunkId;
use crate::keys::Keys;
use crate::lthash::LtHash;
use crate::path::PathError;

/// A reference from a file to one of its chunks, in file order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub id: ChunkId,
    pub len: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Node {
    File { chunks: Vec<ChunkRef> },
    Dir,
    Symlink { target: Vec<u8> },
}

/// One namespace entry: what a path is and the metadata restored with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub node: Node,
    /// Permission bits (`st_mode & 0o7777`); 0o777 for symlinks.
    pub mode: u32,
    /// Modification time in nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// File size in bytes; 0 for directories, target length for symlinks.
    pub size: u64,
}

impl Entry {
    pub fn is_dir(&self) -> bool {
        matches!(self.node, Node::Dir)
    }

    pub fn chunks(&self) -> &[ChunkRef] {
        match &self.node {
            Node::File { chunks } => chunks,
            _ => &[],
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain data into a Vec cannot fail.
        postcard::to_allocvec(self).expect("entry encodes")
    }

    pub fn decode(b: &[u8]) -> Option<Entry> {
        postcard::from_bytes(b).ok()
    }

    /// The canonical bytes an entry contributes to the namespace digest.
    /// Independent of postcard so the digest survives encoding changes.
    pub fn digest_bytes(&self, path: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(path.len() + 64);
        v.extend_from_slice(&(path.len() as u64).to_le_bytes());
        v.extend_from_slice(path);
        let (kind, extra): (u8, Vec<u8>) = match &self.node {
            Node::File { chunks } => {
                let mut e = Vec::with_capacity(chunks.len() * 36);
                for c in chunks {
                    e.extend_from_slice(&c.id.0);
                    e.extend_from_slice(&c.len.to_le_bytes());
                }
                (1, e)
            }
            Node::Dir => (2, Vec::new()),
            Node::Symlink { target } => (3, target.clone()),
        };
        v.push(kind);
        v.extend_from_slice(&self.mode.to_le_bytes());
        v.extend_from_slice(&self.mtime_ns.to_le_bytes());
        v.extend_from_slice(&self.size.to_le_bytes());
        v.extend_from_slice(&(extra.len() as u64).to_le_bytes());
        v.extend_from_slice(&extra);
        v
    }

    pub fn digest_element(&self, keys: &Keys, path: &[u8]) -> LtHash {
        LtHash::element(&keys.digest, &self.digest_bytes(path))
    }
}

/// One change to a dataset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Creates or replaces `path`. Replacing a directory with anything else
    /// removes everything beneath it.
    Put { path: Vec<u8>, entry: Entry },
    /// Removes `path` and, for a directory, everything beneath it.
    Delete { path: Vec<u8> },
    /// Moves `from` (and everything beneath it) to `to`, replacing `to`.
    Rename { from: Vec<u8>, to: Vec<u8> },
    /// Holds a reference on chunks sent ahead of the file that will use them
    /// (large files travel in several records).
    Pin { ids: Vec<ChunkId> },
    /// Drops references taken by `Pin`.
    Unpin { ids: Vec<ChunkId> },
}

impl Op {
    /// Checks every path the op names (decoders call this on whatever
    /// arrives from a log, a peer or a store).
    pub fn check_paths(&self) -> Result<(), PathError> {
        match self {
            Op::Put { path, .. } | Op::Delete { path } => crate::path::check(path),
            Op::Rename { from, to } => {
                crate::path::check(from)?;
                crate::path::check(to)
            }
            Op::Pin { .. } | Op::Unpin { .. } => Ok(()),
        }
    }

    /// Chunks this op needs to be present when it applies.
    pub fn needs(&self) -> Vec<ChunkId> {
        match self {
            Op::Put { entry, .. } => entry.chunks().iter().map(|c| c.id).collect(),
            Op::Pin { ids } => ids.clone(),
            _ => Vec::new(),
        }
    }
}

pub fn encode_ops(ops: &[Op]) -> Vec<u8> {
    // Serialising plain data into a Vec cannot fail.
    postcard::to_allocvec(ops).expect("ops encode")
}

/// Decodes a record's ops and checks every path in them; the error says
/// which rule was broken.
pub fn decode_ops(b: &[u8]) -> Result<Vec<Op>, String> {
    let ops: Vec<Op> = postcard::from_bytes(b).map_err(|e| format!("ops do not decode: {e}"))?;
    for op in &ops {
        op.check_paths().map_err(|e| e.to_string())?;
    }
    Ok(ops)
}

/// Parent path of a relative path ("" for top-level entries).
pub fn parent(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => &path[..i],
        None => b"",
    }
}

/// The key prefix of everything beneath a directory path.
pub fn subtree_prefix(path: &[u8]) -> Vec<u8> {
    let mut p = path.to_vec();
    p.push(b'/');
    p
}
