//! The dataset key and the sub-keys derived from it.
//!
//! A dataset key is 32 random bytes kept in a file of its own (mode 0600), never
//! in the config and never logged. Every purpose gets its own sub-key through
//! BLAKE3's `derive_key`, so a leak of one (say, the digest key) reveals nothing
//! about the others.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use rand::RngCore;

use crate::error::{Result, VaultError};

const KEY_FILE_HEADER: &str = "triad-dataset-key-v1";

/// Why a file holding a secret (`what`) may not be used: its mode lets
/// group or others read it. None when only its owner can.
pub(crate) fn readable_by_others(path: &Path, what: &str) -> std::io::Result<Option<String>> {
    let mode = std::fs::metadata(path)?.permissions().mode();
    Ok((mode & 0o077 != 0).then(|| {
        format!(
            "permissions {:o} let others read {what}; run `chmod 600 {}`",
            mode & 0o777,
            path.display()
        )
    }))
}

/// The secret a dataset is protected with. Debug output never shows it.
#[derive(Clone)]
pub struct DatasetKey([u8; 32]);

impl std::fmt::Debug for DatasetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DatasetKey(id {})", self.key_id())
    }
}

/// Sub-keys for each use of the dataset key.
#[derive(Clone)]
pub struct Keys {
    /// Keyed BLAKE3 for chunk ids.
    pub chunk_id: [u8; 32],
    /// SM4 key sealing chunks.
    pub chunk_seal: [u8; 16],
    /// SM4 key sealing change-log record bodies.
    pub record_seal: [u8; 16],
    /// Keyed BLAKE3 deriving record nonces from their contents.
    pub record_nonce: [u8; 32],
    /// Keyed BLAKE3 for namespace digest elements.
    pub digest: [u8; 32],
    /// HMAC-SM3 key for checkpoint evidence.
    pub evidence: [u8; 32],
    /// SM4 key sealing snapshot manifests in the archive.
    pub manifest_seal: [u8; 16],
}

impl DatasetKey {
    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut k);
        DatasetKey(k)
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        DatasetKey(bytes)
    }

    /// The key's bytes, for wrapping it (`kek.rs`) only.
    pub(crate) fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// A public fingerprint of the key, safe to log and store: it identifies
    /// the key without revealing it.
    pub fn key_id(&self) -> String {
        let id = blake3::derive_key("triad 2026-11 key id v1", &self.0);
        hex::encode(&id[..8])
    }

    pub fn derive(&self) -> Keys {
        let d = |ctx: &str| blake3::derive_key(ctx, &self.0);
        let half = |ctx: &str| {
            let full = d(ctx);
            let mut k = [0u8; 16];
            k.copy_from_slice(&full[..16]);
            k
        };
        Keys {
            chunk_id: d("triad 2026-11 chunk id v1"),
            chunk_seal: half("triad 2026-11 chunk seal sm4 v1"),
            record_seal: half("triad 2026-11 record seal sm4 v1"),
            record_nonce: d("triad 2026-11 record nonce v1"),
            digest: d("triad 2026-11 namespace digest v1"),
            evidence: d("triad 2026-11 checkpoint evidence hmac-sm3 v1"),
            manifest_seal: half("triad 2026-11 snapshot manifest sm4 v1"),
        }
    }

    /// Writes a new key file readable by its owner only. Refuses to replace an
    /// existing file: overwriting a key makes the dataset unreadable.
    pub fn write_new(&self, path: &Path) -> Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| VaultError::io("creating key file", path, e))?;
        let text = format!("{KEY_FILE_HEADER}\n{}\n", hex::encode(self.0));
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| VaultError::io("writing key file", path, e))
    }

    /// Reads a key file written by [`DatasetKey::write_new`].
    pub fn load(path: &Path) -> Result<Self> {
        let bad = |reason: String| VaultError::KeyFile {
            path: path.to_path_buf(),
            reason,
        };
        if let Some(why) = readable_by_others(path, "the key")
            .map_err(|e| VaultError::io("reading key file", path, e))?
        {
            return Err(bad(why));
        }
        let text = crate::signing::read_regular(path, 64 * 1024)
            .map_err(|e| VaultError::io("reading key file", path, e))
            .and_then(|b| String::from_utf8(b).map_err(|_| bad("not text".into())))?;
        if let Some(wrapped) = crate::kek::parse(path, &text) {
            let device_error = |e: crate::kek::KekError| VaultError::KeyDevice {
                path: path.to_path_buf(),
                reason: e.to_string(),
            };
            let w = wrapped.map_err(device_error)?;
            let (key, away) = crate::kek::unwrap(path, &w).map_err(device_error)?;
            if let Some(away) = away {
                tracing::warn!(
                    key_file = %path.display(),
                    device = %w.device,
                    away_seconds = away.as_secs(),
                    "the key device does not answer: using the dataset key already unwrapped in memory"
                );
            }
            return Ok(key);
        }
        let mut lines = text.lines();
        if lines.next() != Some(KEY_FILE_HEADER) {
            return Err(bad(format!(
                "not a triad key file (first line must be `{KEY_FILE_HEADER}`); create one with `triad keygen`"
            )));
        }
        let hexkey = lines.next().unwrap_or("").trim();
        let bytes =
            hex::decode(hexkey).map_err(|_| bad("the key line is not hexadecimal".into()))?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| bad("the key must be 32 bytes (64 hex digits)".into()))?;
        Ok(DatasetKey(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_round_trips_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let key = DatasetKey::generate();
        key.write_new(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(DatasetKey::load(&path).unwrap().key_id(), key.key_id());
        assert!(
            key.write_new(&path).is_err(),
            "an existing key file must never be replaced"
        );
    }

    #[test]
    fn key_file_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        DatasetKey::generate().write_new(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = DatasetKey::load(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn sub_keys_differ() {
        let k = DatasetKey::generate().derive();
        assert_ne!(k.chunk_id, k.digest);
        assert_ne!(k.chunk_seal, k.record_seal);
    }
}
