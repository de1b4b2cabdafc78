//! Pushed datasets: objects handed to the daemon by `triad put` (a
//! database's archive_command) and fetched by `triad get` (its
//! restore_command), over a Unix socket in the site's data directory.
//!
//! A put streams the object into the dataset like any file: cut into
//! chunks, sealed, logged (large objects in several records held by pins),
//! then one Put record names it. It answers only once the commit policy
//! holds (durable here and acknowledged by every sync follower), so a
//! database never drops a WAL segment triad could still lose. Pushing a
//! name again with the same content succeeds without a new record (after
//! checking that the earlier record is committed); different content is
//! refused, as PostgreSQL requires of an archive_command.
//!
//! Wire format, one request per connection: a JSON header line, then for a
//! put the object as frames (u32 length, big-endian, then bytes) ended by a
//! zero-length frame and the BLAKE3 hash of the whole object, so a client
//! that dies half-way can never leave a truncated object behind. The answer
//! is a JSON line; for a get it is followed by `size` bytes and their
//! BLAKE3 hash.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vault::chunk::{self, ChunkId};
use vault::{Dataset, Entry, Node, Op, SubmitError, VaultError};

use crate::source::CommitGate;
use crate::status::PutStatsView;

/// Largest frame a client may send.
const MAX_FRAME: usize = 16 << 20;

/// Longest request header line; the header is a few short fields.
pub const MAX_HEADER: usize = 4096;

/// How long a client may take to send its header once connected.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a put's stream may stall between two reads before the put is
/// dropped (its chunks released): long enough for a producer such as
/// pg_basebackup between files, short enough that a stuck client is gone
/// in minutes. The client connects only once its input has bytes, so a
/// producer's slow start (a spread checkpoint) does not count.
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Clients served at once; more are refused with an answer, not queued.
pub const MAX_CLIENTS: usize = 64;

#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    /// "put", "get", "forget" (the object `name`) or "forget-wal-before"
    /// (every WAL segment and partial segment before the segment `name`,
    /// as pg_archivecleanup removes them by default).
    pub op: String,
    pub dataset: String,
    pub name: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Answer {
    pub ok: bool,
    pub error: Option<String>,
    /// get: the name does not exist (restore_command's "end of WAL").
    #[serde(default)]
    pub missing: bool,
    /// put: the same content was already there.
    #[serde(default)]
    pub existed: bool,
    /// put: the seq that named the object; get: none.
    pub seq: Option<u64>,
    /// get: bytes that follow the answer line.
    pub size: Option<u64>,
    /// forget: names removed.
    #[serde(default)]
    pub removed: u64,
}

/// A name a pushed object may have: one path component, as a database's
/// file names are.
pub fn check_name(name: &str) -> Result<(), String> {
    // The namespace path rules (vault::path), and one component only.
    if name.contains('/') || vault::path::check(name.as_bytes()).is_err() {
        return Err(format!(
            "`{}` is not a valid object name: 1 to 255 bytes, no `/`, not `.` or `..`",
            name.escape_debug()
        ));
    }
    Ok(())
}

/// What puts into one dataset did since start (status and metrics).
#[derive(Default)]
pub struct PutStats {
    pub stored: std::sync::atomic::AtomicU64,
    pub existed: std::sync::atomic::AtomicU64,
    pub refused: std::sync::atomic::AtomicU64,
    /// Durable here but not acknowledged by a sync follower in time.
    pub commit_failures: std::sync::atomic::AtomicU64,
    /// The last put failed its commit wait (cleared by the next success).
    pub commit_failing: AtomicBool,
    /// Puts refused because this site is fenced.
    pub fenced_refusals: std::sync::atomic::AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

impl PutStats {
    pub fn view(&self) -> PutStatsView {
        PutStatsView {
            stored: self.stored.load(Ordering::Relaxed),
            existed: self.existed.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            commit_failures: self.commit_failures.load(Ordering::Relaxed),
            commit_failing: self.commit_failing.load(Ordering::Relaxed),
            fenced_refusals: self.fenced_refusals.load(Ordering::Relaxed),
            last_error: self.last_error.lock().ok().and_then(|e| e.clone()),
        }
    }

