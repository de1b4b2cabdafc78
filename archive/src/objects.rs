//! What the archive stores, under `<prefix>/<dataset>/`, and how each object
//! is encoded and checked. docs/archive.md is the reference.
//!
//! - `OWNER`: the name of the site that writes this dataset's archive.
//! - `packs/<name>.pack`: sealed chunks back to back with a sealed index
//!   (`packs.rs`); new chunks go there.
//! - `chunks/<id hex>`: a sealed chunk, byte for byte as in the site's state
//!   (content-addressed: written once, never rewritten): every chunk of an
//!   archive written before packs, and chunks an archive repair uploaded.
//! - `log/<first seq>-<last seq>-<last time ns>.lp`: a piece of the change
//!   log: the records as logged minus the bytes of the chunks they brought,
//!   which are stored like any other chunk (so the archive holds each chunk
//!   once); the chain hashes before and after; a BLAKE3 trailer so truncation
//!   and alteration are found before anything is read.
//! - `snapshots/<seq>-<taken ms>/page-<n>`: sealed pages of the namespace.
//! - `snapshots/<seq>-<taken ms>.manifest`: the sealed header, written last:
//!   a snapshot exists only once its manifest does.
//! - `prune/pending`: chunks found unreferenced and when (two-phase prune).

use serde::{Deserialize, Serialize};
use vault::crypto::{sm4_gcm_open, sm4_gcm_seal, NONCE_LEN};
use vault::ops::Entry;
use vault::record::{chain, Hash};
use vault::{ChunkId, Keys, SealedChunk};

use crate::error::{ArchiveError, Result};

const SEALED_MAGIC: &[u8; 8] = b"TRIADSM1";
const PIECE_MAGIC: &[u8; 8] = b"TRIADLP2";
/// A namespace: (path, entry) in path order.
pub type Namespace = Vec<(Vec<u8>, Entry)>;

/// The manifest encoding this version writes and reads.
pub const MANIFEST_VERSION: u32 = 1;

/// A manifest whose pages are those of an earlier snapshot of the same
/// state (`Manifest::pages_from`): version 1's encoding followed by the
/// earlier snapshot's name. Only such manifests carry it, so every other
/// snapshot stays readable by a triad that knows version 1 alone.
pub const MANIFEST_VERSION_REUSED: u32 = 2;

/// The most bytes a log piece may have: the archiver cuts pieces at 64 MiB
/// of log, and one record may pass that alone by up to the largest change
/// a writer may submit. Readers refuse anything longer unread.
pub const MAX_PIECE_BYTES: u64 = (64 << 20) + vault::record::MAX_SUBMIT as u64;

/// The most bytes a snapshot manifest may have (it holds the page list and
/// the pins, tens of bytes each).
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// The most bytes of the small bookkeeping objects (`OWNER`, `prune/pending`).
pub const MAX_SMALL_OBJECT_BYTES: u64 = 16 << 20;

/// Namespace entries per manifest page.
pub const PAGE_ENTRIES: usize = 20_000;

pub fn chunk_key(ds: &str, id: &ChunkId) -> String {
    format!("{ds}/chunks/{}", hex::encode(id.0))
}

pub fn chunks_prefix(ds: &str) -> String {
    format!("{ds}/chunks/")
}

pub fn owner_key(ds: &str) -> String {
    format!("{ds}/OWNER")
}

/// The archive's authenticated head (see [`Head`]).
pub fn head_key(ds: &str) -> String {
    format!("{ds}/HEAD")
}

/// The newest point the archive holds, as the site that writes it last
/// recorded it: sealed under the manifest key and bound to its name, so
/// nobody without the dataset key can write one. A restore of `latest`
/// compares it with the pieces and snapshots it finds: fewer means someone
/// removed the newest ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub version: u32,
    pub dataset: String,
    pub site: String,
    pub seq: u64,
    pub chain_hash: Hash,
    /// Commit time of the record at `seq`.
    pub time_ns: i64,
    /// Wall time the head was written.
    pub written_ns: i64,
    /// The epoch of the record at `seq` (0 in a version 1 head: unknown).
    pub epoch: u64,
    /// The history the archive follows: (epoch, first seq written in it),
    /// oldest first, up to `epoch` (empty in a version 1 head). Pieces and
    /// snapshots of an epoch are used only below the next epoch's start:
    /// what a former primary archived past the fork point is not this
    /// history.
    pub starts: Vec<(u64, u64)>,
}

