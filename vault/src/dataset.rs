//! One dataset at one site: its identity, change log, state, and the
//! committer thread that turns submitted changes into durable records.
//!
//! Layout under the dataset directory:
//! - `IDENTITY`: format version, dataset name and key id, checked before
//!   anything is opened, so a wrong key writes nothing
//! - `log/`: change-log segments ([`crate::wal`])
//! - `state/`: RocksDB ([`crate::state`])
//!
//! Writers call [`Dataset::submit`] from any thread. A single committer thread
//! takes everything queued, checks it, assigns seqs, writes all records with
//! one fsync (group commit), applies them to the state as one batch and only
//! then answers each writer. The state never runs ahead of the durable log.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use crossbeam_channel::{bounded, Receiver, Sender};
use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkId, SealedChunk};
use crate::error::{Result, VaultError};
use crate::keys::{DatasetKey, Keys};
use crate::ops::{Entry, Op};
use crate::record::{chain, frame, Hash, Record, MAX_SUBMIT};
use crate::state::{Applied, ChunkMeta, Missing, Overlay, State};
use crate::wal::{self, Recovery, Wal};

const IDENTITY_FILE: &str = "IDENTITY";
const IDENTITY_FORMAT: u32 = 1;
/// Most bytes of records written under one fsync.
const GROUP_BYTES: usize = 32 << 20;

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Identity {
    pub format: u32,
    pub dataset: String,
    pub key_id: String,
    pub created_unix: u64,
}

pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Checks (or, when `create`, writes) the dataset's identity file.
fn check_identity(dir: &Path, name: &str, key: &DatasetKey, create: bool) -> Result<()> {
    let path = dir.join(IDENTITY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let id: Identity = serde_json::from_slice(&bytes).map_err(|e| VaultError::Codec {
                what: "dataset identity",
                reason: format!("{}: {e}", path.display()),
            })?;
            if id.format != IDENTITY_FORMAT {
                return Err(VaultError::Codec {
                    what: "dataset identity",
                    reason: format!("{}: format {} is not supported", path.display(), id.format),
                });
            }
            if id.dataset != name {
                return Err(VaultError::Codec {
                    what: "dataset identity",
                    reason: format!(
                        "{} belongs to dataset `{}`, not `{name}`; check the dataset name and data_dir",
                        path.display(),
                        id.dataset
                    ),
                });
            }
            if id.key_id != key.key_id() {
                return Err(VaultError::WrongKey {
                    dataset: name.to_string(),
                    expected: id.key_id,
                    found: key.key_id(),
                });
            }
            Ok(())
        }
        // A dataset directory that already holds a log or state but lost its
        // identity is not new: refuse rather than stamp it with whatever key
        // was given.
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                && (dir.join("log").exists() || dir.join("state").exists()) =>
        {
            Err(VaultError::Codec {
                what: "dataset identity",
                reason: format!(
                    "{} is missing but the dataset already has a log or state; restore the file from a backup \
                     (it holds the dataset name and the key id) instead of starting over",
                    path.display()
                ),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            std::fs::create_dir_all(dir)
                .map_err(|e| VaultError::io("creating dataset directory", dir, e))?;
            let id = Identity {
                format: IDENTITY_FORMAT,
                dataset: name.to_string(),
                key_id: key.key_id(),
                created_unix: (now_ns() / 1_000_000_000) as u64,
            };
            let body = serde_json::to_vec_pretty(&id).map_err(|e| VaultError::Codec {
                what: "dataset identity",
                reason: e.to_string(),
            })?;
            write_atomic(&path, &body)
        }
        Err(e) => Err(VaultError::io("reading dataset identity", &path, e)),
    }
}

pub use crate::fs::{write_atomic, write_replace};

/// Tunables; the defaults suit production.
#[derive(Clone, Debug)]
pub struct Options {
    pub segment_bytes: u64,
    /// Create the dataset if it does not exist.
    pub create: bool,
    /// Release, through a logged Unpin, chunks pinned by a large file whose
    /// write was interrupted. Only the site that writes changes (the primary)
    /// does this; a follower's pins come from its upstream's log.
    pub release_pins: bool,
    /// The fence in force from the first moment (before the pins are
    /// released, which logs a record): a site of a takeover group opens
    /// fenced, with the agreed epochs.
    pub fence: Fence,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            segment_bytes: wal::DEFAULT_SEGMENT_BYTES,
            create: true,
            release_pins: true,
            fence: Fence::default(),
        }
    }
}

/// A change accepted into the log.
#[derive(Clone, Copy, Debug)]
pub struct Committed {
    pub seq: u64,
    pub time_ns: i64,
}

/// Why a submission was not committed.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// Chunks the ops refer to are no longer stored (freed since the writer
    /// looked); the writer attaches them and submits again.
    #[error("{} referenced chunks are not stored", .0.0.len())]
    Missing(Missing),
    #[error(transparent)]
    Vault(#[from] VaultError),
}

enum Work {
    /// A change made at this site.
    Change {
        ops: Vec<Op>,
        attachments: Vec<SealedChunk>,
    },
    /// Records received from the upstream site, as they lie in its log.
    Replicated { payloads: Vec<Vec<u8>> },
    /// A state transferred from the upstream replaces this site's copy.
    /// Its namespace is staged in the state ([`Dataset::stage_transfer`]).
    Install {
        applied: Applied,
        pins: Vec<(ChunkId, u64)>,
    },
    /// Good bytes for a stored chunk found damaged (a scrub's repair).
    Repair { chunk: SealedChunk },
    /// Answered once every submission before it is committed or refused.
    Barrier,
}

impl Work {
    fn bytes(&self) -> usize {
        match self {
            Work::Change { attachments, .. } => attachments.iter().map(|a| a.sealed.len()).sum(),
            Work::Replicated { payloads } => payloads.iter().map(|p| p.len()).sum(),
            Work::Install { .. } | Work::Repair { .. } | Work::Barrier => 0,
        }
    }
}

struct Submission {
    work: Work,
    reply: Sender<std::result::Result<Committed, SubmitError>>,
}

/// How many recent (seq, commit time) pairs are kept for lag in seconds.
const COMMIT_TIMES: usize = 1 << 20;

/// What the dataset reports about itself.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Status {
    pub head_seq: u64,
    pub applied_seq: u64,
    pub last_commit_ns: i64,
    pub chain_hash: String,
    pub digest: String,
    pub records_committed: u64,
    pub groups_committed: u64,
    pub bytes_logged: u64,
}