    fn record(&self, r: &Result<Answer, PutError>) {
        let counter = match r {
            Ok(a) if a.existed => &self.existed,
            Ok(_) => &self.stored,
            Err(PutError::Commit(_)) => &self.commit_failures,
            Err(PutError::Refused(_)) => &self.refused,
            Err(PutError::Fenced(_)) => &self.fenced_refusals,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        match r {
            Ok(_) => self.commit_failing.store(false, Ordering::Relaxed),
            Err(e) => {
                if matches!(e, PutError::Commit(_)) {
                    self.commit_failing.store(true, Ordering::Relaxed);
                }
                if let Ok(mut l) = self.last_error.lock() {
                    *l = Some(e.to_string());
                }
            }
        }
    }
}

/// Why a put did not succeed.
#[derive(Debug, thiserror::Error)]
enum PutError {
    /// Stored and durable here, but the commit policy does not hold yet,
    /// or the site was fenced before it could acknowledge.
    #[error(transparent)]
    Commit(crate::source::GateError),
    /// This site is fenced: it takes no puts.
    #[error("this site is FENCED and takes no puts: {0}")]
    Fenced(String),
    #[error("{0}")]
    Refused(String),
}

impl From<String> for PutError {
    fn from(s: String) -> PutError {
        PutError::Refused(s)
    }
}

/// One dataset the socket serves.
pub struct Target {
    pub ds: Arc<Dataset>,
    /// Puts are taken here (a pushed dataset at the primary).
    pub accepts_puts: bool,
    /// Waits for the commit policy (primary with followers).
    pub gate: Option<CommitGate>,
    /// One put at a time per dataset: two puts of one name must not race
    /// past the same-content check.
    pub lock: Mutex<()>,
    pub stats: Arc<PutStats>,
}

/// Binds the socket (replacing a stale one) with mode 0660 and, when
/// `group` is set, that group, so a database's user can reach it.
pub fn bind(path: &Path, group: Option<u32>) -> std::io::Result<UnixListener> {
    if UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("{} is in use by another daemon", path.display()),
        ));
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    l.set_nonblocking(true)?;
    Ok(l)
}

/// One of the [`MAX_CLIENTS`] slots, given back when dropped.
struct Slot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Blocks until `listener` has a client waiting, or `timeout` passes.
fn wait_readable(listener: &UnixListener, timeout: Duration) {
    use std::os::fd::AsRawFd;
    let mut fds = [libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for a descriptor `listener` keeps open for
    // the duration of the call. An error (EINTR) only ends the wait early.
    unsafe {
        libc::poll(fds.as_mut_ptr(), 1, ms);
    }
}

/// Serves the socket until `stop`; one thread per connection, at most
/// [`MAX_CLIENTS`] at once. After the stop, waits up to `drain` for the
/// connected clients to finish.
pub fn serve(
    listener: UnixListener,
    targets: Arc<HashMap<String, Target>>,
    stop: Arc<AtomicBool>,
    drain: Duration,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("push-socket".into())
        .spawn(move || {
            while !stop.load(Ordering::Acquire) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
                            active.fetch_sub(1, Ordering::AcqRel);
                            tracing::warn!(limit = MAX_CLIENTS, "refused a put/get client: too many at once");
                            let _ = conn.set_nonblocking(false);
                            let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
                            refuse(
                                &mut conn,
                                format!("the daemon is serving {MAX_CLIENTS} clients already; try again"),
                            );
                            continue;
                        }
                        let t = targets.clone();
                        // Released however the connection ends: a panic,
                        // or a thread that could not start.
                        let slot = Slot(active.clone());
                        let spawned = std::thread::Builder::new()
                            .name("push-conn".into())
                            .spawn(move || {
                                let _slot = slot;
                                handle(conn, &t);
                            });
                        if let Err(e) = spawned {
                            tracing::warn!(error = %e, "cannot start a thread for a put/get");
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        // Wait for the next client without spinning and
                        // without a fixed sleep that every get would pay
                        // (a restore_command runs one per WAL segment);
                        // the timeout only bounds how late a stop is seen.
                        wait_readable(&listener, Duration::from_millis(200));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting on the put/get socket");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            }
            // Puts still waiting for their acknowledgement finish before
            // the seat's network runtime and replication links close (they
            // close after this thread): each gets its answer, acknowledged
            // or not, instead of a connection cut by a closing runtime.
            let until = std::time::Instant::now() + drain;
            while active.load(Ordering::Acquire) > 0 && std::time::Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            let left = active.load(Ordering::Acquire);
            if left > 0 {
                tracing::warn!(clients = left, within = ?drain, "put/get clients still connected at the stop; their connections end with it");
            }
        })
}

fn send(conn: &mut UnixStream, a: &Answer) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(a).map_err(std::io::Error::other)?;
    line.push(b'\n');
    conn.write_all(&line)
}

