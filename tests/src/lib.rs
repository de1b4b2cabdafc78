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
    serde_json::from_slice(&std::fs::read(site.join("datasets/files/status.json")).ok()?).ok()
}
