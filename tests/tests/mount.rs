//! `flr mount` through the real kernel FUSE driver: the layout, every
//! attribute and byte of a rich tree seen by real tools, SQLite opening a
//! database straight from the mount, concurrent readers, EIO on damaged
//! data, EROFS on every kind of write, encrypted repositories, and how the
//! mount process ends (signals, outside unmount, SIGKILL).

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use flr_e2e::command::{run, send_signal, tool, wait_for_exit};
use flr_e2e::mount::{force_unmount, UnmountOnDrop};
use flr_e2e::repo::flip_byte;
use flr_e2e::rng::{mixed_bytes, Rng};
use flr_e2e::sqlite::{create_shop, sqlite3};
use flr_e2e::tree::{
    allocated_bytes, assert_cmp, assert_same_tree, build_rich_tree, regular_files,
    write_random_file, MIB,
};
use flr_e2e::{is_mounted, scratch, Flr, Mount, TestRepo};

/// `job/timestamp` -> `timestamp`.
fn ts(restore_point: &str) -> &str {
    restore_point.split_once('/').expect("job/timestamp").1
}

/// Sorted entry names of a directory, lossy.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// `find . -printf` of kind, mode, mtime (ns), link target and path for
/// every entry under `dir`, sorted (readdir order differs between
/// filesystems).
fn find_listing(dir: &Path) -> Vec<String> {
    let r = run(Command::new("find")
        .arg(".")
        .args(["-printf", "%y %m %T@ %l %p\\0"])
        .current_dir(dir));
    assert!(r.status.success(), "find failed in {}: {r}", dir.display());
    let mut lines: Vec<String> = r
        .stdout
        .split('\0')
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    lines.sort();
    lines
}

/// Runs a shell command in `dir`; asserts exit 0 and returns stdout.
#[track_caller]
fn sh_in(dir: &Path, script: &str) -> String {
    let r = run(Command::new("bash")
        .args(["-o", "pipefail", "-c", script])
        .current_dir(dir));
    assert!(
        r.status.success(),
        "`{script}` failed in {}: {r}",
        dir.display()
    );
    r.stdout
}

#[test]
fn mounted_tree_matches_the_source_for_every_tool() {
    let tmp = scratch("mount-tree");
    let src = tmp.path().join("src");
    let tree = build_rich_tree(&src, 11);
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let first = repo.backup("files", &[&src]);
    let second = repo.backup("files", &[&src]);
    let mnt = Mount::background(&repo, &tmp.path().join("mnt"), &[]);

    // Layout: MNT/<job>/<timestamp>/<files>, and MNT/<job>/latest.
    assert_eq!(names(&mnt.path), ["files"]);
    let mut expected = vec![
        ts(&first.restore_point).to_string(),
        ts(&second.restore_point).to_string(),
    ];
    expected.push("latest".into());
    expected.sort();
    assert_eq!(names(&mnt.join("files")), expected);
    let latest = mnt.join("files/latest");
    assert!(fs::symlink_metadata(&latest)
        .unwrap()
        .file_type()
        .is_symlink());
    let target = fs::read_link(&latest).unwrap();
    assert_eq!(
        target.file_name().unwrap(),
        OsStr::new(ts(&second.restore_point)),
        "latest points at {target:?}, not the newest restore point"
    );
    assert_eq!(names(&mnt.join("files/latest")), ["src"]);
    assert_eq!(
        names(&mnt.join("files").join(ts(&first.restore_point))),
        ["src"]
    );

    let mounted = mnt
        .join("files")
        .join(ts(&second.restore_point))
        .join("src");
    assert_same_tree(&src, &mounted);
    for rel in regular_files(&src) {
        assert_cmp(&src.join(&rel), &mounted.join(&rel));
    }
    let sparse = mounted.join(tree.sparse);
    assert_eq!(fs::metadata(&sparse).unwrap().len(), tree.sparse_len);
    let allocated = allocated_bytes(&sparse);
    assert!(
        allocated > 0 && allocated < tree.sparse_len / 10,
        "st_blocks of the sparse file through the mount: {allocated} bytes of {}",
        tree.sparse_len
    );
    assert_eq!(find_listing(&src), find_listing(&mounted));

    // Everyday tools, on the whole mount.
    let listing = sh_in(&mnt.path, "ls -lR .");
    assert!(listing.contains("large.bin"), "{listing}");
    sh_in(&mnt.path, "find . > /dev/null");
    let du = sh_in(&mnt.path, "du -s .");
    assert!(
        du.split_whitespace()
            .next()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > 50 * 1024,
        "du: {du}"
    );
    let tar_bytes: u64 = sh_in(&mounted, "tar -cf - . | wc -c")
        .trim()
        .parse()
        .unwrap();
    assert!(tar_bytes > 150 * MIB, "tar wrote only {tar_bytes} bytes");

    let files: Vec<PathBuf> = regular_files(&src);
    let sums = |dir: &Path| {
        let r = run(Command::new("sha256sum")
            .arg("--")
            .args(&files)
            .current_dir(dir));
        assert!(r.status.success(), "sha256sum in {}: {r}", dir.display());
        r.stdout
    };
    assert_eq!(sums(&src), sums(&mounted));

    let copy = tmp.path().join("copy");
    let r = tool(
        "cp",
        [OsStr::new("-a"), mounted.as_os_str(), copy.as_os_str()],
    );
    assert!(r.status.success(), "cp -a from the mount: {r}");
    assert_same_tree(&src, &copy);

    mnt.unmount();
}

