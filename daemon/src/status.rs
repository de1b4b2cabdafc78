//! The status every part of a site reports, in one place: what
//! `status.json` in each dataset directory holds ([`DatasetStatus`] and its
//! parts, written by the runtime from what the source, pushed datasets,
//! archive threads and scheduled checks publish), and the snapshot the
//! HTTP endpoint and the metrics answer from ([`SiteView`]).
//!
//! It imports no other part of the daemon but the config, so the parts
//! that write status and the parts that read it depend on it and never on
//! each other.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};

use archive::{PruneReport, SnapshotReport};
use replicator::follower::FollowStatus;
use replicator::upstream::LinkStatus;
use serde::{Deserialize, Serialize};

/// What `status.json` in each dataset directory holds. The runtime writes
/// it; `triad status`, drills and the archive threads read it back as this
/// same type (every field defaults, so a file from an older daemon reads).
#[derive(Serialize, Deserialize, Default, Clone)]
#[serde(default)]
pub struct DatasetStatus {
    pub dataset: String,
    pub site: String,
    pub role: String,
    pub pid: u32,
    pub updated_ns: i64,
    pub log: vault::Status,
    /// The directory source (primary only).
    pub source: Option<StatsView>,
    /// `triad put` into a pushed dataset (primary only).
    pub puts: Option<PutStatsView>,
    /// The hot standby tree (followers with `standby_path`).
    pub standby: Option<StandbyStatus>,
    pub replication: ReplicationStatus,
    pub retention: Retention,
    /// This site's archive, when `[archive]` is set.
    pub archive: Option<ArchiveStatus>,
    /// Scheduled verify, scrub and drill results, when any is scheduled.
    pub checks: Option<ChecksStatus>,
    /// The takeover group's record and this site's seat and fence, when
    /// `[takeover]` is set.
    pub takeover: Option<TakeoverStatus>,
    /// The cryptographic device holding the key that wraps this dataset's
    /// key, when its key file is wrapped (`triad key wrap`).
    pub key_device: Option<crate::keywatch::KeyDeviceStatus>,
    pub failure: Option<String>,
    /// Why the reader has no status for this dataset (set by `triad status`
    /// when the file is missing; the daemon never sets it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A follower's hot standby tree: how far it is behind the dataset.
#[derive(Serialize, Deserialize, Default, Clone, Debug)]
#[serde(default)]
pub struct StandbyStatus {
    pub path: String,
    /// The first reconcile since start has finished.
    pub ready: bool,
    /// The tree equals the dataset up to this seq.
    pub seq: u64,
    /// Records applied to the dataset but not yet to the tree.
    pub lag_records: u64,
    /// Age of the oldest change not yet in the tree (from its commit at
    /// the primary); 0 when the tree is current.
    pub lag_seconds: f64,
    /// Paths written and removed since start.
    pub written: u64,
    pub removed: u64,
    /// Whole-tree reconciles since start (one at start, more after errors).
    pub reconciles: u64,
    /// Paths the last pass could not make equal.
    pub problems: u64,
    pub last_error: Option<String>,
}

/// The retained change log.
#[derive(Serialize, Deserialize, Default, Clone)]
#[serde(default)]
pub struct Retention {
    pub first_seq: u64,
    pub log_bytes: u64,
    /// Followers the size cap pushed behind the retained log since start.
    pub forced_transfers: u64,
}

#[derive(Serialize, Deserialize, Default, Clone)]
#[serde(default)]
pub struct ReplicationStatus {
    /// The sites following this one, with what each has acknowledged.
    pub followers: Vec<LinkStatus>,
    /// The site this one follows (followers only).
    pub upstream: Option<FollowStatus>,
    /// Connections refused at the replication port since start.
    pub refused_handshakes: u64,
    pub refused_unknown_sites: u64,
}

pub const STATUS_FILE: &str = "status.json";

/// Writes a dataset's status file (no fsync: it is rewritten every few
/// hundred milliseconds and must not compete with the log for the disk).
pub fn write(path: &Path, st: &DatasetStatus) {
    if let Ok(body) = serde_json::to_vec_pretty(st) {
        if let Err(e) = vault::fs::write_replace(path, &body, false) {
            tracing::warn!(error = %e, "cannot write status file");
        }
    }
}

/// The `checks` part of `status.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ChecksStatus {
    pub last_verify_ns: i64,
    /// The last verify compared the copies and they agreed (true) or
    /// differed (false); None when it has not run or could not compare.
    pub last_verify_agree: Option<bool>,
    /// "agree", "disagree" or "incomplete" (a site did not answer, or no
    /// common checkpoint yet).
    pub last_verify_outcome: Option<String>,
    pub last_verify_verdict: Option<String>,
    pub verify_mismatch_total: u64,
    pub last_scrub_ns: i64,
    pub last_scrub_ok: Option<bool>,
    pub last_scrub_damaged: u64,
    pub last_scrub_mb_per_s: f64,
    pub repairs_total: u64,
    pub last_drill_ns: i64,
    /// When a drill last passed (0: never since start).
    pub last_drill_success_ns: i64,
    pub last_drill_result: Option<String>,
    pub last_drill_rto_seconds: Option<f64>,
    pub last_drill_rpo_seconds: Option<f64>,
    pub last_drill_report: Option<String>,
    pub drill_failures_total: u64,
    /// Seconds between scheduled runs (from the cron schedules), for the
    /// "overdue" alerts; absent when not scheduled.
    pub verify_interval_seconds: Option<f64>,
    pub scrub_interval_seconds: Option<f64>,
    pub drill_interval_seconds: Option<f64>,
    pub last_error: Option<String>,
}

