//! Cross-site verify (every configured site's checkpoints compared over the
//! replication port; verifier/src/cross.rs), and a scrub of this site's
//! copy followed by repair and a record of the outcome, under one rule for
//! what counts as clean. `triad verify` and the daemon's schedule both run
//! these.

use anyhow::{anyhow, Context, Result};
use vault::{Dataset, DatasetKey, View};

use verifier::cross::SiteView;

use super::repair::RepairReport;
use crate::config::Config;

/// How a scrub may repair what it finds.
pub enum Repair<'a> {
    /// Report only.
    No,
    /// Through the dataset the caller holds open (the daemon's own).
    With(&'a Dataset),
    /// Open the dataset for the repair: the daemon must be stopped.
    Open,
}

/// A scrub of this site's copy and what repair made of it.
pub struct ScrubOutcome {
    pub scrub: verifier::scrub::LocalScrub,
    pub repaired: Option<RepairReport>,
}

impl ScrubOutcome {
    /// Damaged chunks left: what repair could not mend, or all it found.
    pub fn damaged(&self) -> u64 {
        match &self.repaired {
            Some(r) => r.failed.len() as u64,
            None => self.scrub.bad.len() as u64,
        }
    }

    pub fn digest_ok(&self) -> bool {
        self.scrub.running_digest == self.scrub.recomputed_digest
    }

    /// The one rule: clean when no damage is left and the namespace
    /// recomputes to the running digest (repair cannot mend a digest).
    pub fn ok(&self) -> bool {
        self.damaged() == 0 && self.digest_ok()
    }
}

/// Scrubs this site's copy of `name` (at most `rate` bytes a second),
/// repairs what it found as `repair` allows, and records the outcome in
/// `<dataset>/last-scrub.json` for monitoring and the other sites.
pub fn scrub_and_repair(
    cfg: &Config,
    name: &str,
    key: &DatasetKey,
    rate: Option<u64>,
    repair: Repair<'_>,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<ScrubOutcome> {
    let view = View::open(&cfg.dataset_dir(name), name, key)
        .with_context(|| format!("opening dataset `{name}`"))?;
    let scrub = verifier::scrub::local(name, &view, rate, progress)?;
    // The view is closed before a repair opens the dataset for writing.
    drop(view);
    let ids: Vec<String> = scrub.bad.iter().map(|b| b.id.clone()).collect();
    let repaired = match repair {
        _ if ids.is_empty() => None,
        Repair::No => None,
        Repair::With(ds) => Some(super::repair::with_dataset(cfg, name, key, ds, &ids)?),
        Repair::Open => Some(super::repair::local(cfg, name, key, &ids)?),
    };
    let out = ScrubOutcome { scrub, repaired };
    record_scrub(cfg, name, &out);
    Ok(out)
}

/// Gathers every configured site's checkpoints (this site's from its own
/// copy, the others' over the replication port) and compares them; when one
/// site is the odd one out, fetches its namespace and a majority site's to
/// name the paths that differ.
/// Also records the outcome in `<dataset>/last-verify.json`, where the
/// daemon picks it up for status and metrics (a verify run by hand counts,
/// and the last result survives a restart).
pub fn cross_site(
    cfg: &Config,
    name: &str,
    key: &DatasetKey,
) -> Result<verifier::cross::CrossReport> {
    let r = compare_sites(cfg, name, key)?;
    let record = serde_json::json!({
        "time_ns": vault::dataset::now_ns(),
        "agree": r.agree,
        "disagree": r.disagree,
        "verdict": r.verdict,
    });
    let dir = cfg.dataset_dir(name);
    if dir.is_dir() {
        if let Err(e) =
            vault::fs::write_replace(&dir.join(LAST_VERIFY), record.to_string().as_bytes(), false)
        {
            tracing::warn!(dataset = name, error = %e, "cannot record the verify result");
        }
    }
    Ok(r)
}

/// Where the last cross-site verify's outcome is kept, in the dataset dir.
pub const LAST_VERIFY: &str = "last-verify.json";

fn compare_sites(
    cfg: &Config,
    name: &str,
    key: &DatasetKey,
) -> Result<verifier::cross::CrossReport> {
    let files = cfg.tls_files().ok_or_else(|| {
        anyhow!("cross-site verify connects to the other sites: the config needs [tls]")
    })?;
    let ask = Asker {
        cfg,
        name,
        key,
        files,
        rt: super::runtime()?,
        view: std::cell::OnceCell::new(),
    };
    let mut sites = ask.all_sites()?;
    let first = verifier::cross::compare(name, &sites);
    let Some(odd) = first.odd_site.clone() else {
        return Ok(first);
    };
    ask.name_paths(&mut sites, &odd, first.compared_seq.unwrap_or(0))?;
    Ok(verifier::cross::compare(name, &sites))
}