#[test]
fn sqlite_queries_straight_from_the_mount() {
    let tmp = scratch("mount-sqlite");
    let dir = tmp.path().join("db");
    fs::create_dir(&dir).unwrap();
    let db = dir.join("app.db");
    create_shop(&db, 20_000, 300_000);
    let size = fs::metadata(&db).unwrap().len();
    assert!(size > 20 * MIB, "database is only {size} bytes");
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let backup = repo.backup("shop", &[&dir]);
    let mnt = Mount::background(&repo, &tmp.path().join("mnt"), &[]);
    let mounted = mnt
        .join("shop")
        .join(ts(&backup.restore_point))
        .join("db/app.db");
    let uri = format!("file:{}?immutable=1", mounted.display());

    let queries = [
        // Point lookups through the primary key.
        "SELECT * FROM orders WHERE id = 123457;",
        "SELECT id, name, city FROM customers WHERE id IN (1, 777, 19999) ORDER BY id;",
        // Range scan.
        "SELECT id, customer_id, amount_cents, day FROM orders WHERE id BETWEEN 200000 AND 200300;",
        // Aggregate over the whole table.
        "SELECT count(*), sum(amount_cents), avg(amount_cents), min(day), max(day) FROM orders;",
        // Join and group by.
        "SELECT c.city, count(*), sum(o.amount_cents) FROM orders o JOIN customers c ON c.id = o.customer_id \
         GROUP BY c.city ORDER BY c.city;",
        // Through secondary indexes.
        "SELECT count(*), sum(amount_cents) FROM orders WHERE customer_id = 4242;",
        "SELECT day, count(*), max(amount_cents) FROM orders WHERE day BETWEEN '2021-03-01' AND '2021-03-10' \
         GROUP BY day ORDER BY day;",
        "SELECT id FROM customers WHERE city = 'Zürich' ORDER BY id DESC LIMIT 5;",
        "PRAGMA integrity_check;",
    ];
    for q in queries {
        let expected = sqlite3(&db, q);
        assert!(
            expected.status.success() && !expected.stdout.trim().is_empty(),
            "{expected}"
        );
        let got = sqlite3(&uri, q);
        assert!(
            got.status.success(),
            "query through the mount failed: {got}"
        );
        assert_eq!(
            got.stdout, expected.stdout,
            "query {q:?} differs through the mount"
        );
    }
    let plan = sqlite3(
        &uri,
        "EXPLAIN QUERY PLAN SELECT count(*) FROM orders WHERE customer_id = 4242;",
    );
    assert!(
        plan.stdout.contains("orders_by_customer"),
        "the index is not used: {plan}"
    );
    assert_cmp(&db, &mounted);
    mnt.unmount();
}

