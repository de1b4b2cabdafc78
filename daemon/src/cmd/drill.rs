//! `triad drill`: restore a dataset from an archive into a scratch
//! directory, verify it, measure RTO and RPO, and write the reports an
//! auditor reads; or, with `--switchover`, a planned switchover of a
//! takeover group and back (cmd/promote.rs). The drill is built in ops/drill.rs, as the daemon's
//! scheduled one is. Exits 1 when a drill fails.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Result};
use vault::DatasetKey;

use crate::ops::drill;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: crate::cmd::Datasets,
    /// The archive to restore (s3://bucket/prefix or file:///dir); default
    /// this site's [archive]. Another site's archive takes its URL here and
    /// its endpoint and credentials from --endpoint / --credentials-file.
    #[arg(long)]
    from_archive: Option<String>,
    #[arg(long)]
    endpoint: Option<String>,
    #[arg(long)]
    credentials_file: Option<PathBuf>,
    /// `latest`, a seq, or an RFC 3339 time.
    #[arg(long, default_value = "latest")]
    at: String,
    /// Where the reports go; default [drill] reports_dir, else <data_dir>/reports.
    #[arg(long)]
    reports: Option<PathBuf>,
    /// Where the scratch directory is made; default <data_dir>.
    #[arg(long)]
    scratch: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Fail the drill unless the archive reaches at least this seq (another
    /// site's head): the check that catches a store rolled back. A drill of
    /// this site's own archive expects at least what this site shipped.
    #[arg(long)]
    expect_seq: Option<u64>,
    /// Instead of a restore: a planned switchover of a takeover group to
    /// this site (a follower) and back, with each leg's RTO and RPO.
    #[arg(long, conflicts_with_all = ["from_archive", "at", "expect_seq"])]
    switchover: bool,
}

pub fn run(a: Args) -> Result<ExitCode> {
    let (cfg, names) = a.target.load()?;
    if a.switchover {
        let signer = cfg.evidence_signer()?;
        let reports = a.reports.clone().unwrap_or_else(|| cfg.reports_dir());
        return crate::cmd::promote::switchover_drill(&cfg, &reports, a.json, signer.as_ref());
    }
    let at: archive::At = a.at.parse().map_err(|e: String| anyhow!(e))?;
    let store = drill::store(
        &cfg,
        a.from_archive.as_deref(),
        a.endpoint.clone(),
        a.credentials_file.clone(),
    )
    .map_err(|e| anyhow!("{}: {e}", a.target.cfg.config.display()))?;
    let reports = a.reports.clone().unwrap_or_else(|| cfg.reports_dir());
    let scratch = a
        .scratch
        .clone()
        .unwrap_or_else(|| cfg.site.data_dir.clone());
    let rt = crate::ops::runtime()?;
    // Loaded before any restore: a key that cannot sign fails the command
    // at once, not after an hour's drill.
    let signer = cfg.evidence_signer()?;
    let mut all_passed = true;
    for name in names {
        let d = cfg
            .dataset(&name)
            .ok_or_else(|| anyhow!("dataset `{name}` is not in the config"))?;
        let key = DatasetKey::load(&d.key_file)?;
        let own_archive = a.from_archive.is_none();
        let checkpoints = drill::site_checkpoints(&cfg, &name, &key);
        let mut spec = drill::spec(
            &cfg,
            &name,
            &key,
            store.clone(),
            own_archive,
            checkpoints,
            signer.as_ref(),
        );
        spec.at = at;
        spec.at_text = a.at.clone();
        spec.scratch_parent = scratch.clone();
        spec.reports_dir = reports.clone();
        spec.expect_seq = a.expect_seq.or(spec.expect_seq);
        let (report, json_path, md_path) = drill::run(&spec, &rt, signer.as_ref())?;
        all_passed &= report.passed();
        if a.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            println!(
                "drill of dataset {name} from {}: {} — seq {} restored, {} files, {} bytes; RTO {:.1} s; RPO {}",
                report.archive,
                report.result.to_uppercase(),
                report.restored_seq,
                report.files,
                report.bytes,
                report.rto_seconds,
                report
                    .rpo_seconds
                    .map(|r| format!("{r:.1} s"))
                    .unwrap_or_else(|| "not measured".into())
            );
            if let Some(e) = &report.error {
                println!("  why: {e}");
            }
            println!(
                "  reports: {} and {}",
                json_path.display(),
                md_path.display()
            );
            if let Some(s) = &signer {
                println!(
                    "  signed with SM2 key {} (.sig beside each; check with `triad verify-report`)",
                    s.fingerprint()
                );
            }
        }
    }
    Ok(if all_passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
