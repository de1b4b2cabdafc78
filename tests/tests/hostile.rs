//! Hostile input and a compromised site, with the real binary: a crafted
//! archive cannot write outside a restore target, an upstream cannot move a
//! follower's history back, a follower's acknowledgements cannot outrun
//! what it was sent, and requests that claim large sizes cost the daemon
//! nothing near what they claim (docs/security.md, section 11).

use crate::common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::deploy::*;
use common::*;
use rand::RngCore;
use replicator::pb;
use vault::{DatasetKey, Entry, Node, Op};

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Peak resident set of a process, from /proc (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// Starts a new peak (VmHWM) for a process (Linux 4.0's clear_refs 5).
fn reset_peak(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
}

/// Current resident set of a process (VmRSS), in bytes.
fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

fn file_entry(key: &DatasetKey, data: &[u8]) -> (Entry, vault::SealedChunk) {
    triad_tests::one_chunk_file(&key.derive(), data)
}

/// What someone holding the dataset key (any site) can write into an
/// archive: a dataset of its own making, snapshotted and shipped with the
/// archive code itself. `before` goes into a snapshot, `after` only into
/// the log after it.
fn crafted_archive(
    dir: &Path,
    key: &DatasetKey,
    before: Vec<Op>,
    after: Vec<Op>,
    attachments: Vec<vault::SealedChunk>,
) -> (String, u64) {
    let k = triad_tests::KeyHolder::new(dir, key, "evil");
    k.put_file("good.txt", b"an ordinary file\n");
    let had_before = !before.is_empty();
    if had_before {
        k.ds.submit(before, attachments.clone()).unwrap();
    }
    let (ds, a, url) = (&k.ds, &k.archiver, k.url.clone());
    a.ship_log().unwrap();
    let snap_seq = a.snapshot().unwrap().seq;
    if !after.is_empty() {
        ds.submit(after, if had_before { Vec::new() } else { attachments })
            .unwrap();
        a.ship_log().unwrap();
    }
    k.close();
    (url, snap_seq)
}

fn restore_from(url: &str, key: &Path, to: &Path, at: &str) -> std::process::Output {
    restore_with(url, key, to, &["--at", at])
}

fn restore_with(url: &str, key: &Path, to: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(triad_bin())
        .args(["restore", "--dataset", "files", "--from-archive", url])
        .args(args)
        .arg("--key-file")
        .arg(key)
        .arg("--to")
        .arg(to)
        .output()
        .unwrap()
}

fn keygen(path: &Path) -> DatasetKey {
    let out = std::process::Command::new(triad_bin())
        .args(["keygen", "--out"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success());
    DatasetKey::load(path).unwrap()
}

#[test]
fn crafted_archives_cannot_write_outside_the_restore_target() {
    let tmp = tempfile::tempdir().unwrap();
    let keyf = tmp.path().join("files.key");
    let key = keygen(&keyf);
    let canary = tmp.path().join("canary");
    std::fs::create_dir_all(&canary).unwrap();
    let absolute = format!("{}/absolute-escape", canary.display()).into_bytes();
    let (payload, sealed) = file_entry(&key, b"written where it must not be\n");
    let put = |path: &[u8]| Op::Put {
        path: path.to_vec(),
        entry: payload.clone(),
    };
    let hostile: Vec<(&str, Vec<u8>)> = vec![
        ("absolute", absolute.clone()),
        ("dot-dot", b"../canary/relative-escape".to_vec()),
        ("nested dot-dot", b"sub/../../canary/nested-escape".to_vec()),
    ];
    // Restores `url` into `to`: nothing may land beside the target, and
    // the restore must fail; returns what it said.
    let refused = |url: &str, to: &Path, what: &str| -> String {
        let out = restore_from(url, &keyf, to, "latest");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let leaked = std::fs::read_dir(&canary).unwrap().count();
        assert_eq!(leaked, 0, "{what}: written beside the target\n{err}");
        assert!(!out.status.success(), "{what}: restore succeeded\n{err}");
        err
    };
    for (what, path) in &hostile {
        // In a snapshot page.
        let dir = tmp.path().join(format!("page-{what}"));
        let (url, _) = crafted_archive(
            &dir,
            &key,
            vec![put(path)],
            Vec::new(),
            vec![sealed.clone()],
        );
        // Without the log (as after a prune) only the page holds the path.
        std::fs::remove_dir_all(dir.join("bucket/files/log")).unwrap();
        let err = refused(&url, &dir.join("target"), &format!("{what} in a page"));
        assert!(
            err.contains("refused") && err.contains("page-"),
            "{what}: {err}"
        );

        // In a log record after a clean snapshot: refused naming the piece
        // and the record; the snapshot itself still restores.
        let dir = tmp.path().join(format!("log-{what}"));
        let (url, snap) = crafted_archive(
            &dir,
            &key,
            Vec::new(),
            vec![put(path)],
            vec![sealed.clone()],
        );
        let err = refused(&url, &dir.join("target"), &format!("{what} in the log"));
        assert!(
            err.contains(".lp") && err.contains("record seq 2") && err.contains("path `"),
            "{what}: {err}"
        );
        let to = dir.join("at-snapshot");
        let out = restore_from(&url, &keyf, &to, &snap.to_string());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(to.join("good.txt").exists());
    }

    // A symlink out of the tree, then a file "inside" it: nothing is ever
    // written through a symlink.
    let dir = tmp.path().join("symlink");
    let link = Op::Put {
        path: b"link".to_vec(),
        entry: Entry {
            node: Node::Symlink {
                target: canary.as_os_str().as_encoded_bytes().to_vec(),
            },
            mode: 0o777,
            mtime_ns: 0,
            size: canary.as_os_str().len() as u64,
            ext: None,
        },
    };
    let (url, _) = crafted_archive(
        &dir,
        &key,
        vec![link, put(b"link/through-symlink")],
        Vec::new(),
        vec![sealed.clone()],
    );
    refused(&url, &dir.join("target"), "a file through a symlink");
    assert!(!Path::new(std::str::from_utf8(&absolute).unwrap()).exists());
}

/// An archive of five records: a snapshot at seq 1, then one log piece per
/// record (seqs 2 to 5), 20 ms apart. Returns the store URL and the pieces'
/// paths on disk, oldest first.
fn archive_of_pieces(dir: &Path, key: &DatasetKey) -> (String, Vec<std::path::PathBuf>) {
    let k = triad_tests::KeyHolder::new(dir, key, "zjk-a");
    for i in 1..=5u8 {
        k.put_file(&format!("f{i}"), format!("version {i}\n").as_bytes());
        if i == 1 {
            k.archiver.snapshot().unwrap();
        } else {
            k.archiver.ship_log().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = k.url.clone();
    k.close();
    let mut pieces: Vec<_> = std::fs::read_dir(dir.join("bucket/files/log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "lp"))
        .collect();
    pieces.sort();
    (url, pieces)
}

#[test]
fn a_rolled_back_or_retimed_archive_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let keyf = tmp.path().join("files.key");
    let key = keygen(&keyf);
    let (url, pieces) = archive_of_pieces(tmp.path(), &key);
    assert!(pieces.len() >= 4, "{pieces:?}");
    let target = |n: &str| tmp.path().join(format!("target-{n}"));

    // Intact: latest restores to seq 5 with no warning.
    let out = restore_from(&url, &keyf, &target("intact"), "latest");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("WARNING"), "{err}");
    // A record's time shifted later, and the piece's trailer recomputed: a
    // restore to that record's true time would stop before it and exit 0.
    let third = &pieces[1];
    let original = std::fs::read(third).unwrap();
    let key_name = format!("files/log/{}", third.file_name().unwrap().to_string_lossy());
    let mut piece = archive::objects::decode_piece(&key_name, &original).unwrap();
    let true_time = piece.records[0].time_ns;
    piece.records[0].head[16..24].copy_from_slice(&(true_time + 3_600_000_000_000).to_le_bytes());
    std::fs::write(third, archive::objects::encode_piece(&piece)).unwrap();
    let out = restore_from(&url, &keyf, &target("retimed"), &rfc3339(true_time));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a retimed record was believed:\n{err}"
    );
    assert!(err.contains("altered"), "{err}");
    std::fs::write(third, &original).unwrap();

    // The newest pieces deleted: latest is refused as a rollback, while an
    // older point still restores.
    let newest = pieces.last().unwrap();
    let kept = std::fs::read(newest).unwrap();
    std::fs::remove_file(newest).unwrap();
    let out = restore_from(&url, &keyf, &target("rolled-back"), "latest");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a rolled-back archive restored:\n{err}"
    );
    assert!(
        err.contains("ROLLBACK") && err.contains("head is seq 5"),
        "{err}"
    );
    let out = restore_from(&url, &keyf, &target("older"), "3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(newest, kept).unwrap();

    // A head from another site's archive of the dataset (same key, so it
    // opens) is not this archive's.
    let other = tmp.path().join("other");
    let foreign = triad_tests::KeyHolder::new(&other, &key, "sjz-c");
    foreign.put_file("x", b"x");
    foreign.archiver.ship_log().unwrap();
    foreign.close();
    let ours = std::fs::read(tmp.path().join("bucket/files/HEAD")).unwrap();
    std::fs::copy(
        other.join("bucket/files/HEAD"),
        tmp.path().join("bucket/files/HEAD"),
    )
    .unwrap();
    let out = restore_from(&url, &keyf, &target("foreign-head"), "latest");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("copied from another archive"), "{err}");
    std::fs::write(tmp.path().join("bucket/files/HEAD"), ours).unwrap();

    // Without its head the archive restores, saying loudly what it cannot
    // know.
    std::fs::remove_file(tmp.path().join("bucket/files/HEAD")).unwrap();
    let out = restore_from(&url, &keyf, &target("headless"), "latest");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("WARNING") && err.contains("no authenticated head"),
        "{err}"
    );
    // With another site's head as a second source: one more than the
    // archive holds is a rollback.
    let out = restore_with(&url, &keyf, &target("expect"), &["--expect-seq", "6"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("ROLLBACK"), "{err}");
}

/// An upstream that holds the primary's certificate and answers every
/// Follow with a state transfer at seq 1 (ransomware at the primary trying
/// to roll the backups back).
struct RollbackUpstream;

type UpStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::UpstreamMessage, tonic::Status>> + Send>>;

// The stream item type is fixed by tonic, Status and all.
#[allow(clippy::result_large_err)]
fn transfer(part: pb::transfer::Part) -> Result<pb::UpstreamMessage, tonic::Status> {
    Ok(pb::UpstreamMessage {
        msg: Some(pb::upstream_message::Msg::Transfer(pb::Transfer {
            part: Some(part),
        })),
    })
}

#[tonic::async_trait]
impl pb::replication_server::Replication for RollbackUpstream {
    type FollowStream = UpStream;

    async fn follow(
        &self,
        req: tonic::Request<tonic::Streaming<pb::FollowerMessage>>,
    ) -> Result<tonic::Response<UpStream>, tonic::Status> {
        use pb::transfer::Part;
        let mut inbound = req.into_inner();
        let _hello = inbound.message().await?;
        tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
        let msgs = vec![
            transfer(Part::Begin(pb::TransferBegin {
                seq: 1,
                chain_hash: vec![7; 32],
                time_ns: now_ns(),
                digest: vault::lthash::LtHash::default().to_bytes(),
                pins: Vec::new(),
                follower_head_seq: 0,
                follower_head_hash: Vec::new(),
                evidence: Vec::new(),
            })),
            transfer(Part::EntriesEnd(pb::TransferEntriesEnd {})),
            transfer(Part::End(pb::TransferEnd {})),
        ];
        use tokio_stream::StreamExt;
        let s = tokio_stream::iter(msgs).chain(tokio_stream::pending());
        Ok(tonic::Response::new(Box::pin(s)))
    }

    async fn chunks(
        &self,
        _: tonic::Request<pb::ChunksRequest>,
    ) -> Result<tonic::Response<pb::ChunksReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake"))
    }

    async fn checkpoints(
        &self,
        _: tonic::Request<pb::CheckpointsRequest>,
    ) -> Result<tonic::Response<pb::CheckpointsReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake"))
    }

    async fn site_status(
        &self,
        _: tonic::Request<pb::SiteStatusRequest>,
    ) -> Result<tonic::Response<pb::SiteStatusReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake"))
    }

    async fn admin(
        &self,
        _: tonic::Request<pb::AdminRequest>,
    ) -> Result<tonic::Response<pb::AdminReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake"))
    }

    async fn takeover(
        &self,
        _: tonic::Request<pb::TakeoverRequest>,
    ) -> Result<tonic::Response<pb::TakeoverReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake"))
    }
}

