//! SM2 signatures on the evidence an auditor reads: drill reports and the
//! archive's head.
//!
//! The dataset key authenticates everything between sites, but only holders
//! of that key can check it, and every site holds it. An auditor is a third
//! party: they get a site's public key and check that a report is the one
//! that site wrote, byte for byte. So evidence carries an SM2 signature
//! (GM/T 0003, with SM3 as the hash and GM/T 0009's default signer id
//! `1234567812345678`, which other SM2 tools assume too), made with a
//! per-site signing key that is not the dataset key.
//!
//! Key files are PKCS#8 (private, mode 0600) and SubjectPublicKeyInfo
//! (public), both PEM, as `openssl` and Tongsuo read them. A signature is
//! DER (`SEQUENCE { r, s }`), detached in a `<file>.sig` next to the file it
//! signs, so it also checks with `openssl dgst -sm3 -verify`.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use der::{Decode, Encode};
use sm2::dsa::signature::{Signer, Verifier};
use sm2::dsa::{Signature, SigningKey, VerifyingKey};
use sm2::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding,
};
use sm2::{PublicKey, SecretKey};
use sm3::Digest;

use crate::error::{Result, VaultError};

/// The signer id (ZA's ID) GM/T 0009-2012 sets as the default, so that a
/// signature checks with other SM2 implementations without telling them one.
pub const SIGNER_ID: &str = "1234567812345678";

/// A signature is at most this long in DER (two 32-byte integers, each with
/// a possible leading zero, and their headers); anything longer is refused
/// before it is read.
pub const MAX_SIGNATURE_LEN: usize = 80;

/// The file a signature of `path` is kept in.
pub fn signature_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".sig");
    PathBuf::from(s)
}

/// A site's evidence signing key. Debug output shows only its fingerprint.
pub struct EvidenceSigner {
    key: SigningKey,
    public: PublicKey,
}

impl std::fmt::Debug for EvidenceSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EvidenceSigner({})", fingerprint(&self.public))
    }
}

/// A public key that evidence is checked against.
#[derive(Debug, Clone)]
pub struct EvidenceKey {
    key: VerifyingKey,
    public: PublicKey,
}

/// SM3 over the key's SubjectPublicKeyInfo DER: what an auditor compares
/// with the fingerprint the site's operator gave them.
fn fingerprint(public: &PublicKey) -> String {
    match public.to_public_key_der() {
        Ok(der) => format!("sm3:{}", hex::encode(sm3::Sm3::digest(der.as_bytes()))),
        Err(_) => "sm3:?".into(),
    }
}

