//! Dataset keys wrapped by a key-encryption key in a PKCS#11 device, with
//! SoftHSM2 as the device: the daemon runs on a wrapped key, keeps running
//! for `device_grace` when the token is taken away (and says so), then
//! stops; a restore works with the token and fails, naming the device,
//! without it; re-wrapping under a new key-encryption key changes no data.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{assert_same_tree, now_ns, triad_bin, wait_until, write_file, Site};
use rand::SeedableRng;
use triad_tests::s3::S3Server;
use triad_tests::softhsm::Token;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn triad(token: &Token, args: &[&str]) -> Output {
    Command::new(triad_bin())
        .args(args)
        .env("SOFTHSM2_CONF", &token.conf)
        .output()
        .expect("run triad")
}

fn restore(site: &Site, token: &Token, to: &Path) -> Output {
    triad(
        token,
        &[
            "restore",
            "--from-archive",
            "s3://triad/site-a",
            "--dataset",
            "files",
            "--to",
            &to.to_string_lossy(),
            "--config",
            &site.config.to_string_lossy(),
        ],
    )
}

/// The archive's objects, to show that re-wrapping touched none of them.
fn objects(root: &Path) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = walkdir::WalkDir::new(root)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file() && !e.path().to_string_lossy().contains(".s3s"))
        .map(|e| {
            (
                e.path().to_string_lossy().into_owned(),
                e.metadata().map(|m| m.len()).unwrap_or(0),
            )
        })
        .collect();
    v.sort();
    v
}

/// `[keys] device_grace` in the test, in seconds: long enough for a change
/// to be committed and the status read on a loaded machine.
const GRACE: u64 = 30;

