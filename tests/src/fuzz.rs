//! A small mutation fuzzer for triad's decoders (tests/tests/fuzz.rs and
//! the daemon's own targets): valid encodings are mutated (bit flips,
//! truncations, insertions, repeated slices, length and seq fields set to
//! edge values, splices of other seeds) and fed to a target, and any panic
//! is a finding. It needs no nightly toolchain and no rebuild of RocksDB
//! under coverage flags, at the price of not being coverage-guided.

use std::panic::AssertUnwindSafe;

use rand::{Rng, SeedableRng};

static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Inputs per target: `TRIAD_FUZZ_INPUTS`, default 2,000 (the CI smoke).
pub fn inputs() -> u64 {
    std::env::var("TRIAD_FUZZ_INPUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

const EDGE_U64: [u64; 7] = [0, 1, 255, 1 << 31, u32::MAX as u64, u64::MAX - 1, u64::MAX];

/// One mutation of `seed`.
pub fn mutate(rng: &mut impl Rng, seed: &[u8], seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..rng.gen_range(1..=4) {
        let len = v.len();
        match rng.gen_range(0..8) {
            0 if len > 0 => {
                let i = rng.gen_range(0..len);
                v[i] ^= 1 << rng.gen_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.gen_range(0..len);
                v[i] = rng.gen();
            }
            2 if len > 0 => v.truncate(rng.gen_range(0..len)),
            3 => {
                let at = rng.gen_range(0..=len);
                let mut extra = vec![0u8; rng.gen_range(1..64)];
                rng.fill_bytes(&mut extra);
                v.splice(at..at, extra);
            }
            4 if len >= 8 => {
                // A length or seq field set to an edge value.
                let at = rng.gen_range(0..=len - 8);
                let e = EDGE_U64[rng.gen_range(0..EDGE_U64.len())];
                v[at..at + 8].copy_from_slice(&e.to_le_bytes());
            }
            5 if len >= 4 => {
                let at = rng.gen_range(0..=len - 4);
                let e = EDGE_U64[rng.gen_range(0..EDGE_U64.len())] as u32;
                v[at..at + 4].copy_from_slice(&e.to_le_bytes());
            }
            6 if len > 1 => {
                // A slice of the input repeated (repeated ids, records).
                let a = rng.gen_range(0..len);
                let b = rng.gen_range(a..len.min(a + 256)).max(a + 1).min(len);
                let piece = v[a..b].to_vec();
                let at = rng.gen_range(0..=v.len());
                v.splice(at..at, piece);
            }
            7 => {
                // Splice in part of another seed.
                let other = &seeds[rng.gen_range(0..seeds.len())];
                if !other.is_empty() {
                    let a = rng.gen_range(0..other.len());
                    let at = rng.gen_range(0..=v.len());
                    v.splice(at..at, other[a..].iter().copied().take(512));
                }
            }
            _ => {}
        }
    }
    v
}

/// Runs `target` on `inputs()` mutations of the seeds; fails naming the
/// first input that panicked.
pub fn campaign(name: &str, seeds: Vec<Vec<u8>>, target: impl Fn(&[u8])) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        std::env::var("TRIAD_FUZZ_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0x7121ad),
    );
    let n = inputs();
    // The panic hook is process-wide: one campaign at a time swaps it.
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let started = std::time::Instant::now();
    // Panics are the findings: keep the default hook from printing each.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut found = None;
    for i in 0..n {
        let input = if i < seeds.len() as u64 {
            seeds[i as usize].clone()
        } else {
            let seed = &seeds[rng.gen_range(0..seeds.len())];
            mutate(&mut rng, seed, &seeds)
        };
        if std::panic::catch_unwind(AssertUnwindSafe(|| target(&input))).is_err() {
            found = Some(input);
            break;
        }
    }
    std::panic::set_hook(hook);
    if let Some(input) = found {
        // Run it again with the hook back, so the panic is printed.
        eprintln!("{name}: input that panics: {}", hex(&input));
        target(&input);
        panic!("{name}: a decoder panicked");
    }
    eprintln!(
        "fuzz {name}: {n} inputs, 0 panics, {:.1}s, peak RSS {} MiB",
        started.elapsed().as_secs_f64(),
        peak_rss_mib()
    );
    assert!(peak_rss_mib() < 1024, "memory grew past 1 GiB");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        >> 10
}
