//! Rejoin: before a site follows a new primary, each dataset's log is
//! checked against the epochs the group agreed on. A log whose record at an
//! epoch's first seq carries an older epoch went on past the fork point:
//! those records (a former primary's writes after it was replaced, or an
//! async follower's copy of them) are in no other site's history. The
//! dataset's whole directory is then moved aside under
//! `<data_dir>/evidence/`, with `evidence.json` naming the records and the
//! paths they changed, and the site starts the dataset afresh from its new
//! upstream. A log that is a prefix of the new history is kept as it is and
//! simply catches up.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vault::ops::Op;

use super::{Cluster, TakeoverError};

/// What was cut from a dataset's live copy, kept beside the moved copy.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Evidence {
    pub dataset: String,
    /// The first seq that is not in the agreed history.
    pub fork_seq: u64,
    /// The epoch that begins at `fork_seq` in the agreed history, and its
    /// primary.
    pub epoch: u64,
    pub primary: String,
    /// The records cut: their seqs, epochs and commit times.
    pub records: Vec<CutRecord>,
    /// Every path those records put, deleted or renamed.
    pub paths: Vec<String>,
    /// Where the dataset's former directory (log and state) now lies: a
    /// whole dataset, readable with `triad restore --from-dir`.
    pub moved_to: PathBuf,
    pub time_ns: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CutRecord {
    pub seq: u64,
    pub epoch: u64,
    pub time_ns: i64,
}

/// The first seq of `dataset_dir`'s log outside the agreed history, if any.
pub fn fork_point(
    dataset_dir: &Path,
    dataset: &str,
    c: &Cluster,
) -> Result<Option<(u64, u64)>, TakeoverError> {
    let log = dataset_dir.join("log");
    if !log.exists() {
        return Ok(None);
    }
    let mut fork = None;
    let corrupt = |e: vault::VaultError| TakeoverError::Corrupt {
        path: log.clone(),
        reason: e.to_string(),
    };
    for (epoch, start) in c.starts(dataset).into_iter().skip(1) {
        // A log that ends before `start` has nothing there to contradict.
        let older = vault::wal::epoch_from(&log, start)
            .map_err(corrupt)?
            .is_some_and(|e| e < epoch);
        if older && fork.is_none_or(|(s, _)| start < s) {
            fork = Some((start, epoch));
        }
    }
    Ok(fork)
}

/// Moves a dataset whose log went past `fork` aside as evidence, and says
/// what it held there.
pub fn set_aside(
    data_dir: &Path,
    dataset_dir: &Path,
    dataset: &str,
    key: &vault::DatasetKey,
    (fork, epoch): (u64, u64),
    c: &Cluster,
) -> Result<Evidence, TakeoverError> {
    let keys = key.derive();
    let mut records = Vec::new();
    let mut paths = BTreeSet::new();
    let log = dataset_dir.join("log");
    let io = |path: &Path, e: std::io::Error| TakeoverError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    // Retention may have removed the first records past the fork: those
    // kept are what can be named.
    let (_, first) = vault::wal::log_extent(&log).map_err(|e| TakeoverError::Corrupt {
        path: log.clone(),
        reason: e.to_string(),
    })?;
    vault::wal::read_from(&log, fork.max(first), |r| {
        if r.record.seq < fork {
            return Ok(());
        }
        records.push(CutRecord {
            seq: r.record.seq,
            epoch: r.record.epoch,
            time_ns: r.record.time_ns,
        });
        // A record that does not open is still cut; its paths are unknown.
        if let Ok(ops) = r.record.open_ops(&keys) {
            for op in ops {
                match op {
                    Op::Put { path, .. } | Op::Delete { path } => {
                        paths.insert(String::from_utf8_lossy(&path).into_owned());
                    }
                    Op::Rename { from, to } => {
                        paths.insert(String::from_utf8_lossy(&from).into_owned());
                        paths.insert(String::from_utf8_lossy(&to).into_owned());
                    }
                    Op::Pin { .. } | Op::Unpin { .. } => {}
                }
            }
        }
        Ok(())
    })
    .map_err(|e| TakeoverError::Corrupt {
        path: log.clone(),
        reason: e.to_string(),
    })?;
    let now = vault::dataset::now_ns();
    let evidence_root = data_dir.join("evidence");
    std::fs::create_dir_all(&evidence_root).map_err(|e| io(&evidence_root, e))?;
    let moved_to = evidence_root.join(format!("{dataset}-epoch{epoch}-seq{fork}-{now}"));
    std::fs::rename(dataset_dir, &moved_to).map_err(|e| io(dataset_dir, e))?;
    let primary = c
        .history
        .iter()
        .find(|h| h.epoch == epoch)
        .map(|h| h.primary.clone())
        .unwrap_or_default();
    let ev = Evidence {
        dataset: dataset.to_string(),
        fork_seq: fork,
        epoch,
        primary,
        records,
        paths: paths.into_iter().collect(),
        moved_to: moved_to.clone(),
        time_ns: now,
    };
    let body = serde_json::to_vec_pretty(&ev).unwrap_or_default();
    let file = moved_to.join("evidence.json");
    vault::dataset::write_atomic(&file, &body).map_err(|e| TakeoverError::Io {
        path: file.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(ev)
}
