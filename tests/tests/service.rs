//! Running triad as a service: /metrics scraped from three real daemons and
//! read with Prometheus' own tools (promtool) and a text-format parser, lag
//! following a paused follower; the systemd notify protocol on a test
//! NOTIFY_SOCKET; SIGTERM under load; the units, alert rules and their
//! unit tests checked by systemd-analyze and promtool.

use crate::common;

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::deploy::*;
use common::*;
use rand::SeedableRng;

fn repo_file(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// A tool from Debian's packages that `./dev.sh test` installs.
fn tool(name: &str, package: &str) -> String {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{name} is not installed: `apt-get install {package}` (./dev.sh test installs it)"
    );
    name.to_string()
}

/// Scrapes /metrics, checks the text with `promtool check metrics` (the
/// Prometheus project's parser and linter) and parses it.
fn scrape(port: u16) -> prometheus_parse::Scrape {
    let (code, text) = http_get(port, "/metrics");
    assert_eq!(code, 200, "{text}");
    let mut child = Command::new(tool("promtool", "prometheus"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("parse")
}

fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

fn write_some(root: &Path, tag: &str, n: usize, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let d = root.join(tag);
    std::fs::create_dir_all(&d).unwrap();
    for i in 0..n {
        write_file(
            &d.join(format!("f{i}")),
            20_000 + i * 31,
            i % 2 == 0,
            &mut rng,
        );
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: sends a signal to a child this test started.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

#[test]
fn metrics_from_three_sites_follow_a_paused_follower() {
    let mut d = Deployment::new(None);
    write_some(&d.a.source, "first", 30, 1);
    d.start();
    d.a.wait_settled(now_ns(), Duration::from_secs(60));
    let (head, _, _) = wait_replicated(&d.a, &[&d.b, &d.c], Duration::from_secs(90));
    assert!(head > 0);

    let follower =
        |peer: &'static str| [("dataset", "files"), ("peer", peer), ("link", "follower")];
    // Every site's text passes promtool and says what its status says.
    for (port, site) in d.http.iter().zip(["zjk-a", "zjk-b", "sjz-c"]) {
        let s = scrape(*port);
        assert_eq!(
            value(
                &s,
                "triad_wal_head_seq",
                &[("dataset", "files"), ("site", site)]
            ),
            Some(head as f64),
            "{site}"
        );
        assert_eq!(value(&s, "triad_ready", &[]), Some(1.0), "{site}");
        assert_eq!(http_get(*port, "/healthz").0, 200);
        assert_eq!(http_get(*port, "/readyz").0, 200);
        let (code, body) = http_get(*port, "/v1/status");
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["site"], site);
        assert_eq!(v["ready"], true);
        assert_eq!(v["datasets"][0]["log"]["head_seq"], head);
    }
    let a = scrape(d.http[0]);
    for peer in ["zjk-b", "sjz-c"] {
        assert_eq!(
            value(&a, "triad_replication_lag_records", &follower(peer)),
            Some(0.0)
        );
        assert_eq!(
            value(&a, "triad_replication_lag_seconds", &follower(peer)),
            Some(0.0)
        );
        assert_eq!(
            value(&a, "triad_peer_connected", &follower(peer)),
            Some(1.0),
            "{peer}: {}",
            http_get(d.http[0], "/metrics").1
        );
    }
    let c = scrape(d.http[2]);
    let upstream = [
        ("dataset", "files"),
        ("peer", "zjk-a"),
        ("link", "upstream"),
    ];
    assert_eq!(
        value(&c, "triad_replication_lag_records", &upstream),
        Some(0.0)
    );
    assert_eq!(value(&c, "triad_peer_connected", &upstream), Some(1.0));

    // Pause the remote: the primary's lag for it grows, the sync site's
    // stays at zero.
    let pid_c = d.c.pid().unwrap();
    signal(pid_c, libc::SIGSTOP);
    write_some(&d.a.source, "while-paused", 20, 2);
    d.a.wait_settled(now_ns(), Duration::from_secs(60));
    let first = until(
        "lag for the paused follower",
        Duration::from_secs(30),
        || {
            let s = scrape(d.http[0]);
            let records = value(&s, "triad_replication_lag_records", &follower("sjz-c"))?;
            let secs = value(&s, "triad_replication_lag_seconds", &follower("sjz-c"))?;
            (records > 0.0 && secs > 0.0).then_some((records, secs))
        },
    );
    std::thread::sleep(Duration::from_millis(1500));
    let s = scrape(d.http[0]);
    let later = value(&s, "triad_replication_lag_seconds", &follower("sjz-c")).unwrap();
    assert!(
        later >= first.1 + 1.0,
        "lag seconds did not grow while paused: {} then {later}",
        first.1
    );
    assert_eq!(
        value(&s, "triad_replication_lag_records", &follower("sjz-c")),
        Some(first.0)
    );
    assert_eq!(
        value(&s, "triad_replication_lag_records", &follower("zjk-b")),
        Some(0.0)
    );

    // Resume: the lag goes back to zero at both ends.
    signal(pid_c, libc::SIGCONT);
    until(
        "the remote catching up in /metrics",
        Duration::from_secs(60),
        || {
            let a = scrape(d.http[0]);
            let c = scrape(d.http[2]);
            let caught_up = value(&a, "triad_replication_lag_records", &follower("sjz-c"))
                == Some(0.0)
                && value(&a, "triad_replication_lag_seconds", &follower("sjz-c")) == Some(0.0)
                && value(&c, "triad_replication_lag_records", &upstream) == Some(0.0)
                && value(&c, "triad_wal_head_seq", &[("dataset", "files")])
                    == value(&a, "triad_wal_head_seq", &[("dataset", "files")]);
            caught_up.then_some(())
        },
    );

    // `triad status --all` from the primary reaches every site.
    let out = d.a.cli(&["status", "--all", "--json"]);
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let sites: Vec<&str> = all
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["site"].as_str())
        .collect();
    assert_eq!(sites, ["zjk-a", "zjk-b", "sjz-c"], "{all}");
    for s in all.as_array().unwrap().iter().skip(1) {
        assert_eq!(s["ready"], true, "{s}");
    }
}

/// Reads datagrams from a test NOTIFY_SOCKET.
struct NotifySocket {
    sock: UnixDatagram,
    seen: Vec<(Instant, String)>,
}

impl NotifySocket {
    fn bind(path: &Path) -> NotifySocket {
        let sock = UnixDatagram::bind(path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        NotifySocket {
            sock,
            seen: Vec::new(),
        }
    }

    /// Waits for a message containing `needle`; returns it.
    fn wait_for(&mut self, needle: &str, secs: u64) -> String {
        let start = Instant::now();
        let mut buf = vec![0u8; 4096];
        loop {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let m = String::from_utf8_lossy(&buf[..n]).to_string();
                self.seen.push((Instant::now(), m.clone()));
                if m.lines().any(|l| l == needle || l.starts_with(needle)) {
                    return m;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "no `{needle}` on NOTIFY_SOCKET within {secs}s; got {:?}",
                self.seen.iter().map(|(_, m)| m).collect::<Vec<_>>()
            );
        }
    }

    fn count_for(&mut self, needle: &str, d: Duration) -> usize {
        let start = Instant::now();
        let mut buf = vec![0u8; 4096];
        let mut n_seen = 0;
        while start.elapsed() < d {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let m = String::from_utf8_lossy(&buf[..n]).to_string();
                n_seen += m.lines().filter(|l| *l == needle).count();
                self.seen.push((Instant::now(), m));
            }
        }
        n_seen
    }
}

#[test]
fn systemd_notify_ready_status_watchdog_reload_and_stop() {
    let mut s = Site::new();
    write_some(&s.source, "a", 5, 3);
    let port = free_port();
    let mut text = std::fs::read_to_string(&s.config).unwrap();
    text.push_str(&format!("\n[listen]\nhttp = \"127.0.0.1:{port}\"\n"));
    s.set_config(&text);
    let path = s.tmp.path().join("notify.sock");
    let mut notify = NotifySocket::bind(&path);
    s.env = vec![
        ("NOTIFY_SOCKET".into(), path.display().to_string()),
        // 1 s: the daemon pings every 500 ms.
        ("WATCHDOG_USEC".into(), "1000000".into()),
    ];
    s.start();

    let ready = notify.wait_for("READY=1", 60);
    // READY comes only once the log is open and the listener is bound: the
    // endpoint answers ready at once, and the status says so.
    assert_eq!(http_get(port, "/readyz").0, 200, "not ready after READY=1");
    assert!(
        ready.contains("STATUS=files: head "),
        "READY without a status line: {ready}"
    );
    assert!(s.status().is_some());

    let pings = notify.count_for("WATCHDOG=1", Duration::from_secs(3));
    assert!(
        (4..=8).contains(&pings),
        "{pings} watchdog pings in 3 s at a 1 s period"
    );

    // A change moves the head in the STATUS line.
    let head = until("the initial scan", Duration::from_secs(30), || {
        let v = s.status()?;
        let done = v["source"]["initial_scan_done"] == true && v["source"]["settled"] == true;
        done.then(|| v["log"]["head_seq"].as_u64()).flatten()
    });
    write_some(&s.source, "b", 1, 4);
    until(
        "a STATUS line with the new head",
        Duration::from_secs(30),
        || {
            let m = notify.wait_for("STATUS=files: head ", 30);
            let h: u64 = m
                .trim()
                .trim_start_matches("STATUS=files: head ")
                .parse()
                .unwrap_or(0);
            (h > head).then_some(())
        },
    );

    // SIGHUP: RELOADING=1, then READY=1 again; a changed listen address is
    // named as needing a restart and the running one stays.
    s.set_config(&text.replace(&port.to_string(), &free_port().to_string()));
    signal(s.pid().unwrap(), libc::SIGHUP);
    notify.wait_for("RELOADING=1", 10);
    notify.wait_for("READY=1", 10);
    until("the reload's log line", Duration::from_secs(10), || {
        s.log_text()
            .contains("take effect only at a restart")
            .then_some(())
    });
    assert!(s.log_text().contains("[listen]"));
    assert_eq!(http_get(port, "/healthz").0, 200);

    // SIGTERM: STOPPING=1, then a clean exit.
    signal(s.pid().unwrap(), libc::SIGTERM);
    notify.wait_for("STOPPING=1", 10);
    let st = s.wait_exit(Duration::from_secs(60));
    assert!(st.success(), "exit {st:?}\n{}", s.log_text());
    assert!(s.log_text().contains("stopped cleanly"));
}

#[test]
fn sigterm_under_load_stops_in_bounded_time_and_a_restart_loses_nothing() {
    let mut d = Deployment::new(None);
    d.primary_site = "stop_timeout = \"20s\"\n".into();
    d.configure(None);
    let archive = d.a.tmp.path().join("archive");
    let mut text = std::fs::read_to_string(&d.a.config).unwrap();
    text.push_str(&format!(
        "\n[archive]\nurl = \"file://{}\"\nlog_flush_interval = \"500ms\"\n",
        archive.display()
    ));
    d.a.set_config(&text);
    write_some(&d.a.source, "first", 10, 5);
    d.start();
    d.a.wait_settled(now_ns(), Duration::from_secs(60));
    wait_replicated(&d.a, &[&d.b, &d.c], Duration::from_secs(90));

    // A writer keeps changing the tree through the stop and the restart.
    let stop_writer = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (root, stop, written) = (d.a.source.clone(), stop_writer.clone(), written.clone());
        std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(9);
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                let dir = root.join(format!("load/{}", i % 13));
                std::fs::create_dir_all(&dir).unwrap();
                write_file(
                    &dir.join(format!("f{i}")),
                    50_000,
                    i.is_multiple_of(3),
                    &mut rng,
                );
                written.fetch_add(1, Ordering::Relaxed);
                i += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    // An admin call with the site's own certificate takes a snapshot under
    // load.
    let files = replicator::tls::TlsFiles {
        ca: d.names.certs.join("ca.pem"),
        cert: d.names.certs.join("zjk-a.pem"),
        key: d.names.certs.join("zjk-a.key"),
    };
    let addr = replicator::follower::UpstreamAddr {
        name: "zjk-a".into(),
        address: format!("127.0.0.1:{}", d.ports[0]),
        tls: files,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (ok, json) = rt
        .block_on(replicator::follower::admin(&addr, "snapshot", "files"))
        .expect("admin snapshot");
    assert!(ok, "{json}");
    let answer: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(answer["snapshot"]["seq"].as_u64().unwrap() > 0, "{json}");
    std::thread::sleep(Duration::from_secs(1));
    let asked = Instant::now();
    let st = d.a.stop();
    let took = asked.elapsed();
    assert!(st.success(), "exit {st:?}\n{}", d.a.log_text());
    assert!(
        took < Duration::from_secs(25),
        "stop took {took:?} (stop_timeout is 20 s)"
    );
    assert!(d.a.log_text().contains("stopped cleanly"));
    // The clean stop shipped the log to its end.
    let last = d.a.status().unwrap();
    let head_at_stop = last["log"]["head_seq"].as_u64().unwrap();
    assert_eq!(
        last["archive"]["shipped_seq"].as_u64(),
        Some(head_at_stop),
        "{last}"
    );
    assert!(written.load(Ordering::Relaxed) > 50, "the load did not run");

    // Restart with the writer still going: the log reopens without a torn
    // tail and goes on from where it stopped.
    let log_before = d.a.log_text().len();
    d.a.start();
    std::thread::sleep(Duration::from_secs(2));
    stop_writer.store(true, Ordering::Release);
    writer.join().unwrap();
    d.a.wait_settled(now_ns(), Duration::from_secs(90));
    let restart_log = d.a.log_text()[log_before..].to_string();
    assert!(restart_log.contains("torn_tail=false"), "{restart_log}");
    assert!(d.a.status().unwrap()["log"]["head_seq"].as_u64().unwrap() > head_at_stop);
    wait_replicated(&d.a, &[&d.b, &d.c], Duration::from_secs(90));

    // Nothing lost: the remote's copy restores to the source tree.
    let restored = d.c.tmp.path().join("restored");
    let out = d.c.restore(&restored);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_tree(&d.a.source, &restored);
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let analyze = tool("systemd-analyze", "systemd");
    let dir = tempfile::tempdir().unwrap();
    let mut units = 0;
    for e in std::fs::read_dir(repo_file("configs/systemd")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "service") {
            continue;
        }
        // The units name /usr/local/bin/triad; verify them against the
        // binary this test built (systemd-analyze checks it exists).
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("/usr/local/bin/triad", &triad_bin().display().to_string());
        let copy = dir.path().join(p.file_name().unwrap());
        std::fs::write(&copy, text).unwrap();
        let out = Command::new(&analyze)
            .arg("verify")
            .arg(&copy)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        assert!(out.status.success(), "{name}: {stderr}");
        assert!(
            !stderr.lines().any(|l| l.contains(&name)),
            "{name}: {stderr}"
        );
        units += 1;
    }
    assert_eq!(units, 3, "one unit per site role");
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let promtool = tool("promtool", "prometheus");
    for args in [
        ["check", "rules", "configs/alerts.yml"],
        ["test", "rules", "configs/alerts.test.yml"],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(repo_file(""))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
