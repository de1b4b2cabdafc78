//! Restore drills: the proof an auditor asks for that an archive restores.
//!
//! A drill restores a dataset from an archive (by default this site's own)
//! into a scratch directory with the same code an operator would use in a
//! disaster (`archive::Restorer`: every chunk checked against its id, the
//! tree's digest against the recorded one), measures
//!
//! - RTO: wall time from the start to a verified restore, and
//! - RPO: how far the restored point's commit time is behind the primary's
//!   head at the time of the drill (the reference the caller supplies),
//!
//! writes `drill-<dataset>-<time>.json` and `.md` into the reports
//! directory, plus `latest-<dataset>.json` (the newest result, for
//! monitoring), and removes the scratch directory. A failing drill is a
//! report with `result = "failed"` and the reason, never a crash.

use std::path::{Path, PathBuf};
use std::time::Instant;

use archive::{At, Restorer, Store, StoreConfig};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use vault::DatasetKey;

#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    #[error("{context}: {path}: {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The primary's head, against which RPO is measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reference {
    pub head_seq: u64,
    pub head_time_ns: i64,
    /// Where the figure comes from, e.g. "the primary zjk-a".
    pub source: String,
}

/// What to drill.
pub struct DrillSpec<'a> {
    pub dataset: &'a str,
    pub key: &'a DatasetKey,
    pub store: StoreConfig,
    pub at: At,
    pub at_text: String,
    /// The scratch directory is made (and removed) inside this one.
    pub scratch_parent: PathBuf,
    pub reports_dir: PathBuf,
    pub reference: Option<Reference>,
    pub concurrency: usize,
    /// The archive must reach at least this seq (`--expect-seq`): less is
    /// a rollback and fails the drill.
    pub expect_seq: Option<u64>,
    /// The drilling site's own checkpoints of the dataset: the restored
    /// history must agree with each one it covers, and each must carry
    /// valid HMAC-SM3 evidence.
    pub checkpoints: Vec<vault::state::Checkpoint>,
    /// The key that signs the drilled archive's heads, when the drill
    /// knows it (a site drilling its own archive with `[evidence]` set):
    /// a head it did not sign fails the drill.
    pub head_signer: Option<vault::signing::EvidenceKey>,
}

/// A drill's outcome, as written to the JSON report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrillReport {
    pub dataset: String,
    pub archive: String,
    pub at: String,
    pub started: String,
    pub finished: String,
    /// "passed" or "failed".
    pub result: String,
    pub error: Option<String>,
    pub restored_seq: u64,
    pub restored_time: Option<String>,
    pub snapshot: Option<String>,
    pub replayed_records: u64,
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    pub bytes: u64,
    pub bytes_downloaded: u64,
    pub expected_digest: String,
    pub restored_digest: String,
    pub problems: Vec<String>,
    /// Metadata the drill's restore was not allowed to put back (owners,
    /// when the drill does not run as root), per kind; the digests then
    /// leave those kinds out (`digest_excludes`).
    #[serde(default)]
    pub not_restored: Vec<vault::meta::NotRestored>,
    #[serde(default)]
    pub digest_excludes: Vec<String>,
    pub skipped_snapshots: Vec<String>,
    /// The archive's authenticated head, when it has one.
    #[serde(default)]
    pub archive_head_seq: Option<u64>,
    /// The fingerprint of the SM2 key whose signature on that head the
    /// drill checked; null when it checked none.
    #[serde(default)]
    pub archive_head_signed_by: Option<String>,
    /// What the restore could not prove (see `ArchiveRestore::warnings`).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// How many of the site's own checkpoints the restored history
    /// covered and matched.
    #[serde(default)]
    pub checkpoints_compared: u64,
    /// Wall time to a verified restore.
    pub rto_seconds: f64,
    /// Primary head time minus the restored point's time; absent without a
    /// reference.
    pub rpo_seconds: Option<f64>,
    pub reference: Option<Reference>,
    pub phases_seconds: Phases,
    pub scratch_removed: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Phases {
    pub snapshot: f64,
    pub replay: f64,
    pub write: f64,
}

