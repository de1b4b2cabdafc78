//! Helpers shared by the benchmark harnesses in `src/bin/` and the
//! end-to-end tests in tests/: test trees, arguments, and the S3 test server.

pub mod s3;

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
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port")
    };
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
                let mode = match (i, j) {
                    (0, 1) => "mode = \"sync\"\n",
                    (0, 2) => "mode = \"async\"\n",
                    _ => "",
                };
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
        let source = if i == 0 { source } else { "" };
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
