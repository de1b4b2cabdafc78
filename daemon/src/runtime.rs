//! The site runtime: opens every configured dataset; at the primary runs its
//! source; serves the log to the sites that follow this one; at a follower
//! follows the upstream; serves `listen.http`; keeps each dataset's status
//! file current; tells systemd where it is (`service.rs`); reloads what can
//! be reloaded on SIGHUP; and stops cleanly on SIGTERM or SIGINT within
//! `site.stop_timeout` (a second signal aborts at once).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use replicator::follower::{FollowStatus, UpstreamAddr};
use replicator::seated::Seated;
use replicator::tls::Refusals;
use replicator::upstream::{LinkStatus, Upstream, MAX_MESSAGE};
use vault::Dataset;

use crate::config::{Config, Live, Role};
use crate::service::Notifier;
use crate::source::{DirSource, Stats};
use crate::status::{DatasetStatus, Phase, ReplicationStatus, Retention, SiteView, STATUS_FILE};
use crate::takeover::Takeover;

struct Running {
    ds: Arc<Dataset>,
    stats: Option<Arc<Stats>>,
    follow: Option<Arc<Mutex<FollowStatus>>>,
    retention: Mutex<Retention>,
    archive: Option<Arc<crate::archiving::Shared>>,
    checks: Option<crate::checks::Shared>,
    puts: Option<Arc<crate::pushed::PutStats>>,
    standby: Option<Arc<crate::standby::StandbyStats>>,
}

/// Removes log segments no longer needed: every record in them is durable in
/// this site's state and acknowledged by every configured follower. With a
/// size cap, older segments go too, and followers still needing them are
/// named loudly: they will catch up by state transfer.
fn retain(cfg: &Config, r: &Running, upstream: Option<&Upstream>) -> Result<()> {
    let ds = &r.ds;
    let log_dir = cfg.dataset_dir(ds.name()).join("log");
    let durable = ds.flush_state()?;
    let links: Vec<LinkStatus> = upstream.map(|u| u.links_of(ds.name())).unwrap_or_default();
    // Segments stay until shipped to the archive, too.
    let shipped = r
        .archive
        .as_ref()
        .map(|a| a.shipped.load(Ordering::Acquire).saturating_add(1))
        .unwrap_or(u64::MAX);
    // And from the standby tree's saved cursor on: a restart rechecks what
    // those records put. Not while the tree has paths it cannot make equal:
    // its cursor then stops moving, and a log held for it would grow until
    // the disk is full (without those records a restart compares every file
    // by content instead).
    let standby = r
        .standby
        .as_ref()
        .filter(|s| s.problems.load(Ordering::Relaxed) == 0)
        .map(|s| s.keep_from.load(Ordering::Acquire))
        .filter(|k| *k > 0)
        .unwrap_or(u64::MAX);
    // Acks are capped at what was sent, but the arithmetic stays checked.
    let keep_from = links
        .iter()
        .map(|l| l.acked_seq.saturating_add(1))
        .fold((durable + 1).min(shipped).min(standby), u64::min);
    vault::wal::remove_segments_before(&log_dir, keep_from, None)?;
    let (bytes, mut first) = vault::wal::log_extent(&log_dir)?;
    let mut forced = 0;
    if let Some(cap) = cfg.log_cap().filter(|c| bytes > *c) {
        let (_, _, new_first) =
            vault::wal::remove_segments_before(&log_dir, durable + 1, Some(cap))?;
        for l in links.iter().filter(|l| {
            l.acked_seq.saturating_add(1) < new_first && l.acked_seq.saturating_add(1) >= first
        }) {
            forced += 1;
            tracing::error!(
                dataset = ds.name(),
                follower = %l.site,
                acked = l.acked_seq,
                first_retained = new_first,
                "site.log_retention_max forced the log past what this follower has: it will catch up by state transfer"
            );
        }
        first = new_first;
    }
    let (bytes, _) = vault::wal::log_extent(&log_dir)?;
    if let Ok(mut ret) = r.retention.lock() {
        ret.first_seq = first;
        ret.log_bytes = bytes;
        ret.forced_transfers += forced;
    }
    Ok(())
}