#[test]
fn a_wrapped_key_runs_the_daemon_until_its_token_has_been_gone_for_the_grace() {
    let s3 = S3Server::start("triad");
    let mut site = Site::new();
    let token = Token::init(site.tmp.path(), "triad-test");

    // Wrap the site's key under a new KEK in the token; the plain file goes
    // "offline" (out of the config's reach).
    let wrapped = site.tmp.path().join("dataset.wrapped");
    let mut args = vec!["key", "wrap", "--key-file"];
    let plain = site.key.to_string_lossy().into_owned();
    let wrapped_s = wrapped.to_string_lossy().into_owned();
    args.extend([
        plain.as_str(),
        "--out",
        wrapped_s.as_str(),
        "--kek",
        "kek-2026",
        "--create-kek",
    ]);
    let dev = token.args();
    args.extend(dev.iter().map(String::as_str));
    let out = triad(&token, &args);
    assert!(out.status.success(), "{}", text(&out));
    let key_id = site.key().key_id();
    let offline = site.tmp.path().join("offline.key");
    std::fs::rename(&site.key, &offline).unwrap();
    let cfg = std::fs::read_to_string(&site.config)
        .unwrap()
        .replace(&plain, &wrapped_s);
    site.set_config(&format!(
        "{cfg}\n[keys]\ncheck_interval = \"1s\"\ndevice_grace = \"{GRACE}s\"\n"
    ));
    site.add_s3_archive(&s3.endpoint(), "");
    // The KEK is in the token, never extractable; the file holds no key.
    let file = std::fs::read_to_string(&wrapped).unwrap();
    assert!(file.contains(&format!("key_id = \"{key_id}\"")), "{file}");
    assert!(!file.contains(
        &std::fs::read_to_string(&offline)
            .unwrap()
            .lines()
            .nth(1)
            .unwrap()
            .to_string()
    ));

    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    for i in 0..30 {
        write_file(
            &site.source.join(format!("f{i}")),
            2000 + i * 300,
            true,
            &mut rng,
        );
    }
    site.env
        .push(("SOFTHSM2_CONF".into(), token.conf.display().to_string()));
    site.start();
    let st = site.wait_settled(now_ns(), Duration::from_secs(60));
    assert_eq!(st["key_device"]["reachable"], true, "{st}");
    assert_eq!(st["key_device"]["kek"], "kek-2026", "{st}");
    let out = triad(
        &token,
        &[
            "snapshot",
            "--dataset",
            "files",
            "--config",
            &site.config.to_string_lossy(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let head = site.status().unwrap()["log"]["head_seq"].as_u64().unwrap();
    site.wait_shipped(head, Duration::from_secs(60));

    // A restore with the token present.
    let to = site.tmp.path().join("restored-with-token");
    let out = restore(&site, &token, &to);
    assert!(out.status.success(), "{}", text(&out));
    assert_same_tree(&site.source, &to);

    // The token taken away while the daemon runs: it says so and keeps
    // taking changes on the key it unwrapped at start.
    token.remove();
    let gone = Instant::now();
    write_file(&site.source.join("during-grace"), 5000, true, &mut rng);
    let st = site.wait_settled(now_ns(), Duration::from_secs(25));
    assert!(st["failure"].is_null(), "{st}");
    assert!(
        gone.elapsed() < Duration::from_secs(GRACE),
        "the change went in within the grace"
    );
    wait_until(
        "the status shows the device unreachable",
        Duration::from_secs(15),
        || {
            site.status()
                .is_some_and(|s| s["key_device"]["reachable"] == false)
        },
    );
    let out = site.cli(&["status"]);
    assert!(
        text(&out).contains("key device: UNREACHABLE"),
        "{}",
        text(&out)
    );
    let st = site.status().unwrap();
    assert!(
        st["key_device"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("triad-test"),
        "{st}"
    );
    assert!(site
        .log_text()
        .contains("the key device does not give the dataset key"));

    // The grace runs out: the daemon stops, saying why.
    let exit = site.wait_exit(Duration::from_secs(GRACE + 30));
    assert!(!exit.success());
    // The grace counts from the last time the device gave the key, at most
    // one check interval (1 s) before the token went.
    assert!(
        gone.elapsed() >= Duration::from_secs(GRACE - 1),
        "{:?}",
        gone.elapsed()
    );
    let log = site.log_text();
    assert!(log.contains("longer than [keys] device_grace"), "{log}");

    // Without the token: a restore fails before writing anything, and says
    // which device and what to do; so does a daemon start.
    let to = site.tmp.path().join("restored-without-token");
    let out = restore(&site, &token, &to);
    assert!(!out.status.success());
    let said = text(&out);
    assert!(
        said.contains("wrapped by a key in a cryptographic device")
            && said.contains("token `triad-test`")
            && said.contains("offline copy"),
        "{said}"
    );
    assert!(!to.exists() || std::fs::read_dir(&to).unwrap().next().is_none());
    let logged = site.log_text().len();
    site.start();
    let exit = site.wait_exit(Duration::from_secs(30));
    assert!(!exit.success());
    let start_log = site.log_text()[logged..].to_string();
    assert!(
        start_log.contains("wrapped by a key in a cryptographic device"),
        "{start_log}"
    );

    // The token back: re-wrap under a new KEK. The archive is untouched and
    // the daemon runs on the new file with the same key.
    token.insert();
    let before = objects(&s3.root);
    let rewrapped = site.tmp.path().join("dataset.rewrapped");
    let out = triad(
        &token,
        &[
            "key",
            "rewrap",
            "--key-file",
            &wrapped_s,
            "--out",
            &rewrapped.to_string_lossy(),
            "--kek",
            "kek-2027",
            "--create-kek",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(objects(&s3.root), before, "re-wrapping touched the archive");
    let cfg = std::fs::read_to_string(&site.config).unwrap();
    site.set_config(&cfg.replace(&wrapped_s, &rewrapped.to_string_lossy()));
    site.start();
    // The stopped daemon's status (with its failure) stays until the new
    // one writes its own.
    let pid = site.pid();
    wait_until(
        "the restarted daemon's status",
        Duration::from_secs(30),
        || {
            site.status()
                .is_some_and(|s| s["pid"].as_u64().map(|p| p as u32) == pid)
        },
    );
    let st = site.wait_settled(now_ns(), Duration::from_secs(60));
    assert_eq!(st["key_device"]["kek"], "kek-2027", "{st}");
    let out = triad(
        &token,
        &["key", "show", "--key-file", &rewrapped.to_string_lossy()],
    );
    assert!(
        out.status.success() && text(&out).contains(&key_id),
        "{}",
        text(&out)
    );

    // The PIN file changed to a wrong PIN while the daemon runs: the token
    // refuses it once, and the daemon does not try it again every second
    // (each refusal brings a real token closer to locking the PIN) until
    // the file changes; the right PIN back, the device answers again.
    let logged = site.log_text().len();
    std::fs::write(&token.pin_file, "000000").unwrap();
    wait_until(
        "the refused PIN in the status",
        Duration::from_secs(15),
        || {
            site.status().is_some_and(|s| {
                s["key_device"]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("is refused"))
            })
        },
    );
    std::thread::sleep(Duration::from_secs(5));
    let refusals = site.log_text()[logged..].matches("is refused").count();
    assert_eq!(refusals, 1, "{}", &site.log_text()[logged..]);
    std::fs::write(&token.pin_file, triad_tests::softhsm::PIN).unwrap();
    wait_until("the device answers again", Duration::from_secs(15), || {
        site.status()
            .is_some_and(|s| s["key_device"]["reachable"] == true)
    });
    assert!(site.log_text()[logged..].contains("the key device answers again"));

    // A wrapped file altered by one digit does not unwrap, and says so
    // rather than blame the device.
    let altered = site.tmp.path().join("dataset.altered");
    let body = std::fs::read_to_string(&rewrapped).unwrap();
    let at = body.find("wrapped = \"").unwrap() + 11;
    let mut bytes = body.into_bytes();
    bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
    std::fs::write(&altered, &bytes).unwrap();
    std::fs::set_permissions(
        &altered,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let out = triad(
        &token,
        &["key", "show", "--key-file", &altered.to_string_lossy()],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("does not unwrap this file"),
        "{}",
        text(&out)
    );

    // A wrong PIN is named as such (the daemon then stops retrying it
    // until the file changes, so the token does not lock the PIN).
    let wrong_pin = site.tmp.path().join("wrong.pin");
    std::fs::write(&wrong_pin, "000000").unwrap();
    std::fs::set_permissions(
        &wrong_pin,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let wrong = site.tmp.path().join("dataset.wrong-pin");
    let body = std::fs::read_to_string(&rewrapped).unwrap().replace(
        &token.pin_file.display().to_string(),
        &wrong_pin.display().to_string(),
    );
    std::fs::write(&wrong, body).unwrap();
    std::fs::set_permissions(&wrong, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let out = triad(
        &token,
        &["key", "show", "--key-file", &wrong.to_string_lossy()],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("is refused"), "{}", text(&out));
    site.stop();
}
