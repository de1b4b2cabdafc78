//! The follower side: dial the upstream, append what it streams to this
//! site's log (only if it continues this site's hash chain), acknowledge it,
//! and reconnect by itself after any failure. A divergence stops the loop for
//! good and is reported loudly: nothing is overwritten to "fix" it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use vault::dataset::now_ns;
use vault::{Dataset, SubmitError, VaultError};

use crate::pb::{self, follower_message, upstream_message};
use crate::tls::{client_config, TlsFiles};
use crate::upstream::MAX_MESSAGE;

/// Where this site streams a dataset from.
#[derive(Clone, Debug)]
pub struct UpstreamAddr {
    pub name: String,
    pub address: String,
    pub tls: TlsFiles,
}

/// What the follower loop knows, for status and lag.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FollowStatus {
    pub upstream: String,
    pub connected: bool,
    pub upstream_head_seq: u64,
    pub lag_records: u64,
    pub lag_seconds: f64,
    pub connects: u64,
    pub last_error: Option<String>,
    /// Set when this site's log parted from the upstream's: applying stopped.
    pub diverged: Option<String>,
    #[serde(skip)]
    next_time_ns: i64,
}

impl FollowStatus {
    /// Refreshes lag against this site's current head.
    pub fn with_lag(mut self, local_head: u64) -> FollowStatus {
        self.lag_records = self.upstream_head_seq.saturating_sub(local_head);
        self.lag_seconds = if self.lag_records == 0 || self.next_time_ns == 0 {
            0.0
        } else {
            (now_ns() - self.next_time_ns).max(0) as f64 / 1e9
        };
        self
    }
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
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn connect(up: &UpstreamAddr) -> Result<Channel, String> {
    let tls = client_config(&up.tls, &up.name).map_err(|e| e.to_string())?;
    Endpoint::from_shared(format!("https://{}", up.address))
        .map_err(|e| format!("address {}: {e}", up.address))?
        .tls_config(tls)
        .map_err(|e| format!("TLS: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| format!("connecting to {} at {}: {e:?}", up.name, up.address))
}

async fn session(ds: &Arc<Dataset>, up: &UpstreamAddr, status: &Arc<Mutex<FollowStatus>>) -> End {
    let channel = match connect(up).await {
        Ok(c) => c,
        Err(e) => return End::Retry(e),
    };
    let mut client = pb::replication_client::ReplicationClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let (tx, rx) = mpsc::channel(16);
    let hello = pb::FollowerMessage {
        msg: Some(follower_message::Msg::Hello(pb::Hello {
            dataset: ds.name().to_string(),
            key_id: ds.key_id().to_string(),
            from_seq: ds.head_seq() + 1,
        })),
    };
    if tx.send(hello).await.is_err() {
        return End::Retry("stream closed".into());
    }
    let mut inbound = match client.follow(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
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
    loop {
        let msg = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return End::Retry("upstream closed the stream".into()),
            Err(s) => return End::Retry(format!("stream: {s}")),
        };
        match msg.msg {
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
                    Ok(Err(e)) => return End::Retry(format!("appending replicated records: {e}")),
                    Err(e) => return End::Retry(e.to_string()),
                }
            }
            Some(upstream_message::Msg::Heartbeat(h)) => {
                if let Ok(mut s) = status.lock() {
                    s.upstream_head_seq = h.head_seq;
                    s.next_time_ns = h.next_time_ns;
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
