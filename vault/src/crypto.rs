//! National-algorithm primitives: SM4-GCM for sealing and HMAC-SM3 for evidence.
//!
//! SM4-GCM is the construction RFC 8998 specifies for TLS 1.3: the SM4
//! block cipher in Galois/Counter Mode with a 96-bit nonce and a 128-bit
//! tag. Two implementations compute it:
//! - libgcrypt's (`gcrypt`), loaded at run time, several times faster;
//! - RustCrypto's generic GCM over the `sm4` crate, always built in.
//!
//! The first use picks one for the process ([`sm4_engine`]): libgcrypt
//! when it loads and passes RFC 8998's test vector, else the software
//! path, with the reason kept for the log and status. `TRIAD_SM4=software`
//! forces the software path. Both produce the same bytes (tests below
//! cross-check them), so sites and archives mix them freely.

mod gcrypt;

use std::sync::OnceLock;

use aes_gcm::aead::consts::{U12, U16};
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{AesGcm, Nonce, Tag};
use hmac::{Hmac, Mac};

/// SM4 in Galois/Counter Mode with a 12-byte nonce and a 16-byte tag.
pub type Sm4Gcm = AesGcm<sm4::Sm4, U12>;

pub const TAG_LEN: usize = 16;
pub const NONCE_LEN: usize = 12;

/// Which implementation of SM4-GCM this process uses, and why.
#[derive(Debug, Clone)]
pub struct Sm4Engine {
    /// "libgcrypt 1.10.1" or "software".
    pub name: String,
    /// Why the faster libgcrypt path is not used, when it is not.
    pub fallback_reason: Option<String>,
}

struct Selected {
    engine: Sm4Engine,
    gcrypt: Option<&'static gcrypt::Gcrypt>,
}

fn selected() -> &'static Selected {
    static SELECTED: OnceLock<Selected> = OnceLock::new();
    SELECTED.get_or_init(|| {
        let software = |why: String| Selected {
            engine: Sm4Engine {
                name: "software".into(),
                fallback_reason: Some(why),
            },
            gcrypt: None,
        };
        if std::env::var("TRIAD_SM4").is_ok_and(|v| v == "software") {
            return software("TRIAD_SM4=software".into());
        }
        let g: &'static gcrypt::Gcrypt = match gcrypt::Gcrypt::load() {
            Ok(g) => Box::leak(Box::new(g)),
            Err(why) => return software(why),
        };
        // A library that computes anything but the standard's answer is
        // never used.
        if let Err(why) = known_answer(|k, n, a, b| g.seal(k, n, a, b).is_ok()) {
            return software(format!(
                "libgcrypt {} failed RFC 8998's test vector: {why}",
                g.version()
            ));
        }
        Selected {
            engine: Sm4Engine {
                name: format!("libgcrypt {}", g.version()),
                fallback_reason: None,
            },
            gcrypt: Some(g),
        }
    })
}

/// The SM4-GCM implementation this process uses.
pub fn sm4_engine() -> &'static Sm4Engine {
    &selected().engine
}

/// Encrypts `buf` in place and appends the tag.
pub fn sm4_gcm_seal(key: &[u8; 16], nonce: &[u8; NONCE_LEN], aad: &[u8], buf: &mut Vec<u8>) {
    if let Some(g) = selected().gcrypt {
        match g.seal(key, nonce, aad, buf) {
            Ok(()) => return,
            // `buf` still holds the plaintext: the software path seals it.
            Err(e) => call_failed(&e),
        }
    }
    software_seal(key, nonce, aad, buf);
}

/// Checks the tag at the end of `buf` and decrypts in place, dropping the tag.
/// Returns false (leaving `buf` unspecified) when the tag does not match.
pub fn sm4_gcm_open(
    key: &[u8; 16],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    buf: &mut Vec<u8>,
) -> bool {
    if let Some(g) = selected().gcrypt {
        match g.open(key, nonce, aad, buf) {
            Ok(ok) => return ok,
            Err(e) => call_failed(&e),
        }
    }
    software_open(key, nonce, aad, buf)
}

/// A libgcrypt call failed for no reason its inputs explain: logged, and
/// that message goes through the software path instead.
fn call_failed(e: &gcrypt::CallFailed) {
    tracing::error!(
        call = e.0,
        code = e.1,
        "libgcrypt SM4-GCM call failed; this message used the software path"
    );
}