/// Asks the sites of one dataset for their checkpoints and paths.
struct Asker<'a> {
    cfg: &'a Config,
    name: &'a str,
    key: &'a DatasetKey,
    files: replicator::tls::TlsFiles,
    rt: tokio::runtime::Runtime,
    /// This site's copy on disk, opened only when its daemon does not answer.
    view: std::cell::OnceCell<View>,
}

impl Asker<'_> {
    fn open_view(&self) -> Result<&View> {
        if let Some(v) = self.view.get() {
            return Ok(v);
        }
        let v = View::open(&self.cfg.dataset_dir(self.name), self.name, self.key)
            .with_context(|| format!("opening dataset `{}`", self.name))?;
        Ok(self.view.get_or_init(|| v))
    }

    fn local_paths(&self) -> Result<verifier::cross::PathDigests> {
        let view = self.open_view()?;
        let paths = view
            .entries()?
            .into_iter()
            .map(|(p, e)| {
                let d = blake3::hash(&e.digest_bytes(&p)).as_bytes().to_vec();
                (p, d)
            })
            .collect();
        Ok((view.applied().seq, paths))
    }

    fn fetch(
        &self,
        p: &crate::config::Peer,
        with_paths: bool,
    ) -> std::result::Result<replicator::pb::CheckpointsReply, replicator::CallError> {
        let addr = replicator::follower::UpstreamAddr {
            name: p.name.clone(),
            address: p.address.clone(),
            tls: self.files.clone(),
        };
        self.rt.block_on(replicator::follower::fetch_checkpoints(
            &addr,
            self.name,
            &self.key.key_id(),
            with_paths,
        ))
    }

    /// This site's own daemon, as a peer, when it serves the replication
    /// port (it knows checkpoints not yet flushed).
    fn own(&self) -> Option<crate::config::Peer> {
        let cfg = self.cfg;
        cfg.listen
            .as_ref()
            .and_then(|l| l.replication.as_deref())
            .map(|a| crate::config::Peer {
                name: cfg.site.name.clone(),
                address: a.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]"),
                mode: None,
                on_unreachable: None,
                wait_limit: None,
                bandwidth: None,
            })
    }

    /// A site's answer as the comparison takes it. Every checkpoint must
    /// carry evidence that verifies under the key: a site that sends one
    /// that does not is lying or damaged, and its answer is not compared.
    fn view_of(&self, site: &str, r: replicator::pb::CheckpointsReply) -> SiteView {
        let to32 = |b: &[u8]| -> [u8; 32] { b.try_into().unwrap_or([0; 32]) };
        let keys = self.key.derive();
        let forged = r.checkpoints.iter().find_map(|c| {
            let cp = vault::state::Checkpoint {
                seq: c.seq,
                hash: to32(&c.hash),
                digest: to32(&c.digest),
                hmac_sm3: to32(&c.hmac_sm3),
            };
            (!cp.verify(&keys)).then_some(c.seq)
        });
        let epochs: Vec<(u64, u64)> = r.epochs.iter().map(|e| (e.epoch, e.start)).collect();
        // An epoch claimed without the key's evidence could make the other
        // sites look stale: such an answer is not compared either.
        // A reply with neither (an older triad) is taken as saying nothing
        // of its epochs, and compared only below the newest epoch's start.
        let forged_epochs = !(epochs.is_empty() && r.epochs_hmac_sm3.is_empty())
            && vault::Fence::evidence(&keys, &epochs)[..] != r.epochs_hmac_sm3[..];
        SiteView {
            site: site.to_string(),
            head_seq: r.head_seq,
            error: match (forged, forged_epochs) {
                (Some(seq), _) => Some(format!(
                    "its checkpoint at seq {seq} carries HMAC-SM3 evidence that does not verify under \
                     this dataset's key: forged or damaged (or sent by a triad older than 0.2)"
                )),
                (None, true) => Some(
                    "the epochs it reports carry HMAC-SM3 evidence that does not verify under this \
                     dataset's key: forged or damaged"
                        .to_string(),
                ),
                (None, false) => None,
            },
            epochs,
            checkpoints: r
                .checkpoints
                .iter()
                .map(|c| (c.seq, (to32(&c.hash), to32(&c.digest))))
                .collect(),
            paths: None,
            scrub: (r.scrub_time_ns > 0).then_some((
                r.scrub_time_ns,
                r.scrub_damaged,
                r.scrub_digest_ok,
            )),
        }
    }

    /// Every configured site's checkpoints: this site's from its daemon or
    /// else its copy on disk, the others' over the replication port.
    fn all_sites(&self) -> Result<Vec<SiteView>> {
        let cfg = self.cfg;
        let own_reply = self.own().and_then(|p| self.fetch(&p, false).ok());
        let mut sites = vec![match own_reply {
            Some(r) => self.view_of(&cfg.site.name, r),
            None => {
                let view = self.open_view()?;
                SiteView {
                    site: cfg.site.name.clone(),
                    head_seq: view.applied().seq,
                    checkpoints: view
                        .state()
                        .checkpoints()?
                        .into_iter()
                        .map(|c| (c.seq, (c.hash, c.digest)))
                        .collect(),
                    paths: None,
                    scrub: replicator::upstream::read_last_scrub(&cfg.dataset_dir(self.name)),
                    // Read from disk without the daemon, the epochs are not
                    // known here (the takeover layer holds them).
                    epochs: Vec::new(),
                    error: None,
                }
            }
        }];
        for p in &cfg.peer {
            sites.push(match self.fetch(p, false) {
                Ok(r) => self.view_of(&p.name, r),
                Err(e) => SiteView {
                    site: p.name.clone(),
                    error: Some(e.to_string()),
                    ..SiteView::default()
                },
            });
        }
        Ok(sites)
    }

    /// Fetches the namespaces of the odd site and of a majority site, so
    /// the comparison can name the paths that differ.
    fn name_paths(&self, sites: &mut [SiteView], odd: &str, seq: u64) -> Result<()> {
        let cfg = self.cfg;
        let odd_hash = sites
            .iter()
            .find(|s| s.site == odd)
            .and_then(|s| s.checkpoints.get(&seq).copied());
        let good = sites
            .iter()
            .find(|s| s.error.is_none() && s.checkpoints.get(&seq).copied() != odd_hash)
            .map(|s| s.site.clone());
        let own = self.own();
        for who in [Some(odd.to_string()), good].into_iter().flatten() {
            let remote = if who == cfg.site.name {
                own.as_ref()
            } else {
                cfg.peer.iter().find(|p| p.name == who)
            };
            let paths = if remote.is_none() && who == cfg.site.name {
                self.local_paths()?
            } else {
                let Some(p) = remote else {
                    continue;
                };
                match self.fetch(p, true) {
                    Ok(r) => (
                        r.paths_seq,
                        r.paths.into_iter().map(|d| (d.path, d.digest)).collect(),
                    ),
                    Err(_) => continue,
                }
            };
            if let Some(s) = sites.iter_mut().find(|s| s.site == who) {
                s.paths = Some(paths);
            }
        }
        Ok(())
    }
}

