//! One module per subcommand, plus what they share.

pub mod archive;
pub mod certs;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod drill;
pub mod keygen;
pub mod push;
pub mod repair;
pub mod restore;
pub mod resync;
pub mod status;
pub mod verify;

use std::path::Path;

use anyhow::Context;
use tracing_subscriber::EnvFilter;

/// The datasets a command works on: the one named (which must be in the
/// config), or all of the config's.
pub fn dataset_names(
    cfg: &crate::config::Config,
    dataset: Option<&str>,
    config_path: &Path,
) -> anyhow::Result<Vec<String>> {
    match dataset {
        Some(d) => {
            cfg.dataset(d)
                .with_context(|| format!("dataset `{d}` is not in {}", config_path.display()))?;
            Ok(vec![d.to_string()])
        }
        None => Ok(cfg.dataset.iter().map(|d| d.name.clone()).collect()),
    }
}

/// Logs go to stderr; `TRIAD_LOG` (or `RUST_LOG`) filters, default `info`.
pub fn init_logging(format: &str) {
    let filter = EnvFilter::try_from_env("TRIAD_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        // notify logs routine inotify bookkeeping at info; keep it out of the way.
        .unwrap_or_else(|_| EnvFilter::new("info,notify=warn"));
    // Colours only on a terminal: the journal and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// `--config`: the site config file, for every command that reads one.
#[derive(clap::Args, Clone)]
pub struct ConfigPath {
    /// The site config file.
    #[arg(
        long,
        short,
        env = "TRIAD_CONFIG",
        default_value = "/etc/triad/triad.toml"
    )]
    pub config: std::path::PathBuf,
}
