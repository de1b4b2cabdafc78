//! `triad demo`: three sites on this machine, with no setup: certificates and
//! a dataset key are created, a primary watches a directory, a same-city
//! site follows it synchronously and a remote site asynchronously; a write
//! load runs with live lag on screen; the remote is killed and comes back;
//! then the remote's copy is restored and compared with the source, the
//! remote takes a snapshot into its own (file://) archive, that archive alone
//! is restored and compared, a restore drill reports RTO and RPO, the
//! primary verifies the three copies against each other, the remote's copy
//! is scrubbed, and `triad status --all` shows the three sites. Each site
//! serves /metrics. The drill's report is kept (the rest is removed unless
//! `--keep`), and the demo ends by saying where it is.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};

#[derive(clap::Args)]
pub struct Args {
    /// Where to put the demo's sites, source and restore (default: a new
    /// directory under the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the demo directory afterwards.
    #[arg(long)]
    keep: bool,
}

const SITES: [(&str, &str); 3] = [
    ("demo-a", "primary"),
    ("demo-b", "same-city"),
    ("demo-c", "remote"),
];

struct Site {
    name: &'static str,
    config: PathBuf,
    status: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Site {
    fn start(&mut self, exe: &Path) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        self.child = Some(
            Command::new(exe)
                .args(["daemon", "--config"])
                .arg(&self.config)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", self.name))?,
        );
        Ok(())
    }

    fn signal(&mut self, sig: i32) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill only sends a signal to our own child's pid.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
            let _ = c.wait();
        }
    }

    fn status(&self) -> Option<serde_json::Value> {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&self.status).ok()?).ok()?;
        (v["pid"].as_u64() == self.child.as_ref().map(|c| c.id() as u64)).then_some(v)
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.signal(libc::SIGTERM);
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}; the site logs are in the demo directory");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn head(s: &Site) -> Option<(u64, String, String)> {
    let v = s.status()?;
    Some((
        v["log"]["head_seq"].as_u64()?,
        v["log"]["chain_hash"].as_str()?.to_string(),
        v["log"]["digest"].as_str()?.to_string(),
    ))
}

fn lag_line(sites: &[Site]) -> String {
    let a = sites[0].status();
    let mut line = format!(
        "   primary head {:>6}",
        a.as_ref()
            .map(|v| v["log"]["head_seq"].to_string())
            .unwrap_or_default()
    );
    if let Some(a) = &a {
        for f in a["replication"]["followers"]
            .as_array()
            .into_iter()
            .flatten()
        {
            line += &format!(
                " | {} ({}): lag {:>4} records {:>9} bytes {:>5.2} s",
                f["site"].as_str().unwrap_or("?"),
                f["mode"].as_str().unwrap_or("?"),
                f["lag_records"],
                f["lag_bytes"],
                f["lag_seconds"].as_f64().unwrap_or(0.0)
            );
        }
    }
    line
}

/// The primary has handled every change so far and both followers hold
/// exactly its log.
fn replicated(sites: &[Site]) -> bool {
    let settled = sites[0]
        .status()
        .is_some_and(|v| v["source"]["settled"] == true);
    let a = head(&sites[0]);
    settled && a.is_some() && sites[1..].iter().all(|s| head(s) == a)
}

