//! Rebuilding a directory tree from a dataset, and computing the namespace
//! digest of a tree on disk.
//!
//! Restore reads the namespace in path order a batch at a time (memory
//! bounded by the batch, not the tree), reads or fetches each distinct
//! chunk of a batch once, checks it (sealed-bytes hash, GCM tag, plaintext
//! id) and writes it at every place the batch uses it, a few workers at a
//! time, so files fill out of order: a file written
//! in one go (one chunk) goes straight to its name, a longer one is written
//! under a temporary name in its final directory and renamed into place
//! once complete. Modes and mtimes are set as files complete (directories
//! last, deepest first, since writing into a directory changes its mtime);
//! finally the restored tree is re-read and its digest compared with the one
//! the dataset recorded. Damaged chunks do not stop the restore: every
//! affected path is named in the report and removed, never left half
//! written (a crash can still leave a one-chunk file cut short at its name,
//! which the digest check of a rerun with `--delta` puts right).

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use filetime::FileTime;
use rayon::prelude::*;
use serde::Serialize;

use crate::beneath::{Beneath, Dir};
use crate::chunk::{self, ChunkId};
use crate::dataset::View;
use crate::error::{Result, VaultError};
use crate::keys::Keys;
use crate::lthash::LtHash;
use crate::meta::{self, Capture, Missed, NotRestored, Preserve, Shortfalls};
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
    /// Fifos and device nodes made.
    pub specials: u64,
    /// Names linked to a file restored under another name (counted in
    /// `files` too).
    pub hardlinks: u64,
    pub bytes: u64,
    pub expected_digest: String,
    pub restored_digest: String,
    /// A delta restore: files of the existing tree already as recorded
    /// (counted in `files` too), plaintext bytes read from the existing
    /// tree instead of fetched, and paths removed that the dataset does not
    /// hold.
    pub files_kept: u64,
    pub bytes_reused: u64,
    pub removed: u64,
    /// One line per path that could not be restored faithfully.
    pub problems: Vec<String>,
    /// Metadata the restore was not allowed to put back (owners when not
    /// run as root, say), per kind, counted and named. The digests above
    /// then leave those kinds out on both sides (`digest_excludes`).
    pub not_restored: Vec<NotRestored>,
    pub digest_excludes: Vec<String>,
}

/// How a restore writes the tree.
#[derive(Clone, Copy, Debug)]
pub struct RestoreOptions {
    /// Into an existing tree, changing only what differs.
    pub delta: bool,
    /// Runs of zeros (whole chunks of 4 KiB or more) become holes rather
    /// than written blocks (`preserve = ["sparse"]`).
    pub sparse: bool,
    /// Namespace entries a restore into an empty target reads and writes
    /// at a time ([`RESTORE_BATCH`]): what bounds its memory.
    pub batch: usize,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            delta: false,
            sparse: true,
            batch: RESTORE_BATCH,
        }
    }
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty() && self.expected_digest == self.restored_digest
    }
}

/// Zeros are left as holes in runs of whole pages of this size (a shorter
/// run could not be one).
const SPARSE_PAGE: u64 = 4096;

/// Writes `b` at `off` in the new file `f`, skipping every page-aligned
/// run of zero pages; true when it skipped any.
fn write_sparse(f: &File, b: &[u8], off: u64) -> std::io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let end = off + b.len() as u64;
    let mut skipped = false;
    // Bytes [from, at) are still to be written.
    let mut from = off;
    let mut at = off;
    while at < end {
        let page_end = ((at / SPARSE_PAGE) + 1) * SPARSE_PAGE;
        let next = page_end.min(end);
        let whole = at.is_multiple_of(SPARSE_PAGE) && next == page_end;
        let slice = &b[(at - off) as usize..(next - off) as usize];
        if whole && slice.iter().all(|&x| x == 0) {
            if from < at {
                f.write_all_at(&b[(from - off) as usize..(at - off) as usize], from)?;
            }
            skipped = true;
            from = next;
        }
        at = next;
    }
    if from < end {
        f.write_all_at(&b[(from - off) as usize..], from)?;
    }
    Ok(skipped)
}

/// The prefix of a restore's temporary names.
const TMP_PREFIX: &[u8] = b".triad-restore.";

/// A temporary name for the next file or symlink, short enough for any
/// file system whatever the final name's length. The random part keeps a
/// rerun from meeting an interrupted run's leftovers (a container's
/// restore is PID 1 every time).
fn tmp_name(nonce: u32, counter: &AtomicU64) -> Vec<u8> {
    let mut n = TMP_PREFIX.to_vec();
    n.extend(format!("{nonce:08x}.{}", counter.fetch_add(1, Ordering::Relaxed)).into_bytes());
    n
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
) -> std::result::Result<Missed, String> {
    for c in chunks {
        let plain = fetch(c)?;
        f.write_all(&plain).map_err(|e| format!("writing: {e}"))?;
        let n = done.fetch_add(plain.len() as u64, Ordering::Relaxed) + plain.len() as u64;
        progress(n);
    }
    finish_file(f, entry)
}

fn mtime(ns: i64) -> FileTime {
    FileTime::from_unix_time(
        ns.div_euclid(1_000_000_000),
        ns.rem_euclid(1_000_000_000) as u32,
    )
}

/// Chunks a restore needs that the view holds only by their metadata (a
/// restore from an archive installs the snapshot's namespace without its
/// chunks' bytes, which are then written straight from the store).
pub struct Remote<'a> {
    /// Whether the view holds the chunk's bytes.
    pub held: &'a (dyn Fn(&ChunkId) -> bool + Sync),
    /// Fetches every chunk in `want` (distinct ids, with the metadata the
    /// view records, whose sealed hash the bytes must match), handing each
    /// one's sealed bytes, checked against that hash, to `deliver` as it
    /// arrives, in any order. Returns a line for each chunk it could not
    /// fetch; the files that needed it are named in the report's problems.
    #[allow(clippy::type_complexity)]
    pub fetch: &'a mut dyn FnMut(
        Vec<(ChunkId, ChunkMeta)>,
        &mut dyn FnMut(ChunkId, Vec<u8>),
    ) -> Vec<String>,
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
    restore_from(view, to, None, RestoreOptions::default(), progress)
}

