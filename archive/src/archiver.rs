//! A site's archive of one dataset: shipping the change log, taking
//! snapshots, applying retention and pruning.
//!
//! The methods block (they run on the daemon's archive threads or in the
//! CLI) and drive the object store on a tokio runtime handle. Log shipping
//! and snapshots may run at the same time from two threads; snapshots and
//! prunes are serialized by `jobs`, so a prune never deletes a chunk that a
//! running snapshot decided not to upload because the index had it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Datelike, TimeZone, Timelike, Utc};
use futures::stream::{self, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;
use vault::record::Hash;
use vault::signing::EvidenceSigner;
use vault::wal::Tail;
use vault::{ChunkId, Dataset, SealedChunk, VaultError};

use crate::error::{ArchiveError, Result};
use crate::index::Index;
use crate::objects::{self, Manifest, Namespace, PageRef, PieceRecord, PieceRef, SnapshotRef};
use crate::packs::{self, Located};
use crate::store::{Listed, Store};

/// Most bytes of log records in one piece.
const PIECE_BYTES: usize = 64 << 20;
/// Most bytes of chunks read from the state and in flight at once.
const UPLOAD_BATCH_BYTES: usize = 64 << 20;

/// A chunk the namespace names that the state does not hold.
fn missing_chunk(st: &vault::state::State, id: &ChunkId) -> ArchiveError {
    ArchiveError::Vault(VaultError::StateCorrupt {
        path: st.path().to_path_buf(),
        reason: format!("chunk {} is referenced but not stored", id.short()),
    })
}

/// A snapshot's chunk uploads: the batch being gathered (its ids, so a
/// chunk named twice before the batch goes is taken once) and the totals.
#[derive(Default)]
struct Uploads {
    batch: Vec<SealedChunk>,
    batch_bytes: usize,
    queued: HashSet<ChunkId>,
    chunks: u64,
    bytes: u64,
}

/// How many snapshots to keep, like `restic forget`: the newest `last`, and
/// the newest in each of the newest `hourly` hours, `daily` days, `weekly`
/// ISO weeks and `monthly` months (UTC) that have one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionPolicy {
    #[serde(default)]
    pub last: usize,
    #[serde(default)]
    pub hourly: usize,
    #[serde(default)]
    pub daily: usize,
    #[serde(default)]
    pub weekly: usize,
    #[serde(default)]
    pub monthly: usize,
}

impl RetentionPolicy {
    pub fn keeps_everything(&self) -> bool {
        *self == RetentionPolicy::default()
    }

    /// Which of `snaps` to keep.
    pub fn select(&self, snaps: &[SnapshotRef]) -> HashSet<String> {
        if self.keeps_everything() {
            return snaps.iter().map(|s| s.name.clone()).collect();
        }
        let mut newest_first: Vec<&SnapshotRef> = snaps.iter().collect();
        newest_first.sort_by_key(|s| std::cmp::Reverse((s.taken_ms, s.seq)));
        let mut keep = HashSet::new();
        for s in newest_first.iter().take(self.last) {
            keep.insert(s.name.clone());
        }
        type Bucket = fn(&DateTime<Utc>) -> (i32, u32, u32, u32);
        let rules: [(usize, Bucket); 4] = [
            (self.hourly, |t| (t.year(), t.ordinal(), t.hour(), 0)),
            (self.daily, |t| (t.year(), t.ordinal(), 0, 0)),
            (self.weekly, |t| {
                let w = t.iso_week();
                (w.year(), w.week(), 0, 0)
            }),
            (self.monthly, |t| (t.year(), t.month(), 0, 0)),
        ];
        for (n, bucket) in rules {
            let mut seen = HashSet::new();
            for s in &newest_first {
                if seen.len() >= n {
                    break;
                }
                let t = Utc
                    .timestamp_millis_opt(s.taken_ms)
                    .single()
                    .unwrap_or_default();
                if seen.insert(bucket(&t)) {
                    keep.insert(s.name.clone());
                }
            }
        }
        keep
    }
}

/// The snapshots that `keep` lacks but a restore needs because the
/// archived log has gaps (`snaps` and `pieces` those of this site's
/// history: see [`SnapshotRef::follows`] and [`PieceRef::follow`]) (a state transfer replaced the log, or
/// `site.log_retention_max` removed segments before they were shipped):
/// for each gap after the oldest kept snapshot, the oldest snapshot from
/// which the log after the gap replays (its seq at most one before the
/// gap's end, so its next record is archived), unless one at that seq is
/// kept anyway.
pub fn bridging_snapshots(
    snaps: &[SnapshotRef],
    pieces: &[PieceRef],
    keep: &HashSet<String>,
) -> Vec<String> {
    let Some(mut reach) = snaps
        .iter()
        .filter(|s| keep.contains(&s.name))
        .map(|s| s.seq)
        .min()
    else {
        return Vec::new();
    };
    let mut by_seq: Vec<&SnapshotRef> = snaps.iter().collect();
    by_seq.sort_by_key(|s| (s.seq, s.taken_ms));
    // Unbroken runs of archived records, from the pieces a restore takes.
    let mut ranges: Vec<(u64, u64)> = pieces.iter().map(|p| (p.first, p.upto)).collect();
    ranges.sort_unstable();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (first, last) in ranges {
        match runs.last_mut() {
            Some(run) if first <= run.1.saturating_add(1) => run.1 = run.1.max(last),
            _ => runs.push((first, last)),
        }
    }
    let mut out: Vec<String> = Vec::new();
    for (first, last) in runs {
        if last <= reach {
            continue;
        }
        // Snapshot seqs come from object names: one may claim u64::MAX.
        if first > reach.saturating_add(1) {
            // Records reach+1 .. first-1 are not archived: this run replays
            // only from a snapshot at first-1 or later within it, and the
            // oldest such one restores the most of it.
            let within = |s: &&&SnapshotRef| s.seq.saturating_add(1) >= first && s.seq <= last;
            if let Some(b) = by_seq.iter().find(within) {
                let kept = by_seq
                    .iter()
                    .any(|s| s.seq == b.seq && (keep.contains(&s.name) || out.contains(&s.name)));
                if !kept {
                    out.push(b.name.clone());
                }
            }
        }
        reach = last;
    }
    out
}

/// What a snapshot did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SnapshotReport {
    pub name: String,
    pub seq: u64,
    pub entries: u64,
    pub bytes: u64,
    pub chunks: u64,
    pub chunks_uploaded: u64,
    pub bytes_uploaded: u64,
    pub seconds: f64,
}

/// What a prune did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PruneReport {
    pub snapshots_kept: usize,
    pub snapshots_deleted: Vec<String>,
    pub chunks_live: usize,
    pub chunks_marked: usize,
    pub chunks_deleted: usize,
    pub chunks_waiting: usize,
    /// Referenced chunks not in the store (removed outside triad).
    pub chunks_missing: usize,
    pub log_pieces_deleted: usize,
    pub orphan_objects_deleted: usize,
    /// Snapshots retention dropped but kept because the archived log has a
    /// gap before them: each is the oldest from which the log after a gap
    /// replays, so without it those points could not be restored.
    #[serde(default)]
    pub snapshots_bridging: Vec<String>,
    /// Snapshots retention dropped but kept whole because their manifest is
    /// still under Object Lock.
    #[serde(default)]
    pub snapshots_held: Vec<String>,
    /// Chunks, log pieces and pages prune would delete but left because
    /// they are still under Object Lock; a later prune takes them.
    #[serde(default)]
    pub objects_held: usize,
    /// Packs deleted because none of their chunks is referenced.
    #[serde(default)]
    pub packs_deleted: usize,
    /// Bytes of unreferenced chunks inside packs still partly in use: kept
    /// until a repack (not built yet) rewrites those packs.
    #[serde(default)]
    pub pack_bytes_unreferenced: u64,
    /// Packs whose index does not read back, with why.
    #[serde(default)]
    pub packs_damaged: Vec<String>,
    /// Where damaged packs nothing needed any more were copied before
    /// they were deleted.
    #[serde(default)]
    pub packs_set_aside: Vec<String>,
    /// Restores, drills and scrubs that were reading the archive: while
    /// any is, prune deletes nothing (`archive/src/lease.rs`).
    #[serde(default)]
    pub deferred_for: Vec<crate::lease::Holder>,
}

/// Chunks found unreferenced, with when: deleted by a prune that finds them
/// still unreferenced after the grace period.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Pending {
    /// Chunk id (hex), or a pack's key, -> Unix ms first found unreferenced.
    since_ms: BTreeMap<String, i64>,
}

