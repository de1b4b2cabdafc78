//! Cross-site comparison, scrubs, repair, drills and their reports.
//!
//! Not built yet beyond what the vault itself checks (record and chunk
//! integrity, digest recomputation). The crate exists so the workspace has its
//! final shape; see docs/architecture.md for the plan.
