//! Takeover: the sites of a `[takeover]` group agree, through an embedded
//! Raft group (`node.rs`), on one small record, [`Cluster`]: the epoch,
//! which site is primary, which sites hold every acknowledged write, and
//! where each epoch began in each dataset's log. Everything else follows
//! from that record:
//! - the seat each site runs in ([`seat`]): the runtime restarts its
//!   datasets in a new seat when the record names another primary;
//! - the fence: this module's guard thread lets the datasets take local
//!   changes only at the primary, and only while a majority of the group
//!   confirmed within `fence_after` that it still is (a Raft read index);
//!   it gives every dataset the epochs its records must carry;
//! - `triad promote` (`promote.rs`): a planned switchover or a failover;
//! - rejoin (`rejoin.rs`): a former primary's records after the fork point
//!   are moved aside as evidence before it follows the new primary.

pub mod node;
pub mod promote;
pub mod rejoin;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use replicator::follower::PeerLink;
use replicator::upstream::{AdminError, Upstream};
use serde::{Deserialize, Serialize};
use vault::{Dataset, Fence};

use crate::config::{Config, Role};
pub use crate::status::{EpochStart, TakeoverStatus};

/// Why the takeover layer could not start or act.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: does not decode: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("raft: {0}")]
    Raft(String),
    #[error("{0}")]
    Refused(String),
}

/// The record the group agrees on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Cluster {
    /// 0 until the configured primary has registered epoch 1.
    pub epoch: u64,
    pub primary: Option<String>,
    /// Sites that hold every write the primary acknowledged: its sync
    /// followers (none of which may be degraded, see config validation).
    pub sync: Vec<String>,
    pub history: Vec<EpochStart>,
}

/// What the group is asked to agree on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// The configured primary registers epoch 1, once.
    Bootstrap {
        primary: String,
        sync: Vec<String>,
        time_ns: i64,
    },
    /// The primary of `epoch` names the sites that hold every write it
    /// acknowledges (its sync followers), before it acknowledges any with
    /// fewer (its config changed between starts).
    SetSync {
        epoch: u64,
        primary: String,
        sync: Vec<String>,
    },
    /// `site` becomes the primary of epoch `from_epoch + 1`, its log heads
    /// being `heads`. Refused if the epoch moved meanwhile.
    Promote {
        site: String,
        from_epoch: u64,
        heads: BTreeMap<String, u64>,
        sync: Vec<String>,
        forced: bool,
        reason: String,
        time_ns: i64,
    },
}

impl Command {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(b: &[u8]) -> Option<Command> {
        serde_json::from_slice(b).ok()
    }
}

impl Cluster {
    /// Applies an agreed command. Deterministic: every site that applies
    /// the same commands holds the same record.
    pub fn apply(&mut self, cmd: &Command) -> Result<(), String> {
        match cmd {
            Command::Bootstrap {
                primary,
                sync,
                time_ns,
            } => {
                if let Some(p) = &self.primary {
                    return Err(format!(
                        "already registered: epoch {}, primary {p}",
                        self.epoch
                    ));
                }
                self.epoch = 1;
                self.primary = Some(primary.clone());
                self.sync = sync.clone();
                self.history = vec![EpochStart {
                    epoch: 1,
                    primary: primary.clone(),
                    starts: BTreeMap::new(),
                    forced: false,
                    reason: "first start of the group".into(),
                    time_ns: *time_ns,
                }];
                Ok(())
            }
            Command::SetSync {
                epoch,
                primary,
                sync,
            } => {
                if *epoch != self.epoch || self.primary.as_ref() != Some(primary) {
                    return Err(format!(
                        "{primary} is not the primary of epoch {epoch} (epoch {}, primary {:?})",
                        self.epoch, self.primary
                    ));
                }
                self.sync = sync.clone();
                Ok(())
            }
            Command::Promote {
                site,
                from_epoch,
                heads,
                sync,
                forced,
                reason,
                time_ns,
            } => {
                let Some(p) = &self.primary else {
                    return Err("no primary is registered yet".into());
                };
                if *from_epoch != self.epoch {
                    return Err(format!(
                        "the epoch moved: it is {} now (primary {p}), not {from_epoch}",
                        self.epoch
                    ));
                }
                if p == site {
                    return Err(format!("{site} is already the primary"));
                }
                // A new epoch never begins before the current one did: the
                // records before its start exist (they were the fork point
                // of the last promotion). A site below it lacks them (its
                // copy is being fetched again after a rejoin), and taking
                // over from there would cut every other site's copy back to
                // it. Not even --force does that.
                for (d, h) in heads {
                    let begun = self.starts(d).last().map_or(1, |s| s.1);
                    if h.saturating_add(1) < begun {
                        return Err(format!(
                            "{site} holds dataset {d} only to seq {h}, but epoch {} began at seq {begun}: it lacks records the group's history has",
                            self.epoch
                        ));
                    }
                }
                self.epoch += 1;
                self.primary = Some(site.clone());
                self.sync = sync.clone();
                self.history.push(EpochStart {
                    epoch: self.epoch,
                    primary: site.clone(),
                    starts: heads.iter().map(|(d, h)| (d.clone(), h + 1)).collect(),
                    forced: *forced,
                    reason: reason.clone(),
                    time_ns: *time_ns,
                });
                Ok(())
            }
        }
    }

