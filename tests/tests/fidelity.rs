//! Every file as it was: owners, extended attributes, POSIX ACLs (access
//! and default), hard links, sparse files, fifos and device nodes, taken
//! by the directory source and restored, as root, from the site's copy and
//! from the archive on s3s-fs; attribute-only changes (chown, setfacl,
//! setxattr) reach the copy; a restore as an unprivileged user restores
//! what it can and names what it could not.
//!
//! These tests need root (the harness and CI run as root): only root can
//! give files away, set `trusted.*` attributes and make device nodes.

use crate::common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{now_ns, triad_bin, Site};
use triad_tests::s3::S3Server;

const BUCKET: &str = "triad";

/// `triad restore` of the latest point of the test archive, as JSON.
const FROM_ARCHIVE: [&str; 8] = [
    "restore",
    "--from-archive",
    "s3://triad/site-a",
    "--dataset",
    "files",
    "--at",
    "latest",
    "--json",
];

/// Runs `script` with bash in `dir`; panics with its output on failure.
fn sh(dir: &Path, script: &str) -> String {
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(dir)
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "{script}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(p, name, value, rustix::fs::XattrFlags::empty())
        .unwrap_or_else(|e| panic!("setxattr {name} on {}: {e}", p.display()));
}

fn get_xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 65536];
    match rustix::fs::lgetxattr(p, name, &mut buf[..]) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(_) => None,
    }
}

/// A tree with one of everything triad keeps beyond contents and modes.
fn make_tree(root: &Path) {
    sh(
        root,
        r#"
        echo owned > owned && chown 1234:2345 owned && chmod 4750 owned
        mkdir -p dir && chown 1234:2345 dir && chmod 0750 dir
        echo inside > dir/file && chown 2345:1234 dir/file
        echo x > xattrs
        mkdir -p acl && setfacl -m u:1234:rwx,g:2345:r acl && setfacl -d -m u:1234:rx acl
        echo inner > acl/inner && setfacl -m u:4321:r acl/inner
        mkdir -p a b && echo linked > a/h1 && ln a/h1 b/h2 && ln a/h1 h3
        truncate -s 64M sparse
        printf head | dd of=sparse conv=notrunc status=none
        printf tail | dd of=sparse bs=1 seek=$((64*1024*1024-4)) conv=notrunc status=none
        mkfifo pipe && chown 1234:2345 pipe && chmod 0640 pipe
        mknod null c 1 3 && chmod 0666 null
        ln -s owned link && chown -h 1234:2345 link
        touch -d 2001-02-03T04:05:06 dir/file owned
        "#,
    );
    set_xattr(&root.join("xattrs"), "user.note", b"hello");
    set_xattr(&root.join("xattrs"), "trusted.tag", b"t");
    set_xattr(&root.join("dir"), "user.dir", b"d");
}

/// The ACLs of the paths that carry them, as getfacl prints them
/// (owner and group names included).
fn acls(root: &Path) -> String {
    sh(root, "getfacl -p acl acl/inner dir")
}

fn owner(p: &Path) -> (u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.uid(), m.gid())
}