/// Reads up to `len` bytes at `offset`, looping over short reads.
fn read_range(f: &File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match f.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

#[test]
fn concurrent_random_reads_return_the_right_bytes() {
    let tmp = scratch("mount-concurrent");
    let src = tmp.path().join("big");
    fs::create_dir(&src).unwrap();
    let mut rng = Rng::new(13);
    write_random_file(&src.join("random.bin"), 64 * MIB, &mut rng);
    fs::write(
        src.join("mixed.bin"),
        mixed_bytes(&mut rng, 40 * MIB as usize + 12345),
    )
    .unwrap();
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let backup = repo.backup("big", &[&src]);
    // A small cache, so readers also race on eviction and refetch.
    let mnt = Mount::background(
        &repo,
        &tmp.path().join("mnt"),
        &["--cache-size", "16M", "--threads", "4"],
    );
    let mounted = mnt.join("big").join(ts(&backup.restore_point)).join("big");

    let names = ["random.bin", "mixed.bin"];
    let sources: Arc<Vec<Vec<u8>>> = Arc::new(
        names
            .iter()
            .map(|n| fs::read(src.join(n)).unwrap())
            .collect(),
    );
    let readers: Vec<_> = (0..8u64)
        .map(|t| {
            let sources = sources.clone();
            let files: Vec<File> = names
                .iter()
                .map(|n| File::open(mounted.join(n)).unwrap())
                .collect();
            thread::spawn(move || {
                let mut rng = Rng::new(1000 + t);
                let mut bytes = 0u64;
                for i in 0..120 {
                    // Threads 0-3 all read random.bin; the rest pick either.
                    let which = if t < 4 { 0 } else { rng.below(2) as usize };
                    let src = &sources[which];
                    let offset = rng.below(src.len() as u64);
                    let len = 1 + rng.below(MIB) as usize;
                    let got = read_range(&files[which], offset, len).unwrap_or_else(|e| {
                        panic!(
                            "thread {t} read {i}: {} at {offset}+{len}: {e}",
                            names[which]
                        )
                    });
                    let end = (offset as usize + len).min(src.len());
                    assert!(
                        got == src[offset as usize..end],
                        "thread {t} read {i}: wrong bytes from {} at {offset}+{len} ({} bytes)",
                        names[which],
                        got.len()
                    );
                    bytes += got.len() as u64;
                }
                bytes
            })
        })
        .collect();
    let total: u64 = readers
        .into_iter()
        .map(|h| h.join().expect("reader thread"))
        .sum();
    assert!(total > 100 * MIB, "readers read only {total} bytes");
    mnt.unmount();
}

#[test]
fn damaged_chunk_gives_eio_and_nothing_else_breaks() {
    let tmp = scratch("mount-eio");
    let src = tmp.path().join("data");
    fs::create_dir(&src).unwrap();
    let mut rng = Rng::new(14);
    // Packed in name order: the damaged file takes the first 16 MiB of a
    // ~20 MiB pack, so the pack's middle byte is inside it, near 10 MiB.
    write_random_file(&src.join("a-damaged.bin"), 16 * MIB, &mut rng);
    write_random_file(&src.join("b-other.bin"), 4 * MIB, &mut rng);
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let backup = repo.backup("data", &[&src]);
    let packs = repo.packs();
    assert_eq!(packs.len(), 1, "{packs:?}");
    let pack_len = fs::metadata(&packs[0]).unwrap().len();
    flip_byte(&packs[0], pack_len / 2);

    let mnt = Mount::background(&repo, &tmp.path().join("mnt"), &[]);
    let dir = mnt
        .join("data")
        .join(ts(&backup.restore_point))
        .join("data");
    let damaged = dir.join("a-damaged.bin");
    let source = fs::read(src.join("a-damaged.bin")).unwrap();

    let other = fs::read(dir.join("b-other.bin")).expect("the undamaged file reads");
    assert!(
        other == fs::read(src.join("b-other.bin")).unwrap(),
        "wrong bytes from the undamaged file"
    );

    let whole = fs::read(&damaged);
    match whole {
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(libc::EIO),
            "reading the damaged file: {e}"
        ),
        Ok(data) => panic!(
            "read the whole damaged file without an error ({} bytes, {})",
            data.len(),
            if data == source {
                "identical to the source?!"
            } else {
                "WRONG BYTES"
            }
        ),
    }
    assert!(
        !tool("cat", [&damaged]).status.success(),
        "cat of the damaged file succeeded"
    );

    // Find the failing ranges in 64 KiB steps; every read that succeeds
    // must return the right bytes.
    const STEP: usize = 64 << 10;
    let f = File::open(&damaged).unwrap();
    let mut failing = Vec::new();
    for offset in (0..source.len()).step_by(STEP) {
        match read_range(&f, offset as u64, STEP) {
            Ok(got) => assert!(
                got == source[offset..offset + got.len()],
                "wrong bytes at {offset}"
            ),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "at {offset}: {e}");
                failing.push(offset);
            }
        }
    }
    let (first, last) = (
        *failing.first().expect("no 64 KiB read failed"),
        *failing.last().unwrap(),
    );
    eprintln!(
        "reads fail from {first} to {last} (damage near {})",
        pack_len / 2
    );
    assert!(
        last - first <= 8 * MIB as usize,
        "a single damaged byte made {first}..{last} unreadable"
    );

    // Drop the file's pages from the kernel cache so the next reads go to
    // the mount process again, then read well away from the damage.
    let r = tool(
        "dd",
        [
            format!("if={}", damaged.display()),
            "iflag=nocache".into(),
            "count=0".into(),
        ],
    );
    assert!(r.status.success(), "{r}");
    let before_end = first.saturating_sub(2 * MIB as usize);
    let after_start = last + 2 * MIB as usize;
    for (start, end) in [
        (0, before_end),
        (after_start.min(source.len()), source.len()),
    ] {
        for offset in (start..end).step_by(STEP) {
            let got = read_range(&f, offset as u64, STEP.min(end - offset)).unwrap_or_else(|e| {
                panic!("after the EIO, read at {offset} (away from the damage) failed: {e}")
            });
            assert!(
                got == source[offset..offset + got.len()],
                "wrong bytes at {offset} after the EIO"
            );
        }
    }
    assert!(
        before_end > 0,
        "the damage is at the very start; nothing before it to check"
    );
    let again = fs::read(dir.join("b-other.bin")).expect("the undamaged file still reads");
    assert!(again == other);
    drop(f);
    mnt.unmount();
}