/// [`restore`], with the chunks `remote` says the view does not hold
/// fetched through it while the files are written: each distinct chunk of
/// a batch of entries ([`RestoreOptions::batch`]) is read or fetched once,
/// opened once, and written at every place the batch uses it, so files
/// fill out of order.
///
/// With `delta`, `to` may hold a tree already (an older restore, or the
/// damaged original): it is scanned first, files already as recorded are
/// left alone (a differing mode or mtime is set in place), chunks found in
/// it are read from it rather than fetched, files that differ are replaced
/// once every chunk is written, and whatever the dataset does not hold is
/// removed. The digest check at the end covers the whole tree.
pub fn restore_from(
    view: &View,
    to: &Path,
    mut remote: Option<Remote<'_>>,
    opts: RestoreOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Report> {
    let has_tree = prepare_target(to, opts.delta)?;
    let target = Beneath::open(to).map_err(io("opening restore target", to))?;
    let applied = view.applied().clone();
    let mut report = Report {
        seq: applied.seq,
        expected_digest: hex::encode(applied.digest.summary()),
        ..Report::default()
    };
    // What the dataset records at a path read from disk (looked up, not
    // held: the namespace is read a batch at a time).
    let kept_of = |p: &[u8]| -> Option<u8> { view.entry(p).ok().flatten().and_then(|e| e.kept()) };
    let existing = if has_tree {
        scan_target(view.keys(), to, &kept_of)?
    } else {
        Vec::new()
    };
    let w = Writer {
        keys: view.keys(),
        target: &target,
        problems: Mutex::new(Vec::new()),
        done: AtomicU64::new(0),
        tmp_counter: AtomicU64::new(0),
        nonce: rand::random(),
        ok_files: AtomicU64::new(0),
        ok_links: AtomicU64::new(0),
        ok_special: AtomicU64::new(0),
        ok_hardlinks: AtomicU64::new(0),
        short: Mutex::new(Shortfalls::default()),
        failed: Mutex::new(HashSet::new()),
        sparse: opts.sparse,
        ok_bytes: AtomicU64::new(0),
        open_files: AtomicU64::new(0),
        dirs: Mutex::new(std::collections::HashMap::new()),
        deferred: Mutex::new(Vec::new()),
        reused: AtomicU64::new(0),
        kept: AtomicU64::new(0),
        progress,
    };
    let mut pass = Pass::default();
    // A delta restore compares the whole namespace with the whole existing
    // tree (a file may take its chunks from anywhere in it), so it is one
    // batch; a restore into an empty target holds one batch at a time.
    let batch_len = if has_tree {
        usize::MAX
    } else {
        opts.batch.max(1)
    };
    let mut entries = view.entries_iter()?;
    loop {
        let mut batch: Vec<(RelPath, Entry)> = Vec::new();
        let mut last: Option<Vec<u8>> = None;
        let mut seen = 0usize;
        for item in entries.by_ref() {
            let (p, e) = match item {
                Ok(pe) => pe,
                Err(err) => {
                    // What was written keeps its directories' metadata.
                    w.settle_dirs(&mut pass, None);
                    return Err(err);
                }
            };
            seen += 1;
            last = Some(p.clone());
            match RelPath::new(p) {
                Ok(rp) => batch.push((rp, e)),
                Err(why) => w.refused(format!("refused: {why}; nothing was written for it")),
            }
            if seen >= batch_len {
                break;
            }
        }
        let Some(last) = last else { break };
        w.restore_batch(view, &batch, &existing, remote.as_mut(), &mut pass);
        // Directories everything under which is now in place get their
        // recorded metadata.
        w.settle_dirs(&mut pass, Some(&last));
    }
    w.settle_dirs(&mut pass, None);
    report.dirs = pass.dirs;
    report.removed = pass.removed;
    report.files_kept = w.kept.load(Ordering::Relaxed);
    report.bytes_reused = w.reused.load(Ordering::Relaxed);
    report.problems = w.problems.into_inner().unwrap_or_default();
    // Counts of what was put in place; failures are in the problems.
    report.files = w.ok_files.load(Ordering::Relaxed);
    report.symlinks = w.ok_links.load(Ordering::Relaxed);
    report.specials = w.ok_special.load(Ordering::Relaxed);
    report.hardlinks = w.ok_hardlinks.load(Ordering::Relaxed);
    report.bytes = w.ok_bytes.load(Ordering::Relaxed);
    let short = w.short.into_inner().unwrap_or_default();
    // What the restore was not allowed to put back is reported, and the
    // digest check compares everything else.
    let mask = !short.mask();
    if mask != u8::MAX {
        report.digest_excludes = Preserve::NAMES
            .iter()
            .filter(|(_, b)| short.mask() & b != 0)
            .map(|(n, _)| n.to_string())
            .collect();
        // The entries restored from must themselves be the recorded ones
        // (their full digest is the dataset's); only then does the check
        // compare the rest of them with the tree.
        let (full, masked) = sum_entries(view, mask, &pass.unmade)?;
        if full.summary() == applied.digest.summary() {
            report.expected_digest = hex::encode(masked.summary());
        } else {
            report
                .problems
                .push("the dataset's entries do not add up to its recorded digest".into());
        }
    }
    report.not_restored = short.into_report();
    // The flush and the digest's re-read run side by side: one waits on
    // the disk, the other reads the page cache.
    let (synced, digest) = rayon::join(
        || sync_filesystem(to),
        || digest_tree(view.keys(), to, &kept_of, mask),
    );
    if let Err(e) = synced {
        report
            .problems
            .push(format!("flushing the restored files to disk failed: {e}"));
    }
    match digest {
        Ok(d) => report.restored_digest = hex::encode(d.summary()),
        Err(e) => report
            .problems
            .push(format!("digesting the restored tree: {e}")),
    }
    Ok(report)
}

/// Entries a restore into an empty target takes at a time: its memory is
/// bounded by this (and by the largest file's chunk list), not by the
/// tree. Each batch is written before the next is read, so chunks shared
/// between batches are read or fetched once per batch.
pub const RESTORE_BATCH: usize = 20_000;

/// What a restore carries from one batch of entries to the next.
#[derive(Default)]
struct Pass {
    /// Directories made whose recorded metadata is not set yet (something
    /// under them may still come), by path. An entry is placed only when
    /// its parent is here. Entries come in path order, so between batches
    /// only the prefixes of the last path read can be here.
    made: std::collections::BTreeMap<Vec<u8>, (RelPath, Entry)>,
    /// The first name (in path order) of each file with several names,
    /// with a hash of what its entry records (names and link keys aside,
    /// as [`Entry::same_recorded`] compares). It grows with the tree's
    /// hard-linked files only, by a path and 40 bytes each.
    first_name: std::collections::HashMap<u64, (RelPath, [u8; 32])>,
    /// Device nodes the restore was not allowed to make.
    unmade: HashSet<Vec<u8>>,
    /// Directories made.
    dirs: u64,
    /// Paths of the existing tree removed (a delta restore).
    removed: u64,
}

/// The full digest of the dataset's entries and the one with only the
/// metadata kinds in `mask`, which leaves out the paths in `skip` (read in
/// batches, in path order; a path that is refused adds to neither, as
/// nothing was restored for it).
fn sum_entries(view: &View, mask: u8, skip: &HashSet<Vec<u8>>) -> Result<(LtHash, LtHash)> {
    let keys = view.keys();
    let (mut full, mut masked) = (LtHash::default(), LtHash::default());
    for batch in crate::ops::batches(view.entries_iter()?, RESTORE_BATCH) {
        let batch = batch?;
        let (f, m) = batch
            .par_iter()
            .filter(|(p, _)| crate::path::check(p).is_ok())
            .fold(
                || (LtHash::default(), LtHash::default()),
                |(mut f, mut m), (p, e)| {
                    f.add(&e.digest_element(keys, p));
                    if !skip.contains(p) {
                        m.add(&e.digest_element_masked(keys, p, mask));
                    }
                    (f, m)
                },
            )
            .reduce(
                || (LtHash::default(), LtHash::default()),
                |(mut f, mut m), (f2, m2)| {
                    f.add(&f2);
                    m.add(&m2);
                    (f, m)
                },
            );
        full.add(&f);
        masked.add(&m);
    }
    Ok((full, masked))
}

impl Writer<'_> {
    /// Notes a namespace entry that was refused before anything was written.
    fn refused(&self, why: String) {
        if let Ok(mut v) = self.problems.lock() {
            v.push(why);
        }
    }

    /// Restores one batch of entries (in path order, after every batch
    /// before it): directories first, parents before children, writable by
    /// us until [`Writer::settle_dirs`]; then the files' chunks, symlinks,
    /// special files and hard links. With an existing tree (a delta
    /// restore, whose one batch is the whole namespace) what stands in an
    /// entry's way is cleared first and what the dataset does not hold is
    /// removed last.
    fn restore_batch(
        &self,
        view: &View,
        batch: &[(RelPath, Entry)],
        existing: &[(RelPath, Option<Entry>)],
        remote: Option<&mut Remote<'_>>,
        pass: &mut Pass,
    ) {
        let target = self.target;
        // What the existing tree holds at each path (`None`: a kind triad
        // does not keep, or one it could not read).
        let on_disk: std::collections::HashMap<&[u8], Option<&Entry>> = existing
            .iter()
            .map(|(p, e)| (p.as_bytes(), e.as_ref()))
            .collect();
        // Whatever stands where the dataset has another kind is removed
        // before the entry is made (after its parent was made writable).
        let conflicts = |p: &RelPath, e: &Entry| {
            on_disk
                .get(p.as_bytes())
                .is_some_and(|d| !d.is_some_and(|d| same_kind(d, e)))
        };
        let clear = |p: &RelPath, removed: &mut u64| match target.remove_all(p) {
            Ok(()) => *removed += 1,
            Err(err) => self.refused(format!("{p}: removing what stood in its place: {err}")),
        };
        // Only entries whose parent was restored as a directory are written
        // (a consistent namespace never has others); the descriptor walk
        // refuses a symlink in a directory's place in any case. A parent
        // sorts before its children, so it was made in this batch or an
        // earlier one, and is still in `made`: its subtree is not complete.
        let placeable = |p: &RelPath, made: &std::collections::BTreeMap<Vec<u8>, _>| {
            let (parent, _) = p.split_last();
            parent.is_empty() || made.contains_key(parent)
        };
        for (p, e) in batch.iter().filter(|(_, e)| e.is_dir()) {
            if !placeable(p, &pass.made) {
                self.refused(format!("{p}: parent directory was not restored"));
                continue;
            }
            if conflicts(p, e) {
                clear(p, &mut pass.removed);
            }
            let made = match on_disk.get(p.as_bytes()) {
                Some(Some(d)) if d.is_dir() => target
                    .set_dir_meta(p, 0o700, e.mtime_ns, None, &mut Missed::default())
                    .map_err(std::io::Error::other),
                _ => target.mkdir(p),
            };
            match made {
                Ok(()) => {
                    pass.made
                        .insert(p.as_bytes().to_vec(), (p.clone(), e.clone()));
                    pass.dirs += 1;
                }
                Err(e) => self.refused(format!("{p}: creating directory: {e}")),
            }
        }
        for (p, e) in batch.iter().filter(|(_, e)| !e.is_dir()) {
            if placeable(p, &pass.made) && conflicts(p, e) {
                clear(p, &mut pass.removed);
            }
        }
        // Files already as recorded stay (their mode and mtime set, if they
        // differ, once the tree has served as a source); files with
        // contents become jobs that their chunks fill; symlinks and empty
        // files are made after that, since they may replace a file read as
        // a source.
        let mut jobs = Vec::new();
        let mut ready: HashSet<&[u8]> = HashSet::new();
        let mut fix_meta: Vec<(&RelPath, &Entry)> = Vec::new();
        // A file with several names is written under the first (in path
        // order) and linked under the others once it is in place; names
        // whose entries disagree (a live tree changed between them) are
        // written apart.
        let mut links: Vec<(&RelPath, RelPath)> = Vec::new();
        let mut unplaced: HashSet<&[u8]> = HashSet::new();
        for (p, e) in batch.iter().filter(|(_, e)| !e.is_dir()) {
            let there = on_disk.get(p.as_bytes()).copied().flatten();
            if !placeable(p, &pass.made) {
                self.problem(p, "parent directory was not restored".into());
                unplaced.insert(p.as_bytes());
                continue;
            }
            if let Some(k) = e.link() {
                let recorded = *blake3::hash(&e.digest_bytes(b"")).as_bytes();
                match pass.first_name.get(&k) {
                    Some((lp, lr)) if *lr == recorded => {
                        links.push((p, lp.clone()));
                        continue;
                    }
                    Some(_) => {}
                    None => {
                        pass.first_name.insert(k, (p.clone(), recorded));
                    }
                }
            }
            if let Some(d) = there.filter(|d| {
                // A symlink's or special file's metadata is not set in
                // place: one that differs at all is made again.
                d.node == e.node
                    && d.size == e.size
                    && (matches!(e.node, Node::File { .. }) || d.same_recorded(e))
            }) {
                ready.insert(p.as_bytes());
                if !d.same_recorded(e) {
                    fix_meta.push((p, e));
                } else {
                    self.kept.fetch_add(1, Ordering::Relaxed);
                    self.settled(p, e, Ok(Missed::default()));
                }
            } else if !e.chunks().is_empty() {
                let replaces = there.is_some_and(|d| same_kind(d, e));
                jobs.push(Job::new(
                    jobs.len(),
                    p,
                    e,
                    tmp_name(self.nonce, &self.tmp_counter),
                    replaces,
                ));
            }
        }
        self.fill(view, &jobs, remote, existing);
        for (p, e) in fix_meta {
            let res = self.set_meta(p, e);
            if res.is_ok() {
                self.kept.fetch_add(1, Ordering::Relaxed);
            }
            self.settled(p, e, res);
        }
        let linked: HashSet<&[u8]> = links.iter().map(|(p, _)| p.as_bytes()).collect();
        // Device nodes the restore may not make (not root): left out of the
        // digest check, as the restored tree does not have them.
        let unmade: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
        batch.par_iter().for_each(|(p, e)| {
            if e.is_dir()
                || !e.chunks().is_empty()
                || unplaced.contains(p.as_bytes())
                || ready.contains(p.as_bytes())
                || linked.contains(p.as_bytes())
            {
                return;
            }
            let tmp = tmp_name(self.nonce, &self.tmp_counter);
            let mut missed = Missed::default();
            let res = match &e.node {
                Node::Symlink { target: to } => target
                    .symlink(p, &tmp, to, e.mtime_ns, e.ext.as_deref(), &mut missed)
                    .map_err(|err| format!("creating symlink: {err}")),
                Node::Fifo | Node::Device { .. } => {
                    let res = target
                        .special(p, &tmp, e, &mut missed)
                        .map_err(|err| format!("creating it: {err}"));
                    if missed.0 & Preserve::SPECIAL != 0 {
                        if let Ok(mut u) = unmade.lock() {
                            u.push(p.as_bytes().to_vec());
                        }
                        // Not made: named in `not_restored`, not counted.
                        self.missed(p, missed);
                        return;
                    }
                    res
                }
                _ => target.write_file(p, &tmp, |f| {
                    missed = finish_file(f, e)?;
                    Ok(())
                }),
            };
            self.settled(p, e, res.map(|()| missed));
        });
        pass.unmade.extend(unmade.into_inner().unwrap_or_default());
        for (p, first) in links {
            // Linked only to a first name that was restored: in a delta
            // restore an old file may still stand there.
            if self
                .failed
                .lock()
                .is_ok_and(|f| f.contains(first.as_bytes()))
            {
                self.problem(
                    p,
                    format!("not restored: it is another name of {first}, which was not"),
                );
                continue;
            }
            let tmp = tmp_name(self.nonce, &self.tmp_counter);
            match target.link(&first, p, &tmp) {
                Ok(()) => {
                    self.ok_files.fetch_add(1, Ordering::Relaxed);
                    self.ok_hardlinks.fetch_add(1, Ordering::Relaxed);
                }
                Err(err) => self.problem(p, format!("linking it to {first}: {err}")),
            }
        }
        if existing.is_empty() {
            return;
        }
        // What the dataset does not hold goes last: until now it could have
        // been read as a source. Counted when something was there (a path
        // inside a directory already removed is not). The batch is the
        // whole namespace here.
        let wanted: HashSet<&[u8]> = batch.iter().map(|(p, _)| p.as_bytes()).collect();
        for (p, _) in existing.iter().rev() {
            if !wanted.contains(p.as_bytes()) && matches!(target.stat(p), Ok(Some(_))) {
                if let Err(err) = target.remove_all(p) {
                    self.problem(
                        p,
                        format!("removing a path the dataset does not hold: {err}"),
                    );
                } else {
                    pass.removed += 1;
                }
            }
        }
    }

    /// Gives every made directory under which nothing more can come its
    /// recorded mode, mtime and attributes, deepest first (writing into a
    /// directory changes its mtime, and a read-only one takes nothing
    /// more). With `last`, the last path read so far: a directory is
    /// complete once `last` sorts past every path under it. Without it,
    /// every directory is.
    fn settle_dirs(&self, pass: &mut Pass, last: Option<&[u8]>) {
        let complete = |d: &[u8]| {
            last.is_none_or(|l| {
                let mut under = d.to_vec();
                under.push(b'/');
                l > under.as_slice() && !l.starts_with(&under)
            })
        };
        // A directory its owner may not search waits for the end: a later
        // batch may still link a new name to a file under it.
        let done: Vec<Vec<u8>> = pass
            .made
            .iter()
            .rev()
            .filter(|(d, (_, e))| complete(d) && (last.is_none() || e.mode & 0o100 != 0))
            .map(|(d, _)| d.clone())
            .collect();
        for d in done {
            let Some((p, e)) = pass.made.remove(&d) else {
                continue;
            };
            let mut missed = Missed::default();
            match self
                .target
                .set_dir_meta(&p, e.mode, e.mtime_ns, e.ext.as_deref(), &mut missed)
            {
                Ok(()) => self.missed(&p, missed),
                Err(err) => self.problem(&p, format!("setting directory metadata: {err}")),
            }
        }
    }
}

