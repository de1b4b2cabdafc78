//! File metadata beyond contents, mode and mtime: owners, extended
//! attributes, POSIX ACLs, hard links and special files. What is read from
//! a tree ([`Capture`]), how it is recorded in an entry ([`Ext`]), and how
//! it is put back ([`apply_fd`], [`apply_at`]) with what could not be
//! ([`Missed`], [`Shortfalls`]).
//!
//! ACLs are the kernel's `system.posix_acl_access` and
//! `system.posix_acl_default` attributes, kept byte for byte (their entries
//! name numeric ids, as the owner does). Owners are put back by number;
//! the names seen at capture are recorded for reports and for an operator
//! restoring on a machine whose ids differ.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Which kinds of metadata a dataset keeps (`preserve` in its config).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Preserve(pub u8);

impl Preserve {
    pub const OWNER: u8 = 1;
    pub const XATTR: u8 = 2;
    pub const ACL: u8 = 4;
    pub const HARDLINK: u8 = 8;
    pub const SPARSE: u8 = 16;
    pub const SPECIAL: u8 = 32;
    pub const ALL: Preserve = Preserve(63);
    pub const NONE: Preserve = Preserve(0);

    /// The names the config uses, in order, with their bits.
    pub const NAMES: [(&'static str, u8); 6] = [
        ("owner", Self::OWNER),
        ("xattr", Self::XATTR),
        ("acl", Self::ACL),
        ("hardlink", Self::HARDLINK),
        ("sparse", Self::SPARSE),
        ("special", Self::SPECIAL),
    ];

    /// Parses the config's list; an unknown name is an error naming the
    /// known ones.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<Preserve, String> {
        let mut bits = 0;
        for n in names {
            let n = n.as_ref();
            let Some((_, b)) = Self::NAMES.iter().find(|(k, _)| *k == n) else {
                return Err(format!(
                    "unknown preserve item {n:?}; known: {}",
                    Self::NAMES.map(|(k, _)| k).join(", ")
                ));
            };
            bits |= b;
        }
        Ok(Preserve(bits))
    }

    pub fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }

    /// The bits recorded in an entry's [`Ext`].
    fn recorded(self) -> u8 {
        self.0 & (Self::OWNER | Self::XATTR | Self::ACL | Self::HARDLINK)
    }
}

impl Default for Preserve {
    fn default() -> Self {
        Self::ALL
    }
}

/// The ACL attributes, kept under [`Preserve::ACL`]; every other
/// `system.*` attribute belongs to a file system and is not kept.
const ACL_NAMES: [&[u8]; 2] = [b"system.posix_acl_access", b"system.posix_acl_default"];

/// Largest attribute name list and value Linux allows (XATTR_LIST_MAX,
/// XATTR_SIZE_MAX); a longer one is refused, never allocated.
pub const XATTR_MAX: usize = 64 << 10;

/// Most attributes one entry may carry when decoded.
pub const XATTRS_MAX: usize = 1024;

/// Most bytes of names and values one entry's attributes may hold, and
/// the longest owner or group name: a file whose attributes pass it is
/// recorded without them (WARN), so no entry the decoder would refuse is
/// ever logged.
pub const XATTRS_TOTAL_MAX: usize = 256 << 10;
pub const NAME_MAX: usize = 256;

/// Which class an attribute name belongs to, if triad keeps it: the ACLs,
/// and the `user.`, `trusted.` and `security.` namespaces (the others
/// belong to one file system and would fail elsewhere).
fn xattr_class(name: &[u8]) -> Option<u8> {
    if ACL_NAMES.contains(&name) {
        Some(Preserve::ACL)
    } else if [&b"user."[..], b"trusted.", b"security."]
        .iter()
        .any(|p| name.starts_with(p) && name.len() > p.len())
    {
        Some(Preserve::XATTR)
    } else {
        None
    }
}

/// What an entry records beyond contents, mode and mtime.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ext {
    /// The [`Preserve`] bits this entry was captured with (owner, xattr,
    /// acl, hardlink): what is absent under a bit set here was absent on
    /// disk, not left out.
    pub kept: u8,
    pub uid: u32,
    pub gid: u32,
    /// The owner's and group's names where the capture ran (empty when the
    /// id had none there). Not used to restore; shown in reports.
    pub user: Vec<u8>,
    pub group: Vec<u8>,
    /// Extended attributes (and ACLs), sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// For a file with more than one name: a key shared by all its names
    /// (from the source's device and inode); 0 otherwise.
    pub link: u64,
}

