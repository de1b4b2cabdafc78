//! A follower's hot standby tree: the dataset kept as a live directory tree
//! beside the store, so that a takeover serves files at once instead of
//! restoring them first.
//!
//! The tree is derived from the dataset and never read back into it. It is
//! brought up to date in passes: each pass reads the log records applied
//! since the last one, collects the paths they touched, and makes each of
//! those paths in the tree equal to the dataset's state at a RocksDB
//! snapshot taken after those records (so every chunk it needs is still
//! there). Files are written through a temporary name and renamed into
//! place, as a restore writes them, through one descriptor of the tree's
//! root ([`Beneath`]), so nothing is written outside it.
//!
//! Why syncing to the state rather than replaying ops literally: a replay
//! is not idempotent (a rename replayed after a crash can move the wrong
//! file), while "make this path equal to the state" is. A rename is still
//! done as a rename in the tree first, so moving a large directory does not
//! rewrite it, and then the moved subtree is compared with the state.
//!
//! How a file already in the tree is judged: a `Put` in a record rewrites
//! the file (that is what the record says happened). Paths merely inside a
//! renamed or deleted subtree are compared by size, mtime and mode. After a
//! restart, the paths put since the last saved cursor are compared by
//! content (cut and hashed as the source cut them), so a crash between a
//! state change and the tree's rename cannot leave an old file that looks
//! new. Where the log no longer tells what changed (a state transfer, or a
//! cursor from another copy of the dataset), every file is compared by
//! content.
//!
//! The tree is never filled over a directory triad did not make: a
//! non-empty standby path without a cursor naming it is refused, since
//! making it equal to the dataset would delete what is there.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::beneath::Beneath;
use crate::dataset::Dataset;
use crate::error::{Result, VaultError};
use crate::keys::Keys;
use crate::meta::{Missed, Shortfalls};
use crate::ops::{parent, subtree_prefix, ChunkRef, Entry, Node, Op};
use crate::path::RelPath;
use crate::record::{Hash, Record};
use crate::restore::{
    entry_from_disk, fill_file, finish_file, open_stored, sync_filesystem, walkdir,
};
use crate::state::Snap;
use crate::wal::Tail;

/// Most bytes of log records one pass reads; a longer backlog takes several
/// passes, each bounded in memory.
const PASS_BYTES: usize = 16 << 20;

/// What the cursor file holds: which tree, and the seq (with its chain
/// hash, so a cursor from a replaced copy of the dataset is not trusted)
/// that the tree was durably equal to.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Cursor {
    path: PathBuf,
    seq: u64,
    hash: String,
    /// The root directory's device and inode when the cursor was written:
    /// an empty mount point in its place (the disk not mounted) is not the
    /// tree, and filling it would write the dataset onto the file system
    /// beneath.
    #[serde(default)]
    dev: u64,
    #[serde(default)]
    ino: u64,
}

/// How a file already in the tree is judged against its entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Check {
    /// Size, mtime, mode and type.
    Quick,
    /// As `Quick`, then the contents cut and hashed.
    Content,
    /// Written again whatever is there.
    Rewrite,
}

/// What a pass did.
#[derive(Clone, Debug, Default)]
pub struct Pass {
    /// The tree equals the dataset at least up to this seq.
    pub seq: u64,
    /// Files, directories and symlinks written.
    pub written: u64,
    /// Paths removed.
    pub removed: u64,
    /// Bytes of file contents written.
    pub bytes: u64,
    /// Paths that could not be made equal, one line each.
    pub problems: Vec<String>,
}

/// A standby tree, open.
pub struct Standby {
    root: PathBuf,
    tree: Beneath,
    cursor_file: PathBuf,
    /// The saved cursor's seq plus one; 0 when none is saved. Log segments
    /// from it on are kept: a restart reads them to know what to recheck.
    saved_next: AtomicU64,
    saved: std::sync::Mutex<Option<Cursor>>,
    tmp: AtomicU64,
    /// The log reader of the last pass, kept so the next pass goes on from
    /// where it stopped instead of walking the segment again.
    tail: std::sync::Mutex<Option<Tail>>,
}

impl Standby {
    /// Opens the tree at `root` (created when missing), with its cursor in
    /// `cursor_file`. Refuses a non-empty `root` that no cursor names.
    pub fn open(root: &Path, cursor_file: &Path) -> Result<Standby> {
        Standby::open_with(root, cursor_file, false)
    }

