//! What a change-log record says: namespace entries and the operations on them.
//!
//! Paths are relative to the dataset root, as raw Unix bytes with `/`
//! separators and no leading slash. Ops are encoded with postcard (a stable,
//! documented wire format) and sealed before they reach the log.

use serde::{Deserialize, Serialize};

use crate::chunk::ChunkId;
use crate::keys::Keys;
use crate::lthash::LtHash;
use crate::meta::Ext;
use crate::path::PathError;

/// A reference from a file to one of its chunks, in file order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub id: ChunkId,
    pub len: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Node {
    File {
        chunks: Vec<ChunkRef>,
    },
    Dir,
    Symlink {
        target: Vec<u8>,
    },
    /// A named pipe (kept under `preserve = ["special"]`).
    Fifo,
    /// A character or block device and its device number.
    Device {
        block: bool,
        rdev: u64,
    },
}

/// One namespace entry: what a path is and the metadata restored with it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "EntryWire")]
pub struct Entry {
    pub node: Node,
    /// Permission bits (`st_mode & 0o7777`); 0o777 for symlinks.
    pub mode: u32,
    /// Modification time in nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// File size in bytes; 0 for directories, target length for symlinks.
    pub size: u64,
    /// Owner, extended attributes, ACLs and hard-link key, when the
    /// dataset keeps them (entries written before 0.5, and those of pushed
    /// objects, have none).
    pub ext: Option<Box<Ext>>,
}

/// An entry as encoded. The first three node forms are those of entries
/// written before owners and attributes were kept, so those decode as they
/// are and an entry without them still encodes to the same bytes (and
/// hashes); anything else is wrapped in `Ext` (formats.md 4.2).
#[derive(Deserialize)]
struct EntryWire {
    node: NodeWire,
    mode: u32,
    mtime_ns: i64,
    size: u64,
}

#[derive(Deserialize)]
enum NodeWire {
    File { chunks: Vec<ChunkRef> },
    Dir,
    Symlink { target: Vec<u8> },
    Ext { node: Node, ext: Option<Box<Ext>> },
}

/// [`EntryWire`] borrowed, to encode without copying a file's chunk list.
#[derive(Serialize)]
struct EntryWireRef<'a> {
    node: NodeWireRef<'a>,
    mode: u32,
    mtime_ns: i64,
    size: u64,
}

#[derive(Serialize)]
enum NodeWireRef<'a> {
    File {
        chunks: &'a [ChunkRef],
    },
    Dir,
    Symlink {
        target: &'a [u8],
    },
    Ext {
        node: &'a Node,
        ext: &'a Option<Box<Ext>>,
    },
}

impl TryFrom<EntryWire> for Entry {
    type Error = String;
    fn try_from(w: EntryWire) -> Result<Entry, String> {
        let (node, ext) = match w.node {
            NodeWire::File { chunks } => (Node::File { chunks }, None),
            NodeWire::Dir => (Node::Dir, None),
            NodeWire::Symlink { target } => (Node::Symlink { target }, None),
            NodeWire::Ext { node, ext } => {
                match &ext {
                    Some(x) => x.check()?,
                    // One encoding per entry: these have their own.
                    None if matches!(
                        node,
                        Node::File { .. } | Node::Dir | Node::Symlink { .. }
                    ) =>
                    {
                        return Err("an entry without metadata wrapped as one with it".into())
                    }
                    None => {}
                }
                (node, ext)
            }
        };
        Ok(Entry {
            node,
            mode: w.mode,
            mtime_ns: w.mtime_ns,
            size: w.size,
            ext,
        })
    }
}

impl Serialize for Entry {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let node = match (&self.node, &self.ext) {
            (Node::File { chunks }, None) => NodeWireRef::File { chunks },
            (Node::Dir, None) => NodeWireRef::Dir,
            (Node::Symlink { target }, None) => NodeWireRef::Symlink { target },
            (node, ext) => NodeWireRef::Ext { node, ext },
        };
        EntryWireRef {
            node,
            mode: self.mode,
            mtime_ns: self.mtime_ns,
            size: self.size,
        }
        .serialize(s)
    }
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

    /// Whether `other` records the same thing at a path: kind, contents,
    /// mode, mtime, size, owner and attributes (what the digest covers).
    pub fn same_recorded(&self, other: &Entry) -> bool {
        self.node == other.node
            && self.mode == other.mode
            && self.mtime_ns == other.mtime_ns
            && self.size == other.size
            && crate::meta::same_recorded(self.ext.as_deref(), other.ext.as_deref())
    }

    /// The hard-link key shared by every name of a file with several.
    pub fn link(&self) -> Option<u64> {
        self.ext.as_ref().map(|x| x.link).filter(|l| *l != 0)
    }

    /// The [`Preserve`](crate::meta::Preserve) bits this entry recorded.
    pub fn kept(&self) -> Option<u8> {
        self.ext.as_ref().map(|x| x.kept)
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
        self.digest_bytes_masked(path, u8::MAX)
    }

    /// [`Entry::digest_bytes`] without the kinds of metadata not in `mask`
    /// (a restore that could not set owners compares the rest). An entry
    /// without owners or attributes gives the bytes it always gave.
    pub fn digest_bytes_masked(&self, path: &[u8], mask: u8) -> Vec<u8> {
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
            Node::Fifo => (4, Vec::new()),
            Node::Device { block, rdev } => {
                (if *block { 6 } else { 5 }, rdev.to_le_bytes().to_vec())
            }
        };
        v.push(kind);
        v.extend_from_slice(&self.mode.to_le_bytes());
        v.extend_from_slice(&self.mtime_ns.to_le_bytes());
        v.extend_from_slice(&self.size.to_le_bytes());
        v.extend_from_slice(&(extra.len() as u64).to_le_bytes());
        v.extend_from_slice(&extra);
        if let Some(x) = &self.ext {
            x.digest_bytes(mask, &mut v);
        }
        v
    }

    pub fn digest_element_masked(&self, keys: &Keys, path: &[u8], mask: u8) -> LtHash {
        LtHash::element(&keys.digest, &self.digest_bytes_masked(path, mask))
    }

    pub fn digest_element(&self, keys: &Keys, path: &[u8]) -> LtHash {
        LtHash::element(&keys.digest, &self.digest_bytes(path))
    }
}

