//! The mount driver of the OS this is built for, under one set of names:
//! FUSE on Linux, WinFsp on Windows. Callers (the daemon, `flr mount`)
//! write `os_mount::mount(fs, path, &MountOptions { .. })` once.
//!
//! On Linux every name is the FUSE adapter's own, unchanged. On Windows
//! [`MountOptions`] carries the same fields and is turned into
//! [`crate::winfsp::WinFspOptions`]: the file system name becomes the
//! volume label; `threads`, `allow_other` and `auto_unmount` have no
//! WinFsp counterpart (WinFsp picks its dispatcher threads, access is
//! the volume's security descriptor, and the driver removes a volume
//! whose process died), so they are accepted and not used.

#[cfg(target_os = "linux")]
pub use crate::fuse::{
    clear_stale_mount, is_stale_mount, mount, FuseMount as Mount, FuseOptions as MountOptions,
    FuseUnmounter as Unmounter,
};

#[cfg(windows)]
pub use windows::*;

#[cfg(windows)]
mod windows {
    use std::io;
    use std::path::Path;
    use std::sync::Arc;

    use vfs_core::fs::FsModel;

    use crate::winfsp::{self, WinFspOptions};
    pub use crate::winfsp::{WinFspMount as Mount, WinFspUnmounter as Unmounter};

    /// The fields callers set for either driver (see the module doc for
    /// which ones WinFsp uses).
    #[derive(Clone, Debug)]
    pub struct MountOptions {
        pub threads: usize,
        pub allow_other: bool,
        pub auto_unmount: bool,
        pub fs_name: String,
    }

    impl Default for MountOptions {
        fn default() -> Self {
            MountOptions {
                threads: 4,
                allow_other: false,
                auto_unmount: false,
                fs_name: "flr".to_string(),
            }
        }
    }

    /// Mounts like the Linux `mount`. Callers make the mount point as a
    /// directory first, as FUSE needs; WinFsp makes its own and refuses
    /// an existing one, so an empty directory there is removed first.
    pub fn mount(
        fs: Arc<dyn FsModel>,
        mountpoint: &Path,
        opts: &MountOptions,
    ) -> io::Result<Mount> {
        if std::fs::read_dir(mountpoint).is_ok_and(|mut d| d.next().is_none()) {
            std::fs::remove_dir(mountpoint).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot clear mount point {}: {e}", mountpoint.display()),
                )
            })?;
        }
        let info_timeout_ms = if fs.writable() {
            WinFspOptions::WRITABLE_INFO_TIMEOUT_MS
        } else {
            WinFspOptions::READ_ONLY_INFO_TIMEOUT_MS
        };
        let win = WinFspOptions {
            volume_label: opts.fs_name.clone(),
            info_timeout_ms,
            ..WinFspOptions::default()
        };
        winfsp::mount(fs, mountpoint, &win)
    }

    /// WinFsp leaves no dead mount behind: the driver removes a volume
    /// when its process ends.
    pub fn is_stale_mount(_path: &Path) -> bool {
        false
    }

    /// Nothing to clear (see [`is_stale_mount`]).
    pub fn clear_stale_mount(_path: &Path) -> io::Result<()> {
        Ok(())
    }
}
