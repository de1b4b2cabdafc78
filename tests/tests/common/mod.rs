//! Shared harness for the end-to-end tests: a site in a temp dir, the real
//! `triad` binary started and killed as a process, tree comparison, and the
//! daemon's log printed when a test fails.

#![allow(dead_code)]

pub mod deploy;
pub mod proxy;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `triad` binary built alongside this test.
pub fn triad_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/triad
    let bin = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .join("triad");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p daemon`",
        bin.display()
    );
    bin
}

pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

/// One primary site with a watched source directory.
pub struct Site {
    pub tmp: tempfile::TempDir,
    pub data: PathBuf,
    pub source: PathBuf,
    pub key: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    /// Extra environment for the daemon (e.g. NOTIFY_SOCKET).
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Site {
    pub fn new() -> Site {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("site");
        let source = tmp.path().join("source");
        std::fs::create_dir_all(&source).unwrap();
        let key = tmp.path().join("dataset.key");
        let out = Command::new(triad_bin())
            .args(["keygen", "--out"])
            .arg(&key)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "keygen: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let config = tmp.path().join("primary.toml");
        let log = tmp.path().join("daemon.log");
        let s = Site {
            data,
            source,
            key,
            config,
            log,
            tmp,
            env: Vec::new(),
            child: None,
        };
        s.write_config("");
        s
    }

    /// Writes the config; `extra_source` adds keys to the source table.
    pub fn write_config(&self, extra_source: &str) {
        std::fs::write(
            &self.config,
            format!(
                "[site]\nname = \"test-a\"\nrole = \"primary\"\ndata_dir = \"{}\"\n\n[[dataset]]\nname = \"files\"\nkey_file = \"{}\"\nsource = {{ kind = \"directory\", path = \"{}\", debounce = \"100ms\"{} }}\n",
                self.data.display(),
                self.key.display(),
                self.source.display(),
                extra_source
            ),
        )
        .unwrap();
    }

    /// Replaces the config with `text`.
    pub fn set_config(&self, text: &str) {
        std::fs::write(&self.config, text).unwrap();
    }

    /// Uses the same dataset key as `other` (every site of a deployment
    /// holds the same key).
    pub fn share_key_of(&self, other: &Site) {
        std::fs::remove_file(&self.key).unwrap();
        std::fs::copy(&other.key, &self.key).unwrap();
    }

    pub fn dataset_dir(&self) -> PathBuf {
        self.data.join("datasets/files")
    }

    pub fn status_path(&self) -> PathBuf {
        self.dataset_dir().join("status.json")
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(triad_bin())
            .args(["daemon", "--config"])
            .arg(&self.config)
            .env("TRIAD_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn daemon");
        self.child = Some(child);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("daemon running");
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let start = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "daemon did not stop within 60s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the daemon to exit on its own (for start-up failures).
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("daemon running");
        let start = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            if start.elapsed() > timeout {
                let _ = c.kill();
                panic!("daemon still running after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn status(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&std::fs::read(self.status_path()).ok()?).ok()
    }

    /// Waits until the daemon has handled every change made before `after_ns`:
    /// a round ended after it, or (nothing having changed) no event came
    /// since and a status written half a second later still says settled.
    /// The daemon runs no round without an event, so a call made after the
    /// last change waits for the second.
    pub fn wait_settled(&self, after_ns: i64, timeout: Duration) -> serde_json::Value {
        let start = Instant::now();
        loop {
            if let Some(v) = self.status() {
                let s = &v["source"];
                let updated = v["updated_ns"].as_i64().unwrap_or(0);
                let quiet = s["last_event_ns"].as_i64().unwrap_or(0) < after_ns
                    && updated > after_ns + 500_000_000;
                if v["pid"].as_u64() == self.pid().map(|p| p as u64)
                    && s["settled"].as_bool() == Some(true)
                    && (s["last_round_end_ns"].as_i64().unwrap_or(0) > after_ns || quiet)
                    && updated > after_ns
                {
                    return v;
                }
                if let Some(f) = v["failure"].as_str() {
                    panic!("daemon failed: {f}\n{}", self.log_text());
                }
            }
            assert!(
                start.elapsed() < timeout,
                "daemon did not settle in {timeout:?}; last status {}\n{}",
                self.status().map(|v| v.to_string()).unwrap_or_default(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `triad ARGS --config <this site's config>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(triad_bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("run triad")
    }

    pub fn restore(&self, to: &Path) -> Output {
        self.cli(&[
            "restore",
            "--dataset",
            "files",
            "--to",
            &to.to_string_lossy(),
        ])
    }

    /// Adds an `[archive]` at `s3://triad/site-a` behind `endpoint`, with the
    /// test server's credentials, shipping every 500 ms; `extra` is appended
    /// (more keys, or further sections).
    pub fn add_s3_archive(&self, endpoint: &str, extra: &str) {
        let creds = triad_tests::s3::write_credentials(self.tmp.path());
        let mut text = std::fs::read_to_string(&self.config).unwrap();
        text.push_str(&format!(
            "\n[archive]\nurl = \"s3://triad/site-a\"\nendpoint = \"{endpoint}\"\ncredentials_file = \"{}\"\nlog_flush_interval = \"500ms\"\n{extra}\n",
            creds.display()
        ));
        self.set_config(&text);
    }

    /// Waits until the archive holds every record up to `seq`.
    pub fn wait_shipped(&self, seq: u64, timeout: Duration) {
        let start = Instant::now();
        loop {
            let shipped = self
                .status()
                .and_then(|v| v["archive"]["shipped_seq"].as_u64())
                .unwrap_or(0);
            if shipped >= seq {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "archive shipped only to seq {shipped}, wanted {seq}; status {}",
                self.status().map(|v| v.to_string()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn key(&self) -> vault::DatasetKey {
        vault::DatasetKey::load(&self.key).unwrap()
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- daemon log ({}) ----\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// Differences between two trees, as `diff -r` plus a walk comparing kind,
/// mode, mtime (to the nanosecond) and symlink targets would report them.
pub fn compare_trees(a: &Path, b: &Path) -> Vec<String> {
    let la = listing(a);
    let lb = listing(b);
    let mut diffs = Vec::new();
    for (p, ea) in &la {
        match lb.iter().find(|(q, _)| q == p) {
            None => diffs.push(format!("only in {}: {}", a.display(), p.display())),
            Some((_, eb)) => {
                if ea != eb {
                    diffs.push(format!("{}: {:?} != {:?}", p.display(), ea, eb));
                }
            }
        }
    }
    for (p, _) in &lb {
        if !la.iter().any(|(q, _)| q == p) {
            diffs.push(format!("only in {}: {}", b.display(), p.display()));
        }
    }
    diffs
}

#[derive(Debug, PartialEq, Eq)]
pub enum Node {
    File {
        mode: u32,
        mtime: (i64, i64),
        hash: [u8; 32],
        len: u64,
    },
    Dir {
        mode: u32,
        mtime: (i64, i64),
    },
    Link {
        target: Vec<u8>,
        mtime: (i64, i64),
    },
}

fn listing(root: &Path) -> Vec<(PathBuf, Node)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let mtime = (md.mtime(), md.mtime_nsec());
            let node = if md.is_dir() {
                stack.push(p.clone());
                Node::Dir {
                    mode: md.mode() & 0o7777,
                    mtime,
                }
            } else if md.file_type().is_symlink() {
                Node::Link {
                    target: std::fs::read_link(&p)
                        .unwrap()
                        .as_os_str()
                        .as_bytes()
                        .to_vec(),
                    mtime,
                }
            } else {
                let data = std::fs::read(&p).unwrap();
                Node::File {
                    mode: md.mode() & 0o7777,
                    mtime,
                    hash: *blake3::hash(&data).as_bytes(),
                    len: md.len(),
                }
            };
            out.push((p.strip_prefix(root).unwrap().to_path_buf(), node));
        }
    }
    out.sort_by(|x, y| x.0.cmp(&y.0));
    out
}

pub fn assert_same_tree(src: &Path, restored: &Path) {
    let d = compare_trees(src, restored);
    assert!(
        d.is_empty(),
        "{} differences, first ones:\n{}",
        d.len(),
        d.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
}

pub fn os(p: &str) -> &OsStr {
    OsStr::new(p)
}

/// Checks a stopped site's state: the running digest equals a full
/// recomputation, and every chunk's reference count equals the references
/// the namespace and pins hold, with no chunk missing or orphaned.
pub fn check_state_invariants(site: &Site) {
    let keys = site.key().derive();
    let st = vault::state::State::open_read_only(&site.dataset_dir().join("state")).unwrap();
    let applied = st.applied().unwrap();
    let recomputed = st.recompute_digest(&keys).unwrap();
    assert_eq!(
        applied.digest, recomputed,
        "running digest differs from a full recomputation"
    );
    let mut refs: std::collections::HashMap<vault::ChunkId, u64> = Default::default();
    for (_, e) in st.entries_with_prefix(b"").unwrap() {
        for c in e.chunks() {
            *refs.entry(c.id).or_default() += 1;
        }
    }
    for (id, n) in st.pins().unwrap() {
        *refs.entry(id).or_default() += n;
    }
    let stored = st.all_chunk_meta().unwrap();
    for (id, m) in &stored {
        assert_eq!(
            m.refs,
            refs.get(id).copied().unwrap_or(0),
            "refcount of chunk {id}"
        );
        let bytes = st.chunk_bytes(id).unwrap().expect("chunk bytes present");
        assert_eq!(
            *blake3::hash(&bytes).as_bytes(),
            m.sealed_hash,
            "sealed hash of chunk {id}"
        );
    }
    for id in refs.keys() {
        assert!(
            stored.iter().any(|(s, _)| s == id),
            "chunk {id} is referenced but not stored"
        );
    }
}

/// Fills `path` with `len` bytes: compressible text or random.
pub fn write_file(path: &Path, len: usize, random: bool, rng: &mut impl rand::RngCore) {
    let mut data = vec![0u8; len];
    if random {
        rng.fill_bytes(&mut data);
    } else {
        let line = b"2026 gov-files record, department of records, line ";
        for (i, b) in data.iter_mut().enumerate() {
            *b = line[i % line.len()];
        }
    }
    std::fs::write(path, data).unwrap();
}

/// Polls `f` every 100 ms until it returns a value, or fails the test after
/// `timeout`, naming `what` it waited for.
pub fn until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls a condition as [`until`] does.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    until(what, timeout, || f().then_some(()))
}

/// GET `path` from a daemon's HTTP endpoint on loopback: (status, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let url = format!("http://127.0.0.1:{port}{path}");
    match ureq::get(&url).timeout(Duration::from_secs(10)).call() {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("GET {url}: {e}"),
    }
}

/// RFC 3339 with nanoseconds, UTC, without a date library in the tests.
pub fn rfc3339(ns: i64) -> String {
    let out = Command::new("date")
        .args([
            "-u",
            "-d",
            &format!("@{}.{:09}", ns / 1_000_000_000, ns % 1_000_000_000),
        ])
        .arg("+%Y-%m-%dT%H:%M:%S.%NZ")
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}
