//! `triad status`: one screen per site. This site's status comes from the
//! status files its daemon keeps current (so it works, and says the daemon
//! is not running, when it is not); with `--all` or `--site` the other
//! sites are asked over the replication port (mutual TLS, read-only
//! SiteStatus call). Exits 1 when anything needs attention, listing it
//! under "alerts", so scripts and monitoring can use the exit code.

use std::process::ExitCode;

use anyhow::{Context, Result};

use crate::config::Config;
use crate::status::{DatasetStatus, SiteStatus, STATUS_FILE};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    cfg: crate::cmd::ConfigPath,
    /// Show every site of the deployment: this one and each [[peer]].
    #[arg(long)]
    all: bool,
    /// Show one site (this one or a [[peer]] name).
    #[arg(long, conflicts_with = "all")]
    site: Option<String>,
    /// Print JSON (one document per site, as /v1/status serves it).
    #[arg(long)]
    json: bool,
}

/// A status file older than this means its daemon is not running.
const STALE_SECONDS: f64 = 5.0;
/// A standby tree further behind than this is an alert (as TriadStandbyLagging).
const STANDBY_LAG_SECONDS: f64 = 10.0;

pub fn run(a: Args) -> Result<ExitCode> {
    let cfg = Config::load(&a.cfg.config)?;
    let mut names: Vec<String> = vec![cfg.site.name.clone()];
    if a.all {
        names.extend(cfg.peer.iter().map(|p| p.name.clone()));
    } else if let Some(s) = &a.site {
        if s != &cfg.site.name && !cfg.peer.iter().any(|p| &p.name == s) {
            anyhow::bail!(
                "--site {s}: not this site ({}) nor one of its [[peer]] names",
                cfg.site.name
            );
        }
        names = vec![s.clone()];
    }
    let mut docs: Vec<SiteStatus> = Vec::new();
    for name in &names {
        docs.push(if name == &cfg.site.name {
            local(&cfg)?
        } else {
            remote(&cfg, name)
        });
    }
    let mut unhealthy = false;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&docs)?);
        unhealthy = docs.iter().any(|d| !alerts(d).is_empty());
    } else {
        for (i, d) in docs.iter().enumerate() {
            if i > 0 {
                println!();
            }
            unhealthy |= print_site(d);
        }
    }
    Ok(if unhealthy {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// This site's status, from its daemon's status files.
fn local(cfg: &Config) -> Result<SiteStatus> {
    let mut datasets = Vec::new();
    for d in &cfg.dataset {
        let path = cfg.dataset_dir(&d.name).join(STATUS_FILE);
        datasets.push(match DatasetStatus::read(&path) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => DatasetStatus {
                dataset: d.name.clone(),
                error: Some("no status yet: the daemon has not run".into()),
                ..DatasetStatus::default()
            },
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        });
    }
    Ok(SiteStatus {
        site: cfg.site.name.clone(),
        role: cfg.site.role.as_str().into(),
        datasets,
        ..SiteStatus::default()
    })
}

/// A peer's status, asked over the replication port.
fn remote(cfg: &Config, name: &str) -> SiteStatus {
    let r = (|| -> Result<SiteStatus> {
        let addr = cfg.peer_addr(name).ok_or_else(|| {
            anyhow::anyhow!("asking another site needs [tls] in this site's config")
        })?;
        let rt = crate::ops::runtime()?;
        let json = rt
            .block_on(async {
                tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    replicator::follower::fetch_site_status(&addr),
                )
                .await
            })
            .map_err(|_| anyhow::anyhow!("no answer within 10 s"))??;
        serde_json::from_str(&json).context("its status does not parse")
    })();
    r.unwrap_or_else(|e| SiteStatus {
        site: name.to_string(),
        unreachable: Some(format!("{e:#}")),
        ..SiteStatus::default()
    })
}

fn age(now: i64, ns: i64) -> String {
    if ns <= 0 {
        return "never".into();
    }
    let s = ((now - ns) as f64 / 1e9).max(0.0);
    let d = humantime::format_duration(std::time::Duration::from_secs(s as u64)).to_string();
    // Keep the two largest units: "3h 12m", not "3h 12m 5s".
    let short: Vec<&str> = d.split(' ').take(2).collect();
    format!("{} ago", short.join(" "))
}

/// What needs attention in a site's status, one line each.
fn alerts(site: &SiteStatus) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(e) = &site.unreachable {
        out.push(format!("site unreachable: {e}"));
        return out;
    }
    for r in &site.not_ready {
        out.push(format!("not ready: {r}"));
    }
    let now = vault::dataset::now_ns();
    for v in &site.datasets {
        let name = v.dataset.as_str();
        if let Some(e) = &v.error {
            out.push(format!("{name}: {e}"));
            continue;
        }
        out.extend(
            dataset_alerts(v, now)
                .into_iter()
                .map(|m| format!("{name}: {m}")),
        );
    }
    out
}

