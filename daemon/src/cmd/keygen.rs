//! `triad keygen`: create a dataset key file.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use vault::DatasetKey;

pub fn run(out: &Path) -> Result<ExitCode> {
    let key = DatasetKey::generate();
    key.write_new(out)
        .with_context(|| format!("writing key file {}", out.display()))?;
    println!(
        "wrote dataset key {} (key id {}, mode 0600)\nkeep a copy offline: without it no site and no archive can be read",
        out.display(),
        key.key_id()
    );
    Ok(ExitCode::SUCCESS)
}
