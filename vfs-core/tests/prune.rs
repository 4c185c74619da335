//! Prune against a model: random sequences of backups, forgets, prunes
//! and backups that stay open across them (each its own repository
//! instance, as separate processes are), on one store. After every step
//! every restore point the model holds reads back byte for byte; at the
//! end the repository verifies clean and nothing is left pending.

use std::sync::Arc;

use proptest::prelude::*;
use vfs_core::forget::{forget, KeepPolicy};
use vfs_core::ingest::{commit, FileWriter, MetaShare, Mover, TreeBuilder};
use vfs_core::manifest::{Content, Node, NodeKind};
use vfs_core::prune::{prune, PruneOptions};
use vfs_core::repo::Repository;
use vfs_core::store::{MemoryStore, ObjectStore};

fn dir_node() -> Node {
    Node {
        parent: 0,
        name: Vec::new(),
        kind: NodeKind::Dir,
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime_sec: 0,
        mtime_nsec: 0,
        size: 0,
        target: Vec::new(),
        content: Content::Empty,
    }
}

fn open(store: &Arc<MemoryStore>) -> Arc<Repository> {
    let repo = Repository::open(store.clone(), || unreachable!("not encrypted")).unwrap();
    // Small packs: many of them, so that prune has choices to make.
    repo.set_pack_target(48 << 10);
    Arc::new(repo)
}

/// Bytes that do not repeat within a blob; blobs share their halves
/// (blob i's second half is blob i+1's first), so backups reuse chunks.
fn blob(i: u8) -> Vec<u8> {
    let part = |k: u32| -> Vec<u8> {
        (0..100_000u32)
            .map(|x| ((x + k * 100_000).wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect()
    };
    let mut b = part(i as u32);
    b.extend(part(i as u32 + 1));
    b
}

/// A backup that stays open: its writer lock and index are taken when it
/// starts, its chunks stored, its manifest written at `finish`.
struct OpenBackup {
    mover: Arc<Mover<Arc<Repository>>>,
    thread: std::thread::JoinHandle<()>,
    writer: FileWriter,
    blob: u8,
}

fn start(store: &Arc<MemoryStore>, i: u8) -> OpenBackup {
    let mover = Arc::new(Mover::new(open(store)).unwrap());
    let runner = mover.clone();
    let thread = std::thread::spawn(move || runner.run_writer());
    let mut writer = FileWriter::new(b"data.bin", None, 1 << 16);
    writer.write_at(&*mover, 0, &blob(i)).unwrap();
    OpenBackup {
        mover,
        thread,
        writer,
        blob: i,
    }
}

fn finish(b: OpenBackup, time: i64) -> (String, u8) {
    let OpenBackup {
        mover,
        thread,
        writer,
        blob,
    } = b;
    let (content, size, stats) = writer.finish(&*mover).unwrap();
    let mut tree = TreeBuilder::new(dir_node());
    let node = Node {
        kind: NodeKind::File,
        mode: 0o644,
        size,
        content,
        ..dir_node()
    };
    tree.put(b"data.bin", node).unwrap();
    let m = commit(
        &*mover,
        "j",
        "test",
        time,
        tree.into_nodes(),
        stats,
        &MetaShare::default(),
    )
    .unwrap();
    mover.close();
    thread.join().unwrap();
    (m.full_name(), blob)
}

fn read_back(store: &Arc<MemoryStore>, name: &str) -> Vec<u8> {
    let repo = open(store);
    let rp = repo.resolve(name).unwrap();
    let m = repo.load_manifest(&rp).unwrap();
    let node = &m.nodes[1];
    let mut out = Vec::new();
    for (id, _, len) in node.content.chunks(node.size) {
        match id {
            Some(id) => out.extend(
                repo.read_chunk(&id)
                    .unwrap_or_else(|e| panic!("{name}: {e}")),
            ),
            None => out.resize(out.len() + len as usize, 0),
        }
    }
    out
}

#[derive(Debug, Clone)]
enum Step {
    Backup(u8),
    Start(u8),
    Finish,
    Forget(u32),
    Prune(u8),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0u8..4).prop_map(Step::Backup),
        (0u8..4).prop_map(Step::Start),
        Just(Step::Finish),
        (1u32..3).prop_map(Step::Forget),
        (0u8..3).prop_map(Step::Prune),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn restore_points_survive_any_interleaving_of_prunes_and_backups(
        steps in proptest::collection::vec(step(), 1..14)
    ) {
        let store = Arc::new(MemoryStore::new());
        Repository::init(store.as_ref(), None).unwrap();
        let main = open(&store);
        let mut model: Vec<(String, u8)> = Vec::new();
        let mut open_backups: Vec<OpenBackup> = Vec::new();
        let mut time = 1_000_000;
        for s in &steps {
            time += 3600;
            match s {
                Step::Backup(i) => {
                    let b = start(&store, *i);
                    model.push(finish(b, time));
                }
                Step::Start(i) if open_backups.len() < 2 => open_backups.push(start(&store, *i)),
                Step::Start(_) => {}
                Step::Finish => {
                    if !open_backups.is_empty() {
                        model.push(finish(open_backups.remove(0), time));
                    }
                }
                Step::Forget(k) => {
                    let policy = KeepPolicy { last: *k, ..Default::default() };
                    let report = forget(&main, None, &policy, false).unwrap();
                    let removed: Vec<String> =
                        report.remove.iter().map(|d| d.restore_point.clone()).collect();
                    model.retain(|(n, _)| !removed.contains(n));
                }
                Step::Prune(m) => {
                    let max_unused = [0.0, 0.05, 1.0][*m as usize];
                    prune(&main, &PruneOptions { dry_run: false, max_unused }).unwrap();
                }
            }
            for (name, i) in &model {
                prop_assert!(read_back(&store, name) == blob(*i), "{} after {:?}", name, s);
            }
        }
        while !open_backups.is_empty() {
            time += 3600;
            model.push(finish(open_backups.remove(0), time));
        }
        // The first prune decides what earlier ones left pending (no
        // writer is left), the second has nothing left to wait for.
        prune(&main, &PruneOptions::default()).unwrap();
        let last = prune(&main, &PruneOptions::default()).unwrap();
        prop_assert_eq!(last.packs_pending, 0);
        prop_assert!(store.list(vfs_core::lock::PENDING_PREFIX).unwrap().is_empty());
        prop_assert!(store.list(vfs_core::lock::LOCKS_PREFIX).unwrap().is_empty());
        for (name, i) in &model {
            prop_assert!(read_back(&store, name) == blob(*i), "{}", name);
        }
        let reopened = open(&store);
        let report = vfs_core::verify::verify(&reopened, true, &Default::default()).unwrap();
        prop_assert!(report.is_clean(), "{:?} {:?}", report.problems, report.damaged);
        // Nothing unused is left: every pack holds a chunk some restore
        // point names.
        let unused = prune(&main, &PruneOptions { dry_run: true, max_unused: 1.0 }).unwrap();
        prop_assert_eq!(unused.packs_deleted, 0);
    }
}
