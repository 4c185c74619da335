//! Unix: every entry is made relative to a directory file descriptor that
//! the restore opened itself, with the `*at` calls and no-follow flags, so
//! a symlink swapped in anywhere below the target is never followed, not
//! even by a race between a check and a write.
//!
//! Built on `rustix` rather than `cap-std`: the restore needs the exact
//! calls (`mkdirat`, `symlinkat`, `renameat`, `fchownat`, `utimensat`)
//! with flags it chooses, which rustix exposes one to one as safe
//! functions, while cap-std would hide the flags behind its own sandbox
//! rules and bring a larger dependency tree. rustix is already in the
//! build (through `tempfile`).

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, RawMode, Timespec, Timestamps, Uid, CWD};
use rustix::io::Errno;

use crate::manifest::Node;

/// What lies under a name in a directory, looked at without following it.
pub(super) enum Existing {
    Dir,
    Symlink,
    Other,
}

/// A directory opened by the restore.
pub(super) struct DirHandle(OwnedFd);

/// Opening a directory below the target: fails on a symlink (`ELOOP`) or
/// a non-directory (`ENOTDIR`) instead of going anywhere else.
const DESCEND: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

impl DirHandle {
    /// Opens the target directory, first creating it and its parents if
    /// `create`; `None` if it does not exist and `create` is false. The
    /// caller chose this path, so it is followed as given.
    pub(super) fn open_target(path: &Path, create: bool) -> io::Result<Option<DirHandle>> {
        if create {
            std::fs::create_dir_all(path)?;
        }
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        match rustix::fs::openat(CWD, path, flags, Mode::empty()) {
            Ok(fd) => Ok(Some(DirHandle(fd))),
            Err(Errno::NOENT) if !create => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub(super) fn entry(&self, name: &[u8]) -> io::Result<Option<Existing>> {
        match rustix::fs::statat(&self.0, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(match FileType::from_raw_mode(st.st_mode as RawMode) {
                FileType::Directory => Existing::Dir,
                FileType::Symlink => Existing::Symlink,
                _ => Existing::Other,
            })),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub(super) fn open_dir(&self, name: &[u8]) -> io::Result<DirHandle> {
        Ok(DirHandle(rustix::fs::openat(
            &self.0,
            name,
            DESCEND,
            Mode::empty(),
        )?))
    }

    /// Owner-only until the restore sets the directory's own mode last.
    pub(super) fn make_dir(&self, name: &[u8]) -> io::Result<()> {
        Ok(rustix::fs::mkdirat(&self.0, name, Mode::RWXU)?)
    }

    /// A new, empty file; fails if anything, a symlink included, already
    /// has the name. Owner-only until its metadata is set.
    pub(super) fn create_file(&self, name: &[u8]) -> io::Result<File> {
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&self.0, name, flags, Mode::RUSR | Mode::WUSR)?;
        Ok(File::from(fd))
    }

    pub(super) fn make_symlink(&self, target: &[u8], name: &[u8]) -> io::Result<()> {
        Ok(rustix::fs::symlinkat(target, &self.0, name)?)
    }

    /// Unlinks a file or symlink (the link itself); never a directory.
    pub(super) fn remove(&self, name: &[u8]) -> io::Result<()> {
        Ok(rustix::fs::unlinkat(&self.0, name, AtFlags::empty())?)
    }

    /// Replaces whatever file or symlink `to` names; a symlink is
    /// replaced, not followed.
    pub(super) fn rename(&self, from: &[u8], to: &[u8]) -> io::Result<()> {
        Ok(rustix::fs::renameat(&self.0, from, &self.0, to)?)
    }

    /// Owner and mtime of a symlink just made, best effort.
    pub(super) fn set_symlink_metadata(&self, name: &[u8], node: &Node) {
        let (uid, gid) = owner(node);
        let _ = rustix::fs::chownat(&self.0, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW);
        let _ = rustix::fs::utimensat(&self.0, name, &times(node), AtFlags::SYMLINK_NOFOLLOW);
    }

    /// Owner (best effort), mode and mtime of this directory.
    pub(super) fn set_own_metadata(&self, node: &Node) -> io::Result<()> {
        set_metadata_fd(&self.0, node)
    }
}

/// Owner (best effort), mode and mtime of a file being restored.
pub(super) fn set_file_metadata(file: &File, node: &Node) -> io::Result<()> {
    set_metadata_fd(file, node)
}

fn set_metadata_fd(fd: impl std::os::fd::AsFd, node: &Node) -> io::Result<()> {
    let (uid, gid) = owner(node);
    // Only root may give files away; others keep the files as theirs.
    // Owner before mode: a chown clears set-id bits.
    let _ = rustix::fs::fchown(&fd, uid, gid);
    rustix::fs::fchmod(&fd, Mode::from_raw_mode((node.mode & 0o7777) as RawMode))?;
    rustix::fs::futimens(&fd, &times(node))?;
    Ok(())
}

/// The ids to give an entry; the all-ones id means "leave unchanged" to
/// the kernel (and is not a valid id), so it is passed as `None`.
fn owner(node: &Node) -> (Option<Uid>, Option<Gid>) {
    (
        (node.uid != u32::MAX).then(|| Uid::from_raw(node.uid)),
        (node.gid != u32::MAX).then(|| Gid::from_raw(node.gid)),
    )
}

/// Access and modification time both set to the restored mtime.
fn times(node: &Node) -> Timestamps {
    let t = Timespec {
        tv_sec: node.mtime_sec,
        tv_nsec: node.mtime_nsec as _,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}
