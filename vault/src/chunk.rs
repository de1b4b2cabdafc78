//! Chunks: content-defined cutting, ids, and sealing.
//!
//! A file's content is cut by FastCDC (2020) into chunks of about 1 MiB. A
//! chunk's id is the keyed BLAKE3 hash of its plaintext, so equal content is
//! stored once and ids reveal nothing without the key. A chunk is sealed as
//! zstd (when that shrinks it) then SM4-GCM with the nonce taken from the id:
//! sealing is deterministic, so every site holds byte-identical ciphertext,
//! and the BLAKE3 hash of the sealed bytes lets anyone check a copy without
//! the key.

use rayon::prelude::*;

use crate::crypto::{sm4_gcm_open, sm4_gcm_seal, NONCE_LEN, TAG_LEN};
pub use crate::id::ChunkId;
use crate::keys::Keys;

/// FastCDC bounds. Part of the dataset's identity: changing them changes every
/// chunk id, so they are fixed here rather than configurable.
pub const CHUNK_MIN: u32 = 256 * 1024;
pub const CHUNK_AVG: u32 = 1024 * 1024;
pub const CHUNK_MAX: u32 = 4 * 1024 * 1024;

/// zstd level: 3 is zstd's default and runs several times faster than SM4,
/// so a better ratio here directly shortens the SM4 stage.
const ZSTD_LEVEL: i32 = 3;

thread_local! {
    // One zstd context of each kind per thread, made on first use: making
    // one per chunk cost more than compressing a small file (3% of a
    // standby tree's time went to ZSTD_createDCtx alone). A context reused
    // with the same level compresses to exactly the bytes a fresh one
    // does, so sealing stays deterministic.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// zstd at [`ZSTD_LEVEL`] through this thread's context; None only when a
/// context cannot be made (allocation failure).
fn zstd_compress(plain: &[u8]) -> Option<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.try_borrow_mut().ok()?;
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
        }
        c.as_mut()?.compress(plain).ok()
    })
}

/// Decompresses at most `capacity` bytes through this thread's context.
fn zstd_decompress(compressed: &[u8], capacity: usize) -> Option<Vec<u8>> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.try_borrow_mut().ok()?;
        if d.is_none() {
            *d = zstd::bulk::Decompressor::new().ok();
        }
        d.as_mut()?.decompress(compressed, capacity).ok()
    })
}

const SEAL_VERSION: u8 = 1;
const FLAG_ZSTD: u8 = 1;
/// Version byte, flags byte.
const SEAL_HEADER: usize = 2;

/// The most sealed bytes a chunk of `plain_len` plaintext bytes can take
/// (`plain_len` capped at [`CHUNK_MAX`]): zstd is used only when it shrinks
/// the chunk, so header and tag are all that is added. Readers refuse
/// anything longer before they read it.
pub fn max_sealed_len(plain_len: u32) -> u64 {
    // A claim above what the cutter makes is bounded too: such a chunk is
    // refused when opened, and must not be downloaded whole first.
    plain_len.min(CHUNK_MAX) as u64 + (SEAL_HEADER + TAG_LEN) as u64
}

impl ChunkId {
    /// The keyed BLAKE3 hash of `plaintext`: a chunk's id.
    pub fn of(keys: &Keys, plaintext: &[u8]) -> Self {
        ChunkId(*blake3::keyed_hash(&keys.chunk_id, plaintext).as_bytes())
    }
}

/// A chunk as stored and sent: id, plaintext length and sealed bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedChunk {
    pub id: ChunkId,
    pub plain_len: u32,
    pub sealed: Vec<u8>,
}

impl SealedChunk {
    /// BLAKE3 of the sealed bytes: checkable without the key.
    pub fn sealed_hash(&self) -> [u8; 32] {
        *blake3::hash(&self.sealed).as_bytes()
    }
}

/// Why a sealed chunk could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("sealed bytes are too short or have an unknown format version")]
    Format,
    #[error("SM4-GCM tag does not match (altered ciphertext or wrong key)")]
    Tag,
    #[error("zstd payload is corrupt")]
    Decompress,
    #[error("plaintext does not hash to the chunk id")]
    IdMismatch,
    #[error(
        "claims {plain_len} plaintext bytes in {sealed} sealed bytes: more than any chunk triad cuts"
    )]
    TooLarge { plain_len: u32, sealed: usize },
    #[error("plaintext length {got} differs from the recorded {want}")]
    Length { got: usize, want: usize },
}

fn nonce_of(id: &ChunkId) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n.copy_from_slice(&id.0[..NONCE_LEN]);
    n
}

fn aad_of(id: &ChunkId, flags: u8) -> [u8; 34] {
    let mut aad = [0u8; 34];
    aad[..32].copy_from_slice(&id.0);
    aad[32] = SEAL_VERSION;
    aad[33] = flags;
    aad
}

