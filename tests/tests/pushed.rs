//! Pushed datasets with three real daemons: `triad put` (a database's
//! archive_command) answers only once the same-city site has the object,
//! is idempotent for the same content and refuses different content under
//! a name; `triad get` (restore_command) returns the bytes from any site's
//! daemon or straight from an archive, and exits 1 with nothing written for
//! a name that does not exist.

use crate::common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::deploy::*;
use common::*;
use rand::{RngCore, SeedableRng};

fn deployment(extra: &str) -> Deployment {
    let mut d = Deployment::new(None);
    d.primary_source = "source = { kind = \"pushed\" }".into();
    d.primary_extra = extra.into();
    d.configure(None);
    d
}

fn put(site: &Site, path: &Path, name: &str) -> Output {
    site.cli(&["put", "--dataset", "files", &path.to_string_lossy(), name])
}

fn get(site: &Site, name: &str, dest: &Path) -> Output {
    site.cli(&["get", "--dataset", "files", name, &dest.to_string_lossy()])
}

fn segment(dir: &Path, name: &str, seed: u64, len: usize) -> PathBuf {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; len];
    // Half random, half repetitive: like WAL, part of it compresses.
    rng.fill_bytes(&mut data[..len / 2]);
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

/// `triad get` of `name` at `site` into `dest` succeeds with `original`'s bytes.
fn assert_get(site: &Site, name: &str, dest: &Path, original: &Path) {
    let o = get(site, name, dest);
    assert!(o.status.success(), "{name}: {}", err(&o));
    assert_eq!(
        std::fs::read(dest).unwrap(),
        std::fs::read(original).unwrap()
    );
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn wait_ready(site: &Site) {
    let start = Instant::now();
    while !site.data.join("triad.sock").exists() || site.status().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{}",
            site.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A started pushed-dataset deployment with every site ready, and a work
/// directory for the objects.
fn started() -> (Deployment, PathBuf) {
    let mut d = deployment("");
    d.start();
    for s in [&d.a, &d.b, &d.c] {
        wait_ready(s);
    }
    let work = d.a.tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    (d, work)
}

#[test]
fn put_and_get_round_trip_and_follow_archive_command_rules() {
    let (d, work) = started();
    let seg = segment(&work, "000000010000000000000001", 1, 16 << 20);

    let o = put(&d.a, &seg, "000000010000000000000001");
    assert!(o.status.success(), "{}", err(&o));
    // Answered only after the sync follower had it: the same-city site
    // serves it at once.
    let back = work.join("from-b");
    let o = get(&d.b, "000000010000000000000001", &back);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&seg).unwrap());

    // The same name and content again: success, no new record. (The status
    // file is rewritten every 250 ms: give it time to show the put.)
    std::thread::sleep(Duration::from_millis(600));
    let head = d.a.status().unwrap()["log"]["head_seq"].as_u64().unwrap();
    assert!(head > 0);
    let o = put(&d.a, &seg, "000000010000000000000001");
    assert!(o.status.success(), "{}", err(&o));
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        d.a.status().unwrap()["log"]["head_seq"].as_u64(),
        Some(head)
    );

    // The same name with different content: refused, loudly; the stored
    // object is unchanged.
    let other = segment(&work, "other", 2, 1 << 20);
    let o = put(&d.a, &other, "000000010000000000000001");
    assert!(!o.status.success());
    assert!(err(&o).contains("different content"), "{}", err(&o));
    let again = work.join("again");
    assert!(get(&d.a, "000000010000000000000001", &again)
        .status
        .success());
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(&seg).unwrap());

    // A base backup streamed on stdin.
    let mut child = Command::new(triad_bin())
        .args(["put", "--dataset", "files", "--config"])
        .arg(&d.a.config)
        .args(["-", "base-1.tar"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let tar = std::fs::read(segment(&work, "tar", 3, 5 << 20)).unwrap();
    child.stdin.take().unwrap().write_all(&tar).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", err(&o));

    // A name that does not exist: exit 1 and nothing written.
    let none = work.join("none");
    let o = get(&d.a, "000000010000000000000009", &none);
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert!(!none.exists());
    assert!(std::fs::read_dir(&work).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains(".tmp")));

    // A get that cannot fetch (no daemon there) is not "missing": status
    // 255, which stops a PostgreSQL recovery instead of ending it.
    let o = Command::new(triad_bin())
        .args(["get", "--dataset", "files", "--socket"])
        .arg(work.join("no-such.sock"))
        .args(["000000010000000000000001"])
        .arg(work.join("x"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(255), "{}", err(&o));
    assert!(
        err(&o).contains("cannot reach the triad daemon"),
        "{}",
        err(&o)
    );

    // Bad names are refused before anything is sent.
    let o = put(&d.a, &seg, "../escape");
    assert!(!o.status.success());
    assert!(err(&o).contains("not a valid object name"), "{}", err(&o));

    // Every site ends with the same copy; the remote serves the base backup.
    wait_replicated(&d.a, &[&d.b, &d.c], Duration::from_secs(60));
    let tar_back = work.join("tar-from-c");
    let o = get(&d.c, "base-1.tar", &tar_back);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(std::fs::read(&tar_back).unwrap(), tar);
    // Puts go to the primary only.
    let o = put(&d.b, &seg, "000000010000000000000002");
    assert!(!o.status.success());
    assert!(err(&o).contains("takes no puts here"), "{}", err(&o));
}

#[test]
fn with_the_sync_follower_down_put_fails_and_succeeds_once_it_returns() {
    let mut d = deployment("");
    d.sync_policy = "on_unreachable = \"wait\"\nwait_limit = \"2s\"\n".into();
    d.configure(None);
    d.start();
    for s in [&d.a, &d.b, &d.c] {
        wait_ready(s);
    }
    let work = d.a.tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let first = segment(&work, "000000010000000000000001", 10, 1 << 20);
    assert!(put(&d.a, &first, "000000010000000000000001")
        .status
        .success());

    // The same-city site stops: the database's archive_command fails (it
    // keeps the segment and retries), naming the follower.
    assert!(d.b.stop().success());
    let names: Vec<String> = (2..=4)
        .map(|i| format!("00000001000000000000000{i}"))
        .collect();
    for (i, n) in names.iter().enumerate() {
        let p = segment(&work, n, 20 + i as u64, 1 << 20);
        let o = put(&d.a, &p, n);
        assert!(
            !o.status.success(),
            "put succeeded with the sync follower down"
        );
        assert!(err(&o).contains("zjk-b"), "{}", err(&o));
    }

    // Status and metrics say so: the commit policy is failing.
    std::thread::sleep(Duration::from_millis(600));
    let puts = d.a.status().unwrap()["puts"].clone();
    assert_eq!(puts["commit_failing"], true, "{puts}");
    assert_eq!(puts["commit_failures"], 3, "{puts}");

    // It returns; the retries succeed, and it has every segment.
    d.b.start();
    wait_ready(&d.b);
    for n in &names {
        let o = put(&d.a, &work.join(n), n);
        assert!(o.status.success(), "{}", err(&o));
    }
    std::thread::sleep(Duration::from_millis(600));
    let puts = d.a.status().unwrap()["puts"].clone();
    assert_eq!(puts["commit_failing"], false, "{puts}");
    assert_eq!(puts["existed"], 3, "{puts}");
    for n in std::iter::once(&"000000010000000000000001".to_string()).chain(&names) {
        assert_get(&d.b, n, &work.join(format!("{n}.b")), &work.join(n));
    }
}

#[test]
fn get_from_an_archive_needs_no_daemon() {
    let archive_dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", archive_dir.path().display());
    let mut d = deployment(&format!(
        "\n[archive]\nurl = \"{url}\"\nlog_flush_interval = \"500ms\"\n"
    ));
    d.start();
    for s in [&d.a, &d.b, &d.c] {
        wait_ready(s);
    }
    let work = d.a.tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let seg = segment(&work, "000000010000000000000001", 30, 3 << 20);
    assert!(put(&d.a, &seg, "000000010000000000000001").status.success());
    std::thread::sleep(Duration::from_millis(600));
    let head = d.a.status().unwrap()["log"]["head_seq"].as_u64().unwrap();
    d.a.wait_shipped(head, Duration::from_secs(60));

    // With --cache: the first get restores, a get of something archived
    // since restores again, a name in the cache is served from it.
    let cache = work.join("cache");
    let cached = |name: &str, dest: &Path| {
        Command::new(triad_bin())
            .args(["get", "--dataset", "files", "--from-archive", &url])
            .arg("--key-file")
            .arg(&d.a.key)
            .arg("--cache")
            .arg(&cache)
            .args(["--config", "/nonexistent/triad.toml"])
            .arg(name)
            .arg(dest)
            .output()
            .unwrap()
    };
    let o = cached("000000010000000000000001", &work.join("c1"));
    assert!(o.status.success(), "{}", err(&o));
    let seq_file = cache.join("files/seq");
    let first_seq = std::fs::read_to_string(&seq_file).unwrap();
    let seg2 = segment(&work, "000000010000000000000002", 31, 1 << 20);
    assert!(put(&d.a, &seg2, "000000010000000000000002")
        .status
        .success());
    std::thread::sleep(Duration::from_millis(600));
    let head = d.a.status().unwrap()["log"]["head_seq"].as_u64().unwrap();
    d.a.wait_shipped(head, Duration::from_secs(60));
    let o = cached("000000010000000000000002", &work.join("c2"));
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(
        std::fs::read(work.join("c2")).unwrap(),
        std::fs::read(&seg2).unwrap()
    );
    assert_ne!(std::fs::read_to_string(&seq_file).unwrap(), first_seq);
    let o = cached("000000010000000000000003", &work.join("c3"));
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert!(!work.join("c3").exists());
    assert!(d.a.stop().success());

    let fetch = |name: &str, dest: &Path| {
        Command::new(triad_bin())
            .args(["get", "--dataset", "files", "--from-archive", &url])
            .arg("--key-file")
            .arg(&d.a.key)
            .args(["--config", "/nonexistent/triad.toml"])
            .arg(name)
            .arg(dest)
            .output()
            .unwrap()
    };
    let back = work.join("from-archive");
    let o = fetch("000000010000000000000001", &back);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&seg).unwrap());
    let none = work.join("none");
    let o = fetch("000000010000000000000009", &none);
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert!(!none.exists());
}

