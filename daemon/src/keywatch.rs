//! Watches the cryptographic devices behind wrapped dataset keys
//! (`vault::kek`): every `[keys] check_interval` each device is asked to
//! unwrap its key again. A device that stops answering raises an alert
//! (status, metrics, an ERROR in the log) while the daemon goes on with the
//! key it unwrapped at start; once that has lasted `[keys] device_grace`,
//! the key is dropped from memory and the datasets that use it are stopped
//! (and with them the daemon: systemd's restart then needs the device).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    status: KeyDeviceStatus,
    confirmed: Instant,
    /// Set once the grace ran out: the reason the dataset stops.
    expired: Option<String>,
}

/// The devices of this site's wrapped keys, by dataset.
#[derive(Clone, Default)]
pub struct KeyWatch {
    watched: Arc<Mutex<BTreeMap<String, Watched>>>,
}

impl KeyWatch {
    /// Starts watching the devices of every wrapped key in `cfg` (none:
    /// nothing runs). The keys were unwrapped by the datasets' open just
    /// before, so each device starts as confirmed now.
    pub fn start(cfg: &Config, stop: Arc<AtomicBool>) -> KeyWatch {
        let (interval, grace) = cfg.key_device_timing();
        vault::kek::set_grace(grace);
        let mut watched = BTreeMap::new();
        for d in &cfg.dataset {
            let Ok(w) = vault::kek::read(&d.key_file) else {
                continue;
            };
            watched.insert(
                d.name.clone(),
                Watched {
                    key_file: d.key_file.clone(),
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
                tracing::error!(error = %e, "cannot start the key device checks");
            }
        }
        kw
    }

    fn run(&self, interval: Duration, grace: Duration, stop: &AtomicBool) {
        let mut next = Instant::now() + interval;
        while !stop.load(Ordering::Acquire) {
            if Instant::now() < next {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            next = Instant::now() + interval;
            let files: Vec<(String, PathBuf)> = self
                .watched
                .lock()
                .map(|w| {
                    w.iter()
                        .filter(|(_, x)| x.expired.is_none())
                        .map(|(n, x)| (n.clone(), x.key_file.clone()))
                        .collect()
                })
                .unwrap_or_default();
            for (name, file) in files {
                // The device is asked outside the lock: it may take long.
                let r = vault::kek::confirm(&file);
                let Ok(mut all) = self.watched.lock() else {
                    return;
                };
                let Some(x) = all.get_mut(&name) else {
                    continue;
                };
                match r {
                    Ok(_) => {
                        if !x.status.reachable {
                            tracing::warn!(dataset = %name, device = %x.status.device, "the key device answers again");
                        }
                        x.confirmed = Instant::now();
                        x.status.reachable = true;
                        x.status.last_confirmed_ns = vault::dataset::now_ns();
                        x.status.unreachable_seconds = 0.0;
                        x.status.error = None;
                    }
                    Err(e) => {
                        let away = x.confirmed.elapsed();
                        x.status.reachable = false;
                        x.status.unreachable_seconds = away.as_secs_f64();
                        x.status.error = Some(e.to_string());
                        if away >= grace {
                            let why = format!(
                                "the key device has not given dataset {name}'s key for {}s, longer than [keys] device_grace ({}s): the key is dropped from memory and the dataset stops; with the device back, start the daemon again ({e})",
                                away.as_secs(),
                                grace.as_secs()
                            );
                            vault::kek::forget(&file);
                            tracing::error!(dataset = %name, "{why}");
                            x.expired = Some(why);
                        } else {
                            tracing::error!(
                                dataset = %name,
                                error = %e,
                                unreachable_seconds = away.as_secs(),
                                grace_left_seconds = (grace - away).as_secs(),
                                "the key device does not answer: running on the key unwrapped at start until the grace runs out"
                            );
                        }
                    }
                }
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
