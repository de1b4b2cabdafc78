//! The change log on disk: append-only segment files with group-committed
//! fsync, and the recovery that runs when it is opened.
//!
//! A segment is a 32-byte header followed by framed records (see
//! [`crate::record`]). Segments are named by their first seq. On open every
//! segment is read and checked (frame checksums, seq continuity, hash chain):
//! damage at the very end of the newest segment, followed by nothing but
//! pieces of its own commit group, is a torn write of a group that was never
//! acknowledged: it is copied aside as evidence, cut off and logged. Damage
//! anywhere else, damage followed by a completed group, or damage at or below
//! a seq the state has already applied stops the open with an error naming
//! the segment and offset, because cutting there would drop acknowledged
//! records.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{Result, VaultError};
use crate::record::{chain, frame_len, Hash, Record, MAX_PAYLOAD};

const MAGIC: &[u8; 8] = b"TRIADLOG";
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 32;
/// Records are written in groups; a segment is closed once it passes this size.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.log")
}

fn header(first_seq: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&first_seq.to_le_bytes());
    let crc = crc32c::crc32c(&h[..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

fn parse_header(h: &[u8]) -> std::result::Result<u64, String> {
    if h.len() < HEADER_LEN {
        return Err("segment header is incomplete".into());
    }
    if &h[..8] != MAGIC {
        return Err("not a triad log segment (bad magic)".into());
    }
    let crc = u32::from_le_bytes([h[24], h[25], h[26], h[27]]);
    if crc != crc32c::crc32c(&h[..24]) {
        return Err("segment header checksum mismatch".into());
    }
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if version != FORMAT_VERSION {
        return Err(format!(
            "segment format version {version}; this triad reads version {FORMAT_VERSION}"
        ));
    }
    Ok(u64::from_le_bytes(
        h[16..24].try_into().map_err(|_| "short header")?,
    ))
}

/// A frame parsed at some offset of a segment buffer.
struct Parsed {
    record: Record,
    payload_range: std::ops::Range<usize>,
    end: usize,
}

/// Parses the frame at `off`; Err carries why it is not a valid frame.
fn parse_frame(buf: &[u8], off: usize) -> std::result::Result<Parsed, String> {
    let rest = &buf[off..];
    if rest.len() < 8 {
        return Err("frame header cut short".into());
    }
    let (len, _) = frame_len(u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]));
    let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
    if len > MAX_PAYLOAD {
        return Err(format!("frame length {len} is implausible"));
    }
    if rest.len() < 8 + len {
        return Err(format!(
            "frame of {len} bytes runs past the end of the segment"
        ));
    }
    let payload = &rest[8..8 + len];
    if crc32c::crc32c(payload) != crc {
        return Err("record checksum mismatch".into());
    }
    let record = Record::decode_payload(payload).ok_or("record payload is malformed")?;
    Ok(Parsed {
        record,
        payload_range: off + 8..off + 8 + len,
        end: off + 8 + len,
    })
}

/// True when an intact record that starts a commit group, with seq >=
/// `min_seq`, lies after `from`: a later group was written, which happens only
/// once the damaged bytes' group was fsynced and acknowledged, so the damage
/// is in the middle of the log. Damage followed only by pieces of its own
/// group is a torn write of a group that was never acknowledged.
fn later_group_after(buf: &[u8], from: usize, min_seq: u64) -> bool {
    let mut off = from + 1;
    while off + 8 + 8 <= buf.len() {
        let (len, start) = frame_len(u32::from_le_bytes([
            buf[off],
            buf[off + 1],
            buf[off + 2],
            buf[off + 3],
        ]));
        if start && len >= 8 && off + 8 + len <= buf.len() {
            let payload = &buf[off + 8..off + 8 + len];
            // Cheap plausibility first (a segment holds fewer records than
            // bytes), so scanning megabytes of damage does not run a CRC at
            // every offset.
            let max_seq = min_seq.saturating_add(buf.len() as u64);
            if Record::peek_seq(payload).is_some_and(|s| s >= min_seq && s <= max_seq) {
                let crc =
                    u32::from_le_bytes([buf[off + 4], buf[off + 5], buf[off + 6], buf[off + 7]]);
                if crc32c::crc32c(payload) == crc {
                    return true;
                }
            }
        }
        off += 1;
    }
    false
}

#[derive(Clone, Debug)]
struct Segment {
    first_seq: u64,
    path: PathBuf,
}

/// What recovery found when the log was opened.
#[derive(Clone, Debug, Default)]
pub struct Recovery {
    pub segments: usize,
    pub records: u64,
    /// A torn tail that was cut off: segment, offset, bytes dropped.
    pub truncated: Option<(PathBuf, u64, u64)>,
}

/// The writable change log of one dataset. Owned by the committer thread.
pub struct Wal {
    dir: PathBuf,
    segments: Vec<Segment>,
    file: File,
    active_len: u64,
    next_seq: u64,
    last_hash: Hash,
    last_time_ns: i64,
    segment_bytes: u64,
    /// Set when a failed append could not be cut back: the file's end is no
    /// longer where the next record belongs, so nothing more may be written.
    poisoned: Option<String>,
}

