//! Mounts a real repository through the kernel and drives it with std::fs.
//! Needs /dev/fuse and root (as in CI containers); skipped otherwise.

#![cfg(target_os = "linux")]

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backends::fuse::{self, FuseMount, FuseOptions};
use vfs_core::backup::{backup, BackupOptions, Source};
use vfs_core::fs::{FsOptions, RepoFs};
use vfs_core::local_store::LocalStore;
use vfs_core::repo::Repository;

fn can_mount() -> bool {
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let fuse = File::open("/dev/fuse").is_ok();
    if !(root && fuse) {
        eprintln!("skipped: needs root and /dev/fuse");
    }
    root && fuse
}

fn open_repo(dir: &Path) -> Arc<Repository> {
    let store = LocalStore::open(dir).unwrap();
    Arc::new(Repository::open(Arc::new(store), || unreachable!("not encrypted")).unwrap())
}

fn back_up(repo_dir: &Path, job: &str, src: &Path) {
    let repo = open_repo(repo_dir);
    let opts = BackupOptions {
        job: job.to_string(),
        chunker: None,
        hostname: "test".to_string(),
        progress: Default::default(),
    };
    backup(&repo, Source::Paths(vec![src.to_path_buf()]), &opts).unwrap();
}

struct Fixture {
    _tmp: tempfile::TempDir,
    src: std::path::PathBuf,
    repo: std::path::PathBuf,
    mnt: std::path::PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("db");
    let repo = tmp.path().join("repo");
    let mnt = tmp.path().join("mnt");
    for d in [&src, &repo, &mnt] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::create_dir(src.join("many")).unwrap();
    for i in 0..300 {
        std::fs::write(src.join("many").join(format!("file-{i:04}")), i.to_string()).unwrap();
    }
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(src.join("big.bin"), &big).unwrap();
    std::fs::write(src.join("secret"), b"owner only").unwrap();
    std::fs::set_permissions(src.join("secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink("big.bin", src.join("link")).unwrap();
    Repository::init(&LocalStore::open(&repo).unwrap(), None).unwrap();
    back_up(&repo, "nightly", &src);
    Fixture {
        _tmp: tmp,
        src,
        repo,
        mnt,
    }
}

fn mount(f: &Fixture) -> FuseMount {
    let fs = RepoFs::new(
        open_repo(&f.repo),
        FsOptions {
            cache_bytes: 64 << 20,
            disk_cache: None,
            readahead_threads: 1,
            uid: 0,
            gid: 0,
            filter: Default::default(),
        },
    )
    .unwrap();
    let opts = FuseOptions {
        threads: 3,
        allow_other: false,
        auto_unmount: false,
        fs_name: "flr-test".to_string(),
    };
    fuse::mount(fs, &f.mnt, &opts).unwrap()
}

/// Lists a directory with getdents64 and a buffer of a few entries, so the
/// kernel asks the filesystem again from the last offset it returned.
#[allow(unsafe_code)]
fn list_in_small_batches(dir: &Path) -> Vec<String> {
    use std::os::fd::AsRawFd;
    let f = File::open(dir).unwrap();
    let mut buf = vec![0u64; 32]; // 256 bytes, 8-byte aligned like the kernel's records
    let len = buf.len() * 8;
    let mut names = Vec::new();
    loop {
        // SAFETY: `buf` is valid for writes of `len` bytes and outlives the
        // call; `f` is an open directory.
        let n =
            unsafe { libc::syscall(libc::SYS_getdents64, f.as_raw_fd(), buf.as_mut_ptr(), len) };
        assert!(n >= 0, "getdents64: {}", std::io::Error::last_os_error());
        if n == 0 {
            return names;
        }
        let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let mut pos = 0;
        while pos < n as usize {
            // struct linux_dirent64: ino u64, off i64, reclen u16, type u8, name.
            let reclen = u16::from_ne_bytes([bytes[pos + 16], bytes[pos + 17]]) as usize;
            let name = &bytes[pos + 19..pos + reclen];
            let end = name.iter().position(|&b| b == 0).unwrap();
            names.push(String::from_utf8(name[..end].to_vec()).unwrap());
            pos += reclen;
        }
    }
}

fn is_mount_point(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let path = path.canonicalize().unwrap();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(path.to_str().unwrap()))
}

#[test]
fn serves_restore_points_read_only() {
    if !can_mount() {
        return;
    }
    let f = fixture();
    let m = mount(&f);
    let data = f.mnt.join("nightly/latest/db");

    let jobs: Vec<_> = std::fs::read_dir(&f.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(jobs, ["nightly"]);
    assert_eq!(
        std::fs::read(data.join("big.bin")).unwrap(),
        std::fs::read(f.src.join("big.bin")).unwrap()
    );
    assert_eq!(
        std::fs::read_link(data.join("link")).unwrap(),
        Path::new("big.bin")
    );
    let meta = std::fs::metadata(data.join("secret")).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o600);
    assert_eq!(meta.len(), 10);

    // Read in batches of a few entries, the kernel resumes from the
    // offsets the adapter handed out: every name exactly once.
    let expected: Vec<String> = (0..300).map(|i| format!("file-{i:04}")).collect();
    for _ in 0..2 {
        let mut names = list_in_small_batches(&data.join("many"));
        names.sort();
        let mut want = expected.clone();
        want.extend([".".to_string(), "..".to_string()]);
        want.sort();
        assert_eq!(names, want);
    }
    let mut names: Vec<String> = std::fs::read_dir(data.join("many"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, expected);
    assert_eq!(
        std::fs::read_to_string(data.join("many/file-0299")).unwrap(),
        "299"
    );

    let err = |r: std::io::Result<()>| r.unwrap_err().raw_os_error();
    assert_eq!(
        err(File::create(data.join("new")).map(drop)),
        Some(libc::EROFS)
    );
    assert_eq!(
        err(std::fs::OpenOptions::new()
            .write(true)
            .open(data.join("big.bin"))
            .map(drop)),
        Some(libc::EROFS)
    );
    assert_eq!(
        err(std::fs::remove_file(data.join("big.bin"))),
        Some(libc::EROFS)
    );
    assert_eq!(err(std::fs::create_dir(data.join("d"))), Some(libc::EROFS));
    assert_eq!(
        err(std::fs::metadata(data.join("missing")).map(drop)),
        Some(libc::ENOENT)
    );
    assert_eq!(
        err(std::fs::metadata(data.join("big.bin/x")).map(drop)),
        Some(libc::ENOTDIR)
    );
    assert_eq!(
        err(std::fs::read_link(data.join("big.bin")).map(drop)),
        Some(libc::EINVAL)
    );

    // A restore point committed while mounted shows up, and reads.
    std::fs::write(f.src.join("secret"), b"second backup").unwrap();
    back_up(&f.repo, "later", &f.src);
    let deadline = Instant::now() + Duration::from_secs(15);
    let secret = f.mnt.join("later/latest/db/secret");
    while !secret.exists() {
        assert!(
            Instant::now() < deadline,
            "new restore point never appeared"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(std::fs::read(&secret).unwrap(), b"second backup");

    m.unmount().unwrap();
    assert!(!is_mount_point(&f.mnt));
}

#[test]
fn unmount_waits_for_open_files_or_detaches() {
    if !can_mount() {
        return;
    }
    let f = fixture();
    let m = mount(&f);
    let big = f.mnt.join("nightly/latest/db/big.bin");

    // Busy: the unmounter refuses and the mount keeps serving.
    let mut open = File::open(&big).unwrap();
    let unmounter = m.unmounter();
    assert_eq!(
        unmounter.unmount().unwrap_err().kind(),
        ErrorKind::ResourceBusy
    );
    assert!(!m.has_ended());
    let mut head = [0u8; 16];
    open.read_exact(&mut head).unwrap();
    drop(open);

    // Another thread unmounts while this one waits.
    let t = std::thread::spawn(move || unmounter.unmount());
    m.wait();
    t.join().unwrap().unwrap();
    assert!(m.has_ended());
    m.unmount().unwrap();
    assert!(!is_mount_point(&f.mnt));

    // FuseMount::unmount with a file open detaches: the path is free at
    // once, the open file still reads.
    let m = mount(&f);
    let mut open = File::open(&big).unwrap();
    m.unmount().unwrap();
    assert!(!is_mount_point(&f.mnt));
    let mut all = Vec::new();
    open.read_to_end(&mut all).unwrap();
    assert_eq!(all, std::fs::read(f.src.join("big.bin")).unwrap());
}
