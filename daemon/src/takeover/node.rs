//! This site's member of the takeover group's Raft (TiKV's raft-rs): one
//! thread that ticks the clock, steps the messages other sites send, keeps
//! on disk what Raft must keep before it acts (term, vote, commit index and
//! the log of commands), sends messages out over the sites' mutual-TLS
//! channel, and applies committed commands to the agreed [`Cluster`].
//!
//! The log is tiny (one entry per bootstrap, promotion or election), so it
//! is kept whole in one JSON file rewritten atomically, and replayed at
//! start; nothing is ever compacted.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, EntryType, HardState, Message};
use raft::storage::MemStorage;
use raft::RawNode;
use serde::{Deserialize, Serialize};

use super::{Cluster, Command, TakeoverError};

/// One Raft tick. Elections start after 10–20 ticks without a leader, and
/// the leader sends heartbeats every 2.
pub const TICK: Duration = Duration::from_millis(100);

/// How a proposal refused for want of a leader begins: the caller may
/// try again (a leader is elected or handed over within a second or two).
pub const NO_LEADER: &str = "no leader is known to the takeover group";

/// What the node thread is asked to do.
pub enum Input {
    /// A Raft message from another site.
    Message(Box<Message>),
    /// Agree on a command; answered once it is applied (or refused).
    Propose {
        cmd: Command,
        reply: Sender<Result<(), String>>,
    },
    /// Confirm through a majority that this site's view is current (a
    /// Raft read index); answered once it is, never if it cannot be.
    Confirm { reply: Sender<()> },
}

/// What the node shares with the rest of the takeover layer.
pub struct Shared {
    pub cluster: Arc<RwLock<Cluster>>,
    pub leader: Arc<std::sync::atomic::AtomicU64>,
    pub want_lead: Arc<std::sync::atomic::AtomicBool>,
}

/// Hands a site's raw Raft message bytes to the transport.
pub type Outbox = Arc<dyn Fn(u64, Vec<u8>) + Send + Sync>;

/// The file Raft's durable part lives in.
#[derive(Default, Serialize, Deserialize)]
struct Stored {
    term: u64,
    vote: u64,
    commit: u64,
    entries: Vec<StoredEntry>,
}

#[derive(Serialize, Deserialize)]
struct StoredEntry {
    index: u64,
    term: u64,
    /// Raft's entry type: 0 normal, 1 configuration change.
    kind: i32,
    data: String,
    context: String,
}

impl StoredEntry {
    fn from_entry(e: &Entry) -> StoredEntry {
        StoredEntry {
            index: e.index,
            term: e.term,
            kind: e.get_entry_type() as i32,
            data: hex::encode(&e.data),
            context: hex::encode(&e.context),
        }
    }

    fn to_entry(&self) -> Result<Entry, String> {
        let mut e = Entry {
            index: self.index,
            term: self.term,
            ..Default::default()
        };
        e.set_entry_type(if self.kind == 1 {
            EntryType::EntryConfChange
        } else {
            EntryType::EntryNormal
        });
        e.data = hex::decode(&self.data)
            .map_err(|x| format!("entry {}: {x}", self.index))?
            .into();
        e.context = hex::decode(&self.context)
            .map_err(|x| format!("entry {}: {x}", self.index))?
            .into();
        Ok(e)
    }
}

/// The node's state between Readys.
pub struct Node {
    raw: RawNode<MemStorage>,
    file: PathBuf,
    stored: Stored,
    cluster: Arc<RwLock<Cluster>>,
    outbox: Outbox,
    /// Proposals of this site waiting to be applied, by their context id.
    proposals: HashMap<u64, (Sender<Result<(), String>>, Instant)>,
    /// Confirmations waiting: first for a read index, then for it to apply.
    confirms: HashMap<u64, (Sender<()>, Instant)>,
    confirm_at: Vec<(u64, Sender<()>)>,
    next_id: u64,
    applied: u64,
    /// The Raft leader as this member knows it (0: none).
    leader: Arc<std::sync::atomic::AtomicU64>,
    /// Set while this site is the confirmed primary: it then asks for the
    /// Raft leadership, so the primary's own heartbeats tell the others it
    /// is alive (a cut same-city link alone then never promotes).
    want_lead: Arc<std::sync::atomic::AtomicBool>,
    last_transfer: Instant,
}

