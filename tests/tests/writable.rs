//! Writable sessions through the real kernel FUSE driver: a restore point
//! mounted copy-on-write (`flr mount --writable`) and changed with
//! ordinary calls and tools (overwrites, appends, truncations, creates,
//! renames, deletes, chmod, symlinks, hard links, `dd`, `sqlite3`), then
//! committed as a new restore point, discarded, unmounted with and
//! without `--keep`, killed with SIGKILL and resumed, and run out of
//! space.
//!
//! The oracle is a plain directory: the same changes made to a copy of
//! the source must leave it equal to the session, entry by entry (kind,
//! mode, mtime to the nanosecond, size, bytes, symlink targets). Through
//! all of it the repository changes only by a commit, and the session
//! directory holds only the bytes written to it.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use filetime::FileTime;
use serde_json::Value;

use flr_e2e::command::{send_signal, tool, wait_for_exit};
use flr_e2e::mount::{force_unmount, UnmountOnDrop};
use flr_e2e::rng::{text_bytes, Rng};
use flr_e2e::sqlite::{create_shop, sqlite3};
use flr_e2e::tree::{allocated_bytes, assert_cmp, assert_same_tree, write_random_file, MIB};
use flr_e2e::{is_mounted, scratch, Flr, Mount, Run, TestRepo, WritableMount};

/// The large file of the source tree: many chunks, so that a 4 KiB write
/// in its middle is a small fraction of it.
const BIG: &str = "big.bin";
const BIG_LEN: u64 = 6 * MIB;

/// Where [`edit`] overwrites 4 KiB of [`BIG`]: in its middle, on a page
/// boundary, so the session's data file needs one page for it (two at
/// most, should the state directory's filesystem place it unaligned).
const PATCH_AT: u64 = 3 * MIB + 40 * 4096;
const PATCH_LEN: usize = 4096;

/// The length [`edit`] cuts `log.txt` to, and the length it grows it back
/// to: the bytes between must read as zeros, never as the old ones.
const CUT_TO: u64 = 100;
const REGROWN_TO: u64 = 200;

/// Entries [`edit`] creates or whose contents it changes; it then sets
/// their mtimes to fixed values, so that a session and a plain directory
/// with the same changes compare equal. Entries it renames, chmods or
/// hard-links keep their own mtimes: those calls must not change them.
const TOUCHED: &[&str] = &[
    ".",
    BIG,
    "notes.txt",
    "log.txt",
    "dir",
    "dir/sub",
    "dir/sub/b.txt",
    "new-dir",
    "new-dir/nested",
    "new-dir/fresh.txt",
    "links",
    "links/to-notes",
];

/// How long a mount process gets to end after an unmount, a signal or a
/// discard.
const EXIT_GRACE: Duration = Duration::from_secs(30);

/// `job/timestamp` -> `timestamp`.
fn ts(restore_point: &str) -> &str {
    restore_point.split_once('/').expect("job/timestamp").1
}

/// Panics with what was done to which path when `r` is an error.
#[track_caller]
fn must<T>(what: &str, path: &Path, r: std::io::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what} {}: {e}", path.display()))
}

/// A source directory `src` backed up into a fresh repository.
struct Backed {
    tmp: tempfile::TempDir,
    src: PathBuf,
    repo: TestRepo,
    restore_point: String,
    /// What the backup added to the repository.
    full_added: u64,
}

impl Backed {
    /// `tmp/src` with [`BIG`] (random), text files, nested directories, a
    /// symlink and an empty directory, backed up as job `orig`.
    fn new(test: &str, seed: u64) -> Backed {
        let tmp = scratch(test);
        let src = tmp.path().join("src");
        let mut rng = Rng::new(seed);
        for dir in ["dir/sub", "old-dir", "doomed/deeper", "empty-dir", "links"] {
            flr_e2e::mkdir(&src.join(dir));
        }
        write_random_file(&src.join(BIG), BIG_LEN, &mut rng);
        let put = |rel: &str, data: &[u8]| {
            let path = src.join(rel);
            must("write", &path, fs::write(&path, data));
        };
        put("notes.txt", b"first line\nsecond line\n");
        put("log.txt", &text_bytes(&mut rng, 64 << 10));
        put("script.sh", b"#!/bin/sh\necho from the backup\n");
        put("gone.txt", b"deleted in the session\n");
        put("dir/a.txt", b"renamed in the session\n");
        put("dir/sub/b.txt", b"hard-linked in the session\n");
        put("old-dir/inside.txt", b"in a renamed directory\n");
        put("doomed/x.txt", b"removed with its directory\n");
        put("doomed/deeper/y.txt", &text_bytes(&mut rng, 5000));
        let link = src.join("links/to-big");
        must(
            "symlink",
            &link,
            std::os::unix::fs::symlink(format!("../{BIG}"), &link),
        );
        let repo = TestRepo::init(&tmp.path().join("repo"));
        let backup = repo.backup("orig", &[&src]);
        Backed {
            src,
            repo,
            restore_point: backup.restore_point.clone(),
            full_added: backup.added_bytes(),
            tmp,
        }
    }

    /// `tmp/NAME`.
    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// A copy of the source (`cp -a`) at `tmp/NAME` with [`edit`]'s
    /// changes: what a session must show after the same changes.
    fn expected(&self, name: &str, patch: &[u8]) -> PathBuf {
        let dir = self.path(name);
        let r = tool("cp", [Path::new("-a"), &self.src, &dir]);
        assert!(r.status.success(), "{r}");
        edit(&dir, patch);
        dir
    }

