//! Starting inputs for every target, made by the product's own writers: a
//! real backup (a page-structured file with holes, a content-defined one,
//! an empty file, a symlink, nested directories) into a plain and an
//! encrypted repository, whose files are turned into each target's input
//! form.

use std::path::Path;

use vfs_core::backup::{backup, BackupOptions, Source};
use vfs_core::crypto::KdfParams;
use vfs_core::format;
use vfs_core::manifest::Manifest;
use vfs_core::repo::{IndexFile, RepoConfig, INDEX_PREFIX, PACKS_PREFIX};
use vfs_core::store::ObjectStore;

use std::sync::atomic::{AtomicU64, Ordering};

use vfs_core::fs::{Caller, FsModel, RenameMode, SetAttr, ROOT_INO};
use vfs_core::manifest::NodeKind;
use vfs_core::repo::Repository;
use vfs_core::session::{session_dir, CowFs};

use crate::repos::{self, Fixture};
use crate::{meta, pack, session};

fn write_tree(root: &Path) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    std::fs::create_dir_all(root.join("etc/app"))?;
    // Pages of an "app.db": fixed 8 KiB chunks, a hole in the middle.
    let mut db = std::fs::File::create(root.join("app.db"))?;
    db.write_all(&[1u8; 8192])?;
    db.seek(SeekFrom::Start(3 * 8192))?;
    db.write_all(&(0..8192u32).map(|i| (i % 251) as u8).collect::<Vec<_>>())?;
    // Content-defined chunks: lines that do not repeat but compress, so
    // the pack (a seed of the pack target) stays a few kilobytes.
    let dump: Vec<u8> = (0..1600u32)
        .flat_map(|i| format!("row {i:06} value {}\n", i * 7919 % 10007).into_bytes())
        .collect();
    std::fs::write(root.join("etc/app/dump.bin"), dump)?;
    std::fs::write(root.join("etc/app/empty"), b"")?;
    std::fs::write(root.join("etc/app/app.conf"), b"listen = 8080\n")?;
    #[cfg(unix)]
    std::os::unix::fs::symlink("app/app.conf", root.join("etc/current"))?;
    #[cfg(windows)]
    std::os::windows::fs::symlink_file("app/app.conf", root.join("etc/current"))?;
    Ok(())
}

/// Backs the seeds' tree up into `repo` (the same tree every time, so
/// its manifest's node order is too).
pub fn back_up_tree(repo: &Repository) -> Manifest {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "flr-fuzz-tree-{}-{}",
        std::process::id(),
        CALLS.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    write_tree(&dir).expect("a temporary tree");
    let opts = BackupOptions {
        job: "app".into(),
        chunker: None,
        hostname: "seed".into(),
        progress: Default::default(),
    };
    let manifest = backup(
        repo,
        Source::Paths(vec![dir.join("app.db"), dir.join("etc")]),
        &opts,
    )
    .expect("a backup into memory");
    std::fs::remove_dir_all(&dir).expect("a temporary tree");
    manifest
}

fn backed_up(encrypted: bool) -> (&'static Fixture, Manifest) {
    // The targets' own repositories, so a whole sealed file opens there.
    let fixture = if encrypted {
        repos::encrypted()
    } else {
        repos::plain()
    };
    let manifest = back_up_tree(&fixture.repo);
    (fixture, manifest)
}

/// A session with every kind of change, over the targets' session base:
/// its journal, then its checkpoint.
fn session_files() -> (Vec<u8>, Vec<u8>) {
    let sb = session::base();
    let id = "seed";
    let _ = std::fs::remove_dir_all(session_dir(&sb.state_dir, id));
    let fs = CowFs::create(
        sb.base.clone(),
        &sb.state_dir,
        session::info(id, &sb.restore_point),
        session::options(),
    )
    .expect("a new session");
    let me = Caller { uid: 0, gid: 0 };
    let dir = fs.mkdir(ROOT_INO, b"new", 0o755, me).expect("mkdir");
    let file = fs
        .mknod(dir.ino, b"f", NodeKind::File, 0o644, 0, me)
        .expect("mknod");
    let fh = fs.open(file.ino, true, false).expect("open");
    fs.write(fh, 0, b"hello").expect("write");
    fs.write(fh, 10_000, b"later").expect("write");
    fs.release(fh);
    fs.symlink(dir.ino, b"l", b"f", me).expect("symlink");
    fs.link(file.ino, ROOT_INO, b"f2").expect("link");
    fs.rename(dir.ino, b"f", ROOT_INO, b"f3", RenameMode::Replace)
        .expect("rename");
    let db = fs
        .lookup(ROOT_INO, b"app.db")
        .expect("the restore point's file");
    let fh = fs.open(db.ino, true, false).expect("open");
    fs.write(fh, 8192, &[9u8; 100]).expect("write");
    fs.release(fh);
    fs.setattr(
        db.ino,
        &SetAttr {
            size: Some(20_000),
            mode: Some(0o600),
            ..SetAttr::default()
        },
    )
    .expect("setattr");
    fs.unlink(ROOT_INO, b"f2").expect("unlink");
    fs.mknod(ROOT_INO, b"fifo", NodeKind::Fifo, 0o644, 0, me)
        .expect("mknod fifo");
    fs.fsync(db.ino).expect("fsync");
    let dir_path = fs.dir().to_path_buf();
    let journal = std::fs::read(dir_path.join(format::SESSION_JOURNAL_FILE)).expect("journal");
    fs.checkpoint().expect("checkpoint");
    let state = std::fs::read(dir_path.join(format::SESSION_STATE_FILE)).expect("state");
    drop(fs);
    let _ = std::fs::remove_dir_all(&dir_path);
    (journal, state)
}

