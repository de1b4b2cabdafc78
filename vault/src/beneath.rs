//! Writing a tree beneath one directory and nowhere else.
//!
//! A restore target is opened once; every later step names its place as a
//! checked [`RelPath`] and reaches it from that descriptor one component at a
//! time with `openat(O_NOFOLLOW | O_DIRECTORY)`, then acts on the last
//! component with the `*at` calls (mkdirat, openat with O_EXCL, symlinkat,
//! renameat, utimensat without following). So neither a hostile path (`/`,
//! `..`) nor a symlink placed in the tree, by the data being restored or by
//! someone else racing the restore, can make a write land outside the
//! target. This walks component by component rather than asking openat2 for
//! RESOLVE_BENEATH because the kernels government systems run (4.19 on
//! Kylin V10) predate openat2.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, CWD};

use crate::meta::{Ext, Missed, Preserve};
use crate::ops::{Entry, Node};
use crate::path::RelPath;

/// A directory opened once, under which everything is written.
pub struct Beneath {
    root: OwnedFd,
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

/// A timestamp as the kernel takes it, from nanoseconds since the epoch.
fn timespec(ns: i64) -> Timespec {
    Timespec {
        tv_sec: ns.div_euclid(1_000_000_000),
        tv_nsec: ns.rem_euclid(1_000_000_000),
    }
}

impl Beneath {
    /// Opens `root` (which the operator named, so it may itself be reached
    /// through symlinks; nothing beneath it may).
    pub fn open(root: &Path) -> io::Result<Beneath> {
        let fd = rustix::fs::openat(
            CWD,
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Beneath { root: fd })
    }

    /// The directory at `components` (a `/`-separated run of checked
    /// components; empty for the root), reached without following any
    /// symlink.
    fn dir(&self, components: &[u8]) -> io::Result<OwnedFd> {
        if components.is_empty() {
            return self.root.try_clone();
        }
        let mut parts = components.split(|&b| b == b'/');
        let first = parts.next().unwrap_or_default();
        let mut cur = rustix::fs::openat(&self.root, os(first), dir_flags(), Mode::empty())?;
        for c in parts {
            cur = rustix::fs::openat(&cur, os(c), dir_flags(), Mode::empty())?;
        }
        Ok(cur)
    }

    /// The parent directory of `p` and the last component's name.
    fn parent<'a>(&self, p: &'a RelPath) -> io::Result<(OwnedFd, &'a [u8])> {
        let (parent, name) = p.split_last();
        Ok((self.dir(parent)?, name))
    }

    /// Creates the directory `p` with mode 0700 (its recorded mode is set
    /// later, once everything beneath it is written).
    pub fn mkdir(&self, p: &RelPath) -> io::Result<()> {
        let (parent, name) = self.parent(p)?;
        rustix::fs::mkdirat(&parent, os(name), Mode::from_raw_mode(0o700))?;
        // The umask may have taken bits the restore itself needs.
        let d = rustix::fs::openat(&parent, os(name), dir_flags(), Mode::empty())?;
        rustix::fs::fchmod(&d, Mode::from_raw_mode(0o700))?;
        Ok(())
    }

    /// Writes a file at `p` through a temporary name in the same directory:
    /// `fill` writes the contents and sets what it likes on the open file;
    /// the file is renamed into place only if `fill` succeeds, and the
    /// temporary is removed otherwise.
    pub fn write_file(
        &self,
        p: &RelPath,
        tmp: &[u8],
        fill: impl FnOnce(&mut File) -> Result<(), String>,
    ) -> Result<(), String> {
        let (parent, name) = self
            .parent(p)
            .map_err(|e| format!("opening its directory: {e}"))?;
        let mut f =
            create_at(&parent, tmp).map_err(|e| format!("creating a temporary file: {e}"))?;
        let res = fill(&mut f).and_then(|()| {
            drop(f);
            rustix::fs::renameat(&parent, os(tmp), &parent, os(name))
                .map_err(|e| format!("renaming into place: {e}"))
        });
        if res.is_err() {
            let _ = rustix::fs::unlinkat(&parent, os(tmp), AtFlags::empty());
        }
        res
    }

