//! Scale benchmark beside restic: for each tree size (1M and 2M files of
//! 0-2 KiB by default, in directories of 1,000) on the same s3s-fs server,
//!
//! - the primary's first ingest (daemon start to settled), then a full
//!   snapshot, then a snapshot of the unchanged dataset, against
//!   `restic backup` of the same tree;
//! - the daemon's peak RSS over ingest and snapshots;
//! - a state transfer: the primary's log is capped so a new follower
//!   cannot replay it, the follower starts empty and is timed until it has
//!   applied the primary's head; its peak RSS, and the primary's largest
//!   RSS sampled meanwhile;
//! - a restore from the archive alone against `restic restore`, with peak
//!   RSS of each.
//!
//! It ends with the growth from the first size to the last, and a straight
//! line through the two taken to 10M files (docs/architecture.md says why
//! a line is the right model for each figure).
//!
//! Run: `bench-scale [--files 1000000,2000000] [--dir DIR]` (after `cargo
//! build --workspace --all-targets`, from the target dir). Needs `restic`
//! (Debian package) and s3s-fs (installed by `./dev.sh test`); about 5 GB
//! of disk per million files.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use triad_tests::s3::S3Server;
use triad_tests::{
    arg, drop_caches, du, files_status, free_port, make_small_tree, peak_rss_of, rss_of, run_timed,
    status, triad_bin, wait_settled,
};