    /// The epochs of a dataset's history as the vault checks them:
    /// (epoch, first seq), oldest first.
    pub fn starts(&self, dataset: &str) -> Vec<(u64, u64)> {
        let mut v = vec![(1, 1)];
        for h in self.history.iter().skip(1) {
            if let Some(s) = h.starts.get(dataset) {
                v.push((h.epoch, *s));
            }
        }
        v
    }
}

/// How a site runs its datasets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seat {
    /// Runs the sources and takes puts.
    Primary,
    /// Follows `upstream`.
    Follower { upstream: Option<String> },
}

/// The seat the agreed record gives this site. Before the group has
/// registered a primary, and in epoch 1, the config's topology holds (a
/// cascade stays a cascade); after a promotion every follower follows the
/// primary directly.
pub fn seat(cfg: &Config, c: &Cluster) -> Seat {
    let configured = match cfg.site.role {
        Role::Primary => Seat::Primary,
        Role::Follower => Seat::Follower {
            upstream: cfg.site.upstream.clone(),
        },
    };
    let Some(p) = &c.primary else {
        return configured;
    };
    if *p == cfg.site.name {
        return Seat::Primary;
    }
    if c.epoch <= 1 && cfg.site.role == Role::Follower {
        return configured;
    }
    Seat::Follower {
        upstream: Some(p.clone()),
    }
}

/// The config a seat runs with: the role and upstream the seat gives, the
/// followers it serves (every peer at the primary, `mode` defaulting to
/// async; at a follower only a configured cascade, and only in epoch 1),
/// and, at a follower, each directory dataset's source tree as its standby
/// tree.
pub fn effective(cfg: &Config, seat: &Seat, c: &Cluster) -> Config {
    use replicator::upstream::Mode;
    let mut e = cfg.clone();
    match seat {
        Seat::Primary => {
            e.site.role = Role::Primary;
            e.site.upstream = None;
            for p in &mut e.peer {
                p.mode = Some(p.mode.unwrap_or(Mode::Async));
            }
            for d in &mut e.dataset {
                d.standby_path = None;
            }
        }
        Seat::Follower { upstream } => {
            e.site.role = Role::Follower;
            e.site.upstream = upstream.clone();
            let cascade_kept = c.epoch <= 1 && cfg.site.role == Role::Follower;
            for p in &mut e.peer {
                if !cascade_kept || Some(&p.name) == upstream.as_ref() {
                    p.mode = None;
                }
            }
            for d in &mut e.dataset {
                if let Some(dir) = d.directory() {
                    d.standby_path = Some(dir.path);
                }
            }
        }
    }
    e
}

/// Checks every dataset's log against the agreed epochs before the site
/// follows (`rejoin.rs`), setting aside the ones that went past a fork.
/// Returns, for each dataset started afresh, the seq it must reach again
/// before its standby tree is touched.
pub fn rejoin_all(
    cfg: &Config,
    c: &Cluster,
) -> anyhow::Result<std::collections::HashMap<String, u64>> {
    use anyhow::Context;
    let mut refilled = std::collections::HashMap::new();
    for d in &cfg.dataset {
        let dir = cfg.dataset_dir(&d.name);
        let Some(fork) = rejoin::fork_point(&dir, &d.name, c)? else {
            continue;
        };
        let key = vault::DatasetKey::load(&d.key_file)
            .with_context(|| format!("dataset `{}`: loading its key", d.name))?;
        let ev = rejoin::set_aside(&cfg.site.data_dir, &dir, &d.name, &key, fork, c)?;
        tracing::error!(
            dataset = %d.name,
            fork_seq = ev.fork_seq,
            records = ev.records.len(),
            paths = ev.paths.len(),
            moved_to = %ev.moved_to.display(),
            "REJOIN: this site's log went past the fork point of epoch {} ({} is primary); those records are cut from the live copy and kept as evidence, and the dataset is fetched again from its upstream",
            ev.epoch,
            ev.primary
        );
        refilled.insert(d.name.clone(), ev.fork_seq.saturating_sub(1));
    }
    Ok(refilled)
}

/// Whether this site ran as the primary when it last started a seat: its
/// directory sources' trees then hold its own writes, and become standby
/// trees compared whole.
pub fn was_primary(data_dir: &std::path::Path) -> bool {
    std::fs::read_to_string(data_dir.join("takeover").join("seat"))
        .is_ok_and(|s| s.trim() == "primary")
}

/// Records the seat this site starts (see [`was_primary`]).
pub fn record_seat(data_dir: &std::path::Path, seat: &Seat) {
    let body = match seat {
        Seat::Primary => "primary\n",
        Seat::Follower { .. } => "follower\n",
    };
    let path = data_dir.join("takeover").join("seat");
    if let Err(e) = vault::dataset::write_atomic(&path, body.as_bytes()) {
        tracing::warn!(path = %path.display(), error = %e, "cannot record this site's seat");
    }
}

