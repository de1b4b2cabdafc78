//! `triad restore`: rebuild a dataset's tree from this site's own copy, or
//! with `--from-archive` from an object store alone, at any point in time.
//! From the site's copy it works with the daemon running or stopped: it reads
//! the state as last flushed and replays the log tail in memory. From an
//! archive it needs no daemon and no site directory at all.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use vault::{DatasetKey, View};

use crate::config::Config;
use crate::ops::restore;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    cfg: crate::cmd::ConfigPath,
    /// The dataset to restore.
    #[arg(long)]
    dataset: String,
    /// Target directory; must be missing or empty unless --delta.
    #[arg(long)]
    to: PathBuf,
    /// Bring the tree already at --to to the restored state: files already
    /// as recorded stay, chunks found in the tree are read from it instead
    /// of fetched, differing files are replaced, and every path the dataset
    /// does not hold is REMOVED from --to.
    #[arg(long)]
    delta: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Restore from this dataset directory instead of this site's copy: a
    /// divergent tail set aside at a rejoin (`<data_dir>/evidence/...`).
    #[arg(long, conflicts_with = "from_archive")]
    from_dir: Option<PathBuf>,
    /// Restore from this archive (s3://bucket/prefix or file:///dir) instead
    /// of the site's copy. Store settings come from the config's [archive]
    /// when it has one, else from the flags below and the AWS_* environment.
    #[arg(long)]
    from_archive: Option<String>,
    /// With --from-archive: `latest` (default), a seq (`1234`), or an RFC 3339
    /// time (`2026-11-27T10:00:00Z`: the last change committed by then).
    #[arg(long, default_value = "latest")]
    at: String,
    /// With --from-archive and no config: the dataset's key file.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// With --from-archive and no config: the S3 endpoint.
    #[arg(long)]
    endpoint: Option<String>,
    /// With --from-archive and no config: the S3 region.
    #[arg(long)]
    region: Option<String>,
    /// With --from-archive and no config: the credentials file.
    #[arg(long)]
    credentials_file: Option<PathBuf>,
    /// With --from-archive: chunk downloads in flight. A restore is the time
    /// to use the link fully (the daemon's `archive.concurrency` is for
    /// background work); one chunk is about 200 KiB to 4 MiB.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=1024))]
    concurrency: u16,
    /// With --from-archive and `--at latest`: fail unless the archive
    /// reaches at least this seq (another site's head, or what the writing
    /// site shipped): the check that catches a store rolled back.
    #[arg(long)]
    expect_seq: Option<u64>,
}

impl Args {
    /// What ops/restore.rs needs to read the archive at `url`.
    fn request(&self, url: &str) -> restore::FromArchive {
        restore::FromArchive {
            config: self.cfg.config.clone(),
            dataset: self.dataset.clone(),
            to: self.to.clone(),
            url: url.to_string(),
            at: self.at.clone(),
            key_file: self.key_file.clone(),
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            credentials_file: self.credentials_file.clone(),
            concurrency: usize::from(self.concurrency),
            expect_seq: self.expect_seq,
            delta: self.delta,
        }
    }
}

