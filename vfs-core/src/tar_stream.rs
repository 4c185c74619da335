//! Unpacking a tar stream into a restore point as it arrives.
//!
//! `pg_basebackup -Ft -D -` and other tools write their backup as one tar
//! stream; each member becomes a node of the restore point, and each file
//! is chunked on the way by its own name and first bytes (PostgreSQL
//! relation files by their 8 KiB pages), so the next backup dedups page by
//! page. Regular files, directories, symlinks, hard links (stored as a
//! second file sharing every chunk), long names (GNU and pax) and GNU
//! sparse members are read; devices and FIFOs are skipped with a warning,
//! as restore points hold none.
//!
//! A stream must end with tar's end-of-archive block: a stream that stops
//! at a member boundary without it was cut, and is refused like one that
//! stops inside a member. Member names that would leave the restore point
//! (absolute, or with `..`) are refused. A tar without an entry for its
//! top directory gives the root the owner of its first member and the mode
//! of its first directory. Every error names the stream and
//! the byte offset where it was found; the caller commits nothing.

use std::cell::Cell;
use std::io::Read;
use std::ops::Deref;
use std::sync::atomic::Ordering;

use crate::backup::Progress;
use crate::error::{Error, Result};
use crate::ingest::{add_stats, FileWriter, MetaShare, Mover, TreeBuilder, BATCH_BYTES};
use crate::manifest::{BackupStats, Content, Node, NodeKind};
use crate::repo::Repository;

/// Counts the bytes the tar reader takes, and whether it met the end of
/// the stream (a clean end-of-archive block is read without meeting it).
struct Counted<'c, T> {
    inner: T,
    pos: &'c Cell<u64>,
    hit_eof: &'c Cell<bool>,
}

impl<T: Read> Read for Counted<'_, T> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.hit_eof.set(true);
        }
        self.pos.set(self.pos.get() + n as u64);
        Ok(n)
    }
}

