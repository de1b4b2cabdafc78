//! `triad snapshot`, `triad snapshots`, `triad prune` and `triad
//! undelete`: the archive on demand. With the daemon running they ask it (through request files in
//! the dataset directory, so snapshots and prunes stay serialized with the
//! scheduled ones); with no daemon they open the dataset and do the work
//! themselves, shipping the log first.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use archive::Store;

use crate::config::{ArchiveSettings, Config};
use crate::ops::archive::{self as ops, Kind};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: crate::cmd::Datasets,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// How long to wait for a running daemon to finish.
    #[arg(long, default_value = "1h", value_parser = crate::config::parse_duration)]
    timeout: Duration,
    /// Ask this site's daemon over the replication port (an Admin call
    /// with the site's own certificate from [tls]) instead of through its
    /// dataset directory: for running it from another host that holds the
    /// site's certificate. Snapshot and prune only.
    #[arg(long)]
    over_tls: bool,
}

pub enum Job {
    Snapshot,
    Prune,
    List,
}

fn settings(cfg: &Config, path: &Path) -> Result<ArchiveSettings> {
    cfg.archive_settings()
        .map_err(|(f, m)| anyhow!("{}: {f}: {m}", path.display()))?
        .ok_or_else(|| anyhow!("{} has no [archive] section", path.display()))
}

/// True when a daemon holds the dataset open.
fn daemon_running(dataset_dir: &Path) -> bool {
    let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .open(dataset_dir.join("LOCK"))
    else {
        return false;
    };
    match f.try_lock() {
        Ok(()) => false,
        Err(std::fs::TryLockError::WouldBlock) => true,
        Err(_) => false,
    }
}

