//! A site's state in RocksDB, and the one function that applies records to it.
//!
//! Column families:
//! - `ns`: path -> [`Entry`] (the namespace)
//! - `chunks`: chunk id -> sealed bytes, in BlobDB blob files
//! - `chunkmeta`: chunk id -> reference count, lengths, BLAKE3 of sealed bytes
//! - `pins`: chunk id -> references held by `Pin` ops of files still in flight
//! - `meta`: applied seq, chain hash, commit time and the running LtHash digest
//! - `checkpoints`: seq -> (chain hash, digest, HMAC-SM3 evidence)
//! - `chain`: seq -> chain hash after that record, for every record this
//!   state applied (40 bytes a record), so this site can prove to a follower
//!   that a state transfer continues the follower's own history
//!
//! State is written with RocksDB's own WAL disabled: triad's change log already
//! holds every byte, and replaying it from the applied seq rebuilds whatever a
//! crash lost from the memtables. Atomic flush keeps all column families at the
//! same record boundary, so the applied seq read back after a crash always
//! matches the rest of the state. A chunk's bytes are thus written twice (the
//! log, then the blob file), not three times.
//!
//! Applying goes through an [`Overlay`]: an in-memory layer over the database
//! that collects a group of records' effects and becomes one atomic write
//! batch. The same overlay, never written, is how a reader in another process
//! sees records the daemon has logged but not yet flushed.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use rocksdb::{
    BlockBasedOptions, ColumnFamilyDescriptor, DBCompressionType, Direction, IteratorMode, Options,
    ReadOptions, WriteBatch, WriteOptions, DB,
};

use crate::chunk::{ChunkId, SealedChunk};
use crate::crypto::hmac_sm3;
use crate::error::{Result, VaultError};
use crate::keys::Keys;
use crate::lthash::LtHash;
use crate::ops::{subtree_prefix, Entry, Op};
use crate::pin::{self, PinnedDir};
use crate::record::Hash;

const CF_NS: &str = "ns";
const CF_CHUNKS: &str = "chunks";
const CF_CHUNKMETA: &str = "chunkmeta";
const CF_PINS: &str = "pins";
const CF_META: &str = "meta";
const CF_CHECKPOINTS: &str = "checkpoints";
const CF_CHAIN: &str = "chain";
const ALL_CFS: [&str; 8] = [
    CF_NS,
    CF_CHUNKS,
    CF_CHUNKMETA,
    CF_PINS,
    CF_META,
    CF_CHECKPOINTS,
    CF_CHAIN,
    CF_TRANSFER,
];

/// A state transfer being received: its namespace keyed by path, and,
/// under [`K_INSTALLING`], the install under way (formats.md 7.1).
const CF_TRANSFER: &str = "transfer";
/// No path is empty, so the empty key holds the install record.
const K_INSTALLING: &[u8] = b"";
/// The first key a path can have.
const TRANSFER_START: &[u8] = &[0];
/// Past every path: a path's components are at most 255 bytes and are
/// joined by `/` (below 0xff), so no path starts with 256 bytes of 0xff.
const TRANSFER_END: &[u8] = &[0xff; 256];
/// Entries, or writes, an install handles at a time.
const INSTALL_BATCH: usize = 20_000;

/// The install record: the applied record (48 bytes as in `meta`), the
/// digest, and the pins (id, count).
fn encode_installing(a: &Applied, pins: &[(ChunkId, u64)]) -> Vec<u8> {
    let d = a.digest.to_bytes();
    let mut v = Vec::with_capacity(48 + 4 + d.len() + pins.len() * 40);
    v.extend_from_slice(&a.seq.to_le_bytes());
    v.extend_from_slice(&a.time_ns.to_le_bytes());
    v.extend_from_slice(&a.hash);
    v.extend_from_slice(&(d.len() as u32).to_le_bytes());
    v.extend_from_slice(&d);
    for (id, n) in pins {
        v.extend_from_slice(&id.0);
        v.extend_from_slice(&n.to_le_bytes());
    }
    v
}

fn decode_installing(v: &[u8]) -> Option<(Applied, Vec<(ChunkId, u64)>)> {
    let seq = u64::from_le_bytes(v.get(..8)?.try_into().ok()?);
    let time_ns = i64::from_le_bytes(v.get(8..16)?.try_into().ok()?);
    let hash: Hash = v.get(16..48)?.try_into().ok()?;
    let dl = u32::from_le_bytes(v.get(48..52)?.try_into().ok()?) as usize;
    let digest = LtHash::try_from_bytes(v.get(52..52 + dl)?)?;
    let rest = v.get(52 + dl..)?;
    if rest.len() % 40 != 0 {
        return None;
    }
    let pins = rest
        .chunks_exact(40)
        .map(|c| {
            let id = ChunkId(c[..32].try_into().unwrap_or_default());
            (
                id,
                u64::from_le_bytes(c[32..].try_into().unwrap_or_default()),
            )
        })
        .collect();
    Some((
        Applied {
            seq,
            time_ns,
            hash,
            digest,
        },
        pins,
    ))
}

const K_APPLIED: &[u8] = b"applied";
const K_DIGEST: &[u8] = b"digest";

/// A checkpoint is recorded every this many records.
pub const CHECKPOINT_INTERVAL: u64 = 256;

/// Per-chunk bookkeeping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkMeta {
    pub refs: u64,
    pub plain_len: u32,
    pub sealed_len: u32,
    pub sealed_hash: [u8; 32],
}

impl ChunkMeta {
    fn encode(&self) -> [u8; 48] {
        let mut b = [0u8; 48];
        b[..8].copy_from_slice(&self.refs.to_le_bytes());
        b[8..12].copy_from_slice(&self.plain_len.to_le_bytes());
        b[12..16].copy_from_slice(&self.sealed_len.to_le_bytes());
        b[16..].copy_from_slice(&self.sealed_hash);
        b
    }
    fn decode(b: &[u8]) -> Option<ChunkMeta> {
        if b.len() != 48 {
            return None;
        }
        Some(ChunkMeta {
            refs: u64::from_le_bytes(b[..8].try_into().ok()?),
            plain_len: u32::from_le_bytes(b[8..12].try_into().ok()?),
            sealed_len: u32::from_le_bytes(b[12..16].try_into().ok()?),
            sealed_hash: b[16..].try_into().ok()?,
        })
    }
}

/// Where the state stands: the last applied record and the digest after it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub seq: u64,
    pub hash: Hash,
    pub time_ns: i64,
    pub digest: LtHash,
}

/// `(seq, chain hash, digest)` with HMAC-SM3 evidence over all three.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: u64,
    pub hash: Hash,
    pub digest: [u8; 32],
    pub hmac_sm3: [u8; 32],
}

impl Checkpoint {
    pub fn new(keys: &Keys, seq: u64, hash: Hash, digest: [u8; 32]) -> Checkpoint {
        let mac = hmac_sm3(
            &keys.evidence,
            &[b"triad checkpoint v1", &seq.to_le_bytes(), &hash, &digest],
        );
        Checkpoint {
            seq,
            hash,
            digest,
            hmac_sm3: mac,
        }
    }

    /// Checks the evidence under the dataset's key.
    pub fn verify(&self, keys: &Keys) -> bool {
        Checkpoint::new(keys, self.seq, self.hash, self.digest).hmac_sm3 == self.hmac_sm3
    }

    fn encode(&self) -> Vec<u8> {
        [&self.hash[..], &self.digest[..], &self.hmac_sm3[..]].concat()
    }

    fn decode(seq: u64, b: &[u8]) -> Option<Checkpoint> {
        if b.len() != 96 {
            return None;
        }
        Some(Checkpoint {
            seq,
            hash: b[..32].try_into().ok()?,
            digest: b[32..64].try_into().ok()?,
            hmac_sm3: b[64..].try_into().ok()?,
        })
    }
}

