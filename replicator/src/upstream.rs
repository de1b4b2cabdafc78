//! The upstream side: streams each dataset's log to the sites that follow
//! this one and keeps, per follower, what it has acknowledged, so lag is
//! known here in records, bytes and seconds.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use vault::dataset::now_ns;
use vault::wal::Tail;
use vault::Dataset;

use crate::pb::{self, follower_message, upstream_message};
use crate::tls::PeerInfo;

/// Records sent per message, about.
const BATCH_BYTES: usize = 4 << 20;

/// Namespace entries per message of a state transfer.
const TRANSFER_BATCH: usize = 20_000;

/// Most chunk bytes one `Chunks` reply carries (at least one chunk is
/// always sent, and chunks are far smaller than the message limit).
pub const CHUNKS_REPLY_BYTES: usize = 64 << 20;
/// Largest message either side accepts: one record may be up to 256 MiB.
pub const MAX_MESSAGE: usize = 512 << 20;

/// Whether a follower takes part in the commit policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A commit waits until this follower has the change durable.
    Sync,
    /// The follower gets changes as fast as it can take them; no one waits.
    #[default]
    Async,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Sync => "sync",
            Mode::Async => "async",
        })
    }
}

/// What a sync follower's silence means for writers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUnreachable {
    /// Writers wait up to the limit, then get an error (RPO 0 is kept).
    #[default]
    Wait,
    /// After the limit the follower is treated as async, with an alert,
    /// until it has caught up again.
    Degrade,
}

/// How a follower takes part in the commit policy.
#[derive(Clone, Debug)]
pub struct FollowerPolicy {
    pub mode: Mode,
    pub on_unreachable: OnUnreachable,
    pub wait_limit: Duration,
    /// Bytes per second towards this follower, if limited.
    pub bandwidth: Option<u64>,
}

/// A change was not acknowledged by a sync follower in time.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "seq {seq} is durable at this site but sync follower {site} did not acknowledge it within {waited:?} \
     (on_unreachable = \"wait\")"
)]
pub struct CommitError {
    pub site: String,
    pub seq: u64,
    pub waited: Duration,
}

/// One follower of one dataset, as this site sees it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LinkStatus {
    pub dataset: String,
    pub site: String,
    pub mode: Mode,
    pub connected: bool,
    pub address: Option<String>,
    pub acked_seq: u64,
    pub lag_records: u64,
    pub lag_bytes: u64,
    pub lag_seconds: f64,
    pub last_ack_ns: i64,
    /// A sync follower currently treated as async after it stopped answering.
    pub degraded: bool,
    /// Times this follower was degraded since start.
    pub degradations: u64,
}

#[derive(Default, Clone)]
struct Link {
    connected: bool,
    /// Which connection owns `connected`, so a stale stream ending does not
    /// mark a newer one disconnected.
    generation: u64,
    address: Option<String>,
    /// What the follower acknowledged, never more than `sent`.
    acked: u64,
    /// The last seq this connection handed to the follower (or the head it
    /// declared holding when it connected): an ack beyond it is a lie.
    sent: u64,
    last_ack_ns: i64,
    degraded: bool,
    degradations: u64,
}

/// The replication service of one site.
pub struct Upstream {
    /// This site's name, as other sites know it.
    site: String,
    datasets: HashMap<String, Arc<Dataset>>,
    /// Configured followers and their commit policy; replaced on reload.
    followers: Arc<std::sync::RwLock<HashMap<String, FollowerPolicy>>>,
    links: Links,
    generation: std::sync::atomic::AtomicU64,
    /// Woken on every acknowledgement, for writers waiting on the policy.
    acked: Arc<tokio::sync::Notify>,
    /// The site's status document, for the SiteStatus call.
    site_status: Option<StatusSource>,
    /// Carries out Admin calls (this site's own certificate only).
    admin: Option<AdminHandler>,
    /// Raised by [`Upstream::close`]: the site leaves this seat, and every
    /// stream it serves ends, releasing its datasets.
    closed: Arc<std::sync::atomic::AtomicBool>,
}

/// How long a follower has to send its Hello.
const HELLO_WITHIN: Duration = Duration::from_secs(5);

/// What a caller is told while the site changes seat: come back shortly.
pub const LEAVING_SEAT: &str = "this site is changing seat (a new primary was agreed); try again";

/// Answers a Takeover call: (calling site, kind, body) to the reply body.
/// The daemon's takeover layer owns what the kinds mean.
pub type TakeoverHandler =
    Arc<dyn Fn(&str, &str, Vec<u8>) -> Result<Vec<u8>, AdminError> + Send + Sync>;

/// Does an admin action (`action`, `dataset`) at this site: returns whether
/// it succeeded and the answer as JSON, or why it could not run.
pub type AdminHandler = Arc<dyn Fn(&str, &str) -> Result<AdminAnswer, AdminError> + Send + Sync>;

/// An admin call checked by [`Upstream::admin_call`], ready to run.
pub struct AdminCall {
    handler: AdminHandler,
    request: pb::AdminRequest,
}

/// Runs an admin call on a blocking thread and answers it.
// tonic's own error type.
#[allow(clippy::result_large_err)]
pub async fn run_admin(call: AdminCall) -> Result<Response<pb::AdminReply>, Status> {
    let AdminCall { handler, request } = call;
    tracing::info!(action = %request.action, dataset = %request.dataset, "admin call");
    let answer = tokio::task::spawn_blocking(move || handler(&request.action, &request.dataset))
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
    Ok(Response::new(pb::AdminReply {
        ok: answer.ok,
        json: answer.json,
    }))
}