fn tls_files(certs: &Path, site: &str) -> replicator::tls::TlsFiles {
    replicator::tls::TlsFiles {
        ca: certs.join("ca.pem"),
        cert: certs.join(format!("{site}.pem")),
        key: certs.join(format!("{site}.key")),
    }
}

fn write_files(root: &Path, n: usize) {
    std::fs::create_dir_all(root).unwrap();
    for i in 0..n {
        std::fs::write(root.join(format!("f{i}")), format!("file {i}\n").repeat(50)).unwrap();
    }
}

#[test]
fn an_upstream_cannot_roll_a_follower_back_with_a_state_transfer() {
    let mut dep = Deployment::new(None);
    dep.start();
    for i in 0..6 {
        write_files(&dep.a.source.join(format!("d{i}")), 3);
        dep.a.wait_settled(now_ns(), Duration::from_secs(60));
    }
    let (head, hash, digest) = wait_replicated(&dep.a, &[&dep.b, &dep.c], Duration::from_secs(60));
    assert!(head >= 5, "head {head}");
    dep.a.stop();

    // The primary's certificate, its port, a history of one record.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cfg = replicator::tls::server_config(&tls_files(&dep.names.certs, "zjk-a")).unwrap();
    let port = dep.ports[0];
    rt.spawn(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let incoming = replicator::tls::accept(
            listener,
            cfg,
            Arc::new(|_: &str| true),
            Arc::new(replicator::tls::Refusals::default()),
        );
        let _ = tonic::transport::Server::builder()
            .add_service(pb::replication_server::ReplicationServer::new(
                RollbackUpstream,
            ))
            .serve_with_incoming(incoming)
            .await;
    });

    for f in [&dep.b, &dep.c] {
        wait_for(
            "the follower to refuse the transfer",
            Duration::from_secs(30),
            || {
                f.status()
                    .and_then(|v| v["failure"].as_str().map(|s| s.contains("DIVERGED")))
                    .unwrap_or(false)
            },
        );
        let v = f.status().unwrap();
        let failure = v["failure"].as_str().unwrap();
        assert!(
            failure.contains(&format!("not past this site's head {head}")),
            "{failure}"
        );
        // The copy is exactly what it was.
        assert_eq!(
            head_and_hashes(f),
            Some((head, hash.clone(), digest.clone())),
            "{}",
            f.log_text()
        );
    }
    // And it stays so across a restart: nothing was cut.
    dep.b.stop();
    dep.b.start();
    wait_for(
        "the restarted follower's status",
        Duration::from_secs(30),
        || head_and_hashes(&dep.b).is_some(),
    );
    assert_eq!(head_and_hashes(&dep.b).map(|h| h.0), Some(head));
}