/// Runs the daemon until a stop signal; returns once everything is closed.
/// `path` is where the config came from, read again on SIGHUP.
///
/// With `[takeover]`, the site's seat (primary, or follower of which site)
/// comes from what the group agreed; when that changes, everything the
/// seat runs is stopped and closed and the site starts again in its new
/// seat, in this process.
pub fn run(path: &Path, cfg: Config) -> Result<()> {
    std::fs::create_dir_all(&cfg.site.data_dir)
        .with_context(|| format!("creating site.data_dir {}", cfg.site.data_dir.display()))?;
    let mut notifier = Notifier::from_env();
    let (stop, reload) = signals()?;
    let sm4 = vault::crypto::sm4_engine();
    match &sm4.fallback_reason {
        None => tracing::info!(engine = %sm4.name, "SM4-GCM on libgcrypt"),
        Some(why) => {
            tracing::warn!(reason = %why, "SM4-GCM on the portable software path, several times slower than libgcrypt: install libgcrypt 1.9 or later (Debian: libgcrypt20)")
        }
    }
    let takeover =
        Takeover::start(&cfg, stop.clone()).context("starting the takeover group member")?;
    let service = serve_replication(&cfg, takeover.as_ref())?;
    let keys = crate::keywatch::KeyWatch::start(&cfg, stop.clone());
    let mut cfg = cfg;
    let ended = loop {
        match run_seat(
            path,
            cfg,
            takeover.as_ref(),
            service.as_ref(),
            (&stop, &reload),
            &keys,
            &mut notifier,
        ) {
            Ok(Some(next)) => cfg = next,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    if let Some(s) = service {
        s.stop();
    }
    ended
}

/// The replication port, open for the whole process: a seat change swaps
/// the datasets it serves but never closes it (see `replicator::seated`).
struct Service {
    seated: Arc<Seated>,
    refusals: Arc<Refusals>,
    rt: tokio::runtime::Runtime,
    shutdown: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
}

impl Service {
    /// Stops accepting; connections still open get a second, then are cut.
    fn stop(self) {
        self.seated.vacate();
        let _ = self.shutdown.send(true);
        let mut server = self.server;
        let done = self.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(1), &mut server)
                .await
                .is_ok()
        });
        if !done {
            server.abort();
        }
        self.rt.shutdown_timeout(Duration::from_secs(2));
    }
}

