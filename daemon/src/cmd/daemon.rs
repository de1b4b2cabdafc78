//! `triad daemon`: run the site.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

use crate::config::Config;

pub fn run(config: &Path) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    // A signing key that cannot be read fails the start, not the first
    // scheduled drill hours later.
    if let Some(signer) = cfg.evidence_signer()? {
        tracing::info!(key = %signer.fingerprint(), "evidence is signed with SM2");
    }
    crate::runtime::run(config, cfg)?;
    Ok(ExitCode::SUCCESS)
}
