//! `triad status`: one screen per site. This site's status comes from the
//! status files its daemon keeps current (so it works, and says the daemon
//! is not running, when it is not); with `--all` or `--site` the other
//! sites are asked over the replication port (mutual TLS, read-only
//! SiteStatus call). Exits 1 when anything needs attention, listing it
//! under "alerts", so scripts and monitoring can use the exit code.

use std::process::ExitCode;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::config::Config;
use crate::status::STATUS_FILE;

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
    let mut docs = Vec::new();
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

/// This site's document, from its daemon's status files.
fn local(cfg: &Config) -> Result<Value> {
    let mut datasets = Vec::new();
    for d in &cfg.dataset {
        let path = cfg.dataset_dir(&d.name).join(STATUS_FILE);
        datasets.push(match std::fs::read(&path) {
            Ok(b) => {
                serde_json::from_slice(&b).with_context(|| format!("reading {}", path.display()))?
            }
            Err(_) => serde_json::json!({
                "dataset": d.name,
                "error": "no status yet: the daemon has not run"
            }),
        });
    }
    Ok(serde_json::json!({
        "site": cfg.site.name,
        "role": format!("{:?}", cfg.site.role).to_lowercase(),
        "datasets": datasets,
    }))
}

/// A peer's document, asked over the replication port.
fn remote(cfg: &Config, name: &str) -> Value {
    let r = (|| -> Result<Value> {
        let addr = cfg.peer_addr(name).ok_or_else(|| {
            anyhow::anyhow!("asking another site needs [tls] in this site's config")
        })?;
        let rt = crate::cmd::archive::runtime()?;
        let json = rt
            .block_on(async {
                tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    replicator::follower::fetch_site_status(&addr),
                )
                .await
            })
            .map_err(|_| anyhow::anyhow!("no answer within 10 s"))?
            .map_err(anyhow::Error::msg)?;
        Ok(serde_json::from_str(&json)?)
    })();
    r.unwrap_or_else(|e| serde_json::json!({"site": name, "unreachable": format!("{e:#}")}))
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

/// What needs attention in a site's document, one line each.
fn alerts(site: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(e) = site["unreachable"].as_str() {
        out.push(format!("site unreachable: {e}"));
        return out;
    }
    for r in site["not_ready"].as_array().into_iter().flatten() {
        if let Some(r) = r.as_str() {
            out.push(format!("not ready: {r}"));
        }
    }
    let now = vault::dataset::now_ns();
    for v in site["datasets"].as_array().into_iter().flatten() {
        let name = v["dataset"].as_str().unwrap_or("?");
        let mut say = |m: String| out.push(format!("{name}: {m}"));
        if let Some(e) = v["error"].as_str() {
            say(e.to_string());
            continue;
        }
        let stale = (now - v["updated_ns"].as_i64().unwrap_or(0)) as f64 / 1e9;
        if stale > STALE_SECONDS {
            say(format!(
                "status is {stale:.0} s old: is the daemon running?"
            ));
        }
        if let Some(f) = v["failure"].as_str() {
            say(format!("FAILED: {f}"));
        }
        // Only a commit policy failing now counts, not one that recovered.
        if v["source"]["commit_failing"] == true || v["puts"]["commit_failing"] == true {
            say("the commit policy is failing: a sync follower does not acknowledge".into());
        }
        for f in v["replication"]["followers"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let peer = f["site"].as_str().unwrap_or("?");
            if f["connected"] != true {
                say(format!("follower {peer} is not connected"));
            }
            if f["degraded"] == true {
                say(format!("sync follower {peer} is DEGRADED to async"));
            }
        }
        let up = &v["replication"]["upstream"];
        if up.is_object() && up["connected"] != true {
            say(format!(
                "upstream {} is not connected",
                up["upstream"].as_str().unwrap_or("?")
            ));
        }
        let a = &v["archive"];
        for kind in ["ship", "snapshot", "prune"] {
            if let Some(e) = a[format!("{kind}_error")].as_str() {
                say(format!("archive {kind}: {e}"));
            }
        }
        if let (Some(every), Some(last)) = (
            a["snapshot_interval_seconds"].as_f64(),
            a["last_snapshot_ns"].as_i64().filter(|t| *t > 0),
        ) {
            if (now - last) as f64 / 1e9 > 2.0 * every {
                say(format!(
                    "the newest snapshot is {}, older than twice its schedule",
                    age(now, last)
                ));
            }
        }
        let c = &v["checks"];
        if c["last_verify_agree"] == false {
            say(format!(
                "the last cross-site verify found disagreement: {}",
                c["last_verify_verdict"].as_str().unwrap_or("?")
            ));
        }
        if c["last_scrub_ok"] == false {
            say(format!(
                "the last scrub left {} chunk(s) damaged",
                c["last_scrub_damaged"]
            ));
        }
        if c["last_drill_result"] == "failed" {
            say("the last restore drill FAILED (see its report)".into());
        }
        if let (Some(every), Some(last)) = (
            c["drill_interval_seconds"].as_f64(),
            c["last_drill_success_ns"].as_i64().filter(|t| *t > 0),
        ) {
            if (now - last) as f64 / 1e9 > 1.5 * every {
                say(format!("no passed drill since {}: overdue", age(now, last)));
            }
        }
    }
    out
}

