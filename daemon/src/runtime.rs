//! The site runtime: opens every configured dataset, runs its source, keeps
//! its status file current, and stops cleanly on SIGTERM or SIGINT (a second
//! signal aborts at once).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use vault::{Dataset, DatasetKey};

use crate::config::{Config, Role};
use crate::source::{DirSource, Stats, StatsView};

/// What `status.json` in each dataset directory holds.
#[derive(Serialize)]
pub struct DatasetStatus {
    pub dataset: String,
    pub site: String,
    pub role: &'static str,
    pub pid: u32,
    pub updated_ns: i64,
    pub log: vault::Status,
    pub source: StatsView,
    pub failure: Option<String>,
}

pub const STATUS_FILE: &str = "status.json";

/// Opens a dataset for the daemon, turning key problems into clear errors.
pub fn open_dataset(cfg: &Config, name: &str) -> Result<Dataset> {
    let d = cfg
        .dataset(name)
        .with_context(|| format!("dataset `{name}` is not in the config"))?;
    let key = DatasetKey::load(&d.key_file)
        .with_context(|| format!("dataset `{name}`: loading its key"))?;
    let ds = Dataset::open(
        &cfg.dataset_dir(name),
        name,
        &key,
        vault::Options::default(),
    )
    .with_context(|| {
        format!(
            "dataset `{name}`: opening {}",
            cfg.dataset_dir(name).display()
        )
    })?;
    let rec = ds.recovery();
    tracing::info!(
        dataset = name,
        segments = rec.segments,
        records = rec.records,
        replayed = ds.replayed(),
        torn_tail = rec.truncated.is_some(),
        head = ds.status().head_seq,
        "dataset open"
    );
    Ok(ds)
}

fn write_status(path: &Path, st: &DatasetStatus) {
    if let Ok(body) = serde_json::to_vec_pretty(st) {
        if let Err(e) = vault::dataset::write_replace(path, &body, false) {
            tracing::warn!(error = %e, "cannot write status file");
        }
    }
}

/// Runs the daemon until a stop signal; returns once everything is closed.
pub fn run(cfg: Config) -> Result<()> {
    if cfg.site.role == Role::Follower {
        bail!("site.role = \"follower\": replication is not available in this version; run this site as the primary");
    }
    let unused = cfg.unused_sections();
    if !unused.is_empty() {
        tracing::warn!(sections = ?unused, "these config sections are checked but not used by this version");
    }
    std::fs::create_dir_all(&cfg.site.data_dir)
        .with_context(|| format!("creating site.data_dir {}", cfg.site.data_dir.display()))?;

    let stop = Arc::new(AtomicBool::new(false));
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("installing signal handlers")?;
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            for sig in signals.forever() {
                if stop.swap(true, Ordering::AcqRel) {
                    tracing::warn!(
                        signal = sig,
                        "second stop signal: exiting without a clean stop"
                    );
                    std::process::exit(130);
                }
                tracing::info!(
                    signal = sig,
                    "stopping: finishing the current round and closing the log"
                );
            }
        });
    }

    // Open every dataset first: a wrong key or a damaged log stops the start
    // before any source begins.
    let mut running: Vec<(Arc<Dataset>, Arc<Stats>, PathBuf)> = Vec::new();
    for d in &cfg.dataset {
        let ds = Arc::new(open_dataset(&cfg, &d.name)?);
        running.push((
            ds,
            Arc::new(Stats::default()),
            cfg.dataset_dir(&d.name).join(STATUS_FILE),
        ));
    }
    let mut threads = Vec::new();
    for ((ds, stats, _), d) in running.iter().zip(&cfg.dataset) {
        let Some(settings) = d.directory() else {
            continue;
        };
        let src = DirSource::new(settings, ds.clone(), stats.clone(), stop.clone())
            .with_context(|| format!("dataset `{}`", d.name))?;
        let (name, stop_all) = (d.name.clone(), stop.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("source-{name}"))
                .spawn(move || {
                    let r = src.run();
                    if let Err(e) = &r {
                        tracing::error!(dataset = %name, error = %e, "source stopped");
                        stop_all.store(true, Ordering::Release);
                    }
                    r
                })
                .context("starting source thread")?,
        );
    }
    tracing::info!(site = %cfg.site.name, datasets = running.len(), "triad is running");
    while !stop.load(Ordering::Acquire) {
        for (ds, stats, path) in &running {
            write_status(path, &status_of(&cfg, ds, stats));
            if ds.failure().is_some() {
                stop.store(true, Ordering::Release);
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let mut failed = None;
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed = Some(e.to_string()),
            Err(_) => failed = Some("a source thread panicked".into()),
        }
    }
    for (ds, stats, path) in &running {
        if let Some(f) = ds.failure() {
            failed = Some(f);
        }
        ds.close()
            .with_context(|| format!("closing dataset `{}`", ds.name()))?;
        write_status(path, &status_of(&cfg, ds, stats));
    }
    if let Some(f) = failed {
        bail!("stopped because of an error: {f}");
    }
    tracing::info!("stopped cleanly");
    Ok(())
}

fn status_of(cfg: &Config, ds: &Dataset, stats: &Stats) -> DatasetStatus {
    DatasetStatus {
        dataset: ds.name().to_string(),
        site: cfg.site.name.clone(),
        role: match cfg.site.role {
            Role::Primary => "primary",
            Role::Follower => "follower",
        },
        pid: std::process::id(),
        updated_ns: vault::dataset::now_ns(),
        log: ds.status(),
        source: stats.view(),
        failure: ds.failure(),
    }
}
