//! A three-site deployment of real daemons on loopback: certificates from
//! `triad certs`, one config per site, and waiting for followers to catch up.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::*;

pub use triad_tests::free_port;

pub struct Names {
    pub certs: PathBuf,
}

pub fn make_certs(dir: &Path, sites: &[&str]) -> Names {
    let out = std::process::Command::new(triad_bin())
        .args(["certs", "--out"])
        .arg(dir)
        .args(sites)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "certs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Names {
        certs: dir.to_path_buf(),
    }
}

/// The [tls] section and [[peer]] list every site's config shares.
pub fn tls(certs: &Path, name: &str) -> String {
    format!(
        "[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/{1}.pem\"\nkey = \"{0}/{1}.key\"\n",
        certs.display(),
        name
    )
}

pub fn peer(name: &str, port: u16, mode: Option<&str>) -> String {
    let mode = mode
        .map(|m| format!("mode = \"{m}\"\n"))
        .unwrap_or_default();
    format!("[[peer]]\nname = \"{name}\"\naddress = \"127.0.0.1:{port}\"\n{mode}\n")
}

/// A three-site deployment: primary `zjk-a`, same-city `zjk-b`, remote `sjz-c`.
pub struct Deployment {
    pub a: Site,
    pub b: Site,
    pub c: Site,
    pub ports: [u16; 3],
    /// Each site's `listen.http` port (/metrics, /readyz, /v1/status).
    pub http: [u16; 3],
    pub names: Names,
    /// Extra keys for the same-city peer in the primary's config (its
    /// commit policy).
    pub sync_policy: String,
    /// Extra keys for the primary's [site] section.
    pub primary_site: String,
    /// Extra keys for the remote peer in the primary's config.
    pub remote_policy: String,
    /// The primary's `source = ...` line; a watched directory when empty.
    pub primary_source: String,
    /// Sections appended to the primary's config (e.g. [archive]).
    pub primary_extra: String,
    /// The followers keep hot standby trees (at [`standby_dir`]).
    pub standby: bool,
}

/// Where a follower of a deployment with `standby` keeps its tree.
pub fn standby_dir(site: &Site) -> PathBuf {
    site.tmp.path().join("standby")
}

impl Deployment {
    /// `remote_upstream` is the port the remote dials (the primary's, the
    /// local site's for a cascade, or a proxy's).
    pub fn new(remote_upstream: Option<(String, u16)>) -> Deployment {
        let a = Site::new();
        let b = Site::new();
        let c = Site::new();
        b.share_key_of(&a);
        c.share_key_of(&a);
        let names = make_certs(&a.tmp.path().join("certs"), &["zjk-a", "zjk-b", "sjz-c"]);
        let ports = [free_port(), free_port(), free_port()];
        let d = Deployment {
            a,
            b,
            c,
            ports,
            http: [free_port(), free_port(), free_port()],
            names,
            sync_policy: String::new(),
            primary_site: String::new(),
            remote_policy: String::new(),
            primary_source: String::new(),
            primary_extra: String::new(),
            standby: false,
        };
        d.configure(remote_upstream);
        d
    }

