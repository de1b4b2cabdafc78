//! Cron schedules (with seconds, as the `cron` crate reads them) for
//! snapshots: when the next run is due.

use std::str::FromStr;

use chrono::{DateTime, Utc};

use crate::error::{ArchiveError, Result};

#[derive(Debug, Clone)]
pub struct Schedule {
    text: String,
    cron: cron::Schedule,
}

impl Schedule {
    pub fn parse(field: &str, text: &str) -> Result<Schedule> {
        let cron = cron::Schedule::from_str(text).map_err(|e| {
            ArchiveError::Config(format!(
                "{field} = {text:?}: {e}; expected a cron expression with seconds, such as \
                 \"0 0 * * * *\" (every hour) or \"0 30 2 * * *\" (02:30 daily, UTC)"
            ))
        })?;
        Ok(Schedule {
            text: text.to_string(),
            cron,
        })
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// The first run strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.after(&after).next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn schedules_parse_and_step() {
        let s = Schedule::parse("archive.snapshot_schedule", "0 0 * * * *").unwrap();
        let t = Utc.with_ymd_and_hms(2026, 11, 27, 10, 15, 0).unwrap();
        assert_eq!(
            s.next_after(t),
            Some(Utc.with_ymd_and_hms(2026, 11, 27, 11, 0, 0).unwrap())
        );
        let e = Schedule::parse("archive.snapshot_schedule", "every hour")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("archive.snapshot_schedule") && e.contains("cron"),
            "{e}"
        );
    }
}