struct Shared {
    /// Bytes of the submissions queued for the committer and not yet taken
    /// by it, and the signal that some were taken (see [`QUEUE_BYTES`]).
    queued: Mutex<u64>,
    queue_room: std::sync::Condvar,
    head_seq: AtomicU64,
    last_commit_ns: AtomicI64,
    records: AtomicU64,
    groups: AtomicU64,
    bytes: AtomicU64,
    /// Bytes framed into the log by this process, for lag in bytes.
    bytes_total: AtomicU64,
    applied: Mutex<Applied>,
    failed: Mutex<Option<String>>,
    closed: AtomicBool,
    /// Commit time and cumulative logged bytes of recent records, oldest first.
    times: Mutex<std::collections::VecDeque<(u64, i64, u64)>>,
    /// Signalled whenever the head moves.
    head_moved: std::sync::Condvar,
    head_lock: Mutex<()>,
    /// Which epoch each seq belongs to and whether this site may write.
    fence: Mutex<Fence>,
}

/// The epochs of a dataset's history and whether this site may write now.
/// The takeover layer sets them from the sites' agreement; a dataset
/// opened without it has one epoch from seq 1 and is writable.
#[derive(Clone, Debug)]
pub struct Fence {
    /// (epoch, first seq written in it), oldest first; never empty.
    pub starts: Vec<(u64, u64)>,
    /// Why local changes are refused now, if they are.
    pub fenced: Option<String>,
    /// Replicated records past this seq are refused for now (a promotion
    /// of this site is under way at that head).
    pub replicate_up_to: Option<u64>,
}

impl Default for Fence {
    fn default() -> Self {
        Fence {
            starts: vec![(1, 1)],
            fenced: None,
            replicate_up_to: None,
        }
    }
}

impl Fence {
    /// The epoch new local records are written in.
    pub fn current(&self) -> u64 {
        self.starts.last().map_or(1, |s| s.0)
    }

    /// The epoch a record at `seq` must carry. An epoch that starts at a
    /// seq owns every seq from there up to the next epoch's start.
    pub fn epoch_of(&self, seq: u64) -> u64 {
        self.starts
            .iter()
            .rev()
            .find(|(_, start)| *start <= seq)
            .map_or(1, |s| s.0)
    }

    /// HMAC-SM3 evidence over an epoch history, under the dataset's
    /// evidence key: a site reports its epochs with it (cross-site verify),
    /// so only a holder of the key can claim an epoch.
    pub fn evidence(keys: &Keys, starts: &[(u64, u64)]) -> [u8; 32] {
        let bytes: Vec<u8> = starts
            .iter()
            .flat_map(|(e, s)| e.to_le_bytes().into_iter().chain(s.to_le_bytes()))
            .collect();
        crate::crypto::hmac_sm3(&keys.evidence, &[b"triad epochs v1", &bytes])
    }

    /// Checks a replicated record's epoch against the history this site
    /// knows: an older epoch than its seq belongs to is a former primary's
    /// write after it was replaced; a newer one is an epoch this site has
    /// not learned yet (refused until it has).
    pub fn check(&self, seq: u64, epoch: u64) -> std::result::Result<(), String> {
        if let Some(up_to) = self.replicate_up_to.filter(|up_to| seq > *up_to) {
            return Err(format!(
                "this site is being promoted at seq {up_to}: records after it are not taken now"
            ));
        }
        let want = self.epoch_of(seq);
        if epoch < want {
            return Err(format!(
                "record of stale epoch {epoch}: seq {seq} belongs to epoch {want}, \
                 so it was written by a former primary after it was replaced"
            ));
        }
        if epoch > want {
            return Err(format!(
                "record of epoch {epoch}, newer than the epoch {want} this site knows for \
                 seq {seq}; it is taken once this site has learned that epoch"
            ));
        }
        Ok(())
    }
}

/// An open dataset at this site.
pub struct Dataset {
    name: String,
    key_id: String,
    dir: PathBuf,
    keys: Keys,
    state: Arc<State>,
    tx: Mutex<Option<Sender<Submission>>>,
    shared: Arc<Shared>,
    committer: Mutex<Option<JoinHandle<()>>>,
    recovery: Recovery,
    replayed: u64,
    /// Held for the dataset's lifetime: the exclusive lock on `LOCK`.
    _lock: std::fs::File,
}

impl Dataset {
    /// Opens (or creates) a dataset: checks the key, recovers the log,
    /// replays records the state has not applied, and starts the committer.
    pub fn open(dir: &Path, name: &str, key: &DatasetKey, opts: Options) -> Result<Dataset> {
        check_identity(dir, name, key, opts.create)?;
        // One writer per dataset: a second daemon must not even look at the
        // log's tail, since recovery may cut it.
        let lock_path = dir.join("LOCK");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| VaultError::io("opening dataset lock", &lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(VaultError::Closed(format!(
                "dataset {name} in {} is open in another process (is a daemon already running?)",
                dir.display()
            )))
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(VaultError::io("locking dataset", &lock_path, e))
            }
        }
        // Readers that died left pinned copies that hold deleted files' space.
        crate::pin::sweep_dead(&dir.join(crate::pin::VIEWS_DIR));
        let keys = key.derive();
        // The state first: its applied seq tells recovery which records were
        // acknowledged and may never be cut.
        let state = State::open(&dir.join("state"))?;
        // An install of a transfer carried out in batches is finished
        // first, then the log is restarted after it.
        if state.finish_transfer_install()? {
            tracing::warn!(
                dataset = name,
                "finished installing a state transfer that a crash interrupted"
            );
        }
        finish_interrupted_install(&dir.join("log"), &state)?;
        let applied = state.applied()?;
        let (wal, recovery) = Wal::open(&dir.join("log"), opts.segment_bytes, applied.seq)?;
        let head = wal.next_seq() - 1;
        if applied.seq > head {
            return Err(VaultError::LogGap {
                dir: wal.dir().to_path_buf(),
                reason: format!(
                    "the log ends at seq {head} but the state has applied seq {}: acknowledged records are \
                     missing from the log; keep the directory for inspection and rebuild this site's copy \
                     from a healthy one",
                    applied.seq
                ),
            });
        }
        let replayed = replay(&state, &keys, wal.dir(), applied.clone())?;
        let applied = state.applied()?;
        if applied.seq != head || (head > 0 && applied.hash != wal.last_hash()) {
            return Err(VaultError::LogGap {
                dir: wal.dir().to_path_buf(),
                reason: format!(
                    "after replay the state is at seq {} but the log at {head}",
                    applied.seq
                ),
            });
        }
        if replayed > 0 {
            state.flush()?;
        }
        let shared = Arc::new(Shared {
            queued: Mutex::new(0),
            queue_room: std::sync::Condvar::new(),
            head_seq: AtomicU64::new(head),
            last_commit_ns: AtomicI64::new(wal.last_time_ns()),
            records: AtomicU64::new(0),
            groups: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            bytes_total: AtomicU64::new(0),
            applied: Mutex::new(applied),
            failed: Mutex::new(None),
            closed: AtomicBool::new(false),
            times: Mutex::new(std::collections::VecDeque::new()),
            head_moved: std::sync::Condvar::new(),
            head_lock: Mutex::new(()),
            fence: Mutex::new(opts.fence.clone()),
        });
        let state = Arc::new(state);
        let (tx, rx) = bounded::<Submission>(1024);
        let committer = {
            let (state, keys, shared) = (state.clone(), keys.clone(), shared.clone());
            std::thread::Builder::new()
                .name(format!("commit-{name}"))
                .spawn(move || commit_loop(wal, state, keys, shared, rx))
                .map_err(|e| VaultError::io("starting committer thread", dir, e))?
        };
        let ds = Dataset {
            name: name.to_string(),
            key_id: key.key_id(),
            dir: dir.to_path_buf(),
            keys,
            state,
            tx: Mutex::new(Some(tx)),
            shared,
            committer: Mutex::new(Some(committer)),
            recovery,
            replayed,
            _lock: lock,
        };
        // Chunks pinned by a file that was still being written when the last
        // run stopped: released through the log, so every site agrees. A
        // fenced site logs nothing: its owner releases them once it may.
        if opts.release_pins && opts.fence.fenced.is_none() {
            ds.release_pins()?;
        }
        Ok(ds)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Public fingerprint of the dataset key, as in `IDENTITY`.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// Records replayed from the log into the state at open.
    pub fn replayed(&self) -> u64 {
        self.replayed
    }

