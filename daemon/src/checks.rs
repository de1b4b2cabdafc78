//! The daemon's scheduled checks, one thread per site: cross-site verify on
//! `[verify] schedule`, scrubs of this site's copy on `[verify]
//! scrub_schedule` (repairing what they find when `[verify] repair = true`),
//! and restore drills on `[drill] schedule`. Results and counters go into
//! each dataset's `status.json` (`checks`), where monitoring reads them.
//!
//! The work is the same code the commands run (`triad verify`, `triad
//! drill`); a failing check is recorded and logged, never a reason to stop
//! the daemon.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use archive::schedule::Schedule;
use chrono::Utc;
use vault::Dataset;

use crate::config::Config;
use crate::ops::verify::{scrub_and_repair, Repair};
use crate::status::ChecksStatus;

pub type Shared = Arc<Mutex<ChecksStatus>>;

fn update(s: &Shared, f: impl FnOnce(&mut ChecksStatus)) {
    if let Ok(mut g) = s.lock() {
        f(&mut g);
    }
}

fn next(s: &Option<Schedule>) -> Option<chrono::DateTime<Utc>> {
    s.as_ref().and_then(|s| s.next_after(Utc::now()))
}

fn parse(field: &str, v: &Option<String>) -> Option<Schedule> {
    v.as_ref().and_then(|t| Schedule::parse(field, t).ok())
}