impl Ext {
    /// Whether the decoded values stay within what a file system allows.
    pub fn check(&self) -> Result<(), String> {
        if self.xattrs.len() > XATTRS_MAX {
            return Err(format!("{} extended attributes", self.xattrs.len()));
        }
        if self.user.len() > NAME_MAX || self.group.len() > NAME_MAX {
            return Err("owner or group name over 256 bytes".into());
        }
        if self.link != 0 && self.kept & Preserve::HARDLINK == 0 {
            return Err("a hard-link key where hard links are not kept".into());
        }
        let mut total = 0usize;
        for (n, v) in &self.xattrs {
            let class = xattr_class(n);
            if n.len() > 255 || n.contains(&0) || class.is_none() {
                return Err(format!(
                    "extended attribute name {:?} is not one triad keeps",
                    String::from_utf8_lossy(n)
                ));
            }
            if class.is_some_and(|c| c & self.kept == 0) {
                return Err(format!(
                    "extended attribute {:?} of a kind the entry does not keep",
                    String::from_utf8_lossy(n)
                ));
            }
            if v.len() > XATTR_MAX {
                return Err("extended attribute value over 64 KiB".into());
            }
            total += n.len() + v.len();
        }
        if total > XATTRS_TOTAL_MAX {
            return Err(format!("{total} bytes of extended attributes"));
        }
        if self.xattrs.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err("extended attributes not sorted by name".into());
        }
        Ok(())
    }

    /// The bytes this contributes to the namespace digest, for the kinds in
    /// `mask`. Names and the hard-link key are left out: names depend on
    /// the machine that reads the tree, link keys on its inode numbers.
    pub fn digest_bytes(&self, mask: u8, out: &mut Vec<u8>) {
        let kept = self.kept & mask & (Preserve::OWNER | Preserve::XATTR | Preserve::ACL);
        if kept == 0 {
            return;
        }
        out.extend_from_slice(b"ext1");
        out.push(kept);
        if kept & Preserve::OWNER != 0 {
            out.extend_from_slice(&self.uid.to_le_bytes());
            out.extend_from_slice(&self.gid.to_le_bytes());
        }
        for (n, v) in &self.xattrs {
            if xattr_class(n).is_some_and(|c| c & kept != 0) {
                out.extend_from_slice(&(n.len() as u64).to_le_bytes());
                out.extend_from_slice(n);
                out.extend_from_slice(&(v.len() as u64).to_le_bytes());
                out.extend_from_slice(v);
            }
        }
    }
}

/// Whether two entries' metadata record the same owner and attributes:
/// what the digest covers, so the names seen at capture and hard-link keys
/// aside (a missing `Ext` and one recording nothing compare equal). A link
/// key changes only with a file's contents: a tree without the links, such
/// as a promoted standby tree, must not wipe the recorded ones.
pub fn same_recorded(a: Option<&Ext>, b: Option<&Ext>) -> bool {
    let bytes = |x: Option<&Ext>| {
        let mut v = Vec::new();
        if let Some(x) = x {
            x.digest_bytes(u8::MAX, &mut v);
        }
        v
    };
    bytes(a) == bytes(b)
}

/// Reads the metadata a dataset keeps from files on disk; caches id to
/// name lookups (bounded by the ids in use).
pub struct Capture {
    pub preserve: Preserve,
    /// Whether owners' names are looked up.
    names: bool,
    users: Mutex<HashMap<u32, Vec<u8>>>,
    groups: Mutex<HashMap<u32, Vec<u8>>>,
}

/// Ids whose names are cached at most; beyond, lookups are not cached.
const NAME_CACHE_MAX: usize = 4096;

impl Capture {
    pub fn new(preserve: Preserve) -> Capture {
        Capture {
            preserve,
            names: true,
            users: Mutex::new(HashMap::new()),
            groups: Mutex::new(HashMap::new()),
        }
    }

    /// A capture that records ids without looking up their names (for
    /// comparisons and digests, which leave names out).
    pub fn without_names(preserve: Preserve) -> Capture {
        Capture {
            names: false,
            ..Capture::new(preserve)
        }
    }

