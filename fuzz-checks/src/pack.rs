//! A pack as readers take it apart: `Repository::parse_pack` (header,
//! trailer, the pack's own sealed entry table and every entry's bounds),
//! then every entry's frame read from the pack and decoded
//! (`read_raw_at`, `decode_frame`) and its chunk taken out
//! (`chunk_in_frame`), under the entry's id and under the id of the bytes
//! it points at.
//!
//! Input: a mode byte, then by mode bits 0-1:
//! - 0: a whole pack as is;
//! - 1: an entry count byte (at most [`MAX_ENTRIES`] are used), that many
//!   entries of 21 bytes (offset, stored length, raw length, offset in the
//!   frame, frame length, all u32 little-endian; flags), then the frames:
//!   the harness writes header, frames, table and trailer as a backup does;
//! - 2: the frames' length (u16 little-endian), the frames, then the
//!   table's postcard plaintext, which the harness compresses and wraps.

use vfs_core::format::{self, FLAG_ZSTD, MAX_CHUNK_SIZE};
use vfs_core::ids::{ChunkId, PackId};
use vfs_core::repo::{pack_key, ChunkLoc, IndexEntry, PackTable, Repository};
use vfs_core::store::ObjectStore;

use crate::{alloc, meta, repos};

pub const MAX_ENTRIES: usize = 16;
pub const ENTRY_LEN: usize = 21;

/// Bound on bytes live while decoding one frame: its plaintext, allocated
/// at the length the table gives (at most [`MAX_CHUNK_SIZE`]) before
/// decompressing, twice (the frame and the chunk copied out of it); the
/// stored bytes fetched from the pack (at most the input); zstd's context.
const FRAME_PER_BYTE: usize = 2;
const FRAME_FIXED: usize = 2 * MAX_CHUNK_SIZE as usize + (1 << 20);

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().expect("four bytes"))
}

fn entries(data: &[u8]) -> Option<(Vec<IndexEntry>, &[u8])> {
    let (&n, rest) = data.split_first()?;
    let n = (n as usize).min(MAX_ENTRIES);
    if rest.len() < n * ENTRY_LEN {
        return None;
    }
    let (table, frames) = rest.split_at(n * ENTRY_LEN);
    let entries = table
        .chunks(ENTRY_LEN)
        .enumerate()
        .map(|(i, e)| IndexEntry {
            id: ChunkId(*blake3::hash(&[i as u8]).as_bytes()),
            offset: u32_at(e, 0),
            stored_len: u32_at(e, 4),
            raw_len: u32_at(e, 8),
            frame_offset: u32_at(e, 12),
            frame_raw_len: u32_at(e, 16),
            flags: e[20],
        })
        .collect();
    Some((entries, frames))
}

/// A pack of `frames` with `table` (an entry table envelope), as written.
fn assemble(frames: &[u8], table: &[u8]) -> Vec<u8> {
    let mut pack = format::pack_header().to_vec();
    pack.extend_from_slice(frames);
    pack.extend_from_slice(table);
    pack.extend_from_slice(&format::pack_trailer(table.len() as u64));
    pack
}

/// The mode-1 input for `entries` and the frames after the pack header,
/// for seeds.
pub fn input(entries: &[IndexEntry], frames: &[u8]) -> Vec<u8> {
    let mut out = vec![1, entries.len() as u8];
    for e in entries {
        for v in [
            e.offset,
            e.stored_len,
            e.raw_len,
            e.frame_offset,
            e.frame_raw_len,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.push(e.flags);
    }
    out.extend_from_slice(frames);
    out
}

pub fn check(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let fixture = repos::plain();
    let (store, repo) = (&fixture.store, &fixture.repo);
    let (pack, plain) = match mode & 3 {
        0 => (rest.to_vec(), 0),
        1 => {
            let Some((entries, frames)) = entries(rest) else {
                return;
            };
            let table = repo.encode_meta(format::PACK_TABLE_MAGIC, &PackTable { entries });
            (assemble(frames, &table), 0)
        }
        _ => {
            let Some((len, rest)) = rest.split_first_chunk::<2>() else {
                return;
            };
            let len = (u16::from_le_bytes(*len) as usize).min(rest.len());
            let (frames, plain) = rest.split_at(len);
            let Ok(compressed) = zstd::bulk::compress(plain, 1) else {
                return;
            };
            let table = format::seal_envelope(format::PACK_TABLE_MAGIC, FLAG_ZSTD, &compressed);
            (assemble(frames, &table), plain.len())
        }
    };
    let plain = if mode & 3 == 0 {
        // A raw pack's table holds what it holds: worked out by decoding.
        let end = pack.len().saturating_sub(format::PACK_TRAILER_LEN);
        match format::parse_pack_trailer("fuzz", pack.len() as u64, &pack[end..]) {
            Ok((start, len)) => {
                let table = &pack[start as usize..(start + len) as usize];
                match meta::plain_len(repo, format::PACK_TABLE_MAGIC, table) {
                    Some(n) => n,
                    None => return,
                }
            }
            Err(_) => 0,
        }
    } else {
        plain
    };
    let (parsed, peak) = alloc::measure(|| repo.parse_pack("fuzz", &pack));
    alloc::assert_within(
        "pack",
        peak,
        pack.len() + plain,
        meta::PER_BYTE,
        meta::FIXED,
    );
    let Ok(entries) = parsed else {
        return;
    };
    let pack_id = PackId(*blake3::hash(&pack).as_bytes());
    let key = pack_key(&pack_id);
    let _ = store.delete(&key);
    store.put(&key, &pack).expect("memory store");
    for e in entries.iter().take(MAX_ENTRIES) {
        // What readers rely on (decode_frame, chunk_in_frame, get_range).
        assert!(e.raw_len <= MAX_CHUNK_SIZE && e.frame_raw_len <= MAX_CHUNK_SIZE);
        assert!(e.frame_offset as u64 + e.raw_len as u64 <= e.frame_raw_len as u64);
        assert!(e.offset as usize >= format::PACK_HEADER_LEN);
        assert!(e.offset as u64 + e.stored_len as u64 <= pack.len() as u64);
        let (_, peak) = alloc::measure(|| read_entry(repo, &pack_id, e));
        alloc::assert_within("frame", peak, pack.len(), FRAME_PER_BYTE, FRAME_FIXED);
    }
    store.delete(&key).expect("memory store");
}

fn read_entry(repo: &Repository, pack: &PackId, e: &IndexEntry) {
    let loc = ChunkLoc {
        pack: 0,
        offset: e.offset,
        stored_len: e.stored_len,
        raw_len: e.raw_len,
        flags: e.flags,
        frame_offset: e.frame_offset,
        frame_raw_len: e.frame_raw_len,
    };
    let raw = repo
        .read_raw_at(&loc, pack)
        .expect("a checked entry lies inside its pack");
    let Ok(frame) = repo.decode_frame(&e.id, &loc, pack, &raw) else {
        return;
    };
    assert_eq!(frame.len(), e.frame_raw_len as usize);
    let start = e.frame_offset as usize;
    let bytes = &frame[start..start + e.raw_len as usize];
    let real = repo.hasher().id(bytes);
    let as_named = repo.chunk_in_frame(&e.id, &loc, pack, &frame);
    assert_eq!(as_named.is_ok(), real == e.id);
    let chunk = repo
        .chunk_in_frame(&real, &loc, pack, &frame)
        .expect("the chunk under its own id");
    assert_eq!(chunk, bytes);
}
