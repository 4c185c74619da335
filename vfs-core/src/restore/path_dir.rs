//! Non-Unix: there are no directory-relative calls to build on, so a
//! directory is kept as a path and every step checks what it is about to
//! use with `symlink_metadata` (links, junctions included, are never
//! followed, only refused). Unlike the Unix implementation this cannot
//! rule out a link swapped in between a check and its use; it stops
//! everything a hostile manifest or a pre-existing link can do on its own.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Component, Path, PathBuf};

use crate::manifest::Node;

/// What lies under a name in a directory, looked at without following it.
pub(super) enum Existing {
    Dir,
    Symlink,
    Other,
}

/// A directory below the target that was checked to be a real directory.
pub(super) struct DirHandle(PathBuf);

/// The path of `name` in `dir`, if `name` is exactly one normal component
/// here. Names are checked against '/' on load; this OS has more
/// separators ('\\'), drive prefixes and stream suffixes (':').
fn child(dir: &Path, name: &[u8]) -> io::Result<PathBuf> {
    let name = String::from_utf8_lossy(name);
    let mut parts = Path::new(name.as_ref()).components();
    let single = matches!(parts.next(), Some(Component::Normal(c)) if c == name.as_ref())
        && parts.next().is_none();
    if !single || name.contains(':') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a plain file name on this OS"),
        ));
    }
    Ok(dir.join(name.as_ref()))
}

impl DirHandle {
    /// Checks the target directory, first creating it and its parents if
    /// `create`; `None` if it does not exist and `create` is false. The
    /// caller chose this path, so it is followed as given.
    pub(super) fn open_target(path: &Path, create: bool) -> io::Result<Option<DirHandle>> {
        if create {
            fs::create_dir_all(path)?;
        }
        match fs::metadata(path) {
            Ok(m) if m.is_dir() => Ok(Some(DirHandle(path.to_path_buf()))),
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the restore target is not a directory",
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound && !create => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub(super) fn entry(&self, name: &[u8]) -> io::Result<Option<Existing>> {
        match fs::symlink_metadata(child(&self.0, name)?) {
            Ok(m) if m.file_type().is_symlink() => Ok(Some(Existing::Symlink)),
            Ok(m) if m.is_dir() => Ok(Some(Existing::Dir)),
            Ok(_) => Ok(Some(Existing::Other)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub(super) fn open_dir(&self, name: &[u8]) -> io::Result<DirHandle> {
        match self.entry(name)? {
            Some(Existing::Dir) => Ok(DirHandle(child(&self.0, name)?)),
            Some(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a directory (links are not followed)",
            )),
            None => Err(io::ErrorKind::NotFound.into()),
        }
    }

    pub(super) fn make_dir(&self, name: &[u8]) -> io::Result<()> {
        fs::create_dir(child(&self.0, name)?)
    }

    /// A new, empty file; fails if anything, a link included, already has
    /// the name.
    pub(super) fn create_file(&self, name: &[u8]) -> io::Result<File> {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(child(&self.0, name)?)
    }

    pub(super) fn make_symlink(&self, _target: &[u8], _name: &[u8]) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "symlinks are not restored on this OS",
        ))
    }

    /// Removes a file or link (the link itself); never a directory.
    pub(super) fn remove(&self, name: &[u8]) -> io::Result<()> {
        let path = child(&self.0, name)?;
        match self.entry(name)? {
            Some(Existing::Dir) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "is a directory",
            )),
            _ => fs::remove_file(path),
        }
    }

    /// Replaces whatever file `to` names.
    pub(super) fn rename(&self, from: &[u8], to: &[u8]) -> io::Result<()> {
        fs::rename(child(&self.0, from)?, child(&self.0, to)?)
    }

    pub(super) fn set_symlink_metadata(&self, _name: &[u8], _node: &Node) {}

    /// Modification time of this directory (no Unix mode or owner here).
    pub(super) fn set_own_metadata(&self, node: &Node) -> io::Result<()> {
        let t = filetime::FileTime::from_unix_time(node.mtime_sec, node.mtime_nsec);
        filetime::set_file_times(&self.0, t, t)
    }
}

/// Modification time of a file being restored, through its handle.
pub(super) fn set_file_metadata(file: &File, node: &Node) -> io::Result<()> {
    let t = filetime::FileTime::from_unix_time(node.mtime_sec, node.mtime_nsec);
    filetime::set_file_handle_times(file, Some(t), Some(t))
}
