//! Packs: many sealed chunks in one object, with a sealed index at its end,
//! and reading chunks back wherever they are stored.
//!
//! One object per chunk made a restore of 200,000 small files cost 200,000
//! GETs, and the server's per-request cost, not bandwidth, set its pace.
//! The archiver now writes the chunks of each upload round into packs of
//! up to [`PACK_BYTES`] (docs/formats.md 16.8): the sealed chunks back to
//! back, then an index sealed under the dataset key and bound to the
//! pack's name, listing each chunk's id, offset, lengths and the BLAKE3 of
//! its sealed bytes.
//!
//! [`Located`] is where each chunk of an archive is: in a pack, as a chunk
//! object of its own (archives written before packs, and chunks an archive
//! repair re-uploaded), or both. It is built from one listing of each
//! prefix and one read of each pack's index. [`Located::fetch`] reads
//! chunks with ranged GETs, merging neighbours in a pack into one request,
//! and checks each against the BLAKE3 its caller got from an authenticated
//! manifest, page or piece. A chunk object of its own is read first: it is
//! either the only copy or a repair of a damaged packed one.
//!
//! Index files (`<dataset>/index/<name>.idx`, docs/formats.md 16.9) carry
//! many packs' indexes in one sealed object, so a reader makes one GET for
//! the packs they cover instead of one (or two) per pack. They are only a
//! shortcut: a pack no index file covers, or covers with another size, has
//! its own index read, and an index file that does not read back is passed
//! over with a warning.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use futures::stream::{self, Stream, StreamExt};
use serde::{Deserialize, Serialize};
use vault::{ChunkId, Keys, SealedChunk};

use crate::error::{ArchiveError, Result};
use crate::objects;
use crate::store::Store;

/// A pack is closed once it holds this many bytes of sealed chunks.
pub const PACK_BYTES: usize = 16 << 20;

/// A pack holds at most this many chunks, which bounds its index (about
/// 90 bytes per chunk) for many small files.
pub const PACK_CHUNKS: usize = 20_000;

/// An index entry's most encoded bytes (id, hash, and varints).
const INDEX_ENTRY_MAX: usize = 32 + 32 + 10 + 5 + 5;

/// The largest index a reader accepts: [`PACK_CHUNKS`] entries with room.
const MAX_INDEX_BYTES: u64 = 4 << 20;

/// The largest pack a reader accepts: a full pack plus one largest chunk
/// and its index.
const MAX_PACK_BYTES: u64 =
    PACK_BYTES as u64 + vault::chunk::CHUNK_MAX as u64 * 2 + MAX_INDEX_BYTES + 64;

const MAGIC: &[u8; 8] = b"TRIADPK1";
/// After the index: its length (u32) and the magic again.
const TRAILER: u64 = 4 + 8;
/// What a reader fetches of a pack's end at first: the whole index of a
/// pack of a few hundred chunks; a longer index takes a second read.
const TAIL_GUESS: u64 = 64 << 10;

/// Neighbouring chunks of a pack are fetched in one request when the bytes
/// between them are fewer than this...
const MERGE_GAP: u64 = 256 << 10;
/// ...and the request stays under this (a whole pack, when all of it is
/// wanted), which bounds memory: at most [`RANGES_IN_FLIGHT`] such requests
/// are in flight, about 80 MiB.
const RANGE_BYTES: u64 = PACK_BYTES as u64 + vault::chunk::CHUNK_MAX as u64;
const RANGES_IN_FLIGHT: usize = 4;

/// The index version this build writes and reads.
const INDEX_VERSION: u32 = 1;

/// The index file version this build writes and reads.
const INDEX_FILE_VERSION: u32 = 1;

/// An index file is written once it would cover this many chunks (and at
/// every snapshot), which bounds it to about 20 MB.
pub const INDEX_FILE_CHUNKS: usize = 200_000;

/// The largest index file a reader accepts: a prune's consolidated one
/// covers a whole archive, about 100 bytes a chunk.
const MAX_INDEX_FILE_BYTES: u64 = 512 << 20;

pub fn index_files_prefix(ds: &str) -> String {
    format!("{ds}/index/")
}

/// One pack as an index file records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexedPack {
    /// The pack's key, relative to the store's prefix.
    pub key: String,
    /// Its size: a listed pack of another size has its own index read.
    pub size: u64,
    pub entries: Vec<PackEntry>,
}

#[derive(Deserialize)]
struct IndexFile {
    version: u32,
    packs: Vec<IndexedPack>,
}

/// [`IndexFile`] as written, borrowing its packs (postcard encodes a slice
/// as it does a `Vec`).
#[derive(Serialize)]
struct IndexFileOut<'a> {
    version: u32,
    packs: &'a [IndexedPack],
}

/// Index files read at once: each may be up to [`MAX_INDEX_FILE_BYTES`]
/// before its seal is checked, so someone who can write the bucket could
/// otherwise make a reader hold `concurrency` such objects.
const INDEX_FILES_IN_FLIGHT: usize = 2;

