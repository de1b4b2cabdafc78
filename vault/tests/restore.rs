//! Writing a tree from a real dataset (RocksDB state, log on disk) with
//! some chunks fetched from elsewhere while the files are written, as a
//! restore from an archive does: chunks arrive in any order, one chunk
//! fills every place it is used, and a chunk that never arrives, or arrives
//! altered, keeps exactly the files that need it out of the tree (named in
//! the report, no temporary file left behind) while the rest are restored.
//! A delta restore brings a changed tree back, reading the chunks it still
//! holds instead of fetching them.

use std::collections::HashSet;
use std::path::Path;

mod common;

use common::put;
use vault::chunk::{self, ChunkId};
use vault::ops::{ChunkRef, Entry, Node};
use vault::restore::{restore, restore_from, Remote, RestoreOptions};
use vault::{Dataset, DatasetKey, Options, View};

const MTIME: i64 = 1_600_000_000_123_456_789;

/// A file entry holding `data`, chunked as the directory source chunks
/// it, with the sealed chunks it brings.
fn file(keys: &vault::Keys, data: &[u8]) -> (Entry, Vec<vault::SealedChunk>) {
    let mut chunks = Vec::new();
    let mut sealed = Vec::new();
    for c in chunk::stream(std::io::Cursor::new(data.to_vec())) {
        let c = c.unwrap();
        let id = ChunkId::of(keys, &c);
        chunks.push(ChunkRef {
            id,
            len: c.len() as u32,
        });
        sealed.push(chunk::seal(keys, id, &c));
    }
    let e = Entry {
        node: Node::File { chunks },
        mode: 0o640,
        mtime_ns: MTIME,
        size: data.len() as u64,
        ext: None,
    };
    (e, sealed)
}

struct Setup {
    tmp: tempfile::TempDir,
    data: std::path::PathBuf,
    key: DatasetKey,
    /// Each file's contents.
    files: Vec<(&'static str, Vec<u8>)>,
}

impl Setup {
    /// The only chunk of the small file `name`.
    fn chunk_of(&self, keys: &vault::Keys, name: &str) -> ChunkId {
        let data = &self.files.iter().find(|(n, _)| *n == name).unwrap().1;
        ChunkId::of(keys, data)
    }
}

/// A dataset holding `a` (9 MiB of zeros: two identical 4 MiB chunks and
/// a 1 MiB one), `b` (4 MiB of zeros, the same chunk again), `d/e` and
/// `g` (one small chunk each) and `empty`.
fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let key = DatasetKey::generate();
    let files: Vec<(&'static str, Vec<u8>)> = vec![
        ("a", vec![0u8; 9 << 20]),
        ("b", vec![0u8; 4 << 20]),
        ("d/e", (0..5000u32).map(|j| (j * 7) as u8).collect()),
        ("empty", Vec::new()),
        ("g", (0..6000u32).map(|j| (j * 13 + 1) as u8).collect()),
    ];
    let ds = create(&data, &key);
    let keys = ds.keys().clone();
    let mut ops = vec![put(
        "d",
        Entry {
            node: Node::Dir,
            mode: 0o750,
            mtime_ns: MTIME,
            size: 0,
            ext: None,
        },
    )];
    let mut sealed = Vec::new();
    for (name, bytes) in &files {
        let (e, c) = file(&keys, bytes);
        ops.push(put(name, e));
        sealed.extend(c);
    }
    ds.submit(ops, sealed).unwrap();
    ds.close().unwrap();
    Setup {
        tmp,
        data,
        key,
        files,
    }
}

/// A new dataset `t` at `data`.
fn create(data: &Path, key: &DatasetKey) -> Dataset {
    Dataset::open(
        data,
        "t",
        key,
        Options {
            create: true,
            ..Options::default()
        },
    )
    .unwrap()
}

/// Every path under `root` whose name is a restore's temporary name.
fn temporaries(root: &Path) -> Vec<String> {
    walk(root)
        .into_iter()
        .filter(|p| p.contains(".triad-restore"))
        .collect()
}