    pub fn configure(&self, remote_upstream: Option<(String, u16)>) {
        let [pa, pb, pc] = self.ports;
        let [ha, hb, hc] = self.http;
        let certs = &self.names.certs;
        let standby = |s: &Site| {
            if self.standby {
                format!("standby_path = \"{}\"\n", standby_dir(s).display())
            } else {
                String::new()
            }
        };
        self.a.set_config(&format!(
            "[site]\nname = \"zjk-a\"\nrole = \"primary\"\ndata_dir = \"{}\"\n{}\n[listen]\nreplication = \"127.0.0.1:{pa}\"\nhttp = \"127.0.0.1:{ha}\"\n\n{}\n{}{}[[dataset]]\nname = \"files\"\nkey_file = \"{}\"\n{}\n{}",
            self.a.data.display(),
            self.primary_site,
            tls(certs, "zjk-a"),
            peer("zjk-b", pb, Some("sync")).replace("mode = \"sync\"\n", &format!("mode = \"sync\"\n{}", self.sync_policy)),
            peer("sjz-c", pc, Some("async")).replace("mode = \"async\"\n", &format!("mode = \"async\"\n{}", self.remote_policy)),
            self.a.key.display(),
            if self.primary_source.is_empty() {
                format!(
                    "source = {{ kind = \"directory\", path = \"{}\", debounce = \"100ms\" }}",
                    self.a.source.display()
                )
            } else {
                self.primary_source.clone()
            },
            self.primary_extra,
        ));
        self.b.set_config(&format!(
            "[site]\nname = \"zjk-b\"\nrole = \"follower\"\ndata_dir = \"{}\"\nupstream = \"zjk-a\"\n\n[listen]\nreplication = \"127.0.0.1:{pb}\"\nhttp = \"127.0.0.1:{hb}\"\n\n{}\n{}{}[[dataset]]\nname = \"files\"\nkey_file = \"{}\"\n{}",
            self.b.data.display(),
            tls(certs, "zjk-b"),
            peer("zjk-a", pa, None),
            peer("sjz-c", pc, Some("async")),
            self.b.key.display(),
            standby(&self.b),
        ));
        let (up_name, up_port) = remote_upstream.unwrap_or(("zjk-a".into(), pa));
        let other = if up_name == "zjk-a" {
            peer("zjk-b", pb, None)
        } else {
            peer("zjk-a", pa, None)
        };
        self.c.set_config(&format!(
            "[site]\nname = \"sjz-c\"\nrole = \"follower\"\ndata_dir = \"{}\"\nupstream = \"{up_name}\"\n\n[listen]\nreplication = \"127.0.0.1:{pc}\"\nhttp = \"127.0.0.1:{hc}\"\n\n{}\n{}{}[[dataset]]\nname = \"files\"\nkey_file = \"{}\"\n{}",
            self.c.data.display(),
            tls(certs, "sjz-c"),
            peer(&up_name, up_port, None),
            other,
            self.c.key.display(),
            standby(&self.c),
        ));
    }

    pub fn start(&mut self) {
        self.a.start();
        self.b.start();
        self.c.start();
    }
}

pub fn head_and_hashes(site: &Site) -> Option<(u64, String, String)> {
    let v = site.status()?;
    if v["pid"].as_u64() != site.pid().map(|p| p as u64) {
        return None;
    }
    Some((
        v["log"]["head_seq"].as_u64()?,
        v["log"]["chain_hash"].as_str()?.to_string(),
        v["log"]["digest"].as_str()?.to_string(),
    ))
}

/// Waits until `followers` hold exactly the primary's log head, chain hash
/// and digest.
pub fn wait_replicated(
    primary: &Site,
    followers: &[&Site],
    timeout: Duration,
) -> (u64, String, String) {
    let start = Instant::now();
    // The primary's status file is rewritten every 250 ms: one written
    // before this call may not show a change the caller just made.
    let since = now_ns();
    loop {
        let fresh = primary
            .status()
            .and_then(|v| v["updated_ns"].as_i64())
            .is_some_and(|t| t > since);
        if let Some(p) = head_and_hashes(primary).filter(|_| fresh) {
            if followers
                .iter()
                .all(|f| head_and_hashes(f).as_ref() == Some(&p))
            {
                return p;
            }
        }
        if start.elapsed() > timeout {
            let statuses: Vec<String> = std::iter::once(primary)
                .chain(followers.iter().copied())
                .map(|s| s.status().map(|v| v.to_string()).unwrap_or_default())
                .collect();
            panic!(
                "followers did not catch up in {timeout:?}:\n{}\n--- follower logs ---\n{}",
                statuses.join("\n"),
                followers
                    .iter()
                    .map(|f| f.log_text())
                    .collect::<Vec<_>>()
                    .join("\n----\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A gRPC channel to the replication port on `port`, presenting `files`
/// and expecting the answering certificate to name `site`.
pub async fn dial(
    port: u16,
    files: &replicator::tls::TlsFiles,
    site: &str,
) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(replicator::tls::client_config(files, site).unwrap())
        .unwrap()
        .connect()
        .await
        .unwrap()
}