/// Runs the site in the seat the group's record gives it (or as
/// configured, without `[takeover]`) until a stop signal (None) or a seat
/// change (the config to start again with).
fn run_seat(
    path: &Path,
    cfg: Config,
    takeover: Option<&Arc<Takeover>>,
    service: Option<&Service>,
    (global_stop, reload): (&Arc<AtomicBool>, &Arc<AtomicBool>),
    keys: &crate::keywatch::KeyWatch,
    notifier: &mut Notifier,
) -> Result<Option<Config>> {
    let seat = takeover.map(|t| crate::takeover::seat(&cfg, &t.cluster()));
    let epoch_at_start = takeover.map_or(0, |t| t.cluster().epoch);
    let configured = cfg.clone();
    let cfg = match (&seat, takeover) {
        (Some(s), Some(t)) => crate::takeover::effective(&cfg, s, &t.cluster()),
        _ => cfg,
    };
    // Everything this seat runs stops on this flag: a stop signal raises it,
    // and so does a seat change.
    let stop = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("triad-net")
        .enable_all()
        .build()
        .context("starting the network runtime")?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);

    // The HTTP endpoint comes up first, so /healthz answers and /readyz
    // says "opening" while a long log replay runs.
    let view = Arc::new(SiteView::new(&cfg.site.name, cfg.site.role.as_str()));
    let mut http = None;
    if let Some(addr) = cfg.listen.as_ref().and_then(|l| l.http.clone()) {
        http = Some(
            crate::http::serve(&rt, &addr, view.clone(), shutdown_rx.clone())
                .with_context(|| format!("listen.http: binding {addr}"))?,
        );
        tracing::info!(%addr, "serving /metrics, /healthz, /readyz and /v1/status");
    }

    // A follower's logs are checked against the agreed epochs first: a
    // tail past the fork point is set aside as evidence.
    let mut refilled: HashMap<String, u64> = HashMap::new();
    if let (Some(crate::takeover::Seat::Follower { .. }), Some(t)) = (&seat, takeover) {
        refilled = crate::takeover::rejoin_all(&cfg, &t.cluster())?;
    }
    // Open every dataset first: a wrong key or a damaged log stops the start
    // before anything is served or watched.
    let mut running: Vec<Running> = Vec::new();
    for d in &cfg.dataset {
        let fence = match takeover {
            Some(t) => vault::Fence {
                starts: t.cluster().starts(&d.name),
                fenced: Some("starting: not yet confirmed by a majority of the sites".into()),
                replicate_up_to: None,
            },
            None => vault::Fence::default(),
        };
        running.push(Running {
            ds: Arc::new(crate::ops::open_dataset_fenced(&cfg, &d.name, fence)?),
            stats: None,
            follow: None,
            retention: Mutex::new(Retention::default()),
            archive: None,
            checks: None,
            puts: None,
            standby: None,
        });
    }

    // The archive threads get their own stop, raised only once the sources
    // have finished their last round: their final shipment must include it.
    let archive_stop = Arc::new(AtomicBool::new(false));
    let archive_threads = start_archiving(&cfg, &rt, &mut running, &archive_stop)?;
    // Serve the log to the sites that follow this one.
    let refusals = service.map_or_else(Default::default, |s| s.refusals.clone());
    let upstream = service.map(|s| {
        let up = seat_upstream(&cfg, &running, &view, takeover);
        s.seated.install(up.clone());
        up
    });
    // Scheduled verify, scrubs and drills, from the live config.
    let live: Live = Arc::new(RwLock::new(Arc::new(cfg.clone())));
    let (checks, checks_thread) = crate::checks::start(
        live.clone(),
        running.iter().map(|r| r.ds.clone()).collect(),
        stop.clone(),
    )
    .context("starting the checks thread")?;
    for (r, c) in running.iter_mut().zip(checks) {
        r.checks = Some(c);
    }

    if let Some(t) = takeover {
        // Fenced from the open until the guard says otherwise.
        t.attach(
            running.iter().map(|r| r.ds.clone()).collect(),
            upstream.clone(),
        );
        if seat == Some(crate::takeover::Seat::Primary) {
            release_pins_when_confirmed(t, &running, &stop, global_stop);
        }
    }
    let push_thread = serve_socket(&cfg, &rt, &mut running, upstream.as_ref(), takeover, &stop)?;
    let own_tree = takeover.is_some_and(|_| crate::takeover::was_primary(&cfg.site.data_dir));
    let standby_threads = start_standby(&cfg, &mut running, own_tree, &refilled, &stop)?;
    if let Some(s) = &seat {
        crate::takeover::record_seat(&cfg.site.data_dir, s);
    }
    let threads = start_intake(
        &cfg,
        &rt,
        &mut running,
        upstream.as_ref(),
        takeover,
        &stop,
        &shutdown_rx,
    )?;

    tracing::info!(site = %cfg.site.name, role = ?cfg.site.role, upstream = ?cfg.site.upstream, datasets = running.len(), "triad is running");
    let publish = |cfg: &Config, running: &[Running]| {
        let group = takeover.map(|t| t.status(cfg.site.role.as_str()));
        let all: Vec<DatasetStatus> = running
            .iter()
            .map(|r| DatasetStatus {
                takeover: group.clone(),
                key_device: keys.status(r.ds.name()),
                ..status_of(cfg, r, upstream.as_deref(), &refusals)
            })
            .collect();
        for st in &all {
            crate::status::write(&cfg.dataset_dir(&st.dataset).join(STATUS_FILE), st);
        }
        let line = status_line(&all);
        view.publish(all);
        line
    };
    view.set_phase(Phase::Running);
    let line = publish(&cfg, &running);
    notifier.ready(&line);

    let mut cfg = cfg;
    let mut configured = configured;
    let mut next_retention = Instant::now();
    let mut reseat = false;
    while !stop.load(Ordering::Acquire) && !global_stop.load(Ordering::Acquire) {
        if let (Some(s), Some(t)) = (&seat, takeover) {
            let c = t.cluster();
            let now = crate::takeover::seat(&configured, &c);
            // A follower whose epoch moved checks its log against the new
            // fork point too, even when its upstream stays the same.
            let moved = c.epoch != epoch_at_start && c.epoch > 1;
            if now != *s || (moved && *s != crate::takeover::Seat::Primary) {
                tracing::warn!(from = ?s, to = ?now, epoch = t.cluster().epoch, "the group agreed on a new primary: restarting this site's datasets in their new seat");
                reseat = true;
                break;
            }
        }
        let reloaded = reload.swap(false, Ordering::AcqRel);
        if reloaded {
            notifier.reloading();
            if let Ok(c) = Config::load(path) {
                configured = c;
            }
            let seat_view = seat
                .as_ref()
                .zip(takeover)
                .map(|(s, t)| (s.clone(), t.cluster()));
            cfg = reload_config(path, cfg, seat_view, &live, &running, upstream.as_deref());
        }
        if Instant::now() >= next_retention {
            next_retention = Instant::now() + Duration::from_secs(2);
            for r in &running {
                if let Err(e) = retain(&cfg, r, upstream.as_deref()) {
                    tracing::warn!(dataset = r.ds.name(), error = %e, "log retention failed; will retry");
                }
            }
        }
        let line = publish(&cfg, &running);
        if reloaded {
            notifier.ready(&line);
        } else {
            notifier.tick(&line);
        }
        for r in &running {
            if let Some(why) = keys.expired(r.ds.name()) {
                r.ds.fail(why);
            }
        }
        if running.iter().any(|r| r.ds.failure().is_some()) {
            stop.store(true, Ordering::Release);
        }
        std::thread::sleep(Duration::from_millis(250));
    }

    stop.store(true, Ordering::Release);
    if let Some(t) = takeover {
        t.attach(Vec::new(), None);
    }
    view.set_phase(Phase::Stopping);
    notifier.stopping(if reseat {
        "changing seat: closing the log and finishing uploads"
    } else {
        "stopping: closing the log and finishing uploads"
    });
    let stopped = Stopping {
        cfg: &cfg,
        rt,
        running: &running,
        sources: threads,
        push_thread,
        shutdown_tx,
        checks_thread,
        archive_stop,
        archive_threads,
        standby_threads,
        seated: service.map(|s| s.seated.clone()),
        servers: http.into_iter().collect(),
    };
    let failed = stopped.run()?;
    publish(&cfg, &running);
    if let Some(f) = failed {
        bail!("stopped because of an error: {f}");
    }
    if reseat {
        // The datasets are opened again: every handle on them must be gone
        // (RocksDB and the log allow one opener). The replication service
        // held them too; it has left this seat.
        drop(upstream);
        let deadline = Instant::now() + Duration::from_secs(10);
        while running.iter().any(|r| Arc::strong_count(&r.ds) > 1) {
            if Instant::now() >= deadline {
                let held: Vec<String> = running
                    .iter()
                    .map(|r| format!("{} ({} handles)", r.ds.name(), Arc::strong_count(&r.ds)))
                    .collect();
                bail!("cannot change seat in this process: datasets still in use after the stop: {}; exiting so the service manager starts the site again", held.join(", "));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(running);
        return Ok(Some(configured));
    }
    tracing::info!("stopped cleanly");
    Ok(None)
}

/// At a primary seat of a takeover group: once a majority has confirmed
/// this site (normally within a second), the chunks pinned by an
/// interrupted write are released, before any put can pin new ones. If
/// that takes longer than 10 s the seat starts fenced and they are
/// released at a later start.
fn release_pins_when_confirmed(
    t: &Takeover,
    running: &[Running],
    stop: &AtomicBool,
    global_stop: &AtomicBool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while t.fenced().is_some() && Instant::now() < deadline {
        if stop.load(Ordering::Acquire) || global_stop.load(Ordering::Acquire) {
            return;
        }
        // The group named another primary while this seat opened: no
        // majority will confirm this one, and the seat changes at once.
        if t.another_is_primary() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if t.fenced().is_some() {
        return;
    }
    for r in running {
        if let Err(e) = r.ds.release_pins() {
            tracing::warn!(dataset = r.ds.name(), error = %e, "releasing interrupted writes' chunks failed; retried at the next start");
        }
    }
}

/// SIGTERM and SIGINT set the stop flag (a second one exits at once), SIGHUP
/// the reload flag.
fn signals() -> Result<(Arc<AtomicBool>, Arc<AtomicBool>)> {
    let stop = Arc::new(AtomicBool::new(false));
    let reload = Arc::new(AtomicBool::new(false));
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])
    .context("installing signal handlers")?;
    {
        let (stop, reload) = (stop.clone(), reload.clone());
        std::thread::spawn(move || {
            for sig in signals.forever() {
                if sig == signal_hook::consts::SIGHUP {
                    reload.store(true, Ordering::Release);
                    continue;
                }
                if stop.swap(true, Ordering::AcqRel) {
                    tracing::warn!(
                        signal = sig,
                        "second stop signal: exiting without a clean stop"
                    );
                    std::process::exit(130);
                }
                tracing::info!(
                    signal = sig,
                    "stopping: finishing the current round and closing the log"
                );
            }
        });
    }

    Ok((stop, reload))
}

