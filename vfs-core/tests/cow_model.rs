//! Model-based test of the copy-on-write layer: random writes, truncates,
//! extends, creates, renames, deletes and reads on a writable session over
//! a real restore point (in a memory store), checked step by step against
//! a plain in-memory tree. Restarts in the middle (clean, or a crash that
//! leaves only the journal) must give back the same tree, and the restore
//! point itself must never change. A restart may also move the inode
//! numbers the mount gives the restore point's nodes (as when another
//! restore point loads first): nothing the session stored may depend on
//! them.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use vfs_core::backup::{backup, BackupOptions, Source};
use vfs_core::fs::{
    Caller, FsModel, FsOptions, MountFilter, RenameMode, RepoFs, SetAttr, ROOT_INO,
};
use vfs_core::manifest::{Content, Node, NodeKind};
use vfs_core::repo::{Repository, RestorePointName};
use vfs_core::session::{CowFs, SessionInfo, SessionOptions};
use vfs_core::store::MemoryStore;

const NAMES: [&str; 3] = ["a", "b", "c"];
const ME: Caller = Caller { uid: 0, gid: 0 };

/// Every path the operations pick from: depth one and two.
fn paths() -> Vec<String> {
    let mut out: Vec<String> = NAMES.iter().map(|s| s.to_string()).collect();
    for a in NAMES {
        for b in NAMES {
            out.push(format!("{a}/{b}"));
        }
    }
    out
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Entry {
    Dir,
    File(Vec<u8>),
}

type Model = BTreeMap<String, Entry>;

fn parent_of(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(p, _)| p)
}

fn parent_is_dir(m: &Model, path: &str) -> bool {
    let p = parent_of(path);
    p.is_empty() || m.get(p) == Some(&Entry::Dir)
}

fn pattern(seed: u8, len: usize, offset: u64) -> Vec<u8> {
    (0..len)
        .map(|i| {
            seed.wrapping_mul(31)
                .wrapping_add(((offset as usize + i) % 251) as u8)
                | 1
        })
        .collect()
}

#[derive(Clone, Debug)]
enum Op {
    Write {
        path: usize,
        offset: u64,
        len: usize,
        seed: u8,
    },
    Truncate {
        path: usize,
        size: u64,
    },
    Create {
        path: usize,
    },
    Mkdir {
        path: usize,
    },
    Unlink {
        path: usize,
    },
    Rmdir {
        path: usize,
    },
    Rename {
        from: usize,
        to: usize,
    },
    Read {
        path: usize,
        offset: u64,
        len: u32,
    },
    Restart {
        crash: bool,
        /// The next mount numbers the restore point's inodes differently.
        shift: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let n = paths().len();
    prop_oneof![
        6 => (0..n, 0u64..300_000, 1usize..40_000, any::<u8>())
            .prop_map(|(path, offset, len, seed)| Op::Write { path, offset, len, seed }),
        2 => (0..n, 0u64..400_000).prop_map(|(path, size)| Op::Truncate { path, size }),
        2 => (0..n).prop_map(|path| Op::Create { path }),
        1 => (0..n).prop_map(|path| Op::Mkdir { path }),
        1 => (0..n).prop_map(|path| Op::Unlink { path }),
        1 => (0..n).prop_map(|path| Op::Rmdir { path }),
        2 => (0..n, 0..n).prop_map(|(from, to)| Op::Rename { from, to }),
        5 => (0..n, 0u64..400_000, 1u32..300_000)
            .prop_map(|(path, offset, len)| Op::Read { path, offset, len }),
        1 => (any::<bool>(), any::<bool>()).prop_map(|(crash, shift)| Op::Restart { crash, shift }),
    ]
}

/// The restore point: `a/` with file `a/b`, file `b`, empty dir `c/`.
fn base_tree() -> (Vec<Node>, Vec<(String, Vec<u8>)>) {
    let node = |parent: u32, name: &str, kind: NodeKind, size: u64| Node {
        parent,
        name: name.as_bytes().to_vec(),
        kind,
        mode: if kind == NodeKind::Dir { 0o755 } else { 0o644 },
        uid: 0,
        gid: 0,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 0,
        size,
        target: Vec::new(),
        content: Content::Empty,
    };
    let ab: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 253) as u8).collect();
    // Zeros in the middle: a hole in the restore point.
    let mut b: Vec<u8> = (0..120_000u32).map(|i| (i % 241) as u8 + 1).collect();
    b[40_000..80_000].fill(0);
    let nodes = vec![
        node(0, "", NodeKind::Dir, 0),
        node(0, "a", NodeKind::Dir, 0),
        node(1, "b", NodeKind::File, ab.len() as u64),
        node(0, "b", NodeKind::File, b.len() as u64),
        node(0, "c", NodeKind::Dir, 0),
    ];
    (nodes, vec![("a/b".into(), ab), ("b".into(), b)])
}

