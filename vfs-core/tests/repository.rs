//! In-process tests of the repository against the in-memory store: any
//! bytes round-trip through every chunker and the store, reads through the
//! filesystem model match the source at any offset, damage is detected.

use std::sync::Arc;

use proptest::prelude::*;
use vfs_core::backup::{backup, BackupOptions, Source, StdinSource};
use vfs_core::chunker::ChunkerKind;
use vfs_core::fs::{FsError, FsOptions, RepoFs};
use vfs_core::manifest::Manifest;
use vfs_core::repo::Repository;
use vfs_core::store::{MemoryStore, ObjectStore};
use vfs_core::Error;

fn new_repo(password: Option<&[u8]>) -> (Arc<MemoryStore>, Repository) {
    let store = Arc::new(MemoryStore::new());
    Repository::init(store.as_ref(), password).unwrap();
    let pw = password.map(|p| p.to_vec());
    let repo = Repository::open(store.clone(), move || Ok(pw.unwrap())).unwrap();
    (store, repo)
}

fn backup_bytes(
    repo: &Repository,
    job: &str,
    name: &str,
    data: Vec<u8>,
    chunker: Option<ChunkerKind>,
) -> Manifest {
    let source = Source::Stream(StdinSource {
        name: name.into(),
        reader: Box::new(std::io::Cursor::new(data)),
        mode: 0o644,
        uid: 0,
        gid: 0,
    });
    let opts = BackupOptions {
        job: job.into(),
        chunker,
        hostname: "test".into(),
        progress: Default::default(),
    };
    backup(repo, source, &opts).unwrap()
}

fn read_back(repo: &Repository, m: &Manifest) -> Vec<u8> {
    let node = &m.nodes[1];
    let mut out = Vec::new();
    for (id, _, len) in node.content.chunks(node.size) {
        match id {
            Some(id) => out.extend(repo.read_chunk(&id).unwrap()),
            None => out.resize(out.len() + len as usize, 0),
        }
    }
    out
}

fn mount_model(repo: Repository) -> Arc<RepoFs> {
    RepoFs::new(
        Arc::new(repo),
        FsOptions {
            cache_bytes: 1 << 20,
            readahead_threads: 1,
            uid: 0,
            gid: 0,
            filter: Default::default(),
        },
    )
    .unwrap()
}

/// Walks root -> job -> restore point -> file and opens the file.
fn open_file(fs: &RepoFs, job: &str, name: &str) -> (u64, u64) {
    let job_attr = fs.lookup(vfs_core::fs::ROOT_INO, job.as_bytes()).unwrap();
    let rps = fs.readdir(job_attr.ino).unwrap();
    let rp = rps.iter().find(|e| e.name != b"latest").unwrap();
    let file = fs.lookup(rp.ino, name.as_bytes()).unwrap();
    (fs.open(file.ino, false).unwrap(), file.size)
}

fn data_strategy() -> impl Strategy<Value = Vec<u8>> {
    // Mixes random bytes, runs of zeros (holes) and repeats (dedup).
    proptest::collection::vec(
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..20_000),
            (0usize..40_000).prop_map(|n| vec![0u8; n]),
            (any::<u8>(), 0usize..30_000).prop_map(|(b, n)| vec![b; n]),
        ],
        0..12,
    )
    .prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn any_bytes_round_trip_through_each_chunker(data in data_strategy()) {
        let (_, repo) = new_repo(None);
        for chunker in [ChunkerKind::Fixed(4096), ChunkerKind::Fixed(1000), ChunkerKind::default_cdc(),
                        ChunkerKind::Cdc { min: 512, avg: 2048, max: 8192 }] {
            let m = backup_bytes(&repo, "p", "f", data.clone(), Some(chunker));
            prop_assert_eq!(m.nodes[1].size, data.len() as u64);
            prop_assert_eq!(read_back(&repo, &m), data.clone());
        }
    }

    #[test]
    fn reads_through_the_model_match_at_any_offset(data in data_strategy(),
                                                    reads in proptest::collection::vec((any::<u32>(), 0u32..70_000), 1..30)) {
        let (_, repo) = new_repo(None);
        backup_bytes(&repo, "m", "file.bin", data.clone(), Some(ChunkerKind::Cdc { min: 512, avg: 2048, max: 8192 }));
        backup_bytes(&repo, "n", "file.bin", data.clone(), Some(ChunkerKind::Fixed(4096)));
        let fs = mount_model(repo);
        for job in ["m", "n"] {
            let (fh, size) = open_file(&fs, job, "file.bin");
            prop_assert_eq!(size, data.len() as u64);
            for (off, len) in &reads {
                let off = if data.is_empty() { *off as u64 } else { *off as u64 % (data.len() as u64 + 10) };
                let got = fs.read(fh, off, *len).unwrap();
                let s = (off as usize).min(data.len());
                let e = (s + *len as usize).min(data.len());
                prop_assert_eq!(&got[..], &data[s..e]);
            }
            fs.release(fh);
        }
    }
}