    /// The restore point mounted writable at `tmp/MOUNT` as `session`,
    /// its state under `tmp/state`.
    fn mount(&self, mount: &str, session: &str, extra: &[&str]) -> WritableMount {
        WritableMount::background_with(
            &self.repo,
            &self.restore_point,
            &self.path(mount),
            &self.path("state"),
            session,
            extra,
        )
    }
}

/// The backed-up directory as a session shows it.
fn src_in(mnt: &WritableMount) -> PathBuf {
    mnt.join("src")
}

/// Changes `root` (the source tree, or the session's view of it) in every
/// way a session must carry, the same way each time.
fn edit(root: &Path, patch: &[u8]) {
    let p = |rel: &str| root.join(rel);
    let open_rw = |rel: &str| {
        let path = p(rel);
        must(
            "open for writing",
            &path,
            OpenOptions::new().write(true).open(&path),
        )
    };

    // 4 KiB overwritten in place in the middle of the big file.
    let f = open_rw(BIG);
    must("write", &p(BIG), f.write_all_at(patch, PATCH_AT));
    drop(f);

    // Appended to.
    let path = p("notes.txt");
    let mut f = must(
        "open for appending",
        &path,
        OpenOptions::new().append(true).open(&path),
    );
    must(
        "append",
        &path,
        f.write_all(b"third line, from the session\n"),
    );
    drop(f);

    // Cut short and grown again.
    let f = open_rw("log.txt");
    must("truncate", &p("log.txt"), f.set_len(CUT_TO));
    must("extend", &p("log.txt"), f.set_len(REGROWN_TO));
    drop(f);

    // New directories and a new file.
    must("mkdir", &p("new-dir"), fs::create_dir(p("new-dir")));
    must(
        "mkdir",
        &p("new-dir/nested"),
        fs::create_dir(p("new-dir/nested")),
    );
    must(
        "create",
        &p("new-dir/fresh.txt"),
        fs::write(p("new-dir/fresh.txt"), b"made in the session\n"),
    );

    // A file renamed into another directory, a directory renamed.
    must(
        "rename",
        &p("dir/a.txt"),
        fs::rename(p("dir/a.txt"), p("dir/sub/a-renamed.txt")),
    );
    must(
        "rename",
        &p("old-dir"),
        fs::rename(p("old-dir"), p("moved-dir")),
    );

    // Deleted: a file, an empty directory, a directory tree.
    must("unlink", &p("gone.txt"), fs::remove_file(p("gone.txt")));
    must("rmdir", &p("empty-dir"), fs::remove_dir(p("empty-dir")));
    must("rm -r", &p("doomed"), fs::remove_dir_all(p("doomed")));

    must(
        "chmod",
        &p("script.sh"),
        fs::set_permissions(p("script.sh"), fs::Permissions::from_mode(0o755)),
    );
    must(
        "symlink",
        &p("links/to-notes"),
        std::os::unix::fs::symlink("../notes.txt", p("links/to-notes")),
    );

    // A hard link, written through: the other name shows it.
    must(
        "link",
        &p("b-link.txt"),
        fs::hard_link(p("dir/sub/b.txt"), p("b-link.txt")),
    );
    let path = p("b-link.txt");
    let mut f = must(
        "open for appending",
        &path,
        OpenOptions::new().append(true).open(&path),
    );
    must("append", &path, f.write_all(b"written through the link\n"));
    drop(f);

    for (i, rel) in TOUCHED.iter().enumerate() {
        let path = p(rel);
        let t = FileTime::from_unix_time(1_750_000_000 + i as i64 * 7_211, 123_456_789 + i as u32);
        let is_link = must("lstat", &path, fs::symlink_metadata(&path))
            .file_type()
            .is_symlink();
        let set = if is_link {
            filetime::set_symlink_file_times(&path, t, t)
        } else {
            filetime::set_file_times(&path, t, t)
        };
        must("set the times of", &path, set);
    }
}

/// Bytes `[offset, offset + len)` of `path`.
fn read_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = must("open", path, fs::File::open(path));
    let mut buf = vec![0u8; len];
    must("read", path, f.read_exact_at(&mut buf, offset));
    buf
}

/// Panics unless the session at `src` (its view of the source) shows
/// the hard link [`edit`] made as one file under two names.
#[track_caller]
fn assert_hard_link(src: &Path) {
    let stat = |rel: &str| {
        let path = src.join(rel);
        must("stat", &path, fs::metadata(&path))
    };
    let (a, b) = (stat("dir/sub/b.txt"), stat("b-link.txt"));
    assert_eq!(
        (a.ino(), a.nlink()),
        (b.ino(), b.nlink()),
        "dir/sub/b.txt and b-link.txt in {} are not one file",
        src.display()
    );
    assert_eq!(a.nlink(), 2, "link count of a file with two names");
}

/// Every regular file under `dir` with the bytes it takes on disk, and
/// the total.
fn disk_usage(dir: &Path) -> (Vec<(String, u64)>, u64) {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in must("read_dir", &d, fs::read_dir(&d)) {
            let path = e.expect("directory entry").path();
            let meta = must("lstat", &path, fs::symlink_metadata(&path));
            if meta.is_dir() {
                stack.push(path);
            } else {
                let rel = path
                    .strip_prefix(dir)
                    .expect("inside")
                    .display()
                    .to_string();
                files.push((rel, meta.blocks() * 512));
            }
        }
    }
    files.sort();
    let total = files.iter().map(|(_, b)| b).sum();
    (files, total)
}