/// Whether two entries are of one kind (directory, file, symlink).
fn same_kind(a: &Entry, b: &Entry) -> bool {
    std::mem::discriminant(&a.node) == std::mem::discriminant(&b.node)
}

/// Makes sure `to` can take the restore: created when missing; otherwise
/// it must be empty, unless `delta`. True when it holds a tree to scan.
fn prepare_target(to: &Path, delta: bool) -> Result<bool> {
    match fs::read_dir(to) {
        Ok(mut rd) => {
            if rd.next().is_none() {
                return Ok(false);
            }
            if !delta {
                return Err(VaultError::io(
                    "restore target",
                    to,
                    std::io::Error::other(
                        "directory is not empty; restore into a new or empty directory, or \
                         use --delta to bring an existing tree to the restored state",
                    ),
                ));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(to).map_err(io("creating restore target", to))?;
            return Ok(false);
        }
        Err(e) => return Err(VaultError::io("restore target", to, e)),
    }
    // A delta restore removes what the dataset does not hold: never let it
    // loose on the root of the filesystem.
    if fs::canonicalize(to).map_err(io("restore target", to))? == Path::new("/") {
        return Err(VaultError::io(
            "restore target",
            to,
            std::io::Error::other("a delta restore into / is refused"),
        ));
    }
    Ok(true)
}

/// Every path of the tree in `to` with its entry as read from disk (the
/// metadata kinds `kept_of` says the dataset records there), in path order.
fn scan_target(
    keys: &Keys,
    to: &Path,
    kept_of: &(dyn Fn(&[u8]) -> Option<u8> + Sync),
) -> Result<Vec<(RelPath, Option<Entry>)>> {
    let paths = walkdir(to)?;
    let mut scanned: Vec<(RelPath, Option<Entry>)> = paths
        .par_iter()
        .filter_map(|abs| {
            let rel = abs.strip_prefix(to).ok()?;
            let rp = RelPath::new(rel.as_os_str().as_bytes().to_vec()).ok()?;
            let kept = kept_of(rp.as_bytes());
            // Unreadable counts as a kind triad does not keep: replaced.
            Some((rp, entry_from_disk(keys, abs, kept).ok().flatten()))
        })
        .collect();
    scanned.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    Ok(scanned)
}

/// Gives a completely written file its recorded owner and attributes,
/// then mode and mtime (a change of owner clears setuid and setgid, and
/// any change moves the mtime). Returns what it was not allowed to set.
pub(crate) fn finish_file(f: &File, e: &Entry) -> std::result::Result<Missed, String> {
    let mut missed = Missed::default();
    if let Some(x) = &e.ext {
        meta::apply_fd(f, x, &mut missed)?;
    }
    f.set_permissions(fs::Permissions::from_mode(e.mode))
        .map_err(|err| format!("setting mode: {err}"))?;
    filetime::set_file_handle_times(f, None, Some(mtime(e.mtime_ns)))
        .map_err(|err| format!("setting mtime: {err}"))?;
    Ok(missed)
}

/// Starts writing a complete file's pages to disk without waiting for it
/// (the restore's one `syncfs` at the end still decides durability, and
/// reports any error).
fn start_writeback(f: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range takes a valid open descriptor and plain
    // integers; it only schedules writeback.
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// At most this many files are held open between their chunks; past it, a
/// file is opened again for each chunk (a tree whose files share chunks
/// can have many files half written at once).
const MAX_OPEN_FILES: u64 = 64;

/// How far, in sealed bytes, fetched chunks may run ahead of the workers
/// that write them.
const FETCHED_BYTES_AHEAD: u64 = 64 << 20;

/// Files at least this large are handed to writeback as soon as they are
/// complete, so the flush at the end of a restore has little left to do.
const WRITEBACK_EARLY_BYTES: u64 = 1 << 20;

/// Bytes in flight between a producer and workers, bounded.
struct Budget {
    used: Mutex<u64>,
    freed: std::sync::Condvar,
    max: u64,
}

impl Budget {
    fn new(max: u64) -> Budget {
        Budget {
            used: Mutex::new(0),
            freed: std::sync::Condvar::new(),
            max,
        }
    }

    /// Waits until `n` more bytes fit (one item always fits when nothing
    /// else is in flight), then counts them.
    fn take(&self, n: u64) {
        let Ok(mut used) = self.used.lock() else {
            return;
        };
        while *used > 0 && *used + n > self.max {
            used = match self.freed.wait(used) {
                Ok(u) => u,
                Err(_) => return,
            };
        }
        *used += n;
    }

    fn release(&self, n: u64) {
        if n == 0 {
            return;
        }
        if let Ok(mut used) = self.used.lock() {
            *used = used.saturating_sub(n);
        }
        self.freed.notify_all();
    }
}

/// Bytes of one chunk in a worker's hands, returned to the budget when
/// dropped.
struct Held<'a> {
    budget: &'a Budget,
    n: u64,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.budget.release(self.n);
    }
}