fn refuse(conn: &mut UnixStream, error: String) {
    let _ = send(
        conn,
        &Answer {
            error: Some(error),
            ..Answer::default()
        },
    );
}

/// Reads the header line, at most [`MAX_HEADER`] bytes, all of it within
/// [`HEADER_TIMEOUT`] of the first read: the deadline is absolute, so a
/// client sending a byte every few seconds cannot stretch it.
fn read_header(conn: &UnixStream, input: &mut impl BufRead) -> Result<String, String> {
    let deadline = std::time::Instant::now() + HEADER_TIMEOUT;
    let late = || format!("no request header within {HEADER_TIMEOUT:?}");
    let mut header = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(late());
        }
        conn.set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        let buf = match input.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(late())
            }
            Err(e) => return Err(format!("reading the request header: {e}")),
        };
        if buf.is_empty() {
            return Err("the client closed the connection before its header ended".into());
        }
        let room = MAX_HEADER - header.len();
        let (take, done) = match buf.iter().take(room).position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len().min(room), false),
        };
        header.extend_from_slice(&buf[..take]);
        input.consume(take);
        if done {
            break;
        }
        if header.len() >= MAX_HEADER {
            return Err(format!(
                "the request header must be one line of at most {MAX_HEADER} bytes"
            ));
        }
    }
    conn.set_read_timeout(Some(BODY_IDLE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    String::from_utf8(header).map_err(|_| "the request header is not UTF-8".to_string())
}

fn handle(conn: UnixStream, targets: &HashMap<String, Target>) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_write_timeout(Some(BODY_IDLE_TIMEOUT));
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut input = BufReader::new(conn);
    let header = match read_header(&out, &mut input) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, "refused a put/get client");
            return refuse(&mut out, e);
        }
    };
    let req: Request = match serde_json::from_str(&header) {
        Ok(r) => r,
        Err(e) => return refuse(&mut out, format!("bad request header: {e}")),
    };
    if let Err(e) = check_name(&req.name) {
        return refuse(&mut out, e);
    }
    let Some(t) = targets.get(&req.dataset) else {
        return refuse(
            &mut out,
            format!("this site has no dataset `{}`", req.dataset),
        );
    };
    match req.op.as_str() {
        "put" if !t.accepts_puts => refuse(
            &mut out,
            format!(
                "dataset `{}` takes no puts here: put at the primary, into a dataset with source = {{ kind = \"pushed\" }}",
                req.dataset
            ),
        ),
        "put" => {
            let answer = put(t, &req.name, &mut input);
            t.stats.record(&answer);
            match &answer {
                Ok(a) => {
                    tracing::info!(dataset = %req.dataset, name = %req.name, seq = ?a.seq, existed = a.existed, "put");
                    let _ = send(&mut out, a);
                }
                Err(e) => {
                    tracing::warn!(dataset = %req.dataset, name = %req.name, error = %e, "put refused");
                    refuse(&mut out, e.to_string());
                }
            }
        }
        "get" => {
            if let Err(e) = get(t, &req.name, &mut out) {
                tracing::warn!(dataset = %req.dataset, name = %req.name, error = %e, "get failed");
            }
        }
        "forget" | "forget-wal-before" if !t.accepts_puts => refuse(
            &mut out,
            format!(
                "dataset `{}` forgets nothing here: forget at the primary, whose records the followers and archives follow",
                req.dataset
            ),
        ),
        "forget" | "forget-wal-before" => match forget(t, &req) {
            Ok(a) => {
                tracing::info!(dataset = %req.dataset, op = %req.op, name = %req.name, removed = a.removed, seq = ?a.seq, "forget");
                let _ = send(&mut out, &a);
            }
            Err(e) => {
                tracing::warn!(dataset = %req.dataset, op = %req.op, name = %req.name, error = %e, "forget refused");
                refuse(&mut out, e.to_string());
            }
        },
        other => refuse(
            &mut out,
            format!("unknown op `{other}`: put, get, forget or forget-wal-before"),
        ),
    }
}

/// Reads the framed object, hashing it; fails on a short stream or a hash
/// that does not match, so a partial object never counts as whole.
struct Frames<R> {
    inner: R,
    left: usize,
    hasher: blake3::Hasher,
    done: bool,
}

