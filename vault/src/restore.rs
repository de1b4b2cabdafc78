//! Rebuilding a directory tree from a dataset, and computing the namespace
//! digest of a tree on disk.
//!
//! Restore writes every file under a temporary name in its final directory
//! and renames it into place once complete, checks every chunk (sealed-bytes
//! hash, GCM tag, plaintext id) on the way, sets modes and mtimes (directories
//! last, deepest first, since writing into a directory changes its mtime),
//! and finally re-reads the restored tree and compares its digest with the
//! one the dataset recorded. Damaged chunks do not stop the restore: every
//! affected path is named in the report.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use filetime::FileTime;
use rayon::prelude::*;
use serde::Serialize;

use crate::beneath::Beneath;
use crate::chunk::{self, ChunkId};
use crate::dataset::View;
use crate::error::{Result, VaultError};
use crate::keys::Keys;
use crate::lthash::LtHash;
use crate::ops::{ChunkRef, Entry, Node};
use crate::path::RelPath;
use crate::state::ChunkMeta;

/// What a restore did and found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub seq: u64,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    pub expected_digest: String,
    pub restored_digest: String,
    /// One line per path that could not be restored faithfully.
    pub problems: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty() && self.expected_digest == self.restored_digest
    }
}

/// A temporary name for the next file or symlink, short enough for any
/// file system whatever the final name's length.
fn tmp_name(counter: &AtomicU64) -> Vec<u8> {
    format!(
        ".triad-restore.{}.{}",
        std::process::id(),
        counter.fetch_add(1, Ordering::Relaxed)
    )
    .into_bytes()
}

fn io<'a>(context: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> VaultError + 'a {
    move |e| VaultError::io(context, path, e)
}

/// Fetches, checks and opens one chunk.
fn fetch_chunk(view: &View, c: &ChunkRef) -> std::result::Result<Vec<u8>, String> {
    let meta = view
        .chunk_meta(&c.id)
        .map_err(|e| format!("chunk {}: {e}", c.id))?;
    let sealed = view
        .chunk_bytes(&c.id)
        .map_err(|e| format!("chunk {}: store read failed: {e}", c.id))?;
    open_stored(view.keys(), c, meta, sealed)
}

/// Checks a stored chunk's sealed bytes against their recorded BLAKE3 hash
/// and opens them (GCM tag, then the plaintext against its id).
pub(crate) fn open_stored(
    keys: &Keys,
    c: &ChunkRef,
    meta: Option<ChunkMeta>,
    sealed: Option<Vec<u8>>,
) -> std::result::Result<Vec<u8>, String> {
    let (Some(meta), Some(sealed)) = (meta, sealed) else {
        return Err(format!("chunk {} is missing from the store", c.id));
    };
    if *blake3::hash(&sealed).as_bytes() != meta.sealed_hash {
        return Err(format!(
            "chunk {}: sealed bytes do not match their recorded BLAKE3 hash (damaged on disk)",
            c.id
        ));
    }
    chunk::open(keys, &c.id, c.len, &sealed).map_err(|e| format!("chunk {}: {e}", c.id))
}

/// Writes one file's chunks, each fetched and checked by `fetch`, then its
/// mode and mtime, into the open temporary file `f`.
pub(crate) fn fill_file(
    fetch: &dyn Fn(&ChunkRef) -> std::result::Result<Vec<u8>, String>,
    f: &mut File,
    entry: &Entry,
    chunks: &[ChunkRef],
    done: &AtomicU64,
    progress: &(dyn Fn(u64) + Sync),
) -> std::result::Result<(), String> {
    for c in chunks {
        let plain = fetch(c)?;
        f.write_all(&plain).map_err(|e| format!("writing: {e}"))?;
        let n = done.fetch_add(plain.len() as u64, Ordering::Relaxed) + plain.len() as u64;
        progress(n);
    }
    f.set_permissions(fs::Permissions::from_mode(entry.mode))
        .map_err(|e| format!("setting mode: {e}"))?;
    filetime::set_file_handle_times(f, None, Some(mtime(entry.mtime_ns)))
        .map_err(|e| format!("setting mtime: {e}"))
}