/// One file with contents. A file whose one chunk placement arrives
/// first and last is written at its own name in one go (a small file: no
/// temporary name and no rename, which halve its directory updates);
/// otherwise it is written chunk by chunk under a temporary name and
/// renamed when complete.
struct Job<'a> {
    /// Its place in the job list.
    index: usize,
    path: &'a RelPath,
    entry: &'a Entry,
    tmp: Vec<u8>,
    /// It replaces a file of the existing tree (a delta restore), whose
    /// contents may be read as a source until every chunk is written: it is
    /// renamed into place only then.
    replaces: bool,
    st: Mutex<JobState>,
}

struct JobState {
    /// Chunk placements not yet written.
    remaining: usize,
    /// Whether the temporary file exists.
    created: bool,
    /// The file being written (temporary or, for a file written in one go,
    /// at its own name), while it is held open.
    file: Option<File>,
    /// The first thing that went wrong; the file is then not put in place.
    failed: Option<String>,
    /// Chunks of zeros were left as holes.
    holes: bool,
    /// What the file's metadata could not be given.
    missed: Missed,
}

impl<'a> Job<'a> {
    fn new(
        index: usize,
        path: &'a RelPath,
        entry: &'a Entry,
        tmp: Vec<u8>,
        replaces: bool,
    ) -> Job<'a> {
        Job {
            index,
            path,
            entry,
            tmp,
            replaces,
            st: Mutex::new(JobState {
                remaining: entry.chunks().len(),
                created: false,
                file: None,
                failed: None,
                holes: false,
                missed: Missed::default(),
            }),
        }
    }
}

