//! Object-store snapshots, log archiving, retention, prune and restore
//! planning.
//!
//! Not built yet: this version keeps a site's copy on local disk only. The
//! crate exists so the workspace has its final shape; see
//! docs/architecture.md for the plan.