impl DrillReport {
    pub fn passed(&self) -> bool {
        self.result == "passed"
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Runs a drill. Failures of the restore are in the report; only failing to
/// make the scratch directory is an error.
pub fn run(spec: &DrillSpec<'_>, rt: &tokio::runtime::Handle) -> Result<DrillReport, DrillError> {
    let started_at = Utc::now();
    let started = Instant::now();
    std::fs::create_dir_all(&spec.scratch_parent).map_err(|e| DrillError::Io {
        context: "creating the drill's scratch parent",
        path: spec.scratch_parent.clone(),
        source: e,
    })?;
    let scratch = tempfile::Builder::new()
        .prefix(".triad-drill-")
        .tempdir_in(&spec.scratch_parent)
        .map_err(|e| DrillError::Io {
            context: "creating the drill's scratch directory in",
            path: spec.scratch_parent.clone(),
            source: e,
        })?;
    let mut report = DrillReport {
        dataset: spec.dataset.to_string(),
        archive: spec.store.url.clone(),
        at: spec.at_text.clone(),
        started: rfc3339(started_at),
        finished: String::new(),
        result: "failed".into(),
        error: None,
        restored_seq: 0,
        restored_time: None,
        snapshot: None,
        replayed_records: 0,
        files: 0,
        directories: 0,
        symlinks: 0,
        bytes: 0,
        bytes_downloaded: 0,
        expected_digest: String::new(),
        restored_digest: String::new(),
        problems: Vec::new(),
        not_restored: Vec::new(),
        digest_excludes: Vec::new(),
        skipped_snapshots: Vec::new(),
        archive_head_seq: None,
        archive_head_signed_by: None,
        warnings: Vec::new(),
        checkpoints_compared: 0,
        rto_seconds: 0.0,
        rpo_seconds: None,
        reference: spec.reference.clone(),
        phases_seconds: Phases::default(),
        scratch_removed: false,
    };
    let outcome = Store::open(&spec.store).and_then(|store| {
        Restorer {
            rt,
            store: &store,
            dataset: spec.dataset,
            key: spec.key,
            concurrency: spec.concurrency,
            expect_seq: spec.expect_seq,
            checkpoints: &spec.checkpoints,
            delta: false,
            head_signer: spec.head_signer.as_ref(),
        }
        .restore(spec.at, &scratch.path().join("restored"), &|_| {})
    });
    report.rto_seconds = started.elapsed().as_secs_f64();
    match outcome {
        Ok(r) => {
            report.restored_seq = r.seq;
            report.restored_time = Some(rfc3339(DateTime::from_timestamp_nanos(r.time_ns)));
            report.snapshot = r.snapshot;
            report.replayed_records = r.replayed_records;
            report.files = r.report.files;
            report.directories = r.report.dirs;
            report.symlinks = r.report.symlinks;
            report.bytes = r.report.bytes;
            report.bytes_downloaded = r.bytes_downloaded;
            report.expected_digest = r.report.expected_digest.clone();
            report.restored_digest = r.report.restored_digest.clone();
            report.problems = r.report.problems.clone();
            report.not_restored = r.report.not_restored.clone();
            report.digest_excludes = r.report.digest_excludes.clone();
            report.skipped_snapshots = r.skipped_snapshots;
            report.archive_head_seq = r.head_seq;
            report.archive_head_signed_by = r.head_signed_by.clone();
            report.warnings = r.warnings;
            report.checkpoints_compared = r.checkpoints_compared;
            report.phases_seconds = Phases {
                snapshot: r.seconds_snapshot,
                replay: r.seconds_replay,
                write: r.seconds_write,
            };
            report.rpo_seconds = spec
                .reference
                .as_ref()
                .map(|rf| (rf.head_time_ns - r.time_ns).max(0) as f64 / 1e9);
            if r.report.ok() {
                report.result = "passed".into();
            } else if report.expected_digest != report.restored_digest {
                report.error = Some(format!(
                    "the restored tree digests to {}, the archive recorded {}",
                    report.restored_digest, report.expected_digest
                ));
            } else {
                report.error = Some(format!(
                    "{} paths could not be restored faithfully",
                    report.problems.len()
                ));
            }
        }
        Err(e) => report.error = Some(e.to_string()),
    }
    report.finished = rfc3339(Utc::now());
    let scratch_path = scratch.path().to_path_buf();
    match scratch.close() {
        Ok(()) => report.scratch_removed = true,
        Err(e) => {
            tracing::warn!(path = %scratch_path.display(), error = %e, "cannot remove the drill's scratch directory")
        }
    }
    Ok(report)
}

/// Writes the JSON and Markdown reports and `latest-<dataset>.json`;
/// returns the paths of the first two.
pub fn write_reports(r: &DrillReport, dir: &Path) -> Result<(PathBuf, PathBuf), DrillError> {
    let io = |context: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |e| DrillError::Io {
            context,
            path,
            source: e,
        }
    };
    std::fs::create_dir_all(dir).map_err(io("creating the reports directory", dir))?;
    let stamp = r.started.replace([':', '.'], "-");
    let json_path = dir.join(format!("drill-{}-{stamp}.json", r.dataset));
    let md_path = dir.join(format!("drill-{}-{stamp}.md", r.dataset));
    let json = serde_json::to_vec_pretty(r).unwrap_or_default();
    std::fs::write(&json_path, &json).map_err(io("writing a drill report", &json_path))?;
    std::fs::write(&md_path, markdown(r)).map_err(io("writing a drill report", &md_path))?;
    let latest = dir.join(format!("latest-{}.json", r.dataset));
    let tmp = dir.join(format!(".latest-{}.json.tmp", r.dataset));
    std::fs::write(&tmp, &json)
        .and_then(|_| std::fs::rename(&tmp, &latest))
        .map_err(io("writing the latest drill result", &latest))?;
    Ok((json_path, md_path))
}

/// The human-readable report.
pub fn markdown(r: &DrillReport) -> String {
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let mut s = String::new();
    s.push_str(&format!(
        "# Restore drill: dataset `{}` — {}\n\n",
        r.dataset,
        r.result.to_uppercase()
    ));
    s.push_str("| | |\n|---|---|\n");
    let rows: Vec<(&str, String)> = vec![
        ("Archive", format!("`{}`", r.archive)),
        ("Point asked for", format!("`{}`", r.at)),
        (
            "Restored point",
            format!("seq {} ({})", r.restored_seq, opt(&r.restored_time)),
        ),
        (
            "From",
            r.snapshot
                .as_deref()
                .map(|s| {
                    format!(
                        "snapshot `{s}` + {} archived log records",
                        r.replayed_records
                    )
                })
                .unwrap_or_else(|| {
                    format!("the archived log alone ({} records)", r.replayed_records)
                }),
        ),
        ("Started", r.started.clone()),
        ("Finished", r.finished.clone()),
        (
            "RTO (wall time to a verified restore)",
            format!("{:.1} s", r.rto_seconds),
        ),
        (
            "RPO (primary head time − restored point)",
            match (&r.rpo_seconds, &r.reference) {
                (Some(rpo), Some(rf)) => format!(
                    "{rpo:.1} s (reference: seq {} at {}, {})",
                    rf.head_seq,
                    rfc3339(DateTime::from_timestamp_nanos(rf.head_time_ns)),
                    rf.source
                ),
                _ => "not measured (no reference head)".into(),
            },
        ),
        (
            "Files / directories / symlinks",
            format!("{} / {} / {}", r.files, r.directories, r.symlinks),
        ),
        (
            "Archive head (authenticated)",
            match r.archive_head_seq {
                Some(s) => format!("seq {s}"),
                None => "none: a removal of the newest objects could not be noticed".into(),
            },
        ),
        (
            "Archive head signed by",
            r.archive_head_signed_by
                .clone()
                .unwrap_or_else(|| "not checked".into()),
        ),
        (
            "This site's checkpoints matched (HMAC-SM3 checked)",
            r.checkpoints_compared.to_string(),
        ),
        ("Bytes restored", r.bytes.to_string()),
        ("Bytes downloaded", r.bytes_downloaded.to_string()),
        (
            "Digest recorded",
            if r.digest_excludes.is_empty() {
                format!("`{}`", r.expected_digest)
            } else {
                format!(
                    "`{}` (without {}, which the restore could not put back)",
                    r.expected_digest,
                    r.digest_excludes.join(", ")
                )
            },
        ),
        (
            "Digest of the restored tree",
            format!("`{}`", r.restored_digest),
        ),
        (
            "Phases",
            format!(
                "snapshot {:.1} s, log replay {:.1} s, writing and checking {:.1} s",
                r.phases_seconds.snapshot, r.phases_seconds.replay, r.phases_seconds.write
            ),
        ),
    ];
    for (k, v) in rows {
        s.push_str(&format!("| {k} | {v} |\n"));
    }
    if let Some(e) = &r.error {
        s.push_str(&format!("\n## Why it failed\n\n{e}\n"));
    }
    if !r.problems.is_empty() {
        s.push_str("\n## Problems\n\n");
        for p in &r.problems {
            s.push_str(&format!("- {p}\n"));
        }
    }
    if !r.not_restored.is_empty() {
        s.push_str("\n## Not restored\n\n");
        for n in &r.not_restored {
            s.push_str(&format!(
                "- {} of {} paths ({}), e.g. {}\n",
                n.what,
                n.paths,
                n.reason,
                n.examples.join(", ")
            ));
        }
    }
    if !r.warnings.is_empty() {
        s.push_str("\n## Warnings\n\n");
        for w in &r.warnings {
            s.push_str(&format!("- {w}\n"));
        }
    }
    if !r.skipped_snapshots.is_empty() {
        s.push_str("\n## Snapshots skipped as damaged\n\n");
        for p in &r.skipped_snapshots {
            s.push_str(&format!("- {p}\n"));
        }
    }
    if r.passed() {
        s.push_str(
            "\nEvery chunk was checked against its id (SM4-GCM tag and keyed BLAKE3) while \
             writing, and the restored tree's namespace digest was compared with the one the \
             archive recorded.",
        );
    } else {
        s.push_str("\nThe restore did not complete as a verified copy: see above.");
    }
    s.push_str(if r.scratch_removed {
        " The scratch directory was removed.\n"
    } else {
        " The scratch directory could NOT be removed (see the log).\n"
    });
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_names_what_the_restore_could_not_put_back() {
        let r: DrillReport = serde_json::from_value(serde_json::json!({
            "dataset": "files", "archive": "s3://a/b", "at": "latest",
            "started": "", "finished": "", "result": "passed", "error": null,
            "restored_seq": 9, "restored_time": null, "snapshot": null,
            "replayed_records": 0, "files": 1, "directories": 0, "symlinks": 0,
            "bytes": 1, "bytes_downloaded": 1,
            "expected_digest": "ab", "restored_digest": "ab", "problems": [],
            "not_restored": [{"what": "owner", "paths": 3, "examples": ["a", "b"],
                              "reason": "the restore did not run as root"}],
            "digest_excludes": ["owner"],
            "skipped_snapshots": [], "rto_seconds": 1.0, "rpo_seconds": null,
            "reference": null,
            "phases_seconds": {"snapshot": 0.0, "replay": 0.0, "write": 0.0},
            "scratch_removed": true
        }))
        .unwrap();
        let md = markdown(&r);
        assert!(md.contains("## Not restored"), "{md}");
        assert!(
            md.contains("- owner of 3 paths (the restore did not run as root), e.g. a, b"),
            "{md}"
        );
        assert!(
            md.contains("(without owner, which the restore could not put back)"),
            "{md}"
        );
    }
}