/// Seals an index file of `packs` under a fresh random name; returns its
/// key and bytes.
pub fn seal_index_file(keys: &Keys, ds: &str, packs: &[IndexedPack]) -> (String, Vec<u8>) {
    let mut name = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut name);
    let key = format!("{}{}.idx", index_files_prefix(ds), hex::encode(name));
    let file = IndexFileOut {
        version: INDEX_FILE_VERSION,
        packs,
    };
    // Encoding plain structs of strings, integers and arrays cannot fail.
    let plain = postcard::to_allocvec(&file).unwrap_or_default();
    let sealed = objects::seal(keys, &key, &plain);
    (key, sealed)
}

/// Opens the index file `key` (sealed under the dataset key and bound to
/// its name) and checks each entry lies inside its pack.
pub fn decode_index_file(
    keys: &Keys,
    key: &str,
    sealed: &[u8],
) -> std::result::Result<Vec<IndexedPack>, String> {
    let plain = objects::open(keys, key, sealed).map_err(|e| match e {
        ArchiveError::Damaged { reason, .. } => reason,
        e => e.to_string(),
    })?;
    let file: IndexFile =
        postcard::from_bytes(&plain).map_err(|e| format!("does not decode: {e}"))?;
    if file.version != INDEX_FILE_VERSION {
        return Err(format!(
            "index file version {} (this build reads {INDEX_FILE_VERSION}): written by a newer triad",
            file.version
        ));
    }
    for p in &file.packs {
        check_size(p.size)?;
        check_entries(&p.entries, p.size - TRAILER).map_err(|e| format!("pack {}: {e}", p.key))?;
    }
    Ok(file.packs)
}

pub fn packs_prefix(ds: &str) -> String {
    format!("{ds}/packs/")
}

fn pack_key(ds: &str, name: &str) -> String {
    format!("{ds}/packs/{name}.pack")
}

/// One chunk in a pack, as its index records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackEntry {
    pub id: ChunkId,
    /// Where its sealed bytes start in the pack.
    pub offset: u64,
    pub sealed_len: u32,
    pub plain_len: u32,
    /// BLAKE3 of the sealed bytes.
    pub hash: [u8; 32],
}

#[derive(Serialize, Deserialize)]
struct PackIndex {
    version: u32,
    entries: Vec<PackEntry>,
}

/// A pack ready to upload: its key, bytes and index.
pub struct Pack {
    pub key: String,
    pub bytes: Vec<u8>,
    pub entries: Vec<PackEntry>,
}

/// Cuts `chunks` into packs of up to [`PACK_BYTES`] (or `pack_bytes`, when
/// smaller) and [`PACK_CHUNKS`] chunks. A pack is named by the BLAKE3 of
/// the ids it holds and 16 random bytes: an upload never replaces a pack
/// already in the store. With names from the ids alone, a snapshot storing
/// again the chunks of a damaged pack in the same order overwrote it, and
/// the damaged bytes, kept as evidence otherwise, were lost.
pub fn build(keys: &Keys, ds: &str, chunks: Vec<SealedChunk>, pack_bytes: usize) -> Vec<Pack> {
    let limit = pack_bytes.clamp(1, PACK_BYTES);
    let mut packs = Vec::new();
    let mut cur: Vec<SealedChunk> = Vec::new();
    let mut bytes = 0usize;
    for c in chunks {
        // The whole pack, index included, stays within the limit, so a
        // default pack is one PUT, under the store's multipart threshold.
        let index = (cur.len() + 1) * INDEX_ENTRY_MAX + 128;
        if !cur.is_empty() && (bytes + c.sealed.len() + index > limit || cur.len() >= PACK_CHUNKS) {
            packs.push(seal_pack(keys, ds, std::mem::take(&mut cur)));
            bytes = 0;
        }
        bytes += c.sealed.len();
        cur.push(c);
    }
    if !cur.is_empty() {
        packs.push(seal_pack(keys, ds, cur));
    }
    packs
}

fn seal_pack(keys: &Keys, ds: &str, chunks: Vec<SealedChunk>) -> Pack {
    let mut names = blake3::Hasher::new();
    for c in &chunks {
        names.update(&c.id.0);
    }
    let mut salt = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut salt);
    names.update(&salt);
    let key = pack_key(ds, &names.finalize().to_hex());
    let body: usize = chunks.iter().map(|c| c.sealed.len()).sum();
    let mut bytes = Vec::with_capacity(body + chunks.len() * 96 + 64);
    bytes.extend_from_slice(MAGIC);
    let mut entries = Vec::with_capacity(chunks.len());
    for c in chunks {
        entries.push(PackEntry {
            id: c.id,
            offset: bytes.len() as u64,
            sealed_len: c.sealed.len() as u32,
            plain_len: c.plain_len,
            hash: *blake3::hash(&c.sealed).as_bytes(),
        });
        bytes.extend_from_slice(&c.sealed);
    }
    let index = PackIndex {
        version: INDEX_VERSION,
        entries,
    };
    // Encoding a plain struct of integers and arrays cannot fail.
    let plain = postcard::to_allocvec(&index).unwrap_or_default();
    let bytes = with_index(keys, &key, bytes, &plain);
    Pack {
        key,
        bytes,
        entries: index.entries,
    }
}

