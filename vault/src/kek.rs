//! Dataset keys wrapped by a key-encryption key (KEK) that stays inside a
//! cryptographic device, reached through PKCS#11 (the interface most HSMs
//! offer, domestic ones included).
//!
//! A wrapped key file holds no key: it names the device (module, token,
//! PIN file), the KEK's label, and the dataset key encrypted under the KEK.
//! [`DatasetKey::load`](crate::DatasetKey::load) recognises it and asks the
//! device to decrypt; the plain key then lives only in the process's
//! memory. Re-wrapping under another KEK writes a new file and touches no
//! data, since the dataset key itself does not change.
//!
//! The device is opened, used and closed again for each request (with one
//! lock for the whole process, as a PKCS#11 module may be initialised once
//! at a time). That costs milliseconds and is done at start and by the
//! daemon's periodic check, never per chunk, and it means a token that is
//! removed is noticed at the next check instead of hidden by a session
//! opened long ago.
//!
//! When the device cannot be reached, a process that has already unwrapped
//! a key may go on using it for a bounded time ([`set_grace`]; 0, the
//! default, outside the daemon): the daemon keeps running and raises an
//! alert, and stops when the grace runs out.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use serde::{Deserialize, Serialize};

use crate::keys::DatasetKey;

/// The `format` of a wrapped key file.
pub const WRAPPED_FORMAT: &str = "triad-dataset-key-wrapped-v1";

/// The only wrapping mechanism: AES-256-GCM inside the device, with a
/// random 96-bit IV and the key id as associated data, so a wrong KEK or an
/// altered file fails the tag instead of giving a wrong key. (SoftHSM2, the
/// device the tests use, has no SM4; a domestic device's SM4 mechanisms are
/// vendor-defined and not built here.)
pub const MECHANISM: &str = "aes-256-gcm";

/// A wrapped key file is a few hundred bytes; anything larger is refused
/// unread.
const MAX_FILE: u64 = 16 * 1024;

/// Where the KEK lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    /// The PKCS#11 module (a shared library).
    pub module: PathBuf,
    /// The token's label.
    pub token: String,
    /// A file holding the user PIN (mode 0600).
    pub pin_file: PathBuf,
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "token `{}` of PKCS#11 module {}",
            self.token,
            self.module.display()
        )
    }
}

/// A wrapped key file's content (TOML).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wrapped {
    pub format: String,
    /// The dataset key's id ([`DatasetKey::key_id`]), checked after
    /// unwrapping.
    pub key_id: String,
    /// The KEK's label in the token.
    pub kek: String,
    pub mechanism: String,
    /// Hex, 12 bytes.
    pub iv: String,
    /// Hex: the encrypted key and the GCM tag, 48 bytes.
    pub wrapped: String,
    pub device: Device,
}

/// Why the device could not give the key.
#[derive(Debug, thiserror::Error)]
pub enum KekError {
    #[error("{0}: {1}")]
    File(PathBuf, String),
    #[error("{device}: cannot load the module: {reason}")]
    Module { device: Device, reason: String },
    #[error("{device}: no such token is present (is the device connected?)")]
    NoToken { device: Device },
    #[error(
        "{device}: the PIN in {} is refused ({reason}); it is not tried again until that file \
         changes, so the token does not lock it",
        .device.pin_file.display()
    )]
    PinRefused { device: Device, reason: String },
    #[error("{device}: cannot log in: {reason}")]
    Login { device: Device, reason: String },
    #[error("{device}: cannot read the PIN file {}: {reason}", .device.pin_file.display())]
    PinFile { device: Device, reason: String },
    #[error("{device}: {count} keys are labelled `{kek}`; give the KEK a label of its own")]
    KekAmbiguous {
        device: Device,
        kek: String,
        count: usize,
    },
    #[error(
        "{device}: key `{kek}` may leave the token (CKA_EXTRACTABLE or not CKA_SENSITIVE); make \
         a KEK with --create-kek"
    )]
    KekExtractable { device: Device, kek: String },
    #[error(
        "the key file now holds dataset key {found}, but the dataset runs on {expected}: \
         put back the file it was started with"
    )]
    OtherKey { expected: String, found: String },
    #[error("{device}: no key labelled `{kek}` in the token")]
    NoKek { device: Device, kek: String },
    #[error("{device}: a key labelled `{kek}` already exists in the token")]
    KekExists { device: Device, kek: String },
    #[error(
        "{device}: key `{kek}` does not unwrap this file: it was wrapped by another key of that \
         label, or the file was altered ({reason})"
    )]
    Unwrap {
        device: Device,
        kek: String,
        reason: String,
    },
    #[error("{device}: {reason}")]
    Device { device: Device, reason: String },
}