    /// The directory that holds `p`, opened once for many files in it,
    /// and the last component's name.
    pub fn parent_dir<'a>(&self, p: &'a RelPath) -> io::Result<(Dir, &'a [u8])> {
        let (fd, name) = self.parent(p)?;
        Ok((Dir(fd), name))
    }

    /// Creates the symlink `p` pointing at `target` (which may point
    /// anywhere: it is data, and nothing here ever follows it) with the
    /// given mtime and owner, through a temporary name.
    pub fn symlink(
        &self,
        p: &RelPath,
        tmp: &[u8],
        target: &[u8],
        mtime_ns: i64,
        ext: Option<&Ext>,
        missed: &mut Missed,
    ) -> io::Result<()> {
        let (parent, name) = self.parent(p)?;
        rustix::fs::symlinkat(os(target), &parent, os(tmp))?;
        self.finish_at(&parent, tmp, name, None, mtime_ns, ext, missed)
    }

    /// Makes the fifo or device node `e` at `p` through a temporary name,
    /// with its owner, mode and mtime. A device node the caller may not
    /// make (not root) is added to `missed` and nothing is made.
    pub fn special(
        &self,
        p: &RelPath,
        tmp: &[u8],
        e: &Entry,
        missed: &mut Missed,
    ) -> io::Result<()> {
        let (kind, rdev) = match &e.node {
            Node::Fifo => (FileType::Fifo, 0),
            Node::Device { block: true, rdev } => (FileType::BlockDevice, *rdev),
            Node::Device { block: false, rdev } => (FileType::CharacterDevice, *rdev),
            _ => return Err(io::Error::other("not a fifo or device")),
        };
        let (parent, name) = self.parent(p)?;
        match rustix::fs::mknodat(&parent, os(tmp), kind, Mode::from_raw_mode(0o600), rdev) {
            Ok(()) => {}
            Err(rustix::io::Errno::PERM) => {
                missed.0 |= Preserve::SPECIAL;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        self.finish_at(
            &parent,
            tmp,
            name,
            Some(e.mode),
            e.mtime_ns,
            e.ext.as_deref(),
            missed,
        )
    }

    /// Gives `tmp` in `parent` (a symlink or special file, never opened)
    /// its owner, mode (not for symlinks) and mtime, and renames it to
    /// `name`; removes it when any step fails.
    #[allow(clippy::too_many_arguments)]
    fn finish_at(
        &self,
        parent: &OwnedFd,
        tmp: &[u8],
        name: &[u8],
        mode: Option<u32>,
        mtime_ns: i64,
        ext: Option<&Ext>,
        missed: &mut Missed,
    ) -> io::Result<()> {
        let t = timespec(mtime_ns);
        let res = match ext {
            Some(x) => crate::meta::apply_at(parent, os(tmp), x, missed).map_err(io::Error::other),
            None => Ok(()),
        }
        .and_then(|()| match mode {
            Some(m) => chmod_nofollow(parent, tmp, m),
            None => Ok(()),
        })
        .and_then(|()| {
            Ok(rustix::fs::utimensat(
                parent,
                os(tmp),
                &Timestamps {
                    last_access: t,
                    last_modification: t,
                },
                AtFlags::SYMLINK_NOFOLLOW,
            )?)
        })
        .and_then(|()| Ok(rustix::fs::renameat(parent, os(tmp), parent, os(name))?));
        if res.is_err() {
            let _ = rustix::fs::unlinkat(parent, os(tmp), AtFlags::empty());
        }
        res
    }

    /// Makes `p` another name of the file at `first` (a hard link), through
    /// a temporary name so that whatever stood at `p` is replaced at once.
    pub fn link(&self, first: &RelPath, p: &RelPath, tmp: &[u8]) -> io::Result<()> {
        let (fparent, fname) = self.parent(first)?;
        let (parent, name) = self.parent(p)?;
        rustix::fs::linkat(&fparent, os(fname), &parent, os(tmp), AtFlags::empty())?;
        // Only a regular file is linked: the first name swapped for a
        // symlink or a device meanwhile is refused.
        let st = rustix::fs::statat(&parent, os(tmp), AtFlags::SYMLINK_NOFOLLOW);
        let res = match st {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile => {
                rustix::fs::renameat(&parent, os(tmp), &parent, os(name)).map_err(io::Error::from)
            }
            Ok(_) => Err(io::Error::other(
                "its first name is no longer a regular file",
            )),
            Err(e) => Err(e.into()),
        };
        // Renaming one name of an inode onto another of the same inode
        // does nothing and succeeds (POSIX): the temporary name is removed
        // in every case.
        let _ = rustix::fs::unlinkat(&parent, os(tmp), AtFlags::empty());
        res
    }

    /// What stands at `p` now, without following a symlink there; `None`
    /// when nothing does (or its directory does not exist).
    pub fn stat(&self, p: &RelPath) -> io::Result<Option<rustix::fs::Stat>> {
        let (parent, name) = match self.parent(p) {
            Ok(x) => x,
            Err(e) if is_absent(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        match rustix::fs::statat(&parent, os(name), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(e) if e == rustix::io::Errno::NOENT => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The target of the symlink at `p`.
    pub fn read_link(&self, p: &RelPath) -> io::Result<Vec<u8>> {
        let (parent, name) = self.parent(p)?;
        Ok(rustix::fs::readlinkat(&parent, os(name), Vec::new())?.into_bytes())
    }

    /// Removes whatever stands at `p`, a directory with everything beneath
    /// it, never following a symlink. Nothing there is not an error.
    pub fn remove_all(&self, p: &RelPath) -> io::Result<()> {
        let (parent, name) = match self.parent(p) {
            Ok(x) => x,
            Err(e) if is_absent(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        remove_at(&parent, name)
    }

    /// Renames `from` to `to` (whose parent must exist), replacing a file
    /// or an empty directory there.
    pub fn rename(&self, from: &RelPath, to: &RelPath) -> io::Result<()> {
        let (fp, fname) = self.parent(from)?;
        let (tp, tname) = self.parent(to)?;
        Ok(rustix::fs::renameat(&fp, os(fname), &tp, os(tname))?)
    }

    /// Gives the directory `p` its recorded owner and attributes (ACLs
    /// included), mode and mtime; what the caller may not set is added to
    /// `missed`.
    pub fn set_dir_meta(
        &self,
        p: &RelPath,
        mode: u32,
        mtime_ns: i64,
        ext: Option<&Ext>,
        missed: &mut Missed,
    ) -> Result<(), String> {
        let d = self.dir(p.as_bytes()).map_err(|e| e.to_string())?;
        if let Some(x) = ext {
            crate::meta::apply_fd(&d, x, missed)?;
        }
        rustix::fs::fchmod(&d, Mode::from_raw_mode(mode & 0o7777))
            .map_err(|e| format!("setting mode: {e}"))?;
        let t = timespec(mtime_ns);
        rustix::fs::futimens(
            d.as_fd(),
            &Timestamps {
                last_access: t,
                last_modification: t,
            },
        )
        .map_err(|e| format!("setting mtime: {e}"))
    }
}

/// A directory beneath a [`Beneath`] root, reached without following a
/// symlink; names given to it are single components.
pub struct Dir(OwnedFd);

impl Dir {
    /// Creates `name` as a new file (nothing may stand there, a symlink
    /// included), owner-only until its recorded mode is set.
    pub fn create(&self, name: &[u8]) -> io::Result<File> {
        create_at(&self.0, name)
    }

    /// Opens the existing file `name` for writing, never through a symlink.
    pub fn open_write(&self, name: &[u8]) -> io::Result<File> {
        let fd = rustix::fs::openat(
            &self.0,
            os(name),
            OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(File::from(fd))
    }

    /// Opens the regular file `name` for reading, never through a symlink
    /// and never blocking on a fifo put in its place.
    pub fn open_read(&self, name: &[u8]) -> io::Result<File> {
        let fd = rustix::fs::openat(
            &self.0,
            os(name),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let f = File::from(fd);
        if !f.metadata()?.is_file() {
            return Err(io::Error::other("not a regular file"));
        }
        Ok(f)
    }

    /// Renames `from` to `to` within this directory.
    pub fn rename(&self, from: &[u8], to: &[u8]) -> io::Result<()> {
        Ok(rustix::fs::renameat(&self.0, os(from), &self.0, os(to))?)
    }

    /// Removes the file `name`, if it is there.
    pub fn remove_file(&self, name: &[u8]) -> io::Result<()> {
        match rustix::fs::unlinkat(&self.0, os(name), AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Sets the mode of the fifo or device `name` in `dir` without following
/// a symlink: chmod by name would follow one swapped in by whoever can
/// write the directory, so the node is opened `O_PATH | O_NOFOLLOW`,
/// checked to be a fifo or device, and changed through that descriptor's
/// `/proc/self/fd` entry (which names the inode, not a path).
fn chmod_nofollow(dir: &OwnedFd, name: &[u8], mode: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = rustix::fs::openat(
        dir,
        os(name),
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let kind = FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode);
    if !matches!(
        kind,
        FileType::Fifo | FileType::CharacterDevice | FileType::BlockDevice
    ) {
        return Err(io::Error::other("not the fifo or device just made"));
    }
    let proc = format!("/proc/self/fd/{}", fd.as_raw_fd());
    Ok(rustix::fs::chmod(
        proc.as_str(),
        Mode::from_raw_mode(mode & 0o7777),
    )?)
}

/// Creates `name` in `dir` as a new file, owner-only until its recorded
/// mode is set, refusing anything already there (a symlink included).
fn create_at(dir: &OwnedFd, name: &[u8]) -> io::Result<File> {
    let fd = rustix::fs::openat(
        dir,
        os(name),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    Ok(File::from(fd))
}

/// Errors that mean "nothing is there": a missing component, or a
/// component that is not a directory (a file stands where one was).
fn is_absent(e: &io::Error) -> bool {
    matches!(
        rustix::io::Errno::from_io_error(e),
        Some(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP)
    )
}

/// Removes `name` in the directory `dir`: a file or symlink is unlinked, a
/// directory emptied (through its own descriptor, opened without following
/// links) and removed.
fn remove_at(dir: &OwnedFd, name: &[u8]) -> io::Result<()> {
    match rustix::fs::unlinkat(dir, os(name), AtFlags::empty()) {
        Ok(()) => return Ok(()),
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        // EISDIR on Linux, EPERM elsewhere: a directory.
        Err(rustix::io::Errno::ISDIR | rustix::io::Errno::PERM) => {}
        Err(e) => return Err(e.into()),
    }
    let sub = rustix::fs::openat(dir, os(name), dir_flags(), Mode::empty())?;
    // A read-only directory (0555) could not be emptied; it is going anyway.
    let _ = rustix::fs::fchmod(&sub, Mode::from_raw_mode(0o700));
    let mut names = Vec::new();
    for ent in rustix::fs::Dir::read_from(&sub)? {
        let ent = ent?;
        let n = ent.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    for n in names {
        remove_at(&sub, &n)?;
    }
    match rustix::fs::unlinkat(dir, os(name), AtFlags::REMOVEDIR) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(s: &str) -> RelPath {
        RelPath::new(s.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn a_symlinked_directory_in_the_tree_is_never_followed() {
        let outside = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("link")).unwrap();
        let b = Beneath::open(root.path()).unwrap();
        let err = b
            .write_file(&rel("link/x"), b".tmp", |_| Ok(()))
            .unwrap_err();
        assert!(err.contains("opening its directory"), "{err}");
        assert!(b.mkdir(&rel("link/d")).is_err());
        assert!(b
            .symlink(
                &rel("link/s"),
                b".tmp",
                b"/etc",
                0,
                None,
                &mut Missed::default()
            )
            .is_err());
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    #[test]
    fn writes_land_beneath_the_root() {
        let root = tempfile::tempdir().unwrap();
        let b = Beneath::open(root.path()).unwrap();
        b.mkdir(&rel("d")).unwrap();
        b.write_file(&rel("d/f"), b".tmp", |f| {
            use std::io::Write;
            f.write_all(b"hi").map_err(|e| e.to_string())
        })
        .unwrap();
        b.symlink(
            &rel("d/s"),
            b".tmp2",
            b"/etc/passwd",
            1_000_000_000,
            None,
            &mut Missed::default(),
        )
        .unwrap();
        b.set_dir_meta(
            &rel("d"),
            0o750,
            2_000_000_000,
            None,
            &mut Missed::default(),
        )
        .unwrap();
        assert_eq!(std::fs::read(root.path().join("d/f")).unwrap(), b"hi");
        assert_eq!(
            std::fs::read_link(root.path().join("d/s")).unwrap(),
            Path::new("/etc/passwd")
        );
        let failed = b.write_file(&rel("d/g"), b".tmp3", |_| Err("no".into()));
        assert!(failed.is_err());
        let names: Vec<_> = std::fs::read_dir(root.path().join("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names.len(),
            2,
            "the failed write left its temporary: {names:?}"
        );
    }
}
