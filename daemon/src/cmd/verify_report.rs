//! `triad verify-report`: what an auditor runs to check that a drill
//! report (or any file triad signs) is byte for byte what the site wrote.
//! Needs no config, no daemon and no dataset key: only the site's public
//! key (`triad keygen --sm2` wrote it). A file signed in a `<file>.sig`
//! beside it (drill reports) and an object that carries its signature at
//! its end (an archive's `HEAD`, downloaded from the bucket) both check.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use vault::signing::{signature_path, split_signed, EvidenceKey, MAX_SIGNATURE_LEN};

#[derive(clap::Args)]
pub struct Args {
    /// The site's SM2 public key (PEM).
    #[arg(long)]
    public_key: PathBuf,
    /// The signature, when it is not `<file>.sig` (only with one file).
    #[arg(long)]
    signature: Option<PathBuf>,
    /// The signed files.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

/// Reports larger than this are refused before they are read: a drill
/// report is a few kilobytes.
const MAX_REPORT: u64 = 64 << 20;

pub fn run(a: Args) -> Result<ExitCode> {
    if a.signature.is_some() && a.files.len() != 1 {
        anyhow::bail!("--signature names the signature of one file; give one file");
    }
    let key = EvidenceKey::load(&a.public_key)?;
    println!(
        "public key {} ({})",
        a.public_key.display(),
        key.fingerprint()
    );
    let mut all_good = true;
    for file in &a.files {
        let sig = a.signature.clone().unwrap_or_else(|| signature_path(file));
        // Without a `.sig` beside it, the file may carry its signature.
        let checked = if a.signature.is_none() && !sig.exists() {
            check_embedded(&key, file)
                .map(|said| format!("GOOD signature (carried in the object); it says: {said}"))
        } else {
            check(&key, file, &sig).map(|()| format!("GOOD signature ({})", sig.display()))
        };
        match checked {
            Ok(good) => println!("{}: {good}", file.display()),
            Err(e) => {
                all_good = false;
                println!("{}: REJECTED: {e:#}", file.display());
            }
        }
    }
    Ok(if all_good {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Checks an object that carries its signature (vault::signing's trailer)
/// and gives the plaintext statement it signs, which must be triad's.
fn check_embedded(key: &EvidenceKey, file: &std::path::Path) -> Result<String> {
    let message = read_bounded(file, MAX_REPORT)?;
    let parts = split_signed(&message).with_context(|| {
        format!(
            "no signature: neither {} nor a signature carried at the end of the file",
            signature_path(file).display()
        )
    })?;
    key.verify_object(&parts)?;
    let statement: serde_json::Value =
        serde_json::from_slice(parts.statement).context("the signed statement is not JSON")?;
    let kind = statement["kind"].as_str().unwrap_or_default();
    anyhow::ensure!(
        kind.starts_with("triad "),
        "the signed statement names no kind of triad object"
    );
    // Printed re-encoded: control characters in it reach the terminal escaped.
    Ok(statement.to_string())
}

fn read_bounded(file: &std::path::Path, limit: u64) -> Result<Vec<u8>> {
    vault::signing::read_regular(file, limit).with_context(|| format!("reading {}", file.display()))
}

fn check(key: &EvidenceKey, file: &std::path::Path, sig: &std::path::Path) -> Result<()> {
    let signature = read_bounded(sig, MAX_SIGNATURE_LEN as u64)
        .with_context(|| format!("no usable signature: {}", sig.display()))?;
    let message = read_bounded(file, MAX_REPORT)?;
    key.verify(&message, &signature)?;
    Ok(())
}