    fn name(
        cache: &Mutex<HashMap<u32, Vec<u8>>>,
        id: u32,
        look: impl Fn(u32) -> Option<Vec<u8>>,
    ) -> Vec<u8> {
        if let Some(n) = cache.lock().ok().and_then(|c| c.get(&id).cloned()) {
            return n;
        }
        let n = look(id).unwrap_or_default();
        if let Ok(mut c) = cache.lock() {
            if c.len() < NAME_CACHE_MAX {
                c.insert(id, n.clone());
            }
        }
        n
    }

    /// The [`Ext`] of the file, directory or special file at `path`, whose
    /// `lstat` is `md`; `None` when the dataset keeps none of it. `fd`, when
    /// the caller has the file open, is read instead of the path.
    /// Symlinks record their owner only (Linux allows no user attributes
    /// on them).
    pub fn ext(
        &self,
        path: &Path,
        fd: Option<&std::fs::File>,
        md: &std::fs::Metadata,
        kept: Option<u8>,
    ) -> io::Result<Option<Box<Ext>>> {
        let kept = kept.unwrap_or(self.preserve.recorded()) & self.preserve.recorded();
        if kept == 0 {
            return Ok(None);
        }
        let mut x = Ext {
            kept,
            ..Ext::default()
        };
        if kept & Preserve::OWNER != 0 {
            x.uid = md.uid();
            x.gid = md.gid();
        }
        if kept & Preserve::OWNER != 0 && self.names {
            x.user = Self::name(&self.users, x.uid, |id| {
                uzers::get_user_by_uid(id).map(|u| u.name().as_encoded_bytes().to_vec())
            });
            x.group = Self::name(&self.groups, x.gid, |id| {
                uzers::get_group_by_gid(id).map(|g| g.name().as_encoded_bytes().to_vec())
            });
        }
        let ft = md.file_type();
        if kept & (Preserve::XATTR | Preserve::ACL) != 0 && (ft.is_file() || ft.is_dir()) {
            // Attributes that cannot be read, or more than an entry may
            // hold, are left out (and said): the file's contents are
            // recorded whatever its attributes do.
            match read_xattrs(path, fd, kept) {
                Ok(a) if within_limits(&a) => x.xattrs = a,
                Ok(a) => {
                    tracing::warn!(path = %path.display(), attributes = a.len(), "more extended attributes than an entry holds (1024, 256 KiB); recorded without them");
                    x.kept &= !(Preserve::XATTR | Preserve::ACL);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(e),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "extended attributes do not read; recorded without them");
                    x.kept &= !(Preserve::XATTR | Preserve::ACL);
                }
            }
        }
        x.user.truncate(NAME_MAX);
        x.group.truncate(NAME_MAX);
        if kept & Preserve::HARDLINK != 0 && ft.is_file() && md.nlink() > 1 {
            let h = blake3::hash(&[md.dev().to_le_bytes(), md.ino().to_le_bytes()].concat());
            let mut k = [0u8; 8];
            k.copy_from_slice(&h.as_bytes()[..8]);
            // Never 0, which means "one name".
            x.link = u64::from_le_bytes(k).max(1);
        }
        Ok(Some(Box::new(x)))
    }
}

/// Whether read attributes fit an entry ([`Ext::check`]'s limits).
fn within_limits(a: &[(Vec<u8>, Vec<u8>)]) -> bool {
    a.len() <= XATTRS_MAX
        && a.iter().map(|(n, v)| n.len() + v.len()).sum::<usize>() <= XATTRS_TOTAL_MAX
}

/// The attributes of `path` (through `fd` when given) in the kept classes,
/// sorted by name. A file system without attributes has none.
fn read_xattrs(
    path: &Path,
    fd: Option<&std::fs::File>,
    kept: u8,
) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    // Most files have no attributes or a short ACL: a small buffer first,
    // the kernel's maximum only when it says the small one is too short
    // (never 128 KiB zeroed per file of a scan).
    let list = read_sized(|buf| match fd {
        Some(f) => rustix::fs::flistxattr(f.as_fd(), buf),
        None => rustix::fs::llistxattr(path, buf),
    });
    let list = match list {
        Ok(l) => l,
        Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for name in list.split(|&b| b == 0).filter(|s| !s.is_empty()) {
        if xattr_class(name).is_none_or(|c| c & kept == 0) {
            continue;
        }
        let cname = OsStr::from_bytes(name);
        let got = read_sized(|buf| match fd {
            Some(f) => rustix::fs::fgetxattr(f.as_fd(), cname, buf),
            None => rustix::fs::lgetxattr(path, cname, buf),
        });
        match got {
            Ok(v) => out.push((name.to_vec(), v)),
            // Removed between the list and the read.
            Err(rustix::io::Errno::NODATA) => {}
            Err(e) => return Err(e.into()),
        }
    }
    out.sort();
    Ok(out)
}

