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

/// Where the daemon is and which dataset: shared by put and get.
#[derive(clap::Args)]
pub struct Daemon {
    #[command(flatten)]
    cfg: crate::cmd::ConfigPath,
    /// The daemon's socket (default: the config's listen.socket, else
    /// <data_dir>/triad.sock). With it, no config is read.
    #[arg(long, env = "TRIAD_SOCKET")]
    socket: Option<PathBuf>,
    /// A pushed dataset (source = { kind = "pushed" } at the primary; a
    /// follower holds it by replication).
    #[arg(long)]
    dataset: String,
}

#[derive(clap::Args)]
pub struct PutArgs {
    #[command(flatten)]
    daemon: Daemon,
    /// The file to store, or `-` for stdin (then NAME is required).
    path: PathBuf,
    /// The name to store it under (default: PATH's file name).
    name: Option<String>,
}

#[derive(clap::Args)]
pub struct ForgetArgs {
    #[command(flatten)]
    daemon: Daemon,
    /// Remove every WAL segment and partial segment before this segment,
    /// as pg_archivecleanup does by default
    /// (`archive_cleanup_command = 'triad forget --dataset pg --wal-before %r'`).
    #[arg(long, value_name = "SEGMENT")]
    wal_before: Option<String>,
    /// Names to remove.
    names: Vec<String>,
}