/// The archive part of `status.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ArchiveStatus {
    pub url: String,
    /// The store answered and the archive is open; until then nothing is
    /// shipped and requests wait.
    pub opened: bool,
    /// Highest seq whose record is in the archive.
    pub shipped_seq: u64,
    pub last_ship_ns: i64,
    /// The last snapshot this daemon took (none yet since start).
    pub last_snapshot: Option<SnapshotReport>,
    /// When the newest snapshot in the archive was taken (read from the
    /// archive at start, so monitoring survives a restart).
    pub last_snapshot_ns: i64,
    /// Seconds between scheduled snapshots (from the cron schedule), for
    /// the "snapshot older than its schedule" alert.
    pub snapshot_interval_seconds: Option<f64>,
    pub last_prune: Option<PruneReport>,
    pub next_snapshot: Option<String>,
    /// The latest failure, cleared by the next success of the same kind.
    pub ship_error: Option<String>,
    pub snapshot_error: Option<String>,
    pub prune_error: Option<String>,
    /// Gaps in the local log bridged by a snapshot since start.
    pub gaps_bridged: u64,
    /// A gap was found and its bridging snapshot has not succeeded yet.
    pub gaps_bridged_pending: bool,
}

/// The directory source's part of `status.json`.
#[derive(Serialize, Deserialize, Default, Clone)]
#[serde(default)]
pub struct StatsView {
    pub rounds: u64,
    pub files_ingested: u64,
    pub bytes_read: u64,
    pub skipped: u64,
    pub pending_paths: u64,
    pub busy: bool,
    pub initial_scan_done: bool,
    /// No events pending, no round running, and every event seen so far has
    /// been handled by a completed round.
    pub settled: bool,
    pub last_event_ns: i64,
    pub last_round_end_ns: i64,
    pub committed_seq: u64,
    pub commit_failures: u64,
    pub commit_failing: bool,
    /// Paused: this site is fenced and takes no changes.
    pub fenced: bool,
    pub last_error: Option<String>,
}

/// Where an epoch began.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochStart {
    pub epoch: u64,
    pub primary: String,
    /// Per dataset, the first seq written in this epoch (the promoted
    /// site's head then, plus one). Empty for epoch 1: it owns everything
    /// from seq 1.
    pub starts: BTreeMap<String, u64>,
    /// Taken with `--force`: acknowledged writes may be missing.
    pub forced: bool,
    pub reason: String,
    pub time_ns: i64,
}

/// The part of the status a takeover group adds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TakeoverStatus {
    pub epoch: u64,
    pub primary: Option<String>,
    pub seat: String,
    pub fenced: bool,
    pub fenced_reason: Option<String>,
    pub sync: Vec<String>,
    pub fence_after_seconds: f64,
    /// Seconds since the last majority confirmation (primary only).
    pub lease_age_seconds: Option<f64>,
    pub heard_seconds: BTreeMap<String, f64>,
    /// The Raft leader, as this site knows it: the primary asks for the
    /// leadership once confirmed.
    pub leader: Option<String>,
    pub history: Vec<EpochStart>,
}