/// What `call` writes into a buffer: tried with 512 bytes, then, when the
/// kernel answers ERANGE, with [`XATTR_MAX`] (the most it ever returns).
fn read_sized(
    call: impl Fn(&mut [u8]) -> rustix::io::Result<usize>,
) -> rustix::io::Result<Vec<u8>> {
    let mut small = [0u8; 512];
    match call(&mut small) {
        Ok(n) => Ok(small[..n].to_vec()),
        Err(rustix::io::Errno::RANGE) => {
            let mut big = vec![0u8; XATTR_MAX];
            let n = call(&mut big)?;
            big.truncate(n);
            Ok(big)
        }
        Err(e) => Err(e),
    }
}

/// The kinds of metadata a restore could not put back on one path (bits
/// of [`Preserve`]): not errors of the restore, limits of who runs it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Missed(pub u8);

/// Whether an error says the caller may not do this (not root, no
/// capability, or a file system without the feature), rather than that
/// something is wrong.
fn not_allowed(e: rustix::io::Errno) -> bool {
    matches!(
        e,
        rustix::io::Errno::PERM | rustix::io::Errno::ACCESS | rustix::io::Errno::NOTSUP
    )
}

/// Puts `ext`'s owner and attributes on the open file or directory `fd`.
/// Call before setting the mode (a change of owner clears setuid and
/// setgid) and the mtime. What the caller may not do is added to `missed`;
/// anything else is an error.
pub fn apply_fd(fd: impl AsFd, ext: &Ext, missed: &mut Missed) -> Result<(), String> {
    let fd = fd.as_fd();
    if ext.kept & Preserve::OWNER != 0 {
        // Called whatever the owner is now: one call instead of a stat and
        // a call, and a no-op (allowed) when it already is.
        match rustix::fs::fchown(
            fd,
            Some(rustix::fs::Uid::from_raw(ext.uid)),
            Some(rustix::fs::Gid::from_raw(ext.gid)),
        ) {
            Ok(()) => {}
            Err(e) if not_allowed(e) => missed.0 |= Preserve::OWNER,
            Err(e) => return Err(format!("setting its owner: {e}")),
        }
    }
    // Attributes of the kept kinds the entry does not have go first (an
    // ACL inherited from a default ACL, one removed at the source, one
    // added to the tree since): the file ends with exactly the entry's.
    let classes = ext.kept & (Preserve::XATTR | Preserve::ACL);
    if classes != 0 {
        let present = read_sized(|buf| rustix::fs::flistxattr(fd, buf)).unwrap_or_default();
        for name in present.split(|&b| b == 0).filter(|s| !s.is_empty()) {
            let Some(class) = xattr_class(name).filter(|c| c & classes != 0) else {
                continue;
            };
            if ext.xattrs.iter().any(|(n, _)| n == name) {
                continue;
            }
            match rustix::fs::fremovexattr(fd, OsStr::from_bytes(name)) {
                Ok(()) | Err(rustix::io::Errno::NODATA) => {}
                Err(_) => missed.0 |= class,
            }
        }
    }
    for (n, v) in &ext.xattrs {
        let Some(class) = xattr_class(n) else {
            continue;
        };
        // Refused by who runs the restore, or by a file system that takes
        // fewer or smaller attributes, or not this security module's
        // label: said per kind, never a reason to leave the file out.
        if rustix::fs::fsetxattr(fd, OsStr::from_bytes(n), v, rustix::fs::XattrFlags::empty())
            .is_err()
        {
            missed.0 |= class;
        }
    }
    Ok(())
}

/// Puts `ext`'s owner on `name` in `dir` without following a symlink (for
/// symlinks and special files, which are not opened).
pub fn apply_at(
    dir: impl AsFd,
    name: &OsStr,
    ext: &Ext,
    missed: &mut Missed,
) -> Result<(), String> {
    if ext.kept & Preserve::OWNER == 0 {
        return Ok(());
    }
    match rustix::fs::chownat(
        dir,
        name,
        Some(rustix::fs::Uid::from_raw(ext.uid)),
        Some(rustix::fs::Gid::from_raw(ext.gid)),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    ) {
        Ok(()) => Ok(()),
        Err(e) if not_allowed(e) => {
            missed.0 |= Preserve::OWNER;
            Ok(())
        }
        Err(e) => Err(format!("setting its owner: {e}")),
    }
}