/// Dials `port` as `site` and sends Hello then `acks`; returns the open
/// stream halves so the caller decides when the follower "disconnects".
async fn lying_follower(
    certs: &Path,
    port: u16,
    key_id: String,
    from_seq: u64,
    acks: Vec<u64>,
) -> (
    tokio::sync::mpsc::Sender<pb::FollowerMessage>,
    tonic::Streaming<pb::UpstreamMessage>,
) {
    let ch = dial(port, &tls_files(certs, "zjk-b"), "zjk-a").await;
    let mut client = pb::replication_client::ReplicationClient::new(ch);
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(pb::FollowerMessage {
        msg: Some(pb::follower_message::Msg::Hello(pb::Hello {
            dataset: "files".into(),
            key_id,
            from_seq,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let inbound = client
        .follow(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for a in acks {
        tx.send(pb::FollowerMessage {
            msg: Some(pb::follower_message::Msg::Ack(pb::Ack { durable_seq: a })),
        })
        .await
        .unwrap();
    }
    (tx, inbound)
}

fn put_object(site: &Site, dir: &Path, name: &str) -> std::process::Output {
    let p = dir.join(name);
    std::fs::write(&p, name.repeat(1000)).unwrap();
    site.cli(&["put", "--dataset", "files", &p.to_string_lossy(), name])
}

#[test]
fn acknowledgements_beyond_what_was_sent_count_for_nothing() {
    let mut dep = Deployment::new(None);
    dep.primary_source = "source = { kind = \"pushed\" }".into();
    dep.sync_policy = "on_unreachable = \"wait\"\nwait_limit = \"2s\"\n".into();
    dep.configure(None);
    // The real same-city site is not started: a liar holds its certificate.
    dep.a.start();
    dep.c.start();
    wait_for("the primary's socket", Duration::from_secs(60), || {
        dep.a.data.join("triad.sock").exists() && dep.a.status().is_some()
    });
    let work = dep.a.tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let key_id = dep.a.key().key_id();
    let certs = dep.names.certs.clone();
    let port = dep.ports[0];

    // Acks seq 10^9 at once, then hangs up.
    let (tx, inbound) = rt.block_on(lying_follower(
        &certs,
        port,
        key_id.clone(),
        1,
        vec![1_000_000_000],
    ));
    std::thread::sleep(Duration::from_millis(500));
    drop((tx, inbound));
    std::thread::sleep(Duration::from_millis(500));
    let o = put_object(&dep.a, &work, "after-a-false-ack");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "a put counted a disconnected liar's ack"
    );
    assert!(err.contains("zjk-b"), "{err}");

    // Acks 2^64-1 and stays connected without acknowledging anything real.
    let held = rt.block_on(lying_follower(
        &certs,
        port,
        key_id.clone(),
        1,
        vec![u64::MAX],
    ));
    std::thread::sleep(Duration::from_millis(500));
    let o = put_object(&dep.a, &work, "after-a-max-ack");
    assert!(
        !o.status.success(),
        "a put counted an ack beyond what was sent"
    );
    // Nothing panicked: the primary answers, still the same process.
    let pid = dep.a.pid();
    let v = dep.a.status().unwrap();
    assert_eq!(v["pid"].as_u64(), pid.map(|p| p as u64));
    assert!(
        dep.a.log_text().find("panicked").is_none(),
        "{}",
        dep.a.log_text()
    );
    drop(held);

    // The real follower comes back: puts succeed again, the retries as
    // `existed`.
    dep.b.start();
    wait_replicated(&dep.a, &[&dep.b], Duration::from_secs(60));
    let o = put_object(&dep.a, &work, "after-a-max-ack");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn requests_that_claim_a_lot_cost_the_daemon_little() {
    let mut dep = Deployment::new(None);
    dep.start();
    // One large, incompressible file: chunks of up to 4 MiB.
    let mut big = vec![0u8; 8 << 20];
    rand::thread_rng().fill_bytes(&mut big);
    std::fs::write(dep.a.source.join("big.bin"), &big).unwrap();
    dep.a.wait_settled(now_ns(), Duration::from_secs(60));
    wait_replicated(&dep.a, &[&dep.b, &dep.c], Duration::from_secs(60));
    let view = vault::View::open(&dep.a.dataset_dir(), "files", &dep.a.key()).unwrap();
    let entry = view
        .entries()
        .unwrap()
        .into_iter()
        .find(|(p, _)| p == b"big.bin")
        .unwrap()
        .1;
    let largest = entry.chunks().iter().max_by_key(|c| c.len).unwrap();
    drop(view);
    let pid = dep.a.pid().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let idle = rss(pid);
    reset_peak(pid);

    // 1000 copies of one large chunk's id (which made the primary buffer
    // 1000 copies of it): answered once.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let files = tls_files(&dep.names.certs, "sjz-c");
    let port = dep.ports[0];
    let key_id = dep.a.key().key_id();
    let ids = vec![largest.id.0.to_vec(); 1000];
    for _ in 0..3 {
        let reply = rt.block_on(async {
            let ch = dial(port, &files, "zjk-a").await;
            pb::replication_client::ReplicationClient::new(ch)
                .max_decoding_message_size(512 << 20)
                .chunks(pb::ChunksRequest {
                    dataset: "files".into(),
                    key_id: key_id.clone(),
                    ids: ids.clone(),
                })
                .await
                .unwrap()
                .into_inner()
        });
        assert_eq!(reply.chunks.len(), 1, "each id is answered once");
    }
    let peak = peak_rss(pid);
    eprintln!(
        "primary RSS: idle {} MiB, peak after the Chunks attack {} MiB",
        idle >> 20,
        peak >> 20
    );
    assert!(peak < 2 * idle, "peak {peak} against idle {idle}");
}

#[test]
fn an_oversized_object_in_the_archive_is_refused_unread() {
    let tmp = tempfile::tempdir().unwrap();
    let keyf = tmp.path().join("files.key");
    let key = keygen(&keyf);
    let (url, _) = crafted_archive(tmp.path(), &key, Vec::new(), Vec::new(), Vec::new());
    // Grow the one pack to 2 GiB (sparse, so the test costs no disk): the
    // archive records a 17-byte chunk in it.
    let packs = tmp.path().join("bucket/files/packs");
    let obj = walkdir::WalkDir::new(&packs)
        .into_iter()
        .filter_map(|e| e.ok())
        .find(|e| e.file_type().is_file())
        .unwrap()
        .into_path();
    let f = std::fs::OpenOptions::new().write(true).open(&obj).unwrap();
    f.set_len(2 << 30).unwrap();
    drop(f);
    let to = tmp.path().join("target");
    let started = Instant::now();
    let child = std::process::Command::new(triad_bin())
        .args([
            "restore",
            "--dataset",
            "files",
            "--from-archive",
            &url,
            "--key-file",
        ])
        .arg(&keyf)
        .arg("--to")
        .arg(&to)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = child;
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).unwrap();
        s
    });
    // This child's own peak RSS, from its VmHWM while it runs. Not from
    // wait4's rusage: Linux folds the address space a process had before
    // exec into ru_maxrss, and a spawned child starts in the test process's
    // (hundreds of MB while other tests run beside it).
    let mut maxrss_kb = 0u64;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{}/status", child.id())) {
            let hwm = text
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok());
            maxrss_kb = maxrss_kb.max(hwm.unwrap_or(0));
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let err = reader.join().unwrap();
    eprintln!(
        "restore refused a 2 GiB object in {:?} with peak RSS {} MiB",
        started.elapsed(),
        maxrss_kb >> 10
    );
    assert!(maxrss_kb > 0, "the restore was never seen running");
    assert!(maxrss_kb < 200 << 10, "peak RSS {maxrss_kb} kB\n{err}");
    assert!(!status.success(), "{err}");
    assert!(err.contains("refused without reading it"), "{err}");
}

fn socket_client(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

fn answer_of(s: &mut UnixStream) -> String {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).map(|n| n == 1).unwrap_or(false) {
        if b[0] == b'\n' {
            break;
        }
        buf.push(b[0]);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[test]
fn stuck_and_flooding_socket_clients_hold_back_no_put() {
    let mut dep = Deployment::new(None);
    dep.primary_source = "source = { kind = \"pushed\" }".into();
    dep.configure(None);
    dep.start();
    wait_for("the primary's socket", Duration::from_secs(60), || {
        dep.a.data.join("triad.sock").exists() && dep.a.status().is_some()
    });
    let sock = dep.a.data.join("triad.sock");
    let pid = dep.a.pid().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let idle = rss(pid);
    reset_peak(pid);
    let work = dep.a.tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();

    // A header with no newline: cut off at 4 KiB, answered, closed.
    let mut flood = socket_client(&sock);
    let junk = vec![b'x'; 1 << 20];
    let mut sent = 0usize;
    for _ in 0..64 {
        match flood.write(&junk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    let a = answer_of(&mut flood);
    assert!(
        a.contains("one line of at most 4096 bytes"),
        "{a} after {sent} bytes"
    );

    // A put that sends its header and a frame of its object, then stalls.
    let mut stuck = socket_client(&sock);
    stuck
        .write_all(b"{\"op\":\"put\",\"dataset\":\"files\",\"name\":\"stuck\"}\n")
        .unwrap();
    stuck.write_all(&1000u32.to_be_bytes()).unwrap();
    stuck.write_all(&[1u8; 1000]).unwrap();
    // A client that connects and says nothing at all.
    let _silent = socket_client(&sock);

    // Other puts go through meanwhile, promptly.
    for i in 0..5 {
        let t = Instant::now();
        let o = put_object(&dep.a, &work, &format!("000000010000000000000{i:03}"));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "put {i} took {:?}",
            t.elapsed()
        );
    }
    // A directory is refused at once, and nothing waits behind it.
    let t = Instant::now();
    let o = dep
        .a
        .cli(&["put", "--dataset", "files", &work.to_string_lossy(), "dir"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("is a directory"));
    assert!(t.elapsed() < Duration::from_secs(5));

    // The silent client is dropped after the header timeout.
    let mut silent = socket_client(&sock);
    let t = Instant::now();
    let a = answer_of(&mut silent);
    assert!(a.contains("no request header"), "{a}");
    assert!(t.elapsed() < Duration::from_secs(20));
    drop(stuck);

    // Clients past the limit are answered at once, not queued.
    let many: Vec<UnixStream> = (0..64).map(|_| socket_client(&sock)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = socket_client(&sock);
    let a = answer_of(&mut extra);
    assert!(a.contains("64 clients already"), "{a}");
    drop(many);

    let peak = peak_rss(pid);
    eprintln!(
        "primary RSS: idle {} MiB, peak under the socket attacks {} MiB",
        idle >> 20,
        peak >> 20
    );
    assert!(peak < 2 * idle, "peak {peak} against idle {idle}");
}

/// A key holder replaces a site's archive with another history of its own
/// making: self-consistent, under a head it sealed itself, so the restore
/// alone cannot tell. The site's drill compares the restored history with
/// its own authenticated checkpoints, and fails it.
#[test]
fn a_drill_refuses_an_archive_that_parts_from_the_sites_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let keyf = tmp.path().join("files.key");
    let key = keygen(&keyf);
    let data = tmp.path().join("data");
    let records = vault::state::CHECKPOINT_INTERVAL + 20;
    let history = |dataset_dir: &Path, bucket: &Path, word: &str| {
        let k = triad_tests::KeyHolder::at(dataset_dir, bucket, &key, "zjk-a");
        for i in 1..=records {
            k.put_file(&format!("f{}", i % 50), format!("{word} {i}\n").as_bytes());
            if i == 10 {
                k.archiver.snapshot().unwrap();
            }
        }
        k.archiver.ship_log().unwrap();
        k.close();
    };
    // The site's own copy and archive, and the forger's archive.
    history(
        &data.join("datasets/files"),
        &tmp.path().join("real"),
        "real",
    );
    history(
        &tmp.path().join("forger"),
        &tmp.path().join("forged"),
        "forged",
    );
    let source = tmp.path().join("source");
    std::fs::create_dir_all(&source).unwrap();
    let drill = |bucket: &str| {
        let config = tmp.path().join(format!("{bucket}.toml"));
        std::fs::write(
            &config,
            format!(
                "[site]\nname = \"zjk-a\"\nrole = \"primary\"\ndata_dir = \"{}\"\n\n\
                 [[dataset]]\nname = \"files\"\nkey_file = \"{}\"\n\
                 source = {{ kind = \"directory\", path = \"{}\" }}\n\n\
                 [archive]\nurl = \"file://{}\"\n",
                data.display(),
                keyf.display(),
                source.display(),
                tmp.path().join(bucket).display()
            ),
        )
        .unwrap();
        let out = std::process::Command::new(triad_bin())
            .args(["drill", "--dataset", "files", "--json", "--config"])
            .arg(&config)
            .arg("--reports")
            .arg(tmp.path().join(format!("reports-{bucket}")))
            .output()
            .unwrap();
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            panic!(
                "drill printed no report: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.success(), r)
    };
    let (ok, r) = drill("real");
    assert!(ok, "the site's own archive fails its drill: {r}");
    assert_eq!(r["restored_seq"].as_u64(), Some(records));
    assert!(r["checkpoints_compared"].as_u64().unwrap() >= 1, "{r}");

    let (ok, r) = drill("forged");
    assert!(!ok, "a forged archive passed the drill: {r}");
    let why = r["error"].as_str().unwrap_or_default();
    assert!(
        why.contains(&format!(
            "differs from this site's authenticated checkpoint at seq {}",
            vault::state::CHECKPOINT_INTERVAL
        )),
        "{why}"
    );
}
