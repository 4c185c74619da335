//! flr's adapters to the outside world: OS mount drivers that serve the
//! filesystem model of `vfs_core`, and remote object stores.
//!
//! Layers, outside in:
//! - The kernel (FUSE on Linux; WinFsp or Dokan on Windows; NFS clients)
//!   sends requests: lookup, getattr, readdir, open, read, ...
//! - An adapter per mount driver turns each request into calls on a
//!   [`vfs_core::fs::FsModel`] (the read-only `RepoFs`, or a writable
//!   session's `CowFs`) and each [`vfs_core::fs::FsError`] into the
//!   driver's own code, in one function per adapter. No OS type goes below
//!   this crate.
//!   - [`fuse`] (Linux): [`fuse::mount`] starts a multi-threaded FUSE
//!     session (fuser, pure Rust, no libfuse) and returns a
//!     [`fuse::FuseMount`]; [`fuse::FuseUnmounter`] lets another thread (a
//!     signal handler, the control API) end it. Restore point contents are
//!     immutable, so the adapter lets the kernel cache names, attributes
//!     and file pages for long; only the root and job directories, whose
//!     restore point lists grow, get short timeouts.
//!   - [`winfsp`] (Windows, through `winfsp_wrs`): the same model as a
//!     Windows volume. Its rules (paths and case, names, attributes,
//!     FILETIME, NTSTATUS codes, open and create decisions) sit in
//!     [`winfsp::translate`], which compiles and is tested on every OS;
//!     only the callback glue and `winfsp::mount` are Windows-only.
//!     Dokan is left out: its crates' build script runs a Windows
//!     program, so they cannot be built from Linux.
//!   - [`os_mount`]: the current OS's driver under one set of names, so
//!     callers mount the same way on Linux and Windows.
//! - `RepoFs` (in `vfs_core`) resolves inodes to restore point nodes and
//!   serves reads from its chunk cache, which fetches from the repository's
//!   object store.

//! - Object stores: [`s3::S3Store`] implements `vfs_core`'s
//!   [`vfs_core::store::ObjectStore`] on S3-compatible storage, beside the
//!   local directory store in `vfs_core`. [`repo_spec::RepoSpec`] is how a
//!   user names a repository (a directory or `s3://BUCKET/PREFIX`) and
//!   opens its store.

#[cfg(target_os = "linux")]
pub mod fuse;
pub mod nfs;
#[cfg(any(target_os = "linux", windows))]
pub mod os_mount;
pub mod repo_spec;
pub mod s3;
pub mod winfsp;
