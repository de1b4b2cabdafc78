//! `triad key`: put a dataset key under a key-encryption key in a
//! cryptographic device (`wrap`), move it under another one (`rewrap`),
//! and check that the device still gives it (`show`). The dataset key
//! itself never changes, so no data is touched (vault/src/kek.rs).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use vault::kek::{self, Device};
use vault::DatasetKey;

#[derive(clap::Subcommand)]
pub enum KeyCommand {
    /// Wrap a plain dataset key file under a key in a PKCS#11 token and
    /// write the wrapped key file. The plain file is left as it is: keep it
    /// offline, then remove it from the sites.
    Wrap {
        /// The plain key file (`triad keygen`).
        #[arg(long)]
        key_file: PathBuf,
        /// Where the wrapped key file goes; never replaced.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        device: DeviceArgs,
        /// The key-encryption key's label in the token.
        #[arg(long)]
        kek: String,
        /// Make the key-encryption key first (AES-256, never extractable).
        #[arg(long)]
        create_kek: bool,
    },
    /// Unwrap a wrapped key file and wrap the same dataset key under
    /// another key-encryption key (in the same token, or another device
    /// given with --module, --token and --pin-file). No data changes.
    Rewrap {
        /// The wrapped key file in use.
        #[arg(long)]
        key_file: PathBuf,
        /// The new wrapped key file; never replaced.
        #[arg(long)]
        out: PathBuf,
        /// The new key-encryption key's label.
        #[arg(long)]
        kek: String,
        #[arg(long)]
        create_kek: bool,
        /// Another device (all three, or none for the same one).
        #[arg(long, requires_all = ["token", "pin_file"])]
        module: Option<PathBuf>,
        #[arg(long, requires_all = ["module", "pin_file"])]
        token: Option<String>,
        #[arg(long, requires_all = ["module", "token"])]
        pin_file: Option<PathBuf>,
    },
    /// Say what a key file is and, for a wrapped one, whether its device
    /// gives the key now. Exits 1 when it does not.
    Show {
        #[arg(long)]
        key_file: PathBuf,
    },
}

#[derive(clap::Args)]
pub struct DeviceArgs {
    /// The PKCS#11 module (e.g. /usr/lib/softhsm/libsofthsm2.so).
    #[arg(long)]
    module: PathBuf,
    /// The token's label.
    #[arg(long)]
    token: String,
    /// A file holding the user PIN (mode 0600).
    #[arg(long)]
    pin_file: PathBuf,
}

impl From<DeviceArgs> for Device {
    fn from(a: DeviceArgs) -> Device {
        Device {
            module: a.module,
            token: a.token,
            pin_file: a.pin_file,
        }
    }
}

fn wrap_into(key: &DatasetKey, device: &Device, kek: &str, create: bool, out: &Path) -> Result<()> {
    if create {
        kek::create_kek(device, kek)?;
        println!("made key-encryption key `{kek}` in {device}");
    }
    let w = kek::wrap(key, device, kek)?;
    kek::write_new(out, &w).with_context(|| format!("writing {}", out.display()))?;
    // Read it back through the device before anyone relies on it; a file
    // that does not give the key back is removed, so a retry can write it.
    let back = DatasetKey::load(out)
        .context("reading the new wrapped key file back")
        .and_then(|b| {
            anyhow::ensure!(
                b.key_id() == key.key_id(),
                "the wrapped key file gives key id {}, not {}",
                b.key_id(),
                key.key_id()
            );
            Ok(b)
        });
    if let Err(e) = back {
        let _ = std::fs::remove_file(out);
        return Err(e.context(format!("{} removed again", out.display())));
    }
    println!(
        "wrote {} (mode 0600): dataset key {} wrapped by `{kek}` in {device}",
        out.display(),
        key.key_id()
    );
    Ok(())
}

/// Whether the file at `path` claims to be a wrapped key file (whatever
/// else is wrong with it).
fn is_wrapped(path: &Path) -> bool {
    vault::signing::read_regular(path, 64 << 10)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .is_some_and(|t| kek::parse(path, &t).is_some())
}

pub fn run(c: KeyCommand) -> Result<ExitCode> {
    match c {
        KeyCommand::Wrap {
            key_file,
            out,
            device,
            kek,
            create_kek,
        } => {
            anyhow::ensure!(
                !is_wrapped(&key_file),
                "{} is already wrapped; use `triad key rewrap`",
                key_file.display()
            );
            let key = DatasetKey::load(&key_file)?;
            wrap_into(&key, &device.into(), &kek, create_kek, &out)?;
            println!(
                "point key_file at {} on each site, keep {} offline, and remove it from the sites",
                out.display(),
                key_file.display()
            );
        }
        KeyCommand::Rewrap {
            key_file,
            out,
            kek,
            create_kek,
            module,
            token,
            pin_file,
        } => {
            let old = kek::read(&key_file)?;
            let key = DatasetKey::load(&key_file)?;
            let device = match (module, token, pin_file) {
                (Some(module), Some(token), Some(pin_file)) => Device {
                    module,
                    token,
                    pin_file,
                },
                _ => old.device.clone(),
            };
            wrap_into(&key, &device, &kek, create_kek, &out)?;
            println!(
                "replace {} with {} on each site (the daemon reads it at its next start); `{}` is then no longer needed for this dataset",
                key_file.display(),
                out.display(),
                old.kek
            );
        }
        KeyCommand::Show { key_file } => match kek::read(&key_file) {
            // A file that is no wrapped key file at all may be a plain one.
            Err(_) if !is_wrapped(&key_file) => {
                let key = DatasetKey::load(&key_file)?;
                println!(
                    "{}: plain dataset key {} (not wrapped)",
                    key_file.display(),
                    key.key_id()
                );
            }
            Err(e) => return Err(e.into()),
            Ok(w) => {
                println!(
                    "{}: dataset key {} wrapped by `{}` ({}) in {}",
                    key_file.display(),
                    w.key_id,
                    w.kek,
                    w.mechanism,
                    w.device
                );
                match kek::confirm(&key_file, None) {
                    Ok(_) => println!("the device gives the key now"),
                    Err(e) => {
                        println!("the device does NOT give the key: {e}");
                        return Ok(ExitCode::FAILURE);
                    }
                }
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}
