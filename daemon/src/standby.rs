//! The hot standby thread of a follower's dataset (`standby_path`): keeps
//! the standby tree equal to the dataset as records apply
//! (`vault::standby`), saves its cursor every few seconds and at a stop,
//! and publishes how far behind the dataset the tree is.
//!
//! A pass that fails, or leaves a path it could not make equal, is followed
//! (after a pause) by a full reconcile: the tree never stays wrong quietly,
//! and the error is in status and the metrics until a pass is clean.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vault::standby::{Pass, Standby};
use vault::Dataset;

use crate::status::StandbyStatus;

/// How often the tree is flushed and its cursor saved while it moves.
const SAVE_EVERY: Duration = Duration::from_secs(5);
/// The pause after a failed pass before the reconcile that follows it,
/// doubling while reconciles keep failing (each walks the whole tree).
const RETRY_AFTER: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(120);

/// What the thread publishes.
#[derive(Default)]
pub struct StandbyStats {
    pub path: PathBuf,
    /// The tree equals the dataset up to this seq.
    pub seq: AtomicU64,
    /// The first reconcile has finished: the tree is usable.
    pub ready: AtomicBool,
    pub written: AtomicU64,
    pub removed: AtomicU64,
    pub reconciles: AtomicU64,
    /// Paths the last pass could not make equal.
    pub problems: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// The first log seq the tree still needs kept (0: none).
    pub keep_from: AtomicU64,
    /// When the tree last had every record the dataset had.
    pub caught_up_ns: std::sync::atomic::AtomicI64,
}

impl StandbyStats {
    /// The status part, with the lag against the dataset as it is now.
    pub fn view(&self, ds: &Dataset) -> StandbyStatus {
        let seq = self.seq.load(Ordering::Acquire);
        let head = ds.head_seq();
        // The oldest record not yet in the tree, by its commit time at the
        // primary: the age of the oldest change a reader does not see yet.
        // When that time is not known (records from before this start),
        // the time since the tree last had everything.
        let lag_seconds = if head > seq {
            let since = ds
                .commit_time(seq + 1)
                .unwrap_or_else(|| self.caught_up_ns.load(Ordering::Acquire));
            (vault::dataset::now_ns() - since).max(0) as f64 / 1e9
        } else {
            0.0
        };
        StandbyStatus {
            path: self.path.display().to_string(),
            ready: self.ready.load(Ordering::Acquire),
            seq,
            lag_records: head.saturating_sub(seq),
            lag_seconds,
            written: self.written.load(Ordering::Relaxed),
            removed: self.removed.load(Ordering::Relaxed),
            reconciles: self.reconciles.load(Ordering::Relaxed),
            problems: self.problems.load(Ordering::Relaxed),
            last_error: self.last_error.lock().ok().and_then(|e| e.clone()),
        }
    }

    /// Counts what a pass or reconcile did and the seq it reached. Its
    /// problems are published by the caller: a clean pass does not clear
    /// the problems an earlier one left (only a clean reconcile does).
    fn advance(&self, pass: &Pass) {
        self.seq.store(pass.seq, Ordering::Release);
        self.written.fetch_add(pass.written, Ordering::Relaxed);
        self.removed.fetch_add(pass.removed, Ordering::Relaxed);
    }

    fn set_error(&self, e: Option<String>) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = e;
        }
    }
}

