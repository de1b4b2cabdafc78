//! A real S3-compatible server for the tests: `s3s-fs` (the s3s project's
//! file-backed server, installed by `./dev.sh test`), started on a free
//! loopback port with its own credentials; and a fault-injecting TCP proxy
//! to put in front of it.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "triad-test-access";
pub const SECRET_KEY: &str = "triad-test-secret-0123456789";

/// Finds the s3s-fs binary: `TRIAD_S3S_FS`, then dev.sh's tool dir, then PATH.
pub fn s3s_fs_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TRIAD_S3S_FS") {
        return PathBuf::from(p);
    }
    if let Ok(home) = std::env::var("HOME") {
        let p = Path::new(&home).join(".cache/triad/tools/bin/s3s-fs");
        if p.exists() {
            return p;
        }
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("s3s-fs"))
            .find(|p| p.exists())
    });
    found.unwrap_or_else(|| {
        panic!(
            "s3s-fs is not installed: run ./dev.sh test, or `cargo install s3s-fs@0.14.1 \
             --features binary --locked`, or set TRIAD_S3S_FS"
        )
    })
}

/// Writes the test server's credentials for triad (mode 0600) into `dir`.
pub fn write_credentials(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("s3.credentials");
    std::fs::write(
        &p,
        format!("access_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

pub struct S3Server {
    pub root: PathBuf,
    pub port: u16,
    child: Child,
    _tmp: tempfile::TempDir,
}

impl S3Server {
    /// Starts a server with one bucket, `bucket`.
    pub fn start(bucket: &str) -> S3Server {
        S3Server::start_on(bucket, crate::free_port())
    }

    /// A free loopback port, for a server started later with [`start_on`].
    pub fn reserve_port() -> u16 {
        crate::free_port()
    }

    /// Starts a server on `port` (for a store that appears only later).
    pub fn start_on(bucket: &str, port: u16) -> S3Server {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("s3");
        std::fs::create_dir_all(root.join(bucket)).unwrap();
        let child = Command::new(s3s_fs_bin())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3s-fs");
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "s3s-fs did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        S3Server {
            root,
            port,
            child,
            _tmp: tmp,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Writes a credentials file for triad and returns its path.
    pub fn credentials_file(&self, dir: &Path) -> PathBuf {
        write_credentials(dir)
    }

    /// Where the server keeps an object on disk.
    pub fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.root.join(bucket).join(key)
    }

    /// Every object key under `prefix` in `bucket`.
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let base = self.root.join(bucket);
        let mut out: Vec<String> = walkdir::WalkDir::new(base.join(prefix))
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file())
            .filter_map(|e| {
                let rel = e.path().strip_prefix(&base).ok()?.to_str()?.to_string();
                // s3s-fs keeps its own metadata and upload state beside objects.
                (!rel.contains(".s3s") && !rel.contains("upload")).then_some(rel)
            })
            .collect();
        out.sort();
        out
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy that, per connection, answers 500, resets, stalls, or
/// forwards (and then cuts the connection after a while), at the rates set.
pub struct FaultProxy {
    pub port: u16,
    stop: Arc<AtomicBool>,
    pub faults: Arc<AtomicU64>,
    pub connections: Arc<AtomicU64>,
}

impl FaultProxy {
    /// `fault_percent` of connections get a fault.
    pub fn start(upstream_port: u16, fault_percent: u64) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let faults = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let (s, f, c) = (stop.clone(), faults.clone(), connections.clone());
        std::thread::spawn(move || {
            let mut n: u64 = 0;
            while !s.load(Ordering::Acquire) {
                let (client, _) = match listener.accept() {
                    Ok(x) => x,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                let _ = client.set_nonblocking(false);
                n += 1;
                c.fetch_add(1, Ordering::Relaxed);
                // A fixed pseudo-random sequence: the same faults every run.
                let roll = (n.wrapping_mul(2_654_435_761) >> 7) % 100;
                let kind = if roll < fault_percent {
                    f.fetch_add(1, Ordering::Relaxed);
                    roll % 3
                } else {
                    3
                };
                std::thread::spawn(move || handle(client, upstream_port, kind, n));
            }
        });
        FaultProxy {
            port,
            stop,
            faults,
            connections,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn handle(mut client: TcpStream, upstream_port: u16, kind: u64, n: u64) {
    let mut buf = [0u8; 4096];
    match kind {
        0 => {
            let _ = client.read(&mut buf);
            let _ = client.write_all(
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            let _ = client.shutdown(Shutdown::Both);
        }
        1 => {
            let _ = client.read(&mut buf);
            // Reset: close with unread data pending.
            drop(client);
        }
        2 => {
            // Stall: accept the request and never answer.
            let _ = client.read(&mut buf);
            std::thread::sleep(Duration::from_secs(20));
        }
        _ => {
            let Ok(up) = TcpStream::connect(("127.0.0.1", upstream_port)) else {
                return;
            };
            // Forwarded connections are cut after a while, sometimes
            // mid-request, so pooled connections fail too.
            let life = Duration::from_millis(300 + (n * 7919) % 3000);
            let (c2, u2) = (client.try_clone().unwrap(), up.try_clone().unwrap());
            let t1 = std::thread::spawn(move || pipe(c2, u2));
            let t2 = {
                let (u3, c3) = (up.try_clone().unwrap(), client.try_clone().unwrap());
                std::thread::spawn(move || pipe(u3, c3))
            };
            let start = Instant::now();
            while start.elapsed() < life && !t1.is_finished() && !t2.is_finished() {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = client.shutdown(Shutdown::Both);
            let _ = up.shutdown(Shutdown::Both);
            let _ = t1.join();
            let _ = t2.join();
        }
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// A TCP proxy in front of the S3 server that counts HTTP requests by
/// method, so a benchmark compares how many requests each tool made. It
/// reads each request's head, forwards it, and skips its body by
/// `Content-Length` or chunked framing; responses pass through untouched.
pub struct CountingProxy {
    pub port: u16,
    counts: Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>>,
    stop: Arc<AtomicBool>,
}

impl CountingProxy {
    pub fn start(upstream_port: u16) -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let counts: Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>> = Arc::default();
        let (s, c) = (stop.clone(), counts.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Acquire) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                let _ = client.set_nonblocking(false);
                let c = c.clone();
                std::thread::spawn(move || {
                    let Ok(up) = TcpStream::connect(("127.0.0.1", upstream_port)) else {
                        return;
                    };
                    // A connection that cannot be cloned is dropped: the
                    // client sees it closed and retries.
                    let (Ok(u2), Ok(c2)) = (up.try_clone(), client.try_clone()) else {
                        return;
                    };
                    let back = std::thread::spawn(move || pipe(u2, c2));
                    count_requests(client, up, &c);
                    let _ = back.join();
                });
            }
        });
        CountingProxy { port, counts, stop }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Requests so far, by method.
    pub fn counts(&self) -> std::collections::BTreeMap<String, u64> {
        self.counts.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// All requests so far.
    pub fn total(&self) -> u64 {
        self.counts().values().sum()
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Forwards client -> server, counting each request head's method.
fn count_requests(
    from: TcpStream,
    mut to: TcpStream,
    counts: &std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
) {
    let Ok(reader) = from.try_clone() else {
        return;
    };
    let mut r = std::io::BufReader::with_capacity(64 << 10, reader);
    loop {
        // The head: lines up to an empty one.
        let mut head = Vec::new();
        loop {
            let mut line = Vec::new();
            match std::io::BufRead::read_until(&mut r, b'\n', &mut line) {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown(Shutdown::Write);
                    let _ = from.shutdown(Shutdown::Read);
                    return;
                }
                Ok(_) => {}
            }
            let end = line == b"\r\n" || line == b"\n";
            head.extend_from_slice(&line);
            if end && head.len() > line.len() {
                break;
            }
            if end {
                // Blank lines between requests.
                head.clear();
            }
        }
        let text = String::from_utf8_lossy(&head).to_string();
        let method = text.split_whitespace().next().unwrap_or("?").to_string();
        if let Ok(mut c) = counts.lock() {
            *c.entry(method).or_default() += 1;
        }
        if to.write_all(&head).is_err() {
            return;
        }
        let header = |name: &str| {
            text.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
        };
        let chunked = header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
        if chunked {
            loop {
                let mut size_line = Vec::new();
                if std::io::BufRead::read_until(&mut r, b'\n', &mut size_line).unwrap_or(0) == 0
                    || to.write_all(&size_line).is_err()
                {
                    return;
                }
                let s = String::from_utf8_lossy(&size_line);
                let n =
                    u64::from_str_radix(s.trim().split(';').next().unwrap_or("0"), 16).unwrap_or(0);
                // The chunk and its CRLF (the last, empty one: its CRLF).
                if copy_exact(&mut r, &mut to, n + 2).is_err() {
                    return;
                }
                if n == 0 {
                    break;
                }
            }
        } else if let Some(n) = header("content-length").and_then(|v| v.parse::<u64>().ok()) {
            if copy_exact(&mut r, &mut to, n).is_err() {
                return;
            }
        }
    }
}

fn copy_exact(r: &mut impl Read, to: &mut TcpStream, n: u64) -> std::io::Result<()> {
    let copied = std::io::copy(&mut r.take(n), to)?;
    if copied < n {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}
