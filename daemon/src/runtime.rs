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
use replicator::tls::Refusals;
use replicator::upstream::{LinkStatus, Upstream, MAX_MESSAGE};
use vault::{Dataset, DatasetKey};

use crate::config::{Config, Live, Role};
use crate::service::Notifier;
use crate::source::{DirSource, Stats};
use crate::status::{DatasetStatus, Phase, ReplicationStatus, Retention, SiteView, STATUS_FILE};

/// Opens a dataset for the daemon, turning key problems into clear errors.
pub fn open_dataset(cfg: &Config, name: &str) -> Result<Dataset> {
    let d = cfg
        .dataset(name)
        .with_context(|| format!("dataset `{name}` is not in the config"))?;
    let key = DatasetKey::load(&d.key_file)
        .with_context(|| format!("dataset `{name}`: loading its key"))?;
    let opts = vault::Options {
        release_pins: cfg.site.role == Role::Primary,
        segment_bytes: cfg.segment_bytes(),
        ..vault::Options::default()
    };
    let ds = Dataset::open(&cfg.dataset_dir(name), name, &key, opts).with_context(|| {
        format!(
            "dataset `{name}`: opening {}",
            cfg.dataset_dir(name).display()
        )
    })?;
    let rec = ds.recovery();
    tracing::info!(
        dataset = name,
        segments = rec.segments,
        records = rec.records,
        replayed = ds.replayed(),
        torn_tail = rec.truncated.is_some(),
        head = ds.head_seq(),
        "dataset open"
    );
    Ok(ds)
}

struct Running {
    ds: Arc<Dataset>,
    stats: Option<Arc<Stats>>,
    follow: Option<Arc<Mutex<FollowStatus>>>,
    retention: Mutex<Retention>,
    archive: Option<Arc<crate::archiving::Shared>>,
    checks: Option<crate::checks::Shared>,
    puts: Option<Arc<crate::pushed::PutStats>>,
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
    // Acks are capped at what was sent, but the arithmetic stays checked.
    let keep_from = links
        .iter()
        .map(|l| l.acked_seq.saturating_add(1))
        .fold((durable + 1).min(shipped), u64::min);
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
pub fn run(path: &Path, cfg: Config) -> Result<()> {
    std::fs::create_dir_all(&cfg.site.data_dir)
        .with_context(|| format!("creating site.data_dir {}", cfg.site.data_dir.display()))?;
    let mut notifier = Notifier::from_env();

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

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("triad-net")
        .enable_all()
        .build()
        .context("starting the network runtime")?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);

    // The HTTP endpoint comes up first, so /healthz answers and /readyz
    // says "opening" while a long log replay runs.
    let view = Arc::new(SiteView::new(
        &cfg.site.name,
        match cfg.site.role {
            Role::Primary => "primary",
            Role::Follower => "follower",
        },
    ));
    let mut http = None;
    if let Some(addr) = cfg.listen.as_ref().and_then(|l| l.http.clone()) {
        http = Some(
            crate::http::serve(&rt, &addr, view.clone(), shutdown_rx.clone())
                .with_context(|| format!("listen.http: binding {addr}"))?,
        );
        tracing::info!(%addr, "serving /metrics, /healthz, /readyz and /v1/status");
    }

    // Open every dataset first: a wrong key or a damaged log stops the start
    // before anything is served or watched.
    let mut running: Vec<Running> = Vec::new();
    for d in &cfg.dataset {
        running.push(Running {
            ds: Arc::new(open_dataset(&cfg, &d.name)?),
            stats: None,
            follow: None,
            retention: Mutex::new(Retention::default()),
            archive: None,
            checks: None,
            puts: None,
        });
    }

    let tls = cfg.tls_files();

