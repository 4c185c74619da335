//! A pack and the chunks in it as readers get them: the pack header
//! (`format::check_pack_header`), its entries through the index file
//! checks (`Repository::read_index_file`), then every entry's frame read
//! from the pack and decoded (`read_raw_at`, `decode_frame`) and its chunk
//! taken out (`chunk_in_frame`), under the entry's id and under the id of
//! the bytes it points at.
//!
//! Input: an entry count byte (at most [`MAX_ENTRIES`] are used), that many
//! entries of 21 bytes (offset, stored length, raw length, offset in the
//! frame, frame length, all u32 little-endian; flags), then the pack.

use vfs_core::format::{self, MAX_CHUNK_SIZE};
use vfs_core::ids::{ChunkId, PackId};
use vfs_core::repo::{index_key, pack_key, IndexEntry, IndexFile};
use vfs_core::store::ObjectStore;

use crate::{alloc, repos};

pub const MAX_ENTRIES: usize = 16;
pub const ENTRY_LEN: usize = 21;

/// Bound on bytes live while decoding one frame: its plaintext, allocated
/// at the length the index gives (at most [`MAX_CHUNK_SIZE`]) before
/// decompressing, twice (the frame and the chunk copied out of it); the
/// stored bytes fetched from the pack (at most the input); zstd's context.
const PER_BYTE: usize = 2;
const FIXED: usize = 2 * MAX_CHUNK_SIZE as usize + (1 << 20);

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().expect("four bytes"))
}

/// Entries and pack bytes from an input.
pub fn parse(data: &[u8]) -> Option<(Vec<IndexEntry>, &[u8])> {
    let (&n, rest) = data.split_first()?;
    let n = (n as usize).min(MAX_ENTRIES);
    if rest.len() < n * ENTRY_LEN {
        return None;
    }
    let (table, pack) = rest.split_at(n * ENTRY_LEN);
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
    Some((entries, pack))
}

/// The input for `entries` and `pack`, for seeds.
pub fn input(entries: &[IndexEntry], pack: &[u8]) -> Vec<u8> {
    let mut out = vec![entries.len() as u8];
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
    out.extend_from_slice(pack);
    out
}

pub fn check(data: &[u8]) {
    let Some((entries, pack)) = parse(data) else {
        return;
    };
    if format::check_pack_header("fuzz", pack).is_err() {
        return;
    }
    let fixture = repos::plain();
    let (store, repo) = (&fixture.store, &fixture.repo);
    let pack_id = PackId(*blake3::hash(pack).as_bytes());
    let index = IndexFile {
        pack: pack_id,
        pack_len: pack.len() as u64,
        entries,
    };
    let idx_key = index_key(&pack_id);
    store
        .put(&idx_key, &repo.encode_meta(format::INDEX_MAGIC, &index))
        .expect("memory store");
    store.put(&pack_key(&pack_id), pack).expect("memory store");
    // Entries the index file checks refuse are never read.
    if let Ok(file) = repo.read_index_file(&idx_key) {
        for e in &file.entries {
            let (_, peak) = alloc::measure(|| read_entry(repo, &pack_id, e));
            alloc::assert_within("frame", peak, pack.len(), PER_BYTE, FIXED);
        }
    }
    store.delete(&idx_key).expect("memory store");
    store.delete(&pack_key(&pack_id)).expect("memory store");
}

fn read_entry(repo: &vfs_core::repo::Repository, pack: &PackId, e: &IndexEntry) {
    let loc = vfs_core::repo::ChunkLoc {
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