/// What an admin action answered.
#[derive(Debug, Clone)]
pub struct AdminAnswer {
    pub ok: bool,
    pub json: String,
}

/// Why an admin action did not run, each kind with its own status code so
/// the caller can tell a wrong request from a site that is busy.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// An action or dataset this site does not know.
    #[error("{0}")]
    Invalid(String),
    /// This site is not set up for it (no `[archive]`).
    #[error("{0}")]
    NotConfigured(String),
    /// Not now: the archive is not reached yet, stopped, or did not answer
    /// in time. Asking again later may work.
    #[error("{0}")]
    Unavailable(String),
}

impl From<AdminError> for Status {
    fn from(e: AdminError) -> Status {
        match e {
            AdminError::Invalid(m) => Status::invalid_argument(m),
            AdminError::NotConfigured(m) => Status::failed_precondition(m),
            AdminError::Unavailable(m) => Status::unavailable(m),
        }
    }
}

/// Produces the site's status JSON (the daemon's `/v1/status`).
pub type StatusSource = Arc<dyn Fn() -> String + Send + Sync>;

impl Upstream {
    pub fn new(
        datasets: HashMap<String, Arc<Dataset>>,
        followers: HashMap<String, FollowerPolicy>,
    ) -> Upstream {
        Upstream {
            site: String::new(),
            datasets,
            followers: Arc::new(std::sync::RwLock::new(followers)),
            links: Arc::new(Mutex::new(HashMap::new())),
            generation: std::sync::atomic::AtomicU64::new(0),
            acked: Arc::new(tokio::sync::Notify::new()),
            site_status: None,
            admin: None,
            closed: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        }
    }