/// What needs attention in one dataset.
fn dataset_alerts(v: &DatasetStatus, now: i64) -> Vec<String> {
    let mut out = Vec::new();
    let stale = (now - v.updated_ns) as f64 / 1e9;
    if stale > STALE_SECONDS {
        out.push(format!(
            "status is {stale:.0} s old: is the daemon running?"
        ));
    }
    if let Some(f) = &v.failure {
        out.push(format!("FAILED: {f}"));
    }
    // Only a commit policy failing now counts, not one that recovered.
    if v.source.as_ref().is_some_and(|s| s.commit_failing)
        || v.puts.as_ref().is_some_and(|p| p.commit_failing)
    {
        out.push("the commit policy is failing: a sync follower does not acknowledge".into());
    }
    for f in &v.replication.followers {
        if !f.connected {
            out.push(format!("follower {} is not connected", f.site));
        }
        if f.degraded {
            out.push(format!("sync follower {} is DEGRADED to async", f.site));
        }
    }
    if let Some(t) = v.takeover.as_ref().filter(|t| t.seat == "primary") {
        if let Some(why) = &t.fenced_reason {
            out.push(format!("the primary is FENCED and takes no writes: {why}"));
        }
    }
    if let Some(up) = v.replication.upstream.as_ref().filter(|u| !u.connected) {
        out.push(format!("upstream {} is not connected", up.upstream));
    }
    if let Some(k) = v.key_device.as_ref().filter(|k| !k.reachable) {
        out.push(format!(
            "the key device does not give the dataset key ({:.0} s of a {:.0} s grace): {}",
            k.unreachable_seconds,
            k.grace_seconds,
            k.error.as_deref().unwrap_or("no answer")
        ));
    }
    if let Some(s) = &v.standby {
        if let Some(e) = &s.last_error {
            out.push(format!("standby tree {}: {e}", s.path));
        }
        if s.lag_seconds > STANDBY_LAG_SECONDS {
            out.push(format!(
                "standby tree {} lags {:.0} s behind the dataset",
                s.path, s.lag_seconds
            ));
        }
    }
    if let Some(a) = &v.archive {
        for (kind, e) in [
            ("ship", &a.ship_error),
            ("snapshot", &a.snapshot_error),
            ("prune", &a.prune_error),
        ] {
            if let Some(e) = e {
                out.push(format!("archive {kind}: {e}"));
            }
        }
        if let Some(every) = a
            .snapshot_interval_seconds
            .filter(|_| a.last_snapshot_ns > 0)
        {
            if (now - a.last_snapshot_ns) as f64 / 1e9 > 2.0 * every {
                out.push(format!(
                    "the newest snapshot is {}, older than twice its schedule",
                    age(now, a.last_snapshot_ns)
                ));
            }
        }
    }
    if let Some(c) = &v.checks {
        if c.last_verify_agree == Some(false) {
            out.push(format!(
                "the last cross-site verify found disagreement: {}",
                c.last_verify_verdict.as_deref().unwrap_or("?")
            ));
        }
        if c.last_scrub_ok == Some(false) {
            out.push(format!(
                "the last scrub left {} chunk(s) damaged",
                c.last_scrub_damaged
            ));
        }
        if c.last_drill_result.as_deref() == Some("failed") {
            out.push("the last restore drill FAILED (see its report)".into());
        }
        if let Some(every) = c
            .drill_interval_seconds
            .filter(|_| c.last_drill_success_ns > 0)
        {
            if (now - c.last_drill_success_ns) as f64 / 1e9 > 1.5 * every {
                out.push(format!(
                    "no passed drill since {}: overdue",
                    age(now, c.last_drill_success_ns)
                ));
            }
        }
    }
    out
}

fn connected(up: bool) -> &'static str {
    if up {
        "connected"
    } else {
        "NOT CONNECTED"
    }
}

/// Prints one site; returns true when it has alerts.
fn print_site(site: &SiteStatus) -> bool {
    let name = &site.site;
    if site.unreachable.is_some() {
        println!("site {name}: UNREACHABLE");
    } else {
        let phase = site
            .phase
            .map(|p| format!("  {}", p.as_str()))
            .unwrap_or_default();
        println!("site {name} ({}){phase}", site.role);
        if let Some(t) = site.datasets.iter().find_map(|d| d.takeover.as_ref()) {
            println!(
                "  takeover: epoch {}  primary {}  this site {}{}  raft leader {}",
                t.epoch,
                t.primary.as_deref().unwrap_or("(none yet)"),
                t.seat,
                match &t.fenced_reason {
                    Some(why) => format!(", FENCED: {why}"),
                    None => ", takes writes".into(),
                },
                t.leader.as_deref().unwrap_or("(none)"),
            );
        }
    }
    let now = vault::dataset::now_ns();
    for v in site.datasets.iter().filter(|v| v.error.is_none()) {
        print_log_and_intake(v);
        print_links(v);
        print_archive_and_checks(v, now);
    }
    let list = alerts(site);
    if list.is_empty() {
        println!("  alerts: none");
    } else {
        println!("  alerts:");
        for a in &list {
            println!("    - {a}");
        }
    }
    !list.is_empty()
}