/// One PKCS#11 session at a time in this process: a module is initialised
/// for a request and finalised after it.
static DEVICE_LOCK: Mutex<()> = Mutex::new(());

/// Keys this process unwrapped, with when the device last confirmed each,
/// for the grace (see [`set_grace`]).
struct Cached {
    key: DatasetKey,
    confirmed: Instant,
}

static CACHE: Mutex<Option<HashMap<PathBuf, Cached>>> = Mutex::new(None);
static GRACE: Mutex<Duration> = Mutex::new(Duration::ZERO);

/// How long a key already unwrapped by this process may still be used
/// after its device stops answering. The daemon sets `[keys]
/// device_grace`; command-line tools keep 0 and need the device.
pub fn set_grace(grace: Duration) {
    if let Ok(mut g) = GRACE.lock() {
        *g = grace;
    }
}

fn grace() -> Duration {
    GRACE.lock().map(|g| *g).unwrap_or(Duration::ZERO)
}

fn file_error(path: &Path, reason: impl Into<String>) -> KekError {
    KekError::File(path.to_path_buf(), reason.into())
}

fn read_private(path: &Path, what: &str) -> Result<String, KekError> {
    if let Some(why) = crate::keys::readable_by_others(path, what)
        .map_err(|e| file_error(path, format!("reading {what}: {e}")))?
    {
        return Err(file_error(path, why));
    }
    let bytes = crate::signing::read_regular(path, MAX_FILE)
        .map_err(|e| file_error(path, format!("reading {what}: {e}")))?;
    String::from_utf8(bytes).map_err(|_| file_error(path, format!("{what} is not text")))
}

/// The PKCS#11 return code of an error, if it came from the module.
fn rv(e: &cryptoki::error::Error) -> Option<cryptoki::error::RvError> {
    match e {
        cryptoki::error::Error::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// How long a request waits for another one in this process before it
/// gives up: a device that hangs must not hang every key load with it.
const DEVICE_WAIT: Duration = Duration::from_secs(10);

/// Runs `f` in a logged-in session of the device's token, then closes the
/// session and finalises the module whatever `f` gave.
fn with_session<T>(
    device: &Device,
    f: impl FnOnce(&Session) -> Result<T, KekError>,
) -> Result<T, KekError> {
    let fail = |reason: String| KekError::Device {
        device: device.clone(),
        reason,
    };
    let waited = Instant::now();
    let _one = loop {
        match DEVICE_LOCK.try_lock() {
            Ok(g) => break g,
            Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) if waited.elapsed() < DEVICE_WAIT => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(std::sync::TryLockError::WouldBlock) => {
                return Err(fail(format!(
                    "another request to the device has not returned for {}s",
                    DEVICE_WAIT.as_secs()
                )))
            }
        }
    };
    let pin =
        read_private(&device.pin_file, "the device's PIN").map_err(|e| KekError::PinFile {
            device: device.clone(),
            reason: e.to_string(),
        })?;
    let p11 = Pkcs11::new(&device.module).map_err(|e| KekError::Module {
        device: device.clone(),
        reason: e.to_string(),
    })?;
    p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(|e| fail(format!("C_Initialize: {e}")))?;
    let result = (|| {
        let slot = p11
            .get_slots_with_token()
            .map_err(|e| fail(format!("listing slots: {e}")))?
            .into_iter()
            .find(|s| {
                p11.get_token_info(*s)
                    .is_ok_and(|i| i.label().trim_end() == device.token)
            })
            .ok_or_else(|| KekError::NoToken {
                device: device.clone(),
            })?;
        let session = p11
            .open_rw_session(slot)
            .map_err(|e| fail(format!("opening a session: {e}")))?;
        session
            .login(
                UserType::User,
                Some(&AuthPin::from(pin.trim_end().to_string())),
            )
            .map_err(|e| {
                use cryptoki::error::RvError as Rv;
                let refused = matches!(
                    rv(&e),
                    Some(
                        Rv::PinIncorrect
                            | Rv::PinInvalid
                            | Rv::PinLenRange
                            | Rv::PinExpired
                            | Rv::PinLocked
                    )
                );
                let (device, reason) = (device.clone(), e.to_string());
                if refused {
                    KekError::PinRefused { device, reason }
                } else {
                    KekError::Login { device, reason }
                }
            })?;
        let r = f(&session);
        // Closing a session logs it out; an error there changes nothing.
        let _ = session.close();
        r
    })();
    let _ = p11.finalize();
    result
}

fn kek_template(label: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Label(label.as_bytes().to_vec()),
    ]
}

