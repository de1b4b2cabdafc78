//! The replication service a site keeps for its whole process.
//!
//! A site in a takeover group changes seat (primary, or follower of another
//! site) in the same process, closing and opening its datasets again. The
//! port stays open through that: Takeover calls, which carry the group's
//! Raft messages, are answered at every moment, so a seat change never
//! leaves the group short of a majority while all three sites change seat
//! at once (a new primary's lease lapsed that way). Every other call goes
//! to the current seat's [`Upstream`], or is told to come back while none
//! is in place.

use std::sync::{Arc, RwLock};

use tonic::{Request, Response, Status, Streaming};

use crate::pb;
use crate::pb::replication_server::Replication;
use crate::tls::PeerInfo;
use crate::upstream::{TakeoverHandler, Upstream, LEAVING_SEAT};

/// A site's replication service across its seats.
pub struct Seated {
    current: RwLock<Option<Arc<Upstream>>>,
    takeover: Option<TakeoverHandler>,
}

impl Seated {
    /// A service with no seat yet; `takeover` answers Takeover calls (none
    /// for a site in no takeover group).
    pub fn new(takeover: Option<TakeoverHandler>) -> Arc<Seated> {
        Arc::new(Seated {
            current: RwLock::new(None),
            takeover,
        })
    }

    /// Serves `up`, the seat's datasets, from now on.
    pub fn install(&self, up: Arc<Upstream>) {
        if let Ok(mut c) = self.current.write() {
            *c = Some(up);
        }
    }

    /// Stops serving the current seat: its streams end within about a
    /// second and release its datasets; calls are told to come back.
    pub fn vacate(&self) {
        let old = self.current.write().ok().and_then(|mut c| c.take());
        if let Some(up) = old {
            up.close();
        }
    }

    /// True for a site the current seat streams to.
    pub fn is_follower(&self, site: &str) -> bool {
        self.current
            .read()
            .ok()
            .and_then(|c| c.as_ref().map(|u| u.is_follower(site)))
            .unwrap_or(false)
    }

    // tonic's own error type.
    #[allow(clippy::result_large_err)]
    fn seat(&self) -> Result<Arc<Upstream>, Status> {
        self.current
            .read()
            .ok()
            .and_then(|c| c.clone())
            .ok_or_else(|| Status::unavailable(LEAVING_SEAT))
    }
}

#[tonic::async_trait]
impl Replication for Arc<Seated> {
    type FollowStream = <Arc<Upstream> as Replication>::FollowStream;

    async fn follow(
        &self,
        req: Request<Streaming<pb::FollowerMessage>>,
    ) -> Result<Response<Self::FollowStream>, Status> {
        self.seat()?.follow(req).await
    }

    async fn checkpoints(
        &self,
        req: Request<pb::CheckpointsRequest>,
    ) -> Result<Response<pb::CheckpointsReply>, Status> {
        self.seat()?.checkpoints(req).await
    }

    async fn chunks(
        &self,
        req: Request<pb::ChunksRequest>,
    ) -> Result<Response<pb::ChunksReply>, Status> {
        self.seat()?.chunks(req).await
    }

    async fn site_status(
        &self,
        req: Request<pb::SiteStatusRequest>,
    ) -> Result<Response<pb::SiteStatusReply>, Status> {
        self.seat()?.site_status(req).await
    }

    async fn admin(
        &self,
        req: Request<pb::AdminRequest>,
    ) -> Result<Response<pb::AdminReply>, Status> {
        // The seat is let go before the call runs (see `admin_call`).
        let call = self.seat()?.admin_call(req)?;
        crate::upstream::run_admin(call).await
    }

    async fn takeover(
        &self,
        req: Request<pb::TakeoverRequest>,
    ) -> Result<Response<pb::TakeoverReply>, Status> {
        let caller = req
            .extensions()
            .get::<PeerInfo>()
            .map(|p| p.site.clone())
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let f = self
            .takeover
            .clone()
            .ok_or_else(|| Status::unimplemented("this site takes no part in takeover"))?;
        let r = req.into_inner();
        let body = tokio::task::spawn_blocking(move || f(&caller, &r.kind, r.body))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(pb::TakeoverReply { body }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::time::Duration;

    use crate::upstream::AdminAnswer;

    /// A long admin call (a promotion waits up to half a minute) must not
    /// keep the seat it came in through: the seat's datasets are reopened
    /// in the new seat meanwhile, and they allow one opener.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_admin_call_in_flight_does_not_hold_the_vacated_seat() {
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = std::sync::Mutex::new(release_rx);
        let up = Arc::new(
            Upstream::new(HashMap::new(), HashMap::new())
                .with_site("zjk-a")
                .with_admin(Arc::new(move |_action: &str, _ds: &str| {
                    let _ = release_rx
                        .lock()
                        .map(|r| r.recv_timeout(Duration::from_secs(20)));
                    Ok(AdminAnswer {
                        ok: true,
                        json: "{}".into(),
                    })
                })),
        );
        let seated = Seated::new(None);
        seated.install(up.clone());
        let mut req = Request::new(pb::AdminRequest {
            action: "promote".into(),
            dataset: String::new(),
        });
        req.extensions_mut().insert(PeerInfo {
            site: "zjk-a".into(),
            addr: "127.0.0.1:1".parse().expect("address"),
        });
        let call = {
            let seated = seated.clone();
            tokio::spawn(async move { seated.admin(req).await })
        };
        // The call is running (blocked in its handler) once the seat is
        // vacated; only this test's handle on the upstream remains.
        tokio::time::sleep(Duration::from_millis(300)).await;
        seated.vacate();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&up) > 1 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(Arc::strong_count(&up), 1, "the admin call holds the seat");
        assert!(!call.is_finished(), "the call ended before the check");
        release_tx.send(()).expect("handler waiting");
        let reply = call.await.expect("task").expect("admin reply");
        assert!(reply.into_inner().ok);
    }
}
