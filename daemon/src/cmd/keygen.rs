//! `triad keygen`: create a dataset key file, or with `--sm2` a site's
//! evidence signing key pair (vault/src/signing.rs).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use vault::signing::EvidenceSigner;
use vault::DatasetKey;

#[derive(clap::Args)]
pub struct Args {
    /// Where to write the key; an existing file is never replaced.
    #[arg(long)]
    out: PathBuf,
    /// Make an SM2 key pair for signing drill reports and archive heads
    /// ([evidence] signing_key) instead of a dataset key.
    #[arg(long)]
    sm2: bool,
    /// With --sm2: where the public key goes (default `<out>.pub`); give
    /// it to the auditors who check the reports with `triad verify-report`.
    #[arg(long, requires = "sm2")]
    public: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<ExitCode> {
    if a.sm2 {
        let public = a.public.clone().unwrap_or_else(|| {
            let mut s = a.out.clone().into_os_string();
            s.push(".pub");
            PathBuf::from(s)
        });
        let signer = EvidenceSigner::generate(&a.out, &public)
            .with_context(|| format!("writing the SM2 key pair {}", a.out.display()))?;
        println!(
            "wrote SM2 signing key {} (mode 0600) and public key {}\nfingerprint {}\nset [evidence] signing_key to the first; give auditors the second and the fingerprint",
            a.out.display(),
            public.display(),
            signer.fingerprint()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let key = DatasetKey::generate();
    key.write_new(&a.out)
        .with_context(|| format!("writing key file {}", a.out.display()))?;
    println!(
        "wrote dataset key {} (key id {}, mode 0600)\nkeep a copy offline: without it no site and no archive can be read",
        a.out.display(),
        key.key_id()
    );
    Ok(ExitCode::SUCCESS)
}