fn walk(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p.to_string_lossy().into_owned());
    }
    out
}

/// What arrives for a chunk, given its sealed bytes (`None`: nothing).
type Deliver<'a> = &'a dyn Fn(&vault::Keys, ChunkId, Vec<u8>) -> Option<Vec<u8>>;

/// Restores with no chunk held locally: `deliver` decides, per chunk in
/// reverse order, what (if anything) arrives.
fn restore_fetching(s: &Setup, to: &Path, deliver: Deliver<'_>) -> vault::restore::Report {
    let view = View::open(&s.data, "t", &s.key).unwrap();
    let keys = view.keys().clone();
    let held = |_: &ChunkId| false;
    let mut asked = Vec::new();
    let mut fetch = |want: Vec<(ChunkId, vault::state::ChunkMeta)>,
                     give: &mut dyn FnMut(ChunkId, Vec<u8>)| {
        asked = want.iter().map(|(id, _)| *id).collect();
        let mut lost = Vec::new();
        for (id, _) in want.into_iter().rev() {
            let sealed = view.chunk_bytes(&id).unwrap().unwrap();
            match deliver(&keys, id, sealed) {
                Some(b) => give(id, b),
                None => lost.push(format!("chunk {id} lost on the way")),
            }
        }
        lost
    };
    let report = restore_from(
        &view,
        to,
        Some(Remote {
            held: &held,
            fetch: &mut fetch,
        }),
        RestoreOptions::default(),
        &|_| {},
    )
    .unwrap();
    // Each distinct chunk was asked for once, although the 4 MiB chunk of
    // zeros is used twice in `a` and once in `b`.
    assert_eq!(asked.len(), 4);
    assert_eq!(asked.iter().collect::<HashSet<_>>().len(), 4);
    report
}

#[test]
fn fetched_chunks_fill_every_place_they_are_used_in_any_order() {
    let s = setup();
    let to = s.tmp.path().join("out");
    let r = restore_fetching(&s, &to, &|_, _, b| Some(b));
    assert!(r.ok(), "{:?}", r.problems);
    assert_eq!((r.files, r.dirs), (5, 1));
    for (name, bytes) in &s.files {
        assert!(std::fs::read(to.join(name)).unwrap() == *bytes, "{name}");
    }
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(to.join("a")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o640);
    assert_eq!(md.mtime() * 1_000_000_000 + md.mtime_nsec(), MTIME);
    assert!(temporaries(&to).is_empty());
}

#[test]
fn a_chunk_lost_or_altered_on_the_way_keeps_only_its_files_out() {
    let s = setup();
    // `g`'s chunk never arrives; `d/e`'s arrives altered.
    let to = s.tmp.path().join("out");
    let r = restore_fetching(&s, &to, &|keys, id, mut b| {
        if id == s.chunk_of(keys, "g") {
            return None;
        }
        if id == s.chunk_of(keys, "d/e") {
            let n = b.len() / 2;
            b[n] ^= 1;
        }
        Some(b)
    });
    assert!(!r.ok());
    let named = |p: &str| r.problems.iter().any(|x| x.starts_with(&format!("{p}: ")));
    assert!(named("g"), "{:?}", r.problems);
    assert!(named("d/e"), "{:?}", r.problems);
    assert!(
        r.problems.iter().any(|x| x.contains("lost on the way")),
        "{:?}",
        r.problems
    );
    assert!(!to.join("g").exists());
    assert!(!to.join("d/e").exists());
    // The rest are whole.
    assert_eq!(r.files, 3);
    assert!(std::fs::read(to.join("a")).unwrap() == s.files[0].1);
    assert!(std::fs::read(to.join("b")).unwrap() == s.files[1].1);
    assert!(temporaries(&to).is_empty(), "{:?}", temporaries(&to));
    assert_ne!(r.expected_digest, r.restored_digest);
}

#[test]
fn a_site_copy_restores_whole_from_its_own_chunks() {
    let s = setup();
    let view = View::open(&s.data, "t", &s.key).unwrap();
    let to = s.tmp.path().join("out");
    let r = restore(&view, &to, &|_| {}).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
    assert_eq!(r.files, 5);
    assert!(std::fs::read(to.join("a")).unwrap() == s.files[0].1);
}

