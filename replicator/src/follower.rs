//! The follower side: dial the upstream, append what it streams to this
//! site's log (only if it continues this site's hash chain), acknowledge it,
//! and reconnect by itself after any failure. A divergence stops the loop for
//! good and is reported loudly: nothing is overwritten to "fix" it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use vault::dataset::now_ns;
use vault::{Dataset, SubmitError, VaultError};

use crate::pb::{self, follower_message, upstream_message};
use crate::tls::{client_config, TlsFiles};
use crate::upstream::MAX_MESSAGE;
use crate::CallError;

/// Where this site streams a dataset from.
#[derive(Clone, Debug)]
pub struct UpstreamAddr {
    pub name: String,
    pub address: String,
    pub tls: TlsFiles,
}

/// What the follower loop knows, for status and lag.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct FollowStatus {
    pub upstream: String,
    pub connected: bool,
    pub upstream_head_seq: u64,
    pub lag_records: u64,
    pub lag_bytes: u64,
    pub lag_seconds: f64,
    pub connects: u64,
    pub last_error: Option<String>,
    /// Set when this site's log parted from the upstream's: applying stopped.
    pub diverged: Option<String>,
    /// Catching up by state transfer: set from its first message until it
    /// is installed (a broken link leaves it set, since the copy is still
    /// behind the upstream's retained log). The site reports not ready.
    pub receiving_transfer: bool,
    #[serde(skip)]
    next_time_ns: i64,
    #[serde(skip)]
    upstream_lag_bytes: u64,
}

impl FollowStatus {
    /// Refreshes lag against this site's current head.
    pub fn with_lag(mut self, local_head: u64) -> FollowStatus {
        self.lag_records = self.upstream_head_seq.saturating_sub(local_head);
        self.lag_bytes = if self.lag_records == 0 {
            0
        } else {
            self.upstream_lag_bytes
        };
        self.lag_seconds = if self.lag_records == 0 || self.next_time_ns == 0 {
            0.0
        } else {
            (now_ns() - self.next_time_ns).max(0) as f64 / 1e9
        };
        self
    }
}

/// A state transfer being received. Its namespace is staged in the
/// dataset's state as it arrives (`Dataset::stage_transfer`), never held
/// here, so an upstream that sends entries without end fills the disk,
/// not the memory.
struct Transfer {
    applied: vault::state::Applied,
    /// Entries staged so far.
    entries: u64,
    pins: Vec<(vault::ChunkId, u64)>,
    /// This site's head when the transfer began: nothing may be appended
    /// until it is installed, so it must still be the head then.
    head_at_begin: u64,
}

fn chunk_id(b: &[u8]) -> Result<vault::ChunkId, String> {
    Ok(vault::ChunkId(
        b.try_into().map_err(|_| "malformed chunk id".to_string())?,
    ))
}

/// Why a state transfer stopped.
enum TransferError {
    /// The link or this site failed: reconnect and try again.
    Retry(String),
    /// The upstream offered something this site must never take (a step
    /// back in history, no proof of continuity, a hostile path): the copy
    /// is kept as it is and the follower stops, reported as DIVERGED.
    Refused(String),
}

impl From<&str> for TransferError {
    fn from(s: &str) -> TransferError {
        TransferError::Retry(s.to_string())
    }
}

impl From<String> for TransferError {
    fn from(s: String) -> TransferError {
        TransferError::Retry(s)
    }
}