    /// Ends every stream this service runs within about a second (each
    /// follower is told to come back) and refuses new ones: the site is
    /// leaving the seat these datasets were opened for.
    pub fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
    }

    fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Answers Admin calls with `f`.
    pub fn with_admin(mut self, f: AdminHandler) -> Upstream {
        self.admin = Some(f);
        self
    }

    /// Checks an admin call and returns what runs it. The call holds no
    /// part of this seat while it runs: a promotion can take half a minute,
    /// and the seat's datasets must close in the meantime when the group
    /// names a new primary.
    // tonic's own error type.
    #[allow(clippy::result_large_err)]
    pub fn admin_call(&self, req: Request<pb::AdminRequest>) -> Result<AdminCall, Status> {
        let caller = caller(&req)?.site;
        if caller != self.site {
            tracing::warn!(site = %caller, "refused an admin call: it needs this site's own certificate");
            return Err(Status::permission_denied(format!(
                "admin calls at {} need its own certificate; {caller} may only read",
                self.site
            )));
        }
        let handler = self
            .admin
            .clone()
            .ok_or_else(|| Status::unimplemented("this site takes no admin calls"))?;
        Ok(AdminCall {
            handler,
            request: req.into_inner(),
        })
    }

    /// Answers SiteStatus calls with what `f` returns.
    pub fn with_status(mut self, f: StatusSource) -> Upstream {
        self.site_status = Some(f);
        self
    }

    /// Waits until every sync follower has acknowledged `seq` of `dataset`,
    /// as the commit policy says: a follower silent for its wait limit either
    /// fails the wait (`wait`) or is degraded to async with an alert
    /// (`degrade`) until it has caught up again.
    pub async fn wait_committed(&self, dataset: &str, seq: u64) -> Result<(), CommitError> {
        let started = tokio::time::Instant::now();
        loop {
            let notified = self.acked.notified();
            let head = self
                .datasets
                .get(dataset)
                .map(|d| d.head_seq())
                .unwrap_or(seq);
            let mut pending: Vec<(String, FollowerPolicy)> = Vec::new();
            let policies = self.policies();
            if let Ok(mut links) = self.links.lock() {
                for (site, p) in policies.iter().filter(|(_, p)| p.mode == Mode::Sync) {
                    let l = links
                        .entry((dataset.to_string(), site.clone()))
                        .or_default();
                    if l.degraded && l.connected && l.acked >= head {
                        l.degraded = false;
                        tracing::info!(site = %site, dataset, "sync follower has caught up: back to synchronous");
                    }
                    // A disconnected follower does not count, whatever it
                    // acknowledged before.
                    if (l.acked < seq || !l.connected) && !l.degraded {
                        pending.push((site.clone(), p.clone()));
                    }
                }
            }
            if pending.is_empty() {
                return Ok(());
            }
            let waited = started.elapsed();
            let mut sleep_for = Duration::from_millis(50);
            for (site, p) in &pending {
                if waited < p.wait_limit {
                    sleep_for = sleep_for.min(p.wait_limit - waited);
                    continue;
                }
                match p.on_unreachable {
                    OnUnreachable::Wait => {
                        return Err(CommitError {
                            site: site.to_string(),
                            seq,
                            waited,
                        })
                    }
                    OnUnreachable::Degrade => {
                        self.update(&(dataset.to_string(), site.to_string()), |l| {
                            if !l.degraded {
                                l.degraded = true;
                                l.degradations += 1;
                            }
                        });
                        tracing::error!(site = %site, dataset, seq, "sync follower did not answer within its wait limit: DEGRADED to async until it catches up");
                    }
                }
            }
            let _ = tokio::time::timeout(sleep_for, notified).await;
        }
    }

    /// True for sites configured to follow this one.
    pub fn is_follower(&self, site: &str) -> bool {
        self.policies().contains_key(site)
    }

    /// The followers' commit policies as configured now.
    fn policies(&self) -> HashMap<String, FollowerPolicy> {
        self.followers.read().map(|f| f.clone()).unwrap_or_default()
    }

    /// Replaces the followers' commit policies (a config reload). Links
    /// already open keep streaming; a new bandwidth applies from their
    /// next batch, a new mode or wait limit from the next commit wait.
    pub fn set_policies(&self, followers: HashMap<String, FollowerPolicy>) {
        if let Ok(mut f) = self.followers.write() {
            *f = followers;
        }
        self.acked.notify_waiters();
    }

    /// A dataset another site (`caller`) asks about, if this site has it
    /// with the same key: every call about a dataset starts here.
    // tonic's own error type, returned as is by the handlers.
    #[allow(clippy::result_large_err)]
    fn dataset_for(
        &self,
        caller: &str,
        dataset: &str,
        key_id: &str,
    ) -> Result<Arc<Dataset>, Status> {
        if self.is_closed() {
            return Err(Status::unavailable(LEAVING_SEAT));
        }
        let ds =
            self.datasets.get(dataset).cloned().ok_or_else(|| {
                Status::not_found(format!("this site has no dataset `{dataset}`"))
            })?;
        if key_id != ds.key_id() {
            tracing::error!(site = %caller, dataset = %dataset, "refused a site holding a different dataset key");
            return Err(Status::failed_precondition(format!(
                "dataset `{dataset}` has key id {} here but {key_id} at {caller}: both sites need the same key file",
                ds.key_id()
            )));
        }
        Ok(ds)
    }

    /// Names this site in answers to other sites.
    pub fn with_site(mut self, site: &str) -> Upstream {
        self.site = site.to_string();
        self
    }

    /// The configured followers of one dataset.
    pub fn links_of(&self, dataset: &str) -> Vec<LinkStatus> {
        self.status()
            .into_iter()
            .filter(|l| l.dataset == dataset)
            .collect()
    }

    /// Every configured follower of every dataset, connected or not.
    pub fn status(&self) -> Vec<LinkStatus> {
        let links = self.links.lock().map(|l| l.clone()).unwrap_or_default();
        let now = now_ns();
        let mut out = Vec::new();
        let mut names: Vec<&String> = self.datasets.keys().collect();
        names.sort();
        for name in names {
            let ds = &self.datasets[name];
            let head = ds.head_seq();
            let policies = self.policies();
            let mut sites: Vec<(&String, &FollowerPolicy)> = policies.iter().collect();
            sites.sort_by_key(|(s, _)| s.as_str());
            for (site, policy) in sites {
                let mode = policy.mode;
                let mut l = links
                    .get(&(name.clone(), site.clone()))
                    .cloned()
                    .unwrap_or_default();
                if l.degraded && l.connected && l.acked >= head {
                    // Caught up: the next commit wait clears it; report it cleared now.
                    tracing::info!(site = %site, dataset = %name, "sync follower has caught up: back to synchronous");
                    l.degraded = false;
                    self.update(&(name.clone(), site.clone()), |x| x.degraded = false);
                }
                let behind = head.saturating_sub(l.acked);
                let lag_seconds = if behind == 0 {
                    0.0
                } else {
                    // The oldest change the follower lacks; if it is older than
                    // what is remembered, the oldest remembered is a lower bound.
                    let t = ds
                        .commit_time(l.acked.saturating_add(1))
                        .or_else(|| ds.commit_time(head.saturating_sub(1_000_000).max(1)));
                    t.map(|t| (now - t).max(0) as f64 / 1e9).unwrap_or(0.0)
                };
                out.push(LinkStatus {
                    dataset: name.clone(),
                    site: site.clone(),
                    mode,
                    connected: l.connected,
                    address: l.address.clone(),
                    acked_seq: l.acked,
                    lag_records: behind,
                    lag_bytes: if behind == 0 {
                        0
                    } else {
                        ds.bytes_after(l.acked).unwrap_or(0)
                    },
                    lag_seconds,
                    last_ack_ns: l.last_ack_ns,
                    degraded: l.degraded,
                    degradations: l.degradations,
                });
            }
        }
        out
    }

    fn update(&self, key: &(String, String), f: impl FnOnce(&mut Link)) {
        if let Ok(mut l) = self.links.lock() {
            f(l.entry(key.clone()).or_default());
        }
    }
}

/// Records that this connection handed the follower everything up to `seq`.
fn mark_sent(
    links: &Mutex<HashMap<(String, String), Link>>,
    key: &(String, String),
    generation: u64,
    seq: u64,
) {
    if let Ok(mut l) = links.lock() {
        if let Some(l) = l.get_mut(key).filter(|l| l.generation == generation) {
            l.sent = l.sent.max(seq);
        }
    }
}

fn heartbeat(ds: &Dataset, acked: u64) -> pb::UpstreamMessage {
    let head = ds.head_seq();
    pb::UpstreamMessage {
        msg: Some(upstream_message::Msg::Heartbeat(pb::Heartbeat {
            head_seq: head,
            head_time_ns: ds.commit_time(head).unwrap_or(0),
            next_time_ns: if acked < head {
                ds.commit_time(acked.saturating_add(1)).unwrap_or(0)
            } else {
                0
            },
            lag_bytes: if acked < head {
                ds.bytes_after(acked).unwrap_or(0)
            } else {
                0
            },
        })),
    }
}

