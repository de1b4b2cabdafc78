//! What the command line and the daemon's schedules both do, written once:
//! opening a dataset, cross-site verify, scrub then repair then record under
//! one rule, drills from one `DrillSpec`, restore from an archive, and
//! snapshots and prunes on demand.
//!
//! This layer sits between the config and intake modules below and the
//! service (runtime, checks, archiving, http, metrics) and the commands
//! above: it never imports either (layers.rs checks the arrows).

pub mod archive;
pub mod drill;
pub mod repair;
pub mod restore;
pub mod verify;

use anyhow::{Context, Result};
use vault::{Dataset, DatasetKey};

use crate::config::{Config, Role};

/// The small I/O runtime a command (or a scheduled check) drives the object
/// store and the other sites with.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the I/O runtime")
}

/// How a command reaches this site's own daemon over its replication port,
/// with this site's certificate (what admin calls need). `what` names the
/// option that needs it, for the error.
pub fn own_daemon(cfg: &Config, what: &str) -> Result<replicator::follower::UpstreamAddr> {
    let listen = cfg
        .listen
        .as_ref()
        .and_then(|l| l.replication.clone())
        .ok_or_else(|| anyhow::anyhow!("{what} needs listen.replication in the config"))?;
    let tls = cfg
        .tls_files()
        .ok_or_else(|| anyhow::anyhow!("{what} needs [tls] with this site's certificate"))?;
    // A wildcard listen address is reached on loopback.
    let address = listen
        .replace("0.0.0.0:", "127.0.0.1:")
        .replace("[::]:", "[::1]:");
    Ok(replicator::follower::UpstreamAddr {
        name: cfg.site.name.clone(),
        address,
        tls,
    })
}

/// The key of a configured dataset.
pub fn dataset_key(cfg: &Config, name: &str) -> Result<DatasetKey> {
    let d = cfg
        .dataset(name)
        .with_context(|| format!("dataset `{name}` is not in the config"))?;
    DatasetKey::load(&d.key_file).with_context(|| format!("dataset `{name}`: loading its key"))
}

/// Opens a dataset for the daemon, turning key problems into clear errors.
pub fn open_dataset(cfg: &Config, name: &str) -> Result<Dataset> {
    open_dataset_fenced(cfg, name, vault::Fence::default())
}

/// As [`open_dataset`], with `fence` in force from the first moment (a
/// site of a takeover group opens fenced, with the agreed epochs).
pub fn open_dataset_fenced(cfg: &Config, name: &str, fence: vault::Fence) -> Result<Dataset> {
    let key = dataset_key(cfg, name)?;
    let opts = vault::Options {
        release_pins: cfg.site.role == Role::Primary,
        segment_bytes: cfg.segment_bytes(),
        fence,
        ..vault::Options::default()
    };
    let ds = Dataset::open(&cfg.dataset_dir(name), name, &key, opts).with_context(|| {
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
        head = ds.head_seq(),
        "dataset open"
    );
    Ok(ds)
}
