//! National-algorithm primitives: SM4-GCM for sealing and HMAC-SM3 for evidence.
//!
//! SM4-GCM is RustCrypto's generic GCM over the `sm4` block cipher with a
//! 96-bit nonce, the construction RFC 8998 specifies for TLS 1.3; the RFC's
//! test vector below proves the composition is the standard one.

use aes_gcm::aead::consts::{U12, U16};
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{AesGcm, Nonce, Tag};
use hmac::{Hmac, Mac};

/// SM4 in Galois/Counter Mode with a 12-byte nonce and a 16-byte tag.
pub type Sm4Gcm = AesGcm<sm4::Sm4, U12>;

pub const TAG_LEN: usize = 16;
pub const NONCE_LEN: usize = 12;

/// Encrypts `buf` in place and appends the tag.
pub fn sm4_gcm_seal(key: &[u8; 16], nonce: &[u8; NONCE_LEN], aad: &[u8], buf: &mut Vec<u8>) {
    let cipher = Sm4Gcm::new(key.into());
    // Encryption in place only fails for messages over 64 GiB, far beyond a
    // chunk or a record, so the error cannot happen here.
    let tag = cipher
        .encrypt_in_place_detached(Nonce::from_slice(nonce), aad, buf)
        .expect("SM4-GCM input within the 64 GiB limit");
    buf.extend_from_slice(&tag);
}

/// Checks the tag at the end of `buf` and decrypts in place, dropping the tag.
/// Returns false (leaving `buf` unspecified) when the tag does not match.
pub fn sm4_gcm_open(
    key: &[u8; 16],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    buf: &mut Vec<u8>,
) -> bool {
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

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    /// RFC 8998, Appendix A.1: SM4-GCM test vector.
    #[test]
    fn sm4_gcm_reproduces_rfc8998_vector() {
        let key: [u8; 16] = unhex("0123456789ABCDEFFEDCBA9876543210")
            .try_into()
            .unwrap();
        let iv: [u8; 12] = unhex("00001234567800000000ABCD").try_into().unwrap();
        let aad = unhex("FEEDFACEDEADBEEFFEEDFACEDEADBEEFABADDAD2");
        let pt = unhex(
            "AAAAAAAAAAAAAAAABBBBBBBBBBBBBBBBCCCCCCCCCCCCCCCCDDDDDDDDDDDDDDDD\
             EEEEEEEEEEEEEEEEFFFFFFFFFFFFFFFFEEEEEEEEEEEEEEEEAAAAAAAAAAAAAAAA",
        );
        let ct = unhex(
            "17F399F08C67D5EE19D0DC9969C4BB7D5FD46FD3756489069157B282BB200735\
             D82710CA5C22F0CCFA7CBF93D496AC15A56834CBCF98C397B4024A2691233B8D",
        );
        let tag = unhex("83DE3541E4C2B58177E065A9BF7B62EC");

        let mut buf = pt.clone();
        sm4_gcm_seal(&key, &iv, &aad, &mut buf);
        assert_eq!(hex::encode_upper(&buf[..pt.len()]), hex::encode_upper(&ct));
        assert_eq!(hex::encode_upper(&buf[pt.len()..]), hex::encode_upper(&tag));

        assert!(sm4_gcm_open(&key, &iv, &aad, &mut buf));
        assert_eq!(buf, pt);
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
