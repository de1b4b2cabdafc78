//! systemd's notify protocol, for `Type=notify` units: `READY=1` once every
//! dataset's log is open and the listeners are bound, `STATUS=` lines with
//! head seq and lag, `WATCHDOG=1` pings while the main loop runs (when the
//! unit sets `WatchdogSec`), `RELOADING=1` around a SIGHUP reload and
//! `STOPPING=1` at a stop. Outside systemd (no `NOTIFY_SOCKET`) every call
//! does nothing.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;

pub struct Notifier {
    enabled: bool,
    /// Half the unit's watchdog period: pings go at least this often.
    ping_every: Option<Duration>,
    last_ping: Instant,
    last_status: String,
    last_status_at: Option<Instant>,
}

/// The watchdog period systemd asks for, as libsystemd's
/// sd_watchdog_enabled reads it: `WATCHDOG_USEC`, for this process unless
/// `WATCHDOG_PID` names another. (The sd-notify crate's own check also
/// requires `WATCHDOG_PID` to be set, which systemd does but not every
/// supervisor.)
fn watchdog_usec() -> Option<u64> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    (usec > 0).then_some(usec)
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` and `WATCHDOG_USEC` (`WATCHDOG_PID` must be
    /// this process when set). The variables are left in place; triad
    /// starts no child that could misuse them.
    pub fn from_env() -> Notifier {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        let ping_every = enabled
            .then(watchdog_usec)
            .flatten()
            .map(|usec| Duration::from_micros(usec / 2));
        if let Some(p) = ping_every {
            tracing::info!(period = ?p * 2, "systemd watchdog enabled");
        }
        Notifier {
            enabled,
            ping_every,
            last_ping: Instant::now(),
            last_status: String::new(),
            last_status_at: None,
        }
    }

    fn send(&self, states: &[NotifyState]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(false, states) {
            tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
        }
    }

    pub fn ready(&mut self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
        self.last_status = status.to_string();
        self.last_status_at = Some(Instant::now());
    }

    pub fn reloading(&self) {
        self.send(&[NotifyState::Reloading]);
    }

    pub fn stopping(&self, status: &str) {
        self.send(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }

    /// Called from the main loop every round: sends the status line when it
    /// changed (at most once a second) and pings the watchdog when due. A
    /// main loop that stops turning stops the pings, and systemd restarts
    /// the daemon.
    pub fn tick(&mut self, status: &str) {
        let now = Instant::now();
        if status != self.last_status
            && self
                .last_status_at
                .is_none_or(|t| now - t >= Duration::from_secs(1))
        {
            self.send(&[NotifyState::Status(status)]);
            self.last_status = status.to_string();
            self.last_status_at = Some(now);
        }
        if let Some(every) = self.ping_every {
            if now - self.last_ping >= every {
                self.send(&[NotifyState::Watchdog]);
                self.last_ping = now;
            }
        }
    }
}