/// Reads the index at the end of pack `key` of `size` bytes: its tail
/// first, then the rest of a longer index.
pub async fn read_index(
    store: &Store,
    keys: &Keys,
    key: &str,
    size: u64,
) -> Result<Vec<PackEntry>> {
    let damaged = |reason: String| ArchiveError::Damaged {
        key: store.locate(key),
        reason,
    };
    check_size(size).map_err(damaged)?;
    let tail = store
        .get_range(key, "a pack", size - TAIL_GUESS.min(size)..size)
        .await?;
    match parse_tail(keys, key, size, &tail).map_err(damaged)? {
        Tail::Index(entries) => Ok(entries),
        Tail::Need(from) => {
            let tail = store.get_range(key, "a pack", from..size).await?;
            match parse_tail(keys, key, size, &tail).map_err(damaged)? {
                Tail::Index(entries) => Ok(entries),
                Tail::Need(_) => Err(damaged("its index is not where its trailer says".into())),
            }
        }
    }
}

/// The index of a whole pack held in memory (for tests and fuzzing).
pub fn decode_index(
    keys: &Keys,
    key: &str,
    pack: &[u8],
) -> std::result::Result<Vec<PackEntry>, String> {
    match parse_tail(keys, key, pack.len() as u64, pack)? {
        Tail::Index(e) => Ok(e),
        Tail::Need(_) => Err("its index is not where its trailer says".into()),
    }
}

fn check_size(size: u64) -> std::result::Result<(), String> {
    if (8 + TRAILER..=MAX_PACK_BYTES).contains(&size) {
        Ok(())
    } else {
        Err(format!(
            "{size} bytes is no pack's length (at most {MAX_PACK_BYTES}); refused without reading it"
        ))
    }
}

enum Tail {
    /// The index, checked.
    Index(Vec<PackEntry>),
    /// The tail read is too short: the index starts at this offset.
    Need(u64),
}

/// Parses the last `tail.len()` bytes of a pack of `size` bytes. Every
/// entry must lie inside the pack, before the index, and be no longer than
/// a sealed chunk of its length can be.
fn parse_tail(keys: &Keys, key: &str, size: u64, tail: &[u8]) -> std::result::Result<Tail, String> {
    let t = tail.len() as u64;
    check_size(size)?;
    if t > size || t < TRAILER {
        return Err(format!("{t} bytes read of a pack of {size}"));
    }
    let end = tail.len();
    if &tail[end - 8..] != MAGIC {
        return Err("no pack trailer: truncated or not a pack".into());
    }
    let mut len_bytes = [0u8; 4];
    len_bytes.copy_from_slice(&tail[end - 12..end - 8]);
    let len = u64::from(u32::from_le_bytes(len_bytes));
    if len > MAX_INDEX_BYTES || len + TRAILER + 8 > size {
        return Err(format!("its index claims {len} bytes"));
    }
    let index_start = size - TRAILER - len;
    if len + TRAILER > t {
        return Ok(Tail::Need(index_start));
    }
    let sealed = &tail[(t - TRAILER - len) as usize..(t - TRAILER) as usize];
    let plain = objects::open(keys, key, sealed).map_err(|e| match e {
        ArchiveError::Damaged { reason, .. } => format!("its index: {reason}"),
        e => e.to_string(),
    })?;
    let index: PackIndex =
        postcard::from_bytes(&plain).map_err(|e| format!("its index does not decode: {e}"))?;
    if index.version != INDEX_VERSION {
        return Err(format!(
            "pack index version {} (this build reads {INDEX_VERSION}): written by a newer triad",
            index.version
        ));
    }
    check_entries(&index.entries, index_start).map_err(|e| format!("its index {e}"))?;
    Ok(Tail::Index(index.entries))
}

/// Every entry must lie after the pack's magic and before `chunks_end`,
/// and be no longer than a sealed chunk of its length can be.
fn check_entries(entries: &[PackEntry], chunks_end: u64) -> std::result::Result<(), String> {
    for e in entries {
        let end = e.offset.checked_add(u64::from(e.sealed_len));
        if e.offset < 8
            || end.is_none_or(|end| end > chunks_end)
            || u64::from(e.sealed_len) > vault::chunk::max_sealed_len(e.plain_len)
        {
            return Err(format!(
                "places chunk {} at {}+{}, outside the pack's {chunks_end} bytes of chunks",
                e.id.short(),
                e.offset,
                e.sealed_len
            ));
        }
    }
    Ok(())
}

