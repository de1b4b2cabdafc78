//! Helpers shared by the benchmark harnesses in `src/bin/` and the
//! end-to-end tests in tests/: test trees, arguments, and the S3 test servers.

pub mod fuzz;
pub mod moto;
pub mod s3;
pub mod softhsm;

use std::path::{Path, PathBuf};

use rand::{Rng, RngCore, SeedableRng};

/// Writes a mixed tree: many small files, some medium, a few large; half
/// compressible text, half random.
pub fn make_tree(root: &Path, total: u64) -> (u64, u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let (mut bytes, mut files) = (0u64, 0u64);
    let text: Vec<u8> = (0..1 << 20)
        .map(|i| b"gov record 2026 approved archive \n"[i % 34])
        .collect();
    while bytes < total {
        // Mostly small files, some medium, a few large: about 2,000 files a GiB.
        let size: usize = match rng.gen_range(0..100) {
            0..=84 => rng.gen_range(0..32 << 10),
            85..=98 => rng.gen_range(32 << 10..2 << 20),
            _ => rng.gen_range(8 << 20..64 << 20),
        };
        let size = size.min((total - bytes) as usize);
        let dir = root.join(format!("d{}/e{}", files % 16, files % 97));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let mut data = vec![0u8; size];
        if files % 2 == 0 {
            rng.fill_bytes(&mut data);
        } else {
            for (i, b) in data.iter_mut().enumerate() {
                *b = text[i % text.len()];
            }
            // Keep text files distinct so dedup does not flatter the figures.
            let tag = files.to_le_bytes();
            data.iter_mut()
                .zip(tag.iter().cycle())
                .step_by(4096)
                .for_each(|(b, t)| *b = *t);
        }
        std::fs::write(dir.join(format!("f{files}")), &data).expect("write");
        bytes += size as u64;
        files += 1;
    }
    (bytes, files)
}

/// Runs a command to its end: seconds taken and its peak RSS in MiB
/// (panics with its output if it fails). A restore's phase times are
/// passed to stderr.
pub fn run_timed(cmd: &mut std::process::Command, what: &str) -> (f64, f64) {
    let t = std::time::Instant::now();
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let pid = child.id() as libc::pid_t;
    // The output is read on threads so a chatty command never blocks.
    let mut child = child;
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let o = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let e = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let mut status = 0;
    // SAFETY: plain rusage out-parameter for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child with valid pointers.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let secs = t.elapsed().as_secs_f64();
    let (stdout, stderr) = (o.join().unwrap_or_default(), e.join().unwrap_or_default());
    assert!(
        r == pid && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{what} failed: {stdout}{stderr}"
    );
    if what.starts_with("triad restore") {
        // Its phase times.
        eprint!("{stdout}");
    }
    (secs, usage.ru_maxrss as f64 / 1024.0)
}

/// `n` files of 0 to 2 KiB (half random, half text) in directories of
/// 1,000: the small-file tree. Returns (bytes, files).
pub fn make_small_tree(root: &Path, n: u64) -> (u64, u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let mut bytes = 0u64;
    for i in 0..n {
        let dir = root.join(format!("d{}", i / 1000));
        if i % 1000 == 0 {
            std::fs::create_dir_all(&dir).expect("mkdir");
        }
        let size = rng.gen_range(0..=2048usize);
        let mut data = vec![0u8; size];
        if i % 2 == 0 {
            rng.fill_bytes(&mut data);
        } else {
            let line = format!("record {i} of the registry, approved 2026\n");
            for (j, b) in data.iter_mut().enumerate() {
                *b = line.as_bytes()[j % line.len()];
            }
        }
        std::fs::write(dir.join(format!("f{i}")), &data).expect("write");
        bytes += size as u64;
    }
    (bytes, n)
}