fn mtime(ns: i64) -> FileTime {
    FileTime::from_unix_time(
        ns.div_euclid(1_000_000_000),
        ns.rem_euclid(1_000_000_000) as u32,
    )
}

/// Restores the whole dataset as `view` sees it into `to`, which must be
/// missing or empty. `progress` is called with bytes written so far.
///
/// Every path is checked ([`RelPath`]) before anything is written for it,
/// and every write goes through one descriptor of `to` ([`Beneath`]), so a
/// hostile namespace (absolute paths, `..`, symlinks standing where
/// directories should be) cannot place anything outside `to`: such entries
/// are refused, named in the report's problems, and the restore fails.
pub fn restore(view: &View, to: &Path, progress: &(dyn Fn(u64) + Sync)) -> Result<Report> {
    match fs::read_dir(to) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                return Err(VaultError::io(
                    "restore target",
                    to,
                    std::io::Error::other(
                        "directory is not empty; restore into a new or empty directory",
                    ),
                ));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(to).map_err(io("creating restore target", to))?
        }
        Err(e) => return Err(VaultError::io("restore target", to, e)),
    }
    let target = Beneath::open(to).map_err(io("opening restore target", to))?;
    let entries = view.entries()?;
    let applied = view.applied().clone();
    let mut report = Report {
        seq: applied.seq,
        expected_digest: hex::encode(applied.digest.summary()),
        ..Report::default()
    };
    let mut problems_list = Vec::new();
    let mut checked: Vec<(RelPath, Entry)> = Vec::with_capacity(entries.len());
    for (p, e) in entries {
        match RelPath::new(p) {
            Ok(rp) => checked.push((rp, e)),
            Err(why) => problems_list.push(format!("refused: {why}; nothing was written for it")),
        }
    }
    // Only entries whose parent was restored as a directory are written
    // (a consistent namespace never has others); the descriptor walk
    // refuses a symlink in a directory's place in any case.
    let mut dirs_made: HashSet<&[u8]> = HashSet::new();
    let placeable = |p: &RelPath, made: &HashSet<&[u8]>| {
        let (parent, _) = p.split_last();
        parent.is_empty() || made.contains(parent)
    };
    // Directories first, parents before children (sorted order), writable
    // by us until the end.
    for (p, _) in checked.iter().filter(|(_, e)| e.is_dir()) {
        if !placeable(p, &dirs_made) {
            problems_list.push(format!("{p}: parent directory was not restored"));
            continue;
        }
        match target.mkdir(p) {
            Ok(()) => {
                dirs_made.insert(p.as_bytes());
                report.dirs += 1;
            }
            Err(e) => problems_list.push(format!("{p}: creating directory: {e}")),
        }
    }
    let problems = Mutex::new(problems_list);
    let done = AtomicU64::new(0);
    let tmp_counter = AtomicU64::new(0);
    let (ok_files, ok_links, ok_bytes) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    checked.par_iter().for_each(|(p, e)| {
        if e.is_dir() {
            return;
        }
        let res = if !placeable(p, &dirs_made) {
            Err("parent directory was not restored".to_string())
        } else {
            let tmp = tmp_name(&tmp_counter);
            match &e.node {
                Node::File { chunks } => target.write_file(p, &tmp, |f| {
                    fill_file(&|c| fetch_chunk(view, c), f, e, chunks, &done, progress)
                }),
                Node::Symlink { target: to } => target
                    .symlink(p, &tmp, to, e.mtime_ns)
                    .map_err(|err| format!("creating symlink: {err}")),
                Node::Dir => Ok(()),
            }
        };
        match res {
            Ok(()) => {
                let (n, b) = match &e.node {
                    Node::File { .. } => (&ok_files, e.size),
                    _ => (&ok_links, 0),
                };
                n.fetch_add(1, Ordering::Relaxed);
                ok_bytes.fetch_add(b, Ordering::Relaxed);
            }
            Err(why) => {
                if let Ok(mut v) = problems.lock() {
                    v.push(format!("{p}: {why}"));
                }
            }
        }
    });
    report.problems = problems.into_inner().unwrap_or_default();
    // Counts of what was put in place; failures are in the problems.
    report.files = ok_files.load(Ordering::Relaxed);
    report.symlinks = ok_links.load(Ordering::Relaxed);
    report.bytes = ok_bytes.load(Ordering::Relaxed);
    for (p, e) in checked
        .iter()
        .rev()
        .filter(|(p, e)| e.is_dir() && dirs_made.contains(p.as_bytes()))
    {
        if let Err(err) = target.set_dir_meta(p, e.mode, e.mtime_ns) {
            report
                .problems
                .push(format!("{p}: setting directory metadata: {err}"));
        }
    }
    if let Err(e) = sync_filesystem(to) {
        report
            .problems
            .push(format!("flushing the restored files to disk failed: {e}"));
    }
    match digest_tree(view.keys(), to) {
        Ok(d) => report.restored_digest = hex::encode(d.summary()),
        Err(e) => report
            .problems
            .push(format!("digesting the restored tree: {e}")),
    }
    Ok(report)
}

