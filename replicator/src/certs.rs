//! `triad certs`: a private CA and one certificate per site, so operators can
//! start without OpenSSL recipes. A site's certificate names the site (as its
//! common name and DNS subject alternative name) and is valid for both ends of
//! a connection, since every site both serves and dials.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::ReplError;

/// Files written for one site.
pub struct SiteFiles {
    pub name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn write(path: &Path, body: &str, mode: u32) -> Result<(), ReplError> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .and_then(|mut f| f.write_all(body.as_bytes()).and_then(|_| f.sync_all()))
        .map_err(|e| ReplError::File {
            what: "writing",
            path: path.to_path_buf(),
            reason: format!("{e} (existing files are never replaced)"),
        })
}

fn err(e: rcgen::Error) -> ReplError {
    ReplError::Certs(e.to_string())
}

/// Creates `ca.pem` (and `ca.key`, to sign more sites later) and, per site,
/// `<site>.pem` and `<site>.key` in `dir`.
pub fn create(dir: &Path, sites: &[String]) -> Result<(PathBuf, Vec<SiteFiles>), ReplError> {
    for name in sites {
        let ok = !name.is_empty()
            && name.len() <= 64
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !ok {
            return Err(ReplError::Certs(format!(
                "`{name}` is not a usable site name: use letters, digits, `-` and `.` (it becomes a DNS name and a file name)"
            )));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| ReplError::File {
        what: "creating",
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "triad deployment CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().map_err(err)?;
    let ca = ca_params.self_signed(&ca_key).map_err(err)?;
    let ca_path = dir.join("ca.pem");
    write(&ca_path, &ca.pem(), 0o644)?;
    write(&dir.join("ca.key"), &ca_key.serialize_pem(), 0o600)?;
    let mut out = Vec::new();
    for name in sites {
        let mut p = CertificateParams::new(vec![name.clone()]).map_err(err)?;
        p.distinguished_name.push(DnType::CommonName, name.as_str());
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().map_err(err)?;
        let cert = p.signed_by(&key, &ca, &ca_key).map_err(err)?;
        let files = SiteFiles {
            name: name.clone(),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        };
        write(&files.cert, &cert.pem(), 0o644)?;
        write(&files.key, &key.serialize_pem(), 0o600)?;
        out.push(files);
    }
    Ok((ca_path, out))
}