/// The RocksDB state of one dataset.
pub struct State {
    db: DB,
    path: PathBuf,
    /// Held for writing while a transfer is installed a batch at a time:
    /// snapshots wait for it, so none sees half an install.
    install_lock: std::sync::RwLock<()>,
    /// For a reader's view: the pinned copy the database was opened from,
    /// removed after `db` is dropped (fields drop in order).
    _pinned: Option<PinnedDir>,
}

/// Block cache shared by all column families of one state. Without one,
/// each column family's table factory made its own 32 MiB cache: seven of
/// them filled as a dataset grew, and a daemon holding a million files
/// reached 630 MiB, most of it cached blocks.
const BLOCK_CACHE_BYTES: usize = 32 << 20;
/// Memtables of all column families together; past it they are flushed
/// (all at once, as atomic flush has it).
const WRITE_BUFFERS_BYTES: usize = 64 << 20;

fn cf_options(name: &str, cache: &rocksdb::Cache) -> Options {
    let mut o = Options::default();
    // Chunks are already compressed and encrypted; namespace entries are small.
    o.set_compression_type(DBCompressionType::None);
    let mut bb = BlockBasedOptions::default();
    bb.set_block_cache(cache);
    if name == CF_CHUNKS {
        o.set_enable_blob_files(true);
        o.set_min_blob_size(1024);
        o.set_blob_file_size(256 << 20);
        o.set_blob_compression_type(DBCompressionType::None);
        o.set_enable_blob_gc(true);
        o.set_blob_gc_age_cutoff(0.25);
        o.set_write_buffer_size(64 << 20);
    } else {
        bb.set_bloom_filter(10.0, false);
    }
    o.set_block_based_table_factory(&bb);
    o
}

fn db_options() -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.create_missing_column_families(true);
    // Required when RocksDB's WAL is off: all column families flush together.
    o.set_atomic_flush(true);
    o.set_max_background_jobs(2);
    o.set_keep_log_file_num(4);
    o.set_db_write_buffer_size(WRITE_BUFFERS_BYTES);
    o
}

