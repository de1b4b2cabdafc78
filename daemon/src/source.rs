//! The directory source: keeps a dataset equal to a directory tree.
//!
//! At start it compares the whole tree with the namespace and logs only what
//! differs; then it follows inotify events (the `notify` crate) and hands
//! each changed path to a round once that path has been quiet for the
//! debounce time (a path written without pause goes every ten debounce
//! times), so a steady stream of new files never holds back the finished
//! ones; a full rescan runs periodically and whenever the kernel reports an
//! event overflow. Within a round renames go first (so moved trees are not
//! re-read), then directories and symlinks, then files (read, cut and sealed
//! by a pool of workers), then deletions.
//!
//! A file that changes while being read is read again. A file whose mtime is
//! too close to the moment it was read is read once more a little later,
//! because a second write within the filesystem's timestamp granularity would
//! leave size and mtime unchanged. A file that vanishes is a delete; one that
//! cannot be read is reported and skipped, keeping its previous version.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError};
use globset::{GlobSet, GlobSetBuilder};
use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind, RenameMode};
use notify::{RecursiveMode, Watcher};
use vault::chunk::ChunkId;
use vault::dataset::now_ns;
use vault::meta::{Capture, Preserve};
use vault::{Dataset, Entry, Node, Op, SubmitError};

use crate::config::DirectorySettings;
use crate::status::StatsView;

/// Ops per record for metadata-only changes.
const OPS_PER_RECORD: usize = 1000;
/// A file whose mtime is this close to its read time is read again later.
const RACY_NS: i64 = 2_000_000_000;
const MAX_READ_ATTEMPTS: usize = 5;
/// Changes a scan plans before it logs them and walks on, so a first scan
/// of millions of files never holds all their paths.
const SCAN_BATCH: usize = 10_000;

/// Counters the status file and tests read.
#[derive(Default)]
pub struct Stats {
    pub rounds: AtomicU64,
    pub files_ingested: AtomicU64,
    pub bytes_read: AtomicU64,
    pub skipped: AtomicU64,
    pub last_event_ns: AtomicI64,
    pub last_round_end_ns: AtomicI64,
    pub pending: AtomicU64,
    /// Files waiting for a re-read because their mtime was too recent.
    pub racy: AtomicU64,
    /// Highest seq the commit policy confirmed (durable at every sync follower).
    pub committed_seq: AtomicU64,
    /// Rounds whose changes a sync follower did not acknowledge in time.
    pub commit_failures: AtomicU64,
    /// The last round's commit wait failed (cleared by the next success).
    pub commit_failing: AtomicBool,
    /// Paused because this site is fenced.
    pub fenced: AtomicBool,
    pub busy: AtomicBool,
    pub initial_scan_done: AtomicBool,
    pub last_error: Mutex<Option<String>>,
}

impl Stats {
    pub fn view(&self) -> StatsView {
        let busy = self.busy.load(Ordering::Acquire);
        let pending = self.pending.load(Ordering::Acquire);
        let last_event_ns = self.last_event_ns.load(Ordering::Acquire);
        let last_round_end_ns = self.last_round_end_ns.load(Ordering::Acquire);
        let initial = self.initial_scan_done.load(Ordering::Acquire);
        StatsView {
            rounds: self.rounds.load(Ordering::Relaxed),
            files_ingested: self.files_ingested.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            pending_paths: pending,
            busy,
            initial_scan_done: initial,
            settled: initial
                && !busy
                && pending == 0
                && self.racy.load(Ordering::Acquire) == 0
                && last_round_end_ns >= last_event_ns,
            last_event_ns,
            last_round_end_ns,
            committed_seq: self.committed_seq.load(Ordering::Acquire),
            commit_failures: self.commit_failures.load(Ordering::Relaxed),
            commit_failing: self.commit_failing.load(Ordering::Acquire),
            fenced: self.fenced.load(Ordering::Acquire),
            last_error: self.last_error.lock().ok().and_then(|e| e.clone()),
        }
    }

    fn note_error(&self, msg: String) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(msg);
        }
    }
}

/// Files of a round queued for the committer, answered at its end or
/// once [`MAX_QUEUED_FILES`] wait.
type Queued<'a> = Mutex<Vec<(Vec<u8>, vault::dataset::Ticket<'a>)>>;
/// Files queued for the committer at most before the oldest half is
/// waited for: each ticket holds its reply channel, and a first scan of a
/// million files held a million of them (630 bytes each) until its end.
/// Half stays queued, so group commits stay full.
const MAX_QUEUED_FILES: usize = 4096;

/// Paths with events not yet handled: whether a directory there must be
/// scanned whole, and when its first and last events came.
#[derive(Default)]
struct PendingPaths(BTreeMap<PathBuf, (bool, Instant, Instant)>);

