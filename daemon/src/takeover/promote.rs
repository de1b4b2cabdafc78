//! `triad promote`, carried out by the daemon of the site to promote.
//!
//! - **Planned switchover**, when the primary answers: it fences itself
//!   (no new changes), waits until this site has acknowledged its head in
//!   every dataset, and answers with those heads; this site then asks the
//!   group to agree on the next epoch with itself as primary. Nothing
//!   acknowledged is lost, and nothing is written meanwhile. If the
//!   agreement does not follow, the old primary takes writes again when its
//!   handover expires.
//! - **Failover**, when the primary does not answer. This site asks the
//!   others what they have heard of the primary. It goes on only if at least
//!   one other site answers (with this one, a majority), and if neither it
//!   nor they heard from the primary for longer than `fence_after` plus a
//!   margin. The old primary's lease has then run out, so it takes no
//!   writes. In sync mode the site must also be one of the primary's sync
//!   followers, which hold every acknowledged write. `--force` overrides
//!   both checks, and the promotion is recorded as forced, with the heads
//!   the site had. The agreement itself still needs a majority.
//!
//! Every promotion, whatever its outcome, is appended to
//! `<data_dir>/takeover/promotions.jsonl`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use replicator::upstream::AdminError;
use serde::{Deserialize, Serialize};

use super::{Command, Handover, Heard, Takeover};

/// How long a primary stays fenced for a switchover that does not complete.
const HANDOVER_HOLD: Duration = Duration::from_secs(30);
/// At most one handover asked of a primary in one epoch in this time.
const HANDOVER_EVERY: Duration = Duration::from_secs(60);
/// How long the primary waits for the promoted site to catch up.
const CATCH_UP: Duration = Duration::from_secs(20);
/// How long a handover waits for the asking site to follow this one before
/// it refuses (writes go on meanwhile).
const CONNECT_WITHIN: Duration = Duration::from_secs(10);
/// Added to `fence_after` before a failover: clocks tick at slightly
/// different rates, and the guard looks at the lease periodically.
const MARGIN: Duration = Duration::from_secs(2);

/// How a promotion may go.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Way {
    /// `triad promote`: a switchover if the primary answers, else a
    /// failover (`force`: its checks overridden).
    Operator { force: bool },
    /// Automatic failover: only if the primary does not answer at all, and
    /// only after every site has heard nothing from it for that long.
    Automatic(Duration),
    /// A switchover or nothing (`triad drill --switchover`).
    Planned,
}

