//! The daemon's archive threads, two per dataset when `[archive]` is set:
//!
//! - the shipper uploads the durable log every `log_flush_interval` (and a
//!   last time at a clean stop), so the archive trails the site by seconds;
//! - the snapshotter takes snapshots on the cron schedule, on request
//!   (`triad snapshot` / `triad prune` from another process drop request
//!   files into `<dataset>/requests/`; the replication port's Admin call
//!   sends a job down [`Shared::ask`]'s channel) and when the shipper found
//!   a gap the log can no longer fill, then applies retention and prunes.
//!
//! The store being down never stops replication or the source: errors are
//! logged, shown in `status.json`, and the work is retried. Log segments stay
//! on disk until shipped (see `runtime::retain`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use archive::{Archiver, PruneReport, SnapshotReport, Store};
use tokio::runtime::Handle;
use vault::Dataset;

use crate::config::ArchiveSettings;
use crate::status::ArchiveStatus;

pub const REQUESTS_DIR: &str = "requests";

pub use crate::ops::archive::{Answer, Kind};

/// A snapshot or prune asked for inside the daemon (an Admin call), with
/// where its answer goes.
struct Job {
    kind: Kind,
    reply: crossbeam_channel::Sender<Answer>,
}

/// Why an on-demand request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("the archive threads have stopped")]
    Stopped,
    #[error("the daemon has not reached its archive yet, so it cannot {}: {error}", kind.as_str())]
    NotReached { kind: Kind, error: String },
    #[error("no answer within {}s (see the daemon's log)", .0.as_secs())]
    Timeout(Duration),
}

/// Shared between the runtime and a dataset's archive threads.
pub struct Shared {
    pub status: Mutex<ArchiveStatus>,
    /// In-process requests; the CLI's come as files (`REQUESTS_DIR`).
    jobs: (
        crossbeam_channel::Sender<Job>,
        crossbeam_channel::Receiver<Job>,
    ),
    /// The live settings; a reload replaces them (the store itself stays).
    settings: Mutex<ArchiveSettings>,
    /// Seq shipped; 0 until known (retention then keeps everything).
    pub shipped: AtomicU64,
    gap: AtomicBool,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut ArchiveStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }

    fn settings(&self) -> ArchiveSettings {
        match self.settings.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Asks the snapshot thread for `kind` and waits up to `timeout` for its
    /// answer. Gives up early when the store was never reached (the thread
    /// answers only once it has been).
    pub fn ask(&self, kind: Kind, timeout: Duration) -> Result<Answer, AskError> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.jobs
            .0
            .send(Job { kind, reply })
            .map_err(|_| AskError::Stopped)?;
        let started = Instant::now();
        while started.elapsed() < timeout {
            match answer.recv_timeout(Duration::from_secs(1)) {
                Ok(a) => return Ok(a),
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return Err(AskError::Stopped)
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            }
            let unreachable = self
                .status
                .lock()
                .ok()
                .filter(|s| !s.opened)
                .and_then(|s| s.ship_error.clone());
            if let Some(e) = unreachable.filter(|_| started.elapsed() > Duration::from_secs(5)) {
                return Err(AskError::NotReached { kind, error: e });
            }
        }
        Err(AskError::Timeout(timeout))
    }

    /// Applies reloaded settings: schedule, retention, flush interval and
    /// prune grace. The caller has checked the store is the same.
    pub fn reload(&self, new: ArchiveSettings) {
        if let Ok(mut s) = self.settings.lock() {
            *s = new;
        }
    }
}

/// Seconds between two runs of a cron schedule, from the next two runs.
pub fn interval_seconds(s: &archive::schedule::Schedule) -> Option<f64> {
    let a = s.next_after(chrono::Utc::now())?;
    let b = s.next_after(a)?;
    Some((b - a).num_milliseconds() as f64 / 1e3)
}

fn now_ns() -> i64 {
    vault::dataset::now_ns()
}

/// Sleeps up to `d`, waking early on stop.
fn nap(stop: &AtomicBool, d: Duration) {
    let until = Instant::now() + d;
    while !stop.load(Ordering::Acquire) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100).min(until - Instant::now()));
    }
}