impl<R: Read> Read for Frames<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut len = [0u8; 4];
            self.inner.read_exact(&mut len)?;
            let len = u32::from_be_bytes(len) as usize;
            if len > MAX_FRAME {
                return Err(std::io::Error::other(format!("frame of {len} bytes")));
            }
            if len == 0 {
                let mut want = [0u8; 32];
                self.inner.read_exact(&mut want)?;
                if self.hasher.finalize().as_bytes() != &want {
                    return Err(std::io::Error::other(
                        "the object's BLAKE3 does not match what the client sent",
                    ));
                }
                self.done = true;
                return Ok(0);
            }
            self.left = len;
        }
        let n = self.left.min(buf.len());
        self.inner.read_exact(&mut buf[..n])?;
        self.hasher.update(&buf[..n]);
        self.left -= n;
        Ok(n)
    }
}

/// Streams the object in, then names it. The stream goes into the
/// dataset's chunk store as it arrives (sealed, logged in batches held by
/// Pin records: that is the spool), with no lock held, so a slow or stuck
/// client never holds back other puts; only the name check and the record
/// that names the object take the dataset's put lock, for milliseconds.
fn put(t: &Target, name: &str, input: &mut impl Read) -> Result<Answer, PutError> {
    let ds = &t.ds;
    // Refused before the object streams in; the committer refuses it again
    // if the fence comes down while it does.
    if let Some(why) = ds.fence().fenced {
        return Err(PutError::Fenced(why));
    }
    let mut pinned: Vec<ChunkId> = Vec::new();
    let release = |pinned: &mut Vec<ChunkId>| {
        if !pinned.is_empty() {
            let ops = vec![Op::Unpin {
                ids: std::mem::take(pinned),
            }];
            if let Err(e) = ds.submit(ops, Vec::new()) {
                tracing::warn!(error = %e, "releasing a refused put's chunks");
            }
        }
    };
    let mut frames = Frames {
        inner: input,
        left: 0,
        hasher: blake3::Hasher::new(),
        done: false,
    };
    let streamed = match crate::ingest::stream(ds, &mut frames, &mut pinned, |_| {}) {
        Ok(s) => s,
        Err(e) => {
            release(&mut pinned);
            let what = match e {
                crate::ingest::StreamError::Read(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    format!("the client sent nothing for {BODY_IDLE_TIMEOUT:?}")
                }
                crate::ingest::StreamError::Read(e) => format!("reading the object: {e}"),
                crate::ingest::StreamError::Vault(e) => format!("logging the object: {e}"),
            };
            return Err(PutError::Refused(format!("{what}; nothing was stored")));
        }
    };
    let (refs, batch, size) = (streamed.refs, streamed.batch, streamed.size);
    if !frames.done {
        release(&mut pinned);
        return Err(PutError::Refused(
            "the object ended without its end frame; nothing was stored".into(),
        ));
    }
    let one = t.lock.lock().map_err(|_| "a put panicked".to_string())?;
    let existing = ds.entry(name.as_bytes()).map_err(|e| e.to_string())?;
    if let Some(old) = existing {
        drop(one);
        let same = matches!(&old.node, Node::File { chunks } if *chunks == refs);
        release(&mut pinned);
        if !same {
            return Err(PutError::Refused(format!(
                "`{name}` already exists in dataset `{}` with different content ({} bytes there, {size} sent); an archived object is never replaced",
                ds.name(),
                old.size
            )));
        }
        // Pushed again (a retry after a failed commit wait): it is whole,
        // but only succeeds once the commit policy holds for it too.
        let head = ds.head_seq();
        if let Some(gate) = &t.gate {
            gate(head).map_err(PutError::Commit)?;
        }
        return Ok(Answer {
            ok: true,
            existed: true,
            seq: Some(head),
            ..Answer::default()
        });
    }
    let entry = Entry {
        node: Node::File { chunks: refs },
        mode: 0o640,
        mtime_ns: vault::dataset::now_ns(),
        size,
        ext: None,
    };
    let mut ops = vec![Op::Put {
        path: name.as_bytes().to_vec(),
        entry,
    }];
    if !pinned.is_empty() {
        ops.push(Op::Unpin {
            ids: pinned.clone(),
        });
    }
    let submitted = ds.submit(ops, crate::ingest::seal(ds.keys(), &batch));
    // Named (or refused): the next put of this name sees it. The commit
    // wait needs no lock.
    drop(one);
    let seq = match submitted {
        Ok(c) => c.seq,
        Err(SubmitError::Missing(m)) => {
            release(&mut pinned);
            return Err(PutError::Refused(format!(
                "{} chunk(s) were released while the object streamed in; push it again",
                m.0.len()
            )));
        }
        Err(SubmitError::Vault(VaultError::Fenced(why))) => {
            release(&mut pinned);
            return Err(PutError::Fenced(why));
        }
        Err(SubmitError::Vault(e)) => {
            release(&mut pinned);
            return Err(PutError::Refused(format!("logging the object: {e}")));
        }
    };
    if let Some(gate) = &t.gate {
        gate(seq).map_err(PutError::Commit)?;
    }
    Ok(Answer {
        ok: true,
        seq: Some(seq),
        ..Answer::default()
    })
}