/// Decides whether a transfer beginning at `b` may replace this site's
/// copy, whose head is `head` and chain hash there `ours`: an empty copy
/// takes any; otherwise the transfer must be past the head, and the
/// upstream must show its chain hash at this site's head, equal to ours.
pub fn transfer_allowed(
    head: u64,
    ours: Option<[u8; 32]>,
    b: &pb::TransferBegin,
) -> Result<(), String> {
    if head == 0 {
        return Ok(());
    }
    // An upstream transfers only past the follower's head (it no longer
    // holds the records after it): at the head or behind it is a rewrite.
    if b.seq <= head {
        return Err(format!(
            "the upstream offered a state transfer at seq {}, not past this site's head {head}: \
             history only moves forward here; the copy is kept as it is",
            b.seq
        ));
    }
    if b.follower_head_seq != head {
        return Err(format!(
            "the upstream's state transfer proves continuity at seq {}, not at this site's head {head}; \
             the copy is kept as it is",
            b.follower_head_seq
        ));
    }
    match ours {
        Some(h) if h.as_slice() == b.follower_head_hash.as_slice() => Ok(()),
        Some(h) => Err(format!(
            "the upstream's chain hash at seq {head} is {} but this site's is {}: its history is not \
             this site's, so its state transfer is refused and the copy kept as it is",
            hex::encode(&b.follower_head_hash),
            hex::encode(h)
        )),
        None => Err(format!(
            "this site has no chain hash at its own head {head} to compare a state transfer with; \
             the copy is kept as it is"
        )),
    }
}

/// Checks a transfer's checkpoint evidence (HMAC-SM3 under the dataset's
/// evidence key over its seq, chain hash and digest summary).
pub fn transfer_evidence_holds(
    keys: &vault::Keys,
    b: &pb::TransferBegin,
    hash: [u8; 32],
    digest: &vault::lthash::LtHash,
) -> Result<(), String> {
    let evidence = vault::state::Checkpoint {
        seq: b.seq,
        hash,
        digest: digest.summary(),
        hmac_sm3: b.evidence.as_slice().try_into().unwrap_or([0; 32]),
    };
    if evidence.verify(keys) {
        Ok(())
    } else {
        Err(format!(
            "the upstream's state transfer at seq {} carries checkpoint evidence that does not \
             verify under this dataset's key; the copy is kept as it is",
            b.seq
        ))
    }
}

