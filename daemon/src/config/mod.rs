//! The site config file: one TOML file per site, shaped like the design's
//! sketch. Parsing is strict (unknown keys are errors, so typos do not pass
//! silently) and validation names the failing field with a hint.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

pub mod units;

pub use units::{parse_bandwidth, parse_duration, parse_size, Rate, Size, Span};

/// The config the daemon runs with now; a reload (SIGHUP) swaps it.
pub type Live = std::sync::Arc<std::sync::RwLock<std::sync::Arc<Config>>>;

/// The config in force.
pub fn current(live: &Live) -> std::sync::Arc<Config> {
    match live.read() {
        Ok(c) => c.clone(),
        Err(p) => p.into_inner().clone(),
    }
}

/// A config problem: the field path and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read config: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{file}: {field}: {message}")]
    Invalid {
        file: PathBuf,
        field: String,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub site: Site,
    pub tls: Option<Tls>,
    pub listen: Option<Listen>,
    #[serde(default)]
    pub peer: Vec<Peer>,
    #[serde(default)]
    pub dataset: Vec<DatasetConfig>,
    pub archive: Option<ArchiveSection>,
    pub verify: Option<VerifySection>,
    pub drill: Option<DrillSection>,
    #[serde(default)]
    pub log: Log,
    pub takeover: Option<TakeoverSection>,
    pub failover: Option<FailoverSection>,
    pub evidence: Option<EvidenceSection>,
    pub keys: Option<KeysSection>,
}

/// `[keys]`: dataset keys wrapped by a key in a cryptographic device
/// (`triad key wrap`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysSection {
    /// How often the daemon asks each device to unwrap its key again.
    /// Default "30s".
    pub check_interval: Option<Span>,
    /// How long the daemon goes on with keys already unwrapped in memory
    /// once a device stops answering; then it stops. Default "1h".
    pub device_grace: Option<Span>,
}

/// `[evidence]`: how this site signs what auditors read.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvidenceSection {
    /// The site's SM2 private key (`triad keygen --sm2`): drill reports
    /// and the archive's heads are signed with it.
    pub signing_key: PathBuf,
}

/// `[failover]`: whether the same-city site promotes itself when the
/// primary is lost (needs `[takeover]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverSection {
    /// Off by default: a failover is then an operator's `triad promote`.
    #[serde(default)]
    pub automatic: bool,
    /// How long this site and the remote must both have heard nothing from
    /// the primary. Default "30s"; at least `takeover.fence_after` + 2s.
    pub primary_timeout: Option<Span>,
}

/// `[takeover]`: this site and its `[[peer]]`s form one group that agrees,
/// through Raft, on the epoch and which site is primary; a follower can be
/// promoted (`triad promote`) and a replaced primary is fenced
/// (docs/architecture.md, "Takeover").
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TakeoverSection {
    /// How long the primary keeps taking writes without confirming, through
    /// a majority of the sites, that it is still the primary. Default "10s".
    pub fence_after: Option<Span>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Follower,
}

impl Role {
    /// As the config spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Follower => "follower",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    pub name: String,
    pub role: Role,
    pub data_dir: PathBuf,
    pub upstream: Option<String>,
    /// Most change log kept for followers that are behind, e.g. "50GiB".
    /// Beyond it the oldest segments go and a follower that still needed them
    /// catches up by state transfer (with an alert). Default: no cap.
    pub log_retention_max: Option<Size>,
    /// Size at which a log segment is closed. Default "64MiB".
    pub log_segment_size: Option<Size>,
    /// Longest a stop (SIGTERM) waits for the archive's last upload and a
    /// running check before abandoning them. Default "30s"; keep it below
    /// the unit's TimeoutStopSec.
    pub stop_timeout: Option<Span>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    pub replication: Option<String>,
    pub http: Option<String>,
    /// The `triad put` / `triad get` socket. Default `<data_dir>/triad.sock`.
    pub socket: Option<PathBuf>,
    /// Group given the socket (mode 0660), e.g. "postgres" so a database's
    /// archive_command may use it. Default: the daemon's own group.
    pub socket_group: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub name: String,
    pub address: String,
    pub mode: Option<replicator::upstream::Mode>,
    pub on_unreachable: Option<replicator::upstream::OnUnreachable>,
    pub wait_limit: Option<Span>,
    pub bandwidth: Option<Rate>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    pub name: String,
    pub key_file: PathBuf,
    /// Where the data comes from: required at the primary; a follower's
    /// datasets are filled by replication.
    pub source: Option<SourceConfig>,
    /// A follower's hot standby tree: the dataset kept as live files here,
    /// ready for a takeover (docs/operations.md, "Hot standby").
    pub standby_path: Option<PathBuf>,
    /// What a directory source records beyond contents, mode and mtime,
    /// and a restore puts back: "owner", "xattr", "acl", "hardlink",
    /// "sparse", "special". Default: all of them.
    pub preserve: Option<Vec<String>>,
}

/// `source = { kind = ..., ... }`. A plain struct with a `kind` field
/// rather than an internally tagged enum: serde reads a tagged enum through
/// a buffer, which would lose the path to a bad value inside it
/// (`dataset[0].source.debounce`). `validate` checks that only a directory
/// source has the directory keys.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub kind: SourceKind,
    /// directory: the tree to watch (required).
    pub path: Option<PathBuf>,
    /// directory: glob patterns left out.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// directory: full rescan period, catching anything inotify missed. Default 10m.
    pub rescan_interval: Option<Span>,
    /// directory: quiet time before a burst of events is processed. Default 200ms.
    pub debounce: Option<Span>,
    /// directory: files read and sealed at once. Default 8.
    pub workers: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// A watched directory tree.
    Directory,
    /// Objects stored with `triad put`.
    Pushed,
}

/// `[archive]`: this site's own object store.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveSection {
    /// `s3://bucket/prefix` or `file:///absolute/dir`.
    pub url: String,
    /// S3 endpoint such as `http://minio.internal:9000`.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// TOML with `access_key_id` and `secret_access_key`; else the AWS_* environment.
    pub credentials_file: Option<PathBuf>,
    /// Virtual-hosted-style bucket addressing. Default false (path-style).
    #[serde(default)]
    pub virtual_hosted: bool,
    /// Requests to the store in flight at once. Default 8.
    pub concurrency: Option<usize>,
    /// How often the log is shipped even when little was written. Default "5s".
    pub log_flush_interval: Option<Span>,
    /// Cron expression with seconds, UTC. No scheduled snapshots when absent.
    pub snapshot_schedule: Option<String>,
    /// Snapshots to keep; everything is kept when absent.
    pub retention: Option<archive::RetentionPolicy>,
    /// How long an unreferenced chunk stays before prune deletes it. Default "24h".
    pub prune_grace: Option<Span>,
    /// Time limit of one request to the store; it is then retried. Default "60s".
    pub request_timeout: Option<Span>,
    /// Lock every log piece, chunk and snapshot object for this long from
    /// its upload (S3 Object Lock; the bucket must have it enabled), e.g.
    /// "30d". Off when absent.
    pub object_lock: Option<Span>,
    /// `governance` (default: users with s3:BypassGovernanceRetention may
    /// still delete) or `compliance` (nobody may).
    pub object_lock_mode: Option<archive::LockMode>,
    /// New chunks are uploaded in packs of up to this size. Default and
    /// most "16MiB"; "0" uploads one object per chunk, as before packs.
    pub pack_size: Option<String>,
}

