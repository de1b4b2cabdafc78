//! Point-in-time restore from an archive alone, with no daemon running.
//!
//! The plan: the newest snapshot at or before the target, then the archived
//! log records after it up to the target. It is carried out through the
//! same code a follower uses: a scratch dataset (next to the target, on the
//! same filesystem) gets the snapshot's namespace installed as a state
//! transfer, staged a page at a time so it is never held whole (then
//! checked against the snapshot's digest), its chunks recorded by
//! metadata alone (the BLAKE3 of their sealed bytes that the authenticated
//! manifest pages record), then the records appended as replicated records
//! (rebuilt from the pieces and the chunks they brought, their hash chain
//! checked against the snapshot's chain hash and each piece's end hash).
//! Finally the ordinary restore writes the tree from the scratch dataset
//! while the snapshot's chunks stream in from the store (neighbours in a
//! pack in one ranged read, `packs.rs`), each checked against its recorded
//! hash, decrypted, checked against its id and written where the tree uses
//! it; the final digest is compared. The scratch dataset is removed
//! afterwards.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use futures::stream::StreamExt;
use tokio::runtime::Handle;
use vault::state::Applied;
use vault::{ChunkId, Dataset, DatasetKey, SealedChunk};

use crate::archiver::{list_snapshots, read_manifest, read_piece};
use crate::error::{ArchiveError, Result};
use crate::objects::{self, PieceRef, SnapshotRef};
use crate::packs::{Fetched, Located, Want};
use crate::store::Store;

/// The point to restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    Latest,
    Seq(u64),
    /// Unix time in ns: the last record committed at or before it.
    Time(i64),
}

impl std::str::FromStr for At {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<At, String> {
        if s == "latest" {
            return Ok(At::Latest);
        }
        if let Some(n) = s.strip_prefix("seq:") {
            return n.parse().map(At::Seq).map_err(|e| format!("--at {s}: {e}"));
        }
        if let Ok(n) = s.parse::<u64>() {
            return Ok(At::Seq(n));
        }
        let t = chrono::DateTime::parse_from_rfc3339(s).map_err(|e| {
            format!(
                "--at {s}: expected `latest`, a seq (`1234` or `seq:1234`) or an RFC 3339 time \
                 such as 2026-11-27T10:00:00Z ({e})"
            )
        })?;
        t.timestamp_nanos_opt()
            .map(At::Time)
            .ok_or_else(|| format!("--at {s}: time out of range"))
    }
}

/// Progress of a restore, for a progress bar.
#[derive(Debug, Clone, Copy)]
pub enum Progress {
    /// Chunks of the snapshot downloaded (done, total).
    Chunks(u64, u64),
    /// Log records replayed (done, to replay).
    Records(u64, u64),
    /// Bytes written to the target.
    Written(u64),
}

/// What a restore from the archive did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ArchiveRestore {
    pub snapshot: Option<String>,
    pub snapshot_seq: u64,
    pub replayed_records: u64,
    pub seq: u64,
    pub time_ns: i64,
    pub chunks_downloaded: u64,
    pub bytes_downloaded: u64,
    /// Wall time of each phase: the snapshot's namespace into the scratch
    /// copy, the log replay, writing the tree as its chunks download (with
    /// its checks and digest).
    pub seconds_snapshot: f64,
    pub seconds_replay: f64,
    pub seconds_write: f64,
    /// Newer snapshots passed over because they did not read back whole.
    pub skipped_snapshots: Vec<String>,
    /// The archive's authenticated head (`HEAD`), when it has one.
    pub head_seq: Option<u64>,
    /// The fingerprint of the key whose signature on the head was checked
    /// (`Restorer::head_signer`).
    pub head_signed_by: Option<String>,
    /// How many of the given checkpoints the restored history covered, all
    /// of which it matched.
    pub checkpoints_compared: u64,
    /// What the restore could not prove about the archive, said loudly by
    /// every caller: no authenticated head, records past it, records whose
    /// time is not sealed (written before 0.2).
    pub warnings: Vec<String>,
    pub report: vault::restore::Report,
}

/// The snapshot a restore starts from, and its manifest.
type Start = (SnapshotRef, objects::Manifest);

/// Chunks of a snapshot the archive holds nowhere: counted, and the first
/// few named (a store that lost everything would otherwise make an error
/// of millions of lines).
#[derive(Default)]
struct Absent {
    /// Each counted once (pages list a chunk on every page that names it).
    ids: HashSet<ChunkId>,
    count: usize,
    lines: Vec<String>,
}

impl Absent {
    const NAMED: usize = 20;

    fn note(&mut self, id: ChunkId, line: impl FnOnce() -> String) {
        if !self.ids.insert(id) {
            return;
        }
        self.count += 1;
        if self.lines.len() < Self::NAMED {
            self.lines.push(line());
        }
    }
}

pub struct Restorer<'a> {
    pub rt: &'a Handle,
    pub store: &'a Store,
    pub dataset: &'a str,
    pub key: &'a DatasetKey,
    pub concurrency: usize,
    /// A second source of truth for `latest`: the archive must reach at
    /// least this seq (another site's head, or what this site shipped), or
    /// the restore fails as a rollback.
    pub expect_seq: Option<u64>,
    /// A site's own checkpoints of the dataset (a drill passes its site's):
    /// each is checked under the dataset's key, and the restored history
    /// must agree with every one it covers.
    pub checkpoints: &'a [vault::state::Checkpoint],
    /// Bring an existing tree at the target to the restored state, reading
    /// the chunks it already holds instead of downloading them
    /// (`vault::restore::restore_from`); otherwise the target must be
    /// missing or empty.
    pub delta: bool,
    /// The key that signs this archive's heads (`[evidence]`; a drill of a
    /// site's own archive passes its own): the head must carry a good
    /// signature by it, or the restore fails. None: a signature is not
    /// looked at (the seal authenticates the head to key holders).
    pub head_signer: Option<&'a vault::signing::EvidenceKey>,
}