async fn on_transfer(
    ds: &Arc<Dataset>,
    tx: &mpsc::Sender<pb::FollowerMessage>,
    xfer: &mut Option<Transfer>,
    t: pb::Transfer,
) -> Result<(), TransferError> {
    use pb::transfer::Part;
    match t.part {
        Some(Part::Begin(b)) => *xfer = Some(transfer_begin(ds, b).await?),
        Some(Part::Entries(e)) => {
            let x = xfer.as_mut().ok_or("entries before the transfer began")?;
            let mut part = Vec::with_capacity(e.entries.len());
            for ne in e.entries {
                vault::path::check(&ne.path).map_err(|e| {
                    TransferError::Refused(format!(
                        "the upstream's state transfer was refused: {e}"
                    ))
                })?;
                let entry = vault::Entry::decode(&ne.entry).ok_or("malformed namespace entry")?;
                part.push((ne.path, entry));
            }
            x.entries += part.len() as u64;
            let d = ds.clone();
            tokio::task::spawn_blocking(move || d.stage_transfer(&part))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        Some(Part::EntriesEnd(_)) => {
            let x = xfer.as_ref().ok_or("no transfer")?;
            ask_for_missing(ds, tx, x).await?;
        }
        Some(Part::Chunks(c)) => {
            if xfer.is_none() {
                return Err(TransferError::Refused(
                    "the upstream sent transfer chunks outside a state transfer".into(),
                ));
            }
            stage_transfer_chunks(ds, c).await?;
        }
        Some(Part::End(_)) => {
            let x = xfer.take().ok_or("no transfer")?;
            install(ds, tx, x).await?;
        }
        None => {}
    }
    Ok(())
}

/// A transfer begins: it may only replace this copy when it continues
/// this site's history and its evidence verifies under the dataset key.
async fn transfer_begin(
    ds: &Arc<Dataset>,
    b: pb::TransferBegin,
) -> Result<Transfer, TransferError> {
    let d = ds.clone();
    let (head, ours) = tokio::task::spawn_blocking(move || {
        let head = d.head_seq();
        d.chain_hash_at(head).map(|h| (head, h))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    transfer_allowed(head, ours, &b).map_err(TransferError::Refused)?;
    tracing::warn!(
        dataset = ds.name(),
        seq = b.seq,
        "this site is behind the upstream's retained log: receiving a state transfer"
    );
    let digest = vault::lthash::LtHash::try_from_bytes(&b.digest).ok_or("malformed digest")?;
    let hash: [u8; 32] = b
        .chain_hash
        .as_slice()
        .try_into()
        .map_err(|_| "malformed chain hash")?;
    transfer_evidence_holds(ds.keys(), &b, hash, &digest).map_err(TransferError::Refused)?;
    // What an earlier transfer that was cut short staged is not this one's.
    let d = ds.clone();
    tokio::task::spawn_blocking(move || d.clear_transfer())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let mut pins = Vec::new();
    for p in b.pins {
        pins.push((chunk_id(&p.id)?, p.count));
    }
    Ok(Transfer {
        applied: vault::state::Applied {
            seq: b.seq,
            hash,
            time_ns: b.time_ns,
            digest,
        },
        entries: 0,
        pins,
        head_at_begin: head,
    })
}

/// The namespace has arrived: asks the upstream for the chunks it names
/// that this site does not hold, in batches of [`NEED_BATCH`] ids, the last
/// marked done. The staged namespace is read back in path order, so a
/// chunk named in two far-apart places may be asked for twice (staging it
/// again is harmless); nothing here grows with the namespace.
async fn ask_for_missing(
    ds: &Arc<Dataset>,
    tx: &mpsc::Sender<pb::FollowerMessage>,
    x: &Transfer,
) -> Result<(), TransferError> {
    let d = ds.clone();
    let tx = tx.clone();
    let pins: Vec<vault::ChunkId> = x.pins.iter().map(|(id, _)| *id).collect();
    let asked = tokio::task::spawn_blocking(move || -> Result<u64, String> {
        let send = |ids: &mut std::collections::BTreeSet<vault::ChunkId>, done: bool| {
            let msg = pb::FollowerMessage {
                msg: Some(follower_message::Msg::Need(pb::NeedChunks {
                    ids: std::mem::take(ids)
                        .into_iter()
                        .map(|id| id.0.to_vec())
                        .collect(),
                    done,
                })),
            };
            tx.blocking_send(msg)
                .map_err(|_| "stream closed".to_string())
        };
        let mut want = std::collections::BTreeSet::new();
        let mut asked = 0u64;
        let mut last_sent = std::time::Instant::now();
        let mut consider = |id: vault::ChunkId,
                            want: &mut std::collections::BTreeSet<vault::ChunkId>|
         -> Result<(), String> {
            if !want.contains(&id) && !d.has_chunk(&id).map_err(|e| e.to_string())? {
                want.insert(id);
                asked += 1;
            }
            // Full, or due: the upstream gives up on a follower that asks
            // for nothing for two minutes, and reading back a large
            // namespace that this site mostly holds takes a while.
            if want.len() >= NEED_BATCH || last_sent.elapsed() >= NEED_AT_LEAST_EVERY {
                send(want, false)?;
                last_sent = std::time::Instant::now();
            }
            Ok(())
        };
        for item in d.staged_entries().map_err(|e| e.to_string())? {
            let (_, e) = item.map_err(|e| e.to_string())?;
            for c in e.chunks() {
                consider(c.id, &mut want)?;
            }
        }
        for id in pins {
            consider(id, &mut want)?;
        }
        send(&mut want, true)?;
        Ok(asked)
    })
    .await
    .map_err(|e| e.to_string())??;
    tracing::info!(
        dataset = ds.name(),
        entries = x.entries,
        missing_chunks = asked,
        "asked the upstream for the chunks this site lacks"
    );
    Ok(())
}

/// Chunk ids asked for in one message.
const NEED_BATCH: usize = 50_000;

/// A list of chunks (empty if need be) goes to the upstream at least this
/// often while the staged namespace is read back.
const NEED_AT_LEAST_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Stages chunks of a transfer, each checked against its id first.
async fn stage_transfer_chunks(
    ds: &Arc<Dataset>,
    c: pb::TransferChunks,
) -> Result<(), TransferError> {
    let keys = ds.keys().clone();
    let mut chunks = Vec::with_capacity(c.chunks.len());
    for sc in c.chunks {
        chunks.push(vault::SealedChunk {
            id: chunk_id(&sc.id)?,
            plain_len: sc.plain_len,
            sealed: sc.sealed,
        });
    }
    let d = ds.clone();
    tokio::task::spawn_blocking(move || {
        for c in &chunks {
            vault::chunk::open(&keys, &c.id, c.plain_len, &c.sealed)
                .map_err(|e| format!("chunk {}: {e}", c.id))?;
        }
        d.stage_chunks(&chunks).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())??;
    Ok(())
}

/// Installs a complete transfer, unless this site's head moved meanwhile,
/// and acknowledges the seq it reached.
async fn install(
    ds: &Arc<Dataset>,
    tx: &mpsc::Sender<pb::FollowerMessage>,
    x: Transfer,
) -> Result<(), TransferError> {
    if ds.head_seq() != x.head_at_begin {
        return Err(TransferError::Refused(format!(
            "this site's head moved from {} to {} during the state transfer; the transfer \
             is not installed and the copy is kept as it is",
            x.head_at_begin,
            ds.head_seq()
        )));
    }
    let d = ds.clone();
    let c = tokio::task::spawn_blocking(move || d.install_staged(x.applied, x.pins))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let ack = pb::FollowerMessage {
        msg: Some(follower_message::Msg::Ack(pb::Ack { durable_seq: c.seq })),
    };
    tx.send(ack).await.map_err(|_| "stream closed")?;
    Ok(())
}

enum End {
    Retry(String),
    Diverged(String),
    Shutdown,
}

/// Follows `up` until shutdown (or divergence).
pub async fn run(
    ds: Arc<Dataset>,
    up: UpstreamAddr,
    status: Arc<Mutex<FollowStatus>>,
    mut shutdown: watch::Receiver<bool>,
) {
    if let Ok(mut s) = status.lock() {
        s.upstream = up.name.clone();
    }
    let mut backoff = Duration::from_millis(200);
    let mut last_connects = 0u64;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let end = tokio::select! {
            e = session(&ds, &up, &status) => e,
            _ = shutdown.changed() => End::Shutdown,
        };
        if let Ok(mut s) = status.lock() {
            s.connected = false;
        }
        match end {
            End::Shutdown => return,
            End::Diverged(why) => {
                tracing::error!(dataset = ds.name(), upstream = %up.name, "{why}");
                if let Ok(mut s) = status.lock() {
                    s.diverged = Some(why);
                }
                return;
            }
            End::Retry(why) => {
                tracing::warn!(dataset = ds.name(), upstream = %up.name, error = %why, retry_in = ?backoff, "replication link down; retrying");
                if let Ok(mut s) = status.lock() {
                    s.last_error = Some(why);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        // A link that worked restarts its back-off; one that keeps failing
        // settles at one attempt every 5 s.
        let connected_before = status.lock().map(|s| s.connects).unwrap_or(0);
        backoff = if connected_before > last_connects {
            Duration::from_millis(200)
        } else {
            (backoff * 2).min(Duration::from_secs(5))
        };
        last_connects = connected_before;
    }
}

/// Asks a site for its checkpoints of a dataset (cross-site verify).
pub async fn fetch_checkpoints(
    site: &UpstreamAddr,
    dataset: &str,
    key_id: &str,
    with_paths: bool,
) -> Result<pb::CheckpointsReply, CallError> {
    let channel = connect(site).await?;
    let mut client = pb::replication_client::ReplicationClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    client
        .checkpoints(pb::CheckpointsRequest {
            dataset: dataset.to_string(),
            key_id: key_id.to_string(),
            with_paths,
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|status| refused(site, status))
}

/// Asks a site for its status document (`triad status --all`).
pub async fn fetch_site_status(site: &UpstreamAddr) -> Result<String, CallError> {
    let channel = connect(site).await?;
    let mut client = pb::replication_client::ReplicationClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE);
    client
        .site_status(pb::SiteStatusRequest {})
        .await
        .map(|r| r.into_inner().json)
        .map_err(|status| refused(site, status))
}

/// Asks a site's daemon to do an admin action (needs that site's own
/// certificate in `site.tls`). Returns whether it succeeded and its JSON answer.
pub async fn admin(
    site: &UpstreamAddr,
    action: &str,
    dataset: &str,
) -> Result<(bool, String), CallError> {
    let channel = connect(site).await?;
    let mut client = pb::replication_client::ReplicationClient::new(channel);
    client
        .admin(pb::AdminRequest {
            action: action.to_string(),
            dataset: dataset.to_string(),
        })
        .await
        .map(|r| {
            let r = r.into_inner();
            (r.ok, r.json)
        })
        .map_err(|status| refused(site, status))
}

/// Asks a site for sealed chunks by id (repair). The caller checks them.
pub async fn fetch_chunks(
    site: &UpstreamAddr,
    dataset: &str,
    key_id: &str,
    ids: &[vault::ChunkId],
) -> Result<Vec<(vault::ChunkId, Vec<u8>)>, CallError> {
    let channel = connect(site).await?;
    let mut client = pb::replication_client::ReplicationClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let reply = client
        .chunks(pb::ChunksRequest {
            dataset: dataset.to_string(),
            key_id: key_id.to_string(),
            ids: ids.iter().map(|i| i.0.to_vec()).collect(),
        })
        .await
        .map_err(|status| refused(site, status))?
        .into_inner();
    Ok(reply
        .chunks
        .into_iter()
        .filter_map(|c| Some((vault::ChunkId(c.id.as_slice().try_into().ok()?), c.sealed)))
        .collect())
}

/// A kept connection to another site for Takeover calls, which are
/// frequent (Raft heartbeats): one TLS session is reused until a call
/// fails, then the next call dials again.
pub struct PeerLink {
    pub addr: UpstreamAddr,
    channel: tokio::sync::Mutex<Option<Channel>>,
}

impl PeerLink {
    pub fn new(addr: UpstreamAddr) -> PeerLink {
        PeerLink {
            addr,
            channel: tokio::sync::Mutex::new(None),
        }
    }

    /// One Takeover call, given up after `timeout`. A kept connection that
    /// the other site has since closed (it restarted its server) fails at
    /// once: the call is then made once more on a new connection.
    pub async fn takeover(
        &self,
        kind: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let kept = self.channel.lock().await.is_some();
        let started = tokio::time::Instant::now();
        match self.takeover_once(kind, body.clone(), timeout).await {
            Err(e) if kept && e.retryable() && started.elapsed() < timeout / 2 => {
                self.takeover_once(kind, body, timeout - started.elapsed())
                    .await
            }
            r => r,
        }
    }

    async fn takeover_once(
        &self,
        kind: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let mut slot = self.channel.lock().await;
        let channel = match slot.as_ref() {
            Some(c) => c.clone(),
            None => {
                let c = tokio::time::timeout(timeout, connect(&self.addr))
                    .await
                    .map_err(|_| {
                        refused(
                            &self.addr,
                            tonic::Status::deadline_exceeded("no connection in time"),
                        )
                    })??;
                *slot = Some(c.clone());
                c
            }
        };
        drop(slot);
        let mut client = pb::replication_client::ReplicationClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let mut req = tonic::Request::new(pb::TakeoverRequest {
            kind: kind.to_string(),
            body,
        });
        req.set_timeout(timeout);
        let r = tokio::time::timeout(timeout, client.takeover(req)).await;
        match r {
            Ok(Ok(reply)) => Ok(reply.into_inner().body),
            Ok(Err(status)) => {
                if matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ) {
                    *self.channel.lock().await = None;
                }
                Err(refused(&self.addr, status))
            }
            Err(_) => {
                *self.channel.lock().await = None;
                Err(refused(
                    &self.addr,
                    tonic::Status::deadline_exceeded(format!("no answer within {timeout:?}")),
                ))
            }
        }
    }
}

fn refused(site: &UpstreamAddr, status: tonic::Status) -> CallError {
    CallError::Refused {
        site: site.name.clone(),
        status: Box::new(status),
    }
}

async fn connect(up: &UpstreamAddr) -> Result<Channel, CallError> {
    let setup = |message: String| CallError::Setup {
        site: up.name.clone(),
        message,
    };
    let tls = client_config(&up.tls, &up.name).map_err(|e| setup(e.to_string()))?;
    Endpoint::from_shared(format!("https://{}", up.address))
        .map_err(|e| setup(format!("address {}: {e}", up.address)))?
        .tls_config(tls)
        .map_err(|e| setup(format!("TLS: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|cause| CallError::Connect {
            site: up.name.clone(),
            address: up.address.clone(),
            cause,
        })
}

async fn session(ds: &Arc<Dataset>, up: &UpstreamAddr, status: &Arc<Mutex<FollowStatus>>) -> End {
    let channel = match connect(up).await {
        Ok(c) => c,
        Err(e) => return End::Retry(e.to_string()),
    };
    let mut client = pb::replication_client::ReplicationClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let (tx, rx) = mpsc::channel(16);
    let d = ds.clone();
    let (checkpoint, head_hash) = tokio::task::spawn_blocking(move || {
        let c = d.latest_checkpoint().ok().flatten();
        let h = d.chain_hash_at(d.head_seq()).ok().flatten();
        (c, h)
    })
    .await
    .unwrap_or((None, None));
    let hello = pb::FollowerMessage {
        msg: Some(follower_message::Msg::Hello(pb::Hello {
            dataset: ds.name().to_string(),
            key_id: ds.key_id().to_string(),
            from_seq: ds.head_seq() + 1,
            checkpoint_seq: checkpoint.as_ref().map(|c| c.seq).unwrap_or(0),
            checkpoint_hash: checkpoint.map(|c| c.hash.to_vec()).unwrap_or_default(),
            head_hash: head_hash.map(|h| h.to_vec()).unwrap_or_default(),
        })),
    };
    if tx.send(hello).await.is_err() {
        return End::Retry("stream closed".into());
    }
    let mut inbound = match client.follow(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(s)
            if s.code() == tonic::Code::FailedPrecondition && s.message().contains("DIVERGED") =>
        {
            return End::Diverged(format!(
                "the upstream refused this site's copy: {}",
                s.message()
            ));
        }
        Err(s) if s.code() == tonic::Code::FailedPrecondition => {
            return End::Retry(format!("upstream refused: {}", s.message()));
        }
        Err(s) => return End::Retry(format!("upstream refused: {s}")),
    };
    if let Ok(mut s) = status.lock() {
        s.connected = true;
        s.connects += 1;
        s.last_error = None;
    }
    tracing::info!(dataset = ds.name(), upstream = %up.name, from_seq = ds.head_seq() + 1, "following upstream");
    let mut xfer: Option<Transfer> = None;
    loop {
        let msg = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return End::Retry("upstream closed the stream".into()),
            Err(s) => return End::Retry(format!("stream: {s}")),
        };
        match msg.msg {
            Some(upstream_message::Msg::Records(_)) if xfer.is_some() => {
                // Records appended during a transfer would be cut by its
                // install: the protocol never does this, a forger would.
                return End::Diverged(
                    "DIVERGED: the upstream sent records in the middle of a state transfer; \
                     nothing was installed and the copy is kept as it is"
                        .into(),
                );
            }
            Some(upstream_message::Msg::Records(r)) => {
                let d = ds.clone();
                let res =
                    tokio::task::spawn_blocking(move || d.append_replicated(r.payloads)).await;
                match res {
                    Ok(Ok(c)) => {
                        let ack = pb::FollowerMessage {
                            msg: Some(follower_message::Msg::Ack(pb::Ack { durable_seq: c.seq })),
                        };
                        if tx.send(ack).await.is_err() {
                            return End::Retry("stream closed".into());
                        }
                    }
                    Ok(Err(SubmitError::Vault(e @ VaultError::Diverged { .. }))) => {
                        return End::Diverged(e.to_string())
                    }
                    // A record that does not open or names a hostile path
                    // comes the same way again on every retry: stop and say so.
                    Ok(Err(SubmitError::Vault(e @ VaultError::BadRecord { .. }))) => {
                        return End::Diverged(format!(
                            "DIVERGED: refused a record from the upstream: {e}; this site keeps what it has"
                        ))
                    }
                    Ok(Err(e)) => return End::Retry(format!("appending replicated records: {e}")),
                    Err(e) => return End::Retry(e.to_string()),
                }
            }
            Some(upstream_message::Msg::Transfer(t)) => {
                let r = on_transfer(ds, &tx, &mut xfer, t).await;
                if let Ok(mut s) = status.lock() {
                    s.receiving_transfer = r.is_ok() && xfer.is_some();
                }
                match r {
                    Ok(()) => {}
                    Err(TransferError::Retry(e)) => {
                        return End::Retry(format!("state transfer: {e}"))
                    }
                    Err(TransferError::Refused(e)) => {
                        return End::Diverged(format!("DIVERGED: {e}"))
                    }
                }
            }
            Some(upstream_message::Msg::Heartbeat(h)) => {
                if let Ok(mut s) = status.lock() {
                    s.upstream_head_seq = h.head_seq;
                    s.next_time_ns = h.next_time_ns;
                    s.upstream_lag_bytes = h.lag_bytes;
                }
                let ack = pb::FollowerMessage {
                    msg: Some(follower_message::Msg::Ack(pb::Ack {
                        durable_seq: ds.head_seq(),
                    })),
                };
                if tx.send(ack).await.is_err() {
                    return End::Retry("stream closed".into());
                }
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn begin(seq: u64, proof_seq: u64, proof: [u8; 32]) -> pb::TransferBegin {
        pb::TransferBegin {
            seq,
            follower_head_seq: proof_seq,
            follower_head_hash: proof.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn a_transfer_needs_evidence_under_the_dataset_key() {
        let keys = vault::DatasetKey::from_bytes([3; 32]).derive();
        let digest = vault::lthash::LtHash::default();
        let good = vault::state::Checkpoint::new(&keys, 9, [4; 32], digest.summary());
        let mut b = begin(9, 0, [0; 32]);
        b.evidence = good.hmac_sm3.to_vec();
        assert!(transfer_evidence_holds(&keys, &b, [4; 32], &digest).is_ok());
        // Another point, another key, or no evidence at all.
        assert!(transfer_evidence_holds(&keys, &b, [5; 32], &digest).is_err());
        let other = vault::DatasetKey::from_bytes([8; 32]).derive();
        assert!(transfer_evidence_holds(&other, &b, [4; 32], &digest).is_err());
        b.evidence.clear();
        let e = transfer_evidence_holds(&keys, &b, [4; 32], &digest).unwrap_err();
        assert!(e.contains("does not verify"), "{e}");
    }

    #[test]
    fn an_empty_copy_takes_any_transfer() {
        assert!(transfer_allowed(0, None, &begin(1, 0, [0; 32])).is_ok());
    }

    #[test]
    fn a_transfer_behind_the_head_is_refused() {
        let e = transfer_allowed(5, Some([1; 32]), &begin(1, 5, [1; 32])).unwrap_err();
        assert!(e.contains("not past this site's head 5"), "{e}");
        let e = transfer_allowed(5, Some([1; 32]), &begin(5, 5, [1; 32])).unwrap_err();
        assert!(e.contains("not past this site's head 5"), "{e}");
    }

    #[test]
    fn a_transfer_must_prove_the_followers_own_head() {
        let ours = Some([1; 32]);
        assert!(transfer_allowed(5, ours, &begin(900, 5, [1; 32])).is_ok());
        let e = transfer_allowed(5, ours, &begin(900, 5, [2; 32])).unwrap_err();
        assert!(e.contains("its history is not this site's"), "{e}");
        let e = transfer_allowed(5, ours, &begin(900, 4, [1; 32])).unwrap_err();
        assert!(e.contains("proves continuity at seq 4"), "{e}");
        let e = transfer_allowed(5, None, &begin(900, 5, [1; 32])).unwrap_err();
        assert!(e.contains("no chain hash at its own head"), "{e}");
    }
}