/// The head as version 1 wrote it (no epochs).
#[derive(Deserialize)]
struct HeadV1 {
    version: u32,
    dataset: String,
    site: String,
    seq: u64,
    chain_hash: Hash,
    time_ns: i64,
    written_ns: i64,
}

pub const HEAD_VERSION: u32 = 2;

impl Head {
    /// The epoch `seq` belongs to in this head's history (None without one).
    pub fn epoch_of(&self, seq: u64) -> Option<u64> {
        epoch_in(&self.starts, seq)
    }
}

/// The epoch `seq` belongs to in `starts` (None for an empty history or a
/// seq before its first start).
pub fn epoch_in(starts: &[(u64, u64)], seq: u64) -> Option<u64> {
    starts
        .iter()
        .rev()
        .find(|(_, first)| *first <= seq)
        .map(|(e, _)| *e)
}

/// The last seq that belongs to epoch `epoch` in `starts`: the seq before
/// the next epoch's start (u64::MAX for the newest, None for an epoch the
/// history does not hold).
pub fn epoch_end(starts: &[(u64, u64)], epoch: u64) -> Option<u64> {
    let i = starts.iter().position(|(e, _)| *e == epoch)?;
    Some(
        starts
            .get(i + 1)
            .map(|(_, first)| first.saturating_sub(1))
            .unwrap_or(u64::MAX),
    )
}

pub fn encode_head(keys: &Keys, key: &str, h: &Head) -> Result<Vec<u8>> {
    encode_sealed(keys, key, h)
}

/// What a signed head says in plaintext (formats.md 16.7), for an auditor
/// who checks the signature without the dataset key.
pub fn head_statement(key: &str, h: &Head) -> Vec<u8> {
    let time = |ns: i64| {
        chrono::DateTime::from_timestamp(
            ns.div_euclid(1_000_000_000),
            ns.rem_euclid(1_000_000_000) as u32,
        )
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
    };
    serde_json::to_vec(&serde_json::json!({
        "kind": "triad archive head",
        "object": key,
        "dataset": h.dataset,
        "site": h.site,
        "epoch": h.epoch,
        "seq": h.seq,
        "chain_hash": hex::encode(h.chain_hash),
        "record_time": time(h.time_ns),
        "written": time(h.written_ns),
    }))
    .unwrap_or_default()
}

/// Reads a head, with or without the signature a site with an `[evidence]`
/// key appends (which the seal does not need: it authenticates the head to
/// every holder of the dataset key by itself).
pub fn decode_head(keys: &Keys, key: &str, object: &[u8]) -> Result<Head> {
    let sealed = vault::signing::split_signed(object).map_or(object, |p| p.body);
    let plain = open(keys, key, sealed)?;
    let damaged = |reason: String| ArchiveError::Damaged {
        key: key.to_string(),
        reason,
    };
    let (version, _) = postcard::take_from_bytes::<u32>(&plain)
        .map_err(|e| damaged(format!("head does not decode: {e}")))?;
    match version {
        1 => {
            let h: HeadV1 = postcard::from_bytes(&plain)
                .map_err(|e| damaged(format!("head does not decode: {e}")))?;
            Ok(Head {
                version: h.version,
                dataset: h.dataset,
                site: h.site,
                seq: h.seq,
                chain_hash: h.chain_hash,
                time_ns: h.time_ns,
                written_ns: h.written_ns,
                epoch: 0,
                starts: Vec::new(),
            })
        }
        HEAD_VERSION => {
            let h: Head = postcard::from_bytes(&plain)
                .map_err(|e| damaged(format!("head does not decode: {e}")))?;
            // Bounded by the object's size; a history must rise.
            if !h
                .starts
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1)
            {
                return Err(damaged("head's epoch history does not rise".into()));
            }
            Ok(h)
        }
        v => Err(damaged(format!(
            "head version {v}; this triad reads versions 1 and {HEAD_VERSION}"
        ))),
    }
}

pub fn pending_key(ds: &str) -> String {
    format!("{ds}/prune/pending")
}

pub fn log_prefix(ds: &str) -> String {
    format!("{ds}/log/")
}