    /// Opens this site's own former source tree as its standby tree (a
    /// primary that became a follower): whatever cursor there was is
    /// dropped and the tree claimed afresh, so the first reconcile compares
    /// every file by content and undoes what the dataset no longer holds.
    pub fn open_own(root: &Path, cursor_file: &Path) -> Result<Standby> {
        match std::fs::remove_file(cursor_file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(VaultError::io("removing standby cursor", cursor_file, e)),
        }
        Standby::open_with(root, cursor_file, true)
    }

    fn open_with(root: &Path, cursor_file: &Path, own: bool) -> Result<Standby> {
        let refuse = |reason: String| VaultError::Standby {
            path: root.to_path_buf(),
            reason,
        };
        let saved: Option<Cursor> = match std::fs::read(cursor_file) {
            Ok(b) => Some(serde_json::from_slice(&b).map_err(|e| {
                refuse(format!(
                    "its cursor {} does not decode ({e}); remove the cursor and empty the tree \
                     to have it rebuilt",
                    cursor_file.display()
                ))
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(VaultError::io("reading standby cursor", cursor_file, e)),
        };
        let ours = saved.filter(|c| c.path == root);
        if let (Some(c), Ok(md)) = (&ours, std::fs::metadata(root)) {
            use std::os::unix::fs::MetadataExt;
            if c.dev != 0 && (md.dev(), md.ino()) != (c.dev, c.ino) {
                return Err(refuse(format!(
                    "is not the directory triad filled (device {} inode {} now, {} {} in its cursor {}): \
                     a file system that should be mounted there is not, or the directory was replaced; \
                     mount it, or remove the cursor to have an empty directory filled anew",
                    md.dev(),
                    md.ino(),
                    c.dev,
                    c.ino,
                    cursor_file.display()
                )));
            }
        }
        match std::fs::read_dir(root) {
            Ok(mut rd) => {
                if ours.is_none() && !own && rd.next().is_some() {
                    return Err(refuse(format!(
                        "is not empty and triad did not make it (no cursor {} names it); triad \
                         makes a standby tree equal to the dataset, deleting anything else, so it \
                         starts only in an empty directory: empty it or choose another standby_path",
                        cursor_file.display()
                    )));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(root)
                .map_err(|e| VaultError::io("creating standby tree", root, e))?,
            Err(e) => return Err(VaultError::io("opening standby tree", root, e)),
        }
        let tree =
            Beneath::open(root).map_err(|e| VaultError::io("opening standby tree", root, e))?;
        let sb = Standby {
            root: root.to_path_buf(),
            tree,
            cursor_file: cursor_file.to_path_buf(),
            saved_next: AtomicU64::new(
                ours.as_ref()
                    .filter(|c| !c.hash.is_empty())
                    .map_or(0, |c| c.seq + 1),
            ),
            saved: std::sync::Mutex::new(ours.clone()),
            tmp: AtomicU64::new(0),
            tail: std::sync::Mutex::new(None),
        };
        if ours.is_none() {
            // Claim the empty tree before writing into it, so a crash
            // during the first fill does not leave a tree the next start
            // would refuse. Seq 0 with no hash matches no copy: the next
            // reconcile compares every file by content.
            sb.write_cursor(Cursor {
                path: root.to_path_buf(),
                seq: 0,
                hash: String::new(),
                dev: 0,
                ino: 0,
            })?;
        }
        Ok(sb)
    }

    fn write_cursor(&self, mut c: Cursor) -> Result<()> {
        {
            use std::os::unix::fs::MetadataExt;
            let md = std::fs::metadata(&self.root)
                .map_err(|e| VaultError::io("reading standby tree", &self.root, e))?;
            (c.dev, c.ino) = (md.dev(), md.ino());
        }
        let body = serde_json::to_vec(&c).map_err(|e| VaultError::Codec {
            what: "standby cursor",
            reason: e.to_string(),
        })?;
        crate::fs::write_atomic(&self.cursor_file, &body)?;
        // A claim (no hash) holds no log: it vouches for nothing.
        let next = if c.hash.is_empty() { 0 } else { c.seq + 1 };
        self.saved_next.store(next, Ordering::Release);
        if let Ok(mut s) = self.saved.lock() {
            *s = Some(c);
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The first seq the log must keep for this tree (0: none needed).
    pub fn keep_from(&self) -> u64 {
        self.saved_next.load(Ordering::Acquire)
    }

    /// Makes the tree durable and records that it equals the dataset up to
    /// `seq` (whose chain hash is `hash`).
    pub fn save(&self, seq: u64, hash: Hash) -> Result<()> {
        sync_filesystem(&self.root)
            .map_err(|e| VaultError::io("flushing standby tree", &self.root, e))?;
        self.write_cursor(Cursor {
            path: self.root.clone(),
            seq,
            hash: hex::encode(hash),
            dev: 0,
            ino: 0,
        })
    }

    /// At a site that was the primary, before its tree (the source until
    /// now) is made equal to the dataset: files that differ from the
    /// dataset's state were never logged (written while the site was
    /// fenced, or after its last scan), and making the tree equal would
    /// overwrite or delete them. Each is linked (or, across file systems,
    /// copied) under `<dir>/files/` at its own relative path first, and
    /// `<dir>/evidence.json` names them; returns their paths. A file whose
    /// metadata alone changed is not kept.
    pub fn keep_unlogged(&self, ds: &Dataset, dir: &Path) -> Result<Vec<String>> {
        let to = dir.join("files");
        let mut kept = Vec::new();
        for path in walkdir(&self.root)? {
            let Ok(rel) = path.strip_prefix(&self.root) else {
                continue;
            };
            let name = rel.as_os_str().as_bytes();
            if rel
                .file_name()
                .is_some_and(|n| n.as_bytes().starts_with(b".triad-standby."))
            {
                continue;
            }
            let md = std::fs::symlink_metadata(&path)
                .map_err(|e| VaultError::io("reading standby tree", &path, e))?;
            if md.is_dir() {
                continue;
            }
            let logged = match ds.entry(name)? {
                Some(e) => match (&e.node, md.file_type()) {
                    (Node::File { .. }, t) if t.is_file() => {
                        use std::os::unix::fs::MetadataExt;
                        let mtime_ns = md.mtime() * 1_000_000_000 + md.mtime_nsec();
                        (md.len() == e.size && mtime_ns == e.mtime_ns)
                            || entry_from_disk(ds.keys(), &path, None)
                                .map_err(|err| VaultError::io("reading standby tree", &path, err))?
                                .is_some_and(|d| d.node == e.node)
                    }
                    (Node::Symlink { target }, t) if t.is_symlink() => std::fs::read_link(&path)
                        .is_ok_and(|l| l.as_os_str().as_bytes() == target.as_slice()),
                    (Node::Fifo, t) => {
                        use std::os::unix::fs::FileTypeExt;
                        t.is_fifo()
                    }
                    (Node::Device { block, rdev }, t) => {
                        use std::os::unix::fs::{FileTypeExt, MetadataExt};
                        (if *block {
                            t.is_block_device()
                        } else {
                            t.is_char_device()
                        }) && md.rdev() == *rdev
                    }
                    _ => false,
                },
                None => false,
            };
            if logged {
                continue;
            }
            let dest = to.join(rel);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| VaultError::io("creating evidence directory", parent, e))?;
            }
            let kept_it = if md.file_type().is_symlink() {
                std::fs::read_link(&path).and_then(|l| std::os::unix::fs::symlink(l, &dest))
            } else if md.is_file() {
                // A link keeps the inode the tree's rename will replace.
                std::fs::hard_link(&path, &dest)
                    .or_else(|_| std::fs::copy(&path, &dest).map(|_| ()))
            } else {
                // Fifos and devices are not dataset content; named only.
                Ok(())
            };
            kept_it
                .map_err(|e| VaultError::io("keeping an unlogged file as evidence", &dest, e))?;
            kept.push(String::from_utf8_lossy(name).into_owned());
        }
        kept.sort();
        if !kept.is_empty() {
            let doc = serde_json::json!({
                "dataset": ds.name(),
                "reason": "written into this site's tree while it was the primary but never logged (while fenced or down, or after its last scan); the tree now follows the new primary",
                "kept_at_ns": crate::dataset::now_ns(),
                "applied_seq": ds.head_seq(),
                "paths": kept,
            });
            let file = dir.join("evidence.json");
            std::fs::write(&file, serde_json::to_vec_pretty(&doc).unwrap_or_default())
                .map_err(|e| VaultError::io("writing evidence.json", &file, e))?;
        }
        Ok(kept)
    }

    /// Makes the whole tree equal to the dataset as it is now: the start of
    /// a run, and the way back after a pass failed or the log lost the
    /// records a pass needed. Files put since the saved cursor are compared
    /// by content; with no usable cursor, every file is.
    pub fn reconcile(&self, ds: &Dataset) -> Result<Pass> {
        let saved = self.saved.lock().ok().and_then(|s| s.clone());
        ds.state().with_snapshot(|snap| {
            let applied = snap.applied()?;
            let recheck = match saved {
                Some(c) if ds.chain_hash_at(c.seq)?.map(hex::encode) == Some(c.hash.clone()) => {
                    self.put_since(ds, c.seq + 1, applied.seq)
                }
                _ => None,
            };
            let check = |p: &[u8]| match &recheck {
                Some(r) if !r.covers(p) => Check::Quick,
                _ => Check::Content,
            };
            let mut s = Syncer::new(self, snap, ds.keys());
            let want = snap.entries()?;
            s.converge(b"", &self.root, want, &check)?;
            Ok(s.finish(applied.seq))
        })
    }

    /// What records `from..=to` changed: the paths they put, and the
    /// targets of their renames (whole subtrees). None when the log no
    /// longer holds them all, or cannot be read: then everything is
    /// compared by content.
    fn put_since(&self, ds: &Dataset, from: u64, to: u64) -> Option<Recheck> {
        let mut out = Recheck::default();
        if from > to {
            return Some(out);
        }
        let mut tail = Tail::new(&ds.dir().join("log"), from).ok()?;
        let mut next = from;
        while next <= to {
            let raw = tail.read(to, PASS_BYTES).ok()?;
            next = raw.last()?.seq + 1;
            for r in &raw {
                for op in open_record(ds.keys(), r.seq, &r.payload).ok()? {
                    match op {
                        Op::Put { path, .. } => {
                            out.paths.insert(path);
                        }
                        Op::Rename { to, .. } => out.subtrees.push(to),
                        _ => {}
                    }
                }
            }
        }
        Some(out)
    }

    /// One pass: applies the records from `from` on (as many as one pass
    /// reads) to the tree. None when the log no longer holds `from`: the
    /// caller reconciles instead.
    pub fn apply(&self, ds: &Dataset, from: u64) -> Result<Option<Pass>> {
        let head = ds.head_seq();
        if from > head {
            return Ok(Some(Pass {
                seq: head,
                ..Pass::default()
            }));
        }
        let raw = {
            let mut cached = self.tail.lock().unwrap_or_else(|p| p.into_inner());
            let tail = match Tail::reuse(&mut cached, &ds.dir().join("log"), from) {
                Ok(t) => t,
                Err(VaultError::LogGap { .. }) => return Ok(None),
                Err(e) => return Err(e),
            };
            tail.read(head, PASS_BYTES)?
        };
        let Some(last) = raw.last().map(|r| r.seq) else {
            return Ok(None);
        };
        // Paths put (their files are rewritten), and subtrees that deletes
        // and renames touched (compared with the state).
        let mut forced: BTreeSet<Vec<u8>> = BTreeSet::new();
        let mut recheck = Recheck::default();
        let mut touched: BTreeMap<Vec<u8>, bool> = BTreeMap::new();
        for r in &raw {
            for op in open_record(ds.keys(), r.seq, &r.payload)? {
                match op {
                    Op::Put { path, entry } => {
                        if !entry.is_dir() {
                            forced.insert(path.clone());
                        }
                        touched.entry(path).or_insert(false);
                    }
                    Op::Delete { path } => {
                        touched.insert(path, true);
                    }
                    Op::Rename { from, to } => {
                        if !self.move_now(&from, &to) {
                            // What stands at `to` in the tree did not come
                            // from `from`: compare it by content.
                            recheck.subtrees.push(to.clone());
                        }
                        carry_over(&mut forced, &from, &to);
                        // The rename changed both parents' mtimes in the
                        // tree: they get their recorded ones back.
                        for p in [parent(&from), parent(&to)] {
                            if !p.is_empty() {
                                touched.entry(p.to_vec()).or_insert(false);
                            }
                        }
                        touched.insert(from, true);
                        touched.insert(to, true);
                    }
                    Op::Pin { .. } | Op::Unpin { .. } => {}
                }
            }
        }
        ds.state().with_snapshot(|snap| {
            let mut s = Syncer::new(self, snap, ds.keys());
            let check = |p: &[u8]| {
                if forced.contains(p) {
                    Check::Rewrite
                } else if recheck.covers(p) {
                    Check::Content
                } else {
                    Check::Quick
                }
            };
            for (p, deep) in &touched {
                if *deep {
                    s.subtree(p, &check)?;
                } else {
                    s.path(p, check(p))?;
                }
            }
            Ok(Some(s.finish(last)))
        })
    }

    /// Does a rename in the tree as a rename, so a moved directory is not
    /// written again; the subtree is compared with the state afterwards, so
    /// a rename that cannot be done here (or should not have been) only
    /// costs writes. Whether it was done.
    fn move_now(&self, from: &[u8], to: &[u8]) -> bool {
        if from == to
            || to.starts_with(&subtree_prefix(from))
            || from.starts_with(&subtree_prefix(to))
        {
            return false;
        }
        let (Ok(f), Ok(t)) = (RelPath::new(from.to_vec()), RelPath::new(to.to_vec())) else {
            return false;
        };
        if !matches!(self.tree.stat(&f), Ok(Some(_))) {
            return false;
        }
        if matches!(self.tree.stat(&t), Ok(Some(_))) && self.tree.remove_all(&t).is_err() {
            return false;
        }
        self.tree.rename(&f, &t).is_ok()
    }

    fn tmp_name(&self) -> Vec<u8> {
        format!(
            ".triad-standby.{}.{}",
            std::process::id(),
            self.tmp.fetch_add(1, Ordering::Relaxed)
        )
        .into_bytes()
    }
}

/// Paths to compare by content: exact paths, and whole subtrees.
#[derive(Default)]
struct Recheck {
    paths: HashSet<Vec<u8>>,
    subtrees: Vec<Vec<u8>>,
}

impl Recheck {
    fn covers(&self, p: &[u8]) -> bool {
        self.paths.contains(p)
            || self
                .subtrees
                .iter()
                .any(|t| p == t.as_slice() || p.starts_with(&subtree_prefix(t)))
    }
}

fn open_record(keys: &Keys, seq: u64, payload: &[u8]) -> Result<Vec<Op>> {
    Record::decode_payload(payload)
        .ok_or_else(|| VaultError::BadRecord {
            seq,
            reason: "does not decode".into(),
        })?
        .open_ops(keys)
}

/// Files to be rewritten inside a renamed subtree are to be rewritten at
/// their new place too.
fn carry_over(forced: &mut BTreeSet<Vec<u8>>, from: &[u8], to: &[u8]) {
    let prefix = subtree_prefix(from);
    let moved: Vec<Vec<u8>> = forced
        .iter()
        .filter(|p| p.as_slice() == from || p.starts_with(&prefix))
        .map(|p| {
            let mut np = to.to_vec();
            np.extend_from_slice(&p[from.len()..]);
            np
        })
        .collect();
    forced.extend(moved);
}

/// Whether an ancestor of `p` is in `set`.
fn under_any(p: &[u8], set: &HashSet<Vec<u8>>) -> bool {
    let mut a = parent(p);
    while !a.is_empty() {
        if set.contains(a) {
            return true;
        }
        a = parent(a);
    }
    false
}

/// The mtime of a stat result in nanoseconds.
// The stat fields' integer types differ between targets.
#[allow(clippy::unnecessary_cast)]
fn mtime_ns(st: &rustix::fs::Stat) -> i64 {
    (st.st_mtime as i64)
        .saturating_mul(1_000_000_000)
        .saturating_add(st.st_mtime_nsec as i64)
}

/// Whether what stands in the tree has the owner `want` records (always,
/// when it records none).
fn same_owner(st: &rustix::fs::Stat, want: &Entry) -> bool {
    // A daemon that cannot give files away would otherwise rewrite them at
    // every reconcile (it says so per pass instead).
    if uzers::get_effective_uid() != 0 {
        return true;
    }
    want.ext
        .as_ref()
        .filter(|x| x.kept & crate::meta::Preserve::OWNER != 0)
        .is_none_or(|x| st.st_uid == x.uid && st.st_gid == x.gid)
}

fn file_type(st: &rustix::fs::Stat) -> rustix::fs::FileType {
    rustix::fs::FileType::from_raw_mode(st.st_mode)
}

/// One pass's work against one snapshot of the state.
struct Syncer<'a, 'b> {
    sb: &'a Standby,
    snap: &'a Snap<'b>,
    keys: &'a Keys,
    written: u64,
    removed: u64,
    bytes: AtomicU64,
    problems: Vec<String>,
    /// Metadata not allowed to be put on the tree's files.
    short: Shortfalls,
    /// Directories whose mode and mtime are set at the end (writing into a
    /// directory changes its mtime).
    dirs: BTreeSet<Vec<u8>>,
    /// Files written in this pass: a path both put and inside a touched
    /// subtree is written once.
    rewritten: HashSet<Vec<u8>>,
}

impl<'a, 'b> Syncer<'a, 'b> {
    fn new(sb: &'a Standby, snap: &'a Snap<'b>, keys: &'a Keys) -> Self {
        Syncer {
            sb,
            snap,
            keys,
            written: 0,
            removed: 0,
            bytes: AtomicU64::new(0),
            problems: Vec::new(),
            short: Shortfalls::default(),
            dirs: BTreeSet::new(),
            rewritten: HashSet::new(),
        }
    }

    fn problem(&mut self, p: &[u8], why: impl std::fmt::Display) {
        self.problems
            .push(format!("{}: {why}", String::from_utf8_lossy(p)));
    }

    /// Notes metadata the tree's files could not be given (owners when
    /// the daemon does not run as root): warned about once per pass, not a
    /// problem that would keep the tree from counting as equal.
    fn missed(&mut self, p: &[u8], missed: Missed) {
        if missed != Missed::default() {
            self.short.note(missed, &String::from_utf8_lossy(p));
        }
    }

    fn note_parent(&mut self, p: &[u8]) {
        let parent = parent(p);
        if !parent.is_empty() {
            self.dirs.insert(parent.to_vec());
        }
    }

    /// Makes `p` and everything beneath it equal to the state.
    fn subtree(&mut self, p: &[u8], check: &dyn Fn(&[u8]) -> Check) -> Result<()> {
        self.path(p, check(p))?;
        let want = self.snap.entries_with_prefix(&subtree_prefix(p))?;
        let dir = self.sb.root.join(std::ffi::OsStr::from_bytes(p));
        self.converge(p, &dir, want, check)
    }

    /// Makes what lies under `dir` (the tree's `prefix`, "" for the root)
    /// equal to `want`, the state's entries beneath it in path order:
    /// removes what the state does not have, then brings each entry in.
    fn converge(
        &mut self,
        prefix: &[u8],
        dir: &Path,
        want: Vec<(Vec<u8>, Entry)>,
        check: &dyn Fn(&[u8]) -> Check,
    ) -> Result<()> {
        let wanted: HashSet<&[u8]> = want.iter().map(|(p, _)| p.as_slice()).collect();
        // Only a real directory is walked (never through a symlink).
        let walkable = match RelPath::new(prefix.to_vec()) {
            Ok(rp) => self
                .sb
                .tree
                .stat(&rp)
                .ok()
                .flatten()
                .is_some_and(|st| file_type(&st) == rustix::fs::FileType::Directory),
            Err(_) => prefix.is_empty(),
        };
        if walkable {
            let mut have: Vec<Vec<u8>> = walkdir(dir)?
                .into_iter()
                .filter_map(|abs| {
                    abs.strip_prefix(&self.sb.root)
                        .ok()
                        .map(|r| r.as_os_str().as_bytes().to_vec())
                })
                .collect();
            have.sort();
            let mut gone: HashSet<Vec<u8>> = HashSet::new();
            for h in have {
                if wanted.contains(h.as_slice()) || under_any(&h, &gone) {
                    continue;
                }
                self.remove(&h);
                gone.insert(h);
            }
        }
        for (p, _) in &want {
            self.path(p, check(p))?;
        }
        Ok(())
    }

    fn remove(&mut self, p: &[u8]) {
        let Ok(rp) = RelPath::new(p.to_vec()) else {
            // A name the tree cannot hold was never written there.
            return;
        };
        match self.sb.tree.remove_all(&rp) {
            Ok(()) => {
                self.removed += 1;
                self.note_parent(p);
            }
            Err(e) => self.problem(p, format!("removing: {e}")),
        }
    }

    /// Makes the one path `p` equal to the state (a directory's contents
    /// are not looked at).
    fn path(&mut self, p: &[u8], mut check: Check) -> Result<()> {
        if check == Check::Rewrite && self.rewritten.contains(p) {
            check = Check::Quick;
        }
        let rp = match RelPath::new(p.to_vec()) {
            Ok(rp) => rp,
            Err(why) => {
                self.problem(p, format!("refused: {why}; nothing was written for it"));
                return Ok(());
            }
        };
        let want = self.snap.entry(p)?;
        if check == Check::Rewrite {
            // The common case under load, a file put: written straight
            // away, without first looking at what is there. Only if that
            // fails (a directory in its place, its parent missing) does the
            // path go the long way below.
            if let Some(w) = &want {
                if let Node::File { chunks } = &w.node {
                    // A change of owner or attributes alone (chown -R,
                    // setfacl -R) is put in place, not written again.
                    if w.ext.is_some() && self.meta_only(&rp, w) {
                        return Ok(());
                    }
                    if self.try_write_file(&rp, w, chunks).is_ok() {
                        return Ok(());
                    }
                }
            }
        }
        let have = match self.sb.tree.stat(&rp) {
            Ok(h) => h,
            Err(e) => {
                self.problem(p, format!("reading what is there: {e}"));
                return Ok(());
            }
        };
        let Some(want) = want else {
            if have.is_some() {
                self.remove(p);
            }
            return Ok(());
        };
        let parent_dir = parent(p);
        if !parent_dir.is_empty() && !self.is_dir(parent_dir) {
            // The parent is missing from the tree or is not a directory
            // there: bring it in first.
            self.path(parent_dir, Check::Quick)?;
            if !self.is_dir(parent_dir) {
                self.problem(p, "its directory is not in the dataset");
                return Ok(());
            }
        }
        let kind = have.as_ref().map(file_type);
        let is_dir_now = kind == Some(rustix::fs::FileType::Directory);
        match &want.node {
            Node::Dir => {
                if !is_dir_now {
                    if have.is_some() {
                        self.remove(p);
                    }
                    match self.sb.tree.mkdir(&rp) {
                        Ok(()) => {
                            self.written += 1;
                            self.note_parent(p);
                        }
                        Err(e) => self.problem(p, format!("creating directory: {e}")),
                    }
                }
                self.dirs.insert(p.to_vec());
            }
            Node::File { chunks } => {
                if let Some(st) = &have {
                    if check != Check::Rewrite
                        && kind == Some(rustix::fs::FileType::RegularFile)
                        && u64::try_from(st.st_size).ok() == Some(want.size)
                        && mtime_ns(st) == want.mtime_ns
                        && (st.st_mode & 0o7777) == (want.mode & 0o7777)
                        && same_owner(st, &want)
                        && (check == Check::Quick || self.same_content(p, &want))
                    {
                        return Ok(());
                    }
                }
                if is_dir_now {
                    self.remove(p);
                }
                self.write_file(&rp, &want, chunks);
            }
            Node::Symlink { target } => {
                if kind == Some(rustix::fs::FileType::Symlink)
                    && have
                        .as_ref()
                        .is_some_and(|st| mtime_ns(st) == want.mtime_ns && same_owner(st, &want))
                    && self.sb.tree.read_link(&rp).is_ok_and(|t| &t == target)
                {
                    return Ok(());
                }
                if is_dir_now {
                    self.remove(p);
                }
                let tmp = self.sb.tmp_name();
                let mut missed = Missed::default();
                match self.sb.tree.symlink(
                    &rp,
                    &tmp,
                    target,
                    want.mtime_ns,
                    want.ext.as_deref(),
                    &mut missed,
                ) {
                    Ok(()) => {
                        self.written += 1;
                        self.note_parent(p);
                        self.missed(p, missed);
                    }
                    Err(e) => self.problem(p, format!("creating symlink: {e}")),
                }
            }
            Node::Fifo | Node::Device { .. } => {
                if have.as_ref().is_some_and(|st| {
                    kind == Some(match want.node {
                        Node::Device { block: true, .. } => rustix::fs::FileType::BlockDevice,
                        Node::Device { block: false, .. } => rustix::fs::FileType::CharacterDevice,
                        _ => rustix::fs::FileType::Fifo,
                    }) && mtime_ns(st) == want.mtime_ns
                        && (st.st_mode & 0o7777) == (want.mode & 0o7777)
                        && same_owner(st, &want)
                        && match want.node {
                            Node::Device { rdev, .. } => st.st_rdev == rdev,
                            _ => true,
                        }
                }) {
                    return Ok(());
                }
                if have.is_some() {
                    self.remove(p);
                }
                let tmp = self.sb.tmp_name();
                let mut missed = Missed::default();
                match self.sb.tree.special(&rp, &tmp, &want, &mut missed) {
                    Ok(()) => {
                        self.written += 1;
                        self.note_parent(p);
                        self.missed(p, missed);
                    }
                    Err(e) => self.problem(p, format!("creating it: {e}")),
                }
            }
        }
        Ok(())
    }

    fn is_dir(&self, p: &[u8]) -> bool {
        RelPath::new(p.to_vec()).is_ok_and(|rp| {
            self.sb
                .tree
                .stat(&rp)
                .ok()
                .flatten()
                .is_some_and(|st| file_type(&st) == rustix::fs::FileType::Directory)
        })
    }

    /// Whether the file at `p` holds `want`'s chunks (cut and identified as
    /// the source does).
    fn same_content(&self, p: &[u8], want: &Entry) -> bool {
        let abs = self.sb.root.join(std::ffi::OsStr::from_bytes(p));
        matches!(entry_from_disk(self.keys, &abs, None), Ok(Some(e)) if e.node == want.node)
    }

    /// When the file at `rp` already holds `want`'s contents (same size
    /// and mtime, and the same chunks when cut again), gives it `want`'s
    /// owner, attributes and mode in place and returns true.
    fn meta_only(&mut self, rp: &RelPath, want: &Entry) -> bool {
        let same_stat = matches!(self.sb.tree.stat(rp), Ok(Some(st))
            if file_type(&st) == rustix::fs::FileType::RegularFile
                && u64::try_from(st.st_size).ok() == Some(want.size)
                && mtime_ns(&st) == want.mtime_ns);
        if !same_stat || !self.same_content(rp.as_bytes(), want) {
            return false;
        }
        let res = self
            .sb
            .tree
            .parent_dir(rp)
            .and_then(|(dir, name)| dir.open_read(name))
            .map_err(|e| e.to_string())
            .and_then(|f| finish_file(&f, want));
        match res {
            Ok(missed) => {
                self.written += 1;
                self.note_parent(rp.as_bytes());
                self.rewritten.insert(rp.as_bytes().to_vec());
                self.missed(rp.as_bytes(), missed);
                true
            }
            Err(_) => false,
        }
    }

    fn write_file(&mut self, rp: &RelPath, want: &Entry, chunks: &[ChunkRef]) {
        if let Err(why) = self.try_write_file(rp, want, chunks) {
            self.problem(rp.as_bytes(), why);
        }
    }

    /// Writes the file at `rp` (through a temporary name), counting it.
    fn try_write_file(
        &mut self,
        rp: &RelPath,
        want: &Entry,
        chunks: &[ChunkRef],
    ) -> std::result::Result<(), String> {
        let tmp = self.sb.tmp_name();
        let (snap, keys) = (self.snap, self.keys);
        let fetch = |c: &ChunkRef| {
            let meta = snap
                .chunk_meta(&c.id)
                .map_err(|e| format!("chunk {}: {e}", c.id))?;
            let sealed = snap
                .chunk(&c.id)
                .map_err(|e| format!("chunk {}: store read failed: {e}", c.id))?
                .map(|s| s.sealed);
            open_stored(keys, c, meta, sealed)
        };
        let mut missed = Missed::default();
        let res = self.sb.tree.write_file(rp, &tmp, |f| {
            missed = fill_file(&fetch, f, want, chunks, &self.bytes, &|_| {})?;
            Ok(())
        });
        res.map(|()| {
            self.written += 1;
            self.note_parent(rp.as_bytes());
            self.rewritten.insert(rp.as_bytes().to_vec());
            self.missed(rp.as_bytes(), missed);
        })
    }

    /// Sets every touched directory's mode and mtime, deepest first, and
    /// says what the pass did.
    fn finish(mut self, seq: u64) -> Pass {
        let dirs = std::mem::take(&mut self.dirs);
        for d in dirs.iter().rev() {
            let Ok(rp) = RelPath::new(d.clone()) else {
                continue;
            };
            match self.snap.entry(d) {
                Ok(Some(e)) if e.is_dir() => {
                    let mut missed = Missed::default();
                    match self.sb.tree.set_dir_meta(
                        &rp,
                        e.mode,
                        e.mtime_ns,
                        e.ext.as_deref(),
                        &mut missed,
                    ) {
                        Ok(()) => self.missed(d, missed),
                        Err(err) => self.problem(d, format!("setting directory metadata: {err}")),
                    }
                }
                Ok(_) => {}
                Err(err) => self.problem(d, format!("reading its entry: {err}")),
            }
        }
        for n in std::mem::take(&mut self.short).into_report() {
            tracing::warn!(
                what = %n.what,
                paths = n.paths,
                examples = ?n.examples,
                reason = %n.reason,
                "standby tree: metadata not put back"
            );
        }
        Pass {
            seq,
            written: self.written,
            removed: self.removed,
            bytes: self.bytes.load(Ordering::Relaxed),
            problems: self.problems,
        }
    }
}
