//! Scrubs: `triad verify --scrub` re-reads every chunk of a site's copy
//! (beside the running daemon) and `--archive` every chunk its archive
//! references; a byte flipped in a stored chunk, a chunk altered inside a
//! pack and a pack deleted are each found and named, with the paths or
//! objects that use them, and the exit status says so.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{now_ns, triad_bin, write_file, Site};
use rand::SeedableRng;
use triad_tests::s3::S3Server;

fn verify(config: &Path, args: &[&str]) -> (Output, serde_json::Value) {
    let out = Command::new(triad_bin())
        .args(["verify", "--dataset", "files", "--json", "--config"])
        .arg(config)
        .args(args)
        .output()
        .expect("run triad verify");
    let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out, v)
}

#[test]
fn scrubs_find_and_name_damage_in_the_store_and_the_archive() {
    let s3 = S3Server::start("triad");
    let mut site = Site::new();
    // Packs of 64 KiB: the 40 chunks land in several.
    site.add_s3_archive(&s3.endpoint(), "pack_size = \"64KiB\"");
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    for i in 0..40 {
        write_file(
            &site.source.join(format!("f{i}")),
            5000 + i * 3000,
            i % 2 == 0,
            &mut rng,
        );
    }
    site.start();
    let st = site.wait_settled(now_ns(), Duration::from_secs(60));
    let head = st["log"]["head_seq"].as_u64().unwrap();
    let out = site.cli(&["snapshot", "--dataset", "files"]);
    assert!(out.status.success());
    site.wait_shipped(head, Duration::from_secs(60));

    // Clean, with the daemon running.
    let (out, v) = verify(&site.config, &["--scrub", "--max-rate", "0"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(v["chunks"].as_u64(), Some(40), "{v}");
    assert_eq!(v["running_digest"], v["recomputed_digest"]);
    let (out, v) = verify(&site.config, &["--archive", "--read-data"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(v["chunks_read"].as_u64(), v["chunks_referenced"].as_u64());
    assert_eq!(v["chunks_referenced"].as_u64(), Some(40));
    site.stop();

    // A byte flipped in a stored chunk (in its RocksDB blob file).
    let (id, sealed) = {
        let st = vault::state::State::open_read_only(&site.dataset_dir().join("state")).unwrap();
        let e = st.entry(b"f8").unwrap().unwrap();
        let id = e.chunks()[0].id;
        (id, st.chunk_bytes(&id).unwrap().unwrap())
    };
    let needle = &sealed[100..164];
    let mut hit = None;
    for e in std::fs::read_dir(site.dataset_dir().join("state")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "blob") {
            let b = std::fs::read(&p).unwrap();
            if let Some(pos) = b.windows(needle.len()).position(|w| w == needle) {
                hit = Some((p, pos + 10));
                break;
            }
        }
    }
    let (file, pos) = hit.expect("the chunk's bytes in a blob file");
    let mut b = std::fs::read(&file).unwrap();
    b[pos] ^= 0x01;
    std::fs::write(&file, &b).unwrap();
    let (out, v) = verify(&site.config, &["--scrub"]);
    assert!(!out.status.success());
    let bad = v["bad"].as_array().unwrap_or_else(|| {
        panic!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(bad.len(), 1, "{v}");
    assert_eq!(bad[0]["id"], id.to_string());
    assert!(bad[0]["referenced_by"].to_string().contains("f8"), "{v}");

    // Repair (daemon stopped): good bytes from this site's archive, checked
    // against what the site recorded; the damaged bytes kept as evidence.
    let out = site.cli(&["verify", "--dataset", "files", "--scrub", "--repair"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("REPAIRED {id} from s3://")),
        "{text}"
    );
    let evidence = site.dataset_dir().join("evidence");
    let kept: Vec<String> = std::fs::read_dir(&evidence)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        kept.iter().any(|n| n.starts_with(&id.to_string())),
        "{kept:?}"
    );
    let log = std::fs::read_to_string(evidence.join("repairs.log")).unwrap();
    assert!(log.contains(&id.to_string()), "{log}");
    let (out, v) = verify(&site.config, &["--scrub"]);
    assert!(out.status.success(), "clean after the repair: {v}");

    // In the archive: a byte flipped inside one pack's first chunk, and
    // another pack deleted.
    let mut packs: Vec<std::path::PathBuf> =
        std::fs::read_dir(s3.root.join("triad/site-a/files/packs"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "pack"))
            .collect();
    packs.sort();
    assert!(packs.len() >= 2, "{packs:?}");
    let (altered, deleted) = (&packs[0], &packs[1]);
    let original = std::fs::read(altered).unwrap();
    let mut b = original.clone();
    b[8 + 40] ^= 0x20;
    std::fs::write(altered, &b).unwrap();
    std::fs::remove_file(deleted).unwrap();
    let name = |p: &std::path::PathBuf| p.file_name().unwrap().to_string_lossy().to_string();
    // Without reading data: the deleted pack's chunks are missing.
    let (out, v) = verify(&site.config, &["--archive"]);
    assert!(!out.status.success());
    let text = v.to_string();
    assert!(
        text.contains("missing") && text.contains("in no pack and no chunk object"),
        "{text}"
    );
    let missing = v["bad"].as_array().map_or(0, |b| b.len());
    assert!(missing >= 1, "{v}");
    assert!(
        !text.contains(&name(altered)),
        "not read, not judged: {text}"
    );
    // Reading data: both, the altered one named by its pack and place.
    let (out, v) = verify(&site.config, &["--archive", "--read-data"]);
    assert!(!out.status.success());
    let text = v.to_string();
    assert!(text.contains("in no pack and no chunk object"), "{text}");
    assert!(
        text.contains(&format!("{} (bytes 8+", name(altered))) && text.contains("altered"),
        "{text}"
    );
    assert_eq!(
        v["bad"].as_array().map_or(0, |b| b.len()),
        missing + 1,
        "{v}"
    );

    // Repair the archive from this site's copy: each bad chunk is uploaded
    // as an object of its own, which reads take before a packed copy; the
    // altered pack stays as it is, as evidence.
    let out = site.cli(&[
        "verify",
        "--dataset",
        "files",
        "--archive",
        "--read-data",
        "--repair",
    ]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let objects = std::fs::read_dir(s3.root.join("triad/site-a/files/chunks"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_file())
        .count();
    assert_eq!(objects, missing + 1, "{text}");
    assert_eq!(
        std::fs::read(altered).unwrap(),
        b,
        "the altered pack is kept"
    );
    let (out, v) = verify(&site.config, &["--archive", "--read-data"]);
    assert!(out.status.success(), "clean after the repair: {v}");
}
