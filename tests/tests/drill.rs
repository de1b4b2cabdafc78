//! Restore drills against a real S3-compatible server (s3s-fs): the report's
//! figures match what the test made (files, bytes, the restored point), RTO
//! and RPO are measured, and a drill over a damaged archive produces a
//! failing report and exit status, not a crash.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{now_ns, triad_bin, write_file, Site};
use rand::SeedableRng;
use triad_tests::s3::S3Server;

fn drill(site: &Site, reports: &Path) -> Output {
    Command::new(triad_bin())
        .args(["drill", "--dataset", "files", "--json", "--config"])
        .arg(&site.config)
        .arg("--reports")
        .arg(reports)
        .output()
        .expect("run triad drill")
}

/// Files and bytes in a tree (regular files only).
fn count(root: &Path) -> (u64, u64) {
    let (mut files, mut bytes) = (0, 0);
    for e in walkdir::WalkDir::new(root).into_iter().flatten() {
        if e.file_type().is_file() {
            files += 1;
            bytes += e.metadata().unwrap().len();
        }
    }
    (files, bytes)
}

#[test]
fn a_drill_reports_what_it_restored_and_a_damaged_archive_fails_it() {
    let s3 = S3Server::start("triad");
    let mut site = Site::new();
    site.add_s3_archive(&s3.endpoint(), "");
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for i in 0..60 {
        let d = site.source.join(format!("d{}", i % 6));
        std::fs::create_dir_all(&d).unwrap();
        write_file(
            &d.join(format!("f{i}")),
            1000 + i * 5000,
            i % 2 == 0,
            &mut rng,
        );
    }
    site.start();
    let st = site.wait_settled(now_ns(), Duration::from_secs(60));
    let head = st["log"]["head_seq"].as_u64().unwrap();
    let out = site.cli(&["snapshot", "--dataset", "files"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    site.wait_shipped(head, Duration::from_secs(60));
    let (files, bytes) = count(&site.source);

    let reports = site.tmp.path().join("reports");
    let out = drill(&site, &reports);
    assert!(
        out.status.success(),
        "drill failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["result"], "passed", "{r}");
    assert_eq!(r["files"].as_u64(), Some(files));
    assert_eq!(r["bytes"].as_u64(), Some(bytes));
    assert_eq!(r["restored_seq"].as_u64(), Some(head));
    assert_eq!(r["expected_digest"], r["restored_digest"]);
    assert!(r["rto_seconds"].as_f64().unwrap() > 0.0);
    // The archive holds the head: nothing of the primary's is missing.
    assert_eq!(r["rpo_seconds"].as_f64(), Some(0.0), "{r}");
    assert_eq!(r["reference"]["head_seq"].as_u64(), Some(head));
    let listed: Vec<String> = std::fs::read_dir(&reports)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    assert!(listed.iter().any(|n| n.ends_with(".md")), "{listed:?}");
    assert!(
        listed.iter().any(|n| n == "latest-files.json"),
        "{listed:?}"
    );
    let md_name = listed.iter().find(|n| n.ends_with(".md")).unwrap();
    let md = std::fs::read_to_string(reports.join(md_name)).unwrap();
    assert!(
        md.contains("PASSED") && md.contains(&format!("seq {head}")),
        "{md}"
    );

    // A pack deleted from the archive: a failing report, exit 1, no crash,
    // no scratch left behind.
    let pack_dir = s3.root.join("triad/site-a/files/packs");
    let victim = std::fs::read_dir(&pack_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_file() && !p.to_string_lossy().contains(".s3s"))
        .expect("a pack");
    std::fs::remove_file(&victim).unwrap();
    let out = drill(&site, &reports);
    assert!(!out.status.success());
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["result"], "failed", "{r}");
    let why = r["error"].as_str().unwrap_or_default();
    // The pack and its index are gone: each chunk it held is named as
    // missing, by id.
    assert!(
        why.contains("missing") && why.contains("in no pack and no chunk object"),
        "the missing chunks are named: {why}"
    );
    let latest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(reports.join("latest-files.json")).unwrap()).unwrap();
    assert_eq!(latest["result"], "failed");
    let leftovers: Vec<_> = std::fs::read_dir(&site.data)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".triad-drill-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "scratch directories left: {leftovers:?}"
    );
    site.stop();
}

#[test]
fn scheduled_drills_and_scrubs_report_in_status() {
    let s3 = S3Server::start("triad");
    let mut site = Site::new();
    let reports = site.tmp.path().join("reports");
    site.add_s3_archive(
        &s3.endpoint(),
        &format!(
            "snapshot_schedule = \"*/2 * * * * *\"\n\n[verify]\nscrub_schedule = \"*/3 * * * * *\"\nrepair = true\n\n[drill]\nschedule = \"*/3 * * * * *\"\nreports_dir = \"{}\"",
            reports.display()
        ),
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    for i in 0..20 {
        write_file(
            &site.source.join(format!("f{i}")),
            2000 + i * 700,
            i % 2 == 0,
            &mut rng,
        );
    }
    site.start();
    site.wait_settled(now_ns(), Duration::from_secs(60));
    let start = Instant::now();
    loop {
        let v = site.status().unwrap_or_default();
        let c = &v["checks"];
        if c["last_drill_result"] == "passed" && c["last_scrub_ok"] == true {
            assert!(c["last_drill_rto_seconds"].as_f64().unwrap() > 0.0, "{c}");
            assert!(c["last_drill_success_ns"].as_i64().unwrap() > 0, "{c}");
            // (A drill that ran before anything was archived counts as a
            // failure; the later ones pass.)
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no scheduled drill and scrub reported: {c}\n{}",
            site.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(reports.join("latest-files.json").exists());
    assert!(site.dataset_dir().join("last-scrub.json").exists());
    site.stop();
}