/// Reads the tar stream `reader` into `tree`, storing file data through
/// `mover`; `what` names the stream in errors (a device, "standard
/// input"). Returns the data's counts (files and directories are counted
/// from the tree at commit).
pub fn ingest_tar<R: Deref<Target = Repository>>(
    mover: &Mover<R>,
    reader: impl Read,
    tree: &mut TreeBuilder,
    share: &MetaShare,
    what: &str,
    progress: &Progress,
) -> Result<BackupStats> {
    let pos = Cell::new(0u64);
    let hit_eof = Cell::new(false);
    let mut counted = Counted {
        inner: reader,
        pos: &pos,
        hit_eof: &hit_eof,
    };
    let mut stats = BackupStats::default();
    let mut member = String::new();
    // A tar without an entry for its top directory (pg_basebackup's) gives
    // the root the owner of its first member and the mode of its first
    // directory, so a data directory restored or mounted from the root
    // has the owner and mode its server insists on.
    let mut root_entry = false;
    let mut first_owner: Option<(u32, u32)> = None;
    let mut first_dir_mode: Option<u32> = None;
    let outcome = (|| -> Result<()> {
        let mut archive = ::tar::Archive::new(&mut counted);
        let entries = archive
            .entries()
            .map_err(|e| Error::InvalidInput(e.to_string()))?;
        let mut buf = vec![0u8; 1 << 20];
        for entry in entries {
            let mut entry = entry.map_err(|e| Error::InvalidInput(e.to_string()))?;
            let mut path = entry.path_bytes().into_owned();
            member = String::from_utf8_lossy(&path).into_owned();
            // A name leaving the restore point is refused before its data.
            *progress.current.lock() = member.clone();
            let header = entry.header();
            let bad = |e: std::io::Error| Error::InvalidInput(e.to_string());
            let mut node = Node {
                parent: 0,
                name: Vec::new(),
                kind: NodeKind::File,
                mode: header.mode().map_err(bad)? & 0o7777,
                uid: header.uid().map_err(bad)? as u32,
                gid: header.gid().map_err(bad)? as u32,
                mtime_sec: header.mtime().map_err(bad)? as i64,
                mtime_nsec: 0,
                size: 0,
                target: Vec::new(),
                content: Content::Empty,
            };
            // pax keeps the mtime's fraction, and GNU tar's sparse files
            // (formats 0.1 and 1.0) their real name, size and map.
            let mut sparse = PaxSparse::default();
            if let Ok(Some(exts)) = entry.pax_extensions() {
                for ext in exts.flatten() {
                    let v = ext.value_bytes();
                    match ext.key_bytes() {
                        b"mtime" => {
                            if let Some(t) = parse_pax_time(v) {
                                (node.mtime_sec, node.mtime_nsec) = t;
                            }
                        }
                        b"GNU.sparse.name" => sparse.name = Some(v.to_vec()),
                        b"GNU.sparse.realsize" | b"GNU.sparse.size" => {
                            sparse.realsize = Some(parse_decimal(v)?)
                        }
                        b"GNU.sparse.major" => sparse.major = Some(parse_decimal(v)?),
                        b"GNU.sparse.map" => {
                            sparse.map = Some(
                                v.split(|&b| b == b',')
                                    .map(parse_decimal)
                                    .collect::<Result<_>>()?,
                            )
                        }
                        _ => {}
                    }
                }
            }
            if let Some(name) = sparse.name.take() {
                path = name;
                member = String::from_utf8_lossy(&path).into_owned();
                crate::ingest::path_components(&path)?;
            }
            let kind = entry.header().entry_type();
            if crate::ingest::path_components(&path)?.is_empty() {
                root_entry = true;
            }
            first_owner.get_or_insert((node.uid, node.gid));
            if kind == ::tar::EntryType::Directory {
                first_dir_mode.get_or_insert(node.mode);
            }
            use ::tar::EntryType as T;
            match kind {
                T::Directory => {
                    node.kind = NodeKind::Dir;
                    tree.put(&path, node)?;
                }
                T::Symlink => {
                    node.kind = NodeKind::Symlink;
                    node.target = entry
                        .link_name_bytes()
                        .map(|l| l.into_owned())
                        .unwrap_or_default();
                    if node.target.is_empty() {
                        return Err(Error::InvalidInput("a symlink without a target".into()));
                    }
                    node.size = node.target.len() as u64;
                    tree.put(&path, node)?;
                }
                T::Link => {
                    let target = entry
                        .link_name_bytes()
                        .map(|l| l.into_owned())
                        .unwrap_or_default();
                    let shown = String::from_utf8_lossy(&target).into_owned();
                    let Some(i) = tree.lookup(&target)? else {
                        return Err(Error::InvalidInput(format!(
                            "a hard link to {shown:?}, which is not earlier in the archive"
                        )));
                    };
                    let linked = tree.nodes()[i].clone();
                    if linked.kind != NodeKind::File {
                        return Err(Error::InvalidInput(format!(
                            "a hard link to {shown:?}, which is not a file"
                        )));
                    }
                    add_stats(
                        &mut stats,
                        &BackupStats {
                            logical_bytes: linked.size,
                            ..Default::default()
                        },
                    );
                    tree.put(&path, linked)?;
                }
                T::Regular | T::Continuous | T::GNUSparse => {
                    let base = path.rsplit(|&b| b == b'/').find(|p| !p.is_empty());
                    let mut w = FileWriter::new(base.unwrap_or(&path), None, BATCH_BYTES)
                        .with_share(share.clone());
                    // The data: one run from offset 0, or a sparse map's
                    // runs (1.0 keeps the map in front of the data).
                    let runs = match (sparse.realsize, sparse.major, sparse.map.take()) {
                        (None, _, _) => vec![(0, u64::MAX)],
                        (Some(_), Some(1), _) => read_sparse_map(&mut entry)?,
                        (Some(_), _, Some(map)) => pairs(map)?,
                        (Some(_), _, None) => {
                            return Err(Error::InvalidInput(
                                "a GNU sparse member without its map".into(),
                            ))
                        }
                    };
                    for (offset, len) in runs {
                        let mut at = offset;
                        let end = offset.saturating_add(len);
                        while at < end {
                            let want = (end - at).min(buf.len() as u64) as usize;
                            let n = match entry.read(&mut buf[..want]) {
                                Ok(0) if len == u64::MAX => break,
                                Ok(0) => {
                                    return Err(Error::InvalidInput(
                                        "the sparse member's data is shorter than its map".into(),
                                    ))
                                }
                                Ok(n) => n,
                                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                                Err(e) => return Err(Error::InvalidInput(e.to_string())),
                            };
                            w.write_at(mover, at, &buf[..n])?;
                            at += n as u64;
                            progress.read_bytes.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                    if let Some(real) = sparse.realsize {
                        if real < w.size() {
                            return Err(Error::InvalidInput(format!(
                                "the sparse map reaches past the real size {real}"
                            )));
                        }
                        w.set_len(mover, real)?;
                    }
                    let (content, size, file_stats) = w.finish(mover)?;
                    add_stats(&mut stats, &file_stats);
                    node.content = content;
                    node.size = size;
                    tree.put(&path, node)?;
                    progress.files_done.fetch_add(1, Ordering::Relaxed);
                }
                other => {
                    tracing::warn!(
                        "{what}: {member}: a {other:?} member is skipped: restore points hold files, directories and symlinks"
                    );
                }
            }
        }
        Ok(())
    })();
    let at = pos.get();
    let fail = |why: String| {
        let member = if member.is_empty() {
            String::new()
        } else {
            format!(" (in or after member {member:?})")
        };
        Error::InvalidInput(format!("{what}: byte {at}{member}: {why}"))
    };
    match outcome {
        Err(Error::InvalidInput(why)) => {
            let why = if hit_eof.get() {
                format!("the tar stream ends early: {why}")
            } else {
                why
            };
            return Err(fail(why));
        }
        Err(e) => return Err(fail(e.to_string())),
        Ok(()) if hit_eof.get() => {
            return Err(fail(
                "the tar stream ends without its end-of-archive block: it was cut".into(),
            ))
        }
        Ok(()) => {}
    }
    if !root_entry {
        let root = tree.node_mut(0);
        if let Some((uid, gid)) = first_owner {
            (root.uid, root.gid) = (uid, gid);
        }
        if let Some(mode) = first_dir_mode {
            root.mode = mode;
        }
    }
    // The writer may pad after the end-of-archive blocks (to a record of
    // 10 KiB); read it, so that it does not meet a closed pipe. The
    // stream's own end comes only now, and with it a failure its source
    // reports there (a writer that did not exit cleanly).
    if let Err(e) = std::io::copy(&mut counted, &mut std::io::sink()) {
        let at = pos.get();
        return Err(Error::InvalidInput(format!(
            "{what}: byte {at}, after the end-of-archive block: {e}"
        )));
    }
    Ok(stats)
}

/// GNU tar's sparse-file records in a pax header.
#[derive(Default)]
struct PaxSparse {
    name: Option<Vec<u8>>,
    realsize: Option<u64>,
    major: Option<u64>,
    map: Option<Vec<u64>>,
}

fn parse_decimal(v: &[u8]) -> Result<u64> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| {
            Error::InvalidInput(format!(
                "{:?} is not a number in a sparse-file record",
                String::from_utf8_lossy(v)
            ))
        })
}

