//! PostgreSQL with triad as its WAL archive, end to end, with Debian's
//! `postgresql` server started on a private port and data directory:
//! archive_command is `triad put`, a base backup is streamed in with
//! `pg_basebackup -D - -Ft`, rows are written in rounds with their counts
//! and times recorded; with the same-city site stopped archiving fails and
//! PostgreSQL keeps the segment, then catches up when it returns; finally
//! the database and the primary daemon are killed and a new cluster is
//! recovered from the remote site's archive alone (restore_command is
//! `triad get --from-archive`) to a time between two recorded rounds, and
//! holds exactly the rows committed by then.

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::deploy::*;
use common::*;

/// The newest installed PostgreSQL's bin directory.
fn pg_bin() -> PathBuf {
    let mut v: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    v.retain(|p| p.join("initdb").exists());
    v.sort();
    v.pop().unwrap_or_else(|| {
        panic!(
            "PostgreSQL is not installed: `apt-get install postgresql` (./dev.sh test installs it)"
        )
    })
}

/// Runs a command as the `postgres` user (the server refuses root).
fn as_pg(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(cmd)
        .args(args)
        .output()
        .unwrap();
    out
}

fn ok(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Gives `path` (and with `recursive` everything below it) to postgres.
fn chown_pg(path: &Path, recursive: bool) {
    let mut c = Command::new("chown");
    if recursive {
        c.arg("-R");
    }
    ok(
        c.arg("postgres").arg(path).output().unwrap(),
        "chown postgres",
    );
}

struct Pg {
    bin: PathBuf,
    data: PathBuf,
    sock_dir: PathBuf,
    port: u16,
}

impl Pg {
    fn sql(&self, q: &str) -> String {
        ok(
            as_pg(
                self.bin.join("psql").to_str().unwrap(),
                &[
                    "-h",
                    self.sock_dir.to_str().unwrap(),
                    "-p",
                    &self.port.to_string(),
                    "-d",
                    "postgres",
                    "-At",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-c",
                    q,
                ],
            ),
            q,
        )
    }

    fn ctl(&self, args: &[&str]) -> Output {
        let mut all = vec!["-D", self.data.to_str().unwrap()];
        all.extend_from_slice(args);
        as_pg(self.bin.join("pg_ctl").to_str().unwrap(), &all)
    }

    fn start(&self) {
        let log = self.data.with_extension("log");
        ok(
            self.ctl(&["-l", log.to_str().unwrap(), "-w", "-t", "120", "start"]),
            &format!(
                "pg_ctl start ({})",
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.data.with_extension("log")).unwrap_or_default()
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let _ = self.ctl(&["-m", "immediate", "stop"]);
    }
}

#[test]
fn postgres_archives_through_triad_and_recovers_to_a_point_in_time() {
    let bin = pg_bin();
    // A directory the postgres user can reach: the triad binary, the put/get
    // socket, the remote's archive and the clusters live here.
    let root = tempfile::Builder::new()
        .prefix("triad-pg-")
        .tempdir_in("/tmp")
        .unwrap();
    let r = root.path();
    std::fs::set_permissions(r, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Owned by postgres (root writes here regardless): the server's logs
    // and socket go here too.
    chown_pg(r, false);
    let triad = r.join("triad");
    std::fs::copy(triad_bin(), &triad).unwrap();
    let socket = r.join("triad.sock");
    let archive = r.join("archive-c");

    // Three sites: a pushed dataset at the primary; the remote archives.
    let mut d = Deployment::new(None);
    d.primary_source = "source = { kind = \"pushed\" }".into();
    d.sync_policy = "on_unreachable = \"wait\"\nwait_limit = \"2s\"\n".into();
    d.configure(None);
    let a_cfg = std::fs::read_to_string(&d.a.config).unwrap().replacen(
        "[listen]\n",
        &format!(
            "[listen]\nsocket = \"{}\"\nsocket_group = \"postgres\"\n",
            socket.display()
        ),
        1,
    );
    d.a.set_config(&a_cfg);
    let mut c_cfg = std::fs::read_to_string(&d.c.config).unwrap();
    c_cfg.push_str(&format!(
        "\n[archive]\nurl = \"file://{}\"\nlog_flush_interval = \"500ms\"\n",
        archive.display()
    ));
    d.c.set_config(&c_cfg);
    d.start();
    wait_until("the put/get socket", Duration::from_secs(60), || {
        socket.exists()
    });
    // restore_command reads the dataset key as the postgres user.
    let key = r.join("dataset.key");
    std::fs::copy(&d.a.key, &key).unwrap();
    chown_pg(&key, false);

    // The first cluster, archiving through `triad put`.
    let data1 = r.join("data1");
    std::fs::create_dir(&data1).unwrap();
    chown_pg(&data1, false);
    ok(
        as_pg(
            bin.join("initdb").to_str().unwrap(),
            &[
                "-D",
                data1.to_str().unwrap(),
                "--auth=trust",
                "-U",
                "postgres",
            ],
        ),
        "initdb",
    );
    let pg = Pg {
        bin: bin.clone(),
        data: data1.clone(),
        sock_dir: r.to_path_buf(),
        port: free_port(),
    };
    let put_cmd = format!(
        "{} put --socket {} --dataset files %p %f",
        triad.display(),
        socket.display()
    );
    let mut conf = std::fs::OpenOptions::new()
        .append(true)
        .open(data1.join("postgresql.conf"))
        .unwrap();
    use std::io::Write;
    writeln!(
        conf,
        "port = {}\nlisten_addresses = ''\nunix_socket_directories = '{}'\nwal_level = replica\narchive_mode = on\narchive_command = '{put_cmd}'\nmax_wal_senders = 2\n",
        pg.port,
        r.display()
    )
    .unwrap();
    drop(conf);
    pg.start();
    pg.sql("create table t (id serial primary key, round int, at timestamptz default clock_timestamp())");

    // A base backup, streamed into triad as one object.
    let backup = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "runuser -u postgres -- {} -h {} -p {} -D - -Ft -X fetch | {} put --socket {} --dataset files - base.tar",
            bin.join("pg_basebackup").display(),
            r.display(),
            pg.port,
            triad.display(),
            socket.display()
        ))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    ok(backup, "pg_basebackup | triad put");

    // A put that sent its header and a first frame, then stopped: WAL
    // archiving must go on past it (it held every put back once). It stays
    // connected for the whole test.
    let mut stuck = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    stuck
        .write_all(b"{\"op\":\"put\",\"dataset\":\"files\",\"name\":\"stuck\"}\n")
        .unwrap();
    stuck.write_all(&1000u32.to_be_bytes()).unwrap();
    stuck.write_all(&[7u8; 1000]).unwrap();

    // Rounds of writes; after each, a recorded (count, time) and a segment
    // switch that archive_command must carry.
    let archived = || pg.sql("select coalesce(last_archived_wal, '') from pg_stat_archiver");
    let mut points: Vec<(i64, String)> = Vec::new();
    for round in 1..=3 {
        pg.sql(&format!(
            "insert into t (round) select {round} from generate_series(1, 2000)"
        ));
        let count: i64 = pg.sql("select count(*) from t").parse().unwrap();
        let at = pg.sql("select clock_timestamp()");
        points.push((count, at));
        std::thread::sleep(Duration::from_millis(1200));
        if round == 3 {
            // The same-city site stops: archiving must fail and keep the
            // segment until it returns.
            assert!(d.b.stop().success());
        }
        let seg = pg.sql("select pg_walfile_name(pg_switch_wal())");
        if round == 3 {
            wait_until("archive_command to fail", Duration::from_secs(60), || {
                pg.sql("select failed_count from pg_stat_archiver") != "0"
            });
            assert!(archived() < seg, "archived with the sync site down");
            std::thread::sleep(Duration::from_secs(3));
            assert!(archived() < seg, "archived with the sync site down");
            d.b.start();
        }
        wait_until(
            &format!("{seg} to be archived"),
            Duration::from_secs(120),
            || archived() >= seg,
        );
    }
    // One more round after the last recorded point, which recovery must not
    // replay.
    pg.sql("insert into t (round) select 4 from generate_series(1, 2000)");
    let last = pg.sql("select pg_walfile_name(pg_switch_wal())");
    wait_until(
        "the last segment to be archived",
        Duration::from_secs(120),
        || archived() >= last,
    );

    // Every segment PostgreSQL archived is there, none missing.
    let done: Vec<String> = std::fs::read_dir(data1.join("pg_wal/archive_status"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".done")
                .map(str::to_string)
        })
        .collect();
    assert!(done.len() >= 4, "{done:?}");

    // The remote has everything and its archive holds the log to the head.
    let head = d.a.status().unwrap()["log"]["head_seq"].as_u64().unwrap();
    wait_replicated(&d.a, &[&d.b, &d.c], Duration::from_secs(60));
    d.c.wait_shipped(head, Duration::from_secs(60));

    // Disaster: the database and the primary daemon are gone.
    let _ = pg.ctl(&["-m", "immediate", "stop"]);
    d.a.kill9();

    // A new cluster from the remote's archive alone, to a time between
    // rounds 2 and 3.
    let get = |name: &str, dest: &Path| {
        format!(
            "{} get --from-archive file://{} --key-file {} --config /nonexistent --dataset files {name} {}",
            triad.display(),
            archive.display(),
            key.display(),
            dest.display()
        )
    };
    let data2 = r.join("data2");
    std::fs::create_dir(&data2).unwrap();
    chown_pg(&data2, false);
    let tar = r.join("base.tar");
    ok(
        as_pg("sh", &["-c", &get("base.tar", &tar)]),
        "triad get base.tar",
    );
    for n in &done {
        let dest = r.join(format!("check-{n}"));
        ok(as_pg("sh", &["-c", &get(n, &dest)]), n);
        // Byte for byte where PostgreSQL has not recycled the segment yet.
        if let Ok(original) = std::fs::read(data1.join("pg_wal").join(n)) {
            assert_eq!(std::fs::read(&dest).unwrap(), original, "{n}");
        }
    }
    ok(
        as_pg(
            "tar",
            &["-xf", tar.to_str().unwrap(), "-C", data2.to_str().unwrap()],
        ),
        "tar -x",
    );
    std::fs::set_permissions(&data2, std::fs::Permissions::from_mode(0o700)).unwrap();
    let (want_count, target) = points[1].clone();
    // restore_command keeps the restored archive in a cache: one restore,
    // then every segment is a copy (a newer archive is restored again).
    let restore_cmd = format!(
        "{} --cache {}",
        get("%f", Path::new("%p")),
        r.join("get-cache").display()
    );
    let pg2 = Pg {
        bin,
        data: data2.clone(),
        sock_dir: r.to_path_buf(),
        port: free_port(),
    };
    let mut conf = std::fs::OpenOptions::new()
        .append(true)
        .open(data2.join("postgresql.conf"))
        .unwrap();
    writeln!(
        conf,
        "port = {}\narchive_mode = off\nrestore_command = '{restore_cmd}'\nrecovery_target_time = '{target}'\nrecovery_target_action = 'promote'\n",
        pg2.port
    )
    .unwrap();
    drop(conf);
    std::fs::write(data2.join("recovery.signal"), b"").unwrap();
    chown_pg(&data2, true);
    pg2.start();
    wait_until(
        "recovery to finish and promote",
        Duration::from_secs(300),
        || pg2.sql("select pg_is_in_recovery()") == "f",
    );
    let got: i64 = pg2.sql("select count(*) from t").parse().unwrap();
    assert_eq!(
        got,
        want_count,
        "rows after recovery to {target}; recorded points {points:?}\n{}",
        pg2.log()
    );
    assert_eq!(pg2.sql("select max(round) from t"), "2");
    assert!(
        pg2.log().contains("recovery stopping before commit"),
        "{}",
        pg2.log()
    );
    drop(stuck);
}