/// The log and segment part of a WAL file name (the 16 hex digits after
/// the timeline) when `name` is a segment or a partial segment, which
/// pg_archivecleanup removes by default (backup history files, which it
/// removes only with `-b`, are kept).
fn wal_position(name: &str) -> Option<&str> {
    segment_position(name).filter(|_| !name.ends_with(".backup"))
}

/// The log and segment part of a segment, partial segment or backup
/// history file name.
fn segment_position(name: &str) -> Option<&str> {
    let hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_lowercase())
    };
    let (seg, rest) = name.split_at_checked(24)?;
    if !hex(seg) {
        return None;
    }
    let ok = rest.is_empty()
        || rest == ".partial"
        || rest
            .strip_prefix('.')
            .and_then(|r| r.strip_suffix(".backup"))
            .is_some_and(|off| off.len() == 8 && hex(off));
    ok.then(|| &seg[8..])
}

/// Removes names from a pushed dataset: `name` itself, or with
/// `forget-wal-before` every WAL file before the segment `name` (timelines
/// aside, as pg_archivecleanup compares them). The followers and the
/// archive follow the Delete records; the chunks no name uses any more are
/// freed at every copy, and in the archive by prune once no kept snapshot
/// names them. Answers once the commit policy holds.
fn forget(t: &Target, req: &Request) -> Result<Answer, PutError> {
    let ds = &t.ds;
    if let Some(why) = ds.fence().fenced {
        return Err(PutError::Fenced(why));
    }
    // No put lock: puts never delete, and a Delete of a name already gone
    // is a no-op, so a scan racing puts and other forgets loses nothing
    // (and `archive_command` is never held up by a cleanup).
    let names: Vec<Vec<u8>> = if req.op == "forget" {
        match ds.entry(req.name.as_bytes()).map_err(|e| e.to_string())? {
            Some(_) => vec![req.name.as_bytes().to_vec()],
            None => Vec::new(),
        }
    } else {
        let Some(before) = wal_position(&req.name) else {
            return Err(PutError::Refused(format!(
                "`{}` is not a WAL segment name (24 hexadecimal digits, as %r gives it)",
                req.name
            )));
        };
        ds.entries_with_prefix(b"")
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| {
                std::str::from_utf8(n)
                    .ok()
                    .and_then(wal_position)
                    .is_some_and(|p| p < before)
            })
            .collect()
    };
    let removed = names.len() as u64;
    let mut seq = ds.head_seq();
    for batch in names.chunks(1000) {
        let ops = batch
            .iter()
            .map(|n| Op::Delete { path: n.clone() })
            .collect();
        seq = match ds.submit(ops, Vec::new()) {
            Ok(c) => c.seq,
            Err(SubmitError::Vault(VaultError::Fenced(why))) => return Err(PutError::Fenced(why)),
            Err(e) => return Err(PutError::Refused(format!("logging the removal: {e}"))),
        };
    }
    // Nothing removed: nothing to wait for (a sync follower that is down
    // does not fail a cleanup that changed nothing).
    if removed > 0 {
        if let Some(gate) = &t.gate {
            gate(seq).map_err(PutError::Commit)?;
        }
    }
    Ok(Answer {
        ok: true,
        seq: Some(seq),
        removed,
        ..Answer::default()
    })
}

fn get(t: &Target, name: &str, out: &mut UnixStream) -> Result<(), String> {
    // The entry and every chunk it names are read from one RocksDB
    // snapshot: a forget (or anything else) applied while a slow client
    // reads cannot take the chunks away half-way.
    t.ds.state()
        .with_snapshot(|snap| get_from(t, snap, name, out))
}

