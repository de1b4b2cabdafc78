//! End-to-end ingest benchmark: a tree of mixed file sizes (1 GiB by
//! default) from daemon start to fully durable in the log and state, beside
//! `cp -a` of the same tree on the same disk. Prints MB/s, files/s, the
//! ratio to `cp -a`, the daemon's peak RSS and the bytes it wrote.
//!
//! Run: `cargo run -p triad-tests --bin bench-ingest -- [--mib 1024] [--dir DIR]`

use std::process::Command;
use std::time::{Duration, Instant};

use triad_tests::{arg, bench_dir, drop_caches, du, make_tree, OneSite};

fn proc_field(pid: u32, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let mib: u64 = arg("--mib").and_then(|s| s.parse().ok()).unwrap_or(1024);
    let (base, src) = bench_dir("ingest");
    eprintln!("writing a {mib} MiB mixed tree under {}", src.display());
    let (bytes, files) = make_tree(&src, mib << 20);
    let mb = bytes as f64 / 1e6;

    drop_caches();
    let t = Instant::now();
    let st = Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(base.join("cp-copy"))
        .status()
        .expect("cp");
    assert!(st.success());
    let cp_secs = t.elapsed().as_secs_f64();
    let _ = Command::new("sync").status();
    let cp_sync_secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(base.join("cp-copy"));

    let one = OneSite::new(&base, &src, "");
    let site = one.data.clone();
    drop_caches();
    let t = Instant::now();
    let mut child = one.spawn();
    let status = site.join("datasets/files/status.json");
    let mut peak_rss_kib = 0;
    loop {
        peak_rss_kib = peak_rss_kib.max(proc_field(child.id(), "status", "VmHWM:"));
        if let Some(v) = std::fs::read(&status)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        {
            if v["source"]["settled"].as_bool() == Some(true) {
                break;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(3600),
            "ingest did not finish"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let ingest_secs = t.elapsed().as_secs_f64();
    peak_rss_kib = peak_rss_kib.max(proc_field(child.id(), "status", "VmHWM:"));
    let written = proc_field(child.id(), "io", "write_bytes:");
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let _ = child.wait();
    let log_bytes = du(&site.join("datasets/files/log"));
    let state_bytes = du(&site.join("datasets/files/state"));

    println!("bench-ingest: {files} files, {mb:.0} MB source");
    println!(
        "  cp -a            {cp_secs:7.2} s  {:7.1} MB/s",
        mb / cp_secs
    );
    println!(
        "  cp -a + sync     {cp_sync_secs:7.2} s  {:7.1} MB/s",
        mb / cp_sync_secs
    );
    println!(
        "  triad ingest     {ingest_secs:7.2} s  {:7.1} MB/s  {:8.0} files/s  (durable in log and state)",
        mb / ingest_secs,
        files as f64 / ingest_secs
    );
    println!(
        "  ratio triad / cp -a + sync throughput: {:.2}",
        cp_sync_secs / ingest_secs
    );
    println!("  daemon peak RSS {:.0} MiB", peak_rss_kib as f64 / 1024.0);
    println!(
        "  daemon wrote {:.0} MB to disk during ingest ({:.2}x the source); log {:.0} MB, state {:.0} MB at rest",
        written as f64 / 1e6,
        written as f64 / bytes as f64,
        log_bytes as f64 / 1e6,
        state_bytes as f64 / 1e6
    );
    if arg("--keep").is_none() {
        let _ = std::fs::remove_dir_all(&base);
    }
}