fn list_segments(dir: &Path) -> Result<Vec<Segment>> {
    let mut segs = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|e| VaultError::io("listing log segments", dir, e))?;
    for ent in rd {
        let ent = ent.map_err(|e| VaultError::io("listing log segments", dir, e))?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(".log") else {
            continue;
        };
        let Ok(first_seq) = stem.parse::<u64>() else {
            continue;
        };
        segs.push(Segment {
            first_seq,
            path: ent.path(),
        });
    }
    segs.sort_by_key(|s| s.first_seq);
    Ok(segs)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| VaultError::io("syncing log directory", dir, e))
}

impl Segment {
    /// The error for damage at `offset` of this segment.
    fn corrupt(&self, offset: usize, reason: String) -> VaultError {
        VaultError::CorruptSegment {
            segment: self.path.clone(),
            offset: offset as u64,
            reason,
        }
    }
}

/// Where the log's chain stands while its segments are read on open: the
/// seq the next record must carry, the chain hash it must continue (None
/// until known) and the commit time of the last record read.
struct ChainPos {
    next_seq: u64,
    last_hash: Option<Hash>,
    last_time_ns: i64,
}

/// Reads and checks one segment on open, advancing `pos` past its records
/// and cutting a torn tail off the newest segment. Returns false when `seg`
/// is the newest segment and a crash tore its header: it holds nothing and
/// must be removed.
fn recover_segment(
    dir: &Path,
    seg: &Segment,
    is_last: bool,
    applied_seq: u64,
    pos: &mut ChainPos,
    rec: &mut Recovery,
) -> Result<bool> {
    let buf = std::fs::read(&seg.path)
        .map_err(|e| VaultError::io("reading log segment", &seg.path, e))?;
    match parse_header(&buf) {
        Ok(first) if first == seg.first_seq => {}
        Ok(first) => {
            return Err(seg.corrupt(
                0,
                format!(
                    "header says first seq {first}, file name says {}",
                    seg.first_seq
                ),
            ))
        }
        // A crash while a new segment's header was being written leaves
        // a short or partial header in the newest segment and nothing after.
        Err(_) if is_last && buf.len() <= HEADER_LEN => {
            tracing::warn!(segment = %seg.path.display(), "removing a segment whose header was torn by a crash");
            return Ok(false);
        }
        Err(reason) => return Err(seg.corrupt(0, reason)),
    }
    if seg.first_seq != pos.next_seq {
        return Err(VaultError::LogGap {
            dir: dir.to_path_buf(),
            reason: format!(
                "segment {} starts at seq {} but seq {} was expected",
                seg.path.display(),
                seg.first_seq,
                pos.next_seq
            ),
        });
    }
    scan_records(dir, seg, &buf, is_last, applied_seq, pos, rec)?;
    Ok(true)
}

/// Reads the records of a segment whose header checked out, checking frame
/// checksums, seq continuity and the hash chain. The first damage found is
/// cut off as a torn tail when it is at the end of the newest segment, not
/// followed by a later group and above `applied_seq`; anywhere else it stops
/// the open with an error naming the segment and offset.
fn scan_records(
    dir: &Path,
    seg: &Segment,
    buf: &[u8],
    is_last: bool,
    applied_seq: u64,
    pos: &mut ChainPos,
    rec: &mut Recovery,
) -> Result<()> {
    let mut off = HEADER_LEN;
    while off < buf.len() {
        let failure = match parse_frame(buf, off) {
            Ok(p) if p.record.seq != pos.next_seq => Some(format!(
                "record has seq {}, expected {}",
                p.record.seq, pos.next_seq
            )),
            Ok(p) if pos.last_hash.is_some_and(|h| h != p.record.prev_hash) => {
                Some(format!("hash chain broken at seq {}", p.record.seq))
            }
            Ok(p) => {
                let prev = pos.last_hash.unwrap_or(p.record.prev_hash);
                pos.last_hash = Some(chain(&prev, &buf[p.payload_range.clone()]));
                pos.last_time_ns = p.record.time_ns;
                pos.next_seq += 1;
                rec.records += 1;
                off = p.end;
                None
            }
            Err(reason) => Some(reason),
        };
        let Some(reason) = failure else { continue };
        if !is_last || later_group_after(buf, off, pos.next_seq) {
            return Err(seg.corrupt(off, reason));
        }
        if pos.next_seq <= applied_seq {
            return Err(seg.corrupt(
                off,
                format!(
                    "{reason}; seq {} was already applied to the state, so it was acknowledged",
                    pos.next_seq
                ),
            ));
        }
        cut_torn_tail(dir, seg, buf, off, reason, rec)?;
        break;
    }
    Ok(())
}

