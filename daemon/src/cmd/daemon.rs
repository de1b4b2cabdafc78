//! `triad daemon`: run the site.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

use crate::config::Config;

pub fn run(config: &Path) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    crate::runtime::run(config, cfg)?;
    Ok(ExitCode::SUCCESS)
}