/// Opens the standby tree of `ds` at `root` (refusing a directory triad did
/// not make) and starts its thread, which runs until `stop`.
pub fn start(
    ds: Arc<Dataset>,
    root: PathBuf,
    cursor_file: PathBuf,
    own: bool,
    ready_at: u64,
    evidence_root: PathBuf,
    stop: Arc<AtomicBool>,
) -> vault::Result<(Arc<StandbyStats>, std::thread::JoinHandle<()>)> {
    // `own`: the tree was this site's source until it stopped being the
    // primary, so it is taken over whatever it holds.
    let sb = if own {
        Standby::open_own(&root, &cursor_file)?
    } else {
        Standby::open(&root, &cursor_file)?
    };
    // What was written into the former source and never logged is kept
    // before the tree follows the new primary. (A dataset started afresh
    // after its divergent tail was set aside has no state to judge by:
    // the set-aside copy is the evidence then.)
    if own && ready_at == 0 {
        keep_unlogged(&sb, &ds, &evidence_root)?;
    }
    let stats = Arc::new(StandbyStats {
        path: root,
        caught_up_ns: std::sync::atomic::AtomicI64::new(vault::dataset::now_ns()),
        ..StandbyStats::default()
    });
    stats.keep_from.store(sb.keep_from(), Ordering::Release);
    let st = stats.clone();
    let handle = std::thread::Builder::new()
        .name(format!("standby-{}", ds.name()))
        .spawn(move || {
            // A dataset started afresh (its divergent tail set aside) is
            // made equal to the tree only once it holds the common history
            // again: reconciling with a half-filled copy would empty the
            // tree for nothing.
            if ds.head_seq() < ready_at {
                tracing::info!(
                    dataset = ds.name(),
                    ready_at,
                    "standby tree waits until the dataset has caught up"
                );
            }
            while ds.head_seq() < ready_at && !stop.load(Ordering::Acquire) {
                pause(&stop, Duration::from_millis(200));
            }
            follow(&sb, &ds, &st, &stop)
        })
        .map_err(|e| vault::VaultError::Closed(format!("cannot start the standby thread: {e}")))?;
    Ok((stats, handle))
}

/// Links the former source's unlogged files under
/// `<evidence_root>/<dataset>-unlogged-<ms>/` with an `evidence.json`
/// naming them, and says so loudly.
fn keep_unlogged(sb: &Standby, ds: &Dataset, evidence_root: &std::path::Path) -> vault::Result<()> {
    let ms = vault::dataset::now_ns() / 1_000_000;
    let dir = evidence_root.join(format!("{}-unlogged-{ms}", ds.name()));
    let kept = sb.keep_unlogged(ds, &dir)?;
    if !kept.is_empty() {
        tracing::warn!(dataset = ds.name(), files = kept.len(), evidence = %dir.display(), "files in the former primary's tree were never logged: kept as evidence before the tree follows the new primary");
    }
    Ok(())
}