/// Where each distinct chunk goes: its plain length and every
/// (job, offset) that holds it.
type Placements = std::collections::HashMap<ChunkId, (u32, Vec<(usize, u64)>)>;

/// Where a needed chunk already is in the existing tree: file and offset.
type Sources<'a> = std::collections::HashMap<ChunkId, (&'a RelPath, u64)>;

/// What the workers of one round of [`Writer::fill`] read: the view, the
/// jobs, where each chunk goes and is found, and where a chunk the tree no
/// longer holds is put back for the next round.
#[derive(Clone, Copy)]
struct Round<'r, 'j> {
    view: &'r View,
    jobs: &'r [Job<'j>],
    places: &'r Placements,
    sources: &'r Sources<'j>,
    retry: &'r Mutex<Vec<ChunkId>>,
}

/// A chunk for a worker: to read from the view, to read from the existing
/// tree, or fetched (sealed bytes, checked against their recorded hash).
enum Msg {
    View(ChunkId),
    Tree(ChunkId),
    Fetched(ChunkId, Vec<u8>),
}

/// What the workers of one restore share.
struct Writer<'a> {
    keys: &'a Keys,
    target: &'a Beneath,
    problems: Mutex<Vec<String>>,
    done: AtomicU64,
    tmp_counter: AtomicU64,
    /// Random, per restore, in every temporary name.
    nonce: u32,
    ok_files: AtomicU64,
    ok_links: AtomicU64,
    ok_special: AtomicU64,
    ok_hardlinks: AtomicU64,
    /// Metadata not allowed to be put back, per kind.
    short: Mutex<Shortfalls>,
    /// Paths that could not be restored (named in the problems).
    failed: Mutex<HashSet<Vec<u8>>>,
    /// Whole chunks of zeros become holes.
    sparse: bool,
    ok_bytes: AtomicU64,
    open_files: AtomicU64,
    /// Directories files are written into, each opened once.
    dirs: Mutex<std::collections::HashMap<Vec<u8>, Arc<Dir>>>,
    /// Complete files waiting to replace files of the existing tree.
    deferred: Mutex<Vec<usize>>,
    /// Plaintext bytes read from the existing tree rather than fetched.
    reused: AtomicU64,
    /// Files of the existing tree already as recorded.
    kept: AtomicU64,
    progress: &'a (dyn Fn(u64) + Sync),
}

