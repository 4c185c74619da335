//! Replay of damaged or forged session files: each is refused with an
//! error naming the file, never a panic or a hang.

use std::sync::Arc;

use super::*;
use crate::backup::{backup, BackupOptions};
use crate::fs::{FsOptions, MountFilter};
use crate::manifest::Node as ManifestNode;
use crate::repo::{Repository, RestorePointName};
use crate::store::MemoryStore;

const T: Time = (1_700_000_000, 0);
const S0: u64 = FIRST_SESSION_NODE;

/// A restore point `d/` (node 1) holding `d/f` (node 2), a file `g`
/// (node 3) and an empty directory `e/` (node 4), and a state directory
/// holding a session `s` over it.
struct Fixture {
    repo: Arc<Repository>,
    rp: RestorePointName,
    state: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let store = Arc::new(MemoryStore::new());
        Repository::init(store.as_ref(), None).unwrap();
        let repo = Arc::new(Repository::open(store, || Ok(Vec::new())).unwrap());
        let node = |parent: u32, name: &str, kind: NodeKind, size: u64| ManifestNode {
            parent,
            name: name.as_bytes().to_vec(),
            kind,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime_sec: 1_700_000_000,
            mtime_nsec: 0,
            size,
            target: Vec::new(),
            content: Content::Empty,
        };
        let nodes = vec![
            node(0, "", NodeKind::Dir, 0),
            node(0, "d", NodeKind::Dir, 0),
            node(1, "f", NodeKind::File, 5000),
            node(0, "g", NodeKind::File, 3),
            node(0, "e", NodeKind::Dir, 0),
        ];
        let files: Vec<(usize, Box<dyn Read + Send>)> = vec![
            (2, Box::new(std::io::Cursor::new(vec![7u8; 5000]))),
            (3, Box::new(std::io::Cursor::new(b"abc".to_vec()))),
        ];
        let opts = BackupOptions {
            job: "j".into(),
            chunker: None,
            hostname: "test".into(),
            progress: Default::default(),
        };
        let m = backup(&repo, Source::Tree { nodes, files }, &opts).unwrap();
        let fx = Fixture {
            repo,
            rp: RestorePointName::parse(&m.full_name()).unwrap(),
            state: tempfile::tempdir().unwrap(),
        };
        let info = SessionInfo {
            format: SESSION_FORMAT,
            id: "s".into(),
            repository: "mem".into(),
            restore_point: fx.rp.to_string(),
            created: 0,
        };
        let fs = CowFs::create(fx.base(), fx.state.path(), info, options()).unwrap();
        fs.close(true).unwrap();
        fx
    }

    fn base(&self) -> Arc<RepoFs> {
        RepoFs::new(
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
        .unwrap()
    }

    fn dir(&self) -> PathBuf {
        self.state.path().join("s")
    }

    fn path(&self, file: &str) -> String {
        self.dir().join(file).display().to_string()
    }

    /// Replaces the checkpoint (when given) and the journal.
    fn write(&self, snap: Option<&Snapshot>, generation: u64, ops: &[Op<NodeRef>]) {
        if let Some(snap) = snap {
            std::fs::write(self.dir().join("state"), encode_state(snap).unwrap()).unwrap();
        }
        let mut journal = format::journal_header(generation).to_vec();
        for op in ops {
            journal.extend(encode_record(op).unwrap());
        }
        std::fs::write(self.dir().join("journal"), journal).unwrap();
    }

    fn resume(&self) -> Result<Arc<CowFs>> {
        CowFs::resume(self.base(), self.state.path(), "s", options())
    }

    /// Resumes, expecting a refusal that names `file`; returns the message.
    #[track_caller]
    fn refused(&self, file: &str) -> String {
        let msg = match self.resume() {
            Ok(_) => panic!("a bad {file} was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(msg.contains(&self.path(file)), "{msg}");
        msg
    }
}

fn options() -> SessionOptions {
    SessionOptions {
        reserve_bytes: 0,
        min_free_bytes: 0,
    }
}

fn dir_node(nlink: u32, parent: NodeRef, children: &[(&str, NodeRef)]) -> Node<NodeRef> {
    Node {
        kind: NodeKind::Dir,
        mode: 0o755,
        uid: 0,
        gid: 0,
        nlink,
        rdev: 0,
        atime: T,
        mtime: T,
        ctime: T,
        body: Body::Dir {
            parent,
            children: children
                .iter()
                .map(|(n, r)| (n.as_bytes().to_vec(), *r))
                .collect(),
        },
        open: 0,
    }
}

/// A checkpoint of generation 1 holding `nodes`, session ids up to
/// `next_id`.
fn snapshot(next_id: u64, nodes: Vec<(NodeRef, Node<NodeRef>)>) -> Snapshot {
    Snapshot {
        format: SESSION_FORMAT,
        generation: 1,
        next_id,
        nodes,
    }
}

/// The restore point's root as a checkpoint holds it, with `nlink` links
/// and `extra` children besides the restore point's own.
fn root(nlink: u32, extra: &[(&str, NodeRef)]) -> (NodeRef, Node<NodeRef>) {
    let mut children = vec![
        ("d", NodeRef::RestorePoint(1)),
        ("g", NodeRef::RestorePoint(3)),
        ("e", NodeRef::RestorePoint(4)),
    ];
    children.extend_from_slice(extra);
    (
        NodeRef::RestorePoint(0),
        dir_node(nlink, NodeRef::RestorePoint(0), &children),
    )
}

fn mkdir(parent: NodeRef, name: &str, ino: NodeRef) -> Op<NodeRef> {
    Op::Make {
        parent,
        name: name.as_bytes().to_vec(),
        ino,
        kind: NodeKind::Dir,
        mode: 0o755,
        uid: 0,
        gid: 0,
        rdev: 0,
        target: Vec::new(),
        time: T,
    }
}

#[test]
fn the_fixture_resumes() {
    let fx = Fixture::new();
    let ops = [
        mkdir(NodeRef::RestorePoint(0), "x", NodeRef::Session(S0)),
        Op::Write {
            ino: NodeRef::RestorePoint(2),
            offset: 0,
            len: 0,
            time: T,
        },
    ];
    fx.write(None, 1, &ops);
    let fs = fx.resume().unwrap();
    assert_eq!(fs.lookup(ROOT_INO, b"x").unwrap().ino, S0);
}

#[test]
fn a_record_naming_a_node_the_restore_point_lacks_is_refused() {
    let fx = Fixture::new();
    for ino in [NodeRef::RestorePoint(5), NodeRef::RestorePoint(u32::MAX)] {
        fx.write(
            None,
            1,
            &[Op::Write {
                ino,
                offset: 0,
                len: 1,
                time: T,
            }],
        );
        fx.refused("journal");
    }
}

#[test]
fn a_record_naming_an_id_below_the_session_range_is_refused() {
    let fx = Fixture::new();
    fx.write(
        None,
        1,
        &[mkdir(NodeRef::Session(3), "x", NodeRef::Session(S0))],
    );
    fx.refused("journal");
}

/// A node made over one that exists would replace it (the old code then
/// panicked when the root it replaced turned out not to be a directory).
#[test]
fn a_make_over_an_existing_node_is_refused() {
    let fx = Fixture::new();
    for ino in [
        NodeRef::RestorePoint(0),
        NodeRef::RestorePoint(3),
        NodeRef::Session(u64::MAX),
    ] {
        let mut op = mkdir(NodeRef::RestorePoint(0), "x", ino);
        if let Op::Make { kind, .. } = &mut op {
            *kind = NodeKind::File;
        }
        fx.write(None, 1, &[op]);
        fx.refused("journal");
    }
    // An id used twice.
    fx.write(
        None,
        1,
        &[
            mkdir(NodeRef::RestorePoint(0), "x", NodeRef::Session(S0)),
            mkdir(NodeRef::RestorePoint(1), "y", NodeRef::Session(S0)),
        ],
    );
    fx.refused("journal");
}

#[test]
fn a_write_past_the_largest_offset_is_refused() {
    let fx = Fixture::new();
    fx.write(
        None,
        1,
        &[Op::Write {
            ino: NodeRef::RestorePoint(3),
            offset: u64::MAX - 1,
            len: 10,
            time: T,
        }],
    );
    fx.refused("journal");
}

/// The link count decrement of a directory removal: a parent whose count
/// says it holds no directory (here the root, at 2 links with an empty
/// session directory in it) is refused instead of counting below 2.
#[test]
fn removing_a_directory_from_a_parent_with_too_few_links_is_refused() {
    let fx = Fixture::new();
    let snap = snapshot(
        S0 + 1,
        vec![
            root(1, &[("x", NodeRef::Session(S0))]),
            (
                NodeRef::Session(S0),
                dir_node(2, NodeRef::RestorePoint(0), &[]),
            ),
        ],
    );
    let remove = Op::Remove {
        parent: NodeRef::RestorePoint(0),
        name: b"x".to_vec(),
        dir: true,
        time: T,
    };
    fx.write(Some(&snap), 1, std::slice::from_ref(&remove));
    let msg = fx.refused("journal");
    assert!(msg.contains("links"), "{msg}");
    // Moving it elsewhere counts the same way.
    let rename = Op::Rename {
        parent: NodeRef::RestorePoint(0),
        name: b"x".to_vec(),
        new_parent: NodeRef::RestorePoint(4),
        new_name: b"x".to_vec(),
        exchange: false,
        no_replace: false,
        time: T,
    };
    fx.write(Some(&snap), 1, &[rename]);
    fx.refused("journal");
    // And a directory count at its largest cannot take one more.
    let full = snapshot(S0, vec![root(u32::MAX, &[])]);
    fx.write(
        Some(&full),
        1,
        &[mkdir(NodeRef::RestorePoint(0), "y", NodeRef::Session(S0))],
    );
    fx.refused("journal");
}

/// Directories that are each other's parent: the ancestor walk of a
/// rename into them stops instead of going round forever.
#[test]
fn a_directory_cycle_is_refused() {
    let fx = Fixture::new();
    let (a, b) = (NodeRef::Session(S0), NodeRef::Session(S0 + 1));
    let snap = snapshot(
        S0 + 2,
        vec![
            root(4, &[("a", a)]),
            (a, dir_node(2, b, &[])),
            (b, dir_node(2, a, &[])),
        ],
    );
    let rename = Op::Rename {
        parent: NodeRef::RestorePoint(0),
        name: b"e".to_vec(),
        new_parent: a,
        new_name: b"e".to_vec(),
        exchange: false,
        no_replace: false,
        time: T,
    };
    fx.write(Some(&snap), 1, &[rename]);
    fx.refused("journal");
}

#[test]
fn a_record_that_does_not_decode_is_refused() {
    let fx = Fixture::new();
    let mut journal = format::journal_header(1).to_vec();
    journal.extend(format::journal_record(&[200, 1, 2, 3]).unwrap());
    std::fs::write(fx.dir().join("journal"), &journal).unwrap();
    fx.refused("journal");
    // Trailing bytes after a record that decodes.
    let mut payload =
        postcard::to_allocvec(&mkdir(NodeRef::RestorePoint(0), "x", NodeRef::Session(S0))).unwrap();
    payload.push(0);
    let mut journal = format::journal_header(1).to_vec();
    journal.extend(format::journal_record(&payload).unwrap());
    std::fs::write(fx.dir().join("journal"), &journal).unwrap();
    fx.refused("journal");
}

#[test]
fn a_bad_journal_header_is_refused() {
    let fx = Fixture::new();
    let good = format::journal_header(1);
    let mut bad_version = good;
    bad_version[8] = 1;
    let mut bad_flags = good;
    bad_flags[12] = 1;
    let mut bad_magic = good;
    bad_magic[0] = b'X';
    for bytes in [
        &good[..10],
        &bad_version[..],
        &bad_flags[..],
        &bad_magic[..],
        &[][..],
    ] {
        std::fs::write(fx.dir().join("journal"), bytes).unwrap();
        fx.refused("journal");
    }
    std::fs::write(fx.dir().join("journal"), bad_version).unwrap();
    let msg = fx.refused("journal");
    assert!(msg.contains("version 1"), "{msg}");
}

/// A length running past the end is a record a crash tore: the session
/// resumes with the records before it.
#[test]
fn a_torn_record_ends_the_journal() {
    let fx = Fixture::new();
    let mut journal = format::journal_header(1).to_vec();
    journal.extend(
        encode_record(&mkdir(NodeRef::RestorePoint(0), "x", NodeRef::Session(S0))).unwrap(),
    );
    journal.extend(u32::MAX.to_le_bytes());
    journal.extend([0, 0, 0, 0, 1, 2]);
    std::fs::write(fx.dir().join("journal"), &journal).unwrap();
    let fs = fx.resume().unwrap();
    assert_eq!(fs.lookup(ROOT_INO, b"x").unwrap().ino, S0);
}

#[test]
fn a_bad_checkpoint_is_refused() {
    let fx = Fixture::new();
    let file = |from_restore_point: bool, extents: BTreeMap<u64, u64>| Node {
        kind: NodeKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        nlink: 1,
        rdev: 0,
        atime: T,
        mtime: T,
        ctime: T,
        body: Body::File(FileState {
            from_restore_point,
            size: 100,
            extents: RangeSet {
                ranges: extents,
                covered: 0,
            },
            ..FileState::default()
        }),
        open: 0,
    };
    let overlapping: BTreeMap<u64, u64> = [(0, 10), (5, 20)].into();
    let empty: BTreeMap<u64, u64> = [(7, 7)].into();
    let s = NodeRef::Session(S0);
    let cases: Vec<(&str, Snapshot)> = vec![
        (
            "overlapping ranges",
            snapshot(
                S0,
                vec![(NodeRef::RestorePoint(3), file(true, overlapping))],
            ),
        ),
        (
            "an empty range",
            snapshot(S0, vec![(NodeRef::RestorePoint(3), file(true, empty))]),
        ),
        (
            "a node the restore point lacks",
            snapshot(
                S0,
                vec![(NodeRef::RestorePoint(9), file(true, BTreeMap::new()))],
            ),
        ),
        (
            "an id past the next id",
            snapshot(S0, vec![(s, file(false, BTreeMap::new()))]),
        ),
        ("a next id below the range", snapshot(5, vec![])),
        (
            "a node listed twice",
            snapshot(
                S0 + 1,
                vec![
                    (s, file(false, BTreeMap::new())),
                    (s, file(false, BTreeMap::new())),
                ],
            ),
        ),
        (
            "a session file claiming to be the restore point's",
            snapshot(S0 + 1, vec![(s, file(true, BTreeMap::new()))]),
        ),
        (
            "a root that is a file",
            snapshot(
                S0,
                vec![(NodeRef::RestorePoint(0), file(true, BTreeMap::new()))],
            ),
        ),
        (
            "a directory kind with a file body",
            snapshot(
                S0 + 1,
                vec![(
                    s,
                    Node {
                        kind: NodeKind::Dir,
                        ..file(false, BTreeMap::new())
                    },
                )],
            ),
        ),
        (
            "a child with an invalid name",
            snapshot(S0, vec![root(3, &[("a/b", NodeRef::RestorePoint(2))])]),
        ),
        (
            "a child the session never made",
            snapshot(S0, vec![root(3, &[("x", NodeRef::Session(S0 + 5))])]),
        ),
        (
            "another format",
            Snapshot {
                format: 1,
                ..snapshot(S0, vec![])
            },
        ),
    ];
    for (case, snap) in cases {
        fx.write(Some(&snap), 1, &[]);
        let msg = match fx.resume() {
            Ok(_) => panic!("{case}: accepted"),
            Err(e) => e.to_string(),
        };
        assert!(msg.contains(&fx.path("state")), "{case}: {msg}");
    }
    // Bytes that are no checkpoint at all, or one cut short.
    let good = encode_state(&snapshot(S0, vec![])).unwrap();
    for bytes in [&b"junk"[..], &good[..good.len() - 1]] {
        std::fs::write(fx.dir().join("state"), bytes).unwrap();
        fx.refused("state");
    }
}

#[test]
fn a_session_of_another_format_is_refused_by_name_and_version() {
    let fx = Fixture::new();
    let path = fx.dir().join("session.json");
    let mut info: SessionInfo = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    info.format = 1;
    std::fs::write(&path, serde_json::to_vec(&info).unwrap()).unwrap();
    let msg = fx.refused("session.json");
    assert!(
        msg.contains("version 1") && msg.contains("version 2"),
        "{msg}"
    );
    // It can still be listed and discarded.
    let listed = list_sessions(fx.state.path()).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].info.format, 1);
    discard(fx.state.path(), "s").unwrap();
    assert!(!fx.dir().exists());
}