/// Cuts the torn tail that starts at `off` off the newest segment: keeps the
/// cut bytes aside as evidence (best effort), logs the cut, truncates and
/// fsyncs the segment, and records the cut in `rec`.
fn cut_torn_tail(
    dir: &Path,
    seg: &Segment,
    buf: &[u8],
    off: usize,
    reason: String,
    rec: &mut Recovery,
) -> Result<()> {
    let dropped = (buf.len() - off) as u64;
    // Keep the cut bytes: they are evidence, and cost little.
    let evidence = dir.join(format!(
        "{}.torn-at-{off}",
        seg.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    // Best effort: failing to keep evidence (a full disk) must not
    // stop the site from starting.
    if let Err(e) = save_evidence(&evidence, &buf[off..]) {
        tracing::warn!(path = %evidence.display(), error = %e, "could not keep the torn tail as evidence");
    }
    tracing::warn!(
        segment = %seg.path.display(),
        offset = off,
        bytes = dropped,
        %reason,
        evidence = %evidence.display(),
        "cutting a torn tail off the change log (a write the crash interrupted; it was never acknowledged)"
    );
    let f = OpenOptions::new()
        .write(true)
        .open(&seg.path)
        .map_err(|e| VaultError::io("truncating torn log tail", &seg.path, e))?;
    f.set_len(off as u64)
        .and_then(|_| f.sync_all())
        .map_err(|e| VaultError::io("truncating torn log tail", &seg.path, e))?;
    rec.truncated = Some((seg.path.clone(), off as u64, dropped));
    Ok(())
}

/// Opens the newest segment for appending, or creates the first one (at
/// `next_seq`) when the log has none. Returns the file and the active
/// segment's length.
fn open_active_segment(
    dir: &Path,
    segments: &mut Vec<Segment>,
    next_seq: u64,
) -> Result<(File, u64)> {
    match segments.last() {
        Some(seg) => {
            let mut f = OpenOptions::new()
                .append(true)
                .open(&seg.path)
                .map_err(|e| VaultError::io("opening log segment", &seg.path, e))?;
            let len = f
                .seek(SeekFrom::End(0))
                .map_err(|e| VaultError::io("opening log segment", &seg.path, e))?;
            Ok((f, len))
        }
        None => {
            let seg = Segment {
                first_seq: next_seq,
                path: dir.join(segment_name(next_seq)),
            };
            let f = create_segment(dir, &seg)?;
            segments.push(seg);
            Ok((f, HEADER_LEN as u64))
        }
    }
}

impl Wal {
    /// Opens (creating if needed) the log in `dir`, recovering from a crash.
    /// Records up to `applied_seq` are known to have been acknowledged (the
    /// state holds them), so damage among them is never cut as a torn tail.
    pub fn open(dir: &Path, segment_bytes: u64, applied_seq: u64) -> Result<(Wal, Recovery)> {
        std::fs::create_dir_all(dir)
            .map_err(|e| VaultError::io("creating log directory", dir, e))?;
        let mut segments = list_segments(dir)?;
        let mut rec = Recovery {
            segments: segments.len(),
            ..Recovery::default()
        };
        // After a state transfer the log starts past seq 1; BASE says where
        // and with which chain hash.
        let base = read_base(dir)?;
        let next_seq = segments
            .first()
            .map(|s| s.first_seq)
            .or(base.map(|b| b.seq + 1))
            .unwrap_or(1);
        let last_hash: Option<Hash> = base.filter(|b| b.seq + 1 == next_seq).map(|b| b.hash);
        let last_time_ns = base.map(|b| b.time_ns).unwrap_or(0);
        let mut pos = ChainPos {
            next_seq,
            last_hash,
            last_time_ns,
        };
        let n = segments.len();
        let mut drop_last_segment = false;
        for (i, seg) in segments.iter().enumerate() {
            let is_last = i + 1 == n;
            if !recover_segment(dir, seg, is_last, applied_seq, &mut pos, &mut rec)? {
                drop_last_segment = true;
            }
        }
        if drop_last_segment {
            if let Some(seg) = segments.pop() {
                std::fs::remove_file(&seg.path)
                    .map_err(|e| VaultError::io("removing torn segment", &seg.path, e))?;
                sync_dir(dir)?;
            }
        }
        let (file, active_len) = open_active_segment(dir, &mut segments, pos.next_seq)?;
        Ok((
            Wal {
                dir: dir.to_path_buf(),
                segments,
                file,
                active_len,
                next_seq: pos.next_seq,
                last_hash: pos.last_hash.unwrap_or([0; 32]),
                last_time_ns: pos.last_time_ns,
                segment_bytes,
                poisoned: None,
            },
            rec,
        ))
    }

    /// The seq the next appended record must carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Chain hash after the last record (all zeros for an empty log).
    pub fn last_hash(&self) -> Hash {
        self.last_hash
    }

    pub fn last_time_ns(&self) -> i64 {
        self.last_time_ns
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends framed records `first..=last` and fsyncs once for all of them.
    /// On failure the log is cut back to where it was, so nothing half-written
    /// survives and the same seqs can be retried.
    pub fn append_sync(
        &mut self,
        frames: &[u8],
        last_seq: u64,
        last_hash: Hash,
        last_time_ns: i64,
    ) -> Result<()> {
        if let Some(why) = &self.poisoned {
            return Err(VaultError::Closed(format!(
                "the change log in {} stopped after a failed write that could not be undone ({why}); restart to recover",
                self.dir.display()
            )));
        }
        if self.active_len >= self.segment_bytes {
            self.roll()?;
        }
        let seg_path = self
            .segments
            .last()
            .map(|s| s.path.clone())
            .unwrap_or_default();
        let before = self.active_len;
        let res = self
            .file
            .write_all(frames)
            .and_then(|_| self.file.sync_data());
        if let Err(e) = res {
            // Cut back so the failed group leaves no partial frame behind and
            // the same seqs can be retried. If even that fails, refuse further
            // writes: appending after the leftovers would bury them mid-log.
            if let Err(cut) = self
                .file
                .set_len(before)
                .and_then(|_| self.file.sync_data())
            {
                self.poisoned = Some(format!("write: {e}; cut back: {cut}"));
            }
            return Err(VaultError::io("appending to change log", seg_path, e));
        }
        self.active_len += frames.len() as u64;
        self.next_seq = last_seq + 1;
        self.last_hash = last_hash;
        self.last_time_ns = last_time_ns;
        Ok(())
    }

    fn roll(&mut self) -> Result<()> {
        let seg = Segment {
            first_seq: self.next_seq,
            path: self.dir.join(segment_name(self.next_seq)),
        };
        let f = create_segment(&self.dir, &seg)?;
        self.file = f;
        self.active_len = HEADER_LEN as u64;
        self.segments.push(seg);
        Ok(())
    }
}

fn save_evidence(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new().write(true).create_new(true).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn create_segment(dir: &Path, seg: &Segment) -> Result<File> {
    let mut f = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&seg.path)
        .map_err(|e| VaultError::io("creating log segment", &seg.path, e))?;
    let res = f
        .write_all(&header(seg.first_seq))
        .and_then(|_| f.sync_all())
        .map_err(|e| VaultError::io("creating log segment", &seg.path, e))
        .and_then(|_| sync_dir(dir));
    if let Err(e) = res {
        // Leave nothing behind (a full disk): the next roll can try again.
        drop(f);
        let _ = std::fs::remove_file(&seg.path);
        return Err(e);
    }
    Ok(f)
}

/// A record as it lies in the log: what an upstream sends to its followers.
#[derive(Clone, Debug)]
pub struct RawRecord {
    pub seq: u64,
    pub time_ns: i64,
    pub payload: Vec<u8>,
}

/// Follows the log forward from a seq, reading only records that are known
/// durable (at or below the `up_to` the caller passes), across segment
/// boundaries, without rereading what it has already passed. Used by an
/// upstream to stream records to a follower.
pub struct Tail {
    dir: PathBuf,
    file: Option<(File, PathBuf)>,
    offset: u64,
    next_seq: u64,
}

impl Tail {
    /// Positions a reader at `from_seq`. Fails when the log no longer holds
    /// that seq (the follower needs a state transfer).
    pub fn new(dir: &Path, from_seq: u64) -> Result<Tail> {
        let segments = list_segments(dir)?;
        let first = segments.first().map(|s| s.first_seq).unwrap_or(1);
        if from_seq < first {
            return Err(VaultError::LogGap {
                dir: dir.to_path_buf(),
                reason: format!("seq {from_seq} is older than the oldest retained record {first}"),
            });
        }
        let mut t = Tail {
            dir: dir.to_path_buf(),
            file: None,
            offset: HEADER_LEN as u64,
            next_seq: from_seq,
        };
        if let Some(seg) = segments.iter().rev().find(|s| s.first_seq <= from_seq) {
            let f = File::open(&seg.path)
                .map_err(|e| VaultError::io("reading log segment", &seg.path, e))?;
            t.file = Some((f, seg.path.clone()));
            t.next_seq = seg.first_seq;
            // Skip records before from_seq by their lengths alone.
            while t.next_seq < from_seq {
                match t.read_frame_header()? {
                    Some(len) => {
                        t.offset += 8 + len as u64;
                        t.next_seq += 1;
                    }
                    None => break,
                }
            }
        }
        Ok(t)
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The reader `cached` holds when it stands at `from_seq` on a segment
    /// still in the log, or a new one positioned there. A reader that goes
    /// over the log pass by pass (the standby tree, the archiver) keeps its
    /// tail between passes: positioning a new one walks every record
    /// header of the segment before `from_seq`, which at a thousand small
    /// records a second made each pass cost more the further it got into a
    /// 64 MiB segment. A segment replaced under the reader (a state
    /// transfer installs new files under the same names) is noticed by its
    /// inode, and the reader starts afresh.
    pub fn reuse<'a>(
        cached: &'a mut Option<Tail>,
        dir: &Path,
        from_seq: u64,
    ) -> Result<&'a mut Tail> {
        let fits = cached
            .as_ref()
            .is_some_and(|t| t.next_seq == from_seq && t.dir == dir && t.on_current_segment());
        if !fits {
            *cached = None;
        }
        match cached {
            Some(t) => Ok(t),
            None => Ok(cached.insert(Tail::new(dir, from_seq)?)),
        }
    }

    /// Whether the open segment is still the file its name holds.
    fn on_current_segment(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Some((f, path)) = &self.file else {
            // No segment was open yet: the next read opens it by name.
            return true;
        };
        match (f.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
            _ => false,
        }
    }

    fn read_frame_header(&mut self) -> Result<Option<usize>> {
        let Some((f, path)) = self.file.as_mut() else {
            return Ok(None);
        };
        let mut h = [0u8; 8];
        match read_exact_at(f, &mut h, self.offset) {
            Ok(true) => Ok(Some(
                frame_len(u32::from_le_bytes([h[0], h[1], h[2], h[3]])).0,
            )),
            Ok(false) => Ok(None),
            Err(e) => Err(VaultError::io("reading log segment", path.clone(), e)),
        }
    }

    /// Reads durable records with seq <= `up_to`, at most about `max_bytes`.
    pub fn read(&mut self, up_to: u64, max_bytes: usize) -> Result<Vec<RawRecord>> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while self.next_seq <= up_to && bytes < max_bytes {
            let len = match self.read_frame_header()? {
                Some(len) => len,
                None => {
                    // The current segment is finished: the record is in the next one.
                    let path = self.dir.join(segment_name(self.next_seq));
                    let f = File::open(&path)
                        .map_err(|e| VaultError::io("reading log segment", &path, e))?;
                    self.file = Some((f, path));
                    self.offset = HEADER_LEN as u64;
                    continue;
                }
            };
            let Some((f, path)) = self.file.as_mut() else {
                break;
            };
            let mut frame = vec![0u8; 8 + len];
            let corrupt = |reason: String| VaultError::CorruptSegment {
                segment: path.clone(),
                offset: self.offset,
                reason,
            };
            if !read_exact_at(f, &mut frame, self.offset)
                .map_err(|e| VaultError::io("reading log segment", path.clone(), e))?
            {
                return Err(corrupt(format!(
                    "record {} is durable but cut short",
                    self.next_seq
                )));
            }
            let crc = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
            let payload = frame.split_off(8);
            if crc32c::crc32c(&payload) != crc {
                return Err(corrupt("record checksum mismatch".into()));
            }
            let rec = Record::decode_payload(&payload)
                .ok_or_else(|| corrupt("record payload is malformed".into()))?;
            if rec.seq != self.next_seq {
                return Err(corrupt(format!(
                    "record has seq {}, expected {}",
                    rec.seq, self.next_seq
                )));
            }
            self.offset += 8 + len as u64;
            self.next_seq += 1;
            bytes += payload.len();
            out.push(RawRecord {
                seq: rec.seq,
                time_ns: rec.time_ns,
                payload,
            });
        }
        Ok(out)
    }
}

/// Reads exactly `buf.len()` bytes at `offset`; false if the file ends first.
fn read_exact_at(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => return Ok(false),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

const BASE_FILE: &str = "BASE";

/// Where a log starts when it does not start at seq 1: the seq, chain hash
/// and commit time of the record before its first (from a state transfer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Base {
    pub seq: u64,
    pub hash: Hash,
    pub time_ns: i64,
}

impl Base {
    /// `seq u64 LE ‖ time_ns i64 LE ‖ chain hash` (48 bytes), as in `BASE`
    /// and the state-transfer marker.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(48);
        v.extend_from_slice(&self.seq.to_le_bytes());
        v.extend_from_slice(&self.time_ns.to_le_bytes());
        v.extend_from_slice(&self.hash);
        v
    }

    pub fn decode(b: &[u8]) -> Option<Base> {
        if b.len() != 48 {
            return None;
        }
        Some(Base {
            seq: u64::from_le_bytes(b[..8].try_into().ok()?),
            time_ns: i64::from_le_bytes(b[8..16].try_into().ok()?),
            hash: b[16..48].try_into().ok()?,
        })
    }
}