impl State {
    pub fn open(path: &Path) -> Result<State> {
        let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES);
        let cfs = ALL_CFS
            .iter()
            .map(|n| ColumnFamilyDescriptor::new(*n, cf_options(n, &cache)));
        let db =
            DB::open_cf_descriptors(&db_options(), path, cfs).map_err(|e| VaultError::State {
                path: path.to_path_buf(),
                source: e,
            })?;
        Ok(State {
            db,
            path: path.to_path_buf(),
            install_lock: std::sync::RwLock::new(()),
            _pinned: None,
        })
    }

    /// Opens the state for reading while a daemon may hold it open for writing.
    /// It shows the state as of the daemon's last flush; [`Overlay`] replay of
    /// the log tail brings it to the log's head. The database is opened from a
    /// pinned copy (see [`crate::pin`]) so the daemon's compactions cannot
    /// delete files from under a long read.
    pub fn open_read_only(path: &Path) -> Result<State> {
        if !path.join("CURRENT").exists() {
            return Err(VaultError::StateCorrupt {
                path: path.to_path_buf(),
                reason: "no RocksDB database here (CURRENT is missing)".into(),
            });
        }
        let views = path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(pin::VIEWS_DIR);
        let pinned = pin::pin(path, &views)?;
        let mut opts = db_options();
        opts.create_if_missing(false);
        opts.create_missing_column_families(false);
        // A state written before a column family existed (`chain`, 0.2)
        // lacks it until the daemon opens it read-write: open what is
        // there, and readers treat a missing index as empty.
        let present = DB::list_cf(&opts, pinned.path()).unwrap_or_default();
        let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES);
        let cfs = ALL_CFS
            .iter()
            .filter(|n| {
                !matches!(**n, CF_CHAIN | CF_TRANSFER)
                    || present.is_empty()
                    || present.iter().any(|p| p == *n)
            })
            .map(|n| ColumnFamilyDescriptor::new(*n, cf_options(n, &cache)));
        let db =
            DB::open_cf_descriptors_read_only(&opts, pinned.path(), cfs, false).map_err(|e| {
                VaultError::State {
                    path: path.to_path_buf(),
                    source: e,
                }
            })?;
        Ok(State {
            db,
            path: path.to_path_buf(),
            install_lock: std::sync::RwLock::new(()),
            _pinned: Some(pinned),
        })
    }

    fn err(&self, e: rocksdb::Error) -> VaultError {
        VaultError::State {
            path: self.path.clone(),
            source: e,
        }
    }

    fn corrupt(&self, reason: String) -> VaultError {
        VaultError::StateCorrupt {
            path: self.path.clone(),
            reason,
        }
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| self.corrupt(format!("column family {name} is missing")))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn applied(&self) -> Result<Applied> {
        let meta = self.cf(CF_META)?;
        let a = self.db.get_cf(meta, K_APPLIED).map_err(|e| self.err(e))?;
        let d = self.db.get_cf(meta, K_DIGEST).map_err(|e| self.err(e))?;
        self.decode_applied(a, d)
    }

    /// The applied record and digest as stored in `meta` (absent: nothing
    /// applied yet).
    fn decode_applied(&self, a: Option<Vec<u8>>, d: Option<Vec<u8>>) -> Result<Applied> {
        let Some(a) = a else {
            return Ok(Applied::default());
        };
        if a.len() != 48 {
            return Err(self.corrupt("applied record has the wrong length".into()));
        }
        let digest = d
            .and_then(|d| LtHash::try_from_bytes(&d))
            .ok_or_else(|| self.corrupt("namespace digest is missing or malformed".into()))?;
        Ok(Applied {
            seq: u64::from_le_bytes(a[..8].try_into().unwrap_or_default()),
            time_ns: i64::from_le_bytes(a[8..16].try_into().unwrap_or_default()),
            hash: a[16..48].try_into().unwrap_or_default(),
            digest,
        })
    }

    /// Writes the applied record and digest into `b`.
    fn put_applied(&self, b: &mut WriteBatch, a: &Applied) -> Result<()> {
        let meta = self.cf(CF_META)?;
        let mut rec = Vec::with_capacity(48);
        rec.extend_from_slice(&a.seq.to_le_bytes());
        rec.extend_from_slice(&a.time_ns.to_le_bytes());
        rec.extend_from_slice(&a.hash);
        b.put_cf(meta, K_APPLIED, rec);
        b.put_cf(meta, K_DIGEST, a.digest.to_bytes());
        Ok(())
    }

    fn decode_pin(&self, k: &[u8], v: &[u8]) -> Result<(ChunkId, u64)> {
        let id = ChunkId(
            k.try_into()
                .map_err(|_| self.corrupt("pin key malformed".into()))?,
        );
        let n = u64::from_le_bytes(
            v.try_into()
                .map_err(|_| self.corrupt("pin count malformed".into()))?,
        );
        Ok((id, n))
    }

    pub fn entry(&self, path: &[u8]) -> Result<Option<Entry>> {
        let ns = self.cf(CF_NS)?;
        match self.db.get_pinned_cf(ns, path).map_err(|e| self.err(e))? {
            None => Ok(None),
            Some(b) => Entry::decode(&b).map(Some).ok_or_else(|| {
                self.corrupt(format!(
                    "entry {} is malformed",
                    String::from_utf8_lossy(path)
                ))
            }),
        }
    }

    pub fn chunk_meta(&self, id: &ChunkId) -> Result<Option<ChunkMeta>> {
        let cf = self.cf(CF_CHUNKMETA)?;
        match self.db.get_pinned_cf(cf, id.0).map_err(|e| self.err(e))? {
            None => Ok(None),
            Some(b) => ChunkMeta::decode(&b)
                .map(Some)
                .ok_or_else(|| self.corrupt(format!("chunk meta {id} is malformed"))),
        }
    }

    /// The sealed bytes of a chunk, as stored. RocksDB checks its own block
    /// and blob checksums on the way.
    pub fn chunk_bytes(&self, id: &ChunkId) -> Result<Option<Vec<u8>>> {
        let cf = self.cf(CF_CHUNKS)?;
        let mut ro = ReadOptions::default();
        ro.set_verify_checksums(true);
        // Large one-off reads should not push the namespace out of the cache.
        ro.fill_cache(false);
        self.db.get_cf_opt(cf, id.0, &ro).map_err(|e| self.err(e))
    }

    /// Entries at or beneath `prefix` (all entries for an empty prefix), in order.
    pub fn entries_with_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Entry)>> {
        let ns = self.cf(CF_NS)?;
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(ns, IteratorMode::From(prefix, Direction::Forward))
        {
            let (k, v) = item.map_err(|e| self.err(e))?;
            if !k.starts_with(prefix) {
                break;
            }
            let e = Entry::decode(&v).ok_or_else(|| {
                self.corrupt(format!(
                    "entry {} is malformed",
                    String::from_utf8_lossy(&k)
                ))
            })?;
            out.push((k.to_vec(), e));
        }
        Ok(out)
    }

    /// Every entry in path order, read one at a time from one iterator
    /// (which sees the state as it was when it was made), so a walk of
    /// the whole namespace holds one entry however large the tree.
    pub fn entries_iter(&self) -> Result<impl Iterator<Item = Result<(Vec<u8>, Entry)>> + '_> {
        Ok(self.decoded(self.cf(CF_NS)?, IteratorMode::Start))
    }

    /// The entries whose paths start with `prefix`, in path order, read
    /// one at a time.
    pub fn entries_under<'s>(
        &'s self,
        prefix: &'s [u8],
    ) -> Result<impl Iterator<Item = Result<(Vec<u8>, Entry)>> + 's> {
        let from = IteratorMode::From(prefix, Direction::Forward);
        Ok(self.decoded(self.cf(CF_NS)?, from).take_while(move |item| {
            item.as_ref().is_ok_and(|(k, _)| k.starts_with(prefix)) || item.is_err()
        }))
    }

    /// Chunks with references held by pins.
    pub fn pins(&self) -> Result<Vec<(ChunkId, u64)>> {
        let cf = self.cf(CF_PINS)?;
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| self.err(e))?;
            out.push(self.decode_pin(&k, &v)?);
        }
        Ok(out)
    }

    /// Every stored chunk's bookkeeping, for scrubs and tests.
    pub fn all_chunk_meta(&self) -> Result<Vec<(ChunkId, ChunkMeta)>> {
        self.chunk_metas_iter()?.collect()
    }

    /// Every stored chunk's metadata, in id order, read one at a time.
    pub fn chunk_metas_iter(
        &self,
    ) -> Result<impl Iterator<Item = Result<(ChunkId, ChunkMeta)>> + '_> {
        let cf = self.cf(CF_CHUNKMETA)?;
        Ok(self.raw_iter(cf).map(move |item| {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let id = ChunkId(
                k.as_ref()
                    .try_into()
                    .map_err(|_| self.corrupt("chunk key malformed".into()))?,
            );
            let m = ChunkMeta::decode(&v)
                .ok_or_else(|| self.corrupt(format!("chunk meta {id} malformed")))?;
            Ok((id, m))
        }))
    }

    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        let cf = self.cf(CF_CHECKPOINTS)?;
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let seq = u64::from_be_bytes(
                k.as_ref()
                    .try_into()
                    .map_err(|_| self.corrupt("checkpoint key malformed".into()))?,
            );
            out.push(
                Checkpoint::decode(seq, &v)
                    .ok_or_else(|| self.corrupt(format!("checkpoint {seq} malformed")))?,
            );
        }
        Ok(out)
    }

    /// The checkpoint recorded at `seq`, if one was (a point lookup).
    pub fn checkpoint_at(&self, seq: u64) -> Result<Option<Checkpoint>> {
        let cf = self.cf(CF_CHECKPOINTS)?;
        match self
            .db
            .get_cf(cf, seq.to_be_bytes())
            .map_err(|e| self.err(e))?
        {
            None => Ok(None),
            Some(v) => Checkpoint::decode(seq, &v)
                .map(Some)
                .ok_or_else(|| self.corrupt(format!("checkpoint {seq} malformed"))),
        }
    }

    /// The newest checkpoint (keys are big-endian seqs, so it is the last).
    pub fn latest_checkpoint(&self) -> Result<Option<Checkpoint>> {
        let cf = self.cf(CF_CHECKPOINTS)?;
        let Some(item) = self.db.iterator_cf(cf, IteratorMode::End).next() else {
            return Ok(None);
        };
        let (k, _) = item.map_err(|e| self.err(e))?;
        let seq = u64::from_be_bytes(
            k.as_ref()
                .try_into()
                .map_err(|_| self.corrupt("checkpoint key malformed".into()))?,
        );
        self.checkpoint_at(seq)
    }

    /// Recomputes the namespace digest from every entry (a scrub's check of
    /// the running value).
    pub fn recompute_digest(&self, keys: &Keys) -> Result<LtHash> {
        let mut d = LtHash::default();
        for (p, e) in self.entries_with_prefix(b"")? {
            d.add(&e.digest_element(keys, &p));
        }
        Ok(d)
    }

    pub fn write(&self, batch: WriteBatch) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        self.db.write_opt(batch, &wo).map_err(|e| self.err(e))
    }

    /// Flushes memtables of every column family together, making the state
    /// durable up to its applied seq (a clean stop does this so a restart
    /// replays nothing).
    pub fn flush(&self) -> Result<()> {
        let cfs: Vec<&rocksdb::ColumnFamily> = ALL_CFS
            .iter()
            .filter_map(|n| self.db.cf_handle(n))
            .collect();
        let mut fo = rocksdb::FlushOptions::default();
        fo.set_wait(true);
        self.db.flush_cfs_opt(&cfs, &fo).map_err(|e| self.err(e))
    }

    /// Rewrites a stored chunk's bytes with `c`, after checking that they are
    /// what its metadata records and that they open under its id. Durable
    /// when it returns (this write is not in the change log). Fails, writing
    /// nothing, for a chunk that is not stored or bytes that do not match.
    pub fn repair_chunk(&self, c: &SealedChunk) -> Result<()> {
        let Some(meta) = self.chunk_meta(&c.id)? else {
            return Err(VaultError::BadChunk {
                id: c.id,
                reason: "not stored here: nothing to repair".into(),
            });
        };
        if c.sealed.len() != meta.sealed_len as usize || c.sealed_hash() != meta.sealed_hash {
            return Err(VaultError::BadChunk {
                id: c.id,
                reason: "the replacement bytes are not the ones recorded for this chunk".into(),
            });
        }
        let mut b = WriteBatch::default();
        b.put_cf(self.cf(CF_CHUNKS)?, c.id.0, &c.sealed);
        self.write(b)?;
        self.flush()
    }

    /// Compacts every column family now, blob garbage collection included,
    /// so space held by deleted chunks is given back and obsolete files are
    /// deleted at once rather than when RocksDB gets to them.
    pub fn compact(&self) -> Result<()> {
        let mut o = rocksdb::CompactOptions::default();
        o.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        for n in ALL_CFS {
            let cf = self.cf(n)?;
            self.db
                .compact_range_cf_opt(cf, None::<&[u8]>, None::<&[u8]>, &o);
        }
        Ok(())
    }

    /// Runs `f` over a consistent point-in-time view of the state (a RocksDB
    /// snapshot: always at a record boundary), for a state transfer.
    pub fn with_snapshot<R>(&self, f: impl FnOnce(&Snap<'_>) -> R) -> R {
        // Never in the middle of an install (a poisoned lock means an
        // install panicked: the next open finishes it).
        let installing = self.install_lock.read();
        let snap = self.db.snapshot();
        drop(installing);
        f(&Snap { st: self, snap })
    }

    /// Stores chunks received in a state transfer before the namespace that
    /// uses them is installed. They carry no references yet; installing sets
    /// them, and a transfer cut short leaves them for the next attempt.
    pub fn stage_chunks(&self, chunks: &[SealedChunk]) -> Result<()> {
        let (cm, cb) = (self.cf(CF_CHUNKMETA)?, self.cf(CF_CHUNKS)?);
        let mut b = WriteBatch::default();
        for c in chunks {
            if self.chunk_meta(&c.id)?.is_some() {
                continue;
            }
            let m = ChunkMeta {
                refs: 0,
                plain_len: c.plain_len,
                sealed_len: c.sealed.len() as u32,
                sealed_hash: c.sealed_hash(),
            };
            b.put_cf(cm, c.id.0, m.encode());
            b.put_cf(cb, c.id.0, &c.sealed);
        }
        self.write(b)
    }

    /// Records chunks by their metadata alone, without their bytes: a
    /// restore from an archive installs a snapshot's namespace this way and
    /// writes the chunks into the tree straight from the store
    /// (`restore::restore_from`). Chunks already recorded are left as they
    /// are; the references are set when the namespace is installed.
    pub fn stage_chunk_meta(&self, chunks: &[(ChunkId, ChunkMeta)]) -> Result<()> {
        let cm = self.cf(CF_CHUNKMETA)?;
        let mut b = WriteBatch::default();
        for (id, m) in chunks {
            if self.chunk_meta(id)?.is_some() {
                continue;
            }
            b.put_cf(cm, id.0, m.encode());
        }
        self.write(b)
    }

    /// Whether the chunk's bytes are stored (not only its metadata).
    pub fn has_chunk_bytes(&self, id: &ChunkId) -> Result<bool> {
        let cb = self.cf(CF_CHUNKS)?;
        Ok(self
            .db
            .get_pinned_cf(cb, id.0)
            .map_err(|e| self.err(e))?
            .is_some())
    }

    /// Starts receiving a state transfer: whatever an earlier one that was
    /// cut short staged is dropped.
    pub fn clear_transfer(&self) -> Result<()> {
        self.refuse_if_installing()?;
        let tr = self.cf(CF_TRANSFER)?;
        let mut b = WriteBatch::default();
        // From the first key after the install record's, which only the
        // install itself removes.
        b.delete_range_cf(tr, TRANSFER_START, TRANSFER_END);
        self.write(b)
    }

    /// Fails while an install of a transfer is recorded as begun: the
    /// staged namespace is then what the install is made from.
    fn refuse_if_installing(&self) -> Result<()> {
        if self.install_pending()? {
            return Err(VaultError::Closed(
                "an install of a state transfer stopped half way; restart the daemon to \
                 finish it"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Stages entries of a state transfer being received: written beside
    /// the namespace, keyed by path, so the transferred namespace is never
    /// held in memory. [`State::install_transferred`] then installs them.
    pub fn stage_transfer(&self, entries: &[(Vec<u8>, Entry)]) -> Result<()> {
        self.refuse_if_installing()?;
        let tr = self.cf(CF_TRANSFER)?;
        let mut b = WriteBatch::default();
        for (p, e) in entries {
            crate::path::check(p)
                .map_err(|e| self.corrupt(format!("transferred namespace refused: {e}")))?;
            b.put_cf(tr, p, e.encode());
        }
        self.write(b)
    }

    /// The staged entries of a state transfer, in path order, one at a time.
    pub fn transfer_iter(&self) -> Result<impl Iterator<Item = Result<(Vec<u8>, Entry)>> + '_> {
        Ok(self.decoded(self.cf(CF_TRANSFER)?, IteratorMode::Start))
    }

    /// The entries of column family `cf` (keyed by path) from `from` on,
    /// decoded, in path order, without filling the block cache (a walk of
    /// everything would push the hot blocks out); the empty key (the
    /// install record of [`CF_TRANSFER`]) is passed over.
    fn decoded<'s>(
        &'s self,
        cf: &'s rocksdb::ColumnFamily,
        from: IteratorMode<'s>,
    ) -> impl Iterator<Item = Result<(Vec<u8>, Entry)>> + 's {
        let mut ro = ReadOptions::default();
        ro.fill_cache(false);
        self.db
            .iterator_cf_opt(cf, ro, from)
            .filter_map(move |item| {
                let (k, v) = match item {
                    Ok(kv) => kv,
                    Err(e) => return Some(Err(self.err(e))),
                };
                if k.as_ref() == K_INSTALLING {
                    return None;
                }
                Some(Entry::decode(&v).map(|e| (k.to_vec(), e)).ok_or_else(|| {
                    self.corrupt(format!(
                        "entry {} is malformed",
                        String::from_utf8_lossy(&k)
                    ))
                }))
            })
    }

    /// Replaces the namespace, pins and reference counts with the state
    /// transfer staged by [`State::stage_transfer`], at `applied`. It is
    /// checked first (its digest, and every chunk it needs stored),
    /// changing nothing when it fails; then the install is recorded as
    /// begun and carried out a batch at a time
    /// ([`State::finish_transfer_install`]), so memory stays bounded
    /// whatever the size of the namespace, and a crash part way is finished
    /// at the next open. Snapshots of the state wait for it.
    pub fn install_transferred(
        &self,
        keys: &Keys,
        applied: Applied,
        pins: &[(ChunkId, u64)],
    ) -> Result<()> {
        let refused = |why: String| {
            self.corrupt(format!(
                "transferred namespace at seq {} {why}; nothing was installed",
                applied.seq
            ))
        };
        self.refuse_if_installing()?;
        let cm = self.cf(CF_CHUNKMETA)?;
        let mut digest = LtHash::default();
        let mut missing = 0usize;
        for batch in crate::ops::batches(self.transfer_iter()?, INSTALL_BATCH) {
            let batch = batch?;
            digest.add(&crate::ops::digest_of(keys, &batch));
            let ids: std::collections::BTreeSet<ChunkId> = batch
                .iter()
                .flat_map(|(_, e)| e.chunks().iter().map(|c| c.id))
                .collect();
            missing += self.count_missing(cm, ids.iter())?;
        }
        missing += self.count_missing(cm, pins.iter().map(|(id, _)| id))?;
        if missing > 0 {
            return Err(refused(format!(
                "needs {missing} chunks that are not stored"
            )));
        }
        if digest != applied.digest {
            return Err(refused("does not match its digest".into()));
        }
        let _installing = self
            .install_lock
            .write()
            .map_err(|_| self.corrupt("install lock poisoned".into()))?;
        let mut b = WriteBatch::default();
        b.put_cf(
            self.cf(CF_TRANSFER)?,
            K_INSTALLING,
            encode_installing(&applied, pins),
        );
        self.write(b)?;
        self.flush()?;
        self.carry_out_install()?;
        Ok(())
    }

    /// How many of `ids` have no metadata stored.
    fn count_missing<'a>(
        &self,
        cm: &rocksdb::ColumnFamily,
        ids: impl Iterator<Item = &'a ChunkId>,
    ) -> Result<usize> {
        let mut n = 0;
        for m in self.db.multi_get_cf(ids.map(|id| (cm, id.0))) {
            if m.map_err(|e| self.err(e))?.is_none() {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Whether an install of a state transfer is under way or was
    /// interrupted (the namespace is then partly the transferred one).
    pub fn install_pending(&self) -> Result<bool> {
        // A read-only view of a state from before the column family.
        let Some(tr) = self.db.cf_handle(CF_TRANSFER) else {
            return Ok(false);
        };
        Ok(self
            .db
            .get_pinned_cf(tr, K_INSTALLING)
            .map_err(|e| self.err(e))?
            .is_some())
    }

    /// Finishes an install of a state transfer that a crash interrupted
    /// (the daemon calls it when it opens the state). True if there was one.
    pub fn finish_transfer_install(&self) -> Result<bool> {
        let _installing = self
            .install_lock
            .write()
            .map_err(|_| self.corrupt("install lock poisoned".into()))?;
        self.carry_out_install()
    }

    /// Carries out the install recorded under [`K_INSTALLING`], if there is
    /// one. Every step can run again from the start after a crash: the
    /// namespace becomes the staged one (a merge of the two in path
    /// order), every chunk's reference count is counted again from zero,
    /// chunks nothing references are deleted, and one last batch writes the
    /// pins and the applied record and drops the staged namespace.
    fn carry_out_install(&self) -> Result<bool> {
        let tr = self.cf(CF_TRANSFER)?;
        let Some(v) = self.db.get_cf(tr, K_INSTALLING).map_err(|e| self.err(e))? else {
            return Ok(false);
        };
        let (applied, pins) = decode_installing(&v)
            .ok_or_else(|| self.corrupt("the record of a transfer install is malformed".into()))?;
        let (ns, cm, cb) = (self.cf(CF_NS)?, self.cf(CF_CHUNKMETA)?, self.cf(CF_CHUNKS)?);
        // The namespace: paths only here deleted, the staged entries put.
        {
            let mut old = self.raw_iter(ns).peekable();
            let mut new = self
                .raw_iter(tr)
                .filter(|i| !matches!(i, Ok((k, _)) if k.as_ref() == K_INSTALLING))
                .peekable();
            let mut b = WriteBatch::default();
            loop {
                let order = match (old.peek(), new.peek()) {
                    (None, None) => break,
                    (Some(Err(_)), _) | (Some(Ok(_)), None) => std::cmp::Ordering::Less,
                    (None, Some(_)) => std::cmp::Ordering::Greater,
                    (Some(Ok((o, _))), Some(Ok((n, _)))) => o.cmp(n),
                    (Some(Ok(_)), Some(Err(_))) => std::cmp::Ordering::Greater,
                };
                match order {
                    std::cmp::Ordering::Less => {
                        let (k, _) = old
                            .next()
                            .ok_or_else(|| self.corrupt("merge".into()))?
                            .map_err(|e| self.err(e))?;
                        b.delete_cf(ns, k);
                    }
                    o => {
                        if o == std::cmp::Ordering::Equal {
                            old.next();
                        }
                        let (k, v) = new
                            .next()
                            .ok_or_else(|| self.corrupt("merge".into()))?
                            .map_err(|e| self.err(e))?;
                        b.put_cf(ns, k, v);
                    }
                }
                if b.len() >= INSTALL_BATCH {
                    self.write(std::mem::take(&mut b))?;
                }
            }
            self.write(b)?;
        }
        #[cfg(test)]
        tests::crash_point(1).map_err(|e| self.corrupt(e))?;
        // Reference counts, from zero.
        self.zero_refs()?;
        for batch in crate::ops::batches(self.decoded(ns, IteratorMode::Start), INSTALL_BATCH) {
            let batch = batch?;
            let mut refs: HashMap<ChunkId, u64> = HashMap::new();
            for (_, e) in &batch {
                for c in e.chunks() {
                    *refs.entry(c.id).or_default() += 1;
                }
            }
            self.add_refs(cm, &refs)?;
        }
        let pin_refs: HashMap<ChunkId, u64> = pins.iter().copied().collect();
        self.add_refs(cm, &pin_refs)?;
        #[cfg(test)]
        tests::crash_point(2).map_err(|e| self.corrupt(e))?;
        // What nothing references goes, bytes and all.
        let mut b = WriteBatch::default();
        for item in self.db.iterator_cf(cm, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| self.err(e))?;
            if ChunkMeta::decode(&v).is_some_and(|m| m.refs == 0) {
                b.delete_cf(cm, &k);
                b.delete_cf(cb, &k);
            }
            if b.len() >= INSTALL_BATCH {
                self.write(std::mem::take(&mut b))?;
            }
        }
        self.write(b)?;
        let mut b = WriteBatch::default();
        let pins_cf = self.cf(CF_PINS)?;
        for (id, _) in self.pins()? {
            b.delete_cf(pins_cf, id.0);
        }
        for (id, n) in &pins {
            b.put_cf(pins_cf, id.0, n.to_le_bytes());
        }
        b.put_cf(self.cf(CF_CHAIN)?, applied.seq.to_be_bytes(), applied.hash);
        self.put_applied(&mut b, &applied)?;
        b.delete_range_cf(tr, K_INSTALLING, TRANSFER_END);
        self.write(b)?;
        self.flush()?;
        Ok(true)
    }

    /// Every key and value of `cf`, in key order, without filling the
    /// block cache.
    fn raw_iter<'s>(
        &'s self,
        cf: &rocksdb::ColumnFamily,
    ) -> rocksdb::DBIteratorWithThreadMode<'s, DB> {
        let mut ro = ReadOptions::default();
        ro.fill_cache(false);
        self.db.iterator_cf_opt(cf, ro, IteratorMode::Start)
    }

    /// Sets every chunk's reference count to 0, a batch at a time.
    fn zero_refs(&self) -> Result<()> {
        let cm = self.cf(CF_CHUNKMETA)?;
        let mut b = WriteBatch::default();
        for item in self.chunk_metas_iter()? {
            let (id, m) = item?;
            b.put_cf(cm, id.0, ChunkMeta { refs: 0, ..m }.encode());
            if b.len() >= INSTALL_BATCH {
                self.write(std::mem::take(&mut b))?;
            }
        }
        self.write(b)
    }

    /// Adds `refs` to the reference counts of stored chunks (all of which
    /// the install checked are there).
    fn add_refs(&self, cm: &rocksdb::ColumnFamily, refs: &HashMap<ChunkId, u64>) -> Result<()> {
        let ids: Vec<&ChunkId> = refs.keys().collect();
        let found = self.db.multi_get_cf(ids.iter().map(|id| (cm, id.0)));
        let mut b = WriteBatch::default();
        for (id, m) in ids.iter().zip(found) {
            let m = m.map_err(|e| self.err(e))?;
            let mut m = m.as_deref().and_then(ChunkMeta::decode).ok_or_else(|| {
                self.corrupt(format!("chunk {id} the namespace needs is not stored"))
            })?;
            // Pin counts come from the upstream: a lying one must not wrap.
            m.refs = m.refs.saturating_add(refs.get(*id).copied().unwrap_or(0));
            b.put_cf(cm, id.0, m.encode());
        }
        self.write(b)
    }

    /// The chain hash after record `seq`, if this state applied it (or
    /// recorded a checkpoint or installed a transfer there).
    pub fn chain_hash_at(&self, seq: u64) -> Result<Option<Hash>> {
        let found = match self.db.cf_handle(CF_CHAIN) {
            Some(cf) => self
                .db
                .get_pinned_cf(cf, seq.to_be_bytes())
                .map_err(|e| self.err(e))?,
            // A read-only view of a state from before the index.
            None => None,
        };
        if let Some(v) = found {
            let h: Hash = v
                .as_ref()
                .try_into()
                .map_err(|_| self.corrupt(format!("chain hash at seq {seq} malformed")))?;
            return Ok(Some(h));
        }
        // States written before the chain index know the applied record's
        // hash and their checkpoints'.
        let applied = self.applied()?;
        if applied.seq == seq {
            return Ok(Some(applied.hash));
        }
        Ok(self.checkpoint_at(seq)?.map(|c| c.hash))
    }
}