    /// Logs ops (and the chunks they bring) durably and applies them. Blocks
    /// until the record is fsynced and applied.
    pub fn submit(
        &self,
        ops: Vec<Op>,
        attachments: Vec<SealedChunk>,
    ) -> std::result::Result<Committed, SubmitError> {
        self.send_work(Work::Change { ops, attachments })
    }

    /// As [`Dataset::submit`], without waiting: the change is queued for
    /// the committer and the ticket answers once it is durable and applied.
    /// A writer with many small changes queues them all and then waits, so
    /// they share group commits instead of paying one fsync each.
    pub fn submit_queued(
        &self,
        ops: Vec<Op>,
        attachments: Vec<SealedChunk>,
    ) -> std::result::Result<Ticket<'_>, SubmitError> {
        let rx = self.queue_work(Work::Change { ops, attachments })?;
        Ok(Ticket { ds: self, rx })
    }

    /// Hands work to the committer and waits for its answer.
    fn send_work(&self, work: Work) -> std::result::Result<Committed, SubmitError> {
        let rx = self.queue_work(work)?;
        rx.recv().map_err(|_| self.closed_error())?
    }

    /// Hands work to the committer; its answer arrives on the receiver.
    fn queue_work(
        &self,
        work: Work,
    ) -> std::result::Result<Receiver<std::result::Result<Committed, SubmitError>>, SubmitError>
    {
        let (reply, rx) = bounded(1);
        // Room by bytes as well as by count: 1,024 queued changes of a few
        // MiB each (a file's last batch of chunks travels with its record)
        // held hundreds of MiB while the committer caught up.
        let bytes = work.bytes() as u64;
        {
            let mut q = self
                .shared
                .queued
                .lock()
                .map_err(|_| VaultError::Closed("lock poisoned".into()))?;
            while *q > 0 && *q + bytes > QUEUE_BYTES {
                // A committer that stopped takes nothing more.
                let failed = self.shared.failed.lock().map_or(true, |f| f.is_some());
                if failed || self.shared.closed.load(Ordering::Acquire) {
                    return Err(self.closed_error().into());
                }
                q = self
                    .shared
                    .queue_room
                    .wait_timeout(q, std::time::Duration::from_millis(100))
                    .map_err(|_| VaultError::Closed("lock poisoned".into()))?
                    .0;
            }
            *q += bytes;
        }
        let sent = (|| -> std::result::Result<(), SubmitError> {
            let tx = self
                .tx
                .lock()
                .map_err(|_| VaultError::Closed("lock poisoned".into()))?
                .clone()
                .ok_or_else(|| VaultError::Closed(format!("dataset {} is closed", self.name)))?;
            tx.send(Submission { work, reply })
                .map_err(|_| self.closed_error())?;
            Ok(())
        })();
        if let Err(e) = sent {
            took_off_queue(&self.shared, bytes);
            return Err(e);
        }
        Ok(rx)
    }

    /// Appends records received from the upstream (their payloads exactly as
    /// in the upstream's log), checking that they continue this site's hash
    /// chain, and applies them. Returns once they are durable here.
    pub fn append_replicated(
        &self,
        payloads: Vec<Vec<u8>>,
    ) -> std::result::Result<Committed, SubmitError> {
        self.send_work(Work::Replicated { payloads })
    }

    /// Starts receiving a state transfer in parts: whatever an earlier one
    /// that was cut short staged is dropped.
    pub fn clear_transfer(&self) -> Result<()> {
        self.state.clear_transfer()
    }

    /// Stages part of a transferred namespace in the state, beside this
    /// copy's own, so the namespace is never held whole in memory (a
    /// follower receiving a transfer, a restore filling its scratch copy
    /// from a snapshot a page at a time); [`Dataset::install_staged`] then
    /// installs it.
    pub fn stage_transfer(&self, entries: &[(Vec<u8>, Entry)]) -> Result<()> {
        self.state.stage_transfer(entries)
    }

    /// The staged entries of a transfer, in path order, one at a time.
    pub fn staged_entries(&self) -> Result<impl Iterator<Item = Result<(Vec<u8>, Entry)>> + '_> {
        self.state.transfer_iter()
    }

    /// Replaces this site's copy with the state transferred from the
    /// upstream (the namespace at `applied.seq`) staged with
    /// [`Dataset::stage_transfer`], installed a batch at a time
    /// (`State::install_transferred`); its chunks must have been staged.
    pub fn install_staged(
        &self,
        applied: Applied,
        pins: Vec<(ChunkId, u64)>,
    ) -> std::result::Result<Committed, SubmitError> {
        self.send_work(Work::Install { applied, pins })
    }

    /// Replaces the stored bytes of a chunk found damaged with `chunk`, which
    /// must be exactly what the chunk's metadata records (sealing is
    /// deterministic, so every healthy copy holds these bytes). Serialized
    /// with commits, so no apply races it.
    pub fn repair_chunk(&self, chunk: SealedChunk) -> std::result::Result<(), SubmitError> {
        self.send_work(Work::Repair { chunk }).map(|_| ())
    }

    /// Stores chunks that arrive during a state transfer.
    pub fn stage_chunks(&self, chunks: &[SealedChunk]) -> Result<()> {
        self.state.stage_chunks(chunks)
    }

    /// Records chunks by their metadata alone (`State::stage_chunk_meta`).
    pub fn stage_chunk_meta(&self, chunks: &[(ChunkId, crate::state::ChunkMeta)]) -> Result<()> {
        self.state.stage_chunk_meta(chunks)
    }

    /// Makes the state durable and returns the seq it is durable to: the log
    /// before it is no longer needed for this site's own recovery.
    pub fn flush_state(&self) -> Result<u64> {
        let seq = self.shared.applied.lock().map(|a| a.seq).unwrap_or(0);
        self.state.flush()?;
        Ok(seq)
    }

    /// The newest checkpoint, if any.
    pub fn latest_checkpoint(&self) -> Result<Option<crate::state::Checkpoint>> {
        self.state.latest_checkpoint()
    }

    /// The chain hash after record `seq` of this site's history, if known
    /// (see [`crate::state::State::chain_hash_at`]).
    pub fn chain_hash_at(&self, seq: u64) -> Result<Option<crate::record::Hash>> {
        self.state.chain_hash_at(seq)
    }

    /// The checkpoint recorded at `seq`, if one was.
    pub fn checkpoint_at(&self, seq: u64) -> Result<Option<crate::state::Checkpoint>> {
        self.state.checkpoint_at(seq)
    }

    /// Durable head of this site's log.
    pub fn head_seq(&self) -> u64 {
        self.shared.head_seq.load(Ordering::Acquire)
    }

    /// Blocks until the head passes `seq` or `timeout` runs out; returns the head.
    pub fn wait_head_above(&self, seq: u64, timeout: std::time::Duration) -> u64 {
        let deadline = std::time::Instant::now() + timeout;
        let Ok(mut guard) = self.shared.head_lock.lock() else {
            return self.head_seq();
        };
        loop {
            let head = self.head_seq();
            let now = std::time::Instant::now();
            if head > seq || now >= deadline || self.shared.closed.load(Ordering::Acquire) {
                return head;
            }
            match self.shared.head_moved.wait_timeout(guard, deadline - now) {
                Ok((g, _)) => guard = g,
                Err(_) => return self.head_seq(),
            }
        }
    }

    /// Commit time of a recent record (the last million are remembered).
    pub fn commit_time(&self, seq: u64) -> Option<i64> {
        self.recent(seq).map(|(t, _)| t)
    }

    /// Log bytes written after `seq` up to the head, when `seq` is recent.
    pub fn bytes_after(&self, seq: u64) -> Option<u64> {
        let t = self.shared.times.lock().ok()?;
        let last = t.back()?.2;
        if seq < t.front()?.0 {
            return None;
        }
        let first = t.front()?.0;
        let at = t.get((seq - first) as usize).map(|e| e.2).unwrap_or(last);
        Some(last.saturating_sub(at))
    }

    fn recent(&self, seq: u64) -> Option<(i64, u64)> {
        let t = self.shared.times.lock().ok()?;
        let first = t.front()?.0;
        if seq < first {
            return None;
        }
        t.get((seq - first) as usize)
            .filter(|e| e.0 == seq)
            .map(|e| (e.1, e.2))
    }

    /// The chain hash after the last applied record.
    pub fn chain_hash(&self) -> Hash {
        self.shared
            .applied
            .lock()
            .map(|a| a.hash)
            .unwrap_or_default()
    }

    fn closed_error(&self) -> VaultError {
        let why = self
            .shared
            .failed
            .lock()
            .ok()
            .and_then(|f| f.clone())
            .unwrap_or_else(|| "stopped".into());
        VaultError::Closed(format!("dataset {}: {why}", self.name))
    }

    /// True if the chunk is stored (with at least one reference).
    pub fn has_chunk(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.state.chunk_meta(id)?.is_some())
    }

    pub fn entry(&self, path: &[u8]) -> Result<Option<Entry>> {
        self.state.entry(path)
    }

    pub fn entries_with_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Entry)>> {
        self.state.entries_with_prefix(prefix)
    }

    /// The entries whose paths start with `prefix`, in path order, read one
    /// at a time (`State::entries_under`).
    pub fn entries_under<'s>(
        &'s self,
        prefix: &'s [u8],
    ) -> Result<impl Iterator<Item = Result<(Vec<u8>, Entry)>> + 's> {
        self.state.entries_under(prefix)
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// The error that stopped the committer, if one did.
    /// Releases, through a logged Unpin, the chunks pinned by a large file
    /// whose write was interrupted (no put may be streaming meanwhile).
    pub fn release_pins(&self) -> Result<()> {
        let pins = self.state.pins()?;
        if pins.is_empty() {
            return Ok(());
        }
        let ids: Vec<ChunkId> = pins
            .iter()
            .flat_map(|(id, n)| std::iter::repeat_n(*id, *n as usize))
            .collect();
        tracing::info!(
            dataset = %self.name,
            chunks = ids.len(),
            "releasing chunks pinned by an interrupted write"
        );
        self.submit(vec![Op::Unpin { ids }], Vec::new())
            .map_err(|e| match e {
                SubmitError::Vault(v) => v,
                SubmitError::Missing(_) => VaultError::Closed("releasing pins".into()),
            })?;
        Ok(())
    }

    /// Returns once everything submitted before it has been committed or
    /// refused: after a fence goes up, the head no longer moves.
    pub fn barrier(&self) -> Result<()> {
        self.send_work(Work::Barrier)
            .map(|_| ())
            .map_err(|e| match e {
                SubmitError::Vault(v) => v,
                SubmitError::Missing(_) => VaultError::Closed("barrier".into()),
            })
    }

    /// Sets the epochs of this dataset's history and whether local changes
    /// are taken (`fenced: Some(why)` refuses them with
    /// [`VaultError::Fenced`]). Takes effect from the next group the
    /// committer builds.
    pub fn set_fence(&self, fence: Fence) {
        if let Ok(mut f) = self.shared.fence.lock() {
            *f = fence;
        }
    }

    /// Bytes of changes queued for the committer and not yet taken by it;
    /// at most 64 MiB, or one larger change alone.
    pub fn queued_bytes(&self) -> u64 {
        self.shared.queued.lock().map_or(0, |q| *q)
    }

    /// The epochs this site's log holds: the fence's, cut before the first
    /// epoch whose first record here carries an older epoch. Such a log
    /// went on past the fork (a former primary's tail, until rejoin cuts
    /// it), so it holds the older history there, whatever the site has
    /// learned since. An epoch that starts past the head is kept: the log
    /// is a prefix of it.
    pub fn held_epochs(&self) -> Result<Vec<(u64, u64)>> {
        let starts = self.fence().starts;
        let head = self.head_seq();
        let mut held = Vec::with_capacity(starts.len());
        let log = self.dir.join("log");
        for (i, (epoch, start)) in starts.iter().copied().enumerate() {
            // A log that went past the start in an older epoch left this
            // history there (retention may have removed the record at the
            // start itself: `wal::epoch_from`).
            if i > 0 && start <= head && wal::epoch_from(&log, start)?.is_some_and(|e| e < epoch) {
                break;
            }
            held.push((epoch, start));
        }
        Ok(held)
    }

    /// The epochs and fenced state in force.
    pub fn fence(&self) -> Fence {
        self.shared
            .fence
            .lock()
            .map(|f| f.clone())
            .unwrap_or_default()
    }

    /// Stops the dataset from outside (its key may no longer be used):
    /// commits are refused from now on with `why`, and the daemon, which
    /// watches [`Dataset::failure`], stops. The first reason stays.
    pub fn fail(&self, why: String) {
        if let Ok(mut f) = self.shared.failed.lock() {
            if f.is_none() {
                tracing::error!(dataset = %self.name, reason = %why, "dataset stopped");
                *f = Some(why);
            }
        }
    }

    pub fn failure(&self) -> Option<String> {
        self.shared.failed.lock().ok().and_then(|f| f.clone())
    }

    pub fn status(&self) -> Status {
        let applied = self
            .shared
            .applied
            .lock()
            .map(|a| a.clone())
            .unwrap_or_default();
        Status {
            head_seq: self.shared.head_seq.load(Ordering::Acquire),
            applied_seq: applied.seq,
            last_commit_ns: self.shared.last_commit_ns.load(Ordering::Acquire),
            chain_hash: hex::encode(applied.hash),
            digest: hex::encode(applied.digest.summary()),
            records_committed: self.shared.records.load(Ordering::Relaxed),
            groups_committed: self.shared.groups.load(Ordering::Relaxed),
            bytes_logged: self.shared.bytes.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting changes, lets the committer finish what it holds, and
    /// flushes the state so the next open replays nothing.
    pub fn close(&self) -> Result<()> {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Some(h) = self.committer.lock().ok().and_then(|mut c| c.take()) {
            let _ = h.join();
        }
        self.state.flush()
    }
}

impl Drop for Dataset {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!(dataset = %self.name, error = %e, "closing dataset");
        }
    }
}

