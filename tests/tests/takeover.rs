//! Takeover with three real daemons over mutual TLS, in a `[takeover]`
//! group: failover after SIGKILL of the primary under acknowledged puts
//! (checked against the writer's own log of acknowledgements), the remote
//! re-following the new primary, the old primary fenced and rejoining; a
//! primary cut off from both others fencing itself before the same-city
//! site is promoted; a cut same-city link alone never promoting; a
//! planned switchover and back that loses nothing; every site's archive
//! restoring the new history after a failover while the former primary's
//! archived tail stays as evidence; and a former primary's unlogged files
//! kept as evidence when its directory tree follows the new primary.
//!
//! A loop of random SIGKILLs, partitions and promotions under a steady
//! load ends with every acknowledged write at the final primary and the
//! three copies equal (`TRIAD_TAKEOVER_ROUNDS`, default 4; the long run
//! uses 50).
//!
//! Every link between two sites runs through a cutting proxy.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::deploy::*;
use common::proxy::Proxy;
use common::*;

/// The group's `fence_after`: short, so a failover is allowed soon.
const FENCE_AFTER: &str = "2s";

const NAMES: [&str; 3] = ["zjk-a", "zjk-b", "sjz-c"];

struct Group {
    d: Deployment,
    /// `[failover]` lines added to every config (only a sync follower of
    /// the primary ever acts on them).
    failover: String,
    /// zjk-b gives zjk-a `mode = "sync"`, so that once promoted it keeps
    /// RPO 0 with zjk-a as its sync follower (and zjk-a may fail over
    /// back); otherwise a promoted zjk-b serves both others asynchronously.
    b_sync_to_a: bool,
    /// A directory dataset (each site's `tree`) instead of a pushed one.
    directory: bool,
    /// One proxy per directed link: `links[from][to]` (None on the diagonal).
    links: Vec<Vec<Option<Proxy>>>,
}

impl Group {
    fn new() -> Group {
        Group::build("", false)
    }

    /// With automatic failover after `primary_timeout` of silence.
    fn automatic(primary_timeout: &str) -> Group {
        Group::build(
            &format!("[failover]\nautomatic = true\nprimary_timeout = \"{primary_timeout}\"\n\n"),
            false,
        )
    }

    fn build(failover: &str, b_sync_to_a: bool) -> Group {
        let d = Deployment::new(None);
        let links = (0..3)
            .map(|from| {
                (0..3)
                    .map(|to| (from != to).then(|| Proxy::new(d.ports[to])))
                    .collect()
            })
            .collect();
        let g = Group {
            failover: failover.to_string(),
            b_sync_to_a,
            directory: false,
            links,
            d,
        };
        g.configure();
        g
    }

    /// A group whose dataset is a directory: `tree` in each site's temp
    /// dir, the primary's source and the followers' standby trees.
    fn directories() -> Group {
        let mut g = Group::build("", false);
        g.directory = true;
        for s in [&g.d.a, &g.d.b, &g.d.c] {
            std::fs::create_dir_all(tree(s)).unwrap();
        }
        g.configure();
        g
    }

    fn link(&self, from: usize, to: usize) -> &Proxy {
        self.links[from][to]
            .as_ref()
            .expect("a link between two sites")
    }

    fn site(&self, i: usize) -> &Site {
        [&self.d.a, &self.d.b, &self.d.c][i]
    }

    fn site_mut(&mut self, i: usize) -> &mut Site {
        match i {
            0 => &mut self.d.a,
            1 => &mut self.d.b,
            _ => &mut self.d.c,
        }
    }

    /// Each site lists both others, every link through its proxy. zjk-a
    /// starts as the primary with zjk-b sync and sjz-c async.
    fn configure(&self) {
        let d = &self.d;
        let certs = &d.names.certs;
        for (i, s) in [&d.a, &d.b, &d.c].into_iter().enumerate() {
            let name = NAMES[i];
            let (role, upstream) = if i == 0 {
                ("primary", "")
            } else {
                ("follower", "upstream = \"zjk-a\"\n")
            };
            let mode = |j: usize| match (i, j) {
                (0, 1) => Some("sync"),
                (0, 2) => Some("async"),
                (1, 0) if self.b_sync_to_a => Some("sync"),
                _ => None,
            };
            let peers: String = (0..3)
                .filter(|j| *j != i)
                .map(|j| peer(NAMES[j], self.link(i, j).port, mode(j)))
                .collect();
            let source = if self.directory {
                format!(
                    "{{ kind = \"directory\", path = \"{}\", debounce = \"50ms\" }}",
                    tree(s).display()
                )
            } else {
                "{ kind = \"pushed\" }".to_string()
            };
            s.set_config(&format!(
                "[site]\nname = \"{name}\"\nrole = \"{role}\"\ndata_dir = \"{}\"\n{upstream}\n[listen]\nreplication = \"127.0.0.1:{}\"\nhttp = \"127.0.0.1:{}\"\n\n{}\n{peers}[takeover]\nfence_after = \"{FENCE_AFTER}\"\n\n{}[[dataset]]\nname = \"files\"\nkey_file = \"{}\"\nsource = {source}\n",
                s.data.display(),
                d.ports[i],
                d.http[i],
                tls(certs, name),
                self.failover,
                s.key.display(),
            ));
        }
    }

