//! Hot standby trees at both followers, with real daemons over mutual TLS:
//! each follower keeps the dataset as live files equal to the primary's
//! tree, through renames, deletes and kind changes, and comes back to
//! exactly the dataset after a SIGKILL and damage done to its tree while
//! it was down.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::deploy::*;
use common::*;
use rand::SeedableRng;

fn write_some(root: &Path, tag: &str, n: usize, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for i in 0..n {
        let d = root.join(format!("{tag}/{}", i % 5));
        std::fs::create_dir_all(&d).unwrap();
        let len = if i % 40 == 0 {
            2 << 20
        } else {
            (i * 997) % 30_000
        };
        write_file(&d.join(format!("f{i}")), len, i % 2 == 0, &mut rng);
    }
}

/// Waits until the follower's standby tree has every record the follower
/// holds and is ready, then returns its status part.
fn wait_standby_current(site: &Site, head: u64) -> serde_json::Value {
    until(
        "the standby tree to catch up",
        Duration::from_secs(60),
        || {
            let v = site.status()?;
            let s = v["standby"].clone();
            (s["ready"] == true && s["seq"].as_u64() == Some(head) && s["lag_records"] == 0)
                .then_some(s)
        },
    )
}

#[test]
fn standby_trees_equal_the_primary_tree_and_come_back_after_a_kill() {
    let mut dep = Deployment::new(None);
    dep.standby = true;
    dep.configure(None);
    write_some(&dep.a.source, "before", 60, 1);
    std::os::unix::fs::symlink("before/0/f0", dep.a.source.join("link")).unwrap();
    dep.start();
    dep.a.wait_settled(now_ns(), Duration::from_secs(60));

    // Live changes: new files, a directory renamed, a subtree deleted, a
    // file turned into a directory.
    write_some(&dep.a.source, "live", 80, 2);
    std::fs::rename(dep.a.source.join("before/1"), dep.a.source.join("moved")).unwrap();
    std::fs::remove_dir_all(dep.a.source.join("before/2")).unwrap();
    std::fs::remove_file(dep.a.source.join("live/3/f3")).unwrap();
    std::fs::create_dir(dep.a.source.join("live/3/f3")).unwrap();
    std::fs::write(dep.a.source.join("live/3/f3/inner"), b"was a file").unwrap();
    dep.a.wait_settled(now_ns(), Duration::from_secs(60));
    let (head, _, _) = wait_replicated(&dep.a, &[&dep.b, &dep.c], Duration::from_secs(60));
    for site in [&dep.b, &dep.c] {
        let s = wait_standby_current(site, head);
        assert!(s["last_error"].is_null(), "{s}");
        assert_same_tree(&dep.a.source, &standby_dir(site));
    }
    // Status and metrics name the tree and its lag.
    let text = String::from_utf8_lossy(&dep.b.cli(&["status"]).stdout).to_string();
    assert!(
        text.contains(&format!(
            "standby tree {}: ready",
            standby_dir(&dep.b).display()
        )),
        "{text}"
    );
    let (code, metrics) = http_get(dep.http[1], "/metrics");
    assert_eq!(code, 200);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("triad_standby_lag_seconds{")
                && l.contains("dataset=\"files\"")
                && l.ends_with(" 0")),
        "{metrics}"
    );

    // The same-city site is killed; the primary moves on; someone writes
    // into its tree while it is down. It comes back to exactly the dataset.
    dep.b.kill9();
    write_some(&dep.a.source, "while-down", 40, 3);
    std::fs::rename(dep.a.source.join("live/0"), dep.a.source.join("live/zero")).unwrap();
    std::fs::write(
        dep.a.source.join("before/0/f5"),
        b"changed while b was down",
    )
    .unwrap();
    let tree = standby_dir(&dep.b);
    std::fs::write(tree.join("stray"), b"not in the dataset").unwrap();
    std::fs::remove_dir_all(tree.join("moved")).unwrap();
    dep.a.wait_settled(now_ns(), Duration::from_secs(60));
    dep.b.start();
    let (head, _, _) = wait_replicated(&dep.a, &[&dep.b, &dep.c], Duration::from_secs(90));
    for site in [&dep.b, &dep.c] {
        wait_standby_current(site, head);
        assert_same_tree(&dep.a.source, &standby_dir(site));
    }
    assert!(!tree.join("stray").exists());
}

#[test]
fn a_standby_path_with_files_triad_did_not_make_stops_the_start_and_keeps_them() {
    let mut dep = Deployment::new(None);
    dep.standby = true;
    dep.configure(None);
    let tree = standby_dir(&dep.b);
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("precious"), b"operator data").unwrap();
    dep.b.start();
    let status = dep.b.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    let log = dep.b.log_text();
    assert!(
        log.contains("standby_path") && log.contains("triad did not make it"),
        "{log}"
    );
    assert_eq!(
        std::fs::read(tree.join("precious")).unwrap(),
        b"operator data"
    );
}
