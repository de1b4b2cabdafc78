//! Change-log records: their byte layout, sealing and the hash chain.
//!
//! A record's payload is `{seq, epoch, time, prev_hash, sealed ops,
//! attachments}`; attachments are chunks that are already sealed, so they are
//! carried as they are rather than encrypted twice. The chain hash of record n
//! is `BLAKE3(hash_{n-1} ‖ payload_n)`: two copies that agree on the hash at
//! seq n agree on every byte of history up to n. See docs/formats.md.

use crate::chunk::{ChunkId, SealedChunk};
use crate::crypto::{sm4_gcm_open, sm4_gcm_seal, NONCE_LEN, TAG_LEN};
use crate::error::{Result, VaultError};
use crate::keys::Keys;
use crate::ops::{decode_ops, encode_ops, Op};

pub type Hash = [u8; 32];

/// Largest payload accepted when reading; a length field beyond it is damage.
pub const MAX_PAYLOAD: usize = 512 << 20;

/// Largest payload a writer may submit (leaves room below [`MAX_PAYLOAD`]).
pub const MAX_SUBMIT: usize = 256 << 20;

/// Bytes before the sealed ops: seq, epoch, time, prev_hash, ops length.
const FIXED: usize = 8 + 8 + 8 + 32 + 4;

/// A decoded record whose ops are still sealed.
#[derive(Clone, Debug)]
pub struct Record {
    pub seq: u64,
    pub epoch: u64,
    /// Commit time, nanoseconds since the Unix epoch.
    pub time_ns: i64,
    pub prev_hash: Hash,
    /// Nonce ‖ SM4-GCM ciphertext ‖ tag of the postcard-encoded ops.
    pub sealed_ops: Vec<u8>,
    pub attachments: Vec<SealedChunk>,
}

/// The associated data of records sealed before 0.2: seq and epoch only,
/// so their commit time and chain link are not authenticated. Still opened,
/// never written.
fn aad_v1(seq: u64, epoch: u64) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..8].copy_from_slice(&seq.to_le_bytes());
    a[8..].copy_from_slice(&epoch.to_le_bytes());
    a
}

/// The associated data every record is sealed with: its whole header
/// (seq, epoch, commit time, previous chain hash) under a version tag. So
/// whoever lacks the key cannot shift a record's time or splice it onto
/// another chain without the seal failing, in the log, on the wire and in
/// an archive.
fn aad_v2(seq: u64, epoch: u64, time_ns: i64, prev_hash: &Hash) -> [u8; 72] {
    let mut a = [0u8; 72];
    a[..8].copy_from_slice(b"triadR2\0");
    a[8..16].copy_from_slice(&seq.to_le_bytes());
    a[16..24].copy_from_slice(&epoch.to_le_bytes());
    a[24..32].copy_from_slice(&time_ns.to_le_bytes());
    a[32..64].copy_from_slice(prev_hash);
    // The last 8 bytes stay zero: room for a flags word.
    a
}

