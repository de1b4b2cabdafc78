//! `triad verify`: with no flags, cross-site verify (every configured site's
//! checkpoints compared over the replication port; verifier/src/cross.rs);
//! `--scrub` re-reads and checks every chunk of this site's copy and
//! recomputes the namespace digest, `--archive` does the same for its object
//! store (verifier/src/scrub.rs). Exits 1 when anything is wrong.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use vault::{DatasetKey, View};

use crate::config::Config;

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
    #[arg(long, default_value = "100MiB/s")]
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
            let r = cross_site(&cfg, &name, &key)?;
            ok &= r.agree;
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
                            "  {:<10} head seq {:>10}, newest checkpoint {}",
                            s.site,
                            s.head_seq,
                            s.newest_checkpoint
                                .map(|q| q.to_string())
                                .unwrap_or_else(|| "none".into())
                        ),
                    }
                }
                println!("  {}", r.verdict);
                for p in &r.differing_paths {
                    println!("  differs: {p}");
                }
            }
            continue;
        }
        if a.scrub {
            let view = View::open(&cfg.dataset_dir(&name), &name, &key)
                .with_context(|| format!("opening dataset `{name}`"))?;
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
            let r = verifier::scrub::local(&name, &view, (rate > 0).then_some(rate), &|d, t| {
                bar.set_length(t);
                bar.set_position(d);
            })?;
            bar.finish_and_clear();
            drop(view);
            let repaired = if a.repair && !r.bad.is_empty() {
                let ids: Vec<String> = r.bad.iter().map(|b| b.id.clone()).collect();
                Some(crate::cmd::repair::local(&cfg, &name, &key, &ids)?)
            } else {
                None
            };
            ok &= r.ok()
                || (r.running_digest == r.recomputed_digest
                    && repaired.as_ref().is_some_and(|x| x.failed.is_empty()));
            if let Some(rep) = &repaired {
                print_repair(rep, a.json)?;
            }
            record_scrub(&cfg, &name, &r, repaired.as_ref());
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
                for b in &r.bad {
                    let users = if b.referenced_by.is_empty() {
                        "held by a pin of a file still being logged".to_string()
                    } else {
                        format!("in {}", b.referenced_by.join(", "))
                    };
                    println!("  BAD chunk {}: {} ({users})", b.id, b.reason);
                }
                if r.running_digest != r.recomputed_digest {
                    println!(
                        "  DIGEST MISMATCH: running {} but the namespace recomputes to {}",
                        r.running_digest, r.recomputed_digest
                    );
                }
            }
        }
        if a.archive {
            let settings = cfg
                .archive_settings()
                .map_err(|(f, m)| anyhow!("{}: {f}: {m}", a.target.cfg.config.display()))?
                .ok_or_else(|| anyhow!("{} has no [archive]", a.target.cfg.config.display()))?;
            // Like a restore, a scrub is the time to use the link fully.
            let mut store_cfg = settings.store.clone();
            store_cfg.concurrency = store_cfg.concurrency.max(32);
            let store = archive::Store::open(&store_cfg)?;
            let rt = crate::cmd::archive::runtime()?;
            let read = match (a.read_data, a.read_data_subset) {
                (true, _) => verifier::scrub::ReadData::All,
                (false, Some(p)) if (0.0..=100.0).contains(&p) => {
                    verifier::scrub::ReadData::Percent(p)
                }
                (false, Some(p)) => {
                    bail!("--read-data-subset {p}: give a percentage from 0 to 100")
                }
                (false, None) => verifier::scrub::ReadData::None,
            };
            let r = verifier::scrub::archive(rt.handle(), &store, &key.derive(), &name, read, 32)?;
            let fixable: Vec<String> = r
                .bad
                .iter()
                .filter(|b| !b.id.is_empty())
                .map(|b| b.id.clone())
                .collect();
            let repaired = if a.repair && !fixable.is_empty() {
                Some(crate::cmd::repair::archive(&cfg, &name, &key, &fixable)?)
            } else {
                None
            };
            ok &= r.ok()
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
            record_archive_scrub(&cfg, &name, left);
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
                for b in &r.bad {
                    println!(
                        "  BAD {}{}: {} (referenced by {})",
                        if b.id.is_empty() { "object" } else { "chunk " },
                        b.id,
                        b.reason,
                        b.referenced_by.join(", ")
                    );
                }
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Gathers every configured site's checkpoints (this site's from its own
/// copy, the others' over the replication port) and compares them; when one
/// site is the odd one out, fetches its namespace and a majority site's to
/// name the paths that differ.
/// Also records the outcome in `<dataset>/last-verify.json`, where the
/// daemon picks it up for status and metrics (a verify run by hand counts,
/// and the last result survives a restart).
pub(crate) fn cross_site(
    cfg: &Config,
    name: &str,
    key: &DatasetKey,
) -> Result<verifier::cross::CrossReport> {
    let r = compare_sites(cfg, name, key)?;
    let record = serde_json::json!({
        "time_ns": vault::dataset::now_ns(),
        "agree": r.agree,
        "disagree": r.disagree,
        "verdict": r.verdict,
    });
    let dir = cfg.dataset_dir(name);
    if dir.is_dir() {
        if let Err(e) =
            vault::fs::write_replace(&dir.join(LAST_VERIFY), record.to_string().as_bytes(), false)
        {
            tracing::warn!(dataset = name, error = %e, "cannot record the verify result");
        }
    }
    Ok(r)
}

/// Where the last cross-site verify's outcome is kept, in the dataset dir.
pub const LAST_VERIFY: &str = "last-verify.json";

fn compare_sites(
    cfg: &Config,
    name: &str,
    key: &DatasetKey,
) -> Result<verifier::cross::CrossReport> {
    use verifier::cross::SiteView;
    let files = cfg.tls_files().ok_or_else(|| {
        anyhow!("cross-site verify connects to the other sites: the config needs [tls]")
    })?;
    let rt = crate::cmd::archive::runtime()?;
    // This site's copy on disk is read only when its daemon does not answer.
    let view = std::cell::OnceCell::new();
    let open_view = || -> Result<&View> {
        if let Some(v) = view.get() {
            return Ok(v);
        }
        let v = View::open(&cfg.dataset_dir(name), name, key)
            .with_context(|| format!("opening dataset `{name}`"))?;
        Ok(view.get_or_init(|| v))
    };
    let local_paths = || -> Result<verifier::cross::PathDigests> {
        let view = open_view()?;
        let paths = view
            .entries()?
            .into_iter()
            .map(|(p, e)| {
                let d = blake3::hash(&e.digest_bytes(&p)).as_bytes().to_vec();
                (p, d)
            })
            .collect();
        Ok((view.applied().seq, paths))
    };
    let addr = |p: &crate::config::Peer| replicator::follower::UpstreamAddr {
        name: p.name.clone(),
        address: p.address.clone(),
        tls: files.clone(),
    };
    let fetch = |p: &crate::config::Peer, with_paths: bool| {
        rt.block_on(replicator::follower::fetch_checkpoints(
            &addr(p),
            name,
            &key.key_id(),
            with_paths,
        ))
    };
    let to32 = |b: &[u8]| -> [u8; 32] { b.try_into().unwrap_or([0; 32]) };
    let keys = key.derive();
    // Every checkpoint must carry evidence that verifies under the key: a
    // site that sends one that does not is lying or damaged, and its
    // answer is not compared.
    let forged = |r: &replicator::pb::CheckpointsReply| {
        r.checkpoints.iter().find_map(|c| {
            let cp = vault::state::Checkpoint {
                seq: c.seq,
                hash: to32(&c.hash),
                digest: to32(&c.digest),
                hmac_sm3: to32(&c.hmac_sm3),
            };
            (!cp.verify(&keys)).then_some(c.seq)
        })
    };
    let from_reply = |site: &str, r: replicator::pb::CheckpointsReply| SiteView {
        site: site.to_string(),
        head_seq: r.head_seq,
        error: forged(&r).map(|seq| {
            format!(
                "its checkpoint at seq {seq} carries HMAC-SM3 evidence that does not verify under \
                 this dataset's key: forged or damaged (or sent by a triad older than 0.2)"
            )
        }),
        checkpoints: r
            .checkpoints
            .iter()
            .map(|c| (c.seq, (to32(&c.hash), to32(&c.digest))))
            .collect(),
        paths: None,
        scrub: (r.scrub_time_ns > 0).then_some((
            r.scrub_time_ns,
            r.scrub_damaged,
            r.scrub_digest_ok,
        )),
    };
    // This site: its daemon when it serves the replication port (it knows
    // checkpoints not yet flushed), otherwise its copy on disk.
    let own = cfg
        .listen
        .as_ref()
        .and_then(|l| l.replication.as_deref())
        .map(|a| crate::config::Peer {
            name: cfg.site.name.clone(),
            address: a.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]"),
            mode: None,
            on_unreachable: None,
            wait_limit: None,
            bandwidth: None,
        });
    let own_reply = own.as_ref().and_then(|p| fetch(p, false).ok());
    let mut sites = vec![match own_reply {
        Some(r) => from_reply(&cfg.site.name, r),
        None => {
            let view = open_view()?;
            SiteView {
                site: cfg.site.name.clone(),
                head_seq: view.applied().seq,
                checkpoints: view
                    .state()
                    .checkpoints()?
                    .into_iter()
                    .map(|c| (c.seq, (c.hash, c.digest)))
                    .collect(),
                paths: None,
                scrub: replicator::upstream::read_last_scrub(&cfg.dataset_dir(name)),
                error: None,
            }
        }
    }];
    for p in &cfg.peer {
        sites.push(match fetch(p, false) {
            Ok(r) => from_reply(&p.name, r),
            Err(e) => SiteView {
                site: p.name.clone(),
                error: Some(e),
                ..SiteView::default()
            },
        });
    }
    let first = verifier::cross::compare(name, &sites);
    let Some(odd) = first.odd_site.clone() else {
        return Ok(first);
    };
    // Name the paths: the odd site's namespace and a majority site's.
    let seq = first.compared_seq.unwrap_or(0);
    let odd_hash = sites
        .iter()
        .find(|s| s.site == odd)
        .and_then(|s| s.checkpoints.get(&seq).copied());
    let good = sites
        .iter()
        .find(|s| s.error.is_none() && s.checkpoints.get(&seq).copied() != odd_hash)
        .map(|s| s.site.clone());
    for who in [Some(odd), good].into_iter().flatten() {
        let remote = if who == cfg.site.name {
            own.as_ref()
        } else {
            cfg.peer.iter().find(|p| p.name == who)
        };
        let paths = if remote.is_none() && who == cfg.site.name {
            local_paths()?
        } else {
            let Some(p) = remote else {
                continue;
            };
            match fetch(p, true) {
                Ok(r) => (
                    r.paths_seq,
                    r.paths.into_iter().map(|d| (d.path, d.digest)).collect(),
                ),
                Err(_) => continue,
            }
        };
        if let Some(s) = sites.iter_mut().find(|s| s.site == who) {
            s.paths = Some(paths);
        }
    }
    Ok(verifier::cross::compare(name, &sites))
}

