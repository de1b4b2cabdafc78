//! `triad restore`: rebuild a dataset's tree from this site's own store.
//! Works with the daemon running or stopped: it reads the state as last
//! flushed and replays the log tail in memory.

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
    #[arg(
        long,
        short,
        env = "TRIAD_CONFIG",
        default_value = "/etc/triad/triad.toml"
    )]
    config: PathBuf,
    /// The dataset to restore.
    #[arg(long)]
    dataset: String,
    /// Target directory; must be missing or empty.
    #[arg(long)]
    to: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<ExitCode> {
    let cfg = Config::load(&a.config)?;
    let d = cfg
        .dataset(&a.dataset)
        .with_context(|| format!("dataset `{}` is not in {}", a.dataset, a.config.display()))?;
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