// The stream item type is fixed by tonic, Status and all.
#[allow(clippy::result_large_err)]
fn transfer_msg(part: pb::transfer::Part) -> Result<pb::UpstreamMessage, Status> {
    Ok(pb::UpstreamMessage {
        msg: Some(upstream_message::Msg::Transfer(pb::Transfer {
            part: Some(part),
        })),
    })
}

/// Sends the dataset's state at one consistent point, then the chunks the
/// follower asks for, all from the same snapshot. Returns the seq sent.
///
/// `prior` is the follower's head and this site's chain hash there, which
/// the follower checks before it lets the transfer replace its copy.
/// `before_end` is called with the transfer's seq just before the last
/// message leaves, so the follower's ack of it is never capped.
fn send_state(
    ds: &Dataset,
    tx: &mpsc::Sender<Result<pb::UpstreamMessage, Status>>,
    need: &std::sync::mpsc::Receiver<pb::NeedChunks>,
    closed: &std::sync::atomic::AtomicBool,
    prior: (u64, Vec<u8>),
    before_end: impl FnOnce(u64),
) -> Result<u64, String> {
    use pb::transfer::Part;
    let leaving = || closed.load(std::sync::atomic::Ordering::Acquire);
    // Waits while the follower's queue is full, but not past a seat
    // change.
    let send = |mut m| loop {
        if leaving() {
            return Err(LEAVING_SEAT.to_string());
        }
        match tx.try_send(m) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Full(back)) => {
                m = back;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err("the follower went away".to_string())
            }
        }
    };
    ds.state().with_snapshot(|snap| {
        let applied = snap.applied().map_err(|e| e.to_string())?;
        let pins = snap.pins().map_err(|e| e.to_string())?;
        send(transfer_msg(Part::Begin(pb::TransferBegin {
            seq: applied.seq,
            chain_hash: applied.hash.to_vec(),
            time_ns: applied.time_ns,
            digest: applied.digest.to_bytes(),
            pins: pins
                .iter()
                .map(|(id, n)| pb::Pin {
                    id: id.0.to_vec(),
                    count: *n,
                })
                .collect(),
            follower_head_seq: prior.0,
            follower_head_hash: prior.1,
            evidence: vault::state::Checkpoint::new(
                ds.keys(),
                applied.seq,
                applied.hash,
                applied.digest.summary(),
            )
            .hmac_sm3
            .to_vec(),
        })))?;
        // The namespace is read in order and sent a batch at a time: the
        // sender holds one batch (and the queue's few) whatever the tree.
        let mut batch = Vec::with_capacity(TRANSFER_BATCH);
        let mut entries_sent = 0u64;
        for item in snap.entries_iter().map_err(|e| e.to_string())? {
            let (path, e) = item.map_err(|e| e.to_string())?;
            entries_sent += 1;
            batch.push(pb::NamespaceEntry {
                path,
                entry: e.encode(),
            });
            if batch.len() == TRANSFER_BATCH {
                send(transfer_msg(Part::Entries(pb::TransferEntries {
                    entries: std::mem::replace(&mut batch, Vec::with_capacity(TRANSFER_BATCH)),
                })))?;
            }
        }
        if !batch.is_empty() {
            send(transfer_msg(Part::Entries(pb::TransferEntries {
                entries: batch,
            })))?;
        }
        send(transfer_msg(Part::EntriesEnd(pb::TransferEntriesEnd {})))?;
        let mut chunks_sent = 0u64;
        loop {
            let n = wait_need(need, leaving)?;
            let mut batch = Vec::new();
            let mut bytes = 0usize;
            for id in &n.ids {
                let id = vault::ChunkId(
                    id.as_slice()
                        .try_into()
                        .map_err(|_| "malformed chunk id".to_string())?,
                );
                let c = snap
                    .chunk(&id)
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("chunk {id} is not in this site's store"))?;
                bytes += c.sealed.len();
                batch.push(pb::SealedChunk {
                    id: c.id.0.to_vec(),
                    plain_len: c.plain_len,
                    sealed: c.sealed,
                });
                if bytes >= BATCH_BYTES {
                    chunks_sent += batch.len() as u64;
                    send(transfer_msg(Part::Chunks(pb::TransferChunks {
                        chunks: std::mem::take(&mut batch),
                    })))?;
                    bytes = 0;
                }
            }
            if !batch.is_empty() {
                chunks_sent += batch.len() as u64;
                send(transfer_msg(Part::Chunks(pb::TransferChunks {
                    chunks: batch,
                })))?;
            }
            if n.done {
                break;
            }
        }
        before_end(applied.seq);
        send(transfer_msg(Part::End(pb::TransferEnd {})))?;
        tracing::info!(
            dataset = ds.name(),
            seq = applied.seq,
            entries = entries_sent,
            chunks = chunks_sent,
            "state transfer sent"
        );
        Ok(applied.seq)
    })
}

/// The follower's next request for chunks during a transfer: it has two
/// minutes to ask, and the wait ends early when the site leaves its seat.
fn wait_need(
    need: &std::sync::mpsc::Receiver<pb::NeedChunks>,
    leaving: impl Fn() -> bool,
) -> Result<pb::NeedChunks, String> {
    use std::sync::mpsc::RecvTimeoutError;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        if leaving() {
            return Err(LEAVING_SEAT.to_string());
        }
        match need.recv_timeout(Duration::from_millis(500)) {
            Ok(n) => return Ok(n),
            Err(RecvTimeoutError::Timeout) if std::time::Instant::now() < deadline => {}
            Err(_) => return Err("the follower did not ask for chunks".to_string()),
        }
    }
}