fn print_repair(r: &crate::cmd::repair::RepairReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::json!({ "repair": r }));
    } else {
        for x in &r.repaired {
            println!("  REPAIRED {x}");
        }
        for x in &r.failed {
            println!("  NOT REPAIRED {x}");
        }
    }
    Ok(())
}

/// Updates `<dataset>/last-scrub.json`, where the daemon serves it to
/// cross-site verify at the other sites; the keys `f` does not set stay.
fn update_last_scrub(cfg: &Config, name: &str, f: impl FnOnce(&mut serde_json::Value)) {
    let path = cfg.dataset_dir(name).join(replicator::upstream::LAST_SCRUB);
    let mut last: serde_json::Value = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| serde_json::json!({}));
    f(&mut last);
    if last.get("time_ns").is_none() {
        last["time_ns"] = vault::dataset::now_ns().into();
    }
    if let Err(e) = std::fs::write(&path, last.to_string()) {
        tracing::warn!(path = %path.display(), error = %e, "cannot record the scrub result");
    }
}

/// Records a scrub of this site's copy.
pub(crate) fn record_scrub(
    cfg: &Config,
    name: &str,
    r: &verifier::scrub::LocalScrub,
    repaired: Option<&crate::cmd::repair::RepairReport>,
) {
    let damaged = match repaired {
        Some(rep) => rep.failed.len(),
        None => r.bad.len(),
    };
    update_last_scrub(cfg, name, |last| {
        last["time_ns"] = vault::dataset::now_ns().into();
        last["seq"] = r.seq.into();
        last["chunks"] = r.chunks.into();
        last["damaged"] = damaged.into();
        last["digest_ok"] = (r.running_digest == r.recomputed_digest).into();
    });
}

/// Records what an archive scrub left damaged.
pub(crate) fn record_archive_scrub(cfg: &Config, name: &str, damaged: usize) {
    update_last_scrub(cfg, name, |last| {
        last["archive_time_ns"] = vault::dataset::now_ns().into();
        last["archive_damaged"] = damaged.into();
    });
}