struct Harness {
    repo: Arc<Repository>,
    rp: RestorePointName,
    state: tempfile::TempDir,
    fs: Option<Arc<CowFs>>,
    /// How far the restore point's inode numbers are moved in the mount
    /// the session runs on now.
    shift: u64,
}

impl Harness {
    fn new() -> (Harness, Model) {
        let store = Arc::new(MemoryStore::new());
        Repository::init(store.as_ref(), None).unwrap();
        let repo = Arc::new(Repository::open(store, || Ok(Vec::new())).unwrap());
        let (nodes, files) = base_tree();
        let mut model = Model::new();
        model.insert("a".into(), Entry::Dir);
        model.insert("c".into(), Entry::Dir);
        let readers = vec![
            (
                2usize,
                Box::new(std::io::Cursor::new(files[0].1.clone())) as Box<_>,
            ),
            (
                3usize,
                Box::new(std::io::Cursor::new(files[1].1.clone())) as Box<_>,
            ),
        ];
        for (p, data) in files {
            model.insert(p, Entry::File(data));
        }
        let opts = BackupOptions {
            job: "base".into(),
            chunker: Some(vfs_core::chunker::ChunkerKind::Fixed(4096)),
            hostname: "test".into(),
            progress: Default::default(),
        };
        let m = backup(
            &repo,
            Source::Tree {
                nodes,
                files: readers,
            },
            &opts,
        )
        .unwrap();
        let rp = RestorePointName::parse(&m.full_name()).unwrap();
        let mut h = Harness {
            repo,
            rp,
            state: tempfile::tempdir().unwrap(),
            fs: None,
            shift: 0,
        };
        h.open(false);
        (h, model)
    }

    fn base(&self) -> Arc<RepoFs> {
        let fs = RepoFs::new(
            self.repo.clone(),
            FsOptions {
                cache_bytes: 1 << 20,
                disk_cache: None,
                readahead_threads: 0,
                uid: 0,
                gid: 0,
                filter: MountFilter {
                    job: None,
                    restore_point: Some(self.rp.clone()),
                    rooted: true,
                },
            },
        )
        .unwrap();
        fs.skip_inodes(self.shift);
        fs
    }

    fn open(&mut self, resume: bool) {
        let options = SessionOptions {
            reserve_bytes: 0,
            min_free_bytes: 0,
        };
        let fs = if resume {
            CowFs::resume(self.base(), self.state.path(), "s", options).unwrap()
        } else {
            let info = SessionInfo {
                format: vfs_core::format::SESSION_FORMAT,
                id: "s".into(),
                repository: "mem".into(),
                restore_point: self.rp.to_string(),
                created: 0,
            };
            CowFs::create(self.base(), self.state.path(), info, options).unwrap()
        };
        self.fs = Some(fs);
    }

    fn fs(&self) -> &CowFs {
        self.fs.as_ref().unwrap()
    }

    fn restart(&mut self, crash: bool) {
        let fs = self.fs.take().unwrap();
        if crash {
            // Only what was written to the journal and data files survives.
            drop(fs);
        } else {
            fs.close(true).unwrap();
        }
        self.open(true);
    }

    /// (parent inode, name) of a path whose parent exists.
    fn locate(&self, path: &str) -> Option<(u64, Vec<u8>)> {
        let mut dir = ROOT_INO;
        let mut parts: Vec<&str> = path.split('/').collect();
        let name = parts.pop().unwrap();
        for p in parts {
            let a = self.fs().lookup(dir, p.as_bytes()).ok()?;
            if a.kind != NodeKind::Dir {
                return None;
            }
            dir = a.ino;
        }
        Some((dir, name.as_bytes().to_vec()))
    }

