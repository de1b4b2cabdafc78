//! `triad resync`: make this site's copy of a dataset follow its upstream
//! afresh, after cross-site verify named it the odd one out (or it reported
//! DIVERGED). The copy is not deleted: the dataset directory is moved aside
//! whole, as evidence, and the next start of the daemon fetches the dataset
//! again from the upstream (a state transfer, then the log).

use std::process::ExitCode;

use anyhow::{bail, Context, Result};

use crate::config::{Config, Role};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    cfg: crate::cmd::ConfigPath,
    /// The dataset to fetch again.
    #[arg(long)]
    dataset: String,
}

pub fn run(a: Args) -> Result<ExitCode> {
    let cfg = Config::load(&a.cfg.config)?;
    cfg.dataset(&a.dataset).with_context(|| {
        format!(
            "dataset `{}` is not in {}",
            a.dataset,
            a.cfg.config.display()
        )
    })?;
    if cfg.site.role != Role::Follower {
        bail!(
            "site {} is the primary: it has no upstream to fetch from; restore it from a \
             follower's copy or an archive instead",
            cfg.site.name
        );
    }
    let dir = cfg.dataset_dir(&a.dataset);
    // Taking the dataset's lock proves no daemon holds it.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("LOCK"))
        .with_context(|| format!("opening {}", dir.join("LOCK").display()))?;
    if lock.try_lock().is_err() {
        bail!(
            "dataset `{}` is open in a running daemon: stop it first",
            a.dataset
        );
    }
    drop(lock);
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
    let aside = dir.with_file_name(format!("{}.replaced-{stamp}", a.dataset));
    std::fs::rename(&dir, &aside)
        .with_context(|| format!("moving {} to {}", dir.display(), aside.display()))?;
    println!(
        "dataset {}: this site's copy is kept in {} as evidence; start the daemon and it fetches \
         the dataset again from its upstream {}",
        a.dataset,
        aside.display(),
        cfg.site.upstream.as_deref().unwrap_or("?")
    );
    Ok(ExitCode::SUCCESS)
}