impl Writer<'_> {
    /// Gives a file of the existing tree, whose contents are as recorded,
    /// its recorded mode and mtime.
    fn set_meta(&self, p: &RelPath, e: &Entry) -> std::result::Result<Missed, String> {
        let (dir, name) = self
            .dir_of(p)
            .map_err(|err| format!("opening its directory: {err}"))?;
        // Read-only is enough to change a file's mode and times as its
        // owner, and works for a file whose mode denies writing.
        let f = dir
            .open_read(name)
            .map_err(|err| format!("opening it to set its mode and mtime: {err}"))?;
        finish_file(&f, e)
    }

    fn problem(&self, p: &RelPath, why: String) {
        if let Ok(mut v) = self.problems.lock() {
            v.push(format!("{p}: {why}"));
        }
        if let Ok(mut f) = self.failed.lock() {
            f.insert(p.as_bytes().to_vec());
        }
    }

    /// Counts a path put in place, or records why it was not.
    fn settled(&self, p: &RelPath, e: &Entry, res: std::result::Result<Missed, String>) {
        match res {
            Ok(missed) => {
                let (n, b) = match &e.node {
                    Node::File { .. } => (&self.ok_files, e.size),
                    Node::Symlink { .. } => (&self.ok_links, 0),
                    _ => (&self.ok_special, 0),
                };
                n.fetch_add(1, Ordering::Relaxed);
                self.ok_bytes.fetch_add(b, Ordering::Relaxed);
                self.missed(p, missed);
            }
            Err(why) => self.problem(p, why),
        }
    }

    /// Notes the metadata `p` was not allowed to get.
    fn missed(&self, p: &RelPath, missed: Missed) {
        if missed != Missed::default() {
            if let Ok(mut s) = self.short.lock() {
                s.note(missed, &p.to_string());
            }
        }
    }

    /// Writes every job's chunks, each opened and checked once by one of a
    /// few workers and written at each of its places. Chunks found in the
    /// files of the existing tree (`tree`, a delta restore's scan) are read
    /// from it first; the
    /// rest, and any the tree no longer holds as it was, come from the view
    /// or through `remote`. A job whose chunks did not all arrive is named
    /// with the first reason and its temporary file removed.
    fn fill(
        &self,
        view: &View,
        jobs: &[Job<'_>],
        mut remote: Option<&mut Remote<'_>>,
        tree: &[(RelPath, Option<Entry>)],
    ) {
        let mut places: Placements = std::collections::HashMap::new();
        let mut order: Vec<ChunkId> = Vec::new();
        for (i, j) in jobs.iter().enumerate() {
            let mut off = 0u64;
            for c in j.entry.chunks() {
                let slot = places.entry(c.id).or_insert_with(|| {
                    order.push(c.id);
                    (c.len, Vec::new())
                });
                slot.1.push((i, off));
                off += u64::from(c.len);
            }
        }
        // Where in the existing tree each needed chunk is, if anywhere.
        let mut sources: Sources = std::collections::HashMap::new();
        // Only files have chunks: directories and symlinks add nothing.
        for (p, e) in tree.iter().filter_map(|(p, e)| Some((p, e.as_ref()?))) {
            let mut off = 0u64;
            for c in e.chunks() {
                if places.contains_key(&c.id) {
                    sources.entry(c.id).or_insert((p, off));
                }
                off += u64::from(c.len);
            }
        }
        let (from_tree, rest): (Vec<ChunkId>, Vec<ChunkId>) =
            order.into_iter().partition(|id| sources.contains_key(id));
        let retry = Mutex::new(Vec::new());
        let round = Round {
            view,
            jobs,
            places: &places,
            sources: &sources,
            retry: &retry,
        };
        self.run(&round, |tx, _| {
            for id in from_tree {
                if tx.send(Msg::Tree(id)).is_err() {
                    break;
                }
            }
        });
        let mut rest = rest;
        rest.extend(std::mem::take(
            &mut *retry.lock().unwrap_or_else(|e| e.into_inner()),
        ));
        let (local, fetched): (Vec<ChunkId>, Vec<ChunkId>) = match &remote {
            Some(r) => rest.into_iter().partition(|id| (r.held)(id)),
            None => (rest, Vec::new()),
        };
        let no_retry = Mutex::new(Vec::new());
        let round = Round {
            retry: &no_retry,
            ..round
        };
        self.run(&round, |tx, budget| {
            for id in local {
                if tx.send(Msg::View(id)).is_err() {
                    break;
                }
            }
            if let Some(r) = remote.as_mut() {
                let mut want = Vec::with_capacity(fetched.len());
                for id in &fetched {
                    match view.chunk_meta(id) {
                        Ok(Some(m)) => want.push((*id, m)),
                        Ok(None) => self.unplaced(jobs, &places, id, "is not recorded".into()),
                        Err(e) => self.unplaced(jobs, &places, id, e.to_string()),
                    }
                }
                let lost = (r.fetch)(want, &mut |id, sealed| {
                    budget.take(sealed.len() as u64);
                    let _ = tx.send(Msg::Fetched(id, sealed));
                });
                if let Ok(mut v) = self.problems.lock() {
                    v.extend(lost);
                }
            }
        });
        // Replaced files go in place only now: until here their old
        // contents may have been read as sources.
        let deferred =
            std::mem::take(&mut *self.deferred.lock().unwrap_or_else(|e| e.into_inner()));
        for i in deferred {
            let job = &jobs[i];
            let res = self
                .dir_of(job.path)
                .map_err(|e| format!("opening its directory: {e}"))
                .and_then(|(dir, name)| {
                    dir.rename(&job.tmp, name).map_err(|e| {
                        let _ = dir.remove_file(&job.tmp);
                        format!("renaming into place: {e}")
                    })
                });
            let missed = job.st.lock().map(|st| st.missed).unwrap_or_default();
            self.settled(job.path, job.entry, res.map(|()| missed));
        }
        for j in jobs {
            let Ok(mut st) = j.st.lock() else { continue };
            if st.remaining > 0 {
                if st.file.take().is_some() {
                    self.open_files.fetch_sub(1, Ordering::Relaxed);
                }
                let why = st
                    .failed
                    .take()
                    .unwrap_or_else(|| format!("{} of its chunks were not restored", st.remaining));
                if st.created {
                    if let Ok((dir, _)) = self.dir_of(j.path) {
                        let _ = dir.remove_file(&j.tmp);
                    }
                }
                self.problem(j.path, why);
            }
        }
    }

    /// Runs a few workers over the chunks `feed` sends, then waits for
    /// them to finish. Chunks sent as fetched count against a budget of
    /// bytes, so the fetch runs ahead of the writing by at most that.
    fn run(
        &self,
        round: &Round<'_, '_>,
        feed: impl FnOnce(&crossbeam_channel::Sender<Msg>, &Budget),
    ) {
        let workers = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .clamp(2, 8);
        let (tx, rx) = crossbeam_channel::unbounded::<Msg>();
        let budget = Budget::new(FETCHED_BYTES_AHEAD);
        // Only the workers hold receivers: were they all gone, a send
        // fails instead of queueing forever.
        let receivers: Vec<_> = (0..workers).map(|_| rx.clone()).collect();
        drop(rx);
        std::thread::scope(|scope| {
            for rx in receivers {
                let budget = &budget;
                scope.spawn(move || {
                    for msg in rx {
                        // Released even if writing panics, so the feed
                        // never waits on bytes no worker will free.
                        let _held = Held {
                            budget,
                            n: match &msg {
                                Msg::Fetched(_, b) => b.len() as u64,
                                _ => 0,
                            },
                        };
                        self.write_chunk(round, msg);
                    }
                });
            }
            feed(&tx, &budget);
            drop(tx);
        });
    }

    /// Opens one chunk and writes it at each of its places. A chunk the
    /// existing tree no longer holds as scanned goes to `retry` instead.
    fn write_chunk(&self, round: &Round<'_, '_>, msg: Msg) {
        let Round {
            view,
            jobs,
            places,
            sources,
            retry,
        } = *round;
        let id = match &msg {
            Msg::View(id) | Msg::Tree(id) | Msg::Fetched(id, _) => *id,
        };
        let Some((len, at)) = places.get(&id) else {
            return;
        };
        let plain = match msg {
            Msg::Fetched(_, b) => {
                chunk::open(self.keys, &id, *len, &b).map_err(|e| format!("chunk {id}: {e}"))
            }
            Msg::View(_) => fetch_chunk(view, &ChunkRef { id, len: *len }),
            Msg::Tree(_) => match sources
                .get(&id)
                .and_then(|(p, off)| self.read_tree(p, *off, *len, &id))
            {
                Some(b) => {
                    self.reused.fetch_add(b.len() as u64, Ordering::Relaxed);
                    Ok(b)
                }
                None => {
                    if let Ok(mut r) = retry.lock() {
                        r.push(id);
                    }
                    return;
                }
            },
        };
        for (job, off) in at {
            self.place(&jobs[*job], *off, plain.as_deref().map_err(String::as_str));
        }
    }

    /// Reads chunk `id` from the existing file `p` at `off`, if it is still
    /// there as scanned (its keyed hash is checked).
    fn read_tree(&self, p: &RelPath, off: u64, len: u32, id: &ChunkId) -> Option<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        // No chunk is longer: a length past it is fetched (and refused).
        if len > chunk::CHUNK_MAX {
            return None;
        }
        let (dir, name) = self.dir_of(p).ok()?;
        let f = dir.open_read(name).ok()?;
        let mut b = vec![0u8; len as usize];
        f.read_exact_at(&mut b, off).ok()?;
        (ChunkId::of(self.keys, &b) == *id).then_some(b)
    }

    /// Marks every place chunk `id` goes as failed for `why`.
    fn unplaced(&self, jobs: &[Job<'_>], places: &Placements, id: &ChunkId, why: String) {
        if let Some((_, at)) = places.get(id) {
            let why = format!("chunk {id} {why}");
            for (job, off) in at {
                self.place(&jobs[*job], *off, Err(why.as_str()));
            }
        }
    }

    /// The directory holding `p` (opened once, kept for the files after
    /// it) and `p`'s name in it.
    fn dir_of<'p>(&self, p: &'p RelPath) -> std::io::Result<(Arc<Dir>, &'p [u8])> {
        /// Past this many, the cache starts again (bounded memory and
        /// descriptors whatever the tree's shape).
        const MAX_DIRS: usize = 64;
        let (parent, name) = p.split_last();
        if let Some(d) = self.dirs.lock().ok().and_then(|m| m.get(parent).cloned()) {
            return Ok((d, name));
        }
        let (d, _) = self.target.parent_dir(p)?;
        let d = Arc::new(d);
        if let Ok(mut m) = self.dirs.lock() {
            if m.len() >= MAX_DIRS {
                m.clear();
            }
            m.insert(parent.to_vec(), d.clone());
        }
        Ok((d, name))
    }

    /// Writes one chunk's plaintext (or records why it is missing) at
    /// offset `off` of `job`'s file, and puts the file in place when that
    /// was its last chunk.
    fn place(&self, job: &Job<'_>, off: u64, plain: std::result::Result<&[u8], &str>) {
        use std::os::unix::fs::FileExt;
        let Ok(mut st) = job.st.lock() else { return };
        if st.remaining == 0 {
            return;
        }
        // Its only write: straight to its own name, unless a file is there.
        let direct = st.remaining == 1 && !st.created && !job.replaces;
        st.remaining -= 1;
        if st.failed.is_none() {
            let written = plain.map_err(str::to_string).and_then(|b| {
                let f = self.file(job, &mut st, direct)?;
                if self.sparse {
                    // Runs of zero pages in a new file are left holes (the
                    // file gets its length when complete).
                    if write_sparse(f, b, off).map_err(|e| format!("writing: {e}"))? {
                        st.holes = true;
                    }
                } else {
                    f.write_all_at(b, off)
                        .map_err(|e| format!("writing: {e}"))?;
                }
                let n = self.done.fetch_add(b.len() as u64, Ordering::Relaxed) + b.len() as u64;
                (self.progress)(n);
                Ok(())
            });
            if let Err(why) = written {
                st.failed = Some(why);
            }
        }
        if st.remaining > 0 {
            // Held open only while few files are.
            if st.file.is_some() && self.open_files.load(Ordering::Relaxed) > MAX_OPEN_FILES {
                st.file = None;
                self.open_files.fetch_sub(1, Ordering::Relaxed);
            }
            return;
        }
        let holes = st.holes;
        let res = match st.failed.take() {
            Some(why) => Err(why),
            None => self.file(job, &mut st, direct).and_then(|f| {
                if holes {
                    // The length its chunks make, never the size the entry
                    // claims (a crafted size would make a huge sparse file
                    // the digest check then reads for ever).
                    let len: u64 = job.entry.chunks().iter().map(|c| u64::from(c.len)).sum();
                    f.set_len(len)
                        .map_err(|e| format!("setting its length: {e}"))?;
                }
                if job.entry.size >= WRITEBACK_EARLY_BYTES {
                    start_writeback(f);
                }
                finish_file(f, job.entry)
            }),
        };
        let res = res.map(|m| {
            st.missed = m;
        });
        if st.file.take().is_some() {
            self.open_files.fetch_sub(1, Ordering::Relaxed);
        }
        if res.is_ok() && job.replaces {
            if let Ok(mut d) = self.deferred.lock() {
                d.push(job.index);
                return;
            }
        }
        let res = match self.dir_of(job.path) {
            Err(e) => res.and(Err(format!("opening its directory: {e}"))),
            Ok((dir, name)) => {
                let res = res.and_then(|()| {
                    if direct {
                        return Ok(());
                    }
                    dir.rename(&job.tmp, name)
                        .map_err(|e| format!("renaming into place: {e}"))
                });
                if res.is_err() && st.created {
                    let _ = dir.remove_file(if direct { name } else { &job.tmp });
                }
                res
            }
        };
        let missed = st.missed;
        self.settled(job.path, job.entry, res.map(|()| missed));
    }

    /// `job`'s file, created on its first chunk: at its own name when
    /// `direct`, else under its temporary name.
    fn file<'s>(
        &self,
        job: &Job<'_>,
        st: &'s mut JobState,
        direct: bool,
    ) -> std::result::Result<&'s File, String> {
        if st.file.is_none() {
            let (dir, name) = self
                .dir_of(job.path)
                .map_err(|e| format!("opening its directory: {e}"))?;
            let f = match (direct, st.created) {
                (true, _) => dir.create(name),
                (false, true) => dir.open_write(&job.tmp),
                (false, false) => dir.create(&job.tmp),
            }
            .map_err(|e| format!("creating the file: {e}"))?;
            st.created = true;
            self.open_files.fetch_add(1, Ordering::Relaxed);
            st.file = Some(f);
        }
        st.file
            .as_ref()
            .ok_or_else(|| "the file is not open".to_string())
    }
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