/// Asserts that `result` failed with EROFS.
#[track_caller]
fn assert_erofs<T: std::fmt::Debug>(what: &str, result: std::io::Result<T>) {
    match result {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}"),
        Ok(v) => panic!("{what} succeeded on a read-only mount: {v:?}"),
    }
}

#[test]
fn every_kind_of_write_is_refused_with_erofs() {
    let tmp = scratch("mount-erofs");
    let src = tmp.path().join("files");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("existing.txt"), b"do not touch\n").unwrap();
    fs::create_dir(src.join("sub")).unwrap();
    fs::write(src.join("sub/inner.txt"), b"inner\n").unwrap();
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let backup = repo.backup("ro", &[&src]);
    let mnt = Mount::background(&repo, &tmp.path().join("mnt"), &[]);
    let rp = mnt.join("ro").join(ts(&backup.restore_point));
    let dir = rp.join("files");
    let existing = dir.join("existing.txt");

    assert_erofs("create", File::create(dir.join("new.txt")));
    assert_erofs(
        "create_new",
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join("n2")),
    );
    assert_erofs(
        "open O_WRONLY",
        OpenOptions::new().write(true).open(&existing),
    );
    assert_erofs(
        "open O_RDWR",
        OpenOptions::new().read(true).write(true).open(&existing),
    );
    assert_erofs(
        "open O_APPEND",
        OpenOptions::new().append(true).open(&existing),
    );
    assert_erofs(
        "open O_TRUNC",
        OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&existing),
    );
    assert_erofs("mkdir", fs::create_dir(dir.join("newdir")));
    assert_erofs(
        "mkdir at the mount root",
        fs::create_dir(mnt.join("newjob")),
    );
    assert_erofs(
        "mkdir in a job directory",
        fs::create_dir(mnt.join("ro/newpoint")),
    );
    assert_erofs("unlink", fs::remove_file(&existing));
    assert_erofs("rmdir", fs::remove_dir(dir.join("sub")));
    assert_erofs("rename", fs::rename(&existing, dir.join("renamed.txt")));
    assert_erofs(
        "rename a directory",
        fs::rename(dir.join("sub"), dir.join("sub2")),
    );
    assert_erofs(
        "chmod",
        fs::set_permissions(
            &existing,
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        ),
    );
    assert_erofs(
        "set mtime",
        filetime::set_file_mtime(&existing, filetime::FileTime::from_unix_time(0, 0)),
    );
    assert_erofs(
        "symlink",
        std::os::unix::fs::symlink("existing.txt", dir.join("link")),
    );
    assert_erofs("hard link", fs::hard_link(&existing, dir.join("hard")));
    assert_erofs(
        "chown",
        std::os::unix::fs::chown(&existing, Some(1), Some(1)),
    );

    // The same through the everyday tools: each fails and says why.
    let p = |rel: &str| dir.join(rel).to_string_lossy().into_owned();
    for (program, args) in [
        ("touch", vec![p("existing.txt")]),
        ("touch", vec![p("brand-new.txt")]),
        ("truncate", vec!["-s".into(), "0".into(), p("existing.txt")]),
        ("rm", vec!["-f".into(), p("existing.txt")]),
        ("mv", vec![p("existing.txt"), p("moved.txt")]),
        ("mkdir", vec![p("made")]),
        ("chmod", vec!["600".into(), p("existing.txt")]),
        (
            "cp",
            vec![
                src.join("existing.txt").to_string_lossy().into_owned(),
                p("copied.txt"),
            ],
        ),
    ] {
        let r = tool(program, &args);
        assert!(
            !r.status.success(),
            "{program} succeeded on the read-only mount: {r}"
        );
        assert!(r.stderr.contains("Read-only file system"), "{program}: {r}");
    }
    let r = run(Command::new("bash")
        .args(["-c", "echo more >> \"$1\"", "_"])
        .arg(&existing));
    assert!(
        !r.status.success() && r.stderr.contains("Read-only file system"),
        "append: {r}"
    );

    // Nothing changed.
    assert_eq!(names(&dir), ["existing.txt", "sub"]);
    assert_cmp(&src.join("existing.txt"), &existing);
    assert_same_tree(&src, &dir);
    mnt.unmount();
}

