#!/usr/bin/env bash
# triad's two entry points, for a fresh Debian machine with the Rust toolchain:
#   ./dev.sh demo   run the demo (see README.md)
#   ./dev.sh test   run the whole test suite (what CI runs)
# Each installs the system packages it needs (as root) or says which are missing.
set -euo pipefail
cd "$(dirname "$0")"

# One target directory outside the clone, kept between runs: RocksDB's C++
# takes minutes to build and is built once.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/triad/target}"

ensure_system() {
  local missing=()
  # The service tests check the systemd units with systemd-analyze and the
  # metrics text and alert rules with Prometheus' promtool.
  if [ "${1:-}" = test ]; then
    command -v systemd-analyze >/dev/null || missing+=(systemd)
    command -v promtool >/dev/null || missing+=(prometheus)
    # The database log-shipping test runs a real PostgreSQL server.
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
    # The Object Lock test runs the moto S3 server from a Python virtualenv.
    command -v python3 >/dev/null || missing+=(python3)
    # The fidelity tests set and read ACLs, and restore as another user.
    command -v getfacl >/dev/null || missing+=(acl)
    command -v setpriv >/dev/null || missing+=(util-linux)
    python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
    # Signed drill reports are checked with a second SM2 implementation.
    command -v openssl >/dev/null || missing+=(openssl)
    # The PKCS#11 device of the wrapped-key tests.
    command -v softhsm2-util >/dev/null || missing+=(softhsm2)
  fi
  if ! command -v cargo >/dev/null; then
    echo "cargo is not installed: install the Rust toolchain (https://rustup.rs), then run this again" >&2
    exit 1
  fi
  # RocksDB's build runs bindgen, which loads libclang, and compiles C++.
  # (libclang-cpp alone, which Debian often has, is not enough.)
  compgen -G "/usr/lib/llvm-*/lib/libclang.so*" >/dev/null || compgen -G "/usr/lib/*/libclang-[0-9]*.so*" >/dev/null || missing+=(libclang-dev)
  command -v g++ >/dev/null || missing+=(g++)
  # SM4-GCM runs on libgcrypt, loaded at run time (without it, on a
  # portable path several times slower).
  compgen -G "/usr/lib/*/libgcrypt.so.20*" >/dev/null || compgen -G "/lib/*/libgcrypt.so.20*" >/dev/null || missing+=(libgcrypt20)
  command -v diff >/dev/null || missing+=(diffutils)
  if ((${#missing[@]})); then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "installing system packages: ${missing[*]}" >&2
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
      echo "missing system packages: ${missing[*]}" >&2
      echo "install them with: sudo apt-get install ${missing[*]}" >&2
      exit 1
    fi
  fi
}

# The S3-compatible server the tests run against: s3s-fs, a file-backed server
# from the s3s project (docs/archive.md says why), built once into the cache.
# 0.14.1 is the last release that builds with this toolchain.
ensure_s3s_fs() {
  local root="$HOME/.cache/triad/tools"
  if [ ! -x "$root/bin/s3s-fs" ]; then
    echo "installing s3s-fs 0.14.1, the S3 test server (about 5 minutes, once)" >&2
    cargo install -q --locked s3s-fs@0.14.1 --features binary --root "$root"
  fi
  export TRIAD_S3S_FS="$root/bin/s3s-fs"
}

# The S3 server for the Object Lock test: moto (PyPI), which implements
# Object Lock and versioning (s3s-fs does not), in its own virtualenv.
ensure_moto() {
  local env="$HOME/.cache/triad/tools/moto"
  if [ ! -x "$env/bin/moto_server" ]; then
    echo "installing moto 5.1.22, the S3 test server with Object Lock (about a minute, once)" >&2
    python3 -m venv "$env"
    "$env/bin/pip" install -q 'moto[server]==5.1.22'
  fi
  export TRIAD_MOTO="$env"
}

case "${1:-}" in
  demo)
    ensure_system
    echo "building triad (the first build compiles RocksDB: about 10 minutes on 2 cores)" >&2
    cargo build -q -p daemon --bin triad
    exec "$CARGO_TARGET_DIR/debug/triad" demo
    ;;
  test)
    ensure_system test
    ensure_s3s_fs
    ensure_moto
    cargo fmt --all --check
    cargo clippy -q --workspace --all-targets -- -D warnings
    # The end-to-end tests start the triad binary, so build it first.
    cargo build -q --workspace --all-targets
    cargo test --workspace
    ;;
  *)
    echo "usage: $0 demo|test" >&2
    exit 2
    ;;
esac