    fn ino(&self, path: &str) -> Option<u64> {
        let (dir, name) = self.locate(path)?;
        self.fs().lookup(dir, &name).ok().map(|a| a.ino)
    }

    fn read_all(&self, ino: u64, size: u64) -> Vec<u8> {
        let fh = self.fs().open(ino, false, false).unwrap();
        let data = self.fs().read(fh, 0, size as u32 + 10).unwrap();
        self.fs().release(fh);
        data
    }

    /// The whole tree as the session shows it.
    fn snapshot(&self) -> Model {
        let mut out = Model::new();
        let mut stack = vec![(ROOT_INO, String::new())];
        while let Some((dir, prefix)) = stack.pop() {
            for e in self.fs().readdir(dir).unwrap() {
                let name = String::from_utf8(e.name).unwrap();
                let path = if prefix.is_empty() {
                    name
                } else {
                    format!("{prefix}/{name}")
                };
                let a = self.fs().getattr(e.ino).unwrap();
                assert_eq!(a.kind, e.kind, "{path}");
                if a.kind == NodeKind::Dir {
                    out.insert(path.clone(), Entry::Dir);
                    stack.push((e.ino, path));
                } else {
                    out.insert(path, Entry::File(self.read_all(e.ino, a.size)));
                }
            }
        }
        out
    }
}

/// Applies `op` to the model; returns whether it should succeed.
fn model_apply(m: &mut Model, all: &[String], op: &Op) -> bool {
    match op {
        Op::Write {
            path,
            offset,
            len,
            seed,
        } => match m.get_mut(&all[*path]) {
            Some(Entry::File(data)) => {
                let end = *offset as usize + len;
                if data.len() < end {
                    data.resize(end, 0);
                }
                data[*offset as usize..end].copy_from_slice(&pattern(*seed, *len, *offset));
                true
            }
            _ => false,
        },
        Op::Truncate { path, size } => match m.get_mut(&all[*path]) {
            Some(Entry::File(data)) => {
                data.resize(*size as usize, 0);
                true
            }
            _ => false,
        },
        Op::Create { path } | Op::Mkdir { path } => {
            let p = &all[*path];
            if m.contains_key(p) || !parent_is_dir(m, p) {
                return false;
            }
            let e = if matches!(op, Op::Create { .. }) {
                Entry::File(Vec::new())
            } else {
                Entry::Dir
            };
            m.insert(p.clone(), e);
            true
        }
        Op::Unlink { path } => {
            if matches!(m.get(&all[*path]), Some(Entry::File(_))) {
                m.remove(&all[*path]);
                true
            } else {
                false
            }
        }
        Op::Rmdir { path } => {
            let p = &all[*path];
            let prefix = format!("{p}/");
            if m.get(p) == Some(&Entry::Dir) && !m.keys().any(|k| k.starts_with(&prefix)) {
                m.remove(p);
                true
            } else {
                false
            }
        }
        Op::Rename { from, to } => {
            let (src, dst) = (&all[*from], &all[*to]);
            let Some(s) = m.get(src).cloned() else {
                return false;
            };
            if !parent_is_dir(m, dst) {
                return false;
            }
            if src == dst {
                return true;
            }
            let src_prefix = format!("{src}/");
            let dst_prefix = format!("{dst}/");
            if s == Entry::Dir && dst.starts_with(&src_prefix) {
                return false;
            }
            let dst_full = m.keys().any(|k| k.starts_with(&dst_prefix));
            match (m.get(dst), &s) {
                (Some(Entry::Dir), Entry::Dir) if dst_full => return false,
                (Some(Entry::Dir), Entry::File(_)) | (Some(Entry::File(_)), Entry::Dir) => {
                    return false
                }
                _ => {}
            }
            m.remove(dst);
            let moved: Vec<String> = m
                .keys()
                .filter(|k| *k == src || k.starts_with(&src_prefix))
                .cloned()
                .collect();
            for k in moved {
                let e = m.remove(&k).unwrap();
                m.insert(format!("{dst}{}", &k[src.len()..]), e);
            }
            true
        }
        Op::Read { .. } | Op::Restart { .. } => true,
    }
}