/// The datasets of the seat that runs now, with the upstream serving them.
type Attached = (Vec<Arc<Dataset>>, Option<Arc<Upstream>>);

/// A planned switchover in progress at the primary.
struct Handover {
    to: String,
    until: Instant,
    /// The epoch it was granted in: a hold ends with its epoch.
    epoch: u64,
}

/// The takeover layer of a running site.
pub struct Takeover {
    site: String,
    /// `<data_dir>/takeover`: the Raft state and the promotion records.
    dir: PathBuf,
    fence_after: Duration,
    /// The configured primary registers epoch 1.
    bootstraps: bool,
    /// This site's sync followers when it is the primary.
    sync_when_primary: Vec<String>,
    cluster: Arc<RwLock<Cluster>>,
    leader: Arc<AtomicU64>,
    want_lead: Arc<AtomicBool>,
    node: crossbeam_channel::Sender<node::Input>,
    ids: BTreeMap<String, u64>,
    links: BTreeMap<String, Arc<PeerLink>>,
    rt: tokio::runtime::Runtime,
    /// When the last confirmation that this site is still the primary
    /// started (a lease of `fence_after` from then).
    lease: Mutex<Option<Instant>>,
    handover: Mutex<Option<Handover>>,
    /// When the last handover was asked of this site, in which epoch.
    last_handover: Mutex<Option<(Instant, u64)>>,
    /// A promotion of this site under way: per dataset, the head it is
    /// promoted at; replicated records past it are refused meanwhile.
    promoting: Mutex<Option<BTreeMap<String, u64>>>,
    /// After a forced promotion: fenced until then, the longest the old
    /// primary's lease may still run.
    hold_until: Mutex<Option<Instant>>,
    /// When each other site last sent this one a Raft message.
    heard: Mutex<HashMap<String, Instant>>,
    started: Instant,
    /// The datasets of the seat running now, with the upstream serving them.
    attached: Mutex<Attached>,
    /// Why this site takes no changes now (None: it does).
    fenced: Mutex<Option<String>>,
    /// Whether the last refresh fenced, to log each change once.
    fenced_flag: AtomicBool,
}

/// What a site says about what it has heard (a failover's evidence).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Heard {
    pub site: String,
    pub epoch: u64,
    pub primary: Option<String>,
    /// Seconds since each other site last sent this one a Raft message;
    /// absent: not since this site's daemon started, `since_start` ago.
    pub seconds: BTreeMap<String, f64>,
    pub since_start: f64,
}

