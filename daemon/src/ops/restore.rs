//! Restore from an archive alone, for `triad restore --from-archive` and
//! `triad get`: the store and key from the config when there is one, the
//! caller's overrides on top.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use vault::DatasetKey;

use crate::config::Config;

/// Where to restore from and to; `None` fields come from the config.
pub struct FromArchive {
    /// The site config; need not exist when `key_file` is given.
    pub config: PathBuf,
    pub dataset: String,
    pub to: PathBuf,
    /// s3://bucket/prefix or file:///dir.
    pub url: String,
    /// `latest`, a seq, or an RFC 3339 time.
    pub at: String,
    pub key_file: Option<PathBuf>,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub credentials_file: Option<PathBuf>,
    /// Chunk downloads in flight.
    pub concurrency: usize,
    /// Fail unless the archive reaches at least this seq.
    pub expect_seq: Option<u64>,
    /// Bring an existing tree at `to` to the restored state.
    pub delta: bool,
}

/// Checks that the archive is named as one triad can read.
pub fn check_url(from: &str) -> Result<()> {
    if !(from.starts_with("s3://") || from.starts_with("file:///")) {
        bail!("--from-archive `{from}` must be s3://bucket/prefix or file:///absolute/dir");
    }
    Ok(())
}

/// Restores `r.dataset` from `r.url` into `r.to`.
pub fn from_archive(
    r: &FromArchive,
    progress: &(dyn Fn(archive::Progress) + Sync),
) -> Result<archive::ArchiveRestore> {
    let at: archive::At = r.at.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    let (store, key, store_cfg) = open_archive(r)?;
    let rt = super::runtime()?;
    let restorer = archive::Restorer {
        rt: rt.handle(),
        store: &store,
        dataset: &r.dataset,
        key: &key,
        concurrency: store_cfg.concurrency,
        expect_seq: r.expect_seq,
        checkpoints: &[],
        delta: r.delta,
        head_signer: None,
    };
    restorer
        .restore(at, &r.to, progress)
        .with_context(|| format!("restoring dataset `{}` from {}", r.dataset, r.url))
}

/// The store and dataset key for reading the archive at `url`: from the
/// config when there is one, overridden by the flags.
pub fn open_archive(a: &FromArchive) -> Result<(archive::Store, DatasetKey, archive::StoreConfig)> {
    let url = a.url.as_str();
    check_url(url)?;
    // The config, when there is one, gives the key and the store settings.
    let cfg = if a.config.exists() {
        Some(Config::load(&a.config)?)
    } else {
        None
    };
    let key_file = match (&a.key_file, &cfg) {
        (Some(k), _) => k.clone(),
        (None, Some(c)) => c
            .dataset(&a.dataset)
            .with_context(|| {
                format!(
                    "dataset `{}` is not in {}; pass --key-file",
                    a.dataset,
                    a.config.display()
                )
            })?
            .key_file
            .clone(),
        (None, None) => bail!(
            "no config at {} and no --key-file: the dataset key is needed to read the archive",
            a.config.display()
        ),
    };
    let key = DatasetKey::load(&key_file)?;
    let mut store_cfg = match cfg.as_ref().map(|c| c.archive_settings()) {
        Some(Ok(Some(s))) => s.store,
        Some(Err((f, m))) => bail!("{}: {f}: {m}", a.config.display()),
        _ => archive::StoreConfig::new(url),
    };
    store_cfg.url = url.to_string();
    if a.endpoint.is_some() {
        store_cfg.endpoint = a.endpoint.clone();
    }
    if a.region.is_some() {
        store_cfg.region = a.region.clone();
    }
    if a.credentials_file.is_some() {
        store_cfg.credentials_file = a.credentials_file.clone();
    }
    store_cfg.concurrency = a.concurrency;
    let store = archive::Store::open(&store_cfg)?;
    Ok((store, key, store_cfg))
}
