//! The on-disk chunk index against a model: packs come and go, merges run
//! to the end or stop after any step (as a crash there would), merged
//! files get damaged, and after each step every id is looked up, present
//! or absent, in the running repository and in one opened afresh. The
//! index may answer "missing" only where the model has nothing; where it
//! answers, the location is one the model holds.

use std::sync::Arc;

use proptest::prelude::*;
use vfs_core::format;
use vfs_core::ids::{ChunkId, PackId};
use vfs_core::local_store::LocalStore;
use vfs_core::repo::{pack_key, IndexEntry, IndexFile, MergeMode, MergeStep, Repository};
use vfs_core::store::{MemoryStore, ObjectStore};

/// The universe of chunk ids: small, so packs share chunks.
const IDS: u64 = 48;

fn id(n: u64) -> ChunkId {
    ChunkId(*blake3::hash(&n.to_le_bytes()).as_bytes())
}

#[derive(Clone, Debug)]
enum Op {
    /// A pack holding these ids (indices into the universe).
    AddPack(Vec<u64>),
    /// A prune of the nth live pack: its index file, then the pack.
    DropPack(usize),
    Merge(Option<MergeStep>),
    /// Flips a byte of every merged file at this fraction of its length.
    DamageMerged(u16),
    Rebuild,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec(0..IDS, 1..12).prop_map(Op::AddPack),
        1 => (0usize..8).prop_map(Op::DropPack),
        3 => prop_oneof![
            Just(None),
            Just(Some(MergeStep::Finished)),
            Just(Some(MergeStep::Written)),
        ]
        .prop_map(Op::Merge),
        1 => any::<u16>().prop_map(Op::DamageMerged),
        1 => Just(Op::Rebuild),
    ]
}

/// Live packs in order of creation, with their entries.
#[derive(Default)]
struct Model {
    packs: Vec<(PackId, Vec<IndexEntry>)>,
    made: u64,
}

impl Model {
    fn holds(&self, id: &ChunkId, pack: &PackId, e: &IndexEntry) -> bool {
        self.packs
            .iter()
            .any(|(p, es)| p == pack && es.iter().any(|x| x.id == *id && x == e))
    }

    fn has(&self, id: &ChunkId) -> bool {
        self.packs
            .iter()
            .any(|(_, es)| es.iter().any(|e| e.id == *id))
    }
}

/// Writes a pack object of the right length (its contents are not read
/// by the index) and its index file, as a backup does.
fn add_pack(repo: &Repository, model: &mut Model, ids: &[u64]) {
    model.made += 1;
    let pack = PackId(*blake3::hash(&model.made.to_le_bytes()).as_bytes());
    let mut entries: Vec<IndexEntry> = Vec::new();
    for (k, n) in ids.iter().enumerate() {
        if entries.iter().any(|e| e.id == id(*n)) {
            continue;
        }
        // A location that differs per pack, so a mix-up shows.
        entries.push(IndexEntry {
            id: id(*n),
            offset: format::PACK_HEADER_LEN as u32 + 10 * k as u32,
            stored_len: 10,
            raw_len: (model.made % 7) as u32 + 1,
            flags: 0,
            frame_offset: 0,
            frame_raw_len: 8,
        });
    }
    let pack_len = 4096u64 + model.made;
    repo.store()
        .put(&pack_key(&pack), &vec![0u8; pack_len as usize])
        .unwrap();
    repo.put_index_file(&IndexFile {
        pack,
        pack_len,
        entries: entries.clone(),
    })
    .unwrap();
    model.packs.push((pack, entries));
}

fn check(repo: &Repository, model: &Model, what: &str) {
    let index = repo.index().read();
    for n in 0..IDS + 8 {
        let id = id(n);
        match index.get(&id) {
            Some(loc) => {
                let pack = index.packs[loc.pack as usize];
                assert!(
                    model.holds(&id, &pack, &loc.entry(id)),
                    "{what}: chunk {n} located where the model has it not: {loc:?}"
                );
            }
            None => {
                // Only a damaged merged file may hide a chunk, and then
                // the index says so.
                assert!(
                    !model.has(&id) || !index.problems.is_empty() || damaged(repo),
                    "{what}: chunk {n} is stored but not found"
                );
            }
        }
        if index.has_for_dedup(&id) {
            assert!(
                model.has(&id),
                "{what}: chunk {n} offered for dedup, not stored"
            );
        }
    }
}

/// Whether some merged file in the store fails a full read.
fn damaged(repo: &Repository) -> bool {
    let index = repo.index().read();
    index
        .merged()
        .is_some_and(|m| m.entries().any(|r| r.is_err()))
}

