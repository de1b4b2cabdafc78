//! Cross-site verify over the replication port: three equal copies verify
//! clean from any site; a follower that was fed another history from some
//! seq on (by a forged upstream) is named as the odd one out, with the
//! checkpoints between which its chain parted and the paths that differ.

use crate::common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::deploy::*;
use common::*;
use rand::SeedableRng;

fn write_some(root: &Path, tag: &str, n: usize, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for i in 0..n {
        let d = root.join(format!("{tag}/{}", i % 7));
        std::fs::create_dir_all(&d).unwrap();
        write_file(
            &d.join(format!("f{i}")),
            100 + (i * 997) % 9_000,
            i % 2 == 0,
            &mut rng,
        );
    }
}

fn verify(site: &Site) -> (bool, serde_json::Value) {
    let out = site.cli(&["verify", "--dataset", "files", "--json"]);
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), v)
}

/// Verify once every site answers (a site just restarted may not serve yet).
fn verify_all_up(site: &Site) -> (bool, serde_json::Value) {
    let start = Instant::now();
    loop {
        let (ok, v) = verify(site);
        let all_up = v["sites"]
            .as_array()
            .is_some_and(|s| s.iter().all(|x| x["error"].is_null()));
        if all_up || start.elapsed() > Duration::from_secs(30) {
            return (ok, v);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn head(site: &Site) -> u64 {
    site.status()
        .and_then(|v| v["log"]["head_seq"].as_u64())
        .unwrap_or(0)
}

fn wait_head(site: &Site, at_least: u64) {
    let start = Instant::now();
    while head(site) < at_least {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{} stayed at seq {} (< {at_least})\n{}",
            site.config.display(),
            head(site),
            site.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn equal_copies_verify_clean_and_a_forked_follower_is_named_with_where_it_parted() {
    let mut dep = Deployment::new(None);
    // The primary goes on when the same-city site is gone.
    dep.sync_policy = "on_unreachable = \"degrade\"\nwait_limit = \"1s\"\n".into();
    dep.configure(None);
    // The remote site archives into the embedded default store (file://).
    let c_archive = dep.c.tmp.path().join("archive");
    let mut c_text = std::fs::read_to_string(&dep.c.config).unwrap();
    c_text.push_str(&format!(
        // One object per chunk (the layout before packs), so a single
        // chunk can be taken out of this archive.
        "\n[archive]\nurl = \"file://{}\"\nlog_flush_interval = \"500ms\"\npack_size = \"0\"\n",
        c_archive.display()
    ));
    dep.c.set_config(&c_text);
    write_some(&dep.a.source, "first", 300, 1);
    dep.start();
    dep.a.wait_settled(now_ns(), Duration::from_secs(60));
    let (fork_seq, _, _) = wait_replicated(&dep.a, &[&dep.b, &dep.c], Duration::from_secs(60));
    assert!(fork_seq >= 256, "a checkpoint exists: head {fork_seq}");

    // Clean, asked from the primary and from the remote site.
    for s in [&dep.a, &dep.c] {
        let (ok, v) = verify(s);
        assert!(ok, "{v}");
        assert_eq!(v["agree"], true, "{v}");
        assert_eq!(v["compared_seq"].as_u64(), Some(fork_seq / 256 * 256));
    }

    // A chunk object deleted from the remote site's archive: its archive
    // scrub finds it, verify from the primary names the site, and a repair
    // from the site's copy clears it.
    dep.c.wait_shipped(fork_seq, Duration::from_secs(60));
    let victim = std::fs::read_dir(c_archive.join("files/chunks"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .next()
        .expect("a chunk object");
    std::fs::remove_file(&victim).unwrap();
    let archive_scrub = |repair: bool| {
        let mut cmd = Command::new(triad_bin());
        cmd.args(["verify", "--dataset", "files", "--archive", "--config"])
            .arg(&dep.c.config);
        if repair {
            cmd.arg("--repair");
        }
        cmd.output().unwrap()
    };
    assert!(!archive_scrub(false).status.success());
    let (ok, v) = verify(&dep.a);
    assert!(!ok, "{v}");
    assert_eq!(v["damaged_sites"], serde_json::json!(["sjz-c"]), "{v}");
    let out = archive_scrub(true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(victim.exists(), "re-uploaded from the site's copy");
    let (ok, v) = verify(&dep.a);
    assert!(ok, "clean after the archive repair: {v}");

    // A byte flipped in the remote site's stored chunk: its scrub finds it,
    // cross-site verify from the primary names the site, and a repair with
    // bytes from another site (over the replication port) clears it.
    assert!(dep.c.stop().success());
    let flipped = flip_stored_chunk(&dep.c, b"first/2/f2");
    // Not in its own archive either: the good bytes must come from a site.
    let _ = std::fs::remove_file(c_archive.join(format!("files/chunks/{flipped}")));
    let scrub = |s: &Site, repair: bool| {
        let mut c = Command::new(triad_bin());
        c.args(["verify", "--dataset", "files", "--scrub", "--config"])
            .arg(&s.config);
        if repair {
            c.arg("--repair");
        }
        c.output().unwrap()
    };
    let out = scrub(&dep.c, false);
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    dep.c.start();
    wait_head(&dep.c, fork_seq);
    let (ok, v) = verify_all_up(&dep.a);
    assert!(!ok, "{v}");
    assert_eq!(v["damaged_sites"], serde_json::json!(["sjz-c"]), "{v}");
    assert!(dep.c.stop().success());
    let out = scrub(&dep.c, true);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("REPAIRED") && text.contains("from site zjk-"),
        "{text}"
    );
    dep.c.start();
    wait_head(&dep.c, fork_seq);
    let (ok, v) = verify_all_up(&dep.a);
    assert!(ok, "clean after the repair: {v}");

    // A forged upstream that shares the history up to `fork_seq`: a copy of
    // the primary's site, which then takes other changes.
    assert!(dep.b.stop().success());
    assert!(dep.a.stop().success());
    let mut forged = Site::new();
    forged.share_key_of(&dep.a);
    for (from, to) in [(&dep.a.data, &forged.data), (&dep.a.source, &forged.source)] {
        let _ = std::fs::remove_dir_all(to);
        let st = Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(to)
            .status()
            .unwrap();
        assert!(st.success());
    }
    let port = free_port();
    forged.set_config(&format!(
        "[site]\nname = \"zjk-a\"\nrole = \"primary\"\ndata_dir = \"{}\"\n\n[listen]\nreplication = \"127.0.0.1:{port}\"\n\n{}\n{}[[dataset]]\nname = \"files\"\nkey_file = \"{}\"\nsource = {{ kind = \"directory\", path = \"{}\", debounce = \"100ms\" }}\n",
        forged.data.display(),
        tls(&dep.names.certs, "zjk-a"),
        peer("zjk-b", dep.ports[1], Some("async")),
        forged.key.display(),
        forged.source.display()
    ));
    forged.start();
    write_some(&forged.source, "fake", 300, 8);
    dep.a.start();
    write_some(&dep.a.source, "real", 300, 9);
    // The same-city site now follows the forged upstream.
    let b_config = std::fs::read_to_string(&dep.b.config).unwrap();
    dep.b.set_config(&b_config.replace(
        &format!("127.0.0.1:{}\"", dep.ports[0]),
        &format!("127.0.0.1:{port}\""),
    ));
    dep.b.start();
    let target = (fork_seq / 256 + 1) * 256;
    wait_head(&forged, target);
    wait_head(&dep.a, target);
    wait_head(&dep.b, target);
    wait_head(&dep.c, target);

    let (ok, v) = verify(&dep.c);
    assert!(!ok, "{v}");
    assert_eq!(v["agree"], false);
    assert_eq!(v["odd_site"], "zjk-b", "{v}");
    let until = v["agreed_until"].as_u64().unwrap();
    let from = v["differs_from"].as_u64().unwrap();
    assert!(
        until <= fork_seq && fork_seq < from,
        "parted between {until} and {from}, forked at {fork_seq}: {v}"
    );
    let paths = v["differing_paths"].to_string();
    assert!(paths.contains("fake/") || paths.contains("real/"), "{v}");
    forged.stop();

    // Re-sync the odd site from the majority: its copy is moved aside as
    // evidence and it follows the real primary again from scratch.
    assert!(dep.b.stop().success());
    let out = dep.b.cli(&["resync", "--dataset", "files"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kept = std::fs::read_dir(dep.b.data.join("datasets"))
        .unwrap()
        .flatten()
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("files.replaced-")
        });
    assert!(kept, "the replaced copy is kept");
    dep.b.set_config(&b_config);
    dep.b.start();
    wait_replicated(&dep.a, &[&dep.b, &dep.c], Duration::from_secs(120));
    let target = head(&dep.a);
    if target / 256 * 256 > 0 {
        let (ok, v) = verify(&dep.c);
        assert!(ok, "clean after the re-sync: {v}");
    }
}

/// Flips a byte inside the stored (sealed) bytes of `path`'s first chunk,
/// where RocksDB keeps it in a blob file: damage no write path would make.
fn flip_stored_chunk(site: &Site, path: &[u8]) -> vault::ChunkId {
    let (id, sealed) = {
        let st = vault::state::State::open_read_only(&site.dataset_dir().join("state")).unwrap();
        let e = st.entry(path).unwrap().unwrap();
        let id = e.chunks()[0].id;
        (id, st.chunk_bytes(&id).unwrap().unwrap())
    };
    let needle = &sealed[sealed.len() / 2..sealed.len() / 2 + 64];
    for e in std::fs::read_dir(site.dataset_dir().join("state")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "blob") {
            let mut b = std::fs::read(&p).unwrap();
            if let Some(pos) = b.windows(needle.len()).position(|w| w == needle) {
                b[pos + 10] ^= 0x01;
                std::fs::write(&p, &b).unwrap();
                return id;
            }
        }
    }
    panic!("the chunk's bytes are not in a blob file");
}
