//! A restore point's manifest as a mount reads it: the file is stored
//! where its restore point lives, a mount of that restore point loads it
//! (`Repository::load_manifest`: decoding, `Manifest::validate`, the name
//! check; then the mount's own tables) and the harness walks the whole
//! tree through the mount's calls: listing, lookups, attributes, links and
//! reads at the start, middle and end of every file. The decoded manifest
//! is also walked directly (`Content::chunks`, `path_of`).

use std::sync::Arc;

use vfs_core::format;
use vfs_core::fs::{FsOptions, MountFilter, RepoFs, ROOT_INO};
use vfs_core::manifest::{Manifest, NodeKind};
use vfs_core::repo::RestorePointName;
use vfs_core::store::ObjectStore;

use crate::{alloc, meta};

/// Calls on the mount per input, so a large tree cannot make one input
/// take seconds.
const WALK_CALLS: usize = 2000;

pub fn check(data: &[u8]) {
    let Some(input) = meta::parse(format::MANIFEST_MAGIC, data) else {
        return;
    };
    let (store, repo) = (&input.fixture.store, &input.fixture.repo);
    let Some(plain) = meta::plain_len(repo, format::MANIFEST_MAGIC, &input.file) else {
        return;
    };
    // Stored under the name it gives itself, so a well-formed manifest
    // gets past the name check.
    let name = repo
        .decode_meta::<Manifest>("fuzz", format::MANIFEST_MAGIC, &input.file)
        .ok()
        .and_then(|m| RestorePointName::parse(&m.full_name()).ok())
        .unwrap_or_else(|| RestorePointName::parse("fuzz/0").expect("a valid name"));
    // The key form written before manifest keys had tags: still read, and
    // it needs no hash of contents that may not decode.
    let key = format!("restore-points/{}/{}.rp", name.job, name.name);
    store.put(&key, &input.file).expect("memory store");
    let fs = RepoFs::new(
        repo.clone(),
        FsOptions {
            cache_bytes: 1 << 20,
            readahead_threads: 0,
            uid: 0,
            gid: 0,
            filter: MountFilter {
                job: None,
                restore_point: Some(name.clone()),
                rooted: true,
            },
        },
    )
    .expect("a mount over a memory store");
    // Listing the mount's root loads the manifest.
    let (listed, peak) = alloc::measure(|| fs.readdir(ROOT_INO));
    alloc::assert_within(
        "manifest",
        peak,
        input.file.len() + plain,
        meta::PER_BYTE,
        meta::FIXED,
    );
    if listed.is_ok() {
        walk(&fs);
        let manifest = repo.load_manifest(&name).expect("it loaded once");
        walk_manifest(&manifest);
    }
    drop(fs);
    store.delete(&key).expect("memory store");
}

fn walk(fs: &Arc<RepoFs>) {
    let mut calls = 0;
    let mut dirs = vec![ROOT_INO];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = fs.readdir(dir) else {
            continue;
        };
        for e in entries {
            calls += 1;
            if calls > WALK_CALLS {
                return;
            }
            fs.lookup(dir, &e.name).expect("a listed name looks up");
            let attr = fs.getattr(e.ino).expect("a listed node");
            assert_eq!(attr.kind, e.kind);
            assert_eq!(fs.parent(e.ino), Ok(dir));
            match attr.kind {
                NodeKind::Dir => dirs.push(e.ino),
                NodeKind::Symlink => {
                    fs.readlink(e.ino).expect("a listed link reads");
                }
                NodeKind::File => {
                    let fh = fs.open(e.ino, false).expect("a listed file opens");
                    for offset in [0, attr.size / 2, attr.size.saturating_sub(1)] {
                        // Chunks are not in this repository: the read fails
                        // with a missing chunk or serves holes.
                        if let Ok(bytes) = fs.read(fh, offset, 64 << 10) {
                            assert!(bytes.len() as u64 <= attr.size - offset.min(attr.size));
                        }
                    }
                    fs.release(fh);
                }
                _ => unreachable!("validate refuses other kinds"),
            }
        }
    }
}

fn walk_manifest(m: &Manifest) {
    let n = m.nodes.len();
    for (i, node) in m.nodes.iter().enumerate() {
        let chunks = node.content.chunks(node.size);
        let covered: u64 = chunks.iter().map(|c| c.2 as u64).sum();
        if node.kind == NodeKind::File {
            assert_eq!(covered, node.size);
        }
        assert_eq!(
            node.content.ids().count(),
            chunks.iter().filter(|c| c.0.is_some()).count()
        );
        // Paths are as long as the tree is deep: a few nodes, not all.
        if i < 64 || i + 1 == n {
            let path = m.path_of(i);
            assert_eq!(path.is_empty(), i == 0);
        }
    }
}
