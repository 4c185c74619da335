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
    mount_shared(Arc::new(repo), 1)
}

/// A mount of a repository other mounts may share.
fn mount_shared(repo: Arc<Repository>, readahead_threads: usize) -> Arc<RepoFs> {
    RepoFs::new(
        repo,
        FsOptions {
            cache_bytes: 1 << 20,
            disk_cache: None,
            readahead_threads,
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
    let pages = match &m.nodes[1].content {
        vfs_core::manifest::Content::Fixed { chunks, .. } => chunks.clone(),
        _ => unreachable!(),
    };
    let offsets: Vec<Option<u32>> = pages
        .iter()
        .map(|id| id.map(|id| repo.index().read().get(&id).unwrap().offset))
        .collect();
    let fs = mount_model(repo);
    let (fh, _) = open_file(&fs, "c", "f");
    let mut failed = 0;
    for (k, offset) in offsets.iter().enumerate() {
        let in_damaged_frame = *offset == Some(loc.offset);
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
    let key = repo.manifest_key(&rp).unwrap().unwrap();
    store.tamper(&key, |b| {
        let n = b.len();
        b[n / 2] ^= 1
    });
    let err = repo.load_manifest(&rp).unwrap_err().to_string();
    assert!(
        err.contains(&rp.to_string()) && err.contains("checksum"),
        "{err}"
    );

    // An index file damaged after this process read it: a reload keeps
    // what it read, and a process opening the repository now refuses it.
    let idx = store.list("index/").unwrap().pop().unwrap();
    store.tamper(&idx, |b| b.truncate(b.len() - 3));
    repo.reload_index().unwrap();
    let err = Repository::open(store.clone(), || Ok(Vec::new()))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(&idx) && err.contains("truncated") || err.contains("length"),
        "{err}"
    );
}

/// Bytes no compressor shrinks, so every frame is stored raw and a pack is
/// the header plus the file's bytes whatever the chunker.
fn pseudo_random(n: usize, mut x: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Backs `data` up twice with two chunkers, reopens the repository from
/// its store and checks both restore points read back and verify clean.
fn two_chunkings_both_survive(data: Vec<u8>, first: ChunkerKind, second: ChunkerKind) {
    let (store, repo) = new_repo(None);
    let a = backup_bytes(&repo, "a", "f", data.clone(), Some(first));
    let b = backup_bytes(&repo, "b", "f", data.clone(), Some(second));
    assert!(a.stats.new_chunks > 0 && b.stats.new_chunks > 0);
    let packs = store.list("packs/").unwrap();
    assert_eq!(packs.len(), 2, "the two layouts must make two packs");
    assert_eq!(store.list("index/").unwrap().len(), 2);
    drop(repo);
    let repo = Repository::open(store.clone(), || Ok(Vec::new())).unwrap();
    assert_eq!(read_back(&repo, &a), data);
    assert_eq!(read_back(&repo, &b), data);
    let report = vfs_core::verify::verify(&repo, true, &Default::default()).unwrap();
    assert!(report.is_clean(), "{report:?}");
    // And through the mount model, where frames are cached by key.
    let fs = mount_model(repo);
    for job in ["a", "b"] {
        let (fh, size) = open_file(&fs, job, "f");
        assert_eq!(fs.read(fh, 0, size as u32).unwrap(), data, "job {job}");
        fs.release(fh);
    }
}

#[test]
fn the_same_random_bytes_cut_two_ways_make_two_packs() {
    two_chunkings_both_survive(
        pseudo_random(40_000, 0x2545_F491_4F6C_DD1D),
        ChunkerKind::Cdc {
            min: 512,
            avg: 2048,
            max: 8192,
        },
        ChunkerKind::Fixed(4096),
    );
}

#[test]
fn compressible_frames_that_line_up_make_two_packs() {
    // Pages of 4 and 8 KiB both fill 32 KiB frames at the same places.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i / 97 % 7) as u8 + b'a').collect();
    two_chunkings_both_survive(data, ChunkerKind::Fixed(4096), ChunkerKind::Fixed(8192));
}

#[test]
fn no_write_replaces_an_object() {
    let dir = tempfile::tempdir().unwrap();
    let local = vfs_core::local_store::LocalStore::open(dir.path()).unwrap();
    let memory = MemoryStore::new();
    for store in [&local as &dyn ObjectStore, &memory] {
        store.put("index/x.idx", b"first").unwrap();
        match store.put("index/x.idx", b"second") {
            Err(Error::AlreadyExists(_)) => {}
            other => panic!("{}: second put gave {other:?}", store.location()),
        }
        assert_eq!(store.get("index/x.idx").unwrap(), b"first");
    }
    let repo = Repository::open(
        {
            let s = Arc::new(MemoryStore::new());
            Repository::init(s.as_ref(), None).unwrap();
            s
        },
        || Ok(Vec::new()),
    )
    .unwrap();
    repo.put_once("packs/aa/p.pack", b"bytes", |old| old == b"bytes")
        .unwrap();
    repo.put_once("packs/aa/p.pack", b"bytes", |old| old == b"bytes")
        .unwrap();
    match repo.put_once("packs/aa/p.pack", b"other", |old| old == b"other") {
        Err(Error::Conflict(key)) => assert!(key.contains("packs/aa/p.pack"), "{key}"),
        other => panic!("a different object was accepted: {other:?}"),
    }
    assert_eq!(repo.store().get("packs/aa/p.pack").unwrap(), b"bytes");
}

/// Writes `m` as a new restore point of job `job`.
fn put_manifest(repo: &Repository, job: &str, mut m: Manifest) {
    m.job = job.into();
    m.name = "2030-01-01T00-00-00Z".into();
    let key = repo.new_manifest_key(&m);
    repo.store()
        .put(
            &key,
            &repo.encode_meta(vfs_core::format::MANIFEST_MAGIC, &m),
        )
        .unwrap();
}

#[test]
fn chunk_lengths_the_index_disagrees_with_are_corruption() {
    use vfs_core::manifest::Content;
    let (_, repo) = new_repo(None);
    let data = pseudo_random(100_000, 7);
    let cdc = backup_bytes(
        &repo,
        "c",
        "f",
        data.clone(),
        Some(ChunkerKind::Cdc {
            min: 512,
            avg: 2048,
            max: 8192,
        }),
    );
    let fixed = backup_bytes(&repo, "d", "f", data, Some(ChunkerKind::Fixed(4096)));
    // Content-defined: move a byte from the second chunk to the first, so
    // the total still matches the file's size.
    let mut shifted = cdc.clone();
    let Content::Variable { chunks } = &mut shifted.nodes[1].content else {
        panic!("cdc gives variable chunks")
    };
    chunks[0].1 += 1;
    chunks[1].1 -= 1;
    put_manifest(&repo, "shifted", shifted);
    // Fixed: claim 8 KiB chunks, keeping every other 4 KiB chunk id.
    let mut doubled = fixed.clone();
    let Content::Fixed { chunk_size, chunks } = &mut doubled.nodes[1].content else {
        panic!("fixed gives fixed chunks")
    };
    *chunk_size = 8192;
    *chunks = chunks.iter().step_by(2).copied().collect();
    put_manifest(&repo, "doubled", doubled);

    let fs = mount_model(repo);
    for job in ["shifted", "doubled"] {
        let (fh, size) = open_file(&fs, job, "f");
        // Every read touching the first chunk (the only one wrong in both).
        for (off, len) in [(0, size as u32), (0, 10), (1, 1), (100, 300)] {
            match fs.read(fh, off, len) {
                Err(FsError::Corrupt(why)) => assert!(why.contains("index"), "{why}"),
                other => panic!("{job} at {off}: expected corruption, got {other:?}"),
            }
        }
        fs.release(fh);
    }
}

/// A store whose listing of restore points is always empty, so that a
/// writer looks for a restore point of the same name and finds none (as
/// two hosts do that look at the same moment), and whose puts replace an
/// existing object, as Garage's do (it ignores `If-None-Match`).
struct BlindStore(Arc<MemoryStore>);

impl ObjectStore for BlindStore {
    fn location(&self) -> String {
        "blind".into()
    }
    fn put(&self, key: &str, data: &[u8]) -> vfs_core::Result<()> {
        self.0.delete(key)?;
        self.0.put(key, data)
    }
    fn get(&self, key: &str) -> vfs_core::Result<Vec<u8>> {
        self.0.get(key)
    }
    fn get_range(
        &self,
        key: &str,
        offset: u64,
        len: usize,
    ) -> vfs_core::Result<vfs_core::store::ObjectBytes> {
        self.0.get_range(key, offset, len)
    }
    fn size(&self, key: &str) -> vfs_core::Result<Option<u64>> {
        self.0.size(key)
    }
    fn list(&self, prefix: &str) -> vfs_core::Result<Vec<String>> {
        let mut keys = self.0.list(prefix)?;
        keys.retain(|k| !k.starts_with("restore-points/"));
        Ok(keys)
    }
    fn delete(&self, key: &str) -> vfs_core::Result<()> {
        self.0.delete(key)
    }
}

#[test]
fn two_backups_committed_under_one_time_both_stay_and_are_told_apart() {
    use vfs_core::ingest::{commit, MetaShare, Mover};
    use vfs_core::repo::RestorePointName;
    let (store, repo) = new_repo(Some(b"pw"));
    let first = backup_bytes(&repo, "db", "f", pseudo_random(50_000, 1), None);
    let blind =
        Repository::open(Arc::new(BlindStore(store.clone())), || Ok(b"pw".to_vec())).unwrap();
    let time = 2_000_000_000;
    let mut committed = Vec::new();
    for host in ["host-a", "host-b"] {
        let mover = Mover::new(&blind).unwrap();
        let m = commit(
            &mover,
            "race",
            host,
            time,
            first.nodes.clone(),
            Default::default(),
            &MetaShare::default(),
        )
        .unwrap();
        committed.push(m);
    }
    // Neither write replaced the other, though both took the same name.
    assert_eq!(committed[0].name, committed[1].name);
    let listed = repo.list_restore_points(Some("race")).unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    let mut hosts: Vec<String> = listed
        .iter()
        .map(|n| {
            assert_eq!(n.base(), committed[0].name, "{n}");
            assert_ne!(n.name, committed[0].name, "{n} is not told apart");
            let m = repo.load_manifest(n).unwrap();
            assert_eq!(read_back(&repo, &m), read_back(&repo, &first));
            m.hostname
        })
        .collect();
    hosts.sort();
    assert_eq!(hosts, ["host-a", "host-b"]);
    // The name they share is refused, with the names that tell them apart.
    let shared = RestorePointName::parse(&format!("race/{}", committed[0].name)).unwrap();
    let err = repo.load_manifest(&shared).unwrap_err().to_string();
    for n in &listed {
        assert!(err.contains(&n.to_string()), "{err}");
    }
    // Once one is deleted, the other has the plain name again.
    repo.delete_restore_point(&listed[0]).unwrap();
    let fresh = Repository::open(store.clone(), || Ok(b"pw".to_vec())).unwrap();
    assert_eq!(
        fresh.list_restore_points(Some("race")).unwrap(),
        vec![shared.clone()]
    );
    fresh.load_manifest(&shared).unwrap();
}

#[test]
fn a_writer_that_sees_the_name_taken_moves_to_the_next_second() {
    use vfs_core::ingest::{commit, MetaShare, Mover};
    let (_, repo) = new_repo(None);
    let first = backup_bytes(&repo, "db", "f", pseudo_random(20_000, 2), None);
    let time = 2_000_000_000;
    let names: Vec<String> = (0..3)
        .map(|_| {
            let mover = Mover::new(&repo).unwrap();
            commit(
                &mover,
                "same",
                "h",
                time,
                first.nodes.clone(),
                Default::default(),
                &MetaShare::default(),
            )
            .unwrap()
            .name
        })
        .collect();
    let listed: Vec<String> = repo
        .list_restore_points(Some("same"))
        .unwrap()
        .into_iter()
        .map(|n| n.name)
        .collect();
    assert_eq!(listed, names);
    assert_eq!(
        names,
        (0..3)
            .map(|i| vfs_core::manifest::timestamp_name(time + i))
            .collect::<Vec<_>>()
    );
}

#[test]
fn readers_racing_into_a_restore_point_load_its_manifest_once() {
    // 48 MiB in 4 KiB chunks: a manifest of 12,288 chunks, slow enough to
    // load that racing readers overlap.
    let (_, repo) = new_repo(None);
    let data = pseudo_random(48 << 20, 11);
    backup_bytes(&repo, "big", "f", data, Some(ChunkerKind::Fixed(4096)));
    let repo = Arc::new(repo);
    for round in 0..5 {
        let fs = mount_shared(repo.clone(), 0);
        let job = fs.lookup(vfs_core::fs::ROOT_INO, b"big").unwrap();
        let rp = fs
            .readdir(job.ino)
            .unwrap()
            .into_iter()
            .find(|e| e.name != b"latest")
            .unwrap();
        let start = std::sync::Barrier::new(8);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    start.wait();
                    let f = fs.lookup(rp.ino, b"f").unwrap();
                    assert_eq!(f.size, 48 << 20);
                });
            }
        });
        let loads = fs
            .counters
            .manifest_loads
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            loads, 1,
            "round {round}: 8 racing readers loaded the manifest {loads} times"
        );
    }
}
