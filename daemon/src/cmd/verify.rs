//! `triad verify`: with no flags, cross-site verify (every configured site's
//! checkpoints compared over the replication port); `--scrub` re-reads and
//! checks every chunk of this site's copy and recomputes the namespace
//! digest, `--archive` does the same for its object store. The work is in
//! ops/verify.rs and ops/repair.rs; this file parses and prints. Exits 1
//! when anything is wrong.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use vault::DatasetKey;

use crate::config::Config;
use crate::ops::repair::RepairReport;
use crate::ops::verify::{scrub_and_repair, Repair};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: crate::cmd::Datasets,
    /// Re-read every chunk of this site's copy and recompute the digest.
    #[arg(long)]
    scrub: bool,
    /// Also scrub this site's archive: every chunk that kept snapshots and
    /// log pieces reference must be in the store.
    #[arg(long)]
    archive: bool,
    /// With --archive: read every referenced chunk and check its bytes.
    #[arg(long)]
    read_data: bool,
    /// With --archive: read about this percentage of the chunks (0-100).
    #[arg(long, conflicts_with = "read_data")]
    read_data_subset: Option<f64>,
    /// Most bytes a second the local scrub reads, so replication keeps its
    /// share of disk and CPU ("0" for no limit).
    #[arg(long, default_value = crate::config::default::SCRUB_MAX_RATE_TEXT)]
    max_rate: String,
    /// Repair what the scrub found: with --scrub, damaged chunks of this
    /// site's copy from this site's archive or another site (the daemon must
    /// be stopped); with --archive, missing or damaged chunk objects from
    /// this site's copy. Damaged bytes are kept in <dataset>/evidence/.
    #[arg(long)]
    repair: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// How many damaged chunks a report lists one by one; `--json` lists all.
const SHOWN: usize = 20;

/// The line that stands for the rest of a list cut at [`SHOWN`].
fn more(total: usize) {
    if total > SHOWN {
        println!("  ... and {} more (--json lists them all)", total - SHOWN);
    }
}

pub fn run(a: Args) -> Result<ExitCode> {
    let (cfg, names) = a.target.load()?;
    let rate = match a.max_rate.trim() {
        "0" => 0,
        r => crate::config::parse_bandwidth(r).map_err(|e| anyhow!("--max-rate: {e}"))?,
    };
    let mut ok = true;
    for name in names {
        let d = cfg
            .dataset(&name)
            .ok_or_else(|| anyhow!("dataset `{name}` is not in the config"))?;
        let key = DatasetKey::load(&d.key_file)?;
        if !a.scrub && !a.archive {
            ok &= cross(&a, &cfg, &name, &key)?;
            continue;
        }
        if a.scrub {
            ok &= scrub(&a, &cfg, &name, &key, rate)?;
        }
        if a.archive {
            ok &= archive(&a, &cfg, &name, &key)?;
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Cross-site verify of one dataset; true when the copies agree.
fn cross(a: &Args, cfg: &Config, name: &str, key: &DatasetKey) -> Result<bool> {
    let r = crate::ops::verify::cross_site(cfg, name, key)?;

    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "verify of dataset {name}: {}",
            if r.agree { "OK" } else { "NOT OK" }
        );
        for s in &r.sites {
            match &s.error {
                Some(e) => println!("  {:<10} unreachable: {e}", s.site),
                None => println!(
                    "  {:<10} head seq {:>10}, newest checkpoint {}{}",
                    s.site,
                    s.head_seq,
                    s.newest_checkpoint
                        .map(|q| q.to_string())
                        .unwrap_or_else(|| "none".into()),
                    s.epoch.map(|e| format!(", epoch {e}")).unwrap_or_default()
                ),
            }
        }
        println!("  {}", r.verdict);
        for p in &r.differing_paths {
            println!("  differs: {p}");
        }
    }
    Ok(r.agree)
}

/// A scrub of this site's copy (and its repair); true when clean after it.
fn scrub(a: &Args, cfg: &Config, name: &str, key: &DatasetKey, rate: u64) -> Result<bool> {
    let bar = ProgressBar::new(0);
    if std::io::stderr().is_terminal() && !a.json {
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} scrubbing [{bar:40}] {pos}/{len} chunks eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
    } else {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    let repair = if a.repair { Repair::Open } else { Repair::No };
    let out = scrub_and_repair(
        cfg,
        name,
        key,
        (rate > 0).then_some(rate),
        repair,
        &|d, t| {
            bar.set_length(t);
            bar.set_position(d);
        },
    )?;
    bar.finish_and_clear();
    if let Some(rep) = &out.repaired {
        print_repair(rep, a.json)?;
    }
    let r = &out.scrub;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "scrub of dataset {name} at seq {}: {} chunks, {} bytes in {:.1}s ({:.1} MB/s): {}",
            r.seq,
            r.chunks,
            r.bytes,
            r.seconds,
            r.mb_per_s,
            if r.ok() { "OK" } else { "PROBLEMS FOUND" }
        );
        for b in r.bad.iter().take(SHOWN) {
            let users = if b.referenced_by.is_empty() {
                "held by a pin of a file still being logged".to_string()
            } else {
                format!("in {}", b.referenced_by.join(", "))
            };
            println!("  BAD chunk {}: {} ({users})", b.id, b.reason);
        }
        more(r.bad.len());
        if r.running_digest != r.recomputed_digest {
            println!(
                "  DIGEST MISMATCH: running {} but the namespace recomputes to {}",
                r.running_digest, r.recomputed_digest
            );
        }
    }
    Ok(out.ok())
}