fn find_kek(device: &Device, s: &Session, label: &str) -> Result<Option<ObjectHandle>, KekError> {
    let found = s
        .find_objects(&kek_template(label))
        .map_err(|e| KekError::Device {
            device: device.clone(),
            reason: format!("finding key `{label}`: {e}"),
        })?;
    if found.len() > 1 {
        return Err(KekError::KekAmbiguous {
            device: device.clone(),
            kek: label.into(),
            count: found.len(),
        });
    }
    Ok(found.into_iter().next())
}

/// Refuses a KEK that could leave the token.
fn check_kept_inside(
    device: &Device,
    s: &Session,
    label: &str,
    k: ObjectHandle,
) -> Result<(), KekError> {
    use cryptoki::object::AttributeType;
    let attrs = s
        .get_attributes(k, &[AttributeType::Extractable, AttributeType::Sensitive])
        .map_err(|e| KekError::Device {
            device: device.clone(),
            reason: format!("reading the attributes of `{label}`: {e}"),
        })?;
    let extractable = attrs
        .iter()
        .any(|a| matches!(a, Attribute::Extractable(true)));
    let sensitive = attrs
        .iter()
        .any(|a| matches!(a, Attribute::Sensitive(true)));
    if extractable || !sensitive {
        return Err(KekError::KekExtractable {
            device: device.clone(),
            kek: label.into(),
        });
    }
    Ok(())
}

/// Makes a new AES-256 KEK in the token: kept on the token, sensitive and
/// never extractable, usable only to encrypt and decrypt. Refuses a label
/// already taken.
pub fn create_kek(device: &Device, label: &str) -> Result<(), KekError> {
    with_session(device, |s| {
        if find_kek(device, s, label)?.is_some() {
            return Err(KekError::KekExists {
                device: device.clone(),
                kek: label.into(),
            });
        }
        let mut t = kek_template(label);
        t.extend([
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::ValueLen(32.into()),
        ]);
        s.generate_key(&Mechanism::AesKeyGen, &t)
            .map_err(|e| KekError::Device {
                device: device.clone(),
                reason: format!("generating key `{label}`: {e}"),
            })?;
        Ok(())
    })
}

fn aad(key_id: &str) -> Vec<u8> {
    format!("triad dataset key wrapped v1 {key_id}").into_bytes()
}