/// Applies log records after `applied.seq` to the state, one batch each.
/// Applies one record read back from the log to `ov`, first checking it
/// continues the chain hash the overlay stands at.
fn apply_logged(ov: &mut Overlay, state: &State, keys: &Keys, r: &wal::ReadRecord) -> Result<()> {
    let at = ov.applied();
    if at.seq > 0 && r.record.seq == at.seq + 1 && r.record.prev_hash != at.hash {
        return Err(VaultError::BadRecord {
            seq: r.record.seq,
            reason: "its previous hash differs from the chain hash the state recorded".into(),
        });
    }
    let ops = r.record.open_ops(keys)?;
    ov.apply(
        state,
        keys,
        r.record.seq,
        r.hash,
        r.record.time_ns,
        &ops,
        &r.record.attachments,
    )?;
    Ok(())
}

fn replay(state: &State, keys: &Keys, log_dir: &Path, applied: Applied) -> Result<u64> {
    let mut n = 0u64;
    let mut current = applied;
    wal::read_from(log_dir, current.seq + 1, |r| {
        let mut ov = Overlay::new(current.clone());
        apply_logged(&mut ov, state, keys, &r)?;
        let (batch, a) = ov.into_batch(state)?;
        state.write(batch)?;
        current = a;
        n += 1;
        Ok(())
    })?;
    if n > 0 {
        tracing::info!(
            records = n,
            to_seq = current.seq,
            "replayed the change log into the state"
        );
    }
    Ok(n)
}

