//! Turning a byte stream into a dataset's chunks, for the directory source
//! and `triad put` alike: cut (FastCDC), id (keyed BLAKE3), skip what the
//! dataset or this stream already holds, and seal and log new chunks in
//! batches held by Pin records, so an object of any size streams in with
//! bounded memory. The caller names the object with one Put record that
//! carries the last batch and unpins the rest, or unpins on failure.

use std::io::Read;

use vault::chunk::{self, ChunkId};
use vault::{ChunkRef, Dataset, Op, SubmitError, VaultError};

/// New chunks sealed and logged under a Pin record at a time.
pub const BATCH_BYTES: usize = 8 << 20;

/// An object as streamed in.
pub struct Streamed {
    pub refs: Vec<ChunkRef>,
    /// New chunks not logged yet: they go with the record that names the
    /// object.
    pub batch: Vec<(ChunkId, Vec<u8>)>,
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The stream itself failed (the caller decides what that means).
    #[error("{0}")]
    Read(std::io::Error),
    #[error(transparent)]
    Vault(#[from] VaultError),
}

/// Streams `reader` into `ds`. Chunks logged under Pin records are added to
/// `pinned`, which the caller must release (with the naming record, or by
/// an Unpin on failure). `on_piece` sees each piece's length as it is read.
pub fn stream(
    ds: &Dataset,
    reader: impl Read,
    pinned: &mut Vec<ChunkId>,
    mut on_piece: impl FnMut(usize),
) -> Result<Streamed, StreamError> {
    let keys = ds.keys();
    let mut out = Streamed {
        refs: Vec::new(),
        batch: Vec::new(),
        size: 0,
    };
    let mut batch_bytes = 0usize;
    for piece in chunk::stream(reader) {
        let piece = piece.map_err(StreamError::Read)?;
        on_piece(piece.len());
        out.size += piece.len() as u64;
        let id = ChunkId::of(keys, &piece);
        out.refs.push(ChunkRef {
            id,
            len: piece.len() as u32,
        });
        if pinned.contains(&id) || out.batch.iter().any(|(b, _)| *b == id) || ds.has_chunk(&id)? {
            continue;
        }
        batch_bytes += piece.len();
        out.batch.push((id, piece));
        if batch_bytes >= BATCH_BYTES {
            let sealed = seal(keys, &out.batch);
            let ids: Vec<ChunkId> = out.batch.iter().map(|(id, _)| *id).collect();
            match ds.submit(vec![Op::Pin { ids: ids.clone() }], sealed) {
                Ok(_) => {}
                Err(SubmitError::Vault(e)) => return Err(e.into()),
                // A Pin only needs the chunks it carries, so this cannot happen.
                Err(SubmitError::Missing(m)) => {
                    return Err(VaultError::Closed(format!(
                        "pin reported {} missing chunks",
                        m.0.len()
                    ))
                    .into())
                }
            }
            pinned.extend(ids);
            out.batch.clear();
            batch_bytes = 0;
        }
    }
    Ok(out)
}

/// Seals a batch of new chunks (on every core).
pub fn seal(keys: &vault::Keys, batch: &[(ChunkId, Vec<u8>)]) -> Vec<vault::SealedChunk> {
    let items: Vec<(ChunkId, &[u8])> = batch.iter().map(|(id, p)| (*id, p.as_slice())).collect();
    chunk::seal_many(keys, &items)
}