fn fs_apply(h: &mut Harness, all: &[String], op: &Op) -> bool {
    match op {
        Op::Write {
            path,
            offset,
            len,
            seed,
        } => {
            let Some(ino) = h.ino(&all[*path]) else {
                return false;
            };
            let Ok(fh) = h.fs().open(ino, true, false) else {
                return false;
            };
            let n = h.fs().write(fh, *offset, &pattern(*seed, *len, *offset));
            h.fs().release(fh);
            n == Ok(*len as u32)
        }
        Op::Truncate { path, size } => {
            let Some(ino) = h.ino(&all[*path]) else {
                return false;
            };
            let set = SetAttr {
                size: Some(*size),
                ..SetAttr::default()
            };
            h.fs().setattr(ino, &set).is_ok()
        }
        Op::Create { path } => {
            let Some((dir, name)) = h.locate(&all[*path]) else {
                return false;
            };
            h.fs()
                .mknod(dir, &name, NodeKind::File, 0o644, 0, ME)
                .is_ok()
        }
        Op::Mkdir { path } => {
            let Some((dir, name)) = h.locate(&all[*path]) else {
                return false;
            };
            h.fs().mkdir(dir, &name, 0o755, ME).is_ok()
        }
        Op::Unlink { path } => {
            let Some((dir, name)) = h.locate(&all[*path]) else {
                return false;
            };
            h.fs().unlink(dir, &name).is_ok()
        }
        Op::Rmdir { path } => {
            let Some((dir, name)) = h.locate(&all[*path]) else {
                return false;
            };
            h.fs().rmdir(dir, &name).is_ok()
        }
        Op::Rename { from, to } => {
            let (Some((d1, n1)), Some((d2, n2))) = (h.locate(&all[*from]), h.locate(&all[*to]))
            else {
                return false;
            };
            h.fs().rename(d1, &n1, d2, &n2, RenameMode::Replace).is_ok()
        }
        Op::Read { .. } => true,
        Op::Restart { crash, shift } => {
            if *shift {
                h.shift += 1000;
            }
            h.restart(*crash);
            true
        }
    }
}

fn check_read(h: &Harness, m: &Model, all: &[String], path: usize, offset: u64, len: u32) {
    let Some(Entry::File(data)) = m.get(&all[path]) else {
        return;
    };
    let ino = h.ino(&all[path]).expect("the model has this file");
    let fh = h.fs().open(ino, false, false).unwrap();
    let got = h.fs().read(fh, offset, len).unwrap();
    h.fs().release(fh);
    let start = (offset as usize).min(data.len());
    let end = (offset as usize + len as usize).min(data.len());
    assert!(
        got == data[start..end],
        "read of {} at {offset}+{len} differs",
        all[path]
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn session_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        let all = paths();
        let (mut h, mut model) = Harness::new();
        let original = h.snapshot();
        prop_assert_eq!(&original, &model);
        for op in &ops {
            let expect = model_apply(&mut model, &all, op);
            let got = fs_apply(&mut h, &all, op);
            prop_assert_eq!(got, expect, "{:?}", op);
            if let Op::Read { path, offset, len } = op {
                check_read(&h, &model, &all, *path, *offset, *len);
            }
        }
        prop_assert!(h.snapshot() == model, "tree differs from the model");
        h.restart(true);
        prop_assert!(h.snapshot() == model, "tree differs after a crash and resume");
        // The restore point underneath never changed.
        let base = h.base();
        let file = base.lookup(ROOT_INO, b"b").unwrap();
        let fh = base.open(file.ino, false).unwrap();
        let (_, files) = base_tree();
        prop_assert!(base.read(fh, 0, 200_000).unwrap() == files[1].1);
    }
}

/// A file's unchanged ranges come from the restore point and only written
/// bytes are stored: a 4 KiB write into a 200 KB file stores about 4 KiB.
#[test]
fn writes_store_only_changed_ranges() {
    let (h, _) = Harness::new();
    let ino = h.ino("a/b").unwrap();
    let fh = h.fs().open(ino, true, false).unwrap();
    h.fs().write(fh, 100_000, &[9u8; 4096]).unwrap();
    h.fs().release(fh);
    // `a/b` is node 2 of the restore point's manifest.
    let name = vfs_core::format::NodeRef::RestorePoint(2).data_file_name();
    let data = h.state.path().join("s/data").join(name);
    let meta = std::fs::metadata(&data).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 <= 8192,
        "data file takes {} bytes",
        meta.blocks() * 512
    );
    let attr = h.fs().getattr(ino).unwrap();
    assert_eq!(attr.size, 200_000);
}