/// A point-in-time view of a state, for a state transfer.
pub struct Snap<'a> {
    st: &'a State,
    snap: rocksdb::SnapshotWithThreadMode<'a, DB>,
}

impl Snap<'_> {
    /// Fails when the snapshot shows an install of a transfer that stopped
    /// half way (a running one is waited for, `State::with_snapshot`):
    /// its namespace is partly the transferred one.
    fn whole(&self) -> Result<()> {
        let Some(tr) = self.st.db.cf_handle(CF_TRANSFER) else {
            return Ok(());
        };
        if self
            .snap
            .get_cf(tr, K_INSTALLING)
            .map_err(|e| self.st.err(e))?
            .is_some()
        {
            return Err(VaultError::Closed(
                "an install of a state transfer stopped half way; restart the daemon to \
                 finish it"
                    .into(),
            ));
        }
        Ok(())
    }

    pub fn applied(&self) -> Result<Applied> {
        self.whole()?;
        let meta = self.st.cf(CF_META)?;
        let a = self
            .snap
            .get_cf(meta, K_APPLIED)
            .map_err(|e| self.st.err(e))?;
        let d = self
            .snap
            .get_cf(meta, K_DIGEST)
            .map_err(|e| self.st.err(e))?;
        self.st.decode_applied(a, d)
    }

    /// Every entry, in path order (only for what is bounded anyway:
    /// whatever walks a whole namespace uses [`Snap::entries_iter`]).
    pub fn entries(&self) -> Result<Vec<(Vec<u8>, Entry)>> {
        self.entries_iter()?.collect()
    }

    /// Every entry in path order, read one at a time, so a walk of the
    /// whole namespace holds one entry however large the tree.
    pub fn entries_iter(&self) -> Result<impl Iterator<Item = Result<(Vec<u8>, Entry)>> + '_> {
        self.whole()?;
        let ns = self.st.cf(CF_NS)?;
        // A walk of everything would push the committer's hot blocks out of
        // the shared block cache.
        let mut ro = ReadOptions::default();
        ro.fill_cache(false);
        Ok(self
            .snap
            .iterator_cf_opt(ns, ro, IteratorMode::Start)
            .map(move |item| {
                let (k, v) = item.map_err(|e| self.st.err(e))?;
                let e = Entry::decode(&v).ok_or_else(|| {
                    self.st.corrupt(format!(
                        "entry {} is malformed",
                        String::from_utf8_lossy(&k)
                    ))
                })?;
                Ok((k.to_vec(), e))
            }))
    }

    pub fn pins(&self) -> Result<Vec<(ChunkId, u64)>> {
        let cf = self.st.cf(CF_PINS)?;
        let mut out = Vec::new();
        for item in self.snap.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| self.st.err(e))?;
            out.push(self.st.decode_pin(&k, &v)?);
        }
        Ok(out)
    }

    /// The entry at `path` as it was at the snapshot.
    pub fn entry(&self, path: &[u8]) -> Result<Option<Entry>> {
        let ns = self.st.cf(CF_NS)?;
        match self.snap.get_cf(ns, path).map_err(|e| self.st.err(e))? {
            Some(v) => Entry::decode(&v)
                .map(Some)
                .ok_or_else(|| self.st.corrupt("entry malformed".into())),
            None => Ok(None),
        }
    }

    /// The entries whose paths start with `prefix`, in path order, as they
    /// were at the snapshot.
    pub fn entries_with_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Entry)>> {
        let ns = self.st.cf(CF_NS)?;
        let mut out = Vec::new();
        for item in self
            .snap
            .iterator_cf(ns, IteratorMode::From(prefix, Direction::Forward))
        {
            let (k, v) = item.map_err(|e| self.st.err(e))?;
            if !k.starts_with(prefix) {
                break;
            }
            let e = Entry::decode(&v).ok_or_else(|| self.st.corrupt("entry malformed".into()))?;
            out.push((k.to_vec(), e));
        }
        Ok(out)
    }

    /// A chunk's metadata as it was at the snapshot.
    pub fn chunk_meta(&self, id: &ChunkId) -> Result<Option<ChunkMeta>> {
        let cm = self.st.cf(CF_CHUNKMETA)?;
        let Some(m) = self.snap.get_cf(cm, id.0).map_err(|e| self.st.err(e))? else {
            return Ok(None);
        };
        ChunkMeta::decode(&m)
            .map(Some)
            .ok_or_else(|| self.st.corrupt("chunk meta".into()))
    }

    /// The metadata of many chunks in one batched read (a snapshot looks
    /// up every chunk a page names: one at a time, the lookups were most
    /// of a snapshot's time).
    pub fn chunk_metas(&self, ids: &[ChunkId]) -> Result<Vec<Option<ChunkMeta>>> {
        let cm = self.st.cf(CF_CHUNKMETA)?;
        self.snap
            .multi_get_cf(ids.iter().map(|id| (cm, id.0)))
            .into_iter()
            .map(|r| match r.map_err(|e| self.st.err(e))? {
                None => Ok(None),
                Some(m) => ChunkMeta::decode(&m)
                    .map(Some)
                    .ok_or_else(|| self.st.corrupt("chunk meta".into())),
            })
            .collect()
    }

    /// A chunk as it was at the snapshot.
    pub fn chunk(&self, id: &ChunkId) -> Result<Option<SealedChunk>> {
        let (cm, cb) = (self.st.cf(CF_CHUNKMETA)?, self.st.cf(CF_CHUNKS)?);
        let Some(m) = self.snap.get_cf(cm, id.0).map_err(|e| self.st.err(e))? else {
            return Ok(None);
        };
        let m = ChunkMeta::decode(&m).ok_or_else(|| self.st.corrupt("chunk meta".into()))?;
        let Some(sealed) = self.snap.get_cf(cb, id.0).map_err(|e| self.st.err(e))? else {
            return Ok(None);
        };
        Ok(Some(SealedChunk {
            id: *id,
            plain_len: m.plain_len,
            sealed,
        }))
    }
}

