//! Restore drills, built the same way for `triad drill` and for the
//! daemon's `[drill] schedule`: which store, what the site expects the
//! archive to reach (what it shipped, the primary's head for the RPO), and
//! the site's checkpoints the restored history must match.

use std::path::PathBuf;

use anyhow::{anyhow, Result};
use vault::signing::EvidenceSigner;
use vault::DatasetKey;

use crate::config::{Config, Role};
use crate::status::{DatasetStatus, STALE_NS, STATUS_FILE};

/// A drill of `dataset` from `store`, at the latest point, with this site's
/// defaults: scratch under the data dir, reports in the reports dir, and,
/// when `own_archive`, at least the seq this site shipped expected and its
/// heads signed by `signer` (the site's `[evidence]` key). The caller may
/// change any field before [`run`].
pub fn spec<'a>(
    cfg: &Config,
    dataset: &'a str,
    key: &'a DatasetKey,
    store: archive::StoreConfig,
    own_archive: bool,
    checkpoints: Vec<vault::state::Checkpoint>,
    signer: Option<&EvidenceSigner>,
) -> verifier::DrillSpec<'a> {
    verifier::DrillSpec {
        dataset,
        key,
        store,
        at: archive::At::Latest,
        at_text: "latest".into(),
        scratch_parent: cfg.site.data_dir.clone(),
        reports_dir: cfg.reports_dir(),
        reference: reference(cfg, dataset),
        concurrency: 32,
        expect_seq: own_archive.then(|| shipped(cfg, dataset)).flatten(),
        checkpoints,
        // This site's own archive carries heads signed by its own key.
        head_signer: signer.filter(|_| own_archive).map(|s| s.evidence_key()),
    }
}

/// Runs the drill and writes its reports, each with its SM2 signature
/// (`<report>.sig`) when the site has an `[evidence]` key; gives the report
/// and the paths of its JSON and Markdown forms.
pub fn run(
    spec: &verifier::DrillSpec<'_>,
    rt: &tokio::runtime::Runtime,
    signer: Option<&EvidenceSigner>,
) -> Result<(verifier::DrillReport, PathBuf, PathBuf)> {
    let report = verifier::drill::run(spec, rt.handle())?;
    let (json, md) = verifier::drill::write_reports(&report, &spec.reports_dir)?;
    if let Some(signer) = signer {
        signer.sign_file(&json)?;
        signer.sign_file(&md)?;
    }
    Ok((report, json, md))
}

/// What this site's status file says it shipped to its own archive: a
/// drill of that archive must find at least as much there.
pub fn shipped(cfg: &Config, dataset: &str) -> Option<u64> {
    status_of(cfg, dataset)?
        .archive
        .map(|a| a.shipped_seq)
        .filter(|s| *s > 0)
}

/// This site's status file for `dataset`, as the daemon last wrote it.
fn status_of(cfg: &Config, dataset: &str) -> Option<DatasetStatus> {
    DatasetStatus::read(&cfg.dataset_dir(dataset).join(STATUS_FILE)).ok()
}

/// The primary's head as this site knows it, from its status file.
pub fn reference(cfg: &Config, dataset: &str) -> Option<verifier::Reference> {
    let v = status_of(cfg, dataset)?;
    let (head_seq, head_time) = (v.log.head_seq, v.log.last_commit_ns);
    let fresh = vault::dataset::now_ns() - v.updated_ns < STALE_NS;
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
            let up_head = v
                .replication
                .upstream
                .as_ref()
                .map_or(0, |u| u.upstream_head_seq)
                .max(head_seq);
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
pub fn site_checkpoints(
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
pub fn store(
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