/// `flr session ARGS... --state-dir DIR`, without asserting.
fn session(state_dir: &Path, args: &[&str]) -> Run {
    Flr::new(["session"])
        .args(args)
        .arg("--state-dir")
        .arg(state_dir)
        .run()
}

/// The sessions `flr session list --json` shows.
#[track_caller]
fn listed_sessions(state_dir: &Path) -> Vec<Value> {
    let r = session(state_dir, &["list", "--json"]).success();
    match r.json() {
        Value::Array(items) => items,
        other => panic!("session list --json is not an array: {other}"),
    }
}

/// Session `id` as `flr session list --json` shows it, if it does.
#[track_caller]
fn listed(state_dir: &Path, id: &str) -> Option<Value> {
    listed_sessions(state_dir)
        .into_iter()
        .find(|s| s["info"]["id"] == id)
}

/// `flr session commit ID --job JOB --json`: the new restore point and
/// the bytes it added to the repository.
#[track_caller]
fn commit(state_dir: &Path, id: &str, job: &str) -> (String, u64) {
    let r = session(state_dir, &["commit", id, "--job", job, "--json"]).success();
    let v = r.json();
    let name = v["restore_point"]
        .as_str()
        .unwrap_or_else(|| panic!("no restore_point in the commit's output: {r}"))
        .to_string();
    let added = v["added_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no added_bytes in the commit's output: {r}"));
    assert!(
        name.starts_with(&format!("{job}/")),
        "session commit made {name:?}, not a restore point of job {job}: {r}"
    );
    (name, added)
}

/// `flr session discard ID`; asserts that the mount and its process are
/// gone, and the session's directory with them, and then that the command
/// said so: a wrong exit status alone is reported with what the discard
/// did do.
#[track_caller]
fn discard(mnt: &WritableMount) {
    let r = discard_run(mnt);
    assert_discard_succeeded(&r, mnt);
}

/// `flr session discard ID` and the checks of its effects; the exit
/// status is left to [`assert_discard_succeeded`].
#[track_caller]
fn discard_run(mnt: &WritableMount) -> Run {
    let r = session(&mnt.state_dir, &["discard", &mnt.session]);
    assert!(
        !is_mounted(mnt.path()),
        "{} is still mounted after session discard: {r}",
        mnt.path().display()
    );
    assert_process_ends(mnt, "session discard");
    let dir = mnt.state_dir.join(&mnt.session);
    assert!(!dir.exists(), "session discard left {}: {r}", dir.display());
    r
}

#[track_caller]
fn assert_discard_succeeded(r: &Run, mnt: &WritableMount) {
    assert!(
        r.status.success(),
        "session discard unmounted and removed session {} but failed: {r}\n--- mount messages ---\n{}",
        mnt.session,
        mnt.messages()
    );
}

/// Panics unless the mount process of `mnt` ends within [`EXIT_GRACE`].
#[track_caller]
fn assert_process_ends(mnt: &WritableMount, after: &str) {
    if let Some(pid) = mnt.mount.pid {
        assert!(
            wait_for_exit(pid, EXIT_GRACE),
            "the mount process {pid} still runs {EXIT_GRACE:?} after {after}:\n{}",
            mnt.messages()
        );
    }
}

/// Kills the mount process of `mnt` with SIGKILL and clears the dead
/// mount it may leave (the auto-unmount helper usually removes it).
#[track_caller]
fn kill_mount(mnt: &WritableMount) {
    let pid = mnt.mount.pid.expect("the mount process's pid");
    send_signal(pid, "KILL");
    assert!(
        wait_for_exit(pid, Duration::from_secs(10)),
        "the mount process {pid} survived SIGKILL"
    );
    // The auto-unmount helper acts asynchronously; give it a moment.
    let started = Instant::now();
    while is_mounted(mnt.path()) && started.elapsed() < Duration::from_secs(5) {
        thread::sleep(Duration::from_millis(50));
    }
    if is_mounted(mnt.path()) {
        eprintln!("a dead mount remained after SIGKILL; clearing it");
        force_unmount(mnt.path());
    }
    assert!(
        !is_mounted(mnt.path()),
        "a dead mount stays at {}",
        mnt.path().display()
    );
}

/// Unmounts `mnt` from outside with `program` (`fusermount3 -u` or
/// `umount`) and waits for its process to end.
#[track_caller]
fn unmount_with(mnt: &WritableMount, program: &str, args: &[&str]) {
    let r = tool(program, args.iter().map(Path::new).chain([mnt.path()]));
    assert!(r.status.success(), "{r}");
    assert!(!is_mounted(mnt.path()), "still mounted after {program}");
    assert_process_ends(mnt, program);
}

/// Free bytes of the filesystem holding `path`, as `df` reports them.
fn free_bytes(path: &Path) -> u64 {
    let r = tool("df", [Path::new("-B1"), Path::new("--output=avail"), path]);
    assert!(r.status.success(), "{r}");
    r.stdout
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("cannot read the free space from {r}"))
}

