//! The HTTP endpoint on `listen.http` (axum): `/metrics` (Prometheus text),
//! `/healthz` (the daemon's main loop is turning), `/readyz` (every dataset
//! is open and usable: not failed, not catching up by state transfer) and
//! `/v1/status` (the status of every dataset as JSON, what `triad status`
//! shows).
//!
//! Everything here only reads: the handlers answer from the snapshot the
//! main loop publishes four times a second, so a scrape never takes a lock
//! the data path holds. Nothing on this port changes anything; the commands
//! that do (`triad snapshot`, `prune`, `verify --repair`) act through the
//! dataset directory, which only the daemon's user can write.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::status::{Phase, SiteView, STALE_NS};

pub fn router(view: Arc<SiteView>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/status", get(status))
        .with_state(view)
}

async fn metrics(State(v): State<Arc<SiteView>>) -> Response {
    match crate::metrics::render(&v) {
        Ok(body) => ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("metrics: {e}\n")).into_response(),
    }
}

/// Alive: the main loop turned within the last 10 s.
async fn healthz(State(v): State<Arc<SiteView>>) -> Response {
    let stale = v.stale_ns();
    if stale > STALE_NS && v.phase() == Phase::Running {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the main loop has not run for {:.0} s\n",
                stale as f64 / 1e9
            ),
        )
            .into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

async fn readyz(State(v): State<Arc<SiteView>>) -> Response {
    let why = v.not_ready(&v.datasets());
    if why.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n{}\n", why.join("\n")),
        )
            .into_response()
    }
}

async fn status(State(v): State<Arc<SiteView>>) -> Response {
    axum::Json(v.status_json()).into_response()
}

/// Binds `addr` and serves until `shutdown` fires. Binding happens before
/// this returns, so a port in use stops the start with a clear error.
pub fn serve(
    rt: &tokio::runtime::Runtime,
    addr: &str,
    view: Arc<SiteView>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = rt.block_on(tokio::net::TcpListener::bind(addr))?;
    Ok(rt.spawn(async move {
        let r = axum::serve(listener, router(view))
            .with_graceful_shutdown(async move {
                let _ = shutdown.changed().await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "the HTTP endpoint stopped");
        }
    }))
}