/// An op could not be applied because chunks it needs are not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing(pub Vec<ChunkId>);

/// Effects of records not yet written to the database.
#[derive(Default)]
pub struct Overlay {
    entries: BTreeMap<Vec<u8>, Option<Entry>>,
    chunks: HashMap<ChunkId, Option<ChunkMeta>>,
    /// Sealed bytes of chunks that became present in this overlay.
    bytes: HashMap<ChunkId, Vec<u8>>,
    pins: HashMap<ChunkId, u64>,
    applied: Applied,
    checkpoints: Vec<Checkpoint>,
    /// (seq, chain hash) of every record applied in this overlay.
    chain: Vec<(u64, Hash)>,
}

impl Overlay {
    pub fn new(applied: Applied) -> Overlay {
        Overlay {
            applied,
            ..Overlay::default()
        }
    }

    pub fn applied(&self) -> &Applied {
        &self.applied
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
            && self.chunks.is_empty()
            && self.pins.is_empty()
            && self.checkpoints.is_empty()
    }

    pub fn entry(&self, st: &State, path: &[u8]) -> Result<Option<Entry>> {
        match self.entries.get(path) {
            Some(e) => Ok(e.clone()),
            None => st.entry(path),
        }
    }

    pub fn chunk_meta(&self, st: &State, id: &ChunkId) -> Result<Option<ChunkMeta>> {
        match self.chunks.get(id) {
            Some(m) => Ok(*m),
            None => st.chunk_meta(id),
        }
    }

