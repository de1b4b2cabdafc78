//! Leases: a restore, drill or archive scrub that reads an archive says so
//! in the store, and prune deletes nothing while such a reader is live.
//!
//! The protocol is the one restic's locks follow, with both sides writing
//! before they read, so that of two that start together at least one sees
//! the other (S3 reads after writes are consistent):
//! - a reader puts `<dataset>/leases/<random>`, then waits while
//!   `<dataset>/prune/running` is live;
//! - prune puts `<dataset>/prune/running`, then lists the leases, and when
//!   any is live deletes nothing (its report says which readers held it).
//!
//! Both objects are renewed every [`RENEW`] while their holder runs and
//! count as live for [`TTL`] after their last write, judged by the store's
//! clock alone (the time it gave the object its holder just wrote), so a
//! host whose clock is off cannot take a live lease for a dead one; a
//! reader or prune that died stops counting within [`TTL`], and a renewal
//! may stall for most of it.
//! They are plain JSON, not sealed: whoever can write the bucket can
//! already delete from it, and a forged lease only delays a prune.

use std::time::Duration;

use chrono::Utc;
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;

use crate::error::Result;
use crate::store::Store;

/// A lease or prune marker not written for this long is dead.
pub const TTL: Duration = Duration::from_secs(900);

/// How often a holder writes its object again.
pub const RENEW: Duration = Duration::from_secs(60);

/// Live leases a prune reads and names in its report; more are counted.
const READERS_NAMED: usize = 10;

/// The most a reader waits for a live prune to finish.
pub const WAIT_FOR_PRUNE: Duration = Duration::from_secs(3600);

pub fn leases_prefix(ds: &str) -> String {
    format!("{ds}/leases/")
}

pub fn prune_running_key(ds: &str) -> String {
    format!("{ds}/prune/running")
}

/// What a lease says about its holder (for the prune report and an
/// operator looking at the bucket).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Holder {
    /// "restore", "drill", "scrub", "prune".
    pub what: String,
    pub host: String,
    pub pid: u32,
    pub started: String,
}

impl Holder {
    pub fn here(what: &str) -> Holder {
        Holder {
            what: what.to_string(),
            host: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default(),
            pid: std::process::id(),
            started: Utc::now().to_rfc3339(),
        }
    }
}

/// Whether an object last written at `modified` still counts, `now`
/// being the store's time.
fn live(modified: chrono::DateTime<Utc>, now: chrono::DateTime<Utc>) -> bool {
    now.signed_duration_since(modified)
        .to_std()
        .unwrap_or_default()
        < TTL
}

/// The store's time now: when it says it wrote `key` (just written by the
/// caller), read from a listing of `prefix`. Falls back to this host's
/// clock if the listing does not show it.
fn store_now(rt: &Handle, store: &Store, prefix: &str, key: &str) -> Result<chrono::DateTime<Utc>> {
    Ok(rt
        .block_on(store.list(prefix))?
        .into_iter()
        .find(|l| l.key == key)
        .map_or_else(Utc::now, |l| l.modified))
}

/// An object in the store that says its holder is at work, written again
/// every [`RENEW`] by a thread of the scope it was taken in and deleted
/// when dropped.
pub struct Held<'scope> {
    stop: Option<crossbeam_channel::Sender<()>>,
    thread: Option<std::thread::ScopedJoinHandle<'scope, ()>>,
    rt: &'scope Handle,
    store: &'scope Store,
    key: String,
}

