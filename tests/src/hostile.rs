//! Restore points no backup writes: manifests built by hand, each trying
//! to make a restore (or a mount) reach outside its target, stored under
//! a restore point key of a real repository.
//!
//! This file uses only `std` and `vfs_core`, so that the daemon's tests
//! (crate `mountd`) can include it as well and drive the same cases.

use std::path::Path;
use std::sync::Arc;

use vfs_core::format::MANIFEST_MAGIC;
use vfs_core::local_store::LocalStore;
use vfs_core::manifest::{timestamp_name, BackupStats, Content, Manifest, Node, NodeKind};
use vfs_core::repo::{Repository, RestorePointName};

/// One hostile restore point: its job (the case's name) and nodes, and a
/// fragment of the error every reader must refuse it with.
pub struct HostileCase {
    pub job: &'static str,
    pub nodes: Vec<Node>,
    pub refusal: String,
}

fn entry(parent: u32, name: &[u8], kind: NodeKind) -> Node {
    Node {
        parent,
        name: name.to_vec(),
        kind,
        mode: if kind == NodeKind::Dir { 0o755 } else { 0o644 },
        uid: 0,
        gid: 0,
        mtime_sec: 1_000_000_000,
        mtime_nsec: 0,
        size: 0,
        target: Vec::new(),
        content: Content::Empty,
    }
}

fn link(parent: u32, name: &[u8], target: &Path) -> Node {
    Node {
        target: target.to_string_lossy().into_owned().into_bytes(),
        ..entry(parent, name, NodeKind::Symlink)
    }
}

/// The cases, aimed at `outside`: a directory that is not below the
/// restore target, which must stay empty. Restores go to a sibling of
/// `outside` (so `..` from the target's root leads to its parent).
pub fn hostile_cases(outside: &Path) -> Vec<HostileCase> {
    let outside_name = outside
        .file_name()
        .expect("outside has a name")
        .to_string_lossy()
        .into_owned()
        .into_bytes();
    let absolute_file = outside
        .join("f")
        .to_string_lossy()
        .into_owned()
        .into_bytes();
    let root = || entry(0, b"", NodeKind::Dir);
    let dir = |parent, name: &[u8]| entry(parent, name, NodeKind::Dir);
    let file = |parent, name: &[u8]| entry(parent, name, NodeKind::File);
    let cases = [
        (
            // The trick this all started from: the symlink is restored
            // first, then the directory of the same name is "already
            // there" and the file goes through the link.
            "symlink-then-dir",
            vec![root(), link(0, b"x", outside), dir(0, b"x"), file(2, b"f")],
            "\"x\" appears twice in one directory".to_string(),
        ),
        (
            "duplicate-files",
            vec![
                root(),
                dir(0, b"d"),
                file(1, b"f"),
                dir(0, b"e"),
                file(1, b"f"),
            ],
            "\"d/f\" appears twice in one directory".to_string(),
        ),
        (
            "dot-dot",
            vec![root(), dir(0, b".."), dir(1, &outside_name), file(2, b"f")],
            "\"..\" (node 1): the name is '.' or '..'".to_string(),
        ),
        (
            "dot",
            vec![root(), dir(0, b"."), file(1, b"f")],
            "\".\" (node 1): the name is '.' or '..'".to_string(),
        ),
        (
            "slash-in-name",
            vec![
                root(),
                dir(0, b"d"),
                file(
                    1,
                    format!("../../{}/f", String::from_utf8_lossy(&outside_name)).as_bytes(),
                ),
            ],
            "(node 2): the name contains '/'".to_string(),
        ),
        (
            "absolute-name",
            vec![root(), file(0, &absolute_file)],
            "(node 1): the name contains '/'".to_string(),
        ),
        (
            "nul-in-name",
            vec![root(), file(0, b"f\0/etc/passwd")],
            "\"f\\0/etc/passwd\" (node 1): the name contains '/'".to_string(),
        ),
        (
            "nul-only",
            vec![root(), file(0, b"f\0g")],
            "\"f\\0g\" (node 1): the name contains NUL".to_string(),
        ),
        (
            "empty-name",
            vec![root(), dir(0, b""), file(1, b"f")],
            "\"\" (node 1): the name is empty".to_string(),
        ),
        (
            // An absolute link, then an entry below it as if it were a
            // directory.
            "symlink-descent",
            vec![root(), link(0, b"x", outside), file(1, b"f")],
            "node 2 has an invalid parent 1".to_string(),
        ),
    ];
    cases
        .into_iter()
        .map(|(job, nodes, refusal)| HostileCase {
            job,
            nodes,
            refusal,
        })
        .collect()
}

/// Stores `nodes` as a restore point of `job` in the unencrypted
/// repository at `repo`, exactly as a backup would commit it, and returns
/// its name (`job/timestamp`).
pub fn write_restore_point(repo: &Path, job: &str, nodes: Vec<Node>) -> String {
    let store = LocalStore::open(repo).unwrap_or_else(|e| panic!("open {}: {e}", repo.display()));
    let repo = Repository::open(Arc::new(store), || {
        panic!("hostile restore points go into unencrypted repositories")
    })
    .unwrap_or_else(|e| panic!("open repository {}: {e}", repo.display()));
    let manifest = Manifest {
        job: job.to_string(),
        name: timestamp_name(1_000_000_000),
        time: 1_000_000_000,
        hostname: "hostile".into(),
        stats: BackupStats::default(),
        nodes,
    };
    let name = RestorePointName {
        job: manifest.job.clone(),
        name: manifest.name.clone(),
    };
    repo.store()
        .put(
            &repo.new_manifest_key(&manifest),
            &repo.encode_meta(MANIFEST_MAGIC, &manifest),
        )
        .unwrap_or_else(|e| panic!("store restore point {name}: {e}"));
    name.to_string()
}
