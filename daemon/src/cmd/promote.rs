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
        lost_records: (report.kind == "switchover").then(|| report.lost_records()),
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

/// One leg of a switchover drill.
#[derive(serde::Serialize)]
struct Leg {
    to: String,
    ok: bool,
    epoch: u64,
    /// From the request until the new primary took writes.
    rto_seconds: Option<f64>,
    /// Records the old primary held that the new one did not.
    lost_records: Option<u64>,
    error: Option<String>,
}

/// What `triad drill --switchover` writes and prints.
#[derive(serde::Serialize)]
struct SwitchoverDrill {
    kind: &'static str,
    ok: bool,
    site: String,
    primary: String,
    legs: Vec<Leg>,
    time_ns: i64,
}

fn leg(to: &str, report: &PromoteReport, rto: Option<f64>) -> Leg {
    let lost = report.lost_records();
    Leg {
        to: to.to_string(),
        ok: report.ok && rto.is_some() && lost == 0,
        epoch: report.epoch,
        rto_seconds: rto,
        lost_records: report.ok.then_some(lost),
        error: report.error.clone().or_else(|| {
            (report.ok && rto.is_none()).then(|| "did not take writes within 60s".to_string())
        }),
    }
}

/// Polls `site` until it takes writes; seconds since `started`.
fn wait_takes_writes(
    rt: &tokio::runtime::Runtime,
    site: &replicator::follower::UpstreamAddr,
    started: Instant,
) -> Option<f64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(doc) = rt.block_on(replicator::follower::fetch_site_status(site)) {
            if takes_writes(&doc) {
                return Some(started.elapsed().as_secs_f64());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// Per dataset, the log head a site's status document shows.
fn heads(doc: &str) -> Vec<(String, u64)> {
    let v: serde_json::Value = serde_json::from_str(doc).unwrap_or_default();
    v["datasets"]
        .as_array()
        .map(|ds| {
            ds.iter()
                .map(|d| {
                    (
                        d["dataset"].as_str().unwrap_or("").to_string(),
                        d["log"]["head_seq"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `triad drill --switchover`, at a follower: a planned switchover to this
/// site and back to the primary, each leg's RTO (request until the new
/// primary takes writes) and RPO (records lost) measured and written as a
/// report. Exits 1 unless both legs lost nothing and completed.
pub fn switchover_drill(
    cfg: &Config,
    reports: &std::path::Path,
    json: bool,
    signer: Option<&vault::signing::EvidenceSigner>,
) -> Result<ExitCode> {
    if cfg.takeover.is_none() {
        bail!("a switchover drill needs [takeover]: this site is in no takeover group");
    }
    let me = crate::ops::own_daemon(cfg, "triad drill --switchover")?;
    let rt = crate::ops::runtime()?;
    let doc = rt
        .block_on(replicator::follower::fetch_site_status(&me))
        .context("asking this site's daemon for its status")?;
    let v: serde_json::Value = serde_json::from_str(&doc).context("its status")?;
    let t = v["datasets"][0]["takeover"].clone();
    let primary = t["primary"]
        .as_str()
        .context("the takeover group has no primary yet")?
        .to_string();
    if primary == cfg.site.name {
        bail!("run the switchover drill at a follower: this site is the primary");
    }
    let old = cfg
        .peer_addr(&primary)
        .with_context(|| format!("the primary {primary} is not a [[peer]] here"))?;
    let mut drill = SwitchoverDrill {
        kind: "switchover",
        ok: false,
        site: cfg.site.name.clone(),
        primary: primary.clone(),
        legs: Vec::new(),
        time_ns: vault::dataset::now_ns(),
    };
    // Leg 1: to this site.
    let started = Instant::now();
    let (_, answer) = rt
        .block_on(replicator::follower::admin(&me, "promote-planned", ""))
        .context("asking this site's daemon to take over")?;
    let r1: PromoteReport = serde_json::from_str(&answer).context("the daemon's answer")?;
    let rto1 = r1
        .ok
        .then(|| wait_takes_writes(&rt, &me, started))
        .flatten();
    drill.legs.push(leg(&cfg.site.name, &r1, rto1));
    if drill.legs[0].ok {
        // The old primary follows and catches up before it takes the seat back.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut caught_up = false;
        while !caught_up && Instant::now() < deadline {
            let ours = rt
                .block_on(replicator::follower::fetch_site_status(&me))
                .map(|d| heads(&d))
                .unwrap_or_default();
            caught_up = rt
                .block_on(replicator::follower::fetch_site_status(&old))
                .is_ok_and(|d| !ours.is_empty() && heads(&d) == ours);
            std::thread::sleep(Duration::from_millis(100));
        }
        // Leg 2: back, asked of the old primary by this site, the primary now.
        let started = Instant::now();
        let link = replicator::follower::PeerLink::new(old.clone());
        let r2 = rt
            .block_on(link.takeover("switchback", Vec::new(), Duration::from_secs(60)))
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<PromoteReport>(&b).map_err(|e| e.to_string()))
            .unwrap_or_else(|e| PromoteReport {
                error: Some(e),
                ..PromoteReport::default()
            });
        let rto2 = r2
            .ok
            .then(|| wait_takes_writes(&rt, &old, started))
            .flatten();
        drill.legs.push(leg(&primary, &r2, rto2));
    }
    drill.ok = drill.legs.len() == 2 && drill.legs.iter().all(|l| l.ok);
    std::fs::create_dir_all(reports).with_context(|| format!("creating {}", reports.display()))?;
    let path = reports.join(format!("switchover-{}.json", drill.time_ns / 1_000_000_000));
    vault::dataset::write_atomic(&path, &serde_json::to_vec_pretty(&drill)?)
        .with_context(|| format!("writing {}", path.display()))?;
    if let Some(signer) = signer {
        signer.sign_file(&path)?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&drill)?);
    } else {
        println!(
            "switchover drill {}: {} -> {} -> {}",
            if drill.ok { "PASSED" } else { "FAILED" },
            primary,
            cfg.site.name,
            primary
        );
        for l in &drill.legs {
            println!(
                "  to {}: {}  epoch {}  RTO {}  RPO {} records{}",
                l.to,
                if l.ok { "ok" } else { "FAILED" },
                l.epoch,
                l.rto_seconds.map_or("-".into(), |s| format!("{s:.2}s")),
                l.lost_records.map_or("-".into(), |n| n.to_string()),
                l.error
                    .as_deref()
                    .map(|e| format!("  ({e})"))
                    .unwrap_or_default()
            );
        }
        println!("report: {}", path.display());
    }
    Ok(if drill.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