/// Seals an index's plaintext under the pack's `key` and appends it and the
/// trailer to `body`, the pack's magic and chunks.
pub fn with_index(keys: &Keys, key: &str, mut body: Vec<u8>, index_plain: &[u8]) -> Vec<u8> {
    let sealed = objects::seal(keys, key, index_plain);
    body.extend_from_slice(&sealed);
    body.extend_from_slice(&(sealed.len() as u32).to_le_bytes());
    body.extend_from_slice(MAGIC);
    body
}

/// Where one chunk's sealed bytes are, in 32 bytes: a restore holds one
/// for every chunk of the archive (a million chunks, 32 MB beside their
/// ids), so the pack is named by its number in `Located::pack_keys`.
#[derive(Debug, Clone, Copy)]
struct Place {
    /// The listed size of the chunk object of its own; [`Place::NONE`]
    /// for none.
    object: u64,
    /// Where in the pack (`pack` is [`Place::NO_PACK`] for none).
    offset: u64,
    pack: u32,
    sealed_len: u32,
    plain_len: u32,
}

impl Place {
    const NONE: u64 = u64::MAX;
    const NO_PACK: u32 = u32::MAX;
    const EMPTY: Place = Place {
        object: Place::NONE,
        offset: 0,
        pack: Place::NO_PACK,
        sealed_len: 0,
        plain_len: 0,
    };

    fn object(&self) -> Option<u64> {
        (self.object != Place::NONE).then_some(self.object)
    }
}

/// Every chunk's place, sorted by id once loaded: 64 bytes a chunk, where
/// a hash map took twice that (its spare buckets, and both tables while
/// it grew).
#[derive(Default)]
struct Places(Vec<(ChunkId, Place)>);

impl Places {
    /// Sorts by id and merges the places of one id: its chunk object (the
    /// listing's), and the last pack that holds it.
    fn settle(&mut self) {
        // Stable: the listing's object comes before the packs, and packs in
        // the order they were added.
        self.0.sort_by_key(|e| e.0);
        self.0.dedup_by(|later, kept| {
            if later.0 != kept.0 {
                return false;
            }
            if later.1.object().is_some() {
                kept.1.object = later.1.object;
            }
            if later.1.pack != Place::NO_PACK {
                let object = kept.1.object;
                kept.1 = later.1;
                kept.1.object = object;
            }
            true
        });
        self.0.shrink_to_fit();
    }

    fn get(&self, id: &ChunkId) -> Option<&Place> {
        self.0
            .binary_search_by(|(k, _)| k.cmp(id))
            .ok()
            .map(|i| &self.0[i].1)
    }
}

/// Where every chunk of a dataset's archive is.
#[derive(Default)]
pub struct Located {
    places: Places,
    /// The packs `Place::pack` numbers.
    pack_keys: Vec<Arc<str>>,
    /// Loaded by [`Located::load_places`]: `packs` holds no entries.
    without_lists: bool,
    /// Each pack's key, size and entries.
    pub packs: BTreeMap<Arc<str>, (u64, Vec<PackEntry>)>,
    /// Packs whose index does not read back (truncated, altered, sealed
    /// with another key): their chunks count as missing.
    pub damaged: Vec<DamagedPack>,
    /// The index files read (their keys), whole or not.
    pub index_files: Vec<String>,
    /// How many of the packs came from index files (the rest were read
    /// through their own indexes).
    pub packs_from_index_files: usize,
    /// Index files that did not read back: passed over, the packs' own
    /// indexes read instead.
    pub warnings: Vec<String>,
}

/// A pack whose index does not read back.
#[derive(Debug, Clone)]
pub struct DamagedPack {
    /// Its key, relative to the store's prefix.
    pub key: String,
    /// Where it is and why it does not read back.
    pub why: String,
}

/// A chunk to read: its id, plaintext length and the BLAKE3 of its sealed
/// bytes recorded by an authenticated object.
#[derive(Debug, Clone, Copy)]
pub struct Want {
    pub id: ChunkId,
    pub plain_len: u32,
    pub hash: [u8; 32],
}

/// What reading one chunk gave.
pub enum Fetched {
    Good(SealedChunk),
    /// Where it should have been (or "not in the archive") and why it is
    /// unusable; `missing` when no copy exists at all.
    Bad {
        id: ChunkId,
        at: String,
        reason: String,
        missing: bool,
    },
}

impl Located {
    /// Lists the dataset's chunk objects and packs, reads the index files
    /// (a couple at a time), and reads the own index of every pack they do
    /// not cover, `concurrency` at a time.
    pub async fn load(store: &Store, keys: &Keys, ds: &str, concurrency: usize) -> Result<Located> {
        Self::load_with(store, keys, ds, concurrency, true).await
    }

    /// [`Located::load`] for a reader that only needs where each chunk is
    /// (a restore): each pack's list of entries is not kept beside the
    /// places, which halves what it holds per chunk.
    pub async fn load_places(
        store: &Store,
        keys: &Keys,
        ds: &str,
        concurrency: usize,
    ) -> Result<Located> {
        Self::load_with(store, keys, ds, concurrency, false).await
    }

