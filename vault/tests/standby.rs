//! The hot standby tree against a real dataset (RocksDB state, log on disk):
//! it follows puts, renames, deletes and kind changes with the dataset's own
//! digest; a restart rechecks what changed since its saved cursor by
//! content; damage in the tree is undone; a directory triad did not make is
//! never filled.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

mod common;

use common::put;
use vault::ops::{Entry, Node, Op};
use vault::standby::Standby;
use vault::{Dataset, DatasetKey, Options};

fn dir(mode: u32) -> Entry {
    Entry {
        node: Node::Dir,
        mode,
        mtime_ns: 1_600_000_000_000_000_000,
        size: 0,
        ext: None,
    }
}

fn put_file(ds: &Dataset, path: &str, data: &[u8], mtime_ns: i64) {
    let (e, c) = common::file_entry(ds.keys(), data, 0o640, mtime_ns);
    ds.submit(vec![put(path, e)], vec![c]).unwrap();
}

fn submit(ds: &Dataset, ops: Vec<Op>) {
    ds.submit(ops, Vec::new()).unwrap();
}

fn rename(ds: &Dataset, from: &str, to: &str) {
    submit(
        ds,
        vec![Op::Rename {
            from: from.as_bytes().to_vec(),
            to: to.as_bytes().to_vec(),
        }],
    );
}

/// Saves the cursor at `seq` (the tree equal to the dataset there).
fn save(sb: &Standby, ds: &Dataset, seq: u64) {
    sb.save(seq, ds.chain_hash_at(seq).unwrap().unwrap())
        .unwrap();
}

/// Runs passes until the tree has every record; returns the last seq.
fn catch_up(sb: &Standby, ds: &Dataset, mut seq: u64) -> u64 {
    while seq < ds.head_seq() {
        let pass = sb
            .apply(ds, seq + 1)
            .unwrap()
            .expect("log holds the records");
        assert!(pass.problems.is_empty(), "{:?}", pass.problems);
        seq = pass.seq;
    }
    seq
}

