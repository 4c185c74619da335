//! An index file as a repository reads it: `Repository::read_index_file`
//! (envelope, opening, bounded decompression, postcard, the name and
//! bounds checks), then added to an in-memory index.

use vfs_core::format;
use vfs_core::repo::{index_key, Index, IndexFile};
use vfs_core::store::ObjectStore;

use crate::{alloc, meta};

pub fn check(data: &[u8]) {
    let Some(input) = meta::parse(format::INDEX_MAGIC, data) else {
        return;
    };
    let (store, repo) = (&input.fixture.store, &input.fixture.repo);
    let Some(plain) = meta::plain_len(repo, format::INDEX_MAGIC, &input.file) else {
        return;
    };
    // Stored under the name it gives itself, so a well-formed file gets
    // past the name check to the bounds checks.
    let key = match repo.decode_meta::<IndexFile>("fuzz", format::INDEX_MAGIC, &input.file) {
        Ok(file) => index_key(&file.pack),
        Err(_) => "index/fuzz.idx".to_string(),
    };
    store.put(&key, &input.file).expect("memory store");
    let (result, peak) = alloc::measure(|| {
        let file = repo.read_index_file(&key)?;
        let mut index = Index::default();
        index.add_pack(&file);
        Ok::<_, vfs_core::Error>((file, index))
    });
    store.delete(&key).expect("memory store");
    alloc::assert_within(
        "index file",
        peak,
        input.file.len() + plain,
        meta::PER_BYTE,
        meta::FIXED,
    );
    let Ok((file, index)) = result else {
        return;
    };
    assert_eq!(index_key(&file.pack), key);
    assert!(index.in_memory_len() <= file.entries.len());
    for e in &file.entries {
        // What readers rely on (chunk_in_frame, decode_frame, get_range).
        assert!(e.raw_len <= format::MAX_CHUNK_SIZE);
        assert!(e.frame_raw_len <= format::MAX_CHUNK_SIZE);
        assert!(e.frame_offset as u64 + e.raw_len as u64 <= e.frame_raw_len as u64);
        assert!(e.offset as u64 + e.stored_len as u64 <= file.pack_len);
    }
}