    async fn load_with(
        store: &Store,
        keys: &Keys,
        ds: &str,
        concurrency: usize,
        lists: bool,
    ) -> Result<Located> {
        let mut out = Located {
            without_lists: !lists,
            ..Located::default()
        };
        for l in store.list(&objects::chunks_prefix(ds)).await? {
            if let Some(id) = objects::parse_chunk_key(&l.key) {
                out.places.0.push((
                    id,
                    Place {
                        // A listed size of u64::MAX is no chunk's.
                        object: l.size.min(Place::NONE - 1),
                        ..Place::EMPTY
                    },
                ));
            }
        }
        let listed: Vec<_> = store
            .list(&packs_prefix(ds))
            .await?
            .into_iter()
            .filter(|l| l.key.ends_with(".pack"))
            .collect();
        let covered = out.read_index_files(store, keys, ds).await?;
        let (known, unknown): (Vec<_>, Vec<_>) = listed.into_iter().partition(|l| {
            covered
                .get(l.key.as_str())
                .is_some_and(|p| p.size == l.size)
        });
        let mut covered = covered;
        for l in known {
            if let Some(p) = covered.remove(l.key.as_str()) {
                out.add_pack(p.key, p.size, p.entries);
                out.packs_from_index_files += 1;
            }
        }
        let mut read = stream::iter(unknown.into_iter().map(|l| async move {
            let r = read_index(store, keys, &l.key, l.size).await;
            (l.key, l.size, r)
        }))
        .buffer_unordered(concurrency.max(1));
        while let Some((key, size, r)) = read.next().await {
            let entries = match r {
                Ok(x) => x,
                Err(e @ ArchiveError::Damaged { .. }) => {
                    out.damaged.push(DamagedPack {
                        key,
                        why: e.to_string(),
                    });
                    continue;
                }
                // Listed, then deleted by a prune before its index was
                // read: it held nothing still referenced.
                Err(ArchiveError::Missing { .. }) => continue,
                Err(e) => return Err(e),
            };
            out.add_pack(key, size, entries);
        }
        out.places.settle();
        Ok(out)
    }

    fn add_pack(&mut self, key: String, size: u64, entries: Vec<PackEntry>) {
        let key: Arc<str> = key.into();
        // Past four billion packs a pack's chunks count as in none.
        let n = u32::try_from(self.pack_keys.len())
            .ok()
            .filter(|n| *n != Place::NO_PACK);
        if let Some(n) = n {
            self.pack_keys.push(key.clone());
            self.places.0.extend(entries.iter().map(|e| {
                (
                    e.id,
                    Place {
                        pack: n,
                        offset: e.offset,
                        sealed_len: e.sealed_len,
                        plain_len: e.plain_len,
                        ..Place::EMPTY
                    },
                )
            }));
        }
        let entries = if self.without_lists {
            Vec::new()
        } else {
            entries
        };
        self.packs.insert(key, (size, entries));
    }

    /// Reads every index file of `ds`: the packs they cover, by key. One
    /// that does not read back is named in the warnings and passed over.
    async fn read_index_files(
        &mut self,
        store: &Store,
        keys: &Keys,
        ds: &str,
    ) -> Result<HashMap<String, IndexedPack>> {
        let files: Vec<_> = store
            .list(&index_files_prefix(ds))
            .await?
            .into_iter()
            .filter(|l| l.key.ends_with(".idx"))
            .collect();
        let mut read = stream::iter(files.into_iter().map(|l| async move {
            let r = if l.size > MAX_INDEX_FILE_BYTES {
                Ok(Err(format!(
                    "{} bytes is more than an index file holds",
                    l.size
                )))
            } else {
                store
                    .get(&l.key, MAX_INDEX_FILE_BYTES)
                    .await
                    .map(|b| match b {
                        Some(b) => decode_index_file(keys, &l.key, &b),
                        None => Err("removed while read".into()),
                    })
            };
            (l.key, r)
        }))
        .buffer_unordered(INDEX_FILES_IN_FLIGHT);
        let mut covered = HashMap::new();
        while let Some((key, r)) = read.next().await {
            match r? {
                Ok(packs) => {
                    for p in packs {
                        covered.insert(p.key.clone(), p);
                    }
                }
                Err(why) => self.warnings.push(format!(
                    "index file {} does not read back ({why}); the packs' own indexes were read \
                     instead",
                    store.locate(&key)
                )),
            }
            self.index_files.push(key);
        }
        Ok(covered)
    }

    /// The pack holding chunk `id`, if one does, and the chunk's entry
    /// there (its hash is the one `want` records, which every read is
    /// checked against).
    fn packed(&self, id: &ChunkId, hash: [u8; 32]) -> Option<(Arc<str>, PackEntry)> {
        let p = self.places.get(id)?;
        let key = self.pack_keys.get(usize::try_from(p.pack).ok()?)?;
        Some((
            key.clone(),
            PackEntry {
                id: *id,
                offset: p.offset,
                sealed_len: p.sealed_len,
                plain_len: p.plain_len,
                hash,
            },
        ))
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.places.get(id).is_some()
    }