/// Bytes queued for the committer (by all writers together) beyond which a
/// new submission waits for the committer to take some: a writer's chunks
/// are in memory from when it queues them until the committer writes them.
/// One submission larger than this still goes, alone.
const QUEUE_BYTES: u64 = 64 << 20;

/// Counts `bytes` as taken off the queue by the committer (or never put on
/// it) and wakes writers waiting for room.
fn took_off_queue(shared: &Shared, bytes: u64) {
    if let Ok(mut q) = shared.queued.lock() {
        *q = q.saturating_sub(bytes);
    }
    shared.queue_room.notify_all();
}

/// The committer thread: takes everything queued, builds each group's
/// records, writes them under one fsync, applies them to the state as one
/// batch and only then answers each writer.
fn commit_loop(
    mut wal: Wal,
    state: Arc<State>,
    keys: Keys,
    shared: Arc<Shared>,
    rx: Receiver<Submission>,
) {
    let mut applied = match shared.applied.lock() {
        Ok(a) => a.clone(),
        Err(_) => return,
    };
    let mut carried: Option<Submission> = None;
    loop {
        let first = match carried.take() {
            Some(s) => s,
            None => match rx.recv() {
                Ok(s) => {
                    took_off_queue(&shared, s.work.bytes() as u64);
                    s
                }
                Err(_) => break,
            },
        };
        if let Work::Repair { .. } = &first.work {
            run_repair(&state, &applied, first);
            continue;
        }
        if let Work::Install { .. } = &first.work {
            run_install(&mut wal, &state, &keys, &shared, &mut applied, first);
            continue;
        }
        if let Work::Barrier = &first.work {
            let _ = first.reply.send(Ok(Committed {
                seq: applied.seq,
                time_ns: 0,
            }));
            continue;
        }
        let (mut group, bytes) = gather_group(first, &rx, &shared, &mut carried);
        if let Some(why) = shared.failed.lock().ok().and_then(|f| f.clone()) {
            for s in group {
                let _ = s.reply.send(Err(VaultError::Closed(why.clone()).into()));
            }
            continue;
        }
        let fence = shared.fence.lock().map(|f| f.clone()).unwrap_or_default();
        let GroupDraft {
            ov,
            frames,
            accepted,
            prev,
            time_ns,
            times,
            ..
        } = build_group(
            &wal, &state, &keys, &shared, &applied, &fence, &mut group, bytes,
        );
        if accepted.is_empty() {
            continue;
        }
        let last_seq = accepted[accepted.len() - 1].seq;
        if let Err(e) = wal.append_sync(&frames, last_seq, prev, time_ns) {
            answer_failed_append(&wal, group, &e);
            continue;
        }
        let result = ov.into_batch(&state).and_then(|(batch, a)| {
            state.write(batch)?;
            Ok(a)
        });
        let pending: Vec<(Submission, Committed)> = group.into_iter().zip(accepted).collect();
        match result {
            Ok(a) => {
                applied = a;
                publish_commit(&shared, &applied, last_seq, time_ns, times, &frames);
                for (s, c) in pending {
                    let _ = s.reply.send(Ok(c));
                }
            }
            Err(e) => {
                // The records are durable but the state could not take them:
                // answer with an error and stop; a restart replays them.
                shared.head_seq.store(last_seq, Ordering::Release);
                fail(
                    &shared,
                    format!("state write failed after the log was synced: {e}; restart to replay"),
                    pending,
                );
            }
        }
    }
}