/// Everything `make_tree` made is in `got` as in `src` (hard links and
/// holes only when `links_and_holes`: a standby tree writes each name as
/// its own file).
fn assert_faithful(src: &Path, got: &Path, links_and_holes: bool) {
    for p in [
        "owned",
        "dir",
        "dir/file",
        "pipe",
        "link",
        "acl",
        "acl/inner",
    ] {
        assert_eq!(owner(&src.join(p)), owner(&got.join(p)), "owner of {p}");
    }
    let mode = |r: &Path, p: &str| {
        std::fs::symlink_metadata(r.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    for p in ["owned", "dir", "pipe", "null", "acl"] {
        assert_eq!(mode(src, p), mode(got, p), "mode of {p}");
    }
    for (p, n) in [
        ("xattrs", "user.note"),
        ("xattrs", "trusted.tag"),
        ("dir", "user.dir"),
    ] {
        assert_eq!(
            get_xattr(&src.join(p), n),
            get_xattr(&got.join(p), n),
            "{n} of {p}"
        );
        assert!(get_xattr(&got.join(p), n).is_some(), "{n} of {p}");
    }
    assert_eq!(acls(src), acls(got));
    assert!(acls(got).contains("default:user:1234:r-x"), "{}", acls(got));
    assert_eq!(
        std::fs::read(src.join("sparse")).unwrap(),
        std::fs::read(got.join("sparse")).unwrap()
    );
    if links_and_holes {
        assert_links_and_holes(got);
    }
    assert!(std::fs::symlink_metadata(got.join("pipe"))
        .unwrap()
        .file_type()
        .is_fifo());
    let null = std::fs::symlink_metadata(got.join("null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(
        null.rdev(),
        std::fs::metadata(src.join("null")).unwrap().rdev()
    );
    let mtime = |r: &Path, p: &str| std::fs::symlink_metadata(r.join(p)).unwrap().mtime();
    for p in ["owned", "dir/file", "dir", "acl"] {
        assert_eq!(mtime(src, p), mtime(got, p), "mtime of {p}");
    }
}

fn assert_links_and_holes(got: &Path) {
    let ino = |p: &str| std::fs::metadata(got.join(p)).unwrap().ino();
    assert_eq!(ino("a/h1"), ino("b/h2"), "hard link");
    assert_eq!(ino("a/h1"), ino("h3"), "hard link");
    assert_eq!(std::fs::metadata(got.join("h3")).unwrap().nlink(), 3);
    let sparse = std::fs::metadata(got.join("sparse")).unwrap();
    assert_eq!(sparse.len(), 64 << 20);
    assert!(
        sparse.blocks() * 512 < 1 << 20,
        "sparse file takes {} bytes on disk",
        sparse.blocks() * 512
    );
}

fn restore_json(out: &std::process::Output, what: &str) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn archive_restore(site: &Site, to: &Path) -> std::process::Output {
    Command::new(triad_bin())
        .args(FROM_ARCHIVE)
        .arg("--to")
        .arg(to)
        .arg("--config")
        .arg(&site.config)
        .output()
        .unwrap()
}

fn settle_and_snapshot(site: &Site) {
    let st = site.wait_settled(now_ns(), Duration::from_secs(60));
    let head = st["log"]["head_seq"].as_u64().unwrap();
    let out = site.cli(&["snapshot", "--dataset", "files", "--json"]);
    assert!(
        out.status.success(),
        "snapshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    site.wait_shipped(head, Duration::from_secs(60));
}

/// A site archiving into s3s-fs whose source holds `make_tree`'s tree,
/// taken in and snapshotted.
fn archived_site() -> (S3Server, Site) {
    let s3 = S3Server::start(BUCKET);
    let mut site = Site::new();
    site.add_s3_archive(&s3.endpoint(), "");
    make_tree(&site.source);
    site.start();
    settle_and_snapshot(&site);
    (s3, site)
}

#[test]
fn owners_attributes_acls_links_holes_and_special_files_come_back_from_the_copy_and_the_archive() {
    let (_s3, mut site) = archived_site();

    let from_copy = site.tmp.path().join("from-copy");
    let r = restore_json(
        &site.cli(&[
            "restore",
            "--dataset",
            "files",
            "--json",
            "--to",
            &from_copy.to_string_lossy(),
        ]),
        "restore from the site's copy",
    );
    assert_eq!(r["not_restored"], serde_json::json!([]), "{r}");
    assert_eq!(r["hardlinks"], 2, "{r}");
    assert_eq!(r["specials"], 2, "{r}");
    assert_faithful(&site.source, &from_copy, true);
    let mode = std::fs::metadata(from_copy.join("owned")).unwrap().mode();
    assert_eq!(mode & 0o7777, 0o4750, "setuid kept after the chown");
    // Again over the restored tree, with an attribute and an ACL entry
    // added there: links already in place stay, the additions go.
    set_xattr(&from_copy.join("xattrs"), "user.extra", b"added");
    sh(&from_copy, "setfacl -m u:777:r acl/inner");
    let r = restore_json(
        &site.cli(&[
            "restore",
            "--dataset",
            "files",
            "--delta",
            "--json",
            "--to",
            &from_copy.to_string_lossy(),
        ]),
        "a delta restore over the restored tree",
    );
    assert_eq!(r["expected_digest"], r["restored_digest"], "{r}");
    assert_eq!(get_xattr(&from_copy.join("xattrs"), "user.extra"), None);
    assert_faithful(&site.source, &from_copy, true);
    let left = sh(&from_copy, "find . -name '.triad-restore*'");
    assert!(left.is_empty(), "{left}");

    let from_archive = site.tmp.path().join("from-archive");
    let r = restore_json(
        &archive_restore(&site, &from_archive),
        "restore from the archive",
    );
    assert_eq!(r["expected_digest"], r["restored_digest"], "{r}");
    assert_faithful(&site.source, &from_archive, true);

    // Attribute-only changes: no byte of contents and no mtime moves.
    sh(
        &site.source,
        "chown 4321:4321 owned && setfacl -m u:999:rw acl/inner && chmod 0700 dir",
    );
    set_xattr(&site.source.join("xattrs"), "user.note", b"changed");
    let again = site.tmp.path().join("again");
    common::wait_until(
        "the attribute-only changes to reach the site's copy",
        Duration::from_secs(60),
        || {
            let _ = std::fs::remove_dir_all(&again);
            let out = site.cli(&[
                "restore",
                "--dataset",
                "files",
                "--json",
                "--to",
                &again.to_string_lossy(),
            ]);
            out.status.success()
                && owner(&again.join("owned")) == (4321, 4321)
                && get_xattr(&again.join("xattrs"), "user.note").as_deref() == Some(b"changed")
                && acls(&again) == acls(&site.source)
        },
    );
    assert_faithful(&site.source, &again, true);
    site.stop();
}

#[test]
fn a_restore_as_an_unprivileged_user_names_what_it_could_not_put_back() {
    let (s3, mut site) = archived_site();
    site.stop();

    // `nobody` owns copies of the key and the store's credentials, and may
    // write only its own target.
    let tmp = site.tmp.path();
    std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    let key = tmp.join("nobody.key");
    std::fs::copy(&site.key, &key).unwrap();
    let creds = tmp.join("nobody.creds");
    std::fs::copy(triad_tests::s3::write_credentials(tmp), &creds).unwrap();
    let work = tmp.join("nobody");
    std::fs::create_dir(&work).unwrap();
    sh(tmp, "chown 65534:65534 nobody nobody.key nobody.creds");
    for f in [&key, &creds] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let to = work.join("restored");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(triad_bin())
        .args(FROM_ARCHIVE)
        .args([
            "--endpoint",
            &s3.endpoint(),
            "--key-file",
            &key.to_string_lossy(),
            "--credentials-file",
            &creds.to_string_lossy(),
            "--to",
            &to.to_string_lossy(),
        ])
        .env("TMPDIR", &work)
        .env("HOME", &work)
        .current_dir(&work)
        .output()
        .unwrap();
    let r = restore_json(&out, "restore as nobody");
    let missed: Vec<(String, u64, Vec<String>, String)> = r["not_restored"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["what"].as_str().unwrap().to_string(),
                n["paths"].as_u64().unwrap(),
                n["examples"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e.as_str().unwrap().to_string())
                    .collect(),
                n["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let kind = |w: &str| missed.iter().find(|m| m.0 == w).cloned();
    let (_, n, examples, reason) = kind("owner").unwrap_or_else(|| panic!("{r}"));
    // Every path whose owner is not nobody's: the root-owned ones too.
    assert!(n >= 8, "{r}");
    assert!(!examples.is_empty() && examples.len() <= 10, "{r}");
    assert!(reason.contains("root"), "{r}");
    let (_, n, examples, _) = kind("xattr").unwrap_or_else(|| panic!("{r}"));
    assert_eq!((n, examples), (1, vec!["xattrs".to_string()]), "{r}");
    let (_, n, examples, _) = kind("special").unwrap_or_else(|| panic!("{r}"));
    assert_eq!((n, examples), (1, vec!["null".to_string()]), "{r}");
    assert_eq!(
        r["digest_excludes"],
        serde_json::json!(["owner", "xattr", "special"]),
        "{r}"
    );
    // The rest is there and matches: contents, user attributes, ACLs of
    // the files nobody owns now, links, holes, the fifo.
    assert_eq!(r["expected_digest"], r["restored_digest"], "{r}");
    assert_eq!(
        get_xattr(&to.join("xattrs"), "user.note").as_deref(),
        Some(&b"hello"[..])
    );
    assert_eq!(
        std::fs::metadata(to.join("a/h1")).unwrap().ino(),
        std::fs::metadata(to.join("b/h2")).unwrap().ino()
    );
    assert!(std::fs::symlink_metadata(to.join("pipe"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert!(!to.join("null").exists());
    assert_eq!(owner(&to.join("owned")), (65534, 65534));
}

#[test]
fn standby_trees_carry_owners_attributes_acls_and_special_files() {
    use common::deploy::{standby_dir, wait_replicated, Deployment};
    let mut dep = Deployment::new(None);
    dep.standby = true;
    dep.configure(None);
    make_tree(&dep.a.source);
    dep.start();
    dep.a.wait_settled(now_ns(), Duration::from_secs(60));
    let (head, _, _) = wait_replicated(&dep.a, &[&dep.b, &dep.c], Duration::from_secs(60));
    for site in [&dep.b, &dep.c] {
        common::until(
            "the standby tree to catch up",
            Duration::from_secs(60),
            || {
                let v = site.status()?;
                let s = &v["standby"];
                (s["ready"] == true && s["seq"].as_u64() == Some(head)).then_some(())
            },
        );
        assert_faithful(&dep.a.source, &standby_dir(site), false);
    }
    // Owners and ACLs changed alone reach the trees, put in place: the
    // file keeps its inode (a rewrite would rename a new one over it).
    let inode = |site: &Site| {
        std::fs::metadata(standby_dir(site).join("owned"))
            .unwrap()
            .ino()
    };
    let before = [inode(&dep.b), inode(&dep.c)];
    sh(
        &dep.a.source,
        "chown 4321:4321 owned && chown -h 4321:4321 link && setfacl -m u:999:rw acl/inner",
    );
    for (site, ino) in [&dep.b, &dep.c].into_iter().zip(before) {
        let tree = standby_dir(site);
        common::wait_until(
            "the owner and ACL changes in the standby tree",
            Duration::from_secs(60),
            || {
                owner(&tree.join("owned")) == (4321, 4321)
                    && owner(&tree.join("link")) == (4321, 4321)
                    && acls(&tree) == acls(&dep.a.source)
            },
        );
        assert_eq!(inode(site), ino, "rewritten, not changed in place");
    }
}