/// (offset, length) pairs from a flat list; the runs must go forward.
fn pairs(flat: Vec<u64>) -> Result<Vec<(u64, u64)>> {
    if !flat.len().is_multiple_of(2) {
        return Err(Error::InvalidInput("a sparse map with an odd count".into()));
    }
    let runs: Vec<(u64, u64)> = flat.chunks(2).map(|p| (p[0], p[1])).collect();
    let mut end = 0u64;
    for &(off, len) in &runs {
        if off < end {
            return Err(Error::InvalidInput(
                "a sparse map whose runs overlap".into(),
            ));
        }
        end = off
            .checked_add(len)
            .ok_or_else(|| Error::InvalidInput("a sparse run past 2^64".into()))?;
    }
    Ok(runs)
}

/// Format 1.0's map at the front of the member's data: decimal numbers,
/// one per line (a count, then offset and length per run), padded to a
/// 512-byte block.
fn read_sparse_map(data: &mut impl Read) -> Result<Vec<(u64, u64)>> {
    let mut consumed = 0usize;
    let mut next_number = |data: &mut dyn Read| -> Result<u64> {
        let mut digits = Vec::new();
        loop {
            let mut b = [0u8];
            let n = data
                .read(&mut b)
                .map_err(|e| Error::InvalidInput(e.to_string()))?;
            consumed += 1;
            match (n, b[0]) {
                (0, _) => return Err(Error::InvalidInput("the sparse map is cut".into())),
                (_, b'\n') => return parse_decimal(&digits),
                (_, d) if d.is_ascii_digit() && digits.len() < 20 => digits.push(d),
                _ => return Err(Error::InvalidInput("a malformed sparse map".into())),
            }
        }
    };
    let count = next_number(data)?;
    // Each run takes at least 4 bytes of map; a huge count is malformed,
    // and is not allocated for.
    let mut flat = Vec::new();
    for _ in 0..count.saturating_mul(2) {
        flat.push(next_number(data)?);
    }
    let pad = consumed.div_ceil(512) * 512 - consumed;
    std::io::copy(&mut data.take(pad as u64), &mut std::io::sink())
        .map_err(|e| Error::InvalidInput(e.to_string()))?;
    pairs(flat)
}

/// A pax time, `SECONDS[.FRACTION]` (seconds may be negative): seconds and
/// nanoseconds, the fraction rounded down to nanoseconds.
fn parse_pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let v = std::str::from_utf8(v).ok()?;
    let (secs, frac) = v.split_once('.').unwrap_or((v, ""));
    let secs: i64 = secs.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    let nsec: u32 = digits.parse().ok()?;
    if secs < 0 && nsec > 0 {
        // -1.5 is 1.5 s before the epoch: -2 s + 0.5 s.
        return Some((secs - 1, 1_000_000_000 - nsec));
    }
    Some((secs, nsec))
}

#[cfg(test)]
mod tests {
    #[test]
    fn pax_times_parse() {
        assert_eq!(
            super::parse_pax_time(b"1600000000"),
            Some((1_600_000_000, 0))
        );
        assert_eq!(super::parse_pax_time(b"1.5"), Some((1, 500_000_000)));
        assert_eq!(super::parse_pax_time(b"12.0000000019"), Some((12, 1)));
        assert_eq!(super::parse_pax_time(b"-1.25"), Some((-2, 750_000_000)));
        assert_eq!(super::parse_pax_time(b"x"), None);
    }
}