impl Takeover {
    /// Starts this site's Raft member and the guard thread.
    pub fn start(
        cfg: &Config,
        stop: Arc<AtomicBool>,
    ) -> Result<Option<Arc<Takeover>>, TakeoverError> {
        // The guard, and automatic failover, stop with the daemon.
        let (Some(fence_after), Some(tls)) = (cfg.fence_after(), cfg.tls_files()) else {
            return Ok(None);
        };
        let mut sites: Vec<String> = cfg.peer.iter().map(|p| p.name.clone()).collect();
        sites.push(cfg.site.name.clone());
        let ids = node::ids(sites);
        let me = ids[&cfg.site.name];
        let links: BTreeMap<String, Arc<PeerLink>> = cfg
            .peer
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    Arc::new(PeerLink::new(replicator::follower::UpstreamAddr {
                        name: p.name.clone(),
                        address: p.address.clone(),
                        tls: tls.clone(),
                    })),
                )
            })
            .collect();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("triad-takeover")
            .enable_all()
            .build()
            .map_err(|e| TakeoverError::Raft(format!("starting its runtime: {e}")))?;
        let outbox = outbox(&rt, &ids, &links);
        let cluster = Arc::new(RwLock::new(Cluster::default()));
        let leader = Arc::new(AtomicU64::new(0));
        let want_lead = Arc::new(AtomicBool::new(false));
        let dir = cfg.site.data_dir.join("takeover");
        let node = node::Node::open(
            &dir,
            me,
            ids.values().copied().collect(),
            node::Shared {
                cluster: cluster.clone(),
                leader: leader.clone(),
                want_lead: want_lead.clone(),
            },
            outbox,
        )?;
        // Bounded: a member that floods Raft messages costs this site at
        // most this many queued; the rest are dropped (Raft sends again).
        let (tx, rx) = crossbeam_channel::bounded(INPUT_QUEUE);
        std::thread::Builder::new()
            .name("takeover-raft".into())
            .spawn(move || node.run(rx))
            .map_err(|e| TakeoverError::Raft(format!("starting its thread: {e}")))?;
        let sync_when_primary = cfg
            .followers_as_primary()
            .into_iter()
            .filter(|(_, p)| p.mode == replicator::upstream::Mode::Sync)
            .map(|(s, _)| s)
            .collect();
        let t = Arc::new(Takeover {
            site: cfg.site.name.clone(),
            dir,
            fence_after,
            bootstraps: cfg.site.role == Role::Primary,
            sync_when_primary,
            cluster,
            leader,
            want_lead,
            node: tx,
            ids,
            links,
            rt,
            lease: Mutex::new(None),
            handover: Mutex::new(None),
            last_handover: Mutex::new(None),
            promoting: Mutex::new(None),
            hold_until: Mutex::new(None),
            heard: Mutex::new(HashMap::new()),
            started: Instant::now(),
            attached: Mutex::new((Vec::new(), None)),
            fenced: Mutex::new(Some("starting".into())),
            fenced_flag: AtomicBool::new(true),
        });
        {
            let (t, stop) = (t.clone(), stop.clone());
            std::thread::Builder::new()
                .name("takeover-guard".into())
                .spawn(move || t.guard(&stop))
                .map_err(|e| TakeoverError::Raft(format!("starting its guard: {e}")))?;
        }
        if let Some(timeout) = cfg.primary_timeout() {
            let (t, stop) = (t.clone(), stop.clone());
            std::thread::Builder::new()
                .name("takeover-failover".into())
                .spawn(move || promote::watch(t, timeout, &stop))
                .map_err(|e| TakeoverError::Raft(format!("starting automatic failover: {e}")))?;
            tracing::info!(primary_timeout = ?timeout, "automatic failover is on");
        }
        let c = t.cluster();
        tracing::info!(site = %t.site, members = ?t.ids.keys().collect::<Vec<_>>(), epoch = c.epoch, primary = ?c.primary, fence_after = ?fence_after, "takeover group member started");
        Ok(Some(t))
    }

    /// True once the group's record names a primary other than this site.
    pub fn another_is_primary(&self) -> bool {
        self.cluster().primary.is_some_and(|p| p != self.site)
    }

    pub fn cluster(&self) -> Cluster {
        self.cluster.read().map(|c| c.clone()).unwrap_or_default()
    }

    /// The datasets (and the upstream serving them) of the seat that runs
    /// now; the guard fences them. Called again at each seat change.
    pub fn attach(&self, datasets: Vec<Arc<Dataset>>, upstream: Option<Arc<Upstream>>) {
        if let Ok(mut a) = self.attached.lock() {
            *a = (datasets, upstream);
        }
        self.refresh();
    }

    /// The datasets of the seat that runs now.
    fn datasets(&self) -> Vec<Arc<Dataset>> {
        self.attached
            .lock()
            .map(|a| a.0.clone())
            .unwrap_or_default()
    }

    /// Why this site takes no changes now, if it does not.
    pub fn fenced(&self) -> Option<String> {
        self.fenced.lock().ok().and_then(|f| f.clone())
    }

    /// Asks the group to agree on `cmd`, waiting up to `timeout`.
    /// While no leader is known (an election, or a leadership handover
    /// after a promotion), the proposal is made again until `timeout`; so
    /// is one not answered within 3 s (Raft drops a proposal forwarded to a
    /// leader that just lost its place). The commands are safe to repeat:
    /// a second `Promote` from the same epoch is refused by the record.
    pub fn propose(&self, cmd: Command, timeout: Duration) -> Result<(), TakeoverError> {
        let deadline = Instant::now() + timeout;
        loop {
            let (reply, rx) = crossbeam_channel::bounded(1);
            self.node
                .send(node::Input::Propose {
                    cmd: cmd.clone(),
                    reply,
                })
                .map_err(|_| TakeoverError::Raft("this site's Raft member has stopped".into()))?;
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.min(Duration::from_secs(3))) {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(why)) if why.starts_with(node::NO_LEADER) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Ok(Err(why)) => return Err(TakeoverError::Refused(why)),
                Err(_) if Instant::now() < deadline => {}
                Err(_) => {
                    return Err(TakeoverError::Refused(format!(
                        "no majority of the sites agreed within {timeout:?}: this site and at least one other must reach each other"
                    )))
                }
            }
        }
    }

    /// The status part; `seat` is the one the runtime runs in now (the
    /// record may already name another while the seat changes).
    pub fn status(&self, seat: &str) -> TakeoverStatus {
        let c = self.cluster();
        let fenced_reason = self.fenced();
        TakeoverStatus {
            epoch: c.epoch,
            primary: c.primary.clone(),
            seat: seat.to_string(),
            fenced: fenced_reason.is_some(),
            fenced_reason,
            sync: c.sync.clone(),
            fence_after_seconds: self.fence_after.as_secs_f64(),
            lease_age_seconds: self
                .lease
                .lock()
                .ok()
                .and_then(|l| l.map(|t| t.elapsed().as_secs_f64())),
            heard_seconds: self.heard().seconds,
            leader: self.leader_name(),
            history: c.history,
        }
    }

    /// The Raft leader's site name, if one is known.
    pub fn leader_name(&self) -> Option<String> {
        let id = self.leader.load(Ordering::Acquire);
        self.ids
            .iter()
            .find(|(_, i)| **i == id)
            .map(|(s, _)| s.clone())
    }

    /// What this site has heard from the others.
    pub fn heard(&self) -> Heard {
        let c = self.cluster();
        let heard = self.heard.lock().map(|h| h.clone()).unwrap_or_default();
        Heard {
            site: self.site.clone(),
            epoch: c.epoch,
            primary: c.primary,
            seconds: heard
                .iter()
                .map(|(s, t)| (s.clone(), t.elapsed().as_secs_f64()))
                .collect(),
            since_start: self.started.elapsed().as_secs_f64(),
        }
    }

    /// Answers another site's Takeover call.
    pub fn handle(&self, caller: &str, kind: &str, body: Vec<u8>) -> Result<Vec<u8>, AdminError> {
        let Some(caller_id) = self.ids.get(caller).copied() else {
            return Err(AdminError::Invalid(format!(
                "{caller} is not a member of this takeover group"
            )));
        };
        match kind {
            "raft" => {
                let m = node::decode_message(&body).map_err(AdminError::Invalid)?;
                // A member speaks only for itself.
                if m.from != caller_id {
                    tracing::warn!(site = %caller, claimed = m.from, "takeover: refused a Raft message sent in another member's name");
                    return Err(AdminError::Invalid(
                        "a Raft message must come from its sender's own certificate".into(),
                    ));
                }
                if let Ok(mut h) = self.heard.lock() {
                    h.insert(caller.to_string(), Instant::now());
                }
                if self
                    .node
                    .try_send(node::Input::Message(Box::new(m)))
                    .is_err()
                {
                    tracing::debug!(site = %caller, "takeover: Raft input queue full; a message was dropped");
                }
                Ok(Vec::new())
            }
            "heard" => Ok(serde_json::to_vec(&self.heard()).unwrap_or_default()),
            "handover" => {
                let r: promote::HandoverRequest = serde_json::from_slice(&body)
                    .map_err(|e| AdminError::Invalid(format!("handover request: {e}")))?;
                if r.to != caller {
                    return Err(AdminError::Invalid(format!(
                        "{caller} may ask for a handover only to itself, not to {}",
                        r.to
                    )));
                }
                let reply = self.hand_over(&r)?;
                Ok(serde_json::to_vec(&reply).unwrap_or_default())
            }
            "switchback" => {
                // The primary hands its seat to this site (the second leg
                // of `triad drill --switchover`): only the primary may ask,
                // and only a planned switchover follows.
                let c = self.cluster();
                if c.primary.as_deref() != Some(caller) {
                    return Err(AdminError::Invalid(format!(
                        "only the primary may ask for a switchback; {caller} is not it (primary {:?})",
                        c.primary
                    )));
                }
                let rep = self.promote(promote::Way::Planned);
                Ok(serde_json::to_vec(&rep).unwrap_or_default())
            }
            other => Err(AdminError::Invalid(format!(
                "unknown takeover call `{other}`"
            ))),
        }
    }

    /// Calls another member.
    pub fn call(
        &self,
        site: &str,
        kind: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, replicator::CallError> {
        let link = self
            .links
            .get(site)
            .cloned()
            .ok_or_else(|| replicator::CallError::Setup {
                site: site.to_string(),
                message: "not a member of this takeover group".into(),
            })?;
        let kind = kind.to_string();
        self.rt
            .block_on(async move { link.takeover(&kind, body, timeout).await })
    }

    /// The guard: bootstraps the group, keeps the primary's lease, and
    /// fences the datasets whenever this site may not write.
    fn guard(self: Arc<Self>, stop: &AtomicBool) {
        let period = (self.fence_after / 20).clamp(Duration::from_millis(50), TICK_MAX);
        let mut confirming: Option<(Instant, crossbeam_channel::Receiver<()>)> = None;
        let mut next_bootstrap = Instant::now();
        while !stop.load(Ordering::Acquire) {
            let c = self.cluster();
            if c.primary.is_none() && self.bootstraps && Instant::now() >= next_bootstrap {
                // Non-blocking: the answer shows up in the record.
                let (reply, _rx) = crossbeam_channel::bounded(1);
                let _ = self.node.send(node::Input::Propose {
                    cmd: Command::Bootstrap {
                        primary: self.site.clone(),
                        sync: self.sync_when_primary.clone(),
                        time_ns: vault::dataset::now_ns(),
                    },
                    reply,
                });
                next_bootstrap = Instant::now() + Duration::from_secs(2);
            }
            if c.primary.as_deref() == Some(self.site.as_str())
                && c.sync != self.sync_when_primary
                && Instant::now() >= next_bootstrap
            {
                let (reply, _rx) = crossbeam_channel::bounded(1);
                let _ = self.node.send(node::Input::Propose {
                    cmd: Command::SetSync {
                        epoch: c.epoch,
                        primary: self.site.clone(),
                        sync: self.sync_when_primary.clone(),
                    },
                    reply,
                });
                next_bootstrap = Instant::now() + Duration::from_secs(2);
            }
            if c.primary.as_deref() == Some(self.site.as_str()) {
                if let Some((started, rx)) = &confirming {
                    if rx.try_recv().is_ok() {
                        if let Ok(mut l) = self.lease.lock() {
                            *l = Some(*started);
                        }
                        confirming = None;
                    } else if started.elapsed() > self.fence_after / 2 {
                        confirming = None;
                    }
                }
                let fresh = self
                    .lease
                    .lock()
                    .ok()
                    .and_then(|l| *l)
                    .is_some_and(|t| t.elapsed() < self.fence_after / 4);
                if confirming.is_none() && !fresh {
                    let (reply, rx) = crossbeam_channel::bounded(1);
                    if self.node.send(node::Input::Confirm { reply }).is_ok() {
                        confirming = Some((Instant::now(), rx));
                    }
                }
            } else {
                confirming = None;
                if let Ok(mut l) = self.lease.lock() {
                    *l = None;
                }
            }
            self.refresh();
            let confirmed = self.fenced().is_none();
            self.want_lead.store(confirmed, Ordering::Release);
            std::thread::sleep(period);
        }
    }

    /// Works out whether this site may write, and tells its datasets.
    fn refresh(&self) {
        let c = self.cluster();
        let why = self.fence_reason(&c);
        let was = self.fenced_flag.swap(why.is_some(), Ordering::AcqRel);
        if was != why.is_some() {
            match &why {
                Some(w) => {
                    tracing::warn!(epoch = c.epoch, primary = ?c.primary, reason = %w, "FENCED: this site takes no changes")
                }
                None => tracing::info!(
                    epoch = c.epoch,
                    "takes changes: a majority confirmed this site is the primary"
                ),
            }
        }
        if let Ok(mut f) = self.fenced.lock() {
            *f = why.clone();
        }
        let datasets = self.datasets();
        let promoting = self.promoting.lock().ok().and_then(|p| p.clone());
        for ds in datasets {
            ds.set_fence(Fence {
                starts: c.starts(ds.name()),
                fenced: why.clone(),
                replicate_up_to: promoting.as_ref().and_then(|p| p.get(ds.name()).copied()),
            });
        }
    }

    fn fence_reason(&self, c: &Cluster) -> Option<String> {
        let Some(p) = &c.primary else {
            return Some(
                "the takeover group has not registered a primary yet: it needs two of its sites up"
                    .into(),
            );
        };
        if *p != self.site {
            return Some(format!(
                "{p} is the primary of epoch {} (this site is not)",
                c.epoch
            ));
        }
        if let Some(h) = self.handover.lock().ok().and_then(|h| {
            h.as_ref()
                .filter(|h| h.until > Instant::now() && h.epoch == c.epoch)
                .map(|h| h.to.clone())
        }) {
            return Some(format!(
                "handing over to {h}: a planned switchover is under way"
            ));
        }
        if let Some(until) = self.hold_until.lock().ok().and_then(|h| *h) {
            if until > Instant::now() {
                return Some(format!(
                    "promoted with --force: waiting {:.1}s more, the longest the old primary's lease may still run",
                    (until - Instant::now()).as_secs_f64()
                ));
            }
        }
        if c.sync != self.sync_when_primary {
            return Some(format!(
                "the group still names {:?} as this primary's sync followers, the config {:?}: agreeing on them first",
                c.sync, self.sync_when_primary
            ));
        }
        match self.lease.lock().ok().and_then(|l| *l) {
            None => Some(format!(
                "not yet confirmed by a majority of the sites as the primary of epoch {}",
                c.epoch
            )),
            Some(t) if t.elapsed() >= self.fence_after => Some(format!(
                "no majority of the sites confirmed this site as the primary for {:.1}s (takeover.fence_after = {:?}); \
                 another site may be promoted",
                t.elapsed().as_secs_f64(),
                self.fence_after
            )),
            Some(_) => None,
        }
    }
}

