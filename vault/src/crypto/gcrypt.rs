//! SM4-GCM through libgcrypt, loaded at run time.
//!
//! libgcrypt (1.9 and later) has SM4 with AES-NI/AVX2 and a carry-less
//! multiply GHASH, several times the speed of the portable Rust cipher
//! (docs/architecture.md, "SM4 speed"). It is loaded with `dlopen`, not
//! linked, so triad builds and runs without it: [`Gcrypt::load`] says why
//! it cannot be used and the caller keeps the software path.
//!
//! libgcrypt handles are not safe to share between threads, so each thread
//! keeps its own, one per key, set up once: the key schedule is not redone
//! for every chunk.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

use libloading::Library;

use super::{NONCE_LEN, TAG_LEN};

type Handle = *mut c_void;
type Err = c_uint;

/// From gcrypt.h (stable ABI values).
const GCRY_CIPHER_SM4: c_int = 318;
const GCRY_CIPHER_MODE_GCM: c_int = 9;
const GCRYCTL_RESET: c_int = 4;
const GCRYCTL_DISABLE_SECMEM: c_int = 37;
const GCRYCTL_INITIALIZATION_FINISHED: c_int = 38;
/// gpg-error's code for a tag that does not match.
const GPG_ERR_CHECKSUM: c_uint = 10;

/// The oldest libgcrypt with SM4.
const MIN_VERSION: &CStr = c"1.9.0";

/// Keys a thread keeps handles for at most (a site uses a few per dataset).
pub(super) const HANDLES_PER_THREAD: usize = 16;

/// The library's entry points triad uses.
pub struct Gcrypt {
    version: String,
    open: unsafe extern "C" fn(*mut Handle, c_int, c_int, c_uint) -> Err,
    close: unsafe extern "C" fn(Handle),
    ctl: unsafe extern "C" fn(Handle, c_int, *mut c_void, usize) -> Err,
    setkey: unsafe extern "C" fn(Handle, *const c_void, usize) -> Err,
    setiv: unsafe extern "C" fn(Handle, *const c_void, usize) -> Err,
    authenticate: unsafe extern "C" fn(Handle, *const c_void, usize) -> Err,
    encrypt: unsafe extern "C" fn(Handle, *mut c_void, usize, *const c_void, usize) -> Err,
    decrypt: unsafe extern "C" fn(Handle, *mut c_void, usize, *const c_void, usize) -> Err,
    gettag: unsafe extern "C" fn(Handle, *mut c_void, usize) -> Err,
    checktag: unsafe extern "C" fn(Handle, *const c_void, usize) -> Err,
    /// Kept loaded for the process: the function pointers above point
    /// into it.
    _lib: Library,
}