impl PendingPaths {
    fn note(&mut self, p: PathBuf, deep: bool, now: Instant) {
        let e = self.0.entry(p).or_insert((false, now, now));
        e.0 |= deep;
        e.2 = now;
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn contains(&self, p: &Path) -> bool {
        self.0.contains_key(p)
    }

    /// Removes and returns the paths quiet for `quiet`, or pending for
    /// `longest` however busy.
    fn take_ripe(
        &mut self,
        now: Instant,
        quiet: Duration,
        longest: Duration,
    ) -> BTreeMap<PathBuf, bool> {
        let ripe: Vec<PathBuf> = self
            .0
            .iter()
            .filter(|(_, (_, first, last))| {
                now.duration_since(*last) >= quiet || now.duration_since(*first) >= longest
            })
            .map(|(p, _)| p.clone())
            .collect();
        ripe.into_iter()
            .filter_map(|p| self.0.remove(&p).map(|(deep, _, _)| (p, deep)))
            .collect()
    }
}

/// What a round will do.
#[derive(Default)]
struct Plan {
    puts: BTreeMap<Vec<u8>, Entry>,
    files: BTreeMap<Vec<u8>, bool>,
    deletes: BTreeSet<Vec<u8>>,
    /// Changes of this plan already logged by the scan (see [`SCAN_BATCH`]).
    logged: usize,
}

pub struct DirSource {
    root: PathBuf,
    settings: DirectorySettings,
    excludes: GlobSet,
    ds: Arc<Dataset>,
    stats: Arc<Stats>,
    /// Files to read again once their mtime is safely in the past.
    racy: Mutex<HashMap<Vec<u8>, Instant>>,
    /// Whether every change reaches us as an inotify event: the whole tree
    /// is watched and no watch error or overflow has been seen. While it
    /// holds, a file read with a recent mtime is not queued for a second
    /// read: a later write within the same mtime tick still sends an event,
    /// and the event's round reads a file with a recent recorded mtime
    /// again even if size and mtime look unchanged. Once it fails, every
    /// such file is read again after RACY_NS, as a scan needs.
    events_complete: AtomicBool,
    /// Set on SIGTERM: long scans and rounds give up early (the next start's
    /// full scan picks up whatever was left).
    stop: Arc<AtomicBool>,
    /// The commit policy: waits until sync followers hold a seq.
    gate: Option<CommitGate>,
    /// Reads owners and attributes as `preserve` asks.
    capture: Capture,
}

/// Blocks until the commit policy holds for a seq, or says why it does not.
pub type CommitGate = Arc<dyn Fn(u64) -> Result<(), GateError> + Send + Sync>;

/// Why a change durable here is not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// A sync follower did not acknowledge it in time.
    #[error(transparent)]
    Policy(#[from] replicator::upstream::CommitError),
    /// This site was fenced before the change could be acknowledged: it is
    /// durable here, but another site may be the primary now.
    #[error("this site is FENCED, so seq {seq} is durable here but not acknowledged: {why}")]
    Fenced { seq: u64, why: String },
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("stopping")]
    Stopping,
    #[error("source directory {path}: {reason}")]
    Root { path: PathBuf, reason: String },
    #[error("exclude pattern: {0}")]
    Glob(#[from] globset::Error),
    #[error(transparent)]
    Vault(#[from] vault::VaultError),
}

/// Whether an event only says a path was opened, read or closed without
/// writing.
fn is_read_only(kind: &EventKind) -> bool {
    matches!(kind, EventKind::Access(a) if *a != AccessKind::Close(AccessMode::Write))
}

/// True when a round stopped because the site was fenced while it ran:
/// the changes it did not log are taken in by the scan after the fence.
fn fenced_midway(r: &Result<(), SourceError>) -> bool {
    if let Err(SourceError::Vault(vault::VaultError::Fenced(why))) = r {
        tracing::warn!(reason = %why, "source paused mid-round: this site was fenced");
        return true;
    }
    false
}

fn meta_mtime_ns(md: &std::fs::Metadata) -> i64 {
    md.mtime() * 1_000_000_000 + md.mtime_nsec()
}

/// Metadata of a non-file entry as the namespace records it (owner and
/// attributes aside); `None` for sockets, and for fifos and devices when
/// the dataset does not keep them.
fn simple_entry(
    abs: &Path,
    md: &std::fs::Metadata,
    preserve: Preserve,
) -> std::io::Result<Option<Entry>> {
    use std::os::unix::fs::FileTypeExt;
    let ft = md.file_type();
    let mtime_ns = meta_mtime_ns(md);
    let special = preserve.has(Preserve::SPECIAL);
    let (node, mode, size) = if ft.is_dir() {
        (Node::Dir, md.mode() & 0o7777, 0)
    } else if ft.is_symlink() {
        let target = std::fs::read_link(abs)?.as_os_str().as_bytes().to_vec();
        let n = target.len() as u64;
        (Node::Symlink { target }, 0o777, n)
    } else if special && ft.is_fifo() {
        (Node::Fifo, md.mode() & 0o7777, 0)
    } else if special && (ft.is_char_device() || ft.is_block_device()) {
        let node = Node::Device {
            block: ft.is_block_device(),
            rdev: md.rdev(),
        };
        (node, md.mode() & 0o7777, 0)
    } else {
        return Ok(None);
    };
    Ok(Some(Entry {
        node,
        mode,
        mtime_ns,
        size,
        ext: None,
    }))
}

/// True when a file's metadata says its recorded version is current.
/// Recorded mtimes at or after `racy_before` are not trusted (the file may
/// have changed again within the timestamp granularity); `i64::MAX` trusts
/// every recorded mtime.
fn file_unchanged(md: &std::fs::Metadata, e: &Entry, racy_before: i64) -> bool {
    matches!(e.node, Node::File { .. })
        && e.size == md.len()
        && e.mtime_ns == meta_mtime_ns(md)
        && e.mode == md.mode() & 0o7777
        && e.mtime_ns < racy_before
}

impl DirSource {
    pub fn new(
        settings: DirectorySettings,
        ds: Arc<Dataset>,
        stats: Arc<Stats>,
        stop: Arc<AtomicBool>,
    ) -> Result<DirSource, SourceError> {
        let root = settings
            .path
            .canonicalize()
            .map_err(|e| SourceError::Root {
                path: settings.path.clone(),
                reason: format!("{e}; create it or fix dataset.source.path"),
            })?;
        if !root.is_dir() {
            return Err(SourceError::Root {
                path: root,
                reason: "is not a directory".into(),
            });
        }
        let settings_preserve = settings.preserve;
        let mut b = GlobSetBuilder::new();
        for p in &settings.exclude {
            b.add(globset::Glob::new(p)?);
        }
        Ok(DirSource {
            root,
            excludes: b.build()?,
            settings,
            ds,
            stats,
            racy: Mutex::new(HashMap::new()),
            events_complete: AtomicBool::new(false),
            stop,
            gate: None,
            capture: Capture::new(settings_preserve),
        })
    }

    /// Makes every round wait for the commit policy before it counts as done.
    pub fn with_gate(mut self, gate: CommitGate) -> DirSource {
        self.gate = Some(gate);
        self
    }

    fn rel(&self, abs: &Path) -> Option<Vec<u8>> {
        let r = abs.strip_prefix(&self.root).ok()?;
        let b = r.as_os_str().as_bytes();
        (!b.is_empty()).then(|| b.to_vec())
    }

    fn abs(&self, rel: &[u8]) -> PathBuf {
        self.root.join(std::ffi::OsStr::from_bytes(rel))
    }

    /// True when the path or any directory above it matches an exclude
    /// pattern, so events and scans agree on what is excluded.
    fn excluded(&self, rel: &[u8]) -> bool {
        if self.excludes.is_empty() {
            return false;
        }
        let mut p = rel;
        while !p.is_empty() {
            if self.excludes.is_match(std::ffi::OsStr::from_bytes(p)) {
                return true;
            }
            p = vault::ops::parent(p);
        }
        false
    }

    fn check_stop(&self) -> Result<(), SourceError> {
        if self.stop.load(Ordering::Acquire) {
            Err(SourceError::Stopping)
        } else {
            Ok(())
        }
    }

    /// Runs until the stop flag is set.
    pub fn run(self) -> Result<(), SourceError> {
        match self.run_inner() {
            Err(SourceError::Stopping) => Ok(()),
            other => other,
        }
    }

    fn run_inner(&self) -> Result<(), SourceError> {
        let stop = self.stop.clone();
        let (tx, rx) = unbounded();
        // Watch before the first scan so that nothing changed during the scan
        // goes unseen.
        // Each event is stamped as it arrives: a path's debounce runs from
        // when it was written, not from when the loop got to the event (it
        // does not read events while a round runs, and counting from then
        // held every file written during a round back for a whole debounce
        // after it).
        //
        // Events that only say a path was opened or read are dropped here,
        // not queued: the source's own reads cause two for every file, and
        // while the first scan reads a tree of a million files nobody takes
        // from the channel, so they held 89 MB at the end of it.
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if matches!(&res, Ok(ev) if is_read_only(&ev.kind) && !ev.need_rescan()) {
                return;
            }
            let _ = tx.send((res, Instant::now()));
        })
        .map_err(|e| SourceError::Root {
            path: self.root.clone(),
            reason: format!("cannot start inotify: {e}"),
        })?;
        if let Err(e) = watcher.watch(&self.root, RecursiveMode::Recursive) {
            // Typically the inotify watch limit: keep going on periodic rescans.
            let msg = format!(
                "cannot watch {} for changes ({e}); changes will be picked up only by the periodic rescan \
                 every {:?}; raise fs.inotify.max_user_watches to fix",
                self.root.display(),
                self.settings.rescan_interval
            );
            tracing::error!("{msg}");
            self.stats.note_error(msg);
        } else {
            self.events_complete.store(true, Ordering::Release);
        }
        // A fenced site (replaced, or not yet confirmed as the primary)
        // takes no changes: wait, and scan once it may write.
        self.wait_unfenced(&stop)?;
        let head_ns = self.ds.status().last_commit_ns;
        self.full_scan(head_ns.saturating_sub(RACY_NS))?;
        self.stats.initial_scan_done.store(true, Ordering::Release);
        tracing::info!(dataset = self.ds.name(), root = %self.root.display(), "initial scan complete; following changes");
        self.follow(rx, &stop)?;
        drop(watcher);
        Ok(())
    }

