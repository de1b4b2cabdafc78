//! Fuzzing every decoder triad runs on bytes from a peer, a store, a socket
//! or a disk: mutated valid encodings (bit flips, truncations, insertions,
//! copied slices, length and seq fields set to edge values) are fed to each
//! decoder, and each must answer with a value or an error: never a panic,
//! never an allocation sized by what the input claims.
//!
//! CI runs a smoke of each target (`TRIAD_FUZZ_INPUTS`, default 2,000
//! inputs a target); a long campaign sets it higher, e.g.
//! `TRIAD_FUZZ_INPUTS=1000000 cargo test --release -p triad-tests --test e2e fuzz::`.
//! The configuration parser's and the put/get socket's targets live with
//! them in the daemon (config.rs, pushed.rs); the engine is
//! `triad_tests::fuzz`.
//!
//! Why not cargo-fuzz: its coverage flags change RUSTFLAGS, which rebuilds
//! RocksDB's C++ (20 minutes here) for a crate every decoder links; this
//! mutation engine runs on the stable toolchain in the normal build.

use std::path::Path;

use prost::Message;
use replicator::pb;
use triad_tests::fuzz::campaign;
use vault::{ChunkId, DatasetKey, Entry, Keys, Node, Op};

fn key() -> (DatasetKey, Keys) {
    let k = DatasetKey::from_bytes([42; 32]);
    let keys = k.derive();
    (k, keys)
}

fn file(keys: &Keys, data: &[u8]) -> (Entry, vault::SealedChunk) {
    triad_tests::one_chunk_file(keys, data)
}

fn sample_ops(keys: &Keys) -> Vec<Op> {
    let (e, _) = file(keys, b"hello");
    vec![
        Op::Put {
            path: b"a/b.txt".to_vec(),
            entry: e,
        },
        Op::Put {
            path: b"a/link".to_vec(),
            entry: Entry {
                node: Node::Symlink {
                    target: b"/etc".to_vec(),
                },
                mode: 0o777,
                mtime_ns: 2,
                size: 4,
                ext: None,
            },
        },
        Op::Rename {
            from: b"a/b.txt".to_vec(),
            to: b"c".to_vec(),
        },
        Op::Delete {
            path: b"c".to_vec(),
        },
        Op::Pin {
            ids: vec![ChunkId([1; 32])],
        },
    ]
}

/// A small real dataset with its archive, for seeds of the log and the
/// archive's objects.
fn sample_dataset(dir: &Path) -> triad_tests::KeyHolder {
    let (k, _) = key();
    let holder = triad_tests::KeyHolder::new(dir, &k, "fuzz");
    for i in 0..4u8 {
        holder.put_file(&format!("d/f{i}"), &[i; 100]);
    }
    holder
}

fn record_seeds(keys: &Keys) -> Vec<Vec<u8>> {
    let (_, c) = file(keys, b"chunk");
    vec![
        vault::record::Record::seal(keys, 1, 1, 5, [0; 32], &sample_ops(keys), vec![c])
            .encode_payload(),
        vault::record::Record::seal(keys, 9, 1, 6, [3; 32], &[], Vec::new()).encode_payload(),
    ]
}

#[test]
fn fuzz_records() {
    let (_, keys) = key();
    campaign("record", record_seeds(&keys), |b| {
        if let Some(r) = vault::record::Record::decode_payload(b) {
            let _ = r.open_ops(&keys);
            for a in &r.attachments {
                let _ = vault::chunk::open(&keys, &a.id, a.plain_len, &a.sealed);
            }
        }
    });
}

#[test]
fn fuzz_ops_and_entries_behind_the_seal() {
    // What a key holder can put inside a seal: the postcard ops and
    // entries, with every path checked.
    let (_, keys) = key();
    let mut seeds = vec![vault::ops::encode_ops(&sample_ops(&keys))];
    seeds.push(file(&keys, b"x").0.encode());
    campaign("ops", seeds, |b| {
        if let Ok(ops) = vault::ops::decode_ops(b) {
            for op in &ops {
                assert!(
                    op.check_paths().is_ok(),
                    "decode_ops let a bad path through"
                );
            }
        }
        let _ = vault::Entry::decode(b);
        let _ = vault::path::check(b);
    });
}