/// Seals one chunk whose id is already known.
pub fn seal(keys: &Keys, id: ChunkId, plaintext: &[u8]) -> SealedChunk {
    // zstd's bulk compressor only fails on allocation failure; fall back to
    // storing the chunk uncompressed rather than failing the write.
    let compressed = zstd_compress(plaintext);
    let (flags, body): (u8, &[u8]) = match &compressed {
        Some(c) if c.len() < plaintext.len() => (FLAG_ZSTD, c),
        _ => (0, plaintext),
    };
    let mut buf = Vec::with_capacity(SEAL_HEADER + body.len() + TAG_LEN);
    buf.push(SEAL_VERSION);
    buf.push(flags);
    let mut ct = body.to_vec();
    sm4_gcm_seal(
        &keys.chunk_seal,
        &nonce_of(&id),
        &aad_of(&id, flags),
        &mut ct,
    );
    buf.extend_from_slice(&ct);
    SealedChunk {
        id,
        plain_len: plaintext.len() as u32,
        sealed: buf,
    }
}

/// Opens a sealed chunk and proves the plaintext matches its id.
pub fn open(
    keys: &Keys,
    id: &ChunkId,
    plain_len: u32,
    sealed: &[u8],
) -> Result<Vec<u8>, OpenError> {
    if sealed.len() < SEAL_HEADER + TAG_LEN || sealed[0] != SEAL_VERSION {
        return Err(OpenError::Format);
    }
    // The length is claimed by whoever sent the chunk: nothing larger than
    // the cutter makes is ever allocated for it.
    if plain_len > CHUNK_MAX || sealed.len() as u64 > max_sealed_len(plain_len) {
        return Err(OpenError::TooLarge {
            plain_len,
            sealed: sealed.len(),
        });
    }
    let flags = sealed[1];
    let mut buf = sealed[SEAL_HEADER..].to_vec();
    if !sm4_gcm_open(
        &keys.chunk_seal,
        &nonce_of(id),
        &aad_of(id, flags),
        &mut buf,
    ) {
        return Err(OpenError::Tag);
    }
    let plain = if flags & FLAG_ZSTD != 0 {
        zstd_decompress(&buf, plain_len as usize).ok_or(OpenError::Decompress)?
    } else {
        buf
    };
    if plain.len() != plain_len as usize {
        return Err(OpenError::Length {
            got: plain.len(),
            want: plain_len as usize,
        });
    }
    if ChunkId::of(keys, &plain) != *id {
        return Err(OpenError::IdMismatch);
    }
    Ok(plain)
}

/// Where a chunk lies in a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cut {
    pub offset: usize,
    pub len: usize,
}

/// Cuts an in-memory buffer into content-defined chunks.
pub fn cut(data: &[u8]) -> Vec<Cut> {
    if data.is_empty() {
        return Vec::new();
    }
    fastcdc::v2020::FastCDC::new(data, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX)
        .map(|c| Cut {
            offset: c.offset,
            len: c.length,
        })
        .collect()
}

/// Streams a reader into content-defined chunks, each with its plaintext.
///
/// Input shorter than [`CHUNK_MIN`] is one chunk whatever its content (the
/// cutter never cuts before the minimum), so it is read into a buffer of its
/// own size: the cutter's buffer is [`CHUNK_MAX`] bytes, zeroed when made,
/// which for a 4 KiB file cost a hundred times the work of the file itself.
/// Longer input goes through the cutter whole, prefix included, so the cut
/// points are exactly the cutter's.
pub fn stream<'a, R: std::io::Read + 'a>(
    mut reader: R,
) -> Box<dyn Iterator<Item = std::io::Result<Vec<u8>>> + 'a> {
    use std::io::Read;
    let mut head = Vec::new();
    match (&mut reader)
        .take(u64::from(CHUNK_MIN))
        .read_to_end(&mut head)
    {
        Err(e) => return Box::new(std::iter::once(Err(e))),
        Ok(n) if n < CHUNK_MIN as usize => {
            // The whole input: nothing (an empty file has no chunk) or one chunk.
            return Box::new((!head.is_empty()).then_some(Ok(head)).into_iter());
        }
        Ok(_) => {}
    }
    let joined = std::io::Cursor::new(head).chain(reader);
    Box::new(
        fastcdc::v2020::StreamCDC::new(joined, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX).map(|r| {
            r.map(|c| c.data).map_err(|e| match e {
                fastcdc::v2020::Error::IoError(io) => io,
                other => std::io::Error::other(other.to_string()),
            })
        }),
    )
}

/// Ids of many plaintexts, hashed in parallel.
pub fn ids_of(keys: &Keys, plains: &[Vec<u8>]) -> Vec<ChunkId> {
    plains.par_iter().map(|p| ChunkId::of(keys, p)).collect()
}