/// Opens the archiver, retrying until the store answers or the daemon stops.
fn open_archiver(
    settings: &ArchiveSettings,
    rt: &Handle,
    ds: &Arc<Dataset>,
    site: &str,
    shared: &Shared,
    stop: &AtomicBool,
) -> Option<Arc<Archiver>> {
    let mut wait = Duration::from_secs(1);
    while !stop.load(Ordering::Acquire) {
        let r = settings
            .signer()
            .map_err(|e| archive::ArchiveError::Config(e.to_string()))
            .and_then(|signer| {
                let s = Store::open(&settings.store)?;
                Archiver::open(
                    Arc::new(s),
                    rt.clone(),
                    ds.clone(),
                    site,
                    settings.store.concurrency,
                )
                .map(|a| a.with_pack_bytes(settings.pack_bytes).with_signer(signer))
            });
        match r {
            Ok(a) => {
                shared.shipped.store(a.shipped_seq(), Ordering::Release);
                // The newest snapshot already there: its age is what the
                // schedule alert watches, restart or not.
                let newest = a
                    .snapshots()
                    .ok()
                    .and_then(|v| v.last().map(|r| r.taken_ms));
                shared.update(|s| {
                    s.opened = true;
                    s.shipped_seq = a.shipped_seq();
                    s.ship_error = None;
                    if let Some(ms) = newest {
                        s.last_snapshot_ns = s.last_snapshot_ns.max(ms.saturating_mul(1_000_000));
                    }
                });
                return Some(Arc::new(a));
            }
            Err(e) => {
                tracing::error!(dataset = ds.name(), error = %e, "cannot open the archive; retrying");
                shared.update(|s| s.ship_error = Some(e.to_string()));
                nap(stop, wait);
                wait = (wait * 2).min(Duration::from_secs(60));
            }
        }
    }
    None
}

/// Starts a dataset's archive threads.
pub fn start(
    settings: ArchiveSettings,
    rt: Handle,
    ds: Arc<Dataset>,
    site: String,
    stop: Arc<AtomicBool>,
) -> std::io::Result<(Arc<Shared>, std::thread::JoinHandle<()>)> {
    let shared = Arc::new(Shared {
        status: Mutex::new(ArchiveStatus {
            url: settings.store.url.clone(),
            ..ArchiveStatus::default()
        }),
        settings: Mutex::new(settings.clone()),
        jobs: crossbeam_channel::unbounded(),
        shipped: AtomicU64::new(0),
        gap: AtomicBool::new(false),
    });
    let sh = shared.clone();
    let name = ds.name().to_string();
    let handle = std::thread::Builder::new()
        .name(format!("archive-{name}"))
        .spawn(move || {
            let Some(a) = open_archiver(&settings, &rt, &ds, &site, &sh, &stop) else {
                return;
            };
            let snapper = {
                let (a, sh, stop) = (a.clone(), sh.clone(), stop.clone());
                std::thread::Builder::new()
                    .name(format!("snapshots-{name}"))
                    .spawn(move || snapshot_loop(&a, &sh, &stop))
            };
            ship_loop(&a, &sh, &stop);
            if let Ok(t) = snapper {
                let _ = t.join();
            }
        })?;
    Ok((shared, handle))
}

fn ship_once(a: &Archiver, sh: &Shared) {
    match a.ship_log() {
        Ok(Some(seq)) => {
            sh.shipped.store(seq, Ordering::Release);
            sh.update(|s| {
                s.shipped_seq = seq;
                s.last_ship_ns = now_ns();
                s.ship_error = None;
            });
        }
        Ok(None) => {
            sh.gap.store(true, Ordering::Release);
            sh.update(|s| {
                s.ship_error = Some(
                    "the log no longer holds the next record to archive (a state transfer \
                     replaced it, or site.log_retention_max removed it before it was shipped); \
                     a bridging snapshot is being taken"
                        .into(),
                );
                s.gaps_bridged_pending = true;
            });
        }
        Err(e) if e.retryable() => {
            tracing::warn!(dataset = a.dataset().name(), error = %e, "log shipping failed; will retry");
            sh.update(|s| s.ship_error = Some(e.to_string()));
        }
        Err(e) => {
            // Retried all the same (the operator may fix it any moment), but
            // said louder: waiting will not make this one pass.
            tracing::error!(dataset = a.dataset().name(), error = %e, "log shipping failed and will keep failing until the store or its settings are fixed");
            sh.update(|s| s.ship_error = Some(e.to_string()));
        }
    }
}