    pub fn chunk_bytes(&self, st: &State, id: &ChunkId) -> Result<Option<Vec<u8>>> {
        match self.chunks.get(id) {
            Some(None) => Ok(None),
            _ => match self.bytes.get(id) {
                Some(b) => Ok(Some(b.clone())),
                None => st.chunk_bytes(id),
            },
        }
    }

    fn pin_count(&self, st: &State, id: &ChunkId) -> Result<u64> {
        if let Some(n) = self.pins.get(id) {
            return Ok(*n);
        }
        let cf = st.cf(CF_PINS)?;
        Ok(st
            .db
            .get_pinned_cf(cf, id.0)
            .map_err(|e| st.err(e))?
            .and_then(|b| b.as_ref().try_into().ok().map(u64::from_le_bytes))
            .unwrap_or(0))
    }

    /// Entries at or beneath `prefix`, merging the overlay over the database.
    pub fn entries_with_prefix(&self, st: &State, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Entry)>> {
        let mut merged: BTreeMap<Vec<u8>, Entry> =
            st.entries_with_prefix(prefix)?.into_iter().collect();
        for (k, v) in self.entries.range(prefix.to_vec()..) {
            if !k.starts_with(prefix) {
                break;
            }
            match v {
                Some(e) => merged.insert(k.clone(), e.clone()),
                None => merged.remove(k),
            };
        }
        Ok(merged.into_iter().collect())
    }

