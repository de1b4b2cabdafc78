//! Epochs and the fence through the committer, on a real RocksDB state: a
//! fenced dataset takes no local change, a local change carries the epoch in
//! force, and a follower refuses a replicated record whose epoch is not the
//! one its seq belongs to (a replaced primary's write) while taking the
//! records of the history it knows.

mod common;

use vault::ops::{Entry, Node};
use vault::wal::read_from;
use vault::{Dataset, DatasetKey, Fence, Options, SubmitError, VaultError};

fn dir_entry() -> Entry {
    Entry {
        node: Node::Dir,
        mode: 0o755,
        mtime_ns: 1,
        size: 0,
        ext: None,
    }
}

fn change(ds: &Dataset, path: &str) -> Result<u64, SubmitError> {
    ds.submit(vec![common::put(path, dir_entry())], Vec::new())
        .map(|c| c.seq)
}

/// Every record's payload and epoch in `ds`'s log, in order.
fn log_of(ds: &Dataset) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    read_from(&ds.dir().join("log"), 1, |r| {
        out.push((r.record.epoch, r.record.encode_payload()));
        Ok(())
    })
    .unwrap();
    out
}

#[test]
fn local_changes_carry_the_epoch_in_force_and_stop_while_fenced() {
    let tmp = tempfile::tempdir().unwrap();
    let key = DatasetKey::generate();
    let ds = Dataset::open(&tmp.path().join("a"), "files", &key, Options::default()).unwrap();
    assert_eq!(change(&ds, "one").unwrap(), 1);
    ds.set_fence(Fence {
        starts: vec![(1, 1), (2, 2)],
        fenced: Some("zjk-b is the primary of epoch 2".into()),
        ..Fence::default()
    });
    match change(&ds, "two") {
        Err(SubmitError::Vault(VaultError::Fenced(why))) => assert!(why.contains("zjk-b")),
        other => panic!("a fenced dataset took a change: {other:?}"),
    }
    assert_eq!(ds.head_seq(), 1, "nothing was logged");
    ds.set_fence(Fence {
        starts: vec![(1, 1), (2, 2)],
        fenced: None,
        ..Fence::default()
    });
    assert_eq!(change(&ds, "two").unwrap(), 2);
    let epochs: Vec<u64> = log_of(&ds).into_iter().map(|(e, _)| e).collect();
    assert_eq!(epochs, [1, 2]);
    ds.close().unwrap();
}

#[test]
fn a_follower_refuses_records_of_an_epoch_their_seq_does_not_belong_to() {
    let tmp = tempfile::tempdir().unwrap();
    let key = DatasetKey::generate();
    // The old primary wrote seqs 1-4 in epoch 1; the group then agreed that
    // epoch 2 begins at seq 3 (another site took over after seq 2).
    let old = Dataset::open(&tmp.path().join("old"), "files", &key, Options::default()).unwrap();
    for p in ["a", "b", "c", "d"] {
        change(&old, p).unwrap();
    }
    let records = log_of(&old);
    let follower = Dataset::open(&tmp.path().join("f"), "files", &key, Options::default()).unwrap();
    follower.set_fence(Fence {
        starts: vec![(1, 1), (2, 3)],
        fenced: Some("a follower".into()),
        ..Fence::default()
    });
    let payloads: Vec<Vec<u8>> = records.iter().map(|(_, p)| p.clone()).collect();
    follower.append_replicated(payloads[..2].to_vec()).unwrap();
    match follower.append_replicated(payloads[2..3].to_vec()) {
        Err(SubmitError::Vault(VaultError::Epoch { seq, reason })) => {
            assert_eq!(seq, 3);
            assert!(reason.contains("stale epoch 1"), "{reason}");
        }
        other => panic!("a stale record was taken: {other:?}"),
    }
    assert_eq!(follower.head_seq(), 2);
    // A site being promoted at its head takes nothing past it meanwhile.
    let promoting =
        Dataset::open(&tmp.path().join("p"), "files", &key, Options::default()).unwrap();
    promoting.set_fence(Fence {
        replicate_up_to: Some(1),
        ..Fence::default()
    });
    promoting.append_replicated(payloads[..1].to_vec()).unwrap();
    promoting.barrier().unwrap();
    match promoting.append_replicated(payloads[1..2].to_vec()) {
        Err(SubmitError::Vault(VaultError::Epoch { seq: 2, reason })) => {
            assert!(reason.contains("being promoted"), "{reason}")
        }
        other => panic!("a record past the promotion's head was taken: {other:?}"),
    }
    promoting.close().unwrap();
    // A follower that has not learned epoch 2 yet refuses a record of it
    // until it has, rather than guessing.
    let newer = Dataset::open(&tmp.path().join("n"), "files", &key, Options::default()).unwrap();
    newer.set_fence(Fence {
        starts: vec![(1, 1), (2, 1)],
        fenced: None,
        ..Fence::default()
    });
    change(&newer, "x").unwrap();
    let fresh = Dataset::open(&tmp.path().join("g"), "files", &key, Options::default()).unwrap();
    match fresh.append_replicated(log_of(&newer).into_iter().map(|(_, p)| p).collect()) {
        Err(SubmitError::Vault(VaultError::Epoch { reason, .. })) => {
            assert!(
                reason.contains("not learned") || reason.contains("newer"),
                "{reason}"
            )
        }
        other => panic!("a record of an unknown epoch was taken: {other:?}"),
    }
    for d in [old, follower, newer, fresh] {
        d.close().unwrap();
    }
}