#[test]
fn fuzz_log_segments() {
    let tmp = tempfile::tempdir().unwrap();
    sample_dataset(tmp.path()).close();
    let log = tmp.path().join("site/log");
    let seg = std::fs::read_dir(&log)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "log"))
        .unwrap();
    let name = seg.file_name().unwrap().to_owned();
    let seed = std::fs::read(&seg).unwrap();
    let work = tmp.path().join("work");
    let (_, keys) = key();
    campaign("log segment", vec![seed], |b| {
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).unwrap();
        std::fs::write(work.join(&name), b).unwrap();
        let _ = vault::wal::read_from(&work, 1, |r| {
            let _ = r.record.open_ops(&keys);
            Ok(())
        });
        // Recovery, which may cut a torn tail, on the same bytes.
        let _ = vault::wal::Wal::open(&work, 1 << 20, 0);
    });
}

#[test]
fn fuzz_archive_objects() {
    let tmp = tempfile::tempdir().unwrap();
    let holder = sample_dataset(tmp.path());
    holder.archiver.ship_log().unwrap();
    holder.archiver.snapshot().unwrap();
    let bucket = tmp.path().join("bucket/files");
    let read_all = |sub: &str, ext: Option<&str>| -> Vec<Vec<u8>> {
        walkdir::WalkDir::new(bucket.join(sub))
            .into_iter()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_file())
            .filter(|e| ext.is_none_or(|x| e.path().extension().is_some_and(|y| y == x)))
            .map(|e| std::fs::read(e.path()).unwrap())
            .collect()
    };
    let (_, keys) = key();
    // Pieces as the store holds them.
    let pieces = read_all("log", Some("lp"));
    assert!(!pieces.is_empty());
    campaign("log piece", pieces, |b| {
        if let Ok(p) = archive::objects::decode_piece("files/log/x.lp", b) {
            for r in &p.records {
                if let Some(rec) = r.header_record() {
                    let _ = rec.header_authenticated(&keys);
                }
                let _ = r.payload(|_| Some(vec![0u8; 16]));
            }
        }
    });
    // Packs as the store holds them, and their index's plaintext as a key
    // holder could seal it: whatever decodes places every chunk inside the
    // pack's chunk bytes.
    let pack_files: Vec<(String, Vec<u8>)> = walkdir::WalkDir::new(bucket.join("packs"))
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "pack"))
        .map(|e| {
            let rel = e.path().strip_prefix(tmp.path().join("bucket")).unwrap();
            (
                rel.to_string_lossy().to_string(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    assert!(!pack_files.is_empty());
    let pkey = pack_files[0].0.clone();
    campaign(
        "pack",
        pack_files.iter().map(|(_, b)| b.clone()).collect(),
        |b| {
            let _ = archive::packs::decode_index(&keys, &pkey, b);
        },
    );
    let (body, plains): (Vec<Vec<u8>>, Vec<Vec<u8>>) = pack_files
        .iter()
        .map(|(k, b)| {
            let n = b.len();
            let len = u32::from_le_bytes(b[n - 12..n - 8].try_into().unwrap()) as usize;
            let sealed = &b[n - 12 - len..n - 12];
            (
                b[..n - 12 - len].to_vec(),
                archive::objects::open(&keys, k, sealed).unwrap(),
            )
        })
        .unzip();
    let body = body[0].clone();
    campaign("pack index", plains, |plain| {
        let pack = archive::packs::with_index(&keys, &pkey, body.clone(), plain);
        if let Ok(entries) = archive::packs::decode_index(&keys, &pkey, &pack) {
            for e in entries {
                assert!(
                    e.offset >= 8 && e.offset + u64::from(e.sealed_len) <= body.len() as u64,
                    "decode_index let a chunk outside the pack through"
                );
            }
        }
    });
    // Manifests, pages and the head: the plaintext a key holder seals.
    let open = |b: &[u8], key: &str| archive::objects::open(&keys, key, b).ok();
    let mkey = |name: &str| format!("files/snapshots/{name}");
    let manifests: Vec<Vec<u8>> = walkdir::WalkDir::new(bucket.join("snapshots"))
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| {
            let rel = e.path().strip_prefix(tmp.path().join("bucket")).unwrap();
            open(&std::fs::read(e.path()).unwrap(), &rel.to_string_lossy())
        })
        .collect();
    assert!(manifests.len() >= 2, "a manifest and a page");
    let key_name = mkey("m.manifest");
    campaign("manifest and page", manifests, |plain| {
        let sealed = archive::objects::seal(&keys, &key_name, plain);
        let _ = archive::objects::decode_manifest(&keys, &key_name, &sealed);
        let expect = archive::objects::PageRef {
            entries: 4,
            sealed_len: sealed.len() as u64,
            sealed_hash: *blake3::hash(&sealed).as_bytes(),
        };
        if let Ok(page) = archive::objects::decode_page(&keys, &key_name, &sealed, &expect) {
            for (p, _) in &page.entries {
                assert!(
                    vault::path::check(p).is_ok(),
                    "decode_page let a bad path through"
                );
            }
        }
        // The same bytes as they come from the store, unsealed.
        let _ = archive::objects::decode_manifest(&keys, &key_name, plain);
    });
    let heads = read_all("", None)
        .into_iter()
        .filter_map(|b| open(&b, "files/HEAD"))
        .collect::<Vec<_>>();
    assert_eq!(heads.len(), 1, "the archive has its head");
    campaign("head", heads, |plain| {
        let sealed = archive::objects::seal(&keys, "files/HEAD", plain);
        let _ = archive::objects::decode_head(&keys, "files/HEAD", &sealed);
    });
    let names = vec![
        b"files/log/00000000000000000001-00000000000000000004-0000000000000000005.lp".to_vec(),
        b"files/snapshots/00000000000000000004-0000000000001.manifest".to_vec(),
    ];
    campaign("object names", names, |b| {
        let s = String::from_utf8_lossy(b);
        if let Some(p) = archive::objects::PieceRef::parse(&s) {
            assert!(p.first >= 1 && p.first <= p.last && p.last < u64::MAX);
        }
        let _ = archive::objects::SnapshotRef::parse_manifest_key(&s);
        let _ = archive::objects::parse_chunk_key(&s);
    });
    holder.close();
}

#[test]
fn fuzz_replication_frames() {
    // Protobuf frames from a peer, decoded and taken apart as the follower
    // and the upstream do.
    let (_, keys) = key();
    let (e, _) = file(&keys, b"y");
    let msgs: Vec<Vec<u8>> = vec![
        pb::UpstreamMessage {
            msg: Some(pb::upstream_message::Msg::Records(pb::Records {
                payloads: record_seeds(&keys),
            })),
        }
        .encode_to_vec(),
        pb::UpstreamMessage {
            msg: Some(pb::upstream_message::Msg::Transfer(pb::Transfer {
                part: Some(pb::transfer::Part::Begin(pb::TransferBegin {
                    seq: 5,
                    chain_hash: vec![1; 32],
                    time_ns: 3,
                    digest: vault::lthash::LtHash::default().to_bytes(),
                    pins: vec![pb::Pin {
                        id: vec![2; 32],
                        count: 1,
                    }],
                    follower_head_seq: 4,
                    follower_head_hash: vec![9; 32],
                    evidence: vec![0; 32],
                })),
            })),
        }
        .encode_to_vec(),
        pb::UpstreamMessage {
            msg: Some(pb::upstream_message::Msg::Transfer(pb::Transfer {
                part: Some(pb::transfer::Part::Entries(pb::TransferEntries {
                    entries: vec![pb::NamespaceEntry {
                        path: b"a/b".to_vec(),
                        entry: e.encode(),
                    }],
                })),
            })),
        }
        .encode_to_vec(),
        pb::FollowerMessage {
            msg: Some(pb::follower_message::Msg::Hello(pb::Hello {
                dataset: "files".into(),
                key_id: "0011".into(),
                from_seq: 3,
                checkpoint_seq: 256,
                checkpoint_hash: vec![4; 32],
                head_hash: vec![6; 32],
            })),
        }
        .encode_to_vec(),
        pb::ChunksRequest {
            dataset: "files".into(),
            key_id: "k".into(),
            ids: vec![vec![5; 32]; 3],
        }
        .encode_to_vec(),
    ];
    campaign("replication frames", msgs, |b| {
        if let Ok(m) = pb::UpstreamMessage::decode(b) {
            match m.msg {
                Some(pb::upstream_message::Msg::Records(r)) => {
                    for p in &r.payloads {
                        if let Some(rec) = vault::record::Record::decode_payload(p) {
                            let _ = rec.open_ops(&keys);
                        }
                    }
                }
                Some(pb::upstream_message::Msg::Transfer(t)) => match t.part {
                    Some(pb::transfer::Part::Begin(begin)) => {
                        let _ = vault::lthash::LtHash::try_from_bytes(&begin.digest);
                        let ours = Some([9u8; 32]);
                        if replicator::follower::transfer_allowed(7, ours, &begin).is_ok() {
                            assert!(begin.seq > 7 && begin.follower_head_seq == 7);
                        }
                    }
                    Some(pb::transfer::Part::Entries(es)) => {
                        for ne in es.entries {
                            let _ = vault::path::check(&ne.path);
                            let _ = vault::Entry::decode(&ne.entry);
                        }
                    }
                    _ => {}
                },
                _ => {}
            }
        }
        let _ = pb::FollowerMessage::decode(b);
        let _ = pb::ChunksRequest::decode(b);
        let _ = pb::CheckpointsReply::decode(b);
    });
}