fn key_error(path: &Path, reason: impl Into<String>) -> VaultError {
    VaultError::KeyFile {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads a small text file whole, refusing one larger than `limit` (a key
/// file is a few hundred bytes; never trust its length).
fn read_small(path: &Path, limit: u64, context: &'static str) -> Result<String> {
    let bytes = read_regular(path, limit).map_err(|e| VaultError::io(context, path, e))?;
    String::from_utf8(bytes).map_err(|_| key_error(path, "not text"))
}

impl EvidenceSigner {
    /// Makes a new key pair and writes it: the private key to `path`
    /// (mode 0600, never replacing a file) and the public key to `public`.
    pub fn generate(path: &Path, public: &Path) -> Result<Self> {
        let secret = SecretKey::random(&mut rand::rngs::OsRng);
        let pem = secret
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| key_error(path, format!("cannot encode the new key: {e}")))?;
        let signer = Self::from_secret(path, &secret)?;
        let pub_pem = signer.public_pem()?;
        write_new(path, pem.as_bytes(), 0o600)?;
        if let Err(e) = write_new(public, pub_pem.as_bytes(), 0o644) {
            // A private key whose public half was never written is no use
            // to anyone, and would block the retry.
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Ok(signer)
    }

    fn from_secret(path: &Path, secret: &SecretKey) -> Result<Self> {
        let key = SigningKey::new(SIGNER_ID, secret)
            .map_err(|e| key_error(path, format!("not a usable SM2 key: {e}")))?;
        Ok(EvidenceSigner {
            key,
            public: secret.public_key(),
        })
    }

    /// Reads a private key written by [`EvidenceSigner::generate`] (or any
    /// PKCS#8 SM2 key). Refuses a file others may read.
    pub fn load(path: &Path) -> Result<Self> {
        if let Some(why) = crate::keys::readable_by_others(path, "the signing key")
            .map_err(|e| VaultError::io("reading the evidence signing key", path, e))?
        {
            return Err(key_error(path, why));
        }
        let text = read_small(path, 16 * 1024, "reading the evidence signing key")?;
        let secret = SecretKey::from_pkcs8_pem(&text).map_err(|e| {
            key_error(
                path,
                format!("not an SM2 private key in PKCS#8 PEM ({e}); create one with `triad keygen --sm2`"),
            )
        })?;
        Self::from_secret(path, &secret)
    }

    /// The DER signature of `message`.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        let sig: Signature = self.key.sign(message);
        let (r, s) = (sig.r_bytes(), sig.s_bytes());
        // r and s are nonzero scalars below the group order, so both are
        // valid unsigned integers and the encoding cannot fail.
        match (der::asn1::UintRef::new(&r), der::asn1::UintRef::new(&s)) {
            (Ok(r), Ok(s)) => DerSignature { r, s }.to_der().unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// Signs the file at `path` as it is on disk and writes `<path>.sig`
    /// (temporary file, fsync, rename); returns the signature's path.
    pub fn sign_file(&self, path: &Path) -> Result<PathBuf> {
        let bytes =
            std::fs::read(path).map_err(|e| VaultError::io("reading a file to sign", path, e))?;
        let sig_path = signature_path(path);
        let tmp = {
            let mut s = sig_path.as_os_str().to_os_string();
            s.push(".tmp");
            PathBuf::from(s)
        };
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&self.sign(&bytes))?;
            f.sync_all()?;
            std::fs::rename(&tmp, &sig_path)
        };
        write().map_err(|e| VaultError::io("writing a signature", &sig_path, e))?;
        Ok(sig_path)
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.public)
    }

    pub fn public_pem(&self) -> Result<String> {
        self.public
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| key_error(Path::new("-"), format!("cannot encode the public key: {e}")))
    }

    /// The matching public key, to check this site's own evidence.
    pub fn evidence_key(&self) -> EvidenceKey {
        EvidenceKey {
            key: self.key.verifying_key().clone(),
            public: self.public,
        }
    }
}

/// Why a signature did not check.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error("the signature is {0} bytes; an SM2 signature is at most {MAX_SIGNATURE_LEN}")]
    TooLong(usize),
    #[error("the signature is not an SM2 signature in DER: {0}")]
    Malformed(String),
    #[error(
        "the signature does NOT match: the file was changed after it was signed, or another key signed it"
    )]
    Mismatch,
    #[error("a statement of {0} bytes; a signed object carries at most {MAX_STATEMENT_LEN}")]
    StatementTooLong(usize),
}

impl EvidenceKey {
    /// Reads a public key (SubjectPublicKeyInfo PEM).
    pub fn load(path: &Path) -> Result<Self> {
        let text = read_small(path, 16 * 1024, "reading a public key")?;
        let public = PublicKey::from_public_key_pem(&text).map_err(|e| {
            key_error(
                path,
                format!("not an SM2 public key in PEM ({e}); `triad keygen --sm2` writes one beside the private key"),
            )
        })?;
        let key = VerifyingKey::new(SIGNER_ID, public)
            .map_err(|e| key_error(path, format!("not a usable SM2 public key: {e}")))?;
        Ok(EvidenceKey { key, public })
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.public)
    }

    /// Checks a DER signature of `message`.
    pub fn verify(
        &self,
        message: &[u8],
        signature: &[u8],
    ) -> std::result::Result<(), SignatureError> {
        if signature.len() > MAX_SIGNATURE_LEN {
            return Err(SignatureError::TooLong(signature.len()));
        }
        let parsed = DerSignature::from_der(signature)
            .map_err(|e| SignatureError::Malformed(e.to_string()))?;
        let scalar = |v: der::asn1::UintRef<'_>| -> std::result::Result<[u8; 32], SignatureError> {
            let b = v.as_bytes();
            if b.len() > 32 {
                return Err(SignatureError::Malformed(
                    "an integer longer than 32 bytes".into(),
                ));
            }
            let mut out = [0u8; 32];
            out[32 - b.len()..].copy_from_slice(b);
            Ok(out)
        };
        let sig = Signature::from_scalars(scalar(parsed.r)?, scalar(parsed.s)?)
            .map_err(|_| SignatureError::Malformed("r or s is out of range".into()))?;
        self.key
            .verify(message, &sig)
            .map_err(|_| SignatureError::Mismatch)
    }
}

