//! Takeover RTO, measured from outside: three sites in a `[takeover]`
//! group hold a directory dataset (1 GiB in 20,000 files by default); the
//! followers keep it as hot standby trees. Then, side by side on the same
//! data:
//! - **restore-based recovery**: `triad restore` of the whole dataset from
//!   the same-city site's own copy into an empty directory (what recovery
//!   took before takeover existed);
//! - **planned switchover**: `triad promote` at the same-city site while the
//!   primary runs, until that site takes writes;
//! - **failover**: SIGKILL of the (new) primary, then `triad promote` at a
//!   surviving sync follower, repeated until it is allowed, from the kill
//!   until that site takes writes. Its floor is `fence_after` + 2 s, the time
//!   the old primary's lease may still run.
//!
//! After each takeover a file written into the new primary's tree must show
//! up in the remaining follower's standby tree. Peak RSS of the promoted
//! daemon is reported.
//!
//! Run: `cargo run -p triad-tests --bin bench-takeover -- [--files
//! 20000] [--bytes 1073741824] [--fence-after 2s] [--dir DIR]`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};
use triad_tests::{arg, bench_dir, peak_rss_of, start_sites_with, triad_bin};

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn status(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// `files` files of random sizes averaging `bytes / files`, in 100
/// directories.
fn make_tree(root: &Path, files: u64, bytes: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let avg = (bytes / files.max(1)) as usize;
    for i in 0..files {
        let dir = root.join(format!("d{:02}", i % 100));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let mut data = vec![0u8; rng.gen_range(0..=avg * 2)];
        rng.fill_bytes(&mut data);
        std::fs::write(dir.join(format!("f{i}")), &data).expect("write");
    }
}

fn promote(config: &Path) -> (bool, serde_json::Value) {
    let o = Command::new(triad_bin())
        .args(["promote", "--json", "--config"])
        .arg(config)
        .output()
        .expect("triad promote");
    let v = serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null);
    (o.status.success(), v)
}

fn main() {
    let files: u64 = arg("--files").map_or(20_000, |v| v.parse().expect("--files"));
    let bytes: u64 = arg("--bytes").map_or(1 << 30, |v| v.parse().expect("--bytes"));
    let fence_after = arg("--fence-after").unwrap_or_else(|| "2s".into());
    let (base, _) = bench_dir("takeover");
    let tree = |site: &str| base.join(site).join("tree");
    let section = |site: &str| {
        format!(
            "source = {{ kind = \"directory\", path = \"{}\", debounce = \"50ms\" }}\n\n[takeover]\nfence_after = \"{fence_after}\"\n",
            tree(site).display()
        )
    };
    for s in ["a", "b", "c"] {
        std::fs::create_dir_all(tree(s)).expect("tree dir");
    }
    println!("writing {files} files, {bytes} bytes into the primary's tree");
    make_tree(&tree("a"), files, bytes);
    // a and b are each other's sync follower when primary; c is async.
    let sites = start_sites_with(
        &base,
        &section("a"),
        &|dir: &Path| {
            let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("b");
            section(name)
        },
        &|i, j| match (i, j) {
            (0, 1) | (1, 0) => Some("sync"),
            (0, 2) => Some("async"),
            // Not (1, 2): a follower's mode on a peer in epoch 1 means that
            // peer cascades from it. Promoted, b serves c async anyway.
            _ => None,
        },
    );
    let [sa, sb, sc] = [0, 1, 2].map(|i| sites.statuses[i].clone());
    let primary_ready = |s: &PathBuf| {
        status(s).is_some_and(|v| {
            v["takeover"]["seat"] == "primary"
                && v["takeover"]["fenced"] == false
                && v["source"]["settled"] == true
        })
    };
    wait_for(
        "the primary to take in its tree",
        Duration::from_secs(1800),
        || primary_ready(&sa),
    );
    let head = || status(&sa).and_then(|v| v["log"]["head_seq"].as_u64());
    let ready = |s: &PathBuf, head: u64| {
        status(s).is_some_and(|v| {
            v["log"]["head_seq"].as_u64() == Some(head)
                && v["standby"]["ready"] == true
                && v["standby"]["lag_records"] == 0
        })
    };
    let h = head().expect("head");
    wait_for("both standby trees", Duration::from_secs(1800), || {
        ready(&sb, h) && ready(&sc, h)
    });
    println!("dataset replicated at seq {h}; both standby trees current");

    // Restore-based recovery from the same-city site's own copy.
    let target = base.join("restored");
    let started = Instant::now();
    let o = Command::new(triad_bin())
        .args(["restore", "--dataset", "files", "--to"])
        .arg(&target)
        .arg("--config")
        .arg(&sites.configs[1])
        .output()
        .expect("restore");
    let restore_s = started.elapsed().as_secs_f64();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Planned switchover to b.
    let (ok, rep) = promote(&sites.configs[1]);
    assert!(ok, "switchover: {rep}");
    let switchover_s = rep["rto_seconds"].as_f64().unwrap_or(f64::NAN);
    let check_serving = |new_tree: &Path, follower_tree: &Path, name: &str| {
        std::fs::write(new_tree.join(name), b"written after the takeover").expect("write");
        let started = Instant::now();
        wait_for(
            "a write at the new primary at the follower",
            Duration::from_secs(60),
            || follower_tree.join(name).exists(),
        );
        started.elapsed().as_secs_f64()
    };
    let reach_c = check_serving(&tree("b"), &tree("c"), "after-switchover");

    // Failover: b is killed; a (its sync follower once it follows b) takes over.
    let [_, b_pid, _] = [0, 1, 2].map(|i| sites.children[i].id());
    let rss_b = peak_rss_of(b_pid);
    wait_for("zjk-a to follow b", Duration::from_secs(60), || {
        status(&sa).is_some_and(|v| v["takeover"]["primary"] == "b")
    });
    let mut children = sites.children;
    children[1].kill().expect("kill b");
    let _ = children[1].wait();
    let killed = Instant::now();
    let mut failover = None;
    while killed.elapsed() < Duration::from_secs(120) {
        let (ok, rep) = promote(&sites.configs[0]);
        if ok {
            failover = Some(rep);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let failover_s = killed.elapsed().as_secs_f64();
    let rep = failover.expect("the failover was never allowed");
    let reach_c2 = check_serving(&tree("a"), &tree("c"), "after-failover");

    println!();
    println!("| {files} files, {bytes} bytes | seconds |");
    println!("|---|---|");
    println!("| restore-based recovery (triad restore from the same-city copy) | {restore_s:.2} |");
    println!("| planned switchover (promote until the site takes writes) | {switchover_s:.2} |");
    println!(
        "| failover (SIGKILL of the primary until the survivor takes writes; fence_after {fence_after}) | {failover_s:.2} |"
    );
    println!(
        "| of which the promotion itself (last `triad promote`) | {:.2} |",
        rep["rto_seconds"].as_f64().unwrap_or(f64::NAN)
    );
    println!("| a write at the new primary seen in the remote's standby tree (switchover / failover) | {reach_c:.2} / {reach_c2:.2} |");
    println!("| peak RSS of the promoted daemon (b) | {rss_b:.0} MiB |");
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}