/// Opens the replication port for the process (followers, cross-site
/// verify, admin calls and the takeover group's messages), when
/// `listen.replication` and `[tls]` are set.
fn serve_replication(cfg: &Config, takeover: Option<&Arc<Takeover>>) -> Result<Option<Service>> {
    let (Some(addr), Some(tls)) = (
        cfg.listen.as_ref().and_then(|l| l.replication.clone()),
        cfg.tls_files(),
    ) else {
        return Ok(None);
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("triad-repl")
        .enable_all()
        .build()
        .context("starting the replication runtime")?;
    let handler = takeover.map(|t| {
        let t = t.clone();
        Arc::new(move |caller: &str, kind: &str, body: Vec<u8>| t.handle(caller, kind, body))
            as replicator::upstream::TakeoverHandler
    });
    let seated = Seated::new(handler);
    let refusals = Arc::new(Refusals::default());
    let server_cfg = replicator::tls::server_config(&tls).context("loading [tls]")?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(&addr))
        .with_context(|| format!("listen.replication: binding {addr}"))?;
    // Every configured site may connect (cross-site verify asks any of
    // them; the Follow call itself admits only followers), and this one:
    // `triad verify` here asks its own daemon.
    let allowed = {
        let seated = seated.clone();
        let known: std::collections::HashSet<String> = cfg
            .peer
            .iter()
            .map(|p| p.name.clone())
            .chain(std::iter::once(cfg.site.name.clone()))
            .collect();
        Arc::new(move |site: &str| seated.is_follower(site) || known.contains(site))
            as Arc<dyn Fn(&str) -> bool + Send + Sync>
    };
    let (shutdown, mut rx) = tokio::sync::watch::channel(false);
    let svc = replicator::pb::replication_server::ReplicationServer::new(seated.clone())
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let refused = refusals.clone();
    let server = rt.spawn(async move {
        let incoming = replicator::tls::accept(listener, server_cfg, allowed, refused);
        let r = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(5)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = rx.changed().await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "replication server stopped");
        }
    });
    tracing::info!(%addr, "serving replication");
    Ok(Some(Service {
        seated,
        refusals,
        rt,
        shutdown,
        server,
    }))
}