/// PostgreSQL's archive_cleanup_command through triad: `triad forget
/// --wal-before %r` at the primary removes every WAL segment and partial
/// segment before the segment (whatever their timeline), keeps the rest,
/// backup history files and base backups, and every site follows; a name
/// can be forgotten on its own; a follower forgets nothing itself.
#[test]
fn forget_removes_old_wal_at_every_site_as_pg_archivecleanup_does() {
    let (d, work) = started();
    let names = [
        "000000010000000000000001",
        "000000010000000000000002",
        "000000010000000000000002.00000028.backup",
        "000000010000000000000003.partial",
        "000000020000000000000003",
        "000000020000000000000004",
        "000000020000000000000005",
        "base-1.tar",
        "00000002.history",
    ];
    for (i, n) in names.iter().enumerate() {
        let p = segment(&work, n, i as u64, 64 << 10);
        let o = put(&d.a, &p, n);
        assert!(o.status.success(), "{n}: {}", err(&o));
    }
    let forget = |site: &Site, args: &[&str]| {
        let mut a = vec!["forget", "--dataset", "files"];
        a.extend_from_slice(args);
        site.cli(&a)
    };
    let o = forget(&d.b, &["--wal-before", "000000020000000000000004"]);
    assert!(!o.status.success());
    assert!(err(&o).contains("forget at the primary"), "{}", err(&o));
    let o = forget(&d.a, &["--wal-before", "not-a-segment"]);
    assert!(!o.status.success());
    assert!(err(&o).contains("is not a WAL segment name"), "{}", err(&o));

    let o = forget(&d.a, &["--wal-before", "000000020000000000000004"]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("4 names removed"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let o = forget(&d.a, &["base-1.tar"]);
    assert!(o.status.success(), "{}", err(&o));
    // The backup history file stays, as pg_archivecleanup keeps it.
    let gone = [0, 1, 3, 4, 7];
    wait_replicated(&d.a, &[&d.b, &d.c], Duration::from_secs(60));
    for site in [&d.a, &d.b, &d.c] {
        for (i, n) in names.iter().enumerate() {
            let dest = work.join(format!("back-{i}"));
            let _ = std::fs::remove_file(&dest);
            if gone.contains(&i) {
                let o = get(site, n, &dest);
                assert_eq!(o.status.code(), Some(1), "{n} still there: {}", err(&o));
                assert!(!dest.exists());
            } else {
                assert_get(site, n, &dest, &work.join(n));
            }
        }
    }
}

/// A get that streams slowly while its name is forgotten still delivers the
/// whole object: it reads from one snapshot of the state.
#[test]
fn a_get_racing_a_forget_of_its_name_still_arrives_whole() {
    use std::io::{BufRead, BufReader, Read};
    let mut d = deployment("");
    d.start();
    wait_ready(&d.a);
    let work = d.a.tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let seg = segment(&work, "000000010000000000000001", 7, 64 << 20);
    let o = put(&d.a, &seg, "000000010000000000000001");
    assert!(o.status.success(), "{}", err(&o));

    // A client that reads the answer and 1 MiB, then stops reading: the
    // daemon blocks on the full socket with the rest unsent.
    let mut conn = std::os::unix::net::UnixStream::connect(d.a.data.join("triad.sock")).unwrap();
    conn.write_all(
        b"{\"op\":\"get\",\"dataset\":\"files\",\"name\":\"000000010000000000000001\"}\n",
    )
    .unwrap();
    let mut input = BufReader::new(conn);
    let mut line = String::new();
    input.read_line(&mut line).unwrap();
    assert!(line.contains("\"ok\":true"), "{line}");
    let mut got = vec![0u8; 1 << 20];
    input.read_exact(&mut got).unwrap();

    let o =
        d.a.cli(&["forget", "--dataset", "files", "000000010000000000000001"]);
    assert!(o.status.success(), "{}", err(&o));
    let gone = work.join("gone");
    assert_eq!(
        get(&d.a, "000000010000000000000001", &gone).status.code(),
        Some(1)
    );

    let mut rest = Vec::new();
    input.read_to_end(&mut rest).unwrap();
    got.extend_from_slice(&rest);
    let want = std::fs::read(&seg).unwrap();
    assert_eq!(got.len(), want.len() + 32, "the stream ended early");
    assert!(got[..want.len()] == want[..], "different bytes");
    assert_eq!(&got[want.len()..], blake3::hash(&want).as_bytes());
}
