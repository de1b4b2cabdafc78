//! Scrubs: re-reading every stored chunk to find silent damage before a
//! restore needs the bytes.
//!
//! - [`local`]: the site's own copy, through a read-only [`View`] (so it runs
//!   beside the daemon), with memory that does not grow with it: every
//!   chunk the namespace or a pin references is read once, its sealed-bytes BLAKE3 compared with the recorded one, its
//!   SM4-GCM tag and plaintext id checked; the namespace digest is recomputed
//!   from scratch and compared with the running one. A rate limit keeps it
//!   from starving replication of disk and CPU.
//! - [`archive`]: the site's object store: every kept snapshot's and log
//!   piece's chunks must be stored (in a pack or as an object of their own)
//!   with a plausible size; with `read` (all or a sampled percentage) their
//!   bytes are fetched and checked the same way.
//!
//! Scrubs only report; `triad verify --repair` (daemon/src/cmd/repair.rs)
//! fetches good bytes for what they find.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use archive::objects::{self, PieceRef, SnapshotRef};
use archive::packs::{Fetched, Located, Want};
use archive::Store;
use futures::stream::StreamExt;
use rayon::prelude::*;
use serde::Serialize;
use vault::lthash::LtHash;
use vault::{ChunkId, Keys, View};

/// A chunk that failed a check, and who references it.
#[derive(Debug, Clone, Serialize)]
pub struct BadChunk {
    pub id: String,
    pub reason: String,
    /// Paths whose content includes it (local scrub), or the objects that
    /// reference it (archive scrub).
    pub referenced_by: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LocalScrub {
    pub dataset: String,
    pub seq: u64,
    pub chunks: u64,
    pub bytes: u64,
    pub bad: Vec<BadChunk>,
    pub running_digest: String,
    pub recomputed_digest: String,
    pub seconds: f64,
    pub mb_per_s: f64,
}

impl LocalScrub {
    pub fn ok(&self) -> bool {
        self.bad.is_empty() && self.running_digest == self.recomputed_digest
    }
}

/// Sleeps as needed to keep `done` bytes within `rate` bytes/s since `start`.
fn pace(start: Instant, done: u64, rate: Option<u64>) {
    if let Some(r) = rate.filter(|r| *r > 0) {
        let due = Duration::from_secs_f64(done as f64 / r as f64);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

/// Scrubs the site's copy of a dataset as `view` sees it.
///
/// Nothing in it grows with the dataset but what it finds: the namespace is
/// read a batch at a time (its digest recomputed, every chunk it names
/// looked up), then every stored chunk that something references (its
/// reference count, the namespace's and the pins', is above zero) is read
/// once and checked, and finally, only when some failed, the namespace is
/// read again to name the paths that use them.
pub fn local(
    dataset: &str,
    view: &View,
    max_rate: Option<u64>,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> vault::Result<LocalScrub> {
    const BATCH: usize = 20_000;
    let started = Instant::now();
    let keys: &Keys = view.keys();
    let mut recomputed = LtHash::default();
    let bad = Mutex::new(Vec::new());
    let fail = |id: &ChunkId, reason: String, referenced_by: Vec<String>| {
        if let Ok(mut b) = bad.lock() {
            b.push(BadChunk {
                id: id.to_string(),
                reason,
                referenced_by,
            });
        }
    };
    // The namespace: its digest, and every chunk it names must be stored.
    for batch in vault::ops::batches(view.entries_iter()?, BATCH) {
        let batch = batch?;
        recomputed.add(&vault::ops::digest_of(keys, &batch));
        let mut users: HashMap<ChunkId, Vec<String>> = HashMap::new();
        for (path, e) in &batch {
            for c in e.chunks() {
                let u = users.entry(c.id).or_default();
                if u.len() < 5 {
                    u.push(String::from_utf8_lossy(path).into_owned());
                }
            }
        }
        for (id, paths) in users {
            match view.chunk_meta(&id) {
                Ok(Some(_)) => {}
                Ok(None) => fail(&id, "referenced but not stored".into(), paths),
                Err(e) => fail(&id, format!("its metadata cannot be read: {e}"), paths),
            }
        }
    }
    // Every referenced chunk, once. A chunk that cannot be read (RocksDB's
    // own checksum, an I/O error) is a finding about that chunk, not the
    // end of the scrub.
    let total = view
        .chunk_metas_iter()?
        .filter(|m| m.as_ref().map_or(true, |(_, m)| m.refs > 0))
        .count() as u64;
    let (done, bytes) = (AtomicU64::new(0), AtomicU64::new(0));
    let metas = view
        .chunk_metas_iter()?
        .filter(|m| m.as_ref().map_or(true, |(_, m)| m.refs > 0));
    for batch in vault::ops::batches(metas, BATCH) {
        let batch = batch?;
        batch.par_iter().for_each(|(id, meta)| {
            let sealed = match view.chunk_bytes(id) {
                Ok(Some(b)) => b,
                Ok(None) => {
                    fail(
                        id,
                        "its metadata is stored but its bytes are not".into(),
                        Vec::new(),
                    );
                    return;
                }
                Err(e) => {
                    fail(id, format!("its bytes cannot be read: {e}"), Vec::new());
                    return;
                }
            };
            let n = bytes.fetch_add(sealed.len() as u64, Ordering::Relaxed) + sealed.len() as u64;
            if sealed.len() != meta.sealed_len as usize
                || *blake3::hash(&sealed).as_bytes() != meta.sealed_hash
            {
                fail(
                    id,
                    format!(
                        "the sealed bytes ({} bytes) do not hash as recorded ({} bytes)",
                        sealed.len(),
                        meta.sealed_len
                    ),
                    Vec::new(),
                );
            } else if let Err(e) = vault::chunk::open(keys, id, meta.plain_len, &sealed) {
                fail(id, e.to_string(), Vec::new());
            }
            let d = done.fetch_add(1, Ordering::Relaxed) + 1;
            progress(d, total);
            pace(started, n, max_rate);
        });
    }
    let mut bad = bad.into_inner().unwrap_or_default();
    // Who uses what failed: up to five paths each, read again only now.
    let wanted: HashSet<String> = bad
        .iter()
        .filter(|b| b.referenced_by.is_empty())
        .map(|b| b.id.clone())
        .collect();
    if !wanted.is_empty() {
        let mut users: HashMap<String, Vec<String>> = HashMap::new();
        for item in view.entries_iter()? {
            let (path, e) = item?;
            for c in e.chunks() {
                let id = c.id.to_string();
                if wanted.contains(&id) {
                    let u = users.entry(id).or_default();
                    if u.len() < 5 {
                        u.push(String::from_utf8_lossy(&path).into_owned());
                    }
                }
            }
        }
        for b in bad.iter_mut().filter(|b| b.referenced_by.is_empty()) {
            b.referenced_by = users.remove(&b.id).unwrap_or_default();
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let bytes = bytes.load(Ordering::Relaxed);
    bad.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(LocalScrub {
        dataset: dataset.to_string(),
        seq: view.applied().seq,
        chunks: total,
        bytes,
        bad,
        running_digest: hex(&view.applied().digest.summary()),
        recomputed_digest: hex(&recomputed.summary()),
        seconds,
        mb_per_s: bytes as f64 / 1e6 / seconds.max(1e-9),
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// How much of the archive's chunk data an archive scrub reads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ReadData {
    /// Only check that every referenced chunk is listed.
    None,
    All,
    /// About this percentage of the referenced chunks, chosen by id.
    Percent(f64),
}

#[derive(Debug, Clone, Serialize)]
pub struct ArchiveScrub {
    pub dataset: String,
    pub archive: String,
    pub snapshots: usize,
    pub log_pieces: usize,
    pub chunks_listed: usize,
    pub chunks_referenced: usize,
    pub chunks_read: u64,
    pub bytes_read: u64,
    /// Objects that are missing, damaged or do not read back.
    pub bad: Vec<BadChunk>,
    pub seconds: f64,
    pub mb_per_s: f64,
}

impl ArchiveScrub {
    pub fn ok(&self) -> bool {
        self.bad.is_empty()
    }
}

/// What the archive says a chunk must be.
struct Expect {
    plain_len: u32,
    sealed_hash: [u8; 32],
    sealed_len: Option<u32>,
    referenced_by: Vec<String>,
}

/// Records that `by` references chunk `id`, and what the archive says it must
/// be. The first reference fixes the plaintext length and sealed hash; a
/// later one that knows the sealed length (a log piece's attachment) fills
/// it in if no earlier one did. Only the first three referrers are kept, to
/// name in a finding.
fn note_reference(
    expect: &mut HashMap<ChunkId, Expect>,
    id: ChunkId,
    plain_len: u32,
    hash: [u8; 32],
    len: Option<u32>,
    by: String,
) {
    let e = expect.entry(id).or_insert_with(|| Expect {
        plain_len,
        sealed_hash: hash,
        sealed_len: len,
        referenced_by: Vec::new(),
    });
    if e.sealed_len.is_none() {
        e.sealed_len = len;
    }
    if e.referenced_by.len() < 3 {
        e.referenced_by.push(by);
    }
}

/// Lists the dataset's kept snapshots and reads each one (manifest and
/// pages), noting every chunk its entries and pins reference. A snapshot
/// that cannot be read is a finding, not the end of the scrub; only a
/// failure to list them is an error. Returns the snapshots listed.
fn expect_from_snapshots(
    rt: &tokio::runtime::Handle,
    store: &Store,
    keys: &Keys,
    dataset: &str,
    concurrency: usize,
    expect: &mut HashMap<ChunkId, Expect>,
    bad: &mut Vec<BadChunk>,
) -> archive::Result<Vec<SnapshotRef>> {
    let snaps = archive::archiver::list_snapshots(rt, store, dataset)?;
    for s in &snaps {
        match archive::archiver::read_snapshot(rt, store, keys, dataset, s, concurrency) {
            Ok(c) => {
                let by = format!("snapshot {}", s.name);
                for (_, e) in &c.entries {
                    for r in e.chunks() {
                        if let Some(h) = c.sealed_hashes.get(&r.id) {
                            note_reference(expect, r.id, r.len, *h, None, by.clone());
                        }
                    }
                }
                for (id, _, len, h) in &c.manifest.pins {
                    note_reference(expect, *id, *len, *h, None, by.clone());
                }
            }
            Err(e) => bad.push(BadChunk {
                id: String::new(),
                reason: e.to_string(),
                referenced_by: vec![format!("snapshot {}", s.name)],
            }),
        }
    }
    Ok(snaps)
}

/// Lists the dataset's log pieces and reads each one, noting every chunk
/// its records attach (with the sealed length the piece records). A piece
/// that cannot be read is a finding; only a failure to list them is an
/// error. Returns the pieces listed.
fn expect_from_log_pieces(
    rt: &tokio::runtime::Handle,
    store: &Store,
    dataset: &str,
    expect: &mut HashMap<ChunkId, Expect>,
    bad: &mut Vec<BadChunk>,
) -> archive::Result<Vec<PieceRef>> {
    let pieces: Vec<PieceRef> = rt
        .block_on(store.list(&objects::log_prefix(dataset)))?
        .iter()
        .filter_map(|l| PieceRef::parse(&l.key))
        .collect();
    for p in &pieces {
        let decoded = archive::archiver::read_piece(rt, store, &p.key, "a log piece");
        match decoded {
            Ok(piece) => {
                for r in &piece.records {
                    for (id, plain, sealed, h) in &r.attachments {
                        note_reference(
                            expect,
                            *id,
                            *plain,
                            *h,
                            Some(*sealed),
                            store.locate(&p.key),
                        );
                    }
                }
            }
            Err(e) => bad.push(BadChunk {
                id: String::new(),
                reason: e.to_string(),
                referenced_by: vec![store.locate(&p.key)],
            }),
        }
    }
    Ok(pieces)
}

/// Checks every referenced chunk against where the archive holds it: a
/// chunk in no pack and no object of its own, or stored with a length other
/// than the recorded sealed length, is a finding. Needs no chunk reads, so
/// it runs whatever `read` says. A pack whose index does not read back is a
/// finding of its own.
fn check_located(
    store: &Store,
    dataset: &str,
    expect: &HashMap<ChunkId, Expect>,
    located: &Located,
    bad: &mut Vec<BadChunk>,
) {
    for d in &located.damaged {
        bad.push(BadChunk {
            id: String::new(),
            reason: d.why.clone(),
            referenced_by: Vec::new(),
        });
    }
    for (id, e) in expect {
        match located.stored_len(id) {
            None => bad.push(BadChunk {
                id: id.to_string(),
                reason: format!(
                    "{} is missing: {}",
                    located.describe(store, dataset, id),
                    located.absent_reason()
                ),
                referenced_by: e.referenced_by.clone(),
            }),
            Some(size) if e.sealed_len.is_some_and(|l| u64::from(l) != size) => {
                bad.push(BadChunk {
                    id: id.to_string(),
                    reason: format!(
                        "{} is {size} bytes, recorded {}",
                        located.describe(store, dataset, id),
                        e.sealed_len.unwrap_or(0)
                    ),
                    referenced_by: e.referenced_by.clone(),
                })
            }
            Some(_) => {}
        }
    }
}

/// Picks the referenced chunks whose bytes are to be read: only stored ones
/// not already found bad (reading them would only repeat the finding), and
/// of those all, none or a sample as `read` says.
fn choose_for_reading<'a>(
    expect: &'a HashMap<ChunkId, Expect>,
    located: &Located,
    bad: &[BadChunk],
    read: ReadData,
) -> Vec<(&'a ChunkId, &'a Expect)> {
    let missing: HashSet<String> = bad.iter().map(|b| b.id.clone()).collect();
    expect
        .iter()
        .filter(|(id, _)| located.contains(id) && !missing.contains(&id.to_string()))
        .filter(|(id, _)| match read {
            ReadData::None => false,
            ReadData::All => true,
            // The id is a keyed hash: its first bytes are uniform.
            ReadData::Percent(p) => {
                (u16::from_le_bytes([id.0[0], id.0[1]]) as f64) < p / 100.0 * 65536.0
            }
        })
        .collect()
}

/// Opens a chunk's fetched sealed bytes (their BLAKE3 was checked on
/// arrival): they must open under the dataset's keys to plaintext with the
/// chunk's id. Returns the number of bytes checked.
fn check_sealed_chunk(keys: &Keys, c: &vault::SealedChunk) -> Result<u64, String> {
    vault::chunk::open(keys, &c.id, c.plain_len, &c.sealed)
        .map(|_| c.sealed.len() as u64)
        .map_err(|e| e.to_string())
}

/// Fetches the chosen chunks (pack ranges merged, chunk objects
/// `concurrency` at a time), checks each one's hash on arrival and opens
/// it on a blocking thread. Returns, per chunk, the bytes read or where it
/// failed and why (a fetch error, a bad hash, or a failure to open).
fn read_chunks(
    rt: &tokio::runtime::Handle,
    store: &Store,
    keys: &Keys,
    dataset: &str,
    located: &Located,
    chosen: &[(&ChunkId, &Expect)],
    concurrency: usize,
) -> Vec<(ChunkId, Result<u64, String>)> {
    let want = chosen
        .iter()
        .map(|(id, e)| Want {
            id: **id,
            plain_len: e.plain_len,
            hash: e.sealed_hash,
        })
        .collect();
    rt.block_on(
        located
            .fetch(store, dataset, want, concurrency)
            .map(|f| {
                let keys = keys.clone();
                async move {
                    match f {
                        Fetched::Good(c) => {
                            let id = c.id;
                            let at = located.describe(store, dataset, &id);
                            let r =
                                tokio::task::spawn_blocking(move || check_sealed_chunk(&keys, &c))
                                    .await
                                    .unwrap_or_else(|e| Err(e.to_string()))
                                    .map_err(|e| format!("{at}: {e}"));
                            (id, r)
                        }
                        Fetched::Bad { id, at, reason, .. } => (id, Err(format!("{at}: {reason}"))),
                    }
                }
            })
            .buffer_unordered(4)
            .collect(),
    )
}

/// Counts the chunks and bytes that read back good, and turns each failed
/// read into a finding naming where it is and who references it. Returns
/// `(chunks_read, bytes_read)`.
fn tally_reads(
    expect: &HashMap<ChunkId, Expect>,
    results: Vec<(ChunkId, Result<u64, String>)>,
    bad: &mut Vec<BadChunk>,
) -> (u64, u64) {
    let (mut chunks_read, mut bytes_read) = (0u64, 0u64);
    for (id, r) in results {
        match r {
            Ok(n) => {
                chunks_read += 1;
                bytes_read += n;
            }
            Err(reason) => bad.push(BadChunk {
                id: id.to_string(),
                reason,
                referenced_by: expect
                    .get(&id)
                    .map(|e| e.referenced_by.clone())
                    .unwrap_or_default(),
            }),
        }
    }
    (chunks_read, bytes_read)
}

/// Scrubs a dataset's archive: manifests, pages and pieces are read and
/// checked; every chunk they reference must be listed; with `read`, chunk
/// bytes are fetched and checked against the recorded hash and their id.
/// It holds a lease meanwhile, so that no prune removes what it reads
/// (which it would report as missing).
pub fn archive(
    rt: &tokio::runtime::Handle,
    store: &Store,
    keys: &Keys,
    dataset: &str,
    read: ReadData,
    concurrency: usize,
) -> archive::Result<ArchiveScrub> {
    std::thread::scope(|scope| {
        let mut warnings = Vec::new();
        let _lease =
            archive::lease::take_reader(scope, rt, store, dataset, "scrub", &mut warnings)?;
        for w in warnings {
            tracing::warn!(dataset, "{w}");
        }
        let started = Instant::now();
        let mut bad = Vec::new();
        let mut expect: HashMap<ChunkId, Expect> = HashMap::new();
        let snaps =
            expect_from_snapshots(rt, store, keys, dataset, concurrency, &mut expect, &mut bad)?;
        let pieces = expect_from_log_pieces(rt, store, dataset, &mut expect, &mut bad)?;
        let located = rt.block_on(Located::load(store, keys, dataset, concurrency))?;
        check_located(store, dataset, &expect, &located, &mut bad);
        let chosen = choose_for_reading(&expect, &located, &bad, read);
        let results = read_chunks(rt, store, keys, dataset, &located, &chosen, concurrency);
        let (chunks_read, bytes_read) = tally_reads(&expect, results, &mut bad);
        let seconds = started.elapsed().as_secs_f64();
        Ok(ArchiveScrub {
            dataset: dataset.to_string(),
            archive: store.url().to_string(),
            snapshots: snaps.len(),
            log_pieces: pieces.len(),
            chunks_listed: located.ids().count(),
            chunks_referenced: expect.len(),
            chunks_read,
            bytes_read,
            bad,
            seconds,
            mb_per_s: bytes_read as f64 / 1e6 / seconds.max(1e-9),
        })
    })
}