fn get_from(
    t: &Target,
    snap: &vault::state::Snap<'_>,
    name: &str,
    out: &mut UnixStream,
) -> Result<(), String> {
    let ds = &t.ds;
    let entry = match snap.entry(name.as_bytes()) {
        Ok(Some(e)) => e,
        Ok(None) => {
            let _ = send(
                out,
                &Answer {
                    missing: true,
                    error: Some(format!("`{name}` is not in dataset `{}`", ds.name())),
                    ..Answer::default()
                },
            );
            return Ok(());
        }
        Err(e) => {
            refuse(out, e.to_string());
            return Err(e.to_string());
        }
    };
    let Node::File { chunks } = &entry.node else {
        refuse(out, format!("`{name}` is not a file"));
        return Ok(());
    };
    send(
        out,
        &Answer {
            ok: true,
            size: Some(entry.size),
            ..Answer::default()
        },
    )
    .map_err(|e| e.to_string())?;
    // Streamed chunk by chunk: a chunk that fails its checks ends the
    // stream early, and the client, missing bytes and the trailing hash,
    // writes nothing.
    let mut hasher = blake3::Hasher::new();
    for r in chunks {
        let plain = snap
            .chunk(&r.id)
            .map_err(|e| e.to_string())
            .and_then(|c| c.ok_or_else(|| format!("chunk {} is missing", r.id.short())))
            .and_then(|c| {
                chunk::open(ds.keys(), &r.id, c.plain_len, &c.sealed)
                    .map_err(|e| format!("chunk {}: {e}", r.id.short()))
            })
            .map_err(|e| {
                format!("`{name}` cannot be read whole: {e} (run `triad verify --scrub --repair`)")
            })?;
        hasher.update(&plain);
        out.write_all(&plain).map_err(|e| e.to_string())?;
    }
    out.write_all(hasher.finalize().as_bytes())
        .map_err(|e| e.to_string())
}

/// The client side: `triad put` and `triad get`.
pub mod client {
    use super::*;

    fn connect(socket: &Path) -> Result<UnixStream, String> {
        UnixStream::connect(socket).map_err(|e| {
            format!(
                "cannot reach the triad daemon at {}: {e} (is it running, and may this user use its socket? see listen.socket_group)",
                socket.display()
            )
        })
    }

    fn answer(input: &mut impl BufRead) -> Result<Answer, String> {
        let mut line = String::new();
        input
            .read_line(&mut line)
            .map_err(|e| format!("reading the daemon's answer: {e}"))?;
        serde_json::from_str(&line)
            .map_err(|e| format!("the daemon's answer `{}` does not parse: {e}", line.trim()))
    }

    /// Connects and sends the request header.
    fn request(socket: &Path, op: &str, dataset: &str, name: &str) -> Result<UnixStream, String> {
        check_name(name)?;
        let mut conn = connect(socket)?;
        let req = Request {
            op: op.into(),
            dataset: dataset.into(),
            name: name.into(),
        };
        let mut head = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
        head.push(b'\n');
        conn.write_all(&head)
            .map_err(|e| format!("sending to the daemon: {e}"))?;
        Ok(conn)
    }

    /// Sends `object` as `name`; returns the daemon's answer.
    pub fn put(
        socket: &Path,
        dataset: &str,
        name: &str,
        object: &mut dyn Read,
    ) -> Result<Answer, String> {
        check_name(name)?;
        let read = |object: &mut dyn Read, buf: &mut [u8]| {
            object
                .read(buf)
                .map_err(|e| format!("reading the object: {e}"))
        };
        // The first bytes are read before connecting: a producer that takes
        // minutes to start (pg_basebackup waiting for its checkpoint)
        // holds no connection open meanwhile, and an input that cannot be
        // read at all fails here without reaching the daemon.
        let mut buf = vec![0u8; 1 << 20];
        let mut n = read(object, &mut buf)?;
        let mut conn = request(socket, "put", dataset, name)?;
        let sent = (|| -> Result<(), String> {
            let io = |e: std::io::Error| format!("sending to the daemon: {e}");
            let mut hasher = blake3::Hasher::new();
            while n > 0 {
                hasher.update(&buf[..n]);
                conn.write_all(&(n as u32).to_be_bytes()).map_err(io)?;
                conn.write_all(&buf[..n]).map_err(io)?;
                n = read(object, &mut buf)?;
            }
            conn.write_all(&0u32.to_be_bytes()).map_err(io)?;
            conn.write_all(hasher.finalize().as_bytes()).map_err(io)
        })();
        if sent.is_err() {
            // The daemon then sees the object end early, stores nothing and
            // answers, instead of waiting for the rest.
            let _ = conn.shutdown(std::net::Shutdown::Write);
        }
        // A daemon that refuses early (no such dataset, not the primary)
        // answers and hangs up before the object is sent: its answer says
        // why better than the broken pipe does.
        match (sent, answer(&mut BufReader::new(conn))) {
            (_, Ok(a)) => Ok(a),
            (Err(e), Err(_)) | (Ok(()), Err(e)) => Err(e),
        }
    }

