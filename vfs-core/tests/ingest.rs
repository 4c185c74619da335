//! The shared data mover and the file writer: writes at any offset,
//! truncation and reads while writing match a plain byte vector; many
//! streams storing at once each commit exactly their bytes; nothing is
//! visible before the commit; a failing store stops every stream.

use std::sync::Arc;

use proptest::prelude::*;
use vfs_core::chunker::ChunkerKind;
use vfs_core::ingest::{commit, FileWriter, MetaShare, Mover, TreeBuilder};
use vfs_core::manifest::{BackupStats, Content, Manifest, Node, NodeKind};
use vfs_core::repo::Repository;
use vfs_core::store::{MemoryStore, ObjectStore};

fn new_repo() -> (Arc<MemoryStore>, Arc<Repository>) {
    let store = Arc::new(MemoryStore::new());
    Repository::init(store.as_ref(), None).unwrap();
    let repo = Repository::open(store.clone(), || unreachable!("not encrypted")).unwrap();
    (store, Arc::new(repo))
}

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

fn file_node(content: Content, size: u64) -> Node {
    Node {
        kind: NodeKind::File,
        mode: 0o644,
        size,
        content,
        ..dir_node()
    }
}

fn read_content(repo: &Repository, content: &Content, size: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for (id, _, len) in content.chunks(size) {
        match id {
            Some(id) => out.extend(repo.read_chunk(&id).unwrap()),
            None => out.resize(out.len() + len as usize, 0),
        }
    }
    out
}

#[derive(Debug, Clone)]
enum Op {
    Write { at: u32, len: u32, byte: u8 },
    Append { len: u32, seed: u8 },
    SetLen(u32),
    Read { at: u32, len: u32 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u32..300_000, 1u32..40_000, any::<u8>()).prop_map(|(at, len, byte)| Op::Write {
            at,
            len,
            byte
        }),
        (1u32..120_000, any::<u8>()).prop_map(|(len, seed)| Op::Append { len, seed }),
        (0u32..300_000).prop_map(Op::SetLen),
        (0u32..320_000, 0u32..50_000).prop_map(|(at, len)| Op::Read { at, len }),
    ]
}

