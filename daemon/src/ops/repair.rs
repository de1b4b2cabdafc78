//! Good bytes for what a scrub found damaged (`triad verify --repair`, and
//! the daemon's scheduled scrub with `[verify] repair = true`).
//!
//! - In this site's copy (`--scrub --repair`, daemon stopped): each damaged
//!   chunk is fetched from this site's archive or from another site, checked
//!   against the length and BLAKE3 this site recorded for it (sealing is
//!   deterministic, so every healthy copy holds exactly those bytes), and
//!   written back through the dataset's committer.
//! - In this site's archive (`--archive --repair`): each missing or damaged
//!   chunk object is uploaded again from this site's copy, after the same
//!   check.
//!
//! Nothing is just overwritten: the damaged bytes (or why they could not be
//! read) go to `<dataset>/evidence/` locally, or under `<dataset>/evidence/`
//! in the bucket, and every repair is a line in `<dataset>/evidence/repairs.log`.

use std::io::Write;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use serde::Serialize;
use vault::{ChunkId, DatasetKey, SealedChunk, View};

use crate::config::Config;

#[derive(Debug, Default, Serialize)]
pub struct RepairReport {
    pub repaired: Vec<String>,
    pub failed: Vec<String>,
}

fn parse_id(s: &str) -> Option<ChunkId> {
    let b = hex_decode(s)?;
    Some(ChunkId(b.try_into().ok()?))
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

fn log_line(dir: &Path, line: &serde_json::Value) -> Result<()> {
    let path = dir.join("repairs.log");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{line}").with_context(|| format!("writing {}", path.display()))?;
    f.sync_all().ok();
    Ok(())
}

/// Repairs damaged chunks of this site's copy. Needs the daemon stopped.
pub fn local(
    cfg: &Config,
    name: &str,
    key: &DatasetKey,
    bad_ids: &[String],
) -> Result<RepairReport> {
    let ds = super::open_dataset(cfg, name).map_err(|e| {
        anyhow!("{e:#}; repairing this site's copy from the command line needs the daemon stopped (a running daemon repairs after its scheduled scrub with [verify] repair = true)")
    })?;
    let report = with_dataset(cfg, name, key, &ds, bad_ids);
    ds.close()?;
    report
}

/// Repairs damaged chunks of an open dataset (the daemon's own, or one the
/// command line opened).
pub fn with_dataset(
    cfg: &Config,
    name: &str,
    key: &DatasetKey,
    ds: &vault::Dataset,
    bad_ids: &[String],
) -> Result<RepairReport> {
    let evidence = cfg.dataset_dir(name).join("evidence");
    std::fs::create_dir_all(&evidence)
        .with_context(|| format!("creating {}", evidence.display()))?;
    let store = match cfg.archive_settings() {
        Ok(Some(s)) => archive::Store::open(&s.store).ok(),
        _ => None,
    };
    let rt = super::runtime()?;
    // Where the archive holds each chunk (packs or objects), read once and
    // only if a chunk is to be repaired; an archive that cannot be read is
    // skipped for the other sites.
    let mut located: Option<Option<archive::packs::Located>> = None;
    let mut report = RepairReport::default();
    for s in bad_ids {
        let Some(id) = parse_id(s) else { continue };
        let Some(meta) = ds.state().chunk_meta(&id)? else {
            report
                .failed
                .push(format!("{id}: not stored here, nothing to repair"));
            continue;
        };
        let fits = |b: &[u8]| {
            b.len() == meta.sealed_len as usize && *blake3::hash(b).as_bytes() == meta.sealed_hash
        };
        // Evidence first.
        let stamp = vault::dataset::now_ns() / 1_000_000;
        let kept = match ds.state().chunk_bytes(&id) {
            Ok(Some(b)) => {
                let p = evidence.join(format!("{id}-{stamp}.bad"));
                std::fs::write(&p, &b).with_context(|| format!("writing {}", p.display()))?;
                p.display().to_string()
            }
            Ok(None) => "no bytes were stored".to_string(),
            Err(e) => {
                let p = evidence.join(format!("{id}-{stamp}.unreadable.txt"));
                std::fs::write(&p, e.to_string())
                    .with_context(|| format!("writing {}", p.display()))?;
                format!("{} (the stored bytes could not be read; RocksDB keeps the old blob file until its garbage collection)", p.display())
            }
        };
        // Good bytes: this site's archive, then the other sites.
        let mut good: Option<(Vec<u8>, String)> = None;
        if let Some(st) = &store {
            let loc = located.get_or_insert_with(|| {
                rt.block_on(archive::packs::Located::load(st, ds.keys(), name, 4))
                    .map_err(|e| tracing::warn!(error = %e, "repair: the archive cannot be read; asking the other sites"))
                    .ok()
            });
            if let Some(loc) = loc {
                let want = vec![archive::packs::Want {
                    id,
                    plain_len: meta.plain_len,
                    hash: meta.sealed_hash,
                }];
                if let Some(archive::packs::Fetched::Good(c)) =
                    rt.block_on(loc.fetch_all(st, name, want, 1)).pop()
                {
                    if fits(&c.sealed) {
                        good = Some((c.sealed, st.url().to_string()));
                    }
                }
            }
        }
        if good.is_none() {
            // Without [tls] there is no peer address to ask.
            for (p, addr) in cfg
                .peer
                .iter()
                .filter_map(|p| Some((p, cfg.peer_addr(&p.name)?)))
            {
                if let Ok(got) = rt.block_on(replicator::follower::fetch_chunks(
                    &addr,
                    name,
                    &key.key_id(),
                    &[id],
                )) {
                    if let Some((_, b)) = got.into_iter().find(|(i, b)| *i == id && fits(b)) {
                        good = Some((b, format!("site {}", p.name)));
                        break;
                    }
                }
            }
        }
        let Some((bytes, source)) = good else {
            report.failed.push(format!(
                "{id}: no healthy copy found in this site's archive or at the other sites"
            ));
            continue;
        };
        ds.repair_chunk(SealedChunk {
            id,
            plain_len: meta.plain_len,
            sealed: bytes,
        })
        .map_err(|e| anyhow!("repairing chunk {id}: {e}"))?;
        log_line(
            &evidence,
            &serde_json::json!({
                "time_ns": vault::dataset::now_ns(), "where": "local store", "chunk": id.to_string(),
                "source": source, "evidence": kept,
            }),
        )?;
        tracing::warn!(dataset = name, chunk = %id, %source, evidence = %kept, "repaired a damaged chunk");
        report
            .repaired
            .push(format!("{id} from {source} (evidence: {kept})"));
    }
    Ok(report)
}

/// Re-uploads missing or damaged chunk objects of this site's archive from
/// this site's copy. Works beside the daemon.
pub fn archive(
    cfg: &Config,
    name: &str,
    key: &DatasetKey,
    bad_ids: &[String],
) -> Result<RepairReport> {
    let settings = cfg
        .archive_settings()
        .map_err(|(f, m)| anyhow!("{f}: {m}"))?
        .ok_or_else(|| anyhow!("no [archive] to repair"))?;
    let store = archive::Store::open(&settings.store)?;
    let rt = super::runtime()?;
    let view = View::open(&cfg.dataset_dir(name), name, key)?;
    let evidence = cfg.dataset_dir(name).join("evidence");
    std::fs::create_dir_all(&evidence)
        .with_context(|| format!("creating {}", evidence.display()))?;
    let mut report = RepairReport::default();
    for s in bad_ids {
        let Some(id) = parse_id(s) else { continue };
        let (Some(meta), Some(bytes)) = (view.chunk_meta(&id)?, view.chunk_bytes(&id)?) else {
            report
                .failed
                .push(format!("{id}: this site's copy does not hold it"));
            continue;
        };
        if bytes.len() != meta.sealed_len as usize
            || *blake3::hash(&bytes).as_bytes() != meta.sealed_hash
        {
            report
                .failed
                .push(format!("{id}: this site's copy of it is damaged too"));
            continue;
        }
        let key_name = archive::objects::chunk_key(name, &id);
        let stamp = vault::dataset::now_ns() / 1_000_000;
        // The damaged object is kept aside in the bucket before the upload.
        // A server-side copy: the damaged object may be any size.
        let aside = format!("{name}/evidence/{id}-{stamp}");
        // A chunk held only in a pack has no object to set aside: the pack
        // stays as it is, and the object uploaded now is read before it.
        let kept = if rt.block_on(store.copy_if_exists(&key_name, &aside))? {
            store.locate(&aside)
        } else {
            "no chunk object (a packed copy, if any, stays in its pack)".into()
        };
        rt.block_on(store.put_history(&key_name, bytes))?;
        log_line(
            &evidence,
            &serde_json::json!({
                "time_ns": vault::dataset::now_ns(), "where": store.locate(&key_name), "chunk": id.to_string(),
                "source": "this site's copy", "evidence": kept,
            }),
        )?;
        tracing::warn!(dataset = name, chunk = %id, evidence = %kept, "re-uploaded a damaged or missing chunk object");
        report
            .repaired
            .push(format!("{} (evidence: {kept})", store.locate(&key_name)));
    }
    Ok(report)
}