/// Updates `<dataset>/last-scrub.json`, where the daemon serves it to
/// cross-site verify at the other sites; the keys `f` does not set stay.
fn update_last_scrub(cfg: &Config, name: &str, f: impl FnOnce(&mut serde_json::Value)) {
    let path = cfg.dataset_dir(name).join(replicator::upstream::LAST_SCRUB);
    let mut last: serde_json::Value = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| serde_json::json!({}));
    f(&mut last);
    if last.get("time_ns").is_none() {
        last["time_ns"] = vault::dataset::now_ns().into();
    }
    if let Err(e) = std::fs::write(&path, last.to_string()) {
        tracing::warn!(path = %path.display(), error = %e, "cannot record the scrub result");
    }
}

/// Records a scrub of this site's copy.
fn record_scrub(cfg: &Config, name: &str, out: &ScrubOutcome) {
    update_last_scrub(cfg, name, |last| {
        last["time_ns"] = vault::dataset::now_ns().into();
        last["seq"] = out.scrub.seq.into();
        last["chunks"] = out.scrub.chunks.into();
        last["damaged"] = out.damaged().into();
        last["digest_ok"] = out.digest_ok().into();
    });
}

/// Records what an archive scrub left damaged.
pub fn record_archive_scrub(cfg: &Config, name: &str, damaged: usize) {
    update_last_scrub(cfg, name, |last| {
        last["archive_time_ns"] = vault::dataset::now_ns().into();
        last["archive_damaged"] = damaged.into();
    });
}
