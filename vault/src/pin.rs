//! Pinned copies of a live RocksDB directory for readers in another process.
//!
//! A reader (`triad restore` while the daemon runs) cannot stop the daemon's
//! RocksDB from deleting table and blob files that compaction or blob garbage
//! collection made obsolete, and a read-only RocksDB opens blob files lazily:
//! a long restore would fail half-way with "No such file" when a blob file it
//! still needs goes away. So the reader opens a private copy instead, made of
//! hard links (no data is copied) to the daemon's files plus a byte copy of
//! the MANIFEST. A hard link keeps a file's data alive after the daemon
//! unlinks it, until the copy is removed.
//!
//! The copy is consistent when the daemon's MANIFEST did not change between
//! copying it and finishing the links: RocksDB records a version edit in the
//! MANIFEST before it deletes any file the previous version used, so every
//! file the copied MANIFEST names still existed while it was linked.
//! Otherwise the copy is made again.
//!
//! Copies live in `<dataset>/state-views/<pid>-<n>` on the same filesystem as
//! the state (hard links need that) and are removed when the reader drops
//! them; a copy whose process died is removed by the next reader or the
//! daemon's next start.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::{Result, VaultError};

/// How many times a copy is attempted while the daemon keeps changing its
/// MANIFEST; each attempt takes milliseconds, the daemon flushes every few
/// hundred records.
const ATTEMPTS: u32 = 100;

/// Directory name, next to `state/`, holding readers' pinned copies.
pub const VIEWS_DIR: &str = "state-views";

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A pinned copy of a RocksDB directory; removed on drop.
#[derive(Debug)]
pub struct PinnedDir {
    path: PathBuf,
}

impl PinnedDir {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinnedDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove a pinned state copy");
        }
    }
}

/// Makes a consistent pinned copy of the RocksDB directory `db` in
/// `views/<pid>-<n>`.
pub fn pin(db: &Path, views: &Path) -> Result<PinnedDir> {
    fs::create_dir_all(views).map_err(|e| VaultError::io("creating", views, e))?;
    sweep_dead(views);
    let path = views.join(format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let pinned = PinnedDir { path };
    for attempt in 0..ATTEMPTS {
        if pinned.path.exists() {
            fs::remove_dir_all(&pinned.path)
                .map_err(|e| VaultError::io("removing", &pinned.path, e))?;
        }
        fs::create_dir(&pinned.path).map_err(|e| VaultError::io("creating", &pinned.path, e))?;
        if try_pin(db, &pinned.path)? {
            return Ok(pinned);
        }
        std::thread::sleep(Duration::from_millis(5 * u64::from(attempt.min(20) + 1)));
    }
    Err(VaultError::StateCorrupt {
        path: db.to_path_buf(),
        reason: format!(
            "could not take a consistent copy of the state in {ATTEMPTS} attempts: the daemon \
             changed it every time; try again when it is less busy"
        ),
    })
}

/// One attempt: true when the copy is consistent.
fn try_pin(db: &Path, to: &Path) -> Result<bool> {
    let current_path = db.join("CURRENT");
    let current = match fs::read(&current_path) {
        Ok(c) => c,
        Err(e) => return Err(VaultError::io("reading", &current_path, e)),
    };
    let manifest_name = String::from_utf8_lossy(&current).trim().to_string();
    if manifest_name.is_empty() || manifest_name.contains('/') {
        return Err(VaultError::StateCorrupt {
            path: db.to_path_buf(),
            reason: format!("CURRENT names {manifest_name:?}, not a MANIFEST file"),
        });
    }
    let manifest_path = db.join(&manifest_name);
    let manifest = match fs::read(&manifest_path) {
        Ok(m) => m,
        // Rolled over to a new MANIFEST since CURRENT was read.
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(VaultError::io("reading", &manifest_path, e)),
    };
    let write = |name: &str, bytes: &[u8]| {
        let p = to.join(name);
        fs::write(&p, bytes).map_err(|e| VaultError::io("writing", &p, e))
    };
    write(&manifest_name, &manifest)?;
    write("CURRENT", &current)?;
    let entries = fs::read_dir(db).map_err(|e| VaultError::io("listing", db, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| VaultError::io("listing", db, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        // LOCK and the info LOG belong to the daemon's instance; CURRENT and
        // the MANIFEST were copied above; older MANIFESTs are not needed.
        if name == "LOCK"
            || name.starts_with("LOG")
            || name == "CURRENT"
            || name.starts_with("MANIFEST-")
        {
            continue;
        }
        match fs::hard_link(entry.path(), to.join(name)) {
            Ok(()) => {}
            // Deleted since listed: obsolete, unless the MANIFEST changed,
            // which the check below catches.
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(VaultError::io("linking a state file from", entry.path(), e)),
        }
    }
    let still_current = fs::read(&current_path).ok().as_deref() == Some(&current[..]);
    let same_len = fs::metadata(&manifest_path)
        .map(|m| m.len() == manifest.len() as u64)
        .unwrap_or(false);
    Ok(still_current && same_len)
}

/// Removes copies left by readers that died without dropping them.
pub fn sweep_dead(views: &Path) {
    let Ok(entries) = fs::read_dir(views) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        if let Err(e) = fs::remove_dir_all(entry.path()) {
            tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove a dead reader's state copy");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_files_survive_the_original_being_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state");
        fs::create_dir(&db).unwrap();
        fs::write(db.join("CURRENT"), b"MANIFEST-000005\n").unwrap();
        fs::write(db.join("MANIFEST-000005"), b"edits").unwrap();
        fs::write(db.join("000007.blob"), b"blob bytes").unwrap();
        fs::write(db.join("LOCK"), b"").unwrap();
        let views = dir.path().join(VIEWS_DIR);
        let pinned = pin(&db, &views).unwrap();
        fs::remove_file(db.join("000007.blob")).unwrap();
        assert_eq!(
            fs::read(pinned.path().join("000007.blob")).unwrap(),
            b"blob bytes"
        );
        assert!(!pinned.path().join("LOCK").exists());
        let p = pinned.path().to_path_buf();
        drop(pinned);
        assert!(!p.exists());
    }

    #[test]
    fn copies_of_dead_processes_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        // pid_max on Linux is at most 2^22, so this pid cannot be alive.
        let dead = dir.path().join("4294967-0");
        let live = dir.path().join(format!("{}-9", std::process::id()));
        fs::create_dir(&dead).unwrap();
        fs::create_dir(&live).unwrap();
        sweep_dead(dir.path());
        assert!(!dead.exists());
        assert!(live.exists());
    }
}
