//! `triad put` and `triad get`: a database's archive_command and
//! restore_command. Both talk to the local daemon over its Unix socket
//! (`pushed.rs`); `get --from-archive` needs no daemon and reads an object
//! store directly.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};

use crate::config::Config;
use crate::pushed::client;

#[derive(clap::Args)]
pub struct PutArgs {
    #[arg(
        long,
        short,
        env = "TRIAD_CONFIG",
        default_value = "/etc/triad/triad.toml"
    )]
    config: PathBuf,
    /// The daemon's socket (default: the config's listen.socket, else
    /// <data_dir>/triad.sock). With it, no config is read.
    #[arg(long, env = "TRIAD_SOCKET")]
    socket: Option<PathBuf>,
    /// A dataset with source = { kind = "pushed" }.
    #[arg(long)]
    dataset: String,
    /// The file to store, or `-` for stdin (then NAME is required).
    path: PathBuf,
    /// The name to store it under (default: PATH's file name).
    name: Option<String>,
}

#[derive(clap::Args)]
pub struct GetArgs {
    #[arg(
        long,
        short,
        env = "TRIAD_CONFIG",
        default_value = "/etc/triad/triad.toml"
    )]
    config: PathBuf,
    /// The daemon's socket (default: the config's listen.socket, else
    /// <data_dir>/triad.sock).
    #[arg(long, env = "TRIAD_SOCKET")]
    socket: Option<PathBuf>,
    #[arg(long)]
    dataset: String,
    /// The object's name.
    name: String,
    /// Where to write it; written whole or not at all.
    dest: PathBuf,
    /// Read from this archive (s3://bucket/prefix or file:///dir) instead of
    /// the daemon; store settings as for `triad restore --from-archive`.
    #[arg(long)]
    from_archive: Option<String>,
    /// With --from-archive: `latest`, a seq or an RFC 3339 time.
    #[arg(long, default_value = "latest")]
    at: String,
    /// With --from-archive and no config: the dataset's key file.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// With --from-archive and no config: the S3 endpoint.
    #[arg(long)]
    endpoint: Option<String>,
    /// With --from-archive and no config: the S3 region.
    #[arg(long)]
    region: Option<String>,
    /// With --from-archive and no config: the credentials file.
    #[arg(long)]
    credentials_file: Option<PathBuf>,
}

fn socket(explicit: &Option<PathBuf>, config: &Path) -> Result<PathBuf> {
    match explicit {
        Some(s) => Ok(s.clone()),
        None => Ok(Config::load(config)?.socket_path()),
    }
}

pub fn put(a: PutArgs) -> Result<ExitCode> {
    let name = match (&a.name, a.path.as_os_str() == "-") {
        (Some(n), _) => n.clone(),
        (None, true) => bail!("reading stdin (`-`) needs a NAME to store it under"),
        (None, false) => a
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| anyhow!("{} has no file name; give a NAME", a.path.display()))?
            .to_string(),
    };
    let sock = socket(&a.socket, &a.config)?;
    let mut input: Box<dyn Read> = if a.path.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(
            std::fs::File::open(&a.path)
                .with_context(|| format!("opening {}", a.path.display()))?,
        )
    };
    let answer = client::put(&sock, &a.dataset, &name, &mut input).map_err(|e| anyhow!(e))?;
    if !answer.ok {
        bail!(
            "put {name} into dataset {}: {}",
            a.dataset,
            answer.error.unwrap_or_else(|| "refused".into())
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn get(a: GetArgs) -> Result<ExitCode> {
    crate::pushed::check_name(&a.name).map_err(|e| anyhow!(e))?;
    if let Some(url) = a.from_archive.clone() {
        return get_from_archive(&a, &url);
    }
    let sock = socket(&a.socket, &a.config)?;
    let answer = client::get(&sock, &a.dataset, &a.name, &a.dest).map_err(|e| anyhow!(e))?;
    if answer.missing {
        // What restore_command must do at the end of the archived WAL.
        eprintln!("{}: not in dataset {}", a.name, a.dataset);
        return Ok(ExitCode::FAILURE);
    }
    if !answer.ok {
        bail!(
            "get {} from dataset {}: {}",
            a.name,
            a.dataset,
            answer.error.unwrap_or_else(|| "refused".into())
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Restores the dataset from the archive into a scratch directory next to
/// DEST and takes the one object from it. Every chunk is checked on the way
/// as in any archive restore. It downloads the whole dataset at that point,
/// so it suits a few objects (a base backup, a recovery's WAL), not bulk use.
fn get_from_archive(a: &GetArgs, url: &str) -> Result<ExitCode> {
    let parent = a
        .dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let scratch = tempfile::Builder::new()
        .prefix(".triad-get-")
        .tempdir_in(parent)
        .with_context(|| format!("creating a scratch directory in {}", parent.display()))?;
    let to = scratch.path().join("restore");
    let args = crate::cmd::restore::Args {
        config: a.config.clone(),
        dataset: a.dataset.clone(),
        to: to.clone(),
        json: true,
        from_archive: Some(url.to_string()),
        at: a.at.clone(),
        key_file: a.key_file.clone(),
        endpoint: a.endpoint.clone(),
        region: a.region.clone(),
        credentials_file: a.credentials_file.clone(),
        concurrency: 32,
    };
    let r = crate::cmd::restore::restore_from_archive(&args, url, false)?;
    if !r.report.ok() {
        bail!(
            "the archive did not restore cleanly: {}",
            r.report.problems.join("; ")
        );
    }
    let src = to.join(&a.name);
    let mut f = match std::fs::File::open(&src) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "{}: not in dataset {} in {url} (at seq {})",
                a.name, a.dataset, r.seq
            );
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => return Err(e).with_context(|| format!("opening {}", src.display())),
    };
    let size = f.metadata()?.len();
    client::write_whole(&a.dest, &mut f, size, |_, _| Ok(())).map_err(|e| anyhow!(e))?;
    Ok(ExitCode::SUCCESS)
}