pub fn snapshots_prefix(ds: &str) -> String {
    format!("{ds}/snapshots/")
}

/// The id of a chunk object from its key.
pub fn parse_chunk_key(key: &str) -> Option<ChunkId> {
    let hexid = key.rsplit('/').next()?;
    let b = hex::decode(hexid).ok()?;
    Some(ChunkId(b.try_into().ok()?))
}

/// A log piece, as named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PieceRef {
    pub key: String,
    pub first: u64,
    pub last: u64,
    pub last_time_ns: i64,
    /// The epoch of every record in the piece (a piece never spans two);
    /// None in a name written before epochs were named.
    pub epoch: Option<u64>,
    /// The last seq a restore takes from this piece: `last`, unless the
    /// archive's history says a later epoch began inside it (a former
    /// primary's records past the fork point). Set by [`PieceRef::follow`].
    pub upto: u64,
}

impl PieceRef {
    pub fn new(ds: &str, first: u64, last: u64, last_time_ns: i64, epoch: u64) -> PieceRef {
        PieceRef {
            key: format!("{ds}/log/{first:020}-{last:020}-{last_time_ns:019}-{epoch:010}.lp"),
            first,
            last,
            last_time_ns,
            epoch: Some(epoch),
            upto: last,
        }
    }

    /// Parses a piece's name. Names come from a store listing, so they are
    /// hostile: one whose range is empty, starts at 0 or reaches the last
    /// seq there is (where `last + 1` would overflow) is no piece.
    pub fn parse(key: &str) -> Option<PieceRef> {
        let name = key.rsplit('/').next()?.strip_suffix(".lp")?;
        let mut it = name.split('-');
        let first: u64 = it.next()?.parse().ok()?;
        let last: u64 = it.next()?.parse().ok()?;
        let t: i64 = it.next()?.parse().ok()?;
        let epoch: Option<u64> = match it.next() {
            Some(e) => Some(e.parse().ok()?),
            None => None,
        };
        if it.next().is_some() || first == 0 || first > last || last == u64::MAX {
            return None;
        }
        // Only the exact name the shipper writes: `9-9-0.lp` would sort
        // after every real piece and pass for the newest.
        let exact = match epoch {
            Some(e) => format!("{first:020}-{last:020}-{t:019}-{e:010}"),
            None => format!("{first:020}-{last:020}-{t:019}"),
        };
        if name != exact || epoch == Some(0) {
            return None;
        }
        Some(PieceRef {
            key: key.to_string(),
            first,
            last,
            last_time_ns: t,
            epoch,
            upto: last,
        })
    }

    /// This piece as a part of the history `starts` (the archive head's):
    /// cut where a later epoch began, or None when nothing in it belongs to
    /// that history. A piece of an epoch the history does not hold is kept
    /// whole (a head not yet written after it), and so is one whose name
    /// has no epoch (its records are checked one by one).
    pub fn follow(mut self, starts: &[(u64, u64)]) -> Option<PieceRef> {
        let (Some(e), false) = (self.epoch, starts.is_empty()) else {
            return Some(self);
        };
        if starts.last().is_some_and(|(newest, _)| e > *newest) {
            return Some(self);
        }
        let end = epoch_end(starts, e)?;
        if end < self.first {
            return None;
        }
        self.upto = self.last.min(end);
        Some(self)
    }
}

/// A snapshot, as named: `<seq>-<taken ms>-<epoch>` (before epochs were
/// named, `<seq>-<taken ms>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRef {
    pub name: String,
    pub seq: u64,
    pub taken_ms: i64,
    /// The epoch of the record at `seq`.
    pub epoch: Option<u64>,
}

impl SnapshotRef {
    pub fn new(seq: u64, taken_ms: i64, epoch: u64) -> SnapshotRef {
        SnapshotRef {
            name: format!("{seq:020}-{taken_ms:013}-{epoch:010}"),
            seq,
            taken_ms,
            epoch: Some(epoch),
        }
    }

