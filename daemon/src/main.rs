//! `triad`: the disaster-recovery daemon and its command-line tools.
//!
//! This file only parses the command line and sets up logging; each
//! subcommand lives in its own file under `cmd/`.

mod archiving;
mod checks;
mod cmd;
mod config;
mod http;
mod ingest;
mod keywatch;
#[cfg(test)]
mod layers;
mod metrics;
mod ops;
mod pushed;
mod runtime;
mod service;
mod source;
mod standby;
mod status;
mod takeover;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "triad",
    version,
    about = "Disaster recovery for two sites, three centers"
)]
struct Cli {
    /// Log format: human or json (default: the config's [log] format, else human).
    #[arg(long, global = true, env = "TRIAD_LOG_FORMAT", value_enum)]
    log_format: Option<config::LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the site daemon.
    Daemon {
        #[command(flatten)]
        cfg: cmd::ConfigPath,
    },
    /// Create a new dataset key file (mode 0600), or with --sm2 a site's
    /// evidence signing key pair.
    Keygen(cmd::keygen::Args),
    /// Dataset keys wrapped by a key in a cryptographic device (PKCS#11).
    Key {
        #[command(subcommand)]
        command: cmd::key::KeyCommand,
    },
    /// Create a CA and a certificate for each site of a deployment.
    Certs {
        /// Directory to write ca.pem, ca.key and <site>.pem / <site>.key into.
        #[arg(long)]
        out: PathBuf,
        /// Site names, as in each site's [site] name (e.g. zjk-a zjk-b sjz-c).
        #[arg(required = true)]
        sites: Vec<String>,
    },
    /// Config file tools.
    Config {
        #[command(subcommand)]
        command: cmd::config::ConfigCommand,
    },
    /// Rebuild a dataset's tree from this site's copy or from an archive.
    Restore(cmd::restore::Args),
    /// Take a snapshot into this site's archive now.
    Snapshot(cmd::archive::Args),
    /// List the snapshots in this site's archive.
    Snapshots(cmd::archive::Args),
    /// Apply retention and delete what no kept snapshot needs.
    Prune(cmd::archive::Args),
    /// Bring back archive objects hidden by plain deletes (buckets with
    /// Object Lock, which keep every version).
    Undelete(cmd::archive::UndeleteArgs),
    /// Restore an archive into a scratch directory, verify it, report RTO and RPO.
    Drill(cmd::drill::Args),
    /// Compare the sites' copies; scrub (--scrub, --archive) and repair (--repair).
    Verify(cmd::verify::Args),
    /// Make this site the primary of its takeover group: a planned
    /// switchover when the primary answers, a failover when it does not.
    Promote(cmd::promote::Args),
    /// Move a follower's copy aside so the daemon fetches it again from its upstream.
    Resync(cmd::resync::Args),
    /// Show each dataset's log, state and source status.
    Status(cmd::status::Args),
    /// Store an object (a file, or stdin with `-`) in a pushed dataset; exits 0
    /// only once the commit policy holds. For a database's archive_command.
    ///
    /// Works at the primary only: a follower's datasets are filled by
    /// replication, and its daemon refuses puts.
    Put(cmd::push::PutArgs),
    /// Remove objects from a pushed dataset at the primary: named ones, or
    /// with --wal-before every WAL file before a segment (PostgreSQL's
    /// archive_cleanup_command). Followers and archives follow; space is
    /// freed at every copy, and in the archive once no kept snapshot
    /// names the objects.
    Forget(cmd::push::ForgetArgs),
    /// Fetch an object from the local daemon or an archive; exits 1 with
    /// nothing written when there is no such name, 255 when it could not
    /// fetch (so a restore_command stops recovery rather than end it).
    ///
    /// Works at every site: the primary, either follower (from its
    /// replicated copy), or with --from-archive from an archive alone.
    Get(cmd::push::GetArgs),
    /// Check the SM2 signature of a drill report or another signed file
    /// (`<file>.sig`) against a site's public key; exits 1 unless every
    /// file checks.
    VerifyReport(cmd::verify_report::Args),
    /// A one-site demonstration on this machine: watch, change, restore, compare.
    Demo(cmd::demo::Args),
}