/// What one seat serves on the replication port: its datasets, to the
/// sites that follow it in this seat.
fn seat_upstream(
    cfg: &Config,
    running: &[Running],
    view: &Arc<SiteView>,
    takeover: Option<&Arc<Takeover>>,
) -> Arc<Upstream> {
    let datasets: HashMap<String, Arc<Dataset>> = running
        .iter()
        .map(|r| (r.ds.name().to_string(), r.ds.clone()))
        .collect();
    let site_status = {
        let view = view.clone();
        Arc::new(move || view.status_json().to_string()) as replicator::upstream::StatusSource
    };
    tracing::info!(followers = ?cfg.followers().keys().collect::<Vec<_>>(), "serving this seat's log");
    Arc::new(
        Upstream::new(datasets, cfg.followers())
            .with_site(&cfg.site.name)
            .with_status(site_status)
            .with_admin(admin_handler(running, takeover)),
    )
}

/// Admin calls do what `triad snapshot` / `triad prune` ask of a running
/// daemon, through the same request queue.
fn admin_handler(
    running: &[Running],
    takeover: Option<&Arc<Takeover>>,
) -> replicator::upstream::AdminHandler {
    let takeover = takeover.cloned();
    let archives: HashMap<String, Arc<crate::archiving::Shared>> = running
        .iter()
        .filter_map(|r| Some((r.ds.name().to_string(), r.archive.clone()?)))
        .collect();
    let names: Vec<String> = running.iter().map(|r| r.ds.name().to_string()).collect();
    Arc::new(move |action: &str, dataset: &str| {
        use replicator::upstream::{AdminAnswer, AdminError};
        if let Some(way) = crate::takeover::promote::parse_action(action) {
            let t = takeover.as_ref().ok_or_else(|| {
                AdminError::NotConfigured(
                    "this site is in no takeover group: add [takeover] to every site's config"
                        .into(),
                )
            })?;
            let report = t.promote(way);
            return Ok(AdminAnswer {
                ok: report.ok,
                json: serde_json::to_string(&report).unwrap_or_default(),
            });
        }
        let kind = crate::archiving::Kind::parse(action).ok_or_else(|| {
            AdminError::Invalid(format!(
                "unknown admin action `{action}`: snapshot or prune"
            ))
        })?;
        if !names.iter().any(|n| n == dataset) {
            return Err(AdminError::Invalid(format!(
                "this site has no dataset `{dataset}`"
            )));
        }
        let archive = archives
            .get(dataset)
            .ok_or_else(|| AdminError::NotConfigured("this site has no [archive]".into()))?;
        let answer = archive
            .ask(kind, Duration::from_secs(3600))
            .map_err(|e| AdminError::Unavailable(e.to_string()))?;
        Ok(AdminAnswer {
            ok: answer.ok,
            json: serde_json::to_string(&answer).unwrap_or_default(),
        })
    })
}

/// Each dataset's archive: log shipping and snapshots into this site's store.
fn start_archiving(
    cfg: &Config,
    rt: &tokio::runtime::Runtime,
    running: &mut [Running],
    stop: &Arc<AtomicBool>,
) -> Result<Vec<std::thread::JoinHandle<()>>> {
    let mut archive_threads = Vec::new();
    let archive_settings = cfg
        .archive_settings()
        .map_err(|(field, message)| anyhow::anyhow!("{field}: {message}"))?;
    if let Some(settings) = &archive_settings {
        for r in running.iter_mut() {
            let (shared, handle) = crate::archiving::start(
                settings.clone(),
                rt.handle().clone(),
                r.ds.clone(),
                cfg.site.name.clone(),
                stop.clone(),
            )
            .context("starting archive threads")?;
            r.archive = Some(shared);
            archive_threads.push(handle);
        }
        tracing::info!(url = %settings.store.url, schedule = settings.schedule.as_ref().map(|s| s.text()), "archiving");
    }

    Ok(archive_threads)
}