pub fn read_base(dir: &Path) -> Result<Option<Base>> {
    let path = dir.join(BASE_FILE);
    match std::fs::read(&path) {
        Ok(b) if b.len() == 48 => Ok(Base::decode(&b)),
        Ok(_) => Err(VaultError::CorruptSegment {
            segment: path,
            offset: 0,
            reason: "BASE must be 48 bytes".into(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(VaultError::io("reading log base", &path, e)),
    }
}

impl Wal {
    /// Starts the log afresh after `base` (a state transfer installed the
    /// state at that seq): the old segments move to `superseded-at-<seq>/`
    /// and the next record must be `base.seq + 1` continuing `base.hash`.
    pub fn reset_to(&mut self, base: Base) -> Result<()> {
        let path = self.dir.join(BASE_FILE);
        crate::fs::write_atomic(&path, &base.encode())?;
        // The replaced log is kept aside, not deleted: if this copy had in
        // fact diverged after its newest checkpoint, the evidence survives.
        let segs = list_segments(&self.dir)?;
        // Segments holding no record (only a header) are no evidence of
        // anything: they go.
        let mut segs_with_records = Vec::new();
        for seg in segs {
            let len = std::fs::metadata(&seg.path)
                .map(|m| m.len())
                .unwrap_or(u64::MAX);
            if len <= HEADER_LEN as u64 {
                std::fs::remove_file(&seg.path)
                    .map_err(|e| VaultError::io("removing an empty log segment", &seg.path, e))?;
            } else {
                segs_with_records.push(seg);
            }
        }
        let segs = segs_with_records;
        if !segs.is_empty() {
            let aside = self.dir.join(format!("superseded-at-{}", base.seq));
            std::fs::create_dir_all(&aside)
                .map_err(|e| VaultError::io("keeping the replaced log", &aside, e))?;
            for seg in segs {
                let to = aside.join(seg.path.file_name().unwrap_or_default());
                std::fs::rename(&seg.path, &to)
                    .map_err(|e| VaultError::io("keeping the replaced log", &seg.path, e))?;
            }
            tracing::warn!(dir = %aside.display(), "the log this state transfer replaced is kept there; delete it once not needed");
        }
        sync_dir(&self.dir)?;
        self.next_seq = base.seq + 1;
        self.last_hash = base.hash;
        self.last_time_ns = base.time_ns;
        self.segments.clear();
        let seg = Segment {
            first_seq: self.next_seq,
            path: self.dir.join(segment_name(self.next_seq)),
        };
        self.file = create_segment(&self.dir, &seg)?;
        self.active_len = HEADER_LEN as u64;
        self.segments.push(seg);
        Ok(())
    }
}

/// Bytes and first seq of the log in `dir`.
pub fn log_extent(dir: &Path) -> Result<(u64, u64)> {
    let segs = list_segments(dir)?;
    let mut bytes = 0;
    for s in &segs {
        bytes += std::fs::metadata(&s.path).map(|m| m.len()).unwrap_or(0);
    }
    let first = match segs.first() {
        Some(s) => s.first_seq,
        None => read_base(dir)?.map(|b| b.seq + 1).unwrap_or(1),
    };
    Ok((bytes, first))
}

/// Removes whole segments whose records all come before `keep_from` (never
/// the newest segment), oldest first, and stops early once the log is at
/// most `until_bytes` if that is given. Returns (segments, bytes) removed and
/// the new first seq.
pub fn remove_segments_before(
    dir: &Path,
    keep_from: u64,
    until_bytes: Option<u64>,
) -> Result<(usize, u64, u64)> {
    let segs = list_segments(dir)?;
    let mut total: u64 = segs
        .iter()
        .map(|s| std::fs::metadata(&s.path).map(|m| m.len()).unwrap_or(0))
        .sum();
    let (mut n, mut bytes) = (0usize, 0u64);
    let mut first = segs.first().map(|s| s.first_seq).unwrap_or(1);
    for pair in segs.windows(2) {
        let (old, next) = (&pair[0], &pair[1]);
        if next.first_seq > keep_from || until_bytes.is_some_and(|u| total <= u) {
            break;
        }
        let len = std::fs::metadata(&old.path).map(|m| m.len()).unwrap_or(0);
        std::fs::remove_file(&old.path)
            .map_err(|e| VaultError::io("removing log segment", &old.path, e))?;
        total -= len;
        bytes += len;
        n += 1;
        first = next.first_seq;
    }
    if n > 0 {
        sync_dir(dir)?;
    }
    Ok((n, bytes, first))
}

/// The epoch the record at `seq` carries in the log at `dir`; None when the
/// log does not hold that seq (retention removed it, or it is past the end).
pub fn epoch_at(dir: &Path, seq: u64) -> Result<Option<u64>> {
    let mut found = None;
    let r = read_from(dir, seq, |r| {
        if r.record.seq == seq {
            found = Some(r.record.epoch);
        }
        // Only the record at `seq` matters.
        Err(VaultError::Closed("seen".into()))
    });
    match r {
        Ok(_) | Err(VaultError::Closed(_)) | Err(VaultError::LogGap { .. }) => Ok(found),
        Err(e) => Err(e),
    }
}

/// The epoch the log at `dir` carries from `seq` on: that of the record at
/// `seq`, or, when retention removed it, that of the oldest record kept
/// after it. Either says whether the log went on past an epoch that began
/// at `seq` in an older epoch, since a log that did can take no record of
/// a newer epoch after it (its chain would not continue). None when the log
/// holds nothing from `seq` on.
pub fn epoch_from(dir: &Path, seq: u64) -> Result<Option<u64>> {
    if let Some(e) = epoch_at(dir, seq)? {
        return Ok(Some(e));
    }
    let (_, first) = log_extent(dir)?;
    if first > seq {
        epoch_at(dir, first)
    } else {
        Ok(None)
    }
}

/// A record read back from the log, with its chain hash.
pub struct ReadRecord {
    pub record: Record,
    pub hash: Hash,
}

/// Reads records with seq >= `from_seq`, in order, calling `f` for each.
///
/// Used for replay at open and by readers in other processes (restore while
/// the daemon runs): damage at the end of the newest segment is taken as a
/// record still being written and ends the read; damage elsewhere is an error.
/// Returns the seq after the last record read.
pub fn read_from(
    dir: &Path,
    from_seq: u64,
    mut f: impl FnMut(ReadRecord) -> Result<()>,
) -> Result<u64> {
    let segments = list_segments(dir)?;
    // Start at the newest segment whose first seq is <= from_seq.
    let start = segments
        .iter()
        .rposition(|s| s.first_seq <= from_seq)
        .unwrap_or(0);
    let mut expected: Option<u64> = None;
    let mut last_hash: Option<Hash> = None;
    let n = segments.len();
    for (i, seg) in segments.iter().enumerate().skip(start) {
        let is_last = i + 1 == n;
        let mut buf = Vec::new();
        File::open(&seg.path)
            .and_then(|mut fh| fh.read_to_end(&mut buf))
            .map_err(|e| VaultError::io("reading log segment", &seg.path, e))?;
        let corrupt = |offset: usize, reason: String| VaultError::CorruptSegment {
            segment: seg.path.clone(),
            offset: offset as u64,
            reason,
        };
        match parse_header(&buf) {
            Ok(_) => {}
            Err(_) if is_last && buf.len() <= HEADER_LEN => break,
            Err(reason) => return Err(corrupt(0, reason)),
        }
        let mut off = HEADER_LEN;
        while off < buf.len() {
            match parse_frame(&buf, off) {
                Ok(p) => {
                    let seq = p.record.seq;
                    if expected.is_none() && seq > from_seq {
                        return Err(VaultError::LogGap {
                            dir: dir.to_path_buf(),
                            reason: format!(
                                "records from seq {from_seq} are no longer in the log, which \
                                 starts at seq {seq}"
                            ),
                        });
                    }
                    if expected.is_some_and(|e| e != seq) {
                        return Err(corrupt(
                            off,
                            format!(
                                "record has seq {seq}, expected {}",
                                expected.unwrap_or(from_seq)
                            ),
                        ));
                    }
                    if last_hash.is_some_and(|h| h != p.record.prev_hash) {
                        return Err(corrupt(off, format!("hash chain broken at seq {seq}")));
                    }
                    let prev = last_hash.unwrap_or(p.record.prev_hash);
                    let hash = chain(&prev, &buf[p.payload_range.clone()]);
                    last_hash = Some(hash);
                    expected = Some(seq + 1);
                    off = p.end;
                    if seq >= from_seq {
                        f(ReadRecord {
                            record: p.record,
                            hash,
                        })?;
                    }
                }
                // A record still being written by the daemon, unless intact
                // records follow: then it is damage in the middle.
                Err(_) if is_last && !later_group_after(&buf, off, expected.unwrap_or(0)) => {
                    return Ok(expected.unwrap_or(from_seq))
                }
                Err(reason) => return Err(corrupt(off, reason)),
            }
        }
    }
    Ok(expected.unwrap_or(from_seq))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::DatasetKey;
    use crate::ops::Op;
    use crate::record::frame;

    fn append_n(wal: &mut Wal, keys: &crate::keys::Keys, n: u64) {
        for _ in 0..n {
            let seq = wal.next_seq();
            let rec = Record::seal(
                keys,
                seq,
                1,
                seq as i64,
                wal.last_hash(),
                &[Op::Delete {
                    path: format!("p{seq}").into_bytes(),
                }],
                vec![],
            );
            let payload = rec.encode_payload();
            let hash = chain(&wal.last_hash(), &payload);
            wal.append_sync(&frame(&payload, true), seq, hash, seq as i64)
                .unwrap();
        }
    }

    fn seqs(dir: &Path) -> Vec<u64> {
        let mut v = Vec::new();
        read_from(dir, 1, |r| {
            v.push(r.record.seq);
            Ok(())
        })
        .unwrap();
        v
    }

    #[test]
    fn appends_survive_reopen_and_roll_segments() {
        let keys = DatasetKey::generate().derive();
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 200, 0).unwrap();
        append_n(&mut wal, &keys, 10);
        let h = wal.last_hash();
        drop(wal);
        let (wal, rec) = Wal::open(dir.path(), 200, 0).unwrap();
        assert_eq!(wal.next_seq(), 11);
        assert_eq!(wal.last_hash(), h);
        assert!(rec.segments > 1, "small segment size rolls");
        assert_eq!(seqs(dir.path()), (1..=10).collect::<Vec<_>>());
    }

    #[test]
    fn a_kept_tail_goes_on_where_it_stopped_and_starts_afresh_on_a_replaced_segment() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 1 << 20, 0).unwrap();
        append_n(&mut wal, &DatasetKey::generate().derive(), 10);
        drop(wal);
        let mut cached = None;
        let t = Tail::reuse(&mut cached, dir.path(), 1).unwrap();
        let first: Vec<u64> = t
            .read(4, usize::MAX)
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(first, [1, 2, 3, 4]);
        let offset = t.offset;
        // The next pass goes on from the same reader, not from the top.
        let t = Tail::reuse(&mut cached, dir.path(), 5).unwrap();
        assert_eq!(t.offset, offset);
        assert_eq!(t.read(5, usize::MAX).unwrap()[0].seq, 5);
        // Asked for another seq, it is positioned afresh.
        let t = Tail::reuse(&mut cached, dir.path(), 2).unwrap();
        assert_eq!(t.read(2, usize::MAX).unwrap()[0].seq, 2);
        // The segment replaced under the same name (as a state transfer
        // installs one): the reader reads the new file, not the old inode.
        let other = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(other.path(), 1 << 20, 0).unwrap();
        append_n(&mut wal, &DatasetKey::generate().derive(), 10);
        drop(wal);
        let mut want = Vec::new();
        read_from(other.path(), 3, |r| {
            want.push(r.record.encode_payload());
            Ok(())
        })
        .unwrap();
        let seg = list_segments(other.path()).unwrap().pop().unwrap().path;
        let into = dir.path().join(seg.file_name().unwrap());
        std::fs::copy(&seg, dir.path().join("replacement")).unwrap();
        std::fs::rename(dir.path().join("replacement"), &into).unwrap();
        let t = Tail::reuse(&mut cached, dir.path(), 3).unwrap();
        assert_eq!(t.read(3, usize::MAX).unwrap()[0].payload, want[0]);
    }

    #[test]
    fn torn_tail_is_cut_and_logging_resumes() {
        let keys = DatasetKey::generate().derive();
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 1 << 20, 0).unwrap();
        append_n(&mut wal, &keys, 5);
        drop(wal);
        let seg = list_segments(dir.path()).unwrap().pop().unwrap().path;
        let len = std::fs::metadata(&seg).unwrap().len();
        // Half of the last record made it to disk.
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.set_len(len - 20).unwrap();
        let (mut wal, rec) = Wal::open(dir.path(), 1 << 20, 0).unwrap();
        assert!(rec.truncated.is_some());
        assert_eq!(wal.next_seq(), 5);
        append_n(&mut wal, &keys, 2);
        assert_eq!(seqs(dir.path()), vec![1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn flipped_byte_in_the_middle_stops_the_open_with_segment_and_offset() {
        let keys = DatasetKey::generate().derive();
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 1 << 20, 0).unwrap();
        append_n(&mut wal, &keys, 20);
        drop(wal);
        let seg = list_segments(dir.path()).unwrap().pop().unwrap().path;
        let mut bytes = std::fs::read(&seg).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
        std::fs::write(&seg, &bytes).unwrap();
        let err = Wal::open(dir.path(), 1 << 20, 0)
            .err()
            .expect("open must refuse");
        let msg = err.to_string();
        assert!(matches!(err, VaultError::CorruptSegment { .. }), "{msg}");
        assert!(
            msg.contains(&seg.display().to_string()) && msg.contains("offset"),
            "{msg}"
        );
        // Nothing was cut: the file is as it was.
        assert_eq!(std::fs::read(&seg).unwrap(), bytes);
    }

    /// Appends `n` records as one commit group (one fsync, first frame marked).
    fn append_group(wal: &mut Wal, keys: &crate::keys::Keys, n: u64) {
        let mut frames = Vec::new();
        let mut prev = wal.last_hash();
        let mut seq = wal.next_seq();
        for _ in 0..n {
            let rec = Record::seal(
                keys,
                seq,
                1,
                1,
                prev,
                &[Op::Delete {
                    path: vec![b'x'; 300],
                }],
                vec![],
            );
            let payload = rec.encode_payload();
            prev = chain(&prev, &payload);
            frames.extend_from_slice(&frame(&payload, frames.is_empty()));
            seq += 1;
        }
        wal.append_sync(&frames, seq - 1, prev, 1).unwrap();
    }

    #[test]
    fn a_torn_group_is_cut_even_when_its_later_pages_reached_disk() {
        let keys = DatasetKey::generate().derive();
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 1 << 20, 0).unwrap();
        append_group(&mut wal, &keys, 3);
        let acked = std::fs::metadata(list_segments(dir.path()).unwrap()[0].path.clone())
            .unwrap()
            .len();
        append_group(&mut wal, &keys, 4);
        drop(wal);
        // Power loss: the last group's first record is damaged, its later ones intact.
        let seg = list_segments(dir.path()).unwrap().pop().unwrap().path;
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes[acked as usize + 20] ^= 0xFF;
        std::fs::write(&seg, &bytes).unwrap();
        let (wal, rec) = Wal::open(dir.path(), 1 << 20, 0).unwrap();
        assert_eq!(
            wal.next_seq(),
            4,
            "the torn group is dropped, the acknowledged one kept"
        );
        assert_eq!(rec.truncated.as_ref().map(|t| t.1), Some(acked));
        let evidence = std::fs::read_dir(dir.path())
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().contains("torn-at"));
        assert!(evidence, "the cut bytes are kept aside");
    }

    #[test]
    fn damage_before_a_completed_group_or_below_the_applied_seq_is_refused() {
        let keys = DatasetKey::generate().derive();
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 1 << 20, 0).unwrap();
        append_group(&mut wal, &keys, 3);
        append_group(&mut wal, &keys, 2);
        drop(wal);
        let seg = list_segments(dir.path()).unwrap().pop().unwrap().path;
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes[HEADER_LEN + 20] ^= 0xFF;
        std::fs::write(&seg, &bytes).unwrap();
        assert!(matches!(
            Wal::open(dir.path(), 1 << 20, 0),
            Err(VaultError::CorruptSegment { .. })
        ));

        // The last group damaged, but the state already applied it: refuse.
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 1 << 20, 0).unwrap();
        append_group(&mut wal, &keys, 2);
        drop(wal);
        let seg = list_segments(dir.path()).unwrap().pop().unwrap().path;
        let mut bytes = std::fs::read(&seg).unwrap();
        let n = bytes.len();
        bytes[n - 5] ^= 0xFF;
        std::fs::write(&seg, &bytes).unwrap();
        let err = Wal::open(dir.path(), 1 << 20, 2).err().expect("refused");
        assert!(err.to_string().contains("already applied"), "{err}");
        assert!(
            Wal::open(dir.path(), 1 << 20, 1).is_ok(),
            "seq 2 was never applied: a torn tail"
        );
    }
}