impl Record {
    /// Builds and seals a record. The nonce is a keyed hash of the position
    /// and plaintext, so a different record at a reused seq (after a torn
    /// tail was cut) never reuses a nonce with different plaintext.
    pub fn seal(
        keys: &Keys,
        seq: u64,
        epoch: u64,
        time_ns: i64,
        prev_hash: Hash,
        ops: &[Op],
        attachments: Vec<SealedChunk>,
    ) -> Record {
        let plain = encode_ops(ops);
        let aad = aad_v2(seq, epoch, time_ns, &prev_hash);
        // The nonce covers everything the tag covers: two records that
        // differ only in time or chain link (a seq reused after a torn tail
        // was cut) never share a nonce.
        let nonce_full = blake3::Hasher::new_keyed(&keys.record_nonce)
            .update(&aad)
            .update(&plain)
            .finalize();
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&nonce_full.as_bytes()[..NONCE_LEN]);
        let mut ct = plain;
        sm4_gcm_seal(&keys.record_seal, &nonce, &aad, &mut ct);
        let mut sealed_ops = Vec::with_capacity(NONCE_LEN + ct.len());
        sealed_ops.extend_from_slice(&nonce);
        sealed_ops.extend_from_slice(&ct);
        Record {
            seq,
            epoch,
            time_ns,
            prev_hash,
            sealed_ops,
            attachments,
        }
    }

    /// Decrypts the ops. Fails on a wrong key or altered bytes, the header
    /// included (records sealed before 0.2 bind only seq and epoch; see
    /// [`Record::header_authenticated`]).
    pub fn open_ops(&self, keys: &Keys) -> Result<Vec<Op>> {
        self.open_checked(keys).map(|(ops, _)| ops)
    }

    /// Whether this record's commit time and chain link are covered by its
    /// seal (every record written since 0.2). Fails as [`Record::open_ops`].
    pub fn header_authenticated(&self, keys: &Keys) -> Result<bool> {
        self.open_checked(keys).map(|(_, v2)| v2)
    }

    fn open_checked(&self, keys: &Keys) -> Result<(Vec<Op>, bool)> {
        let bad = |reason: &str| VaultError::BadRecord {
            seq: self.seq,
            reason: reason.to_string(),
        };
        if self.sealed_ops.len() < NONCE_LEN + TAG_LEN {
            return Err(bad("sealed ops too short"));
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&self.sealed_ops[..NONCE_LEN]);
        let v2 = aad_v2(self.seq, self.epoch, self.time_ns, &self.prev_hash);
        let mut buf = self.sealed_ops[NONCE_LEN..].to_vec();
        let header_sealed = if sm4_gcm_open(&keys.record_seal, &nonce, &v2, &mut buf) {
            true
        } else {
            // A failed open leaves the buffer unspecified: start again from
            // the sealed bytes, with the associated data of older records.
            buf = self.sealed_ops[NONCE_LEN..].to_vec();
            if !sm4_gcm_open(
                &keys.record_seal,
                &nonce,
                &aad_v1(self.seq, self.epoch),
                &mut buf,
            ) {
                return Err(bad(
                    "SM4-GCM tag does not match: wrong key, or the record (its time or chain link included) was altered",
                ));
            }
            false
        };
        decode_ops(&buf)
            .map(|ops| (ops, header_sealed))
            .map_err(|e| bad(&e))
    }

    /// Seals ops and encodes a record's payload straight from borrowed
    /// attachments, avoiding a copy of the chunk bytes (the commit path).
    #[allow(clippy::too_many_arguments)]
    pub fn encode_payload_parts(
        keys: &Keys,
        seq: u64,
        epoch: u64,
        time_ns: i64,
        prev_hash: Hash,
        ops: &[Op],
        attachments: &[SealedChunk],
    ) -> Vec<u8> {
        let head = Record::seal(keys, seq, epoch, time_ns, prev_hash, ops, Vec::new());
        let mut v = head.encode_payload();
        // Replace the empty attachment count with the real list.
        v.truncate(v.len() - 4);
        encode_attachments(&mut v, attachments);
        v
    }

    pub fn encode_payload(&self) -> Vec<u8> {
        let att_len: usize = self.attachments.iter().map(|a| 40 + a.sealed.len()).sum();
        let mut v = Vec::with_capacity(FIXED + self.sealed_ops.len() + 4 + att_len);
        v.extend_from_slice(&self.seq.to_le_bytes());
        v.extend_from_slice(&self.epoch.to_le_bytes());
        v.extend_from_slice(&self.time_ns.to_le_bytes());
        v.extend_from_slice(&self.prev_hash);
        v.extend_from_slice(&(self.sealed_ops.len() as u32).to_le_bytes());
        v.extend_from_slice(&self.sealed_ops);
        encode_attachments(&mut v, &self.attachments);
        v
    }

    /// Parses a payload; None when it is not a well-formed record.
    pub fn decode_payload(p: &[u8]) -> Option<Record> {
        let mut r = Reader { b: p, at: 0 };
        let seq = r.u64()?;
        let epoch = r.u64()?;
        let time_ns = r.u64()? as i64;
        let prev_hash: Hash = r.take(32)?.try_into().ok()?;
        let ops_len = r.u32()? as usize;
        let sealed_ops = r.take(ops_len)?.to_vec();
        let n = r.u32()? as usize;
        let mut attachments = Vec::with_capacity(n.min(4096));
        for _ in 0..n {
            let id = ChunkId(r.take(32)?.try_into().ok()?);
            let plain_len = r.u32()?;
            let sealed_len = r.u32()? as usize;
            let sealed = r.take(sealed_len)?.to_vec();
            attachments.push(SealedChunk {
                id,
                plain_len,
                sealed,
            });
        }
        (r.at == p.len()).then_some(Record {
            seq,
            epoch,
            time_ns,
            prev_hash,
            sealed_ops,
            attachments,
        })
    }

    /// Reads only the seq of a payload (for scanning damaged segments).
    pub fn peek_seq(p: &[u8]) -> Option<u64> {
        Some(u64::from_le_bytes(p.get(..8)?.try_into().ok()?))
    }
}