/// Stores the good bytes of a damaged chunk (a scrub's repair) and answers
/// the caller with the seq and time the state stands at. Runs on its own,
/// outside any group, because it writes no record.
fn run_repair(state: &State, applied: &Applied, first: Submission) {
    let Submission { work, reply } = first;
    if let Work::Repair { chunk } = work {
        let res = state
            .repair_chunk(&chunk)
            .map(|_| Committed {
                seq: applied.seq,
                time_ns: applied.time_ns,
            })
            .map_err(SubmitError::from);
        let _ = reply.send(res);
    }
}

/// Installs a transferred state on its own, outside any group, and answers
/// the caller. Only when the install succeeded does the committer continue
/// from the installed `applied`.
fn run_install(
    wal: &mut Wal,
    state: &State,
    keys: &Keys,
    shared: &Shared,
    applied: &mut Applied,
    first: Submission,
) {
    let Submission { work, reply } = first;
    if let Work::Install { applied: a, pins } = work {
        let res = install(wal, state, keys, shared, a.clone(), &pins);
        if res.is_ok() {
            *applied = a;
        }
        let _ = reply.send(res);
    }
}

/// Gathers a commit group: `first` and whatever else is already queued, up
/// to [`GROUP_BYTES`]. An install or repair ends the group and is left in
/// `carried`, to run on its own once this group is done. Returns the group
/// and its byte count.
fn gather_group(
    first: Submission,
    rx: &Receiver<Submission>,
    shared: &Shared,
    carried: &mut Option<Submission>,
) -> (Vec<Submission>, usize) {
    let mut group = vec![first];
    let mut bytes: usize = group[0].work.bytes();
    while bytes < GROUP_BYTES {
        let next = rx.try_recv();
        if let Ok(s) = &next {
            took_off_queue(shared, s.work.bytes() as u64);
        }
        match next {
            Ok(s)
                if matches!(
                    s.work,
                    Work::Install { .. } | Work::Repair { .. } | Work::Barrier
                ) =>
            {
                *carried = Some(s);
                break;
            }
            Ok(s) => {
                bytes += s.work.bytes();
                group.push(s);
            }
            Err(_) => break,
        }
    }
    (group, bytes)
}

/// The records of one commit group as they are built: the overlay they
/// apply to, their frames, the writers' answers-to-be, and where the chain,
/// seq and commit time stand after the last record.
struct GroupDraft {
    ov: Overlay,
    frames: Vec<u8>,
    accepted: Vec<Committed>,
    times: Vec<(u64, i64, u64)>,
    base_bytes: u64,
    prev: Hash,
    seq: u64,
    time_ns: i64,
}

impl GroupDraft {
    /// Adds the frame of one record that was checked and applied to the
    /// overlay, and moves the chain, seq and commit time past it.
    fn push_frame(&mut self, payload: &[u8], hash: Hash, time_ns: i64) {
        self.frames
            .extend_from_slice(&frame(payload, self.frames.is_empty()));
        self.times.push((
            self.seq,
            time_ns,
            self.base_bytes + self.frames.len() as u64,
        ));
        self.time_ns = time_ns;
        self.prev = hash;
        self.seq += 1;
    }

    /// Builds the records of one submission into the draft. On error the
    /// submission must be refused (the draft may hold part of it).
    fn add_work(
        &mut self,
        state: &State,
        keys: &Keys,
        fence: &Fence,
        now: i64,
        work: &Work,
    ) -> std::result::Result<(), SubmitError> {
        match work {
            Work::Change { .. } if fence.fenced.is_some() => {
                Err(VaultError::Fenced(fence.fenced.clone().unwrap_or_default()).into())
            }
            Work::Change { ops, attachments } => build_change(
                state,
                keys,
                &mut self.ov,
                self.seq,
                fence.current(),
                now,
                self.prev,
                ops,
                attachments,
            )
            .map(|(payload, hash)| self.push_frame(&payload, hash, now)),
            Work::Install { .. } | Work::Repair { .. } | Work::Barrier => {
                Err(VaultError::Closed("install, repair or barrier out of turn".into()).into())
            }
            Work::Replicated { payloads } => {
                let mut r = Ok(());
                for p in payloads {
                    match check_replicated(state, keys, fence, &mut self.ov, self.seq, self.prev, p)
                    {
                        Ok((hash, t)) => self.push_frame(p, hash, t),
                        Err(e) => {
                            r = Err(e);
                            break;
                        }
                    }
                }
                r
            }
        }
    }
}

/// Builds the group's records, refusing (and answering) each submission
/// that cannot apply until the rest build cleanly. The submissions left in
/// `group` are the ones the returned draft accepted, in order.
#[allow(clippy::too_many_arguments)]
fn build_group(
    wal: &Wal,
    state: &State,
    keys: &Keys,
    shared: &Shared,
    applied: &Applied,
    fence: &Fence,
    group: &mut Vec<Submission>,
    bytes: usize,
) -> GroupDraft {
    // Build the group's records over a fresh overlay. A submission that
    // cannot apply (its own ops free a chunk it then needs) is refused and
    // the group is rebuilt without it, so one bad call never half-applies.
    loop {
        match draft_group(wal, state, keys, shared, applied, fence, group, bytes) {
            Ok(draft) => break draft,
            Err((i, err)) => {
                let s = group.remove(i);
                let _ = s.reply.send(Err(err));
            }
        }
    }
}