/// Prints one site; returns true when it has alerts.
fn print_site(site: &Value) -> bool {
    let name = site["site"].as_str().unwrap_or("?");
    if site["unreachable"].is_string() {
        println!("site {name}: UNREACHABLE");
    } else {
        let phase = site["phase"]
            .as_str()
            .map(|p| format!("  {p}"))
            .unwrap_or_default();
        println!(
            "site {name} ({}){phase}",
            site["role"].as_str().unwrap_or("?")
        );
    }
    let now = vault::dataset::now_ns();
    for v in site["datasets"].as_array().into_iter().flatten() {
        let ds = v["dataset"].as_str().unwrap_or("?");
        if v["error"].is_string() {
            continue;
        }
        println!(
            "  {ds}: head seq {} applied {}  digest {}  chain {}",
            v["log"]["head_seq"],
            v["log"]["applied_seq"],
            short(&v["log"]["digest"]),
            short(&v["log"]["chain_hash"]),
        );
        let src = &v["source"];
        if src.is_object() {
            println!(
                "    source: {}  files ingested {}  pending {}  committed to seq {}  commit failures {}",
                if src["settled"] == true { "settled" } else { "busy" },
                src["files_ingested"],
                src["pending_paths"],
                src["committed_seq"],
                src["commit_failures"],
            );
        }
        let p = &v["puts"];
        if p.is_object() {
            println!(
                "    puts: {} stored, {} already there, {} refused, {} not acknowledged in time{}",
                p["stored"],
                p["existed"],
                p["refused"],
                p["commit_failures"],
                p["last_error"]
                    .as_str()
                    .map(|e| format!("  last problem: {e}"))
                    .unwrap_or_default()
            );
        }
        for f in v["replication"]["followers"]
            .as_array()
            .into_iter()
            .flatten()
        {
            println!(
                "    follower {} ({}): {}  acked {}  lag {} records, {} bytes, {:.2} s{}",
                f["site"].as_str().unwrap_or("?"),
                f["mode"].as_str().unwrap_or("?"),
                if f["connected"] == true {
                    "connected"
                } else {
                    "NOT CONNECTED"
                },
                f["acked_seq"],
                f["lag_records"],
                f["lag_bytes"],
                f["lag_seconds"].as_f64().unwrap_or(0.0),
                if f["degraded"] == true {
                    "  DEGRADED to async"
                } else {
                    ""
                }
            );
        }
        let up = &v["replication"]["upstream"];
        if up.is_object() {
            println!(
                "    upstream {}: {}  its head {}  lag {} records, {} bytes, {:.2} s{}",
                up["upstream"].as_str().unwrap_or("?"),
                if up["connected"] == true {
                    "connected"
                } else {
                    "NOT CONNECTED"
                },
                up["upstream_head_seq"],
                up["lag_records"],
                up["lag_bytes"],
                up["lag_seconds"].as_f64().unwrap_or(0.0),
                if up["receiving_transfer"] == true {
                    "  receiving a state transfer"
                } else {
                    ""
                }
            );
            if let Some(e) = up["last_error"].as_str() {
                println!("    last link problem: {e}");
            }
        }
        let a = &v["archive"];
        if a.is_object() {
            let snap = match a["last_snapshot"].as_object() {
                Some(r) => format!(
                    "{} ({:.1} s, {} bytes, {} uploaded)",
                    age(now, a["last_snapshot_ns"].as_i64().unwrap_or(0)),
                    r.get("seconds").and_then(Value::as_f64).unwrap_or(0.0),
                    r.get("bytes").cloned().unwrap_or_default(),
                    r.get("bytes_uploaded").cloned().unwrap_or_default(),
                ),
                None => age(now, a["last_snapshot_ns"].as_i64().unwrap_or(0)),
            };
            println!(
                "    archive {}: shipped to seq {} ({})  last snapshot {snap}{}",
                a["url"].as_str().unwrap_or("?"),
                a["shipped_seq"],
                age(now, a["last_ship_ns"].as_i64().unwrap_or(0)),
                a["next_snapshot"]
                    .as_str()
                    .map(|n| format!("  next {n}"))
                    .unwrap_or_default(),
            );
        }
        let c = &v["checks"];
        if c.is_object() {
            let verify = match c["last_verify_agree"].as_bool() {
                Some(true) => format!(
                    "copies agree ({})",
                    age(now, c["last_verify_ns"].as_i64().unwrap_or(0))
                ),
                Some(false) => format!(
                    "DISAGREE ({})",
                    age(now, c["last_verify_ns"].as_i64().unwrap_or(0))
                ),
                None => match c["last_verify_verdict"].as_str() {
                    Some(v) => format!(
                        "could not compare ({}): {v}",
                        age(now, c["last_verify_ns"].as_i64().unwrap_or(0))
                    ),
                    None => "none recorded".into(),
                },
            };
            let scrub = match c["last_scrub_ok"].as_bool() {
                Some(true) => format!(
                    "clean ({})",
                    age(now, c["last_scrub_ns"].as_i64().unwrap_or(0))
                ),
                Some(false) => format!(
                    "{} chunk(s) DAMAGED ({})",
                    c["last_scrub_damaged"],
                    age(now, c["last_scrub_ns"].as_i64().unwrap_or(0))
                ),
                None => "never".into(),
            };
            println!("    last verify: {verify}  last scrub: {scrub}");
            match c["last_drill_result"].as_str() {
                Some(r) => println!(
                    "    last drill: {r} ({})  RTO {:.1} s  RPO {}  report {}",
                    age(now, c["last_drill_ns"].as_i64().unwrap_or(0)),
                    c["last_drill_rto_seconds"].as_f64().unwrap_or(0.0),
                    c["last_drill_rpo_seconds"]
                        .as_f64()
                        .map(|r| format!("{r:.1} s"))
                        .unwrap_or_else(|| "unknown".into()),
                    c["last_drill_report"].as_str().unwrap_or("?"),
                ),
                None => println!("    last drill: none recorded"),
            }
        }
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

fn short(v: &Value) -> &str {
    v.as_str().map(|s| &s[..16.min(s.len())]).unwrap_or("?")
}
