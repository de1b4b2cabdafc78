//! Watches the cryptographic devices behind wrapped dataset keys
//! (`vault::kek`): every `[keys] check_interval` each device is asked to
//! unwrap its key again. A device that stops answering raises an alert
//! (status, metrics, an ERROR in the log) while the daemon goes on with the
//! key it unwrapped at start; once that has lasted `[keys] device_grace`,
//! the datasets that use it are stopped (and with them the daemon:
//! systemd's restart then needs the device). Checks run on threads of
//! their own, so a device that hangs counts as one that does not answer; a
//! refused PIN is not tried again until its file changes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vault::kek::KekError;

use serde::{Deserialize, Serialize};

use crate::config::Config;

/// What `status.json` says about a dataset's key device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyDeviceStatus {
    /// e.g. "token `triad` of PKCS#11 module /usr/lib/softhsm/libsofthsm2.so".
    pub device: String,
    /// The KEK's label.
    pub kek: String,
    pub reachable: bool,
    /// When the device last unwrapped the key (ns since the epoch).
    pub last_confirmed_ns: i64,
    /// Seconds since then while the device does not answer; 0 while it does.
    pub unreachable_seconds: f64,
    pub grace_seconds: f64,
    /// Why the last check failed.
    pub error: Option<String>,
}

struct Watched {
    key_file: PathBuf,
    /// The device's PIN file, as the key file named it at start.
    pin_file: PathBuf,
    /// The id of the key the dataset runs on: the device must keep giving
    /// that one.
    key_id: String,
    status: KeyDeviceStatus,
    confirmed: Instant,
    /// A check running on its own thread (a device may hang in any call),
    /// and when it began.
    checking: Option<(Instant, Receiver<Result<(), KekError>>)>,
    /// The PIN file as it was when the token refused its PIN: no login is
    /// tried again until it changes, since each refused login brings the
    /// token closer to locking the PIN for every application.
    pin_refused: Option<PinFileStamp>,
    /// Set once the grace ran out: the reason the dataset stops.
    expired: Option<String>,
}

type PinFileStamp = (Option<std::time::SystemTime>, u64);

fn stamp(path: &std::path::Path) -> PinFileStamp {
    std::fs::metadata(path)
        .map(|m| (m.modified().ok(), m.len()))
        .unwrap_or((None, 0))
}

/// A check that has not returned after this long counts as a device that
/// does not answer (it keeps running; no second one starts meanwhile).
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// The devices of this site's wrapped keys, by dataset.
#[derive(Clone, Default)]
pub struct KeyWatch {
    watched: Arc<Mutex<BTreeMap<String, Watched>>>,
}

impl KeyWatch {
    /// Starts watching the devices of every wrapped key in `cfg` (none:
    /// nothing runs). Called before the datasets open, which unwrap the
    /// keys through the device: each device starts as confirmed now, and
    /// a dataset that cannot get its key does not start at all.
    pub fn start(cfg: &Config, stop: Arc<AtomicBool>) -> KeyWatch {
        let (interval, grace) = cfg.key_device_timing();
        vault::kek::set_grace(grace);
        let mut watched = BTreeMap::new();
        for d in &cfg.dataset {
            let w = match vault::kek::read(&d.key_file) {
                Ok(w) => w,
                // Not a wrapped file (a plain key, or one whose error the
                // dataset's open reports).
                Err(_) => continue,
            };
            watched.insert(
                d.name.clone(),
                Watched {
                    key_file: d.key_file.clone(),
                    pin_file: w.device.pin_file.clone(),
                    key_id: w.key_id.clone(),
                    status: KeyDeviceStatus {
                        device: w.device.to_string(),
                        kek: w.kek.clone(),
                        reachable: true,
                        last_confirmed_ns: vault::dataset::now_ns(),
                        unreachable_seconds: 0.0,
                        grace_seconds: grace.as_secs_f64(),
                        error: None,
                    },
                    confirmed: Instant::now(),
                    checking: None,
                    pin_refused: None,
                    expired: None,
                },
            );
        }
        let kw = KeyWatch {
            watched: Arc::new(Mutex::new(watched)),
        };
        let any = kw.watched.lock().is_ok_and(|w| !w.is_empty());
        if any {
            let kw2 = kw.clone();
            let spawned = std::thread::Builder::new()
                .name("key-devices".into())
                .spawn(move || kw2.run(interval, grace, &stop));
            if let Err(e) = spawned {
                // Nothing would enforce the grace: stop at once instead.
                kw.expire_all(format!("cannot start the key device checks: {e}"));
            }
        }
        kw
    }