/// The admin actions `triad promote` and `triad drill --switchover` send.
pub fn parse_action(action: &str) -> Option<Way> {
    match action {
        "promote" => Some(Way::Operator { force: false }),
        "promote-force" => Some(Way::Operator { force: true }),
        "promote-planned" => Some(Way::Planned),
        _ => None,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandoverRequest {
    pub to: String,
    pub epoch: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HandoverReply {
    /// Per dataset: the primary's head, acknowledged by the promoted site.
    pub heads: BTreeMap<String, u64>,
}

/// What `triad promote` reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PromoteReport {
    pub ok: bool,
    pub site: String,
    /// "switchover" or "failover".
    pub kind: String,
    pub from_epoch: u64,
    pub epoch: u64,
    pub old_primary: Option<String>,
    /// Per dataset: this site's head when it became the primary.
    pub heads: BTreeMap<String, u64>,
    /// Switchover: the old primary's heads (equal to `heads`: RPO 0).
    pub old_heads: BTreeMap<String, u64>,
    pub forced: bool,
    /// What the sites said about the old primary.
    pub evidence: Vec<String>,
    pub error: Option<String>,
    pub elapsed_seconds: f64,
    pub time_ns: i64,
}

impl PromoteReport {
    /// Records the old primary held that this site did not (a switchover
    /// reports both heads; 0 when it lost nothing).
    pub fn lost_records(&self) -> u64 {
        self.old_heads
            .iter()
            .map(|(d, h)| h.saturating_sub(self.heads.get(d).copied().unwrap_or(0)))
            .sum()
    }
}

impl Takeover {
    /// At the primary: the handover a promoting site asks for.
    pub(super) fn hand_over(&self, r: &HandoverRequest) -> Result<HandoverReply, AdminError> {
        let c = self.cluster();
        if c.primary.as_deref() != Some(self.site.as_str()) {
            return Err(AdminError::NotConfigured(format!(
                "{} is not the primary (epoch {}, primary {:?})",
                self.site, c.epoch, c.primary
            )));
        }
        if r.epoch != c.epoch {
            return Err(AdminError::NotConfigured(format!(
                "the epoch is {} here, not {}",
                c.epoch, r.epoch
            )));
        }
        if self.datasets().is_empty() {
            return Err(AdminError::Unavailable(
                "this site's datasets are not open yet".into(),
            ));
        }
        // A site that does not follow this one could not catch up: it gets
        // a moment to connect (it may be between retries after a cut link),
        // and is refused before writes stop if it does not.
        let absent = |wait: Duration| {
            let until = Instant::now() + wait;
            loop {
                let (datasets, upstream) =
                    self.attached.lock().map(|a| a.clone()).unwrap_or_default();
                let absent: Vec<String> = datasets
                    .iter()
                    .map(|ds| ds.name().to_string())
                    .filter(|name| {
                        !upstream.as_ref().is_some_and(|u| {
                            u.links_of(name)
                                .iter()
                                .any(|l| l.site == r.to && l.connected)
                        })
                    })
                    .collect();
                if absent.is_empty() || Instant::now() >= until {
                    return absent;
                }
                drop((datasets, upstream));
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        let absent = absent(CONNECT_WITHIN);
        if !absent.is_empty() {
            return Err(AdminError::NotConfigured(format!(
                "{} has not followed this site for the last {CONNECT_WITHIN:?} ({}), so it cannot catch up: promote it once it is connected",
                r.to,
                absent.join(", ")
            )));
        }
        // Each handover stops writes for up to HANDOVER_HOLD unless it
        // completes (a new epoch): a site that asks again and again without
        // completing would keep the primary fenced.
        if let Ok(mut last) = self.last_handover.lock() {
            if last.is_some_and(|(t, e)| e == c.epoch && t.elapsed() < HANDOVER_EVERY) {
                return Err(AdminError::Unavailable(format!(
                    "a handover was asked in this epoch less than {HANDOVER_EVERY:?} ago and did not complete"
                )));
            }
            *last = Some((Instant::now(), c.epoch));
        }
        if let Ok(mut h) = self.handover.lock() {
            *h = Some(Handover {
                to: r.to.clone(),
                until: Instant::now() + HANDOVER_HOLD,
                epoch: c.epoch,
            });
        }
        // A group the committer was building when the fence went up lands
        // before the heads are read; later ones are refused.
        self.drain();
        tracing::warn!(to = %r.to, epoch = c.epoch, "planned switchover: writes stopped; waiting for the new primary to hold the head");
        let deadline = Instant::now() + CATCH_UP;
        // A group the committer was building when the fence went up still
        // lands: heads are read again until the site has them all.
        loop {
            let (datasets, upstream) = self.attached.lock().map(|a| a.clone()).unwrap_or_default();
            let mut heads = BTreeMap::new();
            let mut behind = Vec::new();
            for ds in &datasets {
                let head = ds.head_seq();
                heads.insert(ds.name().to_string(), head);
                let acked = upstream
                    .as_ref()
                    .and_then(|u| {
                        u.links_of(ds.name())
                            .into_iter()
                            .find(|l| l.site == r.to && l.connected)
                    })
                    .map(|l| l.acked_seq);
                if acked.is_none_or(|a| a < head) {
                    behind.push(format!("{} at {:?} of {head}", ds.name(), acked));
                }
            }
            if behind.is_empty() {
                tracing::warn!(to = %r.to, heads = ?heads, "planned switchover: the new primary holds every record");
                return Ok(HandoverReply { heads });
            }
            if Instant::now() >= deadline {
                if let Ok(mut h) = self.handover.lock() {
                    *h = None;
                }
                self.refresh();
                return Err(AdminError::Unavailable(format!(
                    "{} did not catch up within {CATCH_UP:?} ({}); this site takes writes again",
                    r.to,
                    behind.join(", ")
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// At the site to promote: `triad promote [--force]`.
    pub fn promote(&self, way: Way) -> PromoteReport {
        let force = way == Way::Operator { force: true };
        let started = Instant::now();
        let c = self.cluster();
        let mut rep = PromoteReport {
            site: self.site.clone(),
            from_epoch: c.epoch,
            old_primary: c.primary.clone(),
            forced: force,
            time_ns: vault::dataset::now_ns(),
            ..PromoteReport::default()
        };
        let result = if self.datasets().is_empty() {
            Err("this site's datasets are not open yet: promote again in a moment".into())
        } else {
            self.try_promote(&c, way, &mut rep)
        };
        // Whatever happened, replication is taken again (a promoted site
        // restarts its datasets in the primary seat anyway).
        if let Ok(mut p) = self.promoting.lock() {
            *p = None;
        }
        self.refresh();
        if result.is_ok() && force && rep.kind == "failover" {
            if let Ok(mut h) = self.hold_until.lock() {
                *h = Some(Instant::now() + self.fence_after + MARGIN);
            }
        }
        let c = self.cluster();
        rep.epoch = c.epoch;
        rep.elapsed_seconds = started.elapsed().as_secs_f64();
        match result {
            Ok(()) => {
                rep.ok = true;
                tracing::warn!(report = ?rep, "PROMOTED: this site is the primary");
            }
            Err(e) => {
                rep.error = Some(e.clone());
                tracing::error!(report = ?rep, "promotion refused");
            }
        }
        self.record(&rep);
        rep
    }

    fn try_promote(
        &self,
        c: &super::Cluster,
        way: Way,
        rep: &mut PromoteReport,
    ) -> Result<(), String> {
        let force = way == Way::Operator { force: true };
        let silence = match way {
            Way::Automatic(t) => t,
            _ => self.fence_after + MARGIN,
        };
        let Some(old) = c.primary.clone() else {
            return Err("the takeover group has no primary registered yet".into());
        };
        if old == self.site {
            return Err(format!(
                "{} is already the primary of epoch {}",
                self.site, c.epoch
            ));
        }
        let ask = HandoverRequest {
            to: self.site.clone(),
            epoch: c.epoch,
        };
        let body = serde_json::to_vec(&ask).unwrap_or_default();
        let answer = if matches!(way, Way::Automatic(_)) {
            // Only asks whether the primary is there.
            match self.call(&old, "heard", Vec::new(), Duration::from_secs(3)) {
                Ok(_) => {
                    return Err(format!(
                        "{old} answers: it is not lost, so there is no automatic failover"
                    ))
                }
                Err(e) => Err(e),
            }
        } else {
            self.call(
                &old,
                "handover",
                body,
                CONNECT_WITHIN + CATCH_UP + Duration::from_secs(5),
            )
        };
        match answer {
            Ok(reply) => {
                rep.kind = "switchover".into();
                let reply: HandoverReply = serde_json::from_slice(&reply)
                    .map_err(|e| format!("{old} answered the handover with {e}"))?;
                rep.old_heads = reply.heads.clone();
                // Nothing past the old primary's heads is taken from here on.
                self.freeze(&reply.heads);
                rep.heads = self.wait_heads(&reply.heads)?;
                rep.evidence.push(format!(
                    "{old} stopped writes and confirmed this site holds its heads {:?}",
                    reply.heads
                ));
                self.agree(
                    c,
                    &rep.heads,
                    false,
                    format!("planned switchover from {old}"),
                )
            }
            Err(e) if !e.retryable() => Err(format!("{old} refused the handover: {e}")),
            Err(e) if way == Way::Planned => Err(format!(
                "{old} did not answer the handover ({e}); a planned switchover does not fail over"
            )),
            Err(e) => {
                rep.kind = "failover".into();
                rep.evidence
                    .push(format!("{old} did not answer a handover: {e}"));
                self.failover_checks(c, &old, force, silence, rep)?;
                // The heads it is promoted at: nothing more is taken from
                // the old primary (fenced, but a record may be in flight).
                self.freeze(&self.heads());
                rep.heads = self.heads();
                let reason = format!(
                    "failover from {old}{}: {}",
                    if force { " (FORCED)" } else { "" },
                    rep.evidence.join("; ")
                );
                self.agree(c, &rep.heads, force, reason)
            }
        }
    }

    /// The failover's conditions (see the module docs); `force` lets them
    /// pass, each named in the evidence.
    fn failover_checks(
        &self,
        c: &super::Cluster,
        old: &str,
        force: bool,
        silence: Duration,
        rep: &mut PromoteReport,
    ) -> Result<(), String> {
        let need = silence.max(self.fence_after + MARGIN);
        let silent = |h: &Heard| -> f64 { h.seconds.get(old).copied().unwrap_or(h.since_start) };
        let mine = self.heard();
        let mut problems = Vec::new();
        rep.evidence.push(format!(
            "{} last heard {old} {:.1}s ago",
            self.site,
            silent(&mine)
        ));
        if silent(&mine) < need.as_secs_f64() {
            problems.push(format!(
                "{} heard {old} {:.1}s ago; its lease may still run (it must be silent for {need:?})",
                self.site,
                silent(&mine),
            ));
        }
        let mut answered = 0;
        for site in self.links.keys().filter(|s| *s != old) {
            match self.call(site, "heard", Vec::new(), Duration::from_secs(3)) {
                Ok(b) => {
                    let h: Heard = serde_json::from_slice(&b)
                        .map_err(|e| format!("{site} answered with {e}"))?;
                    answered += 1;
                    rep.evidence.push(format!(
                        "{site} (epoch {}) last heard {old} {:.1}s ago",
                        h.epoch,
                        silent(&h)
                    ));
                    if h.epoch > c.epoch {
                        return Err(format!(
                            "{site} holds epoch {}, newer than this site's {}: wait until this site has caught up",
                            h.epoch, c.epoch
                        ));
                    }
                    if silent(&h) < need.as_secs_f64() {
                        problems.push(format!(
                            "{site} heard {old} {:.1}s ago: the primary may be alive (it must be silent for {need:?})",
                            silent(&h)
                        ));
                    }
                }
                Err(e) => rep.evidence.push(format!("{site} did not answer: {e}")),
            }
        }
        if answered == 0 {
            return Err(format!(
                "no other site answered, so this site alone is no majority; refusing (evidence: {})",
                rep.evidence.join("; ")
            ));
        }
        // Refused even with --force (the record refuses it too): the
        // copy lacks records that the history has for certain.
        for ds in self.datasets() {
            let begun = c.starts(ds.name()).last().map_or(1, |s| s.1);
            if ds.head_seq().saturating_add(1) < begun {
                return Err(format!(
                    "{} holds dataset {} only to seq {}, but epoch {} began at seq {begun}: its copy lacks records of the group's history (it may still be fetching it after a rejoin); promote it once it has caught up",
                    self.site,
                    ds.name(),
                    ds.head_seq(),
                    c.epoch
                ));
            }
        }
        if !c.sync.contains(&self.site) {
            problems.push(format!(
                "{} is not a sync follower of {old} (sync: {:?}): it may lack writes {old} acknowledged",
                self.site, c.sync
            ));
        }
        if problems.is_empty() {
            return Ok(());
        }
        if force {
            rep.evidence.extend(
                problems
                    .iter()
                    .map(|p| format!("overridden by --force: {p}")),
            );
            return Ok(());
        }
        Err(format!(
            "{}; promote again later, or with --force to take over anyway (recorded as forced)",
            problems.join("; ")
        ))
    }

    /// Waits until this site's heads reach `want` (they were acknowledged,
    /// so they are there already unless a commit is in flight).
    fn wait_heads(&self, want: &BTreeMap<String, u64>) -> Result<BTreeMap<String, u64>, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let heads = self.heads();
            let short: Vec<String> = want
                .iter()
                .filter(|(d, h)| heads.get(*d).is_none_or(|x| x < *h))
                .map(|(d, h)| format!("{d}: {:?} of {h}", heads.get(d)))
                .collect();
            if short.is_empty() {
                return Ok(heads);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "this site does not hold the old primary's heads: {}",
                    short.join(", ")
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Refuses replicated records past `heads` until the promotion ends,
    /// and waits until any group already being applied has landed.
    fn freeze(&self, heads: &BTreeMap<String, u64>) {
        if let Ok(mut p) = self.promoting.lock() {
            *p = Some(heads.clone());
        }
        self.drain();
    }

    /// Applies the fence now and waits until every group the committers
    /// were building meanwhile has landed.
    fn drain(&self) {
        self.refresh();
        for ds in self.datasets() {
            if let Err(e) = ds.barrier() {
                tracing::warn!(dataset = ds.name(), error = %e, "takeover: waiting for the committer");
            }
        }
    }

    fn heads(&self) -> BTreeMap<String, u64> {
        self.datasets()
            .iter()
            .map(|d| (d.name().to_string(), d.head_seq()))
            .collect()
    }

    fn agree(
        &self,
        c: &super::Cluster,
        heads: &BTreeMap<String, u64>,
        forced: bool,
        reason: String,
    ) -> Result<(), String> {
        self.propose(
            Command::Promote {
                site: self.site.clone(),
                from_epoch: c.epoch,
                heads: heads.clone(),
                sync: self.sync_when_primary.clone(),
                forced,
                reason,
                time_ns: vault::dataset::now_ns(),
            },
            Duration::from_secs(10),
        )
        .or_else(|e| {
            // An answer lost in a leader change while the command itself
            // was committed: the record says whether it was.
            let now = self.cluster();
            if now.epoch == c.epoch + 1 && now.primary.as_deref() == Some(self.site.as_str()) {
                Ok(())
            } else {
                Err(e.to_string())
            }
        })
    }

    /// Appends the report to `<data_dir>/takeover/promotions.jsonl`.
    fn record(&self, rep: &PromoteReport) {
        use std::io::Write;
        let path = self.dir.join("promotions.jsonl");
        let line = serde_json::to_string(rep).unwrap_or_default();
        let r = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| {
                writeln!(f, "{line}")?;
                f.sync_all()
            });
        if let Err(e) = r {
            tracing::error!(path = %path.display(), error = %e, "cannot record the promotion");
        }
    }
}

/// Automatic failover (`[failover] automatic = true`): a sync follower of
/// the primary that has heard nothing from it for `timeout` promotes itself
/// through the same checks as `triad promote`, asking that the remote has
/// not heard it for `timeout` either. The remote, an async follower, never
/// does (it may lack acknowledged writes): it is the tiebreaker, so a cut
/// same-city link alone promotes nobody. Each decision is logged with its
/// evidence and recorded in `promotions.jsonl`.
pub(super) fn watch(
    t: std::sync::Arc<Takeover>,
    timeout: Duration,
    stop: &std::sync::atomic::AtomicBool,
) {
    let mut next = Instant::now();
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(500));
        if Instant::now() < next {
            continue;
        }
        let c = t.cluster();
        let Some(primary) = c.primary.clone().filter(|p| *p != t.site) else {
            continue;
        };
        if !c.sync.contains(&t.site) {
            continue;
        }
        let h = t.heard();
        let silent = h.seconds.get(&primary).copied().unwrap_or(h.since_start);
        if silent < timeout.as_secs_f64() {
            continue;
        }
        tracing::warn!(primary = %primary, silent_seconds = silent, primary_timeout = ?timeout, "automatic failover: the primary has been silent past failover.primary_timeout; asking the other sites");
        let rep = t.promote(Way::Automatic(timeout));
        if !rep.ok {
            // Logged by promote; try again after another half timeout.
            next = Instant::now() + timeout / 2;
        }
    }
}
