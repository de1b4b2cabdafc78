//! Scrub throughput: a mixed tree (1 GiB by default) is ingested and
//! archived into s3s-fs, the daemon stopped, caches dropped, then
//! `triad verify --scrub --max-rate 0` (the site's RocksDB store) and
//! `triad verify --archive --read-data` (the object store) are timed.
//! Prints MB/s of sealed bytes checked, median of `--runs` runs.
//!
//! Run: `cargo run -p triad-tests --bin bench-scrub -- [--mib 1024] [--runs 3] [--dir DIR]`

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use triad_tests::s3::S3Server;
use triad_tests::{
    arg, bench_dir, drop_caches, files_status, make_tree, median, s3_archive_section, triad_bin,
    OneSite,
};

fn verify(cfg: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(triad_bin())
        .args(["verify", "--dataset", "files", "--json", "--config"])
        .arg(cfg)
        .args(args)
        .output()
        .expect("triad verify");
    assert!(
        out.status.success(),
        "verify failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

fn main() {
    let mib: u64 = arg("--mib").and_then(|s| s.parse().ok()).unwrap_or(1024);
    let runs: usize = arg("--runs").and_then(|s| s.parse().ok()).unwrap_or(3);
    let (base, src) = bench_dir("scrub");
    eprintln!("writing a {mib} MiB mixed tree under {}", src.display());
    let (bytes, files) = make_tree(&src, mib << 20);
    let s3 = S3Server::start("bench");
    let one = OneSite::new(
        &base,
        &src,
        &s3_archive_section(&s3, &base, "log_flush_interval = \"1s\"\n"),
    );
    let (site, cfg) = (one.data.clone(), one.config.clone());
    let mut child = one.spawn();
    let t = Instant::now();
    loop {
        let v = files_status(&site).unwrap_or_default();
        let head = v["log"]["head_seq"].as_u64().unwrap_or(0);
        if v["source"]["settled"].as_bool() == Some(true)
            && head > 0
            && v["archive"]["shipped_seq"].as_u64().unwrap_or(0) >= head
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(3600),
            "ingest did not finish"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let _ = child.wait();

    let (mut local, mut remote) = (Vec::new(), Vec::new());
    let (mut local_bytes, mut remote_bytes) = (0, 0);
    for _ in 0..runs {
        drop_caches();
        let v = verify(&cfg, &["--scrub", "--max-rate", "0"]);
        local.push(v["mb_per_s"].as_f64().unwrap_or(0.0));
        local_bytes = v["bytes"].as_u64().unwrap_or(0);
        drop_caches();
        let v = verify(&cfg, &["--archive", "--read-data"]);
        remote.push(v["mb_per_s"].as_f64().unwrap_or(0.0));
        remote_bytes = v["bytes_read"].as_u64().unwrap_or(0);
    }
    println!(
        "bench-scrub: {files} files, {:.0} MB source, median of {runs}",
        bytes as f64 / 1e6
    );
    println!(
        "  local store (RocksDB)   {:7.1} MB/s of {:.0} MB sealed (hash, SM4-GCM tag, id)",
        median(local),
        local_bytes as f64 / 1e6
    );
    println!(
        "  archive (s3s-fs, HTTP)  {:7.1} MB/s of {:.0} MB sealed (download, hash, tag, id)",
        median(remote),
        remote_bytes as f64 / 1e6
    );
    let _ = std::fs::remove_dir_all(&base);
}
