//! The moto server (PyPI `moto[server]`, installed by `./dev.sh test`): an
//! S3 that implements Object Lock and versioning, which s3s-fs does not.
//! Started on a free loopback port; its Python (the same virtualenv, with
//! boto3) plays the other S3 clients a test needs: creating a bucket with
//! Object Lock, and an attacker deleting with the site's credentials.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::s3::{ACCESS_KEY, SECRET_KEY};

/// The virtualenv holding moto: `TRIAD_MOTO`, else dev.sh's tool dir.
pub fn moto_env() -> PathBuf {
    if let Ok(p) = std::env::var("TRIAD_MOTO") {
        return PathBuf::from(p);
    }
    let p = std::env::var("HOME")
        .map(|h| Path::new(&h).join(".cache/triad/tools/moto"))
        .unwrap_or_default();
    assert!(
        p.join("bin/moto_server").exists(),
        "the moto server is not installed: run ./dev.sh test, or `python3 -m venv DIR && \
         DIR/bin/pip install 'moto[server]==5.1.22'` and set TRIAD_MOTO=DIR"
    );
    p
}

pub struct MotoServer {
    pub port: u16,
    env: PathBuf,
    child: Child,
}

impl MotoServer {
    pub fn start() -> MotoServer {
        let env = moto_env();
        let port = crate::free_port();
        let child = Command::new(env.join("bin/moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "moto_server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        MotoServer { port, env, child }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Runs a Python script with `s3`, a boto3 client of this server holding
    /// the test credentials (the ones triad's sites use), in scope.
    pub fn python(&self, script: &str) -> Output {
        let prelude = format!(
            "import boto3, json, sys\n\
             s3 = boto3.client('s3', endpoint_url='{}', region_name='us-east-1', \
             aws_access_key_id='{ACCESS_KEY}', aws_secret_access_key='{SECRET_KEY}')\n",
            self.endpoint()
        );
        Command::new(self.env.join("bin/python"))
            .arg("-c")
            .arg(format!("{prelude}{script}"))
            .output()
            .expect("run python")
    }

    /// Like [`MotoServer::python`], failing the test unless it succeeds;
    /// returns its stdout.
    pub fn python_ok(&self, script: &str) -> String {
        let out = self.python(script);
        assert!(
            out.status.success(),
            "python failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Creates a bucket, with Object Lock (and so versioning) or without.
    pub fn create_bucket(&self, name: &str, object_lock: bool) {
        self.python_ok(&format!(
            "s3.create_bucket(Bucket='{name}', ObjectLockEnabledForBucket={})",
            if object_lock { "True" } else { "False" }
        ));
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