pub(crate) fn sync_filesystem(path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // One syncfs for the whole restore instead of an fsync per file.
    let f = File::open(path)?;
    // SAFETY: syncfs takes a valid open descriptor and nothing else.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The namespace entry a path on disk corresponds to; None for kinds triad
/// does not keep (sockets, fifos, devices).
pub fn entry_from_disk(keys: &Keys, path: &Path) -> std::io::Result<Option<Entry>> {
    let md = fs::symlink_metadata(path)?;
    let ft = md.file_type();
    let mtime_ns = md.mtime() * 1_000_000_000 + md.mtime_nsec();
    let node = if ft.is_dir() {
        Node::Dir
    } else if ft.is_symlink() {
        Node::Symlink {
            target: fs::read_link(path)?.as_os_str().as_bytes().to_vec(),
        }
    } else if ft.is_file() {
        let mut chunks = Vec::new();
        for c in chunk::stream(File::open(path)?) {
            let c = c?;
            chunks.push(ChunkRef {
                id: ChunkId::of(keys, &c),
                len: c.len() as u32,
            });
        }
        Node::File { chunks }
    } else {
        return Ok(None);
    };
    let (mode, size) = match &node {
        Node::Dir => (md.mode() & 0o7777, 0),
        Node::Symlink { target } => (0o777, target.len() as u64),
        Node::File { .. } => (md.mode() & 0o7777, md.len()),
    };
    Ok(Some(Entry {
        node,
        mode,
        mtime_ns,
        size,
    }))
}

/// The namespace digest of the tree under `root` (root itself excluded).
pub fn digest_tree(keys: &Keys, root: &Path) -> Result<LtHash> {
    let mut paths = Vec::new();
    for ent in walkdir(root)? {
        paths.push(ent);
    }
    let parts: Vec<Result<LtHash>> = paths
        .par_iter()
        .map(|p| {
            let rel = p.strip_prefix(root).unwrap_or(p);
            match entry_from_disk(keys, p) {
                Ok(Some(e)) => Ok(e.digest_element(keys, rel.as_os_str().as_bytes())),
                Ok(None) => Ok(LtHash::default()),
                Err(e) => Err(VaultError::io("reading restored tree", p, e)),
            }
        })
        .collect();
    let mut d = LtHash::default();
    for part in parts {
        d.add(&part?);
    }
    Ok(d)
}

/// Every path under `root` (root itself excluded), not following symlinks.
pub(crate) fn walkdir(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for ent in fs::read_dir(&dir).map_err(io("reading directory", &dir))? {
            let ent = ent.map_err(io("reading directory", &dir))?;
            let p = ent.path();
            if ent
                .file_type()
                .map_err(io("reading directory", &p))?
                .is_dir()
            {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    Ok(out)
}
