//! flr's adapters to the outside world: OS mount drivers that serve the
//! filesystem model of `vfs_core`, and remote object stores.
//!
//! Layers, outside in:
//! - The kernel (FUSE on Linux; WinFsp or Dokan on Windows; NFS clients)
//!   sends requests: lookup, getattr, readdir, open, read, ...
//! - An adapter per mount driver turns each request into one call on
//!   [`vfs_core::fs::RepoFs`] and each [`vfs_core::fs::FsError`] into the
//!   driver's own code, in one function per adapter. No OS type goes below
//!   this crate.
//!   - [`fuse`] (Linux): [`fuse::mount`] starts a read-only, multi-threaded
//!     FUSE session (fuser, pure Rust, no libfuse) and returns a
//!     [`fuse::FuseMount`]; [`fuse::FuseUnmounter`] lets another thread (a
//!     signal handler, the control API) end it. Restore point contents are
//!     immutable, so the adapter lets the kernel cache names, attributes
//!     and file pages for long; only the root and job directories, whose
//!     restore point lists grow, get short timeouts.
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
pub mod repo_spec;
pub mod s3;