fn ship_loop(a: &Archiver, sh: &Shared, stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        if !sh.gap.load(Ordering::Acquire) {
            ship_once(a, sh);
        }
        nap(stop, sh.settings().log_flush_interval);
    }
    // A clean stop ships what the log holds, so the archive ends where the
    // site did.
    if !sh.gap.load(Ordering::Acquire) {
        ship_once(a, sh);
    }
}

fn snapshot_loop(a: &Archiver, sh: &Shared, stop: &AtomicBool) {
    let requests = a.dataset().dir().join(REQUESTS_DIR);
    let mut settings = sh.settings();
    let next_of = |settings: &ArchiveSettings| {
        settings
            .schedule
            .as_ref()
            .and_then(|s| s.next_after(chrono::Utc::now()))
    };
    let mut next = next_of(&settings);
    let mut retry_at: Option<Instant> = None;
    while !stop.load(Ordering::Acquire) {
        let now_settings = sh.settings();
        if now_settings.schedule.as_ref().map(|s| s.text())
            != settings.schedule.as_ref().map(|s| s.text())
        {
            next = next_of(&now_settings);
        }
        settings = now_settings;
        let settings = &settings;
        sh.update(|s| {
            s.next_snapshot = next.map(|t| t.to_rfc3339());
            s.snapshot_interval_seconds = settings.schedule.as_ref().and_then(interval_seconds);
        });
        let due = next.is_some_and(|t| chrono::Utc::now() >= t)
            || retry_at.is_some_and(|t| Instant::now() >= t);
        // A bridging snapshot that failed waits for its retry time too.
        let gap = sh.gap.load(Ordering::Acquire) && retry_at.is_none_or(|t| Instant::now() >= t);
        if gap {
            retry_at = None;
            // The archive's log goes on from the bridging snapshot's seq.
            match a.bridge_gap() {
                Ok(r) => {
                    sh.gap.store(false, Ordering::Release);
                    sh.update(|s| {
                        s.last_snapshot = Some(r);
                        s.last_snapshot_ns = now_ns();
                        s.snapshot_error = None;
                        s.gaps_bridged += 1;
                        s.gaps_bridged_pending = false;
                    });
                }
                Err(e) => {
                    tracing::error!(dataset = a.dataset().name(), error = %e, "the bridging snapshot failed; the archive's log is stopped until one succeeds; retrying in 30s");
                    sh.update(|s| s.snapshot_error = Some(e.to_string()));
                    retry_at = Some(Instant::now() + Duration::from_secs(30));
                }
            }
        } else if due {
            retry_at = None;
            if run_snapshot(a, settings, sh, !settings.retention.keeps_everything()).is_err() {
                retry_at = Some(Instant::now() + Duration::from_secs(30));
            }
        }
        if due {
            next = next_of(settings);
        }
        for (path, kind) in pending_requests(&requests) {
            answer_request(&path, &on_demand(a, settings, sh, kind));
        }
        while let Ok(job) = sh.jobs.1.try_recv() {
            // The asker may have given up; its answer is then dropped.
            let _ = job.reply.send(on_demand(a, settings, sh, job.kind));
        }
        nap(stop, Duration::from_millis(500));
    }
}

/// A snapshot or prune asked for, answered.
fn on_demand(a: &Archiver, settings: &ArchiveSettings, sh: &Shared, kind: Kind) -> Answer {
    match kind {
        Kind::Snapshot => match run_snapshot(a, settings, sh, false) {
            Ok(r) => Answer {
                ok: true,
                error: None,
                snapshot: Some(r),
                prune: None,
            },
            Err(e) => failed(e),
        },
        Kind::Prune => match run_prune(a, settings, sh) {
            Ok(r) => Answer {
                ok: true,
                error: None,
                snapshot: None,
                prune: Some(r),
            },
            Err(e) => failed(e),
        },
    }
}