    fn follow(
        &self,
        rx: Receiver<(notify::Result<notify::Event>, Instant)>,
        stop: &AtomicBool,
    ) -> Result<(), SourceError> {
        let mut pending = PendingPaths::default();
        let mut renames: Vec<(PathBuf, PathBuf)> = Vec::new();
        let mut need_full: Option<Instant> = None;
        let mut next_rescan = Instant::now() + self.settings.rescan_interval;
        let debounce = self.settings.debounce;
        let tick = Duration::from_millis(50).min(debounce);
        let mut next_tick = Instant::now();
        while !stop.load(Ordering::Acquire) {
            // Every event already queued is taken in before any path is
            // judged quiet: after a round, a path's first queued event is
            // older than the debounce, while its later writes may still be
            // waiting in the channel behind it.
            let mut arrived = match rx.recv_timeout(tick) {
                Ok(first) => vec![first],
                Err(RecvTimeoutError::Timeout) => Vec::new(),
                Err(RecvTimeoutError::Disconnected) => break,
            };
            arrived.extend(rx.try_iter());
            for item in arrived {
                match item {
                    // Opening or reading a file changes nothing, and the source's
                    // own reads cause such events: taken as changes, each round
                    // would set off the next. A file closed after writing is
                    // kept: it says a write finished.
                    (Ok(ev), _) if is_read_only(&ev.kind) && !ev.need_rescan() => {}
                    (Ok(ev), now) => {
                        self.stats.last_event_ns.store(now_ns(), Ordering::Release);
                        if ev.need_rescan() {
                            self.events_complete.store(false, Ordering::Release);
                            need_full.get_or_insert(now);
                        }
                        let deep = matches!(
                            ev.kind,
                            EventKind::Create(CreateKind::Folder)
                                | EventKind::Modify(ModifyKind::Name(RenameMode::To))
                        );
                        if let (EventKind::Modify(ModifyKind::Name(RenameMode::Both)), [from, to]) =
                            (&ev.kind, ev.paths.as_slice())
                        {
                            renames.push((from.clone(), to.clone()));
                            pending.note(from.clone(), false, now);
                            pending.note(to.clone(), true, now);
                        } else {
                            for p in ev.paths {
                                pending.note(p, deep, now);
                            }
                        }
                        self.stats
                            .pending
                            .store(pending.len() as u64, Ordering::Release);
                    }
                    (Err(e), at) => {
                        // inotify trouble (often an overflow): rescan everything,
                        // and from now on read recent files a second time.
                        self.events_complete.store(false, Ordering::Release);
                        tracing::warn!(error = %e, "watch error; scheduling a full rescan");
                        need_full.get_or_insert(at);
                    }
                }
            }
            let now = Instant::now();
            // Rounds, rescans and re-reads are looked at once per tick, not
            // after every event: under a stream of thousands of events a
            // second, walking the pending paths each time would cost more
            // than the rounds themselves.
            if now < next_tick {
                continue;
            }
            next_tick = now + tick;
            // Fenced: nothing is logged; once writes are allowed again a
            // full scan takes in whatever changed meanwhile.
            if self.ds.fence().fenced.is_some() {
                self.stats.fenced.store(true, Ordering::Release);
                need_full.get_or_insert(now);
                continue;
            }
            self.stats.fenced.store(false, Ordering::Release);
            if need_full.is_some_and(|t| now.duration_since(t) >= debounce) {
                self.stats.busy.store(true, Ordering::Release);
                let result = self.full_scan(now_ns().saturating_sub(RACY_NS));
                pending = PendingPaths::default();
                renames.clear();
                need_full = None;
                self.stats.pending.store(0, Ordering::Release);
                self.stats.busy.store(false, Ordering::Release);
                if fenced_midway(&result) {
                    need_full = Some(now);
                    continue;
                }
                result?;
            } else if need_full.is_none() {
                // Each path goes out once it has been quiet for the debounce
                // time (or, written without pause, every ten of them), so a
                // steady stream of new files does not hold back the ones
                // already finished.
                let ripe = pending.take_ripe(now, debounce, debounce * 10);
                if !ripe.is_empty() {
                    self.stats.busy.store(true, Ordering::Release);
                    let result = self.event_round(ripe, std::mem::take(&mut renames));
                    self.stats
                        .pending
                        .store(pending.len() as u64, Ordering::Release);
                    self.stats.busy.store(false, Ordering::Release);
                    if fenced_midway(&result) {
                        need_full = Some(now);
                        continue;
                    }
                    result?;
                }
            }
            if now >= next_rescan {
                next_rescan = now + self.settings.rescan_interval;
                self.stats.busy.store(true, Ordering::Release);
                let r = self.full_scan(i64::MAX);
                self.stats.busy.store(false, Ordering::Release);
                r?;
            }
            // Racy re-reads of paths with no event pending (a pending one
            // is read by its round anyway; it stays queued till then), and
            // none while a full scan is due.
            let due: Vec<Vec<u8>> = match self.racy.lock() {
                Ok(mut r) if need_full.is_none() => {
                    let due: Vec<Vec<u8>> = r
                        .iter()
                        .filter(|(p, t)| **t <= now && !pending.contains(&self.abs(p)))
                        .map(|(p, _)| p.clone())
                        .collect();
                    for p in &due {
                        r.remove(p);
                    }
                    due
                }
                _ => Vec::new(),
            };
            if !due.is_empty() {
                self.stats.busy.store(true, Ordering::Release);
                let mut plan = Plan::default();
                for p in due {
                    plan.files.insert(p, true);
                }
                let r = self.execute(plan);
                self.stats.busy.store(false, Ordering::Release);
                r?;
            }
            self.count_racy();
        }
        Ok(())
    }