pub fn run(a: Args) -> Result<ExitCode> {
    let base = match a.dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("triad-demo-{}", std::process::id())),
    };
    let (src, keys, certs) = (base.join("source"), base.join("keys"), base.join("certs"));
    for d in [&src, &keys] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    println!("== triad demo in {}", base.display());
    let names: Vec<String> = SITES.iter().map(|(n, _)| n.to_string()).collect();
    replicator::certs::create(&certs, &names)?;
    let key = keys.join("files.key");
    vault::DatasetKey::generate().write_new(&key)?;
    println!(
        "   created a CA and certificates for {} and the dataset key",
        names.join(", ")
    );

    let reports = base.join("reports");
    let mut sites = write_configs(&base, &src, &certs, &key, &reports)?;
    let exe = std::env::current_exe().context("finding the triad binary")?;
    let seq = live_replication(&mut sites, &src, &exe)?;
    let ok = recoveries(&sites, &base, &src, &reports, &exe, seq)?;
    for s in sites.iter_mut().rev() {
        s.signal(libc::SIGTERM);
    }
    drop(sites);
    if a.keep {
        println!("== kept {}", base.display());
    } else {
        // Everything but the drill's report, which is the demo's record.
        for e in std::fs::read_dir(&base)?.flatten() {
            if e.path() != reports {
                let _ =
                    std::fs::remove_dir_all(e.path()).or_else(|_| std::fs::remove_file(e.path()));
            }
        }
    }
    println!("{}", if ok { "demo passed" } else { "demo FAILED" });
    let mut written: Vec<PathBuf> = std::fs::read_dir(&reports)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    written.sort();
    match written
        .iter()
        .find(|p| p.extension().is_some_and(|x| x == "md"))
    {
        Some(md) => println!(
            "the drill report: {}\n(and {}/)",
            md.display(),
            reports.display()
        ),
        None => println!("no drill report was written (see the output above)"),
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Writes the three sites' configs under `base`: the primary with a sync
/// and an async follower, each site archiving into its own directory.
fn write_configs(
    base: &Path,
    src: &Path,
    certs: &Path,
    key: &Path,
    reports: &Path,
) -> Result<Vec<Site>> {
    let ports = [free_port()?, free_port()?, free_port()?];
    let http_ports = [free_port()?, free_port()?, free_port()?];
    let peer = |i: usize, mode: &str| {
        let mode = if mode.is_empty() {
            String::new()
        } else {
            format!("mode = \"{mode}\"\n")
        };
        format!(
            "[[peer]]\nname = \"{}\"\naddress = \"127.0.0.1:{}\"\n{mode}\n",
            SITES[i].0, ports[i]
        )
    };
    let mut sites = Vec::new();
    for (i, (name, role)) in SITES.iter().enumerate() {
        let dir = base.join(name);
        std::fs::create_dir_all(&dir)?;
        let head = if i == 0 {
            format!(
                "[site]\nname = \"{name}\"\nrole = \"primary\"\ndata_dir = \"{}\"\n",
                dir.join("data").display()
            )
        } else {
            format!(
                "[site]\nname = \"{name}\"\nrole = \"follower\"\nupstream = \"demo-a\"\ndata_dir = \"{}\"\n",
                dir.join("data").display()
            )
        };
        let peers = match i {
            0 => peer(1, "sync") + &peer(2, "async"),
            // The remote follows the primary, so the same-city site gives
            // it no mode (a mode would make it wait for a follower that
            // never comes).
            1 => peer(0, "") + &peer(2, ""),
            _ => peer(0, "") + &peer(1, ""),
        };
        let source = if i == 0 {
            format!(
                "source = {{ kind = \"directory\", path = \"{}\", debounce = \"100ms\" }}\n",
                src.display()
            )
        } else {
            String::new()
        };
        // The drill is of the remote's archive; its daemon reports it.
        let drill = if i == 2 {
            format!("\n[drill]\nreports_dir = \"{}\"\n", reports.display())
        } else {
            String::new()
        };
        // Each site archives into its own store: the embedded default, a
        // directory (file://); a real deployment points at S3.
        let text = format!(
            "{head}\n[listen]\nreplication = \"127.0.0.1:{}\"\nhttp = \"127.0.0.1:{}\"\n\n[tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/{name}.pem\"\nkey = \"{c}/{name}.key\"\n\n{peers}[[dataset]]\nname = \"files\"\nkey_file = \"{}\"\n{source}\n[archive]\nurl = \"file://{}\"\nlog_flush_interval = \"1s\"\n{drill}",
            ports[i],
            http_ports[i],
            key.display(),
            dir.join("archive").display(),
            c = certs.display(),
        );
        let config = dir.join("triad.toml");
        std::fs::write(&config, text)?;
        println!(
            "   {name} ({role}): config {}, metrics http://127.0.0.1:{}/metrics",
            config.display(),
            http_ports[i]
        );
        sites.push(Site {
            name,
            status: dir.join("data/datasets/files/status.json"),
            log: dir.join("daemon.log"),
            config,
            child: None,
        });
    }

    Ok(sites)
}

/// Starts the daemons and shows live replication: the first sync, lag under
/// a write load, and the remote killed and catching up by itself. Gives the
/// seq all three sites reached.
fn live_replication(sites: &mut [Site], src: &Path, exe: &Path) -> Result<u64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    write_tree(&src.join("before"), &mut rng, 200)?;
    for s in sites.iter_mut() {
        s.start(exe)?;
    }
    println!("== three daemons running (logs: <site>/daemon.log); initial scan and first sync");
    wait_for("the first sync", Duration::from_secs(120), || {
        replicated(sites)
    })?;
    println!("{}", lag_line(sites));

    println!("== a write load at the primary for 6 seconds, lag as it happens");
    let started = Instant::now();
    let mut i = 0;
    let mut last_print = Instant::now();
    while started.elapsed() < Duration::from_secs(6) {
        write_tree(&src.join(format!("load/{i}")), &mut rng, 15)?;
        i += 1;
        if last_print.elapsed() >= Duration::from_millis(700) {
            println!("{}", lag_line(sites));
            last_print = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_for("followers to catch up", Duration::from_secs(120), || {
        replicated(sites)
    })?;
    println!("{}", lag_line(sites));

    println!("== the remote site is killed (SIGKILL) while writes go on, then restarted");
    sites[2].signal(libc::SIGKILL);
    std::fs::rename(src.join("before/d1"), src.join("moved"))?;
    std::fs::remove_dir_all(src.join("before/d2"))?;
    write_tree(&src.join("while-down"), &mut rng, 200)?;
    std::thread::sleep(Duration::from_secs(2));
    println!("{}", lag_line(sites));
    sites[2].start(exe)?;
    wait_for(
        "the remote to catch up by itself",
        Duration::from_secs(120),
        || replicated(sites),
    )?;
    println!("{}", lag_line(sites));
    let (seq, chain, digest) = head(&sites[0]).unwrap_or_default();
    println!("== all three sites at seq {seq}\n   chain hash {chain}\n   digest     {digest}");

    Ok(seq)
}

/// What an operator does with the copies: restore from a site and from an
/// archive alone, snapshot, drill, verify, scrub, status. True when every
/// step passed.
fn recoveries(
    sites: &[Site],
    base: &Path,
    src: &Path,
    reports: &Path,
    exe: &Path,
    seq: u64,
) -> Result<bool> {
    println!("== restoring the remote site's copy and comparing it with the source");
    let restored = base.join("restored-from-remote");
    let ok = Command::new(exe)
        .args(["restore", "--config"])
        .arg(&sites[2].config)
        .args(["--dataset", "files", "--to"])
        .arg(&restored)
        .status()?
        .success();
    let diff = |restored: &Path, what: &str| {
        let d = Command::new("diff")
            .arg("-r")
            .arg(src)
            .arg(restored)
            .status();
        match &d {
            Ok(s) if s.success() => println!("== diff -r source {what}: identical"),
            Ok(_) => println!("== diff -r source {what}: DIFFERENCES"),
            Err(_) => {
                println!("== (diff is not installed; the restore's own digest check above stands)")
            }
        }
        d.map(|s| s.success()).unwrap_or(true)
    };
    let mut ok = ok && diff(&restored, "restored-from-remote");

    println!("== a snapshot of the remote site's copy into its own object store");
    ok &= Command::new(exe)
        .args(["snapshot", "--dataset", "files", "--config"])
        .arg(&sites[2].config)
        .status()?
        .success();
    wait_for(
        "the remote archive to hold the log",
        Duration::from_secs(60),
        || {
            sites[2]
                .status()
                .and_then(|v| v["archive"]["shipped_seq"].as_u64())
                .is_some_and(|s| s >= seq)
        },
    )?;
    println!("== restoring from the remote site's archive alone (as if all three sites were lost)");
    let from_archive = base.join("restored-from-archive");
    ok &= Command::new(exe)
        .args(["restore", "--from-archive"])
        .arg(format!(
            "file://{}",
            base.join(SITES[2].0).join("archive").display()
        ))
        .args(["--dataset", "files", "--at", "latest", "--config"])
        .arg(&sites[2].config)
        .arg("--to")
        .arg(&from_archive)
        .status()?
        .success();
    ok = ok && diff(&from_archive, "restored-from-archive");
    println!(
        "== a restore drill of the remote site's archive: RTO, RPO and a report for the auditor"
    );
    ok &= Command::new(exe)
        .args(["drill", "--dataset", "files", "--config"])
        .arg(&sites[2].config)
        .arg("--reports")
        .arg(reports)
        .status()?
        .success();
    println!("== cross-site verify from the primary: the three sites' checkpoints compared");
    ok &= Command::new(exe)
        .args(["verify", "--dataset", "files", "--config"])
        .arg(&sites[0].config)
        .status()?
        .success();
    println!("== a scrub of the remote site's copy: every chunk re-read and checked");
    ok &= Command::new(exe)
        .args([
            "verify",
            "--scrub",
            "--max-rate",
            "0",
            "--dataset",
            "files",
            "--config",
        ])
        .arg(&sites[2].config)
        .status()?
        .success();
    println!("== the three sites as an operator sees them: triad status --all (from the primary)");
    // The daemons pick up the drill's report within a few seconds.
    std::thread::sleep(Duration::from_secs(6));
    ok &= Command::new(exe)
        .args(["status", "--all", "--config"])
        .arg(&sites[0].config)
        .status()?
        .success();
    Ok(ok)
}

fn write_tree(root: &Path, rng: &mut impl Rng, files: usize) -> Result<()> {
    for i in 0..files {
        let dir = root.join(format!("d{}", i % 7)).join(format!("e{}", i % 3));
        std::fs::create_dir_all(&dir)?;
        let size = match i % 10 {
            0 => 0,
            1 => 2 << 20,
            _ => rng.gen_range(1..64 * 1024),
        };
        let mut data = vec![0u8; size];
        if i % 2 == 0 {
            rng.fill_bytes(&mut data);
        } else {
            for (j, b) in data.iter_mut().enumerate() {
                *b = b"triad keeps three copies\n"[j % 25];
            }
        }
        std::fs::write(dir.join(format!("f{i}.dat")), &data)?;
    }
    Ok(())
}
