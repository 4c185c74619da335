//! The ingest filesystem: random writes, truncates, renames and unlinks
//! through its `FsModel` calls match a model of paths and bytes, and the
//! committed restore point read back from the repository holds exactly
//! that; metadata comes from the callers; an abort or a failed store
//! commits nothing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use proptest::prelude::*;
use vfs_core::fs::{Caller, FsError, FsModel, RenameMode, SetAttr, SetTime, ROOT_INO};
use vfs_core::ingest_fs::{IngestFs, IngestOptions};
use vfs_core::manifest::{Content, Manifest, NodeKind};
use vfs_core::repo::Repository;
use vfs_core::store::{MemoryStore, ObjectBytes, ObjectStore};

/// A store whose writes fail as a full disk's do once `full` is set.
#[derive(Default)]
struct FillingStore {
    inner: MemoryStore,
    full: AtomicBool,
}

impl ObjectStore for FillingStore {
    fn location(&self) -> String {
        "filling store".into()
    }
    fn put(&self, key: &str, data: &[u8]) -> vfs_core::Result<()> {
        if self.full.load(Ordering::SeqCst) {
            return Err(vfs_core::Error::io(
                key,
                std::io::Error::from_raw_os_error(28),
            ));
        }
        self.inner.put(key, data)
    }
    fn get(&self, key: &str) -> vfs_core::Result<Vec<u8>> {
        self.inner.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: usize) -> vfs_core::Result<ObjectBytes> {
        self.inner.get_range(key, offset, len)
    }
    fn size(&self, key: &str) -> vfs_core::Result<Option<u64>> {
        self.inner.size(key)
    }
    fn list(&self, prefix: &str) -> vfs_core::Result<Vec<String>> {
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> vfs_core::Result<()> {
        self.inner.delete(key)
    }
}

fn new_repo() -> (Arc<FillingStore>, Arc<Repository>) {
    let store = Arc::new(FillingStore::default());
    Repository::init(store.as_ref(), None).unwrap();
    let repo = Repository::open(store.clone(), || unreachable!("not encrypted")).unwrap();
    (store, Arc::new(repo))
}

fn options(batch_bytes: usize) -> IngestOptions {
    IngestOptions {
        root_uid: 26,
        root_gid: 27,
        root_mode: 0o700,
        batch_bytes,
        space_path: None,
    }
}

const ME: Caller = Caller { uid: 26, gid: 27 };

/// Bytes that do not repeat, so chunks are mostly new.
fn pattern(len: usize, seed: u8, from: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let x = (from + i) as u32;
            (x.wrapping_mul(2_654_435_761).rotate_left(seed as u32 % 31) >> 13) as u8
        })
        .collect()
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

/// Every node of a manifest by its path.
fn by_path(m: &Manifest) -> BTreeMap<String, usize> {
    let mut paths: Vec<String> = vec![String::new()];
    let mut out = BTreeMap::new();
    for (i, n) in m.nodes.iter().enumerate().skip(1) {
        let parent = &paths[n.parent as usize];
        let p = if parent.is_empty() {
            String::from_utf8_lossy(&n.name).into_owned()
        } else {
            format!("{parent}/{}", String::from_utf8_lossy(&n.name))
        };
        paths.push(p.clone());
        out.insert(p, i);
    }
    out
}

/// The committed restore point, read back from a freshly opened
/// repository (so only what is durable counts).
fn reread(store: &Arc<FillingStore>, m: &Manifest) -> (Repository, Manifest) {
    let repo = Repository::open(store.clone(), || unreachable!()).unwrap();
    let names = repo.list_restore_points(Some(&m.job)).unwrap();
    assert_eq!(names.len(), 1, "one restore point: {names:?}");
    let loaded = repo.load_manifest(&names[0]).unwrap();
    (repo, loaded)
}

const PATHS: [&str; 5] = ["a.dump", "b", "toc.dat", "d/x", "d/y.db"];