#[test]
fn encrypted_repository_mounts_and_serves_correct_bytes() {
    let tmp = scratch("mount-encrypted");
    let src = tmp.path().join("vault");
    fs::create_dir(&src).unwrap();
    let mut rng = Rng::new(16);
    write_random_file(&src.join("random.bin"), 12 * MIB, &mut rng);
    fs::write(
        src.join("text.txt"),
        mixed_bytes(&mut rng, 3 * MIB as usize),
    )
    .unwrap();
    fs::create_dir(src.join("nested")).unwrap();
    fs::write(src.join("nested/small.txt"), b"secret\n").unwrap();
    let repo = TestRepo::init_encrypted(&tmp.path().join("repo"), "mount password");
    let backup = repo.backup("vault", &[&src]);

    // Without the password the mount is refused and nothing is mounted.
    let mnt_path = tmp.path().join("mnt");
    fs::create_dir(&mnt_path).unwrap();
    let guard = UnmountOnDrop(mnt_path.canonicalize().unwrap());
    Flr::new(["mount", "--repo"])
        .arg(&repo.path)
        .arg(&mnt_path)
        .timeout(Duration::from_secs(60))
        .run()
        .failure()
        .stderr_has(&["password"]);
    assert!(!is_mounted(&guard.0));
    drop(guard);

    let mnt = Mount::background(&repo, &mnt_path, &[]);
    let mounted = mnt
        .join("vault")
        .join(ts(&backup.restore_point))
        .join("vault");
    assert_same_tree(&src, &mounted);
    mnt.unmount();
}

/// A foreground `flr mount` process. Dropping it unmounts and kills it
/// if the test did not end it.
struct Foreground {
    child: Child,
    path: PathBuf,
    log: PathBuf,
}

impl Foreground {
    /// Starts `flr mount --repo R MNT` and waits until the mount answers.
    fn start(repo: &TestRepo, mountpoint: &Path) -> Foreground {
        flr_e2e::mkdir(mountpoint);
        let path = mountpoint.canonicalize().unwrap();
        let log = path.with_extension("mount-log");
        let mut cmd = repo
            .flr(["mount", "--repo"])
            .arg(&repo.path)
            .arg(&path)
            .into_command();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap());
        let child = cmd.spawn().expect("start flr mount");
        let mut fg = Foreground { child, path, log };
        let started = Instant::now();
        loop {
            if let Some(status) = fg.child.try_wait().unwrap() {
                panic!("flr mount exited early ({status}):\n{}", fg.messages());
            }
            if is_mounted(&fg.path) && fs::read_dir(&fg.path).is_ok() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "flr mount not ready after 60 s:\n{}",
                fg.messages()
            );
            thread::sleep(Duration::from_millis(20));
        }
        fg
    }

    fn messages(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit by itself; its exit code.
    fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                started.elapsed() < timeout,
                "flr mount still runs {timeout:?} later:\n{}",
                self.messages()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Foreground {
    fn drop(&mut self) {
        force_unmount(&self.path);
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        force_unmount(&self.path);
    }
}

/// A repository with one small restore point, for the unmount tests.
fn small_repo(dir: &Path) -> (TestRepo, String) {
    let src = dir.join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("hello.txt"), b"hello\n").unwrap();
    let repo = TestRepo::init(&dir.join("repo"));
    let rp = repo.backup("small", &[&src]).restore_point;
    (repo, rp)
}