    pub fn parse_manifest_key(key: &str) -> Option<SnapshotRef> {
        let name = key.rsplit('/').next()?.strip_suffix(".manifest")?;
        let mut it = name.split('-');
        let seq = it.next()?.parse().ok()?;
        let taken_ms = it.next()?.parse().ok()?;
        let epoch = match it.next() {
            Some(e) => Some(e.parse().ok()?),
            None => None,
        };
        if it.next().is_some() {
            return None;
        }
        Some(SnapshotRef {
            name: name.to_string(),
            seq,
            taken_ms,
            epoch,
        })
    }

    /// False for a snapshot of a state the history `starts` does not pass
    /// through: taken by a former primary past the fork point.
    pub fn follows(&self, starts: &[(u64, u64)]) -> bool {
        match (self.epoch, epoch_in(starts, self.seq)) {
            (Some(e), Some(h)) => e == h || starts.last().is_some_and(|(n, _)| e > *n),
            _ => true,
        }
    }

    pub fn manifest_key(&self, ds: &str) -> String {
        format!("{ds}/snapshots/{}.manifest", self.name)
    }

    pub fn page_key(&self, ds: &str, n: usize) -> String {
        format!("{ds}/snapshots/{}/page-{n:06}", self.name)
    }
}

/// A page of a snapshot, as its manifest records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PageRef {
    pub entries: u32,
    pub sealed_len: u64,
    pub sealed_hash: [u8; 32],
}

/// A snapshot's header: what state it is, and how to check its pages.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub dataset: String,
    pub site: String,
    pub seq: u64,
    /// Time of the record at `seq` (the point in time the snapshot shows).
    pub time_ns: i64,
    /// Wall time the snapshot was taken.
    pub taken_ns: i64,
    pub chain_hash: Hash,
    /// Summary of the namespace digest (as in checkpoints).
    pub digest: [u8; 32],
    /// The full LtHash, so a restore can check the namespace it rebuilds.
    pub lthash: Vec<u8>,
    pub entries: u64,
    pub bytes: u64,
    /// Rows of the pages' chunk tables plus the pins (a chunk named on
    /// several pages counts once per page; older snapshots counted
    /// distinct chunks).
    pub chunks: u64,
    /// Chunks held by files still being logged: (id, references, plain
    /// length, BLAKE3 of the sealed bytes).
    pub pins: Vec<(ChunkId, u64, u32, [u8; 32])>,
    pub pages: Vec<PageRef>,
    /// With version 2: the snapshot whose page objects these are (the
    /// state did not change between the two, so its pages were not written
    /// again). Encoded after the fields above, not by serde.
    #[serde(skip)]
    pub pages_from: Option<String>,
}

impl Manifest {
    /// Where page `n` of snapshot `s` (this manifest's) is stored.
    pub fn page_key(&self, ds: &str, s: &SnapshotRef, n: usize) -> String {
        match &self.pages_from {
            Some(from) => format!("{ds}/snapshots/{from}/page-{n:06}"),
            None => s.page_key(ds, n),
        }
    }
}

/// Postcard-encodes `v` and seals it (below) under the object's name.
fn encode_sealed<T: Serialize>(keys: &Keys, key: &str, v: &T) -> Result<Vec<u8>> {
    let plain = postcard::to_allocvec(v).map_err(|e| ArchiveError::Damaged {
        key: key.to_string(),
        reason: format!("cannot encode: {e}"),
    })?;
    Ok(seal(keys, key, &plain))
}

/// Seals `plain` with SM4-GCM under the manifest key, bound to the object's
/// key so an object moved to another name does not open.
pub fn seal(keys: &Keys, key: &str, plain: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
    let mut buf = plain.to_vec();
    sm4_gcm_seal(&keys.manifest_seal, &nonce, key.as_bytes(), &mut buf);
    let mut out = Vec::with_capacity(8 + NONCE_LEN + buf.len());
    out.extend_from_slice(SEALED_MAGIC);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&buf);
    out
}

pub fn open(keys: &Keys, key: &str, sealed: &[u8]) -> Result<Vec<u8>> {
    let damaged = |reason: &str| ArchiveError::Damaged {
        key: key.to_string(),
        reason: reason.to_string(),
    };
    if sealed.len() < 8 + NONCE_LEN || &sealed[..8] != SEALED_MAGIC {
        return Err(damaged(
            "not a sealed triad object (bad header or truncated)",
        ));
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&sealed[8..8 + NONCE_LEN]);
    let mut buf = sealed[8 + NONCE_LEN..].to_vec();
    if !sm4_gcm_open(&keys.manifest_seal, &nonce, key.as_bytes(), &mut buf) {
        return Err(damaged(
            "SM4-GCM tag does not verify: truncated, altered, or sealed with another dataset key",
        ));
    }
    Ok(buf)
}

