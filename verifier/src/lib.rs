//! Proving the copies: restore drills and their reports.
//!
//! - [`drill`]: restore a site's archive into a scratch directory, verify
//!   it, measure RTO and RPO, and write a JSON and a Markdown report.
//!
//! Cross-site verify, scrub and repair are not built yet (docs/architecture.md).

pub mod drill;

pub use drill::{DrillReport, DrillSpec, Reference};