/// The namespace entry a path on disk corresponds to, with the metadata
/// kinds in `kept` (what the dataset's entry for the path recorded; `None`
/// for none); `None` for sockets, which triad does not keep.
pub fn entry_from_disk(
    keys: &Keys,
    path: &Path,
    kept: Option<u8>,
) -> std::io::Result<Option<Entry>> {
    use std::os::unix::fs::FileTypeExt;
    let md = fs::symlink_metadata(path)?;
    let ft = md.file_type();
    let mtime_ns = md.mtime() * 1_000_000_000 + md.mtime_nsec();
    let mut file = None;
    let node = if ft.is_dir() {
        Node::Dir
    } else if ft.is_symlink() {
        Node::Symlink {
            target: fs::read_link(path)?.as_os_str().as_bytes().to_vec(),
        }
    } else if ft.is_file() {
        let mut chunks = Vec::new();
        // Never through a symlink, never blocking on a fifo swapped in
        // since the lstat above.
        let f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)?;
        if !f.metadata()?.is_file() {
            return Err(std::io::Error::other(
                "changed into a non-regular file while read",
            ));
        }
        for c in chunk::stream(&f) {
            let c = c?;
            chunks.push(ChunkRef {
                id: ChunkId::of(keys, &c),
                len: c.len() as u32,
            });
        }
        file = Some(f);
        Node::File { chunks }
    } else if ft.is_fifo() {
        Node::Fifo
    } else if ft.is_char_device() || ft.is_block_device() {
        Node::Device {
            block: ft.is_block_device(),
            rdev: md.rdev(),
        }
    } else {
        return Ok(None);
    };
    let (mode, size) = match &node {
        Node::Symlink { target } => (0o777, target.len() as u64),
        Node::File { .. } => (md.mode() & 0o7777, md.len()),
        _ => (md.mode() & 0o7777, 0),
    };
    // Names are not looked up: the digest and the comparisons leave them out.
    let ext = match kept {
        Some(k) => Capture::without_names(Preserve::ALL).ext(path, file.as_ref(), &md, Some(k))?,
        None => None,
    };
    Ok(Some(Entry {
        node,
        mode,
        mtime_ns,
        size,
        ext,
    }))
}