    /// The chunk metadata this overlay changed (`None`: deleted).
    pub fn chunk_changes(&self) -> impl Iterator<Item = (&ChunkId, &Option<ChunkMeta>)> {
        self.chunks.iter()
    }

    /// The state's entries with this overlay's changes, in path order,
    /// read one at a time (the overlay itself is held: it is the log past
    /// the state's last flush).
    pub fn entries_iter<'a>(
        &'a self,
        st: &'a State,
    ) -> Result<impl Iterator<Item = Result<(Vec<u8>, Entry)>> + 'a> {
        Ok(Merged {
            base: st.entries_iter()?.peekable(),
            over: self.entries.iter().peekable(),
        })
    }

    /// Chunks the ops need that are neither stored nor attached.
    pub fn missing(&self, st: &State, ops: &[Op], attachments: &[SealedChunk]) -> Result<Missing> {
        let mut missing = Vec::new();
        for op in ops {
            for id in op.needs() {
                if attachments.iter().any(|a| a.id == id) || missing.contains(&id) {
                    continue;
                }
                if self.chunk_meta(st, &id)?.is_none() {
                    missing.push(id);
                }
            }
        }
        Ok(Missing(missing))
    }

    fn set_entry(&mut self, keys: &Keys, path: &[u8], old: Option<&Entry>, new: Option<Entry>) {
        if let Some(o) = old {
            self.applied.digest.sub(&o.digest_element(keys, path));
        }
        if let Some(n) = &new {
            self.applied.digest.add(&n.digest_element(keys, path));
        }
        self.entries.insert(path.to_vec(), new);
    }

    fn incref(
        &mut self,
        st: &State,
        id: &ChunkId,
        staged: &HashMap<ChunkId, &SealedChunk>,
        seq: u64,
    ) -> Result<()> {
        match self.chunk_meta(st, id)? {
            Some(mut m) => {
                m.refs += 1;
                self.chunks.insert(*id, Some(m));
            }
            None => {
                let s = staged.get(id).ok_or_else(|| VaultError::BadRecord {
                    seq,
                    reason: format!("references chunk {id}, which is neither stored nor attached"),
                })?;
                self.chunks.insert(
                    *id,
                    Some(ChunkMeta {
                        refs: 1,
                        plain_len: s.plain_len,
                        sealed_len: s.sealed.len() as u32,
                        sealed_hash: s.sealed_hash(),
                    }),
                );
                self.bytes.insert(*id, s.sealed.clone());
            }
        }
        Ok(())
    }

    fn decref(&mut self, st: &State, id: &ChunkId) -> Result<()> {
        if let Some(mut m) = self.chunk_meta(st, id)? {
            m.refs = m.refs.saturating_sub(1);
            if m.refs == 0 {
                self.chunks.insert(*id, None);
                self.bytes.remove(id);
            } else {
                self.chunks.insert(*id, Some(m));
            }
        }
        Ok(())
    }

    fn remove(&mut self, st: &State, keys: &Keys, path: &[u8], old: &Entry) -> Result<()> {
        if old.is_dir() {
            for (p, e) in self.entries_with_prefix(st, &subtree_prefix(path))? {
                for c in e.chunks() {
                    self.decref(st, &c.id)?;
                }
                self.set_entry(keys, &p, Some(&e), None);
            }
        }
        for c in old.chunks() {
            self.decref(st, &c.id)?;
        }
        self.set_entry(keys, path, Some(old), None);
        Ok(())
    }

    /// Applies one record. Records at or below the applied seq are skipped
    /// (replay is idempotent); a gap is an error.
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &mut self,
        st: &State,
        keys: &Keys,
        seq: u64,
        hash: Hash,
        time_ns: i64,
        ops: &[Op],
        attachments: &[SealedChunk],
    ) -> Result<bool> {
        if seq <= self.applied.seq {
            return Ok(false);
        }
        if seq != self.applied.seq + 1 {
            return Err(VaultError::BadRecord {
                seq,
                reason: format!(
                    "state has applied up to seq {}; records in between are missing",
                    self.applied.seq
                ),
            });
        }
        let staged: HashMap<ChunkId, &SealedChunk> =
            attachments.iter().map(|a| (a.id, a)).collect();
        for op in ops {
            match op {
                Op::Put { path, entry } => {
                    // Take the new references before dropping the old ones, so a
                    // chunk shared by both versions is never freed in between.
                    for c in entry.chunks() {
                        self.incref(st, &c.id, &staged, seq)?;
                    }
                    if let Some(old) = self.entry(st, path)? {
                        if old.is_dir() && !entry.is_dir() {
                            self.remove(st, keys, path, &old)?;
                        } else {
                            for c in old.chunks() {
                                self.decref(st, &c.id)?;
                            }
                            self.set_entry(keys, path, Some(&old), None);
                        }
                    }
                    self.set_entry(keys, path, None, Some(entry.clone()));
                }
                Op::Delete { path } => {
                    if let Some(old) = self.entry(st, path)? {
                        self.remove(st, keys, path, &old)?;
                    }
                }
                Op::Rename { from, to } => {
                    // Moving a path into its own subtree or onto one of its
                    // ancestors cannot happen on a filesystem; ignore it rather
                    // than corrupt counts.
                    if from == to
                        || to.starts_with(&subtree_prefix(from))
                        || from.starts_with(&subtree_prefix(to))
                    {
                        continue;
                    }
                    let Some(src) = self.entry(st, from)? else {
                        continue;
                    };
                    let mut moving = vec![(from.clone(), src.clone())];
                    if src.is_dir() {
                        moving.extend(self.entries_with_prefix(st, &subtree_prefix(from))?);
                    }
                    if let Some(old) = self.entry(st, to)? {
                        self.remove(st, keys, to, &old)?;
                    }
                    for (p, e) in &moving {
                        self.set_entry(keys, p, Some(e), None);
                    }
                    for (p, e) in moving {
                        let mut np = to.clone();
                        np.extend_from_slice(&p[from.len()..]);
                        self.set_entry(keys, &np, None, Some(e));
                    }
                }
                Op::Pin { ids } => {
                    for id in ids {
                        self.incref(st, id, &staged, seq)?;
                        let n = self.pin_count(st, id)?;
                        self.pins.insert(*id, n + 1);
                    }
                }
                Op::Unpin { ids } => {
                    for id in ids {
                        let n = self.pin_count(st, id)?;
                        if n > 0 {
                            self.pins.insert(*id, n - 1);
                            self.decref(st, id)?;
                        }
                    }
                }
            }
        }
        self.applied.seq = seq;
        self.applied.hash = hash;
        self.applied.time_ns = time_ns;
        self.chain.push((seq, hash));
        if seq.is_multiple_of(CHECKPOINT_INTERVAL) {
            self.checkpoints.push(Checkpoint::new(
                keys,
                seq,
                hash,
                self.applied.digest.summary(),
            ));
        }
        Ok(true)
    }

    /// The overlay as one atomic write batch, consuming it.
    pub fn into_batch(self, st: &State) -> Result<(WriteBatch, Applied)> {
        let mut b = WriteBatch::default();
        let ns = st.cf(CF_NS)?;
        for (k, v) in &self.entries {
            match v {
                Some(e) => b.put_cf(ns, k, e.encode()),
                None => b.delete_cf(ns, k),
            }
        }
        let (cm, cb) = (st.cf(CF_CHUNKMETA)?, st.cf(CF_CHUNKS)?);
        for (id, m) in &self.chunks {
            match m {
                Some(m) => {
                    b.put_cf(cm, id.0, m.encode());
                    if let Some(bytes) = self.bytes.get(id) {
                        b.put_cf(cb, id.0, bytes);
                    }
                }
                None => {
                    b.delete_cf(cm, id.0);
                    b.delete_cf(cb, id.0);
                }
            }
        }
        let pins = st.cf(CF_PINS)?;
        for (id, n) in &self.pins {
            if *n == 0 {
                b.delete_cf(pins, id.0);
            } else {
                b.put_cf(pins, id.0, n.to_le_bytes());
            }
        }
        let cps = st.cf(CF_CHECKPOINTS)?;
        for c in &self.checkpoints {
            b.put_cf(cps, c.seq.to_be_bytes(), c.encode());
        }
        let chain = st.cf(CF_CHAIN)?;
        for (seq, h) in &self.chain {
            b.put_cf(chain, seq.to_be_bytes(), h);
        }
        st.put_applied(&mut b, &self.applied)?;
        Ok((b, self.applied))
    }
}