    /// Returns once this site may write (or with `Stopping`).
    fn wait_unfenced(&self, stop: &AtomicBool) -> Result<(), SourceError> {
        let mut said = false;
        while let Some(why) = self.ds.fence().fenced {
            self.stats.fenced.store(true, Ordering::Release);
            if !said {
                tracing::warn!(dataset = self.ds.name(), reason = %why, "source paused: this site is fenced");
                said = true;
            }
            if stop.load(Ordering::Acquire) {
                return Err(SourceError::Stopping);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.stats.fenced.store(false, Ordering::Release);
        Ok(())
    }

    fn queue_reread(&self, rel: &[u8], after: Duration) {
        if let Ok(mut r) = self.racy.lock() {
            r.insert(rel.to_vec(), Instant::now() + after);
            self.stats.racy.store(r.len() as u64, Ordering::Release);
        }
    }

    fn count_racy(&self) {
        let n = self.racy.lock().map(|r| r.len()).unwrap_or(0);
        self.stats.racy.store(n as u64, Ordering::Release);
    }

    /// False when an ancestor of `rel` is not a real directory (a symlink took
    /// its place): the path then does not exist in the tree, and opening it
    /// would follow the link out of the watched directory.
    fn real_parent(&self, rel: &[u8]) -> bool {
        let parent = vault::ops::parent(rel);
        if parent.is_empty() {
            return true;
        }
        let abs = self.abs(parent);
        abs.canonicalize().is_ok_and(|c| c == abs)
    }

    /// Puts for the directories above `rel` that the namespace lacks, parents
    /// first, so a rename never leaves an entry without its directory.
    fn missing_ancestors(&self, rel: &[u8]) -> Result<Vec<Op>, SourceError> {
        let mut out = Vec::new();
        let mut p = vault::ops::parent(rel);
        while !p.is_empty() && self.ds.entry(p)?.is_none() {
            let abs = self.abs(p);
            if let Ok(md) = abs.symlink_metadata() {
                if let Ok(Some(e)) = self.simple_entry(&abs, &md) {
                    out.push(Op::Put {
                        path: p.to_vec(),
                        entry: e,
                    });
                }
            }
            p = vault::ops::parent(p);
        }
        out.reverse();
        Ok(out)
    }

    fn finish_round(&self) {
        let head = self.ds.head_seq();
        match &self.gate {
            Some(gate) if head > self.stats.committed_seq.load(Ordering::Acquire) => {
                match gate(head) {
                    Ok(()) => {
                        self.stats.committed_seq.store(head, Ordering::Release);
                        self.stats.commit_failing.store(false, Ordering::Release);
                    }
                    Err(e) => {
                        self.stats.commit_failing.store(true, Ordering::Release);
                        // The changes are durable here; the round's writer (this
                        // source) reports that the policy did not hold.
                        tracing::error!(dataset = self.ds.name(), "{e}");
                        self.stats.commit_failures.fetch_add(1, Ordering::Relaxed);
                        self.stats.note_error(e.to_string());
                    }
                }
            }
            Some(_) => {}
            None => self.stats.committed_seq.store(head, Ordering::Release),
        }
        self.stats.rounds.fetch_add(1, Ordering::Relaxed);
        self.stats
            .last_round_end_ns
            .store(now_ns(), Ordering::Release);
    }

    /// Compares the whole tree with the namespace. Recorded files with an
    /// mtime at or after `racy_before` are read again even if they look
    /// unchanged.
    fn full_scan(&self, racy_before: i64) -> Result<(), SourceError> {
        let started = Instant::now();
        let mut plan = Plan::default();
        self.scan_into(b"", &mut plan, racy_before)?;
        let changes = plan.logged + plan.puts.len() + plan.files.len() + plan.deletes.len();
        self.execute(plan)?;
        tracing::info!(dataset = self.ds.name(), changes, elapsed = ?started.elapsed(), "full scan done");
        Ok(())
    }

    /// Plans the changes beneath relative dir `rel` (the root for empty).
    fn scan_into(&self, rel: &[u8], plan: &mut Plan, racy_before: i64) -> Result<(), SourceError> {
        let prefix = if rel.is_empty() {
            Vec::new()
        } else {
            vault::ops::subtree_prefix(rel)
        };
        // What the namespace records is looked up path by path, never
        // loaded whole: a scan of a million files holds what it plans.
        // Subtrees the walk may not read keep what they recorded.
        let mut unreadable: Vec<Vec<u8>> = Vec::new();
        let start = self.abs(rel);
        let walker = walkdir::WalkDir::new(&start)
            .min_depth(1)
            .follow_links(false)
            .into_iter()
            .filter_entry(|e| self.rel(e.path()).is_none_or(|r| !self.excluded(&r)));
        for item in walker {
            self.check_stop()?;
            let ent = match item {
                Ok(e) => e,
                Err(e) => {
                    // Vanished mid-walk or unreadable directory: report and go on;
                    // the entries it held are kept as they were.
                    if let Some(p) = e.path().and_then(|p| self.rel(p)) {
                        if e.io_error()
                            .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
                        {
                            self.skip(&p, &format!("{e}"));
                            unreadable.push(vault::ops::subtree_prefix(&p));
                        }
                    }
                    continue;
                }
            };
            let Some(r) = self.rel(ent.path()) else {
                continue;
            };
            let old = self.ds.entry(&r)?;
            let md = match ent.path().symlink_metadata() {
                Ok(m) => m,
                Err(_) => continue,
            };
            self.plan_path(&r, &md, old.as_ref(), plan, racy_before);
            // Walk order puts each directory before what it holds (and an
            // event round plans the directory scanned before its walk), so
            // the part planned so far can be logged on its own.
            if plan.puts.len() + plan.files.len() >= SCAN_BATCH {
                plan.logged += plan.puts.len() + plan.files.len();
                self.execute_changes(Plan {
                    puts: std::mem::take(&mut plan.puts),
                    files: std::mem::take(&mut plan.files),
                    ..Plan::default()
                })?;
            }
        }
        // What is recorded and no longer there: each recorded path under
        // `rel` is looked for on disk (the walk just read these
        // directories, so the lookups hit the kernel's caches). A path
        // found in neither the walk nor this pass was removed; one made
        // since the walk is the next round's.
        for item in self.ds.entries_under(&prefix)? {
            self.check_stop()?;
            let (path, _) = item?;
            if self.excluded(&path) || unreadable.iter().any(|u| path.starts_with(u)) {
                continue;
            }
            match self.abs(&path).symlink_metadata() {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                    ) =>
                {
                    plan.deletes.insert(path);
                }
                // Unreadable now: kept as recorded, and said.
                Err(e) => self.skip(&path, &e.to_string()),
            }
        }
        Ok(())
    }

    fn plan_path(
        &self,
        r: &[u8],
        md: &std::fs::Metadata,
        old: Option<&Entry>,
        plan: &mut Plan,
        racy_before: i64,
    ) {
        if md.is_file() {
            match old {
                Some(o) if file_unchanged(md, o, racy_before) => {
                    // Contents as recorded; an owner or attribute changed
                    // (chown, setfacl, setfattr) is put without reading it.
                    match self.ext_changed(&self.abs(r), md, o) {
                        Ok(Some(e)) => {
                            plan.puts.insert(r.to_vec(), e);
                        }
                        Ok(None) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => self.skip(r, &e.to_string()),
                    }
                }
                // Metadata matches but the recorded mtime was too close to its
                // read: read the content again regardless.
                Some(o) if file_unchanged(md, o, i64::MAX) => {
                    plan.files.insert(r.to_vec(), true);
                }
                _ => {
                    plan.files.entry(r.to_vec()).or_insert(false);
                }
            }
            return;
        }
        match self.simple_entry(&self.abs(r), md) {
            Ok(Some(e)) => {
                if old.is_none_or(|o| !o.same_recorded(&e)) {
                    plan.puts.insert(r.to_vec(), e);
                }
            }
            Ok(None) => {
                tracing::debug!(path = %String::from_utf8_lossy(r), "skipping a socket, fifo or device");
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if old.is_some() {
                    plan.deletes.insert(r.to_vec());
                }
            }
            Err(e) => self.skip(r, &e.to_string()),
        }
    }

    /// [`simple_entry`] with the owner and attributes the dataset keeps.
    fn simple_entry(&self, abs: &Path, md: &std::fs::Metadata) -> std::io::Result<Option<Entry>> {
        match simple_entry(abs, md, self.capture.preserve)? {
            Some(e) => Ok(Some(self.with_ext(abs, None, md, e)?)),
            None => Ok(None),
        }
    }

    /// `e` with the owner and attributes of the path (or open file) it was
    /// read from, as the dataset keeps them.
    fn with_ext(
        &self,
        abs: &Path,
        file: Option<&std::fs::File>,
        md: &std::fs::Metadata,
        mut e: Entry,
    ) -> std::io::Result<Entry> {
        e.ext = self.capture.ext(abs, file, md, None)?;
        Ok(e)
    }

    /// `o` (a file's recorded entry, whose contents are current) with the
    /// owner and attributes on disk now, when they differ from the
    /// recorded ones; the entry is copied only then.
    fn ext_changed(
        &self,
        abs: &Path,
        md: &std::fs::Metadata,
        o: &Entry,
    ) -> std::io::Result<Option<Entry>> {
        let mut ext = self.capture.ext(abs, None, md, None)?;
        if vault::meta::same_recorded(ext.as_deref(), o.ext.as_deref()) {
            return Ok(None);
        }
        // The link key stays what it was until the contents change.
        if let (Some(x), Some(old)) = (ext.as_mut(), o.ext.as_ref()) {
            x.link = old.link;
        }
        Ok(Some(Entry { ext, ..o.clone() }))
    }

    fn skip(&self, rel: &[u8], why: &str) {
        let msg = format!("skipping {}: {why}", String::from_utf8_lossy(rel));
        tracing::warn!(dataset = self.ds.name(), "{msg}");
        self.stats.skipped.fetch_add(1, Ordering::Relaxed);
        self.stats.note_error(msg);
    }

    fn event_round(
        &self,
        pending: BTreeMap<PathBuf, bool>,
        renames: Vec<(PathBuf, PathBuf)>,
    ) -> Result<(), SourceError> {
        // Renames first, so the trees they move are found in place, not re-read.
        for (from, to) in renames {
            let (Some(f), Some(t)) = (self.rel(&from), self.rel(&to)) else {
                continue;
            };
            if self.excluded(&f) || self.excluded(&t) {
                continue;
            }
            if self.ds.entry(&f)?.is_some() && self.real_parent(&t) && to.symlink_metadata().is_ok()
            {
                let mut ops = self.missing_ancestors(&t)?;
                ops.push(Op::Rename { from: f, to: t });
                self.submit_meta(ops)?;
            }
        }
        let mut paths: BTreeMap<Vec<u8>, bool> = BTreeMap::new();
        for (abs, deep) in pending {
            let Some(r) = self.rel(&abs) else { continue };
            // The parent's mtime changed with its entries.
            let parent = vault::ops::parent(&r).to_vec();
            if !parent.is_empty() {
                paths.entry(parent).or_insert(false);
            }
            *paths.entry(r).or_insert(false) |= deep;
        }
        let mut plan = Plan::default();
        for (r, deep) in paths {
            if self.excluded(&r)
                || plan
                    .deletes
                    .iter()
                    .any(|d| r.starts_with(&vault::ops::subtree_prefix(d)))
            {
                continue;
            }
            let old = self.ds.entry(&r)?;
            let md = if self.real_parent(&r) {
                self.abs(&r).symlink_metadata()
            } else {
                Err(std::io::ErrorKind::NotFound.into())
            };
            match md {
                Ok(md) => {
                    // A file recorded with a recent mtime is read again
                    // even if it looks unchanged: this event may be a second
                    // write within the same mtime tick.
                    let racy_before = now_ns().saturating_sub(RACY_NS);
                    // The path itself first: a scan beneath it may log its
                    // plan in parts, and each part must find its directory.
                    self.plan_path(&r, &md, old.as_ref(), &mut plan, racy_before);
                    if md.is_dir() && (deep || !old.as_ref().is_some_and(|o| o.is_dir())) {
                        self.scan_into(&r, &mut plan, i64::MAX)?;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if old.is_some() {
                        plan.deletes.insert(r);
                    }
                }
                Err(e) => self.skip(&r, &e.to_string()),
            }
        }
        self.execute(plan)
    }

    fn submit_meta(&self, ops: Vec<Op>) -> Result<(), SourceError> {
        for group in ops.chunks(OPS_PER_RECORD) {
            match self.ds.submit(group.to_vec(), Vec::new()) {
                Ok(_) => {}
                Err(SubmitError::Vault(e)) => return Err(e.into()),
                Err(SubmitError::Missing(m)) => {
                    return Err(vault::VaultError::Closed(format!(
                        "metadata ops reported {} missing chunks",
                        m.0.len()
                    ))
                    .into())
                }
            }
        }
        Ok(())
    }

    fn execute(&self, plan: Plan) -> Result<(), SourceError> {
        self.execute_changes(plan)?;
        self.finish_round();
        Ok(())
    }

    /// Logs what a plan found, without ending the round.
    fn execute_changes(&self, plan: Plan) -> Result<(), SourceError> {
        let puts: Vec<Op> = plan
            .puts
            .into_iter()
            .map(|(path, entry)| Op::Put { path, entry })
            .collect();
        self.submit_meta(puts)?;
        let files: Vec<(Vec<u8>, bool)> = plan.files.into_iter().collect();
        if !files.is_empty() {
            let next = AtomicU64::new(0);
            let failure: Mutex<Option<SourceError>> = Mutex::new(None);
            let queued: Queued<'_> = Mutex::new(Vec::new());
            let workers = self.settings.workers.min(files.len());
            std::thread::scope(|s| {
                for _ in 0..workers {
                    s.spawn(|| loop {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        if self.stop.load(Ordering::Acquire) {
                            break;
                        }
                        let Some((rel, force)) = files.get(i) else {
                            break;
                        };
                        if let Err(e) = self.ingest_file(rel, *force, Some(&queued)) {
                            if let Ok(mut f) = failure.lock() {
                                f.get_or_insert(e);
                            }
                            next.store(files.len() as u64, Ordering::Relaxed);
                            break;
                        }
                    });
                }
            });
            if let Some(e) = failure.into_inner().ok().flatten() {
                return Err(e);
            }
            self.settle(queued.into_inner().unwrap_or_default())?;
            self.check_stop()?;
        }
        // Only the topmost of nested deletes: a directory takes its subtree.
        let mut deletes: Vec<Vec<u8>> = Vec::new();
        for d in plan.deletes {
            if !deletes
                .last()
                .is_some_and(|top| d.starts_with(&vault::ops::subtree_prefix(top)))
            {
                deletes.push(d);
            }
        }
        self.submit_meta(
            deletes
                .into_iter()
                .map(|path| Op::Delete { path })
                .collect(),
        )
    }

    /// Reads, cuts and seals one file and logs it. `force` reads it even if
    /// its metadata matches the namespace (racy re-checks).
    /// Queues a file's record, answered at the end of the round, so the
    /// round's files share group commits.
    fn queue_file<'a>(
        &'a self,
        rel: &[u8],
        ops: Vec<Op>,
        sealed: Vec<vault::SealedChunk>,
        queue: &Queued<'a>,
    ) -> Result<(), SourceError> {
        let ticket = self.ds.submit_queued(ops, sealed).map_err(|e| match e {
            SubmitError::Vault(e) => SourceError::from(e),
            SubmitError::Missing(_) => SourceError::from(vault::VaultError::Closed(
                "queueing reported missing chunks".into(),
            )),
        })?;
        let oldest = match queue.lock() {
            Ok(mut q) => {
                q.push((rel.to_vec(), ticket));
                if q.len() >= MAX_QUEUED_FILES {
                    q.drain(..MAX_QUEUED_FILES / 2).collect()
                } else {
                    Vec::new()
                }
            }
            Err(_) => Vec::new(),
        };
        self.settle(oldest)
    }

    /// Waits for queued files to be durable and applied; a file whose
    /// record found a chunk freed meanwhile is read again.
    fn settle(
        &self,
        tickets: Vec<(Vec<u8>, vault::dataset::Ticket<'_>)>,
    ) -> Result<(), SourceError> {
        for (rel, ticket) in tickets {
            match ticket.wait() {
                Ok(_) => {
                    self.stats.files_ingested.fetch_add(1, Ordering::Relaxed);
                }
                Err(SubmitError::Missing(_)) => self.ingest_file(&rel, true, None)?,
                Err(SubmitError::Vault(e)) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn ingest_file<'a>(
        &'a self,
        rel: &[u8],
        force: bool,
        queue: Option<&Queued<'a>>,
    ) -> Result<(), SourceError> {
        let abs = self.abs(rel);
        let keys = self.ds.keys();
        let mut pinned: Vec<ChunkId> = Vec::new();
        let unpin = |pinned: &mut Vec<ChunkId>| -> Vec<Op> {
            if pinned.is_empty() {
                Vec::new()
            } else {
                vec![Op::Unpin {
                    ids: std::mem::take(pinned),
                }]
            }
        };
        for _attempt in 0..MAX_READ_ATTEMPTS {
            let md1 = if self.real_parent(rel) {
                abs.symlink_metadata()
            } else {
                Err(std::io::ErrorKind::NotFound.into())
            };
            let md1 = match md1 {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let mut ops = unpin(&mut pinned);
                    if self.ds.entry(rel)?.is_some() {
                        ops.push(Op::Delete { path: rel.to_vec() });
                    }
                    if !ops.is_empty() {
                        self.submit_meta(ops)?;
                    }
                    return Ok(());
                }
                Err(e) => {
                    self.skip(rel, &e.to_string());
                    return self.submit_meta(unpin(&mut pinned));
                }
            };
            if !md1.is_file() {
                // It became something else since it was planned.
                let mut plan = Plan::default();
                let old = self.ds.entry(rel)?;
                self.plan_path(rel, &md1, old.as_ref(), &mut plan, i64::MAX);
                let ops: Vec<Op> = plan
                    .puts
                    .into_iter()
                    .map(|(path, entry)| Op::Put { path, entry })
                    .collect();
                let mut all = unpin(&mut pinned);
                all.extend(ops);
                return self.submit_meta(all);
            }
            let old = self.ds.entry(rel)?;
            if !force
                && old
                    .as_ref()
                    .is_some_and(|o| file_unchanged(&md1, o, i64::MAX))
            {
                // Contents as recorded: only a changed owner or attribute
                // is put.
                let mut ops = unpin(&mut pinned);
                if let Some(o) = old {
                    match self.ext_changed(&abs, &md1, &o) {
                        Ok(Some(e)) => {
                            ops.push(Op::Put {
                                path: rel.to_vec(),
                                entry: e,
                            });
                        }
                        Ok(None) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => self.skip(rel, &e.to_string()),
                    }
                }
                return self.submit_meta(ops);
            }
            let file = match std::fs::File::open(&abs) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    self.skip(rel, &e.to_string());
                    return self.submit_meta(unpin(&mut pinned));
                }
            };
            let stats = &self.stats;
            let streamed = crate::ingest::stream(&self.ds, &file, &mut pinned, |n| {
                stats.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
            });
            let (refs, batch) = match streamed {
                Ok(s) => (s.refs, s.batch),
                Err(crate::ingest::StreamError::Read(e)) => {
                    self.skip(rel, &format!("read failed: {e}"));
                    return self.submit_meta(unpin(&mut pinned));
                }
                Err(crate::ingest::StreamError::Vault(e)) => return Err(e.into()),
            };
            let md2 = file.metadata().ok();
            let md3 = abs.symlink_metadata().ok();
            let same = |m: &Option<std::fs::Metadata>| {
                m.as_ref().is_some_and(|m| {
                    m.len() == md1.len()
                        && meta_mtime_ns(m) == meta_mtime_ns(&md1)
                        && m.ino() == md1.ino()
                        && m.mode() == md1.mode()
                })
            };
            if !same(&md2) || !same(&md3) {
                // Changed while being read: read it again.
                continue;
            }
            let entry = Entry {
                node: Node::File { chunks: refs },
                mode: md1.mode() & 0o7777,
                mtime_ns: meta_mtime_ns(&md1),
                size: md1.len(),
                ext: None,
            };
            let entry = match self.with_ext(&abs, Some(&file), &md1, entry) {
                Ok(e) => e,
                Err(e) => {
                    self.skip(rel, &format!("reading its owner and attributes: {e}"));
                    return self.submit_meta(unpin(&mut pinned));
                }
            };
            if now_ns() - entry.mtime_ns < RACY_NS && !self.events_complete.load(Ordering::Acquire)
            {
                self.queue_reread(rel, Duration::from_nanos(RACY_NS as u64));
            }
            let mut ops = Vec::new();
            if old.as_ref() != Some(&entry) {
                ops.push(Op::Put {
                    path: rel.to_vec(),
                    entry,
                });
            }
            ops.extend(unpin(&mut pinned.clone()));
            if ops.is_empty() {
                return Ok(());
            }
            let sealed = crate::ingest::seal(keys, &batch);
            if let (Some(q), true) = (queue, pinned.is_empty()) {
                // A file with pinned batches waits below instead, so a
                // failure can still unpin them.
                return self.queue_file(rel, ops, sealed, q);
            }
            match self.ds.submit(ops, sealed) {
                Ok(_) => {
                    pinned.clear();
                    self.stats.files_ingested.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                // A chunk it relied on was freed meanwhile: read again.
                Err(SubmitError::Missing(_)) => continue,
                Err(SubmitError::Vault(e)) => return Err(e.into()),
            }
        }
        tracing::warn!(path = %String::from_utf8_lossy(rel), "file kept changing while being read; will try again");
        self.queue_reread(rel, Duration::from_secs(1));
        self.submit_meta(unpin(&mut pinned))
    }
}

#[cfg(test)]
mod tests {
    //! The source against a real dataset on disk, driven by hand (no
    //! watcher thread, no daemon): scans, excludes, change detection and the
    //! commit gate.

    use super::*;

    struct Fixture {
        _tmp: tempfile::TempDir,
        tree: PathBuf,
        src: DirSource,
    }

    fn fixture(exclude: &[&str]) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        std::fs::create_dir_all(&tree).unwrap();
        let ds = Dataset::open(
            &tmp.path().join("ds"),
            "files",
            &vault::DatasetKey::generate(),
            vault::Options::default(),
        )
        .unwrap();
        let settings = DirectorySettings {
            path: tree.clone(),
            exclude: exclude.iter().map(|s| s.to_string()).collect(),
            rescan_interval: Duration::from_secs(600),
            debounce: Duration::from_millis(200),
            workers: 2,
            preserve: vault::meta::Preserve::ALL,
        };
        let src = DirSource::new(
            settings,
            Arc::new(ds),
            Arc::new(Stats::default()),
            Arc::new(AtomicBool::new(false)),
        )
        .unwrap();
        Fixture {
            _tmp: tmp,
            tree,
            src,
        }
    }

    fn paths(src: &DirSource) -> Vec<String> {
        src.ds
            .entries_with_prefix(b"")
            .unwrap()
            .into_iter()
            .map(|(p, _)| String::from_utf8_lossy(&p).into_owned())
            .collect()
    }

    #[test]
    fn opening_or_reading_a_path_is_no_change_but_a_close_after_writing_is() {
        use notify::event::{DataChange, ModifyKind as M};
        for k in [
            EventKind::Access(AccessKind::Open(AccessMode::Read)),
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Access(AccessKind::Read),
            EventKind::Access(AccessKind::Any),
        ] {
            assert!(is_read_only(&k), "{k:?}");
        }
        for k in [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Modify(M::Data(DataChange::Any)),
            EventKind::Create(CreateKind::File),
            EventKind::Modify(M::Name(RenameMode::To)),
        ] {
            assert!(!is_read_only(&k), "{k:?}");
        }
    }

    #[test]
    fn a_scan_takes_the_tree_without_what_is_excluded_and_only_changes_after() {
        let f = fixture(&["*.tmp", "*/cache"]);
        std::fs::create_dir_all(f.tree.join("docs/cache")).unwrap();
        std::fs::write(f.tree.join("docs/a.txt"), b"alpha").unwrap();
        std::fs::write(f.tree.join("docs/b.tmp"), b"scratch").unwrap();
        std::fs::write(f.tree.join("docs/cache/c.txt"), b"cached").unwrap();
        // Everything counts as settled: no racy re-reads.
        f.src.full_scan(i64::MAX).unwrap();
        assert_eq!(paths(&f.src), ["docs", "docs/a.txt"]);
        let head = f.src.ds.head_seq();
        assert!(head > 0);

        f.src.full_scan(i64::MAX).unwrap();
        assert_eq!(
            f.src.ds.head_seq(),
            head,
            "an unchanged tree appends nothing"
        );

        std::fs::write(f.tree.join("docs/a.txt"), b"alpha, longer").unwrap();
        std::fs::remove_file(f.tree.join("docs/b.tmp")).unwrap();
        f.src.full_scan(i64::MAX).unwrap();
        assert!(f.src.ds.head_seq() > head, "a changed file is taken again");
        let e = f.src.ds.entry(b"docs/a.txt").unwrap().unwrap();
        assert_eq!(e.size, 13);

        std::fs::remove_file(f.tree.join("docs/a.txt")).unwrap();
        f.src.full_scan(i64::MAX).unwrap();
        assert_eq!(paths(&f.src), ["docs"]);
    }

    #[test]
    fn a_scan_finds_what_was_removed_or_changed_kind_by_looking_on_disk() {
        let f = fixture(&[]);
        std::fs::create_dir_all(f.tree.join("d/sub")).unwrap();
        std::fs::write(f.tree.join("d/sub/x"), b"x").unwrap();
        std::fs::write(f.tree.join("d/y"), b"y").unwrap();
        std::fs::write(f.tree.join("d.txt"), b"beside d").unwrap();
        std::fs::write(f.tree.join("e"), b"e").unwrap();
        f.src.full_scan(i64::MAX).unwrap();
        assert_eq!(
            paths(&f.src),
            ["d", "d.txt", "d/sub", "d/sub/x", "d/y", "e"]
        );
        // A directory becomes a file (what it held is gone: its paths now
        // run through a file), a file becomes a directory.
        std::fs::remove_dir_all(f.tree.join("d")).unwrap();
        std::fs::write(f.tree.join("d"), b"now a file").unwrap();
        std::fs::remove_file(f.tree.join("e")).unwrap();
        std::fs::create_dir(f.tree.join("e")).unwrap();
        std::fs::write(f.tree.join("e/z"), b"z").unwrap();
        f.src.full_scan(i64::MAX).unwrap();
        assert_eq!(paths(&f.src), ["d", "d.txt", "e", "e/z"]);
        assert!(!f.src.ds.entry(b"d").unwrap().unwrap().is_dir());
        assert!(f.src.ds.entry(b"e").unwrap().unwrap().is_dir());
    }

    #[test]
    fn a_scan_larger_than_its_batches_takes_every_file_in_one_round() {
        // More files than a scan plans before logging (SCAN_BATCH) and than
        // the round keeps queued (MAX_QUEUED_FILES), so both limits act.
        let (dirs, per_dir) = (25usize, 500usize);
        let files = dirs * per_dir;
        const { assert!(SCAN_BATCH > 2 * MAX_QUEUED_FILES) };
        assert!(files > SCAN_BATCH);
        let f = fixture(&[]);
        for d in 0..dirs {
            let dir = f.tree.join(format!("d{d:02}"));
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..per_dir {
                std::fs::write(dir.join(format!("f{i}")), format!("file {d}/{i}")).unwrap();
            }
        }
        f.src.full_scan(i64::MAX).unwrap();
        let stats = &f.src.stats;
        assert_eq!(
            stats.rounds.load(Ordering::Relaxed),
            1,
            "one round, logged in parts"
        );
        assert_eq!(stats.files_ingested.load(Ordering::Relaxed), files as u64);
        assert_eq!(paths(&f.src).len(), dirs + files);
        let e = f.src.ds.entry(b"d24/f499").unwrap().unwrap();
        assert_eq!(e.size, "file 24/499".len() as u64);

        // Deletions are decided after the walk, whatever was logged before.
        std::fs::remove_dir_all(f.tree.join("d03")).unwrap();
        std::fs::remove_file(f.tree.join("d24/f499")).unwrap();
        f.src.full_scan(i64::MAX).unwrap();
        assert_eq!(paths(&f.src).len(), dirs - 1 + files - per_dir - 1);
        assert!(f.src.ds.entry(b"d03/f0").unwrap().is_none());
    }

    #[test]
    fn a_large_directory_moved_in_is_logged_after_the_directory_itself() {
        // An event round scans a new directory whole; with more files than
        // a scan plans before logging, its contents go out in parts, and
        // no part may come before the directory's own entry.
        let f = fixture(&[]);
        f.src.full_scan(i64::MAX).unwrap();
        let outside = f._tmp.path().join("incoming");
        std::fs::create_dir_all(&outside).unwrap();
        for i in 0..SCAN_BATCH + 500 {
            std::fs::write(outside.join(format!("f{i}")), format!("file {i}")).unwrap();
        }
        let moved = f.tree.join("big");
        std::fs::rename(&outside, &moved).unwrap();
        let from = f.src.ds.head_seq() + 1;
        f.src
            .event_round(BTreeMap::from([(moved, true)]), Vec::new())
            .unwrap();
        let mut tail = vault::wal::Tail::new(&f.src.ds.dir().join("log"), from).unwrap();
        let (mut dir_at, mut first_child_at) = (None, None);
        for raw in tail.read(f.src.ds.head_seq(), usize::MAX).unwrap() {
            let rec = vault::record::Record::decode_payload(&raw.payload).unwrap();
            for op in rec.open_ops(f.src.ds.keys()).unwrap() {
                if let Op::Put { path, .. } = op {
                    if path == b"big" {
                        dir_at.get_or_insert(raw.seq);
                    } else if path.starts_with(b"big/") {
                        first_child_at.get_or_insert(raw.seq);
                    }
                }
            }
        }
        let (dir_at, child_at) = (dir_at.unwrap(), first_child_at.unwrap());
        assert!(
            dir_at < child_at,
            "big at seq {dir_at}, its first file at {child_at}"
        );
        assert_eq!(paths(&f.src).len(), 1 + SCAN_BATCH + 500);
    }

    #[test]
    fn a_round_counts_as_committed_only_when_the_gate_holds() {
        let holds = Arc::new(AtomicBool::new(false));
        let h = holds.clone();
        let gate: CommitGate = Arc::new(move |seq| {
            if h.load(Ordering::Acquire) {
                Ok(())
            } else {
                Err(replicator::upstream::CommitError {
                    site: "zjk-b".into(),
                    seq,
                    waited: Duration::from_secs(5),
                }
                .into())
            }
        });
        let mut f = fixture(&[]);
        f.src = f.src.with_gate(gate);
        std::fs::write(f.tree.join("a"), b"one").unwrap();
        // The scan's round ends with a commit wait, which fails.
        f.src.full_scan(i64::MAX).unwrap();
        let stats = &f.src.stats;
        assert_eq!(stats.committed_seq.load(Ordering::Acquire), 0);
        assert!(stats.commit_failing.load(Ordering::Acquire));
        assert_eq!(stats.commit_failures.load(Ordering::Relaxed), 1);
        // A later round with nothing new waits again for the same head.
        f.src.finish_round();
        assert_eq!(stats.commit_failures.load(Ordering::Relaxed), 2);
        let err = stats.last_error.lock().unwrap().clone().unwrap();
        assert!(err.contains("sync follower zjk-b"), "{err}");

        holds.store(true, Ordering::Release);
        f.src.finish_round();
        assert_eq!(stats.commit_failures.load(Ordering::Relaxed), 2);
        assert_eq!(
            stats.committed_seq.load(Ordering::Acquire),
            f.src.ds.head_seq()
        );
        assert!(!stats.commit_failing.load(Ordering::Acquire));
    }
}
