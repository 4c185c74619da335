//! A writable session's checkpoint (`state`) and journal as a restart
//! reads them: the files are put in a session directory and the session is
//! resumed (`CowFs::resume`: the checkpoint's envelope and postcard, its
//! nodes checked against the restore point, the journal's header and
//! records, each record replayed), then the resumed tree is walked.
//!
//! The session sits over a real restore point (the seeds' tree), in a
//! state directory on tmpfs where one exists, so fsyncs cost nothing.
//!
//! `checkpoint` input: a mode byte, then with bit 0 the checkpoint's
//! postcard plaintext (the harness writes the envelope), else the whole
//! `state` file; the journal is empty. `journal` input: a mode byte, then
//! with bit 0 records as a u16 little-endian length and that many payload
//! bytes each (the harness writes header, lengths and checksums), else the
//! whole `journal` file; there is no checkpoint.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use vfs_core::format::{self, SESSION_FORMAT};
use vfs_core::fs::{FsModel, FsOptions, MountFilter, RepoFs, ROOT_INO};
use vfs_core::manifest::NodeKind;
use vfs_core::repo::RestorePointName;
use vfs_core::session::{session_dir, CowFs, SessionInfo, SessionOptions};

use crate::{alloc, meta, repos, seeds};

/// Calls on the resumed session per input.
const WALK_CALLS: usize = 500;

pub struct SessionBase {
    pub base: Arc<RepoFs>,
    pub restore_point: RestorePointName,
    /// One state directory per process; targets use their own session id.
    pub state_dir: PathBuf,
    /// Resumes are serialized: parallel replay tests share the base.
    pub lock: Mutex<()>,
}

pub fn options() -> SessionOptions {
    SessionOptions {
        reserve_bytes: 0,
        min_free_bytes: 0,
    }
}

pub fn info(id: &str, restore_point: &RestorePointName) -> SessionInfo {
    SessionInfo {
        format: SESSION_FORMAT,
        id: id.into(),
        repository: "memory".into(),
        restore_point: restore_point.to_string(),
        created: 0,
    }
}

pub fn base() -> &'static SessionBase {
    static BASE: OnceLock<SessionBase> = OnceLock::new();
    BASE.get_or_init(|| {
        let fixture = repos::fresh();
        let manifest = seeds::back_up_tree(&fixture.repo);
        let restore_point = RestorePointName::parse(&manifest.full_name()).expect("its name");
        let base = RepoFs::new(
            fixture.repo.clone(),
            FsOptions {
                cache_bytes: 1 << 20,
                disk_cache: None,
                readahead_threads: 0,
                uid: 0,
                gid: 0,
                filter: MountFilter {
                    job: None,
                    restore_point: Some(restore_point.clone()),
                    rooted: true,
                },
            },
        )
        .expect("a mount over a memory store");
        let shm = Path::new("/dev/shm");
        let parent = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let state_dir = parent.join(format!("flr-fuzz-sessions-{}", std::process::id()));
        std::fs::create_dir_all(&state_dir).expect("a state directory");
        SessionBase {
            base,
            restore_point,
            state_dir,
            lock: Mutex::new(()),
        }
    })
}

/// Resumes session `id` from `state` (none: no checkpoint) and `journal`,
/// with allocations bounded by the files' size, and walks it.
fn resume(id: &str, state: Option<&[u8]>, journal: &[u8]) {
    let sb = base();
    let _serial = sb.lock.lock().unwrap_or_else(|e| e.into_inner());
    let dir = session_dir(&sb.state_dir, id);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join(format::SESSION_DATA_DIR)).expect("a session directory");
    let json = serde_json::to_vec(&info(id, &sb.restore_point)).expect("info serializes");
    std::fs::write(dir.join(format::SESSION_INFO_FILE), json).expect("session.json");
    if let Some(state) = state {
        std::fs::write(dir.join(format::SESSION_STATE_FILE), state).expect("state");
    }
    std::fs::write(dir.join(format::SESSION_JOURNAL_FILE), journal).expect("journal");
    let len = state.map_or(0, <[u8]>::len) + journal.len();
    let (resumed, peak) =
        alloc::measure(|| CowFs::resume(sb.base.clone(), &sb.state_dir, id, options()));
    alloc::assert_within("session", peak, len, meta::PER_BYTE, meta::FIXED);
    if let Ok(fs) = resumed {
        walk(fs.as_ref());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn walk(fs: &dyn FsModel) {
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
            let Ok(attr) = fs.getattr(e.ino) else {
                continue;
            };
            let _ = fs.lookup(dir, &e.name);
            match attr.kind {
                NodeKind::Dir if e.name != b"." && e.name != b".." => dirs.push(e.ino),
                NodeKind::Symlink => {
                    let _ = fs.readlink(e.ino);
                }
                NodeKind::File => {
                    if let Ok(fh) = fs.open(e.ino, false, false) {
                        for offset in [0, attr.size / 2, attr.size.saturating_sub(1)] {
                            if let Ok(bytes) = fs.read(fh, offset, 64 << 10) {
                                assert!(bytes.len() as u64 <= attr.size.saturating_sub(offset));
                            }
                        }
                        fs.release(fh);
                    }
                }
                _ => {}
            }
        }
    }
}

pub fn check_checkpoint(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let state = if mode & 1 != 0 {
        format::seal_envelope(format::STATE_MAGIC, 0, rest)
    } else {
        rest.to_vec()
    };
    resume("fuzz-checkpoint", Some(&state), &format::journal_header(0));
}

/// A journal of `payloads`, as the harness writes mode-1 inputs.
pub fn journal_of(payloads: &[&[u8]]) -> Vec<u8> {
    let mut journal = format::journal_header(0).to_vec();
    for p in payloads {
        journal.extend(format::journal_record(p).expect("a record under 4 GiB"));
    }
    journal
}

pub fn check_journal(data: &[u8]) {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let journal = if mode & 1 != 0 {
        let mut payloads = Vec::new();
        while let Some((len, tail)) = rest.split_first_chunk::<2>() {
            let len = (u16::from_le_bytes(*len) as usize).min(tail.len());
            payloads.push(&tail[..len]);
            rest = &tail[len..];
        }
        journal_of(&payloads)
    } else {
        rest.to_vec()
    };
    resume("fuzz-journal", None, &journal);
}