pub fn encode_manifest(keys: &Keys, key: &str, m: &Manifest) -> Result<Vec<u8>> {
    let cannot = |e: postcard::Error| ArchiveError::Damaged {
        key: key.to_string(),
        reason: format!("cannot encode: {e}"),
    };
    let mut plain = postcard::to_allocvec(m).map_err(cannot)?;
    if m.pages_from.is_some() {
        plain.extend(postcard::to_allocvec(&m.pages_from).map_err(cannot)?);
    }
    Ok(seal(keys, key, &plain))
}

pub fn decode_manifest(keys: &Keys, key: &str, sealed: &[u8]) -> Result<Manifest> {
    let plain = open(keys, key, sealed)?;
    // The version comes first in the encoding: read it alone, so a newer
    // manifest is reported as such rather than as damage.
    let (version, _) =
        postcard::take_from_bytes::<u32>(&plain).map_err(|e| ArchiveError::Damaged {
            key: key.to_string(),
            reason: format!("manifest does not decode: {e}"),
        })?;
    let damaged = |reason: String| ArchiveError::Damaged {
        key: key.to_string(),
        reason,
    };
    if version != MANIFEST_VERSION && version != MANIFEST_VERSION_REUSED {
        return Err(damaged(format!(
            "manifest version {version}; this triad reads versions {MANIFEST_VERSION} and {MANIFEST_VERSION_REUSED}"
        )));
    }
    let (mut m, rest) = postcard::take_from_bytes::<Manifest>(&plain)
        .map_err(|e| damaged(format!("manifest does not decode: {e}")))?;
    if version == MANIFEST_VERSION_REUSED {
        let from: Option<String> = postcard::from_bytes(rest)
            .map_err(|e| damaged(format!("manifest does not decode: {e}")))?;
        // Only a snapshot's name: it becomes part of object keys.
        let from = from
            .filter(|f| SnapshotRef::parse_manifest_key(&format!("{f}.manifest")).is_some())
            .ok_or_else(|| damaged("manifest names no earlier snapshot for its pages".into()))?;
        m.pages_from = Some(from);
    }
    Ok(m)
}

/// A page of a snapshot: entries in path order, and the BLAKE3 of the
/// sealed bytes of every chunk the page's entries name (older snapshots
/// list a chunk only on the first page naming it), so a restore checks
/// each downloaded chunk object without decrypting it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Page {
    pub entries: Namespace,
    pub chunks: Vec<(ChunkId, [u8; 32])>,
}

pub fn encode_page(keys: &Keys, key: &str, page: &Page) -> Result<Vec<u8>> {
    encode_sealed(keys, key, page)
}

pub fn decode_page(keys: &Keys, key: &str, sealed: &[u8], expect: &PageRef) -> Result<Page> {
    if sealed.len() as u64 != expect.sealed_len
        || *blake3::hash(sealed).as_bytes() != expect.sealed_hash
    {
        return Err(ArchiveError::Damaged {
            key: key.to_string(),
            reason: format!(
                "page is {} bytes and does not hash as its manifest records ({} bytes)",
                sealed.len(),
                expect.sealed_len
            ),
        });
    }
    let plain = open(keys, key, sealed)?;
    let page: Page = postcard::from_bytes(&plain).map_err(|e| ArchiveError::Damaged {
        key: key.to_string(),
        reason: format!("page does not decode: {e}"),
    })?;
    // The seal shows who wrote the page (a holder of the key), not that
    // the writer was honest: every path is checked before it is used.
    for (p, _) in &page.entries {
        vault::path::check(p).map_err(|e| ArchiveError::Damaged {
            key: key.to_string(),
            reason: format!("refused: {e}"),
        })?;
    }
    if page.entries.len() != expect.entries as usize {
        return Err(ArchiveError::Damaged {
            key: key.to_string(),
            reason: format!(
                "page holds {} entries, its manifest says {}",
                page.entries.len(),
                expect.entries
            ),
        });
    }
    Ok(page)
}

