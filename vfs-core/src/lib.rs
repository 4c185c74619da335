//! flr's core: the repository format and the filesystem model, with no OS
//! mount code, so that every mount backend (FUSE, NFS, WinFsp, Dokan) is a
//! thin adapter over it.
//!
//! Layers, bottom up:
//! - [`store::ObjectStore`]: immutable named objects, written create-only.
//!   [`local_store`] (directory, `pread`) and [`store::MemoryStore`] (tests)
//!   implement it here; S3 lives in `backends`.
//! - [`format`](mod@format): magic numbers, versions, headers, the checksummed envelope,
//!   the key layout, and the layout of a writable session's files.
//! - [`repo::Repository`]: config and keys ([`crypto`]), the in-memory chunk
//!   index, chunk reads in two steps (`read_raw`, then `decode_chunk`:
//!   open, decompress, verify), restore point manifests ([`manifest`]).
//! - [`backup`]: files and streams -> [`chunker`] -> hash, compress, seal
//!   on all cores -> packs and index files -> manifest, written last.
//! - [`copy`]: restore points into a second repository (archive copies),
//!   sending only the chunks it lacks, re-sealed with its key.
//! - [`restore`] and [`verify`]: the reverse path and the health check;
//!   [`repair`] rebuilds index files from the packs' own entry tables.
//! - [`cache`] and [`fs`]: the read path of a mount: an inode table over
//!   restore points, a sharded byte-bounded chunk cache with one fetch per
//!   chunk, and readahead. [`frame_fetch`] brings frames into that cache:
//!   from the [`disk_cache`] of stored frames (for remote stores), else
//!   from the store, nearby frames of a pack in one range request.
//! - [`session`]: writable sessions, a copy-on-write layer over one
//!   restore point that keeps changed byte ranges in a session directory.
//! - [`lock`], [`forget`] and [`prune`]: locks of writers, readers and
//!   prune in the store; retention; garbage collection with delayed
//!   deletion, safe beside running writers.
//! - [`ingest`] and [`ingest_fs`]: writing into the repository from many
//!   streams at once; [`ingest_fs::IngestFs`] is a write-only filesystem
//!   whose files become one restore point when it is committed.

pub mod backup;
pub mod cache;
pub mod chunker;
pub mod copy;
pub mod crypto;
pub mod devices;
pub mod disk_cache;
pub mod error;
pub mod forget;
pub mod format;
pub mod frame_fetch;
pub mod fs;
pub mod ids;
pub mod ingest;
pub mod ingest_fs;
pub mod local_store;
pub mod lock;
pub mod manifest;
pub mod memory;
pub mod merged_index;
pub mod prune;
pub mod repair;
pub mod repo;
pub mod restore;
pub mod session;
pub mod store;
pub mod tar_stream;
pub mod verify;

pub use error::{Error, Result};