#[test]
fn a_delta_restore_fetches_only_what_the_tree_lost_and_removes_the_rest() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let s = setup();
    let view = View::open(&s.data, "t", &s.key).unwrap();
    let keys = view.keys().clone();
    let to = s.tmp.path().join("out");
    assert!(restore(&view, &to, &|_| {}).unwrap().ok());
    // Without --delta a non-empty target is refused.
    let err = restore(&view, &to, &|_| {}).unwrap_err().to_string();
    assert!(err.contains("--delta"), "{err}");

    // The tree drifts: `a` moved away, `b` chmodded, `d/e` rewritten, `g`
    // deleted, a directory where `empty` was, extra files and a symlink.
    std::fs::rename(to.join("a"), to.join("a.moved")).unwrap();
    std::fs::set_permissions(to.join("b"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(to.join("d/e"), b"something else").unwrap();
    std::fs::remove_file(to.join("g")).unwrap();
    std::fs::remove_file(to.join("empty")).unwrap();
    std::fs::create_dir_all(to.join("empty/sub")).unwrap();
    std::fs::write(to.join("empty/sub/f"), b"x").unwrap();
    std::fs::create_dir(to.join("x")).unwrap();
    std::fs::write(to.join("x/y"), b"extra").unwrap();
    std::os::unix::fs::symlink("/etc", to.join("link")).unwrap();
    // What an interrupted run leaves, and a fifo, which is never read.
    std::fs::write(to.join("d/.triad-restore.0000abcd.7"), b"half").unwrap();
    let st = std::process::Command::new("mkfifo")
        .arg(to.join("fifo"))
        .status()
        .unwrap();
    assert!(st.success());

    let held = |_: &ChunkId| false;
    let mut asked: Vec<ChunkId> = Vec::new();
    let mut fetch = |want: Vec<(ChunkId, vault::state::ChunkMeta)>,
                     give: &mut dyn FnMut(ChunkId, Vec<u8>)| {
        for (id, _) in want {
            asked.push(id);
            give(id, view.chunk_bytes(&id).unwrap().unwrap());
        }
        Vec::new()
    };
    let r = restore_from(
        &view,
        &to,
        Some(Remote {
            held: &held,
            fetch: &mut fetch,
        }),
        RestoreOptions {
            delta: true,
            ..RestoreOptions::default()
        },
        &|_| {},
    )
    .unwrap();
    assert!(r.ok(), "{:?}", r.problems);
    for (name, bytes) in &s.files {
        assert!(std::fs::read(to.join(name)).unwrap() == *bytes, "{name}");
    }
    assert_eq!(
        std::fs::metadata(to.join("b")).unwrap().mode() & 0o7777,
        0o640
    );
    for gone in ["a.moved", "x", "link", "empty/sub", "fifo"] {
        assert!(
            std::fs::symlink_metadata(to.join(gone)).is_err(),
            "{gone} was not removed"
        );
    }
    // Only the chunks the tree no longer held were fetched: `g`'s and
    // `d/e`'s; `a`'s and `b`'s two distinct chunks of zeros (4 MiB and
    // 1 MiB) were each read from the tree once.
    let mut want = vec![s.chunk_of(&keys, "g"), s.chunk_of(&keys, "d/e")];
    want.sort();
    asked.sort();
    assert_eq!(asked, want);
    assert_eq!(r.bytes_reused, 5 << 20);
    assert_eq!(r.files_kept, 1, "b, its mode set again");
    // `empty` (a directory in a file's place), then `x/y`, `x`, `link`,
    // `fifo`, `d/.triad-restore…` and `a.moved`; `empty/sub` went with
    // `empty` and is not counted again.
    assert_eq!(r.removed, 7);
    assert!(temporaries(&to).is_empty());
}

/// A restore into an empty target reads the namespace a few entries at a
/// time. Directories get their recorded mode and mtime only once
/// everything under them is in place (`d` sorts before `d.txt`, which
/// sorts before everything under `d/`; `ro` is read-only), names of one
/// file stay linked across batches, and the tree is the one a restore in
/// one batch makes.
#[test]
fn a_restore_a_few_entries_at_a_time_makes_the_same_tree() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let key = DatasetKey::generate();
    let ds = create(&data, &key);
    let keys = ds.keys().clone();
    let dir = |mode: u32, mtime_ns: i64| Entry {
        node: Node::Dir,
        mode,
        mtime_ns,
        size: 0,
        ext: None,
    };
    let mut ops = Vec::new();
    let mut sealed = Vec::new();
    for (i, p) in ["d", "d/s", "d/s/t", "e"].iter().enumerate() {
        ops.push(put(p, dir(0o750, MTIME + i as i64 * 1_000_000_000)));
    }
    ops.push(put("ro", dir(0o555, MTIME - 7_000_000_000)));
    let files = [
        "d.txt", "d/a", "d/s/b", "d/s/t/c", "d/z", "e/f", "ro/x", "ro/y", "zz",
    ];
    for (i, p) in files.iter().enumerate() {
        let (mut e, c) = file(&keys, format!("contents of {p} {i}").as_bytes());
        e.mtime_ns = MTIME + i as i64;
        ops.push(put(p, e));
        sealed.extend(c);
    }
    // `d/a` and `zz` are two names of one file, seven batches apart.
    let (mut linked, c) = file(&keys, b"one file, two names");
    linked.ext = Some(Box::new(vault::meta::Ext {
        kept: vault::meta::Preserve::HARDLINK,
        link: 7,
        ..Default::default()
    }));
    ops.push(put("d/a", linked.clone()));
    ops.push(put("zz", linked));
    sealed.extend(c);
    ds.submit(ops, sealed).unwrap();
    ds.close().unwrap();

    let view = View::open(&data, "t", &key).unwrap();
    let restore_in = |name: &str, batch: usize| {
        let to = tmp.path().join(name);
        let r = restore_from(
            &view,
            &to,
            None,
            RestoreOptions {
                batch,
                ..RestoreOptions::default()
            },
            &|_| {},
        )
        .unwrap();
        assert!(r.ok(), "batch {batch}: {:?}", r.problems);
        assert_eq!((r.files, r.dirs, r.hardlinks), (9, 5, 1), "batch {batch}");
        to
    };
    let whole = restore_in("whole", usize::MAX);
    for batch in [1, 2, 3] {
        let parts = restore_in(&format!("parts-{batch}"), batch);
        let mut paths = walk(&parts);
        paths.sort();
        let mut expect = walk(&whole);
        expect.sort();
        let rel = |v: Vec<String>, root: &Path| -> Vec<String> {
            v.into_iter()
                .map(|p| p.strip_prefix(root.to_str().unwrap()).unwrap().to_string())
                .collect()
        };
        assert_eq!(rel(paths.clone(), &parts), rel(expect, &whole));
        for p in rel(paths, &parts) {
            let p = p.trim_start_matches('/');
            let (a, b) = (
                std::fs::symlink_metadata(parts.join(p)).unwrap(),
                std::fs::symlink_metadata(whole.join(p)).unwrap(),
            );
            assert_eq!(
                (a.mode(), a.mtime(), a.mtime_nsec(), a.len()),
                (b.mode(), b.mtime(), b.mtime_nsec(), b.len()),
                "{p} with batch {batch}"
            );
        }
        let ro = std::fs::metadata(parts.join("ro")).unwrap();
        assert_eq!(ro.mode() & 0o7777, 0o555);
        assert_eq!(
            ro.mtime() * 1_000_000_000 + ro.mtime_nsec(),
            MTIME - 7_000_000_000
        );
        let (a, z) = (
            std::fs::metadata(parts.join("d/a")).unwrap(),
            std::fs::metadata(parts.join("zz")).unwrap(),
        );
        assert_eq!(a.ino(), z.ino(), "batch {batch}");
        assert_eq!(a.nlink(), 2);
    }
}
