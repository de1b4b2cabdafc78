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

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub(crate) cfg: crate::cmd::ConfigPath,
    /// The dataset to restore.
    #[arg(long)]
    pub(crate) dataset: String,
    /// Target directory; must be missing or empty.
    #[arg(long)]
    pub(crate) to: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
    /// Restore from this archive (s3://bucket/prefix or file:///dir) instead
    /// of the site's copy. Store settings come from the config's [archive]
    /// when it has one, else from the flags below and the AWS_* environment.
    #[arg(long)]
    pub(crate) from_archive: Option<String>,
    /// With --from-archive: `latest` (default), a seq (`1234`), or an RFC 3339
    /// time (`2026-11-27T10:00:00Z`: the last change committed by then).
    #[arg(long, default_value = "latest")]
    pub(crate) at: String,
    /// With --from-archive and no config: the dataset's key file.
    #[arg(long)]
    pub(crate) key_file: Option<PathBuf>,
    /// With --from-archive and no config: the S3 endpoint.
    #[arg(long)]
    pub(crate) endpoint: Option<String>,
    /// With --from-archive and no config: the S3 region.
    #[arg(long)]
    pub(crate) region: Option<String>,
    /// With --from-archive and no config: the credentials file.
    #[arg(long)]
    pub(crate) credentials_file: Option<PathBuf>,
    /// With --from-archive: chunk downloads in flight. A restore is the time
    /// to use the link fully (the daemon's `archive.concurrency` is for
    /// background work); one chunk is about 200 KiB to 4 MiB.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub(crate) concurrency: u16,
    /// With --from-archive and `--at latest`: fail unless the archive
    /// reaches at least this seq (another site's head, or what the writing
    /// site shipped): the check that catches a store rolled back.
    #[arg(long)]
    pub(crate) expect_seq: Option<u64>,
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
    let view = View::open(&cfg.dataset_dir(&a.dataset), &a.dataset, &key)
        .with_context(|| format!("opening dataset `{}`", a.dataset))?;
    let total: u64 = view
        .entries()?
        .iter()
        .map(|(_, e)| if e.is_dir() { 0 } else { e.size })
        .sum();
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
    let report = vault::restore::restore(&view, &a.to, &|n| bar.set_position(n))?;
    bar.finish_and_clear();
    print_report(&a, &report, started)
}

fn print_report(a: &Args, report: &vault::restore::Report, started: Instant) -> Result<ExitCode> {
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "restored dataset {} at seq {} into {}: {} files, {} directories, {} symlinks, {} bytes in {:.1}s",
            a.dataset,
            report.seq,
            a.to.display(),
            report.files,
            report.dirs,
            report.symlinks,
            report.bytes,
            started.elapsed().as_secs_f64()
        );
        for p in &report.problems {
            println!("problem: {p}");
        }
        if report.expected_digest == report.restored_digest {
            println!(
                "digest of the restored tree matches the recorded digest {}",
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
    let r = restore_from_archive(&a, url, true)?;
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

/// Restores `a.dataset` from the archive at `url` into `a.to` (with a
/// progress bar on a terminal when `show_progress`).
pub(crate) fn restore_from_archive(
    a: &Args,
    url: &str,
    show_progress: bool,
) -> Result<archive::ArchiveRestore> {
    let at: archive::At = a.at.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    let (store, key, store_cfg) = open_archive(a, url)?;
    let rt = crate::cmd::archive::runtime()?;
    let bar = ProgressBar::new(0);
    if show_progress && std::io::stderr().is_terminal() {
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} [{bar:40}] {pos}/{len} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
    } else {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    let restorer = archive::Restorer {
        rt: rt.handle(),
        store: &store,
        dataset: &a.dataset,
        key: &key,
        concurrency: store_cfg.concurrency,
        expect_seq: a.expect_seq,
        checkpoints: &[],
    };
    let progress = |p: archive::Progress| match p {
        archive::Progress::Chunks(done, total) => {
            bar.set_message("downloading chunks");
            bar.set_length(total);
            bar.set_position(done);
        }
        archive::Progress::Records(done, total) => {
            bar.set_message("replaying the archived log");
            bar.set_length(total);
            bar.set_position(done);
        }
        archive::Progress::Written(b) => {
            bar.set_message("writing files (bytes)");
            bar.set_length(bar.length().unwrap_or(0).max(b));
            bar.set_position(b);
        }
    };
    let r = restorer
        .restore(at, &a.to, &progress)
        .with_context(|| format!("restoring dataset `{}` from {url}", a.dataset))?;
    bar.finish_and_clear();
    Ok(r)
}

/// The store and dataset key for reading the archive at `url`: from the
/// config when there is one, overridden by the flags.
pub(crate) fn open_archive(
    a: &Args,
    url: &str,
) -> Result<(archive::Store, DatasetKey, archive::StoreConfig)> {
    crate::cmd::archive::check_restore_args(url)?;
    // The config, when there is one, gives the key and the store settings.
    let cfg = if a.cfg.config.exists() {
        Some(Config::load(&a.cfg.config)?)
    } else {
        None
    };
    let key_file = match (&a.key_file, &cfg) {
        (Some(k), _) => k.clone(),
        (None, Some(c)) => c
            .dataset(&a.dataset)
            .with_context(|| {
                format!(
                    "dataset `{}` is not in {}; pass --key-file",
                    a.dataset,
                    a.cfg.config.display()
                )
            })?
            .key_file
            .clone(),
        (None, None) => anyhow::bail!(
            "no config at {} and no --key-file: the dataset key is needed to read the archive",
            a.cfg.config.display()
        ),
    };
    let key = DatasetKey::load(&key_file)?;
    let mut store_cfg = match cfg.as_ref().map(|c| c.archive_settings()) {
        Some(Ok(Some(s))) => s.store,
        Some(Err((f, m))) => anyhow::bail!("{}: {f}: {m}", a.cfg.config.display()),
        _ => archive::StoreConfig::new(url),
    };
    store_cfg.url = url.to_string();
    if a.endpoint.is_some() {
        store_cfg.endpoint = a.endpoint.clone();
    }
    if a.region.is_some() {
        store_cfg.region = a.region.clone();
    }
    if a.credentials_file.is_some() {
        store_cfg.credentials_file = a.credentials_file.clone();
    }
    store_cfg.concurrency = usize::from(a.concurrency);
    let store = archive::Store::open(&store_cfg)?;
    Ok((store, key, store_cfg))
}
