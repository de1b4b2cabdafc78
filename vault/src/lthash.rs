//! The namespace digest: LtHash, a homomorphic set hash.
//!
//! Each namespace entry maps (keyed BLAKE3 in XOF mode) to 1024 16-bit lanes;
//! the digest of a set is the lane-wise sum modulo 2^16. Adding or removing an
//! entry is one vector addition or subtraction, so a site keeps the digest of
//! its whole namespace current in O(1) per change, and a full recomputation
//! (scrub) must arrive at the same value. This is the lthash16 construction
//! used to check replicated databases at scale.

pub const LANES: usize = 1024;
pub const BYTES: usize = LANES * 2;

#[derive(Clone, PartialEq, Eq)]
pub struct LtHash {
    lanes: Box<[u16; LANES]>,
}

impl Default for LtHash {
    fn default() -> Self {
        LtHash {
            lanes: Box::new([0u16; LANES]),
        }
    }
}

impl std::fmt::Debug for LtHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LtHash({})", hex::encode(&self.summary()[..8]))
    }
}

impl LtHash {
    /// The vector for one element.
    pub fn element(key: &[u8; 32], bytes: &[u8]) -> LtHash {
        let mut out = [0u8; BYTES];
        blake3::Hasher::new_keyed(key)
            .update(bytes)
            .finalize_xof()
            .fill(&mut out);
        LtHash::from_bytes(&out)
    }

    pub fn add(&mut self, other: &LtHash) {
        for (a, b) in self.lanes.iter_mut().zip(other.lanes.iter()) {
            *a = a.wrapping_add(*b);
        }
    }

    pub fn sub(&mut self, other: &LtHash) {
        for (a, b) in self.lanes.iter_mut().zip(other.lanes.iter()) {
            *a = a.wrapping_sub(*b);
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(BYTES);
        for l in self.lanes.iter() {
            v.extend_from_slice(&l.to_le_bytes());
        }
        v
    }

    /// Parses [`LtHash::to_bytes`] output; None when the length is wrong.
    pub fn try_from_bytes(b: &[u8]) -> Option<LtHash> {
        (b.len() == BYTES).then(|| LtHash::from_bytes(b))
    }

    fn from_bytes(b: &[u8]) -> LtHash {
        let mut h = LtHash::default();
        for (lane, pair) in h.lanes.iter_mut().zip(b.chunks_exact(2)) {
            *lane = u16::from_le_bytes([pair[0], pair[1]]);
        }
        h
    }

    /// A 32-byte fingerprint of the full 2 KiB state, for checkpoints and
    /// display. Two sites compare these.
    pub fn summary(&self) -> [u8; 32] {
        *blake3::hash(&self.to_bytes()).as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_does_not_matter_and_removal_undoes_addition() {
        let k = [3u8; 32];
        let (a, b, c) = (
            LtHash::element(&k, b"a"),
            LtHash::element(&k, b"b"),
            LtHash::element(&k, b"c"),
        );
        let mut x = LtHash::default();
        x.add(&a);
        x.add(&b);
        x.add(&c);
        let mut y = LtHash::default();
        y.add(&c);
        y.add(&a);
        y.add(&b);
        assert_eq!(x, y);
        x.sub(&b);
        let mut z = LtHash::default();
        z.add(&a);
        z.add(&c);
        assert_eq!(x, z);
        assert_ne!(x.summary(), y.summary());
        assert_eq!(LtHash::try_from_bytes(&x.to_bytes()).unwrap(), x);
        assert!(LtHash::try_from_bytes(&[0; 3]).is_none());
    }
}
