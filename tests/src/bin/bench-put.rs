//! `triad put` throughput for database WAL segments: three daemons on this
//! machine (a pushed dataset at the primary, a sync same-city follower, an
//! async remote), and one `triad put` process per 16 MiB segment, one after
//! another, as PostgreSQL's archive_command runs them. Each put returns only
//! once the same-city site has the segment. Compared with what a plain
//! `cp` archive_command costs: `cp` plus `sync` of the file.
//!
//! Run: `cargo run -p triad-tests --bin bench-put -- [--segments 64] [--dir DIR]`

use std::process::Command;
use std::time::Instant;

use rand::{RngCore, SeedableRng};
use triad_tests::{arg, bench_dir, median, start_three_sites, triad_bin};

const SEGMENT: usize = 16 << 20;

fn main() {
    let n: usize = arg("--segments").and_then(|s| s.parse().ok()).unwrap_or(64);
    let (base, _) = bench_dir("put");
    let wal = base.join("wal");
    let copies = base.join("cp-archive");
    std::fs::create_dir_all(&wal).expect("bench dir");
    std::fs::create_dir_all(&copies).expect("bench dir");
    // WAL-like segments: half random, half zero-filled (a segment switched
    // early is padded with zeros; records themselves compress only a little).
    let mut rng = rand::rngs::StdRng::seed_from_u64(16);
    let names: Vec<String> = (1..=n)
        .map(|i| format!("0000000100000000{i:08X}"))
        .collect();
    for name in &names {
        let mut seg = vec![0u8; SEGMENT];
        rng.fill_bytes(&mut seg[..SEGMENT / 2]);
        std::fs::write(wal.join(name), seg).expect("segment");
    }
    let sites = start_three_sites(&base, "source = { kind = \"pushed\" }\n");
    let triad = triad_bin();

    let mut put_s = Vec::new();
    let t0 = Instant::now();
    for name in &names {
        let t = Instant::now();
        let out = Command::new(&triad)
            .args(["put", "--dataset", "files", "--config"])
            .arg(&sites.configs[0])
            .arg(wal.join(name))
            .arg(name)
            .output()
            .expect("triad put");
        assert!(
            out.status.success(),
            "put {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        put_s.push(t.elapsed().as_secs_f64());
    }
    let triad_total = t0.elapsed().as_secs_f64();

    let mut cp_s = Vec::new();
    let t0 = Instant::now();
    for name in &names {
        let t = Instant::now();
        let dest = copies.join(name);
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "test ! -f {d} && cp {s} {d} && sync {d}",
                s = wal.join(name).display(),
                d = dest.display()
            ))
            .status()
            .expect("cp");
        assert!(ok.success());
        cp_s.push(t.elapsed().as_secs_f64());
    }
    let cp_total = t0.elapsed().as_secs_f64();

    for mut c in sites.children {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let _ = c.wait();
    }
    let mb = (n * SEGMENT) as f64 / 1e6;
    println!("bench-put: {n} segments of 16 MiB, one put process each, one after another");
    println!(
        "  triad put (sync to the same-city site): {:.2} segments/s, {:.1} MB/s; per segment median {:.3} s, max {:.3} s",
        n as f64 / triad_total,
        mb / triad_total,
        median(put_s.clone()),
        put_s.iter().cloned().fold(0.0, f64::max)
    );
    println!(
        "  cp + sync to a local directory:          {:.2} segments/s, {:.1} MB/s; per segment median {:.3} s",
        n as f64 / cp_total,
        mb / cp_total,
        median(cp_s)
    );
    println!(
        "  ratio (triad put / cp + sync throughput): {:.2}",
        cp_total / triad_total
    );
    if arg("--keep").is_none() {
        let _ = std::fs::remove_dir_all(&base);
    }
}
