//! Many readers and the readahead workers on one mount model, with a cache
//! too small to hold the file, so that reads keep meeting frames that
//! someone else is fetching. Once, a large read checked its chunks on the
//! decode pool and a pool thread waited there for a frame a readahead job
//! was fetching, while that fetch needed a pool thread to decode: with both
//! pool threads waiting, the mount hung for good (seen as a writable-session
//! test that never ended). Here the pool has two threads, as on the
//! project's two-core machines, and the readers must finish.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use vfs_core::backup::{backup, BackupOptions, Source, StdinSource};
use vfs_core::chunker::ChunkerKind;
use vfs_core::fs::{FsOptions, RepoFs, ROOT_INO};
use vfs_core::repo::Repository;
use vfs_core::store::MemoryStore;

const FILE_LEN: usize = 12 << 20;
const READERS: usize = 6;
const PASSES: usize = 3;

/// Compressible but not trivially so: pages of a few repeated words with a
/// counter, so frames hold many pages and decoding costs real work.
fn page_data(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut n = 0u64;
    while out.len() < len {
        out.extend_from_slice(format!("row {n:012} of the sample table; ").as_bytes());
        n = n
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407)
            >> 20;
    }
    out.truncate(len);
    out
}

#[test]
fn readers_and_readahead_sharing_fetches_never_hang() {
    // Two decode threads, whatever the machine has: the hang needed every
    // pool thread blocked. Ignored if another test set the pool first
    // (this file has one test).
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build_global();

    let store = Arc::new(MemoryStore::new());
    Repository::init(store.as_ref(), None).unwrap();
    let repo = Repository::open(store, || unreachable!("not encrypted")).unwrap();
    let data = Arc::new(page_data(FILE_LEN));
    let source = Source::Stream(StdinSource {
        name: "table.db".into(),
        reader: Box::new(std::io::Cursor::new(data.to_vec())),
        mode: 0o644,
        uid: 0,
        gid: 0,
    });
    let opts = BackupOptions {
        job: "db".into(),
        chunker: Some(ChunkerKind::Fixed(4096)),
        hostname: "test".into(),
        progress: Default::default(),
    };
    backup(&repo, source, &opts).unwrap();

    let fs = RepoFs::new(
        Arc::new(repo),
        FsOptions {
            // A quarter of the file: frames are evicted and fetched again.
            cache_bytes: FILE_LEN / 4,
            disk_cache: None,
            readahead_threads: 2,
            uid: 0,
            gid: 0,
            filter: Default::default(),
        },
    )
    .unwrap();
    let job = fs.lookup(ROOT_INO, b"db").unwrap();
    let rp = fs
        .readdir(job.ino)
        .unwrap()
        .into_iter()
        .find(|e| e.name != b"latest")
        .unwrap();
    let file = fs.lookup(rp.ino, b"table.db").unwrap();

    let (done_tx, done_rx) = mpsc::channel();
    for reader in 0..READERS {
        let (fs, data, done) = (fs.clone(), data.clone(), done_tx.clone());
        let ino = file.ino;
        thread::spawn(move || {
            // Readers read 1 MiB at a time (the kernel's largest FUSE
            // read, many frames), sequentially, from two starting points
            // half a read apart, so each read meets frames that another
            // reader or a readahead job has claimed.
            let step = 1 << 20;
            let start = reader % 2 * step / 2;
            for _ in 0..PASSES {
                let fh = fs.open(ino, false).unwrap();
                let mut off = start;
                for _ in 0..FILE_LEN / step - 1 {
                    let got = fs.read(fh, off as u64, step as u32).unwrap();
                    assert!(
                        got[..] == data[off..off + step],
                        "reader {reader}: wrong bytes at {off}"
                    );
                    off += step;
                }
                fs.release(fh);
            }
            done.send(reader).unwrap();
        });
    }
    drop(done_tx);
    for _ in 0..READERS {
        // Generous: all of it takes well under a second on two cores. A
        // reader that panics never sends: once the others are done, the
        // wait ends with every sender gone.
        match done_rx.recv_timeout(Duration::from_secs(120)) {
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("readers hung: a read waits for a fetch that can never finish")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("a reader failed"),
        }
    }
}
