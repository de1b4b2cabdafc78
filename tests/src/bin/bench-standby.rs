//! Standby lag, measured from outside as a user would see it: files are
//! written at a steady rate (1,000 × 4 KiB files/s by default) into two
//! source directories at once, one watched by a triad primary whose two
//! followers keep hot standby trees, the other by lsyncd copying with rsync
//! (`delay = 1`) to two targets. For each file the lag is the time from the
//! write (closed in the source) to its final name appearing in *both*
//! targets, seen through inotify on the target directories. Both run in
//! the same run on the same machine; the table gives p50, p99 and max per
//! tool and the ratio of the p99s, plus the daemons' peak RSS.
//!
//! Run: `cargo run -p triad-tests --bin bench-standby -- [--rate 1000]
//! [--seconds 10] [--size 4096] [--debounce 200ms] [--dir DIR]` (lsyncd and rsync installed:
//! `apt-get install lsyncd rsync`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use notify::{EventKind, RecursiveMode, Watcher};
use triad_tests::{arg, bench_dir, peak_rss_of, start_sites};

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn wait_for(what: &str, timeout: Duration, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Watches `dirs` (one per target) and records when each file name first
/// appears in each, by index of `dirs`.
struct Arrivals {
    _watchers: Vec<notify::RecommendedWatcher>,
    rx: mpsc::Receiver<(usize, String, Instant)>,
}

impl Arrivals {
    fn watch(dirs: &[PathBuf]) -> Arrivals {
        let (tx, rx) = mpsc::channel();
        let mut watchers = Vec::new();
        for (i, d) in dirs.iter().enumerate() {
            let tx = tx.clone();
            let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
                let now = Instant::now();
                let Ok(ev) = ev else { return };
                // A file is present under its final name after a rename
                // (rsync and triad both write a temporary first) or once a
                // file created under its name is closed.
                let done = matches!(
                    ev.kind,
                    EventKind::Modify(notify::event::ModifyKind::Name(_))
                        | EventKind::Access(notify::event::AccessKind::Close(
                            notify::event::AccessMode::Write
                        ))
                );
                if !done {
                    return;
                }
                for p in ev.paths {
                    if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
                        if n.starts_with('f') {
                            let _ = tx.send((i, n.to_string(), now));
                        }
                    }
                }
            })
            .expect("watcher");
            w.watch(d, RecursiveMode::NonRecursive).expect("watch");
            watchers.push(w);
        }
        Arrivals {
            _watchers: watchers,
            rx,
        }
    }
}

