//! The WinFsp adapter: serves a filesystem model ([`vfs_core::fs::FsModel`]:
//! the read-only `RepoFs` or a writable session's `CowFs`) as a Windows
//! volume through WinFsp's user-mode filesystem driver, with the
//! `winfsp_wrs` bindings.
//!
//! Two halves:
//! - [`translate`] (every OS): paths, names, attributes, times, open and
//!   create decisions and the [`translate::ntstatus`] error mapping. It
//!   holds every rule the adapter applies, so Linux unit tests cover them.
//! - The glue (Windows only): `WinFspAdapter` implements
//!   `winfsp_wrs::FileSystemInterface` by calling `translate` and the
//!   model, and `mount` starts a WinFsp dispatcher at a directory or drive
//!   letter, returning a `WinFspMount` with the same shape as
//!   [`crate::fuse::FuseMount`] on Linux (`wait`, `unmounter`, `unmount`).
//!
//! A handle opened on Windows is one `OpenNode` (inode, model handle for
//! a regular file's data, the listing of a directory); WinFsp owns it
//! between `open`/`create` and `close`. Deletion follows the Windows
//! pattern: a delete-on-close disposition is recorded on the handle and
//! carried out (unlink or rmdir) at cleanup.

pub mod translate;

#[cfg(windows)]
mod adapter;
#[cfg(windows)]
pub use adapter::{mount, WinFspMount, WinFspUnmounter};

/// How a WinFsp volume is mounted.
#[derive(Clone, Debug)]
pub struct WinFspOptions {
    /// The file system name Windows shows (`fsutil fsinfo volumeinfo`);
    /// WinFsp keeps at most 16 characters.
    pub fs_name: String,
    /// The volume label Explorer shows; at most 32 characters.
    pub volume_label: String,
    /// How long (ms) the kernel keeps file info and directory listings.
    /// Restore points never change, so the read-only default is long; a
    /// writable session uses [`WinFspOptions::WRITABLE_INFO_TIMEOUT_MS`].
    pub info_timeout_ms: u32,
}

impl WinFspOptions {
    /// Restore point contents are immutable while mounted.
    pub const READ_ONLY_INFO_TIMEOUT_MS: u32 = 1_000;
    /// In a writable session the adapter sees every change itself, but
    /// the model may also change behind it (a commit); keep it short.
    pub const WRITABLE_INFO_TIMEOUT_MS: u32 = 0;
}

impl Default for WinFspOptions {
    fn default() -> Self {
        WinFspOptions {
            fs_name: "flr".to_string(),
            volume_label: "flr".to_string(),
            info_timeout_ms: Self::READ_ONLY_INFO_TIMEOUT_MS,
        }
    }
}