/// Bytes that do not repeat (so chunks are mostly new) and compress a bit.
fn pattern(len: u32, seed: u8, from: usize) -> Vec<u8> {
    (0..len as usize)
        .map(|i| {
            let x = (from + i) as u32;
            (x.wrapping_mul(2_654_435_761).rotate_left(seed as u32 % 31) >> 13) as u8
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn a_file_writer_matches_a_byte_vector(ops in proptest::collection::vec(op(), 1..24),
                                           chunker in 0usize..3) {
        let (_store, repo) = new_repo();
        repo.set_pack_target(96 << 10); // many packs, so patches cross them
        let kind = [Some(ChunkerKind::Fixed(4096)),
                    Some(ChunkerKind::Cdc { min: 1024, avg: 4096, max: 16384 }),
                    None][chunker];
        Mover::scoped(repo.clone(), |mover| {
            let run = || -> Result<(), TestCaseError> {
            let mut model: Vec<u8> = Vec::new();
            // A small batch, so that writes cut and store often.
            let mut w = FileWriter::new(b"data.bin", kind, 40_000);
            for op in &ops {
                match *op {
                    Op::Write { at, len, byte } => {
                        let data = vec![byte; len as usize];
                        w.write_at(mover, at as u64, &data).unwrap();
                        let end = at as usize + len as usize;
                        if model.len() < end { model.resize(end, 0); }
                        model[at as usize..end].copy_from_slice(&data);
                    }
                    Op::Append { len, seed } => {
                        let data = pattern(len, seed, model.len());
                        w.write_at(mover, model.len() as u64, &data).unwrap();
                        model.extend_from_slice(&data);
                    }
                    Op::SetLen(len) => {
                        w.set_len(mover, len as u64).unwrap();
                        model.resize(len as usize, 0);
                    }
                    Op::Read { at, len } => {
                        let got = w.read_at(mover, at as u64, len as usize).unwrap();
                        let lo = (at as usize).min(model.len());
                        let hi = (at as usize + len as usize).min(model.len());
                        prop_assert_eq!(&got[..], &model[lo..hi]);
                    }
                }
                prop_assert_eq!(w.size(), model.len() as u64);
            }
            let (content, size, _) = w.finish(mover).unwrap();
            mover.flush().unwrap();
            prop_assert_eq!(size, model.len() as u64);
            let node = file_node(content.clone(), size);
            if let Content::Fixed { chunk_size, chunks } = &content {
                prop_assert_eq!(*chunk_size, 4096);
                prop_assert_eq!(chunks.len() as u64, size.div_ceil(4096));
            }
            prop_assert_eq!(read_content(&repo, &node.content, size), model);
            Ok(())
            };
            Ok(run())
        }).unwrap()?;
    }
}

#[test]
fn streams_storing_at_once_commit_their_own_bytes() {
    let (store, repo) = new_repo();
    repo.set_pack_target(256 << 10);
    let streams = 6usize;
    // Streams 0 and 3 carry the same bytes: stored once between them.
    let data: Vec<Vec<u8>> = (0..streams)
        .map(|i| pattern(1_500_000 + 7_919 * i as u32, (i % 3) as u8, 0))
        .collect();
    let manifests: Vec<Manifest> = Mover::scoped(repo.clone(), |mover| {
        std::thread::scope(|s| {
            let handles: Vec<_> = data
                .iter()
                .enumerate()
                .map(|(i, bytes)| {
                    s.spawn(move || {
                        let share = MetaShare::default();
                        let mut w =
                            FileWriter::new(b"stream-0", None, 1 << 20).with_share(share.clone());
                        for (k, piece) in bytes.chunks(65_536 + i * 1000).enumerate() {
                            let at = (k * (65_536 + i * 1000)) as u64;
                            w.write_at(mover, at, piece).unwrap();
                        }
                        let (content, size, stats) = w.finish(mover).unwrap();
                        let mut tree = TreeBuilder::new(dir_node());
                        tree.put(b"stream-0", file_node(content, size)).unwrap();
                        let mut all = BackupStats::default();
                        vfs_core::ingest::add_stats(&mut all, &stats);
                        commit(
                            mover,
                            &format!("db{i}"),
                            "test",
                            1_000,
                            tree.into_nodes(),
                            all,
                            &share,
                        )
                        .unwrap()
                    })
                })
                .collect();
            Ok(handles.into_iter().map(|h| h.join().unwrap()).collect())
        })
    })
    .unwrap();
    let reopened = Repository::open(store.clone(), || unreachable!()).unwrap();
    for (i, m) in manifests.iter().enumerate() {
        let node = &m.nodes[1];
        assert_eq!(read_content(&reopened, &node.content, node.size), data[i]);
        assert_eq!(m.stats.logical_bytes, data[i].len() as u64);
    }
    let stored: u64 = manifests.iter().map(|m| m.stats.new_chunk_bytes).sum();
    let raw: u64 = data.iter().map(|d| d.len() as u64).sum();
    assert!(stored < raw, "{stored} stored of {raw}");
    let report = vfs_core::verify::verify(&reopened, true, &Default::default()).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert!(report.unindexed_packs.is_empty());
}

#[test]
fn nothing_is_visible_before_the_commit_and_an_abort_keeps_the_packs() {
    let (store, repo) = new_repo();
    repo.set_pack_target(64 << 10);
    let bytes = pattern(2_000_000, 5, 0);
    Mover::scoped(repo.clone(), |mover| {
        let mut w = FileWriter::new(b"x.dump", None, 1 << 20);
        w.write_at(mover, 0, &bytes).unwrap();
        // Abandoned: no finish, no commit.
        mover.flush()
    })
    .unwrap();
    assert!(store
        .list(vfs_core::repo::RESTORE_POINTS_PREFIX)
        .unwrap()
        .is_empty());
    assert!(repo.list_restore_points(None).unwrap().is_empty());
    // The next backup of the same bytes reuses what the aborted one stored.
    let m = Mover::scoped(repo.clone(), |mover| {
        let mut w = FileWriter::new(b"x.dump", None, 1 << 20);
        w.write_at(mover, 0, &bytes).unwrap();
        let (content, size, stats) = w.finish(mover).unwrap();
        let mut tree = TreeBuilder::new(dir_node());
        tree.put(b"x.dump", file_node(content, size)).unwrap();
        commit(
            mover,
            "job",
            "test",
            5,
            tree.into_nodes(),
            stats,
            &MetaShare::default(),
        )
    })
    .unwrap();
    assert!(
        m.stats.new_chunk_bytes < 64 << 10,
        "{} bytes stored again",
        m.stats.new_chunk_bytes
    );
}

#[test]
fn tree_paths_refuse_leaving_the_restore_point() {
    let mut tree = TreeBuilder::new(dir_node());
    for bad in [&b"/etc/passwd"[..], b"a/../../x", b"..", b"a/\0b"] {
        let err = tree.put(bad, file_node(Content::Empty, 0)).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("absolute") || msg.contains("..") || msg.contains("NUL"),
            "{msg}"
        );
    }
    assert_eq!(tree.nodes().len(), 1);
    let i = tree
        .put(b"./base/1/1259", file_node(Content::Empty, 0))
        .unwrap();
    assert_eq!(tree.lookup(b"base/1/1259").unwrap(), Some(i));
    // Parents are made on the way, and a later `base/` entry sets their
    // metadata without losing the entries.
    tree.put(
        b"base/",
        Node {
            mode: 0o700,
            ..dir_node()
        },
    )
    .unwrap();
    let base = tree.lookup(b"base").unwrap().unwrap();
    assert_eq!(tree.nodes()[base].mode, 0o700);
    assert_eq!(tree.lookup(b"base/1/1259").unwrap(), Some(i));
    let err = tree.put(b"base", file_node(Content::Empty, 0)).unwrap_err();
    assert!(err.to_string().contains("has entries"), "{err}");
}