    /// Asks the daemon to forget `name` (`op` "forget") or every WAL file
    /// before it ("forget-wal-before").
    pub fn forget(socket: &Path, op: &str, dataset: &str, name: &str) -> Result<Answer, String> {
        let conn = request(socket, op, dataset, name)?;
        answer(&mut BufReader::new(conn))
    }

    /// Fetches `name` into `dest` (through a temporary file, fsynced and
    /// renamed); nothing is written unless the whole object arrived and
    /// matched its hash. Returns the answer (`missing` when there is no
    /// such name).
    pub fn get(socket: &Path, dataset: &str, name: &str, dest: &Path) -> Result<Answer, String> {
        let conn = request(socket, "get", dataset, name)?;
        let mut input = BufReader::new(conn);
        let a = answer(&mut input)?;
        if !a.ok {
            return Ok(a);
        }
        let size = a.size.unwrap_or(0);
        write_whole(dest, &mut input, size, |got, input| {
            let mut want = [0u8; 32];
            input
                .read_exact(&mut want)
                .map_err(|e| format!("reading the object's hash: {e}"))?;
            (got == want)
                .then_some(())
                .ok_or_else(|| "the object's BLAKE3 does not match; nothing written".to_string())
        })?;
        Ok(a)
    }

    /// Copies `size` bytes into a temporary file next to `dest`, checks them
    /// with `check(blake3)`, fsyncs and renames into place.
    pub fn write_whole<R: Read>(
        dest: &Path,
        from: &mut R,
        size: u64,
        check: impl FnOnce([u8; 32], &mut R) -> Result<(), String>,
    ) -> Result<(), String> {
        let tmp: PathBuf = {
            let mut s = dest.as_os_str().to_owned();
            s.push(format!(".triad-{}.tmp", std::process::id()));
            s.into()
        };
        let r = (|| {
            let mut f = std::fs::File::create(&tmp)
                .map_err(|e| format!("creating {}: {e}", tmp.display()))?;
            let mut hasher = blake3::Hasher::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut got = 0u64;
            let mut body = from.by_ref().take(size);
            loop {
                let n = body
                    .read(&mut buf)
                    .map_err(|e| format!("receiving the object: {e}"))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                f.write_all(&buf[..n])
                    .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
                got += n as u64;
            }
            if got != size {
                return Err(format!("the object ended after {got} of {size} bytes"));
            }
            check(*hasher.finalize().as_bytes(), from)?;
            f.sync_all()
                .map_err(|e| format!("syncing {}: {e}", tmp.display()))?;
            std::fs::rename(&tmp, dest)
                .map_err(|e| format!("renaming into {}: {e}", dest.display()))
        })();
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fuzz target: the request header as the socket reads it (one line of
    /// at most MAX_HEADER bytes, JSON, a checked name).
    #[test]
    fn fuzz_socket_header() {
        let seeds = vec![
            br#"{"op":"put","dataset":"pg","name":"000000010000000000000001"}"#.to_vec(),
            br#"{"op":"get","dataset":"files","name":"base.tar"}"#.to_vec(),
        ];
        triad_tests::fuzz::campaign("socket header", seeds, |b| {
            let mut line = b.to_vec();
            line.push(b'\n');
            let (a, mut b2) = UnixStream::pair().unwrap();
            b2.write_all(&line).ok();
            drop(b2);
            let mut input = BufReader::new(a.try_clone().unwrap());
            if let Ok(h) = read_header(&a, &mut input) {
                assert!(h.len() <= MAX_HEADER);
                if let Ok(r) = serde_json::from_str::<Request>(&h) {
                    let _ = check_name(&r.name);
                }
            }
        });
    }

    /// The socket served in-process over one real dataset on disk.
    struct Served {
        tmp: tempfile::TempDir,
        socket: PathBuf,
        stop: Arc<AtomicBool>,
        stats: Arc<PutStats>,
    }

    impl Drop for Served {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Release);
        }
    }