#[test]
fn unchanged_data_adds_almost_nothing() {
    let (_, repo) = new_repo(None);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let data: Vec<u8> = (0..3_000_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let first = backup_bytes(&repo, "j", "db", data.clone(), None);
    let second = backup_bytes(&repo, "j", "db", data, None);
    assert!(first.stats.new_chunk_bytes > 1_000_000);
    assert_eq!(second.stats.new_chunks, 0);
    // Only the manifest is new.
    assert!(second.stats.added_bytes() < 20_000, "{:?}", second.stats);
}

#[test]
fn encrypted_repository_round_trips_and_refuses_wrong_password() {
    let (store, repo) = new_repo(Some(b"correct horse"));
    let data = b"secret database page ".repeat(10_000);
    let m = backup_bytes(&repo, "enc", "db", data.clone(), None);
    assert_eq!(read_back(&repo, &m), data);
    // No plaintext anywhere in the store.
    for key in store.list("").unwrap() {
        let bytes = store.get(&key).unwrap();
        assert!(
            !bytes.windows(21).any(|w| w == b"secret database page "),
            "{key} leaks plaintext"
        );
    }
    match Repository::open(store.clone(), || Ok(b"wrong".to_vec())) {
        Err(Error::WrongPassword(_)) => {}
        Err(e) => panic!("expected wrong password, got {e}"),
        Ok(_) => panic!("wrong password accepted"),
    }
}

#[test]
fn a_damaged_chunk_fails_its_read_and_only_its_read() {
    let (store, repo) = new_repo(None);
    let data: Vec<u8> = (0..400_000u32)
        .map(|i| (i * 7 % 251) as u8 ^ (i >> 9) as u8)
        .collect();
    let m = backup_bytes(
        &repo,
        "c",
        "f",
        data.clone(),
        Some(ChunkerKind::Fixed(4096)),
    );
    let pack = store.list("packs/").unwrap().pop().unwrap();
    // Damage one byte in the middle of the frame holding the third page.
    let victim = match &m.nodes[1].content {
        vfs_core::manifest::Content::Fixed { chunks, .. } => chunks[2].unwrap(),
        _ => unreachable!(),
    };
    let (loc, _) = repo.locate(&victim).unwrap();
    store.tamper(&pack, |b| {
        b[loc.offset as usize + loc.stored_len as usize / 2] ^= 0x55
    });

    // Every page reads its exact bytes or fails as corrupt, never wrong
    // bytes; some page of the damaged frame fails; no page outside it does.
    let index = repo.index().read().chunks.clone();
    let fs = mount_model(repo);
    let (fh, _) = open_file(&fs, "c", "f");
    let pages = match &m.nodes[1].content {
        vfs_core::manifest::Content::Fixed { chunks, .. } => chunks.clone(),
        _ => unreachable!(),
    };
    let mut failed = 0;
    for (k, id) in pages.iter().enumerate() {
        let in_damaged_frame = id.is_some_and(|id| index[&id].offset == loc.offset);
        let start = k * 4096;
        let end = (start + 4096).min(data.len());
        match fs.read(fh, start as u64, 4096) {
            Ok(bytes) => assert_eq!(&bytes[..], &data[start..end], "page {k}"),
            Err(FsError::Corrupt(_)) => {
                assert!(
                    in_damaged_frame,
                    "page {k} failed outside the damaged frame"
                );
                failed += 1;
            }
            Err(e) => panic!("page {k}: unexpected {e}"),
        }
    }
    assert!(failed > 0, "the damage went unnoticed");
    assert_eq!(
        fs.counters
            .chunk_errors
            .load(std::sync::atomic::Ordering::Relaxed),
        failed
    );
    assert_eq!(
        fs.open(fs.lookup(vfs_core::fs::ROOT_INO, b"c").unwrap().ino, true),
        Err(FsError::ReadOnly)
    );
}

#[test]
fn garbled_metadata_is_refused_with_its_name() {
    let (store, repo) = new_repo(None);
    backup_bytes(&repo, "g", "f", vec![1u8; 100_000], None);
    let rp = repo.list_restore_points(None).unwrap().pop().unwrap();
    store.tamper(&rp.key(), |b| {
        let n = b.len();
        b[n / 2] ^= 1
    });
    let err = repo.load_manifest(&rp).unwrap_err().to_string();
    assert!(
        err.contains(&rp.to_string()) && err.contains("checksum"),
        "{err}"
    );

    let idx = store.list("index/").unwrap().pop().unwrap();
    store.tamper(&idx, |b| b.truncate(b.len() - 3));
    let err = repo.reload_index().unwrap_err().to_string();
    assert!(
        err.contains(&idx) && err.contains("truncated") || err.contains("length"),
        "{err}"
    );
}