/// The last bytes of an object that carries its own signature.
pub const TRAILER_MAGIC: &[u8; 8] = b"TRIADSG1";

/// A statement in a signed object is at most this long.
pub const MAX_STATEMENT_LEN: usize = 4096;

/// What the signature of a signed object covers: a context that no report
/// begins with (so a report's detached signature can never pass for an
/// object's, nor the other way round), both lengths (so the boundary
/// between body and statement cannot be moved), the body and the
/// statement.
const OBJECT_CONTEXT: &[u8] = b"triad signed object v1\0";

fn object_message(body: &[u8], statement: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(OBJECT_CONTEXT.len() + 10 + body.len() + statement.len());
    m.extend_from_slice(OBJECT_CONTEXT);
    m.extend_from_slice(&(body.len() as u64).to_be_bytes());
    m.extend_from_slice(&(statement.len() as u16).to_be_bytes());
    m.extend_from_slice(body);
    m.extend_from_slice(statement);
    m
}

/// An object that carries its signature at its end (formats.md 16.7):
/// `body ‖ statement ‖ signature ‖ statement length (u16 BE) ‖ signature
/// length (u8) ‖ "TRIADSG1"`, the signature covering [`object_message`].
/// The statement is a short plaintext (JSON) saying what the body is, for
/// a reader who cannot open the body.
#[derive(Debug, Clone, Copy)]
pub struct SignedParts<'a> {
    pub body: &'a [u8],
    pub statement: &'a [u8],
    pub signature: &'a [u8],
}

impl EvidenceSigner {
    /// `body` with `statement` and their signature appended; refuses a
    /// statement over [`MAX_STATEMENT_LEN`] rather than cut it.
    pub fn append_signature(
        &self,
        body: &[u8],
        statement: &[u8],
    ) -> std::result::Result<Vec<u8>, SignatureError> {
        if statement.len() > MAX_STATEMENT_LEN {
            return Err(SignatureError::StatementTooLong(statement.len()));
        }
        let sig = self.sign(&object_message(body, statement));
        let mut out = Vec::with_capacity(body.len() + statement.len() + 96);
        out.extend_from_slice(body);
        out.extend_from_slice(statement);
        out.extend_from_slice(&sig);
        // Both fit: the statement is at most 4096 bytes and a DER SM2
        // signature at most 72.
        out.extend_from_slice(&(statement.len() as u16).to_be_bytes());
        out.push(sig.len() as u8);
        out.extend_from_slice(TRAILER_MAGIC);
        Ok(out)
    }
}

impl EvidenceKey {
    /// Checks the signature a signed object carries.
    pub fn verify_object(
        &self,
        parts: &SignedParts<'_>,
    ) -> std::result::Result<(), SignatureError> {
        self.verify(
            &object_message(parts.body, parts.statement),
            parts.signature,
        )
    }
}

/// The parts of an object written by [`EvidenceSigner::append_signature`];
/// None when it does not end in a well-formed trailer (an unsigned object).
pub fn split_signed(object: &[u8]) -> Option<SignedParts<'_>> {
    let rest = object.strip_suffix(TRAILER_MAGIC.as_slice())?;
    let (sig_len, rest) = rest.split_last()?;
    let sig_len = usize::from(*sig_len);
    let (rest, st_len) = rest.split_at_checked(rest.len().checked_sub(2)?)?;
    let st_len = usize::from(u16::from_be_bytes([st_len[0], st_len[1]]));
    if sig_len > MAX_SIGNATURE_LEN || st_len > MAX_STATEMENT_LEN {
        return None;
    }
    let (signed, signature) = rest.split_at_checked(rest.len().checked_sub(sig_len)?)?;
    let (body, statement) = signed.split_at_checked(signed.len().checked_sub(st_len)?)?;
    Some(SignedParts {
        body,
        statement,
        signature,
    })
}

/// Reads a regular file of at most `limit` bytes. The size is checked on
/// the opened file and the read is bounded too, so a symlink to a device,
/// a FIFO or a file that grows while it is read cannot make it allocate
/// without bound or block.
pub fn read_regular(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let mut out = Vec::new();
    f.take(limit + 1).read_to_end(&mut out)?;
    if out.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {limit} bytes"),
        ));
    }
    Ok(out)
}

