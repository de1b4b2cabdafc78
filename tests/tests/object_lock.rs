//! S3 Object Lock against a server that implements it (moto, started here):
//! every history object goes up locked; the site's own credentials cannot
//! delete a locked version; prune keeps what is still locked; a plain
//! delete only hides objects, and `triad undelete` brings them back so the
//! restore works again; a bucket without Object Lock is refused. The
//! signing of locked uploads is checked against s3s-fs, which verifies
//! SigV4 (moto does not).

use crate::common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{assert_same_tree, now_ns, triad_bin, write_file, Site};
use rand::SeedableRng;
use triad_tests::moto::MotoServer;

fn triad(args: &[&str], config: &Path) -> Output {
    Command::new(triad_bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run triad")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(out: &Output, what: &str) -> serde_json::Value {
    assert!(out.status.success(), "{what} failed: {}", text(out));
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

fn restore(site: &Site, at: &str, to: &Path) -> Output {
    Command::new(triad_bin())
        .args(["restore", "--from-archive", "s3://triad/site-a"])
        .args(["--dataset", "files", "--at", at, "--to"])
        .arg(to)
        .arg("--config")
        .arg(&site.config)
        .output()
        .expect("run restore")
}

/// Copies the source tree aside (cp -a keeps modes and mtimes).
fn keep(site: &Site, name: &str) -> std::path::PathBuf {
    let to = site.tmp.path().join(name);
    assert!(Command::new("cp")
        .arg("-a")
        .arg(&site.source)
        .arg(&to)
        .status()
        .unwrap()
        .success());
    to
}

#[test]
fn locked_history_survives_deletes_with_the_sites_own_credentials() {
    let moto = MotoServer::start();
    moto.create_bucket("triad", true);
    let mut site = Site::new();
    site.add_s3_archive(
        &moto.endpoint(),
        "object_lock = \"1d\"\nobject_lock_mode = \"compliance\"\n\
         retention = { last = 1 }\nprune_grace = \"1s\"",
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    for i in 0..20 {
        write_file(
            &site.source.join(format!("f{i}")),
            1000 + i * 3000,
            i % 2 == 0,
            &mut rng,
        );
    }
    site.start();
    site.wait_settled(now_ns(), Duration::from_secs(60));
    let snap = |site: &Site| {
        ok(
            &triad(&["snapshot", "--dataset", "files", "--json"], &site.config),
            "triad snapshot",
        )["snapshot"]["seq"]
            .as_u64()
            .expect("snapshot seq")
    };
    let first_seq = snap(&site);
    let first_tree = keep(&site, "first");
    for i in 0..5 {
        write_file(&site.source.join(format!("g{i}")), 5000, true, &mut rng);
    }
    std::fs::remove_file(site.source.join("f3")).unwrap();
    let v = site.wait_settled(now_ns(), Duration::from_secs(60));
    let head = v["log"]["head_seq"].as_u64().expect("head seq");
    snap(&site);
    site.wait_shipped(head, Duration::from_secs(60));
    let last_tree = keep(&site, "last");

    // Every log piece, chunk, page and manifest is locked in compliance
    // mode for about a day; the small mutable objects (OWNER, HEAD, prune
    // state) are not.
    let listing = moto.python_ok(
        r#"
import datetime
out = {}
now = datetime.datetime.now(datetime.timezone.utc)
for o in s3.list_objects_v2(Bucket='triad', Prefix='site-a/files/').get('Contents', []):
    h = s3.head_object(Bucket='triad', Key=o['Key'])
    until = h.get('ObjectLockRetainUntilDate')
    out[o['Key']] = [h.get('ObjectLockMode'), (until - now).total_seconds() if until else None]
print(json.dumps(out))
"#,
    );
    let objects: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(listing.trim()).unwrap();
    let history = ["/log/", "/packs/", "/snapshots/"];
    let mut locked = 0;
    for (key, v) in &objects {
        if history.iter().any(|h| key.contains(h)) {
            assert_eq!(v[0], "COMPLIANCE", "{key} is not locked: {v}");
            let left = v[1].as_f64().unwrap();
            assert!(
                (86_000.0..=86_400.0).contains(&left),
                "{key} locked for {left}s, not a day"
            );
            locked += 1;
        } else {
            assert!(v[0].is_null(), "{key} is locked: {v}");
        }
    }
    for h in history {
        assert!(
            objects.keys().any(|k| k.contains(h)),
            "no {h} objects in {objects:?}"
        );
    }

    // Retention keeps one snapshot, but the older one is still locked:
    // prune keeps it whole and says so, and deletes nothing locked.
    let prune = ok(
        &triad(&["prune", "--dataset", "files", "--json"], &site.config),
        "triad prune",
    );
    assert_eq!(
        prune["prune"]["snapshots_held"].as_array().unwrap().len(),
        1,
        "{prune}"
    );
    assert_eq!(
        prune["prune"]["snapshots_deleted"]
            .as_array()
            .unwrap()
            .len(),
        0,
        "{prune}"
    );
    assert_eq!(prune["prune"]["snapshots_kept"], 2, "{prune}");
    let human = text(&triad(&["prune", "--dataset", "files"], &site.config));
    assert!(
        human.contains("held by Object Lock: 1 snapshots"),
        "{human}"
    );
    site.stop();

    // The attacker holds the site's credentials. Deleting any version of a
    // locked object is refused, governance bypass or not.
    let attack = moto.python_ok(
        r#"
refused, deleted = 0, []
for v in s3.list_object_versions(Bucket='triad', Prefix='site-a/files/').get('Versions', []):
    try:
        s3.delete_object(Bucket='triad', Key=v['Key'], VersionId=v['VersionId'], BypassGovernanceRetention=True)
        deleted.append(v['Key'])
    except Exception as e:
        if 'AccessDenied' not in str(e):
            raise
        refused += 1
print(json.dumps({'refused': refused, 'deleted': deleted}))
"#,
    );
    let attack: serde_json::Value = serde_json::from_str(attack.trim()).unwrap();
    assert_eq!(attack["refused"].as_u64().unwrap(), locked, "{attack}");
    for k in attack["deleted"].as_array().unwrap() {
        let k = k.as_str().unwrap();
        assert!(
            !history.iter().any(|h| k.contains(h)),
            "a locked object was deleted: {k}"
        );
    }
    // What a plain delete can do: hide every object behind a marker.
    moto.python_ok(
        r#"
for o in s3.list_objects_v2(Bucket='triad', Prefix='site-a/').get('Contents', []):
    s3.delete_object(Bucket='triad', Key=o['Key'])
assert s3.list_objects_v2(Bucket='triad', Prefix='site-a/').get('KeyCount', 0) == 0
"#,
    );
    let gone = restore(&site, "latest", &site.tmp.path().join("while-hidden"));
    assert!(!gone.status.success(), "{}", text(&gone));

    // `triad undelete` removes the markers: first a dry run, which changes
    // nothing, then for real.
    let dry = triad(
        &["undelete", "--dataset", "files", "--dry-run"],
        &site.config,
    );
    let dry_text = text(&dry);
    assert!(dry.status.success(), "{dry_text}");
    assert!(dry_text.contains("would bring back"), "{dry_text}");
    let still = restore(&site, "latest", &site.tmp.path().join("after-dry-run"));
    assert!(!still.status.success(), "a dry run changed the bucket");
    let back = triad(&["undelete", "--dataset", "files"], &site.config);
    let back_text = text(&back);
    assert!(back.status.success(), "{back_text}");
    assert!(back_text.contains("brought back"), "{back_text}");
    // The leases of the restores above were deleted by design: none is
    // brought back to hold prunes off.
    let leases = moto.python_ok(
        r#"
print(s3.list_objects_v2(Bucket='triad', Prefix='site-a/files/leases/').get('KeyCount', 0))
"#,
    );
    assert_eq!(leases.trim(), "0", "undelete brought back leases");

    // Both snapshots restore whole, and latest equals the last tree.
    let to = site.tmp.path().join("restored-latest");
    ok(&restore(&site, "latest", &to), "restore of latest");
    assert_same_tree(&last_tree, &to);
    let to = site.tmp.path().join("restored-first");
    ok(
        &restore(&site, &first_seq.to_string(), &to),
        "restore of the held snapshot",
    );
    assert_same_tree(&first_tree, &to);
}

#[test]
fn a_bucket_without_object_lock_is_refused() {
    let moto = MotoServer::start();
    moto.create_bucket("triad", false);
    let site = Site::new();
    site.add_s3_archive(&moto.endpoint(), "object_lock = \"30d\"");
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    write_file(&site.source.join("f"), 100, true, &mut rng);
    // No daemon: the CLI opens the archive itself.
    let out = triad(&["snapshot", "--dataset", "files"], &site.config);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains("does not have Object Lock enabled"),
        "no clear reason: {t}"
    );
    // Nothing was written into the unprotected bucket.
    let listing = moto.python_ok("print(s3.list_objects_v2(Bucket='triad').get('KeyCount', 0))");
    assert_eq!(listing.trim(), "0");

    // And the config refuses a lock it cannot honour.
    let plain = Site::new();
    let mut cfg = std::fs::read_to_string(&plain.config).unwrap();
    cfg.push_str(&format!(
        "\n[archive]\nurl = \"file://{}\"\nobject_lock = \"30d\"\n",
        plain.tmp.path().join("archive").display()
    ));
    plain.set_config(&cfg);
    let out = Command::new(triad_bin())
        .args(["config", "check"])
        .arg(&plain.config)
        .output()
        .unwrap();
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("object_lock"), "{t}");
}

/// moto accepts any signature, so the signing of the locked upload is
/// proven against s3s-fs, which checks SigV4 (and ignores the lock
/// headers): the upload, with its lock headers and Content-MD5 signed, is
/// accepted with the right secret and refused with a wrong one.
#[test]
fn locked_uploads_are_signed_as_s3_checks_them() {
    let s3 = triad_tests::s3::S3Server::start("triad");
    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = |creds: &Path| {
        let mut c = archive::StoreConfig::new("s3://triad/locked");
        c.endpoint = Some(s3.endpoint());
        c.credentials_file = Some(creds.to_path_buf());
        c.max_retries = 0;
        c.object_lock = Some(archive::ObjectLock {
            mode: archive::LockMode::Compliance,
            period: Duration::from_secs(86_400),
        });
        archive::Store::open(&c).unwrap()
    };
    let good = store(&s3.credentials_file(tmp.path()));
    let body: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
    rt.block_on(good.put_history("files/chunks/ab", body.clone()))
        .unwrap();
    let back = rt
        .block_on(good.get("files/chunks/ab", 1 << 20))
        .unwrap()
        .unwrap();
    assert!(back == body, "the object reads back as written");

    let bad = tmp.path().join("bad.credentials");
    std::fs::write(
        &bad,
        format!(
            "access_key_id = \"{}\"\nsecret_access_key = \"not-the-secret\"\n",
            triad_tests::s3::ACCESS_KEY
        ),
    )
    .unwrap();
    let e = rt
        .block_on(store(&bad).put_history("files/chunks/cd", body))
        .unwrap_err()
        .to_string();
    assert!(e.contains("HTTP 403"), "{e}");
    assert!(
        !e.contains("not-the-secret"),
        "the secret is not shown: {e}"
    );
}