/// A scrub of this site's archive (and its repair); true when clean after it.
fn archive(a: &Args, cfg: &Config, name: &str, key: &DatasetKey) -> Result<bool> {
    let settings = cfg
        .archive_settings()
        .map_err(|(f, m)| anyhow!("{}: {f}: {m}", a.target.cfg.config.display()))?
        .ok_or_else(|| anyhow!("{} has no [archive]", a.target.cfg.config.display()))?;
    // Like a restore, a scrub is the time to use the link fully.
    let mut store_cfg = settings.store.clone();
    store_cfg.concurrency = store_cfg.concurrency.max(32);
    let store = archive::Store::open(&store_cfg)?;
    let rt = crate::ops::runtime()?;
    let read = match (a.read_data, a.read_data_subset) {
        (true, _) => verifier::scrub::ReadData::All,
        (false, Some(p)) if (0.0..=100.0).contains(&p) => verifier::scrub::ReadData::Percent(p),
        (false, Some(p)) => {
            bail!("--read-data-subset {p}: give a percentage from 0 to 100")
        }
        (false, None) => verifier::scrub::ReadData::None,
    };
    let r = verifier::scrub::archive(rt.handle(), &store, &key.derive(), name, read, 32)?;
    let fixable: Vec<String> = r
        .bad
        .iter()
        .filter(|b| !b.id.is_empty())
        .map(|b| b.id.clone())
        .collect();
    let repaired = if a.repair && !fixable.is_empty() {
        Some(crate::ops::repair::archive(cfg, name, key, &fixable)?)
    } else {
        None
    };
    let ok = r.ok()
        || repaired
            .as_ref()
            .is_some_and(|x| x.failed.is_empty() && r.bad.iter().all(|b| !b.id.is_empty()));
    if let Some(rep) = &repaired {
        print_repair(rep, a.json)?;
    }
    let left = match &repaired {
        Some(rep) => rep.failed.len() + r.bad.iter().filter(|b| b.id.is_empty()).count(),
        None => r.bad.len(),
    };
    crate::ops::verify::record_archive_scrub(cfg, name, left);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "archive scrub of dataset {name} in {}: {} snapshots, {} log pieces, {} chunks referenced, {} listed, {} read ({} bytes, {:.1} MB/s) in {:.1}s: {}",
            r.archive,
            r.snapshots,
            r.log_pieces,
            r.chunks_referenced,
            r.chunks_listed,
            r.chunks_read,
            r.bytes_read,
            r.mb_per_s,
            r.seconds,
            if r.ok() { "OK" } else { "PROBLEMS FOUND" }
        );
        for b in r.bad.iter().take(SHOWN) {
            println!(
                "  BAD {}{}: {} (referenced by {})",
                if b.id.is_empty() { "object" } else { "chunk " },
                b.id,
                b.reason,
                b.referenced_by.join(", ")
            );
        }
        more(r.bad.len());
    }
    Ok(ok)
}

fn print_repair(r: &RepairReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::json!({ "repair": r }));
    } else {
        for x in r.repaired.iter().take(SHOWN) {
            println!("  REPAIRED {x}");
        }
        more(r.repaired.len());
        for x in r.failed.iter().take(SHOWN) {
            println!("  NOT REPAIRED {x}");
        }
        more(r.failed.len());
    }
    Ok(())
}