/// The put/get socket, at every site: puts into pushed datasets at the
/// primary (answered once the commit policy holds), gets anywhere.
fn serve_socket(
    cfg: &Config,
    rt: &tokio::runtime::Runtime,
    running: &mut [Running],
    upstream: Option<&Arc<Upstream>>,
    takeover: Option<&Arc<Takeover>>,
    stop: &Arc<AtomicBool>,
) -> Result<Option<std::thread::JoinHandle<()>>> {
    let targets: HashMap<String, crate::pushed::Target> = running
        .iter_mut()
        .zip(&cfg.dataset)
        .map(|(r, d)| {
            // In a takeover group every seat serves puts: a site that is
            // not the primary is fenced, and says so (and counts it).
            let pushed = (cfg.site.role == Role::Primary || takeover.is_some())
                && d.source
                    .as_ref()
                    .is_some_and(|s| s.kind == crate::config::SourceKind::Pushed);
            let gate = upstream.map(|up| commit_gate(rt, up, takeover, &d.name));
            let stats = Arc::new(crate::pushed::PutStats::default());
            if pushed {
                r.puts = Some(stats.clone());
            }
            let t = crate::pushed::Target {
                ds: r.ds.clone(),
                accepts_puts: pushed,
                gate,
                lock: Mutex::new(()),
                stats,
            };
            (d.name.clone(), t)
        })
        .collect();
    let path = cfg.socket_path();
    let group = cfg.socket_group();
    let any_pushed = targets.values().any(|t| t.accepts_puts);
    Ok(match crate::pushed::bind(&path, group) {
        Ok(listener) => {
            tracing::info!(socket = %path.display(), "serving triad put / triad get");
            Some(
                crate::pushed::serve(
                    listener,
                    Arc::new(targets),
                    stop.clone(),
                    // A put waits up to its wait_limit for acknowledgement;
                    // half the stop budget leaves the rest for the others.
                    (cfg.stop_timeout() / 2).min(Duration::from_secs(15)),
                )
                .context("starting the put/get socket")?,
            )
        }
        // Without a pushed dataset the socket only serves gets: not
        // worth refusing to start over.
        Err(e) if !any_pushed => {
            tracing::warn!(socket = %path.display(), error = %e, "cannot serve triad get here; set listen.socket");
            None
        }
        Err(e) => {
            return Err(e).with_context(|| format!("listen.socket: binding {}", path.display()))
        }
    })
}

/// Where the datasets' changes come from: at the primary each directory
/// dataset's source (a thread), at a follower each dataset's link to the
/// upstream (a task).
fn start_intake(
    cfg: &Config,
    rt: &tokio::runtime::Runtime,
    running: &mut [Running],
    upstream: Option<&Arc<Upstream>>,
    takeover: Option<&Arc<Takeover>>,
    stop: &Arc<AtomicBool>,
    shutdown_rx: &tokio::sync::watch::Receiver<bool>,
) -> Result<Vec<std::thread::JoinHandle<std::result::Result<(), String>>>> {
    let mut threads = Vec::new();
    match cfg.site.role {
        Role::Primary => {
            for (r, d) in running.iter_mut().zip(&cfg.dataset) {
                let Some(settings) = d.directory() else {
                    continue;
                };
                let stats = Arc::new(Stats::default());
                let mut src = DirSource::new(settings, r.ds.clone(), stats.clone(), stop.clone())
                    .with_context(|| format!("dataset `{}`", d.name))?;
                if let Some(up) = upstream {
                    src = src.with_gate(commit_gate(rt, up, takeover, &d.name));
                }
                r.stats = Some(stats);
                let (name, stop_all) = (d.name.clone(), stop.clone());
                threads.push(
                    std::thread::Builder::new()
                        .name(format!("source-{name}"))
                        .spawn(move || {
                            let r = src.run();
                            if let Err(e) = &r {
                                tracing::error!(dataset = %name, error = %e, "source stopped");
                                stop_all.store(true, Ordering::Release);
                            }
                            r.map_err(|e| e.to_string())
                        })
                        .context("starting source thread")?,
                );
            }
        }
        Role::Follower => {
            let (Some(peer), Some(tls)) = (cfg.upstream_peer(), cfg.tls_files()) else {
                bail!("site.upstream and [tls] are required at a follower");
            };
            for r in running.iter_mut() {
                let status = Arc::new(Mutex::new(FollowStatus::default()));
                r.follow = Some(status.clone());
                let up = UpstreamAddr {
                    name: peer.name.clone(),
                    address: peer.address.clone(),
                    tls: tls.clone(),
                };
                rt.spawn(replicator::follower::run(
                    r.ds.clone(),
                    up,
                    status,
                    shutdown_rx.clone(),
                ));
            }
        }
    }

    Ok(threads)
}

/// At a follower, the hot standby tree of each dataset with a
/// `standby_path`: opened here (a directory triad did not make stops the
/// start), then kept by its own thread until `stop`.
fn start_standby(
    cfg: &Config,
    running: &mut [Running],
    own_tree: bool,
    refilled: &HashMap<String, u64>,
    stop: &Arc<AtomicBool>,
) -> Result<Vec<std::thread::JoinHandle<()>>> {
    let mut threads = Vec::new();
    if cfg.site.role != Role::Follower {
        return Ok(threads);
    }
    for (r, d) in running.iter_mut().zip(&cfg.dataset) {
        let Some(path) = &d.standby_path else {
            continue;
        };
        let cursor = cfg.site.data_dir.join(format!("standby-{}.json", d.name));
        let ready_at = refilled.get(&d.name).copied().unwrap_or(0);
        let (stats, t) = crate::standby::start(
            r.ds.clone(),
            path.clone(),
            cursor,
            own_tree,
            ready_at,
            cfg.site.data_dir.join("evidence"),
            stop.clone(),
        )
        .with_context(|| format!("dataset `{}`: standby_path {}", d.name, path.display()))?;
        r.standby = Some(stats);
        threads.push(t);
    }
    Ok(threads)
}