fn run(store: Arc<dyn ObjectStore>, ops: Vec<Op>) {
    Repository::init(store.as_ref(), None).unwrap();
    let repo = Repository::open(store.clone(), || Ok(Vec::new())).unwrap();
    let mut model = Model::default();
    let mut was_damaged = false;
    for (step, op) in ops.into_iter().enumerate() {
        let what = format!("step {step} ({op:?})");
        match op {
            Op::AddPack(ids) => add_pack(&repo, &mut model, &ids),
            Op::DropPack(n) => {
                if !model.packs.is_empty() {
                    let (pack, _) = model.packs.remove(n % model.packs.len());
                    store.delete(&vfs_core::repo::index_key(&pack)).unwrap();
                    store.delete(&pack_key(&pack)).unwrap();
                }
            }
            Op::Merge(stop) => {
                repo.merge_index(MergeMode::Incremental, stop).unwrap();
            }
            Op::Rebuild => {
                repo.merge_index(MergeMode::Rebuild, None).unwrap();
                was_damaged = false;
            }
            Op::DamageMerged(at) => {
                for key in store.list(format::MERGED_INDEX_PREFIX).unwrap() {
                    let mut bytes = store.get(&key).unwrap();
                    let k = (bytes.len() - 1) * at as usize / u16::MAX as usize;
                    bytes[k] ^= 0x20;
                    store.delete(&key).unwrap();
                    store.put(&key, &bytes).unwrap();
                    was_damaged = true;
                }
            }
        }
        repo.reload_index().unwrap();
        check(&repo, &model, &what);
        // A process starting now sees the same.
        let fresh = Repository::open(store.clone(), || Ok(Vec::new())).unwrap();
        check(&fresh, &model, &format!("{what}, reopened"));
        if !was_damaged {
            // Without damage nothing stored is ever missing.
            let index = fresh.index().read();
            for (_, es) in &model.packs {
                for e in es {
                    assert!(index.get(&e.id).is_some(), "{what}: {} lost", e.id);
                    assert!(
                        index.has_for_dedup(&e.id),
                        "{what}: {} not deduplicated",
                        e.id
                    );
                }
            }
        }
    }
    // A merge after any history answers for everything again.
    repo.merge_index(MergeMode::Incremental, None).unwrap();
    if was_damaged {
        repo.merge_index(MergeMode::Rebuild, None).unwrap();
    }
    let index = repo.index().read();
    for (_, es) in &model.packs {
        for e in es {
            assert!(
                index.get(&e.id).is_some(),
                "after the last merge: {} lost",
                e.id
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn the_index_answers_as_the_model_in_memory(ops in prop::collection::vec(op(), 1..24)) {
        run(Arc::new(MemoryStore::new()), ops);
    }

    #[test]
    fn the_index_answers_as_the_model_on_disk(ops in prop::collection::vec(op(), 1..16)) {
        let dir = tempfile::tempdir().unwrap();
        run(Arc::new(LocalStore::open(dir.path()).unwrap()), ops);
    }
}

/// Opening a repository with a merged file reads the merged file and the
/// few per-pack files it lacks, not one file per pack.
#[test]
fn opening_reads_the_merged_file_and_only_the_newer_index_files() {
    let store = Arc::new(MemoryStore::new());
    Repository::init(store.as_ref(), None).unwrap();
    let repo = Repository::open(store.clone(), || Ok(Vec::new())).unwrap();
    let mut model = Model::default();
    for k in 0..40 {
        add_pack(&repo, &mut model, &[k, k + 1, k + 2]);
    }
    let key = repo
        .merge_index(MergeMode::Incremental, None)
        .unwrap()
        .unwrap();
    for k in 0..3 {
        add_pack(&repo, &mut model, &[k + 100]);
    }
    let counted = Arc::new(CountingStore {
        inner: store.clone(),
        gets: Default::default(),
        heads: Default::default(),
    });
    let fresh = Repository::open(counted.clone(), || Ok(Vec::new())).unwrap();
    // config, the merged file and the three newer index files (and any
    // pending lists: none here); the packs' sizes come from one listing.
    let gets = counted.gets.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(gets, 5, "objects read by an open");
    assert_eq!(counted.heads.load(std::sync::atomic::Ordering::Relaxed), 0);
    let index = fresh.index().read();
    assert_eq!(index.merged().unwrap().key(), key);
    assert_eq!(index.unmerged_packs(), 3);
    for (_, es) in &model.packs {
        for e in es {
            assert!(index.has_for_dedup(&e.id));
        }
    }
    assert!(!index.has_for_dedup(&id(10_000)));
}

/// A reload after a backup reads the index files of the packs it added
/// and nothing else; a pack that went makes it scan again.
#[test]
fn a_reload_reads_only_what_is_new() {
    use std::sync::atomic::Ordering::Relaxed;
    let store = Arc::new(MemoryStore::new());
    Repository::init(store.as_ref(), None).unwrap();
    let counted = Arc::new(CountingStore {
        inner: store.clone(),
        gets: Default::default(),
        heads: Default::default(),
    });
    let repo = Repository::open(counted.clone(), || Ok(Vec::new())).unwrap();
    let mut model = Model::default();
    for k in 0..20 {
        add_pack(&repo, &mut model, &[k, k + 1]);
    }
    repo.reload_index().unwrap();
    let before = counted.gets.load(Relaxed);
    for k in 0..2 {
        add_pack(&repo, &mut model, &[k + 200]);
    }
    repo.reload_index().unwrap();
    assert_eq!(counted.gets.load(Relaxed) - before, 2, "index files read");
    assert_eq!(
        counted.heads.load(Relaxed),
        0,
        "pack sizes asked one by one"
    );
    check(&repo, &model, "after the refresh");
    assert!(repo.index().read().has_for_dedup(&id(201)));
    assert_eq!(repo.index().read().unmerged_packs(), 22);

    // A pack removed by hand: the next reload scans again and drops it.
    let (gone, gone_entries) = model.packs.remove(3);
    store.delete(&pack_key(&gone)).unwrap();
    let before = counted.gets.load(Relaxed);
    repo.reload_index().unwrap();
    assert_eq!(counted.gets.load(Relaxed) - before, 22, "a full scan");
    let index = repo.index().read();
    assert!(index.problems.iter().any(|p| p.contains(&pack_key(&gone))));
    for e in gone_entries {
        if !model.has(&e.id) {
            assert!(
                !index.has_for_dedup(&e.id),
                "a chunk of a missing pack offered"
            );
        }
    }
    drop(index);
    check(&repo, &model, "after the rescan");
}

/// A merged file of another repository or damaged beyond use is passed
/// over with a message naming it, and the per-pack files answer.
#[test]
fn a_foreign_merged_file_is_refused_by_name_and_passed_over() {
    let store = Arc::new(MemoryStore::new());
    Repository::init(store.as_ref(), None).unwrap();
    let repo = Repository::open(store.clone(), || Ok(Vec::new())).unwrap();
    let mut model = Model::default();
    add_pack(&repo, &mut model, &[1, 2, 3]);
    let key = repo
        .merge_index(MergeMode::Incremental, None)
        .unwrap()
        .unwrap();
    let mut bytes = store.get(&key).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    store.delete(&key).unwrap();
    store.put(&key, &bytes).unwrap();
    let fresh = Repository::open(store.clone(), || Ok(Vec::new())).unwrap();
    let index = fresh.index().read();
    assert!(index.merged().is_none());
    let problems = index.problems.join("\n");
    assert!(
        problems.contains(&key) && problems.contains("checksum"),
        "{problems}"
    );
    assert!(index.get(&id(2)).is_some());
}

/// A store that counts whole-object reads.
struct CountingStore {
    inner: Arc<MemoryStore>,
    gets: std::sync::atomic::AtomicU64,
    heads: std::sync::atomic::AtomicU64,
}

impl ObjectStore for CountingStore {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn put(&self, key: &str, data: &[u8]) -> vfs_core::Result<()> {
        self.inner.put(key, data)
    }
    fn get(&self, key: &str) -> vfs_core::Result<Vec<u8>> {
        self.gets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.get(key)
    }
    fn get_range(
        &self,
        key: &str,
        offset: u64,
        len: usize,
    ) -> vfs_core::Result<vfs_core::store::ObjectBytes> {
        self.gets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.get_range(key, offset, len)
    }
    fn size(&self, key: &str) -> vfs_core::Result<Option<u64>> {
        self.heads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.size(key)
    }
    fn list(&self, prefix: &str) -> vfs_core::Result<Vec<String>> {
        self.inner.list(prefix)
    }
    fn list_sizes(&self, prefix: &str) -> vfs_core::Result<Vec<(String, u64)>> {
        self.inner.list_sizes(prefix)
    }
    fn delete(&self, key: &str) -> vfs_core::Result<()> {
        self.inner.delete(key)
    }
}
