//! Three real daemons on loopback, each with its own data dir and
//! certificate: the primary watches a directory, the same-city and remote
//! sites follow it over mutual TLS and hold identical copies.

use crate::common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::deploy::*;
use common::proxy::Proxy;
use common::*;
use rand::SeedableRng;

fn write_some(root: &Path, tag: &str, n: usize, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for i in 0..n {
        let d = root.join(format!("{tag}/{}", i % 7));
        std::fs::create_dir_all(&d).unwrap();
        let len = if i % 25 == 0 {
            3 << 20
        } else {
            (i * 997) % 40_000
        };
        write_file(&d.join(format!("f{i}")), len, i % 2 == 0, &mut rng);
    }
}

#[test]
fn followers_hold_identical_copies_that_restore_to_the_source() {
    let mut dep = Deployment::new(None);
    write_some(&dep.a.source, "before", 150, 1);
    dep.start();
    dep.a.wait_settled(now_ns(), Duration::from_secs(60));
    write_some(&dep.a.source, "live", 300, 2);
    std::fs::rename(dep.a.source.join("before/3"), dep.a.source.join("moved")).unwrap();
    std::fs::remove_dir_all(dep.a.source.join("before/4")).unwrap();
    dep.a.wait_settled(now_ns(), Duration::from_secs(60));
    let (head, chain, digest) = wait_replicated(&dep.a, &[&dep.b, &dep.c], Duration::from_secs(60));
    assert!(head > 400, "head {head}");
    eprintln!("replicated to seq {head}, chain {chain}, digest {digest}");

    // The primary knows each follower's acknowledged seq and lag.
    let v = dep.a.status().unwrap();
    let followers = v["replication"]["followers"].as_array().unwrap();
    assert_eq!(followers.len(), 2);
    for f in followers {
        assert_eq!(f["connected"], true, "{f}");
        assert_eq!(f["acked_seq"].as_u64(), Some(head), "{f}");
        assert_eq!(f["lag_records"].as_u64(), Some(0), "{f}");
    }
    // `triad status` shows both ends of each link and exits 0 when healthy.
    let status = |s: &Site| {
        let out = s.cli(&["status"]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (ok, text) = status(&dep.a);
    assert!(
        ok && text.contains("follower zjk-b (sync): connected")
            && text.contains("follower sjz-c (async): connected"),
        "{text}"
    );
    let (ok, text) = status(&dep.c);
    assert!(
        ok && text.contains("upstream zjk-a: connected") && text.contains("lag 0 records"),
        "{text}"
    );
    for site in [&dep.b, &dep.c] {
        let r = site.tmp.path().join("restored");
        let out = site.restore(&r);
        assert!(
            out.status.success(),
            "restore from a follower: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_same_tree(&dep.a.source, &r);
    }
    for s in [&mut dep.c, &mut dep.b, &mut dep.a] {
        assert!(s.stop().success());
    }
    check_state_invariants(&dep.b);
    check_state_invariants(&dep.c);
}

#[test]
fn remote_catches_up_by_itself_after_sigkill_and_after_a_cut_link() {
    let a_port = free_port();
    let proxy = Proxy::new(a_port);
    let mut dep = Deployment::new(Some(("zjk-a".into(), proxy.port)));
    dep.ports[0] = a_port;
    dep.configure(Some(("zjk-a".into(), proxy.port)));
    dep.start();
    write_some(&dep.a.source, "one", 100, 3);
    dep.a.wait_settled(now_ns(), Duration::from_secs(60));
    wait_replicated(&dep.a, &[&dep.b, &dep.c], Duration::from_secs(60));

    // The remote is killed while the primary keeps writing.
    dep.c.kill9();
    write_some(&dep.a.source, "two", 200, 4);
    dep.a.wait_settled(now_ns(), Duration::from_secs(60));
    let v = dep.a.status().unwrap();
    let remote = v["replication"]["followers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["site"] == "sjz-c")
        .unwrap()
        .clone();
    assert_eq!(remote["connected"], false, "{remote}");
    assert!(
        remote["lag_records"].as_u64().unwrap() > 0,
        "lag is visible at the primary: {remote}"
    );
    assert!(remote["lag_seconds"].as_f64().unwrap() > 0.0, "{remote}");
    dep.c.start();
    wait_replicated(&dep.a, &[&dep.b, &dep.c], Duration::from_secs(60));

    // The link is cut (connections dropped, new ones refused) for a while.
    proxy.cut.store(true, Ordering::Relaxed);
    write_some(&dep.a.source, "three", 200, 5);
    dep.a.wait_settled(now_ns(), Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(1));
    let v = dep.c.status().unwrap();
    assert_eq!(v["replication"]["upstream"]["connected"], false, "{v}");
    assert!(
        v["replication"]["upstream"]["lag_records"]
            .as_u64()
            .unwrap_or(0)
            > 0
            || v["log"]["head_seq"] != dep.a.status().unwrap()["log"]["head_seq"]
    );
    proxy.cut.store(false, Ordering::Relaxed);
    let (head, _, _) = wait_replicated(&dep.a, &[&dep.b, &dep.c], Duration::from_secs(60));
    let v = dep.c.status().unwrap();
    assert_eq!(
        v["replication"]["upstream"]["lag_records"].as_u64(),
        Some(0),
        "{v}"
    );
    assert!(head > 500);

    // The link stalls: connections stay open but nothing gets through. The
    // remote notices by itself (HTTP/2 keepalive) and resumes afterwards.
    proxy.stall.store(true, Ordering::Relaxed);
    write_some(&dep.a.source, "four", 100, 19);
    dep.a.wait_settled(now_ns(), Duration::from_secs(60));
    wait_until(
        "the remote to notice the stalled link",
        Duration::from_secs(45),
        || {
            dep.c
                .status()
                .is_some_and(|v| v["replication"]["upstream"]["connected"] == false)
        },
    );
    proxy.stall.store(false, Ordering::Relaxed);
    wait_replicated(&dep.a, &[&dep.b, &dep.c], Duration::from_secs(60));
    let r = dep.c.tmp.path().join("restored");
    assert!(dep.c.restore(&r).status.success());
    assert_same_tree(&dep.a.source, &r);
}

#[test]
fn cascade_primary_to_local_to_remote() {
    let mut dep = Deployment::new(None);
    let pb = dep.ports[1];
    dep.configure(Some(("zjk-b".into(), pb)));
    dep.start();
    write_some(&dep.a.source, "x", 120, 6);
    dep.a.wait_settled(now_ns(), Duration::from_secs(60));
    wait_replicated(&dep.a, &[&dep.b, &dep.c], Duration::from_secs(60));
    let v = dep.b.status().unwrap();
    let f = &v["replication"]["followers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["site"] == "sjz-c")
        .unwrap()
        .clone();
    assert_eq!(
        f["connected"], true,
        "the remote follows the local site: {f}"
    );
}

#[test]
fn a_follower_fed_another_history_stops_and_says_where() {
    let mut dep = Deployment::new(None);
    write_some(&dep.a.source, "real", 60, 7);
    dep.start();
    dep.a.wait_settled(now_ns(), Duration::from_secs(60));
    let (head, chain, _) = wait_replicated(&dep.a, &[&dep.b, &dep.c], Duration::from_secs(60));
    assert!(dep.b.stop().success());

    // A forged upstream: same dataset and key, the primary's certificate,
    // but a different history that is longer than the follower's.
    let mut forged = Site::new();
    forged.share_key_of(&dep.a);
    let port = free_port();
    let certs = dep.names.certs.clone();
    forged.set_config(&format!(
        "[site]\nname = \"zjk-a\"\nrole = \"primary\"\ndata_dir = \"{}\"\n\n[listen]\nreplication = \"127.0.0.1:{port}\"\n\n{}\n{}[[dataset]]\nname = \"files\"\nkey_file = \"{}\"\nsource = {{ kind = \"directory\", path = \"{}\", debounce = \"100ms\" }}\n",
        forged.data.display(),
        tls(&certs, "zjk-a"),
        peer("zjk-b", dep.ports[1], Some("sync")),
        forged.key.display(),
        forged.source.display()
    ));
    write_some(&forged.source, "fake", 200, 8);
    forged.start();
    forged.wait_settled(now_ns(), Duration::from_secs(60));

    let b_config = std::fs::read_to_string(&dep.b.config).unwrap();
    dep.b.set_config(&b_config.replace(
        &format!("127.0.0.1:{}\"", dep.ports[0]),
        &format!("127.0.0.1:{port}\""),
    ));
    dep.b.start();
    let start = std::time::Instant::now();
    let failure = loop {
        if let Some(f) = dep
            .b
            .status()
            .and_then(|v| v["failure"].as_str().map(str::to_string))
        {
            break f;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no divergence reported:\n{}",
            dep.b.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Named when it connects: the upstream holds another chain hash at the
    // follower's head (before, it was named at the first record after it).
    assert!(
        failure.contains(&format!("DIVERGED at seq {head}:"))
            && failure.contains("the follower's chain hash there is"),
        "{failure}"
    );
    assert!(
        dep.b.log_text().contains("DIVERGED"),
        "said loudly in the log"
    );
    // It kept what it had.
    let v = dep.b.status().unwrap();
    assert_eq!(v["log"]["head_seq"].as_u64(), Some(head));
    assert_eq!(v["log"]["chain_hash"].as_str(), Some(chain.as_str()));
}

fn follower_link(site: &Site, name: &str) -> serde_json::Value {
    let v = site.status().unwrap();
    v["replication"]["followers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["site"] == name)
        .unwrap()
        .clone()
}

#[test]
fn sync_follower_down_with_wait_fails_the_writer_after_the_limit() {
    let mut dep = Deployment::new(None);
    dep.sync_policy = "on_unreachable = \"wait\"\nwait_limit = \"1s\"\n".into();
    dep.configure(None);
    dep.start();
    write_some(&dep.a.source, "one", 20, 9);
    dep.a.wait_settled(now_ns(), Duration::from_secs(60));
    wait_replicated(&dep.a, &[&dep.b, &dep.c], Duration::from_secs(60));
    let src = |s: &Site| s.status().unwrap()["source"].clone();
    assert_eq!(src(&dep.a)["commit_failures"].as_u64(), Some(0));
    assert_eq!(
        src(&dep.a)["committed_seq"],
        dep.a.status().unwrap()["log"]["head_seq"]
    );

    assert!(dep.b.stop().success());
    write_some(&dep.a.source, "two", 20, 10);
    wait_until("the commit policy to fail", Duration::from_secs(30), || {
        src(&dep.a)["commit_failures"].as_u64() > Some(0)
    });
    let err = src(&dep.a)["last_error"].as_str().unwrap().to_string();
    assert!(
        err.contains("sync follower zjk-b did not acknowledge")
            && err.contains("on_unreachable = \"wait\""),
        "{err}"
    );
    assert_eq!(src(&dep.a)["commit_failing"], true);
    let committed = src(&dep.a)["committed_seq"].as_u64().unwrap();
    assert!(
        committed < dep.a.status().unwrap()["log"]["head_seq"].as_u64().unwrap(),
        "nothing past the sync follower counts as committed"
    );
    // The async remote is not held back.
    wait_replicated(&dep.a, &[&dep.c], Duration::from_secs(30));

    dep.b.start();
    wait_replicated(&dep.a, &[&dep.b, &dep.c], Duration::from_secs(60));
    std::fs::write(dep.a.source.join("after"), b"after the return").unwrap();
    wait_until("the policy to hold again", Duration::from_secs(30), || {
        let v = dep.a.status().unwrap();
        v["source"]["committed_seq"] == v["log"]["head_seq"] && v["source"]["settled"] == true
    });
}

#[test]
fn sync_follower_down_with_degrade_keeps_writing_and_raises_the_alert_until_caught_up() {
    let mut dep = Deployment::new(None);
    dep.sync_policy = "on_unreachable = \"degrade\"\nwait_limit = \"1s\"\n".into();
    dep.configure(None);
    dep.start();
    write_some(&dep.a.source, "one", 20, 11);
    dep.a.wait_settled(now_ns(), Duration::from_secs(60));
    wait_replicated(&dep.a, &[&dep.b, &dep.c], Duration::from_secs(60));
    assert_eq!(follower_link(&dep.a, "zjk-b")["degraded"], false);

    dep.b.kill9();
    write_some(&dep.a.source, "two", 30, 12);
    wait_until(
        "the sync follower to be degraded",
        Duration::from_secs(30),
        || follower_link(&dep.a, "zjk-b")["degraded"] == true,
    );
    write_some(&dep.a.source, "three", 30, 13);
    dep.a.wait_settled(now_ns(), Duration::from_secs(60));
    let v = dep.a.status().unwrap();
    assert_eq!(
        v["source"]["commit_failures"].as_u64(),
        Some(0),
        "degrade never fails the writer: {v}"
    );
    assert_eq!(
        follower_link(&dep.a, "zjk-b")["degradations"].as_u64(),
        Some(1)
    );

    dep.b.start();
    wait_replicated(&dep.a, &[&dep.b, &dep.c], Duration::from_secs(60));
    wait_until("the alert to clear", Duration::from_secs(30), || {
        follower_link(&dep.a, "zjk-b")["degraded"] == false
    });
}

#[test]
fn a_follower_behind_the_retained_log_catches_up_by_state_transfer() {
    let mut dep = Deployment::new(None);
    // Small segments and a small cap, so the log soon moves past the remote.
    dep.primary_site = "log_segment_size = \"256KiB\"\nlog_retention_max = \"1MiB\"\n".into();
    dep.configure(None);
    dep.start();
    write_some(&dep.a.source, "early", 80, 14);
    dep.a.wait_settled(now_ns(), Duration::from_secs(60));
    wait_replicated(&dep.a, &[&dep.b, &dep.c], Duration::from_secs(60));
    assert!(dep.c.stop().success());

    // Meanwhile: new files, deleted and overwritten ones, far more log than the cap.
    std::fs::remove_dir_all(dep.a.source.join("early/2")).unwrap();
    write_some(&dep.a.source, "late", 400, 15);
    write_some(&dep.a.source, "early", 30, 16);
    dep.a.wait_settled(now_ns(), Duration::from_secs(60));
    let c_head = head_and_hashes_stopped(&dep.c);
    wait_until(
        "the cap to push the log past the remote",
        Duration::from_secs(30),
        || {
            let v = dep.a.status().unwrap();
            v["retention"]["first_seq"].as_u64().unwrap_or(0) > c_head + 1
        },
    );
    let v = dep.a.status().unwrap();
    assert!(
        v["retention"]["forced_transfers"].as_u64().unwrap() >= 1,
        "the alert is raised: {v}"
    );
    assert!(dep
        .a
        .log_text()
        .contains("forced the log past what this follower has"));

    dep.c.start();
    // While the transfer runs the remote is not ready: hold the primary
    // still (SIGSTOP) as soon as the transfer begins, and ask.
    wait_until("the transfer to begin", Duration::from_secs(60), || {
        dep.c.log_text().contains("receiving a state transfer")
    });
    let pid_a = dep.a.pid().unwrap() as i32;
    // SAFETY: signals to a daemon this test started.
    unsafe { libc::kill(pid_a, libc::SIGSTOP) };
    wait_until(
        "/readyz to report the transfer",
        Duration::from_secs(10),
        || {
            let (code, body) = http_get(dep.http[2], "/readyz");
            code == 503 && body.contains("catching up by state transfer from zjk-a")
        },
    );
    unsafe { libc::kill(pid_a, libc::SIGCONT) };
    wait_replicated(&dep.a, &[&dep.b, &dep.c], Duration::from_secs(90));
    wait_until("/readyz to be ready again", Duration::from_secs(10), || {
        http_get(dep.http[2], "/readyz").0 == 200
    });
    // It streams on after the transfer.
    write_some(&dep.a.source, "after", 20, 17);
    dep.a.wait_settled(now_ns(), Duration::from_secs(60));
    wait_replicated(&dep.a, &[&dep.b, &dep.c], Duration::from_secs(60));
    let r = dep.c.tmp.path().join("restored");
    let out = dep.c.restore(&r);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_tree(&dep.a.source, &r);
    assert!(dep.c.stop().success());
    check_state_invariants(&dep.c);
    // And it restarts cleanly from its new log base.
    dep.c.start();
    wait_replicated(&dep.a, &[&dep.b, &dep.c], Duration::from_secs(60));
}

/// The head seq a stopped site's last status recorded.
fn head_and_hashes_stopped(site: &Site) -> u64 {
    site.status().unwrap()["log"]["head_seq"].as_u64().unwrap()
}

#[test]
fn a_bandwidth_limit_paces_the_link() {
    let mut dep = Deployment::new(None);
    dep.remote_policy = "bandwidth = \"256KiB/s\"\n".into();
    dep.configure(None);
    dep.start();
    std::fs::write(dep.a.source.join("seed"), b"seed").unwrap();
    dep.a.wait_settled(now_ns(), Duration::from_secs(60));
    wait_replicated(&dep.a, &[&dep.b, &dep.c], Duration::from_secs(60));
    assert!(dep.c.stop().success());
    // 2.5 MiB of incompressible data for the remote to fetch.
    let mut rng = rand::rngs::StdRng::seed_from_u64(18);
    for i in 0..25 {
        write_file(
            &dep.a.source.join(format!("r{i}")),
            100 << 10,
            true,
            &mut rng,
        );
    }
    dep.a.wait_settled(now_ns(), Duration::from_secs(60));
    wait_replicated(&dep.a, &[&dep.b], Duration::from_secs(60));
    let started = std::time::Instant::now();
    dep.c.start();
    wait_replicated(&dep.a, &[&dep.b, &dep.c], Duration::from_secs(120));
    let took = started.elapsed();
    // 2.5 MiB at 256 KiB/s is 10 s; only the lower bound is asserted, so a
    // slow machine cannot fail it.
    assert!(
        took >= Duration::from_secs(6),
        "caught up in {took:?}: the limit was not applied"
    );
}