/// One attempt at building the group's records over a fresh overlay from
/// `applied`, continuing the log where it stands. Returns the index of the
/// first submission that cannot apply, with why, so it can be refused.
#[allow(clippy::too_many_arguments)]
fn draft_group(
    wal: &Wal,
    state: &State,
    keys: &Keys,
    shared: &Shared,
    applied: &Applied,
    fence: &Fence,
    group: &[Submission],
    bytes: usize,
) -> std::result::Result<GroupDraft, (usize, SubmitError)> {
    let ov = Overlay::new(applied.clone());
    let frames = Vec::with_capacity(bytes + group.len() * 256);
    let accepted: Vec<Committed> = Vec::with_capacity(group.len());
    let times: Vec<(u64, i64, u64)> = Vec::with_capacity(group.len());
    let base_bytes = shared.bytes_total.load(Ordering::Acquire);
    let prev: Hash = wal.last_hash();
    let seq = wal.next_seq();
    let now = now_ns().max(wal.last_time_ns());
    let time_ns = wal.last_time_ns();
    let mut draft = GroupDraft {
        ov,
        frames,
        accepted,
        times,
        base_bytes,
        prev,
        seq,
        time_ns,
    };
    for (i, s) in group.iter().enumerate() {
        match draft.add_work(state, keys, fence, now, &s.work) {
            Ok(()) => draft.accepted.push(Committed {
                seq: draft.seq - 1,
                time_ns: draft.time_ns,
            }),
            Err(e) => return Err((i, e)),
        }
    }
    Ok(draft)
}

/// Answers every writer of a group whose log write failed.
fn answer_failed_append(wal: &Wal, group: Vec<Submission>, e: &VaultError) {
    // Nothing of this group is durable and the log was cut back; the
    // writers get the error and may retry (a full disk being freed).
    tracing::error!(error = %e, "change log write failed; the changes were not acknowledged");
    let why = e.to_string();
    for s in group {
        let _ = s.reply.send(Err(VaultError::io(
            "appending to change log",
            wal.dir(),
            std::io::Error::other(why.clone()),
        )
        .into()));
    }
}

/// Publishes a group that is durable in the log and applied to the state:
/// the applied position, head, counters and commit times, then wakes those
/// waiting for the head to move. The writers are answered after this.
fn publish_commit(
    shared: &Shared,
    applied: &Applied,
    last_seq: u64,
    time_ns: i64,
    times: Vec<(u64, i64, u64)>,
    frames: &[u8],
) {
    if let Ok(mut g) = shared.applied.lock() {
        *g = applied.clone();
    }
    shared.head_seq.store(last_seq, Ordering::Release);
    shared.last_commit_ns.store(time_ns, Ordering::Release);
    shared
        .records
        .fetch_add(times.len() as u64, Ordering::Relaxed);
    shared.groups.fetch_add(1, Ordering::Relaxed);
    shared
        .bytes
        .fetch_add(frames.len() as u64, Ordering::Relaxed);
    shared
        .bytes_total
        .fetch_add(frames.len() as u64, Ordering::Release);
    if let Ok(mut t) = shared.times.lock() {
        t.extend(times);
        while t.len() > COMMIT_TIMES {
            t.pop_front();
        }
    }
    if let Ok(_g) = shared.head_lock.lock() {
        shared.head_moved.notify_all();
    }
}

const TRANSFER_FILE: &str = "TRANSFER";

/// Installs a transferred state (its namespace staged in the state): the
/// state first (durably), then the log is restarted after it. `log/TRANSFER` marks the step in between, so a crash
/// there is finished at the next open instead of leaving the state ahead of
/// the log.
fn install(
    wal: &mut Wal,
    state: &State,
    keys: &Keys,
    shared: &Shared,
    applied: Applied,
    pins: &[(ChunkId, u64)],
) -> std::result::Result<Committed, SubmitError> {
    let base = wal::Base {
        seq: applied.seq,
        hash: applied.hash,
        time_ns: applied.time_ns,
    };
    let marker = wal.dir().join(TRANSFER_FILE);
    write_atomic(&marker, &base.encode())?;
    if let Err(e) = state.install_transferred(keys, applied.clone(), pins) {
        if !state.install_pending().unwrap_or(true) {
            // Nothing was installed: the transfer can simply be tried again.
            let _ = std::fs::remove_file(&marker);
            return Err(e.into());
        }
        // The install stopped part way: the namespace is partly the
        // transferred one. The next open finishes it, then the log.
        let why =
            format!("installing a transferred state stopped half way ({e}); restart to finish it");
        if let Ok(mut f) = shared.failed.lock() {
            *f = Some(why.clone());
        }
        tracing::error!("{why}");
        return Err(VaultError::Closed(why).into());
    }
    // From here the state is at the transferred seq. Any failure stops the
    // dataset; the next open finishes the job from the marker.
    let finish = wal.reset_to(base).and_then(|_| {
        std::fs::remove_file(&marker)
            .map_err(|e| VaultError::io("removing transfer marker", &marker, e))?;
        // The marker must not come back after a power loss: it would reset
        // the log again over records appended since.
        std::fs::File::open(wal.dir())
            .and_then(|d| d.sync_all())
            .map_err(|e| VaultError::io("syncing log directory", wal.dir(), e))
    });
    if let Err(e) = finish {
        let why =
            format!("installing a transferred state stopped half way ({e}); restart to finish it");
        if let Ok(mut f) = shared.failed.lock() {
            *f = Some(why.clone());
        }
        tracing::error!("{why}");
        return Err(VaultError::Closed(why).into());
    }
    // Into an empty copy (a new site's first sync, a restore's scratch copy)
    // an install is routine; over records this site had, it is news.
    let was_empty = shared.head_seq.load(Ordering::Acquire) == 0;
    if let Ok(mut g) = shared.applied.lock() {
        *g = applied.clone();
    }
    if let Ok(mut t) = shared.times.lock() {
        t.clear();
    }
    shared.head_seq.store(applied.seq, Ordering::Release);
    shared
        .last_commit_ns
        .store(applied.time_ns, Ordering::Release);
    if let Ok(_g) = shared.head_lock.lock() {
        shared.head_moved.notify_all();
    }
    if was_empty {
        tracing::info!(
            seq = applied.seq,
            "installed a transferred state into an empty copy; the log continues after it"
        );
    } else {
        tracing::warn!(
            seq = applied.seq,
            "installed a state transferred from the upstream; the log restarts after it"
        );
    }
    Ok(Committed {
        seq: applied.seq,
        time_ns: applied.time_ns,
    })
}

/// Finishes an install a crash interrupted between the state and the log.
fn finish_interrupted_install(log_dir: &Path, state: &State) -> Result<()> {
    let marker = log_dir.join(TRANSFER_FILE);
    let Ok(b) = std::fs::read(&marker) else {
        return Ok(());
    };
    let applied_seq = state.applied()?.seq;
    if let Some(base) = wal::Base::decode(&b).filter(|b| b.seq == applied_seq) {
        let (mut w, _) = Wal::open(log_dir, wal::DEFAULT_SEGMENT_BYTES, 0)?;
        w.reset_to(base)?;
        tracing::warn!(
            seq = base.seq,
            "finished a state-transfer install that a crash interrupted"
        );
    }
    std::fs::remove_file(&marker)
        .map_err(|e| VaultError::io("removing transfer marker", &marker, e))?;
    std::fs::File::open(log_dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| VaultError::io("syncing log directory", log_dir, e))
}