/// What one tree size measured.
#[derive(Default, Clone)]
struct Figures {
    files: u64,
    mb: f64,
    ingest: f64,
    full_snapshot: f64,
    unchanged_snapshot: f64,
    daemon_rss: f64,
    restic_backup: f64,
    restic_backup_rss: f64,
    transfer: f64,
    follower_rss: f64,
    primary_rss_in_transfer: f64,
    restore: f64,
    restore_rss: f64,
    restic_restore: f64,
    restic_restore_rss: f64,
    triad_bytes: u64,
    restic_bytes: u64,
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Samples `pid`'s resident set every 100 ms until stopped; the largest.
struct Sampler {
    stop: Arc<AtomicBool>,
    max: Arc<Mutex<f64>>,
    thread: std::thread::JoinHandle<()>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(Mutex::new(0.0f64));
        let (s, m) = (stop.clone(), max.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Acquire) {
                let r = rss_of(pid);
                if let Ok(mut m) = m.lock() {
                    if r > *m {
                        *m = r;
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Sampler { stop, max, thread }
    }

    fn finish(self) -> f64 {
        self.stop.store(true, Ordering::Release);
        let _ = self.thread.join();
        self.max.lock().map(|m| *m).unwrap_or(f64::NAN)
    }
}

/// Sites `a` (the primary, archiving) and `b` (an async follower, not
/// started until the transfer) under `base`.
struct Sites {
    a_cfg: PathBuf,
    a_data: PathBuf,
    b_cfg: PathBuf,
    b_data: PathBuf,
    a_text: String,
}

fn sites(base: &Path, src: &Path, archive: &str) -> Sites {
    let triad = triad_bin();
    let certs = base.join("certs");
    let key = base.join("k.key");
    for args in [
        vec![
            "certs".into(),
            "--out".into(),
            certs.display().to_string(),
            "a".into(),
            "b".into(),
        ],
        vec!["keygen".into(), "--out".into(), key.display().to_string()],
    ] {
        let out = Command::new(&triad).args(&args).output().expect("triad");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (pa, pb) = (free_port(), free_port());
    let site = |name: &str, port: u16, role: &str, peer: &str, dataset: &str| {
        format!(
            "[site]\nname = \"{name}\"\n{role}\ndata_dir = \"{d}\"\n\n[listen]\nreplication = \"127.0.0.1:{port}\"\n\n[tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/{name}.pem\"\nkey = \"{c}/{name}.key\"\n\n{peer}\n[[dataset]]\nname = \"files\"\nkey_file = \"{k}\"\n{dataset}",
            d = base.join(name).join("data").display(),
            c = certs.display(),
            k = key.display(),
        )
    };
    let a_text = site(
        "a",
        pa,
        // Segments of 4 MiB, so a cap can remove most of the log.
        "role = \"primary\"\nlog_segment_size = \"4MiB\"",
        &format!("[[peer]]\nname = \"b\"\naddress = \"127.0.0.1:{pb}\"\nmode = \"async\"\n"),
        &format!(
            "source = {{ kind = \"directory\", path = \"{}\" }}\n{archive}",
            src.display()
        ),
    );
    let b_text = site(
        "b",
        pb,
        "role = \"follower\"\nupstream = \"a\"",
        &format!("[[peer]]\nname = \"a\"\naddress = \"127.0.0.1:{pa}\"\n"),
        "",
    );
    let s = Sites {
        a_cfg: base.join("a.toml"),
        a_data: base.join("a/data"),
        b_cfg: base.join("b.toml"),
        b_data: base.join("b/data"),
        a_text,
    };
    std::fs::write(&s.a_cfg, &s.a_text).expect("config a");
    std::fs::write(&s.b_cfg, b_text).expect("config b");
    s
}

fn daemon(cfg: &Path, log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("log");
    Command::new(triad_bin())
        .args(["daemon", "--config"])
        .arg(cfg)
        .env("TRIAD_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("daemon")
}

fn stop(mut child: Child) {
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let _ = child.wait();
}

fn measure(n: u64, dir: &Path) -> Figures {
    let base = dir.join(format!("triad-bench-scale-{n}-{}", std::process::id()));
    let src = base.join("source");
    std::fs::create_dir_all(&src).expect("bench dir");
    eprintln!("writing {n} files of 0-2 KiB under {}", src.display());
    let (bytes, files) = make_small_tree(&src, n);
    let mut f = Figures {
        files,
        mb: bytes as f64 / 1e6,
        ..Figures::default()
    };
    let s3 = S3Server::start("bench");
    let archive = format!(
        "\n[archive]\nurl = \"s3://bench/triad\"\nendpoint = \"{}\"\ncredentials_file = \"{}\"\n",
        s3.endpoint(),
        s3.credentials_file(&base).display()
    );
    let s = sites(&base, &src, &archive);

    eprintln!("triad: ingest and snapshots");
    drop_caches();
    let started = Instant::now();
    let a = daemon(&s.a_cfg, &base.join("a.log"));
    wait_settled(&s.a_data, started, started);
    f.ingest = started.elapsed().as_secs_f64();
    let snapshot = |what: &str| {
        run_timed(
            Command::new(triad_bin())
                .args(["snapshot", "--dataset", "files", "--config"])
                .arg(&s.a_cfg),
            what,
        )
        .0
    };
    f.full_snapshot = snapshot("triad full snapshot");
    f.unchanged_snapshot = snapshot("triad snapshot of the unchanged dataset");
    f.daemon_rss = peak_rss_of(a.id());

    eprintln!("restic: backup");
    let repo = format!("s3:{}/bench/restic", s3.endpoint());
    let restic = |args: &[&str]| triad_tests::restic(&repo, args);
    run_timed(&mut restic(&["init"]), "restic init");
    drop_caches();
    (f.restic_backup, f.restic_backup_rss) =
        run_timed(restic(&["backup", "--quiet"]).arg(&src), "restic backup");

    eprintln!("triad: state transfer to a new follower");
    // Cap the primary's log (a reload takes it) so the follower cannot
    // replay it from the start.
    std::fs::write(
        &s.a_cfg,
        s.a_text
            .replacen("data_dir", "log_retention_max = \"1MiB\"\ndata_dir", 1),
    )
    .expect("config a");
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(a.id() as i32, libc::SIGHUP);
    }
    wait_for("the capped log", Duration::from_secs(300), || {
        files_status(&s.a_data).is_some_and(|v| v["retention"]["first_seq"].as_u64() > Some(1))
    });
    let head = files_status(&s.a_data)
        .and_then(|v| v["log"]["head_seq"].as_u64())
        .expect("primary head");
    let sampler = Sampler::start(a.id());
    let t = Instant::now();
    let b = daemon(&s.b_cfg, &base.join("b.log"));
    let b_status = s.b_data.join("datasets/files/status.json");
    wait_for("the follower's transfer", Duration::from_secs(3600), || {
        status(&b_status).is_some_and(|v| v["log"]["applied_seq"].as_u64() >= Some(head))
    });
    f.transfer = t.elapsed().as_secs_f64();
    f.primary_rss_in_transfer = sampler.finish();
    f.follower_rss = peak_rss_of(b.id());
    stop(b);
    stop(a);

    eprintln!("restores");
    let to = base.join("triad-restore");
    drop_caches();
    (f.restore, f.restore_rss) = run_timed(
        Command::new(triad_bin())
            .args(["restore", "--from-archive", "s3://bench/triad"])
            .args(["--dataset", "files", "--at", "latest", "--config"])
            .arg(&s.a_cfg)
            .arg("--to")
            .arg(&to),
        "triad restore --from-archive",
    );
    let _ = std::fs::remove_dir_all(&to);
    let to = base.join("restic-restore");
    drop_caches();
    (f.restic_restore, f.restic_restore_rss) = run_timed(
        restic(&["restore", "latest", "--quiet", "--target"]).arg(&to),
        "restic restore",
    );
    let _ = std::fs::remove_dir_all(&to);
    f.triad_bytes = du(&s3.root.join("bench/triad"));
    f.restic_bytes = du(&s3.root.join("bench/restic"));
    drop(s3);
    let _ = std::fs::remove_dir_all(&base);
    f
}

fn main() {
    let sizes: Vec<u64> = arg("--files")
        .unwrap_or_else(|| "1000000,2000000".to_string())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("--files: numbers separated by commas")
        })
        .collect();
    let dir =
        PathBuf::from(arg("--dir").unwrap_or_else(|| std::env::temp_dir().display().to_string()));
    if Command::new("restic").arg("version").output().is_err() {
        panic!("restic is not installed: apt-get install restic");
    }
    let all: Vec<Figures> = sizes.iter().map(|n| measure(*n, &dir)).collect();

    println!(
        "bench-scale: files of 0-2 KiB in directories of 1,000, same s3s-fs server, one run each"
    );
    let head: String = all
        .iter()
        .map(|f| format!(" | {:>9} files: triad   restic  ratio", f.files))
        .collect();
    println!("{:<34}{head}", "");
    let row = |name: &str, get: &dyn Fn(&Figures) -> (f64, Option<f64>), unit: &str| {
        let cells: String = all
            .iter()
            .map(|f| match get(f) {
                (a, Some(b)) => format!(" | {a:>14.1}{unit} {b:>7.1}{unit} {:>6.2}", a / b),
                (a, None) => format!(" | {a:>14.1}{unit} {:>7} {:>6}", "", ""),
            })
            .collect();
        println!("{name:<34}{cells}");
    };
    row(
        "first ingest (s)",
        &|f| (f.ingest, Some(f.restic_backup)),
        "",
    );
    row(
        "ingest + full snapshot (s)",
        &|f| (f.ingest + f.full_snapshot, Some(f.restic_backup)),
        "",
    );
    row("full snapshot alone (s)", &|f| (f.full_snapshot, None), "");
    row(
        "snapshot, dataset unchanged (s)",
        &|f| (f.unchanged_snapshot, None),
        "",
    );
    row(
        "restore from the archive (s)",
        &|f| (f.restore, Some(f.restic_restore)),
        "",
    );
    row(
        "daemon peak RSS (MiB)",
        &|f| (f.daemon_rss, Some(f.restic_backup_rss)),
        "",
    );
    row(
        "restore peak RSS (MiB)",
        &|f| (f.restore_rss, Some(f.restic_restore_rss)),
        "",
    );
    row("state transfer (s)", &|f| (f.transfer, None), "");
    row("  follower peak RSS (MiB)", &|f| (f.follower_rss, None), "");
    row(
        "  primary RSS meanwhile (MiB)",
        &|f| (f.primary_rss_in_transfer, None),
        "",
    );
    row(
        "bytes stored (MB)",
        &|f| {
            (
                f.triad_bytes as f64 / 1e6,
                Some(f.restic_bytes as f64 / 1e6),
            )
        },
        "",
    );
    if let (Some(a), Some(b)) = (all.first(), all.last()) {
        if b.files > a.files {
            println!(
                "growth from {} to {} files, and a line through both taken to 10M:",
                a.files, b.files
            );
            let line = |name: &str, x: f64, y: f64| {
                let per = (y - x) / (b.files - a.files) as f64;
                let at10m = y + per * (10_000_000 - b.files as i64) as f64;
                println!("  {name:<32} {:6.2}x   at 10M ≈ {at10m:.0}", y / x);
            };
            line("daemon peak RSS (MiB)", a.daemon_rss, b.daemon_rss);
            line("follower peak RSS (MiB)", a.follower_rss, b.follower_rss);
            line("restore peak RSS (MiB)", a.restore_rss, b.restore_rss);
            line("first ingest (s)", a.ingest, b.ingest);
            line(
                "unchanged snapshot (s)",
                a.unchanged_snapshot,
                b.unchanged_snapshot,
            );
            line("restore (s)", a.restore, b.restore);
            line("restic backup (s)", a.restic_backup, b.restic_backup);
            line("restic restore (s)", a.restic_restore, b.restic_restore);
            line(
                "restic restore peak RSS (MiB)",
                a.restic_restore_rss,
                b.restic_restore_rss,
            );
        }
    }
    for f in &all {
        println!(
            "  {} files, {:.0} MB: triad ingest {:.1} MB/s, {:.0} files/s",
            f.files,
            f.mb,
            f.mb / f.ingest,
            f.files as f64 / f.ingest
        );
    }
}
