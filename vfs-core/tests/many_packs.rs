//! `verify --read-data` on a repository of more packs than a process may
//! hold memory mappings (`vm.max_map_count`, 65,530 by default): every
//! pack is checked, none is reported damaged, and the process's mappings
//! and open files stay bounded.

use std::sync::Arc;

use vfs_core::backup::{backup, BackupOptions, Source};
use vfs_core::local_store::LocalStore;
use vfs_core::manifest::{Content, Node, NodeKind};
use vfs_core::repo::Repository;

/// More than the default `vm.max_map_count`.
const PACKS: usize = 65_600;

fn count(path: &str) -> usize {
    match std::fs::read_dir(path) {
        Ok(d) => d.count(),
        Err(_) => std::fs::read_to_string(path).unwrap().lines().count(),
    }
}

#[test]
fn verify_reads_more_packs_than_a_process_may_map() {
    // tmpfs keeps a hundred thousand fsyncs cheap; the store is the real
    // local store either way.
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm")
    } else {
        tempfile::tempdir()
    }
    .unwrap();
    let store = Arc::new(LocalStore::open(base.path()).unwrap());
    Repository::init(store.as_ref(), None).unwrap();
    let repo = Repository::open(store.clone(), || Ok(Vec::new())).unwrap();
    // Every frame closes its pack; one small file is one frame.
    repo.set_pack_target(1);
    let mut nodes = vec![Node {
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
    }];
    let mut files: Vec<(usize, Box<dyn std::io::Read + Send>)> = Vec::new();
    for i in 0..PACKS {
        let data = format!("file {i} of the many-packs repository\n").into_bytes();
        nodes.push(Node {
            name: format!("f{i}").into_bytes(),
            kind: NodeKind::File,
            mode: 0o644,
            size: data.len() as u64,
            ..nodes[0].clone()
        });
        files.push((i + 1, Box::new(std::io::Cursor::new(data))));
    }
    let opts = BackupOptions {
        job: "many".into(),
        chunker: None,
        hostname: "test".into(),
        progress: Default::default(),
    };
    let m = backup(&repo, Source::Tree { nodes, files }, &opts).unwrap();
    assert_eq!(m.stats.new_chunks, PACKS as u64);
    drop(repo);

    let repo = Repository::open(store, || Ok(Vec::new())).unwrap();
    let before = (count("/proc/self/maps"), count("/proc/self/fd"));
    let report = vfs_core::verify::verify(&repo, true, &Default::default()).unwrap();
    let after = (count("/proc/self/maps"), count("/proc/self/fd"));
    assert!(
        report.is_clean(),
        "{:?}",
        &report.problems[..report.problems.len().min(5)]
    );
    assert_eq!(report.packs, PACKS as u64);
    assert_eq!(report.chunks_checked, PACKS as u64);
    // Nothing per pack is kept: a few threads' worth of growth at most.
    assert!(after.0 < before.0 + 200, "mappings {before:?} -> {after:?}");
    assert!(
        after.1 < before.1 + 300,
        "open files {before:?} -> {after:?}"
    );
}

#[test]
fn large_reads_leave_no_mapping_behind() {
    use vfs_core::store::ObjectStore;
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    let big = vec![7u8; 6 << 20];
    store.put("packs/ab/big.pack", &big).unwrap();
    assert_eq!(
        &*store.get_range("packs/ab/big.pack", 0, big.len()).unwrap(),
        &big[..]
    );
    assert_eq!(store.get("packs/ab/big.pack").unwrap(), big);
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    assert!(
        !maps.contains("big.pack"),
        "a pack stays mapped after its read:\n{maps}"
    );
}
