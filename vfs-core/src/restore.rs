//! Writing a restore point's files back to a directory: byte-identical,
//! holes kept sparse, metadata (mode, owner when permitted, mtime) set.
//!
//! Each file is written under a temporary name beside its target and
//! renamed only when complete, so an interrupted restore never leaves a
//! half-written file under a final name.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rayon::prelude::*;

use crate::backup::Progress;
use crate::error::{Error, Result};
use crate::manifest::{Manifest, Node, NodeKind};
use crate::repo::Repository;

/// Chunks decoded in parallel before being written in order.
const RESTORE_BATCH: usize = 256;

pub struct RestoreOptions {
    /// Paths inside the restore point to restore; empty means all.
    pub paths: Vec<String>,
    /// Replace files that already exist at the target.
    pub overwrite: bool,
    pub progress: Arc<Progress>,
    /// Polled between batches; set to stop early.
    pub cancel: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Debug, Default, Clone)]
pub struct RestoreStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
}

#[cfg(unix)]
fn os_path(bytes: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    PathBuf::from(std::ffi::OsStr::from_bytes(bytes))
}

#[cfg(not(unix))]
fn os_path(bytes: &[u8]) -> PathBuf {
    PathBuf::from(String::from_utf8_lossy(bytes).into_owned())
}

/// Marks which nodes to restore: the selected ones, everything below
/// them, and the directories above them.
fn select(manifest: &Manifest, paths: &[String]) -> Result<Vec<bool>> {
    let n = manifest.nodes.len();
    if paths.is_empty() {
        return Ok(vec![true; n]);
    }
    let mut by_path = std::collections::HashMap::new();
    for i in 1..n {
        by_path.insert(manifest.path_of(i), i);
    }
    let mut chosen = vec![false; n];
    for p in paths {
        let p = p.trim_matches('/');
        let &i = by_path.get(p).ok_or_else(|| {
            Error::NotFound(format!("{p:?} in restore point {}", manifest.full_name()))
        })?;
        chosen[i] = true;
        let mut up = manifest.nodes[i].parent as usize;
        while up != 0 {
            chosen[up] = true;
            up = manifest.nodes[up].parent as usize;
        }
    }
    chosen[0] = true;
    // Nodes are in depth-first order, so a parent is decided before its
    // children; a child of a selected non-ancestor is selected.
    let explicit: HashSet<usize> = paths
        .iter()
        .filter_map(|p| by_path.get(p.trim_matches('/')).copied())
        .collect();
    let mut inherited = vec![false; n];
    for i in 1..n {
        let parent = manifest.nodes[i].parent as usize;
        if explicit.contains(&i) || (parent != 0 && inherited[parent]) {
            inherited[i] = true;
            chosen[i] = true;
        }
    }
    Ok(chosen)
}

pub fn restore(
    repo: &Repository,
    manifest: &Manifest,
    target: &Path,
    opts: &RestoreOptions,
) -> Result<RestoreStats> {
    let chosen = select(manifest, &opts.paths)?;
    let nodes = &manifest.nodes;
    let mut paths: Vec<PathBuf> = vec![target.to_path_buf(); nodes.len()];
    for i in 1..nodes.len() {
        paths[i] = paths[nodes[i].parent as usize].join(os_path(&nodes[i].name));
    }
    // Check everything first: refuse before writing anything.
    if !opts.overwrite {
        for i in 1..nodes.len() {
            if chosen[i]
                && nodes[i].kind != NodeKind::Dir
                && fs::symlink_metadata(&paths[i]).is_ok()
            {
                return Err(Error::AlreadyExists(format!(
                    "{} (pass --overwrite to replace existing files)",
                    paths[i].display()
                )));
            }
        }
    }
    let total: u64 = (0..nodes.len())
        .filter(|&i| chosen[i] && nodes[i].kind == NodeKind::File)
        .map(|i| nodes[i].size)
        .sum();
    opts.progress.total_bytes.store(total, Ordering::Relaxed);
    fs::create_dir_all(target).map_err(|e| Error::io(target, e))?;

    let mut stats = RestoreStats::default();
    for i in 1..nodes.len() {
        if !chosen[i] {
            continue;
        }
        if opts.cancel.load(Ordering::Relaxed) {
            return Err(Error::InvalidInput("restore cancelled".into()));
        }
        let node = &nodes[i];
        let path = &paths[i];
        *opts.progress.current.lock() = manifest.path_of(i);
        match node.kind {
            NodeKind::Dir => {
                match fs::create_dir(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => {}
                    Err(e) => return Err(Error::io(path, e)),
                }
                stats.dirs += 1;
            }
            NodeKind::Symlink => {
                if opts.overwrite {
                    let _ = fs::remove_file(path);
                }
                make_symlink(&node.target, path)?;
                set_owner(path, node, true);
                let t = filetime::FileTime::from_unix_time(node.mtime_sec, node.mtime_nsec);
                let _ = filetime::set_symlink_file_times(path, t, t);
                stats.symlinks += 1;
            }
            NodeKind::File => {
                restore_file(repo, manifest, i, path, opts)?;
                stats.files += 1;
                stats.bytes += node.size;
                opts.progress.files_done.fetch_add(1, Ordering::Relaxed);
            }
            // `Manifest::validate` refuses these on load.
            NodeKind::Fifo | NodeKind::Socket | NodeKind::CharDevice | NodeKind::BlockDevice => {
                return Err(Error::InvalidInput(format!(
                    "{}: a {:?} cannot be restored",
                    manifest.path_of(i),
                    node.kind
                )));
            }
        }
    }
    // Directory metadata last, deepest first, so adding entries does not
    // bump the restored mtimes.
    for i in (1..nodes.len()).rev() {
        if chosen[i] && nodes[i].kind == NodeKind::Dir {
            set_metadata(&paths[i], &nodes[i])?;
        }
    }
    Ok(stats)
}