impl Node {
    /// Opens the node with id `id` among `voters`, replaying the stored log
    /// into `cluster` up to the stored commit index.
    pub fn open(
        dir: &Path,
        id: u64,
        voters: Vec<u64>,
        shared: Shared,
        outbox: Outbox,
    ) -> Result<Node, TakeoverError> {
        let Shared {
            cluster,
            leader,
            want_lead,
        } = shared;
        std::fs::create_dir_all(dir).map_err(|e| TakeoverError::Io {
            path: dir.to_path_buf(),
            source: e,
        })?;
        let file = dir.join("raft.json");
        let stored: Stored = match std::fs::read(&file) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| TakeoverError::Corrupt {
                path: file.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Stored::default(),
            Err(e) => {
                return Err(TakeoverError::Io {
                    path: file.clone(),
                    source: e,
                })
            }
        };
        let storage = MemStorage::new_with_conf_state(ConfState::from((voters, vec![])));
        let entries: Vec<Entry> = stored
            .entries
            .iter()
            .map(StoredEntry::to_entry)
            .collect::<Result<_, _>>()
            .map_err(|reason| TakeoverError::Corrupt {
                path: file.clone(),
                reason,
            })?;
        {
            let mut w = storage.wl();
            if !entries.is_empty() {
                w.append(&entries).map_err(|e| TakeoverError::Corrupt {
                    path: file.clone(),
                    reason: e.to_string(),
                })?;
            }
            let hs = HardState {
                term: stored.term,
                vote: stored.vote,
                commit: stored.commit,
                ..Default::default()
            };
            w.set_hardstate(hs);
        }
        // The agreed record is the fold of the committed commands.
        let mut c = Cluster::default();
        for e in entries.iter().filter(|e| e.index <= stored.commit) {
            if let Some(cmd) = Command::decode(&e.data) {
                let _ = c.apply(&cmd);
            }
        }
        if let Ok(mut w) = cluster.write() {
            *w = c;
        }
        let cfg = raft::Config {
            id,
            election_tick: 10,
            heartbeat_tick: 2,
            applied: stored.commit,
            pre_vote: true,
            check_quorum: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            ..Default::default()
        };
        cfg.validate()
            .map_err(|e| TakeoverError::Raft(e.to_string()))?;
        // raft-rs logs through slog; what matters is logged here instead.
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raw =
            RawNode::new(&cfg, storage, &logger).map_err(|e| TakeoverError::Raft(e.to_string()))?;
        Ok(Node {
            raw,
            file,
            applied: stored.commit,
            stored,
            cluster,
            outbox,
            proposals: HashMap::new(),
            confirms: HashMap::new(),
            confirm_at: Vec::new(),
            next_id: rand::random::<u64>() >> 1,
            leader,
            want_lead,
            last_transfer: Instant::now(),
        })
    }

    /// Runs until `inputs` is closed.
    pub fn run(mut self, inputs: Receiver<Input>) {
        let mut next_tick = Instant::now() + TICK;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match inputs.recv_timeout(wait) {
                Ok(i) => self.take(i),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            // Whatever else is queued, before the next Ready.
            while let Ok(i) = inputs.try_recv() {
                self.take(i);
            }
            if Instant::now() >= next_tick {
                self.raw.tick();
                next_tick = Instant::now() + TICK;
                self.expire();
                self.lead();
            }
            if self.raw.has_ready() {
                if let Err(e) = self.ready() {
                    // Raft state that cannot be kept must not be acted on.
                    tracing::error!(error = %e, "takeover: cannot persist the Raft state; this site stops taking part");
                    return;
                }
            }
        }
    }

    /// Publishes the leader, and asks for the leadership while this site
    /// is the confirmed primary and another member leads.
    fn lead(&mut self) {
        let (me, leader) = (self.raw.raft.id, self.raw.raft.leader_id);
        self.leader
            .store(leader, std::sync::atomic::Ordering::Release);
        if self.want_lead.load(std::sync::atomic::Ordering::Acquire)
            && leader != me
            && leader != raft::INVALID_ID
            && self.last_transfer.elapsed() > Duration::from_secs(2)
        {
            self.last_transfer = Instant::now();
            self.raw.transfer_leader(me);
        }
    }

