//! The archive against a real S3-compatible server (s3s-fs over HTTP): the
//! daemon ships its log and takes snapshots; point-in-time restores from the
//! archive alone (daemon killed) equal the source as it was; a store that
//! fails, resets and stalls still ends up with a complete archive and never
//! a half-made snapshot; damaged objects are named at restore; retention and
//! prune keep what they must and remove the rest after the grace period.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{assert_same_tree, now_ns, rfc3339, triad_bin, write_file, Site};
use rand::SeedableRng;
use triad_tests::s3::{FaultProxy, S3Server};

const BUCKET: &str = "triad";
const PREFIX: &str = "site-a";

fn with_archive(site: &Site, endpoint: &str, extra: &str) {
    site.add_s3_archive(endpoint, &format!("request_timeout = \"3s\"\n{extra}"));
}

fn triad(args: &[&str], config: &Path) -> Output {
    Command::new(triad_bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run triad")
}

fn ok(out: &Output, what: &str) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// Takes a snapshot through the running daemon; returns its seq.
fn snapshot(site: &Site) -> u64 {
    let v = ok(
        &triad(&["snapshot", "--dataset", "files", "--json"], &site.config),
        "triad snapshot",
    );
    v["snapshot"]["seq"].as_u64().expect("snapshot seq")
}

fn restore_from_archive(site: &Site, at: &str, to: &Path) -> Output {
    restore_with(site, at, to, &[])
}

fn restore_with(site: &Site, at: &str, to: &Path, extra: &[&str]) -> Output {
    Command::new(triad_bin())
        .args([
            "restore",
            "--from-archive",
            &format!("s3://{BUCKET}/{PREFIX}"),
        ])
        .args(["--dataset", "files", "--at", at, "--to"])
        .arg(to)
        .args(extra)
        .arg("--config")
        .arg(&site.config)
        .output()
        .expect("run restore")
}

/// The bytes a restore's summary line says it downloaded.
fn downloaded(summary: &str) -> u64 {
    summary
        .split(" bytes downloaded")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no download count in: {summary}"))
}

/// Copies the source tree aside (cp -a keeps modes and mtimes).
fn keep(site: &Site, name: &str) -> PathBuf {
    let to = site.tmp.path().join(name);
    let st = Command::new("cp")
        .arg("-a")
        .arg(&site.source)
        .arg(&to)
        .status()
        .unwrap();
    assert!(st.success());
    to
}

fn change(root: &Path, round: u32, rng: &mut rand::rngs::StdRng) {
    for i in 0..40u32 {
        let d = root.join(format!("r{}/d{}", i % 4, i % 7));
        std::fs::create_dir_all(&d).unwrap();
        write_file(
            &d.join(format!("f{i}")),
            (i as usize * 9_000 + round as usize * 1_000) % 300_000 + 10,
            i % 2 == 0,
            rng,
        );
    }
    if round > 1 {
        let _ = std::fs::remove_dir_all(root.join(format!("big{}", round - 1)));
    }
    std::fs::create_dir_all(root.join(format!("big{round}"))).unwrap();
    write_file(&root.join(format!("big{round}/blob")), 3 << 20, true, rng);
}

fn head_seq(v: &serde_json::Value) -> u64 {
    v["log"]["head_seq"].as_u64().unwrap()
}

#[test]
fn point_in_time_restores_from_s3_alone() {
    let s3 = S3Server::start(BUCKET);
    let mut site = Site::new();
    with_archive(&site, &s3.endpoint(), "");
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    site.start();

    change(&site.source, 1, &mut rng);
    let st = site.wait_settled(now_ns(), Duration::from_secs(60));
    let snap1 = snapshot(&site);
    assert!(snap1 >= head_seq(&st));
    let keep1 = keep(&site, "keep1");

    // Between the snapshots: only the archived log has this point.
    change(&site.source, 2, &mut rng);
    let st2 = site.wait_settled(now_ns(), Duration::from_secs(60));
    let seq2 = head_seq(&st2);
    let keep2 = keep(&site, "keep2");
    std::thread::sleep(Duration::from_millis(1100));
    let time2 = rfc3339(now_ns());
    std::thread::sleep(Duration::from_millis(1100));

    change(&site.source, 3, &mut rng);
    site.wait_settled(now_ns(), Duration::from_secs(60));
    let snap2 = snapshot(&site);
    change(&site.source, 4, &mut rng);
    let st4 = site.wait_settled(now_ns(), Duration::from_secs(60));
    let seq4 = head_seq(&st4);
    let keep4 = keep(&site, "keep4");
    site.wait_shipped(seq4, Duration::from_secs(60));
    assert!(
        snap1 < seq2 && seq2 < snap2 && snap2 <= seq4,
        "{snap1} {seq2} {snap2} {seq4}"
    );

    let listed = ok(
        &triad(&["snapshots", "--dataset", "files", "--json"], &site.config),
        "triad snapshots",
    );
    let seqs: Vec<u64> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![snap1, snap2]);

    // No daemon from here on: the archive alone.
    site.kill9();
    let cases: [(&str, String, &Path); 4] = [
        ("between snapshots, by seq", seq2.to_string(), &keep2),
        ("between snapshots, by time", time2, &keep2),
        ("at the first snapshot", snap1.to_string(), &keep1),
        ("latest", "latest".into(), &keep4),
    ];
    let mut full_bytes = Vec::new();
    for (i, (what, at, expect)) in cases.iter().enumerate() {
        let to = site.tmp.path().join(format!("restored-{i}"));
        let out = restore_from_archive(&site, at, &to);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        full_bytes.push(downloaded(&text));
        assert!(
            out.status.success(),
            "restore {what} (--at {at}) failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("matches the recorded digest"),
            "{what}: {text}"
        );
        assert_same_tree(expect, &to);
    }

    // A delta restore into the tree of the first snapshot after damage:
    // one file altered, one removed, a stray file added. Only the chunks
    // the tree lost are downloaded (a point that the log reaches past a
    // snapshot also downloads the chunks its records brought, which the
    // replay checks the chain with), and the stray file goes.
    let tree = site.tmp.path().join("restored-2");
    let out = restore_from_archive(&site, &snap1.to_string(), &tree);
    assert!(!out.status.success(), "a non-empty target needs --delta");
    let blob = tree.join("big1/blob");
    let mut b = std::fs::read(&blob).unwrap();
    b[10] ^= 0xff;
    std::fs::write(&blob, &b).unwrap();
    std::fs::remove_file(tree.join("r1/d1/f1")).unwrap();
    std::fs::write(tree.join("stray"), b"not in the dataset").unwrap();
    let out = restore_with(&site, &snap1.to_string(), &tree, &["--delta"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "delta restore: {text}");
    assert_same_tree(&keep1, &tree);
    let delta_bytes = downloaded(&text);
    assert!(
        delta_bytes > 0 && delta_bytes * 3 < full_bytes[2],
        "the delta restore downloaded {delta_bytes} bytes, a full one {}",
        full_bytes[2]
    );
    // And across points: the same tree brought to the latest.
    let out = restore_with(&site, "latest", &tree, &["--delta"]);
    ok(&out, "delta restore to the latest");
    assert_same_tree(&keep4, &tree);

    // With no config at all: key, endpoint and credentials on the command line.
    let to = site.tmp.path().join("restored-no-config");
    let out = Command::new(triad_bin())
        .args([
            "restore",
            "--from-archive",
            &format!("s3://{BUCKET}/{PREFIX}"),
        ])
        .args([
            "--dataset",
            "files",
            "--at",
            "latest",
            "--config",
            "/nonexistent/triad.toml",
        ])
        .arg("--key-file")
        .arg(&site.key)
        .args(["--endpoint", &s3.endpoint()])
        .arg("--credentials-file")
        .arg(site.tmp.path().join("s3.credentials"))
        .arg("--to")
        .arg(&to)
        .output()
        .unwrap();
    ok(&out, "restore without a config");
    assert_same_tree(&keep4, &to);

    // A seq past the archive is refused, clearly.
    let out = restore_from_archive(
        &site,
        &(seq4 + 1000).to_string(),
        &site.tmp.path().join("x"),
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("past the newest archived record"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_failing_store_delays_the_archive_but_never_breaks_it() {
    let s3 = S3Server::start(BUCKET);
    let proxy = FaultProxy::start(s3.port, 35);
    let mut site = Site::new();
    with_archive(&site, &proxy.endpoint(), "concurrency = 4");
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    site.start();
    let mut last = 0;
    for round in 1..=3 {
        change(&site.source, round, &mut rng);
        let st = site.wait_settled(now_ns(), Duration::from_secs(60));
        last = head_seq(&st);
        // Through the faults: a snapshot either completes or fails whole.
        let out = triad(&["snapshot", "--dataset", "files", "--json"], &site.config);
        if !out.status.success() {
            eprintln!(
                "snapshot through faults failed (allowed): {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
    // One more that must succeed, however many retries it takes; and more
    // until the proxy has injected a few faults (how many connections the
    // store client opens depends on timing, and so how many faults come).
    let start = Instant::now();
    let faults = || proxy.faults.load(std::sync::atomic::Ordering::Relaxed);
    let mut through = false;
    while !through || faults() < 5 {
        let out = triad(&["snapshot", "--dataset", "files", "--json"], &site.config);
        through |= out.status.success();
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "after 240 s: a snapshot got through: {through}; faults injected: {}",
            faults()
        );
    }
    site.wait_shipped(last, Duration::from_secs(240));
    let keep_last = keep(&site, "keep-last");
    assert!(
        proxy.faults.load(std::sync::atomic::Ordering::Relaxed) >= 5,
        "the proxy injected {} faults in {} connections",
        proxy.faults.load(std::sync::atomic::Ordering::Relaxed),
        proxy.connections.load(std::sync::atomic::Ordering::Relaxed)
    );
    site.stop();

    // Every visible snapshot is whole: each restores with its digest.
    let manifests = s3.keys(BUCKET, &format!("{PREFIX}/files/snapshots"));
    let mut snaps: Vec<u64> = manifests
        .iter()
        .filter_map(|k| k.rsplit('/').next()?.strip_suffix(".manifest"))
        .filter_map(|n| n.split('-').next()?.parse().ok())
        .collect();
    snaps.dedup();
    assert!(!snaps.is_empty());
    for seq in &snaps {
        let to = site.tmp.path().join(format!("snap-{seq}"));
        ok(
            &restore_from_archive(&site, &seq.to_string(), &to),
            "restore of a snapshot",
        );
    }
    let to = site.tmp.path().join("restored-latest");
    ok(
        &restore_from_archive(&site, "latest", &to),
        "restore latest",
    );
    assert_same_tree(&keep_last, &to);
}

#[test]
fn damaged_objects_are_named_at_restore() {
    let s3 = S3Server::start(BUCKET);
    let mut site = Site::new();
    with_archive(&site, &s3.endpoint(), "");
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    site.start();
    change(&site.source, 1, &mut rng);
    site.wait_settled(now_ns(), Duration::from_secs(60));
    let snap = snapshot(&site);
    change(&site.source, 2, &mut rng);
    site.wait_settled(now_ns(), Duration::from_secs(60));
    let snap2 = snapshot(&site);
    change(&site.source, 3, &mut rng);
    let st = site.wait_settled(now_ns(), Duration::from_secs(60));
    site.wait_shipped(head_seq(&st), Duration::from_secs(60));
    let keep_latest = keep(&site, "latest");
    site.stop();
    assert!(snap < snap2);

    // The newest snapshot's manifest altered: latest is restored from the
    // older snapshot and the log, and the skipped one is named.
    let manifest = s3
        .keys(BUCKET, &format!("{PREFIX}/files/snapshots"))
        .into_iter()
        .find(|k| k.ends_with(".manifest") && k.contains(&format!("{snap2:020}-")))
        .expect("second manifest");
    let mpath = s3.object_path(BUCKET, &manifest);
    let good_manifest = std::fs::read(&mpath).unwrap();
    let mut bad = good_manifest.clone();
    let at = bad.len() - 3;
    bad[at] ^= 1;
    std::fs::write(&mpath, &bad).unwrap();
    let to = site.tmp.path().join("r0");
    let out = restore_from_archive(&site, "latest", &to);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("skipped") && text.contains(&manifest),
        "{text}"
    );
    assert_same_tree(&keep_latest, &to);
    std::fs::write(&mpath, &good_manifest).unwrap();

    // New chunks are in packs, none in objects of their own.
    assert!(s3
        .keys(BUCKET, &format!("{PREFIX}/files/chunks"))
        .is_empty());
    // The newest pack holds chunks of the last round's files, which the
    // latest state needs.
    let packs = s3.keys(BUCKET, &format!("{PREFIX}/files/packs"));
    let victim = packs.iter().max_by_key(|k| {
        std::fs::metadata(s3.object_path(BUCKET, k))
            .and_then(|m| m.modified())
            .ok()
    });
    let victim = victim.expect("packs").clone();
    let path = s3.object_path(BUCKET, &victim);
    let original = std::fs::read(&path).unwrap();
    // A truncated pack (its index gone): the restore names it.
    std::fs::write(&path, &original[..original.len() / 2]).unwrap();
    let out = restore_from_archive(&site, "latest", &site.tmp.path().join("r1"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&victim) && err.contains("no pack trailer"),
        "the truncated pack is named: {err}"
    );
    // A byte flipped inside the pack's first chunk: named, with where.
    let mut flipped = original.clone();
    flipped[8 + 100] ^= 0x10;
    std::fs::write(&path, &flipped).unwrap();
    let out = restore_from_archive(&site, "latest", &site.tmp.path().join("r1b"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&victim) && err.contains("(bytes 8+") && err.contains("altered"),
        "the altered chunk in the pack is named: {err}"
    );
    // The pack's index altered: refused as unauthenticated.
    let mut forged = original.clone();
    let at = forged.len() - 12 - 20;
    forged[at] ^= 1;
    std::fs::write(&path, &forged).unwrap();
    let out = restore_from_archive(&site, "latest", &site.tmp.path().join("r1c"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&victim) && err.contains("tag does not verify"),
        "the forged index is named: {err}"
    );
    std::fs::write(&path, &original).unwrap();

    // A byte flipped in the oldest pack, whose chunks the first snapshot's
    // files need and which are written as they download: the files that
    // needed the chunk are named and left out, the rest are in place, and
    // a --delta restore from the repaired archive completes the tree.
    let oldest = packs
        .iter()
        .min_by_key(|k| {
            std::fs::metadata(s3.object_path(BUCKET, k))
                .and_then(|m| m.modified())
                .ok()
        })
        .expect("packs")
        .clone();
    let opath = s3.object_path(BUCKET, &oldest);
    let o_original = std::fs::read(&opath).unwrap();
    let mut o_flipped = o_original.clone();
    o_flipped[8 + 100] ^= 0x10;
    std::fs::write(&opath, &o_flipped).unwrap();
    let partial = site.tmp.path().join("r1d");
    let out = restore_from_archive(&site, &snap.to_string(), &partial);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&oldest) && err.contains("altered") && err.contains("path(s) not restored"),
        "the altered chunk and the files left out are named: {err}"
    );
    let in_place = std::fs::read_dir(&partial).map_or(0, |d| d.count());
    assert!(in_place > 0, "the rest of the tree is in place");
    std::fs::write(&opath, &o_original).unwrap();
    ok(
        &restore_with(&site, &snap.to_string(), &partial, &["--delta"]),
        "delta restore after the repair",
    );
    let whole = site.tmp.path().join("r1e");
    ok(
        &restore_from_archive(&site, &snap.to_string(), &whole),
        "restore of the first snapshot",
    );
    assert_same_tree(&whole, &partial);

    // An altered log piece: named too.
    let pieces = s3.keys(BUCKET, &format!("{PREFIX}/files/log"));
    let piece = pieces.last().expect("log pieces").clone();
    let ppath = s3.object_path(BUCKET, &piece);
    let mut bytes = std::fs::read(&ppath).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&ppath, &bytes).unwrap();
    let out = restore_from_archive(&site, "latest", &site.tmp.path().join("r2"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&piece) && err.contains("altered"),
        "the altered piece is named: {err}"
    );

    // Wrong credentials: a clear error, nothing restored.
    let bad = site.tmp.path().join("bad.credentials");
    std::fs::write(
        &bad,
        "access_key_id = \"nobody\"\nsecret_access_key = \"wrong\"\n",
    )
    .unwrap();
    let out = Command::new(triad_bin())
        .args([
            "restore",
            "--from-archive",
            &format!("s3://{BUCKET}/{PREFIX}"),
        ])
        .args(["--dataset", "files", "--config", "/nonexistent/triad.toml"])
        .arg("--key-file")
        .arg(&site.key)
        .args(["--endpoint", &s3.endpoint()])
        .arg("--credentials-file")
        .arg(&bad)
        .arg("--to")
        .arg(site.tmp.path().join("r3"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("credentials"), "{err}");
    assert!(!err.contains("wrong"), "the secret is not printed: {err}");
}

#[test]
fn retention_and_prune_keep_what_is_needed_and_remove_the_rest() {
    let s3 = S3Server::start(BUCKET);
    let mut site = Site::new();
    // One object per chunk, the layout of archives written before packs:
    // prune keeps deleting single chunks there (packs:
    // `packs_hold_new_chunks_and_an_archive_begun_without_them_stays_whole`).
    with_archive(
        &site,
        &s3.endpoint(),
        "prune_grace = \"1s\"\nretention = { last = 2 }\npack_size = \"0\"",
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    site.start();
    let mut kept = Vec::new();
    for round in 1..=6 {
        change(&site.source, round, &mut rng);
        site.wait_settled(now_ns(), Duration::from_secs(60));
        let seq = snapshot(&site);
        kept.push((seq, keep(&site, &format!("keep{round}"))));
    }
    let prune = |site: &Site| {
        ok(
            &triad(&["prune", "--dataset", "files", "--json"], &site.config),
            "triad prune",
        )
    };
    let first = prune(&site);
    assert_eq!(first["prune"]["snapshots_kept"], 2);
    assert_eq!(
        first["prune"]["snapshots_deleted"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    assert!(first["prune"]["chunks_marked"].as_u64().unwrap() > 0);
    assert_eq!(
        first["prune"]["chunks_deleted"], 0,
        "nothing goes before the grace period"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let second = prune(&site);
    let live = second["prune"]["chunks_live"].as_u64().unwrap();
    assert!(second["prune"]["chunks_deleted"].as_u64().unwrap() > 0);
    assert_eq!(second["prune"]["chunks_missing"], 0);
    site.stop();

    // The bucket holds exactly the chunks the kept snapshots reference.
    let chunks = s3.keys(BUCKET, &format!("{PREFIX}/files/chunks"));
    assert_eq!(chunks.len() as u64, live, "unreferenced chunks remain");

    // Every kept snapshot restores whole and equals its tree.
    for (seq, tree) in &kept[4..] {
        let to = site.tmp.path().join(format!("restored-{seq}"));
        ok(
            &restore_from_archive(&site, &seq.to_string(), &to),
            "restore of a kept snapshot",
        );
        assert_same_tree(tree, &to);
    }
    // A pruned one is gone, and says so.
    let out = restore_from_archive(&site, &kept[0].0.to_string(), &site.tmp.path().join("gone"));
    assert!(!out.status.success());

    // A chunk removed behind triad's back: prune says so and fails, and the
    // next snapshot (no daemon: the CLI does it) uploads it again.
    // A small file of the current tree is one chunk, which the dataset holds.
    let data = std::fs::read(site.source.join("r0/d0/f0")).unwrap();
    let id = vault::ChunkId::of(&site.key().derive(), &data);
    let victim = format!("{PREFIX}/files/chunks/{}", hex_of(&id.0));
    assert!(chunks.contains(&victim), "{victim} is stored");
    std::fs::remove_file(s3.object_path(BUCKET, &victim)).unwrap();
    let out = triad(&["prune", "--dataset", "files"], &site.config);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("MISSING: 1 chunks"), "{text}");
    ok(
        &triad(&["snapshot", "--dataset", "files", "--json"], &site.config),
        "snapshot without a daemon",
    );
    assert!(s3.object_path(BUCKET, &victim).exists(), "re-uploaded");
    let third = prune(&site);
    assert_eq!(third["prune"]["chunks_missing"], 0);
}

/// A pack whose index no longer reads back: prune names it and fails
/// while chunks it held are missing; a snapshot stores them again; then
/// prune sets the pack aside under `evidence/` after the grace period, and
/// the archive restores whole.
#[test]
fn a_damaged_pack_is_replaced_by_a_snapshot_and_set_aside_by_prune() {
    let s3 = S3Server::start(BUCKET);
    let mut site = Site::new();
    with_archive(&site, &s3.endpoint(), "prune_grace = \"1s\"");
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    site.start();
    change(&site.source, 1, &mut rng);
    let st = site.wait_settled(now_ns(), Duration::from_secs(60));
    site.wait_shipped(head_seq(&st), Duration::from_secs(60));
    snapshot(&site);
    let tree = keep(&site, "tree");
    site.stop();

    let packs = s3.keys(BUCKET, &format!("{PREFIX}/files/packs"));
    let victim = packs
        .iter()
        .max_by_key(|k| {
            std::fs::metadata(s3.object_path(BUCKET, k))
                .map(|m| m.len())
                .unwrap_or(0)
        })
        .expect("packs")
        .clone();
    let path = s3.object_path(BUCKET, &victim);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();

    let prune = || triad(&["prune", "--dataset", "files", "--json"], &site.config);
    let out = prune();
    assert!(!out.status.success(), "chunks are missing");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let damaged = v["prune"]["packs_damaged"].to_string();
    assert!(damaged.contains(&victim), "{v}");
    assert!(v["prune"]["chunks_missing"].as_u64() > Some(0), "{v}");
    // The CLI's snapshot (no daemon) stores what the pack held again.
    ok(
        &triad(&["snapshot", "--dataset", "files", "--json"], &site.config),
        "snapshot",
    );
    let v = ok(&prune(), "prune after the snapshot");
    assert_eq!(v["prune"]["chunks_missing"], 0, "{v}");
    assert!(path.exists(), "kept for the grace period");
    std::thread::sleep(Duration::from_millis(1500));
    let v = ok(&prune(), "prune after the grace period");
    let aside = v["prune"]["packs_set_aside"].as_array().unwrap();
    assert_eq!(aside.len(), 1, "{v}");
    assert!(!path.exists(), "{v}");
    let evidence = s3.keys(BUCKET, &format!("{PREFIX}/files/evidence"));
    assert_eq!(evidence.len(), 1, "{evidence:?}");
    assert_eq!(
        std::fs::read(s3.object_path(BUCKET, &evidence[0])).unwrap(),
        &bytes[..bytes.len() - 100],
        "the damaged bytes are kept as they were"
    );
    let to = site.tmp.path().join("restored");
    ok(&restore_from_archive(&site, "latest", &to), "restore");
    assert_same_tree(&tree, &to);
}

/// An archive written before packs (one object per chunk) goes on with
/// packs once the site runs a build that writes them: restores of the old
/// snapshots, of new ones and of points between use both layouts, and
/// prune removes dead chunk objects and whole dead packs alike.
#[test]
fn packs_hold_new_chunks_and_an_archive_begun_without_them_stays_whole() {
    let s3 = S3Server::start(BUCKET);
    let mut site = Site::new();
    with_archive(
        &site,
        &s3.endpoint(),
        "prune_grace = \"1s\"\nretention = { last = 2 }\npack_size = \"0\"",
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(15);
    let objects = |s3: &S3Server| s3.keys(BUCKET, &format!("{PREFIX}/files/chunks")).len();
    let packs = |s3: &S3Server| s3.keys(BUCKET, &format!("{PREFIX}/files/packs")).len();
    site.start();
    let mut kept = Vec::new();
    for round in 1..=2 {
        change(&site.source, round, &mut rng);
        site.wait_settled(now_ns(), Duration::from_secs(60));
        kept.push((snapshot(&site), keep(&site, &format!("keep{round}"))));
    }
    site.stop();
    let old_objects = objects(&s3);
    assert!(old_objects > 0);
    assert_eq!(packs(&s3), 0);

    // The same site, now writing packs (the default).
    let text = std::fs::read_to_string(&site.config).unwrap();
    site.set_config(&text.replace("pack_size = \"0\"", ""));
    site.start();
    for round in 3..=6 {
        change(&site.source, round, &mut rng);
        site.wait_settled(now_ns(), Duration::from_secs(60));
        kept.push((snapshot(&site), keep(&site, &format!("keep{round}"))));
    }
    let st = site.wait_settled(now_ns(), Duration::from_secs(60));
    site.wait_shipped(head_seq(&st), Duration::from_secs(60));
    site.stop();
    assert_eq!(objects(&s3), old_objects, "new chunks went into packs");
    let packs_before = packs(&s3);
    assert!(packs_before > 0);
    // Each chunk is stored once, in one pack or as one object (the
    // shipper and a snapshot upload under one lock, rechecking the index).
    let keys = site.key().derive();
    let mut seen = std::collections::HashSet::new();
    for k in s3.keys(BUCKET, &format!("{PREFIX}/files/chunks")) {
        assert!(seen.insert(k.rsplit('/').next().unwrap().to_string()));
    }
    for k in s3.keys(BUCKET, &format!("{PREFIX}/files/packs")) {
        let bytes = std::fs::read(s3.object_path(BUCKET, &k)).unwrap();
        let rel = k.strip_prefix(&format!("{PREFIX}/")).unwrap();
        for e in archive::packs::decode_index(&keys, rel, &bytes).unwrap() {
            assert!(seen.insert(hex_of(&e.id.0)), "{} stored twice", e.id);
        }
    }

    // Old snapshot (objects only), a new one over both layouts, and the
    // log replayed from an old snapshot through packed chunks.
    for (i, what) in [(1, "old layout"), (3, "mixed")] {
        let (seq, tree) = &kept[i];
        let to = site.tmp.path().join(format!("r-{seq}"));
        ok(&restore_from_archive(&site, &seq.to_string(), &to), what);
        assert_same_tree(tree, &to);
    }
    let latest = site.tmp.path().join("r-latest");
    ok(&restore_from_archive(&site, "latest", &latest), "latest");
    assert_same_tree(&kept[5].1, &latest);

    // Each snapshot wrote an index file of the packs uploaded since the
    // last one. One altered: the restore warns, reads those packs' own
    // indexes, and restores the same tree.
    let index_files = |s3: &S3Server| s3.keys(BUCKET, &format!("{PREFIX}/files/index"));
    let idx = index_files(&s3);
    assert!(idx.len() >= 4, "one per snapshot with packs: {idx:?}");
    let ipath = s3.object_path(BUCKET, &idx[0]);
    let good = std::fs::read(&ipath).unwrap();
    let mut bad = good.clone();
    let at = bad.len() / 2;
    bad[at] ^= 1;
    std::fs::write(&ipath, &bad).unwrap();
    let to = site.tmp.path().join("r-bad-index");
    let out = restore_from_archive(&site, "latest", &to);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    ok(&out, "restore past an altered index file");
    assert!(
        err.contains("WARNING") && err.contains("does not read back") && err.contains(&idx[0]),
        "{err}"
    );
    assert_same_tree(&kept[5].1, &to);
    std::fs::write(&ipath, &good).unwrap();

    // Prune: snapshots 5 and 6 stay; the chunk objects of rounds 1-2 and
    // the packs of rounds 3-4 go once the grace period has passed.
    let prune = || {
        ok(
            &triad(&["prune", "--dataset", "files", "--json"], &site.config),
            "triad prune",
        )
    };
    let first = prune();
    assert_eq!(first["prune"]["packs_deleted"], 0, "{first}");
    std::thread::sleep(Duration::from_millis(1500));
    let second = prune();
    assert_eq!(second["prune"]["chunks_missing"], 0, "{second}");
    assert!(
        second["prune"]["chunks_deleted"].as_u64() > Some(0),
        "{second}"
    );
    assert!(
        second["prune"]["packs_deleted"].as_u64() > Some(0),
        "{second}"
    );
    assert!(packs(&s3) < packs_before);
    assert!(objects(&s3) < old_objects);
    // The prune left one index file, covering exactly the packs left.
    let idx = index_files(&s3);
    assert_eq!(idx.len(), 1, "{idx:?}");
    let rel = idx[0].strip_prefix(&format!("{PREFIX}/")).unwrap();
    let covered: std::collections::BTreeSet<String> = archive::packs::decode_index_file(
        &keys,
        rel,
        &std::fs::read(s3.object_path(BUCKET, &idx[0])).unwrap(),
    )
    .unwrap()
    .into_iter()
    .map(|p| format!("{PREFIX}/{}", p.key))
    .collect();
    let left: std::collections::BTreeSet<String> = s3
        .keys(BUCKET, &format!("{PREFIX}/files/packs"))
        .into_iter()
        .collect();
    assert_eq!(covered, left);
    // A prune with nothing to change leaves that file as it is.
    prune();
    assert_eq!(index_files(&s3), idx);
    // Packs shipped since (no snapshot, so in no index file yet): the next
    // prune covers them too.
    site.start();
    change(&site.source, 7, &mut rng);
    let st = site.wait_settled(now_ns(), Duration::from_secs(60));
    site.wait_shipped(head_seq(&st), Duration::from_secs(60));
    site.stop();
    assert!(packs(&s3) > left.len(), "round 7 shipped new packs");
    ok(
        &triad(&["prune", "--dataset", "files", "--json"], &site.config),
        "triad prune",
    );
    let idx2 = index_files(&s3);
    assert_eq!(idx2.len(), 1, "{idx2:?}");
    assert_ne!(idx2, idx);
    let rel = idx2[0].strip_prefix(&format!("{PREFIX}/")).unwrap();
    let covered = archive::packs::decode_index_file(
        &keys,
        rel,
        &std::fs::read(s3.object_path(BUCKET, &idx2[0])).unwrap(),
    )
    .unwrap()
    .len();
    assert_eq!(covered, packs(&s3));
    for (seq, tree) in &kept[4..] {
        let to = site.tmp.path().join(format!("after-prune-{seq}"));
        ok(
            &restore_from_archive(&site, &seq.to_string(), &to),
            "restore after prune",
        );
        assert_same_tree(tree, &to);
    }
}

#[test]
fn the_store_uploads_large_objects_in_parts_and_explains_refusals() {
    let s3 = S3Server::start(BUCKET);
    let tmp = tempfile::tempdir().unwrap();
    let creds = s3.credentials_file(tmp.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cfg = |url: &str, creds: &Path| {
        let mut c = archive::StoreConfig::new(url);
        c.endpoint = Some(s3.endpoint());
        c.credentials_file = Some(creds.to_path_buf());
        c
    };
    let store = archive::Store::open(&cfg("s3://triad/parts", &creds)).unwrap();
    // 40 MiB: above the 16 MiB multipart threshold, five 8 MiB parts.
    let big: Vec<u8> = (0..40u32 << 20)
        .map(|i| (i.wrapping_mul(31) >> 7) as u8)
        .collect();
    rt.block_on(store.put("big/object", big.clone())).unwrap();
    let back = rt
        .block_on(store.get("big/object", 40 << 20))
        .unwrap()
        .unwrap();
    assert!(back == big, "the object reads back as written");
    // One byte over what the reader expects is refused, unread.
    let e = rt
        .block_on(store.get("big/object", (40 << 20) - 1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("refused without reading it"), "{e}");
    let listed = rt.block_on(store.list("big/")).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key, "big/object");
    assert_eq!(listed[0].size, 40 << 20);
    assert!(rt.block_on(store.get("big/none", 1)).unwrap().is_none());
    rt.block_on(store.delete("big/object")).unwrap();
    assert!(rt.block_on(store.get("big/object", 1)).unwrap().is_none());

    // A bucket that does not exist.
    let nobucket = archive::Store::open(&cfg("s3://no-such-bucket/p", &creds)).unwrap();
    let e = rt.block_on(nobucket.list("p/")).unwrap_err().to_string();
    assert!(e.contains("no-such-bucket") && e.contains("bucket"), "{e}");
    // Credentials the server refuses.
    let bad = tmp.path().join("bad.credentials");
    std::fs::write(
        &bad,
        "access_key_id = \"nobody\"\nsecret_access_key = \"s3cr3t-value\"\n",
    )
    .unwrap();
    let refused = archive::Store::open(&cfg("s3://triad/p", &bad)).unwrap();
    let e = rt.block_on(refused.list("x/")).unwrap_err().to_string();
    assert!(e.contains("credentials"), "{e}");
    assert!(!e.contains("s3cr3t-value"), "the secret is not shown: {e}");
    // A credentials file that is not TOML is refused without quoting it.
    std::fs::write(&bad, "s3cr3t-value\n").unwrap();
    let e = archive::Store::open(&cfg("s3://triad/p", &bad))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("access_key_id") && !e.contains("s3cr3t-value"),
        "{e}"
    );
}

#[test]
fn scheduled_snapshots_with_retention_stay_restorable() {
    let s3 = S3Server::start(BUCKET);
    let mut site = Site::new();
    with_archive(
        &site,
        &s3.endpoint(),
        "snapshot_schedule = \"*/2 * * * * *\"\nretention = { last = 2 }\nprune_grace = \"1s\"",
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    site.start();
    // Changes keep arriving while snapshots, shipping and prunes run.
    for round in 1..=5 {
        change(&site.source, round, &mut rng);
        std::thread::sleep(Duration::from_millis(900));
    }
    let st = site.wait_settled(now_ns(), Duration::from_secs(60));
    let head = head_seq(&st);
    let start = Instant::now();
    loop {
        let v = site.status().unwrap_or_default();
        let a = &v["archive"];
        if a["last_snapshot"]["seq"].as_u64().unwrap_or(0) >= head
            && a["last_prune"]["snapshots_kept"].as_u64().is_some()
            && a["shipped_seq"].as_u64().unwrap_or(0) >= head
        {
            assert!(a["snapshot_error"].is_null(), "{a}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no scheduled snapshot reached seq {head}: {a}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let final_tree = keep(&site, "final");
    site.stop();

    let manifests = s3.keys(BUCKET, &format!("{PREFIX}/files/snapshots"));
    let names: Vec<&String> = manifests
        .iter()
        .filter(|k| k.ends_with(".manifest"))
        .collect();
    assert!(
        !names.is_empty() && names.len() <= 3,
        "retention keeps the last two (a third may be taken just before the stop): {names:?}"
    );
    for n in &names {
        let seq: u64 = n
            .rsplit('/')
            .next()
            .and_then(|f| f.split('-').next())
            .and_then(|s| s.parse().ok())
            .unwrap();
        let to = site.tmp.path().join(format!("scheduled-{seq}"));
        if !to.exists() {
            ok(
                &restore_from_archive(&site, &seq.to_string(), &to),
                "restore a kept snapshot",
            );
        }
    }
    let to = site.tmp.path().join("restored-latest");
    ok(
        &restore_from_archive(&site, "latest", &to),
        "restore latest",
    );
    assert_same_tree(&final_tree, &to);
}

/// The store is unreachable while the size cap forces log segments out
/// before they were shipped: when the store appears, the archive bridges the
/// gap with a snapshot, the latest state restores, and a point inside the
/// gap is refused by name.
#[test]
fn a_gap_in_the_shipped_log_is_bridged_by_a_snapshot() {
    let port = S3Server::reserve_port();
    let mut site = Site::new();
    let text = std::fs::read_to_string(&site.config).unwrap().replace(
        "role = \"primary\"\n",
        "role = \"primary\"\nlog_segment_size = \"1MiB\"\nlog_retention_max = \"2MiB\"\n",
    );
    site.set_config(&text);
    with_archive(&site, &format!("http://127.0.0.1:{port}"), "");
    let mut rng = rand::rngs::StdRng::seed_from_u64(10);
    site.start();
    // About 8 MiB of changes with no store: the cap removes unshipped segments.
    for round in 1..=2 {
        change(&site.source, round, &mut rng);
        site.wait_settled(now_ns(), Duration::from_secs(60));
    }
    // The daemon has not reached its store: a snapshot request says so
    // rather than waiting.
    let t = Instant::now();
    let out = triad(&["snapshot", "--dataset", "files"], &site.config);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has not reached its archive"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(30));
    // Retention runs every 2 s: wait for the cap to act.
    let t = Instant::now();
    let first_retained = loop {
        let f = site
            .status()
            .and_then(|v| v["retention"]["first_seq"].as_u64())
            .unwrap_or(0);
        if f > 1 {
            break f;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the cap did not remove segments: first retained {f}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let s3 = S3Server::start_on(BUCKET, port);
    change(&site.source, 3, &mut rng);
    let st = site.wait_settled(now_ns(), Duration::from_secs(60));
    let head = head_seq(&st);
    site.wait_shipped(head, Duration::from_secs(120));
    let v = site.status().unwrap();
    assert!(
        v["archive"]["last_snapshot"]["seq"].as_u64().unwrap_or(0) >= first_retained - 1,
        "a bridging snapshot was taken: {}",
        v["archive"]
    );
    let keep_latest = keep(&site, "latest");
    site.stop();
    assert!(site.log_text().contains("a snapshot will bridge the gap"));

    let to = site.tmp.path().join("restored");
    ok(
        &restore_from_archive(&site, "latest", &to),
        "restore latest across the gap",
    );
    assert_same_tree(&keep_latest, &to);
    // Seq 2 lies in the gap: no snapshot before it, no log for it.
    let out = restore_from_archive(&site, "2", &site.tmp.path().join("in-gap"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has no record"), "{err}");
    drop(s3);
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Readers and prune keep out of each other's way. A restore that finds a
/// prune running (its marker put into the bucket by hand) waits, holding
/// its lease; a prune that would drop the very snapshot it reads then finds
/// the lease and deletes nothing; its marker gone, the restore goes on and
/// restores that snapshot whole; the next prune, with no reader left,
/// deletes it.
#[test]
fn a_prune_deletes_nothing_while_a_restore_reads_the_archive() {
    let s3 = S3Server::start(BUCKET);
    let mut site = Site::new();
    with_archive(
        &site,
        &s3.endpoint(),
        "prune_grace = \"0s\"\nretention = { last = 1 }",
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(31);
    site.start();
    change(&site.source, 1, &mut rng);
    site.wait_settled(now_ns(), Duration::from_secs(60));
    let seq1 = snapshot(&site);
    let tree1 = keep(&site, "tree1");
    change(&site.source, 2, &mut rng);
    site.wait_settled(now_ns(), Duration::from_secs(60));
    snapshot(&site);
    site.stop();

    // A prune "running" elsewhere.
    let marker = s3.object_path(BUCKET, &format!("{PREFIX}/files/prune/running"));
    std::fs::create_dir_all(marker.parent().unwrap()).unwrap();
    std::fs::write(
        &marker,
        br#"{"what":"prune","host":"elsewhere","pid":1,"started":""}"#,
    )
    .unwrap();
    let to = site.tmp.path().join("restored");
    let mut restore = Command::new(triad_bin())
        .args([
            "restore",
            "--from-archive",
            &format!("s3://{BUCKET}/{PREFIX}"),
        ])
        .args(["--dataset", "files", "--at", &seq1.to_string(), "--to"])
        .arg(&to)
        .arg("--config")
        .arg(&site.config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let leases = || s3.keys(BUCKET, &format!("{PREFIX}/files/leases"));
    common::wait_until(
        "the restore's lease in the bucket",
        Duration::from_secs(30),
        || !leases().is_empty(),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        restore.try_wait().unwrap().is_none(),
        "the restore did not wait for the running prune"
    );
    assert!(
        !to.join("r0").exists(),
        "the restore wrote beside a running prune"
    );
    let manifests = || {
        s3.keys(BUCKET, &format!("{PREFIX}/files/snapshots"))
            .into_iter()
            .filter(|k| k.ends_with(".manifest"))
            .count()
    };
    assert_eq!(manifests(), 2);
    // This prune takes the marker over, finds the restore's lease, and
    // leaves the marker gone when it returns.
    let out = triad(&["prune", "--dataset", "files"], &site.config);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("prune DEFERRED: the archive is being read by restore"),
        "{text}"
    );
    assert_eq!(manifests(), 2, "prune deleted a snapshot under a reader");
    assert!(!marker.exists());
    let status = restore.wait().unwrap();
    let mut err = String::new();
    use std::io::Read;
    restore
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{err}");
    assert_same_tree(&tree1, &to);
    assert!(
        leases().is_empty(),
        "the restore left its lease: {:?}",
        leases()
    );

    let out = triad(&["prune", "--dataset", "files"], &site.config);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success() && text.contains("deleted 1"), "{text}");
    assert_eq!(manifests(), 1);
}