    /// Every chunk the archive holds.
    pub fn ids(&self) -> impl Iterator<Item = &ChunkId> {
        self.places.0.iter().map(|(id, _)| id)
    }

    /// The stored length of a chunk's copy that a read would use first.
    pub fn stored_len(&self, id: &ChunkId) -> Option<u64> {
        let p = self.places.get(id)?;
        p.object()
            .or_else(|| (p.pack != Place::NO_PACK).then_some(u64::from(p.sealed_len)))
    }

    /// Names where a chunk is, for messages.
    pub fn describe(&self, store: &Store, ds: &str, id: &ChunkId) -> String {
        // A chunk object of its own is read first, so it is named first.
        match self.places.get(id) {
            Some(p) if p.object().is_none() => match self.packed(id, [0; 32]) {
                Some((k, e)) => {
                    format!("{} (bytes {}+{})", store.locate(&k), e.offset, e.sealed_len)
                }
                None => store.locate(&objects::chunk_key(ds, id)),
            },
            _ => store.locate(&objects::chunk_key(ds, id)),
        }
    }

    /// Reads `want`, chunk objects `concurrency` at a time and pack ranges
    /// [`RANGES_IN_FLIGHT`] at a time, each result as it arrives.
    pub fn fetch<'a>(
        &'a self,
        store: &'a Store,
        ds: &'a str,
        want: Vec<Want>,
        concurrency: usize,
    ) -> impl Stream<Item = Fetched> + Send + 'a {
        let mut objects_first: Vec<Want> = Vec::new();
        let mut by_pack: BTreeMap<Arc<str>, Vec<(Want, PackEntry)>> = BTreeMap::new();
        let mut absent: Vec<Fetched> = Vec::new();
        for w in want {
            let object = self.places.get(&w.id).and_then(Place::object);
            match (object, self.packed(&w.id, w.hash)) {
                (Some(_), _) => objects_first.push(w),
                (None, Some((k, e))) => by_pack.entry(k).or_default().push((w, e)),
                _ => absent.push(Fetched::Bad {
                    id: w.id,
                    at: store.locate(&objects::chunk_key(ds, &w.id)),
                    reason: self.absent_reason(),
                    missing: true,
                }),
            }
        }
        let ranges = merge_ranges(by_pack);
        let singles = stream::iter(objects_first)
            .map(move |w| async move { vec![self.read_object(store, ds, w).await] })
            .buffer_unordered(concurrency.max(1));
        let packed = stream::iter(ranges)
            .map(move |r| async move { read_range(store, r).await })
            .buffer_unordered(RANGES_IN_FLIGHT);
        stream::iter(absent).chain(stream::select(singles, packed).flat_map(stream::iter))
    }

    /// Why a chunk is in no readable place: with damaged packs named.
    pub fn absent_reason(&self) -> String {
        match self.damaged.first() {
            None => "in no pack and no chunk object".into(),
            Some(d) => format!(
                "in no readable pack and no chunk object; {} pack(s) do not read back, the first: {}",
                self.damaged.len(),
                d.why
            ),
        }
    }

    /// [`Located::fetch`], collected.
    pub async fn fetch_all(
        &self,
        store: &Store,
        ds: &str,
        want: Vec<Want>,
        concurrency: usize,
    ) -> Vec<Fetched> {
        self.fetch(store, ds, want, concurrency).collect().await
    }

    /// Reads a chunk's object of its own; if that is damaged and a pack
    /// holds the chunk too, the packed copy.
    async fn read_object(&self, store: &Store, ds: &str, w: Want) -> Fetched {
        let key = objects::chunk_key(ds, &w.id);
        let max = vault::chunk::max_sealed_len(w.plain_len);
        let got = store.get_required(&key, "a referenced chunk", max).await;
        let failed = match got {
            Ok(b) if *blake3::hash(&b).as_bytes() == w.hash => {
                return Fetched::Good(SealedChunk {
                    id: w.id,
                    plain_len: w.plain_len,
                    sealed: b,
                })
            }
            Ok(b) => Fetched::Bad {
                id: w.id,
                at: store.locate(&key),
                reason: format!(
                    "its {} bytes do not hash as recorded: truncated or altered",
                    b.len()
                ),
                missing: false,
            },
            Err(ArchiveError::Missing { key, reason }) => Fetched::Bad {
                id: w.id,
                at: key,
                reason,
                missing: true,
            },
            Err(e) => Fetched::Bad {
                id: w.id,
                at: store.locate(&key),
                reason: e.to_string(),
                missing: false,
            },
        };
        match self.packed(&w.id, w.hash) {
            Some((pack, e)) => {
                let r = Range {
                    pack,
                    start: e.offset,
                    end: e.offset + u64::from(e.sealed_len),
                    items: vec![(w, e)],
                };
                read_range(store, r).await.pop().unwrap_or(failed)
            }
            None => failed,
        }
    }
}