/// Seals a local change into a record at `seq` and applies it to the overlay.
#[allow(clippy::too_many_arguments)]
fn build_change(
    state: &State,
    keys: &Keys,
    ov: &mut Overlay,
    seq: u64,
    epoch: u64,
    time_ns: i64,
    prev: Hash,
    ops: &[Op],
    attachments: &[SealedChunk],
) -> std::result::Result<(Vec<u8>, Hash), SubmitError> {
    let m = ov.missing(state, ops, attachments)?;
    if !m.0.is_empty() {
        return Err(SubmitError::Missing(m));
    }
    let payload = Record::encode_payload_parts(keys, seq, epoch, time_ns, prev, ops, attachments);
    if payload.len() > MAX_SUBMIT {
        return Err(VaultError::BadRecord {
            seq,
            reason: format!(
                "{} bytes is over the {MAX_SUBMIT} byte limit for one change",
                payload.len()
            ),
        }
        .into());
    }
    let hash = chain(&prev, &payload);
    ov.apply(state, keys, seq, hash, time_ns, ops, attachments)?;
    Ok((payload, hash))
}

/// Checks that a record from the upstream continues this site's log at
/// `seq` after `prev`, and applies it to the overlay. Returns its chain hash
/// and commit time.
fn check_replicated(
    state: &State,
    keys: &Keys,
    fence: &Fence,
    ov: &mut Overlay,
    seq: u64,
    prev: Hash,
    payload: &[u8],
) -> std::result::Result<(Hash, i64), SubmitError> {
    let rec = Record::decode_payload(payload).ok_or_else(|| VaultError::BadRecord {
        seq,
        reason: "the upstream sent a malformed record".into(),
    })?;
    if rec.seq != seq {
        return Err(VaultError::BadRecord {
            seq,
            reason: format!(
                "the upstream sent seq {} where seq {seq} was expected",
                rec.seq
            ),
        }
        .into());
    }
    if let Err(reason) = fence.check(seq, rec.epoch) {
        return Err(VaultError::Epoch { seq, reason }.into());
    }
    if rec.prev_hash != prev {
        return Err(VaultError::Diverged {
            seq,
            ours: hex::encode(prev),
            theirs: hex::encode(rec.prev_hash),
        }
        .into());
    }
    let ops = rec.open_ops(keys)?;
    let hash = chain(&prev, payload);
    ov.apply(state, keys, seq, hash, rec.time_ns, &ops, &rec.attachments)?;
    Ok((hash, rec.time_ns))
}

fn fail(shared: &Shared, why: String, pending: Vec<(Submission, Committed)>) {
    tracing::error!(reason = %why, "committer stopped");
    if let Ok(mut f) = shared.failed.lock() {
        *f = Some(why.clone());
    }
    for (s, _) in pending {
        let _ = s.reply.send(Err(VaultError::Closed(why.clone()).into()));
    }
}

/// A change queued with [`Dataset::submit_queued`].
pub struct Ticket<'a> {
    ds: &'a Dataset,
    rx: Receiver<std::result::Result<Committed, SubmitError>>,
}

impl Ticket<'_> {
    /// Waits until the change is durable and applied (or refused), as
    /// [`Dataset::submit`] answers.
    pub fn wait(self) -> std::result::Result<Committed, SubmitError> {
        self.rx.recv().map_err(|_| self.ds.closed_error())?
    }
}

/// A read-only view of a dataset as of its log's head, usable while a daemon
/// runs: the state as last flushed plus the log tail replayed in memory.
pub struct View {
    state: State,
    overlay: Overlay,
    keys: Keys,
}

impl View {
    pub fn open(dir: &Path, name: &str, key: &DatasetKey) -> Result<View> {
        check_identity(dir, name, key, false)?;
        let keys = key.derive();
        let mut attempt = 0;
        loop {
            let state = State::open_read_only(&dir.join("state"))?;
            if state.install_pending()? {
                // Half the namespace may be the transferred one.
                return Err(VaultError::Closed(format!(
                    "dataset {name} is installing a state transfer at this site (or was when \
                     it stopped); try again once it is done, or start the daemon to finish it"
                )));
            }
            let mut overlay = Overlay::new(state.applied()?);
            match wal::read_from(&dir.join("log"), overlay.applied().seq + 1, |r| {
                apply_logged(&mut overlay, &state, &keys, &r)
            }) {
                Ok(_) => {
                    return Ok(View {
                        state,
                        overlay,
                        keys,
                    })
                }
                // The daemon flushed its state and dropped the log segments
                // this copy of the state still needed: take a newer copy.
                Err(VaultError::LogGap { .. }) if attempt < 10 => attempt += 1,
                Err(e) => return Err(e),
            }
        }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn applied(&self) -> &Applied {
        self.overlay.applied()
    }

    pub fn entries(&self) -> Result<Vec<(Vec<u8>, Entry)>> {
        self.overlay.entries_with_prefix(&self.state, b"")
    }

    /// Every entry in path order, read one at a time (the log past the
    /// state's last flush is held, as the view always holds it).
    pub fn entries_iter(&self) -> Result<impl Iterator<Item = Result<(Vec<u8>, Entry)>> + '_> {
        self.overlay.entries_iter(&self.state)
    }

    /// The entry at `path`, if the dataset holds one.
    pub fn entry(&self, path: &[u8]) -> Result<Option<Entry>> {
        self.overlay.entry(&self.state, path)
    }

    /// Every stored chunk's metadata as the view sees it, one at a time:
    /// the state's (in id order), then those the log tail stored.
    pub fn chunk_metas_iter(
        &self,
    ) -> Result<impl Iterator<Item = Result<(ChunkId, ChunkMeta)>> + '_> {
        let changed: std::collections::HashSet<ChunkId> =
            self.overlay.chunk_changes().map(|(id, _)| *id).collect();
        let from_tail = self
            .overlay
            .chunk_changes()
            .filter_map(|(id, m)| m.map(|m| Ok((*id, m))));
        Ok(self
            .state
            .chunk_metas_iter()?
            .filter(move |item| item.as_ref().map_or(true, |(id, _)| !changed.contains(id)))
            .chain(from_tail))
    }

    pub fn chunk_meta(&self, id: &ChunkId) -> Result<Option<ChunkMeta>> {
        self.overlay.chunk_meta(&self.state, id)
    }

    pub fn chunk_bytes(&self, id: &ChunkId) -> Result<Option<Vec<u8>>> {
        self.overlay.chunk_bytes(&self.state, id)
    }

    pub fn state(&self) -> &State {
        &self.state
    }
}
