//! `triad status`: what each dataset of this site is doing, from the status
//! files the daemon keeps current.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};

use crate::config::Config;
use crate::runtime::STATUS_FILE;

#[derive(clap::Args)]
pub struct Args {
    #[arg(
        long,
        short,
        env = "TRIAD_CONFIG",
        default_value = "/etc/triad/triad.toml"
    )]
    config: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<ExitCode> {
    let cfg = Config::load(&a.config)?;
    let mut all = Vec::new();
    for d in &cfg.dataset {
        let path = cfg.dataset_dir(&d.name).join(STATUS_FILE);
        let v: serde_json::Value = match std::fs::read(&path) {
            Ok(b) => {
                serde_json::from_slice(&b).with_context(|| format!("reading {}", path.display()))?
            }
            Err(_) => {
                serde_json::json!({"dataset": d.name, "error": "no status yet: the daemon has not run"})
            }
        };
        all.push(v);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("site {} ({:?})", cfg.site.name, cfg.site.role);
    let mut unhealthy = false;
    let now = vault::dataset::now_ns();
    for v in &all {
        let name = v["dataset"].as_str().unwrap_or("?");
        if let Some(e) = v["error"].as_str() {
            println!("  {name}: {e}");
            unhealthy = true;
            continue;
        }
        let age = (now - v["updated_ns"].as_i64().unwrap_or(0)) as f64 / 1e9;
        unhealthy |= age > 5.0 || !v["failure"].is_null();
        let stale = if age > 5.0 {
            format!(" (status {age:.0}s old: is the daemon running?)")
        } else {
            String::new()
        };
        println!(
            "  {name}: head seq {} applied {}  digest {}  chain {}{stale}",
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
            // Only a policy failing now counts, not one that has recovered.
            unhealthy |= src["commit_failing"] == true;
        }
        for f in v["replication"]["followers"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let degraded = f["degraded"] == true;
            unhealthy |= degraded || f["connected"] != true;
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
                if degraded { "  DEGRADED to async" } else { "" }
            );
        }
        let up = &v["replication"]["upstream"];
        if up.is_object() {
            unhealthy |= up["connected"] != true;
            println!(
                "    upstream {}: {}  its head {}  lag {} records, {} bytes, {:.2} s",
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
            );
            if let Some(e) = up["last_error"].as_str() {
                println!("    last link problem: {e}");
            }
        }
        let refused = v["replication"]["refused_handshakes"].as_u64().unwrap_or(0)
            + v["replication"]["refused_unknown_sites"]
                .as_u64()
                .unwrap_or(0);
        if refused > 0 {
            println!("    refused connections since start: {refused} (see the log)");
        }
        if let Some(f) = v["failure"].as_str() {
            println!("    FAILED: {f}");
        }
        if let Some(e) = v["source"]["last_error"].as_str() {
            println!("    last problem: {e}");
        }
    }
    // Non-zero when a dataset has failed, its daemon is not updating, a
    // link is down or degraded, or the commit policy failed, so scripts and
    // monitoring can use the exit code.
    Ok(if unhealthy {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn short(v: &serde_json::Value) -> &str {
    v.as_str().map(|s| &s[..16.min(s.len())]).unwrap_or("?")
}