fn failed(e: String) -> Answer {
    Answer {
        ok: false,
        error: Some(e),
        snapshot: None,
        prune: None,
    }
}

fn run_snapshot(
    a: &Archiver,
    settings: &ArchiveSettings,
    sh: &Shared,
    then_prune: bool,
) -> Result<SnapshotReport, String> {
    match a.snapshot() {
        Ok(r) => {
            sh.update(|s| {
                s.last_snapshot = Some(r.clone());
                s.last_snapshot_ns = now_ns();
                s.snapshot_error = None;
            });
            if then_prune {
                let _ = run_prune(a, settings, sh);
            }
            Ok(r)
        }
        Err(e) => {
            tracing::error!(dataset = a.dataset().name(), error = %e, "snapshot failed; nothing partial is visible; will retry");
            sh.update(|s| s.snapshot_error = Some(e.to_string()));
            Err(e.to_string())
        }
    }
}

fn run_prune(a: &Archiver, settings: &ArchiveSettings, sh: &Shared) -> Result<PruneReport, String> {
    match a.prune(&settings.retention, settings.prune_grace) {
        Ok(r) => {
            sh.update(|s| {
                s.last_prune = Some(r.clone());
                s.prune_error = None;
            });
            Ok(r)
        }
        Err(e) => {
            tracing::error!(dataset = a.dataset().name(), error = %e, "prune failed; will retry with the next snapshot");
            sh.update(|s| s.prune_error = Some(e.to_string()));
            Err(e.to_string())
        }
    }
}

/// Request files (`<id>.snapshot`, `<id>.prune`) not yet answered.
fn pending_requests(dir: &Path) -> Vec<(PathBuf, Kind)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(PathBuf, Kind)> = rd
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            let kind = Kind::parse(p.extension()?.to_str()?)?;
            Some((p, kind))
        })
        .collect();
    out.sort();
    out
}

fn answer_request(req: &Path, answer: &Answer) {
    let result = req.with_extension("result");
    let tmp = req.with_extension("result.tmp");
    let body = serde_json::to_vec_pretty(answer).unwrap_or_default();
    if let Err(e) = std::fs::write(&tmp, body).and_then(|_| std::fs::rename(&tmp, &result)) {
        tracing::warn!(path = %result.display(), error = %e, "cannot answer a request");
    }
    let _ = std::fs::remove_file(req);
}

/// Asks the running daemon to do `kind` ("snapshot" or "prune") for the
/// dataset in `dataset_dir`, and waits for its answer. Gives up early when
/// the daemon's status shows it never reached its store (it would not
/// answer until it does).
pub fn request(dataset_dir: &Path, kind: &str, timeout: Duration) -> std::io::Result<Answer> {
    let dir = dataset_dir.join(REQUESTS_DIR);
    std::fs::create_dir_all(&dir)?;
    let id = format!("{}-{}", now_ns(), std::process::id());
    let req = dir.join(format!("{id}.{kind}"));
    std::fs::write(&req, b"")?;
    let result = dir.join(format!("{id}.result"));
    let started = Instant::now();
    let until = started + timeout;
    while Instant::now() < until {
        if let Ok(b) = std::fs::read(&result) {
            let _ = std::fs::remove_file(&result);
            return serde_json::from_slice(&b).map_err(std::io::Error::other);
        }
        if started.elapsed() > Duration::from_secs(5) {
            if let Some(e) = unreachable_store(dataset_dir) {
                let _ = std::fs::remove_file(&req);
                return Err(std::io::Error::other(format!(
                    "the daemon has not reached its archive yet, so it cannot {kind}: {e}"
                )));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = std::fs::remove_file(&req);
    Err(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "the daemon did not answer within {}s (is it running with [archive] set? see its log)",
            timeout.as_secs()
        ),
    ))
}

/// The daemon's error opening its store, while it has not opened it.
fn unreachable_store(dataset_dir: &Path) -> Option<String> {
    let st =
        crate::status::DatasetStatus::read(&dataset_dir.join(crate::status::STATUS_FILE)).ok()?;
    st.archive.filter(|a| !a.opened)?.ship_error
}
