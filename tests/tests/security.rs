//! Strangers on the replication port are refused and logged, and nothing they
//! send reaches a dataset: no certificate, a certificate from another CA, a
//! valid certificate for a site that is not a follower, random bytes,
//! truncated TLS, and well-authenticated but wrong requests.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::deploy::*;
use common::*;
use rand::RngCore;
use replicator::pb;

fn pem_certs(path: &Path) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    rustls_pemfile::certs(&mut std::fs::read(path).unwrap().as_slice())
        .map(|c| c.unwrap())
        .collect()
}

fn pem_key(path: &Path) -> rustls::pki_types::PrivateKeyDer<'static> {
    rustls_pemfile::private_key(&mut std::fs::read(path).unwrap().as_slice())
        .unwrap()
        .unwrap()
}

/// Tries a TLS handshake (and a first read) against the primary; true when
/// the server accepted it.
fn handshake(port: u16, ca: &Path, client: Option<(&Path, &Path)>) -> bool {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in pem_certs(ca) {
        roots.add(c).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match client {
        Some((cert, key)) => b
            .with_client_auth_cert(pem_certs(cert), pem_key(key))
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("zjk-a").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    // TLS 1.3 reports a refused client certificate on the first read.
    if tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(tls.read(&mut buf), Ok(n) if n > 0)
}

fn refusals(site: &Site) -> (u64, u64) {
    let v = site.status().unwrap();
    (
        v["replication"]["refused_handshakes"].as_u64().unwrap(),
        v["replication"]["refused_unknown_sites"].as_u64().unwrap(),
    )
}

#[test]
fn strangers_on_the_replication_port_are_refused_and_change_nothing() {
    let mut dep = Deployment::new(None);
    write_some_files(&dep.a.source);
    dep.start();
    dep.a.wait_settled(now_ns(), Duration::from_secs(60));
    let before = wait_replicated(&dep.a, &[&dep.b, &dep.c], Duration::from_secs(60));
    let port = dep.ports[0];
    let certs = dep.names.certs.clone();
    let ca = certs.join("ca.pem");

    // A legitimate follower's certificate gets through the handshake.
    assert!(handshake(
        port,
        &ca,
        Some((&certs.join("zjk-b.pem"), &certs.join("zjk-b.key")))
    ));

    // No client certificate.
    let (h0, _) = refusals(&dep.a);
    assert!(!handshake(port, &ca, None));
    wait_until("the refusal to be counted", Duration::from_secs(20), || {
        refusals(&dep.a).0 > h0
    });

    // A certificate for a follower's name, but from another CA.
    let other = dep.a.tmp.path().join("other-ca");
    make_certs(&other, &["zjk-b"]);
    let (h1, _) = refusals(&dep.a);
    assert!(!handshake(
        port,
        &ca,
        Some((&other.join("zjk-b.pem"), &other.join("zjk-b.key")))
    ));
    wait_until("the refusal to be counted", Duration::from_secs(20), || {
        refusals(&dep.a).0 > h1
    });

    // A valid certificate from the deployment CA for a site that is not a
    // follower: issue one with the deployment's CA key.
    let intruder = dep.a.tmp.path().join("intruder");
    std::fs::create_dir_all(&intruder).unwrap();
    issue_with_ca(&certs, &intruder, "zjk-x");
    let (_, u0) = refusals(&dep.a);
    assert!(!handshake(
        port,
        &ca,
        Some((&intruder.join("zjk-x.pem"), &intruder.join("zjk-x.key")))
    ));
    wait_until(
        "the unknown site to be counted",
        Duration::from_secs(20),
        || refusals(&dep.a).1 > u0,
    );

    // Random bytes, and a TLS record header promising more than is sent.
    let mut rng = rand::thread_rng();
    for len in [1usize, 7, 100, 4096, 65536] {
        let mut junk = vec![0u8; len];
        rng.fill_bytes(&mut junk);
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _ = s.write_all(&junk);
        drop(s);
    }
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00])
        .unwrap();
    drop(s);

    // A follower's own certificate used for nonsense requests.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let files = replicator::tls::TlsFiles {
        ca: ca.clone(),
        cert: certs.join("zjk-b.pem"),
        key: certs.join("zjk-b.key"),
    };
    let refusal = |hello: pb::Hello| {
        rt.block_on(async {
            let ch = dial(port, &files, "zjk-a").await;
            let mut client = pb::replication_client::ReplicationClient::new(ch);
            let msg = pb::FollowerMessage {
                msg: Some(pb::follower_message::Msg::Hello(hello)),
            };
            match client.follow(tokio_stream::iter(vec![msg])).await {
                Ok(_) => None,
                Err(s) => Some(s.message().to_string()),
            }
        })
    };
    let key_id = dep.a.key().key_id();
    let e = refusal(pb::Hello {
        dataset: "files".into(),
        key_id: "0000000000000000".into(),
        from_seq: 1,
        ..Default::default()
    })
    .expect("wrong key refused");
    assert!(e.contains("key id"), "{e}");
    let e = refusal(pb::Hello {
        dataset: "nope".into(),
        key_id: key_id.clone(),
        from_seq: 1,
        ..Default::default()
    })
    .expect("unknown dataset refused");
    assert!(e.contains("no dataset"), "{e}");
    let e = refusal(pb::Hello {
        dataset: "files".into(),
        key_id,
        from_seq: before.0 + 100,
        ..Default::default()
    })
    .expect("a follower ahead is refused");
    assert!(e.contains("ends at"), "{e}");

    // A configured site that is not a follower here may connect (for
    // cross-site verify) but not follow: the primary's certificate asking
    // the same-city site for its log.
    let primary_files = replicator::tls::TlsFiles {
        ca: ca.clone(),
        cert: certs.join("zjk-a.pem"),
        key: certs.join("zjk-a.key"),
    };
    let denied = rt.block_on(async {
        let ch = dial(dep.ports[1], &primary_files, "zjk-b").await;
        let mut client = pb::replication_client::ReplicationClient::new(ch);
        let msg = pb::FollowerMessage {
            msg: Some(pb::follower_message::Msg::Hello(pb::Hello {
                dataset: "files".into(),
                key_id: dep.a.key().key_id(),
                from_seq: 1,
                ..Default::default()
            })),
        };
        client.follow(tokio_stream::iter(vec![msg])).await.err()
    });
    let status = denied.expect("Follow refused");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("not configured to follow"),
        "{status:?}"
    );

    // Admin calls change things: another site's certificate is refused; the
    // site's own certificate gets through to the action (which here finds
    // no [archive] to snapshot).
    let admin = |files: &replicator::tls::TlsFiles| {
        rt.block_on(async {
            let ch = dial(dep.ports[0], files, "zjk-a").await;
            pb::replication_client::ReplicationClient::new(ch)
                .admin(pb::AdminRequest {
                    action: "snapshot".into(),
                    dataset: "files".into(),
                })
                .await
                .map_err(Box::new)
        })
    };
    let same_city = replicator::tls::TlsFiles {
        ca: ca.clone(),
        cert: certs.join("zjk-b.pem"),
        key: certs.join("zjk-b.key"),
    };
    let status = admin(&same_city).expect_err("another site's admin call");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("need its own certificate"),
        "{status:?}"
    );
    let status = admin(&primary_files).expect_err("no archive to snapshot");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("no [archive]"), "{status:?}");

    // Everyone is still up, and no copy changed.
    std::thread::sleep(Duration::from_millis(500));
    for s in [&dep.a, &dep.b, &dep.c] {
        assert_eq!(
            head_and_hashes(s).as_ref(),
            Some(&before),
            "{}",
            s.log_text()
        );
    }
    let log = dep.a.log_text();
    assert!(
        log.contains("refused a replication connection: TLS handshake failed"),
        "{log}"
    );
    assert!(
        log.contains("names a site that is not in this site's [[peer]] list"),
        "{log}"
    );
    write_some_files(&dep.a.source.join("later"));
    dep.a.wait_settled(now_ns(), Duration::from_secs(60));
    wait_replicated(&dep.a, &[&dep.b, &dep.c], Duration::from_secs(60));
}

fn write_some_files(root: &Path) {
    std::fs::create_dir_all(root).unwrap();
    for i in 0..30 {
        std::fs::write(
            root.join(format!("f{i}")),
            format!("content {i}").repeat(100),
        )
        .unwrap();
    }
}

/// Issues a certificate for `name` signed by the deployment CA in `certs`.
fn issue_with_ca(certs: &Path, out: &Path, name: &str) {
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(certs.join("ca.key")).unwrap()).unwrap();
    let ca_params = rcgen::CertificateParams::from_ca_cert_pem(
        &std::fs::read_to_string(certs.join("ca.pem")).unwrap(),
    )
    .unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let mut p = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
    std::fs::write(out.join(format!("{name}.pem")), cert.pem()).unwrap();
    std::fs::write(out.join(format!("{name}.key")), key.serialize_pem()).unwrap();
}