#[derive(clap::Args)]
pub struct GetArgs {
    #[command(flatten)]
    daemon: Daemon,
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
    /// With --from-archive (and --at latest): keep the restored dataset in
    /// this directory and serve later gets from it, restoring again only
    /// when the archive has moved on. Makes restore_command cheap after its
    /// first call.
    #[arg(long)]
    cache: Option<PathBuf>,
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
    let sock = socket(&a.daemon.socket, &a.daemon.cfg.config)?;
    let mut input: Box<dyn Read> = if a.path.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let f = std::fs::File::open(&a.path)
            .with_context(|| format!("opening {}", a.path.display()))?;
        if f.metadata().is_ok_and(|m| m.is_dir()) {
            bail!(
                "{} is a directory: triad put stores one file (for a tree, use a directory dataset)",
                a.path.display()
            );
        }
        Box::new(f)
    };
    let answer =
        client::put(&sock, &a.daemon.dataset, &name, &mut input).map_err(|e| anyhow!(e))?;
    if !answer.ok {
        bail!(
            "put {name} into dataset {}: {}",
            a.daemon.dataset,
            answer.error.unwrap_or_else(|| "refused".into())
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn forget(a: ForgetArgs) -> Result<ExitCode> {
    let sock = socket(&a.daemon.socket, &a.daemon.cfg.config)?;
    let ds = &a.daemon.dataset;
    let mut asks: Vec<(&str, &str)> = a.names.iter().map(|n| ("forget", n.as_str())).collect();
    if let Some(w) = &a.wal_before {
        asks.push(("forget-wal-before", w.as_str()));
    }
    if asks.is_empty() {
        bail!("name the objects to forget, or give --wal-before SEGMENT");
    }
    let mut removed = 0;
    for (op, name) in asks {
        let answer = client::forget(&sock, op, ds, name).map_err(|e| anyhow!(e))?;
        if !answer.ok {
            bail!(
                "forget {name} in dataset {ds}: {}",
                answer.error.unwrap_or_else(|| "refused".into())
            );
        }
        if op == "forget" && answer.removed == 0 {
            eprintln!("{name} is not in dataset {ds}");
        }
        removed += answer.removed;
    }
    println!("dataset {ds}: {removed} names removed");
    Ok(ExitCode::SUCCESS)
}

/// Exit status of `triad get` when it could not fetch (as opposed to the
/// name not existing, status 1). PostgreSQL treats a restore_command status
/// above 125 as fatal and stops recovery, instead of taking the failure for
/// the end of the archive and promoting early.
const GET_FAILED: u8 = 255;

pub fn get(a: GetArgs) -> Result<ExitCode> {
    match get_inner(a) {
        Ok(code) => Ok(code),
        Err(e) => {
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                msg.push_str(&format!(": {cause}"));
            }
            eprintln!("error: {msg}");
            Ok(ExitCode::from(GET_FAILED))
        }
    }
}

fn get_inner(a: GetArgs) -> Result<ExitCode> {
    crate::pushed::check_name(&a.name).map_err(|e| anyhow!(e))?;
    if let Some(url) = a.from_archive.clone() {
        return get_from_archive(&a, &url);
    }
    let sock = socket(&a.daemon.socket, &a.daemon.cfg.config)?;
    let answer = client::get(&sock, &a.daemon.dataset, &a.name, &a.dest).map_err(|e| anyhow!(e))?;
    if answer.missing {
        // What restore_command must do at the end of the archived WAL.
        eprintln!("{}: not in dataset {}", a.name, a.daemon.dataset);
        return Ok(ExitCode::FAILURE);
    }
    if !answer.ok {
        bail!(
            "get {} from dataset {}: {}",
            a.name,
            a.daemon.dataset,
            answer.error.unwrap_or_else(|| "refused".into())
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Restores the dataset from the archive and takes the one object from it.
/// Every chunk is checked on the way as in any archive restore. Without
/// `--cache` each call restores the whole dataset into a scratch directory
/// next to DEST; with it, the restored dataset is kept and reused while the
/// archive holds nothing newer.
fn get_from_archive(a: &GetArgs, url: &str) -> Result<ExitCode> {
    if let Some(cache) = &a.cache {
        return get_cached(a, url, cache);
    }
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
    let seq = restore_into(a, url, &to)?;
    copy_out(a, &to.join(&a.name), &format!("{url} (at seq {seq})"))
}

/// Restores the dataset at `a.at` from `url` into `to`; returns its seq.
fn restore_into(a: &GetArgs, url: &str, to: &Path) -> Result<u64> {
    let r = crate::ops::restore::from_archive(&restore_request(a, url, to), &|_| {})?;
    if !r.report.ok() {
        bail!(
            "the archive did not restore cleanly: {}",
            r.report.problems.join("; ")
        );
    }
    Ok(r.seq)
}

/// `get --cache`: `<cache>/<dataset>/tree` holds the dataset as restored at
/// the seq in `<cache>/<dataset>/seq`; it is restored again (into a new
/// tree, then swapped in) when the archive's newest seq is beyond it. A lock
/// file keeps two gets from restoring at once.
fn get_cached(a: &GetArgs, url: &str, cache: &Path) -> Result<ExitCode> {
    if a.at != "latest" {
        bail!("--cache serves the archive's latest state; drop --cache to use --at");
    }
    let dir = cache.join(&a.daemon.dataset);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let lock = std::fs::File::create(dir.join("LOCK"))
        .with_context(|| format!("creating {}", dir.join("LOCK").display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", dir.join("LOCK").display()))?;
    let (tree, seq_file) = (dir.join("tree"), dir.join("seq"));
    let cached: Option<u64> = std::fs::read_to_string(&seq_file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|_| tree.is_dir());
    let fresh = match cached {
        // Present in the cache: objects are never replaced, so it is final.
        Some(_) if tree.join(&a.name).is_file() => true,
        Some(seq) => {
            let (store, key, _) =
                crate::ops::restore::open_archive(&restore_request(a, url, &tree))?;
            let rt = crate::ops::runtime()?;
            archive::archiver::archived_head(rt.handle(), &store, &key.derive(), &a.daemon.dataset)?
                <= seq
        }
        None => false,
    };
    if !fresh {
        let new = dir.join("tree.new");
        let _ = std::fs::remove_dir_all(&new);
        let seq = restore_into(a, url, &new)?;
        let old = dir.join("tree.old");
        let _ = std::fs::remove_dir_all(&old);
        if tree.exists() {
            std::fs::rename(&tree, &old)?;
        }
        std::fs::rename(&new, &tree)?;
        vault::fs::write_replace(&seq_file, seq.to_string().as_bytes(), true)?;
        let _ = std::fs::remove_dir_all(&old);
    }
    let seq = std::fs::read_to_string(&seq_file).unwrap_or_default();
    copy_out(
        a,
        &tree.join(&a.name),
        &format!("{url} (cached at seq {})", seq.trim()),
    )
}

/// What reading `url` into `to` takes (store and key settings).
fn restore_request(a: &GetArgs, url: &str, to: &Path) -> crate::ops::restore::FromArchive {
    crate::ops::restore::FromArchive {
        config: a.daemon.cfg.config.clone(),
        dataset: a.daemon.dataset.clone(),
        to: to.to_path_buf(),
        url: url.to_string(),
        at: a.at.clone(),
        key_file: a.key_file.clone(),
        endpoint: a.endpoint.clone(),
        region: a.region.clone(),
        credentials_file: a.credentials_file.clone(),
        concurrency: 32,
        expect_seq: None,
        delta: false,
    }
}

/// Copies one restored object to DEST (whole or not at all); exit 1 when
/// it is not there.
fn copy_out(a: &GetArgs, src: &Path, from: &str) -> Result<ExitCode> {
    let mut f = match std::fs::File::open(src) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("{}: not in dataset {} in {from}", a.name, a.daemon.dataset);
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => return Err(e).with_context(|| format!("opening {}", src.display())),
    };
    let size = f.metadata()?.len();
    client::write_whole(&a.dest, &mut f, size, |_, _| Ok(())).map_err(|e| anyhow!(e))?;
    Ok(ExitCode::SUCCESS)
}