/// Where `triad verify --scrub` leaves its result in a dataset directory.
pub const LAST_SCRUB: &str = "last-scrub.json";

/// The last scrub recorded in a dataset directory: when, how many chunks it
/// left damaged (copy and archive), and whether the digest recomputed equal.
pub fn read_last_scrub(dataset_dir: &std::path::Path) -> Option<(i64, u64, bool)> {
    let b = std::fs::read(dataset_dir.join(LAST_SCRUB)).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&b).ok()?;
    Some((
        v["time_ns"].as_i64().unwrap_or(0),
        v["damaged"].as_u64().unwrap_or(0) + v["archive_damaged"].as_u64().unwrap_or(0),
        v["digest_ok"].as_bool().unwrap_or(true),
    ))
}

/// The calling site, from its client certificate: every call needs one.
#[allow(clippy::result_large_err)]
fn caller<T>(req: &Request<T>) -> Result<PeerInfo, Status> {
    req.extensions()
        .get::<PeerInfo>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))
}

type FollowStream = Pin<Box<dyn Stream<Item = Result<pb::UpstreamMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::replication_server::Replication for Arc<Upstream> {
    type FollowStream = FollowStream;

    async fn chunks(
        &self,
        req: Request<pb::ChunksRequest>,
    ) -> Result<Response<pb::ChunksReply>, Status> {
        let peer = caller(&req)?;
        let r = req.into_inner();
        let ds = self.dataset_for(&peer.site, &r.dataset, &r.key_id)?;
        if r.ids.len() > 4096 {
            return Err(Status::invalid_argument("at most 4096 chunks at a time"));
        }
        // Each id is answered once, and the reply stops growing at
        // CHUNKS_REPLY_BYTES: the caller asks again for what was left out.
        // So a request repeating one large id cannot make this site
        // buffer gigabytes (it did, 7.8 GB for 2,000 copies).
        let chunks = tokio::task::spawn_blocking(move || {
            let mut seen = std::collections::HashSet::new();
            let mut bytes = 0usize;
            let mut out = Vec::new();
            for id in &r.ids {
                if bytes >= CHUNKS_REPLY_BYTES {
                    break;
                }
                let Ok(id) = <[u8; 32]>::try_from(id.as_slice()) else {
                    continue;
                };
                if !seen.insert(id) {
                    continue;
                }
                let Ok(Some(sealed)) = ds.state().chunk_bytes(&vault::ChunkId(id)) else {
                    continue;
                };
                bytes += sealed.len();
                out.push(pb::ChunkBytes {
                    id: id.to_vec(),
                    sealed,
                });
            }
            out
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::ChunksReply { chunks }))
    }

    async fn admin(
        &self,
        req: Request<pb::AdminRequest>,
    ) -> Result<Response<pb::AdminReply>, Status> {
        run_admin(self.admin_call(req)?).await
    }

    async fn takeover(
        &self,
        req: Request<pb::TakeoverRequest>,
    ) -> Result<Response<pb::TakeoverReply>, Status> {
        // Takeover calls outlive a seat: the site's [`crate::seated`]
        // service answers them, never one seat's datasets.
        caller(&req)?;
        Err(Status::unimplemented("this site takes no part in takeover"))
    }

    async fn site_status(
        &self,
        req: Request<pb::SiteStatusRequest>,
    ) -> Result<Response<pb::SiteStatusReply>, Status> {
        caller(&req)?;
        let f = self
            .site_status
            .clone()
            .ok_or_else(|| Status::unimplemented("this site does not report its status"))?;
        let json = tokio::task::spawn_blocking(move || f())
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::SiteStatusReply { json }))
    }

    async fn checkpoints(
        &self,
        req: Request<pb::CheckpointsRequest>,
    ) -> Result<Response<pb::CheckpointsReply>, Status> {
        let peer = caller(&req)?;
        let r = req.into_inner();
        let ds = self.dataset_for(&peer.site, &r.dataset, &r.key_id)?;
        let site = self.site.clone();
        let reply = tokio::task::spawn_blocking(move || -> vault::Result<pb::CheckpointsReply> {
            let head_seq = ds.head_seq();
            let starts = ds.held_epochs()?;
            let epochs_hmac_sm3 = vault::dataset::Fence::evidence(ds.keys(), &starts).to_vec();
            let epochs = starts
                .into_iter()
                .map(|(epoch, start)| pb::EpochStart { epoch, start })
                .collect();
            let checkpoints = ds
                .state()
                .checkpoints()?
                .into_iter()
                .map(|c| pb::CheckpointInfo {
                    seq: c.seq,
                    hash: c.hash.to_vec(),
                    digest: c.digest.to_vec(),
                    hmac_sm3: c.hmac_sm3.to_vec(),
                })
                .collect();
            let (paths_seq, paths) = if r.with_paths {
                ds.state().with_snapshot(|snap| -> vault::Result<_> {
                    let a = snap.applied()?;
                    let paths = snap
                        .entries()?
                        .into_iter()
                        .map(|(p, e)| pb::PathDigest {
                            digest: blake3::hash(&e.digest_bytes(&p)).as_bytes().to_vec(),
                            path: p,
                        })
                        .collect();
                    Ok((a.seq, paths))
                })?
            } else {
                (0, Vec::new())
            };
            // The last scrub's result, as `triad verify --scrub` left it.
            let (scrub_time_ns, scrub_damaged, scrub_digest_ok) =
                read_last_scrub(ds.dir()).unwrap_or((0, 0, true));
            Ok(pb::CheckpointsReply {
                site,
                head_seq,
                checkpoints,
                paths_seq,
                paths,
                scrub_time_ns,
                scrub_damaged,
                scrub_digest_ok,
                epochs,
                epochs_hmac_sm3,
            })
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(reply))
    }

    async fn follow(
        &self,
        req: Request<Streaming<pb::FollowerMessage>>,
    ) -> Result<Response<FollowStream>, Status> {
        let peer = caller(&req)?;
        // Every configured site may connect (for verify); only followers follow.
        if !self.is_follower(&peer.site) {
            tracing::warn!(site = %peer.site, addr = %peer.addr, "refused Follow from a site that is not configured to follow this one");
            return Err(Status::permission_denied(format!(
                "site {} is not configured to follow this site (give its [[peer]] a mode)",
                peer.site
            )));
        }
        let mut inbound = req.into_inner();
        // A caller that never says Hello must not hold this seat's
        // datasets open past a seat change.
        let first = tokio::time::timeout(HELLO_WITHIN, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 5 s"))?;
        let hello = match first? {
            Some(pb::FollowerMessage {
                msg: Some(follower_message::Msg::Hello(h)),
            }) => h,
            _ => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        let ds = self.dataset_for(&peer.site, &hello.dataset, &hello.key_id)?;
        let plan = plan_stream(&peer.site, &hello, &ds)?;
        let start = plan.start();
        let ld = plan.log_dir.clone();
        let tail = tokio::task::spawn_blocking(move || Tail::new(&ld, start))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| {
                Status::failed_precondition(format!("cannot stream from seq {start}: {e}"))
            })?;
        if plan.transfer {
            tracing::warn!(site = %peer.site, dataset = %hello.dataset, from_seq = plan.from,
                first_retained = plan.first_retained, "follower is behind the retained log: sending a state transfer");
        }
        let link = LinkHandle {
            links: self.links.clone(),
            key: (hello.dataset.clone(), peer.site.clone()),
            generation: self
                .generation
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1,
        };
        let from = plan.from;
        self.update(&link.key, |l| {
            l.connected = true;
            l.generation = link.generation;
            l.address = Some(peer.addr.to_string());
            l.acked = from - 1;
            l.sent = from - 1;
        });
        tracing::info!(site = %peer.site, dataset = %hello.dataset, from_seq = from, addr = %peer.addr, "follower connected");

        let (tx, rx) = mpsc::channel::<Result<pb::UpstreamMessage, Status>>(4);
        let (need_tx, need_rx) = std::sync::mpsc::channel::<pb::NeedChunks>();
        let mut sender = RecordSender {
            ds,
            closed: self.closed.clone(),
            link: link.clone(),
            followers: self.followers.clone(),
            tx,
            batch_bytes: BATCH_BYTES,
        };
        // With a bandwidth limit, batches hold about a quarter second of
        // traffic, so pacing is smooth rather than bursts of 4 MiB. Sized
        // once, from the limit in force when the follower connects.
        if let Some(r) = sender.rate() {
            sender.batch_bytes = ((r / 4) as usize).clamp(16 << 10, BATCH_BYTES);
        }
        tokio::spawn(sender.run(plan, tail, need_rx));
        tokio::spawn(read_acks(inbound, link, self.acked.clone(), need_tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Where a follower's stream starts, worked out from its Hello.
struct StreamPlan {
    /// The first seq the follower lacks.
    from: u64,
    /// Whether it is behind the retained log and gets a state transfer first.
    transfer: bool,
    /// The follower's head and this site's chain hash there, which the
    /// follower checks before a transfer replaces its copy.
    prior: (u64, Vec<u8>),
    log_dir: std::path::PathBuf,
    first_retained: u64,
}

impl StreamPlan {
    /// The first seq read from the log.
    fn start(&self) -> u64 {
        if self.transfer {
            self.first_retained
        } else {
            self.from
        }
    }
}

/// Checks a follower's Hello against this site's history and plans its
/// stream: a follower ahead of us or forked from us is refused here, and
/// a state transfer is only planned when its copy is provably a prefix.
// tonic's own error type, returned as is by the handler.
#[allow(clippy::result_large_err)]
fn plan_stream(site: &str, hello: &pb::Hello, ds: &Dataset) -> Result<StreamPlan, Status> {
    let head = ds.head_seq();
    if hello.from_seq > head + 1 {
        tracing::error!(site = %site, dataset = %hello.dataset, their_head = hello.from_seq - 1, our_head = head,
            "a follower is ahead of this site: it diverged or follows the wrong upstream");
        return Err(Status::failed_precondition(format!(
            "the follower's log reaches seq {} but this site's ends at {head}",
            hello.from_seq - 1
        )));
    }
    let from = hello.from_seq.max(1);
    // The follower's history must be ours at its head, where we still
    // know our hash: a fork is named now, not when we next append.
    if from > 1 && !hello.head_hash.is_empty() {
        match ds.chain_hash_at(from - 1) {
            Ok(Some(ours)) if ours.as_slice() != hello.head_hash.as_slice() => {
                tracing::error!(site = %site, dataset = %hello.dataset, seq = from - 1,
                    "refused a follower whose chain hash at its head differs from ours: its copy diverged");
                return Err(Status::failed_precondition(format!(
                    "DIVERGED at seq {}: the follower's chain hash there is {} but this site's is {}; \
                     the follower's copy is kept as it is",
                    from - 1,
                    hex::encode(&hello.head_hash),
                    hex::encode(ours)
                )));
            }
            Ok(_) => {}
            Err(e) => return Err(Status::internal(e.to_string())),
        }
    }
    let log_dir = ds.dir().join("log");
    let first_retained = vault::wal::log_extent(&log_dir)
        .map_err(|e| Status::internal(e.to_string()))?
        .1;
    // Behind the retained log: the follower gets a state transfer, but
    // only if its history is a prefix of ours (its newest checkpoint
    // matches ours at the same seq); a diverged copy is never overwritten.
    let transfer = from < first_retained;
    if transfer && hello.checkpoint_seq > 0 {
        check_checkpoint(site, hello, ds)?;
    }
    let prior = if transfer && from > 1 {
        prior_for(site, hello, ds, from)?
    } else {
        (0, Vec::new())
    };
    Ok(StreamPlan {
        from,
        transfer,
        prior,
        log_dir,
        first_retained,
    })
}

/// A follower's newest checkpoint must be ours at the same seq before a
/// state transfer may replace its copy.
#[allow(clippy::result_large_err)]
fn check_checkpoint(site: &str, hello: &pb::Hello, ds: &Dataset) -> Result<(), Status> {
    match ds.checkpoint_at(hello.checkpoint_seq) {
        Ok(Some(c)) if c.hash.as_slice() != hello.checkpoint_hash.as_slice() => {
            tracing::error!(site = %site, dataset = %hello.dataset, seq = hello.checkpoint_seq,
                "refusing a state transfer: the follower's checkpoint differs from ours, its copy diverged");
            Err(Status::failed_precondition(format!(
                "DIVERGED at or before seq {}: checkpoint hashes differ; the follower's copy is kept as it is",
                hello.checkpoint_seq
            )))
        }
        Ok(Some(_)) => Ok(()),
        // Without our checkpoint at that seq the follower's history
        // cannot be shown to be ours: refuse rather than overwrite.
        Ok(None) => {
            tracing::error!(site = %site, dataset = %hello.dataset, seq = hello.checkpoint_seq,
                "refusing a state transfer: this site has no checkpoint at the follower's newest one to compare with");
            Err(Status::failed_precondition(format!(
                "cannot show the follower's copy (checkpoint at seq {}) is a prefix of this site's, which has no \
                 checkpoint there; rebuild the follower from an empty dataset directory",
                hello.checkpoint_seq
            )))
        }
        Err(e) => Err(Status::internal(e.to_string())),
    }
}

/// The proof the follower asks of a transfer: our chain hash at its head.
/// Without one its copy is never replaced.
#[allow(clippy::result_large_err)]
fn prior_for(
    site: &str,
    hello: &pb::Hello,
    ds: &Dataset,
    from: u64,
) -> Result<(u64, Vec<u8>), Status> {
    match ds.chain_hash_at(from - 1) {
        Ok(Some(h)) => Ok((from - 1, h.to_vec())),
        Ok(None) => {
            tracing::error!(site = %site, dataset = %hello.dataset, seq = from - 1,
                "refusing a state transfer: this site has no chain hash at the follower's head to prove continuity");
            Err(Status::failed_precondition(format!(
                "cannot show that this site's history continues the follower's at its head (seq {}); \
                 rebuild the follower with `triad resync`",
                from - 1
            )))
        }
        Err(e) => Err(Status::internal(e.to_string())),
    }
}

type Links = Arc<Mutex<HashMap<(String, String), Link>>>;

/// One follower connection's entry in the link table.
#[derive(Clone)]
struct LinkHandle {
    links: Links,
    /// (dataset, follower site).
    key: (String, String),
    /// Which connection this is, so a stale one never writes over a newer.
    generation: u64,
}

impl LinkHandle {
    fn mark_sent(&self, seq: u64) {
        mark_sent(&self.links, &self.key, self.generation, seq);
    }

    fn acked(&self) -> u64 {
        self.links
            .lock()
            .ok()
            .and_then(|l| l.get(&self.key).map(|l| l.acked))
            .unwrap_or(0)
    }

    fn with_own(&self, f: impl FnOnce(&mut Link)) {
        if let Ok(mut l) = self.links.lock() {
            let l = l.entry(self.key.clone()).or_default();
            if l.generation == self.generation {
                f(l);
            }
        }
    }
}

type Outbound = mpsc::Sender<Result<pb::UpstreamMessage, Status>>;

/// The task that sends one follower its records: a state transfer first
/// when planned, then the log as it grows, paced to the link's bandwidth.
struct RecordSender {
    ds: Arc<Dataset>,
    /// The service's [`Upstream::close`] flag.
    closed: Arc<std::sync::atomic::AtomicBool>,
    link: LinkHandle,
    followers: Arc<std::sync::RwLock<HashMap<String, FollowerPolicy>>>,
    tx: Outbound,
    /// Most bytes of records read for one message.
    batch_bytes: usize,
}

impl RecordSender {
    /// The follower's bandwidth limit now (it may change on reload).
    fn rate(&self) -> Option<u64> {
        self.followers
            .read()
            .ok()
            .and_then(|f| f.get(&self.link.key.1).and_then(|p| p.bandwidth))
            .filter(|r| *r > 0)
    }

    async fn run(
        self,
        plan: StreamPlan,
        mut tail: Tail,
        need_rx: std::sync::mpsc::Receiver<pb::NeedChunks>,
    ) {
        let mut next = plan.from;
        if plan.transfer {
            match self.transfer(&plan, need_rx).await {
                Some((seq, t)) => {
                    next = seq + 1;
                    tail = t;
                }
                None => return,
            }
        }
        self.stream(next, tail).await;
    }

    /// Sends the state transfer; returns the seq it reached and a tail
    /// positioned after it, or None when the stream has ended.
    async fn transfer(
        &self,
        plan: &StreamPlan,
        need_rx: std::sync::mpsc::Receiver<pb::NeedChunks>,
    ) -> Option<(u64, Tail)> {
        let (d, t, l) = (self.ds.clone(), self.tx.clone(), self.link.clone());
        let prior = plan.prior.clone();
        let closed = self.closed.clone();
        let sent = tokio::task::spawn_blocking(move || {
            send_state(&d, &t, &need_rx, &closed, prior, |seq| l.mark_sent(seq))
        })
        .await;
        match sent {
            Ok(Ok(seq)) => {
                let ld = plan.log_dir.clone();
                match tokio::task::spawn_blocking(move || Tail::new(&ld, seq + 1)).await {
                    Ok(Ok(t)) => Some((seq, t)),
                    _ => {
                        let _ = self
                            .tx
                            .send(Err(Status::unavailable(
                                "the log moved on during the transfer; reconnect",
                            )))
                            .await;
                        None
                    }
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "state transfer stopped");
                let _ = self.tx.send(Err(Status::unavailable(e))).await;
                None
            }
            Err(_) => None,
        }
    }

    /// Streams the log from `next` until the follower goes away.
    async fn stream(&self, mut next: u64, mut tail: Tail) {
        let batch_bytes = self.batch_bytes;
        let mut next_free = tokio::time::Instant::now();
        loop {
            if self.leaving() {
                let _ = self.tx.try_send(Err(Status::unavailable(LEAVING_SEAT)));
                break;
            }
            if self.tx.is_closed() {
                break;
            }
            let head = self.ds.head_seq();
            let acked = self.link.acked();
            if next <= head {
                let res = tokio::task::spawn_blocking(move || {
                    let r = tail.read(head, batch_bytes);
                    (tail, r)
                })
                .await;
                let Ok((t, batch)) = res else { break };
                tail = t;
                let batch = match batch {
                    Ok(b) if !b.is_empty() => b,
                    Ok(_) => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "reading the log for a follower failed");
                        let _ = self.tx.send(Err(Status::internal(e.to_string()))).await;
                        break;
                    }
                };
                next += batch.len() as u64;
                // Before it leaves, so an honest ack is never capped.
                self.link.mark_sent(next - 1);
                let bytes: usize = batch.iter().map(|r| r.payload.len()).sum();
                if let Some(rate) = self.rate() {
                    // Token pacing: a batch leaves no earlier than the
                    // link's budget allows.
                    let now = tokio::time::Instant::now();
                    next_free = next_free.max(now);
                    tokio::time::sleep_until(next_free).await;
                    next_free += Duration::from_secs_f64(bytes as f64 / rate as f64);
                }
                let msg = pb::UpstreamMessage {
                    msg: Some(upstream_message::Msg::Records(pb::Records {
                        payloads: batch.into_iter().map(|r| r.payload).collect(),
                    })),
                };
                if !self.send(Ok(msg)).await || !self.send(Ok(heartbeat(&self.ds, acked))).await {
                    break;
                }
            } else {
                let d = self.ds.clone();
                let moved = tokio::task::spawn_blocking(move || {
                    d.wait_head_above(head, Duration::from_secs(1))
                })
                .await;
                let Ok(new_head) = moved else { break };
                if new_head <= head && !self.send(Ok(heartbeat(&self.ds, acked))).await {
                    break;
                }
            }
            if self.tx.is_closed() {
                break;
            }
        }
    }

    fn leaving(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Sends one message when the follower takes it; false once it is gone
    /// or the site leaves this seat. A follower that stops reading (its
    /// queue full) thus cannot hold the seat's datasets open past a seat
    /// change.
    async fn send(&self, m: Result<pb::UpstreamMessage, Status>) -> bool {
        loop {
            match tokio::time::timeout(Duration::from_millis(200), self.tx.reserve()).await {
                Ok(Ok(permit)) => {
                    permit.send(m);
                    return true;
                }
                Ok(Err(_)) => return false,
                Err(_) if self.leaving() => return false,
                Err(_) => {}
            }
        }
    }
}

/// Reads what a follower sends back: acknowledgements (never beyond what
/// this connection sent) and requests for chunks during a transfer.
async fn read_acks(
    mut inbound: Streaming<pb::FollowerMessage>,
    link: LinkHandle,
    notify: Arc<tokio::sync::Notify>,
    need_tx: std::sync::mpsc::Sender<pb::NeedChunks>,
) {
    loop {
        match inbound.message().await {
            Ok(Some(pb::FollowerMessage {
                msg: Some(follower_message::Msg::Ack(a)),
            })) => {
                link.with_own(|l| {
                    l.acked = l.acked.max(a.durable_seq.min(l.sent));
                    l.last_ack_ns = now_ns();
                });
                notify.notify_waiters();
            }
            Ok(Some(pb::FollowerMessage {
                msg: Some(follower_message::Msg::Need(n)),
            })) => {
                let _ = need_tx.send(n);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    link.with_own(|l| l.connected = false);
    tracing::info!(site = %link.key.1, dataset = %link.key.0, "follower disconnected");
}
