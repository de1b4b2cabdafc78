//! `triad config check FILE`: validate a site config without starting.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;
use vault::DatasetKey;

use crate::config::Config;

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Parse and validate a config; also checks each key file can be read
    /// (a wrapped one through its device) and the evidence signing key.
    Check { file: PathBuf },
}

pub fn run(cmd: ConfigCommand) -> Result<ExitCode> {
    let ConfigCommand::Check { file } = cmd;
    let cfg = Config::load(&file)?;
    let mut problems = 0;
    for (i, d) in cfg.dataset.iter().enumerate() {
        if let Err(e) = DatasetKey::load(&d.key_file) {
            eprintln!("{}: dataset[{i}].key_file: {e}", file.display());
            problems += 1;
        }
        if let Some(s) = d.directory() {
            if !s.path.is_dir() {
                eprintln!(
                    "{}: dataset[{i}].source.path: {} is not a directory (yet); create it before starting",
                    file.display(),
                    s.path.display()
                );
                problems += 1;
            }
        }
    }
    if let Some(t) = &cfg.tls {
        for (field, path) in [
            ("tls.ca", &t.ca),
            ("tls.cert", &t.cert),
            ("tls.key", &t.key),
        ] {
            if !path.is_file() {
                eprintln!(
                    "{}: {field}: {} does not exist; create it with `triad certs`",
                    file.display(),
                    path.display()
                );
                problems += 1;
            }
        }
    }
    if let Err(e) = cfg.evidence_signer() {
        eprintln!("{}: evidence.signing_key: {e}", file.display());
        problems += 1;
    }
    if problems > 0 {
        return Ok(ExitCode::FAILURE);
    }
    println!(
        "{}: ok (site {}, {} dataset{})",
        file.display(),
        cfg.site.name,
        cfg.dataset.len(),
        if cfg.dataset.len() == 1 { "" } else { "s" }
    );
    Ok(ExitCode::SUCCESS)
}