/// An SM2 signature as GM/T 0009 and X9.62 encode it: `SEQUENCE { r, s }`.
#[derive(der::Sequence)]
struct DerSignature<'a> {
    r: der::asn1::UintRef<'a>,
    s: der::asn1::UintRef<'a>,
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| VaultError::io("creating a key file", path, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| VaultError::io("writing a key file", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_signed_file_checks_and_one_changed_byte_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let (key, public) = (dir.path().join("site.key"), dir.path().join("site.pub"));
        let signer = EvidenceSigner::generate(&key, &public).unwrap();
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(
            EvidenceSigner::generate(&key, &public).is_err(),
            "a key file is never replaced"
        );
        let loaded = EvidenceSigner::load(&key).unwrap();
        let checker = EvidenceKey::load(&public).unwrap();
        assert_eq!(loaded.fingerprint(), checker.fingerprint());
        assert_eq!(signer.fingerprint(), checker.fingerprint());

        let report = dir.path().join("report.json");
        std::fs::write(&report, b"{\"result\": \"passed\"}").unwrap();
        let sig = loaded.sign_file(&report).unwrap();
        let der = std::fs::read(&sig).unwrap();
        checker
            .verify(&std::fs::read(&report).unwrap(), &der)
            .unwrap();

        let mut changed = std::fs::read(&report).unwrap();
        changed[13] ^= 0x01;
        assert!(matches!(
            checker.verify(&changed, &der),
            Err(SignatureError::Mismatch)
        ));
        let other = EvidenceSigner::generate(&dir.path().join("o.key"), &dir.path().join("o.pub"))
            .unwrap()
            .evidence_key();
        assert!(matches!(
            other.verify(&std::fs::read(&report).unwrap(), &der),
            Err(SignatureError::Mismatch)
        ));
        assert!(matches!(
            checker.verify(b"x", &[0x30; 200]),
            Err(SignatureError::TooLong(200))
        ));
        assert!(matches!(
            checker.verify(b"x", b"not der"),
            Err(SignatureError::Malformed(_))
        ));
    }

    #[test]
    fn an_object_carries_its_statement_and_signature_and_any_change_shows() {
        let dir = tempfile::tempdir().unwrap();
        let (key, public) = (dir.path().join("k"), dir.path().join("k.pub"));
        let signer = EvidenceSigner::generate(&key, &public).unwrap();
        let checker = EvidenceKey::load(&public).unwrap();
        let obj = signer
            .append_signature(b"sealed head bytes", b"{\"seq\":42}")
            .unwrap();
        let parts = split_signed(&obj).unwrap();
        assert_eq!(parts.body, b"sealed head bytes");
        assert_eq!(parts.statement, b"{\"seq\":42}");
        checker.verify_object(&parts).unwrap();
        // Every bit of every byte, the trailer's lengths included: either
        // the object no longer parses or its signature no longer checks.
        for i in 0..obj.len() {
            for bit in 0..8 {
                let mut bad = obj.clone();
                bad[i] ^= 1 << bit;
                if let Some(p) = split_signed(&bad) {
                    assert!(
                        checker.verify_object(&p).is_err(),
                        "bit {bit} of byte {i} changed and the object still checks"
                    );
                }
            }
        }
        // The statement's length moved by one either way, the signature
        // left as it is: the boundary is signed.
        let at = obj.len() - 8 - 1 - 2;
        for delta in [-1i32, 1] {
            let mut moved = obj.clone();
            let n = i32::from(u16::from_be_bytes([obj[at], obj[at + 1]])) + delta;
            moved[at..at + 2].copy_from_slice(&(n as u16).to_be_bytes());
            let p = split_signed(&moved).unwrap();
            assert!(checker.verify_object(&p).is_err(), "length {n} checks");
        }
        // A detached signature of the same bytes is no object signature.
        let raw = [&b"sealed head bytes"[..], b"{\"seq\":42}"].concat();
        let detached = signer.sign(&raw);
        assert!(checker
            .verify_object(&SignedParts {
                body: b"sealed head bytes",
                statement: b"{\"seq\":42}",
                signature: &detached,
            })
            .is_err());
        assert!(matches!(
            signer.append_signature(b"x", &[b' '; MAX_STATEMENT_LEN + 1]),
            Err(SignatureError::StatementTooLong(_))
        ));
        assert!(split_signed(b"sealed head bytes").is_none());
        assert!(split_signed(b"TRIADSG1").is_none());
        assert!(split_signed(b"\xff\xff\xffTRIADSG1").is_none());
    }

    #[test]
    fn a_signing_key_others_may_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("site.key");
        EvidenceSigner::generate(&key, &dir.path().join("site.pub")).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = EvidenceSigner::load(&key).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }
}