    fn take(&mut self, i: Input) {
        match i {
            Input::Message(m) => {
                // This group never compacts its log, so no honest member
                // sends a snapshot; one would leave the storage and Raft
                // disagreeing.
                if m.get_msg_type() == raft::prelude::MessageType::MsgSnapshot {
                    tracing::warn!(
                        from = m.from,
                        "takeover: refused a Raft snapshot (this group never makes one)"
                    );
                    return;
                }
                let _ = self.raw.step(*m);
            }
            Input::Propose { cmd, reply } => {
                self.next_id += 1;
                let id = self.next_id;
                match self.raw.propose(id.to_le_bytes().to_vec(), cmd.encode()) {
                    Ok(()) => {
                        self.proposals
                            .insert(id, (reply, Instant::now() + Duration::from_secs(10)));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(format!("{NO_LEADER} ({e})")));
                    }
                }
            }
            Input::Confirm { reply } => {
                self.next_id += 1;
                let id = self.next_id;
                self.raw.read_index(id.to_le_bytes().to_vec());
                self.confirms
                    .insert(id, (reply, Instant::now() + Duration::from_secs(10)));
            }
        }
    }

    /// Drops waiters nobody will answer: their callers see the channel
    /// close and report that no majority answered.
    fn expire(&mut self) {
        let now = Instant::now();
        self.proposals.retain(|_, (_, t)| *t > now);
        self.confirms.retain(|_, (_, t)| *t > now);
    }

    fn ready(&mut self) -> Result<(), TakeoverError> {
        let mut rd = self.raw.ready();
        self.send(rd.take_messages());
        self.apply(rd.take_committed_entries());
        for rs in rd.take_read_states() {
            if let Some(id) = ctx_id(&rs.request_ctx) {
                if let Some((reply, _)) = self.confirms.remove(&id) {
                    self.confirm_at.push((rs.index, reply));
                }
            }
        }
        let mut dirty = false;
        if !rd.entries().is_empty() {
            self.raw
                .store()
                .wl()
                .append(rd.entries())
                .map_err(|e| TakeoverError::Raft(e.to_string()))?;
            let first = rd.entries()[0].index;
            self.stored.entries.retain(|e| e.index < first);
            self.stored
                .entries
                .extend(rd.entries().iter().map(StoredEntry::from_entry));
            dirty = true;
        }
        if let Some(hs) = rd.hs() {
            self.raw.store().wl().set_hardstate(hs.clone());
            self.stored.term = hs.term;
            self.stored.vote = hs.vote;
            self.stored.commit = hs.commit;
            dirty = true;
        }
        if dirty {
            self.persist()?;
        }
        self.send(rd.take_persisted_messages());
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.raw.store().wl().mut_hard_state().commit = commit;
            self.stored.commit = commit;
            self.persist()?;
        }
        self.send(light.take_messages());
        self.apply(light.take_committed_entries());
        self.raw.advance_apply();
        self.answer_confirms();
        Ok(())
    }

    fn persist(&self) -> Result<(), TakeoverError> {
        let body = serde_json::to_vec(&self.stored).map_err(|e| TakeoverError::Corrupt {
            path: self.file.clone(),
            reason: e.to_string(),
        })?;
        vault::dataset::write_atomic(&self.file, &body).map_err(|e| TakeoverError::Io {
            path: self.file.clone(),
            source: std::io::Error::other(e.to_string()),
        })
    }

    fn send(&self, msgs: Vec<Message>) {
        for m in msgs {
            match m.write_to_bytes() {
                Ok(b) => (self.outbox)(m.to, b),
                Err(e) => tracing::warn!(error = %e, "takeover: cannot encode a Raft message"),
            }
        }
    }

    fn apply(&mut self, entries: Vec<Entry>) {
        for e in entries {
            self.applied = self.applied.max(e.index);
            if e.data.is_empty() || e.get_entry_type() != EntryType::EntryNormal {
                continue;
            }
            let Some(cmd) = Command::decode(&e.data) else {
                tracing::error!(
                    index = e.index,
                    "takeover: a committed command does not decode; skipped"
                );
                continue;
            };
            let result = match self.cluster.write() {
                Ok(mut c) => {
                    let r = c.apply(&cmd);
                    match &r {
                        Ok(()) => {
                            tracing::warn!(index = e.index, command = ?cmd, epoch = c.epoch, primary = ?c.primary, "takeover: the sites agreed")
                        }
                        Err(why) => {
                            tracing::info!(index = e.index, command = ?cmd, reason = %why, "takeover: an agreed command changed nothing")
                        }
                    }
                    r
                }
                Err(_) => Err("the agreed record's lock is poisoned".into()),
            };
            if let Some(id) = ctx_id(&e.context) {
                if let Some((reply, _)) = self.proposals.remove(&id) {
                    let _ = reply.send(result);
                }
            }
        }
        self.answer_confirms();
    }

    fn answer_confirms(&mut self) {
        let applied = self.applied;
        let (done, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut self.confirm_at)
            .into_iter()
            .partition(|(i, _)| *i <= applied);
        self.confirm_at = wait;
        for (_, reply) in done {
            let _ = reply.send(());
        }
    }
}

fn ctx_id(ctx: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(ctx.try_into().ok()?))
}

/// Decodes a Raft message another site sent.
pub fn decode_message(body: &[u8]) -> Result<Message, String> {
    Message::parse_from_bytes(body).map_err(|e| e.to_string())
}

/// The Raft ids of a group: its site names in sorted order, from 1.
pub fn ids(mut sites: Vec<String>) -> BTreeMap<String, u64> {
    sites.sort();
    sites.dedup();
    sites
        .into_iter()
        .enumerate()
        .map(|(i, s)| (s, i as u64 + 1))
        .collect()
}