pub fn run(job: Job, a: Args) -> Result<ExitCode> {
    let (cfg, names) = a.target.load()?;
    let s = settings(&cfg, &a.target.cfg.config)?;
    let rt = crate::ops::runtime()?;
    let mut ok = true;
    for name in names {
        let dir = cfg.dataset_dir(&name);
        match job {
            Job::List => list(&cfg, &s, &rt, &name, a.json)?,
            Job::Snapshot | Job::Prune => {
                let kind = if matches!(job, Job::Snapshot) {
                    Kind::Snapshot
                } else {
                    Kind::Prune
                };
                let answer = if a.over_tls {
                    eprintln!(
                        "asking {} over TLS to {} dataset {name} ...",
                        cfg.site.name,
                        kind.as_str()
                    );
                    ops::over_tls(&cfg, &rt, kind, &name)?
                } else if daemon_running(&dir) {
                    // A daemon started without [archive] would never answer.
                    let archiving = std::fs::read(dir.join(crate::status::STATUS_FILE))
                        .ok()
                        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                        .is_some_and(|v| v["archive"].is_object());
                    if !archiving {
                        bail!(
                            "dataset `{name}`: the running daemon does not archive (it was started \
                             without [archive]); restart it with this config"
                        );
                    }
                    eprintln!(
                        "asking the running daemon to {} dataset {name} ...",
                        kind.as_str()
                    );
                    crate::archiving::request(&dir, kind.as_str(), a.timeout)
                        .with_context(|| format!("dataset `{name}`"))?
                } else {
                    ops::without_daemon(&cfg, &s, &rt, &name, kind)?
                };
                ok &= answer.ok;
                ok &= answer.prune.as_ref().is_none_or(|p| p.chunks_missing == 0);
                print_answer(&name, &answer, a.json)?;
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_answer(name: &str, a: &ops::Answer, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(a)?);
        return Ok(());
    }
    if let Some(e) = &a.error {
        println!("dataset {name}: FAILED: {e}");
    }
    if let Some(r) = &a.snapshot {
        println!(
            "dataset {name}: snapshot {} at seq {}: {} entries, {} bytes, {} chunks ({} new, {} bytes uploaded) in {:.1}s",
            r.name, r.seq, r.entries, r.bytes, r.chunks, r.chunks_uploaded, r.bytes_uploaded, r.seconds
        );
    }
    if let Some(p) = &a.prune {
        if !p.deferred_for.is_empty() {
            let who: Vec<String> = p
                .deferred_for
                .iter()
                .map(|h| {
                    format!(
                        "{} on {} (pid {}, since {})",
                        h.what, h.host, h.pid, h.started
                    )
                })
                .collect();
            println!(
                "dataset {name}: prune DEFERRED: the archive is being read by {}; nothing was deleted, run the prune again once they are done",
                who.join(", ")
            );
            return Ok(());
        }
        println!(
            "dataset {name}: kept {} snapshots, deleted {}; chunks: {} live, {} deleted, {} waiting out the grace period ({} newly marked); {} log pieces and {} orphan objects deleted",
            p.snapshots_kept,
            p.snapshots_deleted.len(),
            p.chunks_live,
            p.chunks_deleted,
            p.chunks_waiting,
            p.chunks_marked,
            p.log_pieces_deleted,
            p.orphan_objects_deleted
        );
        if !p.snapshots_bridging.is_empty() {
            println!(
                "dataset {name}: kept beyond the retention policy because the archived log has a gap before them (without them the points after the gap could not be restored): {}",
                p.snapshots_bridging.join(", ")
            );
        }
        if !p.snapshots_held.is_empty() || p.objects_held > 0 {
            println!(
                "dataset {name}: held by Object Lock: {} snapshots retention dropped ({}) and {} other objects stay until their lock ends; a later prune deletes them",
                p.snapshots_held.len(),
                p.snapshots_held.join(", "),
                p.objects_held
            );
        }
        if p.chunks_missing > 0 {
            println!(
                "dataset {name}: MISSING: {} chunks that kept snapshots or log pieces reference are not in the store (removed outside triad?); the index was rebuilt, so the next snapshot uploads those the dataset still holds; restores through the affected snapshots name them",
                p.chunks_missing
            );
        }
        if p.packs_deleted > 0 || p.pack_bytes_unreferenced > 0 {
            println!(
                "dataset {name}: packs: {} deleted; {:.1} MB of unreferenced chunks stay in packs still partly in use",
                p.packs_deleted,
                p.pack_bytes_unreferenced as f64 / 1e6
            );
        }
        for d in &p.packs_damaged {
            println!("dataset {name}: DAMAGED pack: {d}; once no referenced chunk is missing it is set aside after the grace period");
        }
        for a in &p.packs_set_aside {
            println!("dataset {name}: a damaged pack nothing needs was moved to {a}");
        }
    }
    Ok(())
}

fn list(
    cfg: &Config,
    s: &ArchiveSettings,
    rt: &tokio::runtime::Runtime,
    name: &str,
    json: bool,
) -> Result<()> {
    let d = cfg
        .dataset(name)
        .ok_or_else(|| anyhow!("dataset `{name}` is not in the config"))?;
    let keys = vault::DatasetKey::load(&d.key_file)?.derive();
    let store = Store::open(&s.store)?;
    let snaps = archive::archiver::list_snapshots(rt.handle(), &store, name)?;
    let mut rows = Vec::new();
    for sn in &snaps {
        let m = archive::archiver::read_manifest(rt.handle(), &store, &keys, name, sn)?;
        rows.push(serde_json::json!({
            "dataset": name,
            "snapshot": sn.name,
            "seq": m.seq,
            "time": chrono::DateTime::from_timestamp_nanos(m.time_ns).to_rfc3339(),
            "taken": chrono::DateTime::from_timestamp_nanos(m.taken_ns).to_rfc3339(),
            "site": m.site,
            "entries": m.entries,
            "bytes": m.bytes,
            "chunks": m.chunks,
            "chain_hash": hex::encode(m.chain_hash),
            "digest": hex::encode(m.digest),
        }));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("dataset {name}: no snapshots in {}", store.url());
        return Ok(());
    }
    println!("dataset {name} in {}:", store.url());
    println!(
        "{:<34} {:>10} {:<32} {:>10} {:>14}",
        "snapshot", "seq", "time", "entries", "bytes"
    );
    for r in &rows {
        println!(
            "{:<34} {:>10} {:<32} {:>10} {:>14}",
            r["snapshot"].as_str().unwrap_or(""),
            r["seq"],
            r["time"].as_str().unwrap_or(""),
            r["entries"],
            r["bytes"]
        );
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct UndeleteArgs {
    #[command(flatten)]
    target: crate::cmd::Datasets,
    /// Only delete markers made at or after this RFC 3339 time (when the
    /// deletes began), so what prune removed earlier stays removed.
    #[arg(long)]
    since: Option<String>,
    /// List what would come back; change nothing.
    #[arg(long)]
    dry_run: bool,
}

/// `triad undelete`: in a bucket with Object Lock (so versioned), a plain
/// delete only puts a marker in front of the object. Removing the markers
/// under a dataset's prefix makes the hidden versions current again: how
/// an archive comes back after someone deleted it with the site's own
/// credentials.
pub fn undelete(a: UndeleteArgs) -> Result<ExitCode> {
    let (cfg, names) = a.target.load()?;
    let s = settings(&cfg, &a.target.cfg.config)?;
    if s.store.object_lock.is_none() {
        bail!(
            "{}: undelete needs archive.object_lock (a versioned bucket with Object Lock): \
             without versions a deleted object is gone",
            a.target.cfg.config.display()
        );
    }
    let since = match &a.since {
        Some(t) => Some(
            chrono::DateTime::parse_from_rfc3339(t)
                .with_context(|| format!("--since {t:?}: expected an RFC 3339 time"))?
                .with_timezone(&chrono::Utc),
        ),
        None => None,
    };
    let rt = crate::ops::runtime()?;
    let store = Store::open(&s.store)?;
    for name in names {
        let markers: Vec<_> = rt
            .block_on(store.delete_markers(&format!("{name}/")))?
            .into_iter()
            .filter(|m| since.is_none_or(|t| m.modified >= t))
            // Leases and the prune marker are deleted by design when their
            // holder ends: brought back, they would hold prunes off.
            .filter(|m| {
                // Marker keys are whole bucket keys, the store's prefix
                // included.
                let (leases, running) = (
                    archive::lease::leases_prefix(&name),
                    archive::lease::prune_running_key(&name),
                );
                let k = m.key.as_str();
                !(k.starts_with(&leases)
                    || k.contains(&format!("/{leases}"))
                    || k == running
                    || k.ends_with(&format!("/{running}")))
            })
            .collect();
        for m in &markers {
            if a.dry_run {
                println!("would bring back {}", store.locate(&m.key));
            } else {
                rt.block_on(store.remove_delete_marker(m))?;
            }
        }
        let verb = if a.dry_run {
            "would bring back"
        } else {
            "brought back"
        };
        println!(
            "dataset {name}: {verb} {} objects hidden by delete markers{}",
            markers.len(),
            match (&a.since, markers.first(), markers.last()) {
                (_, Some(f), Some(l)) => format!(
                    " made between {} and {}",
                    f.modified.to_rfc3339(),
                    l.modified.to_rfc3339()
                ),
                _ => String::new(),
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}