fn restore_file(
    repo: &Repository,
    manifest: &Manifest,
    i: usize,
    path: &Path,
    opts: &RestoreOptions,
) -> Result<()> {
    let node = &manifest.nodes[i];
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let partial = path.with_file_name(format!(".{name}.flr-partial"));
    let result = (|| -> Result<()> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial)
            .map_err(|e| Error::io(&partial, e))?;
        let chunks = node.content.chunks(node.size);
        for batch in chunks.chunks(RESTORE_BATCH) {
            if opts.cancel.load(Ordering::Relaxed) {
                return Err(Error::InvalidInput("restore cancelled".into()));
            }
            let decoded: Vec<Result<Option<Vec<u8>>>> = batch
                .par_iter()
                .map(|(id, _, _)| id.map(|id| repo.read_chunk(&id)).transpose())
                .collect();
            for ((_, offset, len), data) in batch.iter().zip(decoded) {
                let data = data.map_err(|e| with_file(e, manifest, i, *offset))?;
                if let Some(data) = data {
                    write_at(&file, &data, *offset).map_err(|e| Error::io(&partial, e))?;
                }
                opts.progress
                    .read_bytes
                    .fetch_add(*len as u64, Ordering::Relaxed);
            }
        }
        // Holes at the end are made by the length, not by writing zeros.
        file.set_len(node.size)
            .map_err(|e| Error::io(&partial, e))?;
        file.sync_all().map_err(|e| Error::io(&partial, e))?;
        drop(file);
        set_metadata(&partial, node)?;
        fs::rename(&partial, path).map_err(|e| Error::io(path, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&partial);
    }
    result
}

fn with_file(e: Error, manifest: &Manifest, i: usize, offset: u64) -> Error {
    match e {
        Error::CorruptChunk { id, pack, why } => Error::CorruptChunk {
            id,
            pack,
            why: format!(
                "{why} (restore point {}, file {}, offset {offset})",
                manifest.full_name(),
                manifest.path_of(i)
            ),
        },
        Error::Malformed { what, why } => Error::Malformed {
            what,
            why: format!(
                "{why} (restoring file {} of {}, offset {offset})",
                manifest.path_of(i),
                manifest.full_name()
            ),
        },
        other => other,
    }
}

#[cfg(unix)]
pub(crate) fn write_at(file: &File, data: &[u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(data, offset)
}

#[cfg(windows)]
pub(crate) fn write_at(file: &File, mut data: &[u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !data.is_empty() {
        let n = file.seek_write(data, offset)?;
        data = &data[n..];
        offset += n as u64;
    }
    Ok(())
}

#[cfg(unix)]
fn make_symlink(target: &[u8], path: &Path) -> Result<()> {
    std::os::unix::fs::symlink(os_path(target), path).map_err(|e| Error::io(path, e))
}

#[cfg(not(unix))]
fn make_symlink(target: &[u8], path: &Path) -> Result<()> {
    let _ = target;
    Err(Error::InvalidInput(format!(
        "{}: symlinks are not restored on this OS",
        path.display()
    )))
}

/// Sets owner (best effort: only root may give files away), mode, mtime.
fn set_metadata(path: &Path, node: &Node) -> Result<()> {
    set_owner(path, node, false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(node.mode))
            .map_err(|e| Error::io(path, e))?;
    }
    let t = filetime::FileTime::from_unix_time(node.mtime_sec, node.mtime_nsec);
    filetime::set_file_times(path, t, t).map_err(|e| Error::io(path, e))
}

#[cfg(unix)]
fn set_owner(path: &Path, node: &Node, symlink: bool) {
    let r = if symlink {
        std::os::unix::fs::lchown(path, Some(node.uid), Some(node.gid))
    } else {
        std::os::unix::fs::chown(path, Some(node.uid), Some(node.gid))
    };
    // EPERM for non-root users is expected: files then belong to them.
    let _ = r;
}

#[cfg(not(unix))]
fn set_owner(_path: &Path, _node: &Node, _symlink: bool) {}