    fn start(&mut self) {
        self.d.start();
    }

    /// Gives every site its own archive, a `file://` store in its temp dir,
    /// shipping every 500 ms.
    fn with_archives(&self) {
        for s in [&self.d.a, &self.d.b, &self.d.c] {
            let mut text = std::fs::read_to_string(&s.config).unwrap();
            text.push_str(&format!(
                "\n[archive]\nurl = \"file://{}\"\nlog_flush_interval = \"500ms\"\n",
                archive_dir(s).display()
            ));
            s.set_config(&text);
        }
    }

    /// SIGTERM to every site; each must stop cleanly.
    fn stop(&mut self) {
        for (i, name) in NAMES.iter().enumerate() {
            assert!(self.site_mut(i).stop().success(), "{name}");
        }
    }

    /// Cuts (or restores) every link of site `i`.
    fn isolate(&self, i: usize, cut: bool) {
        for j in (0..3).filter(|j| *j != i) {
            self.link(i, j).set_cut(cut);
            self.link(j, i).set_cut(cut);
        }
    }

    /// Cuts (or restores) the link between sites `i` and `j`, both ways.
    fn cut_between(&self, i: usize, j: usize, cut: bool) {
        self.link(i, j).set_cut(cut);
        self.link(j, i).set_cut(cut);
    }
}

fn takeover_of(site: &Site) -> Option<serde_json::Value> {
    let v = site.status()?;
    if v["pid"].as_u64() != site.pid().map(|p| p as u64) {
        return None;
    }
    Some(v["takeover"].clone())
}