#[test]
fn the_epochs_a_log_holds_stop_where_it_went_on_past_the_fork() {
    let tmp = tempfile::tempdir().unwrap();
    let key = DatasetKey::generate();
    let ds = Dataset::open(&tmp.path().join("a"), "files", &key, Options::default()).unwrap();
    for p in ["a", "b", "c", "d"] {
        change(&ds, p).unwrap();
    }
    // Epoch 2 began at seq 3 elsewhere, but this log's seqs 3 and 4 are
    // its own epoch-1 writes: it holds epoch 1 only, whatever it learned.
    ds.set_fence(Fence {
        starts: vec![(1, 1), (2, 3)],
        fenced: Some("zjk-b is the primary of epoch 2".into()),
        ..Fence::default()
    });
    assert_eq!(ds.held_epochs().unwrap(), [(1, 1)]);
    // Epoch 2 beginning past its head: the log is a prefix of it.
    ds.set_fence(Fence {
        starts: vec![(1, 1), (2, 5)],
        fenced: None,
        ..Fence::default()
    });
    assert_eq!(ds.held_epochs().unwrap(), [(1, 1), (2, 5)]);
    // And once it wrote in epoch 2 there, it holds epoch 2.
    change(&ds, "e").unwrap();
    assert_eq!(ds.held_epochs().unwrap(), [(1, 1), (2, 5)]);
    ds.set_fence(Fence {
        starts: vec![(1, 1), (2, 5), (3, 5)],
        fenced: None,
        ..Fence::default()
    });
    assert_eq!(ds.held_epochs().unwrap(), [(1, 1), (2, 5)]);
    ds.close().unwrap();
}

#[test]
fn a_fork_whose_first_record_retention_removed_is_still_seen_from_the_head() {
    let tmp = tempfile::tempdir().unwrap();
    let key = DatasetKey::generate();
    let opts = Options {
        segment_bytes: 200,
        ..Options::default()
    };
    let ds = Dataset::open(&tmp.path().join("a"), "files", &key, opts).unwrap();
    for p in ["a", "b", "c", "d", "e", "f", "g", "h"] {
        change(&ds, p).unwrap();
    }
    let log = ds.dir().join("log");
    let (_, _, first) = vault::wal::remove_segments_before(&log, 7, None).unwrap();
    assert!(
        first > 3,
        "the record at seq 3 is gone (first kept: {first})"
    );
    // Epoch 2 began at seq 3 elsewhere; this log's records there were
    // epoch 1, and its head still is.
    ds.set_fence(Fence {
        starts: vec![(1, 1), (2, 3)],
        fenced: Some("zjk-b is the primary of epoch 2".into()),
        ..Fence::default()
    });
    assert_eq!(ds.held_epochs().unwrap(), [(1, 1)]);
    ds.close().unwrap();
}
