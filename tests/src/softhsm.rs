//! SoftHSM2 (Debian `softhsm2`, installed by `./dev.sh test`) as the
//! PKCS#11 device: a token of its own in a test's directory, initialised
//! with `softhsm2-util`, found by the module through `SOFTHSM2_CONF`. The
//! token "goes away" when its directory is renamed: the module then fails
//! to initialise, as it does when a device is unplugged.

use std::path::{Path, PathBuf};
use std::process::Command;

pub const PIN: &str = "314159";

pub struct Token {
    /// The `SOFTHSM2_CONF` file every process using the token needs.
    pub conf: PathBuf,
    pub module: PathBuf,
    pub pin_file: PathBuf,
    pub label: String,
    dir: PathBuf,
}

/// The module's path in Debian's package.
pub fn module() -> PathBuf {
    [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("SoftHSM2 is not installed: run ./dev.sh test, or `apt-get install softhsm2`")
}

impl Token {
    /// A fresh token labelled `label` under `dir`.
    pub fn init(dir: &Path, label: &str) -> Token {
        let tokens = dir.join("softhsm-tokens");
        std::fs::create_dir_all(&tokens).unwrap();
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        let out = Command::new("softhsm2-util")
            .args([
                "--init-token",
                "--free",
                "--label",
                label,
                "--pin",
                PIN,
                "--so-pin",
                "271828",
            ])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .expect("softhsm2-util (Debian package softhsm2) must be installed");
        assert!(
            out.status.success(),
            "softhsm2-util: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pin_file = dir.join("token.pin");
        std::fs::write(&pin_file, PIN).unwrap();
        std::fs::set_permissions(
            &pin_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        Token {
            conf,
            module: module(),
            pin_file,
            label: label.into(),
            dir: tokens,
        }
    }

    /// Takes the token away (its directory renamed).
    pub fn remove(&self) {
        std::fs::rename(&self.dir, self.dir.with_extension("away")).unwrap();
    }

    /// Puts it back.
    pub fn insert(&self) {
        std::fs::rename(self.dir.with_extension("away"), &self.dir).unwrap();
    }

    /// `--module M --token T --pin-file P` for `triad key`.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--module".into(),
            self.module.display().to_string(),
            "--token".into(),
            self.label.clone(),
            "--pin-file".into(),
            self.pin_file.display().to_string(),
        ]
    }
}
