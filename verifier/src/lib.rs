//! Proving the copies: restore drills and their reports.
//!
//! - [`drill`]: restore a site's archive into a scratch directory, verify
//!   it, measure RTO and RPO, and write a JSON and a Markdown report.
//! - [`scrub`]: re-read every chunk of a site's copy or of its archive and
//!   check it; recompute the namespace digest.
//!
//! - [`cross`]: comparing the sites' checkpoints and naming the odd one out.
//!
//! Repairs, which write to a site's copy or its archive, are the daemon's
//! (daemon/src/cmd/repair.rs): this crate finds and reports.

pub mod cross;
pub mod drill;
pub mod scrub;

pub use drill::{DrillReport, DrillSpec, Reference};
