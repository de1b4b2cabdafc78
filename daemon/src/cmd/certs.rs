//! `triad certs`: a CA and per-site certificates for a deployment.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

pub fn run(out: &Path, sites: &[String]) -> Result<ExitCode> {
    let (ca, files) = replicator::certs::create(out, sites)?;
    println!(
        "wrote CA certificate {} and its key ca.key: keep the key offline; it can sign a certificate for a later site (docs/operations.md)",
        ca.display()
    );
    for f in files {
        println!(
            "site {}: certificate {}, key {} (mode 0600)",
            f.name,
            f.cert.display(),
            f.key.display()
        );
    }
    println!("copy ca.pem and each site's own .pem and .key to that site and name them in its [tls] section");
    Ok(ExitCode::SUCCESS)
}