/// Wraps `key` under the KEK `kek` of `device`.
pub fn wrap(key: &DatasetKey, device: &Device, kek: &str) -> Result<Wrapped, KekError> {
    use rand::RngCore;
    let mut iv = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut iv);
    let key_id = key.key_id();
    let (sealed, iv) = with_session(device, |s| {
        let handle = find_kek(device, s, kek)?.ok_or_else(|| KekError::NoKek {
            device: device.clone(),
            kek: kek.into(),
        })?;
        check_kept_inside(device, s, kek, handle)?;
        let mut iv_param = iv;
        let aad = aad(&key_id);
        let params =
            GcmParams::new(&mut iv_param, &aad, 128.into()).map_err(|e| KekError::Device {
                device: device.clone(),
                reason: e.to_string(),
            })?;
        let sealed = s
            .encrypt(&Mechanism::AesGcm(params), handle, key.expose())
            .map_err(|e| KekError::Device {
                device: device.clone(),
                reason: format!("encrypting under `{kek}`: {e}"),
            })?;
        // A device may write an IV of its own into the parameter (FIPS
        // mode generates them): the one it used is the one that decrypts.
        Ok((sealed, iv_param))
    })?;
    Ok(Wrapped {
        format: WRAPPED_FORMAT.into(),
        key_id,
        kek: kek.into(),
        mechanism: MECHANISM.into(),
        iv: hex::encode(iv),
        wrapped: hex::encode(sealed),
        device: device.clone(),
    })
}

/// Asks the device to unwrap `w`, and checks that the key is the one the
/// file names.
fn unwrap_now(path: &Path, w: &Wrapped) -> Result<DatasetKey, KekError> {
    let iv: [u8; 12] = hex::decode(&w.iv)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| file_error(path, "`iv` must be 24 hex digits"))?;
    let sealed = hex::decode(&w.wrapped)
        .ok()
        .filter(|v| v.len() == 48)
        .ok_or_else(|| file_error(path, "`wrapped` must be 96 hex digits"))?;
    let device = &w.device;
    let plain = with_session(device, |s| {
        let handle = find_kek(device, s, &w.kek)?.ok_or_else(|| KekError::NoKek {
            device: device.clone(),
            kek: w.kek.clone(),
        })?;
        let mut iv_param = iv;
        let aad = aad(&w.key_id);
        let params =
            GcmParams::new(&mut iv_param, &aad, 128.into()).map_err(|e| KekError::Device {
                device: device.clone(),
                reason: e.to_string(),
            })?;
        s.decrypt(&Mechanism::AesGcm(params), handle, &sealed)
            .map_err(|e| {
                use cryptoki::error::RvError as Rv;
                // The device failing is told apart by its codes; any other
                // refusal of the decryption is about the data (SoftHSM2
                // answers a tag that does not verify with
                // CKR_GENERAL_ERROR, others with CKR_ENCRYPTED_DATA_INVALID).
                let device_failed = matches!(
                    rv(&e),
                    None | Some(
                        Rv::DeviceError
                            | Rv::DeviceMemory
                            | Rv::DeviceRemoved
                            | Rv::SessionClosed
                            | Rv::SessionHandleInvalid
                            | Rv::TokenNotPresent
                            | Rv::TokenNotRecognized
                            | Rv::CryptokiNotInitialized
                            | Rv::HostMemory
                            | Rv::FunctionCanceled
                    )
                );
                let about_data = !device_failed;
                if about_data {
                    KekError::Unwrap {
                        device: device.clone(),
                        kek: w.kek.clone(),
                        reason: e.to_string(),
                    }
                } else {
                    KekError::Device {
                        device: device.clone(),
                        reason: format!("decrypting with `{}`: {e}", w.kek),
                    }
                }
            })
    })?;
    let bytes: [u8; 32] = plain.try_into().map_err(|_| KekError::Unwrap {
        device: device.clone(),
        kek: w.kek.clone(),
        reason: "the unwrapped key is not 32 bytes".into(),
    })?;
    let key = DatasetKey::from_bytes(bytes);
    if key.key_id() != w.key_id {
        return Err(KekError::Unwrap {
            device: device.clone(),
            kek: w.kek.clone(),
            reason: format!(
                "it gives key id {}, the file says {}",
                key.key_id(),
                w.key_id
            ),
        });
    }
    Ok(key)
}

