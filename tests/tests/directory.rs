//! A real daemon watches a directory while a burst of changes lands on it;
//! a restore from the site's store must then equal the tree byte for byte
//! and in metadata, with the daemon running and after it stopped.

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng};

#[test]
fn restored_tree_equals_source_after_a_burst_of_changes() {
    let mut site = Site::new();
    let src = site.source.clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    // Some content exists before the daemon starts: the initial scan.
    for i in 0..300 {
        let d = src.join(format!("pre/{}", i % 10));
        std::fs::create_dir_all(&d).unwrap();
        write_file(
            &d.join(format!("{i}.txt")),
            rng.gen_range(0..20_000),
            i % 3 == 0,
            &mut rng,
        );
    }
    site.start();
    site.wait_settled(now_ns(), Duration::from_secs(60));

    // A few thousand files: nested dirs, empty, large, symlinks.
    for i in 0..2500 {
        let d = src.join(format!("a{}/b{}/c{}", i % 5, i % 11, i % 3));
        std::fs::create_dir_all(&d).unwrap();
        let len = match i % 50 {
            0 => 6 << 20,
            1 => 0,
            2..=5 => rng.gen_range(100_000..1_500_000),
            _ => rng.gen_range(1..30_000),
        };
        write_file(&d.join(format!("f{i}")), len, i % 2 == 0, &mut rng);
    }
    for i in 0..50 {
        std::os::unix::fs::symlink(
            format!("../b{}/f{i}", i % 11),
            src.join(format!("a{}/link{i}", i % 5)),
        )
        .unwrap();
    }
    std::os::unix::fs::symlink("/nonexistent/target", src.join("dangling")).unwrap();
    // Overwrite, append, rename files and a directory, delete, chmod.
    for i in (0..2500).step_by(7) {
        let p = src.join(format!("a{}/b{}/c{}/f{i}", i % 5, i % 11, i % 3));
        write_file(&p, rng.gen_range(0..40_000), true, &mut rng);
    }
    for i in (3..2500).step_by(13) {
        use std::io::Write;
        let p = src.join(format!("a{}/b{}/c{}/f{i}", i % 5, i % 11, i % 3));
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"appended line\n").unwrap();
    }
    // A large file grows at its end: only the new chunks travel.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(src.join("a0/b0/c0/f0"))
            .unwrap();
        f.write_all(&vec![7u8; 3 << 20]).unwrap();
    }
    for i in (5..2500).step_by(17) {
        let p = src.join(format!("a{}/b{}/c{}/f{i}", i % 5, i % 11, i % 3));
        if p.exists() {
            std::fs::rename(&p, p.with_file_name(format!("renamed{i}"))).unwrap();
        }
    }
    std::fs::rename(src.join("a1/b1"), src.join("a2/moved-b1")).unwrap();
    std::fs::rename(src.join("pre/3"), src.join("pre-3-moved")).unwrap();
    for i in (9..2500).step_by(19) {
        let p = src.join(format!("a{}/b{}/c{}/f{i}", i % 5, i % 11, i % 3));
        let _ = std::fs::remove_file(p);
    }
    std::fs::remove_dir_all(src.join("a4/b4")).unwrap();
    std::fs::remove_dir_all(src.join("pre/7")).unwrap();
    std::fs::set_permissions(
        src.join("a0/b0/c0/f0"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    std::fs::set_permissions(src.join("a3"), std::fs::Permissions::from_mode(0o750)).unwrap();
    // A file replaced by a directory and a directory by a file.
    std::fs::remove_file(src.join("pre/0/0.txt")).unwrap();
    std::fs::create_dir(src.join("pre/0/0.txt")).unwrap();
    std::fs::remove_dir_all(src.join("pre/1")).unwrap();
    std::fs::write(src.join("pre/1"), b"now a file").unwrap();
    filetime::set_file_mtime(
        src.join("pre/2/2.txt"),
        filetime::FileTime::from_unix_time(1_000_000_000, 5),
    )
    .unwrap();
    let done = now_ns();

    let status = site.wait_settled(done, Duration::from_secs(120));
    let head = status["log"]["head_seq"].as_u64().unwrap();
    assert!(
        head > 2000,
        "a record per changed file at least, head seq {head}"
    );

    let live = site.tmp.path().join("restored-live");
    let out = site.restore(&live);
    assert!(
        out.status.success(),
        "restore failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("matches the recorded digest"));
    assert_same_tree(&src, &live);

    assert!(site.stop().success(), "clean stop exits 0");
    let stopped = site.tmp.path().join("restored-stopped");
    let out = site.restore(&stopped);
    assert!(
        out.status.success(),
        "restore with the daemon stopped: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_tree(&src, &stopped);
    check_state_invariants(&site);

    // A restart with nothing changed logs nothing new.
    site.start();
    let after = site.wait_settled(now_ns(), Duration::from_secs(60));
    assert_eq!(
        after["log"]["head_seq"].as_u64().unwrap(),
        head,
        "an unchanged tree adds no records"
    );
    assert!(site.stop().success());
}

#[test]
fn restore_refuses_a_non_empty_target() {
    let mut site = Site::new();
    std::fs::write(site.source.join("x"), b"x").unwrap();
    site.start();
    site.wait_settled(now_ns(), Duration::from_secs(60));
    let target = site.tmp.path().join("busy");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("keep-me"), b"precious").unwrap();
    let out = site.restore(&target);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not empty"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(target.join("keep-me")).unwrap(), b"precious");
}