/// Starts the checks thread; returns each dataset's shared status. The
/// schedules are read from `live` on every round, so a reload (SIGHUP)
/// applies them. Drills and scrubs run by hand (`triad drill`, `triad
/// verify --scrub`) are picked up from the evidence they leave (the drill's
/// `latest-<dataset>.json`, the dataset's `last-scrub.json`), so monitoring
/// sees them too, and sees them again after a restart.
pub fn start(
    live: crate::config::Live,
    datasets: Vec<Arc<Dataset>>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<(Vec<Shared>, std::thread::JoinHandle<()>)> {
    let shared: Vec<Shared> = datasets.iter().map(|_| Shared::default()).collect();
    let sh = shared.clone();
    let handle = std::thread::Builder::new()
        .name("checks".into())
        .spawn(move || {
            let mut schedules: (Option<Schedule>, Option<Schedule>, Option<Schedule>) =
                (None, None, None);
            let (mut nv, mut ns, mut nd) = (None, None, None);
            let mut seen: Option<Arc<Config>> = None;
            let mut next_evidence = std::time::Instant::now();
            while !stop.load(Ordering::Acquire) {
                let cfg = crate::config::current(&live);
                if !seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, &cfg)) {
                    let verify = cfg.verify.clone().unwrap_or_default();
                    let drill = cfg.drill.clone().unwrap_or_default();
                    let (sv, ss, sd) = (
                        parse("verify.schedule", &verify.schedule),
                        parse("verify.scrub_schedule", &verify.scrub_schedule),
                        parse("drill.schedule", &drill.schedule),
                    );
                    (nv, ns, nd) = (next(&sv), next(&ss), next(&sd));
                    let interval = |s: &Option<Schedule>| {
                        s.as_ref().and_then(crate::archiving::interval_seconds)
                    };
                    for c in &sh {
                        update(c, |c| {
                            c.verify_interval_seconds = interval(&sv);
                            c.scrub_interval_seconds = interval(&ss);
                            c.drill_interval_seconds = interval(&sd);
                        });
                    }
                    schedules = (sv, ss, sd);
                    seen = Some(cfg.clone());
                }
                let (sv, ss, sd) = &schedules;
                if std::time::Instant::now() >= next_evidence {
                    next_evidence = std::time::Instant::now() + Duration::from_secs(5);
                    for (ds, s) in datasets.iter().zip(&sh) {
                        read_evidence(&cfg, ds.name(), s);
                    }
                }
                let now = Utc::now();
                let due = |t: &Option<chrono::DateTime<Utc>>| t.is_some_and(|t| now >= t);
                if due(&nv) {
                    for (ds, s) in datasets.iter().zip(&sh) {
                        run_verify(&cfg, ds, s);
                    }
                    nv = next(sv);
                }
                if due(&ns) {
                    for (ds, s) in datasets.iter().zip(&sh) {
                        run_scrub(&cfg, ds, s);
                    }
                    ns = next(ss);
                }
                if due(&nd) {
                    for (ds, s) in datasets.iter().zip(&sh) {
                        run_drill(&cfg, ds, s);
                    }
                    nd = next(sd);
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        })?;
    Ok((shared, handle))
}

/// Takes in drills and scrubs recorded on disk that are newer than what the
/// status holds (run by hand, or before this start).
fn read_evidence(cfg: &Config, dataset: &str, s: &Shared) {
    let latest = cfg.reports_dir().join(format!("latest-{dataset}.json"));
    let report = std::fs::read(&latest)
        .ok()
        .and_then(|b| serde_json::from_slice::<verifier::DrillReport>(&b).ok());
    if let Some(r) = report {
        let finished_ns = chrono::DateTime::parse_from_rfc3339(&r.finished)
            .ok()
            .and_then(|t| t.timestamp_nanos_opt())
            .unwrap_or(0);
        update(s, |c| {
            if finished_ns > c.last_drill_ns {
                c.last_drill_ns = finished_ns;
                c.last_drill_result = Some(r.result.clone());
                c.last_drill_rto_seconds = Some(r.rto_seconds);
                c.last_drill_rpo_seconds = r.rpo_seconds;
                c.last_drill_report = Some(latest.display().to_string());
                if r.passed() {
                    c.last_drill_success_ns = finished_ns;
                }
            }
        });
    }
    let verify = std::fs::read(
        cfg.dataset_dir(dataset)
            .join(crate::ops::verify::LAST_VERIFY),
    )
    .ok()
    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    if let Some(v) = verify {
        let t = v["time_ns"].as_i64().unwrap_or(0);
        let (agree, disagree) = (v["agree"] == true, v["disagree"] == true);
        update(s, |c| {
            if t > c.last_verify_ns {
                c.last_verify_ns = t;
                record_verify(c, agree, disagree, v["verdict"].as_str().unwrap_or(""));
            }
        });
    }
    if let Some((t, damaged, digest_ok)) =
        replicator::upstream::read_last_scrub(&cfg.dataset_dir(dataset))
    {
        update(s, |c| {
            if t > c.last_scrub_ns {
                c.last_scrub_ns = t;
                c.last_scrub_ok = Some(damaged == 0 && digest_ok);
                c.last_scrub_damaged = damaged;
            }
        });
    }
}

/// Takes a verify's outcome into the status.
fn record_verify(c: &mut ChecksStatus, agree: bool, disagree: bool, verdict: &str) {
    let outcome = if agree {
        "agree"
    } else if disagree {
        "disagree"
    } else {
        "incomplete"
    };
    c.last_verify_agree = (agree || disagree).then_some(agree);
    c.last_verify_outcome = Some(outcome.into());
    c.last_verify_verdict = Some(verdict.to_string());
    if disagree {
        c.verify_mismatch_total += 1;
    }
}

fn run_verify(cfg: &Config, ds: &Dataset, s: &Shared) {
    let r = crate::ops::dataset_key(cfg, ds.name())
        .and_then(|k| crate::ops::verify::cross_site(cfg, ds.name(), &k));
    match r {
        Ok(r) => {
            if r.agree {
                tracing::info!(dataset = ds.name(), verdict = %r.verdict, "cross-site verify");
            } else {
                tracing::error!(dataset = ds.name(), verdict = %r.verdict, "cross-site verify: the copies do not agree");
            }
            update(s, |c| {
                c.last_verify_ns = vault::dataset::now_ns();
                record_verify(c, r.agree, r.disagree, &r.verdict);
            });
        }
        Err(e) => {
            tracing::warn!(dataset = ds.name(), error = %format!("{e:#}"), "cross-site verify could not run");
            update(s, |c| c.last_error = Some(format!("verify: {e:#}")));
        }
    }
}

fn run_scrub(cfg: &Config, ds: &Dataset, s: &Shared) {
    let verify = cfg.verify.clone().unwrap_or_default();
    let rate = cfg.scrub_max_rate();
    let r = (|| -> anyhow::Result<()> {
        let key = crate::ops::dataset_key(cfg, ds.name())?;
        let repair = if verify.repair {
            Repair::With(ds)
        } else {
            Repair::No
        };
        let out = scrub_and_repair(cfg, ds.name(), &key, Some(rate), repair, &|_, _| {})?;
        let r = &out.scrub;
        let damaged = out.damaged();
        if out.ok() {
            tracing::info!(
                dataset = ds.name(),
                chunks = r.chunks,
                mb_per_s = r.mb_per_s,
                "scrub clean"
            );
        } else {
            tracing::error!(
                dataset = ds.name(),
                bad = r.bad.len(),
                damaged_after_repair = damaged,
                digest_ok = out.digest_ok(),
                "scrub found damage"
            );
        }
        update(s, |c| {
            c.last_scrub_ns = vault::dataset::now_ns();
            c.last_scrub_ok = Some(out.ok());
            c.last_scrub_damaged = damaged;
            c.last_scrub_mb_per_s = r.mb_per_s;
            c.repairs_total += out.repaired.as_ref().map_or(0, |x| x.repaired.len()) as u64;
        });
        Ok(())
    })();
    if let Err(e) = r {
        tracing::warn!(dataset = ds.name(), error = %format!("{e:#}"), "scrub could not run");
        update(s, |c| c.last_error = Some(format!("scrub: {e:#}")));
    }
}

fn run_drill(cfg: &Config, ds: &Dataset, s: &Shared) {
    let drill = cfg.drill.clone().unwrap_or_default();
    let r = (|| -> anyhow::Result<verifier::DrillReport> {
        let key = crate::ops::dataset_key(cfg, ds.name())?;
        let store = crate::ops::drill::store(
            cfg,
            drill.url.as_deref(),
            drill.endpoint.clone(),
            drill.credentials_file.clone(),
        )?;
        let signer = cfg.evidence_signer()?;
        let spec = crate::ops::drill::spec(
            cfg,
            ds.name(),
            &key,
            store,
            drill.url.is_none(),
            ds.state().checkpoints()?,
            signer.as_ref(),
        );
        let rt = crate::ops::runtime()?;
        let (report, json, _) = crate::ops::drill::run(&spec, &rt, signer.as_ref())?;
        update(s, |c| {
            c.last_drill_report = Some(json.display().to_string())
        });
        Ok(report)
    })();
    match r {
        Ok(report) => {
            if report.passed() {
                tracing::info!(dataset = ds.name(), rto = report.rto_seconds, rpo = ?report.rpo_seconds, "restore drill passed");
            } else {
                tracing::error!(dataset = ds.name(), error = ?report.error, "restore drill FAILED");
            }
            update(s, |c| {
                c.last_drill_ns = vault::dataset::now_ns();
                c.last_drill_result = Some(report.result.clone());
                c.last_drill_rto_seconds = Some(report.rto_seconds);
                c.last_drill_rpo_seconds = report.rpo_seconds;
                if report.passed() {
                    c.last_drill_success_ns = c.last_drill_ns;
                } else {
                    c.drill_failures_total += 1;
                }
            });
        }
        Err(e) => {
            tracing::error!(dataset = ds.name(), error = %format!("{e:#}"), "restore drill could not run");
            update(s, |c| {
                c.last_drill_ns = vault::dataset::now_ns();
                c.last_drill_result = Some("failed".into());
                c.drill_failures_total += 1;
                c.last_error = Some(format!("drill: {e:#}"));
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verify_that_could_not_compare_is_neither_agreement_nor_mismatch() {
        let mut c = ChecksStatus::default();
        record_verify(&mut c, true, false, "all agree");
        assert_eq!(c.last_verify_agree, Some(true));
        assert_eq!(c.last_verify_outcome.as_deref(), Some("agree"));
        record_verify(&mut c, false, false, "sjz-c unreachable");
        assert_eq!(c.last_verify_agree, None, "incomplete is not a verdict");
        assert_eq!(c.last_verify_outcome.as_deref(), Some("incomplete"));
        assert_eq!(c.verify_mismatch_total, 0);
        record_verify(&mut c, false, true, "zjk-b differs");
        assert_eq!(c.last_verify_agree, Some(false));
        assert_eq!(c.verify_mismatch_total, 1);
        assert_eq!(c.last_verify_verdict.as_deref(), Some("zjk-b differs"));
    }
}