/// Parses a wrapped key file's text; None when it is not one.
pub fn parse(path: &Path, text: &str) -> Option<Result<Wrapped, KekError>> {
    if !text.contains(WRAPPED_FORMAT) {
        return None;
    }
    Some(
        toml::from_str::<Wrapped>(text)
            .map_err(|e| file_error(path, format!("not a wrapped key file: {e}")))
            .and_then(|w| {
                if w.format != WRAPPED_FORMAT || w.mechanism != MECHANISM {
                    Err(file_error(
                        path,
                        format!(
                            "format `{}` with mechanism `{}`; this triad reads `{WRAPPED_FORMAT}` with `{MECHANISM}`",
                            w.format, w.mechanism
                        ),
                    ))
                } else if !w.device.module.is_absolute() || !w.device.pin_file.is_absolute() {
                    // A relative module would be looked up on the loader's
                    // search path: the library loaded must be the one named.
                    Err(file_error(
                        path,
                        "device.module and device.pin_file must be absolute paths",
                    ))
                } else {
                    Ok(w)
                }
            }),
    )
}

/// Reads a wrapped key file (refusing one others may read).
pub fn read(path: &Path) -> Result<Wrapped, KekError> {
    let text = read_private(path, "the wrapped key file")?;
    parse(path, &text).unwrap_or_else(|| Err(file_error(path, "not a wrapped key file")))
}

/// Unwraps the key of the wrapped key file `path`. When the device cannot
/// give it but this process unwrapped it before and the device confirmed it
/// within the grace, the key in memory is used and the caller is told how
/// long the device has been away.
pub fn unwrap(path: &Path, w: &Wrapped) -> Result<(DatasetKey, Option<Duration>), KekError> {
    match unwrap_now(path, w) {
        Ok(key) => {
            if let Ok(mut c) = CACHE.lock() {
                c.get_or_insert_with(HashMap::new).insert(
                    path.to_path_buf(),
                    Cached {
                        key: key.clone(),
                        confirmed: Instant::now(),
                    },
                );
            }
            Ok((key, None))
        }
        // A file that does not unwrap is never covered by the grace: only a
        // device that cannot be reached is.
        Err(e @ (KekError::Unwrap { .. } | KekError::File(..) | KekError::OtherKey { .. })) => {
            Err(e)
        }
        Err(e) => {
            let g = grace();
            let cached = CACHE.lock().ok().and_then(|c| {
                c.as_ref()?
                    .get(path)
                    .filter(|c| c.confirmed.elapsed() <= g && c.key.key_id() == w.key_id)
                    .map(|c| (c.key.clone(), c.confirmed.elapsed()))
            });
            match cached {
                Some((key, away)) if !g.is_zero() => Ok((key, Some(away))),
                _ => Err(e),
            }
        }
    }
}

/// Asks the device to unwrap the key of `path` again (the daemon's periodic
/// check): Ok when it still gives the key `expected` (the one the process
/// runs on; None to take whatever the file holds), and the grace starts
/// again from now.
pub fn confirm(path: &Path, expected: Option<&str>) -> Result<Wrapped, KekError> {
    let w = read(path)?;
    if let Some(expected) = expected.filter(|e| **e != w.key_id) {
        return Err(KekError::OtherKey {
            expected: expected.into(),
            found: w.key_id.clone(),
        });
    }
    let key = unwrap_now(path, &w)?;
    if let Ok(mut c) = CACHE.lock() {
        c.get_or_insert_with(HashMap::new).insert(
            path.to_path_buf(),
            Cached {
                key,
                confirmed: Instant::now(),
            },
        );
    }
    Ok(w)
}

/// Drops the key of `path` from this process's memory: once the grace has
/// run out, nothing may unwrap it without the device.
pub fn forget(path: &Path) {
    if let Ok(mut c) = CACHE.lock() {
        if let Some(m) = c.as_mut() {
            m.remove(path);
        }
    }
}

/// Writes a wrapped key file, never replacing one.
pub fn write_new(path: &Path, w: &Wrapped) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let text = toml::to_string(w).map_err(std::io::Error::other)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(
        format!("# triad dataset key, wrapped by a key in a cryptographic device\n{text}")
            .as_bytes(),
    )?;
    f.sync_all()
}