/// Inputs queued for the Raft thread at most (messages, proposals,
/// confirmations).
const INPUT_QUEUE: usize = 4096;

/// The guard's longest sleep.
const TICK_MAX: Duration = Duration::from_millis(200);

/// Raft messages on their way to one site at most; more wait their turn.
const IN_FLIGHT: usize = 16;

/// How long one Raft message may take to deliver before it counts as lost.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(1);

/// Sends each outgoing Raft message to its site on the takeover runtime,
/// up to [`IN_FLIGHT`] at once per site: one message stuck on a dead
/// connection must not hold back the heartbeats behind it past a lease
/// (Raft takes messages in any order). A site that does not take them
/// loses them; Raft sends again.
fn outbox(
    rt: &tokio::runtime::Runtime,
    ids: &BTreeMap<String, u64>,
    links: &BTreeMap<String, Arc<PeerLink>>,
) -> node::Outbox {
    let mut queues: HashMap<u64, tokio::sync::mpsc::Sender<Vec<u8>>> = HashMap::new();
    for (site, id) in ids {
        let Some(link) = links.get(site).cloned() else {
            continue;
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(256);
        let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
        rt.spawn(async move {
            while let Some(b) = rx.recv().await {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let link = link.clone();
                tokio::spawn(async move {
                    if let Err(e) = link.takeover("raft", b, DELIVERY_TIMEOUT).await {
                        tracing::debug!(site = %link.addr.name, error = %e, "takeover: a Raft message was not delivered");
                    }
                    drop(slot);
                });
            }
        });
        queues.insert(*id, tx);
    }
    Arc::new(move |to, bytes| {
        if let Some(q) = queues.get(&to) {
            let _ = q.try_send(bytes);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn promote(site: &str, from_epoch: u64, head: u64) -> Command {
        Command::Promote {
            site: site.into(),
            from_epoch,
            heads: [("files".to_string(), head)].into_iter().collect(),
            sync: vec![],
            forced: false,
            reason: "test".into(),
            time_ns: 1,
        }
    }

    #[test]
    fn the_record_moves_one_epoch_at_a_time_and_only_from_the_epoch_it_names() {
        let mut c = Cluster::default();
        assert!(c.apply(&promote("zjk-b", 0, 5)).is_err(), "no primary yet");
        let boot = Command::Bootstrap {
            primary: "zjk-a".into(),
            sync: vec!["zjk-b".into()],
            time_ns: 1,
        };
        c.apply(&boot).unwrap();
        assert!(c.apply(&boot).is_err(), "registered once");
        assert_eq!((c.epoch, c.primary.as_deref()), (1, Some("zjk-a")));
        c.apply(&promote("zjk-b", 1, 40)).unwrap();
        assert_eq!((c.epoch, c.primary.as_deref()), (2, Some("zjk-b")));
        // A second promotion from the same epoch (a race) changes nothing.
        let e = c.apply(&promote("sjz-c", 1, 38)).unwrap_err();
        assert!(e.contains("epoch moved"), "{e}");
        assert_eq!(c.primary.as_deref(), Some("zjk-b"));
        assert!(
            c.apply(&promote("zjk-b", 2, 50)).is_err(),
            "already primary"
        );
        // A site whose copy is below where the current epoch began (it
        // set its copy aside at a rejoin and is fetching it again) cannot
        // take over: the loop of kills and promotions once promoted one at
        // seq 0, and every other site then cut its copy back to nothing.
        let e = c.apply(&promote("zjk-a", 2, 0)).unwrap_err();
        assert!(e.contains("lacks records"), "{e}");
        let e = c.apply(&promote("zjk-a", 2, 39)).unwrap_err();
        assert!(e.contains("epoch 2 began at seq 41"), "{e}");
        assert_eq!((c.epoch, c.primary.as_deref()), (2, Some("zjk-b")));
        // At the start of the epoch it may (nothing was written in it).
        let mut at_start = c.clone();
        at_start.apply(&promote("zjk-a", 2, 40)).unwrap();
        c.apply(&promote("zjk-a", 2, 60)).unwrap();
        assert_eq!(c.starts("files"), vec![(1, 1), (2, 41), (3, 61)]);
        assert_eq!(c.starts("other"), vec![(1, 1)]);
        // Commands travel as bytes and come back the same.
        let cmd = promote("zjk-b", 3, 70);
        assert_eq!(Command::decode(&cmd.encode()), Some(cmd));
        assert_eq!(Command::decode(b"{not json"), None);
    }

    #[test]
    fn the_seat_follows_the_record_and_a_cascade_lasts_only_for_epoch_one() {
        let text = |role: &str, up: &str| {
            format!(
                "[site]\nname = \"sjz-c\"\nrole = \"{role}\"\ndata_dir = \"/var/lib/triad\"\n{up}\n[listen]\nreplication = \"0.0.0.0:7400\"\n\n[tls]\nca = \"/c/ca.pem\"\ncert = \"/c/s.pem\"\nkey = \"/c/s.key\"\n\n[[peer]]\nname = \"zjk-a\"\naddress = \"10.1.0.11:7400\"\n\n[[peer]]\nname = \"zjk-b\"\naddress = \"10.1.0.12:7400\"\nmode = \"async\"\n\n[takeover]\n\n[[dataset]]\nname = \"files\"\nkey_file = \"/k\"\nsource = {{ kind = \"directory\", path = \"/srv/files\" }}\n"
            )
        };
        let cfg = Config::parse(
            std::path::Path::new("c.toml"),
            &text("follower", "upstream = \"zjk-b\""),
        )
        .unwrap();
        let mut c = Cluster::default();
        let cascade = Seat::Follower {
            upstream: Some("zjk-b".into()),
        };
        assert_eq!(seat(&cfg, &c), cascade, "before the group registers");
        c.apply(&Command::Bootstrap {
            primary: "zjk-a".into(),
            sync: vec![],
            time_ns: 1,
        })
        .unwrap();
        assert_eq!(
            seat(&cfg, &c),
            cascade,
            "epoch 1 keeps the config's topology"
        );
        let e = effective(&cfg, &cascade, &c);
        assert_eq!(e.site.role, Role::Follower);
        // The tree the source would watch is the standby tree here.
        assert_eq!(
            e.dataset[0].standby_path.as_deref(),
            Some(std::path::Path::new("/srv/files"))
        );
        c.apply(&promote("zjk-a", 1, 9)).unwrap_err();
        c.apply(&promote("zjk-b", 1, 9)).unwrap();
        let direct = Seat::Follower {
            upstream: Some("zjk-b".into()),
        };
        assert_eq!(seat(&cfg, &c), direct);
        let e = effective(&cfg, &direct, &c);
        assert!(
            e.followers().is_empty(),
            "after a promotion nobody cascades"
        );
        c.apply(&promote("sjz-c", 2, 20)).unwrap();
        assert_eq!(seat(&cfg, &c), Seat::Primary);
        let e = effective(&cfg, &Seat::Primary, &c);
        assert_eq!(e.site.role, Role::Primary);
        assert_eq!(e.site.upstream, None);
        assert_eq!(e.followers().len(), 2, "the primary serves every peer");
        assert_eq!(e.dataset[0].standby_path, None);
        assert_eq!(
            e.dataset[0].directory().unwrap().path,
            std::path::Path::new("/srv/files")
        );
    }

    #[test]
    fn raft_ids_are_the_sorted_site_names() {
        let ids = node::ids(vec!["zjk-b".into(), "sjz-c".into(), "zjk-a".into()]);
        assert_eq!(
            ids.into_iter().collect::<Vec<_>>(),
            vec![
                ("sjz-c".to_string(), 1),
                ("zjk-a".to_string(), 2),
                ("zjk-b".to_string(), 3)
            ]
        );
    }

    /// A dataset at `dir` with six records (seqs 1-6), each putting `f<i>`.
    fn six_records(dir: &std::path::Path, key: &vault::DatasetKey, opts: vault::Options) {
        let ds = Dataset::open(dir, "files", key, opts).unwrap();
        for i in 0..6u8 {
            let ops = vec![vault::Op::Put {
                path: format!("f{i}").into_bytes(),
                entry: vault::Entry {
                    node: vault::Node::Dir,
                    mode: 0o755,
                    mtime_ns: 1,
                    size: 0,
                    ext: None,
                },
            }];
            ds.submit(ops, Vec::new()).unwrap();
        }
        ds.flush_state().unwrap();
        ds.close().unwrap();
    }

    /// With zjk-a the primary of epoch 1: the log at `dir` is a prefix of a
    /// history whose epoch 2 began after seq 6, and forks from one whose
    /// epoch 2 began after seq 3 (returned, with the fork found: seq 4).
    fn fork_after_seq_3(dir: &std::path::Path) -> (Cluster, Option<(u64, u64)>) {
        let mut c = Cluster::default();
        c.apply(&Command::Bootstrap {
            primary: "zjk-a".into(),
            sync: vec![],
            time_ns: 1,
        })
        .unwrap();
        let mut prefix = c.clone();
        prefix.apply(&promote("zjk-b", 1, 6)).unwrap();
        assert_eq!(rejoin::fork_point(dir, "files", &prefix).unwrap(), None);
        c.apply(&promote("zjk-b", 1, 3)).unwrap();
        let fork = rejoin::fork_point(dir, "files", &c).unwrap();
        assert_eq!(fork, Some((4, 2)));
        (c, fork)
    }

    #[test]
    fn a_log_past_the_fork_point_is_found_and_set_aside_with_what_it_changed() {
        let tmp = tempfile::tempdir().unwrap();
        let key = vault::DatasetKey::generate();
        let dir = tmp.path().join("datasets/files");
        six_records(&dir, &key, vault::Options::default());
        // Seqs 4-6 are epoch-1 writes nobody kept.
        let (c, fork) = fork_after_seq_3(&dir);
        let ev = rejoin::set_aside(tmp.path(), &dir, "files", &key, fork.unwrap(), &c).unwrap();
        assert_eq!(
            ev.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [4, 5, 6]
        );
        assert!(ev.records.iter().all(|r| r.epoch == 1));
        assert_eq!(ev.paths, ["f3", "f4", "f5"]);
        assert_eq!(ev.primary, "zjk-b");
        assert!(!dir.exists(), "the live copy is gone");
        assert!(ev.moved_to.join("evidence.json").exists());
        // The moved copy is a whole dataset, readable as it was.
        let view = vault::View::open(&ev.moved_to, "files", &key).unwrap();
        assert_eq!(view.entries().unwrap().len(), 6);
    }

    #[test]
    fn a_fork_whose_first_record_retention_removed_is_still_found() {
        let tmp = tempfile::tempdir().unwrap();
        let key = vault::DatasetKey::generate();
        let dir = tmp.path().join("datasets/files");
        // A segment per record or so, so retention can cut inside.
        six_records(
            &dir,
            &key,
            vault::Options {
                segment_bytes: 64,
                ..vault::Options::default()
            },
        );
        let log = dir.join("log");
        let (_, _, first) = vault::wal::remove_segments_before(&log, 5, None).unwrap();
        assert!(first > 4 && first <= 6, "retention cut before seq {first}");
        assert_eq!(vault::wal::epoch_at(&log, 4).unwrap(), None);
        // Record 4, the first the old primary wrote past the fork, is gone,
        // but the epoch-1 records after it still show the fork (before,
        // this log passed as a prefix).
        let (c, fork) = fork_after_seq_3(&dir);
        let ev = rejoin::set_aside(tmp.path(), &dir, "files", &key, fork.unwrap(), &c).unwrap();
        assert!(ev.records.iter().all(|r| r.seq > 4 && r.epoch == 1));
        assert!(!dir.exists(), "the live copy is gone");
    }
}
