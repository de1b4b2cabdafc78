//! Applying ops to a real RocksDB state through the committer: namespace,
//! reference counts and the running digest stay exact across renames of
//! trees, kind changes, deletes of subtrees, pins and a reopen.

mod common;

use common::put;
use vault::chunk::ChunkId;
use vault::ops::{Entry, Node, Op};
use vault::{Dataset, DatasetKey, Options, SubmitError};

fn file(keys: &vault::Keys, data: &[u8]) -> (Entry, vault::SealedChunk) {
    common::file_entry(keys, data, 0o644, 1_700_000_000_000_000_000)
}

fn dir() -> Entry {
    Entry {
        node: Node::Dir,
        mode: 0o755,
        mtime_ns: 1,
        size: 0,
        ext: None,
    }
}

/// Running digest equals a recomputation; refcounts equal references.
fn check(ds: &Dataset) {
    let st = ds.state();
    assert_eq!(
        st.applied().unwrap().digest,
        st.recompute_digest(ds.keys()).unwrap()
    );
    let mut refs = std::collections::HashMap::<ChunkId, u64>::new();
    for (_, e) in st.entries_with_prefix(b"").unwrap() {
        for c in e.chunks() {
            *refs.entry(c.id).or_default() += 1;
        }
    }
    for (id, n) in st.pins().unwrap() {
        *refs.entry(id).or_default() += n;
    }
    let stored = st.all_chunk_meta().unwrap();
    assert_eq!(
        stored.len(),
        refs.len(),
        "stored chunks are exactly the referenced ones"
    );
    for (id, m) in stored {
        assert_eq!(Some(&m.refs), refs.get(&id));
    }
}

fn paths(ds: &Dataset) -> Vec<String> {
    ds.entries_with_prefix(b"")
        .unwrap()
        .into_iter()
        .map(|(p, _)| String::from_utf8(p).unwrap())
        .collect()
}

#[test]
fn trees_move_change_kind_and_vanish_with_exact_counts_and_digest() {
    let tmp = tempfile::tempdir().unwrap();
    let key = DatasetKey::generate();
    let ds = Dataset::open(tmp.path(), "t", &key, Options::default()).unwrap();
    let keys = ds.keys().clone();
    let (fa, ca) = file(&keys, b"alpha");
    let (fb, cb) = file(&keys, b"beta");
    ds.submit(
        vec![
            put("d", dir()),
            put("d/e", dir()),
            put("d/e/a", fa.clone()),
            put("d/b", fb.clone()),
        ],
        vec![ca.clone(), cb.clone()],
    )
    .unwrap();
    // The same content under another name is stored once.
    ds.submit(vec![put("copy-of-a", fa.clone())], vec![])
        .unwrap();
    check(&ds);
    assert_eq!(ds.state().chunk_meta(&ca.id).unwrap().unwrap().refs, 2);

    ds.submit(
        vec![Op::Rename {
            from: b"d".to_vec(),
            to: b"moved".to_vec(),
        }],
        vec![],
    )
    .unwrap();
    assert_eq!(
        paths(&ds),
        ["copy-of-a", "moved", "moved/b", "moved/e", "moved/e/a"]
    );
    check(&ds);

    // Renames into their own subtree or onto an ancestor are ignored.
    ds.submit(
        vec![Op::Rename {
            from: b"moved".to_vec(),
            to: b"moved/e/x".to_vec(),
        }],
        vec![],
    )
    .unwrap();
    ds.submit(
        vec![Op::Rename {
            from: b"moved/e".to_vec(),
            to: b"moved".to_vec(),
        }],
        vec![],
    )
    .unwrap();
    assert_eq!(
        paths(&ds),
        ["copy-of-a", "moved", "moved/b", "moved/e", "moved/e/a"]
    );
    check(&ds);

    // A directory replaced by a file takes its subtree with it.
    ds.submit(vec![put("moved", fb.clone())], vec![]).unwrap();
    assert_eq!(paths(&ds), ["copy-of-a", "moved"]);
    check(&ds);
    assert_eq!(ds.state().chunk_meta(&ca.id).unwrap().unwrap().refs, 1);

    ds.submit(
        vec![Op::Delete {
            path: b"copy-of-a".to_vec(),
        }],
        vec![],
    )
    .unwrap();
    assert!(
        ds.state().chunk_meta(&ca.id).unwrap().is_none(),
        "an unreferenced chunk is freed"
    );
    assert!(ds.state().chunk_bytes(&ca.id).unwrap().is_none());
    check(&ds);

    // A reference to a chunk that is not stored is refused, not applied.
    match ds.submit(vec![put("again", fa.clone())], vec![]) {
        Err(SubmitError::Missing(m)) => assert_eq!(m.0, vec![ca.id]),
        other => panic!("expected Missing, got {other:?}"),
    }
    // Pinned chunks survive until unpinned; a restart releases leftover pins.
    ds.submit(vec![Op::Pin { ids: vec![ca.id] }], vec![ca.clone()])
        .unwrap();
    check(&ds);
    let head = ds.status().head_seq;
    drop(ds);
    let ds = Dataset::open(tmp.path(), "t", &key, Options::default()).unwrap();
    assert_eq!(
        ds.status().head_seq,
        head + 1,
        "the reopen logged an Unpin for the leftover pin"
    );
    assert!(ds.state().chunk_meta(&ca.id).unwrap().is_none());
    check(&ds);
}