    fn expire_all(&self, why: String) {
        if let Ok(mut all) = self.watched.lock() {
            for x in all.values_mut() {
                x.expired = Some(why.clone());
            }
        }
    }

    fn run(&self, interval: Duration, grace: Duration, stop: &AtomicBool) {
        let mut next = Instant::now() + interval;
        while !stop.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(100));
            let due = Instant::now() >= next;
            if due {
                next = Instant::now() + interval;
            }
            let Ok(mut all) = self.watched.lock() else {
                self.expire_all("the key device checks failed".into());
                return;
            };
            for (name, x) in all.iter_mut().filter(|(_, x)| x.expired.is_none()) {
                x.poll(name, due, grace);
            }
        }
    }

    /// The device status of `dataset`'s key, when it is wrapped.
    pub fn status(&self, dataset: &str) -> Option<KeyDeviceStatus> {
        self.watched
            .lock()
            .ok()?
            .get(dataset)
            .map(|x| x.status.clone())
    }

    /// Why `dataset` must stop, once its device's grace ran out.
    pub fn expired(&self, dataset: &str) -> Option<String> {
        self.watched.lock().ok()?.get(dataset)?.expired.clone()
    }
}

impl Watched {
    /// Collects a finished check, starts one when due, and decides on the
    /// grace, however long the device takes to answer.
    fn poll(&mut self, name: &str, due: bool, grace: Duration) {
        if let Some((began, rx)) = &self.checking {
            match rx.try_recv() {
                Ok(r) => {
                    self.checking = None;
                    self.settle(name, r);
                }
                Err(TryRecvError::Empty) if began.elapsed() >= CHECK_TIMEOUT => {
                    self.status.reachable = false;
                    self.status.error = Some(format!(
                        "the device has not answered a check for {} s",
                        began.elapsed().as_secs()
                    ));
                }
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => self.checking = None,
            }
        } else if due {
            let pin_unchanged = self
                .pin_refused
                .as_ref()
                .is_some_and(|s| *s == stamp(&self.pin_file));
            if !pin_unchanged {
                self.pin_refused = None;
                let (tx, rx) = std::sync::mpsc::channel();
                let (file, key_id) = (self.key_file.clone(), self.key_id.clone());
                let spawned = std::thread::Builder::new()
                    .name("key-device-check".into())
                    .spawn(move || {
                        let r = vault::kek::confirm(&file, Some(&key_id)).map(|_| ());
                        let _ = tx.send(r);
                    });
                match spawned {
                    Ok(_) => self.checking = Some((Instant::now(), rx)),
                    Err(e) => self.settle(
                        name,
                        Err(KekError::File(
                            self.key_file.clone(),
                            format!("cannot check: {e}"),
                        )),
                    ),
                }
            }
        }
        if !self.status.reachable {
            let away = self.confirmed.elapsed();
            self.status.unreachable_seconds = away.as_secs_f64();
            if away >= grace {
                let why = format!(
                    "the key device has not given dataset {name}'s key for {}s, longer than [keys] device_grace ({}s): the dataset stops and its key is not unwrapped again without the device; with the device back, start the daemon again ({})",
                    away.as_secs(),
                    grace.as_secs(),
                    self.status.error.as_deref().unwrap_or("no answer")
                );
                vault::kek::forget(&self.key_file);
                tracing::error!(dataset = %name, "{why}");
                self.expired = Some(why);
            }
        }
    }

    fn settle(&mut self, name: &str, r: Result<(), KekError>) {
        match r {
            Ok(()) => {
                if !self.status.reachable {
                    tracing::warn!(dataset = %name, device = %self.status.device, "the key device answers again");
                }
                self.confirmed = Instant::now();
                self.status.reachable = true;
                self.status.last_confirmed_ns = vault::dataset::now_ns();
                self.status.unreachable_seconds = 0.0;
                self.status.error = None;
            }
            Err(e) => {
                if matches!(e, KekError::PinRefused { .. }) {
                    self.pin_refused = Some(stamp(&self.pin_file));
                }
                self.status.reachable = false;
                self.status.error = Some(e.to_string());
                tracing::error!(
                    dataset = %name,
                    error = %e,
                    unreachable_seconds = self.confirmed.elapsed().as_secs(),
                    "the key device does not give the dataset key: running on the key in memory until [keys] device_grace runs out"
                );
            }
        }
    }
}