/// A chunk a record brought: its id, plaintext and sealed lengths, and the
/// BLAKE3 of its sealed bytes. The bytes are in the chunk object of that id.
pub type AttachmentRef = (ChunkId, u32, u32, [u8; 32]);

/// A record in a log piece: its payload without the attached chunks' bytes.
#[derive(Debug, Clone)]
pub struct PieceRecord {
    pub seq: u64,
    pub time_ns: i64,
    /// The payload up to (not including) the attachment list.
    pub head: Vec<u8>,
    pub attachments: Vec<AttachmentRef>,
}

impl PieceRecord {
    /// Splits a logged payload into what the piece keeps and the chunks to
    /// store as chunk objects.
    pub fn strip(payload: &[u8]) -> Option<(PieceRecord, Vec<SealedChunk>)> {
        let rec = vault::record::Record::decode_payload(payload)?;
        // seq, epoch, time, prev hash, ops length, ops.
        let head_len = 8 + 8 + 8 + 32 + 4 + rec.sealed_ops.len();
        let attachments = rec
            .attachments
            .iter()
            .map(|a| (a.id, a.plain_len, a.sealed.len() as u32, a.sealed_hash()))
            .collect();
        Some((
            PieceRecord {
                seq: rec.seq,
                time_ns: rec.time_ns,
                head: payload[..head_len].to_vec(),
                attachments,
            },
            rec.attachments,
        ))
    }

    /// The record without its chunks' bytes (its attachment list left
    /// empty): enough to check its seal, and so its header, against the key.
    pub fn header_record(&self) -> Option<vault::record::Record> {
        let mut v = self.head.clone();
        v.extend_from_slice(&0u32.to_le_bytes());
        vault::record::Record::decode_payload(&v)
    }

    /// The epoch the record was written in, as its header states it.
    pub fn epoch(&self) -> u64 {
        self.head
            .get(8..16)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0)
    }

    /// The record's previous hash, as its header states it.
    pub fn prev_hash(&self) -> Hash {
        self.head
            .get(24..56)
            .and_then(|h| h.try_into().ok())
            .unwrap_or([0; 32])
    }

    /// Rebuilds the logged payload, byte for byte, with the chunks' bytes.
    pub fn payload(&self, mut chunk: impl FnMut(&ChunkId) -> Option<Vec<u8>>) -> Option<Vec<u8>> {
        let mut v = self.head.clone();
        v.extend_from_slice(&(self.attachments.len() as u32).to_le_bytes());
        for (id, plain_len, sealed_len, _) in &self.attachments {
            let bytes = chunk(id)?;
            if bytes.len() != *sealed_len as usize {
                return None;
            }
            v.extend_from_slice(&id.0);
            v.extend_from_slice(&plain_len.to_le_bytes());
            v.extend_from_slice(&sealed_len.to_le_bytes());
            v.extend_from_slice(&bytes);
        }
        Some(v)
    }
}

/// A decoded piece: the chain hash before its first record and after its
/// last, and its records.
#[derive(Debug, Clone)]
pub struct Piece {
    pub prev_hash: Hash,
    pub end_hash: Hash,
    pub records: Vec<PieceRecord>,
}

/// Encodes a piece: header (first seq, count, chain hash before and after),
/// per record `seq, time, head, attachments`, and a BLAKE3 trailer over
/// everything before it. The end hash binds the chunks' bytes too: a restore
/// recomputes the chain over the rebuilt payloads and compares.
pub fn encode_piece(piece: &Piece) -> Vec<u8> {
    let recs = &piece.records;
    let mut out = Vec::new();
    out.extend_from_slice(PIECE_MAGIC);
    out.extend_from_slice(&recs.first().map(|r| r.seq).unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&(recs.len() as u32).to_le_bytes());
    out.extend_from_slice(&piece.prev_hash);
    out.extend_from_slice(&piece.end_hash);
    for r in recs {
        out.extend_from_slice(&(r.head.len() as u32).to_le_bytes());
        out.extend_from_slice(&r.head);
        out.extend_from_slice(&(r.attachments.len() as u32).to_le_bytes());
        for (id, plain, sealed, hash) in &r.attachments {
            out.extend_from_slice(&id.0);
            out.extend_from_slice(&plain.to_le_bytes());
            out.extend_from_slice(&sealed.to_le_bytes());
            out.extend_from_slice(hash);
        }
    }
    let trailer = blake3::hash(&out);
    out.extend_from_slice(trailer.as_bytes());
    out
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn hash(&mut self) -> Option<Hash> {
        self.take(32)?.try_into().ok()
    }
}

