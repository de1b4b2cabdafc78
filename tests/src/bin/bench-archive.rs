//! Archive benchmark beside restic, on the same data and the same S3 server
//! (s3s-fs on loopback, behind a proxy that counts requests): a mixed tree
//! (1 GiB by default) or `--small-files N` files of 0-2 KiB, a full
//! snapshot, an incremental one after changing 1% of the files, a restore
//! of the latest, a point-in-time restore at a point only the log reaches
//! and a `--delta` restore of the full snapshot's tree to the latest point
//! (triad), the bytes each leaves in the bucket, S3 requests per GiB and
//! peak RSS. Prints seconds, MB/s and triad/restic ratios; with `--runs N`
//! the restores run N times and the median is shown.
//!
//! triad seals chunks while it ingests (the daemon's normal work, timed
//! separately); a snapshot then uploads what the store lacks. restic reads,
//! chunks, compresses and encrypts during `backup`. Both figures are shown:
//! the snapshot alone, and ingest plus snapshot.
//!
//! Run: `bench-archive [--mib 1024 | --small-files 200000] [--runs 3] [--dir DIR]`
//! (after `cargo build --workspace --all-targets`, from the target dir).
//! Needs `restic` (Debian package) and s3s-fs (installed by `./dev.sh test`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use rand::{Rng, RngCore, SeedableRng};
use triad_tests::s3::{CountingProxy, S3Server};
use triad_tests::{
    arg, bench_dir, drop_caches, du, files_status, make_small_tree, make_tree, median, peak_rss_of,
    run_timed as run, triad_bin, wait_settled, OneSite,
};

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
    let small: Option<u64> = arg("--small-files").and_then(|s| s.parse().ok());
    let runs: usize = arg("--runs").and_then(|s| s.parse().ok()).unwrap_or(3);
    let (base, src) = bench_dir("archive");
    if Command::new("restic").arg("version").output().is_err() {
        panic!("restic is not installed: apt-get install restic");
    }
    let (bytes, files) = match small {
        Some(n) => {
            eprintln!("writing {n} files of 0-2 KiB under {}", src.display());
            make_small_tree(&src, n)
        }
        None => {
            eprintln!("writing a {mib} MiB mixed tree under {}", src.display());
            make_tree(&src, mib << 20)
        }
    };
    let mb = bytes as f64 / 1e6;
    let s3 = S3Server::start("bench");
    // Both tools talk to the server through one proxy that counts requests.
    let proxy = CountingProxy::start(s3.port);
    let requests = || proxy.total();

    // triad: a primary archiving into s3://bench/triad.
    let section = format!(
        "\n[archive]\nurl = \"s3://bench/triad\"\nendpoint = \"{}\"\ncredentials_file = \"{}\"\n",
        proxy.endpoint(),
        s3.credentials_file(&base).display()
    );
    let one = OneSite::new(&base, &src, &section);
    let (site, cfg) = (one.data.clone(), one.config.clone());
    drop_caches();
    let r0 = requests();
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
        .0
    };
    let triad_full = snapshot("triad full snapshot");
    let full_seq = head_seq(&site);
    let triad_full_req = requests() - r0;

    // restic: the same tree into s3://bench/restic on the same server.
    let repo = format!("s3:{}/bench/restic", proxy.endpoint());
    let restic = |args: &[&str]| triad_tests::restic(&repo, args);
    run(&mut restic(&["init"]), "restic init");
    drop_caches();
    let r0 = requests();
    let (restic_full, restic_full_rss) = run(
        restic(&["backup", "--quiet"]).arg(&src),
        "restic full backup",
    );
    let restic_full_req = requests() - r0;

    let changed = change_one_percent(&src);
    let r0 = requests();
    let t = Instant::now();
    wait_settled(&site, t, started);
    let triad_incr_ingest = t.elapsed().as_secs_f64();
    let triad_incr = snapshot("triad incremental snapshot");
    let triad_incr_req = requests() - r0;
    let incr_seq = head_seq(&site);
    let daemon_rss = peak_rss_of(child.id());
    drop_caches();
    let r0 = requests();
    let (restic_incr, _) = run(
        restic(&["backup", "--quiet"]).arg(&src),
        "restic incremental backup",
    );
    let restic_incr_req = requests() - r0;
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let _ = child.wait();

    let triad_restore_with = |at: &str, to: &Path, extra: &[&str]| {
        run(
            Command::new(triad_bin())
                .args([
                    "restore",
                    "--from-archive",
                    "s3://bench/triad",
                    "--dataset",
                    "files",
                ])
                .args(["--at", at, "--config"])
                .arg(&cfg)
                .arg("--to")
                .arg(to)
                .args(extra),
            &format!("triad restore --at {at} {}", extra.join(" ")),
        )
    };
    let triad_restore = |at: &str, to: &Path| triad_restore_with(at, to, &[]);
    // A point only the log reaches: after the full snapshot, before the
    // incremental one.
    let pitr_seq = incr_seq - 1;
    assert!(
        pitr_seq > full_seq,
        "no log-only point: snapshots at {full_seq} and {incr_seq}"
    );
    let (mut tr, mut rr, mut pr) = (Vec::new(), Vec::new(), Vec::new());
    let (mut tr_rss, mut rr_rss, mut pr_rss) = (0.0f64, 0.0f64, 0.0f64);
    let (mut tr_req, mut rr_req) = (0, 0);
    for i in 0..runs {
        let to = base.join(format!("triad-restore-{i}"));
        drop_caches();
        let r0 = requests();
        let (s, m) = triad_restore("latest", &to);
        tr_req = requests() - r0;
        tr.push(s);
        tr_rss = tr_rss.max(m);
        let _ = std::fs::remove_dir_all(&to);
        let to = base.join(format!("triad-pitr-{i}"));
        drop_caches();
        let (s, m) = triad_restore(&pitr_seq.to_string(), &to);
        pr.push(s);
        pr_rss = pr_rss.max(m);
        let _ = std::fs::remove_dir_all(&to);
        let to = base.join(format!("restic-restore-{i}"));
        drop_caches();
        let r0 = requests();
        let (s, m) = run(
            restic(&["restore", "latest", "--quiet", "--target"]).arg(&to),
            "restic restore",
        );
        rr_req = requests() - r0;
        rr.push(s);
        rr_rss = rr_rss.max(m);
        let _ = std::fs::remove_dir_all(&to);
    }
    // A delta restore: the tree as of the full snapshot brought to the
    // latest point (the 1% change), fetching only what it lacks.
    let delta_to = base.join("triad-delta");
    triad_restore(&full_seq.to_string(), &delta_to);
    drop_caches();
    let r0 = requests();
    let (delta_s, delta_rss) = triad_restore_with("latest", &delta_to, &["--delta"]);
    let delta_req = requests() - r0;
    let _ = std::fs::remove_dir_all(&delta_to);
    let triad_bytes = du(&s3.root.join("bench/triad"));
    let restic_bytes = du(&s3.root.join("bench/restic"));
    let (tr, rr, pr) = (median(tr), median(rr), median(pr));

    let what = match small {
        Some(n) => format!("{n} files of 0-2 KiB"),
        None => "a mixed tree".to_string(),
    };
    println!("bench-archive: {what}, {files} files, {mb:.0} MB source, {changed} files changed (1%), same s3s-fs server");
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
        "  restore PITR at seq {pitr_seq} (log-only) {pr:8.2} s; {:.2}x the latest restore",
        pr / tr
    );
    println!(
        "  restore --delta, full snapshot's tree to latest {delta_s:8.2} s; {:.2}x the latest restore, {delta_req} requests, peak RSS {delta_rss:.0} MiB",
        delta_s / tr
    );
    println!(
        "  bytes stored               {:8.1} MB  {:8.1} MB  {:6.2}",
        triad_bytes as f64 / 1e6,
        restic_bytes as f64 / 1e6,
        triad_bytes as f64 / restic_bytes as f64
    );
    let per_gib = |n: u64, b: u64| n as f64 / (b as f64 / (1u64 << 30) as f64);
    let req = |name: &str, a: u64, b: u64, ab: u64, bb: u64| {
        println!(
            "  {name:<26} {a:8} ({:7.0}/GiB) {b:8} ({:7.0}/GiB) {:6.2}",
            per_gib(a, ab),
            per_gib(b, bb),
            per_gib(a, ab) / per_gib(b, bb).max(1e-9)
        );
    };
    println!("  S3 requests");
    req(
        "  full (per GiB stored)",
        triad_full_req,
        restic_full_req,
        triad_bytes,
        restic_bytes,
    );
    req(
        "  incremental",
        triad_incr_req,
        restic_incr_req,
        triad_bytes,
        restic_bytes,
    );
    req("  restore (per GiB restored)", tr_req, rr_req, bytes, bytes);
    println!(
        "  peak RSS                   daemon {daemon_rss:.0} MiB, restore {tr_rss:.0} MiB (PITR {pr_rss:.0})   backup {restic_full_rss:.0} MiB, restore {rr_rss:.0} MiB"
    );
    println!(
        "  triad ingest {ingest:.2} s ({:.1} MB/s); restore {:.1} MB/s vs restic {:.1} MB/s",
        mb / ingest,
        mb / tr,
        mb / rr
    );
    println!("  requests by method: {:?}", proxy.counts());
    let _ = std::fs::remove_dir_all(&base);
}

/// The dataset's head seq from its status file.
fn head_seq(site: &Path) -> u64 {
    files_status(site)
        .and_then(|v| v["log"]["head_seq"].as_u64())
        .expect("the dataset's status")
}