fn assert_same_digest(ds: &Dataset, root: &Path) {
    let want = ds.state().applied().unwrap().digest.summary();
    let got = vault::restore::digest_tree(ds.keys(), root, &|_| None, u8::MAX)
        .unwrap()
        .summary();
    assert_eq!(
        hex(&got),
        hex(&want),
        "tree digest differs from the dataset's"
    );
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

struct Setup {
    _tmp: tempfile::TempDir,
    ds: Dataset,
    root: std::path::PathBuf,
    cursor: std::path::PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let ds = Dataset::open(
        &tmp.path().join("ds"),
        "t",
        &DatasetKey::generate(),
        Options::default(),
    )
    .unwrap();
    let root = tmp.path().join("standby");
    let cursor = tmp.path().join("standby.json");
    Setup {
        _tmp: tmp,
        ds,
        root,
        cursor,
    }
}

#[test]
fn the_tree_follows_puts_renames_deletes_and_kind_changes_with_the_datasets_digest() {
    let s = setup();
    let ds = &s.ds;
    let sb = Standby::open(&s.root, &s.cursor).unwrap();
    submit(ds, vec![put("a", dir(0o755)), put("a/b", dir(0o700))]);
    put_file(ds, "a/b/one", b"first file", 1_700_000_000_123_456_789);
    put_file(ds, "a/two", b"second", 1_700_000_001_000_000_000);
    submit(
        ds,
        vec![put(
            "link",
            Entry {
                node: Node::Symlink {
                    target: b"/etc/hostname".to_vec(),
                },
                mode: 0o777,
                mtime_ns: 1_700_000_002_000_000_000,
                size: 13,
                ext: None,
            },
        )],
    );
    let mut seq = catch_up(&sb, ds, 0);
    assert_eq!(
        std::fs::read(s.root.join("a/b/one")).unwrap(),
        b"first file"
    );
    assert_same_digest(ds, &s.root);

    // A directory renamed is moved, not written again: the file keeps its inode.
    let ino = std::fs::metadata(s.root.join("a/b/one")).unwrap().ino();
    rename(ds, "a/b", "moved");
    seq = catch_up(&sb, ds, seq);
    assert_eq!(
        std::fs::metadata(s.root.join("moved/one")).unwrap().ino(),
        ino
    );
    assert!(!s.root.join("a/b").exists());
    assert_same_digest(ds, &s.root);

    // A file becomes a directory, a directory becomes a file, a subtree goes.
    submit(ds, vec![put("a/two", dir(0o750))]);
    put_file(ds, "a/two/inside", b"nested", 1_700_000_003_000_000_000);
    put_file(ds, "moved", b"now a file", 1_700_000_004_000_000_000);
    submit(
        ds,
        vec![Op::Delete {
            path: b"a".to_vec(),
        }],
    );
    seq = catch_up(&sb, ds, seq);
    assert!(!s.root.join("a").exists());
    assert_eq!(std::fs::read(s.root.join("moved")).unwrap(), b"now a file");
    assert_same_digest(ds, &s.root);

    // A file changed in place, then renamed within the same pass.
    put_file(ds, "x", b"v1", 1_700_000_005_000_000_000);
    seq = catch_up(&sb, ds, seq);
    put_file(ds, "x", b"v2", 1_700_000_005_000_000_000);
    rename(ds, "x", "y");
    catch_up(&sb, ds, seq);
    assert_eq!(std::fs::read(s.root.join("y")).unwrap(), b"v2");
    assert_same_digest(ds, &s.root);
}

#[test]
fn a_restart_rechecks_by_content_what_was_put_since_the_saved_cursor() {
    let s = setup();
    let ds = &s.ds;
    let t = 1_700_000_000_000_000_000;
    put_file(ds, "f", b"old contents", t);
    {
        let sb = Standby::open(&s.root, &s.cursor).unwrap();
        let seq = catch_up(&sb, ds, 0);
        save(&sb, ds, seq);
    }
    // The dataset moves on with a file of the same size, mtime and mode, and
    // the standby stops before its pass (a crash): size and mtime alone would
    // call the old file current.
    put_file(ds, "f", b"new contents", t);
    let sb = Standby::open(&s.root, &s.cursor).unwrap();
    assert_eq!(
        sb.keep_from(),
        2,
        "the log is kept from the saved cursor on"
    );
    let pass = sb.reconcile(ds).unwrap();
    assert!(pass.problems.is_empty(), "{:?}", pass.problems);
    assert_eq!(pass.seq, ds.head_seq());
    assert_eq!(std::fs::read(s.root.join("f")).unwrap(), b"new contents");
    assert_same_digest(ds, &s.root);
}

#[test]
fn damage_done_to_the_tree_is_undone_by_a_reconcile() {
    let s = setup();
    let ds = &s.ds;
    submit(ds, vec![put("d", dir(0o755))]);
    put_file(ds, "d/keep", b"keep me", 1_700_000_000_000_000_000);
    put_file(ds, "gone", b"delete me", 1_700_000_000_000_000_000);
    let sb = Standby::open(&s.root, &s.cursor).unwrap();
    let seq = catch_up(&sb, ds, 0);
    save(&sb, ds, seq);

    std::fs::write(s.root.join("d/stray"), b"not in the dataset").unwrap();
    std::fs::create_dir_all(s.root.join("strays/deeper")).unwrap();
    std::fs::remove_file(s.root.join("gone")).unwrap();
    std::fs::set_permissions(
        s.root.join("d/keep"),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let pass = sb.reconcile(ds).unwrap();
    assert!(pass.problems.is_empty(), "{:?}", pass.problems);
    assert!(!s.root.join("d/stray").exists() && !s.root.join("strays").exists());
    assert_eq!(std::fs::read(s.root.join("gone")).unwrap(), b"delete me");
    assert_same_digest(ds, &s.root);
}

#[test]
fn a_directory_triad_did_not_make_is_refused_and_left_alone() {
    let s = setup();
    std::fs::create_dir_all(&s.root).unwrap();
    std::fs::write(s.root.join("precious"), b"operator data").unwrap();
    let err = Standby::open(&s.root, &s.cursor).err().expect("refused");
    assert!(err.to_string().contains("triad did not make it"), "{err}");
    assert_eq!(
        std::fs::read(s.root.join("precious")).unwrap(),
        b"operator data"
    );
}

#[test]
fn a_tree_cut_off_during_its_first_fill_is_taken_up_again() {
    let s = setup();
    let ds = &s.ds;
    put_file(ds, "a", b"first", 1_700_000_000_000_000_000);
    put_file(ds, "b", b"second", 1_700_000_000_000_000_000);
    {
        // Filled, but stopped (killed) before any cursor save.
        let sb = Standby::open(&s.root, &s.cursor).unwrap();
        catch_up(&sb, ds, 0);
    }
    std::fs::write(s.root.join("b"), b"SECOND").unwrap();
    let sb = Standby::open(&s.root, &s.cursor).expect("its own tree is not refused");
    let pass = sb.reconcile(ds).unwrap();
    assert!(pass.problems.is_empty(), "{:?}", pass.problems);
    // Without a saved seq every file is compared by content.
    assert_eq!(std::fs::read(s.root.join("b")).unwrap(), b"second");
    assert_same_digest(ds, &s.root);
}

#[test]
fn a_file_put_and_renamed_over_a_lookalike_in_one_pass_lands_with_its_contents() {
    let s = setup();
    let ds = &s.ds;
    let t = 1_700_000_000_000_000_000;
    put_file(ds, "y", b"version one", t);
    let sb = Standby::open(&s.root, &s.cursor).unwrap();
    let seq = catch_up(&sb, ds, 0);
    // The same size, mtime and mode, other contents: a tmp file renamed
    // over its target, as editors and `cp -p` do.
    put_file(ds, "x", b"version two", t);
    rename(ds, "x", "y");
    catch_up(&sb, ds, seq);
    assert_eq!(std::fs::read(s.root.join("y")).unwrap(), b"version two");
    assert_same_digest(ds, &s.root);
}

#[test]
fn an_empty_directory_in_the_trees_place_is_not_filled() {
    let s = setup();
    let ds = &s.ds;
    put_file(ds, "f", b"data", 1_700_000_000_000_000_000);
    {
        let sb = Standby::open(&s.root, &s.cursor).unwrap();
        let seq = catch_up(&sb, ds, 0);
        save(&sb, ds, seq);
    }
    // The tree's file system not mounted: an empty directory stands there.
    // (Made before the old one goes, so it cannot reuse its inode.)
    let other = s.root.with_file_name("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::remove_dir_all(&s.root).unwrap();
    std::fs::rename(&other, &s.root).unwrap();
    let err = Standby::open(&s.root, &s.cursor).err().expect("refused");
    assert!(
        err.to_string()
            .contains("is not the directory triad filled"),
        "{err}"
    );
}
