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

use std::sync::atomic::{AtomicI64, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Serialize;

use crate::runtime::DatasetStatus;

/// Where the daemon is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Opening datasets (recovering and replaying their logs).
    Opening,
    Running,
    Stopping,
}

/// What the HTTP handlers answer from: the main loop's latest snapshot.
pub struct SiteView {
    pub site: String,
    pub role: &'static str,
    /// When the daemon started (ns since the epoch).
    pub started_ns: i64,
    phase: AtomicU8,
    /// When the main loop last published (ns since the epoch).
    tick_ns: AtomicI64,
    datasets: RwLock<Arc<Vec<DatasetStatus>>>,
}

/// The main loop publishes every 250 ms; a snapshot this old means it is stuck.
const STALE_NS: i64 = 10_000_000_000;

#[derive(Serialize)]
pub struct SiteStatus<'a> {
    pub site: &'a str,
    pub role: &'a str,
    pub phase: Phase,
    pub ready: bool,
    /// Why the site is not ready, one line per reason.
    pub not_ready: Vec<String>,
    pub version: &'static str,
    pub datasets: &'a [DatasetStatus],
}

impl SiteView {
    pub fn new(site: &str, role: &'static str) -> SiteView {
        SiteView {
            site: site.to_string(),
            role,
            started_ns: vault::dataset::now_ns(),
            phase: AtomicU8::new(Phase::Opening as u8),
            tick_ns: AtomicI64::new(vault::dataset::now_ns()),
            datasets: RwLock::new(Arc::new(Vec::new())),
        }
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Opening,
            1 => Phase::Running,
            _ => Phase::Stopping,
        }
    }

    pub fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Release);
    }

    /// Replaces the snapshot (the main loop, every round).
    pub fn publish(&self, datasets: Vec<DatasetStatus>) {
        if let Ok(mut d) = self.datasets.write() {
            *d = Arc::new(datasets);
        }
        self.tick_ns
            .store(vault::dataset::now_ns(), Ordering::Release);
    }

    pub fn datasets(&self) -> Arc<Vec<DatasetStatus>> {
        self.datasets.read().map(|d| d.clone()).unwrap_or_default()
    }

    /// Nanoseconds since the main loop last published.
    fn stale_ns(&self) -> i64 {
        vault::dataset::now_ns() - self.tick_ns.load(Ordering::Acquire)
    }

    /// Why the site is not ready; empty when it is.
    pub fn not_ready(&self, datasets: &[DatasetStatus]) -> Vec<String> {
        let mut why = Vec::new();
        match self.phase() {
            Phase::Opening => why.push("opening datasets: recovering and replaying the log".into()),
            Phase::Stopping => why.push("stopping".into()),
            Phase::Running => {}
        }
        let stale = self.stale_ns();
        if stale > STALE_NS {
            why.push(format!(
                "the main loop has not run for {:.0} s",
                stale as f64 / 1e9
            ));
        }
        for d in datasets {
            if let Some(f) = &d.failure {
                why.push(format!("dataset `{}` failed: {f}", d.dataset));
            }
            if let Some(u) = d
                .replication
                .upstream
                .as_ref()
                .filter(|u| u.receiving_transfer)
            {
                why.push(format!(
                    "dataset `{}` is catching up by state transfer from {}",
                    d.dataset, u.upstream
                ));
            }
        }
        why
    }

    pub fn status_json(&self) -> serde_json::Value {
        let datasets = self.datasets();
        let not_ready = self.not_ready(&datasets);
        serde_json::to_value(SiteStatus {
            site: &self.site,
            role: self.role,
            phase: self.phase(),
            ready: not_ready.is_empty(),
            not_ready,
            version: env!("CARGO_PKG_VERSION"),
            datasets: &datasets,
        })
        .unwrap_or_default()
    }
}

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