/// Seals many chunks in parallel on all cores: SM4 is the slowest stage.
pub fn seal_many(keys: &Keys, items: &[(ChunkId, &[u8])]) -> Vec<SealedChunk> {
    items.par_iter().map(|(id, p)| seal(keys, *id, p)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::DatasetKey;

    #[test]
    fn a_reused_zstd_context_compresses_to_the_bytes_a_fresh_one_does() {
        let mut rng = rand::thread_rng();
        // Sizes up and down, so the context's state from a larger input
        // meets a smaller one; half random, half compressible.
        for len in [4096usize, 1 << 20, 0, 17, 300_000, 2048, 1 << 20, 5] {
            let mut plain = vec![0u8; len];
            rand::RngCore::fill_bytes(&mut rng, &mut plain[..len / 2]);
            let reused = zstd_compress(&plain).unwrap();
            assert_eq!(
                reused,
                zstd::bulk::compress(&plain, ZSTD_LEVEL).unwrap(),
                "{len}"
            );
            assert_eq!(zstd_decompress(&reused, len).unwrap(), plain);
        }
        // A frame that does not decompress leaves the context usable.
        assert!(zstd_decompress(b"not zstd at all", 100).is_none());
        let plain = vec![7u8; 10_000];
        let c = zstd_compress(&plain).unwrap();
        assert!(
            zstd_decompress(&c, 9_999).is_none(),
            "larger than the capacity"
        );
        assert_eq!(zstd_decompress(&c, 10_000).unwrap(), plain);
    }

    /// Short input skips the cutter; every length gets the cutter's own
    /// cut points.
    #[test]
    fn stream_cuts_exactly_as_the_cutter_does() {
        let mut data = vec![0u8; 3 << 20];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut data);
        let min = CHUNK_MIN as usize;
        for len in [0, 1, 4096, min - 1, min, min + 1, 3 << 20] {
            let input = &data[..len];
            let ours: Vec<Vec<u8>> = stream(input).map(|c| c.unwrap()).collect();
            let cutter: Vec<Vec<u8>> =
                fastcdc::v2020::StreamCDC::new(input, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX)
                    .map(|c| c.unwrap().data)
                    .collect();
            assert_eq!(ours, cutter, "length {len}");
        }
    }

    #[test]
    fn seal_is_deterministic_and_opens() {
        let keys = DatasetKey::generate().derive();
        let data = b"the same words again and again and again".repeat(100);
        let id = ChunkId::of(&keys, &data);
        let a = seal(&keys, id, &data);
        let b = seal(&keys, id, &data);
        assert_eq!(a.sealed, b.sealed);
        assert!(
            a.sealed.len() < data.len(),
            "compressible data is compressed"
        );
        assert_eq!(open(&keys, &id, a.plain_len, &a.sealed).unwrap(), data);
    }

    #[test]
    fn incompressible_chunks_are_stored_raw() {
        let keys = DatasetKey::generate().derive();
        let mut data = vec![0u8; 4096];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut data);
        let id = ChunkId::of(&keys, &data);
        let s = seal(&keys, id, &data);
        assert_eq!(s.sealed[1], 0);
        assert_eq!(open(&keys, &id, s.plain_len, &s.sealed).unwrap(), data);
    }

    #[test]
    fn altered_or_misfiled_chunks_are_refused() {
        let keys = DatasetKey::generate().derive();
        let data = vec![5u8; 10_000];
        let id = ChunkId::of(&keys, &data);
        let s = seal(&keys, id, &data);
        let mut bad = s.sealed.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x40;
        assert_eq!(open(&keys, &id, s.plain_len, &bad), Err(OpenError::Tag));
        let other = ChunkId::of(&keys, b"other");
        assert!(open(&keys, &other, s.plain_len, &s.sealed).is_err());
        let wrong = DatasetKey::generate().derive();
        assert_eq!(
            open(&wrong, &id, s.plain_len, &s.sealed),
            Err(OpenError::Tag)
        );
    }

    #[test]
    fn cutting_is_content_defined() {
        let mut data = vec![0u8; 8 << 20];
        let mut rng = rand::thread_rng();
        rand::RngCore::fill_bytes(&mut rng, &mut data);
        let before = cut(&data);
        assert!(before.len() >= 3, "8 MiB cuts into several chunks");
        let mut shifted = vec![1u8; 100];
        shifted.extend_from_slice(&data);
        let after = cut(&shifted);
        // All but the first chunk keep their boundaries after an insert at the front.
        let tail = |cs: &[Cut], base: usize| {
            cs.iter()
                .skip(1)
                .map(|c| (c.offset - base, c.len))
                .collect::<Vec<_>>()
        };
        assert_eq!(tail(&before, 0), tail(&after, 100));
        let streamed: Vec<usize> = stream(&data[..]).map(|c| c.unwrap().len()).collect();
        assert_eq!(streamed, before.iter().map(|c| c.len).collect::<Vec<_>>());
    }
}