    // Serve the log to the sites that follow this one.
    let refusals = Arc::new(Refusals::default());
    let mut upstream: Option<Arc<Upstream>> = None;
    let mut server = None;
    if let (Some(addr), Some(tls)) = (
        cfg.listen.as_ref().and_then(|l| l.replication.clone()),
        tls.as_ref(),
    ) {
        let datasets: HashMap<String, Arc<Dataset>> = running
            .iter()
            .map(|r| (r.ds.name().to_string(), r.ds.clone()))
            .collect();
        let site_status = {
            let view = view.clone();
            Arc::new(move || view.status_json().to_string()) as replicator::upstream::StatusSource
        };
        // Admin calls do what `triad snapshot` / `triad prune` ask of a
        // running daemon, through the same request queue.
        let admin = {
            let cfg = cfg.clone();
            Arc::new(move |action: &str, dataset: &str| {
                if action != "snapshot" && action != "prune" {
                    return Err(format!(
                        "unknown admin action `{action}`: snapshot or prune"
                    ));
                }
                if cfg.dataset(dataset).is_none() {
                    return Err(format!("this site has no dataset `{dataset}`"));
                }
                if cfg.archive.is_none() {
                    return Err("this site has no [archive]".into());
                }
                let answer = crate::archiving::request(
                    &cfg.dataset_dir(dataset),
                    action,
                    Duration::from_secs(3600),
                )
                .map_err(|e| e.to_string())?;
                Ok((
                    answer.ok,
                    serde_json::to_string(&answer).unwrap_or_default(),
                ))
            }) as replicator::upstream::AdminHandler
        };
        let up = Arc::new(
            Upstream::new(datasets, cfg.followers())
                .with_site(&cfg.site.name)
                .with_status(site_status)
                .with_admin(admin),
        );
        let server_cfg = replicator::tls::server_config(tls).context("loading [tls]")?;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(&addr))
            .with_context(|| format!("listen.replication: binding {addr}"))?;
        // Every configured site may connect (cross-site verify asks any of
        // them); the Follow call itself admits only followers.
        let allowed = {
            let up = up.clone();
            // This site too: `triad verify` here asks its own daemon.
            let known: std::collections::HashSet<String> = cfg
                .peer
                .iter()
                .map(|p| p.name.clone())
                .chain(std::iter::once(cfg.site.name.clone()))
                .collect();
            Arc::new(move |site: &str| up.is_follower(site) || known.contains(site))
                as Arc<dyn Fn(&str) -> bool + Send + Sync>
        };
        let mut rx = shutdown_rx.clone();
        let svc = replicator::pb::replication_server::ReplicationServer::new(up.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let (refusals2, cfg2) = (refusals.clone(), server_cfg);
        server = Some(rt.spawn(async move {
            let incoming = replicator::tls::accept(listener, cfg2, allowed, refusals2);
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
        }));
        tracing::info!(%addr, followers = ?cfg.followers().keys().collect::<Vec<_>>(), "serving replication");
        upstream = Some(up);
    }

    // Each dataset's archive: log shipping and snapshots into this site's store.
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