/// Waits, before a change counts as committed, until the commit policy
/// holds for it (the sync followers have it durable) and, in a takeover
/// group, this site is still unfenced: a primary that lost its lease
/// acknowledges nothing more.
fn commit_gate(
    rt: &tokio::runtime::Runtime,
    up: &Arc<Upstream>,
    takeover: Option<&Arc<Takeover>>,
    dataset: &str,
) -> crate::source::CommitGate {
    let (handle, up, name) = (rt.handle().clone(), up.clone(), dataset.to_string());
    let takeover = takeover.cloned();
    Arc::new(move |seq| {
        let waited = handle.block_on(up.wait_committed(&name, seq));
        // Fenced meanwhile says more than a follower that did not answer:
        // the site lost its majority (the likely reason it did not).
        if let Some(why) = takeover.as_ref().and_then(|t| t.fenced()) {
            return Err(crate::source::GateError::Fenced { seq, why });
        }
        Ok(waited?)
    })
}

/// What the stop waits for, in order. Sources finish their round (they
/// check the flag between files, and a commit wait is bounded by its
/// wait_limit); the archive's last upload and a running check get
/// `site.stop_timeout`, after which they are abandoned: an upload not
/// finished is invisible in the store (a piece or manifest is written whole
/// or not at all) and is shipped again by the next start.
struct Stopping<'a> {
    cfg: &'a Config,
    rt: tokio::runtime::Runtime,
    running: &'a [Running],
    sources: Vec<std::thread::JoinHandle<std::result::Result<(), String>>>,
    push_thread: Option<std::thread::JoinHandle<()>>,
    shutdown_tx: tokio::sync::watch::Sender<bool>,
    checks_thread: std::thread::JoinHandle<()>,
    archive_stop: Arc<AtomicBool>,
    archive_threads: Vec<std::thread::JoinHandle<()>>,
    standby_threads: Vec<std::thread::JoinHandle<()>>,
    /// The replication service, which leaves this seat.
    seated: Option<Arc<Seated>>,
    servers: Vec<tokio::task::JoinHandle<()>>,
}

impl Stopping<'_> {
    /// Stops everything and closes the datasets; gives the error that
    /// stopped the daemon, if one did.
    fn run(self) -> Result<Option<String>> {
        let deadline = Instant::now() + self.cfg.stop_timeout();
        let mut failed = None;
        for t in self.sources {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed = Some(e),
                Err(_) => failed = Some("a source thread panicked".into()),
            }
        }
        if let Some(t) = self.push_thread {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(self.cfg.socket_path());
        // The replication links stop only now, so a sync follower could
        // still acknowledge the sources' last round.
        let _ = self.shutdown_tx.send(true);
        if let Some(s) = &self.seated {
            s.vacate();
        }
        // Nothing appends any more: the archive's last shipment takes the
        // log to its end.
        self.archive_stop.store(true, Ordering::Release);
        let mut abandoned = Vec::new();
        for (what, t) in std::iter::once(("checks", self.checks_thread))
            .chain(
                self.archive_threads
                    .into_iter()
                    .map(|t| ("archive upload", t)),
            )
            .chain(self.standby_threads.into_iter().map(|t| ("standby", t)))
        {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if t.is_finished() {
                if t.join().is_err() {
                    failed = Some(format!("the {what} thread panicked"));
                }
            } else {
                abandoned.push(what);
            }
        }
        if !abandoned.is_empty() {
            tracing::warn!(
                abandoned = ?abandoned,
                stop_timeout = ?self.cfg.stop_timeout(),
                "stop: abandoned work still running after site.stop_timeout; nothing partial is visible in the archive and the next start ships the rest"
            );
        }
        // The HTTP endpoint stops accepting at once; connections still
        // open (a status poll) get a second, then are cut, so a seat change
        // is not held up by them.
        for mut h in self.servers {
            let done = self.rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(1), &mut h)
                    .await
                    .is_ok()
            });
            if !done {
                h.abort();
            }
        }
        for r in self.running {
            if let Some(f) = r.ds.failure() {
                failed = Some(f);
            }
            r.ds.close()
                .with_context(|| format!("closing dataset `{}`", r.ds.name()))?;
        }
        if abandoned.is_empty() {
            self.rt.shutdown_timeout(Duration::from_secs(5));
        } else {
            // Threads still inside the runtime are left to the process exit.
            self.rt.shutdown_background();
        }
        Ok(failed)
    }
}