#[derive(Debug, Clone)]
enum Op {
    Write {
        f: usize,
        at: u32,
        len: u32,
        seed: u8,
    },
    Append {
        f: usize,
        len: u32,
        seed: u8,
    },
    SetLen {
        f: usize,
        len: u32,
    },
    Rename {
        f: usize,
        g: usize,
    },
    Unlink {
        f: usize,
    },
    Read {
        f: usize,
        at: u32,
        len: u32,
    },
    Reopen {
        f: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let f = 0..PATHS.len();
    prop_oneof![
        (f.clone(), 0u32..200_000, 1u32..30_000, any::<u8>())
            .prop_map(|(f, at, len, seed)| Op::Write { f, at, len, seed }),
        (f.clone(), 1u32..150_000, any::<u8>()).prop_map(|(f, len, seed)| Op::Append {
            f,
            len,
            seed
        }),
        (f.clone(), 0u32..200_000).prop_map(|(f, len)| Op::SetLen { f, len }),
        (f.clone(), f.clone()).prop_map(|(f, g)| Op::Rename { f, g }),
        f.clone().prop_map(|f| Op::Unlink { f }),
        (f.clone(), 0u32..220_000, 0u32..60_000).prop_map(|(f, at, len)| Op::Read { f, at, len }),
        f.prop_map(|f| Op::Reopen { f }),
    ]
}

/// The inode of a path's directory and the path's last name.
fn parent_of(fs: &IngestFs, dir: u64, path: &str) -> (u64, Vec<u8>) {
    match path.split_once('/') {
        Some((d, name)) => (fs.lookup(ROOT_INO, d.as_bytes()).unwrap().ino, name.into()),
        None => (dir, path.as_bytes().to_vec()),
    }
}

/// The open handle of `path`, made (an empty file) if it does not exist.
fn ensure_open(
    fs: &IngestFs,
    open: &mut BTreeMap<&'static str, u64>,
    model: &mut BTreeMap<&'static str, Vec<u8>>,
    path: &'static str,
) -> u64 {
    if let Some(&fh) = open.get(path) {
        return fh;
    }
    let (dir, name) = parent_of(fs, ROOT_INO, path);
    let attr = fs.mknod(dir, &name, NodeKind::File, 0o640, 0, ME).unwrap();
    model.insert(path, Vec::new());
    let fh = fs.open(attr.ino, true, false).unwrap();
    open.insert(path, fh);
    fh
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn writes_truncates_and_renames_commit_what_a_model_holds(
        ops in proptest::collection::vec(op(), 1..30)
    ) {
        let (store, repo) = new_repo();
        repo.set_pack_target(96 << 10); // many packs, so patches cross them
        // A small batch, so writes cut and store often.
        let fs = IngestFs::new(repo.clone(), options(40_000)).unwrap();
        fs.mkdir(ROOT_INO, b"d", 0o750, ME).unwrap();
        let mut model: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
        // Each existing file has one open handle.
        let mut open: BTreeMap<&str, u64> = BTreeMap::new();
        for op in &ops {
            match *op {
                Op::Write { f, at, len, seed } => {
                    let fh = ensure_open(&fs, &mut open, &mut model, PATHS[f]);
                    let data = pattern(len as usize, seed, at as usize);
                    prop_assert_eq!(fs.write(fh, at as u64, &data).unwrap(), len);
                    let m = model.get_mut(PATHS[f]).unwrap();
                    let end = (at + len) as usize;
                    if m.len() < end { m.resize(end, 0); }
                    m[at as usize..end].copy_from_slice(&data);
                }
                Op::Append { f, len, seed } => {
                    let fh = ensure_open(&fs, &mut open, &mut model, PATHS[f]);
                    let m = model.get_mut(PATHS[f]).unwrap();
                    let data = pattern(len as usize, seed, m.len());
                    fs.write(fh, m.len() as u64, &data).unwrap();
                    m.extend_from_slice(&data);
                }
                Op::SetLen { f, len } => {
                    if model.contains_key(PATHS[f]) {
                        let (dir, name) = parent_of(&fs, ROOT_INO, PATHS[f]);
                        let ino = fs.lookup(dir, &name).unwrap().ino;
                        let set = SetAttr { size: Some(len as u64), ..SetAttr::default() };
                        prop_assert_eq!(fs.setattr(ino, &set).unwrap().size, len as u64);
                        model.get_mut(PATHS[f]).unwrap().resize(len as usize, 0);
                    }
                }
                Op::Rename { f, g } => {
                    let (dir, name) = parent_of(&fs, ROOT_INO, PATHS[f]);
                    let (to_dir, to_name) = parent_of(&fs, ROOT_INO, PATHS[g]);
                    let r = fs.rename(dir, &name, to_dir, &to_name, RenameMode::Replace);
                    match model.remove(PATHS[f]) {
                        None => prop_assert_eq!(r, Err(FsError::NotFound)),
                        Some(bytes) => {
                            r.unwrap();
                            // The replaced file's handle stays usable
                            // until closed; its name is gone.
                            let fh = open.remove(PATHS[f]).unwrap();
                            if f != g {
                                if let Some(old) = open.insert(PATHS[g], fh) {
                                    fs.release(old);
                                }
                            } else {
                                open.insert(PATHS[g], fh);
                            }
                            model.insert(PATHS[g], bytes);
                        }
                    }
                }
                Op::Unlink { f } => {
                    let (dir, name) = parent_of(&fs, ROOT_INO, PATHS[f]);
                    let r = fs.unlink(dir, &name);
                    match model.remove(PATHS[f]) {
                        None => prop_assert_eq!(r, Err(FsError::NotFound)),
                        Some(_) => {
                            r.unwrap();
                            let fh = open.remove(PATHS[f]).unwrap();
                            // Writing to an unlinked open file still works.
                            fs.write(fh, 0, b"gone").unwrap();
                            fs.release(fh);
                        }
                    }
                }
                Op::Read { f, at, len } => {
                    if let Some(m) = model.get(PATHS[f]) {
                        let fh = open[PATHS[f]];
                        let got = fs.read(fh, at as u64, len).unwrap();
                        let lo = (at as usize).min(m.len());
                        let hi = (at as usize + len as usize).min(m.len());
                        prop_assert_eq!(&got[..], &m[lo..hi]);
                    }
                }
                Op::Reopen { f } => {
                    // Closing keeps the file; it opens again for rewrites.
                    if let Some(fh) = open.remove(PATHS[f]) {
                        fs.release(fh);
                        let (dir, name) = parent_of(&fs, ROOT_INO, PATHS[f]);
                        let ino = fs.lookup(dir, &name).unwrap().ino;
                        open.insert(PATHS[f], fs.open(ino, true, false).unwrap());
                    }
                }
            }
            for (path, bytes) in &model {
                let (dir, name) = parent_of(&fs, ROOT_INO, path);
                prop_assert_eq!(fs.lookup(dir, &name).unwrap().size, bytes.len() as u64);
            }
        }
        let committed = fs.commit("ingest", "test").unwrap();
        // Later writes are refused.
        if let Some(&fh) = open.values().next() {
            prop_assert_eq!(fs.write(fh, 0, b"late"), Err(FsError::ReadOnly));
        }
        let (repo, m) = reread(&store, &committed);
        let paths = by_path(&m);
        let mut want: Vec<String> = model.keys().map(|p| p.to_string()).collect();
        want.push("d".into());
        want.sort();
        prop_assert_eq!(paths.keys().cloned().collect::<Vec<_>>(), want);
        for (path, bytes) in &model {
            let node = &m.nodes[paths[*path]];
            prop_assert_eq!(node.size, bytes.len() as u64);
            prop_assert_eq!(&read_content(&repo, &node.content, node.size), bytes);
            prop_assert_eq!((node.uid, node.gid, node.mode), (26, 27, 0o640));
        }
        prop_assert_eq!(m.stats.files, model.len() as u64);
        let report = vfs_core::verify::verify(&repo, true, &Default::default()).unwrap();
        prop_assert!(report.is_clean(), "{:?}", report.problems);
    }
}

#[test]
fn metadata_symlinks_and_empty_directories_are_committed() {
    let (store, repo) = new_repo();
    let fs = IngestFs::new(repo, options(1 << 20)).unwrap();
    let other = Caller {
        uid: 1000,
        gid: 100,
    };
    let dir = fs.mkdir(ROOT_INO, b"base", 0o700, other).unwrap();
    fs.mkdir(dir.ino, b"empty", 0o755, other).unwrap();
    fs.symlink(ROOT_INO, b"latest", b"base/file", ME).unwrap();
    let f = fs
        .mknod(dir.ino, b"file", NodeKind::File, 0o600, 0, other)
        .unwrap();
    let fh = fs.open(f.ino, true, false).unwrap();
    fs.write(fh, 0, b"hello, restore point").unwrap();
    fs.release(fh);
    let set = SetAttr {
        mode: Some(0o644),
        mtime: Some(SetTime::At(1_700_000_000, 5)),
        ..SetAttr::default()
    };
    fs.setattr(f.ino, &set).unwrap();
    // Pipes and device nodes have no place in a restore point.
    assert_eq!(
        fs.mknod(ROOT_INO, b"fifo", NodeKind::Fifo, 0o644, 0, ME),
        Err(FsError::NotPermitted)
    );
    assert_eq!(
        fs.link(f.ino, ROOT_INO, b"hard"),
        Err(FsError::NotPermitted)
    );
    assert_eq!(fs.rmdir(ROOT_INO, b"base"), Err(FsError::NotEmpty));
    assert_eq!(fs.getattr(ROOT_INO).unwrap().nlink, 3);

    let committed = fs.commit("meta", "host").unwrap();
    let (repo, m) = reread(&store, &committed);
    assert_eq!(
        (m.nodes[0].uid, m.nodes[0].gid, m.nodes[0].mode),
        (26, 27, 0o700)
    );
    let paths = by_path(&m);
    let keys: Vec<&str> = paths.keys().map(String::as_str).collect();
    assert_eq!(keys, ["base", "base/empty", "base/file", "latest"]);
    let file = &m.nodes[paths["base/file"]];
    assert_eq!((file.uid, file.gid, file.mode), (1000, 100, 0o644));
    assert_eq!((file.mtime_sec, file.mtime_nsec), (1_700_000_000, 5));
    assert_eq!(
        read_content(&repo, &file.content, file.size),
        b"hello, restore point"
    );
    let link = &m.nodes[paths["latest"]];
    assert_eq!(link.kind, NodeKind::Symlink);
    assert_eq!(link.target, b"base/file");
    assert_eq!(m.nodes[paths["base"]].mode, 0o700);
    assert_eq!(m.stats.files, 1);
    assert_eq!(m.stats.dirs, 2);
    assert_eq!(m.stats.symlinks, 1);
    // A second commit is refused.
    assert!(fs.commit("meta", "host").is_err());
}

#[test]
fn a_header_patched_after_a_long_write_and_reads_while_writing() {
    let (store, repo) = new_repo();
    repo.set_pack_target(256 << 10);
    let fs = IngestFs::new(repo, options(1 << 20)).unwrap();
    let f = fs
        .mknod(ROOT_INO, b"toc.dat", NodeKind::File, 0o644, 0, ME)
        .unwrap();
    let fh = fs.open(f.ino, true, false).unwrap();
    let mut model = vec![0u8; 4096];
    fs.write(fh, 0, &model).unwrap();
    for k in 0..200 {
        let piece = pattern(50_000, 3, model.len());
        fs.write(fh, model.len() as u64, &piece).unwrap();
        model.extend_from_slice(&piece);
        if k % 50 == 0 {
            // What was written, stored or not, reads back.
            let got = fs.read(fh, 1000, 200_000).unwrap();
            assert_eq!(got, model[1000..model.len().min(201_000)]);
        }
    }
    fs.write(fh, 0, b"HEADER v2").unwrap();
    model[..9].copy_from_slice(b"HEADER v2");
    assert_eq!(fs.read(fh, 0, 4096).unwrap(), model[..4096]);
    fs.release(fh);
    let committed = fs.commit("patched", "host").unwrap();
    let (repo, m) = reread(&store, &committed);
    let node = &m.nodes[by_path(&m)["toc.dat"]];
    assert_eq!(read_content(&repo, &node.content, node.size), model);
    assert_eq!(m.stats.logical_bytes, model.len() as u64);
}

#[test]
fn an_abort_commits_nothing_and_the_next_ingest_reuses_its_packs() {
    let (store, repo) = new_repo();
    repo.set_pack_target(128 << 10);
    let data = pattern(3_000_000, 9, 0);
    let write_all = |fs: &IngestFs| {
        let f = fs
            .mknod(ROOT_INO, b"dump.bin", NodeKind::File, 0o644, 0, ME)
            .unwrap();
        let fh = fs.open(f.ino, true, false).unwrap();
        for (k, piece) in data.chunks(131_072).enumerate() {
            fs.write(fh, (k * 131_072) as u64, piece).unwrap();
        }
        fs.release(fh);
    };
    let fs = IngestFs::new(repo.clone(), options(1 << 20)).unwrap();
    write_all(&fs);
    fs.abort();
    drop(fs);
    assert!(repo.list_restore_points(None).unwrap().is_empty());
    let fs = IngestFs::new(repo.clone(), options(1 << 20)).unwrap();
    write_all(&fs);
    let committed = fs.commit("again", "host").unwrap();
    // All but the last batch, still in memory at the abort, is reused.
    assert!(
        committed.stats.new_chunk_bytes < 1_100_000,
        "{} bytes stored again",
        committed.stats.new_chunk_bytes
    );
    let (repo, m) = reread(&store, &committed);
    let node = &m.nodes[1];
    assert_eq!(read_content(&repo, &node.content, node.size), data);
}

#[test]
fn a_full_disk_fails_writes_and_the_commit_and_leaves_no_restore_point() {
    let (store, repo) = new_repo();
    repo.set_pack_target(64 << 10);
    let fs = IngestFs::new(repo.clone(), options(64 << 10)).unwrap();
    let f = fs
        .mknod(ROOT_INO, b"big.dump", NodeKind::File, 0o644, 0, ME)
        .unwrap();
    let fh = fs.open(f.ino, true, false).unwrap();
    fs.write(fh, 0, &pattern(500_000, 1, 0)).unwrap();
    store.full.store(true, Ordering::SeqCst);
    let mut failed = None;
    for k in 1..200 {
        if let Err(e) = fs.write(fh, k * 100_000 + 400_000, &pattern(100_000, 2, 0)) {
            failed = Some(e);
            break;
        }
    }
    assert_eq!(failed, Some(FsError::NoSpace));
    let err = fs.commit("full", "host").unwrap_err().to_string();
    assert!(
        err.contains("os error 28") || err.contains("No space"),
        "{err}"
    );
    store.full.store(false, Ordering::SeqCst);
    assert!(repo.list_restore_points(None).unwrap().is_empty());
}