/// Decodes and checks a piece: trailer, structure, seq continuity. The hash
/// chain is checked once the payloads are rebuilt (see [`Piece::check_chain`]).
pub fn decode_piece(key: &str, bytes: &[u8]) -> Result<Piece> {
    let damaged = |reason: String| ArchiveError::Damaged {
        key: key.to_string(),
        reason,
    };
    if bytes.len() < 8 + 8 + 4 + 64 + 32 || &bytes[..8] != PIECE_MAGIC {
        return Err(damaged(
            "not a triad log piece (bad header or truncated)".into(),
        ));
    }
    let (body, trailer) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(body).as_bytes() != trailer {
        return Err(damaged(
            "BLAKE3 trailer does not match: the object was truncated or altered".into(),
        ));
    }
    let mut c = Cursor { b: body, at: 8 };
    let bad = || damaged("malformed piece".into());
    let first = c.u64().ok_or_else(bad)?;
    let count = c.u32().ok_or_else(bad)? as usize;
    let prev_hash = c.hash().ok_or_else(bad)?;
    let end_hash = c.hash().ok_or_else(bad)?;
    let mut records = Vec::with_capacity(count.min(1 << 16));
    for i in 0..count {
        let head_len = c.u32().ok_or_else(bad)? as usize;
        let head = c.take(head_len).ok_or_else(bad)?.to_vec();
        let n = c.u32().ok_or_else(bad)? as usize;
        let mut attachments = Vec::with_capacity(n.min(4096));
        for _ in 0..n {
            let id = ChunkId(c.hash().ok_or_else(bad)?);
            let plain = c.u32().ok_or_else(bad)?;
            let sealed = c.u32().ok_or_else(bad)?;
            let hash = c.hash().ok_or_else(bad)?;
            attachments.push((id, plain, sealed, hash));
        }
        if head.len() < 56 {
            return Err(bad());
        }
        let seq = u64::from_le_bytes(head[..8].try_into().map_err(|_| bad())?);
        let time_ns = i64::from_le_bytes(head[16..24].try_into().map_err(|_| bad())?);
        let want = first.checked_add(i as u64).ok_or_else(bad)?;
        if seq != want {
            return Err(damaged(format!(
                "record {i} has seq {seq}, expected {want}"
            )));
        }
        records.push(PieceRecord {
            seq,
            time_ns,
            head,
            attachments,
        });
    }
    if c.at != body.len() {
        return Err(damaged("bytes after the last record".into()));
    }
    Ok(Piece {
        prev_hash,
        end_hash,
        records,
    })
}

