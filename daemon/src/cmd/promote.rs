//! `triad promote`: makes this site the primary of its takeover group. The
//! daemon here does the work (`takeover/promote.rs`): a planned switchover
//! when the primary answers, a failover when it does not. This command asks
//! for it over the replication port with the site's own certificate, then
//! waits until this site takes writes, and reports how long that took (the
//! takeover's RTO) and, for a switchover, that no record was lost.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cmd::ConfigPath;
use crate::config::Config;
use crate::takeover::promote::PromoteReport;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub cfg: ConfigPath,
    /// Take over even when the failover checks fail: the primary was heard
    /// from recently, or this site is not a sync follower and may lack
    /// acknowledged writes. Still needs a majority; recorded as forced.
    #[arg(long)]
    pub force: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Longest wait for this site to take writes once the group agreed.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
}

/// The promotion's outcome as the command reports it.
#[derive(serde::Serialize)]
struct Outcome {
    #[serde(flatten)]
    report: PromoteReport,
    /// From the command's start until this site took writes.
    rto_seconds: Option<f64>,
    /// Records the old primary held that this site did not (switchover).
    lost_records: Option<u64>,
}

pub fn run(a: Args) -> Result<ExitCode> {
    let cfg = Config::load(&a.cfg.config)?;
    if cfg.takeover.is_none() {
        bail!(
            "{} has no [takeover]: this site is in no group that can promote it",
            a.cfg.config.display()
        );
    }
    let addr = crate::ops::own_daemon(&cfg, "triad promote")?;
    let rt = crate::ops::runtime()?;
    let started = Instant::now();
    let action = if a.force { "promote-force" } else { "promote" };
    let (ok, json) = rt
        .block_on(replicator::follower::admin(&addr, action, ""))
        .context("asking this site's daemon to promote it")?;
    let report: PromoteReport =
        serde_json::from_str(&json).context("reading the daemon's answer")?;
    let mut out = Outcome {
        lost_records: (report.kind == "switchover").then(|| {
            report
                .old_heads
                .iter()
                .map(|(d, h)| h.saturating_sub(report.heads.get(d).copied().unwrap_or(0)))
                .sum()
        }),
        report,
        rto_seconds: None,
    };
    if ok {
        let deadline = Instant::now() + a.wait;
        while Instant::now() < deadline {
            if let Ok(doc) = rt.block_on(replicator::follower::fetch_site_status(&addr)) {
                if takes_writes(&doc) {
                    out.rto_seconds = Some(started.elapsed().as_secs_f64());
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    print(&a, &out)?;
    Ok(if ok && out.rto_seconds.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// True when the site's status shows it as the unfenced primary of every
/// dataset.
fn takes_writes(doc: &str) -> bool {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(doc) else {
        return false;
    };
    let Some(ds) = v.get("datasets").and_then(|d| d.as_array()) else {
        return false;
    };
    !ds.is_empty()
        && ds.iter().all(|d| {
            let t = &d["takeover"];
            d["role"] == "primary" && t["seat"] == "primary" && t["fenced"] == false
        })
}

fn print(a: &Args, out: &Outcome) -> Result<()> {
    if a.json {
        println!("{}", serde_json::to_string_pretty(out)?);
        return Ok(());
    }
    let r = &out.report;
    if !r.ok {
        println!(
            "NOT promoted ({}): {}",
            if r.kind.is_empty() {
                "refused"
            } else {
                &r.kind
            },
            r.error.as_deref().unwrap_or("no reason given")
        );
    } else {
        println!(
            "{} is the primary of epoch {} ({} from {}{})",
            r.site,
            r.epoch,
            r.kind,
            r.old_primary.as_deref().unwrap_or("?"),
            if r.forced { ", FORCED" } else { "" }
        );
        match out.rto_seconds {
            Some(s) => println!("takes writes {s:.2}s after the command started (RTO)"),
            None => println!(
                "the group agreed, but this site did not take writes within {:?}: see `triad status`",
                a.wait
            ),
        }
        if let Some(lost) = out.lost_records {
            println!("records of the old primary not held here: {lost} (RPO)");
        }
    }
    for e in &r.evidence {
        println!("  {e}");
    }
    Ok(())
}
