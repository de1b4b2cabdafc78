//! Moving the change log between sites: the gRPC service over mutual TLS,
//! follower and upstream loops, the commit policy and state transfer.
//!
//! Not built yet: this version runs the primary site alone. The crate exists
//! so the workspace has its final shape; see docs/architecture.md for the plan.