fn encode_attachments(v: &mut Vec<u8>, attachments: &[SealedChunk]) {
    v.reserve(
        4 + attachments
            .iter()
            .map(|a| 40 + a.sealed.len())
            .sum::<usize>(),
    );
    v.extend_from_slice(&(attachments.len() as u32).to_le_bytes());
    for a in attachments {
        v.extend_from_slice(&a.id.0);
        v.extend_from_slice(&a.plain_len.to_le_bytes());
        v.extend_from_slice(&(a.sealed.len() as u32).to_le_bytes());
        v.extend_from_slice(&a.sealed);
    }
}

/// The chain hash after a record with this payload.
pub fn chain(prev: &Hash, payload: &[u8]) -> Hash {
    *blake3::Hasher::new()
        .update(prev)
        .update(payload)
        .finalize()
        .as_bytes()
}

/// Bit of the frame's length word marking the first record of a commit group.
/// A group is written only after the previous one was fsynced and
/// acknowledged, so an intact group start after damaged bytes proves the
/// damage hit acknowledged records; without one, the damage is a torn write
/// of the last group (whose pages may reach disk out of order).
pub const GROUP_START: u32 = 1 << 30;
const LEN_MASK: u32 = (1 << 30) - 1;

/// Frame: `len u32 (bit 30: group start) ‖ crc32c(payload) u32 ‖ payload`.
pub fn frame(payload: &[u8], group_start: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + payload.len());
    let len = payload.len() as u32 | if group_start { GROUP_START } else { 0 };
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    v.extend_from_slice(payload);
    v
}

/// Splits a frame's length word into (payload length, group start).
pub fn frame_len(word: u32) -> (usize, bool) {
    ((word & LEN_MASK) as usize, word & GROUP_START != 0)
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.b.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::seal;
    use crate::keys::DatasetKey;

    #[test]
    fn record_round_trips_and_detects_tampering() {
        let keys = DatasetKey::generate().derive();
        let data = b"chunk data".to_vec();
        let id = ChunkId::of(&keys, &data);
        let ops = vec![Op::Delete {
            path: b"a/b".to_vec(),
        }];
        let rec = Record::seal(
            &keys,
            7,
            1,
            123,
            [9; 32],
            &ops,
            vec![seal(&keys, id, &data)],
        );
        let p = rec.encode_payload();
        let back = Record::decode_payload(&p).unwrap();
        assert_eq!(back.seq, 7);
        assert_eq!(back.open_ops(&keys).unwrap(), ops);
        assert_eq!(back.attachments[0].id, id);
        assert_eq!(Record::peek_seq(&p), Some(7));
        assert!(Record::decode_payload(&p[..p.len() - 1]).is_none());

        let mut moved = back.clone();
        moved.seq = 8;
        assert!(moved.open_ops(&keys).is_err(), "ops are bound to their seq");
        assert!(back.header_authenticated(&keys).unwrap());
        let mut shifted = back.clone();
        shifted.time_ns += 1;
        assert!(
            shifted.open_ops(&keys).is_err(),
            "ops are bound to their time"
        );
        let mut spliced = back.clone();
        spliced.prev_hash[0] ^= 1;
        assert!(
            spliced.open_ops(&keys).is_err(),
            "ops are bound to their chain link"
        );
        let wrong = DatasetKey::generate().derive();
        assert!(back.open_ops(&wrong).is_err());
    }
}