impl Piece {
    /// Checks rebuilt payloads of records `skip..skip + payloads.len()`
    /// against the chain: each record's previous hash, and the end hash when
    /// they run to the piece's last record. (A prefix's last payload is
    /// covered by the trailer and its chunks' recorded hashes.)
    pub fn check_chain(&self, key: &str, skip: usize, payloads: &[Vec<u8>]) -> Result<()> {
        let mut records = self.records.iter().skip(skip);
        let Some(first) = records.next() else {
            return Ok(());
        };
        let mut h = if skip == 0 {
            self.prev_hash
        } else {
            first.prev_hash()
        };
        for (r, p) in std::iter::once(first).chain(records).zip(payloads) {
            if r.prev_hash() != h {
                return Err(ArchiveError::Damaged {
                    key: key.to_string(),
                    reason: format!("hash chain broken at seq {}", r.seq),
                });
            }
            h = chain(&h, p);
        }
        if skip + payloads.len() == self.records.len() && h != self.end_hash {
            return Err(ArchiveError::Damaged {
                key: key.to_string(),
                reason: "the records do not hash to the piece's end hash: a chunk object it \
                         references or the piece itself was altered"
                    .into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vault::ops::Op;
    use vault::record::Record;
    use vault::DatasetKey;

    /// A piece of `n` records, each bringing one chunk; and those chunks.
    fn piece(keys: &Keys, n: u64) -> (Piece, Vec<Vec<u8>>, Vec<SealedChunk>) {
        let start = [7u8; 32];
        let mut prev = start;
        let (mut recs, mut payloads, mut chunks) = (Vec::new(), Vec::new(), Vec::new());
        for seq in 1..=n {
            let data = format!("chunk {seq}").into_bytes();
            let c = vault::chunk::seal(keys, ChunkId::of(keys, &data), &data);
            let r = Record::seal(
                keys,
                seq,
                1,
                seq as i64 * 10,
                prev,
                &[Op::Delete {
                    path: format!("p{seq}").into_bytes(),
                }],
                vec![c],
            );
            let payload = r.encode_payload();
            prev = chain(&prev, &payload);
            let (pr, att) = PieceRecord::strip(&payload).unwrap();
            recs.push(pr);
            chunks.extend(att);
            payloads.push(payload);
        }
        (
            Piece {
                prev_hash: start,
                end_hash: prev,
                records: recs,
            },
            payloads,
            chunks,
        )
    }

    #[test]
    fn pieces_round_trip_without_chunk_bytes_and_damage_is_named() {
        let keys = DatasetKey::generate().derive();
        let (p, payloads, chunks) = piece(&keys, 5);
        let bytes = encode_piece(&p);
        assert!(chunks.iter().all(|c| !bytes
            .windows(c.sealed.len())
            .any(|w| w == c.sealed.as_slice())));
        let back = decode_piece("k", &bytes).unwrap();
        assert_eq!(back.records.len(), 5);
        assert_eq!(back.records[4].time_ns, 50);
        let find = |id: &ChunkId| {
            chunks
                .iter()
                .find(|c| c.id == *id)
                .map(|c| c.sealed.clone())
        };
        let rebuilt: Vec<Vec<u8>> = back
            .records
            .iter()
            .map(|r| r.payload(find).unwrap())
            .collect();
        assert_eq!(rebuilt, payloads);
        back.check_chain("k", 0, &rebuilt).unwrap();
        back.check_chain("k", 2, &rebuilt[2..4]).unwrap();
        // A chunk object with other bytes of the same length breaks the chain.
        let mut wrong = rebuilt.clone();
        let last = wrong[4].len() - 1;
        wrong[4][last] ^= 1;
        assert!(back.check_chain("k", 0, &wrong).is_err());

        let cut = &bytes[..bytes.len() - 10];
        let e = decode_piece("ds/log/x.lp", cut).unwrap_err().to_string();
        assert!(e.contains("ds/log/x.lp") && e.contains("truncated"), "{e}");
        let mut flipped = bytes.clone();
        flipped[90] ^= 1;
        assert!(decode_piece("k", &flipped).is_err());
    }

    #[test]
    fn sealed_objects_are_bound_to_their_key_and_dataset_key() {
        let keys = DatasetKey::generate().derive();
        let s = seal(&keys, "a/snapshots/x.manifest", b"hello");
        assert_eq!(open(&keys, "a/snapshots/x.manifest", &s).unwrap(), b"hello");
        assert!(open(&keys, "a/snapshots/y.manifest", &s).is_err());
        let other = DatasetKey::generate().derive();
        assert!(open(&other, "a/snapshots/x.manifest", &s).is_err());
        assert!(open(&keys, "a/snapshots/x.manifest", &s[..s.len() - 1]).is_err());
    }

    #[test]
    fn names_parse_back() {
        let p = PieceRef::new("ds", 3, 9, 1_700_000_000_000_000_000, 2);
        assert_eq!(PieceRef::parse(&p.key), Some(p));
        // Names from before epochs were named still parse, epoch unknown.
        let old = PieceRef::parse(
            "ds/log/00000000000000000003-00000000000000000009-1700000000000000000.lp",
        )
        .unwrap();
        assert_eq!((old.first, old.last, old.epoch), (3, 9, None));
        let old = SnapshotRef::parse_manifest_key(
            "ds/snapshots/00000000000000000042-1700000000000.manifest",
        )
        .unwrap();
        assert_eq!((old.seq, old.epoch), (42, None));
        let s = SnapshotRef::new(42, 1_700_000_000_000, 3);
        assert_eq!(
            SnapshotRef::parse_manifest_key(&s.manifest_key("ds")),
            Some(s)
        );
    }
}