impl<'scope> Held<'scope> {
    /// Writes `key` with `holder` and keeps it written until dropped.
    fn take<'env>(
        scope: &'scope std::thread::Scope<'scope, 'env>,
        rt: &'scope Handle,
        store: &'scope Store,
        key: String,
        holder: &Holder,
    ) -> Result<Held<'scope>> {
        let body = serde_json::to_vec(holder).unwrap_or_default();
        rt.block_on(store.put(&key, body.clone()))?;
        let (tx, rx) = crossbeam_channel::bounded::<()>(0);
        let k = key.clone();
        let thread = scope.spawn(move || {
            while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = rx.recv_timeout(RENEW) {
                if let Err(e) = rt.block_on(store.put(&k, body.clone())) {
                    tracing::warn!(key = %k, error = %e, "could not renew a lease in the archive");
                }
            }
        });
        Ok(Held {
            stop: Some(tx),
            thread: Some(thread),
            rt,
            store,
            key,
        })
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Err(e) = self.rt.block_on(self.store.delete(&self.key)) {
            tracing::warn!(key = %self.key, error = %e, "could not remove a lease from the archive; it lapses by itself");
        }
    }
}

/// Takes a reader's lease on `ds`'s archive, then waits while a prune runs
/// (at most [`WAIT_FOR_PRUNE`]). A store that refuses the write (read-only
/// credentials) gives `Ok(None)` and a warning: the read goes on without
/// protection, as it did before leases existed.
pub fn take_reader<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    rt: &'scope Handle,
    store: &'scope Store,
    ds: &str,
    what: &str,
    warnings: &mut Vec<String>,
) -> Result<Option<Held<'scope>>> {
    let key = format!("{}{:016x}", leases_prefix(ds), rand::random::<u64>());
    let held = match Held::take(scope, rt, store, key.clone(), &Holder::here(what)) {
        Ok(h) => Some(h),
        Err(e) => {
            warnings.push(format!(
                "could not write a lease into the archive ({e}); a prune starting meanwhile could delete what this {what} reads"
            ));
            None
        }
    };
    let started = std::time::Instant::now();
    let mut said = false;
    loop {
        // Listed, not read: the listing gives the store's own time of the
        // last write, compared with the store's time of our own lease.
        let now = match &held {
            Some(_) => store_now(rt, store, &leases_prefix(ds), &key)?,
            None => Utc::now(),
        };
        let running = rt
            .block_on(store.list(&format!("{ds}/prune/")))?
            .into_iter()
            .any(|l| l.key == prune_running_key(ds) && live(l.modified, now));
        if !running {
            return Ok(held);
        }
        if started.elapsed() > WAIT_FOR_PRUNE {
            warnings.push(format!(
                "a prune of this archive has been running for over {} min; this {what} went on beside it",
                WAIT_FOR_PRUNE.as_secs() / 60
            ));
            return Ok(held);
        }
        if !said {
            tracing::info!(dataset = ds, "waiting for a prune of the archive to finish");
            said = true;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Marks a prune of `ds` as running, then returns the live readers'
/// leases: when there are any, the prune must delete nothing (and drops
/// the marker on return).
pub fn take_prune<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    rt: &'scope Handle,
    store: &'scope Store,
    ds: &str,
) -> Result<(Held<'scope>, Vec<Holder>)> {
    let held = Held::take(
        scope,
        rt,
        store,
        prune_running_key(ds),
        &Holder::here("prune"),
    )?;
    let now = store_now(rt, store, &format!("{ds}/prune/"), &prune_running_key(ds))?;
    let mut readers = Vec::new();
    let mut more = 0usize;
    for l in rt.block_on(store.list(&leases_prefix(ds)))? {
        if !live(l.modified, now) {
            // A reader that died: its lease is removed.
            let _ = rt.block_on(store.delete(&l.key));
            continue;
        }
        // Whoever can write the bucket can write a million leases: a few
        // are read for the report, the rest only counted.
        if readers.len() >= READERS_NAMED {
            more += 1;
            continue;
        }
        let holder = rt
            .block_on(store.get(&l.key, 4096))
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice::<Holder>(&b).ok())
            .unwrap_or(Holder {
                what: format!("unreadable lease {}", l.key),
                host: String::new(),
                pid: 0,
                started: String::new(),
            });
        readers.push(holder);
    }
    if more > 0 {
        readers.push(Holder {
            what: format!("{more} more leases"),
            host: String::new(),
            pid: 0,
            started: String::new(),
        });
    }
    Ok((held, readers))
}
