//! `triad drill`: restore a dataset from an archive into a scratch
//! directory, verify it, measure RTO and RPO, and write the reports an
//! auditor reads (verifier/src/drill.rs). Exits 1 when a drill fails.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Result};
use vault::DatasetKey;

use crate::config::{Config, Role};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: crate::cmd::Datasets,
    /// The archive to restore (s3://bucket/prefix or file:///dir); default
    /// this site's [archive]. Another site's archive takes its URL here and
    /// its endpoint and credentials from --endpoint / --credentials-file.
    #[arg(long)]
    from_archive: Option<String>,
    #[arg(long)]
    endpoint: Option<String>,
    #[arg(long)]
    credentials_file: Option<PathBuf>,
    /// `latest`, a seq, or an RFC 3339 time.
    #[arg(long, default_value = "latest")]
    at: String,
    /// Where the reports go; default [drill] reports_dir, else <data_dir>/reports.
    #[arg(long)]
    reports: Option<PathBuf>,
    /// Where the scratch directory is made; default <data_dir>.
    #[arg(long)]
    scratch: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Fail the drill unless the archive reaches at least this seq (another
    /// site's head): the check that catches a store rolled back. A drill of
    /// this site's own archive expects at least what this site shipped.
    #[arg(long)]
    expect_seq: Option<u64>,
}

/// What this site's status file says it shipped to its own archive: a
/// drill of that archive must find at least as much there.
pub(crate) fn shipped(cfg: &Config, dataset: &str) -> Option<u64> {
    status_of(cfg, dataset)?["archive"]["shipped_seq"]
        .as_u64()
        .filter(|s| *s > 0)
}

/// This site's status file for `dataset`, as the daemon last wrote it.
fn status_of(cfg: &Config, dataset: &str) -> Option<serde_json::Value> {
    let b = std::fs::read(cfg.dataset_dir(dataset).join(crate::status::STATUS_FILE)).ok()?;
    serde_json::from_slice(&b).ok()
}

/// The primary's head as this site knows it, from its status file.
pub(crate) fn reference(cfg: &Config, dataset: &str) -> Option<verifier::Reference> {
    let v = status_of(cfg, dataset)?;
    let head_seq = v["log"]["head_seq"].as_u64()?;
    let head_time = v["log"]["last_commit_ns"].as_i64()?;
    let fresh = vault::dataset::now_ns() - v["updated_ns"].as_i64().unwrap_or(0) < 10_000_000_000;
    let staleness = if fresh {
        ""
    } else {
        ", from a status file the daemon no longer updates"
    };
    Some(match cfg.site.role {
        Role::Primary => verifier::Reference {
            head_seq,
            head_time_ns: head_time,
            source: format!("the primary {}{staleness}", cfg.site.name),
        },
        Role::Follower => {
            let up = &v["replication"]["upstream"];
            let up_head = up["upstream_head_seq"].as_u64().unwrap_or(0).max(head_seq);
            if up_head == head_seq {
                // In step with the upstream: this site's head is the primary's.
                verifier::Reference {
                    head_seq,
                    head_time_ns: head_time,
                    source: format!("{}, in step with its upstream{staleness}", cfg.site.name),
                }
            } else {
                // Behind: the upstream's head time is not known here; now is
                // an upper bound, so the RPO reported is never too small.
                verifier::Reference {
                    head_seq: up_head,
                    head_time_ns: vault::dataset::now_ns(),
                    source: format!(
                        "{}, {} records behind its upstream: RPO measured against now, an upper bound{staleness}",
                        cfg.site.name,
                        up_head - head_seq
                    ),
                }
            }
        }
    })
}

/// This site's checkpoints of `dataset`, read beside a running daemon; none
/// when the site holds no copy (a drill of another site's archive from a
/// host without the dataset).
fn site_checkpoints(
    cfg: &Config,
    dataset: &str,
    key: &DatasetKey,
) -> Vec<vault::state::Checkpoint> {
    let dir = cfg.dataset_dir(dataset);
    if !dir.exists() {
        return Vec::new();
    }
    match vault::View::open(&dir, dataset, key).and_then(|v| v.state().checkpoints()) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(dataset, error = %e, "this site's checkpoints could not be read; the drill compares the archive with none");
            Vec::new()
        }
    }
}

/// The store a drill restores: `url` (with this site's `[archive]` settings
/// as the base) or this site's own archive; `endpoint` and
/// `credentials_file` override.
pub(crate) fn drill_store(
    cfg: &Config,
    url: Option<&str>,
    endpoint: Option<String>,
    credentials_file: Option<PathBuf>,
) -> Result<archive::StoreConfig> {
    let own = cfg
        .archive_settings()
        .map_err(|(f, m)| anyhow!("{f}: {m}"))?;
    let mut store = match (url, own) {
        (Some(url), own) => {
            let mut s = own
                .map(|o| o.store)
                .unwrap_or_else(|| archive::StoreConfig::new(url));
            s.url = url.to_string();
            s
        }
        (None, Some(own)) => own.store,
        (None, None) => {
            return Err(anyhow!(
                "no [archive] here: give the archive to drill (--from-archive or drill.url)"
            ))
        }
    };
    if endpoint.is_some() {
        store.endpoint = endpoint;
    }
    if credentials_file.is_some() {
        store.credentials_file = credentials_file;
    }
    Ok(store)
}

pub fn run(a: Args) -> Result<ExitCode> {
    let (cfg, names) = a.target.load()?;
    let at: archive::At = a.at.parse().map_err(|e: String| anyhow!(e))?;
    let store = drill_store(
        &cfg,
        a.from_archive.as_deref(),
        a.endpoint.clone(),
        a.credentials_file.clone(),
    )
    .map_err(|e| anyhow!("{}: {e}", a.target.cfg.config.display()))?;
    let reports = a.reports.clone().unwrap_or_else(|| cfg.reports_dir());
    let scratch = a
        .scratch
        .clone()
        .unwrap_or_else(|| cfg.site.data_dir.clone());
    let rt = crate::cmd::archive::runtime()?;
    let mut all_passed = true;
    for name in names {
        let d = cfg
            .dataset(&name)
            .ok_or_else(|| anyhow!("dataset `{name}` is not in the config"))?;
        let key = DatasetKey::load(&d.key_file)?;
        let spec = verifier::DrillSpec {
            dataset: &name,
            key: &key,
            store: store.clone(),
            at,
            at_text: a.at.clone(),
            scratch_parent: scratch.clone(),
            reports_dir: reports.clone(),
            reference: reference(&cfg, &name),
            concurrency: 32,
            expect_seq: a.expect_seq.or_else(|| {
                a.from_archive
                    .is_none()
                    .then(|| shipped(&cfg, &name))
                    .flatten()
            }),
            checkpoints: site_checkpoints(&cfg, &name, &key),
        };
        let report = verifier::drill::run(&spec, rt.handle())?;
        let (json_path, md_path) = verifier::drill::write_reports(&report, &reports)?;
        all_passed &= report.passed();
        if a.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            println!(
                "drill of dataset {name} from {}: {} — seq {} restored, {} files, {} bytes; RTO {:.1} s; RPO {}",
                report.archive,
                report.result.to_uppercase(),
                report.restored_seq,
                report.files,
                report.bytes,
                report.rto_seconds,
                report
                    .rpo_seconds
                    .map(|r| format!("{r:.1} s"))
                    .unwrap_or_else(|| "not measured".into())
            );
            if let Some(e) = &report.error {
                println!("  why: {e}");
            }
            println!(
                "  reports: {} and {}",
                json_path.display(),
                md_path.display()
            );
        }
    }
    Ok(if all_passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
