//! One module per subcommand, plus what they share.

pub mod archive;
pub mod certs;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod drill;
pub mod keygen;
pub mod repair;
pub mod restore;
pub mod resync;
pub mod status;
pub mod verify;

use tracing_subscriber::EnvFilter;

/// Logs go to stderr; `TRIAD_LOG` (or `RUST_LOG`) filters, default `info`.
pub fn init_logging(format: &str) {
    let filter = EnvFilter::try_from_env("TRIAD_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        // notify logs routine inotify bookkeeping at info; keep it out of the way.
        .unwrap_or_else(|_| EnvFilter::new("info,notify=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
