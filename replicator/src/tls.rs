//! Mutual TLS between sites.
//!
//! The server side accepts TCP connections itself and completes the TLS
//! handshake before gRPC sees anything, so a stranger (no certificate, a
//! certificate from another CA, a valid certificate for a site this one does
//! not list as a peer, or random bytes) is refused and logged with its address,
//! and nothing it sends is read as a request. The client side uses tonic's
//! TLS with the deployment CA and checks the upstream's certificate names the
//! site it meant to reach.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::ReplError;

/// Paths of a site's CA, certificate and key (the config's `[tls]`).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn read(path: &Path) -> Result<Vec<u8>, ReplError> {
    std::fs::read(path).map_err(|e| ReplError::File {
        what: "reading",
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ReplError> {
    let pem = read(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| ReplError::File {
            what: "parsing certificates in",
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(ReplError::File {
            what: "parsing",
            path: path.to_path_buf(),
            reason: "no PEM certificate found; create one with `triad certs`".into(),
        });
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, ReplError> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| ReplError::File {
            what: "parsing key",
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?
        .ok_or_else(|| ReplError::File {
            what: "parsing",
            path: path.to_path_buf(),
            reason: "no PEM private key found".into(),
        })
}

/// The site name a certificate was issued to: its first DNS name, else its
/// common name.
pub fn site_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    if let Ok(Some(san)) = c.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                return Some(d.to_string());
            }
        }
    }
    let cn = c
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    cn
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server configuration requiring a client certificate from the deployment CA.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, ReplError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(&files.ca)? {
        roots
            .add(c)
            .map_err(|e| ReplError::Tls(format!("CA {}: {e}", files.ca.display())))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| ReplError::Tls(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ReplError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&files.cert)?, key(&files.key)?)
        .map_err(|e| ReplError::Tls(format!("{}: {e}", files.cert.display())))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// tonic client TLS settings for dialing the site named `peer`.
pub fn client_config(
    files: &TlsFiles,
    peer: &str,
) -> Result<tonic::transport::ClientTlsConfig, ReplError> {
    let ca = read(&files.ca)?;
    let cert = read(&files.cert)?;
    let key = read(&files.key)?;
    Ok(tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .identity(tonic::transport::Identity::from_pem(cert, key))
        .domain_name(peer))
}

/// Who is on the other end of an accepted connection.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub site: String,
    pub addr: std::net::SocketAddr,
}

/// A TLS connection from an authenticated site.
pub struct PeerStream {
    inner: TlsStream<TcpStream>,
    info: PeerInfo,
}

impl tonic::transport::server::Connected for PeerStream {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Counts of refused connections, for status and tests.
#[derive(Default, Debug)]
pub struct Refusals {
    pub handshake: std::sync::atomic::AtomicU64,
    pub unknown_site: std::sync::atomic::AtomicU64,
}

/// Accepts connections, completes TLS, and yields only those from sites
/// `allowed` accepts. Everything else is logged and dropped.
pub fn accept(
    listener: TcpListener,
    cfg: Arc<rustls::ServerConfig>,
    allowed: Arc<dyn Fn(&str) -> bool + Send + Sync>,
    refusals: Arc<Refusals>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<PeerStream>> {
    use std::sync::atomic::Ordering;
    let (tx, rx) = mpsc::channel(16);
    let acceptor = TlsAcceptor::from(cfg);
    tokio::spawn(async move {
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a replication connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (acceptor, tx, allowed, refusals) = (
                acceptor.clone(),
                tx.clone(),
                allowed.clone(),
                refusals.clone(),
            );
            tokio::spawn(async move {
                let hs = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await;
                let tls = match hs {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        refusals.handshake.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(peer = %addr, error = %e, "refused a replication connection: TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        refusals.handshake.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(peer = %addr, "refused a replication connection: no TLS handshake within 10s");
                        return;
                    }
                };
                let site = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(site_name);
                match site {
                    Some(site) if allowed(&site) => {
                        let _ = tx
                            .send(Ok(PeerStream {
                                inner: tls,
                                info: PeerInfo { site, addr },
                            }))
                            .await;
                    }
                    other => {
                        refusals.unknown_site.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            peer = %addr,
                            site = other.as_deref().unwrap_or("?"),
                            "refused a replication connection: its certificate names a site that is not in this site's [[peer]] list"
                        );
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