/// One ranged read of a pack, covering several chunks.
struct Range {
    pack: Arc<str>,
    start: u64,
    end: u64,
    items: Vec<(Want, PackEntry)>,
}

/// Sorts each pack's wanted chunks by offset and merges neighbours into
/// ranges of up to [`RANGE_BYTES`] with gaps under [`MERGE_GAP`].
fn merge_ranges(by_pack: BTreeMap<Arc<str>, Vec<(Want, PackEntry)>>) -> Vec<Range> {
    let mut out = Vec::new();
    for (pack, mut items) in by_pack {
        items.sort_by_key(|(_, e)| e.offset);
        let mut cur: Option<Range> = None;
        for (w, e) in items {
            let end = e.offset + u64::from(e.sealed_len);
            if let Some(r) = cur.as_mut() {
                if e.offset >= r.end
                    && e.offset - r.end <= MERGE_GAP
                    && end - r.start <= RANGE_BYTES
                {
                    r.end = end;
                    r.items.push((w, e));
                    continue;
                }
                // The same chunk wanted twice, or out of reach: a new range.
                out.extend(cur.take());
            }
            cur = Some(Range {
                pack: pack.clone(),
                start: e.offset,
                end,
                items: vec![(w, e)],
            });
        }
        out.extend(cur);
    }
    out
}