/// Waits until dataset `files` at `site` has settled after a round that
/// ended after `after` (at most an hour from `started`).
pub fn wait_settled(site: &Path, after: std::time::Instant, started: std::time::Instant) {
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
            started.elapsed() < std::time::Duration::from_secs(3600),
            "the daemon did not settle"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `restic -r <repo> <args>` with the benchmarks' password and the test
/// server's credentials.
pub fn restic(repo: &str, args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new("restic");
    c.args(["-r", repo])
        .args(args)
        .env("RESTIC_PASSWORD", "bench-password")
        .env("AWS_ACCESS_KEY_ID", s3::ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", s3::SECRET_KEY);
    c
}

/// A running process's resident set now in MiB (its VmRSS), NaN once it
/// is gone.
pub fn rss_of(pid: u32) -> f64 {
    proc_status_kib(pid, "VmRSS:").map_or(f64::NAN, |kib| kib / 1024.0)
}

fn proc_status_kib(pid: u32, field: &str) -> Option<f64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
}

/// A running process's peak RSS in MiB (its VmHWM), NaN once it is gone.
pub fn peak_rss_of(pid: u32) -> f64 {
    proc_status_kib(pid, "VmHWM:").map_or(f64::NAN, |kib| kib / 1024.0)
}

/// The value after `name` on the command line.
pub fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// The `triad` binary built beside the running benchmark.
pub fn triad_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    exe.parent().expect("target dir").join("triad")
}