/// A truncate below the restore point's data and an extend back: the gap
/// reads as zeros, never as the old bytes.
#[test]
fn truncate_then_extend_reads_zeros() {
    let (h, _) = Harness::new();
    let ino = h.ino("a/b").unwrap();
    let shrink = SetAttr {
        size: Some(1000),
        ..SetAttr::default()
    };
    h.fs().setattr(ino, &shrink).unwrap();
    let grow = SetAttr {
        size: Some(200_000),
        ..SetAttr::default()
    };
    h.fs().setattr(ino, &grow).unwrap();
    let data = h.read_all(ino, 200_000);
    assert_eq!(data.len(), 200_000);
    assert!(data[1000..].iter().all(|&b| b == 0));
    assert_eq!(data[999], (999u32 * 7 % 253) as u8);
}

/// Changes to a file that is open but unlinked (a temporary file) leave
/// nothing a restart would trip over, and are readable until closed.
#[test]
fn an_unlinked_open_file_works_until_closed_and_survives_restarts() {
    let (mut h, _) = Harness::new();
    for base_file in [true, false] {
        let (dir, name) = if base_file {
            h.locate("a/b").unwrap()
        } else {
            let a = h
                .fs()
                .mknod(ROOT_INO, b"tmp", NodeKind::File, 0o600, 0, ME)
                .unwrap();
            assert!(a.ino >= vfs_core::session::FIRST_NEW_INO);
            (ROOT_INO, b"tmp".to_vec())
        };
        let ino = h.fs().lookup(dir, &name).unwrap().ino;
        let fh = h.fs().open(ino, true, false).unwrap();
        h.fs().unlink(dir, &name).unwrap();
        assert_eq!(h.fs().write(fh, 10, b"still here"), Ok(10));
        let grow = SetAttr {
            size: Some(50),
            ..SetAttr::default()
        };
        h.fs().setattr(ino, &grow).unwrap();
        assert_eq!(&h.fs().read(fh, 10, 10).unwrap(), b"still here");
        h.fs().release(fh);
        assert!(h.fs().getattr(ino).is_err());
        h.restart(true);
        assert!(h.fs().lookup(dir, &name).is_err());
        h.restart(false);
    }
}

/// Changes to restore point files and directories, and to nodes made in
/// the session, survive restarts whose mounts number the restore point's
/// inodes differently: once replayed from the journal after a crash, once
/// read back from a checkpoint.
#[test]
fn a_session_survives_inode_numbers_that_move() {
    let all = paths();
    let at = |p: &str| all.iter().position(|x| x == p).unwrap();
    let (mut h, mut model) = Harness::new();
    let ops = [
        Op::Write {
            path: at("a/b"),
            offset: 1000,
            len: 5000,
            seed: 1,
        },
        Op::Truncate {
            path: at("b"),
            size: 50_000,
        },
        Op::Mkdir { path: at("c/a") },
        Op::Rename {
            from: at("a/b"),
            to: at("c/b"),
        },
        Op::Create { path: at("a/c") },
        Op::Write {
            path: at("a/c"),
            offset: 10,
            len: 100,
            seed: 2,
        },
        Op::Rmdir { path: at("c/a") },
        Op::Restart {
            crash: true,
            shift: true,
        },
        Op::Write {
            path: at("c/b"),
            offset: 0,
            len: 10,
            seed: 3,
        },
        Op::Unlink { path: at("b") },
        Op::Restart {
            crash: false,
            shift: true,
        },
        Op::Restart {
            crash: true,
            shift: true,
        },
    ];
    for op in &ops {
        let expect = model_apply(&mut model, &all, op);
        assert_eq!(fs_apply(&mut h, &all, op), expect, "{op:?}");
        assert!(
            h.snapshot() == model,
            "tree differs from the model after {op:?}"
        );
    }
    assert_eq!(h.shift, 3000);
}
