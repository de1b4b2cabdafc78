//! `/metrics`: the site's status in the Prometheus text format, built at
//! each scrape from the main loop's latest snapshot (so a scrape costs one
//! small registry and never touches the data path).
//!
//! Every series carries `site` (this site's name) and, where it applies,
//! `dataset` and `peer`. Replication series carry `link`: `follower` at the
//! site that serves the log (the peer follows this site), `upstream` at the
//! site that follows (the peer is where this site's log comes from). The
//! names, and what each alert in `configs/alerts.yml` does with them, are
//! listed in docs/operations.md.

use prometheus::{Encoder, GaugeVec, IntCounterVec, Opts, Registry, TextEncoder};

use crate::status::{DatasetStatus, SiteView};

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Registers metrics into one registry, all labelled with the site.
struct Metrics {
    reg: Registry,
    site: String,
}

impl Metrics {
    fn gauge(&self, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<GaugeVec> {
        let g = GaugeVec::new(
            Opts::new(name, help).const_label("site", self.site.clone()),
            labels,
        )?;
        self.reg.register(Box::new(g.clone()))?;
        Ok(g)
    }

    fn counter(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> prometheus::Result<IntCounterVec> {
        let c = IntCounterVec::new(
            Opts::new(name, help).const_label("site", self.site.clone()),
            labels,
        )?;
        self.reg.register(Box::new(c.clone()))?;
        Ok(c)
    }
}

fn secs(ns: i64) -> f64 {
    ns as f64 / 1e9
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// The metrics text for the site as it is now.
pub fn render(view: &SiteView) -> prometheus::Result<String> {
    let datasets = view.datasets();
    let m = Metrics {
        reg: Registry::new(),
        site: view.site.clone(),
    };
    site(&m, view, &datasets)?;
    log(&m, &datasets)?;
    replication(&m, &datasets)?;
    intake(&m, &datasets)?;
    standby(&m, &datasets)?;
    key_devices(&m, &datasets)?;
    takeover(&m, &datasets)?;
    archive(&m, &datasets)?;
    verify_and_scrub(&m, &datasets)?;
    drills(&m, &datasets)?;
    let mut out = Vec::new();
    TextEncoder::new().encode(&m.reg.gather(), &mut out)?;
    String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
}

/// The daemon itself: version and role, start time, readiness.
fn site(m: &Metrics, view: &SiteView, datasets: &[DatasetStatus]) -> prometheus::Result<()> {
    let info = m.gauge(
        "triad_build_info",
        "Always 1; the version and role as labels.",
        &["version", "role"],
    )?;
    info.with_label_values(&[env!("CARGO_PKG_VERSION"), view.role])
        .set(1.0);
    let sm4 = vault::crypto::sm4_engine();
    let engine = m.gauge(
        "triad_sm4_accelerated",
        "1 when SM4-GCM runs on libgcrypt, 0 on the portable software path (several times slower); the engine as a label.",
        &["engine"],
    )?;
    engine
        .with_label_values(&[sm4.name.as_str()])
        .set(flag(sm4.fallback_reason.is_none()));
    let started = m.gauge(
        "triad_start_timestamp_seconds",
        "When this daemon started (for alerts on work that has never run since).",
        &[],
    )?;
    started.with_label_values(&[]).set(secs(view.started_ns));
    let ready = m.gauge(
        "triad_ready",
        "1 when every dataset is open and usable (what /readyz answers).",
        &[],
    )?;
    // not_ready covers the phase (opening, stopping) too.
    ready
        .with_label_values(&[])
        .set(flag(view.not_ready(datasets).is_empty()));
    Ok(())
}

/// Each dataset's change log: head, applied, retention, failure.
fn log(m: &Metrics, datasets: &[DatasetStatus]) -> prometheus::Result<()> {
    let head = m.gauge(
        "triad_wal_head_seq",
        "Highest seq durable in this site's change log.",
        &["dataset"],
    )?;
    let applied = m.gauge(
        "triad_applied_seq",
        "Highest seq applied to this site's state.",
        &["dataset"],
    )?;
    let last_commit = m.gauge(
        "triad_wal_last_commit_timestamp_seconds",
        "When the newest record in the log was committed.",
        &["dataset"],
    )?;
    let log_bytes = m.gauge(
        "triad_wal_retained_bytes",
        "Bytes of change log kept on disk.",
        &["dataset"],
    )?;
    let log_first = m.gauge(
        "triad_wal_first_seq",
        "Oldest seq still in the local log.",
        &["dataset"],
    )?;
    let failed = m.gauge(
        "triad_dataset_failed",
        "1 when the dataset stopped on an error (diverged, damaged log); see triad status.",
        &["dataset"],
    )?;
    let forced = m.counter(
        "triad_wal_forced_transfers_total",
        "Followers the log size cap (site.log_retention_max) pushed into a state transfer.",
        &["dataset"],
    )?;

    for d in datasets {
        let ds = d.dataset.as_str();
        head.with_label_values(&[ds]).set(d.log.head_seq as f64);
        applied
            .with_label_values(&[ds])
            .set(d.log.applied_seq as f64);
        last_commit
            .with_label_values(&[ds])
            .set(secs(d.log.last_commit_ns));
        log_bytes
            .with_label_values(&[ds])
            .set(d.retention.log_bytes as f64);
        log_first
            .with_label_values(&[ds])
            .set(d.retention.first_seq as f64);
        failed
            .with_label_values(&[ds])
            .set(flag(d.failure.is_some()));
        forced
            .with_label_values(&[ds])
            .inc_by(d.retention.forced_transfers);
    }
    Ok(())
}

/// Replication links, both ways, and refused connections.
fn replication(m: &Metrics, datasets: &[DatasetStatus]) -> prometheus::Result<()> {
    let lag_s = m.gauge(
        "triad_replication_lag_seconds",
        "Age of the oldest change the follower lacks (0 when caught up).",
        &["dataset", "peer", "link"],
    )?;
    let lag_r = m.gauge(
        "triad_replication_lag_records",
        "Records the follower lacks.",
        &["dataset", "peer", "link"],
    )?;
    let lag_b = m.gauge(
        "triad_replication_lag_bytes",
        "Bytes of log the follower lacks.",
        &["dataset", "peer", "link"],
    )?;
    let connected = m.gauge(
        "triad_peer_connected",
        "1 while the replication link to the peer is up.",
        &["dataset", "peer", "link"],
    )?;
    let acked = m.gauge(
        "triad_replication_acked_seq",
        "Highest seq the follower has acknowledged as durable.",
        &["dataset", "peer", "mode"],
    )?;
    let degraded = m.gauge(
        "triad_replication_degraded",
        "1 while a sync follower is degraded to async (on_unreachable = degrade).",
        &["dataset", "peer"],
    )?;
    let degradations = m.counter(
        "triad_replication_degradations_total",
        "Times a sync follower was degraded to async since start.",
        &["dataset", "peer"],
    )?;
    let transfer = m.gauge(
        "triad_replication_receiving_transfer",
        "1 while this site catches up by state transfer (not ready).",
        &["dataset", "peer"],
    )?;
    let refused = m.counter(
        "triad_replication_refused_connections_total",
        "Connections refused at the replication port since start, by reason.",
        &["reason"],
    )?;

    for d in datasets {
        let ds = d.dataset.as_str();
        for f in &d.replication.followers {
            let l = [ds, f.site.as_str(), "follower"];
            let mode = f.mode.to_string();
            lag_s.with_label_values(&l).set(f.lag_seconds);
            lag_r.with_label_values(&l).set(f.lag_records as f64);
            lag_b.with_label_values(&l).set(f.lag_bytes as f64);
            connected.with_label_values(&l).set(flag(f.connected));
            acked
                .with_label_values(&[ds, f.site.as_str(), mode.as_str()])
                .set(f.acked_seq as f64);
            degraded
                .with_label_values(&[ds, &f.site])
                .set(flag(f.degraded));
            degradations
                .with_label_values(&[ds, &f.site])
                .inc_by(f.degradations);
        }
        if let Some(u) = &d.replication.upstream {
            let l = [ds, u.upstream.as_str(), "upstream"];
            lag_s.with_label_values(&l).set(u.lag_seconds);
            lag_r.with_label_values(&l).set(u.lag_records as f64);
            lag_b.with_label_values(&l).set(u.lag_bytes as f64);
            connected.with_label_values(&l).set(flag(u.connected));
            transfer
                .with_label_values(&[ds, &u.upstream])
                .set(flag(u.receiving_transfer));
        }
    }
    if let Some(d) = datasets.first() {
        // Refusals are per site, repeated in every dataset's status.
        refused
            .with_label_values(&["handshake"])
            .inc_by(d.replication.refused_handshakes);
        refused
            .with_label_values(&["unknown_site"])
            .inc_by(d.replication.refused_unknown_sites);
    }

    Ok(())
}

/// Where data enters: the directory source and `triad put`.
fn intake(m: &Metrics, datasets: &[DatasetStatus]) -> prometheus::Result<()> {
    let commit_failing = m.gauge(
        "triad_source_commit_failing",
        "1 while the commit policy fails: a sync follower does not acknowledge in time.",
        &["dataset"],
    )?;
    let commit_failures = m.counter(
        "triad_source_commit_failures_total",
        "Source rounds whose changes a sync follower did not acknowledge in time.",
        &["dataset"],
    )?;
    let puts = m.counter(
        "triad_puts_total",
        "triad put calls into a pushed dataset, by result: stored, existed (same content again), refused, commit_failed (durable here, not acknowledged by a sync follower in time), fenced (refused: this site is fenced).",
        &["dataset", "result"],
    )?;
    let files = m.counter(
        "triad_source_files_ingested_total",
        "Files read and logged by the source.",
        &["dataset"],
    )?;
    let src_bytes = m.counter(
        "triad_source_bytes_read_total",
        "Bytes read by the source.",
        &["dataset"],
    )?;
    let pending = m.gauge(
        "triad_source_pending_paths",
        "Changed paths waiting for the next round.",
        &["dataset"],
    )?;

    for d in datasets {
        let ds = d.dataset.as_str();
        if let Some(p) = &d.puts {
            // A failing put is the commit policy failing, as for a source round.
            commit_failing
                .with_label_values(&[ds])
                .set(flag(p.commit_failing));
            for (result, n) in [
                ("stored", p.stored),
                ("existed", p.existed),
                ("refused", p.refused),
                ("commit_failed", p.commit_failures),
                ("fenced", p.fenced_refusals),
            ] {
                puts.with_label_values(&[ds, result]).inc_by(n);
            }
        }
        if let Some(s) = &d.source {
            commit_failing
                .with_label_values(&[ds])
                .set(flag(s.commit_failing));
            commit_failures
                .with_label_values(&[ds])
                .inc_by(s.commit_failures);
            files.with_label_values(&[ds]).inc_by(s.files_ingested);
            src_bytes.with_label_values(&[ds]).inc_by(s.bytes_read);
            pending.with_label_values(&[ds]).set(s.pending_paths as f64);
        }
    }
    Ok(())
}

/// The cryptographic devices behind wrapped dataset keys.
fn key_devices(m: &Metrics, datasets: &[DatasetStatus]) -> prometheus::Result<()> {
    let up = m.gauge(
        "triad_key_device_reachable",
        "1 while the device holding the key that wraps the dataset's key unwraps it on request, 0 when it does not.",
        &["dataset"],
    )?;
    let away = m.gauge(
        "triad_key_device_unreachable_seconds",
        "How long the key device has not answered; the daemon stops the dataset when this reaches triad_key_device_grace_seconds.",
        &["dataset"],
    )?;
    let grace = m.gauge(
        "triad_key_device_grace_seconds",
        "[keys] device_grace: how long the daemon runs on a key already in memory without its device.",
        &["dataset"],
    )?;
    for d in datasets {
        if let Some(k) = &d.key_device {
            let ds = d.dataset.as_str();
            up.with_label_values(&[ds])
                .set(if k.reachable { 1.0 } else { 0.0 });
            away.with_label_values(&[ds]).set(k.unreachable_seconds);
            grace.with_label_values(&[ds]).set(k.grace_seconds);
        }
    }
    Ok(())
}

/// A follower's hot standby trees: lag behind the dataset, readiness,
/// paths it could not make equal.
fn standby(m: &Metrics, datasets: &[DatasetStatus]) -> prometheus::Result<()> {
    let lag_s = m.gauge(
        "triad_standby_lag_seconds",
        "Age of the oldest change applied to the dataset but not yet in its standby tree (0 when current).",
        &["dataset"],
    )?;
    let lag_r = m.gauge(
        "triad_standby_lag_records",
        "Records applied to the dataset but not yet to its standby tree.",
        &["dataset"],
    )?;
    let ready = m.gauge(
        "triad_standby_ready",
        "1 once the standby tree has been reconciled with the dataset since start.",
        &["dataset"],
    )?;
    let problems = m.gauge(
        "triad_standby_problem_paths",
        "Paths the standby tree's last pass could not make equal to the dataset.",
        &["dataset"],
    )?;
    let reconciles = m.counter(
        "triad_standby_reconciles_total",
        "Whole-tree reconciles of the standby tree (one at start, more after failed passes).",
        &["dataset"],
    )?;
    for d in datasets {
        let Some(s) = &d.standby else { continue };
        let l = [d.dataset.as_str()];
        lag_s.with_label_values(&l).set(s.lag_seconds);
        lag_r.with_label_values(&l).set(s.lag_records as f64);
        ready.with_label_values(&l).set(flag(s.ready));
        problems.with_label_values(&l).set(s.problems as f64);
        reconciles.with_label_values(&l).inc_by(s.reconciles);
    }
    Ok(())
}

/// The takeover group as this site sees it: the epoch, whether this site
/// is the primary that takes writes, and whether it is fenced.
fn takeover(m: &Metrics, datasets: &[DatasetStatus]) -> prometheus::Result<()> {
    let Some(t) = datasets.iter().find_map(|d| d.takeover.as_ref()) else {
        return Ok(());
    };
    let epoch = m.gauge(
        "triad_takeover_epoch",
        "The epoch the takeover group agreed on, as this site knows it.",
        &[],
    )?;
    epoch.with_label_values(&[]).set(t.epoch as f64);
    let primary = m.gauge(
        "triad_takeover_primary",
        "1 when this site is the primary and takes writes (unfenced). Two sites at 1 is split brain.",
        &[],
    )?;
    primary
        .with_label_values(&[])
        .set(flag(t.seat == "primary" && !t.fenced));
    let fenced = m.gauge(
        "triad_takeover_fenced",
        "1 when this site takes no local changes: it is not the primary, or the primary lost its majority.",
        &[],
    )?;
    fenced.with_label_values(&[]).set(flag(t.fenced));
    let seat = m.gauge(
        "triad_takeover_seat_primary",
        "1 when the agreed record names this site as the primary, fenced or not.",
        &[],
    )?;
    seat.with_label_values(&[]).set(flag(t.seat == "primary"));
    Ok(())
}

/// The archive: shipping, snapshots, prune.
fn archive(m: &Metrics, datasets: &[DatasetStatus]) -> prometheus::Result<()> {
    let arch_open = m.gauge(
        "triad_archive_open",
        "1 once this site's object store answered.",
        &["dataset"],
    )?;
    let arch_shipped = m.gauge(
        "triad_archive_shipped_seq",
        "Highest seq in this site's archive.",
        &["dataset"],
    )?;
    let arch_lag = m.gauge(
        "triad_archive_lag_records",
        "Records committed here and not yet in the archive.",
        &["dataset"],
    )?;
    let arch_ship = m.gauge(
        "triad_archive_last_ship_timestamp_seconds",
        "When the log was last shipped to the archive.",
        &["dataset"],
    )?;
    let arch_err = m.gauge(
        "triad_archive_error",
        "1 while the last attempt of this kind failed (ship, snapshot, prune).",
        &["dataset", "kind"],
    )?;
    let gaps = m.counter(
        "triad_archive_gaps_bridged_total",
        "Gaps in the local log bridged by a snapshot since start.",
        &["dataset"],
    )?;
    let snap_ok = m.gauge(
        "triad_snapshot_last_success_timestamp_seconds",
        "When the newest snapshot in the archive was taken.",
        &["dataset"],
    )?;
    let snap_dur = m.gauge(
        "triad_snapshot_last_duration_seconds",
        "How long the last snapshot took.",
        &["dataset"],
    )?;
    let snap_bytes = m.gauge(
        "triad_snapshot_last_bytes",
        "Bytes of data in the last snapshot.",
        &["dataset"],
    )?;
    let snap_up = m.gauge(
        "triad_snapshot_last_uploaded_bytes",
        "Bytes the last snapshot uploaded (new chunks only).",
        &["dataset"],
    )?;
    let snap_every = m.gauge(
        "triad_snapshot_interval_seconds",
        "Seconds between scheduled snapshots.",
        &["dataset"],
    )?;
    let chunks_missing = m.gauge(
        "triad_archive_chunks_missing",
        "Chunks kept snapshots need that the last prune did not find in the store.",
        &["dataset"],
    )?;

    for d in datasets {
        let ds = d.dataset.as_str();
        if let Some(a) = &d.archive {
            arch_open.with_label_values(&[ds]).set(flag(a.opened));
            arch_shipped
                .with_label_values(&[ds])
                .set(a.shipped_seq as f64);
            if a.opened {
                arch_lag
                    .with_label_values(&[ds])
                    .set(d.log.head_seq.saturating_sub(a.shipped_seq) as f64);
            }
            if a.last_ship_ns > 0 {
                arch_ship.with_label_values(&[ds]).set(secs(a.last_ship_ns));
            }
            for (kind, e) in [
                ("ship", &a.ship_error),
                ("snapshot", &a.snapshot_error),
                ("prune", &a.prune_error),
            ] {
                arch_err
                    .with_label_values(&[ds, kind])
                    .set(flag(e.is_some()));
            }
            gaps.with_label_values(&[ds]).inc_by(a.gaps_bridged);
            if a.last_snapshot_ns > 0 {
                snap_ok
                    .with_label_values(&[ds])
                    .set(secs(a.last_snapshot_ns));
            }
            if let Some(r) = &a.last_snapshot {
                snap_dur.with_label_values(&[ds]).set(r.seconds);
                snap_bytes.with_label_values(&[ds]).set(r.bytes as f64);
                snap_up
                    .with_label_values(&[ds])
                    .set(r.bytes_uploaded as f64);
            }
            if let Some(i) = a.snapshot_interval_seconds {
                snap_every.with_label_values(&[ds]).set(i);
            }
            if let Some(p) = &a.last_prune {
                chunks_missing
                    .with_label_values(&[ds])
                    .set(p.chunks_missing as f64);
            }
        }
    }
    Ok(())
}

/// Cross-site verify, scrubs and repairs.
fn verify_and_scrub(m: &Metrics, datasets: &[DatasetStatus]) -> prometheus::Result<()> {
    let verify_t = m.gauge(
        "triad_verify_last_timestamp_seconds",
        "When cross-site verify last ran.",
        &["dataset"],
    )?;
    let verify_ok = m.gauge(
        "triad_verify_last_agree",
        "1 when the last cross-site verify compared the copies and they agreed, 0 when they differed (absent when it could not compare).",
        &["dataset"],
    )?;
    let verify_bad = m.counter(
        "triad_verify_mismatch_total",
        "Cross-site verifies that found the copies differing (a fork, or a site whose scrub found damage), since start.",
        &["dataset"],
    )?;
    let verify_incomplete = m.gauge(
        "triad_verify_last_incomplete",
        "1 when the last cross-site verify could not compare: a site did not answer, or no common checkpoint yet.",
        &["dataset"],
    )?;
    let verify_every = m.gauge(
        "triad_verify_interval_seconds",
        "Seconds between scheduled verifies.",
        &["dataset"],
    )?;
    let scrub_t = m.gauge(
        "triad_scrub_last_timestamp_seconds",
        "When this copy was last scrubbed.",
        &["dataset"],
    )?;
    let scrub_ok = m.gauge(
        "triad_scrub_last_ok",
        "1 when the last scrub found nothing damaged (after any repair).",
        &["dataset"],
    )?;
    let scrub_bad = m.gauge(
        "triad_scrub_last_damaged_chunks",
        "Chunks the last scrub left damaged.",
        &["dataset"],
    )?;
    let scrub_every = m.gauge(
        "triad_scrub_interval_seconds",
        "Seconds between scheduled scrubs.",
        &["dataset"],
    )?;
    let repairs = m.counter(
        "triad_repairs_total",
        "Chunks repaired by scheduled scrubs since start.",
        &["dataset"],
    )?;

    for d in datasets {
        let ds = d.dataset.as_str();
        if let Some(c) = &d.checks {
            if c.last_verify_ns > 0 {
                verify_t
                    .with_label_values(&[ds])
                    .set(secs(c.last_verify_ns));
            }
            if let Some(a) = c.last_verify_agree {
                verify_ok.with_label_values(&[ds]).set(flag(a));
            }
            verify_bad
                .with_label_values(&[ds])
                .inc_by(c.verify_mismatch_total);
            if let Some(o) = &c.last_verify_outcome {
                verify_incomplete
                    .with_label_values(&[ds])
                    .set(flag(o == "incomplete"));
            }
            if let Some(i) = c.verify_interval_seconds {
                verify_every.with_label_values(&[ds]).set(i);
            }
            if c.last_scrub_ns > 0 {
                scrub_t.with_label_values(&[ds]).set(secs(c.last_scrub_ns));
            }
            if let Some(ok) = c.last_scrub_ok {
                scrub_ok.with_label_values(&[ds]).set(flag(ok));
                scrub_bad
                    .with_label_values(&[ds])
                    .set(c.last_scrub_damaged as f64);
            }
            if let Some(i) = c.scrub_interval_seconds {
                scrub_every.with_label_values(&[ds]).set(i);
            }
            repairs.with_label_values(&[ds]).inc_by(c.repairs_total);
        }
    }
    Ok(())
}

/// Restore drills.
fn drills(m: &Metrics, datasets: &[DatasetStatus]) -> prometheus::Result<()> {
    let drill_t = m.gauge(
        "triad_drill_last_timestamp_seconds",
        "When a restore drill last finished.",
        &["dataset"],
    )?;
    let drill_ok_t = m.gauge(
        "triad_drill_last_success_timestamp_seconds",
        "When a restore drill last passed.",
        &["dataset"],
    )?;
    let drill_ok = m.gauge(
        "triad_drill_last_passed",
        "1 when the last restore drill passed.",
        &["dataset"],
    )?;
    let drill_rto = m.gauge(
        "triad_drill_last_rto_seconds",
        "Recovery time of the last drill.",
        &["dataset"],
    )?;
    let drill_rpo = m.gauge(
        "triad_drill_last_rpo_seconds",
        "Recovery point of the last drill: how much older the restored point was than the primary.",
        &["dataset"],
    )?;
    let drill_fail = m.counter(
        "triad_drill_failures_total",
        "Scheduled drills that failed since start.",
        &["dataset"],
    )?;
    let drill_every = m.gauge(
        "triad_drill_interval_seconds",
        "Seconds between scheduled drills.",
        &["dataset"],
    )?;

    for d in datasets {
        let ds = d.dataset.as_str();
        if let Some(c) = &d.checks {
            if c.last_drill_ns > 0 {
                drill_t.with_label_values(&[ds]).set(secs(c.last_drill_ns));
                drill_ok
                    .with_label_values(&[ds])
                    .set(flag(c.last_drill_result.as_deref() == Some("passed")));
            }
            if c.last_drill_success_ns > 0 {
                drill_ok_t
                    .with_label_values(&[ds])
                    .set(secs(c.last_drill_success_ns));
            }
            if let Some(r) = c.last_drill_rto_seconds {
                drill_rto.with_label_values(&[ds]).set(r);
            }
            if let Some(r) = c.last_drill_rpo_seconds {
                drill_rpo.with_label_values(&[ds]).set(r);
            }
            drill_fail
                .with_label_values(&[ds])
                .inc_by(c.drill_failures_total);
            if let Some(i) = c.drill_interval_seconds {
                drill_every.with_label_values(&[ds]).set(i);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{DatasetStatus, ReplicationStatus, Retention};

    /// A status with every optional part present, as a primary with an
    /// archive and every check scheduled and run would have.
    fn full_status() -> DatasetStatus {
        let link = replicator::upstream::LinkStatus {
            dataset: "files".into(),
            site: "zjk-b".into(),
            mode: replicator::upstream::Mode::Sync,
            ..Default::default()
        };
        DatasetStatus {
            dataset: "files".into(),
            site: "zjk-a".into(),
            role: "primary".into(),
            pid: 1,
            updated_ns: 1,
            log: vault::Status::default(),
            source: Some(crate::status::StatsView::default()),
            puts: Some(crate::status::PutStatsView::default()),
            standby: Some(crate::status::StandbyStatus::default()),
            takeover: Some(crate::status::TakeoverStatus::default()),
            key_device: Some(crate::keywatch::KeyDeviceStatus {
                device: "token `triad` of PKCS#11 module /usr/lib/softhsm/libsofthsm2.so".into(),
                kek: "kek-2026".into(),
                reachable: false,
                unreachable_seconds: 42.0,
                grace_seconds: 3600.0,
                ..Default::default()
            }),
            replication: ReplicationStatus {
                followers: vec![link],
                upstream: Some(replicator::follower::FollowStatus::default()),
                ..Default::default()
            },
            retention: Retention::default(),
            archive: Some(crate::status::ArchiveStatus {
                opened: true,
                last_ship_ns: 1,
                last_snapshot: Some(archive::SnapshotReport::default()),
                last_snapshot_ns: 1,
                snapshot_interval_seconds: Some(3600.0),
                last_prune: Some(archive::PruneReport::default()),
                ..Default::default()
            }),
            checks: Some(crate::status::ChecksStatus {
                last_verify_ns: 1,
                last_verify_agree: Some(true),
                last_verify_outcome: Some("agree".into()),
                last_scrub_ns: 1,
                last_scrub_ok: Some(true),
                last_drill_ns: 1,
                last_drill_success_ns: 1,
                last_drill_result: Some("passed".into()),
                last_drill_rto_seconds: Some(1.0),
                last_drill_rpo_seconds: Some(0.0),
                verify_interval_seconds: Some(600.0),
                scrub_interval_seconds: Some(604800.0),
                drill_interval_seconds: Some(2678400.0),
                ..Default::default()
            }),
            failure: None,
            error: None,
        }
    }

    /// Every metric an alert rule or the dashboard names is one the daemon
    /// exports: a renamed metric would otherwise silence its alert.
    #[test]
    fn alerts_and_dashboard_use_exported_metrics() {
        let view = SiteView::new("zjk-a", "primary");
        view.publish(vec![full_status()]);
        let text = render(&view).expect("render");
        let exported: std::collections::HashSet<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        for file in ["alerts.yml", "grafana-dashboard.json"] {
            let body = std::fs::read_to_string(root.join(file)).expect("read config");
            let mut named = 0;
            for (i, _) in body.match_indices("triad_") {
                let name: String = body[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                named += 1;
                assert!(
                    exported.contains(name.as_str()),
                    "{file} uses {name}, which /metrics does not export"
                );
            }
            assert!(named > 5, "{file} names only {named} triad metrics");
        }
    }

    /// Counters end in _total and every family has help text: what
    /// Prometheus' own linter (promtool check metrics) asks for.
    #[test]
    fn metric_names_follow_prometheus_conventions() {
        let view = SiteView::new("zjk-a", "primary");
        view.publish(vec![full_status()]);
        let text = render(&view).expect("render");
        for l in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let mut parts = l.split(' ').skip(2);
            let (name, kind) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            assert!(name.starts_with("triad_"), "{name}");
            assert_eq!(kind == "counter", name.ends_with("_total"), "{l}");
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} has no help"
            );
        }
    }
}
