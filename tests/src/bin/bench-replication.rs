//! End-to-end replication benchmark: three daemons on this machine (primary,
//! sync same-city follower, async remote follower). A mixed tree (1 GiB by
//! default) is written into the primary's watched directory while they run;
//! the primary's view of each follower's lag is sampled every 100 ms.
//! Prints the ingest rate with replication on, lag percentiles per follower
//! during the load, and how long the followers took to match the primary
//! once it had logged everything.
//!
//! Run: `cargo run -p triad-tests --bin bench-replication -- [--mib 1024] [--dir DIR]`

use std::time::{Duration, Instant};

use triad_tests::{arg, bench_dir, make_tree, start_three_sites, status};

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let mib: u64 = arg("--mib").and_then(|s| s.parse().ok()).unwrap_or(1024);
    let (base, src) = bench_dir("repl");
    let source = format!(
        "source = {{ kind = \"directory\", path = \"{}\" }}\n",
        src.display()
    );
    let sites = start_three_sites(&base, &source);
    let (children, statuses) = (sites.children, sites.statuses);
    eprintln!("writing a {mib} MiB mixed tree into the primary's watched directory");
    let t0 = Instant::now();
    let writer = {
        let src = src.clone();
        std::thread::spawn(move || make_tree(&src, mib << 20))
    };
    let mut lag: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut lag_rec: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut writer = Some(writer);
    let mut written = (0u64, 0u64);
    let mut primary_done: Option<Instant> = None;
    let all_done = loop {
        std::thread::sleep(Duration::from_millis(100));
        if writer.as_ref().is_some_and(|w| w.is_finished()) {
            written = writer.take().expect("writer").join().expect("tree");
        }
        let Some(a) = status(&statuses[0]) else {
            continue;
        };
        for f in a["replication"]["followers"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let i = if f["site"] == "b" { 0 } else { 1 };
            if primary_done.is_none() {
                lag[i].push(f["lag_seconds"].as_f64().unwrap_or(0.0));
                lag_rec[i].push(f["lag_records"].as_f64().unwrap_or(0.0));
            }
        }
        if writer.is_none() && primary_done.is_none() && a["source"]["settled"] == true {
            primary_done = Some(Instant::now());
        }
        if let Some(done) = primary_done {
            let head = &a["log"]["head_seq"];
            let same = statuses[1..].iter().all(|s| {
                status(s).is_some_and(|v| {
                    v["log"]["head_seq"] == *head
                        && v["log"]["chain_hash"] == a["log"]["chain_hash"]
                })
            });
            if same {
                break done.elapsed();
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(3600), "did not finish");
    };
    let total = t0.elapsed().as_secs_f64();
    for mut c in children {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let _ = c.wait();
    }
    let (bytes, files) = written;
    println!("bench-replication: {files} files, {:.0} MB written into the primary's directory while three sites ran", bytes as f64 / 1e6);
    println!("  primary logged everything and both followers matched it after {total:.2} s ({:.1} MB/s end to end)", bytes as f64 / 1e6 / total);
    for (i, name) in ["same-city (sync)", "remote (async)"].iter().enumerate() {
        let n = lag[i].len();
        println!(
            "  {name:17} lag during the load ({n} samples): median {:.3} s, p99 {:.3} s, max {:.3} s; records median {:.0}, max {:.0}",
            percentile(&mut lag[i], 0.5),
            percentile(&mut lag[i], 0.99),
            percentile(&mut lag[i], 1.0),
            percentile(&mut lag_rec[i], 0.5),
            percentile(&mut lag_rec[i], 1.0),
        );
    }
    println!(
        "  followers matched the primary {:.3} s after the primary had settled",
        all_done.as_secs_f64()
    );
    if arg("--keep").is_none() {
        let _ = std::fs::remove_dir_all(&base);
    }
}
