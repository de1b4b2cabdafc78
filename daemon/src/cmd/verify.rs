//! `triad verify --scrub [--archive]`: re-read and check every chunk of this
//! site's copy (and of its archive), and recompute the namespace digest
//! (verifier/src/scrub.rs). Exits 1 when anything is wrong. Cross-site
//! verify is not built yet.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use vault::{DatasetKey, View};

use crate::config::Config;

#[derive(clap::Args)]
pub struct Args {
    #[arg(
        long,
        short,
        env = "TRIAD_CONFIG",
        default_value = "/etc/triad/triad.toml"
    )]
    config: PathBuf,
    /// The dataset; all of the config's datasets when absent.
    #[arg(long)]
    dataset: Option<String>,
    /// Re-read every chunk of this site's copy and recompute the digest.
    #[arg(long)]
    scrub: bool,
    /// Also scrub this site's archive: every chunk that kept snapshots and
    /// log pieces reference must be in the store.
    #[arg(long)]
    archive: bool,
    /// With --archive: read every referenced chunk and check its bytes.
    #[arg(long)]
    read_data: bool,
    /// With --archive: read about this percentage of the chunks (0-100).
    #[arg(long, conflicts_with = "read_data")]
    read_data_subset: Option<f64>,
    /// Most bytes a second the local scrub reads, so replication keeps its
    /// share of disk and CPU ("0" for no limit).
    #[arg(long, default_value = "100MiB/s")]
    max_rate: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<ExitCode> {
    if !a.scrub && !a.archive {
        bail!(
            "cross-site verify is not built yet; `triad verify --scrub` checks this site's copy \
             and `--archive` its object store"
        );
    }
    let cfg = Config::load(&a.config)?;
    let rate = match a.max_rate.trim() {
        "0" => 0,
        r => crate::config::parse_bandwidth(r).map_err(|e| anyhow!("--max-rate: {e}"))?,
    };
    let names: Vec<String> = match &a.dataset {
        Some(d) => {
            cfg.dataset(d)
                .with_context(|| format!("dataset `{d}` is not in {}", a.config.display()))?;
            vec![d.clone()]
        }
        None => cfg.dataset.iter().map(|d| d.name.clone()).collect(),
    };
    let mut ok = true;
    for name in names {
        let d = cfg
            .dataset(&name)
            .ok_or_else(|| anyhow!("dataset `{name}` is not in the config"))?;
        let key = DatasetKey::load(&d.key_file)?;
        if a.scrub {
            let view = View::open(&cfg.dataset_dir(&name), &name, &key)
                .with_context(|| format!("opening dataset `{name}`"))?;
            let bar = ProgressBar::new(0);
            if std::io::stderr().is_terminal() && !a.json {
                bar.set_style(
                    ProgressStyle::with_template(
                        "{spinner} scrubbing [{bar:40}] {pos}/{len} chunks eta {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
            } else {
                bar.set_draw_target(ProgressDrawTarget::hidden());
            }
            let r = verifier::scrub::local(&name, &view, (rate > 0).then_some(rate), &|d, t| {
                bar.set_length(t);
                bar.set_position(d);
            })?;
            bar.finish_and_clear();
            ok &= r.ok();
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "scrub of dataset {name} at seq {}: {} chunks, {} bytes in {:.1}s ({:.1} MB/s): {}",
                    r.seq,
                    r.chunks,
                    r.bytes,
                    r.seconds,
                    r.mb_per_s,
                    if r.ok() { "OK" } else { "PROBLEMS FOUND" }
                );
                for b in &r.bad {
                    let users = if b.referenced_by.is_empty() {
                        "held by a pin of a file still being logged".to_string()
                    } else {
                        format!("in {}", b.referenced_by.join(", "))
                    };
                    println!("  BAD chunk {}: {} ({users})", b.id, b.reason);
                }
                if r.running_digest != r.recomputed_digest {
                    println!(
                        "  DIGEST MISMATCH: running {} but the namespace recomputes to {}",
                        r.running_digest, r.recomputed_digest
                    );
                }
            }
        }
        if a.archive {
            let settings = cfg
                .archive_settings()
                .map_err(|(f, m)| anyhow!("{}: {f}: {m}", a.config.display()))?
                .ok_or_else(|| anyhow!("{} has no [archive]", a.config.display()))?;
            // Like a restore, a scrub is the time to use the link fully.
            let mut store_cfg = settings.store.clone();
            store_cfg.concurrency = store_cfg.concurrency.max(32);
            let store = archive::Store::open(&store_cfg)?;
            let rt = crate::cmd::archive::runtime()?;
            let read = match (a.read_data, a.read_data_subset) {
                (true, _) => verifier::scrub::ReadData::All,
                (false, Some(p)) if (0.0..=100.0).contains(&p) => {
                    verifier::scrub::ReadData::Percent(p)
                }
                (false, Some(p)) => {
                    bail!("--read-data-subset {p}: give a percentage from 0 to 100")
                }
                (false, None) => verifier::scrub::ReadData::None,
            };
            let r = verifier::scrub::archive(rt.handle(), &store, &key.derive(), &name, read, 32)?;
            ok &= r.ok();
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "archive scrub of dataset {name} in {}: {} snapshots, {} log pieces, {} chunks referenced, {} listed, {} read ({} bytes, {:.1} MB/s) in {:.1}s: {}",
                    r.archive,
                    r.snapshots,
                    r.log_pieces,
                    r.chunks_referenced,
                    r.chunks_listed,
                    r.chunks_read,
                    r.bytes_read,
                    r.mb_per_s,
                    r.seconds,
                    if r.ok() { "OK" } else { "PROBLEMS FOUND" }
                );
                for b in &r.bad {
                    println!(
                        "  BAD {}{}: {} (referenced by {})",
                        if b.id.is_empty() { "object" } else { "chunk " },
                        b.id,
                        b.reason,
                        b.referenced_by.join(", ")
                    );
                }
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