/// A state's entries merged with an overlay's changes, both in path order:
/// where both have a path the overlay's word (an entry, or its removal)
/// wins.
struct Merged<'a, B: Iterator<Item = Result<(Vec<u8>, Entry)>>> {
    base: std::iter::Peekable<B>,
    over: std::iter::Peekable<std::collections::btree_map::Iter<'a, Vec<u8>, Option<Entry>>>,
}

impl<B: Iterator<Item = Result<(Vec<u8>, Entry)>>> Iterator for Merged<'_, B> {
    type Item = Result<(Vec<u8>, Entry)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let order = match (self.base.peek(), self.over.peek()) {
                (None, None) => return None,
                // An error is passed on as soon as it is met.
                (Some(Err(_)), _) | (Some(Ok(_)), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(Ok((b, _))), Some((o, _))) => b.as_slice().cmp(o.as_slice()),
            };
            if order == std::cmp::Ordering::Less {
                return self.base.next();
            }
            if order == std::cmp::Ordering::Equal {
                self.base.next();
            }
            let (k, v) = self.over.next()?;
            if let Some(e) = v {
                return Some(Ok((k.clone(), e.clone())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU8, Ordering};

    use crate::chunk::{self, ChunkId};
    use crate::dataset::{Dataset, Options};
    use crate::keys::DatasetKey;
    use crate::ops::{ChunkRef, Entry, Node, Op};

    /// The step of an install after which it fails as if the process died
    /// (0: none).
    static CRASH_AT: AtomicU8 = AtomicU8::new(0);

    pub(super) fn crash_point(step: u8) -> std::result::Result<(), String> {
        if CRASH_AT.load(Ordering::SeqCst) == step {
            return Err(format!("stopped after step {step} (test)"));
        }
        Ok(())
    }

    fn file(ds: &Dataset, data: &[u8]) -> (Entry, chunk::SealedChunk) {
        let id = ChunkId::of(ds.keys(), data);
        let e = Entry {
            node: Node::File {
                chunks: vec![ChunkRef {
                    id,
                    len: data.len() as u32,
                }],
            },
            mode: 0o644,
            mtime_ns: 1,
            size: data.len() as u64,
            ext: None,
        };
        (e, chunk::seal(ds.keys(), id, data))
    }

    fn fill(ds: &Dataset, files: &[(&str, &str)]) {
        let mut ops = Vec::new();
        let mut sealed = Vec::new();
        for (p, data) in files {
            let (e, c) = file(ds, data.as_bytes());
            ops.push(Op::Put {
                path: p.as_bytes().to_vec(),
                entry: e,
            });
            sealed.push(c);
        }
        ds.submit(ops, sealed).unwrap();
    }

    fn open(dir: &std::path::Path, key: &DatasetKey) -> Dataset {
        Dataset::open(
            dir,
            "t",
            key,
            Options {
                create: true,
                release_pins: false,
                ..Options::default()
            },
        )
        .unwrap()
    }

    /// A transfer is received in parts into a copy that holds a namespace
    /// of its own, and installed a batch at a time; an install stopped
    /// after any step (as by a crash) is finished when the copy is opened
    /// again, and leaves exactly the upstream's namespace, digest and
    /// chunks: the follower's own files gone, their chunks deleted, shared
    /// chunks kept.
    #[test]
    fn a_staged_transfer_installs_in_batches_and_a_crash_part_way_is_finished_at_open() {
        let tmp = tempfile::tempdir().unwrap();
        let key = DatasetKey::generate();
        let up = open(&tmp.path().join("up"), &key);
        fill(&up, &[("a", "alpha"), ("b", "shared"), ("c/d", "delta")]);
        fill(&up, &[("e", "epsilon"), ("b2", "shared")]);
        let applied = up.state().applied().unwrap();
        let entries = up.state().with_snapshot(|s| s.entries()).unwrap();
        for step in [0u8, 1, 2] {
            let dir = tmp.path().join(format!("down-{step}"));
            let down = open(&dir, &key);
            fill(
                &down,
                &[("a", "old alpha"), ("b", "shared"), ("zz", "only here")],
            );
            let only_here = ChunkId::of(down.keys(), b"only here");
            down.clear_transfer().unwrap();
            // Left by an earlier transfer cut short: dropped by the clear.
            down.stage_transfer(&[(b"stale".to_vec(), file(&down, b"x").0)])
                .unwrap();
            down.clear_transfer().unwrap();
            for part in entries.chunks(2) {
                down.stage_transfer(part).unwrap();
            }
            let missing: Vec<chunk::SealedChunk> = entries
                .iter()
                .flat_map(|(_, e)| e.chunks().to_vec())
                .filter(|c| !down.has_chunk(&c.id).unwrap())
                .map(|c| chunk::SealedChunk {
                    id: c.id,
                    plain_len: c.len,
                    sealed: up.state().chunk_bytes(&c.id).unwrap().unwrap(),
                })
                .collect();
            down.stage_chunks(&missing).unwrap();
            CRASH_AT.store(step, Ordering::SeqCst);
            let res = down.install_staged(applied.clone(), Vec::new());
            CRASH_AT.store(0, Ordering::SeqCst);
            let down = if step == 0 {
                res.unwrap();
                down
            } else {
                let err = res.unwrap_err().to_string();
                assert!(err.contains("half way"), "{err}");
                drop(down);
                let down = open(&dir, &key);
                assert!(!down.state().install_pending().unwrap());
                down
            };
            let got = down.state().with_snapshot(|s| s.entries()).unwrap();
            assert_eq!(got, entries, "step {step}");
            assert_eq!(down.state().applied().unwrap(), applied, "step {step}");
            assert_eq!(down.head_seq(), applied.seq);
            assert!(!down.has_chunk(&only_here).unwrap(), "step {step}");
            let shared = ChunkId::of(down.keys(), b"shared");
            assert_eq!(
                down.state().chunk_meta(&shared).unwrap().unwrap().refs,
                2,
                "step {step}"
            );
            assert!(down.state().transfer_iter().unwrap().next().is_none());
            // The copy goes on from there.
            fill(&down, &[("f", "after")]);
            assert_eq!(down.head_seq(), applied.seq + 1);
            down.close().unwrap();
        }
        up.close().unwrap();
    }
}