fn keys(fixture: &Fixture, prefix: &str) -> Vec<String> {
    fixture.store.list(prefix).expect("memory store")
}

/// Seeds by target name.
pub fn all() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let mut envelope = Vec::new();
    let mut packs = Vec::new();
    let mut index = Vec::new();
    let mut manifest = Vec::new();
    for encrypted in [false, true] {
        let (fx, m) = backed_up(encrypted);
        let crypt = if encrypted { 4 } else { 0 };
        let get = |k: &str| fx.store.get(k).expect("memory store");
        let rp = vfs_core::repo::RestorePointName::parse(&m.full_name()).expect("its name");
        let rp_file = get(&fx
            .repo
            .manifest_key(&rp)
            .expect("listing")
            .expect("its manifest"));
        let plain = postcard::to_stdvec(&m).expect("manifest serializes");
        for mode in [0, 1, 2] {
            manifest.push(meta::input(mode | crypt, &plain));
        }
        manifest.push([&[3 | crypt][..], &rp_file].concat());
        envelope.push([&[2u8][..], &rp_file].concat());
        for key in keys(fx, INDEX_PREFIX) {
            let file = get(&key);
            let idx: IndexFile = fx
                .repo
                .decode_meta("seed", format::INDEX_MAGIC, &file)
                .expect("own index");
            let plain = postcard::to_stdvec(&idx).expect("index serializes");
            index.push(meta::input(1 | crypt, &plain));
            index.push([&[3 | crypt][..], &file].concat());
            envelope.push([&[1u8][..], &file].concat());
            if !encrypted {
                index.push(meta::input(0, &plain));
                index.push(meta::input(2, &plain));
                let pack_bytes = get(&vfs_core::repo::pack_key(&idx.pack));
                let end = pack_bytes.len() - format::PACK_TRAILER_LEN;
                let (table_at, _) =
                    format::parse_pack_trailer("seed", pack_bytes.len() as u64, &pack_bytes[end..])
                        .expect("own pack");
                let frames = &pack_bytes[format::PACK_HEADER_LEN..table_at as usize];
                let table = postcard::to_stdvec(&vfs_core::repo::PackTable {
                    entries: idx.entries.clone(),
                })
                .expect("table serializes");
                packs.push([&[0u8][..], &pack_bytes].concat());
                packs.push(pack::input(
                    &idx.entries[..idx.entries.len().min(pack::MAX_ENTRIES)],
                    frames,
                ));
                let frames_len = (frames.len() as u16).to_le_bytes();
                packs.push([&[2u8][..], &frames_len, frames, &table].concat());
            }
        }
        for key in keys(fx, PACKS_PREFIX) {
            envelope.push([&[3u8][..], &get(&key)[..64]].concat());
        }
        envelope.push([&[0u8][..], &get(vfs_core::repo::CONFIG_KEY)].concat());
    }
    let mut config = Vec::new();
    for encrypted in [false, true] {
        let fx = if encrypted {
            repos::encrypted()
        } else {
            repos::plain()
        };
        let file = fx
            .store
            .get(vfs_core::repo::CONFIG_KEY)
            .expect("memory store");
        let (_, json) =
            format::open_envelope("seed", format::CONFIG_MAGIC, &file).expect("own config");
        config.push([&[1u8][..], json].concat());
        config.push([&[0u8][..], &file].concat());
        if encrypted {
            // Costs above what the harness derives: only the record is
            // checked.
            let mut c: RepoConfig = serde_json::from_slice(json).expect("own config");
            let e = c.encryption.as_mut().expect("encrypted");
            e.m_cost_kib = KdfParams::DEFAULT.m_cost_kib;
            e.t_cost = KdfParams::DEFAULT.t_cost;
            let text = serde_json::to_vec(&c).expect("config serializes");
            config.push([&[1u8][..], &text].concat());
        }
    }
    let daemon = [
        &br#"{"repository":"r","job":"app","expires_in_secs":60}"#[..],
        br#"{"repository":"r","restore_point":"app/2026-11-22T03-49-34Z","writable":true}"#,
        br#"{"repository":"x","restore_point":"app/latest","job":"app"}"#,
    ]
    .iter()
    .map(|b| [&[0u8][..], b].concat())
    .chain([
        [&[1u8][..], br#"{"job":"app-recovered"}"#].concat(),
        [&[2u8][..], br#"{"repository":"r","restore_point":"app/latest","paths":["etc/**"],"target":"/tmp/x","overwrite":true}"#].concat(),
        [&[3u8][..], b"w1-s-2\n{\"job\":\"j\"}"].concat(),
        [&[4u8][..], br#"{"repository":"r","job":"app"}"#].concat(),
    ])
    .collect();
    let (journal_file, state_file) = session_files();
    let (_, state_plain) =
        format::open_envelope("seed", format::STATE_MAGIC, &state_file).expect("own state");
    let checkpoint = vec![
        [&[0u8][..], &state_file].concat(),
        [&[1u8][..], state_plain].concat(),
    ];
    let mut records = vec![1u8];
    let mut pos = format::JOURNAL_HEADER_LEN;
    while let Some((payload, next)) = format::next_journal_record(&journal_file, pos) {
        records.extend_from_slice(&(payload.len() as u16).to_le_bytes());
        records.extend_from_slice(payload);
        pos = next;
    }
    let journal = vec![[&[0u8][..], &journal_file].concat(), records];
    vec![
        ("checkpoint", checkpoint),
        ("journal", journal),
        ("envelope", envelope),
        ("pack", packs),
        ("index", index),
        ("manifest", manifest),
        ("config", config),
        ("daemon_json", daemon),
    ]
}
