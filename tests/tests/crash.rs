//! SIGKILL at random moments under a heavy write load, twenty times: after the
//! last restart nothing is lost, the restored tree equals the source, and the
//! running digest equals a full recomputation.

use crate::common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng};

fn churn(root: &Path, stop: &AtomicBool, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    while !stop.load(Ordering::Relaxed) {
        let dir = root.join(format!("d{}", rng.gen_range(0..8)));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("f{}", rng.gen_range(0..150)));
        match rng.gen_range(0..10) {
            0 => {
                let _ = std::fs::remove_file(&p);
            }
            1 => {
                let _ = std::fs::rename(&p, dir.join(format!("f{}", rng.gen_range(0..150))));
            }
            2 => write_file(
                &p,
                rng.gen_range(1 << 20..5 << 20),
                rng.gen_bool(0.5),
                &mut rng,
            ),
            _ => write_file(&p, rng.gen_range(0..64 << 10), rng.gen_bool(0.5), &mut rng),
        }
    }
}

#[test]
fn survives_twenty_sigkills_under_write_load() {
    let mut site = Site::new();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (root, stop) = (site.source.clone(), stop.clone());
        std::thread::spawn(move || churn(&root, &stop, 11))
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    for round in 0..20 {
        site.start();
        std::thread::sleep(Duration::from_millis(rng.gen_range(300..1500)));
        site.kill9();
        // Restart at once every other time; otherwise let writes pile up first.
        if round % 2 == 1 {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    site.start();
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let done = now_ns();
    site.wait_settled(done, Duration::from_secs(120));
    let log = site.log_text();
    assert!(
        log.contains("replayed the change log") || log.contains("torn tail"),
        "the kills should have left work for recovery:\n{log}"
    );

    let restored = site.tmp.path().join("restored");
    let out = site.restore(&restored);
    assert!(
        out.status.success(),
        "restore: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_tree(&site.source, &restored);
    // One more kill without warning, then check the state as a restart finds it.
    site.kill9();
    site.start();
    site.wait_settled(now_ns(), Duration::from_secs(60));
    assert!(site.stop().success());
    check_state_invariants(&site);
}