/// One dataset's archive at this site.
pub struct Archiver {
    store: Arc<Store>,
    rt: Handle,
    ds: Arc<Dataset>,
    site: String,
    index: Index,
    /// Last archived (seq, chain hash).
    shipped: Mutex<Option<(u64, Hash)>>,
    /// The epoch of the last archived record (0: unknown, from a name
    /// written before epochs were named).
    shipped_epoch: std::sync::atomic::AtomicU64,
    /// (epoch, seq) of the last head written (see [`objects::Head`]).
    head_written: Mutex<(u64, u64)>,
    /// Held while shipping, and by prune: a piece's chunks are uploaded (or
    /// skipped because the index has them) before the piece exists, and
    /// prune must not judge them unreferenced in between.
    ship: Mutex<()>,
    jobs: Mutex<()>,
    /// Held while chunks are checked against the index and uploaded: the
    /// shipper and a snapshot run at once, and without it both uploaded
    /// the chunks neither found in the index, into two packs.
    uploading: Mutex<()>,
    concurrency: usize,
    /// New chunks go into packs of up to this many bytes; 0 writes one
    /// object per chunk, the layout before packs.
    pack_bytes: usize,
    /// The log reader of the last shipping pass: the next goes on from
    /// where it stopped (see [`Tail::reuse`]).
    tail: Mutex<Option<Tail>>,
    /// Packs uploaded since the last index file, for the next one (written
    /// at each snapshot and every [`packs::INDEX_FILE_CHUNKS`] chunks). Lost
    /// at a restart, which costs readers only those packs' own indexes.
    unindexed: Mutex<Vec<packs::IndexedPack>>,
    /// Signs each head written (formats.md 16.7), when the site has an
    /// `[evidence]` key.
    signer: Option<Arc<EvidenceSigner>>,
    /// The last snapshot this archiver wrote: its name, the state it shows
    /// (seq, chain hash) and the index's losses then. A snapshot of the
    /// same state reuses its pages (see [`Archiver::reuse_pages`]).
    last_snapshot: Mutex<Option<(String, u64, Hash, u64)>>,
}

impl Archiver {
    /// Opens the archive of `ds` at `site`: claims the dataset's prefix for
    /// this site (refusing one another site writes), fills the local index
    /// from the store if it is new, and finds how far the log was archived.
    pub fn open(
        store: Arc<Store>,
        rt: Handle,
        ds: Arc<Dataset>,
        site: &str,
        concurrency: usize,
    ) -> Result<Archiver> {
        let name = ds.name().to_string();
        // A bucket that cannot lock must not look protected.
        rt.block_on(store.check_object_lock())?;
        let owner_key = objects::owner_key(&name);
        let mut fresh = false;
        match rt.block_on(store.get(&owner_key, objects::MAX_SMALL_OBJECT_BYTES))? {
            Some(o) if o != site.as_bytes() => {
                return Err(ArchiveError::Config(format!(
                    "{}: dataset {name} there is archived by site {:?}, not this site {site:?}; \
                     give each site its own bucket or prefix",
                    store.url(),
                    String::from_utf8_lossy(&o)
                )))
            }
            Some(_) => {}
            None => {
                // A new (or emptied) prefix: whatever the index remembers is
                // not there.
                fresh = true;
                rt.block_on(store.put(&owner_key, site.as_bytes().to_vec()))?;
            }
        }
        let index = Index::open(&ds.dir().join("archive-index"))?;
        let a = Archiver {
            store,
            rt,
            ds,
            site: site.to_string(),
            index,
            shipped: Mutex::new(None),
            shipped_epoch: std::sync::atomic::AtomicU64::new(0),
            head_written: Mutex::new((0, 0)),
            ship: Mutex::new(()),
            jobs: Mutex::new(()),
            concurrency: concurrency.max(1),
            uploading: Mutex::new(()),
            pack_bytes: packs::PACK_BYTES,
            tail: Mutex::new(None),
            unindexed: Mutex::new(Vec::new()),
            signer: None,
            last_snapshot: Mutex::new(None),
        };
        if fresh || !a.index.filled_for(a.store.url())? {
            a.refill_index()?;
        }
        // The head never moves back, across restarts too.
        let head_key = objects::head_key(&name);
        if let Some(b) =
            a.rt.block_on(a.store.get(&head_key, objects::MAX_SMALL_OBJECT_BYTES))?
        {
            match objects::decode_head(a.ds.keys(), &head_key, &b) {
                Ok(h) => {
                    *a.head_written.lock().unwrap_or_else(|p| p.into_inner()) = (h.epoch, h.seq)
                }
                Err(e) => {
                    tracing::error!(dataset = %name, error = %e, "the archive's head does not open; it is written anew with the next piece")
                }
            }
        }
        // Where the archive's log ends: the newest piece, or, when prune
        // removed every piece, the newest snapshot. Only those of this
        // site's history count: a former primary's pieces and snapshots
        // past the fork point stay in the store, named by their epoch, and
        // the new history is archived beside them (see `rewind_past_fork`).
        let starts = a.ds.fence().starts;
        let mut pieces: Vec<PieceRef> = a
            .pieces()?
            .into_iter()
            .filter_map(|p| p.follow(&starts))
            .collect();
        pieces.sort_by_key(|p| p.upto);
        let newest_snap = a.snapshots()?.into_iter().rfind(|s| s.follows(&starts));
        let piece_end = match pieces.last() {
            // A piece cut short by the history ends where the next epoch
            // began; the chain hash there is this site's own.
            Some(last) if last.upto < last.last => {
                a.ds.chain_hash_at(last.upto)?.map(|h| (last.upto, h))
            }
            Some(last) => {
                let piece = read_piece(&a.rt, &a.store, &last.key, "the newest log piece")?;
                Some((last.last, piece.end_hash))
            }
            None => None,
        };
        // Only without pieces: records between the newest piece and a newer
        // snapshot must still be shipped, or points between them are lost.
        let snap_end = match &newest_snap {
            Some(s) if piece_end.is_none() => {
                let keys = a.ds.keys().clone();
                let m = read_manifest(&a.rt, &a.store, &keys, &name, s)?;
                Some((m.seq, m.chain_hash))
            }
            _ => None,
        };
        let end_epoch = match (&piece_end, pieces.last()) {
            (Some(_), Some(p)) => p.epoch,
            _ => newest_snap.as_ref().and_then(|s| s.epoch),
        };
        a.shipped_epoch
            .store(end_epoch.unwrap_or(0), Ordering::Release);
        *a.lock_shipped() = piece_end.or(snap_end);
        Ok(a)
    }

    /// Sets the pack size for new chunks (`archive.pack_size`); 0 keeps one
    /// object per chunk.
    pub fn with_pack_bytes(mut self, bytes: usize) -> Archiver {
        self.pack_bytes = bytes.min(packs::PACK_BYTES);
        self
    }

    /// Heads written from now on carry an SM2 signature by `signer`.
    pub fn with_signer(mut self, signer: Option<Arc<EvidenceSigner>>) -> Archiver {
        self.signer = signer;
        self
    }

    pub fn dataset(&self) -> &Dataset {
        &self.ds
    }