/// The namespace digest of `entries` (each (path, entry)), summed on every
/// core.
pub fn digest_of(keys: &Keys, entries: &[(Vec<u8>, Entry)]) -> LtHash {
    use rayon::prelude::*;
    entries
        .par_iter()
        .fold(LtHash::default, |mut acc, (p, e)| {
            acc.add(&e.digest_element(keys, p));
            acc
        })
        .reduce(LtHash::default, |mut a, b| {
            a.add(&b);
            a
        })
}

/// The items of a fallible iterator in vectors of up to `n`, ending after
/// the first error: how whatever walks a whole namespace holds one batch
/// of it at a time.
pub fn batches<T, E>(
    mut items: impl Iterator<Item = Result<T, E>>,
    n: usize,
) -> impl Iterator<Item = Result<Vec<T>, E>> {
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        let mut batch = Vec::with_capacity(n.clamp(1, 1024));
        for item in items.by_ref() {
            match item {
                Ok(x) => {
                    batch.push(x);
                    if batch.len() >= n.max(1) {
                        return Some(Ok(batch));
                    }
                }
                Err(e) => {
                    done = true;
                    return Some(Err(e));
                }
            }
        }
        done = true;
        (!batch.is_empty()).then_some(Ok(batch))
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_hold_up_to_n_items_and_end_after_the_first_error() {
        let ok: Vec<Result<u32, &str>> = (0..7).map(Ok).collect();
        let got: Vec<Vec<u32>> = batches(ok.into_iter(), 3).map(|b| b.unwrap()).collect();
        assert_eq!(got, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]);
        let items = vec![Ok(1), Ok(2), Err("bad"), Ok(4)];
        let got: Vec<Result<Vec<u32>, &str>> = batches(items.into_iter(), 5).collect();
        assert_eq!(got, vec![Err("bad")]);
        assert_eq!(batches(std::iter::empty::<Result<u8, ()>>(), 4).count(), 0);
    }

    /// The entry layout before owners and attributes were kept.
    #[derive(Serialize, Deserialize)]
    enum OldNode {
        File { chunks: Vec<ChunkRef> },
        Dir,
        Symlink { target: Vec<u8> },
    }

    #[derive(Serialize, Deserialize)]
    struct OldEntry {
        node: OldNode,
        mode: u32,
        mtime_ns: i64,
        size: u64,
    }

    #[test]
    fn entries_without_metadata_keep_their_old_bytes_and_old_entries_decode() {
        let chunks = vec![ChunkRef {
            id: ChunkId([7; 32]),
            len: 5,
        }];
        let old = OldEntry {
            node: OldNode::File {
                chunks: chunks.clone(),
            },
            mode: 0o644,
            mtime_ns: 12,
            size: 5,
        };
        let old_bytes = postcard::to_allocvec(&old).unwrap();
        let e = Entry::decode(&old_bytes).unwrap();
        assert_eq!(e.node, Node::File { chunks });
        assert_eq!(e.ext, None);
        assert_eq!(e.encode(), old_bytes);
        let old_dir = postcard::to_allocvec(&OldEntry {
            node: OldNode::Symlink {
                target: b"t".to_vec(),
            },
            mode: 0o777,
            mtime_ns: 1,
            size: 1,
        })
        .unwrap();
        assert_eq!(Entry::decode(&old_dir).unwrap().encode(), old_dir);
    }

    #[test]
    fn entries_with_metadata_and_special_files_round_trip_and_hostile_ones_do_not_decode() {
        let mut e = Entry {
            node: Node::Device {
                block: false,
                rdev: 0x0103,
            },
            mode: 0o600,
            mtime_ns: 3,
            size: 0,
            ext: Some(Box::new(Ext {
                kept: crate::meta::Preserve::OWNER | crate::meta::Preserve::ACL,
                uid: 1000,
                gid: 1000,
                user: b"u".to_vec(),
                group: b"g".to_vec(),
                xattrs: vec![(b"system.posix_acl_access".to_vec(), vec![2, 0, 0, 0])],
                link: 0,
            })),
        };
        assert_eq!(Entry::decode(&e.encode()).as_ref(), Some(&e));
        e.node = Node::Fifo;
        e.ext = None;
        assert_eq!(Entry::decode(&e.encode()).as_ref(), Some(&e));
        e.ext = Some(Box::new(Ext {
            kept: crate::meta::Preserve::XATTR,
            xattrs: vec![(b"system.evil".to_vec(), Vec::new())],
            ..Ext::default()
        }));
        assert_eq!(Entry::decode(&e.encode()), None);
    }
}