/// Reads the config again (SIGHUP) and applies what can change while
/// running: commit policies and bandwidth, the log cap, the archive's
/// schedule and retention, and the check schedules. What needs a restart
/// is named; a config that does not load is refused and the running one
/// kept.
fn reload_config(
    path: &Path,
    old: Config,
    seat: Option<(crate::takeover::Seat, crate::takeover::Cluster)>,
    live: &Live,
    running: &[Running],
    upstream: Option<&Upstream>,
) -> Config {
    // Config::load validates everything, the archive section included.
    let new = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "reload refused: the config does not load; still running with the previous one");
            return old;
        }
    };
    // Compared as this seat runs it.
    let new = match &seat {
        Some((s, c)) => crate::takeover::effective(&new, s, c),
        None => new,
    };
    let (applied, restart) = old.reload_changes(&new);
    if applied.is_empty() && restart.is_empty() {
        tracing::info!(config = %path.display(), "reloaded: nothing changed");
    } else {
        tracing::info!(config = %path.display(), applied = ?applied, "reloaded");
    }
    if !restart.is_empty() {
        tracing::warn!(
            needs_restart = ?restart,
            "these settings changed but take effect only at a restart (systemctl restart triad); until then the running values stay"
        );
    }
    let kept = old.reloaded(&new);
    if let Some(up) = upstream {
        up.set_policies(kept.followers());
    }
    if let Ok(Some(settings)) = kept.archive_settings() {
        for a in running.iter().filter_map(|r| r.archive.as_ref()) {
            a.reload(settings.clone());
        }
    }
    if let Ok(mut l) = live.write() {
        *l = Arc::new(kept.clone());
    }
    kept
}

/// The one-line summary systemd shows (`STATUS=`): per dataset, the head
/// and the lag of each link.
fn status_line(all: &[DatasetStatus]) -> String {
    let mut parts = Vec::new();
    for d in all {
        let mut p = format!("{}: head {}", d.dataset, d.log.head_seq);
        for f in &d.replication.followers {
            if f.connected {
                p.push_str(&format!(", {} lag {:.1}s", f.site, f.lag_seconds));
            } else {
                p.push_str(&format!(", {} DOWN", f.site));
            }
        }
        if let Some(u) = &d.replication.upstream {
            if u.connected {
                p.push_str(&format!(", {:.1}s behind {}", u.lag_seconds, u.upstream));
            } else {
                p.push_str(&format!(", upstream {} DOWN", u.upstream));
            }
        }
        if d.failure.is_some() {
            p.push_str(", FAILED");
        }
        parts.push(p);
    }
    parts.join("; ")
}

fn status_of(
    cfg: &Config,
    r: &Running,
    upstream: Option<&Upstream>,
    refusals: &Refusals,
) -> DatasetStatus {
    let ds = &r.ds;
    let followers = upstream.map(|u| u.links_of(ds.name())).unwrap_or_default();
    let head = ds.head_seq();
    let follow = r
        .follow
        .as_ref()
        .and_then(|f| f.lock().ok().map(|s| s.clone().with_lag(head)));
    let diverged = follow.as_ref().and_then(|f| f.diverged.clone());
    DatasetStatus {
        dataset: ds.name().to_string(),
        site: cfg.site.name.clone(),
        role: cfg.site.role.as_str().into(),
        pid: std::process::id(),
        updated_ns: vault::dataset::now_ns(),
        log: ds.status(),
        source: r.stats.as_ref().map(|s| s.view()),
        puts: r.puts.as_ref().map(|p| p.view()),
        standby: r.standby.as_ref().map(|s| s.view(ds)),
        retention: r.retention.lock().map(|x| x.clone()).unwrap_or_default(),
        archive: r
            .archive
            .as_ref()
            .and_then(|a| a.status.lock().ok().map(|s| s.clone())),
        checks: r
            .checks
            .as_ref()
            .and_then(|c| c.lock().ok().map(|s| s.clone())),
        takeover: None,
        replication: ReplicationStatus {
            followers,
            upstream: follow,
            refused_handshakes: refusals.handshake.load(Ordering::Relaxed),
            refused_unknown_sites: refusals.unknown_site.load(Ordering::Relaxed),
        },
        key_device: None,
        failure: ds.failure().or(diverged),
        error: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use replicator::follower::FollowStatus;
    use replicator::upstream::LinkStatus;

    #[test]
    fn the_systemd_status_line_names_each_link_and_what_is_down() {
        let mut primary = DatasetStatus {
            dataset: "files".into(),
            ..DatasetStatus::default()
        };
        primary.log.head_seq = 42;
        primary.replication.followers = vec![
            LinkStatus {
                site: "zjk-b".into(),
                connected: true,
                lag_seconds: 0.31,
                ..LinkStatus::default()
            },
            LinkStatus {
                site: "sjz-c".into(),
                ..LinkStatus::default()
            },
        ];
        let mut follower = DatasetStatus {
            dataset: "pg".into(),
            failure: Some("disk full".into()),
            ..DatasetStatus::default()
        };
        follower.log.head_seq = 7;
        let mut up = FollowStatus::default();
        up.upstream = "zjk-a".into();
        follower.replication.upstream = Some(up);
        assert_eq!(
            status_line(&[primary, follower]),
            "files: head 42, zjk-b lag 0.3s, sjz-c DOWN; pg: head 7, upstream zjk-a DOWN, FAILED"
        );
    }
}