/// [`sm4_gcm_seal`] on the portable path, whichever the process uses: for
/// benchmarks that compare the two.
pub fn software_seal(key: &[u8; 16], nonce: &[u8; NONCE_LEN], aad: &[u8], buf: &mut Vec<u8>) {
    let cipher = Sm4Gcm::new(key.into());
    // Encryption in place only fails for messages over 64 GiB, far beyond a
    // chunk or a record, so the error cannot happen here.
    let tag = cipher
        .encrypt_in_place_detached(Nonce::from_slice(nonce), aad, buf)
        .expect("SM4-GCM input within the 64 GiB limit");
    buf.extend_from_slice(&tag);
}

fn software_open(key: &[u8; 16], nonce: &[u8; NONCE_LEN], aad: &[u8], buf: &mut Vec<u8>) -> bool {
    if buf.len() < TAG_LEN {
        return false;
    }
    let tag_at = buf.len() - TAG_LEN;
    let tag = *Tag::<U16>::from_slice(&buf[tag_at..]);
    buf.truncate(tag_at);
    let cipher = Sm4Gcm::new(key.into());
    cipher
        .decrypt_in_place_detached(Nonce::from_slice(nonce), aad, buf, &tag)
        .is_ok()
}

/// RFC 8998, Appendix A.1: key, IV, AAD, plaintext, ciphertext and tag.
const RFC8998: [&str; 6] = [
    "0123456789ABCDEFFEDCBA9876543210",
    "00001234567800000000ABCD",
    "FEEDFACEDEADBEEFFEEDFACEDEADBEEFABADDAD2",
    "AAAAAAAAAAAAAAAABBBBBBBBBBBBBBBBCCCCCCCCCCCCCCCCDDDDDDDDDDDDDDDD\
     EEEEEEEEEEEEEEEEFFFFFFFFFFFFFFFFEEEEEEEEEEEEEEEEAAAAAAAAAAAAAAAA",
    "17F399F08C67D5EE19D0DC9969C4BB7D5FD46FD3756489069157B282BB200735\
     D82710CA5C22F0CCFA7CBF93D496AC15A56834CBCF98C397B4024A2691233B8D",
    "83DE3541E4C2B58177E065A9BF7B62EC",
];