/// Reads one range and cuts its chunks out, each checked against the
/// BLAKE3 its caller expects.
async fn read_range(store: &Store, r: Range) -> Vec<Fetched> {
    let at = |e: &PackEntry| {
        format!(
            "{} (bytes {}+{})",
            store.locate(&r.pack),
            e.offset,
            e.sealed_len
        )
    };
    let bytes = match store.get_range(&r.pack, "a pack", r.start..r.end).await {
        Ok(b) => b,
        Err(err) => {
            let missing = matches!(err, ArchiveError::Missing { .. });
            return r
                .items
                .iter()
                .map(|(w, e)| Fetched::Bad {
                    id: w.id,
                    at: at(e),
                    reason: err.to_string(),
                    missing,
                })
                .collect();
        }
    };
    r.items
        .iter()
        .map(|(w, e)| {
            let from = (e.offset - r.start) as usize;
            let b = &bytes[from..from + e.sealed_len as usize];
            if *blake3::hash(b).as_bytes() == w.hash {
                Fetched::Good(SealedChunk {
                    id: w.id,
                    plain_len: w.plain_len,
                    sealed: b.to_vec(),
                })
            } else {
                Fetched::Bad {
                    id: w.id,
                    at: at(e),
                    reason: format!(
                        "its {} bytes do not hash as recorded: altered",
                        e.sealed_len
                    ),
                    missing: false,
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: u8, len: usize) -> SealedChunk {
        SealedChunk {
            id: ChunkId([n; 32]),
            plain_len: len as u32,
            sealed: vec![n; len],
        }
    }

    #[test]
    fn places_merge_a_chunk_object_with_the_last_pack_that_holds_the_chunk() {
        let id = |b: u8| ChunkId([b; 32]);
        let packed = |pack: u32, offset: u64| Place {
            pack,
            offset,
            sealed_len: 10,
            plain_len: 5,
            ..Place::EMPTY
        };
        let mut p = Places(vec![
            (
                id(2),
                Place {
                    object: 77,
                    ..Place::EMPTY
                },
            ),
            (id(3), packed(0, 8)),
            (id(2), packed(0, 18)),
            (id(1), packed(1, 8)),
            (id(2), packed(1, 28)),
        ]);
        p.settle();
        assert_eq!(p.0.len(), 3);
        let two = p.get(&id(2)).unwrap();
        assert_eq!((two.object(), two.pack, two.offset), (Some(77), 1, 28));
        let three = p.get(&id(3)).unwrap();
        assert_eq!((three.object(), three.pack, three.offset), (None, 0, 8));
        assert_eq!(p.get(&id(1)).unwrap().pack, 1);
        assert!(p.get(&id(4)).is_none());
    }

    #[test]
    fn packs_are_cut_by_bytes_and_never_share_a_name() {
        let keys = vault::DatasetKey::generate().derive();
        let chunks: Vec<_> = (0..10).map(|n| chunk(n, 1000)).collect();
        let packs = build(&keys, "ds", chunks.clone(), 3500);
        assert_eq!(packs.len(), 4, "3 + 3 + 3 + 1");
        // The same chunks uploaded again land under other names.
        let again = build(&keys, "ds", chunks, 3500);
        for (a, b) in packs.iter().zip(&again) {
            assert_ne!(a.key, b.key);
        }
        for p in &packs {
            assert!(p.key.starts_with("ds/packs/") && p.key.ends_with(".pack"));
            for e in &p.entries {
                let b = &p.bytes[e.offset as usize..(e.offset + e.sealed_len as u64) as usize];
                assert_eq!(b, vec![e.id.0[0]; 1000].as_slice());
                assert_eq!(*blake3::hash(b).as_bytes(), e.hash);
            }
        }
    }

    #[test]
    fn the_index_reads_back_and_refuses_another_name_a_cut_or_a_flip() {
        let keys = vault::DatasetKey::generate().derive();
        let p = build(
            &keys,
            "ds",
            (0..5).map(|n| chunk(n, 700)).collect(),
            PACK_BYTES,
        )
        .pop()
        .unwrap();
        assert_eq!(decode_index(&keys, &p.key, &p.bytes).unwrap(), p.entries);
        let e = decode_index(&keys, "ds/packs/other.pack", &p.bytes).unwrap_err();
        assert!(e.contains("tag does not verify"), "{e}");
        let e = decode_index(&keys, &p.key, &p.bytes[..p.bytes.len() - 1]).unwrap_err();
        assert!(e.contains("no pack trailer"), "{e}");
        let mut flipped = p.bytes.clone();
        let at = flipped.len() - 20;
        flipped[at] ^= 1;
        assert!(decode_index(&keys, &p.key, &flipped).is_err());
        // An index sealed by a key holder that points past the chunks.
        let body = p.bytes[..8 + 5 * 700].to_vec();
        let mut lying = p.entries.clone();
        lying[4].offset = 8 + 5 * 700 - 10;
        let plain = postcard::to_allocvec(&PackIndex {
            version: INDEX_VERSION,
            entries: lying,
        })
        .unwrap();
        let e = decode_index(&keys, &p.key, &with_index(&keys, &p.key, body, &plain)).unwrap_err();
        assert!(e.contains("outside the pack"), "{e}");
    }

    #[test]
    fn an_index_file_reads_back_and_refuses_another_name_a_flip_or_a_lie() {
        let keys = vault::DatasetKey::generate().derive();
        let built = build(&keys, "ds", (0..6).map(|n| chunk(n, 900)).collect(), 2_000);
        assert!(built.len() > 1);
        let packs: Vec<IndexedPack> = built
            .iter()
            .map(|p| IndexedPack {
                key: p.key.clone(),
                size: p.bytes.len() as u64,
                entries: p.entries.clone(),
            })
            .collect();
        let (key, bytes) = seal_index_file(&keys, "ds", &packs);
        assert!(key.starts_with("ds/index/") && key.ends_with(".idx"));
        let back = decode_index_file(&keys, &key, &bytes).unwrap();
        assert_eq!(back.len(), packs.len());
        for (a, b) in back.iter().zip(&packs) {
            assert_eq!((&a.key, a.size, &a.entries), (&b.key, b.size, &b.entries));
        }
        // Copied under another name, altered, or sealed with another key.
        let e = decode_index_file(&keys, "ds/index/other.idx", &bytes).unwrap_err();
        assert!(e.contains("tag does not verify"), "{e}");
        let mut flipped = bytes.clone();
        let at = flipped.len() / 2;
        flipped[at] ^= 1;
        assert!(decode_index_file(&keys, &key, &flipped).is_err());
        let other = vault::DatasetKey::generate().derive();
        assert!(decode_index_file(&other, &key, &bytes).is_err());
        // A key holder's index file placing a chunk past its pack's end.
        let mut lying = packs.clone();
        lying[0].entries[0].offset = lying[0].size - 5;
        let (key, bytes) = seal_index_file(&keys, "ds", &lying);
        let e = decode_index_file(&keys, &key, &bytes).unwrap_err();
        assert!(e.contains("outside the pack"), "{e}");
    }

    #[test]
    fn neighbours_merge_into_one_range_within_limits() {
        let w = |n: u8| Want {
            id: ChunkId([n; 32]),
            plain_len: 10,
            hash: [0; 32],
        };
        let e = |n: u8, offset: u64, len: u32| PackEntry {
            id: ChunkId([n; 32]),
            offset,
            sealed_len: len,
            plain_len: len,
            hash: [0; 32],
        };
        let mut by_pack = BTreeMap::new();
        by_pack.insert(
            Arc::<str>::from("p"),
            vec![
                (w(3), e(3, 8 + 3000 + MERGE_GAP + 1, 10)),
                (w(1), e(1, 8, 1000)),
                (w(2), e(2, 2008, 1000)),
                (w(4), e(4, 20 << 20, RANGE_BYTES as u32)),
            ],
        );
        let r = merge_ranges(by_pack);
        let spans: Vec<_> = r.iter().map(|r| (r.start, r.end, r.items.len())).collect();
        assert_eq!(
            spans,
            vec![
                (8, 3008, 2),
                (8 + 3000 + MERGE_GAP + 1, 8 + 3000 + MERGE_GAP + 11, 1),
                (20 << 20, (20 << 20) + RANGE_BYTES, 1)
            ]
        );
    }
}
