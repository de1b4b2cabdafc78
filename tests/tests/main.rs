//! triad's end-to-end tests: one test binary with a module per topic, so
//! the suite links RocksDB and the harness once instead of once per topic.
//! Each test starts the real `triad` binary and the real parts around it
//! (s3s-fs, moto, PostgreSQL, TLS between sites, a cutting proxy).
//!
//! Run one topic with `cargo test -p triad-tests --test e2e replication::`.

mod common;

mod archive;
mod crash;
mod directory;
mod drill;
mod evidence;
mod faults;
mod fidelity;
mod fuzz;
mod hostile;
mod hsm;
mod object_lock;
mod postgres;
mod pushed;
mod replication;
mod scrub;
mod security;
mod service;
mod standby;
mod takeover;
mod verify;