/// The `puts` part of `status.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PutStatsView {
    pub stored: u64,
    pub existed: u64,
    pub refused: u64,
    pub commit_failures: u64,
    pub commit_failing: bool,
    /// Puts refused because this site is fenced.
    pub fenced_refusals: u64,
    pub last_error: Option<String>,
}

/// Where the daemon is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Opening datasets (recovering and replaying their logs).
    Opening,
    Running,
    Stopping,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Opening => "opening",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
        }
    }
}

/// What the HTTP handlers answer from: the main loop's latest snapshot.
pub struct SiteView {
    pub site: String,
    pub role: &'static str,
    /// When the daemon started (ns since the epoch).
    pub started_ns: i64,
    phase: AtomicU8,
    /// When the main loop last published (ns since the epoch).
    tick_ns: AtomicI64,
    datasets: RwLock<Arc<Vec<DatasetStatus>>>,
}

/// The main loop publishes every 250 ms; a snapshot this old means it is stuck.
pub(crate) const STALE_NS: i64 = 10_000_000_000;

/// A whole site's status: what `/v1/status` and the SiteStatus call serve,
/// and what `triad status` reads (from them, or assembled from this site's
/// status files when its daemon is not asked).
#[derive(Serialize, Deserialize, Default, Clone)]
#[serde(default)]
pub struct SiteStatus {
    pub site: String,
    pub role: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
    /// Why the site is not ready, one line per reason.
    pub not_ready: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub datasets: Vec<DatasetStatus>,
    /// Why the site could not be asked (set by the reader).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unreachable: Option<String>,
}

impl DatasetStatus {
    /// Reads a dataset's status file as the daemon last wrote it.
    pub fn read(path: &Path) -> std::io::Result<DatasetStatus> {
        let b = std::fs::read(path)?;
        serde_json::from_slice(&b)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}

impl SiteView {
    pub fn new(site: &str, role: &'static str) -> SiteView {
        SiteView {
            site: site.to_string(),
            role,
            started_ns: vault::dataset::now_ns(),
            phase: AtomicU8::new(Phase::Opening as u8),
            tick_ns: AtomicI64::new(vault::dataset::now_ns()),
            datasets: RwLock::new(Arc::new(Vec::new())),
        }
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Opening,
            1 => Phase::Running,
            _ => Phase::Stopping,
        }
    }

    pub fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Release);
    }

    /// Replaces the snapshot (the main loop, every round).
    pub fn publish(&self, datasets: Vec<DatasetStatus>) {
        if let Ok(mut d) = self.datasets.write() {
            *d = Arc::new(datasets);
        }
        self.tick_ns
            .store(vault::dataset::now_ns(), Ordering::Release);
    }

    pub fn datasets(&self) -> Arc<Vec<DatasetStatus>> {
        self.datasets.read().map(|d| d.clone()).unwrap_or_default()
    }

    /// Nanoseconds since the main loop last published.
    pub fn stale_ns(&self) -> i64 {
        vault::dataset::now_ns() - self.tick_ns.load(Ordering::Acquire)
    }

    /// Why the site is not ready; empty when it is.
    pub fn not_ready(&self, datasets: &[DatasetStatus]) -> Vec<String> {
        let mut why = Vec::new();
        match self.phase() {
            Phase::Opening => why.push("opening datasets: recovering and replaying the log".into()),
            Phase::Stopping => why.push("stopping".into()),
            Phase::Running => {}
        }
        let stale = self.stale_ns();
        if stale > STALE_NS {
            why.push(format!(
                "the main loop has not run for {:.0} s",
                stale as f64 / 1e9
            ));
        }
        for d in datasets {
            if let Some(f) = &d.failure {
                why.push(format!("dataset `{}` failed: {f}", d.dataset));
            }
            if let Some(u) = d
                .replication
                .upstream
                .as_ref()
                .filter(|u| u.receiving_transfer)
            {
                why.push(format!(
                    "dataset `{}` is catching up by state transfer from {}",
                    d.dataset, u.upstream
                ));
            }
        }
        why
    }

    pub fn status_json(&self) -> serde_json::Value {
        let datasets = self.datasets();
        let not_ready = self.not_ready(&datasets);
        serde_json::to_value(SiteStatus {
            site: self.site.clone(),
            role: self.role.to_string(),
            phase: Some(self.phase()),
            ready: Some(not_ready.is_empty()),
            not_ready,
            version: Some(env!("CARGO_PKG_VERSION").to_string()),
            datasets: datasets.as_ref().clone(),
            unreachable: None,
        })
        .unwrap_or_default()
    }
}
