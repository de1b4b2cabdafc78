//! Snapshots and prunes on demand, whoever asks: what can be asked and the
//! answer (the same for a request file, an Admin call and the work done
//! here), asking a site's daemon over its replication port, and doing the
//! work in this process when no daemon holds the dataset.

use std::sync::Arc;

use anyhow::{Context, Result};
use archive::{Archiver, PruneReport, SnapshotReport, Store};
use serde::{Deserialize, Serialize};

use crate::config::{ArchiveSettings, Config};

/// What can be asked of a dataset's archive on demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Snapshot,
    Prune,
}

impl Kind {
    /// As request files and Admin calls name it.
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "snapshot" => Some(Kind::Snapshot),
            "prune" => Some(Kind::Prune),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Snapshot => "snapshot",
            Kind::Prune => "prune",
        }
    }
}

/// The answer to a snapshot or prune; a request file's answer is this as
/// JSON in `<id>.result` (formats.md section 2).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answer {
    pub ok: bool,
    pub error: Option<String>,
    pub snapshot: Option<SnapshotReport>,
    pub prune: Option<PruneReport>,
}

/// Asks the site's daemon with an Admin call on its replication port
/// (needs the site's own certificate in `[tls]`).
pub fn over_tls(
    cfg: &Config,
    rt: &tokio::runtime::Runtime,
    kind: Kind,
    name: &str,
) -> Result<Answer> {
    let addr = super::own_daemon(cfg, "--over-tls")?;
    let (_, json) = rt
        .block_on(replicator::follower::admin(&addr, kind.as_str(), name))
        .with_context(|| format!("dataset `{name}`"))?;
    serde_json::from_str(&json).with_context(|| format!("dataset `{name}`: the daemon's answer"))
}

/// Does it here, with no daemon running: opens the dataset, ships the log
/// first (bridging a gap with a snapshot if the log no longer reaches the
/// archive), then snapshots or prunes.
pub fn without_daemon(
    cfg: &Config,
    s: &ArchiveSettings,
    rt: &tokio::runtime::Runtime,
    name: &str,
    kind: Kind,
) -> Result<Answer> {
    let ds = Arc::new(super::open_dataset(cfg, name)?);
    let store = Arc::new(Store::open(&s.store)?);
    let a = Archiver::open(
        store,
        rt.handle().clone(),
        ds.clone(),
        &cfg.site.name,
        s.store.concurrency,
    )?
    .with_pack_bytes(s.pack_bytes)
    .with_signer(s.signer()?);
    let result = (|| -> archive::Result<Answer> {
        let bridged = if a.ship_log()?.is_none() {
            let r = a.bridge_gap()?;
            a.ship_log()?;
            Some(r)
        } else {
            None
        };
        let mut answer = Answer {
            ok: true,
            error: None,
            snapshot: None,
            prune: None,
        };
        match kind {
            Kind::Snapshot => {
                answer.snapshot = Some(match bridged {
                    Some(r) => r,
                    None => a.snapshot()?,
                })
            }
            Kind::Prune => answer.prune = Some(a.prune(&s.retention, s.prune_grace)?),
        }
        Ok(answer)
    })();
    drop(a);
    ds.close()?;
    Ok(result?)
}
