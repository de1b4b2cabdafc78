//! Entries and ops the vault's integration tests build their datasets from.
//! Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use vault::chunk::{self, ChunkId};
use vault::ops::{ChunkRef, Entry, Node, Op};

/// A one-chunk file entry holding `data`, with its sealed chunk.
pub fn file_entry(
    keys: &vault::Keys,
    data: &[u8],
    mode: u32,
    mtime_ns: i64,
) -> (Entry, vault::SealedChunk) {
    let id = ChunkId::of(keys, data);
    let e = Entry {
        node: Node::File {
            chunks: vec![ChunkRef {
                id,
                len: data.len() as u32,
            }],
        },
        mode,
        mtime_ns,
        size: data.len() as u64,
        ext: None,
    };
    (e, chunk::seal(keys, id, data))
}

pub fn put(path: &str, entry: Entry) -> Op {
    Op::Put {
        path: path.as_bytes().to_vec(),
        entry,
    }
}