pub fn run(a: Args) -> Result<ExitCode> {
    if let Some(url) = a.from_archive.clone() {
        return from_archive(a, &url);
    }
    let cfg = Config::load(&a.cfg.config)?;
    let d = cfg.dataset(&a.dataset).with_context(|| {
        format!(
            "dataset `{}` is not in {}",
            a.dataset,
            a.cfg.config.display()
        )
    })?;
    let key = DatasetKey::load(&d.key_file)?;
    let started = Instant::now();
    let dir = a
        .from_dir
        .clone()
        .unwrap_or_else(|| cfg.dataset_dir(&a.dataset));
    let view = View::open(&dir, &a.dataset, &key)
        .with_context(|| format!("opening dataset `{}` at {}", a.dataset, dir.display()))?;
    // Summed as read, one entry at a time: the restore itself holds one
    // batch of the namespace, and so does this.
    let mut total = 0u64;
    for item in view.entries_iter()? {
        let (_, e) = item?;
        if !e.is_dir() {
            total += e.size;
        }
    }
    let bar = ProgressBar::new(total);
    if std::io::stderr().is_terminal() {
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} restoring [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
    } else {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    let opts = vault::restore::RestoreOptions {
        delta: a.delta,
        sparse: d.preserve().has(vault::meta::Preserve::SPARSE),
        ..vault::restore::RestoreOptions::default()
    };
    let report = vault::restore::restore_from(&view, &a.to, None, opts, &|n| bar.set_position(n))?;
    bar.finish_and_clear();
    print_report(&a, &report, started)
}

fn print_report(a: &Args, report: &vault::restore::Report, started: Instant) -> Result<ExitCode> {
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "restored dataset {} at seq {} into {}: {} files ({} of them further names of a \
             hard-linked file), {} directories, {} symlinks, {} fifos and devices, {} bytes in {:.1}s",
            a.dataset,
            report.seq,
            a.to.display(),
            report.files,
            report.hardlinks,
            report.dirs,
            report.symlinks,
            report.specials,
            report.bytes,
            started.elapsed().as_secs_f64()
        );
        if a.delta {
            println!(
                "delta: {} files were already as recorded, {} bytes were read from the existing \
                 tree instead of fetched, {} paths the dataset does not hold were removed",
                report.files_kept, report.bytes_reused, report.removed
            );
        }
        for p in &report.problems {
            println!("problem: {p}");
        }
        for n in &report.not_restored {
            println!(
                "NOT RESTORED: {} of {} paths ({}), e.g. {}",
                n.what,
                n.paths,
                n.reason,
                n.examples.join(", ")
            );
        }
        if report.expected_digest == report.restored_digest {
            let scope = if report.digest_excludes.is_empty() {
                String::new()
            } else {
                format!(
                    " (leaving out what was not restored: {})",
                    report.digest_excludes.join(", ")
                )
            };
            println!(
                "digest of the restored tree matches the recorded digest {}{scope}",
                &report.expected_digest[..16]
            );
        } else {
            println!(
                "DIGEST MISMATCH: recorded {} but the restored tree digests to {}",
                report.expected_digest, report.restored_digest
            );
        }
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn from_archive(a: Args, url: &str) -> Result<ExitCode> {
    let started = Instant::now();
    let bar = ProgressBar::new(0);
    if std::io::stderr().is_terminal() {
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} [{bar:40}] {pos}/{len} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
    } else {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    let r = restore::from_archive(&a.request(url), &|p| match p {
        archive::Progress::Chunks(done, total) => {
            bar.set_message("downloading and writing chunks");
            bar.set_length(total);
            bar.set_position(done);
        }
        archive::Progress::Records(done, total) => {
            bar.set_message("replaying the archived log");
            bar.set_length(total);
            bar.set_position(done);
        }
        // Chunks are written as they download: the bar counts chunks
        // then; bytes only when nothing is downloaded.
        archive::Progress::Written(_) if bar.message() == "downloading and writing chunks" => {}
        archive::Progress::Written(b) => {
            bar.set_message("writing files (bytes)");
            bar.set_length(bar.length().unwrap_or(0).max(b));
            bar.set_position(b);
        }
    })?;
    bar.finish_and_clear();
    if !a.json {
        println!(
            "archive {url}: dataset {} from {} plus {} archived log records, to seq {} ({}); {} chunks, {} bytes downloaded; {:.1}s snapshot, {:.1}s log replay, {:.1}s writing and checking the tree",
            a.dataset,
            r.snapshot
                .as_deref()
                .map(|s| format!("snapshot {s}"))
                .unwrap_or_else(|| "an empty dataset".into()),
            r.replayed_records,
            r.seq,
            chrono::DateTime::from_timestamp_nanos(r.time_ns).to_rfc3339(),
            r.chunks_downloaded,
            r.bytes_downloaded,
            r.seconds_snapshot,
            r.seconds_replay,
            r.seconds_write
        );
    }
    if !a.json {
        for s in &r.skipped_snapshots {
            println!("warning: skipped a newer snapshot that does not read back whole: {s}");
        }
    }
    // On stderr, JSON or not: what the archive could not prove.
    for w in &r.warnings {
        eprintln!("WARNING: {w}");
    }
    print_report(&a, &r.report, started)
}