/// Syncs and drops the page cache (as root), so a timed read starts cold.
pub fn drop_caches() {
    let _ = std::process::Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// Bytes under `p`, as `du -sb` counts them.
pub fn du(p: &Path) -> u64 {
    let out = std::process::Command::new("du")
        .args(["-sb"])
        .arg(p)
        .output()
        .expect("du");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The median of `v` (which must not be empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The `status.json` of dataset `files` at the site whose data dir is `site`.
pub fn files_status(site: &Path) -> Option<serde_json::Value> {
    status(&site.join("datasets/files/status.json"))
}

/// Three daemons on loopback for the benchmarks: primary `a` (with the
/// given `source = ...` line, and a sync follower `b` and an async follower
/// `c`), each in `<base>/<name>` with its config `triad.toml`.
pub struct ThreeSites {
    pub children: Vec<std::process::Child>,
    /// Each site's status.json.
    pub statuses: Vec<PathBuf>,
    pub configs: Vec<PathBuf>,
}

/// Starts the three sites and waits two seconds for them to connect.
pub fn start_three_sites(base: &Path, source: &str) -> ThreeSites {
    start_sites(base, source, &|_| String::new())
}

/// As [`start_three_sites`], with `follower_dataset(site dir)` appended to
/// each follower's `[[dataset]]` (a `standby_path`).
pub fn start_sites(
    base: &Path,
    source: &str,
    follower_dataset: &dyn Fn(&Path) -> String,
) -> ThreeSites {
    start_sites_with(base, source, follower_dataset, &|i, j| match (i, j) {
        (0, 1) => Some("sync"),
        (0, 2) => Some("async"),
        _ => None,
    })
}

/// As [`start_sites`], with `mode(i, j)` the `mode` site `i` gives its
/// peer `j` (0 is a, the primary).
pub fn start_sites_with(
    base: &Path,
    source: &str,
    follower_dataset: &dyn Fn(&Path) -> String,
    mode: &dyn Fn(usize, usize) -> Option<&'static str>,
) -> ThreeSites {
    use std::process::{Command, Stdio};
    let triad = triad_bin();
    let certs = base.join("certs");
    let ok = Command::new(&triad)
        .args(["certs", "--out"])
        .arg(&certs)
        .args(["a", "b", "c"])
        .output()
        .expect("certs");
    assert!(
        ok.status.success(),
        "certs: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let key = base.join("k.key");
    let ok = Command::new(&triad)
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .expect("keygen");
    assert!(ok.status.success());
    let ports = [free_port(), free_port(), free_port()];
    let names = ["a", "b", "c"];
    let mut sites = ThreeSites {
        children: Vec::new(),
        statuses: Vec::new(),
        configs: Vec::new(),
    };
    for i in 0..3 {
        let dir = base.join(names[i]);
        std::fs::create_dir_all(&dir).expect("site dir");
        let peers: String = (0..3)
            .filter(|j| *j != i)
            .map(|j| {
                let mode = mode(i, j)
                    .map(|m| format!("mode = \"{m}\"\n"))
                    .unwrap_or_default();
                format!(
                    "[[peer]]\nname = \"{}\"\naddress = \"127.0.0.1:{}\"\n{mode}\n",
                    names[j], ports[j]
                )
            })
            .collect();
        let role = if i == 0 {
            "role = \"primary\"".to_string()
        } else {
            "role = \"follower\"\nupstream = \"a\"".to_string()
        };
        let source = if i == 0 {
            source.to_string()
        } else {
            follower_dataset(&dir)
        };
        let cfg = format!(
            "[site]\nname = \"{n}\"\n{role}\ndata_dir = \"{d}\"\n\n[listen]\nreplication = \"127.0.0.1:{p}\"\n\n[tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/{n}.pem\"\nkey = \"{c}/{n}.key\"\n\n{peers}[[dataset]]\nname = \"files\"\nkey_file = \"{k}\"\n{source}",
            n = names[i],
            d = dir.join("data").display(),
            p = ports[i],
            c = certs.display(),
            k = key.display()
        );
        let path = dir.join("triad.toml");
        std::fs::write(&path, cfg).expect("config");
        let log = std::fs::File::create(dir.join("daemon.log")).expect("log");
        sites.children.push(
            Command::new(&triad)
                .args(["daemon", "--config"])
                .arg(&path)
                .env("TRIAD_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("daemon"),
        );
        sites
            .statuses
            .push(dir.join("data/datasets/files/status.json"));
        sites.configs.push(path);
    }
    std::thread::sleep(std::time::Duration::from_secs(2));
    sites
}

/// A status.json, if it reads.
pub fn status(p: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(p).ok()?).ok()
}

/// Where a benchmark works: `<--dir or the temp dir>/triad-bench-<name>-<pid>`,
/// with an empty `source/` in it. Returns (base, source).
pub fn bench_dir(name: &str) -> (PathBuf, PathBuf) {
    let base =
        PathBuf::from(arg("--dir").unwrap_or_else(|| std::env::temp_dir().display().to_string()))
            .join(format!("triad-bench-{name}-{}", std::process::id()));
    let src = base.join("source");
    std::fs::create_dir_all(&src).expect("create bench dir");
    (base, src)
}

/// One primary site for the single-site benchmarks: a new key and a config
/// in `base` watching `src`, with `extra` appended (an [archive] section).
pub struct OneSite {
    pub config: PathBuf,
    /// The site's data dir.
    pub data: PathBuf,
}

impl OneSite {
    pub fn new(base: &Path, src: &Path, extra: &str) -> OneSite {
        use std::process::Command;
        let key = base.join("bench.key");
        let out = Command::new(triad_bin())
            .args(["keygen", "--out"])
            .arg(&key)
            .output()
            .expect("keygen");
        assert!(
            out.status.success(),
            "keygen: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let site = OneSite {
            config: base.join("bench.toml"),
            data: base.join("site"),
        };
        std::fs::write(
            &site.config,
            format!(
                "[site]\nname = \"bench\"\nrole = \"primary\"\ndata_dir = \"{}\"\n\n[[dataset]]\nname = \"files\"\nkey_file = \"{}\"\nsource = {{ kind = \"directory\", path = \"{}\" }}\n{extra}",
                site.data.display(),
                key.display(),
                src.display(),
            ),
        )
        .expect("config");
        site
    }

    /// Starts its daemon (warnings only on the terminal).
    pub fn spawn(&self) -> std::process::Child {
        std::process::Command::new(triad_bin())
            .args(["daemon", "--config"])
            .arg(&self.config)
            .env("TRIAD_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("daemon")
    }
}

/// An [archive] section for `s3://bench/triad` on the test server.
pub fn s3_archive_section(s3: &s3::S3Server, base: &Path, extra: &str) -> String {
    format!(
        "\n[archive]\nurl = \"s3://bench/triad\"\nendpoint = \"{}\"\ncredentials_file = \"{}\"\n{extra}",
        s3.endpoint(),
        s3.credentials_file(base).display()
    )
}

/// A file entry of one chunk holding `data`, and that chunk sealed: what a
/// key holder puts into a record (the hostile-input tests and the fuzz
/// seeds build datasets with it).
pub fn one_chunk_file(keys: &vault::Keys, data: &[u8]) -> (vault::Entry, vault::SealedChunk) {
    let id = vault::ChunkId::of(keys, data);
    let entry = vault::Entry {
        node: vault::Node::File {
            chunks: vec![vault::ChunkRef {
                id,
                len: data.len() as u32,
            }],
        },
        mode: 0o644,
        mtime_ns: 1_700_000_000_000_000_000,
        size: data.len() as u64,
        ext: None,
    };
    (entry, vault::chunk::seal(keys, id, data))
}

/// A port for a server the tests start, below the kernel's ephemeral range
/// (`ip_local_port_range`), so that no outgoing connection (the tests
/// make thousands) can take it between this call and the server's bind:
/// handing out port 0's answer did exactly that. Ports are handed out in
/// turn within a process, from a start that differs between processes, and
/// each is checked free with a bind first.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768)
        .clamp(2048, 65535);
    let base = 1024u32;
    let span = low - base;
    let start = std::process::id() * 7919 % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (base + (start + n) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below {low}");
}

/// A dataset of the test's own making with a file:// archive beside it, as
/// a key holder would build one: the hostile-input tests craft archives
/// with it, the fuzz targets take their seeds from it.
pub struct KeyHolder {
    pub rt: tokio::runtime::Runtime,
    pub ds: std::sync::Arc<vault::Dataset>,
    pub archiver: archive::Archiver,
    /// The archive's `file://` URL (`<dir>/bucket`).
    pub url: String,
}

impl KeyHolder {
    /// Creates the dataset in `<dir>/site` and its archive, written as `site`.
    pub fn new(dir: &Path, key: &vault::DatasetKey, site: &str) -> KeyHolder {
        KeyHolder::at(&dir.join("site"), &dir.join("bucket"), key, site)
    }

    /// Creates the dataset `files` in `dataset_dir` and its archive in
    /// `bucket` (a `file://` store), written as `site`.
    pub fn at(dataset_dir: &Path, bucket: &Path, key: &vault::DatasetKey, site: &str) -> KeyHolder {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let ds = std::sync::Arc::new(
            vault::Dataset::open(
                dataset_dir,
                "files",
                key,
                vault::Options {
                    create: true,
                    ..vault::Options::default()
                },
            )
            .expect("dataset"),
        );
        let url = format!("file://{}", bucket.display());
        std::fs::create_dir_all(bucket).expect("bucket");
        let store = archive::Store::open(&archive::StoreConfig::new(&url)).expect("store");
        let archiver = archive::Archiver::open(
            std::sync::Arc::new(store),
            rt.handle().clone(),
            ds.clone(),
            site,
            4,
        )
        .expect("archiver");
        KeyHolder {
            rt,
            ds,
            archiver,
            url,
        }
    }

    /// Submits a `Put` of a one-chunk file holding `data`.
    pub fn put_file(&self, path: &str, data: &[u8]) {
        let (entry, chunk) = one_chunk_file(self.ds.keys(), data);
        self.ds
            .submit(
                vec![vault::Op::Put {
                    path: path.as_bytes().to_vec(),
                    entry,
                }],
                vec![chunk],
            )
            .expect("submit");
    }

    /// Closes the dataset (the archive stays).
    pub fn close(self) {
        drop(self.archiver);
        self.ds.close().expect("close");
    }
}
