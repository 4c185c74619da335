//! What differs between a Unix and a Windows host, in one place: file
//! modes and owners, the current user, process control, filesystem-wide
//! sync and free space. On Unix every function is the call the code made
//! before; on Windows each one either has a sensible meaning (a mode
//! becomes the read-only attribute) or fails with [`unsupported`], so a
//! feature that cannot work there says so instead of doing nothing.

use std::fs::Metadata;
use std::io;
use std::path::Path;

/// The error of a feature Windows does not have here.
pub fn unsupported(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("not supported on Windows: {what}"),
    )
}

/// Sets permission bits (Windows: only "no write bit" as read-only).
pub fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    }
    #[cfg(not(unix))]
    {
        let mut perms = std::fs::metadata(path)?.permissions();
        perms.set_readonly(mode & 0o222 == 0);
        std::fs::set_permissions(path, perms)
    }
}

/// Permission bits (07777) of a file (Windows: made up from the
/// read-only attribute).
pub fn mode(meta: &Metadata) -> u32 {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        meta.mode() & 0o7777
    }
    #[cfg(not(unix))]
    {
        let base = if meta.is_dir() { 0o755 } else { 0o644 };
        if meta.permissions().readonly() {
            base & !0o222
        } else {
            base
        }
    }
}

/// A file's owner and group (Windows: none, 0).
pub fn owner(meta: &Metadata) -> (u32, u32) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        (meta.uid(), meta.gid())
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        (0, 0)
    }
}

/// The device a file is on, to stay within one filesystem when walking
/// (Windows: 0, every path counts as one device).
pub fn device(meta: &Metadata) -> u64 {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        meta.dev()
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        0
    }
}

/// Gives a file (not a link's target) to a user and group. Windows files
/// are owned by SIDs, not numbers: the file keeps the creator as owner.
pub fn lchown(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
    }
    #[cfg(not(unix))]
    {
        let _ = (path, uid, gid);
        Ok(())
    }
}

/// This process's effective user and group (Windows: 0, 0).
pub fn own_ids() -> (u32, u32) {
    #[cfg(unix)]
    {
        (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        )
    }
    #[cfg(not(unix))]
    {
        (0, 0)
    }
}

/// Whether this process runs as root, by the owner of `/proc/self`
/// (Windows: never; system-wide defaults such as `/run/flr` do not apply
/// there).
pub fn is_root() -> bool {
    #[cfg(unix)]
    {
        std::fs::metadata("/proc/self")
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
            .unwrap_or(false)
    }
    #[cfg(not(unix))]
    {
        false
    }
}

/// Whether this process may write in directory `path`.
pub fn can_write(path: &Path) -> bool {
    #[cfg(unix)]
    {
        nix::unistd::access(path, nix::unistd::AccessFlags::W_OK).is_ok()
    }
    #[cfg(not(unix))]
    {
        std::fs::metadata(path).is_ok_and(|m| !m.permissions().readonly())
    }
}

/// Whether this process may enter directory `path`.
pub fn can_enter(path: &Path) -> bool {
    #[cfg(unix)]
    {
        nix::unistd::access(path, nix::unistd::AccessFlags::X_OK).is_ok()
    }
    #[cfg(not(unix))]
    {
        path.is_dir()
    }
}

/// Flushes the whole filesystem holding `dir` to disk (syncfs).
pub fn sync_filesystem(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        let d = std::fs::File::open(dir)?;
        nix::unistd::syncfs(&d).map_err(io::Error::from)
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Err(unsupported("syncing a whole filesystem (syncfs)"))
    }
}

/// Bytes free for this user on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    #[cfg(unix)]
    {
        let st = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
        Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Err(unsupported("free space checks (statvfs)"))
    }
}

/// Makes a symbolic link `link` pointing at `target`.
pub fn symlink(target: &Path, link: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(target, link)
    }
    #[cfg(windows)]
    {
        std::os::windows::fs::symlink_file(target, link)
    }
}

/// A file name or symlink target as stored (bytes, as the source OS gave
/// them) as a path: the same bytes on Unix; elsewhere, where a path is
/// not bytes, lossily decoded.
pub fn name_from_bytes(name: &[u8]) -> std::path::PathBuf {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        std::ffi::OsStr::from_bytes(name).into()
    }
    #[cfg(not(unix))]
    {
        String::from_utf8_lossy(name).into_owned().into()
    }
}

/// Kills process `pid` at once (SIGKILL).
pub fn kill(pid: u32) -> io::Result<()> {
    #[cfg(unix)]
    {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .map_err(io::Error::from)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        Err(unsupported("killing a process by id (signals)"))
    }
}