/// `[verify]`: cross-site verify and scrubs run by the daemon.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifySection {
    /// Cron (with seconds, UTC) for cross-site verify.
    pub schedule: Option<String>,
    /// Cron for scrubbing this site's copy.
    pub scrub_schedule: Option<String>,
    /// Most bytes a second a scheduled scrub reads. Default "100MiB/s".
    pub scrub_max_rate: Option<Rate>,
    /// Repair what a scheduled scrub finds (from the archive or another
    /// site), keeping the damaged bytes as evidence. Default false.
    #[serde(default)]
    pub repair: bool,
}

/// `[drill]`: restore drills run by the daemon.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillSection {
    /// Cron (with seconds, UTC).
    pub schedule: Option<String>,
    /// Default `<data_dir>/reports`.
    pub reports_dir: Option<PathBuf>,
    /// The archive to drill; default this site's `[archive]`.
    pub url: Option<String>,
    pub endpoint: Option<String>,
    pub credentials_file: Option<PathBuf>,
}

/// `[archive]` after validation.
#[derive(Debug, Clone)]
pub struct ArchiveSettings {
    pub store: archive::StoreConfig,
    /// Bytes per pack of new chunks; 0 for one object per chunk.
    pub pack_bytes: usize,
    pub log_flush_interval: Duration,
    pub schedule: Option<archive::schedule::Schedule>,
    pub retention: archive::RetentionPolicy,
    pub prune_grace: Duration,
    /// `[evidence] signing_key`: the archive's heads are signed with it.
    pub signing_key: Option<PathBuf>,
}

impl ArchiveSettings {
    /// The signer of the archive's heads, loaded now.
    pub fn signer(&self) -> Result<Option<Arc<vault::signing::EvidenceSigner>>, vault::VaultError> {
        self.signing_key
            .as_deref()
            .map(|p| vault::signing::EvidenceSigner::load(p).map(Arc::new))
            .transpose()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    /// `human` (default) or `json`.
    pub format: Option<LogFormat>,
}

/// How the daemon and commands write their log lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line an event.
    #[default]
    Human,
    /// One JSON object a line, for a log collector.
    Json,
}

/// Every default the config applies, defined here once. Where a library has
/// the same setting, its constant is the default, so the two cannot drift.
pub mod default {
    use std::time::Duration;

    /// `site.stop_timeout`.
    pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
    /// `site.log_segment_size`.
    pub const LOG_SEGMENT_BYTES: u64 = vault::wal::DEFAULT_SEGMENT_BYTES;
    /// `peer.wait_limit`.
    pub const WAIT_LIMIT: Duration = Duration::from_secs(5);
    /// `source.rescan_interval`.
    pub const RESCAN_INTERVAL: Duration = Duration::from_secs(600);
    /// `source.debounce`.
    pub const DEBOUNCE: Duration = Duration::from_millis(200);
    /// `source.workers`.
    pub const WORKERS: usize = 8;
    /// `archive.concurrency`.
    pub const STORE_CONCURRENCY: usize = archive::store::DEFAULT_CONCURRENCY;
    /// `archive.request_timeout`.
    pub const REQUEST_TIMEOUT: Duration = archive::store::DEFAULT_TIMEOUT;
    /// `archive.log_flush_interval`.
    pub const LOG_FLUSH_INTERVAL: Duration = Duration::from_secs(5);
    /// `archive.prune_grace`.
    pub const PRUNE_GRACE: Duration = Duration::from_secs(24 * 3600);
    /// `archive.object_lock_mode`.
    pub const OBJECT_LOCK_MODE: archive::LockMode = archive::LockMode::Governance;
    /// `takeover.fence_after`.
    pub const FENCE_AFTER: Duration = Duration::from_secs(10);
    /// `failover.primary_timeout`.
    pub const PRIMARY_TIMEOUT: Duration = Duration::from_secs(30);
    /// `verify.scrub_max_rate`, and `triad verify --scrub --max-rate`.
    pub const SCRUB_MAX_RATE: u64 = 100 << 20;
    /// The same, as `--max-rate` spells it.
    pub const SCRUB_MAX_RATE_TEXT: &str = "100MiB/s";
}

/// A directory source's settings after validation.
#[derive(Debug, Clone)]
pub struct DirectorySettings {
    pub path: PathBuf,
    pub exclude: Vec<String>,
    pub rescan_interval: Duration,
    pub debounce: Duration,
    pub workers: usize,
    pub preserve: vault::meta::Preserve,
}

/// The put/get socket's file name in `site.data_dir`.
pub const SOCKET: &str = "triad.sock";