/// The namespace digest of the tree under `root` (root itself excluded),
/// each path read with the metadata kinds `kept_of` says the dataset
/// records for it, and digested with the kinds in `mask`.
pub fn digest_tree(
    keys: &Keys,
    root: &Path,
    kept_of: &(dyn Fn(&[u8]) -> Option<u8> + Sync),
    mask: u8,
) -> Result<LtHash> {
    // Paths are taken from the walk a batch at a time and folded as they
    // go: one sum per worker, never one 2 KiB element per path (200,000
    // files would hold 400 MB of them), nor every path of the tree.
    const BATCH: usize = 20_000;
    let mut sum = LtHash::default();
    for paths in crate::ops::batches(Walk::new(root), BATCH) {
        let paths = paths?;
        let part = paths
            .par_iter()
            .try_fold(LtHash::default, |mut acc, p| {
                let rel = p.strip_prefix(root).unwrap_or(p).as_os_str().as_bytes();
                match entry_from_disk(keys, p, kept_of(rel)) {
                    Ok(Some(e)) => acc.add(&e.digest_element_masked(keys, rel, mask)),
                    Ok(None) => {}
                    Err(e) => return Err(VaultError::io("reading restored tree", p, e)),
                }
                Ok(acc)
            })
            .try_reduce(LtHash::default, |mut a, b| {
                a.add(&b);
                Ok(a)
            })?;
        sum.add(&part);
    }
    Ok(sum)
}

/// Every path under `root` (root itself excluded), not following symlinks.
pub(crate) fn walkdir(root: &Path) -> Result<Vec<PathBuf>> {
    Walk::new(root).collect()
}

/// The paths under a root, directory by directory, read as they are
/// asked for: it holds the directories not yet read, never the files.
struct Walk {
    stack: Vec<PathBuf>,
    current: Option<(PathBuf, fs::ReadDir)>,
}

impl Walk {
    fn new(root: &Path) -> Walk {
        Walk {
            stack: vec![root.to_path_buf()],
            current: None,
        }
    }
}

impl Iterator for Walk {
    type Item = Result<PathBuf>;

    fn next(&mut self) -> Option<Result<PathBuf>> {
        loop {
            if let Some((dir, rd)) = &mut self.current {
                match rd.next() {
                    Some(Ok(ent)) => {
                        let p = ent.path();
                        match ent.file_type() {
                            Ok(t) if t.is_dir() => self.stack.push(p.clone()),
                            Ok(_) => {}
                            Err(e) => return Some(Err(VaultError::io("reading directory", &p, e))),
                        }
                        return Some(Ok(p));
                    }
                    Some(Err(e)) => {
                        let dir = dir.clone();
                        self.current = None;
                        self.stack.clear();
                        return Some(Err(VaultError::io("reading directory", &dir, e)));
                    }
                    None => self.current = None,
                }
            }
            let dir = self.stack.pop()?;
            match fs::read_dir(&dir) {
                Ok(rd) => self.current = Some((dir, rd)),
                Err(e) => {
                    self.stack.clear();
                    return Some(Err(VaultError::io("reading directory", &dir, e)));
                }
            }
        }
    }
}