impl Restorer<'_> {
    /// Restores the dataset as of `at` into `to`, holding a lease on the
    /// archive meanwhile so that no prune deletes what it reads
    /// (`crate::lease`).
    pub fn restore(
        &self,
        at: At,
        to: &Path,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<ArchiveRestore> {
        std::thread::scope(|scope| {
            let mut warnings = Vec::new();
            let _lease = crate::lease::take_reader(
                scope,
                self.rt,
                self.store,
                self.dataset,
                "restore",
                &mut warnings,
            )?;
            let mut out = self.restore_leased(at, to, progress)?;
            warnings.append(&mut out.warnings);
            out.warnings = warnings;
            Ok(out)
        })
    }

    fn restore_leased(
        &self,
        at: At,
        to: &Path,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<ArchiveRestore> {
        let ds_name = self.dataset;
        let keys = self.key.derive();
        // Refuse a target that cannot take the restore before downloading
        // anything.
        if self.delta {
            check_delta_target(to)?;
        } else {
            refuse_non_empty(to)?;
        }
        // The head is read before anything is listed: a piece is always in
        // the store before the head that counts it, so a head ahead of the
        // listing means objects were removed, not that a ship raced us.
        let head = self.read_head(&keys)?;
        // The history the head names: pieces and snapshots a former
        // primary archived past a fork point are passed over.
        let starts = head.as_ref().map(|h| h.starts.clone()).unwrap_or_default();
        let (snaps, pieces, newest) = self.list_archive(&starts)?;
        let mut warnings = Vec::new();
        self.judge_head(head.as_ref(), newest, at, &mut warnings)?;
        self.check_expected(at, newest)?;
        let target_seq = resolve_target(at, newest, &pieces)?;

        // Where every chunk is: packs (one index read each) and chunk
        // objects (one listing).
        let located = self.rt.block_on(Located::load_places(
            self.store,
            &keys,
            ds_name,
            self.concurrency,
        ))?;
        let mut out = ArchiveRestore {
            snapshot: None,
            snapshot_seq: 0,
            replayed_records: 0,
            seq: 0,
            time_ns: 0,
            chunks_downloaded: 0,
            seconds_snapshot: 0.0,
            seconds_replay: 0.0,
            seconds_write: 0.0,
            skipped_snapshots: Vec::new(),
            head_seq: head.as_ref().map(|h| h.seq),
            head_signed_by: head.as_ref().and(self.head_signer).map(|k| k.fingerprint()),
            checkpoints_compared: 0,
            warnings,
            bytes_downloaded: 0,
            report: vault::restore::Report::default(),
        };
        // Said even when this restore needs none of their chunks.
        for d in &located.damaged {
            out.warnings
                .push(format!("a pack does not read back: {}", d.why));
        }
        out.warnings.extend(located.warnings.iter().cloned());

        // The snapshot to start from: the newest at or before the target
        // that reads back whole. A damaged one is skipped (and reported) in
        // favour of an older one plus more of the log. Its pages are checked
        // as they are installed, a page at a time: one that does not read
        // back starts the fill again from an older snapshot.
        let mut passed: HashSet<String> = HashSet::new();
        let (scratch, ds, needed) = loop {
            let start = self.choose_start(
                &keys,
                &snaps,
                target_seq,
                at,
                &mut passed,
                &mut out.skipped_snapshots,
            )?;
            let from_seq = start.as_ref().map(|(s, _)| s.seq).unwrap_or(0);
            // The log pieces after it must cover (from_seq, target] without
            // a gap.
            let needed = needed_pieces(&pieces, from_seq, target_seq);
            check_log_covers(
                &needed,
                from_seq,
                target_seq,
                start.as_ref(),
                &snaps,
                &out.skipped_snapshots,
            )?;
            let scratch = scratch_dir(to)?;
            let ds = Arc::new(Dataset::open(
                scratch.path(),
                ds_name,
                self.key,
                vault::Options {
                    create: true,
                    release_pins: false,
                    ..vault::Options::default()
                },
            )?);
            // The scratch copy takes the records of that history's epochs,
            // and refuses one of a stale epoch as a follower does.
            if !starts.is_empty() {
                ds.set_fence(vault::Fence {
                    starts: starts.clone(),
                    ..vault::Fence::default()
                });
            }
            out.snapshot_seq = from_seq;
            let Some((s, m)) = start else {
                break (scratch, ds, needed);
            };
            let t = std::time::Instant::now();
            let installed = self.install_snapshot(&ds, &keys, &located, &s, m, &mut out);
            out.seconds_snapshot = t.elapsed().as_secs_f64();
            match installed {
                Ok(None) => break (scratch, ds, needed),
                Ok(Some(e)) => {
                    tracing::warn!(snapshot = %s.name, error = %e, "skipping a damaged snapshot; trying an older one");
                    out.skipped_snapshots
                        .push(format!("snapshot {}: {e}", s.name));
                    passed.insert(s.name.clone());
                    let _ = ds.close();
                }
                Err(e) => {
                    let _ = ds.close();
                    return Err(e);
                }
            }
        };
        let r = self
            .fill(&ds, &located, &needed, target_seq, at, &mut out, progress)
            .and_then(|cut_checked| {
                self.check_reached(&ds, head.as_ref(), &pieces, at, cut_checked, &mut out)
            })
            .and_then(|()| self.check_checkpoints(&ds, &keys, &mut out));
        let closed = ds.close();
        r?;
        closed?;
        drop(ds);
        let t = std::time::Instant::now();
        let view = vault::View::open(scratch.path(), ds_name, self.key)?;
        out.seq = view.applied().seq;
        out.time_ns = view.applied().time_ns;
        out.report = self.write_tree(&view, &located, to, &mut out, progress)?;
        out.seconds_write = t.elapsed().as_secs_f64();
        Ok(out)
    }

    /// Restore step: writes the tree the scratch copy holds into `to`, the
    /// chunks it holds only by their metadata (the snapshot's) downloaded
    /// while the files are written. A chunk that does not arrive whole
    /// fails the restore, every one named; the files that did not need it
    /// are in place, and the report names the rest.
    fn write_tree(
        &self,
        view: &vault::View,
        located: &Located,
        to: &Path,
        out: &mut ArchiveRestore,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<vault::restore::Report> {
        let mut fatal: Option<ArchiveError> = None;
        let mut damaged: Vec<String> = Vec::new();
        let mut damaged_seen: HashSet<String> = HashSet::new();
        let held = |id: &ChunkId| view.state().has_chunk_bytes(id).unwrap_or(false);
        // Called once per batch of the tree the restore writes: the counts
        // run over the whole restore.
        let (mut done, mut total) = (0u64, 0u64);
        let mut fetch = |want: Vec<(ChunkId, vault::state::ChunkMeta)>,
                         deliver: &mut dyn FnMut(ChunkId, Vec<u8>)| {
            if fatal.is_some() {
                // The store failed: the rest of the tree is not fetched.
                return Vec::new();
            }
            total += want.len() as u64;
            let want = want
                .into_iter()
                .map(|(id, m)| (id, m.plain_len, m.sealed_hash))
                .collect();
            match self.download(located, want, out, &mut |c| {
                done += 1;
                progress(Progress::Chunks(done, total));
                deliver(c.id, c.sealed);
                Ok(())
            }) {
                // A chunk needed by several batches fails in each.
                Ok(bad) => {
                    for b in bad {
                        if damaged_seen.insert(b.clone()) {
                            damaged.push(b);
                        }
                    }
                }
                Err(e) => fatal = Some(e),
            }
            // Named in the error below, not once per file.
            Vec::new()
        };
        let report = vault::restore::restore_from(
            view,
            to,
            Some(vault::restore::Remote {
                held: &held,
                fetch: &mut fetch,
            }),
            vault::restore::RestoreOptions {
                delta: self.delta,
                ..vault::restore::RestoreOptions::default()
            },
            &|b| progress(Progress::Written(b)),
        )?;
        if let Some(e) = fatal {
            return Err(e);
        }
        if !damaged.is_empty() {
            // The files left out are named in the error: the report that
            // lists them is not returned with it.
            const NAMED: usize = 20;
            let left_out: Vec<&str> = report
                .problems
                .iter()
                .take(NAMED)
                .map(String::as_str)
                .collect();
            return Err(ArchiveError::Damaged {
                key: format!(
                    "{} chunk object(s) of the restored tree; the rest of the tree is in {}",
                    damaged.len(),
                    to.display()
                ),
                reason: format!(
                    "{}; {} path(s) not restored{}: {}",
                    damaged.join("; "),
                    report.problems.len(),
                    if report.problems.len() > NAMED {
                        format!(", the first {NAMED}")
                    } else {
                        String::new()
                    },
                    left_out.join("; ")
                ),
            });
        }
        Ok(report)
    }

    /// Restore step: lists the archive's snapshots (oldest first) and log
    /// pieces, refusing an archive that holds neither, and returns them with
    /// the newest seq they reach.
    fn list_archive(
        &self,
        starts: &[(u64, u64)],
    ) -> Result<(Vec<SnapshotRef>, Vec<PieceRef>, u64)> {
        let ds_name = self.dataset;
        let snaps: Vec<SnapshotRef> = list_snapshots(self.rt, self.store, ds_name)?
            .into_iter()
            .filter(|s| s.follows(starts))
            .collect();
        let pieces: Vec<PieceRef> = self
            .rt
            .block_on(self.store.list(&objects::log_prefix(ds_name)))?
            .iter()
            .filter_map(|l| PieceRef::parse(&l.key))
            .filter_map(|p| p.follow(starts))
            .collect();
        if snaps.is_empty() && pieces.is_empty() {
            return Err(ArchiveError::NoRestorePoint(format!(
                "{} holds no snapshot and no log of dataset {ds_name}",
                self.store.url()
            )));
        }
        let newest = pieces
            .iter()
            .map(|p| p.upto)
            .max()
            .max(snaps.iter().map(|s| s.seq).max())
            .unwrap_or(0);
        Ok((snaps, pieces, newest))
    }

    /// Restore step: for `latest`, the archive must reach at least
    /// [`Restorer::expect_seq`]; reaching less means its newest objects were
    /// removed or replaced (a rollback), and nothing is restored.
    fn check_expected(&self, at: At, newest: u64) -> Result<()> {
        if let (At::Latest, Some(n)) = (at, self.expect_seq) {
            if newest < n {
                return Err(ArchiveError::NoRestorePoint(format!(
                    "ROLLBACK: {} reaches seq {newest}, but at least seq {n} was expected of it \
                     (--expect-seq, or what the site that writes it shipped): its newest objects \
                     were removed or replaced by older ones; nothing was restored",
                    self.store.url()
                )));
            }
        }
        Ok(())
    }

    /// Restore step: the newest of `snaps` at or before `target_seq` (and,
    /// for a time, taken of a point at or before it), not in `passed`,
    /// whose manifest reads back, with that manifest; or `None` to start
    /// from an empty dataset. Each damaged or missing manifest passed over
    /// on the way is described in `skipped` (its pages are checked as they
    /// are installed).
    fn choose_start(
        &self,
        keys: &vault::Keys,
        snaps: &[SnapshotRef],
        target_seq: u64,
        at: At,
        passed: &mut HashSet<String>,
        skipped: &mut Vec<String>,
    ) -> Result<Option<Start>> {
        for s in snaps.iter().rev().filter(|s| s.seq <= target_seq) {
            if passed.contains(&s.name) {
                continue;
            }
            let m = match read_manifest(self.rt, self.store, keys, self.dataset, s) {
                Ok(m) => m,
                Err(e @ (ArchiveError::Damaged { .. } | ArchiveError::Missing { .. })) => {
                    tracing::warn!(snapshot = %s.name, error = %e, "skipping a damaged snapshot; trying an older one");
                    skipped.push(format!("snapshot {}: {e}", s.name));
                    passed.insert(s.name.clone());
                    continue;
                }
                Err(e) => return Err(e),
            };
            if let At::Time(t) = at {
                if m.time_ns > t {
                    continue;
                }
            }
            return Ok(Some((s.clone(), m)));
        }
        Ok(None)
    }

    /// Reads the archive's authenticated head, which must have been written
    /// by the site that owns the archive (a head copied from another site's
    /// archive of the dataset is refused).
    fn read_head(&self, keys: &vault::Keys) -> Result<Option<objects::Head>> {
        let key = objects::head_key(self.dataset);
        let Some(b) = self
            .rt
            .block_on(self.store.get(&key, objects::MAX_SMALL_OBJECT_BYTES))?
        else {
            return Ok(None);
        };
        let head = objects::decode_head(keys, &key, &b).map_err(|e| self.store.locate_err(e))?;
        if let Some(signer) = self.head_signer {
            let refused = |why: String| ArchiveError::Damaged {
                key: self.store.locate(&key),
                reason: why,
            };
            let parts = vault::signing::split_signed(&b).ok_or_else(|| {
                refused(format!(
                    "carries no signature, but {} signs this archive's heads (a head written \
                     before [evidence] was set is signed again at the next shipment or snapshot)",
                    signer.fingerprint()
                ))
            })?;
            signer.verify_object(&parts).map_err(|e| {
                refused(format!(
                    "its signature is not by {}: {e}; someone holding the dataset key, not this \
                     site, wrote it",
                    signer.fingerprint()
                ))
            })?;
        }
        let owner_key = objects::owner_key(self.dataset);
        if let Some(owner) = self
            .rt
            .block_on(self.store.get(&owner_key, objects::MAX_SMALL_OBJECT_BYTES))?
        {
            if owner != head.site.as_bytes() {
                return Err(ArchiveError::Damaged {
                    key: self.store.locate(&key),
                    reason: format!(
                        "written by site {}, but the archive belongs to site {}: a head copied \
                         from another archive",
                        head.site,
                        String::from_utf8_lossy(&owner)
                    ),
                });
            }
        }
        Ok(Some(head))
    }

    /// Compares the archive's head with the newest seq its snapshots and
    /// pieces reach: fewer is a rollback (an error for `latest`); no head,
    /// or records past it, are warnings.
    fn judge_head(
        &self,
        head: Option<&objects::Head>,
        newest: u64,
        at: At,
        warnings: &mut Vec<String>,
    ) -> Result<()> {
        let key = objects::head_key(self.dataset);
        match head {
            None => warnings.push(format!(
                "{} has no authenticated head record: a removal of the archive's newest objects \
                 cannot be noticed from the archive alone; compare the restored seq with another \
                 site's (--expect-seq)",
                self.store.locate(&key)
            )),
            // An older point can still be restored from what is left.
            Some(h) if h.seq > newest && at != At::Latest => warnings.push(format!(
                "the archive's authenticated head is seq {}, but its snapshots and log reach \
                 only seq {newest}: its newest objects were removed",
                h.seq
            )),
            Some(h) if h.seq > newest => {
                return Err(ArchiveError::NoRestorePoint(format!(
                "ROLLBACK: the archive's authenticated head is seq {} (written by site {}), but \
                     its snapshots and log reach only seq {newest}: its newest objects were \
                     removed; nothing was restored",
                h.seq, h.site
            )))
            }
            Some(h) if h.seq < newest => warnings.push(format!(
                "the archive holds records up to seq {newest}, past its authenticated head at seq \
                 {} (an interrupted update of {}); the records themselves are sealed",
                h.seq,
                self.store.locate(&key)
            )),
            Some(_) => {}
        }
        Ok(())
    }

    /// After the replay: every given checkpoint must carry valid evidence,
    /// and the restored history must agree with each one in its range (the
    /// chain hash at its seq, and the digest where the restore itself
    /// checkpointed there). An archive that verifies on its own but parts
    /// from the history this site authenticated fails here.
    fn check_checkpoints(
        &self,
        ds: &Dataset,
        keys: &vault::Keys,
        out: &mut ArchiveRestore,
    ) -> Result<()> {
        let reached = ds.head_seq();
        for c in self.checkpoints {
            if !c.verify(keys) {
                return Err(ArchiveError::NoRestorePoint(format!(
                    "this site's checkpoint at seq {} fails its HMAC-SM3 under the dataset's \
                     key: the site's own evidence was altered, so the archive cannot be \
                     compared with it (run `triad verify --scrub` here)",
                    c.seq
                )));
            }
            if c.seq < out.snapshot_seq || c.seq > reached {
                continue;
            }
            let Some(hash) = ds.chain_hash_at(c.seq)? else {
                continue;
            };
            let digest_differs = ds
                .checkpoint_at(c.seq)?
                .is_some_and(|mine| mine.digest != c.digest);
            if hash != c.hash || digest_differs {
                return Err(ArchiveError::Damaged {
                    key: self.store.locate(&format!("{}/", self.dataset)),
                    reason: format!(
                        "the archived history differs from this site's authenticated checkpoint \
                         at seq {}: the archive holds {} where the site holds {}",
                        c.seq,
                        if hash != c.hash {
                            format!("chain hash {}", hex::encode(hash))
                        } else {
                            "another digest".to_string()
                        },
                        if hash != c.hash {
                            hex::encode(c.hash)
                        } else {
                            "its own".to_string()
                        }
                    ),
                });
            }
            out.checkpoints_compared += 1;
        }
        Ok(())
    }

    /// After the replay: the chain at the head's seq must be the head's,
    /// and a restore to a time must not have stopped early on names alone
    /// (a piece renamed to end later than it does): the record after the
    /// restored point must be sealed with a later time. `cut_checked` says
    /// the replay already checked that record (it stopped inside a piece),
    /// so its piece is not fetched again.
    fn check_reached(
        &self,
        ds: &Dataset,
        head: Option<&objects::Head>,
        pieces: &[PieceRef],
        at: At,
        cut_checked: bool,
        out: &mut ArchiveRestore,
    ) -> Result<()> {
        let reached = ds.head_seq();
        if let Some(h) = head.filter(|h| h.seq <= reached) {
            match ds.chain_hash_at(h.seq)? {
                Some(c) if c == h.chain_hash => {}
                Some(c) => {
                    return Err(ArchiveError::Damaged {
                        key: self.store.locate(&objects::head_key(self.dataset)),
                        reason: format!(
                            "the archived history reaches chain hash {} at seq {}, but the \
                             authenticated head records {}: the log was altered",
                            hex::encode(c),
                            h.seq,
                            hex::encode(h.chain_hash)
                        ),
                    })
                }
                None => {}
            }
        }
        let At::Time(t) = at else { return Ok(()) };
        if cut_checked {
            return Ok(());
        }
        if let Some(p) = pieces
            .iter()
            .find(|p| p.first <= reached + 1 && p.upto > reached)
        {
            let piece = read_piece(self.rt, self.store, &p.key, "a log piece")?;
            if let Some(r) = piece.records.iter().find(|r| r.seq == reached + 1) {
                self.check_cut(r, t, &p.key, out)?;
            }
        }
        Ok(())
    }

    /// The first record left out of a restore to time `t` must really be
    /// later than `t`: its time is checked against its seal.
    fn check_cut(
        &self,
        r: &objects::PieceRecord,
        t: i64,
        piece: &str,
        out: &mut ArchiveRestore,
    ) -> Result<()> {
        let keys = self.key.derive();
        let damaged = |reason: String| ArchiveError::Damaged {
            key: self.store.locate(piece),
            reason,
        };
        let rec = r
            .header_record()
            .ok_or_else(|| damaged(format!("record {} does not decode", r.seq)))?;
        match rec.header_authenticated(&keys) {
            Ok(true) if rec.time_ns > t => Ok(()),
            Ok(true) => Err(damaged(format!(
                "record {} was committed at or before the requested time, but the piece's name \
                 ended the restore before it: the archive's names were altered",
                r.seq
            ))),
            Ok(false) => {
                out.warnings.push(format!(
                    "record {} (written before 0.2) does not seal its commit time: that the \
                     restore stopped at the requested time rests on unauthenticated times",
                    r.seq
                ));
                Ok(())
            }
            Err(e) => Err(damaged(format!(
                "record {}, the first after the requested time: {e}",
                r.seq
            ))),
        }
    }

    /// Downloads chunks (ranged reads of packs, merging neighbours, and
    /// chunk objects, in parallel), checks each against the BLAKE3 of its
    /// sealed bytes recorded in the (authenticated) manifest or piece, and
    /// hands the good ones to `sink`. Every missing or damaged chunk is
    /// named in one error. Decrypting, and the check of each chunk against
    /// its id, happen once, when the file is written (`vault::restore`).
    fn download(
        &self,
        located: &Located,
        want: Vec<(ChunkId, u32, [u8; 32])>,
        out: &mut ArchiveRestore,
        sink: &mut dyn FnMut(SealedChunk) -> Result<()>,
    ) -> Result<Vec<String>> {
        let want = want
            .into_iter()
            .map(|(id, plain_len, hash)| Want {
                id,
                plain_len,
                hash,
            })
            .collect();
        let mut results = Box::pin(located.fetch(self.store, self.dataset, want, self.concurrency));
        let mut damaged = Vec::new();
        while let Some(r) = self.rt.block_on(results.next()) {
            match r {
                Fetched::Good(c) => {
                    out.chunks_downloaded += 1;
                    out.bytes_downloaded += c.sealed.len() as u64;
                    sink(c)?;
                }
                Fetched::Bad {
                    at,
                    reason,
                    missing: true,
                    ..
                } => damaged.push(format!("{at}: missing ({reason})")),
                Fetched::Bad { at, reason, .. } => damaged.push(format!("{at}: {reason}")),
            }
        }
        Ok(damaged)
    }

    #[allow(clippy::too_many_arguments)]
    fn fill(
        &self,
        ds: &Dataset,
        located: &Located,
        pieces: &[&PieceRef],
        target_seq: u64,
        at: At,
        out: &mut ArchiveRestore,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<bool> {
        let from_seq = out.snapshot_seq;
        // Whether the first record after the restored point was checked
        // (a restore to a time that stopped inside a piece).
        let mut cut_checked = false;
        let t = std::time::Instant::now();
        let to_replay = target_seq.saturating_sub(from_seq);
        for p in pieces {
            let piece = self.read_named_piece(p)?;
            // Only the records this restore applies: after what the scratch
            // copy holds, up to the target.
            let head = ds.head_seq();
            let skip = piece.records.iter().take_while(|r| r.seq <= head).count();
            let past = |r: &objects::PieceRecord| {
                r.seq > target_seq || matches!(at, At::Time(t) if r.time_ns > t)
            };
            // Up to the target, and within this history (`upto`).
            let take = piece.records[skip..]
                .iter()
                .take_while(|r| r.seq <= p.upto && !past(r))
                .count();
            let stop = piece.records.get(skip + take).is_some_and(past);
            if let (true, At::Time(t)) = (stop, at) {
                // Whether the names' target or the time stopped it, the
                // record left out must be sealed later than the time.
                self.check_cut(&piece.records[skip + take], t, &p.key, out)?;
                cut_checked = true;
            }
            let records = &piece.records[skip..skip + take];
            extend_history(ds, records);
            let fetched = self.fetch_attachments(ds, located, p, records, out)?;
            let batch = self.rebuild_payloads(ds, p, records, &fetched)?;
            piece.check_chain(&self.store.locate(&p.key), skip, &batch)?;
            let n = batch.len() as u64;
            if n > 0 {
                ds.append_replicated(batch).map_err(|e| {
                    ArchiveError::Submit(format!("replaying log piece {}: {e}", p.key))
                })?;
                out.replayed_records += n;
                progress(Progress::Records(out.replayed_records, to_replay));
            }
            if stop {
                break;
            }
        }
        out.seconds_replay = t.elapsed().as_secs_f64();
        if !matches!(at, At::Time(_)) && ds.head_seq() != target_seq {
            return Err(ArchiveError::NoRestorePoint(format!(
                "the archive's snapshots and log reached seq {}, not the target {target_seq}",
                ds.head_seq()
            )));
        }
        Ok(cut_checked)
    }

    /// Fill step: installs snapshot `s` (whose manifest is `m`) into the
    /// scratch dataset as a state transfer, a page at a time, so the
    /// namespace is never held whole: each page is read and checked
    /// against the manifest, its chunks recorded by their metadata alone
    /// (their bytes are written into the tree straight from the store,
    /// [`Restorer::write_tree`]) and its entries staged; then the namespace
    /// is checked against the snapshot's digest and installed. Returns the
    /// error of a page that does not read back (the snapshot is then passed
    /// over for an older one). A chunk the archive holds nowhere fails the
    /// restore before anything is written, all of them counted.
    fn install_snapshot(
        &self,
        ds: &Dataset,
        keys: &vault::Keys,
        located: &Located,
        s: &SnapshotRef,
        m: objects::Manifest,
        out: &mut ArchiveRestore,
    ) -> Result<Option<ArchiveError>> {
        let store = self.store;
        let mut pages = Box::pin(
            futures::stream::iter(m.pages.iter().enumerate().map(|(n, p)| {
                let key = m.page_key(self.dataset, s, n);
                async move {
                    let b = store
                        .get_required(&key, "a page of the snapshot", p.sealed_len)
                        .await?;
                    objects::decode_page(keys, &key, &b, p).map_err(|e| store.locate_err(e))
                }
            }))
            .buffered(self.concurrency.max(1)),
        );
        let mut absent = Absent::default();
        while let Some(page) = self.rt.block_on(pages.next()) {
            let page = match page {
                Ok(p) => p,
                Err(e @ (ArchiveError::Damaged { .. } | ArchiveError::Missing { .. })) => {
                    return Ok(Some(e))
                }
                Err(e) => return Err(e),
            };
            // The plaintext length of each chunk the page's table lists
            // comes from the page's entries, which name every one of them.
            let lens: HashMap<ChunkId, u32> = page
                .entries
                .iter()
                .flat_map(|(_, e)| e.chunks().iter().map(|c| (c.id, c.len)))
                .collect();
            let listed: HashSet<ChunkId> = page.chunks.iter().map(|(id, _)| *id).collect();
            // A chunk an entry names must be listed on this page or an
            // earlier one (older snapshots list it only on the first).
            for id in lens.keys().filter(|id| !listed.contains(*id)) {
                if !ds.has_chunk(id)? {
                    return Ok(Some(ArchiveError::Damaged {
                        key: self.store.locate(&s.manifest_key(self.dataset)),
                        reason: format!(
                            "chunk {} has no recorded hash in the snapshot",
                            id.short()
                        ),
                    }));
                }
            }
            let rows = page
                .chunks
                .iter()
                .filter_map(|(id, h)| Some((*id, *lens.get(id)?, *h)));
            self.stage_chunks(ds, located, rows, &mut absent)?;
            ds.stage_transfer(&page.entries)?;
        }
        let pins = m.pins.iter().map(|(id, _, len, h)| (*id, *len, *h));
        self.stage_chunks(ds, located, pins, &mut absent)?;
        if absent.count > 0 {
            return Err(ArchiveError::Damaged {
                key: format!("{} chunk object(s) of snapshot {}", absent.count, s.name),
                reason: absent.lines.join("; "),
            });
        }
        let digest = vault::lthash::LtHash::try_from_bytes(&m.lthash).ok_or_else(|| {
            ArchiveError::Damaged {
                key: self.store.locate(&s.manifest_key(self.dataset)),
                reason: "the recorded digest does not decode".into(),
            }
        })?;
        let applied = Applied {
            seq: m.seq,
            hash: m.chain_hash,
            time_ns: m.time_ns,
            digest,
        };
        let pins: Vec<(ChunkId, u64)> = m.pins.iter().map(|(id, n, _, _)| (*id, *n)).collect();
        ds.install_staged(applied, pins)
            .map_err(|e| ArchiveError::Submit(format!("installing snapshot {}: {e}", s.name)))?;
        out.snapshot = Some(s.name.clone());
        Ok(None)
    }

    /// Fill step: records chunks of the snapshot (id, plaintext length and
    /// the BLAKE3 of the sealed bytes its pages record) in the scratch
    /// dataset by their metadata alone, each with the length the archive
    /// stores. One the archive holds nowhere is counted in `absent`.
    fn stage_chunks(
        &self,
        ds: &Dataset,
        located: &Located,
        rows: impl Iterator<Item = (ChunkId, u32, [u8; 32])>,
        absent: &mut Absent,
    ) -> Result<()> {
        let mut meta = Vec::new();
        for (id, plain_len, hash) in rows {
            match located.stored_len(&id) {
                Some(n) => meta.push((
                    id,
                    vault::state::ChunkMeta {
                        refs: 0,
                        plain_len,
                        // A listed length past u32 is no chunk's; its
                        // download fails its hash check.
                        sealed_len: u32::try_from(n).unwrap_or(u32::MAX),
                        sealed_hash: hash,
                    },
                )),
                None => absent.note(id, || {
                    format!(
                        "{}: missing ({})",
                        self.store.locate(&objects::chunk_key(self.dataset, &id)),
                        located.absent_reason()
                    )
                }),
            }
        }
        ds.stage_chunk_meta(&meta)?;
        Ok(())
    }

    /// Fill step: reads log piece `p` and checks that it holds exactly the
    /// seqs its name says, since the name is not authenticated.
    fn read_named_piece(&self, p: &PieceRef) -> Result<objects::Piece> {
        let piece = read_piece(self.rt, self.store, &p.key, "a log piece")?;
        // The name is not covered by the trailer: the content must agree.
        let (first, last) = (
            piece.records.first().map(|r| r.seq),
            piece.records.last().map(|r| r.seq),
        );
        if first != Some(p.first) || last != Some(p.last) {
            return Err(ArchiveError::Damaged {
                key: self.store.locate(&p.key),
                reason: format!(
                    "named for seqs {}-{} but holds {first:?}-{last:?}",
                    p.first, p.last
                ),
            });
        }
        Ok(piece)
    }

    /// Fill step: downloads (and checks) the chunks that `records` of piece
    /// `p` brought and the scratch dataset does not have yet, returning
    /// their sealed bytes by id. Any missing or damaged chunk object fails
    /// the restore, all of them named in one error.
    fn fetch_attachments(
        &self,
        ds: &Dataset,
        located: &Located,
        p: &PieceRef,
        records: &[objects::PieceRecord],
        out: &mut ArchiveRestore,
    ) -> Result<HashMap<ChunkId, Vec<u8>>> {
        // The chunks they brought, unless the scratch copy has them.
        let mut want = Vec::new();
        let mut seen = HashSet::new();
        for r in records {
            for (id, plain, _, hash) in &r.attachments {
                // A snapshot's chunk is recorded without its bytes, which
                // the record's payload needs.
                if seen.insert(*id) && !ds.state().has_chunk_bytes(id)? {
                    want.push((*id, *plain, *hash));
                }
            }
        }
        let mut fetched: HashMap<ChunkId, Vec<u8>> = HashMap::new();
        let damaged = self.download(located, want, out, &mut |c| {
            fetched.insert(c.id, c.sealed);
            Ok(())
        })?;
        if !damaged.is_empty() {
            return Err(ArchiveError::Damaged {
                key: format!(
                    "{} chunk object(s) of log piece {}",
                    damaged.len(),
                    self.store.locate(&p.key)
                ),
                reason: damaged.join("; "),
            });
        }
        Ok(fetched)
    }

    /// Fill step: rebuilds the logged payloads of `records` (of piece `p`),
    /// taking each attached chunk from `fetched` or else from the scratch
    /// dataset, ready to be appended as replicated records.
    fn rebuild_payloads(
        &self,
        ds: &Dataset,
        p: &PieceRef,
        records: &[objects::PieceRecord],
        fetched: &HashMap<ChunkId, Vec<u8>>,
    ) -> Result<Vec<Vec<u8>>> {
        let mut batch = Vec::with_capacity(records.len());
        for r in records {
            let in_scratch = |id: &ChunkId| ds.state().chunk_bytes(id);
            let mut lookup_error = None;
            let payload = r.payload(|id| {
                fetched.get(id).cloned().or_else(|| match in_scratch(id) {
                    Ok(b) => b,
                    Err(e) => {
                        lookup_error = Some(e);
                        None
                    }
                })
            });
            if let Some(e) = lookup_error {
                return Err(e.into());
            }
            batch.push(payload.ok_or_else(|| ArchiveError::Damaged {
                key: self.store.locate(&p.key),
                reason: format!(
                    "record {} brought a chunk that is neither in the store nor in what \
                     was restored so far",
                    r.seq
                ),
            })?);
        }
        Ok(batch)
    }
}

/// A record of an epoch newer than any the scratch copy's history holds
/// begins that epoch there (a head written before epochs were recorded, or
/// one not yet rewritten after the piece): the history only moves forward,
/// so a record of an older epoch after it is still refused as stale.
fn extend_history(ds: &Dataset, records: &[objects::PieceRecord]) {
    let mut fence = ds.fence();
    let mut moved = false;
    for r in records {
        let newest = fence.current();
        let last_start = fence.starts.last().map_or(0, |s| s.1);
        if r.epoch() > newest && r.seq >= last_start {
            fence.starts.push((r.epoch(), r.seq));
            moved = true;
        }
    }
    if moved {
        ds.set_fence(fence);
    }
}

/// Restore step: refuses a target directory that exists and is not empty.
fn refuse_non_empty(to: &Path) -> Result<()> {
    if std::fs::read_dir(to).is_ok_and(|mut d| d.next().is_some()) {
        return Err(ArchiveError::io(
            "restore target",
            to,
            std::io::Error::other("directory is not empty; restore into a new or empty directory"),
        ));
    }
    Ok(())
}

/// Restore step: a delta restore's target must be a directory (or not
/// exist yet), and never the filesystem's root.
fn check_delta_target(to: &Path) -> Result<()> {
    let refuse =
        |why: &str| ArchiveError::io("restore target", to, std::io::Error::other(why.to_string()));
    match std::fs::canonicalize(to) {
        Ok(p) if p == Path::new("/") => Err(refuse("a delta restore into / is refused")),
        Ok(p) if !p.is_dir() => Err(refuse("not a directory")),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ArchiveError::io("restore target", to, e)),
    }
}

/// Restore step: creates the scratch directory for the restore's scratch
/// dataset next to `to` (so on the same filesystem, and never inside it:
/// `--to .` or `..` name the directory itself), creating the target's
/// parent first. It is removed when dropped.
fn scratch_dir(to: &Path) -> Result<tempfile::TempDir> {
    let whole = std::fs::canonicalize(to)
        .or_else(|_| std::path::absolute(to))
        .map_err(|e| ArchiveError::io("restore target", to, e))?;
    let parent = whole
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("/"));
    std::fs::create_dir_all(parent)
        .map_err(|e| ArchiveError::io("creating the restore target's parent", parent, e))?;
    let scratch = tempfile::Builder::new()
        .prefix(".triad-restore-")
        .tempdir_in(parent)
        .map_err(|e| ArchiveError::io("creating a scratch directory in", parent, e))?;
    Ok(scratch)
}

/// Restore step: the seq to restore to, given the newest seq the archive
/// reaches. For a time, the end of the first piece ending after it (the
/// replay stops at the time itself).
fn resolve_target(at: At, newest: u64, pieces: &[PieceRef]) -> Result<u64> {
    let target_seq = match at {
        At::Latest => newest,
        At::Seq(n) if n > newest => {
            return Err(ArchiveError::NoRestorePoint(format!(
                "seq {n} is past the newest archived record ({newest})"
            )))
        }
        At::Seq(n) => n,
        // The log is needed at most to the end of the first piece that
        // ends after the time: it holds the last record at or before it.
        At::Time(t) => pieces
            .iter()
            .find(|p| p.last_time_ns > t)
            .map(|p| p.upto)
            .unwrap_or(newest),
    };
    Ok(target_seq)
}

/// Restore step: the log pieces that hold records after `from_seq` up to
/// `target_seq`, in seq order.
fn needed_pieces(pieces: &[PieceRef], from_seq: u64, target_seq: u64) -> Vec<&PieceRef> {
    let mut needed: Vec<&PieceRef> = pieces
        .iter()
        .filter(|p| p.upto > from_seq && p.first <= target_seq)
        .collect();
    needed.sort_by_key(|p| p.first);
    needed
}

/// Restore step: `needed` must cover (from_seq, target_seq] without a gap;
/// otherwise fails naming the points that can be restored (the snapshots,
/// and those skipped as damaged).
fn check_log_covers(
    needed: &[&PieceRef],
    from_seq: u64,
    target_seq: u64,
    start: Option<&Start>,
    snaps: &[SnapshotRef],
    skipped: &[String],
) -> Result<()> {
    // Seqs come from object names, so the arithmetic is checked: piece
    // names never reach u64::MAX (PieceRef::parse), a snapshot name may.
    let mut next = from_seq.checked_add(1).ok_or_else(|| {
        ArchiveError::NoRestorePoint(format!(
            "a snapshot claims seq {from_seq}, which no log reaches"
        ))
    })?;
    for p in needed {
        if p.first > next {
            break;
        }
        next = next.max(p.upto.saturating_add(1));
    }
    if next <= target_seq {
        return Err(ArchiveError::NoRestorePoint(format!(
            "the archived log has no record {next} (needed to go from {} to seq {target_seq}); \
             the nearest points that can be restored are the snapshots: {}{}",
            match start {
                Some((s, _)) => format!("snapshot {}", s.name),
                None => "an empty dataset".into(),
            },
            snaps
                .iter()
                .map(|s| s.seq.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            if skipped.is_empty() {
                String::new()
            } else {
                format!("; skipped as damaged: {}", skipped.join("; "))
            }
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archiver::Archiver;
    use crate::store::StoreConfig;

    /// A dataset of `n` one-file records archived to a `file://` store under
    /// `dir`; returns the store and the dataset's checkpoints.
    fn archived(
        dir: &Path,
        key: &DatasetKey,
        n: u64,
    ) -> (
        tokio::runtime::Runtime,
        Store,
        Vec<vault::state::Checkpoint>,
    ) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let ds = created(&dir.join("site"), key);
        let url = format!("file://{}", dir.join("bucket").display());
        let store = Arc::new(Store::open(&StoreConfig::new(&url)).unwrap());
        let a = Archiver::open(store, rt.handle().clone(), ds.clone(), "a", 2).unwrap();
        for i in 1..=n {
            put(&ds, &format!("f{}", i % 7), &format!("record {i}\n"));
        }
        a.ship_log().unwrap();
        let cps = ds.state().checkpoints().unwrap();
        drop(a);
        ds.close().unwrap();
        (rt, Store::open(&StoreConfig::new(&url)).unwrap(), cps)
    }

    #[test]
    fn a_checkpoint_whose_evidence_fails_is_refused_and_a_good_one_is_matched() {
        let dir = tempfile::tempdir().unwrap();
        let key = DatasetKey::generate();
        let n = vault::state::CHECKPOINT_INTERVAL + 3;
        let (rt, store, cps) = archived(dir.path(), &key, n);
        assert!(!cps.is_empty(), "no checkpoint after {n} records");
        let restore = |cps: &[vault::state::Checkpoint], to: &str| {
            Restorer {
                checkpoints: cps,
                ..restorer(rt.handle(), &store, &key)
            }
            .restore(At::Latest, &dir.path().join(to), &|_| {})
        };
        let r = restore(&cps, "good").unwrap();
        assert_eq!(r.checkpoints_compared, cps.len() as u64);
        let mut forged = cps.clone();
        forged[0].hmac_sm3[0] ^= 1;
        let e = restore(&forged, "forged").unwrap_err().to_string();
        assert!(e.contains("fails its HMAC-SM3"), "{e}");
        // A checkpoint with a valid tag under another key is refused too.
        let other = vault::state::Checkpoint::new(
            &DatasetKey::generate().derive(),
            cps[0].seq,
            cps[0].hash,
            cps[0].digest,
        );
        let e = restore(&[other], "other-key").unwrap_err().to_string();
        assert!(e.contains("fails its HMAC-SM3"), "{e}");
    }

    fn put(ds: &Dataset, path: &str, data: &str) {
        let id = ChunkId::of(ds.keys(), data.as_bytes());
        let entry = vault::Entry {
            node: vault::Node::File {
                chunks: vec![vault::ChunkRef {
                    id,
                    len: data.len() as u32,
                }],
            },
            mode: 0o644,
            mtime_ns: 0,
            size: data.len() as u64,
            ext: None,
        };
        ds.submit(
            vec![vault::Op::Put {
                path: path.as_bytes().to_vec(),
                entry,
            }],
            vec![vault::chunk::seal(ds.keys(), id, data.as_bytes())],
        )
        .unwrap();
    }

    #[test]
    fn a_snapshot_of_an_unchanged_state_names_the_pages_before_it_and_prune_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let key = DatasetKey::generate();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let ds = created(&dir.path().join("site"), &key);
        let url = format!("file://{}", dir.path().join("bucket").display());
        let store = Arc::new(Store::open(&StoreConfig::new(&url)).unwrap());
        let a = Archiver::open(store.clone(), rt.handle().clone(), ds.clone(), "a", 2).unwrap();
        for i in 1..=30 {
            put(&ds, &format!("f{i}"), &format!("record {i}\n"));
        }
        a.ship_log().unwrap();
        let objects = || -> Vec<String> {
            let mut v: Vec<String> = walkdir::WalkDir::new(dir.path().join("bucket"))
                .into_iter()
                .flatten()
                .filter(|e| e.file_type().is_file())
                .map(|e| e.path().display().to_string())
                .collect();
            v.sort();
            v
        };
        let manifest = |name: &str| {
            let s = a
                .snapshots()
                .unwrap()
                .into_iter()
                .find(|s| s.name == name)
                .unwrap();
            crate::archiver::read_manifest(rt.handle(), &store, ds.keys(), "files", &s).unwrap()
        };
        let first = a.snapshot().unwrap();
        assert!(manifest(&first.name).pages_from.is_none());
        std::thread::sleep(std::time::Duration::from_millis(5));
        let before = objects();
        let second = a.snapshot().unwrap();
        let m2 = manifest(&second.name);
        assert_eq!(m2.pages_from.as_deref(), Some(first.name.as_str()));
        assert_eq!((second.entries, second.seq), (first.entries, first.seq));
        // One object more: the manifest. No page was written again.
        let after = objects();
        let new: Vec<&String> = after.iter().filter(|o| !before.contains(o)).collect();
        assert_eq!(new.len(), 1, "{new:?}");
        assert!(new[0].ends_with(".manifest"), "{new:?}");
        // A third names the first's pages too, not the second's.
        std::thread::sleep(std::time::Duration::from_millis(5));
        let third = a.snapshot().unwrap();
        assert_eq!(
            manifest(&third.name).pages_from.as_deref(),
            Some(first.name.as_str())
        );

        // Prune keeping only the newest: the first two manifests go, the
        // pages they wrote stay, and the newest restores whole.
        let report = a
            .prune(
                &crate::RetentionPolicy {
                    last: 1,
                    ..Default::default()
                },
                std::time::Duration::ZERO,
            )
            .unwrap();
        assert_eq!(report.snapshots_deleted.len(), 2, "{report:?}");
        let restore = |to: &str| {
            restorer(rt.handle(), &store, &key).restore(At::Latest, &dir.path().join(to), &|_| {})
        };
        let r = restore("after-prune").unwrap();
        assert_eq!(r.snapshot.as_deref(), Some(third.name.as_str()));
        assert_eq!(r.report.files, 30, "{:?}", r.report);
        assert!(r.report.problems.is_empty(), "{:?}", r.report);
        assert_eq!(r.report.expected_digest, r.report.restored_digest);

        // Once the index has lost entries, the next snapshot of the same
        // state is a full one again; so is one after a change.
        a.index_for_tests()
            .remove(&[ChunkId::of(ds.keys(), b"record 1\n")])
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let full = a.snapshot().unwrap();
        assert!(manifest(&full.name).pages_from.is_none());
        put(&ds, "new", "a change\n");
        a.ship_log().unwrap();
        let changed = a.snapshot().unwrap();
        assert!(manifest(&changed.name).pages_from.is_none());
        assert_eq!(changed.entries, full.entries + 1);
        drop(a);
        ds.close().unwrap();
    }

    /// A restore of dataset `files` with no expectations and no checkpoints.
    fn restorer<'a>(rt: &'a Handle, store: &'a Store, key: &'a DatasetKey) -> Restorer<'a> {
        Restorer {
            rt,
            store,
            dataset: "files",
            key,
            concurrency: 2,
            expect_seq: None,
            checkpoints: &[],
            delta: false,
            head_signer: None,
        }
    }

    /// A new dataset `files` at `path`.
    fn created(path: &Path, key: &DatasetKey) -> Arc<Dataset> {
        Arc::new(
            Dataset::open(
                path,
                "files",
                key,
                vault::Options {
                    create: true,
                    ..vault::Options::default()
                },
            )
            .unwrap(),
        )
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                copy_dir(&e.path(), &to.join(e.file_name()));
            } else {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    }

    /// A former primary archived records past the fork point (and a
    /// snapshot of them) before it was replaced; rejoined, it archives the
    /// new history into the same store. Nothing is overwritten: the new
    /// pieces and snapshots are named by epoch beside the old ones, and a
    /// restore follows the history the head names.
    #[test]
    fn a_former_primarys_archive_past_the_fork_stays_as_evidence_and_restores_the_new_history() {
        fork_case(false);
        // The same when the archiver was already running when the site
        // learned of the new epoch: it goes back to the fork point.
        fork_case(true);
    }

    fn fork_case(learn_late: bool) {
        let dir = tempfile::tempdir().unwrap();
        let key = DatasetKey::generate();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let url = format!("file://{}", dir.path().join("bucket").display());
        let open = |at: &str, starts: Vec<(u64, u64)>| {
            let ds = created(&dir.path().join(at), &key);
            ds.set_fence(vault::Fence {
                starts,
                ..vault::Fence::default()
            });
            let store = Arc::new(Store::open(&StoreConfig::new(&url)).unwrap());
            let a = Archiver::open(store, rt.handle().clone(), ds.clone(), "a", 2).unwrap();
            (ds, a)
        };
        // Epoch 1: seqs 1-5, archived, and the site's copy kept as it was.
        let (ds, a) = open("site", vec![(1, 1)]);
        for i in 1..=5 {
            put(&ds, &format!("base-{i}"), &format!("base {i}\n"));
        }
        a.ship_log().unwrap();
        drop(a);
        ds.close().unwrap();
        drop(ds);
        copy_dir(&dir.path().join("site"), &dir.path().join("new"));
        // The former primary goes on alone in epoch 1: seqs 6-10, archived
        // with a snapshot of them.
        let (ds, a) = open("site", vec![(1, 1)]);
        for i in 6..=10 {
            put(&ds, &format!("old-{i}"), &format!("old {i}\n"));
        }
        a.ship_log().unwrap();
        a.snapshot().unwrap();
        drop(a);
        ds.close().unwrap();
        drop(ds);
        // Epoch 2 began at seq 6 elsewhere; the rejoined site holds that
        // history (6-8) and archives it into the same store.
        let (ds, a) = if learn_late {
            let (ds, a) = open("new", vec![(1, 1)]);
            assert_eq!(
                a.shipped_seq(),
                10,
                "the stale piece counts before the fork is known"
            );
            ds.set_fence(vault::Fence {
                starts: vec![(1, 1), (2, 6)],
                ..vault::Fence::default()
            });
            (ds, a)
        } else {
            let (ds, a) = open("new", vec![(1, 1), (2, 6)]);
            assert_eq!(a.shipped_seq(), 5, "the stale piece counted");
            (ds, a)
        };
        for i in 6..=8 {
            put(&ds, &format!("new-{i}"), &format!("new {i}\n"));
        }
        assert_eq!(a.ship_log().unwrap(), Some(8));
        drop(a);
        ds.close().unwrap();
        drop(ds);

        let store = Store::open(&StoreConfig::new(&url)).unwrap();
        // The former primary's objects are still there, named by epoch 1.
        let names: Vec<String> = rt
            .block_on(store.list("files/"))
            .unwrap()
            .into_iter()
            .map(|l| l.key)
            .collect();
        let has = |suffix: &str| names.iter().any(|n| n.ends_with(suffix));
        assert!(
            names.iter().any(
                |n| n.contains("/log/00000000000000000006-00000000000000000010-")
                    && n.ends_with("-0000000001.lp")
            ),
            "{names:?}"
        );
        assert!(has("-0000000002.lp"), "{names:?}");
        // The archive's latest state, as `triad get --cache` judges it, is
        // the new history's seq 8, not the stale piece's 10.
        assert_eq!(
            crate::archiver::archived_head(rt.handle(), &store, &key.derive(), "files").unwrap(),
            8
        );
        assert!(
            names
                .iter()
                .any(|n| n.contains("snapshots/00000000000000000010-")
                    && n.ends_with("-0000000001.manifest")),
            "{names:?}"
        );
        let restorer = restorer(rt.handle(), &store, &key);
        let to = dir.path().join("restored");
        let r = restorer.restore(At::Latest, &to, &|_| {}).unwrap();
        assert_eq!(r.seq, 8);
        let mut got: Vec<String> = std::fs::read_dir(&to)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        got.sort();
        assert_eq!(
            got,
            ["base-1", "base-2", "base-3", "base-4", "base-5", "new-6", "new-7", "new-8"]
        );
        assert_eq!(
            std::fs::read_to_string(to.join("new-7")).unwrap(),
            "new 7\n"
        );
        // Seqs 9 and 10 exist only in the former primary's epoch.
        let e = restorer
            .restore(At::Seq(10), &dir.path().join("r10"), &|_| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("past the newest archived record (8)"), "{e}");
        // A point before the fork comes from the first epoch's piece.
        let r = restorer
            .restore(At::Seq(4), &dir.path().join("r4"), &|_| {})
            .unwrap();
        assert_eq!(r.seq, 4);
    }
}