    #[cfg(test)]
    pub(crate) fn index_for_tests(&self) -> &Index {
        &self.index
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Records `seq` as the archive's newest point, once it is in the store
    /// (never moving the head back).
    fn write_head(&self, seq: u64, chain_hash: Hash, time_ns: i64) -> Result<()> {
        let fence = self.ds.fence();
        let epoch = fence.epoch_of(seq);
        let mut written = self.head_written.lock().unwrap_or_else(|p| p.into_inner());
        // A newer epoch moves the head even to a lower seq: the former
        // primary's records past the fork point are not this history.
        if (epoch, seq) <= *written {
            return Ok(());
        }
        let key = objects::head_key(self.ds.name());
        let head = objects::Head {
            version: objects::HEAD_VERSION,
            dataset: self.ds.name().to_string(),
            site: self.site.clone(),
            seq,
            chain_hash,
            time_ns,
            written_ns: vault::dataset::now_ns(),
            epoch,
            starts: fence
                .starts
                .iter()
                .copied()
                .filter(|(_, first)| *first <= seq)
                .collect(),
        };
        let mut bytes = objects::encode_head(self.ds.keys(), &key, &head)?;
        if let Some(signer) = &self.signer {
            bytes = signer
                .append_signature(&bytes, &objects::head_statement(&key, &head))
                .map_err(|e| ArchiveError::Config(format!("signing {key}: {e}")))?;
        }
        self.rt.block_on(self.store.put(&key, bytes))?;
        *written = (epoch, seq);
        Ok(())
    }

    /// When the archive's log went past a fork point of this site's history
    /// (this site was a primary that was replaced, and rejoined), shipping
    /// goes back to the fork: the new history's pieces are named by their
    /// epoch beside the former ones, which stay in the store as evidence
    /// and which a restore passes over (the head names the history).
    /// Returns false when the local log no longer holds the fork point's
    /// record (a snapshot bridges to the new history then).
    fn rewind_past_fork(&self, shipped: (u64, Hash)) -> Result<bool> {
        let fence = self.ds.fence();
        let epoch = self.shipped_epoch.load(Ordering::Acquire);
        if epoch == 0 || fence.epoch_of(shipped.0) == epoch {
            return Ok(true);
        }
        let Some(fork) = objects::epoch_end(&fence.starts, epoch) else {
            return Ok(true);
        };
        match self.ds.chain_hash_at(fork)? {
            Some(h) if fork < shipped.0 => {
                tracing::warn!(
                    dataset = self.ds.name(),
                    archived_to = shipped.0,
                    archived_epoch = epoch,
                    fork_after = fork,
                    "the archive holds records of a former primary past the fork point; they stay there as evidence and the new history is archived from the fork on"
                );
                *self.lock_shipped() = Some((fork, h));
                self.shipped_epoch
                    .store(fence.epoch_of(fork), Ordering::Release);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn lock_shipped(&self) -> std::sync::MutexGuard<'_, Option<(u64, Hash)>> {
        self.shipped.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Highest seq whose record is in the archive (0: none).
    pub fn shipped_seq(&self) -> u64 {
        self.lock_shipped().map(|(s, _)| s).unwrap_or(0)
    }

    fn refill_index(&self) -> Result<()> {
        let located = self.rt.block_on(Located::load(
            &self.store,
            self.ds.keys(),
            self.ds.name(),
            self.concurrency,
        ))?;
        let ids: Vec<ChunkId> = located.ids().copied().collect();
        self.index.clear()?;
        self.index.add(&ids)?;
        self.index.set_filled_for(self.store.url())?;
        tracing::info!(
            dataset = self.ds.name(),
            chunks = ids.len(),
            "archive index filled from the store"
        );
        Ok(())
    }

    pub fn pieces(&self) -> Result<Vec<PieceRef>> {
        let listed = self
            .rt
            .block_on(self.store.list(&objects::log_prefix(self.ds.name())))?;
        Ok(listed
            .iter()
            .filter_map(|l| PieceRef::parse(&l.key))
            .collect())
    }

    /// Uploads the log records durable here and not yet archived, as pieces.
    /// Returns the archived seq. When the log no longer holds the next
    /// record (a state transfer replaced it), the archive continues from
    /// where the log starts and a snapshot is needed to bridge the gap:
    /// `Ok(None)` says so.
    pub fn ship_log(&self) -> Result<Option<u64>> {
        let _ship = self.ship.lock().unwrap_or_else(|p| p.into_inner());
        let head = self.ds.head_seq();
        // Copied out first: the guard must not live through the rewind.
        let before = *self.lock_shipped();
        if let Some(s) = before {
            if !self.rewind_past_fork(s)? {
                tracing::warn!(dataset = self.ds.name(), "the archive holds records of a former primary past the fork point, and the local log no longer reaches back there; a snapshot will bridge to the new history");
                return Ok(None);
            }
        }
        let shipped = *self.lock_shipped();
        let from = shipped.map(|(s, _)| s + 1).unwrap_or(1);
        if from > head {
            // Nothing new to ship; a head whose write failed last time is
            // written now.
            if let Some((seq, hash)) = shipped {
                if let Some(t) = self.ds.commit_time(seq) {
                    self.write_head(seq, hash, t)?;
                }
            }
            return Ok(Some(head.min(from - 1)));
        }
        let log_dir = self.ds.dir().join("log");
        let mut cached = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        let tail = match Tail::reuse(&mut cached, &log_dir, from) {
            Ok(t) => t,
            Err(VaultError::LogGap { reason, .. }) => {
                tracing::warn!(dataset = self.ds.name(), %reason, "the log no longer holds the next record to archive; a snapshot will bridge the gap");
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let mut prev = shipped.map(|(_, h)| h);
        let fence = self.ds.fence();
        let mut next = from;
        loop {
            // A piece holds one epoch, so it is named by it: it ends before
            // the record where the next epoch of this history begins.
            let epoch = fence.epoch_of(next);
            let upto = objects::epoch_end(&fence.starts, epoch)
                .unwrap_or(u64::MAX)
                .min(head);
            let raw = tail.read(upto, PIECE_BYTES)?;
            if raw.is_empty() {
                break;
            }
            let (first_seq, last_seq) = (raw[0].seq, raw[raw.len() - 1].seq);
            let last_time = raw[raw.len() - 1].time_ns;
            let mut records = Vec::with_capacity(raw.len());
            let mut chunks: Vec<SealedChunk> = Vec::new();
            let mut seen = HashSet::new();
            let mut running = prev;
            for r in raw {
                let (pr, att) = PieceRecord::strip(&r.payload).ok_or_else(|| {
                    ArchiveError::Vault(VaultError::BadRecord {
                        seq: r.seq,
                        reason: "does not decode".into(),
                    })
                })?;
                if pr.epoch() != epoch {
                    return Err(ArchiveError::Vault(VaultError::BadRecord {
                        seq: r.seq,
                        reason: format!(
                            "carries epoch {}, but this site's history puts it in epoch {epoch}; it is not archived",
                            pr.epoch()
                        ),
                    }));
                }
                let ph = pr.prev_hash();
                if let Some(h) = running.filter(|h| *h != ph) {
                    return Err(ArchiveError::Vault(VaultError::Diverged {
                        seq: r.seq,
                        ours: hex::encode(h),
                        theirs: hex::encode(ph),
                    }));
                }
                running = Some(vault::record::chain(&ph, &r.payload));
                for c in att {
                    if seen.insert(c.id) && !self.index.has(&c.id)? {
                        chunks.push(c);
                    }
                }
                records.push(pr);
            }
            let prev_hash = records[0].prev_hash();
            let end_hash = running.unwrap_or(prev_hash);
            // Chunks first: a piece is only visible once what it needs is.
            self.upload_chunks(chunks)?;
            let piece = PieceRef::new(self.ds.name(), first_seq, last_seq, last_time, epoch);
            let bytes = objects::encode_piece(&objects::Piece {
                prev_hash,
                end_hash,
                records,
            });
            self.rt
                .block_on(self.store.put_history(&piece.key, bytes))?;
            *self.lock_shipped() = Some((piece.last, end_hash));
            self.shipped_epoch.store(epoch, Ordering::Release);
            self.write_head(piece.last, end_hash, last_time)?;
            prev = Some(end_hash);
            next = last_seq + 1;
            tracing::debug!(
                dataset = self.ds.name(),
                first = piece.first,
                last = piece.last,
                "log piece archived"
            );
        }
        Ok(Some(self.shipped_seq()))
    }

    /// After a gap in the local log (a state transfer replaced it, or the
    /// size cap removed segments not yet shipped): takes a snapshot and goes
    /// on shipping from the record after it. The archive's log thus always
    /// continues from a snapshot or a piece; if the log no longer holds the
    /// record after the snapshot either (the cap moved on meanwhile), the
    /// next shipping pass finds the gap again and another snapshot follows.
    pub fn bridge_gap(&self) -> Result<SnapshotReport> {
        let (report, hash) = self.snapshot_at()?;
        *self.lock_shipped() = Some((report.seq, hash));
        self.shipped_epoch
            .store(self.ds.fence().epoch_of(report.seq), Ordering::Release);
        tracing::warn!(
            dataset = self.ds.name(),
            seq = report.seq,
            snapshot = %report.name,
            "the archive's log continues after a bridging snapshot"
        );
        Ok(report)
    }

    /// Every complete snapshot (one with a manifest), oldest first.
    pub fn snapshots(&self) -> Result<Vec<SnapshotRef>> {
        list_snapshots(&self.rt, &self.store, self.ds.name())
    }

    /// Takes a snapshot of the dataset's state as applied now.
    pub fn snapshot(&self) -> Result<SnapshotReport> {
        self.snapshot_at().map(|(r, _)| r)
    }

    /// When the dataset's state is still the one the last snapshot this
    /// archiver wrote shows, writes a new manifest naming that snapshot's
    /// pages instead of reading the namespace and writing every page again
    /// (an idle dataset's scheduled snapshots cost one GET and one PUT).
    /// Never with Object Lock: the earlier pages' retention ends before the
    /// new snapshot's would. Never after the index lost entries (a chunk
    /// found missing must be uploaded again by a full snapshot).
    fn reuse_pages(
        &self,
        applied: &vault::state::Applied,
    ) -> Result<Option<(Manifest, SnapshotRef)>> {
        if self.store.object_lock().is_some() {
            return Ok(None);
        }
        let last = self
            .last_snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some((last_name, seq, hash, losses)) = last else {
            return Ok(None);
        };
        if seq != applied.seq || hash != applied.hash || losses != self.index.losses() {
            return Ok(None);
        }
        // It must still be the newest snapshot in the store, whole.
        let newest = self.snapshots()?.into_iter().next_back();
        let Some(prev) = newest.filter(|s| s.name == last_name) else {
            return Ok(None);
        };
        let m = read_manifest(&self.rt, &self.store, self.ds.keys(), self.ds.name(), &prev)?;
        if m.seq != applied.seq || m.chain_hash != applied.hash {
            return Ok(None);
        }
        let now_ns = Utc::now().timestamp_nanos_opt().unwrap_or(0);
        let snap_ref = SnapshotRef::new(
            applied.seq,
            now_ns / 1_000_000,
            self.ds.fence().epoch_of(applied.seq),
        );
        if snap_ref.name == prev.name {
            // Within the same millisecond: the snapshot exists already.
            return Ok(None);
        }
        let pages_from = m.pages_from.clone().unwrap_or(prev.name);
        Ok(Some((
            Manifest {
                version: objects::MANIFEST_VERSION_REUSED,
                site: self.site.clone(),
                taken_ns: now_ns,
                pages_from: Some(pages_from),
                ..m
            },
            snap_ref,
        )))
    }

    /// A snapshot, and the chain hash at its seq.
    fn snapshot_at(&self) -> Result<(SnapshotReport, Hash)> {
        let _job = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let started = std::time::Instant::now();
        let name = self.ds.name().to_string();
        let keys = self.ds.keys().clone();
        let st = self.ds.state();
        // Read before the state is: it only says what the index lost up to
        // now, so a loss during the walk makes the next snapshot a full one.
        let losses = self.index.losses();
        // The namespace is read in order and each page is sealed and stored
        // as soon as it is full, its new chunks uploaded in batches meanwhile:
        // memory holds one page and one upload batch, whatever the tree's size.
        let (manifest, snap_ref, uploaded) = st.with_snapshot(|snap| -> Result<_> {
            let applied = snap.applied()?;
            if let Some((manifest, snap_ref)) = self.reuse_pages(&applied)? {
                return Ok((manifest, snap_ref, (0, 0)));
            }
            let pins = snap.pins()?;
            let meta = |id: &ChunkId| -> Result<vault::state::ChunkMeta> {
                snap.chunk_meta(id)?.ok_or_else(|| missing_chunk(st, id))
            };
            let mut upload = Uploads::default();
            let mut pin_refs = Vec::new();
            for (id, n) in &pins {
                let m = meta(id)?;
                pin_refs.push((*id, *n, m.plain_len, m.sealed_hash));
                self.upload_if_missing(snap, st, &mut upload, *id)?;
            }
            let now_ns = Utc::now().timestamp_nanos_opt().unwrap_or(0);
            let snap_ref = SnapshotRef::new(
                applied.seq,
                now_ns / 1_000_000,
                self.ds.fence().epoch_of(applied.seq),
            );
            let (mut entries, mut bytes, mut chunks) = (0u64, 0u64, 0u64);
            let mut pages = Vec::new();
            let mut page = objects::Page {
                entries: Vec::with_capacity(objects::PAGE_ENTRIES),
                chunks: Vec::new(),
            };
            // Chunks already in this page's table: a chunk is listed once
            // per page that names it.
            let mut tabled = HashSet::new();
            let mut ids = Vec::new();
            let mut items = snap.entries_iter()?.peekable();
            while let Some(item) = items.next() {
                let (path, e) = item?;
                entries += 1;
                bytes += e.size;
                for c in e.chunks() {
                    if tabled.insert(c.id) {
                        ids.push(c.id);
                    }
                }
                page.entries.push((path, e));
                if page.entries.len() == objects::PAGE_ENTRIES || items.peek().is_none() {
                    // The page's chunks are looked up together.
                    let metas = snap.chunk_metas(&ids)?;
                    let stored = self.index.has_many(&ids)?;
                    for ((id, m), archived) in ids.drain(..).zip(metas).zip(stored) {
                        let m = m.ok_or_else(|| missing_chunk(st, &id))?;
                        page.chunks.push((id, m.sealed_hash));
                        if !archived {
                            self.upload_if_missing(snap, st, &mut upload, id)?;
                        }
                    }
                    chunks += page.chunks.len() as u64;
                    let key = snap_ref.page_key(&name, pages.len());
                    let sealed = objects::encode_page(&keys, &key, &page)?;
                    pages.push(PageRef {
                        entries: page.entries.len() as u32,
                        sealed_len: sealed.len() as u64,
                        sealed_hash: *blake3::hash(&sealed).as_bytes(),
                    });
                    self.rt.block_on(self.store.put_history(&key, sealed))?;
                    page.entries.clear();
                    page.chunks.clear();
                    tabled.clear();
                }
            }
            self.upload_batch(&mut upload)?;
            let manifest = Manifest {
                version: objects::MANIFEST_VERSION,
                dataset: name.clone(),
                site: self.site.clone(),
                seq: applied.seq,
                time_ns: applied.time_ns,
                taken_ns: now_ns,
                chain_hash: applied.hash,
                digest: applied.digest.summary(),
                lthash: applied.digest.to_bytes(),
                entries,
                bytes,
                chunks: chunks + pin_refs.len() as u64,
                pins: pin_refs,
                pages,
                pages_from: None,
            };
            Ok((manifest, snap_ref, (upload.chunks, upload.bytes)))
        })?;
        let key = snap_ref.manifest_key(&name);
        let sealed = objects::encode_manifest(&keys, &key, &manifest)?;
        // Written last: the snapshot exists from here on.
        self.rt.block_on(self.store.put_history(&key, sealed))?;
        *self.last_snapshot.lock().unwrap_or_else(|p| p.into_inner()) = Some((
            snap_ref.name.clone(),
            manifest.seq,
            manifest.chain_hash,
            losses,
        ));
        self.write_head(manifest.seq, manifest.chain_hash, manifest.time_ns)?;
        self.write_index_file();
        let report = SnapshotReport {
            name: snap_ref.name,
            seq: manifest.seq,
            entries: manifest.entries,
            bytes: manifest.bytes,
            chunks: manifest.chunks,
            chunks_uploaded: uploaded.0,
            bytes_uploaded: uploaded.1,
            seconds: started.elapsed().as_secs_f64(),
        };
        tracing::info!(dataset = %name, snapshot = %report.name, seq = report.seq, pages_from = ?manifest.pages_from, entries = report.entries, chunks_uploaded = report.chunks_uploaded, bytes_uploaded = report.bytes_uploaded, seconds = report.seconds, "snapshot complete");
        Ok((report, manifest.chain_hash))
    }

    /// Snapshot step: adds chunk `id` to the upload batch if the index does
    /// not have it (read from `snap`, a view of `st`), and uploads the batch
    /// once it holds [`UPLOAD_BATCH_BYTES`], so memory stays bounded.
    fn upload_if_missing(
        &self,
        snap: &vault::state::Snap<'_>,
        st: &vault::state::State,
        up: &mut Uploads,
        id: ChunkId,
    ) -> Result<()> {
        if self.index.has(&id)? || !up.queued.insert(id) {
            return Ok(());
        }
        let c = snap.chunk(&id)?.ok_or_else(|| missing_chunk(st, &id))?;
        up.batch_bytes += c.sealed.len();
        up.batch.push(c);
        if up.batch_bytes >= UPLOAD_BATCH_BYTES {
            self.upload_batch(up)?;
        }
        Ok(())
    }

    /// Uploads the batch [`Archiver::upload_if_missing`] gathered.
    fn upload_batch(&self, up: &mut Uploads) -> Result<()> {
        if up.batch.is_empty() {
            return Ok(());
        }
        up.chunks += up.batch.len() as u64;
        up.bytes += up.batch_bytes as u64;
        up.batch_bytes = 0;
        up.queued.clear();
        self.upload_chunks(std::mem::take(&mut up.batch))
    }

    /// Uploads new chunks: in packs, or one object each with
    /// `pack_bytes` 0. The index learns of them only once all are stored.
    fn upload_chunks(&self, chunks: Vec<SealedChunk>) -> Result<()> {
        let _one = self.uploading.lock().unwrap_or_else(|p| p.into_inner());
        // Another upload may have stored some meanwhile.
        let mut fresh = Vec::with_capacity(chunks.len());
        for c in chunks {
            if !self.index.has(&c.id)? {
                fresh.push(c);
            }
        }
        let chunks = fresh;
        if chunks.is_empty() {
            return Ok(());
        }
        let name = self.ds.name();
        let ids: Vec<ChunkId> = chunks.iter().map(|c| c.id).collect();
        let store = &self.store;
        if self.pack_bytes == 0 {
            self.rt.block_on(
                stream::iter(chunks.into_iter().map(|c| async move {
                    store
                        .put_history(&objects::chunk_key(name, &c.id), c.sealed)
                        .await
                }))
                .buffer_unordered(self.concurrency)
                .try_collect::<Vec<()>>(),
            )?;
        } else {
            let mut indexed = Vec::new();
            let mut uploads = Vec::new();
            for p in packs::build(self.ds.keys(), name, chunks, self.pack_bytes) {
                indexed.push(packs::IndexedPack {
                    key: p.key.clone(),
                    size: p.bytes.len() as u64,
                    entries: p.entries,
                });
                uploads.push((p.key, p.bytes));
            }
            // A few 16 MiB uploads at once fill a link; more only hold
            // memory.
            self.rt.block_on(
                stream::iter(
                    uploads
                        .into_iter()
                        .map(|(key, bytes)| async move { store.put_history(&key, bytes).await }),
                )
                .buffer_unordered(self.concurrency.min(4))
                .try_collect::<Vec<()>>(),
            )?;
            let full = {
                let mut u = self.unindexed.lock().unwrap_or_else(|p| p.into_inner());
                u.extend(indexed);
                u.iter().map(|p| p.entries.len()).sum::<usize>() >= packs::INDEX_FILE_CHUNKS
            };
            if full {
                self.write_index_file();
            }
        }
        self.index.add(&ids)
    }

    /// Writes an index file of the packs uploaded since the last one. A
    /// failure is only logged: every pack carries its own index, so readers
    /// lose a shortcut, nothing else.
    fn write_index_file(&self) {
        let packs = std::mem::take(&mut *self.unindexed.lock().unwrap_or_else(|p| p.into_inner()));
        if packs.is_empty() {
            return;
        }
        let (key, bytes) = packs::seal_index_file(self.ds.keys(), self.ds.name(), &packs);
        // Not history: never locked, so a prune can always replace it.
        if let Err(e) = self.rt.block_on(self.store.put(&key, bytes)) {
            tracing::warn!(dataset = self.ds.name(), error = %e, packs = packs.len(), "could not write an index file; readers will read those packs' own indexes");
        }
    }

    /// Applies `policy` (deleting the manifests of snapshots it does not
    /// keep), then prunes: chunks neither a kept snapshot nor a log piece
    /// after the oldest kept snapshot references are marked,
    /// and deleted by a later prune once they stayed unreferenced for
    /// `grace`; log pieces older than the oldest kept snapshot and pages of
    /// snapshots that never completed (older than `grace`) are deleted.
    pub fn prune(
        &self,
        policy: &RetentionPolicy,
        grace: std::time::Duration,
    ) -> Result<PruneReport> {
        let _job = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let _ship = self.ship.lock().unwrap_or_else(|p| p.into_inner());
        let name = self.ds.name();
        std::thread::scope(|scope| {
            // Marked as running before the readers are listed: a reader
            // that starts now waits for the marker to go.
            let (_running, readers) = crate::lease::take_prune(scope, &self.rt, &self.store, name)?;
            if !readers.is_empty() {
                tracing::info!(
                    dataset = name,
                    readers = ?readers,
                    "prune deferred: the archive is being read; nothing was deleted"
                );
                return Ok(PruneReport {
                    deferred_for: readers,
                    ..PruneReport::default()
                });
            }
            self.prune_unread(policy, grace)
        })
    }

    /// [`Archiver::prune`] once no reader holds a lease.
    fn prune_unread(
        &self,
        policy: &RetentionPolicy,
        grace: std::time::Duration,
    ) -> Result<PruneReport> {
        let name = self.ds.name();
        let keys = self.ds.keys().clone();
        let mut report = PruneReport::default();
        let snaps = self.snapshots()?;
        let mut keep = policy.select(&snaps);
        // After a gap in the archived log, only a snapshot taken at or after
        // the gap reaches the points past it.
        let starts = self.ds.fence().starts;
        let history: Vec<PieceRef> = self
            .pieces()?
            .into_iter()
            .filter_map(|p| p.follow(&starts))
            .collect();
        let ours: Vec<SnapshotRef> = snaps
            .iter()
            .filter(|s| s.follows(&starts))
            .cloned()
            .collect();
        let bridging = bridging_snapshots(&ours, &history, &keep);
        for b in &bridging {
            tracing::warn!(dataset = name, snapshot = %b, "kept beyond the retention policy: the archived log has a gap before it, and without it the points after the gap could not be restored");
            keep.insert(b.clone());
        }
        report.snapshots_bridging = bridging;
        // Under Object Lock, nothing still locked is deleted: a delete would
        // only hide it behind a marker until the lock ends. A snapshot whose
        // manifest is locked stays whole, chunks and pieces included.
        let now = Utc::now();
        let lock = self.store.object_lock();
        let held = |modified: chrono::DateTime<Utc>| lock.is_some_and(|l| l.holds(modified, now));
        let manifests_held: HashSet<String> = match lock {
            Some(_) => self.held_manifests(name, &held)?,
            None => HashSet::new(),
        };
        let (kept, dropped): (Vec<SnapshotRef>, Vec<SnapshotRef>) =
            snaps.into_iter().partition(|s| {
                keep.contains(&s.name) || manifests_held.contains(&s.manifest_key(name))
            });
        report.snapshots_kept = kept.len();
        report.snapshots_held = kept
            .iter()
            .filter(|s| !keep.contains(&s.name))
            .map(|s| s.name.clone())
            .collect();

        // What the kept snapshots reference. They are all read (and checked)
        // before anything is deleted: a damaged kept snapshot stops the prune
        // while the older ones still exist.
        let (mut live, live_pages) = self.snapshot_references(&keys, name, &kept)?;
        // And what the log pieces a restore may still replay brought.
        let oldest_kept = kept.iter().map(|s| s.seq).min();
        self.add_piece_references(oldest_kept, &mut live)?;
        report.chunks_live = live.len();
        for s in dropped {
            self.rt.block_on(self.store.delete(&s.manifest_key(name)))?;
            report.snapshots_deleted.push(s.name);
        }

        let grace_ms = grace.as_millis() as i64;
        self.sweep_chunks(name, &live, now, grace_ms, &held, &mut report)?;

        // Log pieces wholly before the oldest kept snapshot restore nothing.
        if let Some(oldest) = oldest_kept {
            self.delete_old_pieces(name, oldest, &held, &mut report)?;
        }
        // Pages of deleted snapshots, and of snapshots that never finished.
        self.delete_orphan_pages(name, &live_pages, now, grace_ms, &held, &mut report)?;
        tracing::info!(
            dataset = name,
            kept = report.snapshots_kept,
            deleted = report.snapshots_deleted.len(),
            chunks_deleted = report.chunks_deleted,
            chunks_waiting = report.chunks_waiting,
            held_by_object_lock = report.objects_held + report.snapshots_held.len(),
            "prune complete"
        );
        Ok(report)
    }

    /// Prune step: the keys of the snapshot manifests still under Object
    /// Lock. Their snapshots are kept whole whatever the retention policy
    /// says, since deleting the manifest would only hide it behind a marker.
    fn held_manifests(
        &self,
        name: &str,
        held: &dyn Fn(DateTime<Utc>) -> bool,
    ) -> Result<HashSet<String>> {
        Ok(self
            .rt
            .block_on(self.store.list(&objects::snapshots_prefix(name)))?
            .into_iter()
            .filter(|l| l.key.ends_with(".manifest") && held(l.modified))
            .map(|l| l.key)
            .collect())
    }

    /// Prune step: reads every kept snapshot and returns the chunks
    /// (entries and pins) and the page keys they reference. Pages are read
    /// a few at a time and dropped once their chunks are noted, and a page
    /// that several snapshots share (formats.md 16.4, `pages_from`) is read
    /// once, so memory holds the set of live chunks, not the namespaces. A
    /// snapshot that does not read back whole fails the prune here, before
    /// anything is deleted.
    fn snapshot_references(
        &self,
        keys: &vault::Keys,
        name: &str,
        kept: &[SnapshotRef],
    ) -> Result<(HashSet<ChunkId>, HashSet<String>)> {
        let mut live: HashSet<ChunkId> = HashSet::new();
        let mut live_pages: HashSet<String> = HashSet::new();
        let store = &self.store;
        for s in kept {
            let m = read_manifest(&self.rt, store, keys, name, s)?;
            live.extend(m.pins.iter().map(|p| p.0));
            // A snapshot that reuses an earlier one's pages keeps those
            // alive, whether or not the earlier one is kept.
            let unread: Vec<(String, &PageRef)> = m
                .pages
                .iter()
                .enumerate()
                .map(|(n, p)| (m.page_key(name, s, n), p))
                .filter(|(k, _)| !live_pages.contains(k))
                .collect();
            let mut pages = Box::pin(
                stream::iter(unread.into_iter().map(|(key, p)| async move {
                    let b = store
                        .get_required(&key, "a page of the snapshot", p.sealed_len)
                        .await?;
                    let page =
                        objects::decode_page(keys, &key, &b, p).map_err(|e| store.locate_err(e))?;
                    Ok::<_, ArchiveError>((key, page))
                }))
                .buffered(self.concurrency.max(1)),
            );
            while let Some(read) = self.rt.block_on(pages.next()) {
                let (key, page) = read?;
                for (_, e) in &page.entries {
                    live.extend(e.chunks().iter().map(|c| c.id));
                }
                live_pages.insert(key);
            }
        }
        Ok((live, live_pages))
    }

    /// Prune step: adds to `live` the chunks attached to the records of every
    /// log piece ending after `oldest_kept` (every piece when no snapshot is
    /// kept), since a restore may still replay those pieces.
    fn add_piece_references(
        &self,
        oldest_kept: Option<u64>,
        live: &mut HashSet<ChunkId>,
    ) -> Result<()> {
        for p in self.pieces()? {
            if oldest_kept.is_some_and(|o| p.last <= o) {
                continue;
            }
            let piece = read_piece(&self.rt, &self.store, &p.key, "a log piece")?;
            for r in &piece.records {
                live.extend(r.attachments.iter().map(|a| a.0));
            }
        }
        Ok(())
    }

    /// Prune step for chunks, with the grace period: loads the chunks found
    /// unreferenced by earlier prunes, checks that every `live` chunk is in
    /// the store, marks the newly unreferenced, deletes those unreferenced
    /// for at least `grace_ms` (unless Object Lock still holds them) and
    /// saves what still waits for the next prune.
    fn sweep_chunks(
        &self,
        name: &str,
        live: &HashSet<ChunkId>,
        now: DateTime<Utc>,
        grace_ms: i64,
        held: &dyn Fn(DateTime<Utc>) -> bool,
        report: &mut PruneReport,
    ) -> Result<()> {
        let pending_key = objects::pending_key(name);
        let mut pending = self.read_pending(name, &pending_key)?;
        let listed = self
            .rt
            .block_on(self.store.list(&objects::chunks_prefix(name)))?;
        let located = self.rt.block_on(Located::load(
            &self.store,
            self.ds.keys(),
            name,
            self.concurrency,
        ))?;
        self.check_live_present(name, &located, live, report)?;
        let grace = Grace {
            pending: &pending,
            now,
            grace_ms,
            held,
        };
        let (doomed, mut still) = classify_unreferenced(&listed, live, &grace, report);
        let pack_list = self
            .rt
            .block_on(self.store.list(&packs::packs_prefix(name)))?;
        let doomed_packs = classify_packs(&located, &pack_list, live, &grace, &mut still, report);
        let doomed_damaged =
            self.judge_damaged_packs(&located, &pack_list, &grace, &mut still, report);
        report.chunks_waiting = still.len();
        pending.since_ms = still;
        self.delete_chunks(name, &doomed)?;
        report.chunks_deleted = doomed.len();
        self.delete_packs(&located, &doomed_packs, report)?;
        self.set_aside_damaged(name, &doomed_damaged, report)?;
        self.consolidate_index_files(&located, &doomed_packs, &doomed_damaged)?;
        let pending_bytes = serde_json::to_vec(&pending).map_err(|e| ArchiveError::Damaged {
            key: pending_key.clone(),
            reason: e.to_string(),
        })?;
        self.rt
            .block_on(self.store.put(&pending_key, pending_bytes))?;
        Ok(())
    }

    /// Prune step: reads `prune/pending` (when each unreferenced chunk was
    /// first found so). One that does not decode is replaced by an empty one
    /// rather than failing the prune.
    fn read_pending(&self, name: &str, pending_key: &str) -> Result<Pending> {
        let pending: Pending = match self
            .rt
            .block_on(self.store.get(pending_key, objects::MAX_SMALL_OBJECT_BYTES))?
        {
            Some(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                // Only delays deletions: every candidate waits a full grace
                // period again.
                tracing::warn!(dataset = name, error = %e, "prune/pending does not decode; starting the grace period afresh");
                Pending::default()
            }),
            None => Pending::default(),
        };
        Ok(pending)
    }

    /// Prune step: counts the `live` chunks the store holds neither as
    /// objects nor in packs into the report and, if there are any, says so
    /// and rebuilds the index from the store.
    fn check_live_present(
        &self,
        name: &str,
        located: &Located,
        live: &HashSet<ChunkId>,
        report: &mut PruneReport,
    ) -> Result<()> {
        // Every referenced chunk must be in the store. If not, something
        // outside triad removed objects: say so, and forget the index so the
        // next snapshot uploads what is missing.
        report.chunks_missing = live.iter().filter(|id| !located.contains(id)).count();
        if report.chunks_missing > 0 {
            tracing::error!(dataset = name, missing = report.chunks_missing, url = self.store.url(), "chunks that kept snapshots or log pieces reference are missing from the store; the index is rebuilt and the next snapshot uploads them again, but restores through the affected snapshots or pieces will name them as missing");
            self.refill_index()?;
        }
        Ok(())
    }

    /// Prune step: removes `doomed` from the index, then deletes their chunk
    /// objects (in parallel).
    fn delete_chunks(&self, name: &str, doomed: &[ChunkId]) -> Result<()> {
        // The index forgets them first: a snapshot must never skip uploading
        // a chunk that is about to go.
        self.index.remove(doomed)?;
        let store = &self.store;
        self.rt.block_on(
            stream::iter(
                doomed
                    .iter()
                    .map(|id| async move { store.delete(&objects::chunk_key(name, id)).await }),
            )
            .buffer_unordered(self.concurrency)
            .try_collect::<Vec<()>>(),
        )?;
        Ok(())
    }

    /// Prune step: removes the chunks of `doomed` packs from the index, then
    /// deletes the packs.
    fn delete_packs(
        &self,
        located: &Located,
        doomed: &[String],
        report: &mut PruneReport,
    ) -> Result<()> {
        let ids: Vec<ChunkId> = doomed
            .iter()
            .filter_map(|k| located.packs.get(k.as_str()))
            .flat_map(|(_, entries)| entries.iter().map(|e| e.id))
            .collect();
        self.index.remove(&ids)?;
        for k in doomed {
            self.rt.block_on(self.store.delete(k))?;
        }
        report.packs_deleted = doomed.len();
        Ok(())
    }

    /// Prune step: replaces the index files read with one covering every
    /// pack left, so readers make one GET for all of them. Index files are
    /// never locked (they are a shortcut, authenticated, and losing one
    /// costs readers only the packs' own indexes), so this works under
    /// Object Lock too.
    fn consolidate_index_files(
        &self,
        located: &Located,
        deleted: &[String],
        set_aside: &[String],
    ) -> Result<()> {
        let gone: HashSet<&str> = deleted
            .iter()
            .chain(set_aside)
            .map(String::as_str)
            .collect();
        // One file already covering every pack left: nothing to do.
        if located.index_files.len() == 1
            && gone.is_empty()
            && located.warnings.is_empty()
            && located.packs_from_index_files == located.packs.len()
        {
            return Ok(());
        }
        let left: Vec<packs::IndexedPack> = located
            .packs
            .iter()
            .filter(|(k, _)| !gone.contains(k.as_ref()))
            .map(|(k, (size, entries))| packs::IndexedPack {
                key: k.to_string(),
                size: *size,
                entries: entries.clone(),
            })
            .collect();
        if !left.is_empty() {
            let (key, bytes) = packs::seal_index_file(self.ds.keys(), self.ds.name(), &left);
            self.rt.block_on(self.store.put(&key, bytes))?;
        }
        for k in &located.index_files {
            self.rt.block_on(self.store.delete(k))?;
        }
        Ok(())
    }

    /// Prune step for packs whose index does not read back: they are
    /// reported, and once no referenced chunk is missing (each was stored
    /// again by a snapshot) nothing can need them, so they are marked and,
    /// after the grace period, set aside. Returns those to set aside now.
    fn judge_damaged_packs(
        &self,
        located: &Located,
        listed: &[Listed],
        grace: &Grace<'_>,
        still: &mut BTreeMap<String, i64>,
        report: &mut PruneReport,
    ) -> Vec<String> {
        report.packs_damaged = located.damaged.iter().map(|d| d.why.clone()).collect();
        if located.damaged.is_empty() {
            return Vec::new();
        }
        tracing::error!(dataset = self.ds.name(), packs = ?report.packs_damaged, "packs in the archive do not read back; their chunks count as missing until a snapshot stores them again");
        if report.chunks_missing > 0 {
            return Vec::new();
        }
        let mut doomed = Vec::new();
        for key in located.damaged.iter().map(|d| &d.key) {
            let at = listed
                .iter()
                .find(|l| &l.key == key)
                .map_or(grace.now, |l| l.modified);
            if grace.judge(key.clone(), 0, at, still, report) {
                doomed.push(key.clone());
            }
        }
        doomed
    }

    /// Prune step: copies each of `keys` (damaged packs nothing needs) to
    /// `<dataset>/evidence/` in the store, then deletes it.
    fn set_aside_damaged(
        &self,
        name: &str,
        keys: &[String],
        report: &mut PruneReport,
    ) -> Result<()> {
        for key in keys {
            let file = key.rsplit('/').next().unwrap_or(key);
            let stamp = Utc::now().timestamp_millis();
            let aside = format!("{name}/evidence/{file}-{stamp}");
            if self.rt.block_on(self.store.copy_if_exists(key, &aside))? {
                self.rt.block_on(self.store.delete(key))?;
                tracing::warn!(dataset = name, pack = %key, evidence = %aside, "a damaged pack nothing needs any more was set aside");
                report.packs_set_aside.push(aside);
            }
        }
        Ok(())
    }

    /// Prune step: deletes the log pieces that end at or before `oldest`, the
    /// oldest kept snapshot's seq, except those Object Lock still holds.
    fn delete_old_pieces(
        &self,
        name: &str,
        oldest: u64,
        held: &dyn Fn(DateTime<Utc>) -> bool,
        report: &mut PruneReport,
    ) -> Result<()> {
        let listed = self
            .rt
            .block_on(self.store.list(&objects::log_prefix(name)))?;
        for (p, modified) in listed
            .iter()
            .filter_map(|l| PieceRef::parse(&l.key).map(|p| (p, l.modified)))
        {
            if p.last > oldest {
                continue;
            }
            if held(modified) {
                report.objects_held += 1;
                continue;
            }
            self.rt.block_on(self.store.delete(&p.key))?;
            report.log_pieces_deleted += 1;
        }
        Ok(())
    }

    /// Prune step: deletes the snapshot objects other than manifests that no
    /// kept snapshot uses (not in `live_pages`): those of the snapshots this
    /// prune deleted, and any older than `grace_ms` (left by snapshots that
    /// never finished), except those Object Lock still holds.
    fn delete_orphan_pages(
        &self,
        name: &str,
        live_pages: &HashSet<String>,
        now: DateTime<Utc>,
        grace_ms: i64,
        held: &dyn Fn(DateTime<Utc>) -> bool,
        report: &mut PruneReport,
    ) -> Result<()> {
        for l in self
            .rt
            .block_on(self.store.list(&objects::snapshots_prefix(name)))?
        {
            if l.key.ends_with(".manifest") || live_pages.contains(&l.key) {
                continue;
            }
            let age_ms = (now - l.modified).num_milliseconds();
            let of_deleted = report
                .snapshots_deleted
                .iter()
                .any(|s| l.key.contains(&format!("/{s}/")));
            if held(l.modified) && (of_deleted || age_ms >= grace_ms) {
                report.objects_held += 1;
            } else if of_deleted || age_ms >= grace_ms {
                self.rt.block_on(self.store.delete(&l.key))?;
                report.orphan_objects_deleted += 1;
            }
        }
        Ok(())
    }
}

/// Prune step: sorts the chunks in `listed` that `live` does not reference
/// by what `pending` (the earlier prunes' findings) says of them. Returns
/// the chunks to delete now (unreferenced for at least `grace_ms` and not
/// held by Object Lock) and, by hex id, when each of the others was first
/// found unreferenced (now, for those marked by this prune).
fn classify_unreferenced(
    listed: &[Listed],
    live: &HashSet<ChunkId>,
    grace: &Grace<'_>,
    report: &mut PruneReport,
) -> (Vec<ChunkId>, BTreeMap<String, i64>) {
    let mut doomed = Vec::new();
    let mut still = BTreeMap::new();
    for l in listed {
        let Some(id) = objects::parse_chunk_key(&l.key) else {
            continue;
        };
        if live.contains(&id) {
            continue;
        }
        let h = hex::encode(id.0);
        if grace.judge(h, 1, l.modified, &mut still, report) {
            doomed.push(id);
        }
    }
    (doomed, still)
}

/// The grace period's rule for one unreferenced thing (a chunk object by
/// its hex id, a pack by its key): what earlier prunes found, now, the
/// period, and whether Object Lock holds an object written at a time.
struct Grace<'a> {
    pending: &'a Pending,
    now: DateTime<Utc>,
    grace_ms: i64,
    held: &'a dyn Fn(DateTime<Utc>) -> bool,
}

impl Grace<'_> {
    /// Whether to delete `key` (written at `modified`) now: found
    /// unreferenced by an earlier prune at least `grace_ms` ago and not
    /// held by Object Lock. Otherwise it is kept in `still` with when it
    /// was first found so (`chunks` more chunks marked when that is now).
    fn judge(
        &self,
        key: String,
        chunks: usize,
        modified: DateTime<Utc>,
        still: &mut BTreeMap<String, i64>,
        report: &mut PruneReport,
    ) -> bool {
        match self.pending.since_ms.get(&key) {
            Some(since) if self.now.timestamp_millis() - since >= self.grace_ms => {
                if (self.held)(modified) {
                    report.objects_held += 1;
                    still.insert(key, *since);
                    false
                } else {
                    true
                }
            }
            Some(since) => {
                still.insert(key, *since);
                false
            }
            None => {
                report.chunks_marked += chunks;
                still.insert(key, self.now.timestamp_millis());
                false
            }
        }
    }
}

/// Prune step for packs: a pack none of whose chunks `live` references is
/// marked in `still` (by its key) and deleted by a prune that finds it so
/// after `grace_ms`, unless Object Lock holds it. Returns the packs to
/// delete now. A pack still partly referenced stays whole; the bytes it
/// holds for nothing are counted (a repack would reclaim them).
fn classify_packs(
    located: &Located,
    listed: &[Listed],
    live: &HashSet<ChunkId>,
    grace: &Grace<'_>,
    still: &mut BTreeMap<String, i64>,
    report: &mut PruneReport,
) -> Vec<String> {
    let modified: HashMap<&str, DateTime<Utc>> = listed
        .iter()
        .map(|l| (l.key.as_str(), l.modified))
        .collect();
    let mut doomed = Vec::new();
    for (key, (_, entries)) in &located.packs {
        let used = entries.iter().filter(|e| live.contains(&e.id)).count();
        if used > 0 {
            report.pack_bytes_unreferenced += entries
                .iter()
                .filter(|e| !live.contains(&e.id))
                .map(|e| u64::from(e.sealed_len))
                .sum::<u64>();
            continue;
        }
        // A pack missing from the second listing is judged as if written
        // now: under Object Lock, held.
        let at = modified.get(key.as_ref()).copied().unwrap_or(grace.now);
        if grace.judge(key.to_string(), entries.len(), at, still, report) {
            doomed.push(key.to_string());
        }
    }
    doomed
}

/// Every complete snapshot of `ds` in `store`, oldest first.
pub fn list_snapshots(rt: &Handle, store: &Store, ds: &str) -> Result<Vec<SnapshotRef>> {
    let listed = rt.block_on(store.list(&objects::snapshots_prefix(ds)))?;
    let mut out: Vec<SnapshotRef> = listed
        .iter()
        .filter_map(|l| SnapshotRef::parse_manifest_key(&l.key))
        .collect();
    out.sort_by_key(|s| (s.seq, s.taken_ms));
    Ok(out)
}

/// The newest seq a restore of the archive's latest state reaches: from
/// one listing of its log pieces and snapshots, counting only those of the
/// history its head names (a former primary's pieces past a fork are not
/// restored, so they do not count). Nothing else is read or checked.
pub fn archived_head(rt: &Handle, store: &Store, keys: &vault::Keys, ds: &str) -> Result<u64> {
    let head_key = objects::head_key(ds);
    let starts = match rt.block_on(store.get(&head_key, objects::MAX_SMALL_OBJECT_BYTES))? {
        Some(b) => objects::decode_head(keys, &head_key, &b)?.starts,
        None => Vec::new(),
    };
    let pieces = rt.block_on(store.list(&objects::log_prefix(ds)))?;
    let from_log = pieces
        .iter()
        .filter_map(|l| PieceRef::parse(&l.key))
        .filter_map(|p| p.follow(&starts))
        .map(|p| p.upto)
        .max()
        .unwrap_or(0);
    let from_snapshots = list_snapshots(rt, store, ds)?
        .iter()
        .filter(|s| s.follows(&starts))
        .map(|s| s.seq)
        .max()
        .unwrap_or(0);
    Ok(from_log.max(from_snapshots))
}

/// A snapshot as read back: its manifest, namespace, and the BLAKE3 of the
/// sealed bytes of every chunk it references.
pub struct SnapshotContent {
    pub manifest: Manifest,
    pub entries: Namespace,
    pub sealed_hashes: std::collections::HashMap<ChunkId, [u8; 32]>,
}

/// Reads and checks a snapshot's manifest and all its pages.
pub fn read_snapshot(
    rt: &Handle,
    store: &Store,
    keys: &vault::Keys,
    ds: &str,
    s: &SnapshotRef,
    concurrency: usize,
) -> Result<SnapshotContent> {
    let manifest = read_manifest(rt, store, keys, ds, s)?;
    let pages: Vec<objects::Page> = rt.block_on(
        stream::iter(manifest.pages.iter().enumerate().map(|(n, p)| {
            let key = manifest.page_key(ds, s, n);
            async move {
                let b = store
                    .get_required(&key, "a page of the snapshot", p.sealed_len)
                    .await?;
                objects::decode_page(keys, &key, &b, p).map_err(|e| store.locate_err(e))
            }
        }))
        .buffered(concurrency.max(1))
        .try_collect(),
    )?;
    // The count is the manifest's claim: reserve no more than one page's.
    let mut entries = Vec::with_capacity((manifest.entries as usize).min(objects::PAGE_ENTRIES));
    let mut sealed_hashes = std::collections::HashMap::new();
    for p in pages {
        entries.extend(p.entries);
        sealed_hashes.extend(p.chunks);
    }
    for (id, _, _, h) in &manifest.pins {
        sealed_hashes.insert(*id, *h);
    }
    Ok(SnapshotContent {
        manifest,
        entries,
        sealed_hashes,
    })
}

/// Reads and decodes one log piece (at most [`objects::MAX_PIECE_BYTES`]),
/// naming it by its full location when it is missing or damaged.
pub fn read_piece(rt: &Handle, store: &Store, key: &str, what: &str) -> Result<objects::Piece> {
    let bytes = rt.block_on(store.get_required(key, what, objects::MAX_PIECE_BYTES))?;
    objects::decode_piece(key, &bytes).map_err(|e| store.locate_err(e))
}

/// Reads just the manifest of a snapshot.
pub fn read_manifest(
    rt: &Handle,
    store: &Store,
    keys: &vault::Keys,
    ds: &str,
    s: &SnapshotRef,
) -> Result<Manifest> {
    let key = s.manifest_key(ds);
    objects::decode_manifest(
        keys,
        &key,
        &rt.block_on(store.get_required(&key, "the manifest", objects::MAX_MANIFEST_BYTES))?,
    )
    .map_err(|e| store.locate_err(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(day: i64, hour: i64, seq: u64) -> SnapshotRef {
        // 2023-11-14 00:00:00 UTC: days start at midnight.
        SnapshotRef::new(seq, (1_699_920_000 + day * 86_400 + hour * 3_600) * 1000, 1)
    }

    #[test]
    fn retention_keeps_the_newest_per_bucket() {
        let snaps: Vec<SnapshotRef> = (0..10)
            .flat_map(|d| (0..3).map(move |h| snap(d, h * 5, (d * 3 + h) as u64 + 1)))
            .collect();
        let p = RetentionPolicy {
            last: 2,
            daily: 3,
            ..Default::default()
        };
        let keep = p.select(&snaps);
        // The newest two, plus the newest of each of the last three days (the
        // newest day's is already among the last two).
        let mut names: Vec<u64> = snaps
            .iter()
            .filter(|s| keep.contains(&s.name))
            .map(|s| s.seq)
            .collect();
        names.sort();
        assert_eq!(names, vec![24, 27, 29, 30]);
        assert_eq!(RetentionPolicy::default().select(&snaps).len(), 30);
    }

    #[test]
    fn retention_keeps_the_snapshot_that_bridges_a_gap_in_the_archived_log() {
        let piece = |first: u64, last: u64| PieceRef::new("files", first, last, 0, 1);
        // Snapshots at 10, 49 (the bridge: records 41-49 never reached the
        // archive, and it goes on from 50), 60 and 100; pieces 11-40, then
        // 50-120.
        let snaps: Vec<SnapshotRef> = [(0, 10), (1, 49), (2, 60), (3, 100)]
            .iter()
            .map(|(d, seq)| snap(*d, 0, *seq))
            .collect();
        let pieces = [piece(11, 40), piece(50, 120)];
        let name = |seq: u64| {
            snaps
                .iter()
                .find(|s| s.seq == seq)
                .map(|s| s.name.clone())
                .unwrap_or_default()
        };
        // Retention keeps 10 and 100: 49 is the oldest snapshot from which
        // 50 onwards replays.
        let keep: HashSet<String> = [name(10), name(100)].into_iter().collect();
        assert_eq!(bridging_snapshots(&snaps, &pieces, &keep), vec![name(49)]);
        // Kept anyway: nothing more.
        let keep: HashSet<String> = [name(10), name(49), name(100)].into_iter().collect();
        assert!(bridging_snapshots(&snaps, &pieces, &keep).is_empty());
        // A gap before the oldest kept snapshot restores nothing kept.
        let keep: HashSet<String> = [name(60), name(100)].into_iter().collect();
        assert!(bridging_snapshots(&snaps, &pieces, &keep).is_empty());
        // An unbroken log needs no bridge.
        let whole = [piece(11, 40), piece(41, 120)];
        let keep: HashSet<String> = [name(10), name(100)].into_iter().collect();
        assert!(bridging_snapshots(&snaps, &whole, &keep).is_empty());
        // Pieces that continue each other form one run: the bridge may lie
        // in a later piece of it.
        let split = [piece(11, 40), piece(50, 55), piece(56, 120)];
        let late: Vec<SnapshotRef> = [(0, 10), (2, 58), (3, 100)]
            .iter()
            .map(|(d, seq)| snap(*d, 0, *seq))
            .collect();
        let keep: HashSet<String> = [late[0].name.clone(), late[2].name.clone()]
            .into_iter()
            .collect();
        assert_eq!(
            bridging_snapshots(&late, &split, &keep),
            vec![late[1].name.clone()]
        );
        let keep: HashSet<String> = [name(10), name(100)].into_iter().collect();
        // Two gaps, two bridges.
        let two = [piece(11, 40), piece(50, 55), piece(61, 120)];
        assert_eq!(
            bridging_snapshots(&snaps, &two, &keep),
            vec![name(49), name(60)]
        );
    }
}