    // The put/get socket, at every site: puts into pushed datasets at the
    // primary (answered once the commit policy holds), gets anywhere.
    let push_thread = {
        let targets: HashMap<String, crate::pushed::Target> = running
            .iter_mut()
            .zip(&cfg.dataset)
            .map(|(r, d)| {
                let pushed = cfg.site.role == Role::Primary
                    && matches!(d.source, Some(crate::config::SourceConfig::Pushed {}));
                let gate = upstream.clone().map(|up| {
                    let (handle, name) = (rt.handle().clone(), d.name.clone());
                    Arc::new(move |seq| {
                        handle
                            .block_on(up.wait_committed(&name, seq))
                            .map_err(|e| e.to_string())
                    }) as crate::source::CommitGate
                });
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
        let group = cfg
            .listen
            .as_ref()
            .and_then(|l| l.socket_group.as_deref())
            .and_then(crate::pushed::group_id);
        let any_pushed = targets.values().any(|t| t.accepts_puts);
        match crate::pushed::bind(&path, group) {
            Ok(listener) => {
                tracing::info!(socket = %path.display(), "serving triad put / triad get");
                Some(
                    crate::pushed::serve(listener, Arc::new(targets), stop.clone())
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
        }
    };

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
                if let Some(up) = upstream.clone() {
                    let (handle, name) = (rt.handle().clone(), d.name.clone());
                    src = src.with_gate(Arc::new(move |seq| {
                        handle
                            .block_on(up.wait_committed(&name, seq))
                            .map_err(|e| e.to_string())
                    }));
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
            let (Some(peer), Some(tls)) = (cfg.upstream_peer(), tls.as_ref()) else {
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

    tracing::info!(site = %cfg.site.name, role = ?cfg.site.role, datasets = running.len(), "triad is running");
    let publish = |cfg: &Config, running: &[Running]| {
        let all: Vec<DatasetStatus> = running
            .iter()
            .map(|r| status_of(cfg, r, upstream.as_deref(), &refusals))
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
    let mut next_retention = Instant::now();
    while !stop.load(Ordering::Acquire) {
        let reloaded = reload.swap(false, Ordering::AcqRel);
        if reloaded {
            notifier.reloading();
            cfg = reload_config(path, cfg, &live, &running, upstream.as_deref());
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
        if running.iter().any(|r| r.ds.failure().is_some()) {
            stop.store(true, Ordering::Release);
        }
        std::thread::sleep(Duration::from_millis(250));
    }

    // The stop. Sources finish their round (they check the flag between
    // files, and a commit wait is bounded by its wait_limit); the archive's
    // last upload and a running check get `site.stop_timeout`, after which
    // they are abandoned: an upload not finished is invisible in the store
    // (a piece or manifest is written whole or not at all) and is shipped
    // again by the next start.
    let deadline = Instant::now() + cfg.stop_timeout();
    view.set_phase(Phase::Stopping);
    notifier.stopping("stopping: closing the log and finishing uploads");
    let mut failed = None;
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed = Some(e),
            Err(_) => failed = Some("a source thread panicked".into()),
        }
    }
    if let Some(t) = push_thread {
        let _ = t.join();
    }
    let _ = std::fs::remove_file(cfg.socket_path());
    // The replication links stop only now, so a sync follower could still
    // acknowledge the sources' last round.
    let _ = shutdown_tx.send(true);
    let mut abandoned = Vec::new();
    for (what, t) in std::iter::once(("checks", checks_thread))
        .chain(archive_threads.into_iter().map(|t| ("archive upload", t)))
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
            stop_timeout = ?cfg.stop_timeout(),
            "stop: abandoned work still running after site.stop_timeout; nothing partial is visible in the archive and the next start ships the rest"
        );
    }
    for h in [server, http].into_iter().flatten() {
        let _ = rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), h).await });
    }
    for r in &running {
        if let Some(f) = r.ds.failure() {
            failed = Some(f);
        }
        r.ds.close()
            .with_context(|| format!("closing dataset `{}`", r.ds.name()))?;
    }
    publish(&cfg, &running);
    if abandoned.is_empty() {
        rt.shutdown_timeout(Duration::from_secs(5));
    } else {
        // Threads still inside the runtime are left to the process exit.
        rt.shutdown_background();
    }
    if let Some(f) = failed {
        bail!("stopped because of an error: {f}");
    }
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Reads the config again (SIGHUP) and applies what can change while
/// running: commit policies and bandwidth, the log cap, the archive's
/// schedule and retention, and the check schedules. What needs a restart
/// is named; a config that does not load is refused and the running one
/// kept.
fn reload_config(
    path: &Path,
    old: Config,
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
        role: match cfg.site.role {
            Role::Primary => "primary",
            Role::Follower => "follower",
        },
        pid: std::process::id(),
        updated_ns: vault::dataset::now_ns(),
        log: ds.status(),
        source: r.stats.as_ref().map(|s| s.view()),
        puts: r.puts.as_ref().map(|p| p.view()),
        retention: r.retention.lock().map(|x| x.clone()).unwrap_or_default(),
        archive: r
            .archive
            .as_ref()
            .and_then(|a| a.status.lock().ok().map(|s| s.clone())),
        checks: r
            .checks
            .as_ref()
            .and_then(|c| c.lock().ok().map(|s| s.clone())),
        replication: ReplicationStatus {
            followers,
            upstream: follow,
            refused_handshakes: refusals.handshake.load(Ordering::Relaxed),
            refused_unknown_sites: refusals.unknown_site.load(Ordering::Relaxed),
        },
        failure: ds.failure().or(diverged),
    }
}