/// A call into libgcrypt failed for a reason other than a wrong tag.
#[derive(Debug)]
pub struct CallFailed(pub &'static str, pub Err);

impl Gcrypt {
    /// Loads libgcrypt and initialises it, or says why it cannot be used.
    pub fn load() -> Result<Gcrypt, String> {
        // SAFETY: loading a system library runs its initialisers;
        // libgcrypt's only set up its own state.
        let lib = unsafe { Library::new("libgcrypt.so.20") }
            .map_err(|e| format!("libgcrypt.so.20 is not installed ({e})"))?;
        // SAFETY: each symbol is looked up with the signature gcrypt.h
        // declares for it.
        unsafe {
            let check: unsafe extern "C" fn(*const c_char) -> *const c_char = *lib
                .get(b"gcry_check_version\0")
                .map_err(|e| e.to_string())?;
            let control: unsafe extern "C" fn(c_int, ...) -> Err =
                *lib.get(b"gcry_control\0").map_err(|e| e.to_string())?;
            let found = check(std::ptr::null());
            let version = if found.is_null() {
                "unknown".to_string()
            } else {
                CStr::from_ptr(found).to_string_lossy().into_owned()
            };
            // Initialises the library, and refuses one without SM4.
            if check(MIN_VERSION.as_ptr()).is_null() {
                return Err(format!(
                    "libgcrypt {version} is older than 1.9, the first with SM4"
                ));
            }
            // Keys live in triad's own memory already; libgcrypt's secure
            // heap would only add a fixed-size pool that can run out.
            control(GCRYCTL_DISABLE_SECMEM, 0 as c_int);
            control(GCRYCTL_INITIALIZATION_FINISHED, 0 as c_int);
            Ok(Gcrypt {
                version,
                open: *lib.get(b"gcry_cipher_open\0").map_err(|e| e.to_string())?,
                close: *lib.get(b"gcry_cipher_close\0").map_err(|e| e.to_string())?,
                ctl: *lib.get(b"gcry_cipher_ctl\0").map_err(|e| e.to_string())?,
                setkey: *lib
                    .get(b"gcry_cipher_setkey\0")
                    .map_err(|e| e.to_string())?,
                setiv: *lib.get(b"gcry_cipher_setiv\0").map_err(|e| e.to_string())?,
                authenticate: *lib
                    .get(b"gcry_cipher_authenticate\0")
                    .map_err(|e| e.to_string())?,
                encrypt: *lib
                    .get(b"gcry_cipher_encrypt\0")
                    .map_err(|e| e.to_string())?,
                decrypt: *lib
                    .get(b"gcry_cipher_decrypt\0")
                    .map_err(|e| e.to_string())?,
                gettag: *lib
                    .get(b"gcry_cipher_gettag\0")
                    .map_err(|e| e.to_string())?,
                checktag: *lib
                    .get(b"gcry_cipher_checktag\0")
                    .map_err(|e| e.to_string())?,
                _lib: lib,
            })
        }
    }

    /// The library's version, for the log and status.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Encrypts `buf` and appends the tag. `buf` is replaced only on
    /// success: on an error it still holds the plaintext.
    pub fn seal(
        &'static self,
        key: &[u8; 16],
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut Vec<u8>,
    ) -> Result<(), CallFailed> {
        self.with_handle(key, |h| {
            self.start(h, nonce, aad)?;
            let n = buf.len();
            let mut out = vec![0u8; n + TAG_LEN];
            // SAFETY: `out` has room for n bytes of ciphertext and the tag;
            // `buf` holds n bytes; the handle is this thread's own.
            unsafe {
                check(
                    "encrypt",
                    (self.encrypt)(h, out.as_mut_ptr().cast(), n, buf.as_ptr().cast(), n),
                )?;
                check(
                    "gettag",
                    (self.gettag)(h, out[n..].as_mut_ptr().cast(), TAG_LEN),
                )?;
            }
            *buf = out;
            Ok(())
        })
    }

    /// Checks the tag at the end of `buf` and decrypts it, dropping the
    /// tag. Ok(false) for a wrong tag (then `buf` is emptied: nothing
    /// unauthenticated is left in it); on an error `buf` is untouched.
    pub fn open(
        &'static self,
        key: &[u8; 16],
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut Vec<u8>,
    ) -> Result<bool, CallFailed> {
        let Some(n) = buf.len().checked_sub(TAG_LEN) else {
            return Ok(false);
        };
        self.with_handle(key, |h| {
            self.start(h, nonce, aad)?;
            let mut out = vec![0u8; n];
            // SAFETY: `out` has room for the n bytes of plaintext; `buf`
            // holds n bytes of ciphertext then the tag.
            let tag = unsafe {
                check(
                    "decrypt",
                    (self.decrypt)(h, out.as_mut_ptr().cast(), n, buf.as_ptr().cast(), n),
                )?;
                (self.checktag)(h, buf[n..].as_ptr().cast(), TAG_LEN)
            };
            match tag & 0xffff {
                0 => {
                    *buf = out;
                    Ok(true)
                }
                GPG_ERR_CHECKSUM => {
                    buf.clear();
                    Ok(false)
                }
                _ => Err(CallFailed("checktag", tag)),
            }
        })
    }

    /// Resets the handle for a new message and feeds it the nonce and AAD.
    fn start(&self, h: Handle, nonce: &[u8; NONCE_LEN], aad: &[u8]) -> Result<(), CallFailed> {
        // SAFETY: the handle is this thread's own; lengths are the
        // slices' own.
        unsafe {
            check(
                "reset",
                (self.ctl)(h, GCRYCTL_RESET, std::ptr::null_mut(), 0),
            )?;
            check("setiv", (self.setiv)(h, nonce.as_ptr().cast(), NONCE_LEN))?;
            check(
                "authenticate",
                (self.authenticate)(h, aad.as_ptr().cast(), aad.len()),
            )
        }
    }

    /// Runs `f` with this thread's handle for `key`, opening it first if
    /// this thread has none.
    fn with_handle<T>(
        &'static self,
        key: &[u8; 16],
        f: impl FnOnce(Handle) -> Result<T, CallFailed>,
    ) -> Result<T, CallFailed> {
        HANDLES.with(|cell| {
            let mut handles = cell.borrow_mut();
            let at = match handles.iter().position(|o| o.key == *key) {
                Some(i) => i,
                None => {
                    if handles.len() >= HANDLES_PER_THREAD {
                        handles.remove(0);
                    }
                    handles.push(Owned::open(self, key)?);
                    handles.len() - 1
                }
            };
            f(handles[at].h)
        })
    }
}

fn check(what: &'static str, e: Err) -> Result<(), CallFailed> {
    if e == 0 {
        Ok(())
    } else {
        Err(CallFailed(what, e))
    }
}

/// One open cipher handle, with the key it was set up for.
struct Owned {
    lib: &'static Gcrypt,
    key: [u8; 16],
    h: Handle,
}

impl Owned {
    fn open(lib: &'static Gcrypt, key: &[u8; 16]) -> Result<Owned, CallFailed> {
        let mut h: Handle = std::ptr::null_mut();
        // SAFETY: `h` receives the new handle; the key is 16 bytes.
        unsafe {
            check(
                "open",
                (lib.open)(&mut h, GCRY_CIPHER_SM4, GCRY_CIPHER_MODE_GCM, 0),
            )?;
            let owned = Owned { lib, key: *key, h };
            check("setkey", (lib.setkey)(h, key.as_ptr().cast(), key.len()))?;
            Ok(owned)
        }
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        // SAFETY: opened by `Owned::open` and closed only here.
        unsafe { (self.lib.close)(self.h) }
    }
}

thread_local! {
    static HANDLES: RefCell<Vec<Owned>> = const { RefCell::new(Vec::new()) };
}
