//! Bad input gets a clear error and loses nothing: a torn log tail, a flipped
//! byte in the middle of a segment, a flipped byte in a stored chunk, a wrong
//! key, a malformed config.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use rand::SeedableRng;

fn segments(site: &Site) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(site.dataset_dir().join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

/// A site with some files logged, stopped cleanly.
fn populated_site() -> Site {
    let mut site = Site::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for i in 0..40 {
        write_file(
            &site.source.join(format!("f{i}")),
            10_000 + i * 1000,
            i % 2 == 0,
            &mut rng,
        );
    }
    write_file(&site.source.join("big"), 3 << 20, false, &mut rng);
    site.start();
    site.wait_settled(now_ns(), Duration::from_secs(60));
    assert!(site.stop().success());
    site
}

/// Every file under `dir` with its bytes, to prove nothing was written.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn torn_log_tail_is_cut_logged_and_nothing_acknowledged_is_lost() {
    let mut site = populated_site();
    let seg = segments(&site).pop().unwrap();
    // A crash in the middle of writing a record: a frame header promising
    // more bytes than made it to disk.
    let mut bytes = std::fs::read(&seg).unwrap();
    let good_len = bytes.len();
    bytes.extend_from_slice(&5000u32.to_le_bytes());
    bytes.extend_from_slice(&[0xAB; 4]);
    bytes.extend_from_slice(&[0x11; 700]);
    std::fs::write(&seg, &bytes).unwrap();

    site.start();
    site.wait_settled(now_ns(), Duration::from_secs(60));
    assert!(
        site.log_text().contains("cutting a torn tail"),
        "{}",
        site.log_text()
    );
    assert!(std::fs::metadata(&seg).unwrap().len() >= good_len as u64);
    std::fs::write(site.source.join("after"), b"written after recovery").unwrap();
    site.wait_settled(now_ns(), Duration::from_secs(60));
    let restored = site.tmp.path().join("r");
    let out = site.restore(&restored);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_tree(&site.source, &restored);
}

#[test]
fn flipped_byte_in_the_middle_of_a_segment_stops_the_start_naming_segment_and_offset() {
    let mut site = populated_site();
    let seg = segments(&site).pop().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    // Inside the first record's payload (after the 32-byte segment header
    // and the 8-byte frame header): damage before the last frame. A byte in
    // the segment's middle could fall in its last record, when that one
    // record is over half the segment, and damage in the last frame of the
    // newest segment reads as a record still being written (restore is
    // right to take the log up to it).
    let at = 32 + 8 + 4;
    bytes[at] ^= 0x20;
    std::fs::write(&seg, &bytes).unwrap();
    let before = snapshot(&site.dataset_dir().join("log"));

    site.start();
    let st = site.wait_exit(Duration::from_secs(30));
    assert!(!st.success());
    let log = site.log_text();
    assert!(
        log.contains("corrupt change log")
            && log.contains(&seg.display().to_string())
            && log.contains("offset"),
        "{log}"
    );
    assert_eq!(
        snapshot(&site.dataset_dir().join("log")),
        before,
        "the damaged log must be left as it was"
    );
    // Restore refuses too, with the same explanation.
    let out = site.restore(&site.tmp.path().join("r"));
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("corrupt change log"), "{text}");
}

#[test]
fn flipped_byte_in_a_stored_chunk_is_detected_on_restore_and_named() {
    let site = populated_site();
    // Find where the sealed bytes of a file's chunk sit on disk (chunks of
    // over 1 KiB live in RocksDB blob files, written once).
    let (id, sealed) = {
        let st = vault::state::State::open_read_only(&site.dataset_dir().join("state")).unwrap();
        let e = st.entry(b"f0").unwrap().unwrap();
        let id = e.chunks()[0].id;
        (id, st.chunk_bytes(&id).unwrap().unwrap())
    };
    let needle = &sealed[100..164];
    let mut hit = None;
    for e in std::fs::read_dir(site.dataset_dir().join("state")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "blob") {
            continue;
        }
        let b = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        if let Some(pos) = b.windows(needle.len()).position(|w| w == needle) {
            hit = Some((p, pos + 10));
            break;
        }
    }
    let (file, pos) = hit.expect("sealed chunk bytes found in a RocksDB blob file");
    let mut b = std::fs::read(&file).unwrap();
    b[pos] ^= 0x01;
    std::fs::write(&file, &b).unwrap();

    let to = site.tmp.path().join("r");
    let out = site.restore(&to);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "restore must fail: {text}");
    assert!(text.contains(&id.to_string()), "names the chunk: {text}");
    assert!(text.contains("f0:"), "names the file: {text}");
    // The other files were restored.
    assert_eq!(
        std::fs::read(to.join("f3")).ok(),
        std::fs::read(site.source.join("f3")).ok(),
        "{text}"
    );
    assert!(
        !to.join("f0").exists(),
        "a file with a bad chunk is not put in place"
    );
    assert_eq!(
        text.matches("problem:").count(),
        1,
        "only the damaged file is affected: {text}"
    );
}