    fn serve_one(accepts_puts: bool, gate: Option<CommitGate>) -> Served {
        let tmp = tempfile::tempdir().unwrap();
        let ds = Dataset::open(
            &tmp.path().join("ds"),
            "pg",
            &vault::DatasetKey::generate(),
            vault::Options::default(),
        )
        .unwrap();
        let stats = Arc::new(PutStats::default());
        let targets = HashMap::from([(
            "pg".to_string(),
            Target {
                ds: Arc::new(ds),
                accepts_puts,
                gate,
                lock: Mutex::new(()),
                stats: stats.clone(),
            },
        )]);
        let socket = tmp.path().join("triad.sock");
        let stop = Arc::new(AtomicBool::new(false));
        serve(
            bind(&socket, None).unwrap(),
            Arc::new(targets),
            stop.clone(),
            Duration::from_secs(1),
        )
        .unwrap();
        Served {
            tmp,
            socket,
            stop,
            stats,
        }
    }

    #[test]
    fn a_put_is_stored_once_never_replaced_and_read_back_whole() {
        let s = serve_one(true, None);
        let wal = vec![7u8; 3 << 20];
        let a = client::put(&s.socket, "pg", "000000010000000000000001", &mut &wal[..]).unwrap();
        assert!(a.ok && !a.existed && a.seq.is_some(), "{a:?}");
        let again =
            client::put(&s.socket, "pg", "000000010000000000000001", &mut &wal[..]).unwrap();
        assert!(again.ok && again.existed, "{again:?}");
        let other =
            client::put(&s.socket, "pg", "000000010000000000000001", &mut &b"x"[..]).unwrap();
        assert!(!other.ok, "{other:?}");
        assert!(other.error.unwrap().contains("never replaced"));

        let dest = s.tmp.path().join("out");
        let got = client::get(&s.socket, "pg", "000000010000000000000001", &dest).unwrap();
        assert!(got.ok);
        assert_eq!(std::fs::read(&dest).unwrap(), wal);
        let none = client::get(&s.socket, "pg", "00000002.history", &dest).unwrap();
        assert!(!none.ok && none.missing, "{none:?}");
        let v = s.stats.view();
        assert_eq!((v.stored, v.existed, v.refused), (1, 1, 1));
    }

    #[test]
    fn puts_are_refused_where_they_do_not_belong_and_a_failed_commit_is_counted() {
        let s = serve_one(false, None);
        let a = client::put(&s.socket, "pg", "a", &mut &b"data"[..]).unwrap();
        assert!(!a.ok);
        assert!(a.error.unwrap().contains("takes no puts here"));
        let a = client::put(&s.socket, "nope", "a", &mut &b"data"[..]).unwrap();
        assert!(!a.ok, "{a:?}");

        let gate: CommitGate = Arc::new(|seq| {
            Err(replicator::upstream::CommitError {
                site: "zjk-b".into(),
                seq,
                waited: std::time::Duration::from_secs(5),
            }
            .into())
        });
        let s = serve_one(true, Some(gate));
        let a = client::put(&s.socket, "pg", "a", &mut &b"data"[..]).unwrap();
        assert!(!a.ok);
        assert!(a.error.unwrap().contains("did not acknowledge"));
        let v = s.stats.view();
        assert_eq!(v.commit_failures, 1);
        assert!(v.commit_failing);
    }

    #[test]
    fn wal_positions_follow_pg_archivecleanup() {
        assert_eq!(
            wal_position("000000010000000A000000F4"),
            Some("0000000A000000F4")
        );
        assert_eq!(
            wal_position("000000010000000A000000F4.partial"),
            Some("0000000A000000F4")
        );
        assert_eq!(
            segment_position("000000010000000A000000F4.00000028.backup"),
            Some("0000000A000000F4")
        );
        assert_eq!(
            wal_position("000000010000000A000000F4.00000028.backup"),
            None
        );
        for not in [
            "00000002.history",
            "000000010000000a000000f4",
            "000000010000000A000000F",
            "000000010000000A000000F4.0028.backup",
            "000000010000000A000000F4.tmp",
            "base.tar",
        ] {
            assert_eq!(wal_position(not), None, "{not}");
        }
    }

    #[test]
    fn names_are_one_checked_component() {
        assert!(check_name("000000010000000000000001").is_ok());
        for bad in ["", ".", "..", "a/b", "/abs", "a\0b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