/// What a restore could not put back, per kind: how many paths, and the
/// first few of them.
#[derive(Debug, Default)]
pub struct Shortfalls {
    by: BTreeMap<u8, (u64, Vec<String>)>,
}

/// Paths named per kind in a report; the count covers the rest.
const EXAMPLES: usize = 10;

/// One kind of metadata a restore could not put back.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NotRestored {
    /// "owner", "xattr", "acl", "special" (as in `preserve`).
    pub what: String,
    pub paths: u64,
    pub examples: Vec<String>,
    /// Why, as far as triad can tell.
    pub reason: String,
}

impl Shortfalls {
    pub fn note(&mut self, missed: Missed, path: &str) {
        for (_, bit) in Preserve::NAMES {
            if missed.0 & bit != 0 {
                let slot = self.by.entry(bit).or_default();
                slot.0 += 1;
                if slot.1.len() < EXAMPLES {
                    slot.1.push(path.to_string());
                }
            }
        }
    }

    /// The kinds missed on at least one path.
    pub fn mask(&self) -> u8 {
        self.by.keys().fold(0, |m, b| m | b)
    }

    pub fn into_report(self) -> Vec<NotRestored> {
        let root = uzers::get_effective_uid() == 0;
        self.by
            .into_iter()
            .map(|(bit, (paths, examples))| {
                let what = Preserve::NAMES
                    .iter()
                    .find(|(_, b)| *b == bit)
                    .map(|(n, _)| n.to_string())
                    .unwrap_or_default();
                let reason = match (bit, root) {
                    (Preserve::XATTR | Preserve::ACL, false) => {
                        "the restore did not run as root, or the target file system refused them"
                            .to_string()
                    }
                    (_, false) => "the restore did not run as root".to_string(),
                    (Preserve::XATTR | Preserve::ACL, true) => {
                        "the target file system refused them".to_string()
                    }
                    _ => "refused by the system".to_string(),
                };
                NotRestored {
                    what,
                    paths,
                    examples,
                    reason,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preserve_names_parse_and_unknown_ones_are_named() {
        assert_eq!(Preserve::parse(&["owner", "acl"]).unwrap().0, 5);
        assert_eq!(
            Preserve::parse(&Preserve::NAMES.map(|(n, _)| n)).unwrap(),
            Preserve::ALL
        );
        let e = Preserve::parse(&["owners"]).unwrap_err();
        assert!(e.contains("\"owners\"") && e.contains("hardlink"), "{e}");
    }

    #[test]
    fn a_decoded_ext_with_a_foreign_or_unsorted_attribute_is_refused() {
        let mut x = Ext {
            kept: Preserve::XATTR,
            xattrs: vec![(b"user.a".to_vec(), b"1".to_vec())],
            ..Ext::default()
        };
        assert!(x.check().is_ok());
        x.xattrs.push((b"system.nfs4_acl".to_vec(), Vec::new()));
        assert!(x.check().is_err());
        x.xattrs = vec![
            (b"user.b".to_vec(), Vec::new()),
            (b"user.a".to_vec(), Vec::new()),
        ];
        assert!(x.check().is_err());
        x.xattrs = vec![(b"user.a".to_vec(), vec![0; XATTR_MAX + 1])];
        assert!(x.check().is_err());
    }

    #[test]
    fn the_digest_leaves_out_names_links_and_masked_kinds() {
        let a = Ext {
            kept: Preserve::OWNER | Preserve::XATTR | Preserve::HARDLINK,
            uid: 5,
            gid: 6,
            user: b"alice".to_vec(),
            xattrs: vec![(b"user.x".to_vec(), b"v".to_vec())],
            link: 9,
            ..Ext::default()
        };
        let b = Ext {
            user: b"bob".to_vec(),
            link: 10,
            ..a.clone()
        };
        let d = |x: &Ext, m: u8| {
            let mut v = Vec::new();
            x.digest_bytes(m, &mut v);
            v
        };
        assert_eq!(d(&a, 63), d(&b, 63));
        let c = Ext {
            uid: 7,
            ..a.clone()
        };
        assert_ne!(d(&a, 63), d(&c, 63));
        assert_eq!(d(&a, 63 & !Preserve::OWNER), d(&c, 63 & !Preserve::OWNER));
        assert!(d(&a, 0).is_empty());
    }
}