fn ends_cleanly_on_signal(signal: &str) {
    let tmp = scratch(&format!("mount-sig{}", signal.to_lowercase()));
    let (repo, rp) = small_repo(tmp.path());
    let mut fg = Foreground::start(&repo, &tmp.path().join("mnt"));
    let file = fg.path.join("small").join(ts(&rp)).join("src/hello.txt");
    assert_eq!(fs::read(&file).unwrap(), b"hello\n");
    send_signal(fg.child.id(), signal);
    let code = fg.wait_exit(Duration::from_secs(20));
    assert_eq!(
        code,
        Some(0),
        "flr mount after SIG{signal}:\n{}",
        fg.messages()
    );
    assert!(!is_mounted(&fg.path), "still mounted after SIG{signal}");
}

#[test]
fn foreground_mount_ends_cleanly_on_sigterm() {
    ends_cleanly_on_signal("TERM");
}

#[test]
fn foreground_mount_ends_cleanly_on_sigint() {
    ends_cleanly_on_signal("INT");
}

#[test]
fn foreground_mount_ends_when_unmounted_from_outside() {
    let tmp = scratch("mount-outside");
    let (repo, _) = small_repo(tmp.path());
    let mut fg = Foreground::start(&repo, &tmp.path().join("mnt"));
    let r = tool("fusermount3", [OsStr::new("-u"), fg.path.as_os_str()]);
    assert!(r.status.success(), "{r}");
    let code = fg.wait_exit(Duration::from_secs(20));
    assert_eq!(
        code,
        Some(0),
        "flr mount after fusermount3 -u:\n{}",
        fg.messages()
    );
    assert!(!is_mounted(&fg.path));
}

#[test]
fn sigkill_leaves_no_dead_mount_or_a_clear_way_out() {
    let tmp = scratch("mount-sigkill");
    let (repo, rp) = small_repo(tmp.path());
    let mut fg = Foreground::start(&repo, &tmp.path().join("mnt"));
    let pid = fg.child.id();
    send_signal(pid, "KILL");
    let _ = fg.child.wait();
    assert!(wait_for_exit(pid, Duration::from_secs(10)));

    // The auto-unmount helper acts asynchronously; give it a moment.
    let started = Instant::now();
    while is_mounted(&fg.path) && started.elapsed() < Duration::from_secs(5) {
        thread::sleep(Duration::from_millis(50));
    }
    if is_mounted(&fg.path) {
        eprintln!("a dead mount remains after SIGKILL; a new mount must say how to clear it");
        let _guard = UnmountOnDrop(fg.path.clone());
        let again = Flr::new(["mount", "--repo"])
            .arg(&repo.path)
            .arg(&fg.path)
            .timeout(Duration::from_secs(60))
            .run();
        assert!(
            !again.status.success(),
            "mounting over a dead mount succeeded: {again}"
        );
        assert!(
            again.stderr.contains("fusermount3 -u"),
            "no way out named: {again}"
        );
    } else {
        eprintln!("no mount remains after SIGKILL (auto-unmount)");
        // The directory is usable again right away.
        let mnt = Mount::background(&repo, &fg.path, &[]);
        assert_eq!(
            fs::read(mnt.join("small").join(ts(&rp)).join("src/hello.txt")).unwrap(),
            b"hello\n"
        );
        mnt.unmount();
    }
}

#[test]
fn mount_guard_cleans_up_after_a_panic_even_when_busy() {
    let tmp = scratch("mount-guard");
    let (repo, rp) = small_repo(tmp.path());
    let mnt_path = tmp.path().join("mnt");
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mnt = Mount::background(&repo, &mnt_path, &[]);
        // The open file outlives the guard (it travels out through the
        // channel), so `fusermount3 -u` is refused as busy and the guard
        // must fall back to a lazy unmount and then to killing.
        let open = File::open(mnt.join("small").join(ts(&rp)).join("src/hello.txt")).unwrap();
        tx.send((mnt.path.clone(), mnt.pid, open)).unwrap();
        panic!("deliberate failure while mounted");
    }));
    assert!(outcome.is_err());
    let (path, pid, open) = rx.recv().unwrap();
    assert!(
        !is_mounted(&path),
        "the guard left {} mounted",
        path.display()
    );
    let pid = pid.expect("the guard knows the mount process");
    assert!(
        !flr_e2e::command::process_alive(pid),
        "the guard left mount process {pid} running"
    );
    drop(open);
}