fn print_log_and_intake(v: &DatasetStatus) {
    println!(
        "  {}: head seq {} applied {}  digest {}  chain {}",
        v.dataset,
        v.log.head_seq,
        v.log.applied_seq,
        short(&v.log.digest),
        short(&v.log.chain_hash),
    );
    if let Some(src) = &v.source {
        println!(
            "    source: {}  files ingested {}  pending {}  committed to seq {}  commit failures {}",
            if src.settled { "settled" } else { "busy" },
            src.files_ingested,
            src.pending_paths,
            src.committed_seq,
            src.commit_failures,
        );
    }
    if let Some(k) = &v.key_device {
        if k.reachable {
            println!("    key device: ok  `{}` in {}", k.kek, k.device);
        } else {
            println!(
                "    key device: UNREACHABLE for {:.0} s, {:.0} s of grace left  `{}` in {}",
                k.unreachable_seconds,
                (k.grace_seconds - k.unreachable_seconds).max(0.0),
                k.kek,
                k.device
            );
        }
    }
    if let Some(s) = &v.standby {
        println!(
            "    standby tree {}: {}  at seq {}  lag {} records, {:.2} s  written {}  removed {}{}",
            s.path,
            if s.ready { "ready" } else { "reconciling" },
            s.seq,
            s.lag_records,
            s.lag_seconds,
            s.written,
            s.removed,
            s.last_error
                .as_deref()
                .map(|e| format!("  problem: {e}"))
                .unwrap_or_default()
        );
    }
    if let Some(p) = &v.puts {
        println!(
            "    puts: {} stored, {} already there, {} refused, {} not acknowledged in time{}",
            p.stored,
            p.existed,
            p.refused,
            p.commit_failures,
            p.last_error
                .as_deref()
                .map(|e| format!("  last problem: {e}"))
                .unwrap_or_default()
        );
    }
}

fn print_links(v: &DatasetStatus) {
    for f in &v.replication.followers {
        println!(
            "    follower {} ({}): {}  acked {}  lag {} records, {} bytes, {:.2} s{}",
            f.site,
            f.mode,
            connected(f.connected),
            f.acked_seq,
            f.lag_records,
            f.lag_bytes,
            f.lag_seconds,
            if f.degraded {
                "  DEGRADED to async"
            } else {
                ""
            }
        );
    }
    if let Some(up) = &v.replication.upstream {
        println!(
            "    upstream {}: {}  its head {}  lag {} records, {} bytes, {:.2} s{}",
            up.upstream,
            connected(up.connected),
            up.upstream_head_seq,
            up.lag_records,
            up.lag_bytes,
            up.lag_seconds,
            if up.receiving_transfer {
                "  receiving a state transfer"
            } else {
                ""
            }
        );
        if let Some(e) = &up.last_error {
            println!("    last link problem: {e}");
        }
    }
}

fn print_archive_and_checks(v: &DatasetStatus, now: i64) {
    if let Some(a) = &v.archive {
        let snap = match &a.last_snapshot {
            Some(r) => format!(
                "{} ({:.1} s, {} bytes, {} uploaded)",
                age(now, a.last_snapshot_ns),
                r.seconds,
                r.bytes,
                r.bytes_uploaded,
            ),
            None => age(now, a.last_snapshot_ns),
        };
        println!(
            "    archive {}: shipped to seq {} ({})  last snapshot {snap}{}",
            a.url,
            a.shipped_seq,
            age(now, a.last_ship_ns),
            a.next_snapshot
                .as_deref()
                .map(|n| format!("  next {n}"))
                .unwrap_or_default(),
        );
    }
    let Some(c) = &v.checks else { return };
    let verify = match c.last_verify_agree {
        Some(true) => format!("copies agree ({})", age(now, c.last_verify_ns)),
        Some(false) => format!("DISAGREE ({})", age(now, c.last_verify_ns)),
        None => match &c.last_verify_verdict {
            Some(v) => format!("could not compare ({}): {v}", age(now, c.last_verify_ns)),
            None => "none recorded".into(),
        },
    };
    let scrub = match c.last_scrub_ok {
        Some(true) => format!("clean ({})", age(now, c.last_scrub_ns)),
        Some(false) => format!(
            "{} chunk(s) DAMAGED ({})",
            c.last_scrub_damaged,
            age(now, c.last_scrub_ns)
        ),
        None => "never".into(),
    };
    println!("    last verify: {verify}  last scrub: {scrub}");
    match &c.last_drill_result {
        Some(r) => println!(
            "    last drill: {r} ({})  RTO {:.1} s  RPO {}  report {}",
            age(now, c.last_drill_ns),
            c.last_drill_rto_seconds.unwrap_or(0.0),
            c.last_drill_rpo_seconds
                .map(|r| format!("{r:.1} s"))
                .unwrap_or_else(|| "unknown".into()),
            c.last_drill_report.as_deref().unwrap_or("?"),
        ),
        None => println!("    last drill: none recorded"),
    }
}

fn short(s: &str) -> &str {
    s.get(..16).unwrap_or(s)
}