/// The gid of a group named in /etc/group.
fn group_id(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !s.starts_with('.')
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            source: e,
        })?;
        Config::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        // serde_path_to_error names the field a bad value sits in
        // (`dataset[0].source.debounce`); errors outside any field, such as
        // broken TOML, keep toml's own message with its line and column.
        let cfg: Config =
            serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
                let field = e.path().to_string();
                let inner = e.into_inner();
                if field == "." || field.is_empty() {
                    ConfigError::Parse {
                        path: path.to_path_buf(),
                        message: inner.to_string().trim_end().to_string(),
                    }
                } else {
                    ConfigError::Invalid {
                        file: path.to_path_buf(),
                        field,
                        message: inner.message().trim_end().to_string(),
                    }
                }
            })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let invalid = |field: String, message: String| ConfigError::Invalid {
            file: file.to_path_buf(),
            field,
            message,
        };
        self.validate_site(&invalid)?;
        self.validate_links(&invalid)?;
        self.validate_datasets(&invalid)?;
        self.validate_takeover(&invalid)?;
        if self
            .keys
            .as_ref()
            .and_then(|k| k.check_interval)
            .is_some_and(|i| i.0 < Duration::from_secs(1))
        {
            return Err(invalid(
                "keys.check_interval".into(),
                "must be at least 1s: each check opens the device and logs in".into(),
            ));
        }
        if let Some(e) = self
            .evidence
            .as_ref()
            .filter(|e| !e.signing_key.is_absolute())
        {
            return Err(invalid(
                "evidence.signing_key".into(),
                format!(
                    "`{}` must be an absolute path; `triad keygen --sm2 --out FILE` creates the key",
                    e.signing_key.display()
                ),
            ));
        }
        self.validate_checks(&invalid)
    }

    /// `[takeover]`: every site of the group is reachable over mutual TLS,
    /// no sync follower may be degraded (a degraded one could be promoted
    /// without records the primary acknowledged), and every dataset names
    /// the source this site runs when it is the primary.
    fn validate_takeover(
        &self,
        invalid: &dyn Fn(String, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let Some(t) = &self.takeover else {
            if self.failover.is_some() {
                return Err(invalid(
                    "failover".into(),
                    "automatic failover needs the sites to agree on the primary: add [takeover] to every site".into(),
                ));
            }
            return Ok(());
        };
        let serves = self
            .listen
            .as_ref()
            .is_some_and(|l| l.replication.is_some());
        if !serves || self.tls.is_none() {
            return Err(invalid(
                "takeover".into(),
                "the sites agree on the primary over the replication port: set listen.replication and [tls]".into(),
            ));
        }
        // Three sites: the failover checks count "this site and one other"
        // as the majority.
        if self.peer.len() != 2 {
            return Err(invalid(
                "takeover".into(),
                format!(
                    "a takeover group is three sites: list the other two as [[peer]]; this config has {} peers",
                    self.peer.len()
                ),
            ));
        }
        for (i, p) in self.peer.iter().enumerate() {
            if p.mode == Some(replicator::upstream::Mode::Sync)
                && p.on_unreachable == Some(replicator::upstream::OnUnreachable::Degrade)
            {
                return Err(invalid(
                    format!("peer[{i}].on_unreachable"),
                    "with [takeover], a sync follower must not be degraded: a promoted site could lack writes that were acknowledged; use \"wait\"".into(),
                ));
            }
        }
        if t.fence_after.is_some_and(|f| f.0 < Duration::from_secs(1)) {
            return Err(invalid(
                "takeover.fence_after".into(),
                "must be at least 1s".into(),
            ));
        }
        if let (Some(timeout), Some(fence)) = (self.primary_timeout(), self.fence_after()) {
            if timeout < fence + Duration::from_secs(2) {
                return Err(invalid(
                    "failover.primary_timeout".into(),
                    format!(
                        "{timeout:?} is too short: the primary fences itself only after takeover.fence_after ({fence:?}), so the timeout must be at least that plus 2s"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `[site]`: name, data dir, role and upstream, stop timeout, log sizes.
    fn validate_site(
        &self,
        invalid: &dyn Fn(String, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        if !valid_name(&self.site.name) {
            return Err(invalid(
                "site.name".into(),
                format!(
                    "`{}` is not a valid site name; use letters, digits, `-`, `_` or `.`",
                    self.site.name
                ),
            ));
        }
        if !self.site.data_dir.is_absolute() {
            return Err(invalid(
                "site.data_dir".into(),
                format!(
                    "`{}` must be an absolute path, such as /var/lib/triad",
                    self.site.data_dir.display()
                ),
            ));
        }
        match (self.site.role, &self.site.upstream) {
            (Role::Primary, Some(_)) => {
                return Err(invalid(
                    "site.upstream".into(),
                    "a primary has no upstream; remove the line or set role = \"follower\"".into(),
                ))
            }
            (Role::Follower, None) => {
                return Err(invalid(
                    "site.upstream".into(),
                    "a follower must name the site it streams from, e.g. upstream = \"zjk-a\""
                        .into(),
                ))
            }
            (Role::Follower, Some(u)) if !self.peer.iter().any(|p| &p.name == u) => {
                return Err(invalid(
                    "site.upstream".into(),
                    format!("`{u}` is not one of the [[peer]] names"),
                ))
            }
            _ => {}
        }
        Ok(())
    }

    /// `[tls]`, `[listen]` and `[[peer]]`, and that they fit together.
    fn validate_links(
        &self,
        invalid: &dyn Fn(String, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        if let Some(t) = &self.tls {
            for (field, path) in [
                ("tls.ca", &t.ca),
                ("tls.cert", &t.cert),
                ("tls.key", &t.key),
            ] {
                if !path.is_absolute() {
                    return Err(invalid(
                        field.into(),
                        format!(
                            "`{}` must be an absolute path; `triad certs` will create these",
                            path.display()
                        ),
                    ));
                }
            }
        }
        if let Some(l) = &self.listen {
            if let Some(s) = l.socket.as_ref().filter(|s| !s.is_absolute()) {
                return Err(invalid(
                    "listen.socket".into(),
                    format!("`{}` must be an absolute path", s.display()),
                ));
            }
            if let Some(g) = &l.socket_group {
                if group_id(g).is_none() {
                    return Err(invalid(
                        "listen.socket_group".into(),
                        format!("there is no group `{g}` in /etc/group"),
                    ));
                }
            }
            for (field, addr) in [
                ("listen.replication", &l.replication),
                ("listen.http", &l.http),
            ] {
                if let Some(a) = addr {
                    a.parse::<std::net::SocketAddr>().map_err(|_| {
                        invalid(
                            field.into(),
                            format!("`{a}` is not an address:port such as 0.0.0.0:7400"),
                        )
                    })?;
                }
            }
        }
        let mut peers = HashSet::new();
        for (i, p) in self.peer.iter().enumerate() {
            if !valid_name(&p.name) || p.name == self.site.name || !peers.insert(p.name.clone()) {
                return Err(invalid(
                    format!("peer[{i}].name"),
                    format!(
                        "`{}` must be a valid site name, unique, and not this site's own name",
                        p.name
                    ),
                ));
            }
            if !p
                .address
                .rsplit_once(':')
                .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok())
            {
                return Err(invalid(
                    format!("peer[{i}].address"),
                    format!("`{}` must be host:port, such as 10.1.0.11:7400", p.address),
                ));
            }
        }
        let serves = self
            .listen
            .as_ref()
            .is_some_and(|l| l.replication.is_some());
        if (serves || self.site.role == Role::Follower) && self.tls.is_none() {
            return Err(invalid(
                "tls".into(),
                "replication runs over mutual TLS: add [tls] with ca, cert and key (`triad certs` creates them)".into(),
            ));
        }
        if !self.followers().is_empty() && !serves {
            return Err(invalid(
                "listen.replication".into(),
                "[[peer]] entries with a mode follow this site, so it must listen: add replication = \"0.0.0.0:7400\"".into(),
            ));
        }
        Ok(())
    }

    /// Each `[[dataset]]` and its source.
    fn validate_datasets(
        &self,
        invalid: &dyn Fn(String, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        if self.dataset.is_empty() {
            return Err(invalid(
                "dataset".into(),
                "no [[dataset]] is configured; add one with name, key_file and source".into(),
            ));
        }
        let mut names = HashSet::new();
        let mut standby_paths: Vec<&Path> = Vec::new();
        for (i, d) in self.dataset.iter().enumerate() {
            if !valid_name(&d.name) || !names.insert(d.name.clone()) {
                return Err(invalid(
                    format!("dataset[{i}].name"),
                    format!(
                        "`{}` must be unique and use letters, digits, `-`, `_` or `.`",
                        d.name
                    ),
                ));
            }
            if !d.key_file.is_absolute() {
                return Err(invalid(
                    format!("dataset[{i}].key_file"),
                    format!("`{}` must be an absolute path; create the key with `triad keygen --out FILE`", d.key_file.display()),
                ));
            }
            self.validate_standby(i, d, &mut standby_paths, invalid)?;
            if let Some(p) = &d.preserve {
                vault::meta::Preserve::parse(p)
                    .map_err(|e| invalid(format!("dataset[{i}].preserve"), e))?;
            }
            let source = match (&d.source, self.site.role) {
                (None, Role::Follower) if self.takeover.is_some() => {
                    return Err(invalid(
                        format!("dataset[{i}].source"),
                        "with [takeover], every site names the source it runs once promoted, e.g. source = { kind = \"directory\", path = \"/data/x\" } (at a follower that tree is the standby tree)".into(),
                    ))
                }
                (None, Role::Follower) => continue,
                (Some(s), Role::Follower) if self.takeover.is_some() => s,
                (Some(_), Role::Follower) => {
                    return Err(invalid(
                        format!("dataset[{i}].source"),
                        "a follower's datasets are filled by replication from its upstream; remove the source".into(),
                    ))
                }
                (Some(s), Role::Primary) => s,
                (None, Role::Primary) => {
                    return Err(invalid(
                        format!("dataset[{i}].source"),
                        "a primary needs a source, e.g. source = { kind = \"directory\", path = \"/data/x\" }".into(),
                    ))
                }
            };
            match source.kind {
                SourceKind::Directory => {
                    let field = format!("dataset[{i}].source.path");
                    let Some(path) = &source.path else {
                        return Err(invalid(
                            field,
                            "a directory source needs the tree it watches, e.g. path = \"/data/x\""
                                .into(),
                        ));
                    };
                    if !path.is_absolute() {
                        return Err(invalid(
                            field,
                            format!("`{}` must be an absolute path", path.display()),
                        ));
                    }
                    if self.site.data_dir.starts_with(path) || path.starts_with(&self.site.data_dir)
                    {
                        return Err(invalid(
                            field,
                            format!(
                                "`{}` and site.data_dir `{}` must not contain each other, or triad would back up its own files",
                                path.display(),
                                self.site.data_dir.display()
                            ),
                        ));
                    }
                    for (j, pat) in source.exclude.iter().enumerate() {
                        globset::Glob::new(pat).map_err(|e| {
                            invalid(
                                format!("dataset[{i}].source.exclude[{j}]"),
                                format!("`{pat}` is not a glob: {e}"),
                            )
                        })?;
                    }
                    if source.workers.is_some_and(|w| w == 0 || w > 256) {
                        return Err(invalid(
                            format!("dataset[{i}].source.workers"),
                            "must be between 1 and 256".into(),
                        ));
                    }
                }
                // Filled by `triad put`: none of the directory keys apply.
                SourceKind::Pushed => {
                    let set = [
                        ("path", source.path.is_some()),
                        ("exclude", !source.exclude.is_empty()),
                        ("rescan_interval", source.rescan_interval.is_some()),
                        ("debounce", source.debounce.is_some()),
                        ("workers", source.workers.is_some()),
                    ];
                    if let Some((key, _)) = set.iter().find(|(_, on)| *on) {
                        return Err(invalid(
                            format!("dataset[{i}].source.{key}"),
                            "only a directory source takes this; a pushed dataset is filled by `triad put`".into(),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// A dataset's `standby_path`: a follower's, absolute, apart from
    /// `data_dir` and from every other dataset's tree (`seen`).
    fn validate_standby<'a>(
        &self,
        i: usize,
        d: &'a DatasetConfig,
        seen: &mut Vec<&'a Path>,
        invalid: &dyn Fn(String, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let Some(path) = &d.standby_path else {
            return Ok(());
        };
        let field = format!("dataset[{i}].standby_path");
        if self.takeover.is_some() {
            return Err(invalid(
                field,
                "with [takeover], a directory dataset's source.path is its standby tree while this site follows; remove standby_path".into(),
            ));
        }
        if self.site.role != Role::Follower {
            return Err(invalid(
                field,
                "only a follower keeps a standby tree; at the primary the source tree is the live copy".into(),
            ));
        }
        if !path.is_absolute() {
            return Err(invalid(
                field,
                format!("`{}` must be an absolute path", path.display()),
            ));
        }
        let nested = |a: &Path, b: &Path| a.starts_with(b) || b.starts_with(a);
        if nested(path, &self.site.data_dir) {
            return Err(invalid(
                field,
                format!(
                    "`{}` and site.data_dir `{}` must not contain each other",
                    path.display(),
                    self.site.data_dir.display()
                ),
            ));
        }
        if let Some(other) = seen.iter().find(|o| nested(path, o)) {
            return Err(invalid(
                field,
                format!(
                    "`{}` overlaps another dataset's standby tree `{}`; give each its own directory",
                    path.display(),
                    other.display()
                ),
            ));
        }
        seen.push(path);
        Ok(())
    }

    /// `[archive]`, `[verify]`, `[drill]` and `[log]`.
    fn validate_checks(
        &self,
        invalid: &dyn Fn(String, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        if self.archive.is_some() {
            self.archive_settings()
                .map_err(|(field, message)| invalid(field, message))?;
        }
        let cron = |field: &str, v: &Option<String>| -> Result<(), ConfigError> {
            if let Some(t) = v {
                archive::schedule::Schedule::parse(field, t)
                    .map_err(|e| invalid(field.into(), e.to_string()))?;
            }
            Ok(())
        };
        if let Some(vf) = &self.verify {
            cron("verify.schedule", &vf.schedule)?;
            cron("verify.scrub_schedule", &vf.scrub_schedule)?;
            if vf.schedule.is_some() && self.tls.is_none() {
                return Err(invalid(
                    "verify.schedule".into(),
                    "cross-site verify connects to the other sites: add [tls]".into(),
                ));
            }
        }
        if let Some(d) = &self.drill {
            cron("drill.schedule", &d.schedule)?;
            if d.url.is_none() && self.archive.is_none() {
                return Err(invalid(
                    "drill.url".into(),
                    "a drill restores an archive: set drill.url or this site's [archive]".into(),
                ));
            }
        }
        Ok(())
    }

    /// How long a stop waits for the archive's last upload and running
    /// checks (`site.stop_timeout`, default 30 s).
    pub fn stop_timeout(&self) -> Duration {
        self.site
            .stop_timeout
            .map_or(default::STOP_TIMEOUT, |s| s.0)
    }

    /// What a running daemon becomes when it reloads `new` (SIGHUP): `self`
    /// with the settings that can change live taken from `new` (the log cap
    /// and stop timeout, each peer's commit policy and bandwidth, the
    /// archive's schedule, retention, flush interval and prune grace while
    /// its store is unchanged, `[verify]` and `[drill]`). Everything else
    /// keeps its running value until a restart.
    pub fn reloaded(&self, new: &Config) -> Config {
        let mut k = self.clone();
        k.site.log_retention_max = new.site.log_retention_max;
        k.site.stop_timeout = new.site.stop_timeout;
        for p in &mut k.peer {
            if let Some(n) = new.peer.iter().find(|n| n.name == p.name) {
                // In a takeover group the sync set is agreed at start (a
                // sync follower may be promoted without --force).
                if self.takeover.is_none() {
                    p.mode = n.mode;
                }
                p.on_unreachable = n.on_unreachable;
                p.wait_limit = n.wait_limit;
                p.bandwidth = n.bandwidth;
            }
        }
        if let (Some(a), Some(n)) = (&mut k.archive, &new.archive) {
            // The store's own settings, with the live ones blanked.
            let store = |x: &ArchiveSection| ArchiveSection {
                log_flush_interval: None,
                snapshot_schedule: None,
                retention: None,
                prune_grace: None,
                ..x.clone()
            };
            if store(a) == store(n) {
                a.log_flush_interval = n.log_flush_interval;
                a.snapshot_schedule = n.snapshot_schedule.clone();
                a.retention = n.retention.clone();
                a.prune_grace = n.prune_grace;
            }
        }
        k.verify = new.verify.clone();
        k.drill = new.drill.clone();
        k
    }

    /// What a reload from `self` to `new` changes: the settings it applies
    /// (where `reloaded` differs from `self`), and the ones that differ but
    /// only take effect at a restart (where `new` still differs from it).
    pub fn reload_changes(&self, new: &Config) -> (Vec<&'static str>, Vec<&'static str>) {
        let kept = self.reloaded(new);
        let mut applied = Vec::new();
        if self.site != kept.site {
            applied.push("site.log_retention_max, site.stop_timeout");
        }
        if self.peer != kept.peer {
            applied.push("peer mode, on_unreachable, wait_limit, bandwidth");
        }
        if self.archive != kept.archive {
            applied.push("archive schedule, retention, log_flush_interval, prune_grace");
        }
        if self.verify != kept.verify {
            applied.push("[verify]");
        }
        if self.drill != kept.drill {
            applied.push("[drill]");
        }
        let mut restart = Vec::new();
        if kept.site != new.site {
            restart.push("[site] name, role, data_dir, upstream, log_segment_size");
        }
        if kept.tls != new.tls {
            restart.push("[tls]");
        }
        if kept.listen != new.listen {
            restart.push("[listen]");
        }
        if kept.peer != new.peer {
            restart.push("[[peer]] names and addresses");
        }
        if kept.dataset != new.dataset {
            restart.push("[[dataset]]");
        }
        if kept.archive != new.archive {
            restart.push("[archive] store (url, endpoint, region, credentials, concurrency, request_timeout)");
        }
        if kept.log != new.log {
            restart.push("[log]");
        }
        if kept.takeover != new.takeover || kept.failover != new.failover {
            restart.push("[takeover], [failover]");
        }
        // Keys are loaded and their devices watched from the start.
        if kept.keys != new.keys {
            restart.push("[keys]");
        }
        if kept.evidence != new.evidence {
            restart.push("[evidence]");
        }
        (applied, restart)
    }

    /// The validated `[archive]` section, if any; errors are (field, message).
    pub fn archive_settings(&self) -> Result<Option<ArchiveSettings>, (String, String)> {
        let Some(a) = &self.archive else {
            return Ok(None);
        };
        let f = |n: &str| format!("archive.{n}");
        let scheme_ok = a.url.starts_with("s3://") || a.url.starts_with("file:///");
        if !scheme_ok {
            return Err((
                f("url"),
                format!(
                    "`{}` must be s3://bucket/prefix or file:///absolute/dir",
                    a.url
                ),
            ));
        }
        if a.url.starts_with("s3://")
            && a.url
                .trim_start_matches("s3://")
                .trim_matches('/')
                .is_empty()
        {
            return Err((f("url"), "s3:// needs a bucket: s3://bucket/prefix".into()));
        }
        if let Some(e) = &a.endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err((
                    f("endpoint"),
                    format!("`{e}` must start with http:// or https://"),
                ));
            }
        }
        let log_flush_interval = a
            .log_flush_interval
            .map_or(default::LOG_FLUSH_INTERVAL, |s| s.0);
        if log_flush_interval.is_zero() {
            return Err((f("log_flush_interval"), "must be more than 0".into()));
        }
        let prune_grace = a.prune_grace.map_or(default::PRUNE_GRACE, |s| s.0);
        let request_timeout = a.request_timeout.map_or(default::REQUEST_TIMEOUT, |s| s.0);
        let schedule = match &a.snapshot_schedule {
            Some(t) => Some(
                archive::schedule::Schedule::parse("archive.snapshot_schedule", t)
                    .map_err(|e| (f("snapshot_schedule"), e.to_string()))?,
            ),
            None => None,
        };
        let concurrency = a.concurrency.unwrap_or(default::STORE_CONCURRENCY);
        if !(1..=256).contains(&concurrency) {
            return Err((f("concurrency"), "must be between 1 and 256".into()));
        }
        let object_lock = match a.object_lock {
            Some(Span(period)) => {
                if period < Duration::from_secs(86_400) {
                    // S3 counts retention in whole days; a shorter lock is
                    // a typo more often than a plan.
                    return Err((f("object_lock"), "must be at least 1d".into()));
                }
                if !a.url.starts_with("s3://") {
                    return Err((
                        f("object_lock"),
                        "needs an s3:// archive on a bucket with Object Lock enabled".into(),
                    ));
                }
                let mode = a.object_lock_mode.unwrap_or(default::OBJECT_LOCK_MODE);
                Some(archive::ObjectLock { mode, period })
            }
            None if a.object_lock_mode.is_some() => {
                return Err((
                    f("object_lock_mode"),
                    "has no effect without archive.object_lock".into(),
                ))
            }
            None => None,
        };
        let pack_bytes = match a.pack_size.as_deref().map(str::trim) {
            None => archive::packs::PACK_BYTES as u64,
            Some("0") => 0,
            Some(t) => parse_size(t).map_err(|e| (f("pack_size"), e))?,
        };
        if pack_bytes != 0 && pack_bytes < 64 << 10 {
            return Err((
                f("pack_size"),
                "at least 64KiB (or \"0\" for one object per chunk): smaller packs only add requests".into(),
            ));
        }
        if pack_bytes > archive::packs::PACK_BYTES as u64 {
            return Err((
                f("pack_size"),
                format!(
                    "at most {} MiB (readers refuse larger packs)",
                    archive::packs::PACK_BYTES >> 20
                ),
            ));
        }
        let mut store = archive::StoreConfig::new(&a.url);
        store.object_lock = object_lock;
        store.endpoint = a.endpoint.clone();
        store.region = a.region.clone();
        store.credentials_file = a.credentials_file.clone();
        store.virtual_hosted = a.virtual_hosted;
        store.concurrency = concurrency;
        store.timeout = request_timeout;
        Ok(Some(ArchiveSettings {
            store,
            pack_bytes: pack_bytes as usize,
            log_flush_interval,
            schedule,
            retention: a.retention.clone().unwrap_or_default(),
            prune_grace,
            signing_key: self.evidence.as_ref().map(|e| e.signing_key.clone()),
        }))
    }

    /// Sites allowed to follow this one, with their commit policy. Defaults:
    /// `on_unreachable = "wait"` (never give up RPO 0 silently), `wait_limit = "5s"`.
    pub fn followers(
        &self,
    ) -> std::collections::HashMap<String, replicator::upstream::FollowerPolicy> {
        self.peer
            .iter()
            .filter_map(|p| Some((p.name.clone(), p.policy(p.mode?))))
            .collect()
    }

    /// Size limit of each dataset's retained log, if configured.
    pub fn log_cap(&self) -> Option<u64> {
        self.site.log_retention_max.map(|s| s.0)
    }

    /// Size at which a log segment is closed.
    pub fn segment_bytes(&self) -> u64 {
        self.site
            .log_segment_size
            .map_or(default::LOG_SEGMENT_BYTES, |s| s.0)
    }

    /// Most bytes a second a scheduled scrub reads.
    pub fn scrub_max_rate(&self) -> u64 {
        self.verify
            .as_ref()
            .and_then(|v| v.scrub_max_rate)
            .map_or(default::SCRUB_MAX_RATE, |r| r.0)
    }

    /// The peer this site streams from, for a follower.
    /// The `[tls]` files, for connecting to or serving other sites.
    pub fn tls_files(&self) -> Option<replicator::tls::TlsFiles> {
        self.tls.as_ref().map(|t| replicator::tls::TlsFiles {
            ca: t.ca.clone(),
            cert: t.cert.clone(),
            key: t.key.clone(),
        })
    }

    /// The put/get socket: `listen.socket`, else `<data_dir>/triad.sock`.
    pub fn socket_path(&self) -> PathBuf {
        self.listen
            .as_ref()
            .and_then(|l| l.socket.clone())
            .unwrap_or_else(|| self.site.data_dir.join(SOCKET))
    }

    /// The gid of `listen.socket_group` (checked to exist by `validate`).
    pub fn socket_group(&self) -> Option<u32> {
        self.listen
            .as_ref()
            .and_then(|l| l.socket_group.as_deref())
            .and_then(group_id)
    }

    /// `[keys] check_interval` (default 30 s) and `device_grace` (default 1 h).
    pub fn key_device_timing(&self) -> (Duration, Duration) {
        let k = self.keys.as_ref();
        (
            k.and_then(|k| k.check_interval)
                .map_or(Duration::from_secs(30), |s| s.0),
            k.and_then(|k| k.device_grace)
                .map_or(Duration::from_secs(3600), |s| s.0),
        )
    }

    /// The site's evidence signer, when `[evidence]` names one; an error
    /// says why the key cannot be used (never a silent unsigned report).
    pub fn evidence_signer(
        &self,
    ) -> Result<Option<vault::signing::EvidenceSigner>, vault::VaultError> {
        self.evidence
            .as_ref()
            .map(|e| vault::signing::EvidenceSigner::load(&e.signing_key))
            .transpose()
    }

    /// Where drill reports go: `[drill] reports_dir`, else `<data_dir>/reports`.
    pub fn reports_dir(&self) -> PathBuf {
        self.drill
            .as_ref()
            .and_then(|d| d.reports_dir.clone())
            .unwrap_or_else(|| self.site.data_dir.join("reports"))
    }

    /// How to reach the named `[[peer]]` over the replication port.
    pub fn peer_addr(&self, name: &str) -> Option<replicator::follower::UpstreamAddr> {
        let p = self.peer.iter().find(|p| p.name == name)?;
        Some(replicator::follower::UpstreamAddr {
            name: p.name.clone(),
            address: p.address.clone(),
            tls: self.tls_files()?,
        })
    }

    /// `failover.primary_timeout`, when automatic failover is on.
    pub fn primary_timeout(&self) -> Option<Duration> {
        self.failover
            .as_ref()
            .filter(|f| f.automatic)
            .map(|f| f.primary_timeout.map_or(default::PRIMARY_TIMEOUT, |s| s.0))
    }

    /// `takeover.fence_after`, when `[takeover]` is set.
    pub fn fence_after(&self) -> Option<Duration> {
        self.takeover
            .as_ref()
            .map(|t| t.fence_after.map_or(default::FENCE_AFTER, |s| s.0))
    }

    /// The sites that follow this one when it is the primary of a takeover
    /// group: every peer, with its configured policy (`mode` defaults to
    /// async there).
    pub fn followers_as_primary(
        &self,
    ) -> std::collections::HashMap<String, replicator::upstream::FollowerPolicy> {
        use replicator::upstream::Mode;
        self.peer
            .iter()
            .map(|p| (p.name.clone(), p.policy(p.mode.unwrap_or(Mode::Async))))
            .collect()
    }

    pub fn upstream_peer(&self) -> Option<&Peer> {
        let up = self.site.upstream.as_ref()?;
        self.peer.iter().find(|p| &p.name == up)
    }

    pub fn dataset(&self, name: &str) -> Option<&DatasetConfig> {
        self.dataset.iter().find(|d| d.name == name)
    }

    pub fn dataset_dir(&self, name: &str) -> PathBuf {
        self.site.data_dir.join("datasets").join(name)
    }
}

impl Peer {
    /// This peer's commit policy as a follower in `mode`, with the
    /// defaults filled in.
    fn policy(&self, mode: replicator::upstream::Mode) -> replicator::upstream::FollowerPolicy {
        replicator::upstream::FollowerPolicy {
            mode,
            on_unreachable: self.on_unreachable.unwrap_or_default(),
            wait_limit: self.wait_limit.map_or(default::WAIT_LIMIT, |s| s.0),
            bandwidth: self.bandwidth.map(|b| b.0),
        }
    }
}

impl DatasetConfig {
    pub fn directory(&self) -> Option<DirectorySettings> {
        let s = self.source.as_ref()?;
        if s.kind != SourceKind::Directory {
            return None;
        }
        Some(DirectorySettings {
            path: s.path.clone()?,
            exclude: s.exclude.clone(),
            rescan_interval: s.rescan_interval.map_or(default::RESCAN_INTERVAL, |s| s.0),
            debounce: s.debounce.map_or(default::DEBOUNCE, |s| s.0),
            workers: s.workers.unwrap_or(default::WORKERS),
            preserve: self.preserve(),
        })
    }

    /// The metadata kinds kept (`preserve`; all when unset; `validate`
    /// refused unknown names).
    pub fn preserve(&self) -> vault::meta::Preserve {
        self.preserve
            .as_ref()
            .and_then(|p| vault::meta::Preserve::parse(p).ok())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[site]
name = "zjk-a"
role = "primary"
data_dir = "/var/lib/triad"

[[dataset]]
name = "gov-files"
key_file = "/etc/triad/keys/gov-files.key"
source = { kind = "directory", path = "/data/gov-files", exclude = ["*.tmp"] }
"#;

    fn err(text: &str) -> String {
        Config::parse(Path::new("site.toml"), text)
            .unwrap_err()
            .to_string()
    }

    /// Fuzz target: any bytes as a config file give a config or an error
    /// naming the field, never a panic (`TRIAD_FUZZ_INPUTS` sets the count;
    /// see tests/tests/fuzz.rs).
    #[test]
    fn fuzz_config() {
        let mut seeds = vec![GOOD.as_bytes().to_vec()];
        for f in ["primary.toml", "local.toml", "remote.toml"] {
            let p = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../configs")
                .join(f);
            seeds.push(std::fs::read(p).unwrap());
        }
        triad_tests::fuzz::campaign("config", seeds, |b| {
            if let Ok(text) = std::str::from_utf8(b) {
                if let Ok(c) = Config::parse(Path::new("site.toml"), text) {
                    let _ = c.archive_settings();
                    let _ = c.followers();
                    let _ = c.log_cap();
                }
            }
        });
    }

    #[test]
    fn key_and_evidence_sections_are_checked() {
        let e = err(&format!("{GOOD}\n[keys]\ncheck_interval = \"0s\"\n"));
        assert!(
            e.contains("keys.check_interval") && e.contains("at least 1s"),
            "{e}"
        );
        let e = err(&format!(
            "{GOOD}\n[evidence]\nsigning_key = \"evidence.key\"\n"
        ));
        assert!(
            e.contains("evidence.signing_key") && e.contains("absolute"),
            "{e}"
        );
        let c = Config::parse(
            Path::new("site.toml"),
            &format!("{GOOD}\n[keys]\ndevice_grace = \"10m\"\n"),
        )
        .unwrap();
        assert_eq!(
            c.key_device_timing(),
            (Duration::from_secs(30), Duration::from_secs(600))
        );
    }

    #[test]
    fn the_sketch_parses() {
        let c = Config::parse(Path::new("site.toml"), GOOD).unwrap();
        let d = c.dataset[0].directory().unwrap();
        assert_eq!(d.debounce, Duration::from_millis(200));
        assert_eq!(
            c.dataset_dir("gov-files"),
            Path::new("/var/lib/triad/datasets/gov-files")
        );
    }

    #[test]
    fn the_shipped_example_configs_are_valid() {
        for f in ["primary.toml", "local.toml", "remote.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../configs")
                .join(f);
            let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(c.dataset[0].name, "gov-files", "{f}");
        }
    }

    #[test]
    fn quantities_are_parsed_once_and_name_their_field() {
        let with = |extra: &str| {
            GOOD.replace(
                "data_dir = \"/var/lib/triad\"",
                &format!("data_dir = \"/var/lib/triad\"\n{extra}"),
            )
        };
        let c = Config::parse(
            Path::new("site.toml"),
            &with("stop_timeout = \"3s\"\nlog_segment_size = \"1MiB\""),
        )
        .unwrap();
        assert_eq!(c.stop_timeout(), Duration::from_secs(3));
        assert_eq!(c.segment_bytes(), 1 << 20);
        let c = Config::parse(Path::new("site.toml"), GOOD).unwrap();
        assert_eq!(c.segment_bytes(), vault::wal::DEFAULT_SEGMENT_BYTES);
        assert_eq!(c.scrub_max_rate(), 100 << 20);
        assert_eq!(
            parse_bandwidth(default::SCRUB_MAX_RATE_TEXT),
            Ok(default::SCRUB_MAX_RATE)
        );
        let e = err(&with("stop_timeout = \"soon\""));
        assert!(
            e.contains("site.stop_timeout") && e.contains("not a duration"),
            "{e}"
        );
        let e = err(&with("log_segment_size = \"huge\""));
        assert!(
            e.contains("site.log_segment_size") && e.contains("64MiB"),
            "{e}"
        );
        let e = err(&GOOD.replace("exclude = [\"*.tmp\"]", "debounce = \"later\""));
        assert!(
            e.contains("dataset[0].source.debounce") && e.contains("not a duration"),
            "{e}"
        );
        let e = err(&GOOD.replace("kind = \"directory\"", "kind = \"pushed\""));
        assert!(
            e.contains("dataset[0].source.path") && e.contains("only a directory"),
            "{e}"
        );
        let e = err(&format!("{GOOD}\n[verify]\nscrub_max_rate = \"quick\"\n"));
        assert!(
            e.contains("verify.scrub_max_rate") && e.contains("bandwidth"),
            "{e}"
        );
        let e = err(&format!("{GOOD}\n[log]\nformat = \"xml\"\n"));
        assert!(e.contains("log.format") && e.contains("json"), "{e}");
        let e = err(&format!("{GOOD}\n[archive]\nurl = \"s3://b\"\nobject_lock = \"30d\"\nobject_lock_mode = \"strict\"\n"));
        assert!(
            e.contains("archive.object_lock_mode") && e.contains("compliance"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_the_field_and_the_fix() {
        let e = err(&GOOD.replace("/var/lib/triad", "var/lib/triad"));
        assert!(e.contains("site.data_dir") && e.contains("absolute"), "{e}");
        let e = err(&GOOD.replace("role = \"primary\"", "role = \"boss\""));
        assert!(e.contains("role") && e.contains("primary"), "{e}");
        let e = err(&GOOD.replace("exclude", "exclud"));
        assert!(e.contains("exclud"), "{e}");
        let e = err(&GOOD.replace("/data/gov-files", "/var/lib/triad/data"));
        assert!(
            e.contains("dataset[0].source.path") && e.contains("must not contain"),
            "{e}"
        );
        let e = err(&GOOD.replace("[\"*.tmp\"]", "[\"a[\"]"));
        assert!(e.contains("dataset[0].source.exclude[0]"), "{e}");
        let e = err("[site]\nname = \"x\"\nrole = \"primary\"\ndata_dir = \"/d\"\n");
        assert!(e.contains("[[dataset]]"), "{e}");
        let e = err("not toml at all [");
        assert!(e.contains("site.toml"), "{e}");
    }

    #[test]
    fn the_archive_section_is_checked() {
        let with = |a: &str| format!("{GOOD}\n[archive]\n{a}\n");
        let ok = Config::parse(
            Path::new("site.toml"),
            &with(
                "url = \"s3://b/p\"\nendpoint = \"http://minio:9000\"\nsnapshot_schedule = \"0 0 * * * *\"\nretention = { last = 3, daily = 7 }",
            ),
        )
        .unwrap();
        let s = ok.archive_settings().unwrap().unwrap();
        assert_eq!(s.retention.daily, 7);
        assert_eq!(s.log_flush_interval, Duration::from_secs(5));
        let e = err(&with("url = \"ftp://x\""));
        assert!(e.contains("archive.url") && e.contains("s3://"), "{e}");
        let e = err(&with("url = \"s3://\""));
        assert!(e.contains("archive.url") && e.contains("bucket"), "{e}");
        let e = err(&with("url = \"file:///a\"\nsnapshot_schedule = \"hourly\""));
        assert!(
            e.contains("archive.snapshot_schedule") && e.contains("cron"),
            "{e}"
        );
        let e = err(&with("url = \"file:///a\"\nlog_flush_interval = \"soon\""));
        assert!(e.contains("archive.log_flush_interval"), "{e}");
        let e = err(&with("url = \"file:///a\"\nretention = { yearly = 1 }"));
        assert!(e.contains("yearly"), "{e}");
        let e = err(&with("url = \"s3://b\"\nendpoint = \"minio:9000\""));
        assert!(e.contains("archive.endpoint"), "{e}");
        // Packs: 16 MiB by default, "0" for one object per chunk, and
        // nothing a reader would refuse or that only adds requests.
        assert_eq!(s.pack_bytes, 16 << 20);
        let size = |v: &str| {
            Config::parse(
                Path::new("site.toml"),
                &with(&format!("url = \"file:///a\"\npack_size = \"{v}\"")),
            )
            .map_err(|e| format!("{e:#}"))
            .and_then(|c| {
                c.archive_settings()
                    .map_err(|(f, m)| format!("{f}: {m}"))
                    .map(|s| s.map_or(0, |s| s.pack_bytes))
            })
        };
        assert_eq!(size("0"), Ok(0));
        assert_eq!(size("4MiB"), Ok(4 << 20));
        for (v, why) in [
            ("1KiB", "at least 64KiB"),
            ("32MiB", "at most 16 MiB"),
            ("big", "not a size"),
        ] {
            let e = size(v).unwrap_err();
            assert!(
                e.contains("archive.pack_size") && e.contains(why),
                "{v}: {e}"
            );
        }
    }

    /// A follower of a takeover group, as each test varies it.
    const GROUP_FOLLOWER: &str = r#"
[site]
name = "zjk-b"
role = "follower"
data_dir = "/var/lib/triad"
upstream = "zjk-a"

[listen]
replication = "0.0.0.0:7400"

[tls]
ca = "/etc/triad/ca.pem"
cert = "/etc/triad/zjk-b.pem"
key = "/etc/triad/zjk-b.key"

[[peer]]
name = "zjk-a"
address = "10.1.0.11:7400"

[[peer]]
name = "sjz-c"
address = "10.2.0.11:7400"

[takeover]
fence_after = "5s"

[[dataset]]
name = "gov-files"
key_file = "/etc/triad/keys/gov-files.key"
source = { kind = "directory", path = "/srv/gov-files" }
"#;

    #[test]
    fn a_takeover_group_names_sources_everywhere_and_refuses_what_would_lose_writes() {
        let c = Config::parse(Path::new("site.toml"), GROUP_FOLLOWER).unwrap();
        assert_eq!(c.fence_after(), Some(Duration::from_secs(5)));
        // Every peer follows the promoted site, async unless configured.
        let f = c.followers_as_primary();
        assert_eq!(f.len(), 2);
        assert!(f
            .values()
            .all(|p| p.mode == replicator::upstream::Mode::Async));

        let e = err(&GROUP_FOLLOWER.replace(
            "source = { kind = \"directory\", path = \"/srv/gov-files\" }",
            "",
        ));
        assert!(
            e.contains("dataset[0].source") && e.contains("takeover"),
            "{e}"
        );
        let e = err(&GROUP_FOLLOWER.replace(
            "path = \"/srv/gov-files\" }",
            "path = \"/srv/gov-files\" }\nstandby_path = \"/srv/x\"",
        ));
        assert!(e.contains("standby_path"), "{e}");
        let e = err(&GROUP_FOLLOWER.replace("replication = \"0.0.0.0:7400\"", ""));
        assert!(
            e.contains("takeover") && e.contains("listen.replication"),
            "{e}"
        );
        let e = err(&GROUP_FOLLOWER.replace(
            "address = \"10.1.0.11:7400\"",
            "address = \"10.1.0.11:7400\"\nmode = \"sync\"\non_unreachable = \"degrade\"",
        ));
        assert!(e.contains("peer[0].on_unreachable"), "{e}");
        let e = err(&GROUP_FOLLOWER.replace(
            "[[peer]]\nname = \"sjz-c\"\naddress = \"10.2.0.11:7400\"\n",
            "",
        ));
        assert!(e.contains("three sites"), "{e}");
        let e = err(&GROUP_FOLLOWER.replace("fence_after = \"5s\"", "fence_after = \"100ms\""));
        assert!(e.contains("takeover.fence_after"), "{e}");
        let auto = |t: &str| {
            format!("{GROUP_FOLLOWER}\n[failover]\nautomatic = true\nprimary_timeout = \"{t}\"\n")
        };
        let c = Config::parse(Path::new("site.toml"), &auto("30s")).unwrap();
        assert_eq!(c.primary_timeout(), Some(Duration::from_secs(30)));
        let e = err(&auto("6s"));
        assert!(e.contains("failover.primary_timeout"), "{e}");
        let e = err(&GOOD.replace("[[dataset]]", "[failover]\nautomatic = true\n\n[[dataset]]"));
        assert!(e.contains("[takeover]"), "{e}");
    }
}