#[test]
fn wrong_key_refuses_to_start_and_writes_nothing() {
    let mut site = populated_site();
    std::fs::write(site.source.join("new-file"), b"must not be logged").unwrap();
    let before = snapshot(&site.dataset_dir());
    std::fs::remove_file(&site.key).unwrap();
    let out = Command::new(triad_bin())
        .args(["keygen", "--out"])
        .arg(&site.key)
        .output()
        .unwrap();
    assert!(out.status.success());

    site.start();
    let st = site.wait_exit(Duration::from_secs(30));
    assert!(!st.success());
    let log = site.log_text();
    assert!(
        log.contains("wrong key for dataset files") && log.contains("nothing was written"),
        "{log}"
    );
    assert_eq!(
        snapshot(&site.dataset_dir()),
        before,
        "nothing in the dataset directory changed"
    );
    let out = site.restore(&site.tmp.path().join("r"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong key"));
}

#[test]
fn malformed_configs_are_refused_naming_the_field() {
    let site = Site::new();
    let good = std::fs::read_to_string(&site.config).unwrap();
    let check = |text: &str| {
        std::fs::write(&site.config, text).unwrap();
        let out = Command::new(triad_bin())
            .args(["config", "check"])
            .arg(&site.config)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string()
                + &String::from_utf8_lossy(&out.stdout),
        )
    };
    let (ok, text) = check(&good);
    assert!(ok, "{text}");
    let cases = [
        (
            good.replace("role = \"primary\"", "role = \"leader\""),
            "role",
        ),
        (
            good.replace("data_dir = \"", "data_dir = \"relative/"),
            "site.data_dir",
        ),
        (
            good.replace("debounce = \"100ms\"", "debounce = \"soon\""),
            "dataset[0].source.debounce",
        ),
        (
            good.replace("name = \"files\"", "name = \"bad name!\""),
            "dataset[0].name",
        ),
        (good.replace("key_file", "keyfile"), "keyfile"),
        (good.replace("[[dataset]]", "[[datasets]]"), "datasets"),
        ("[site\nname=".to_string(), "primary.toml"),
    ];
    for (text, field) in cases {
        let (ok, out) = check(&text);
        assert!(!ok, "accepted a bad config:\n{text}");
        assert!(out.contains(field), "error should name `{field}`: {out}");
    }
    // The daemon refuses the same way, before touching anything.
    std::fs::write(
        &site.config,
        good.replace("role = \"primary\"", "role = \"leader\""),
    )
    .unwrap();
    let out = site.cli(&["daemon"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("role"));
    assert!(!site.data.exists(), "nothing created on a bad config");
    // A key file readable by others is refused with the fix.
    std::fs::write(&site.config, &good).unwrap();
    std::fs::set_permissions(
        &site.key,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let (ok, out) = check(&good);
    assert!(!ok && out.contains("chmod 600"), "{out}");
}

#[test]
fn a_file_that_vanishes_or_cannot_be_read_is_not_fatal() {
    let mut site = Site::new();
    // A fifo is not something triad keeps: skipped without error.
    let fifo = site.source.join("pipe");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    std::fs::write(site.source.join("kept"), b"kept").unwrap();
    site.start();
    site.wait_settled(now_ns(), Duration::from_secs(60));
    // Files created and removed at once: deletes, not errors.
    for i in 0..200 {
        let p = site.source.join(format!("brief{i}"));
        std::fs::write(&p, vec![1u8; 5000]).unwrap();
        std::fs::remove_file(&p).unwrap();
    }
    std::fs::remove_file(&fifo).unwrap();
    let v = site.wait_settled(now_ns(), Duration::from_secs(60));
    assert!(v["failure"].is_null());
    let r = site.tmp.path().join("r");
    assert!(site.restore(&r).status.success());
    assert_same_tree(&site.source, &r);
}