/// Sleeps up to `d`, waking early on `stop`.
fn pause(stop: &AtomicBool, d: Duration) {
    let until = Instant::now() + d;
    while !stop.load(Ordering::Acquire) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn follow(sb: &Standby, ds: &Dataset, stats: &StandbyStats, stop: &AtomicBool) {
    let name = ds.name();
    let mut seq = 0u64;
    // When the next whole-tree reconcile is due: at start, and after a pass
    // or reconcile that left paths unequal (with a growing pause). Passes go
    // on meanwhile, so one path that cannot be fixed does not stop the rest
    // of the tree from following.
    let mut reconcile_at = Some(Instant::now());
    let mut retry = RETRY_AFTER;
    // Whether the tree is known equal to the dataset at `seq`: only then is
    // a cursor saved (a restart trusts size and mtime for what it covers).
    let mut equal = false;
    let mut saved_at = Instant::now();
    let mut saved_seq = None;
    while !stop.load(Ordering::Acquire) {
        let ready = stats.ready.load(Ordering::Acquire);
        if reconcile_at.is_some_and(|t| Instant::now() >= t) {
            let started = Instant::now();
            match sb.reconcile(ds) {
                Ok(pass) => {
                    stats.reconciles.fetch_add(1, Ordering::Relaxed);
                    stats.advance(&pass);
                    stats
                        .problems
                        .store(pass.problems.len() as u64, Ordering::Relaxed);
                    stats.ready.store(true, Ordering::Release);
                    seq = pass.seq;
                    tracing::info!(dataset = name, seq, written = pass.written, removed = pass.removed, took = ?started.elapsed(), "standby tree reconciled with the dataset");
                    equal = clean(name, stats, &pass);
                }
                Err(e) => {
                    tracing::error!(dataset = name, error = %e, "standby tree: reconcile failed; trying again");
                    stats.problems.store(1, Ordering::Relaxed);
                    stats.set_error(Some(format!("reconcile failed: {e}")));
                    equal = false;
                }
            }
            if equal {
                reconcile_at = None;
                retry = RETRY_AFTER;
            } else {
                reconcile_at = Some(Instant::now() + retry);
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
        if !stats.ready.load(Ordering::Acquire) {
            // No reconcile has finished yet: there is no seq to follow from.
            pause(stop, Duration::from_millis(250));
            continue;
        }
        let head = ds.wait_head_above(seq, Duration::from_millis(250));
        if head > seq && ready {
            match sb.apply(ds, seq + 1) {
                Ok(Some(pass)) => {
                    seq = pass.seq;
                    stats.advance(&pass);
                    if !pass.problems.is_empty() {
                        stats
                            .problems
                            .store(pass.problems.len() as u64, Ordering::Relaxed);
                        clean(name, stats, &pass);
                        equal = false;
                        reconcile_at.get_or_insert_with(|| Instant::now() + retry);
                    }
                }
                Ok(None) => {
                    tracing::warn!(dataset = name, seq, "standby tree: the log no longer holds the next record (a state transfer replaced it); reconciling the whole tree");
                    equal = false;
                    reconcile_at = Some(Instant::now());
                }
                Err(e) => {
                    tracing::error!(dataset = name, error = %e, "standby tree: pass failed; reconciling");
                    stats.set_error(Some(format!("pass failed: {e}")));
                    equal = false;
                    reconcile_at.get_or_insert_with(|| Instant::now() + retry);
                    pause(stop, RETRY_AFTER);
                }
            }
        }
        if seq >= ds.head_seq() {
            stats
                .caught_up_ns
                .store(vault::dataset::now_ns(), Ordering::Release);
        }
        if equal && saved_seq != Some(seq) && saved_at.elapsed() >= SAVE_EVERY {
            saved_at = Instant::now();
            if save(sb, ds, stats, seq) {
                saved_seq = Some(seq);
            }
        }
    }
    if equal && saved_seq != Some(seq) {
        save(sb, ds, stats, seq);
    }
}

/// Whether a pass left the tree equal; problems are logged and published.
fn clean(name: &str, stats: &StandbyStats, pass: &Pass) -> bool {
    if pass.problems.is_empty() {
        stats.set_error(None);
        return true;
    }
    for p in pass.problems.iter().take(20) {
        tracing::error!(dataset = name, problem = %p, "standby tree: a path is not equal to the dataset");
    }
    stats.set_error(Some(format!(
        "{} paths not equal to the dataset, first: {}",
        pass.problems.len(),
        pass.problems[0]
    )));
    false
}

/// Saves the cursor at `seq`; whether it was saved.
fn save(sb: &Standby, ds: &Dataset, stats: &StandbyStats, seq: u64) -> bool {
    let hash = match ds.chain_hash_at(seq) {
        Ok(Some(h)) => h,
        // Nothing applied yet: nothing to remember.
        Ok(None) => return true,
        Err(e) => {
            tracing::warn!(dataset = ds.name(), error = %e, "standby tree: cannot read the chain hash to save the cursor; will retry");
            return false;
        }
    };
    match sb.save(seq, hash) {
        Ok(()) => {
            stats.keep_from.store(sb.keep_from(), Ordering::Release);
            true
        }
        Err(e) => {
            tracing::warn!(dataset = ds.name(), error = %e, "standby tree: saving the cursor failed; will retry");
            false
        }
    }
}