fn main() {
    let rate: u64 = arg("--rate").and_then(|s| s.parse().ok()).unwrap_or(1000);
    let seconds: u64 = arg("--seconds").and_then(|s| s.parse().ok()).unwrap_or(10);
    let size: usize = arg("--size").and_then(|s| s.parse().ok()).unwrap_or(4096);
    for tool in ["lsyncd", "rsync"] {
        if std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("{tool} is not installed: apt-get install lsyncd rsync");
            std::process::exit(2);
        }
    }
    let (base, src) = bench_dir("standby");
    // The directory source's debounce (`source.debounce`), when not the
    // default: each file waits that long after its last event.
    let debounce = arg("--debounce")
        .map(|d| format!(", debounce = \"{d}\""))
        .unwrap_or_default();
    let source = format!(
        "source = {{ kind = \"directory\", path = \"{}\"{debounce} }}\n",
        src.display()
    );
    let standby = |site: &Path| site.join("standby");
    let sites = start_sites(&base, &source, &|site| {
        format!("standby_path = \"{}\"\n", standby(site).display())
    });
    let triad_targets = [standby(&base.join("b")), standby(&base.join("c"))];

    // lsyncd, copying a second source to two targets with rsync.
    let lsrc = base.join("lsyncd-source");
    let ltargets = [base.join("lsyncd-1"), base.join("lsyncd-2")];
    for d in std::iter::once(&lsrc).chain(&ltargets) {
        std::fs::create_dir_all(d).expect("lsyncd dirs");
    }
    let lcfg = base.join("lsyncd.lua");
    let syncs: String = ltargets
        .iter()
        .map(|t| {
            format!(
                "sync {{ default.rsync, source = \"{}\", target = \"{}\", delay = 1 }}\n",
                lsrc.display(),
                t.display()
            )
        })
        .collect();
    std::fs::write(
        &lcfg,
        format!(
            "settings {{ nodaemon = true, logfile = \"{}\" }}\n{syncs}",
            base.join("lsyncd.log").display()
        ),
    )
    .expect("lsyncd config");
    // `--only triad` leaves lsyncd out (to look at triad alone); the
    // comparison needs both in one run.
    let with_lsyncd = arg("--only").is_none_or(|o| o != "triad");
    let lsyncd = with_lsyncd.then(|| {
        std::process::Command::new("lsyncd")
            .arg(&lcfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("lsyncd")
    });

    // One directory per tree receives the load; it must exist in every
    // target before the targets are watched.
    std::fs::create_dir(src.join("load")).expect("load dir");
    std::fs::create_dir(lsrc.join("load")).expect("load dir");
    let targets: Vec<PathBuf> = triad_targets
        .iter()
        .chain(ltargets.iter().filter(|_| with_lsyncd))
        .map(|t| t.join("load"))
        .collect();
    wait_for(
        "the load directory at every target",
        Duration::from_secs(60),
        || targets.iter().all(|t| t.is_dir()),
    );
    let arrivals = Arrivals::watch(&targets);
    std::thread::sleep(Duration::from_secs(2));

    let n = rate * seconds;
    eprintln!(
        "writing {n} files of {size} B at {rate}/s into both sources ({seconds} s); triad: primary -> 2 standby trees, lsyncd + rsync (delay = 1) -> 2 targets"
    );
    // Where triad's time goes: the largest backlog seen at each stage.
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (statuses, sampling) = (sites.statuses.clone(), sampling.clone());
        std::thread::spawn(move || {
            let mut worst = [0u64; 5];
            while sampling.load(std::sync::atomic::Ordering::Acquire) {
                let v: Vec<serde_json::Value> = statuses
                    .iter()
                    .map(|p| triad_tests::status(p).unwrap_or_default())
                    .collect();
                let n = |x: &serde_json::Value| x.as_u64().unwrap_or(0);
                worst[0] = worst[0].max(n(&v[0]["source"]["pending_paths"]));
                for f in v[0]["replication"]["followers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    let i = if f["site"] == "b" { 1 } else { 2 };
                    worst[i] = worst[i].max(n(&f["lag_records"]));
                }
                worst[3] = worst[3].max(n(&v[1]["standby"]["lag_records"]));
                worst[4] = worst[4].max(n(&v[2]["standby"]["lag_records"]));
                std::thread::sleep(Duration::from_millis(100));
            }
            worst
        })
    };
    let body = vec![0x5au8; size];
    let mut written: Vec<Instant> = Vec::with_capacity(n as usize);
    let start = Instant::now();
    for i in 0..n {
        let due = start + Duration::from_micros(i * 1_000_000 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let name = format!("f{i:07}");
        let mut b = body.clone();
        b[..8].copy_from_slice(&i.to_le_bytes());
        std::fs::write(src.join("load").join(&name), &b).expect("write");
        if with_lsyncd {
            std::fs::write(lsrc.join("load").join(&name), &b).expect("write");
        }
        written.push(Instant::now());
    }
    let write_s = start.elapsed().as_secs_f64();

    // Collect arrivals until every file is at every target, or 60 s pass.
    let mut seen: HashMap<(usize, u64), Instant> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < (n as usize) * targets.len() && Instant::now() < deadline {
        if let Ok((t, name, at)) = arrivals.rx.recv_timeout(Duration::from_millis(200)) {
            if let Ok(i) = name[1..].parse::<u64>() {
                seen.entry((t, i)).or_insert(at);
            }
        }
    }
    let lags = |pair: [usize; 2]| -> (Vec<f64>, u64) {
        let mut v = Vec::new();
        let mut missing = 0;
        for (i, w) in written.iter().enumerate() {
            let i = i as u64;
            match (seen.get(&(pair[0], i)), seen.get(&(pair[1], i))) {
                (Some(a), Some(b)) => v.push(a.max(b).saturating_duration_since(*w).as_secs_f64()),
                _ => missing += 1,
            }
        }
        (v, missing)
    };
    let (triad, triad_missing) = lags([0, 1]);
    let (lsync, lsync_missing) = lags([2, 3]);
    sampling.store(false, std::sync::atomic::Ordering::Release);
    let worst = sampler.join().expect("sampler");
    let rss: Vec<f64> = sites.children.iter().map(|c| peak_rss_of(c.id())).collect();

    println!();
    println!(
        "standby lag, {n} files of {size} B at {rate}/s (written in {write_s:.1} s), write -> present in both targets"
    );
    println!(
        "{:<34} {:>8} {:>8} {:>8} {:>8}",
        "", "p50 s", "p99 s", "max s", "missing"
    );
    for (name, v, m) in [
        ("triad (2 standby trees)", &triad, triad_missing),
        ("lsyncd + rsync, delay = 1 (2)", &lsync, lsync_missing),
    ] {
        println!(
            "{:<34} {:>8.3} {:>8.3} {:>8.3} {:>8}",
            name,
            percentile(v, 0.5),
            percentile(v, 0.99),
            percentile(v, 1.0),
            m
        );
    }
    println!(
        "triad p99 / lsyncd p99: {:.2}   triad p50 / lsyncd p50: {:.2}",
        percentile(&triad, 0.99) / percentile(&lsync, 0.99),
        percentile(&triad, 0.5) / percentile(&lsync, 0.5)
    );
    println!(
        "triad's largest backlogs: source pending paths {}, records not acked by same-city {} / remote {}, records not in the standby tree at same-city {} / remote {}",
        worst[0], worst[1], worst[2], worst[3], worst[4]
    );
    println!(
        "peak RSS MiB: primary {:.0}, same-city {:.0}, remote {:.0}",
        rss[0], rss[1], rss[2]
    );

    if let Some(mut l) = lsyncd {
        let _ = l.kill();
        let _ = l.wait();
    }
    for mut c in sites.children {
        // SAFETY: kill with a valid pid and signal number.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let _ = c.wait();
    }
    if arg("--keep").is_none() {
        let _ = std::fs::remove_dir_all(&base);
    }
}
