//! The one check every namespace path passes before triad acts on it.
//!
//! Paths in records, snapshot pages, state transfers and pushed names come
//! from other sites, object stores and sockets, so they are hostile until
//! checked. A namespace path is relative to the dataset root: raw Unix bytes,
//! `/`-separated components, none of them empty, `.` or `..`, no NUL, no
//! leading or trailing `/`, each component at most 255 bytes (the kernel's
//! NAME_MAX). Anything else could name a place outside a restore target, so
//! every decoder refuses it with [`PathError`], which says what is wrong.

use std::fmt;

/// Longest component any Linux file system accepts (NAME_MAX).
pub const MAX_COMPONENT: usize = 255;

/// Why a path is not a valid namespace path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path is empty")]
    Empty,
    #[error(
        "path `{0}` is absolute (starts with `/`); namespace paths are relative to the dataset"
    )]
    Absolute(String),
    #[error("path `{0}` has an empty component (`//` or a trailing `/`)")]
    EmptyComponent(String),
    #[error("path `{0}` has a `.` or `..` component")]
    DotComponent(String),
    #[error("path `{0}` contains a NUL byte")]
    Nul(String),
    #[error("path `{0}` has a component longer than {MAX_COMPONENT} bytes")]
    TooLong(String),
}

fn shown(p: &[u8]) -> String {
    // Bounded, so a hostile megabyte-long name cannot flood a log line.
    let s = String::from_utf8_lossy(&p[..p.len().min(200)]).into_owned();
    if p.len() > 200 {
        format!("{s}…")
    } else {
        s
    }
}

/// Checks one namespace path (see the module docs for the rules).
pub fn check(p: &[u8]) -> Result<(), PathError> {
    if p.is_empty() {
        return Err(PathError::Empty);
    }
    if p[0] == b'/' {
        return Err(PathError::Absolute(shown(p)));
    }
    if p.contains(&0) {
        return Err(PathError::Nul(shown(p)));
    }
    for c in p.split(|&b| b == b'/') {
        match c {
            b"" => return Err(PathError::EmptyComponent(shown(p))),
            b"." | b".." => return Err(PathError::DotComponent(shown(p))),
            c if c.len() > MAX_COMPONENT => return Err(PathError::TooLong(shown(p))),
            _ => {}
        }
    }
    Ok(())
}

/// A namespace path that passed [`check`].
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelPath(Vec<u8>);

impl RelPath {
    pub fn new(p: Vec<u8>) -> Result<RelPath, PathError> {
        check(&p)?;
        Ok(RelPath(p))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The parent's components and the last component.
    pub fn split_last(&self) -> (&[u8], &[u8]) {
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => (&self.0[..i], &self.0[i + 1..]),
            None => (b"", &self.0),
        }
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RelPath({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_relative_paths() {
        for p in [
            &b"a"[..],
            b"a/b/c",
            b"..a",
            b"a..",
            b".hidden/x",
            b"a b/\xff\xfe",
        ] {
            assert_eq!(check(p), Ok(()), "{}", String::from_utf8_lossy(p));
        }
    }

    #[test]
    fn refuses_every_way_out_of_the_root() {
        type Want = fn(String) -> PathError;
        let bad: &[(&[u8], Want)] = &[
            (b"/etc/passwd", PathError::Absolute),
            (b"/", PathError::Absolute),
            (b"..", PathError::DotComponent),
            (b"a/../../x", PathError::DotComponent),
            (b"a/./b", PathError::DotComponent),
            (b".", PathError::DotComponent),
            (b"a//b", PathError::EmptyComponent),
            (b"a/", PathError::EmptyComponent),
            (b"a\0b", PathError::Nul),
        ];
        for (p, want) in bad {
            assert_eq!(
                check(p),
                Err(want(shown(p))),
                "{}",
                String::from_utf8_lossy(p)
            );
        }
        assert_eq!(check(b""), Err(PathError::Empty));
        let long = vec![b'x'; 256];
        assert!(matches!(check(&long), Err(PathError::TooLong(_))));
        assert!(check(&vec![b'x'; 255]).is_ok());
    }

    #[test]
    fn splits_parent_and_name() {
        let p = RelPath::new(b"a/b/c".to_vec()).unwrap();
        assert_eq!(p.split_last(), (&b"a/b"[..], &b"c"[..]));
        let top = RelPath::new(b"top".to_vec()).unwrap();
        assert_eq!(top.split_last(), (&b""[..], &b"top"[..]));
    }
}