/// Seals RFC 8998's plaintext with `seal` and compares with its
/// ciphertext and tag.
fn known_answer(
    seal: impl Fn(&[u8; 16], &[u8; NONCE_LEN], &[u8], &mut Vec<u8>) -> bool,
) -> Result<(), String> {
    let v: Vec<Vec<u8>> = RFC8998
        .iter()
        .map(|h| hex::decode(h).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let key: [u8; 16] = v[0].as_slice().try_into().map_err(|_| "key length")?;
    let iv: [u8; NONCE_LEN] = v[1].as_slice().try_into().map_err(|_| "IV length")?;
    let mut buf = v[3].clone();
    if !seal(&key, &iv, &v[2], &mut buf) {
        return Err("the seal call failed".into());
    }
    let want: Vec<u8> = [v[4].as_slice(), v[5].as_slice()].concat();
    if buf != want {
        return Err(format!(
            "sealed {} but the RFC has {}",
            hex::encode(&buf),
            hex::encode(&want)
        ));
    }
    Ok(())
}

/// HMAC-SM3 of `parts` concatenated.
pub fn hmac_sm3(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length, so construction cannot fail.
    let mut mac = <Hmac<sm3::Sm3> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, RngCore, SeedableRng};

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    /// RFC 8998, Appendix A.1, through each implementation.
    #[test]
    fn sm4_gcm_reproduces_rfc8998_vector() {
        known_answer(|k, n, a, b| {
            software_seal(k, n, a, b);
            true
        })
        .unwrap();
        known_answer(|k, n, a, b| {
            sm4_gcm_seal(k, n, a, b);
            true
        })
        .unwrap();
        let key: [u8; 16] = unhex(RFC8998[0]).try_into().unwrap();
        let iv: [u8; 12] = unhex(RFC8998[1]).try_into().unwrap();
        let mut buf = [unhex(RFC8998[4]), unhex(RFC8998[5])].concat();
        assert!(sm4_gcm_open(&key, &iv, &unhex(RFC8998[2]), &mut buf));
        assert_eq!(buf, unhex(RFC8998[3]));
    }

    /// The test machines have libgcrypt: the fast path must be the one in
    /// use there, or the cross-checks below compare the software path with
    /// itself.
    #[test]
    fn libgcrypt_is_used_where_installed() {
        if std::env::var("TRIAD_SM4").is_ok_and(|v| v == "software") {
            return;
        }
        let e = sm4_engine();
        assert!(e.name.starts_with("libgcrypt"), "{e:?}");
        assert!(selected().gcrypt.is_some());
    }

    /// Random keys, nonces, AAD and lengths (0 to 70,000 bytes, across
    /// block and buffer boundaries): both implementations give the same
    /// ciphertext and tag, and each opens what the other sealed.
    #[test]
    fn libgcrypt_and_software_agree_on_random_inputs() {
        let Some(g) = selected().gcrypt else {
            return;
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(8998);
        let mut lens: Vec<usize> = (0..40).collect();
        lens.extend([255, 256, 257, 4095, 4096, 4097, 65_536, 70_001]);
        lens.extend((0..40).map(|_| rng.gen_range(0..70_000)));
        for len in lens {
            let mut key = [0u8; 16];
            let mut nonce = [0u8; NONCE_LEN];
            rng.fill_bytes(&mut key);
            rng.fill_bytes(&mut nonce);
            let mut aad = vec![0u8; rng.gen_range(0..64)];
            rng.fill_bytes(&mut aad);
            let mut plain = vec![0u8; len];
            rng.fill_bytes(&mut plain);

            let mut soft = plain.clone();
            software_seal(&key, &nonce, &aad, &mut soft);
            let mut fast = plain.clone();
            g.seal(&key, &nonce, &aad, &mut fast).unwrap();
            assert_eq!(soft, fast, "len {len}");

            let mut a = fast.clone();
            assert!(software_open(&key, &nonce, &aad, &mut a));
            assert_eq!(a, plain);
            let mut b = soft.clone();
            assert!(g.open(&key, &nonce, &aad, &mut b).unwrap());
            assert_eq!(b, plain);

            // A flipped bit anywhere, or other AAD, is refused by both.
            if !soft.is_empty() {
                let at = rng.gen_range(0..soft.len());
                let mut bad = soft.clone();
                bad[at] ^= 1 << rng.gen_range(0..8);
                assert!(!g.open(&key, &nonce, &aad, &mut bad.clone()).unwrap());
                assert!(!software_open(&key, &nonce, &aad, &mut bad));
            }
            let mut other = aad.clone();
            other.push(0);
            assert!(!g.open(&key, &nonce, &other, &mut soft.clone()).unwrap());
        }
    }

    /// Several threads, several keys at once: each thread's handles stay
    /// its own, and more keys than a thread keeps handles for still work.
    #[test]
    fn many_keys_on_many_threads() {
        std::thread::scope(|s| {
            for t in 0..4u8 {
                s.spawn(move || {
                    for i in 0..(gcrypt_handles() as u8 * 3) {
                        let key = [t ^ i; 16];
                        let nonce = [i; NONCE_LEN];
                        let mut a = vec![t; 1000 + i as usize];
                        let plain = a.clone();
                        sm4_gcm_seal(&key, &nonce, b"x", &mut a);
                        let mut b = plain.clone();
                        software_seal(&key, &nonce, b"x", &mut b);
                        assert_eq!(a, b);
                        assert!(sm4_gcm_open(&key, &nonce, b"x", &mut a));
                        assert_eq!(a, plain);
                    }
                });
            }
        });
    }

    fn gcrypt_handles() -> usize {
        gcrypt::HANDLES_PER_THREAD
    }

    #[test]
    fn sm4_gcm_rejects_altered_ciphertext_and_aad() {
        let key = [7u8; 16];
        let nonce = [1u8; 12];
        let mut buf = b"hello".to_vec();
        sm4_gcm_seal(&key, &nonce, b"aad", &mut buf);
        let mut flipped = buf.clone();
        flipped[0] ^= 1;
        assert!(!sm4_gcm_open(&key, &nonce, b"aad", &mut flipped));
        let mut other_aad = buf.clone();
        assert!(!sm4_gcm_open(&key, &nonce, b"aae", &mut other_aad));
        assert!(!sm4_gcm_open(&key, &nonce, b"aad", &mut vec![0; 15]));
    }
    /// GB/T 32905 (SM3) example 1 through HMAC's empty-key path is not a
    /// published vector, so check SM3 itself on "abc" and HMAC's determinism.
    #[test]
    fn sm3_matches_standard_vector() {
        use sm3::Digest;
        let d = sm3::Sm3::digest(b"abc");
        assert_eq!(
            hex::encode(d),
            "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0"
        );
        assert_eq!(
            hmac_sm3(&[1; 32], &[b"a", b"b"]),
            hmac_sm3(&[1; 32], &[b"ab"])
        );
        assert_ne!(hmac_sm3(&[1; 32], &[b"ab"]), hmac_sm3(&[2; 32], &[b"ab"]));
    }
}