/// A tmpfs of a fixed size, unmounted on drop (also while a failed test
/// unwinds; lazily if something still uses it).
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    #[track_caller]
    fn mount(path: &Path, size: &str) -> Tmpfs {
        flr_e2e::mkdir(path);
        let path = path.canonicalize().expect("canonical tmpfs path");
        let r = tool(
            "mount",
            [
                Path::new("-t"),
                Path::new("tmpfs"),
                Path::new("-o"),
                Path::new(&format!("size={size}")),
                Path::new("tmpfs"),
                &path,
            ],
        );
        assert!(r.status.success(), "{r}");
        Tmpfs { path }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        for args in [&[][..], &["-l"][..]] {
            if !is_mounted(&self.path) {
                return;
            }
            let _ = Command::new("umount")
                .args(args)
                .arg(&self.path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The repository's files but its locks: a mount holds a reader lock
/// while it runs, and no restore point's data may change.
fn stored_files(repo: &TestRepo) -> std::collections::BTreeMap<String, u64> {
    repo.listing()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("locks/"))
        .collect()
}

#[test]
fn writes_land_in_the_session_not_the_repository() {
    let fx = Backed::new("writable-cow", 11);
    let listing = stored_files(&fx.repo);
    let patch = Rng::new(12).bytes(PATCH_LEN);
    let expected = fx.expected("expected", &patch);

    let mnt = fx.mount("mnt", "cow", &[]);
    assert!(
        mnt.messages()
            .contains(&format!("writable session cow of {}", fx.restore_point)),
        "the mount did not announce the session:\n{}",
        mnt.messages()
    );
    let src = src_in(&mnt);
    assert_same_tree(&fx.src, &src);
    edit(&src, &patch);
    assert_same_tree(&expected, &src);
    assert_hard_link(&src);
    assert_eq!(read_range(&src.join(BIG), PATCH_AT, PATCH_LEN), patch);
    assert_eq!(
        read_range(&src.join("log.txt"), CUT_TO, (REGROWN_TO - CUT_TO) as usize),
        vec![0u8; (REGROWN_TO - CUT_TO) as usize],
        "log.txt after a cut and a regrow shows old bytes past the cut"
    );

    // The session holds the written bytes and not much else: the big
    // file's data file one page for the 4 KiB, the whole data directory
    // a few pages per changed file.
    let session_dir = mnt.state_dir.join("cow");
    let entry = listed(&mnt.state_dir, "cow").expect("session list shows the mounted session");
    assert_eq!(entry["in_use"], true, "{entry}");
    let (data_files, data_total) = disk_usage(&session_dir.join("data"));
    let (_, session_total) = disk_usage(&session_dir);
    // Data files are named by node, not inode: the big file's is the one
    // holding the patch at the patch's offset.
    let big_data = data_files
        .iter()
        .map(|(name, _)| session_dir.join("data").join(name))
        .find(|path| {
            fs::metadata(path).unwrap().len() >= PATCH_AT + PATCH_LEN as u64
                && read_range(path, PATCH_AT, PATCH_LEN) == patch
        })
        .unwrap_or_else(|| {
            panic!("no data file holds the patch of {BIG}; the data directory holds {data_files:?}")
        });
    let big_allocated = allocated_bytes(&big_data);
    eprintln!(
        "4 KiB written into a {BIG_LEN}-byte file: its data file takes {big_allocated} bytes \
         (apparent size {}); data directory {data_total} bytes in {} files {data_files:?}; \
         whole session directory {session_total} bytes",
        fs::metadata(&big_data).unwrap().len(),
        data_files.len()
    );
    assert!(
        (PATCH_LEN as u64..=2 * PATCH_LEN as u64).contains(&big_allocated),
        "the data file of {BIG} takes {big_allocated} bytes for a {PATCH_LEN}-byte write"
    );
    assert!(
        data_total <= 128 << 10,
        "the session's data takes {data_total} bytes for a few KiB written: {data_files:?}"
    );

    // While the session is mounted, the restore point itself reads as
    // it was backed up, through a read-only mount.
    let ro = Mount::background(
        &fx.repo,
        &fx.path("ro"),
        &["--restore-point", &fx.restore_point],
    );
    assert_same_tree(
        &fx.src,
        &ro.join("orig").join(ts(&fx.restore_point)).join("src"),
    );
    drop(ro);
    assert_eq!(
        stored_files(&fx.repo),
        listing,
        "the repository's files changed while a session was written to"
    );

    drop(mnt);
    assert_eq!(stored_files(&fx.repo), listing);
    let report = fx.repo.verify_run(true).success().json();
    assert_eq!(report["clean"], true, "{report}");
    let out = fx.path("restored");
    fx.repo.restore(&fx.restore_point, &out, &[] as &[&str]);
    assert_same_tree(&fx.src, &out.join("src"));
    assert_eq!(
        fx.repo.restore_point_names(),
        [fx.restore_point.as_str()],
        "a session that was not committed made a restore point"
    );
}

#[test]
fn commit_makes_a_restore_point_sharing_chunks() {
    let fx = Backed::new("writable-commit", 21);
    let patch = Rng::new(22).bytes(PATCH_LEN);
    let expected = fx.expected("expected", &patch);

    let mnt = fx.mount("mnt", "edit", &[]);
    let src = src_in(&mnt);
    edit(&src, &patch);
    assert_same_tree(&expected, &src);

    let (committed, added) = commit(&mnt.state_dir, "edit", "edited");
    eprintln!(
        "commit {committed}: {added} bytes added; the first backup added {}, {BIG} alone is {} bytes",
        fx.full_added,
        BIG_LEN
    );
    // Only the chunks around the 4 KiB write and the new small files are
    // new: a few chunks of about 64 KiB, not the big file again.
    assert!(
        added < MIB && added * 8 < fx.full_added,
        "the commit added {added} bytes for a few KiB of changes (the first backup added {})",
        fx.full_added
    );
    // The commit leaves the session as it is, still mounted.
    assert!(is_mounted(mnt.path()));
    assert_same_tree(&expected, &src);

    let names = fx.repo.restore_point_names();
    assert!(
        names.contains(&committed) && names.contains(&fx.restore_point),
        "restore points {names:?} should hold {} and {committed}",
        fx.restore_point
    );
    let out = fx.path("committed");
    fx.repo.restore(&committed, &out, &[] as &[&str]);
    assert_same_tree(&expected, &out.join("src"));

    let ro = Mount::background(&fx.repo, &fx.path("ro"), &["--restore-point", &committed]);
    assert_same_tree(
        &expected,
        &ro.join("edited").join(ts(&committed)).join("src"),
    );
    drop(ro);

    let report = fx.repo.verify_run(true).success().json();
    assert_eq!(report["clean"], true, "{report}");
    // The original restore point is untouched by the commit.
    let original = fx.path("original");
    fx.repo
        .restore(&fx.restore_point, &original, &[] as &[&str]);
    assert_same_tree(&fx.src, &original.join("src"));
    discard(&mnt);
}

#[test]
fn discard_leaves_nothing() {
    let fx = Backed::new("writable-discard", 31);
    let listing = stored_files(&fx.repo);
    let patch = Rng::new(32).bytes(PATCH_LEN);

    let mnt = fx.mount("mnt", "scratchpad", &[]);
    let src = src_in(&mnt);
    edit(&src, &patch);
    write_random_file(&src.join("more.bin"), 2 * MIB, &mut Rng::new(33));
    let session_dir = mnt.state_dir.join("scratchpad");
    let (_, before) = disk_usage(&session_dir);
    eprintln!("session directory before the discard: {before} bytes");
    assert!(before >= 2 * MIB, "the session holds only {before} bytes");
    assert!(listed(&mnt.state_dir, "scratchpad").is_some());

    let discarded = discard_run(&mnt);
    let left: Vec<PathBuf> = fs::read_dir(&mnt.state_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        left.is_empty(),
        "the state directory still holds {left:?} after the discard"
    );
    let sessions = listed_sessions(&mnt.state_dir);
    assert!(
        sessions.is_empty(),
        "session list after the discard: {sessions:?}"
    );
    assert!(
        mnt.messages().contains("session scratchpad discarded"),
        "the mount process did not report the discard:\n{}",
        mnt.messages()
    );
    assert_eq!(
        stored_files(&fx.repo),
        listing,
        "the repository's files changed through a discarded session"
    );
    assert_eq!(fx.repo.restore_point_names(), [fx.restore_point.as_str()]);

    // A new session of the same restore point shows none of it.
    let again = fx.mount("mnt-again", "fresh", &[]);
    assert_same_tree(&fx.src, &src_in(&again));
    drop(again);
    assert_eq!(stored_files(&fx.repo), listing);
    assert_discard_succeeded(&discarded, &mnt);
}

#[test]
fn a_crashed_session_resumes() {
    let fx = Backed::new("writable-crash", 41);
    let patch = Rng::new(42).bytes(PATCH_LEN);
    let expected = fx.expected("expected", &patch);
    // Files copied in with dd: one flushed with fsync, one not.
    let mut rng = Rng::new(43);
    let synced = fx.path("synced.src");
    let unsynced = fx.path("unsynced.src");
    write_random_file(&synced, 3 * MIB + 12_345, &mut rng);
    write_random_file(&unsynced, 2 * MIB + 777, &mut rng);
    let patch2 = rng.bytes(PATCH_LEN);
    let patch2_at = 5 * MIB;
    let seek = format!("seek={}", patch2_at / PATCH_LEN as u64);
    let patch2_file = fx.path("patch2.src");
    fs::write(&patch2_file, &patch2).unwrap();

    let dd = |from: &Path, to: &Path, extra: &[&str]| {
        let mut args = vec![
            format!("if={}", from.display()),
            format!("of={}", to.display()),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let r = tool("dd", &args);
        assert!(r.status.success(), "{r}");
    };
    // The same changes on the plain copy and the session; fixed mtimes
    // on the files dd wrote and on their directory, so the two compare
    // equal.
    let copy_in = |root: &Path| {
        dd(&synced, &root.join("synced.bin"), &["bs=64k", "conv=fsync"]);
        dd(&unsynced, &root.join("unsynced.bin"), &["bs=64k"]);
        dd(
            &patch2_file,
            &root.join(BIG),
            &["bs=4096", &seek, "conv=notrunc"],
        );
        for (i, rel) in [".", "synced.bin", "unsynced.bin", BIG].iter().enumerate() {
            let t = FileTime::from_unix_time(1_760_000_000 + i as i64, 5 + i as u32);
            filetime::set_file_times(root.join(rel), t, t).unwrap();
        }
    };
    copy_in(&expected);

    let state = fx.path("state");
    // The guards of killed mounts are kept until the end of the test:
    // dropping one would discard the session the test resumes.
    let crashed = fx.mount("mnt", "crash", &[]);
    let src = src_in(&crashed);
    edit(&src, &patch);
    copy_in(&src);
    assert_same_tree(&expected, &src);

    kill_mount(&crashed);

    let session_dir = state.join("crash");
    assert!(
        session_dir.join("session.json").is_file(),
        "the killed session's directory {} is gone",
        session_dir.display()
    );
    let entry = listed(&state, "crash").expect("session list shows the killed session");
    assert_eq!(entry["in_use"], false, "{entry}");
    assert_eq!(entry["info"]["restore_point"], fx.restore_point.as_str());
    let text = session(&state, &["list"]).success();
    assert!(
        text.stdout
            .lines()
            .any(|l| l.starts_with("crash ") && l.contains("kept")),
        "session list does not show the killed session as kept: {text}"
    );

    let resumed = WritableMount::resume(&fx.repo, &fx.path("mnt-resumed"), &state, "crash", &[]);
    let src = src_in(&resumed);
    assert_same_tree(&expected, &src);
    assert_hard_link(&src);
    assert_cmp(&synced, &src.join("synced.bin"));
    assert_cmp(&unsynced, &src.join("unsynced.bin"));
    assert_eq!(read_range(&src.join(BIG), patch2_at, PATCH_LEN), patch2);

    // The resumed session takes writes like before, and survives a
    // second crash with them: the replayed journal and the new records
    // after it.
    let more = b"written after the resume\n";
    let path = src.join("new-dir/fresh.txt");
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(more).unwrap();
    drop(f);
    let path = src.join("synced.bin");
    must("unlink", &path, fs::remove_file(&path));
    kill_mount(&resumed);
    let again = WritableMount::resume(&fx.repo, &fx.path("mnt-again"), &state, "crash", &[]);
    let src = src_in(&again);
    assert_eq!(
        fs::read(src.join("new-dir/fresh.txt")).unwrap(),
        [&b"made in the session\n"[..], more].concat()
    );
    assert!(!src.join("synced.bin").exists());
    assert_cmp(&unsynced, &src.join("unsynced.bin"));
    assert_same_tree(&expected.join("dir"), &src.join("dir"));

    assert_eq!(fx.repo.restore_point_names(), [fx.restore_point.as_str()]);
    discard(&again);
    assert!(listed(&state, "crash").is_none());
}

#[test]
fn a_full_state_dir_gives_enospc() {
    let fx = Backed::new("writable-enospc", 51);
    // Declared before the mount, so the session is discarded before the
    // tmpfs goes.
    let tmpfs = Tmpfs::mount(&fx.path("state"), "48m");
    let reserve = 8 * MIB;

    // Less free space than --min-free (256 MiB unless given): the session
    // does not start, and leaves nothing behind.
    let refused_at = fx.path("mnt-refused");
    flr_e2e::mkdir(&refused_at);
    let _unmount = UnmountOnDrop(refused_at.canonicalize().unwrap());
    let r = fx
        .repo
        .cmd("mount")
        .args(["--restore-point", &fx.restore_point, "--writable"])
        .args(["--session", "refused", "--state-dir"])
        .arg(&tmpfs.path)
        .arg(&refused_at)
        .timeout(Duration::from_secs(60))
        .run();
    assert!(
        !r.status.success() && r.stderr.contains("--min-free"),
        "a session started on 48 MiB with --min-free at its default: {r}"
    );
    assert!(!is_mounted(&refused_at.canonicalize().unwrap()));
    let left: Vec<PathBuf> = fs::read_dir(&tmpfs.path)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "a refused session left {left:?}");

    let mnt = WritableMount::background_with(
        &fx.repo,
        &fx.restore_point,
        &fx.path("mnt"),
        &tmpfs.path,
        "full",
        &["--min-free", "1M", "--reserve", "8M"],
    );
    let src = src_in(&mnt);

    // Written before the state directory fills up.
    let before = fx.path("before.src");
    write_random_file(&before, 4 * MIB, &mut Rng::new(52));
    let r = tool("cp", [&before, &src.join("before.bin")]);
    assert!(r.status.success(), "{r}");
    let patch = Rng::new(53).bytes(PATCH_LEN);
    let f = OpenOptions::new().write(true).open(src.join(BIG)).unwrap();
    f.write_all_at(&patch, PATCH_AT).unwrap();
    drop(f);
    let free_before = free_bytes(&tmpfs.path);
    // The mount shows the state directory's free space less the reserve.
    let mount_free = free_bytes(mnt.path());
    eprintln!("free space: state directory {free_before} bytes, the mount says {mount_free}");
    assert!(
        mount_free + reserve <= free_before + MIB,
        "the mount reports {mount_free} bytes free, the state directory has {free_before} and a reserve of {reserve}"
    );

    let huge = src.join("huge.bin");
    let r = tool(
        "dd",
        [
            "if=/dev/urandom".to_string(),
            format!("of={}", huge.display()),
            "bs=1M".to_string(),
            "count=100".to_string(),
            "iflag=fullblock".to_string(),
        ],
    );
    let huge_len = fs::metadata(&huge).map(|m| m.len()).unwrap_or(0);
    let free_after = free_bytes(&tmpfs.path);
    eprintln!(
        "dd of 100 MiB into a session on a 48 MiB tmpfs (reserve 8 MiB): stopped at {huge_len} bytes; \
         tmpfs free {free_before} bytes before, {free_after} after; dd said: {}",
        r.stderr.trim()
    );
    assert!(
        !r.status.success() && r.stderr.contains("No space left on device"),
        "dd should fail with ENOSPC: {r}"
    );
    assert!(
        huge_len + reserve <= 48 * MIB,
        "{huge_len} bytes were written into the 8 MiB reserve of a 48 MiB state directory"
    );
    // The reserve is enforced by bytes written since the last look at the
    // free space: allow some slack.
    assert!(
        free_after >= reserve / 2,
        "only {free_after} bytes are left in the state directory: the reserve was not kept"
    );

    // The mount still works: what was written before is intact ...
    assert!(is_mounted(mnt.path()), "{}", mnt.messages());
    assert_cmp(&before, &src.join("before.bin"));
    assert_eq!(read_range(&src.join(BIG), PATCH_AT, PATCH_LEN), patch);
    assert_same_tree(&fx.src.join("dir"), &src.join("dir"));
    // ... and once the big file is gone, writes succeed again.
    must("unlink", &huge, fs::remove_file(&huge));
    let free_after_rm = free_bytes(&tmpfs.path);
    eprintln!("tmpfs free after deleting the big file: {free_after_rm} bytes");
    let small = Rng::new(54).bytes((8 * MIB) as usize);
    let after = src.join("after.bin");
    let written = fs::write(&after, &small);
    assert!(
        written.is_ok(),
        "writing 8 MiB after deleting the {huge_len}-byte file failed: {written:?} \
         (tmpfs free: {free_after_rm} bytes)"
    );
    assert!(
        fs::read(&after).unwrap() == small,
        "after.bin reads back different bytes"
    );
    assert_cmp(&before, &src.join("before.bin"));
    let messages = mnt.messages();
    drop(mnt);
    assert!(
        fs::read_dir(&tmpfs.path).unwrap().next().is_none(),
        "the discarded session left files on the tmpfs:\n{messages}"
    );
    drop(tmpfs);
}

/// What [`sqlite_read_write_on_a_session`] asks a database: the rows it
/// changes, and aggregates over all of them.
const FINGERPRINT: &str = "SELECT count(*), sum(amount_cents), max(id) FROM orders;
     SELECT count(*), max(id) FROM customers;
     SELECT id, customer_id, amount_cents, day FROM orders WHERE id IN (100, 150, 300, 20001, 21000, 21001, 22000) ORDER BY id;
     SELECT count(*) FROM orders WHERE customer_id = 501;";

/// A transaction in the default rollback-journal mode: new rows at the
/// end of the table and its indexes, and changes inside existing pages.
const ROLLBACK_TXN: &str = "PRAGMA journal_mode=DELETE;
     BEGIN;
     WITH RECURSIVE o(i) AS (SELECT 20001 UNION ALL SELECT i + 1 FROM o WHERE i < 21000)
     INSERT INTO orders SELECT i, 1 + i % 500, i % 9973, date('2024-01-01', '+' || (i % 300) || ' days'),
                               printf('session order %08d', i) FROM o;
     UPDATE orders SET amount_cents = amount_cents + 1 WHERE id % 100 = 0;
     COMMIT;";

/// The same in WAL mode, checkpointed; a separate step switches back to
/// a rollback journal, so that the file alone holds the database.
const WAL_TXN: &str = "PRAGMA journal_mode=WAL;
     INSERT INTO customers VALUES (501, 'customer from the session', 'Oslo');
     BEGIN;
     WITH RECURSIVE o(i) AS (SELECT 21001 UNION ALL SELECT i + 1 FROM o WHERE i < 22000)
     INSERT INTO orders SELECT i, 501, i % 7919, '2025-06-01', printf('wal order %08d', i) FROM o;
     DELETE FROM orders WHERE id BETWEEN 100 AND 199;
     COMMIT;
     PRAGMA wal_checkpoint(TRUNCATE);";

#[track_caller]
fn sql_ok(db: impl AsRef<std::ffi::OsStr>, sql: &str) -> String {
    let r = sqlite3(db, sql);
    assert!(r.status.success(), "{r}");
    r.stdout
}

#[test]
fn sqlite_read_write_on_a_session() {
    let tmp = scratch("writable-sqlite");
    let dir = tmp.path().join("db");
    flr_e2e::mkdir(&dir);
    let db = dir.join("shop.db");
    create_shop(&db, 500, 20_000);
    let original = sql_ok(&db, FINGERPRINT);
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let rp = repo.backup("shop", &[&dir]).restore_point;

    // The control: the same statements on a plain copy.
    let plain = tmp.path().join("plain.db");
    fs::copy(&db, &plain).unwrap();
    sql_ok(&plain, ROLLBACK_TXN);
    let after_rollback_txn = sql_ok(&plain, FINGERPRINT);
    sql_ok(&plain, WAL_TXN);
    sql_ok(&plain, "PRAGMA journal_mode=DELETE;");
    let changed = sql_ok(&plain, FINGERPRINT);
    assert_ne!(changed, original);

    let mnt = WritableMount::background(
        &repo,
        &rp,
        &tmp.path().join("mnt"),
        &tmp.path().join("state"),
        "sql",
    );
    let in_mount = mnt.join("db/shop.db");
    assert_eq!(sql_ok(&in_mount, FINGERPRINT), original);
    sql_ok(&in_mount, ROLLBACK_TXN);
    assert_eq!(sql_ok(&in_mount, FINGERPRINT), after_rollback_txn);
    assert!(
        !mnt.join("db/shop.db-journal").exists(),
        "the rollback journal is still there after the transaction"
    );
    sql_ok(&in_mount, WAL_TXN);
    assert_eq!(sql_ok(&in_mount, FINGERPRINT), changed);
    assert_eq!(
        sql_ok(&in_mount, "PRAGMA journal_mode=DELETE;").trim(),
        "delete"
    );
    assert_eq!(sql_ok(&in_mount, FINGERPRINT), changed);
    assert_eq!(sql_ok(&in_mount, "PRAGMA integrity_check;").trim(), "ok");
    let left: Vec<String> = fs::read_dir(mnt.join("db"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        left,
        ["shop.db"],
        "files next to the database in the session"
    );

    let (committed, added) = commit(&mnt.state_dir, "sql", "shop-edited");
    eprintln!(
        "commit {committed}: {added} bytes added for a {}-byte database",
        fs::metadata(&in_mount).unwrap().len()
    );

    let out = tmp.path().join("committed");
    repo.restore(&committed, &out, &[] as &[&str]);
    let restored = format!("file:{}?immutable=1", out.join("db/shop.db").display());
    assert_eq!(sql_ok(&restored, FINGERPRINT), changed);
    assert_eq!(sql_ok(&restored, "PRAGMA integrity_check;").trim(), "ok");
    assert_eq!(
        sql_ok(&restored, "SELECT count(*) FROM orders WHERE id > 20000;").trim(),
        "2000"
    );

    // The committed restore point in a session of its own, and the
    // original one read-only: each holds its own rows.
    let again = WritableMount::background(
        &repo,
        &committed,
        &tmp.path().join("mnt-committed"),
        &tmp.path().join("state"),
        "reopen",
    );
    assert_eq!(sql_ok(again.join("db/shop.db"), FINGERPRINT), changed);
    drop(again);
    let ro = Mount::background(&repo, &tmp.path().join("ro"), &["--restore-point", &rp]);
    let original_db = format!(
        "file:{}?immutable=1",
        ro.join("shop").join(ts(&rp)).join("db/shop.db").display()
    );
    assert_eq!(sql_ok(&original_db, FINGERPRINT), original);
    assert_eq!(
        sql_ok(
            &original_db,
            "SELECT count(*) FROM orders WHERE id > 20000;"
        )
        .trim(),
        "0"
    );
    drop(ro);

    let report = repo.verify_run(true).success().json();
    assert_eq!(report["clean"], true, "{report}");
    discard(&mnt);
}

#[test]
fn unmount_discards_and_keep_keeps() {
    let fx = Backed::new("writable-keep", 61);
    let state = fx.path("state");
    let patch = Rng::new(62).bytes(PATCH_LEN);

    // SIGTERM to the mount process, without --keep: the session goes.
    let mnt = fx.mount("mnt-term", "term", &[]);
    fs::write(src_in(&mnt).join("new.txt"), b"gone with the session\n").unwrap();
    let pid = mnt.mount.pid.expect("the mount process's pid");
    send_signal(pid, "TERM");
    assert_process_ends(&mnt, "SIGTERM");
    assert!(!is_mounted(mnt.path()), "still mounted after SIGTERM");
    assert!(
        !state.join("term").exists(),
        "SIGTERM without --keep left the session's directory"
    );
    assert!(
        mnt.messages().contains("session term discarded"),
        "{}",
        mnt.messages()
    );
    drop(mnt);

    // umount from outside, without --keep: the same.
    let mnt = fx.mount("mnt-umount", "umount", &[]);
    fs::write(src_in(&mnt).join("new.txt"), b"gone with the session\n").unwrap();
    unmount_with(&mnt, "umount", &[]);
    assert!(
        !state.join("umount").exists(),
        "umount without --keep left the session's directory"
    );
    drop(mnt);
    assert!(listed_sessions(&state).is_empty());

    // With --keep the session stays, and a resume shows its changes.
    let expected = fx.expected("expected", &patch);
    let mnt = fx.mount("mnt-keep", "kept", &["--keep"]);
    edit(&src_in(&mnt), &patch);
    unmount_with(&mnt, "fusermount3", &["-u"]);
    assert!(
        state.join("kept").join("session.json").is_file(),
        "unmounting with --keep removed the session's directory:\n{}",
        mnt.messages()
    );
    assert!(
        mnt.messages().contains("session kept kept in"),
        "the mount process did not report the session kept:\n{}",
        mnt.messages()
    );
    let entry = listed(&state, "kept").expect("session list shows the kept session");
    assert_eq!(entry["in_use"], false, "{entry}");
    let text = session(&state, &["list"]).success();
    assert!(
        text.stdout
            .lines()
            .any(|l| l.starts_with("kept ") && l.contains("kept (resume")),
        "{text}"
    );

    // A kept session commits with no mount serving it, and stays.
    let (committed, added) = commit(&state, "kept", "kept");
    eprintln!("commit of the unmounted session: {committed}, {added} bytes added");
    let out = fx.path("committed");
    fx.repo.restore(&committed, &out, &[] as &[&str]);
    assert_same_tree(&expected, &out.join("src"));
    let entry = listed(&state, "kept").expect("the session stays after a commit");
    assert_eq!(entry["in_use"], false, "{entry}");

    // The kept session's guard would discard it on drop; it is only
    // dropped after the resumed mount.
    let resumed = WritableMount::resume(&fx.repo, &fx.path("mnt-resumed"), &state, "kept", &[]);
    assert_same_tree(&expected, &src_in(&resumed));
    assert_hard_link(&src_in(&resumed));
    let mut names = fx.repo.restore_point_names();
    names.sort();
    let mut want = vec![fx.restore_point.clone(), committed];
    want.sort();
    assert_eq!(names, want);
    discard(&resumed);
    assert!(listed_sessions(&state).is_empty());
}
