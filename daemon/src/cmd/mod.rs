//! One module per subcommand, plus what they share.

pub mod archive;
pub mod certs;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod drill;
pub mod key;
pub mod keygen;
pub mod promote;
pub mod push;
pub mod restore;
pub mod resync;
pub mod status;
pub mod verify;
pub mod verify_report;

use anyhow::Context;
use tracing_subscriber::EnvFilter;

/// `--config` and `--dataset`, for the commands that work on one dataset or
/// on every dataset of the config.
#[derive(clap::Args)]
pub struct Datasets {
    #[command(flatten)]
    pub cfg: ConfigPath,
    /// The dataset; all of the config's datasets when absent.
    #[arg(long)]
    pub dataset: Option<String>,
}

impl Datasets {
    /// The config, and the datasets named (checked to be in it).
    pub fn load(&self) -> anyhow::Result<(crate::config::Config, Vec<String>)> {
        let cfg = crate::config::Config::load(&self.cfg.config)?;
        let names = match &self.dataset {
            Some(d) => {
                cfg.dataset(d).with_context(|| {
                    format!("dataset `{d}` is not in {}", self.cfg.config.display())
                })?;
                vec![d.clone()]
            }
            None => cfg.dataset.iter().map(|d| d.name.clone()).collect(),
        };
        Ok((cfg, names))
    }
}

/// Logs go to stderr; `TRIAD_LOG` (or `RUST_LOG`) filters, default `info`.
pub fn init_logging(format: crate::config::LogFormat) {
    let filter = EnvFilter::try_from_env("TRIAD_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        // notify logs routine inotify bookkeeping at info; keep it out of the way.
        .unwrap_or_else(|_| EnvFilter::new("info,notify=warn"));
    // Colours only on a terminal: the journal and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == crate::config::LogFormat::Json {
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