#[test]
fn a_second_process_cannot_open_the_same_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let key = DatasetKey::generate();
    let _first = Dataset::open(tmp.path(), "t", &key, Options::default()).unwrap();
    let err = Dataset::open(tmp.path(), "t", &key, Options::default())
        .err()
        .expect("refused");
    assert!(err.to_string().contains("open in another process"), "{err}");
}

#[test]
fn checkpoints_carry_hmac_sm3_evidence() {
    let tmp = tempfile::tempdir().unwrap();
    let key = DatasetKey::generate();
    let ds = Dataset::open(tmp.path(), "t", &key, Options::default()).unwrap();
    for i in 0..600 {
        ds.submit(vec![put(&format!("d{i}"), dir())], vec![])
            .unwrap();
    }
    let cps = ds.state().checkpoints().unwrap();
    assert_eq!(
        cps.iter().map(|c| c.seq).collect::<Vec<_>>(),
        vec![256, 512]
    );
    assert_eq!(ds.latest_checkpoint().unwrap().map(|c| c.seq), Some(512));
    assert_eq!(ds.checkpoint_at(256).unwrap().as_ref(), cps.first());
    assert!(ds.checkpoint_at(300).unwrap().is_none());
    let other = DatasetKey::generate().derive();
    for c in &cps {
        assert!(c.verify(ds.keys()));
        assert!(!c.verify(&other), "evidence is bound to the dataset key");
    }
}

/// A reader's view keeps working while the writer deletes every chunk it
/// still needs and RocksDB removes the blob files that held them.
#[test]
fn a_view_reads_chunks_whose_blob_files_the_writer_deleted() {
    let tmp = tempfile::tempdir().unwrap();
    let key = DatasetKey::generate();
    let ds = Dataset::open(tmp.path(), "t", &key, Options::default()).unwrap();
    let keys = ds.keys().clone();
    let mut expected = Vec::new();
    for i in 0..64u32 {
        // Incompressible, above the 1 KiB blob threshold.
        let data: Vec<u8> = (0..8192u32)
            .map(|j| (j.wrapping_mul(2_654_435_761).wrapping_add(i) >> 13) as u8)
            .collect();
        let (f, c) = file(&keys, &data);
        expected.push((c.id, ds.state().chunk_meta(&c.id).unwrap().is_none()));
        ds.submit(vec![put(&format!("f{i}"), f)], vec![c]).unwrap();
    }
    ds.flush_state().unwrap();
    let blobs = |dir: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".blob"))
            .collect()
    };
    let before = blobs(&tmp.path().join("state"));
    assert!(!before.is_empty(), "chunks are stored in blob files");

    let view = vault::View::open(tmp.path(), "t", &key).unwrap();
    for i in 0..64u32 {
        ds.submit(
            vec![Op::Delete {
                path: format!("f{i}").into_bytes(),
            }],
            vec![],
        )
        .unwrap();
    }
    ds.flush_state().unwrap();
    ds.state().compact().unwrap();
    let after = blobs(&tmp.path().join("state"));
    assert!(
        before.iter().all(|b| !after.contains(b)),
        "the writer deleted the blob files: before {before:?}, after {after:?}"
    );
    for (id, _) in &expected {
        let sealed = view.chunk_bytes(id).unwrap().expect("chunk in the view");
        assert!(!sealed.is_empty());
    }
    let pinned = tmp.path().join(vault::pin::VIEWS_DIR);
    assert_eq!(std::fs::read_dir(&pinned).unwrap().count(), 1);
    drop(view);
    assert_eq!(std::fs::read_dir(&pinned).unwrap().count(), 0);
}

#[test]
fn writers_queue_at_most_64_mib_of_chunks_for_the_committer() {
    let tmp = tempfile::tempdir().unwrap();
    let key = DatasetKey::generate();
    let ds = Dataset::open(&tmp.path().join("ds"), "files", &key, Options::default()).unwrap();
    // 48 files of 4 MiB of random bytes, sealed up front so the writers
    // queue them faster than the committer can write them: 192 MiB in all.
    let mut rng = rand::thread_rng();
    let files: Vec<(Entry, vault::SealedChunk)> = (0..48)
        .map(|_| {
            let mut data = vec![0u8; 4 << 20];
            rand::RngCore::fill_bytes(&mut rng, &mut data);
            file(ds.keys(), &data)
        })
        .collect();
    let peak = std::sync::atomic::AtomicU64::new(0);
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                peak.fetch_max(ds.queued_bytes(), std::sync::atomic::Ordering::Relaxed);
                std::thread::yield_now();
            }
        });
        let writers: Vec<_> = files
            .chunks(12)
            .enumerate()
            .map(|(w, part)| {
                let ds = &ds;
                s.spawn(move || {
                    let tickets: Vec<_> = part
                        .iter()
                        .enumerate()
                        .map(|(i, (e, c))| {
                            ds.submit_queued(
                                vec![put(&format!("w{w}/f{i}"), e.clone())],
                                vec![c.clone()],
                            )
                            .unwrap()
                        })
                        .collect();
                    for t in tickets {
                        t.wait().unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Release);
    });
    let peak = peak.into_inner();
    assert!(peak <= 64 << 20, "{peak} bytes were queued at once");
    assert!(peak > 0, "the sampler saw the queue");
    assert_eq!(ds.queued_bytes(), 0, "every queued byte was counted off");
    assert_eq!(paths(&ds).iter().filter(|p| p.contains("/f")).count(), 48);
    ds.close().unwrap();
}