/// `unchanged_file` names a restore point file only while the session has
/// left its bytes as stored; metadata changes do not count.
#[test]
fn only_files_left_as_stored_are_named_unchanged() {
    let fx = Fixture::new();
    let fs = fx.resume().unwrap();
    let d = fs.lookup(ROOT_INO, b"d").unwrap().ino;
    let f = fs.lookup(d, b"f").unwrap().ino;
    let g = fs.lookup(ROOT_INO, b"g").unwrap().ino;
    assert_eq!(fs.unchanged_file(f), Some(2));
    assert_eq!(fs.unchanged_file(g), Some(3));
    assert_eq!(fs.unchanged_file(d), None, "a directory");
    assert_eq!(fs.unchanged_file(ROOT_INO), None);

    let chmod = SetAttr {
        mode: Some(0o600),
        ..Default::default()
    };
    fs.setattr(g, &chmod).unwrap();
    assert_eq!(fs.unchanged_file(g), Some(3), "only its mode changed");
    let same_size = SetAttr {
        size: Some(3),
        ..Default::default()
    };
    fs.setattr(g, &same_size).unwrap();
    assert_eq!(fs.unchanged_file(g), Some(3), "truncated to its own size");

    let fh = fs.open(f, true, false).unwrap();
    fs.write(fh, 4999, b"x").unwrap();
    fs.release(fh);
    assert_eq!(fs.unchanged_file(f), None, "written");
    let cut = SetAttr {
        size: Some(1),
        ..Default::default()
    };
    fs.setattr(g, &cut).unwrap();
    let grown = SetAttr {
        size: Some(3),
        ..Default::default()
    };
    fs.setattr(g, &grown).unwrap();
    assert_eq!(
        fs.unchanged_file(g),
        None,
        "cut, then grown back with zeros"
    );
    let caller = Caller { uid: 0, gid: 0 };
    let new = fs
        .mknod(ROOT_INO, b"n", NodeKind::File, 0o644, 0, caller)
        .unwrap();
    assert_eq!(fs.unchanged_file(new.ino), None, "made in the session");
    fs.close(false).unwrap();
}
