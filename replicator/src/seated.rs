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
        self.seat()?.admin(req).await
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
