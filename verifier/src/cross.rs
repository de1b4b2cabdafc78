//! Cross-site verify: comparing the three sites' `(seq, chain hash, digest)`
//! checkpoints. Two copies that agree on the chain hash at a seq agree on
//! the whole history up to it; the digest says their namespaces agree. With
//! three sites, a copy that disagrees with the other two is named by
//! majority, with the checkpoint range in which it parted and, when the
//! namespaces were fetched, the paths whose entries differ.
//!
//! This module only compares; fetching is the caller's (the daemon's
//! replication port, authenticated by the deployment's certificates).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

/// A namespace as compared: the seq it was read at, and path -> entry digest.
pub type PathDigests = (u64, BTreeMap<Vec<u8>, Vec<u8>>);

/// One site's answer (or why there is none).
#[derive(Debug, Clone, Default)]
pub struct SiteView {
    pub site: String,
    pub head_seq: u64,
    /// seq -> (chain hash, digest summary).
    pub checkpoints: BTreeMap<u64, ([u8; 32], [u8; 32])>,
    /// The seq the paths describe, and path -> entry digest.
    pub paths: Option<PathDigests>,
    /// The site's last scrub: (when, chunks left damaged, digest equal).
    pub scrub: Option<(i64, u64, bool)>,
    /// The epochs of its history, oldest first: (epoch, first seq). Empty
    /// when the site did not say (an older triad, or this site's copy read
    /// from disk).
    pub epochs: Vec<(u64, u64)>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SiteSummary {
    pub site: String,
    pub head_seq: u64,
    pub newest_checkpoint: Option<u64>,
    /// When its last scrub ran (ns), if it did, and what it left damaged.
    pub last_scrub_ns: Option<i64>,
    pub scrub_damaged_chunks: u64,
    pub scrub_digest_ok: bool,
    /// The newest epoch its history holds, when it said.
    pub epoch: Option<u64>,
    pub error: Option<String>,
}

/// The verdict.
#[derive(Debug, Clone, Serialize)]
pub struct CrossReport {
    pub dataset: String,
    pub sites: Vec<SiteSummary>,
    /// The highest checkpoint seq every reachable site has.
    pub compared_seq: Option<u64>,
    /// True when every site answered and all agree at `compared_seq`.
    pub agree: bool,
    /// True when the copies were compared and found to differ (a fork, no
    /// majority, or a site whose scrub found damage). Not agreeing without
    /// disagreeing means the comparison was incomplete: a site did not
    /// answer, or there is no common checkpoint yet.
    pub disagree: bool,
    /// The site that disagrees with the other two.
    pub odd_site: Option<String>,
    /// Sites whose last scrub left damaged chunks or a wrong digest: their
    /// checkpoints may agree while their stored bytes do not.
    pub damaged_sites: Vec<String>,
    /// The odd site still agreed with the majority at this checkpoint...
    pub agreed_until: Option<u64>,
    /// ...and no longer at this one: the chains parted in between.
    pub differs_from: Option<u64>,
    /// Paths whose entries differ between the odd site and the majority (at
    /// most 100), when the namespaces were compared.
    pub differing_paths: Vec<String>,
    /// The seqs the compared namespaces were at (odd site, majority site).
    pub paths_compared_at: Option<(u64, u64)>,
    /// The newest epoch an answering site holds, and the seq it began at.
    pub current_epoch: Option<(u64, u64)>,
    /// Sites whose log goes on past where it leaves the newest history (a
    /// former primary's tail, or a site that did not say its epochs):
    /// compared only below that seq.
    pub stale_sites: Vec<String>,
    pub verdict: String,
}

/// Compares the sites' checkpoints, and names sites whose last scrub found
/// damage (agreeing checkpoints say nothing about stored bytes).
pub fn compare(dataset: &str, sites: &[SiteView]) -> CrossReport {
    let up = || sites.iter().filter(|s| s.error.is_none());
    // The newest epoch an answering site holds. Every site that holds it
    // must say it began at the same seq; two starts for one epoch mean two
    // sites were promoted to it, and no comparison of chains can say which
    // history counts.
    let current = up().filter_map(|s| s.epochs.last().copied()).max();
    if let Some((epoch, start)) = current {
        let other = up().find_map(|s| {
            s.epochs
                .iter()
                .find(|(e, st)| *e == epoch && *st != start)
                .map(|(_, st)| (s.site.as_str(), *st))
        });
        if let Some((site, st)) = other {
            let mut r = blank(dataset, sites);
            r.current_epoch = current;
            r.disagree = true;
            r.verdict = format!(
                "the sites disagree on where epoch {epoch} began (seq {start}, and seq {st} at \
                 {site}): two sites took the same epoch; see the runbook on split brain"
            );
            return r;
        }
    }
    // The newest history, as a site that holds its newest epoch says. Each
    // other site is compared only below the first epoch start of it that
    // the site does not hold: from there on its log is a former primary's
    // writes (or, from a site that did not say its epochs, unknown). One
    // whose head is not past that seq is only behind, not stale.
    let newest: Vec<(u64, u64)> = current
        .and_then(|c| up().find(|s| s.epochs.last() == Some(&c)))
        .map(|s| s.epochs.clone())
        .unwrap_or_default();
    let cut_of = |s: &SiteView| -> Option<u64> {
        if newest.len() < 2 {
            return None;
        }
        if s.epochs.is_empty() {
            return Some(newest[1].1);
        }
        newest.iter().find(|e| !s.epochs.contains(e)).map(|e| e.1)
    };
    let stale: Vec<(&str, u64)> = up()
        .filter_map(|s| {
            cut_of(s)
                .filter(|cut| s.head_seq >= *cut)
                .map(|cut| (s.site.as_str(), cut))
        })
        .collect();
    let compared: Vec<SiteView> = sites
        .iter()
        .map(|s| match cut_of(s) {
            Some(cut) => SiteView {
                checkpoints: s.checkpoints.range(..cut).map(|(k, v)| (*k, *v)).collect(),
                paths: if stale.iter().any(|(n, _)| *n == s.site) {
                    None
                } else {
                    s.paths.clone()
                },
                ..s.clone()
            },
            None => s.clone(),
        })
        .collect();
    let mut r = compare_chains(dataset, &compared);
    r.sites = sites.iter().map(summary).collect();
    r.current_epoch = current;
    if let (false, Some((epoch, _))) = (stale.is_empty(), current) {
        r.agree = false;
        r.stale_sites = stale.iter().map(|(n, _)| n.to_string()).collect();
        let each: Vec<String> = stale
            .iter()
            .map(|(n, cut)| format!("{n} below seq {cut}"))
            .collect();
        r.verdict.push_str(&format!(
            "; not holding the history of epoch {epoch}, compared only below where they leave \
             it: {} (a site's log from there on is a former primary's writes, or unknown when \
             it did not say its epochs; let it rejoin, see the runbook on rejoin)",
            each.join(", ")
        ));
    }
    r.damaged_sites = sites
        .iter()
        .filter(|s| {
            s.scrub
                .is_some_and(|(_, bad, digest_ok)| bad > 0 || !digest_ok)
        })
        .map(|s| s.site.clone())
        .collect();
    if !r.damaged_sites.is_empty() {
        r.agree = false;
        r.disagree = true;
        r.verdict.push_str(&format!(
            "; the last scrub at {} found damage (run `triad verify --scrub --repair` there)",
            r.damaged_sites.join(", ")
        ));
    }
    r
}

fn summary(s: &SiteView) -> SiteSummary {
    SiteSummary {
        site: s.site.clone(),
        head_seq: s.head_seq,
        newest_checkpoint: s.checkpoints.keys().next_back().copied(),
        last_scrub_ns: s.scrub.map(|x| x.0),
        scrub_damaged_chunks: s.scrub.map(|x| x.1).unwrap_or(0),
        scrub_digest_ok: s.scrub.is_none_or(|x| x.2),
        epoch: s.epochs.last().map(|e| e.0),
        error: s.error.clone(),
    }
}

/// A report with the sites named and nothing concluded yet.
fn blank(dataset: &str, sites: &[SiteView]) -> CrossReport {
    CrossReport {
        dataset: dataset.to_string(),
        sites: sites.iter().map(summary).collect(),
        compared_seq: None,
        agree: false,
        disagree: false,
        odd_site: None,
        damaged_sites: Vec::new(),
        agreed_until: None,
        differs_from: None,
        differing_paths: Vec::new(),
        paths_compared_at: None,
        current_epoch: None,
        stale_sites: Vec::new(),
        verdict: String::new(),
    }
}

fn compare_chains(dataset: &str, sites: &[SiteView]) -> CrossReport {
    let mut r = blank(dataset, sites);
    let up: Vec<&SiteView> = sites.iter().filter(|s| s.error.is_none()).collect();
    let down: Vec<&str> = sites
        .iter()
        .filter(|s| s.error.is_some())
        .map(|s| s.site.as_str())
        .collect();
    if up.len() < 2 {
        r.verdict = format!(
            "cannot compare: only {} site(s) answered (unreachable: {})",
            up.len(),
            down.join(", ")
        );
        return r;
    }
    let mut common: BTreeSet<u64> = up[0].checkpoints.keys().copied().collect();
    for s in &up[1..] {
        common.retain(|q| s.checkpoints.contains_key(q));
    }
    let Some(&seq) = common.iter().next_back() else {
        r.verdict = "the sites have no checkpoint in common yet (one is written every 256 \
                     records); try again later"
            .into();
        return r;
    };
    r.compared_seq = Some(seq);
    // Group the sites by what they hold at `seq`.
    let mut groups: BTreeMap<([u8; 32], [u8; 32]), Vec<&SiteView>> = BTreeMap::new();
    for s in &up {
        groups.entry(s.checkpoints[&seq]).or_default().push(s);
    }
    if groups.len() == 1 {
        r.agree = down.is_empty();
        r.verdict = if down.is_empty() {
            format!("all {} copies agree at seq {seq}", up.len())
        } else {
            format!(
                "the {} reachable copies agree at seq {seq}; not compared: {}",
                up.len(),
                down.join(", ")
            )
        };
        return r;
    }
    let mut by_size: Vec<&Vec<&SiteView>> = groups.values().collect();
    by_size.sort_by_key(|g| std::cmp::Reverse(g.len()));
    let (majority, minority) = (by_size[0], by_size[1]);
    r.disagree = true;
    if majority.len() < 2 || minority.len() != 1 || by_size.len() > 2 {
        r.verdict = format!(
            "the copies disagree at seq {seq} and no majority names an odd one out ({} groups)",
            groups.len()
        );
        return r;
    }
    let odd = minority[0];
    let good = majority[0];
    r.odd_site = Some(odd.site.clone());
    for q in &common {
        if odd.checkpoints[q] == good.checkpoints[q] {
            r.agreed_until = Some(*q);
        } else {
            r.differs_from = Some(*q);
            break;
        }
    }
    if let (Some((oseq, op)), Some((gseq, gp))) = (&odd.paths, &good.paths) {
        r.paths_compared_at = Some((*oseq, *gseq));
        let keys: BTreeSet<&Vec<u8>> = op.keys().chain(gp.keys()).collect();
        for k in keys {
            if op.get(k) != gp.get(k) {
                r.differing_paths
                    .push(String::from_utf8_lossy(k).into_owned());
                if r.differing_paths.len() >= 100 {
                    break;
                }
            }
        }
    }
    r.verdict = format!(
        "{} disagrees with {} at seq {seq}: its chain parted after checkpoint {} and before \
         checkpoint {}",
        odd.site,
        majority
            .iter()
            .map(|s| s.site.as_str())
            .collect::<Vec<_>>()
            .join(" and "),
        r.agreed_until
            .map(|q| q.to_string())
            .unwrap_or_else(|| "none (from the start)".into()),
        r.differs_from.unwrap_or(seq)
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(name: &str, cps: &[(u64, u8)]) -> SiteView {
        SiteView {
            site: name.into(),
            head_seq: cps.last().map(|c| c.0 + 10).unwrap_or(0),
            checkpoints: cps
                .iter()
                .map(|(q, h)| (*q, ([*h; 32], [*h; 32])))
                .collect(),
            ..SiteView::default()
        }
    }

    #[test]
    fn equal_copies_agree_at_the_highest_common_checkpoint() {
        let a = site("a", &[(256, 1), (512, 2), (768, 3)]);
        let b = site("b", &[(256, 1), (512, 2), (768, 3)]);
        let c = site("c", &[(256, 1), (512, 2)]);
        let r = compare("d", &[a, b, c]);
        assert!(r.agree && !r.disagree);
        assert_eq!(r.compared_seq, Some(512));
    }

    #[test]
    fn the_odd_one_out_is_named_with_where_it_parted_and_the_paths() {
        let a = site("a", &[(256, 1), (512, 2), (768, 3)]);
        let b = site("b", &[(256, 1), (512, 2), (768, 3)]);
        let mut c = site("c", &[(256, 1), (512, 9), (768, 9)]);
        let mut a2 = a.clone();
        a2.paths = Some((
            768,
            [(b"x".to_vec(), vec![1]), (b"y".to_vec(), vec![2])].into(),
        ));
        c.paths = Some((
            768,
            [(b"x".to_vec(), vec![1]), (b"y".to_vec(), vec![3])].into(),
        ));
        let r = compare("d", &[a2, b, c]);
        assert!(!r.agree && r.disagree);
        assert_eq!(r.odd_site.as_deref(), Some("c"));
        assert_eq!((r.agreed_until, r.differs_from), (Some(256), Some(512)));
        assert_eq!(r.differing_paths, vec!["y"]);
        assert!(
            r.verdict.contains("c disagrees with a and b"),
            "{}",
            r.verdict
        );
    }

    #[test]
    fn a_site_whose_scrub_found_damage_is_named_though_its_chain_agrees() {
        let a = site("a", &[(256, 1)]);
        let mut b = site("b", &[(256, 1)]);
        b.scrub = Some((5, 1, true));
        let c = site("c", &[(256, 1)]);
        let r = compare("d", &[a, b, c]);
        assert!(!r.agree && r.disagree);
        assert_eq!(r.damaged_sites, vec!["b"]);
        assert!(
            r.verdict.contains("scrub at b found damage"),
            "{}",
            r.verdict
        );
    }

    #[test]
    fn sites_that_have_not_learned_the_newest_epoch_never_outvote_the_new_primary() {
        // a (the former primary) and c (the remote, not rejoined yet) hold
        // a tail of epoch 1 past seq 600, where epoch 2 began at b.
        let old = [(256, 1), (512, 2), (768, 3)];
        let mut a = site("a", &old);
        let mut b = site("b", &[(256, 1), (512, 2), (768, 9)]);
        let mut c = site("c", &old);
        // Without epochs, two against one names the new primary odd.
        let r = compare("d", &[a.clone(), b.clone(), c.clone()]);
        assert_eq!(r.odd_site.as_deref(), Some("b"));
        a.epochs = vec![(1, 1)];
        c.epochs = vec![(1, 1)];
        b.epochs = vec![(1, 1), (2, 600)];
        let r = compare("d", &[a.clone(), b.clone(), c.clone()]);
        assert_eq!(r.odd_site, None, "{}", r.verdict);
        assert_eq!(r.compared_seq, Some(512));
        assert!(!r.agree && !r.disagree, "{}", r.verdict);
        assert_eq!(r.stale_sites, vec!["a", "c"]);
        assert_eq!(r.current_epoch, Some((2, 600)));
        assert!(
            r.verdict.contains(
                "epoch 2, compared only below where they leave it: a below seq 600, c below seq 600"
            ),
            "{}",
            r.verdict
        );
        // Its summary still shows everything the stale site holds.
        assert_eq!(r.sites[0].newest_checkpoint, Some(768));
        assert_eq!(r.sites[1].epoch, Some(2));
        // Once c has learned epoch 2 (and holds b's history), a alone is
        // stale, and still compared below seq 600, where it must agree.
        c = site("c", &[(256, 1), (512, 2), (768, 9)]);
        c.epochs = b.epochs.clone();
        let r = compare("d", &[a.clone(), b.clone(), c.clone()]);
        assert!(!r.agree && r.odd_site.is_none(), "{}", r.verdict);
        assert_eq!(
            (r.compared_seq, r.stale_sites.clone()),
            (Some(512), vec!["a".to_string()])
        );
        a.checkpoints.insert(512, ([7; 32], [7; 32]));
        let r = compare("d", &[a, b, c]);
        assert_eq!(r.odd_site.as_deref(), Some("a"), "{}", r.verdict);
        assert!(r.disagree);
    }

    #[test]
    fn a_stale_site_is_cut_where_it_forked_and_one_only_behind_or_silent_is_judged_fairly() {
        // a forked at 600 (epoch 2 began there at c); later b took epoch
        // 3 at 900. a holds its own epoch-1 records 600-899.
        let mut a = site("a", &[(256, 1), (512, 2), (768, 7)]);
        let mut b = site("b", &[(256, 1), (512, 2), (768, 3)]);
        let mut c = site("c", &[(256, 1), (512, 2), (768, 3)]);
        a.epochs = vec![(1, 1)];
        b.epochs = vec![(1, 1), (2, 600), (3, 900)];
        c.epochs = vec![(1, 1), (2, 600)];
        let r = compare("d", &[a.clone(), b.clone(), c.clone()]);
        // a is cut at 600, not 900: its seq-768 checkpoint is not compared.
        assert!(!r.disagree && r.odd_site.is_none(), "{}", r.verdict);
        assert_eq!(r.stale_sites, vec!["a"], "{}", r.verdict);
        assert!(r.verdict.contains("a below seq 600"), "{}", r.verdict);
        // c is cut at 900, past its head: behind, not stale.
        assert!(!r.stale_sites.contains(&"c".to_string()));
        // A follower that has not learned epoch 2 but is below 600 is only
        // behind.
        let mut lag = site("c", &[(256, 1), (512, 2)]);
        lag.epochs = vec![(1, 1)];
        let mut b2 = b.clone();
        b2.epochs = vec![(1, 1), (2, 600)];
        let mut a2 = site("a", &[(256, 1), (512, 2), (768, 3)]);
        a2.epochs = b2.epochs.clone();
        let r = compare("d", &[a2, b2, lag]);
        assert!(r.agree && r.stale_sites.is_empty(), "{}", r.verdict);
        // A site that says nothing of its epochs (an older triad, or this
        // site read from disk) is compared only below epoch 2 too: with a
        // silent partner it cannot outvote the new primary.
        a.epochs.clear();
        c = site("c", &[(256, 1), (512, 2), (768, 7)]);
        b.epochs = vec![(1, 1), (2, 600)];
        let r = compare("d", &[a, b, c]);
        assert_eq!(r.odd_site, None, "{}", r.verdict);
        assert_eq!(r.stale_sites, vec!["a", "c"], "{}", r.verdict);
    }

    #[test]
    fn two_starts_for_one_epoch_are_a_split_brain_and_nobody_is_compared() {
        let mut a = site("a", &[(256, 1)]);
        let mut b = site("b", &[(256, 1)]);
        let c = site("c", &[(256, 1)]);
        a.epochs = vec![(1, 1), (2, 300)];
        b.epochs = vec![(1, 1), (2, 290)];
        let r = compare("d", &[a, b, c]);
        assert!(!r.agree && r.disagree);
        assert!(
            r.verdict.contains("disagree on where epoch 2 began"),
            "{}",
            r.verdict
        );
    }

    #[test]
    fn without_a_majority_or_enough_answers_nobody_is_blamed() {
        let a = site("a", &[(256, 1)]);
        let b = site("b", &[(256, 2)]);
        let mut c = site("c", &[(256, 3)]);
        let r = compare("d", &[a.clone(), b.clone(), c.clone()]);
        assert!(r.odd_site.is_none() && !r.agree && r.disagree);
        c.error = Some("unreachable".into());
        let r = compare("d", &[a.clone(), c]);
        assert!(r.verdict.contains("cannot compare"), "{}", r.verdict);
        // Not comparing is not a disagreement: no mismatch is counted.
        assert!(!r.agree && !r.disagree);
        let r = compare("d", &[a.clone(), b.clone(), site("c", &[])]);
        assert!(
            r.verdict.contains("no checkpoint in common"),
            "{}",
            r.verdict
        );
        assert!(!r.agree && !r.disagree);
    }
}