/// For the commands whose output is a report: a reader that closes the pipe
/// early (`triad status | head`) ends the command quietly, as it ends any
/// Unix tool, instead of a panic in `println!`. The daemon, put, get,
/// promote, verify and drill keep SIGPIPE ignored: they write to sockets
/// (promote and `drill --switchover` poll daemons while those restart their
/// servers) and report a closed one as an error instead of dying silently.
fn quiet_on_closed_pipe() {
    // SAFETY: restoring the default disposition of a signal, before any
    // thread is started, has no memory effects.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Raises the soft limit on open files to the hard limit: a restore holds
/// directories and files open while their chunks arrive, and RocksDB its
/// tables, and a shell's usual soft limit (1024) is well below what the
/// hard limit allows. The systemd units set `LimitNOFILE` for the daemon.
fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write one plain struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// glibc's allocator, set before any thread starts. By default it raises
/// its mmap threshold (up to 32 MiB) after a large buffer is freed, so
/// later packs, pieces and upload batches come from per-thread arenas
/// (one per core times eight) and stay resident after they are freed: a
/// daemon's RSS at 100,000 files was 320 MiB for a heap that peaked at
/// 106 MiB. A fixed threshold of 256 KiB returns large buffers to the
/// kernel when freed, and two arenas bound the rest (195 MiB then).
fn tune_malloc() {
    // SAFETY: mallopt only sets allocator parameters; it is called before
    // any other thread exists.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn main() -> ExitCode {
    tune_malloc();
    raise_open_file_limit();
    let cli = Cli::parse();
    let from_config = match &cli.command {
        // A config that fails to load is reported by the command itself.
        Command::Daemon { cfg } => config::Config::load(&cfg.config)
            .ok()
            .and_then(|c| c.log.format),
        _ => None,
    };
    cmd::init_logging(cli.log_format.or(from_config).unwrap_or_default());
    if !matches!(
        cli.command,
        Command::Daemon { .. }
            | Command::Put(_)
            | Command::Forget(_)
            | Command::Get(_)
            | Command::Demo(_)
            | Command::Promote(_)
            | Command::Verify(_)
            | Command::Drill(_)
    ) {
        quiet_on_closed_pipe();
    }
    let result = match cli.command {
        Command::Daemon { cfg } => cmd::daemon::run(&cfg.config),
        Command::Keygen(a) => cmd::keygen::run(a),
        Command::Key { command } => cmd::key::run(command),
        Command::VerifyReport(a) => cmd::verify_report::run(a),
        Command::Certs { out, sites } => cmd::certs::run(&out, &sites),
        Command::Config { command } => cmd::config::run(command),
        Command::Restore(a) => cmd::restore::run(a),
        Command::Snapshot(a) => cmd::archive::run(cmd::archive::Job::Snapshot, a),
        Command::Snapshots(a) => cmd::archive::run(cmd::archive::Job::List, a),
        Command::Prune(a) => cmd::archive::run(cmd::archive::Job::Prune, a),
        Command::Undelete(a) => cmd::archive::undelete(a),
        Command::Drill(a) => cmd::drill::run(a),
        Command::Verify(a) => cmd::verify::run(a),
        Command::Resync(a) => cmd::resync::run(a),
        Command::Promote(a) => cmd::promote::run(a),
        Command::Status(a) => cmd::status::run(a),
        Command::Demo(a) => cmd::demo::run(a),
        Command::Put(a) => cmd::push::put(a),
        Command::Forget(a) => cmd::push::forget(a),
        Command::Get(a) => cmd::push::get(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // Each cause once: some errors already include their source.
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg.push_str(": ");
                    msg.push_str(&c);
                }
            }
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}
