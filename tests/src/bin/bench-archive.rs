//! Archive benchmark beside restic, on the same data and the same S3 server
//! (s3s-fs on loopback): a mixed tree (1 GiB by default), a full snapshot,
//! an incremental one after changing 1% of the files, a restore of the
//! latest, and the bytes each leaves in the bucket. Prints seconds, MB/s and
//! triad/restic ratios; with `--runs N` the restores run N times and the
//! median is shown.
//!
//! triad seals chunks while it ingests (the daemon's normal work, timed
//! separately); a snapshot then uploads what the store lacks. restic reads,
//! chunks, compresses and encrypts during `backup`. Both figures are shown:
//! the snapshot alone, and ingest plus snapshot.
//!
//! Run: `cargo run -p triad-tests --bin bench-archive -- [--mib 1024] [--runs 3] [--dir DIR]`
//! Needs `restic` (Debian package) and s3s-fs (installed by `./dev.sh test`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};
use triad_tests::s3::{S3Server, ACCESS_KEY, SECRET_KEY};
use triad_tests::{
    arg, bench_dir, drop_caches, du, files_status, make_tree, median, s3_archive_section,
    triad_bin, OneSite,
};

fn run(cmd: &mut Command, what: &str) -> f64 {
    let t = Instant::now();
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if what == "triad restore" {
        // Its phase times.
        eprint!("{}", String::from_utf8_lossy(&out.stdout));
    }
    t.elapsed().as_secs_f64()
}

fn wait_settled(site: &Path, after: Instant, started: Instant) {
    let after_ns = {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as i64;
        now - after.elapsed().as_nanos() as i64
    };
    loop {
        if let Some(v) = files_status(site) {
            let s = &v["source"];
            if s["settled"].as_bool() == Some(true)
                && s["last_round_end_ns"].as_i64().unwrap_or(0) > after_ns
            {
                return;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(3600),
            "the daemon did not settle"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Rewrites the first 64 KiB of 1% of the files (at least one).
fn change_one_percent(src: &Path) -> usize {
    let mut files: Vec<PathBuf> = walkdir::WalkDir::new(src)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .collect();
    files.sort();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let n = (files.len() / 100).max(1);
    for _ in 0..n {
        let f = &files[rng.gen_range(0..files.len())];
        let mut data = std::fs::read(f).expect("read");
        let len = data.len().min(64 << 10);
        rng.fill_bytes(&mut data[..len]);
        data.extend_from_slice(b"changed");
        std::fs::write(f, data).expect("write");
    }
    n
}

fn main() {
    let mib: u64 = arg("--mib").and_then(|s| s.parse().ok()).unwrap_or(1024);
    let runs: usize = arg("--runs").and_then(|s| s.parse().ok()).unwrap_or(3);
    let (base, src) = bench_dir("archive");
    if Command::new("restic").arg("version").output().is_err() {
        panic!("restic is not installed: apt-get install restic");
    }
    eprintln!("writing a {mib} MiB mixed tree under {}", src.display());
    let (bytes, files) = make_tree(&src, mib << 20);
    let mb = bytes as f64 / 1e6;
    let s3 = S3Server::start("bench");

    // triad: a primary archiving into s3://bench/triad.
    let one = OneSite::new(&base, &src, &s3_archive_section(&s3, &base, ""));
    let (site, cfg) = (one.data.clone(), one.config.clone());
    drop_caches();
    let started = Instant::now();
    let mut child = one.spawn();
    wait_settled(&site, started, started);
    let ingest = started.elapsed().as_secs_f64();
    let snapshot = |what: &str| {
        run(
            Command::new(triad_bin())
                .args(["snapshot", "--dataset", "files", "--config"])
                .arg(&cfg),
            what,
        )
    };
    let triad_full = snapshot("triad full snapshot");

    // restic: the same tree into s3://bench/restic on the same server.
    let repo = format!("s3:{}/bench/restic", s3.endpoint());
    let restic = |args: &[&str]| {
        let mut c = Command::new("restic");
        c.args(["-r", &repo])
            .args(args)
            .env("RESTIC_PASSWORD", "bench-password")
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
        c
    };
    run(&mut restic(&["init"]), "restic init");
    drop_caches();
    let restic_full = run(
        restic(&["backup", "--quiet"]).arg(&src),
        "restic full backup",
    );

    let changed = change_one_percent(&src);
    let t = Instant::now();
    wait_settled(&site, t, started);
    let triad_incr_ingest = t.elapsed().as_secs_f64();
    let triad_incr = snapshot("triad incremental snapshot");
    drop_caches();
    let restic_incr = run(
        restic(&["backup", "--quiet"]).arg(&src),
        "restic incremental backup",
    );
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let _ = child.wait();

    let mut triad_restore = Vec::new();
    let mut restic_restore = Vec::new();
    for i in 0..runs {
        let to = base.join(format!("triad-restore-{i}"));
        drop_caches();
        triad_restore.push(run(
            Command::new(triad_bin())
                .args([
                    "restore",
                    "--from-archive",
                    "s3://bench/triad",
                    "--dataset",
                    "files",
                ])
                .args(["--at", "latest", "--config"])
                .arg(&cfg)
                .arg("--to")
                .arg(&to),
            "triad restore",
        ));
        let _ = std::fs::remove_dir_all(&to);
        let to = base.join(format!("restic-restore-{i}"));
        drop_caches();
        restic_restore.push(run(
            restic(&["restore", "latest", "--quiet", "--target"]).arg(&to),
            "restic restore",
        ));
        let _ = std::fs::remove_dir_all(&to);
    }
    let triad_bytes = du(&s3.root.join("bench/triad"));
    let restic_bytes = du(&s3.root.join("bench/restic"));
    let (tr, rr) = (median(triad_restore), median(restic_restore));

    println!("bench-archive: {files} files, {mb:.0} MB source, {changed} files changed (1%), same s3s-fs server");
    println!("                               triad        restic   triad/restic");
    let row = |name: &str, a: f64, b: f64| {
        println!("  {name:<26} {a:8.2} s   {b:8.2} s   {:6.2}", a / b);
    };
    row("full snapshot", triad_full, restic_full);
    row("  ingest + full snapshot", ingest + triad_full, restic_full);
    row("incremental snapshot", triad_incr, restic_incr);
    row(
        "  ingest + incremental",
        triad_incr_ingest + triad_incr,
        restic_incr,
    );
    row(&format!("restore latest (median {runs})"), tr, rr);
    println!(
        "  bytes stored               {:8.1} MB  {:8.1} MB  {:6.2}",
        triad_bytes as f64 / 1e6,
        restic_bytes as f64 / 1e6,
        triad_bytes as f64 / restic_bytes as f64
    );
    println!(
        "  triad ingest {ingest:.2} s ({:.1} MB/s); restore {:.1} MB/s vs restic {:.1} MB/s",
        mb / ingest,
        mb / tr,
        mb / rr
    );
    let _ = std::fs::remove_dir_all(&base);
}