/// Waits until `site` is the unfenced primary of an epoch ≥ `epoch`.
fn wait_primary(site: &Site, epoch: u64, timeout: Duration) {
    let start = Instant::now();
    loop {
        if let Some(t) = takeover_of(site) {
            // Once it leads the Raft group too, its heartbeats show the
            // others it is alive.
            if t["seat"] == "primary"
                && t["fenced"] == false
                && t["epoch"].as_u64() >= Some(epoch)
                && t["leader"] == t["primary"]
            {
                return;
            }
        }
        assert!(
            start.elapsed() < timeout,
            "not the primary within {timeout:?}: {:?}\n{}",
            takeover_of(site),
            site.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `site` follows `primary` at an epoch ≥ `epoch`.
fn wait_follower(site: &Site, primary: &str, epoch: u64, timeout: Duration) -> serde_json::Value {
    until(
        &format!("{} to follow {primary}", site.log.display()),
        timeout,
        || {
            let t = takeover_of(site)?;
            (t["seat"] == "follower"
                && t["primary"] == primary
                && t["epoch"].as_u64() >= Some(epoch))
            .then_some(t)
        },
    )
}

fn put(site: &Site, file: &Path, name: &str) -> Output {
    site.cli(&["put", "--dataset", "files", &file.to_string_lossy(), name])
}

/// Puts `file` as `name` and fails the test, with the CLI's error and the
/// site's log, if it was not acknowledged.
fn put_ok(site: &Site, file: &Path, name: &str) {
    let o = put(site, file, name);
    assert!(
        o.status.success(),
        "put {name} refused: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        site.log_text()
    );
}

fn get(site: &Site, name: &str, dest: &Path) -> Output {
    site.cli(&["get", "--dataset", "files", name, &dest.to_string_lossy()])
}

/// Puts `<tag>-<n>` objects at `site` until `stop`, one after another,
/// recording each acknowledged name with the time its acknowledgement came.
struct Writer {
    acked: Arc<Mutex<Vec<(String, Instant)>>>,
    refused: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Writes `name`'s content into `dir` and puts it with `triad put` at the
/// site whose config is `config`.
fn put_new(dir: &Path, config: &Path, name: &str) -> Output {
    let file = dir.join(name);
    std::fs::write(&file, content(name)).unwrap();
    std::process::Command::new(triad_bin())
        .args(["put", "--dataset", "files"])
        .arg(&file)
        .arg(name)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

fn content(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.extend(std::iter::repeat_n(b'x', 3000));
    v.extend(name.as_bytes());
    v
}

impl Writer {
    fn start(config: PathBuf, dir: PathBuf, tag: &str) -> Writer {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, r, s, tag) = (
            acked.clone(),
            refused.clone(),
            stop.clone(),
            tag.to_string(),
        );
        std::fs::create_dir_all(&dir).unwrap();
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                let name = format!("{tag}-{n:06}");
                n += 1;
                let o = put_new(&dir, &config, &name);
                if o.status.success() {
                    a.lock().unwrap().push((name, Instant::now()));
                } else {
                    r.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&o.stderr).into_owned());
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        });
        Writer {
            acked,
            refused,
            stop,
            thread: Some(thread),
        }
    }

    fn stop(&mut self) -> (Vec<(String, Instant)>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        (
            self.acked.lock().unwrap().clone(),
            self.refused.lock().unwrap().clone(),
        )
    }
}

/// Every name is served by `site` with the content its writer put.
fn assert_has_all(site: &Site, names: &[String], scratch: &Path) {
    for name in names {
        let dest = scratch.join(format!("check-{name}"));
        let o = get(site, name, &dest);
        assert!(
            o.status.success(),
            "{name} was acknowledged but {} does not have it: {}",
            site.log.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(std::fs::read(&dest).unwrap(), content(name), "{name}");
        std::fs::remove_file(&dest).unwrap();
    }
}

fn tree(site: &Site) -> PathBuf {
    site.tmp.path().join("tree")
}

fn archive_dir(site: &Site) -> PathBuf {
    site.tmp.path().join("archive")
}

/// `triad restore --from-archive` of `site`'s own archive (latest) into a
/// new directory; returns the names restored.
fn restore_archive(site: &Site, to: &Path) -> Vec<String> {
    let o = std::process::Command::new(triad_bin())
        .arg("restore")
        .arg("--from-archive")
        .arg(format!("file://{}", archive_dir(site).display()))
        .args([
            "--dataset",
            "files",
            "--at",
            "latest",
            "--config",
            "/nonexistent/triad.toml",
        ])
        .arg("--key-file")
        .arg(&site.key)
        .arg("--to")
        .arg(to)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "restore of {}: {}",
        archive_dir(site).display(),
        String::from_utf8_lossy(&o.stderr)
    );
    let mut names: Vec<String> = std::fs::read_dir(to)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn promote(site: &Site, force: bool) -> (bool, serde_json::Value) {
    let mut args = vec!["promote", "--json"];
    if force {
        args.push("--force");
    }
    let o = site.cli(&args);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "promote printed no report ({e}): {}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    (o.status.success(), v)
}

#[test]
fn failover_after_sigkill_under_sync_puts_loses_no_acknowledged_write() {
    let mut g = Group::new();
    g.start();
    wait_primary(&g.d.a, 1, Duration::from_secs(60));
    let scratch = g.d.a.tmp.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();

    let mut w = Writer::start(g.d.a.config.clone(), g.d.a.tmp.path().join("w1"), "one");
    until("20 acknowledged puts", Duration::from_secs(60), || {
        (w.acked.lock().unwrap().len() >= 20).then_some(())
    });
    g.d.a.kill9();
    let killed = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    let (acked, _) = w.stop();
    let names: Vec<String> = acked.iter().map(|(n, _)| n.clone()).collect();

    // At once, the same-city site refuses: the primary was heard from
    // moments ago, and its lease may still run.
    let (ok, rep) = promote(&g.d.b, false);
    assert!(!ok, "promoted while the primary's lease could run: {rep}");
    assert!(
        rep["error"]
            .as_str()
            .unwrap_or("")
            .contains("lease may still run"),
        "{rep}"
    );

    // Once both the same-city site and the remote have heard nothing for
    // fence_after plus the margin, it is promoted.
    std::thread::sleep(Duration::from_secs(5).saturating_sub(killed.elapsed()));
    let (ok, rep) = promote(&g.d.b, false);
    assert!(ok, "{rep}\n{}", g.d.b.log_text());
    assert_eq!(rep["kind"], "failover", "{rep}");
    assert_eq!(rep["epoch"], 2, "{rep}");
    assert_eq!(rep["forced"], false, "{rep}");
    assert!(rep["rto_seconds"].as_f64().is_some(), "{rep}");
    wait_primary(&g.d.b, 2, Duration::from_secs(30));

    // RPO 0: every put the old primary acknowledged is at the new one.
    assert_has_all(&g.d.b, &names, &scratch);

    // The remote follows the new primary, and writes made there reach it.
    wait_follower(&g.d.c, "zjk-b", 2, Duration::from_secs(30));
    let after = scratch.join("after-1");
    std::fs::write(&after, content("after-1")).unwrap();
    let o = put(&g.d.b, &after, "after-1");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    until(
        "the remote to serve after-1",
        Duration::from_secs(30),
        || {
            get(&g.d.c, "after-1", &scratch.join("c-after-1"))
                .status
                .success()
                .then_some(())
        },
    );
    // Its log was a prefix of the new history: no state transfer.
    assert!(
        !g.d.c.log_text().contains("receiving a state transfer"),
        "{}",
        g.d.c.log_text()
    );

    // The old primary comes back fenced: it learns epoch 2 from the others,
    // refuses puts, and rejoins as a follower of zjk-b.
    g.d.a.start();
    let t = wait_follower(&g.d.a, "zjk-b", 2, Duration::from_secs(60));
    assert_eq!(t["fenced"], true, "{t}");
    let o = put(&g.d.a, &after, "at-old-primary");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("FENCED"), "{err}");
    let puts = until("the refusal to be counted", Duration::from_secs(10), || {
        let v = g.d.a.status()?;
        (v["puts"]["fenced_refusals"].as_u64()? >= 1).then_some(v)
    });
    assert!(puts["puts"]["fenced_refusals"].as_u64() >= Some(1));

    // The three copies agree once the old primary has caught up.
    let after2 = scratch.join("after-2");
    std::fs::write(&after2, content("after-2")).unwrap();
    put_ok(&g.d.b, &after2, "after-2");
    wait_replicated(&g.d.b, &[&g.d.a, &g.d.c], Duration::from_secs(60));
    assert_has_all(&g.d.a, &names, &scratch);
    // Cross-site verify hears epoch 2 from every site, each with evidence
    // that checks under the dataset's key, and finds none stale.
    let out = g.d.b.cli(&["verify", "--dataset", "files", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    for s in v["sites"].as_array().unwrap() {
        assert!(s["error"].is_null(), "{v}");
        assert_eq!(s["epoch"], 2, "{v}");
    }
    assert_eq!(v["current_epoch"][0], 2, "{v}");
    assert_eq!(v["stale_sites"], serde_json::json!([]), "{v}");

    // Whatever the old primary logged past the fork point is evidence,
    // not silently gone: each cut record names its seq and epoch 1.
    for e in std::fs::read_dir(g.d.a.data.join("evidence"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let ev: serde_json::Value =
            serde_json::from_slice(&std::fs::read(e.path().join("evidence.json")).unwrap())
                .unwrap();
        assert_eq!(ev["epoch"], 2, "{ev}");
        for r in ev["records"].as_array().unwrap() {
            assert_eq!(r["epoch"], 1, "{ev}");
        }
    }
    g.stop();
}

/// The former primary logged (and archived) a write no other site
/// acknowledged, then died; the same-city site was promoted. Every site's
/// archive then restores the new history: the new primary's holds both
/// epochs, and the former primary's, after it rejoined, keeps its own
/// unacknowledged record as evidence (a piece named by epoch 1) while the
/// new epoch's records are archived beside it, not over it.
#[test]
fn after_a_failover_every_archive_restores_the_new_history_and_the_former_primarys_tail_stays_as_evidence(
) {
    let mut g = Group::new();
    g.with_archives();
    g.start();
    wait_primary(&g.d.a, 1, Duration::from_secs(60));
    let dir = g.d.a.tmp.path().join("p");
    std::fs::create_dir_all(&dir).unwrap();
    let mut acked = Vec::new();
    for i in 0..5 {
        let name = format!("pre-{i}");
        let f = dir.join(&name);
        std::fs::write(&f, content(&name)).unwrap();
        put_ok(&g.d.a, &f, &name);
        acked.push(name);
    }
    // Cut off from both others, zjk-a still takes the next put while its
    // lease runs: logged there (and archived there) but never acknowledged
    // and never seen elsewhere. (Refused as FENCED when the lease had
    // already run out: then the group is joined again and it is retried.)
    let f = dir.join("unacked");
    std::fs::write(&f, content("unacked")).unwrap();
    let mut logged = false;
    let (acked_head, _, _) = wait_replicated(&g.d.a, &[&g.d.b, &g.d.c], Duration::from_secs(60));
    for _ in 0..5 {
        wait_primary(&g.d.a, 1, Duration::from_secs(60));
        g.isolate(0, true);
        let o = put(&g.d.a, &f, "unacked");
        assert!(!o.status.success(), "acknowledged while cut off");
        // "seq N is durable here but not acknowledged" (FENCED while it
        // waited), or "... durable at this site but sync follower ...":
        // logged either way; a refusal before logging says neither.
        logged = String::from_utf8_lossy(&o.stderr).contains("is durable");
        if logged {
            break;
        }
        g.isolate(0, false);
    }
    assert!(logged, "zjk-a never logged the put while cut off");
    g.d.a.wait_shipped(acked_head + 1, Duration::from_secs(30));
    g.d.a.kill9();
    g.isolate(0, false);
    let started = Instant::now();
    let (ok, rep) = loop {
        let (ok, rep) = promote(&g.d.b, false);
        if ok || started.elapsed() > Duration::from_secs(30) {
            break (ok, rep);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(ok, "{rep}");
    assert_eq!(rep["heads"]["files"], acked_head, "{rep}");
    wait_primary(&g.d.b, 2, Duration::from_secs(30));
    for i in 0..3 {
        let name = format!("post-{i}");
        let f = dir.join(&name);
        std::fs::write(&f, content(&name)).unwrap();
        put_ok(&g.d.b, &f, &name);
        acked.push(name);
    }
    acked.sort();
    let (head, _, _) = wait_replicated(&g.d.b, &[&g.d.c], Duration::from_secs(60));
    assert!(head >= acked_head + 3, "{head}");
    g.d.b.wait_shipped(head, Duration::from_secs(30));
    // The new primary's archive holds both epochs and restores them.
    let scratch = g.d.a.tmp.path().join("scratch");
    assert_eq!(restore_archive(&g.d.b, &scratch.join("b")), acked);

    // The former primary rejoins and archives the new history.
    g.d.a.start();
    wait_follower(&g.d.a, "zjk-b", 2, Duration::from_secs(60));
    wait_replicated(&g.d.b, &[&g.d.a, &g.d.c], Duration::from_secs(60));
    g.d.a.wait_shipped(head, Duration::from_secs(60));
    assert_eq!(restore_archive(&g.d.a, &scratch.join("a")), acked);
    // Its unacknowledged record is still in its archive, named by epoch 1.
    let stale: Vec<archive::objects::PieceRef> =
        std::fs::read_dir(archive_dir(&g.d.a).join("files/log"))
            .unwrap()
            .filter_map(|e| {
                archive::objects::PieceRef::parse(&format!(
                    "files/log/{}",
                    e.unwrap().file_name().to_string_lossy()
                ))
            })
            .filter(|p| p.epoch == Some(1) && p.last > acked_head)
            .collect();
    assert_eq!(stale.len(), 1, "{stale:?}");
    assert_eq!(restore_archive(&g.d.c, &scratch.join("c")), acked);
    g.stop();
}

/// Files written into a primary's tree that were never logged (here while
/// its daemon was down, before another site was promoted) would be
/// overwritten or deleted when that tree follows the new primary. They are
/// kept as evidence first, and the tree then equals the new primary's.
#[test]
fn a_former_primarys_unlogged_files_are_kept_as_evidence_when_its_tree_follows_the_new_primary() {
    let mut g = Group::directories();
    g.start();
    wait_primary(&g.d.a, 1, Duration::from_secs(60));
    for i in 0..3 {
        std::fs::write(tree(&g.d.a).join(format!("f{i}")), format!("logged {i}\n")).unwrap();
    }
    until(
        "the files at zjk-b's standby tree",
        Duration::from_secs(60),
        || {
            (0..3)
                .all(|i| tree(&g.d.b).join(format!("f{i}")).exists())
                .then_some(())
        },
    );
    wait_replicated(&g.d.a, &[&g.d.b, &g.d.c], Duration::from_secs(60));
    g.d.a.kill9();
    let killed = Instant::now();
    // Never logged: a new file and a changed one.
    std::fs::write(tree(&g.d.a).join("unlogged"), "written while down\n").unwrap();
    std::fs::write(tree(&g.d.a).join("f1"), "changed while down\n").unwrap();
    std::thread::sleep(Duration::from_secs(5).saturating_sub(killed.elapsed()));
    let (ok, rep) = loop {
        let (ok, rep) = promote(&g.d.b, false);
        if ok || killed.elapsed() > Duration::from_secs(40) {
            break (ok, rep);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(ok, "{rep}");
    wait_primary(&g.d.b, 2, Duration::from_secs(30));
    std::fs::write(tree(&g.d.b).join("after"), "at the new primary\n").unwrap();
    g.d.a.start();
    wait_follower(&g.d.a, "zjk-b", 2, Duration::from_secs(60));
    until(
        "zjk-a's tree to follow zjk-b",
        Duration::from_secs(60),
        || {
            (tree(&g.d.a).join("after").exists()
                && !tree(&g.d.a).join("unlogged").exists()
                && std::fs::read_to_string(tree(&g.d.a).join("f1")).ok()? == "logged 1\n")
                .then_some(())
        },
    );
    let kept: Vec<PathBuf> = std::fs::read_dir(g.d.a.data.join("evidence"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("files-unlogged-")
        })
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}\n{}", g.d.a.log_text());
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(kept[0].join("evidence.json")).unwrap()).unwrap();
    assert_eq!(doc["paths"], serde_json::json!(["f1", "unlogged"]), "{doc}");
    assert_eq!(
        std::fs::read_to_string(kept[0].join("files/unlogged")).unwrap(),
        "written while down\n"
    );
    assert_eq!(
        std::fs::read_to_string(kept[0].join("files/f1")).unwrap(),
        "changed while down\n"
    );
    g.stop();
}

#[test]
fn a_primary_cut_off_from_both_others_fences_itself_before_another_is_promoted() {
    // Automatic failover: nobody runs `triad promote` here.
    let mut g = Group::automatic("5s");
    g.start();
    wait_primary(&g.d.a, 1, Duration::from_secs(60));
    let mut wa = Writer::start(g.d.a.config.clone(), g.d.a.tmp.path().join("wa"), "a");
    until("10 acknowledged puts", Duration::from_secs(60), || {
        (wa.acked.lock().unwrap().len() >= 10).then_some(())
    });
    // zjk-a keeps running, and its writer keeps writing, but it reaches
    // neither other site.
    g.isolate(0, true);
    let cut = Instant::now();
    until("zjk-a to fence itself", Duration::from_secs(20), || {
        (takeover_of(&g.d.a)?["fenced"] == true).then_some(())
    });
    let fenced_after = cut.elapsed();
    // The same-city site promotes itself once it and the remote have heard
    // nothing from zjk-a for primary_timeout.
    wait_primary(&g.d.b, 2, Duration::from_secs(60));
    let promoted_after = cut.elapsed();
    let reports = std::fs::read_to_string(g.d.b.data.join("takeover/promotions.jsonl")).unwrap();
    let rep: serde_json::Value = serde_json::from_str(reports.lines().last().unwrap()).unwrap();
    assert_eq!(rep["kind"], "failover", "{rep}");
    assert_eq!(rep["forced"], false, "{rep}");
    assert!(
        promoted_after > Duration::from_secs(5),
        "promoted {promoted_after:?} after the cut, before primary_timeout"
    );
    println!(
        "zjk-a fenced {fenced_after:?} after the cut; zjk-b took writes {promoted_after:?} after it"
    );
    let mut wb = Writer::start(g.d.b.config.clone(), g.d.b.tmp.path().join("wb"), "b");
    until(
        "10 puts at the new primary",
        Duration::from_secs(60),
        || (wb.acked.lock().unwrap().len() >= 10).then_some(()),
    );
    until(
        "the writer at zjk-a to be told it is fenced",
        Duration::from_secs(30),
        || {
            wa.refused
                .lock()
                .unwrap()
                .iter()
                .any(|e| e.contains("FENCED"))
                .then_some(())
        },
    );
    let (acked_a, refused_a) = wa.stop();
    let (acked_b, _) = wb.stop();
    // Never both: the old primary's last acknowledgement came before the
    // new primary's first.
    let last_a = acked_a.iter().map(|(_, t)| *t).max().unwrap();
    let first_b = acked_b.iter().map(|(_, t)| *t).min().unwrap();
    assert!(
        last_a < first_b,
        "zjk-a acknowledged a put {:?} after zjk-b's first",
        last_a - first_b
    );
    assert!(
        refused_a.iter().any(|e| e.contains("FENCED")),
        "the writer at zjk-a was never told it is fenced: {refused_a:?}"
    );
    assert!(
        fenced_after < Duration::from_secs(6),
        "fencing took {fenced_after:?} with fence_after {FENCE_AFTER}"
    );
    // Healed, zjk-a learns the new epoch and follows; the copies agree.
    g.isolate(0, false);
    wait_follower(&g.d.a, "zjk-b", 2, Duration::from_secs(60));
    wait_replicated(&g.d.b, &[&g.d.a, &g.d.c], Duration::from_secs(60));
    let names: Vec<String> = acked_a.iter().map(|(n, _)| n.clone()).collect();
    let scratch = g.d.b.tmp.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    assert_has_all(&g.d.b, &names, &scratch);
    g.stop();
}

#[test]
fn a_cut_same_city_link_alone_never_promotes_and_a_planned_switchover_loses_nothing() {
    let mut g = Group::automatic("5s");
    g.start();
    wait_primary(&g.d.a, 1, Duration::from_secs(60));
    let dir = g.d.a.tmp.path().join("p");
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..5 {
        let f = dir.join(format!("pre-{i}"));
        std::fs::write(&f, content(&format!("pre-{i}"))).unwrap();
        put_ok(&g.d.a, &f, &format!("pre-{i}"));
    }
    // Only zjk-a <-> zjk-b is cut, for twice primary_timeout: the remote
    // still hears zjk-a, so neither automatic failover nor an operator's
    // promotion of zjk-b goes through.
    g.cut_between(0, 1, true);
    std::thread::sleep(Duration::from_secs(10));
    assert!(
        g.d.b.log_text().contains("automatic failover"),
        "zjk-b never considered a failover:\n{}",
        g.d.b.log_text()
    );
    let (ok, rep) = promote(&g.d.b, false);
    assert!(!ok, "{rep}");
    assert_eq!(rep["kind"], "failover", "{rep}");
    let err = rep["error"].as_str().unwrap_or("");
    assert!(err.contains("sjz-c heard zjk-a"), "{rep}");
    assert_eq!(takeover_of(&g.d.b).unwrap()["epoch"], 1);
    assert_eq!(takeover_of(&g.d.a).unwrap()["primary"], "zjk-a");
    assert_eq!(takeover_of(&g.d.a).unwrap()["fenced"], false);
    g.cut_between(0, 1, false);
    wait_replicated(&g.d.a, &[&g.d.b, &g.d.c], Duration::from_secs(60));

    // A planned switchover: the primary stops, zjk-b takes every record,
    // then the next epoch. Nothing is lost, and back again.
    let (head, _, _) = head_and_hashes(&g.d.a).unwrap();
    let (ok, rep) = promote(&g.d.b, false);
    assert!(ok, "{rep}\n{}", g.d.b.log_text());
    assert_eq!(rep["kind"], "switchover", "{rep}");
    assert_eq!(rep["lost_records"], 0, "{rep}");
    assert_eq!(rep["heads"]["files"], head, "{rep}");
    wait_primary(&g.d.b, 2, Duration::from_secs(30));
    wait_follower(&g.d.a, "zjk-b", 2, Duration::from_secs(30));
    wait_follower(&g.d.c, "zjk-b", 2, Duration::from_secs(30));
    let f = dir.join("during-b");
    std::fs::write(&f, content("during-b")).unwrap();
    put_ok(&g.d.b, &f, "during-b");
    wait_replicated(&g.d.b, &[&g.d.a, &g.d.c], Duration::from_secs(60));

    let (ok, rep) = promote(&g.d.a, false);
    assert!(ok, "{rep}\n{}", g.d.a.log_text());
    assert_eq!(rep["kind"], "switchover", "{rep}");
    assert_eq!(rep["lost_records"], 0, "{rep}");
    wait_primary(&g.d.a, 3, Duration::from_secs(30));
    let f = dir.join("back-at-a");
    std::fs::write(&f, content("back-at-a")).unwrap();
    put_ok(&g.d.a, &f, "back-at-a");
    wait_replicated(&g.d.a, &[&g.d.b, &g.d.c], Duration::from_secs(60));
    // The same, as an audited drill run at the same-city site: there and
    // back, each leg's RTO and RPO in a report.
    let o = g.d.b.cli(&["drill", "--switchover", "--json"]);
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "drill printed no report ({e}): {}",
            String::from_utf8_lossy(&o.stderr)
        )
    });
    assert!(o.status.success(), "{rep}\n{}", g.d.b.log_text());
    let legs = rep["legs"].as_array().unwrap();
    assert_eq!(legs.len(), 2, "{rep}");
    assert_eq!(
        (legs[0]["to"].clone(), legs[1]["to"].clone()),
        ("zjk-b".into(), "zjk-a".into())
    );
    for l in legs {
        assert_eq!(l["lost_records"], 0, "{rep}");
        assert!(l["rto_seconds"].as_f64().is_some(), "{rep}");
    }
    assert_eq!(legs[1]["epoch"], 5, "{rep}");
    println!("switchover drill: {rep}");
    wait_primary(&g.d.a, 5, Duration::from_secs(30));
    let reports: Vec<_> = std::fs::read_dir(g.d.b.data.join("reports"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("switchover-"))
        .collect();
    assert_eq!(reports.len(), 1);
    // No divergent tail on a planned switchover, and every site followed
    // each new primary from its own log, without a state transfer.
    assert!(!g.d.a.data.join("evidence").exists());
    assert!(!g.d.b.data.join("evidence").exists());
    for s in [&g.d.a, &g.d.b, &g.d.c] {
        assert!(!s.log_text().contains("receiving a state transfer"));
    }
    // The group kept its majority through every seat change: no new
    // primary's lease lapsed (all three sites change seat at once, and
    // the takeover messages must get through while they do).
    for s in [&g.d.a, &g.d.b] {
        assert!(
            !s.log_text().contains("no majority of the sites confirmed"),
            "a lease lapsed during a seat change:\n{}",
            s.log_text()
        );
    }
    g.stop();
}

/// `triad promote` at `site`, tolerating a daemon that does not answer
/// (it may be changing seat): (promoted, report or null).
fn try_promote(site: &Site) -> (bool, serde_json::Value) {
    let o = site.cli(&["promote", "--json"]);
    let v = serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null);
    (o.status.success(), v)
}

/// The site that takes writes now (unfenced primary of the newest epoch
/// any running site reports), if any.
fn current_primary(g: &Group) -> Option<usize> {
    (0..3)
        .filter_map(|i| {
            let t = takeover_of(g.site(i))?;
            (t["seat"] == "primary" && t["fenced"] == false)
                .then(|| (t["epoch"].as_u64().unwrap_or(0), i))
        })
        .max()
        .map(|(_, i)| i)
}

/// A writer that puts at whichever site is the primary, one object after
/// another, and logs each acknowledgement.
fn roaming_writer(
    configs: [PathBuf; 3],
    statuses: [PathBuf; 3],
    dir: PathBuf,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
) -> std::thread::JoinHandle<(u64, Vec<String>)> {
    std::fs::create_dir_all(&dir).unwrap();
    std::thread::spawn(move || {
        let mut n = 0u64;
        let mut refused = 0u64;
        let mut errors: Vec<String> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            // The newest epoch's unfenced primary, from status files the
            // daemons wrote in the last two seconds (a killed one's stays).
            let fresh = now_ns() - 2_000_000_000;
            let target = (0..3)
                .filter_map(|i| {
                    let v: serde_json::Value =
                        serde_json::from_slice(&std::fs::read(&statuses[i]).ok()?).ok()?;
                    let t = &v["takeover"];
                    (t["seat"] == "primary"
                        && t["fenced"] == false
                        && v["updated_ns"].as_i64().unwrap_or(0) > fresh)
                        .then(|| (t["epoch"].as_u64().unwrap_or(0), i))
                })
                .max()
                .map(|(_, i)| i);
            let Some(i) = target else {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            let name = format!("load-{n:06}");
            n += 1;
            let o = put_new(&dir, &configs[i], &name);
            if o.status.success() {
                acked.lock().unwrap().push(name);
            } else {
                refused += 1;
                errors.push(format!(
                    "{}: {}",
                    NAMES[i],
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
                if errors.len() > 5 {
                    errors.remove(0);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        (refused, errors)
    })
}

#[test]
fn random_kills_partitions_and_promotions_lose_no_acknowledged_write() {
    use rand::{Rng, SeedableRng};
    let rounds: usize = std::env::var("TRIAD_TAKEOVER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let seed: u64 = std::env::var("TRIAD_TAKEOVER_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    println!("takeover loop: {rounds} rounds, TRIAD_TAKEOVER_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut g = Group::build("", true);
    g.start();
    wait_primary(&g.d.a, 1, Duration::from_secs(60));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let writer = roaming_writer(
        [
            g.d.a.config.clone(),
            g.d.b.config.clone(),
            g.d.c.config.clone(),
        ],
        [
            g.d.a.status_path(),
            g.d.b.status_path(),
            g.d.c.status_path(),
        ],
        g.d.a.tmp.path().join("load"),
        stop.clone(),
        acked.clone(),
    );
    until("a first acknowledged put", Duration::from_secs(60), || {
        (!acked.lock().unwrap().is_empty()).then_some(())
    });
    let (mut kills, mut partitions, mut promoted, mut refused) = (0, 0, 0, 0);
    for round in 0..rounds {
        let primary = until(
            "a primary that takes writes",
            Duration::from_secs(90),
            || current_primary(&g),
        );
        let action = rng.gen_range(0..3);
        let victim = rng.gen_range(0..3);
        match action {
            0 => {
                // SIGKILL, and if it was the primary, fail over to a site
                // that may (a sync follower), as an operator would.
                kills += 1;
                g.site_mut(victim).kill9();
                if victim == primary {
                    let started = Instant::now();
                    let mut done = false;
                    while !done && started.elapsed() < Duration::from_secs(30) {
                        for i in (0..3).filter(|i| *i != victim) {
                            if try_promote(g.site(i)).0 {
                                done = true;
                                break;
                            }
                        }
                        std::thread::sleep(Duration::from_millis(500));
                    }
                    if done {
                        promoted += 1;
                    } else {
                        refused += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(rng.gen_range(500..3000)));
                g.site_mut(victim).start();
            }
            1 => {
                partitions += 1;
                if rng.gen_bool(0.5) {
                    g.isolate(victim, true);
                    std::thread::sleep(Duration::from_millis(rng.gen_range(1000..7000)));
                    g.isolate(victim, false);
                } else {
                    let other = (victim + rng.gen_range(1..3)) % 3;
                    g.cut_between(victim, other, true);
                    std::thread::sleep(Duration::from_millis(rng.gen_range(1000..7000)));
                    g.cut_between(victim, other, false);
                }
            }
            _ => {
                let candidate = (primary + rng.gen_range(1..3)) % 3;
                let (ok, rep) = try_promote(g.site(candidate));
                if ok {
                    promoted += 1;
                } else {
                    refused += 1;
                    println!(
                        "round {round}: promotion of {} refused: {}",
                        NAMES[candidate], rep["error"]
                    );
                }
            }
        }
        println!(
            "round {round}: action {action} on {}, {} acknowledged so far",
            NAMES[victim],
            acked.lock().unwrap().len()
        );
    }
    // Let the load run on a settled group for a moment, then stop it.
    let primary = until("a primary after the loop", Duration::from_secs(90), || {
        current_primary(&g)
    });
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let (writer_refusals, last_errors) = writer.join().unwrap();
    let names = acked.lock().unwrap().clone();
    println!(
        "takeover loop: {rounds} rounds: {kills} kills, {partitions} partitions, {promoted} promotions, {refused} promotions refused; {} puts acknowledged, {writer_refusals} refused or failed",
        names.len()
    );
    println!("last refusals: {last_errors:?}");
    let others: Vec<usize> = (0..3).filter(|i| *i != primary).collect();
    wait_replicated(
        g.site(primary),
        &[g.site(others[0]), g.site(others[1])],
        Duration::from_secs(120),
    );
    let scratch = g.d.a.tmp.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    assert_has_all(g.site(primary), &names, &scratch);
    // No thread died on the way (a put cut off by a seat change once
    // panicked on the closing network runtime).
    for (i, name) in NAMES.iter().enumerate() {
        let log = g.site(i).log_text();
        assert!(!log.contains("panicked at"), "{name}:\n{log}");
    }
    g.stop();
}
