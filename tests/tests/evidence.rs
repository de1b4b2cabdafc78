//! Signed evidence: a site with an `[evidence]` SM2 key signs its drill
//! reports and its archive's heads; `triad verify-report` (and OpenSSL, a
//! second SM2 implementation) accept them as written and reject them once
//! one byte is changed or another key is named.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{now_ns, triad_bin, write_file, Site};
use rand::SeedableRng;
use triad_tests::s3::S3Server;

fn verify_report(public: &Path, files: &[&Path]) -> Output {
    Command::new(triad_bin())
        .arg("verify-report")
        .arg("--public-key")
        .arg(public)
        .args(files)
        .output()
        .expect("run triad verify-report")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn keygen(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let key = dir.join(format!("{name}.key"));
    let out = Command::new(triad_bin())
        .args(["keygen", "--sm2", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let public = dir.join(format!("{name}.key.pub"));
    assert!(public.exists());
    (key, public)
}

#[test]
fn drill_reports_and_archive_heads_are_signed_and_a_changed_byte_is_rejected() {
    let s3 = S3Server::start("triad");
    let mut site = Site::new();
    site.add_s3_archive(&s3.endpoint(), "");
    let (key, public) = keygen(site.tmp.path(), "evidence");
    let (_, stranger) = keygen(site.tmp.path(), "stranger");
    let mut cfg = std::fs::read_to_string(&site.config).unwrap();
    cfg.push_str(&format!(
        "\n[evidence]\nsigning_key = \"{}\"\n",
        key.display()
    ));
    site.set_config(&cfg);

    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    for i in 0..20 {
        write_file(
            &site.source.join(format!("f{i}")),
            3000 + i * 700,
            true,
            &mut rng,
        );
    }
    site.start();
    let st = site.wait_settled(now_ns(), Duration::from_secs(60));
    let head = st["log"]["head_seq"].as_u64().unwrap();
    let out = site.cli(&["snapshot", "--dataset", "files"]);
    assert!(out.status.success(), "{}", text(&out));
    site.wait_shipped(head, Duration::from_secs(60));

    // The drill reads the signed head (the trailer does not get in the
    // seal's way) and signs both of its reports.
    let reports = site.tmp.path().join("reports");
    let out = Command::new(triad_bin())
        .args(["drill", "--dataset", "files", "--config"])
        .arg(&site.config)
        .arg("--reports")
        .arg(&reports)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("signed with SM2 key sm3:"),
        "{}",
        text(&out)
    );
    let named = |ext: &str| {
        std::fs::read_dir(&reports)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                let n = p.file_name().unwrap().to_string_lossy().into_owned();
                n.starts_with("drill-") && n.ends_with(ext)
            })
            .unwrap_or_else(|| panic!("no drill-*{ext} in {}", reports.display()))
    };
    let (json, md) = (named(".json"), named(".md"));
    assert!(named(".json.sig").is_file() && named(".md.sig").is_file());
    let out = verify_report(&public, &[&json, &md]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        text(&out).matches("GOOD signature").count(),
        2,
        "{}",
        text(&out)
    );

    // A second implementation agrees: OpenSSL's SM2 with SM3 and the
    // GM/T 0009 default signer id.
    let sig = vault::signing::signature_path(&json);
    let out = Command::new("openssl")
        .args([
            "dgst",
            "-sm3",
            "-sigopt",
            "distid:1234567812345678",
            "-verify",
        ])
        .arg(&public)
        .arg("-signature")
        .arg(&sig)
        .arg(&json)
        .output()
        .expect("openssl (Debian package openssl) must be installed");
    assert!(
        out.status.success() && text(&out).contains("Verified OK"),
        "{}",
        text(&out)
    );

    // One byte changed: rejected, exit 1. The true report under another
    // site's key: rejected.
    let mut bytes = std::fs::read(&json).unwrap();
    let at = bytes.iter().position(|b| *b == b'p').unwrap();
    bytes[at] = b'P';
    std::fs::write(&json, &bytes).unwrap();
    let out = verify_report(&public, &[&json]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("REJECTED") && text(&out).contains("does NOT match"),
        "{}",
        text(&out)
    );
    let out = verify_report(&stranger, &[&md]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("REJECTED"), "{}", text(&out));

    // The archive's HEAD, as an auditor downloads it from the bucket,
    // carries its signature and a plaintext statement of what it holds.
    let head_obj = s3.root.join("triad/site-a/files/HEAD");
    let copy = site.tmp.path().join("HEAD");
    std::fs::copy(&head_obj, &copy).unwrap();
    let out = verify_report(&public, &[&copy]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("carried in the object")
            && said.contains("\"kind\":\"triad archive head\"")
            && said.contains("\"dataset\":\"files\""),
        "{said}"
    );
    let seq_said: u64 = said
        .split("\"seq\":")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no seq in {said}"));
    assert!(
        seq_said >= head,
        "the head says seq {seq_said}, shipped {head}"
    );
    let mut bytes = std::fs::read(&copy).unwrap();
    bytes[3] ^= 0x01;
    std::fs::write(&copy, &bytes).unwrap();
    let out = verify_report(&public, &[&copy]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    site.stop();

    // A drill of the site's own archive checks the head's signature with
    // the site's own key, and says so in the report.
    let drill_json = || {
        Command::new(triad_bin())
            .args(["drill", "--dataset", "files", "--json", "--config"])
            .arg(&site.config)
            .arg("--reports")
            .arg(&reports)
            .output()
            .unwrap()
    };
    let fingerprint = text(&verify_report(&public, &[&json]))
        .split(['(', ')'])
        .find(|p| p.starts_with("sm3:"))
        .unwrap()
        .to_string();
    let out = drill_json();
    assert!(out.status.success(), "{}", text(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["archive_head_signed_by"], fingerprint.as_str(), "{r}");

    // The same head without its signature, as someone else holding the
    // dataset key could write it: the seal still opens, the drill refuses.
    let original = std::fs::read(&head_obj).unwrap();
    let n = original.len();
    let st_len = usize::from(u16::from_be_bytes([original[n - 11], original[n - 10]]));
    let sig_len = usize::from(original[n - 9]);
    std::fs::write(&head_obj, &original[..n - 11 - sig_len - st_len]).unwrap();
    let out = drill_json();
    assert!(!out.status.success(), "{}", text(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        r["error"]
            .as_str()
            .unwrap_or("")
            .contains("carries no signature"),
        "{r}"
    );
    std::fs::write(&head_obj, &original).unwrap();

    // A signing key others may read is refused at start, by name.
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = site.cli(&["drill", "--dataset", "files"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("chmod 600"), "{}", text(&out));
}
