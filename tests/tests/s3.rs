//! Repositories on S3: the real binary against a real S3 server (s3s-fs on
//! a loopback port, started per test and stopped on drop). Everything a
//! local repository does is done again on S3, plain and encrypted:
//! backup, restore byte for byte, a read-only mount queried by sqlite3, a
//! writable session committed as a new restore point, verify with data,
//! repair of a lost index file. Credentials must show up in no output.

use std::path::Path;

use flr_e2e::command::Run;
use flr_e2e::mount::{Mount, WritableMount};
use flr_e2e::s3::{S3Server, SECRET_KEY};
use flr_e2e::sqlite::{create_shop, sqlite3};
use flr_e2e::tree::{assert_cmp, assert_same_tree, build_rich_tree};
use flr_e2e::{scratch, Flr, TestRepo};
use serde_json::Value;

/// Every output a test saw, to check that no credential is in any.
#[derive(Default)]
struct Seen(Vec<String>);

impl Seen {
    fn keep(&mut self, r: &Run) {
        self.0.push(format!("{}\n{}", r.stdout, r.stderr));
    }

    fn keep_text(&mut self, s: String) {
        self.0.push(s);
    }

    #[track_caller]
    fn assert_no_secret(&self) {
        for out in &self.0 {
            assert!(
                !out.contains(SECRET_KEY),
                "the secret access key appears in output:\n{out}"
            );
        }
    }
}

#[track_caller]
fn requests(v: &Value) -> &Value {
    let r = &v["requests"];
    assert!(r.is_object(), "no requests object in {v}");
    r
}

#[track_caller]
fn count(r: &Value, kind: &str) -> u64 {
    r[kind]
        .as_u64()
        .unwrap_or_else(|| panic!("requests.{kind} missing in {r}"))
}

fn full_cycle(test: &str, password: Option<&str>) {
    let tmp = scratch(test);
    let server = S3Server::start(&tmp.path().join("s3"), &["backups"]);
    let repo = server.init_repo("backups", "flr/main", password);
    let mut seen = Seen::default();

    // Backup: a tree of every kind of file, and a SQLite database.
    let src = tmp.path().join("src");
    build_rich_tree(&src, 7);
    let db_dir = tmp.path().join("db");
    std::fs::create_dir(&db_dir).unwrap();
    let db = db_dir.join("shop.db");
    create_shop(&db, 2_000, 40_000);
    sqlite3(&db, "PRAGMA wal_checkpoint(TRUNCATE);").success();
    let files = repo.backup("files", &[&src]);
    seen.keep(&files.run);
    let up = files.run.json();
    let r = requests(&up);
    assert!(
        count(r, "put") >= 3,
        "a pack, its index and a manifest: {r}"
    );
    assert!(
        count(r, "bytes_up") >= files.added_bytes(),
        "bytes up {r} below the bytes added {}",
        files.added_bytes()
    );
    // A backup deletes nothing but its own lock's objects (object_store
    // sends each delete as a bulk-delete POST, counted as a delete).
    assert!(count(r, "delete") <= 2, "{r}");
    assert!(
        !server
            .objects("backups", "flr/main")
            .iter()
            .any(|o| o.starts_with("locks/")),
        "the backup left its lock"
    );
    let shop = repo.backup("shop", &[&db_dir]);
    seen.keep(&shop.run);
    assert_eq!(repo.restore_point_names().len(), 2);

    // Restore, byte for byte.
    let out = tmp.path().join("out");
    let restored = repo
        .cmd("restore")
        .arg(&files.restore_point)
        .arg("--to")
        .arg(&out)
        .arg("--json")
        .run()
        .success();
    seen.keep(&restored);
    let down = restored.json();
    assert!(count(requests(&down), "range_get") > 0, "{down}");
    // A restore writes only its reader lock (which keeps forget and
    // prune off the restore point while it runs): one small object.
    assert!(
        count(requests(&down), "put") <= 1 && count(requests(&down), "bytes_up") < 4096,
        "a restore writes nothing but its lock: {down}"
    );
    let top = src.file_name().unwrap();
    assert_same_tree(&src, &out.join(top));

    // A read-only mount, queried by sqlite3 through the kernel.
    let mnt = tmp.path().join("mnt");
    let queries = [
        "SELECT count(*), sum(amount_cents) FROM orders;",
        "SELECT c.city, count(*) FROM orders o JOIN customers c ON c.id = o.customer_id GROUP BY c.city ORDER BY c.city;",
        "SELECT * FROM orders WHERE id IN (1, 777, 39999);",
    ];
    {
        let mount = Mount::background(&repo, &mnt, &["--job", "shop"]);
        seen.keep_text(mount.messages());
        let mounted = mount.join(format!("{}/db/shop.db", shop.restore_point));
        assert_cmp(&db, &mounted);
        let uri = format!("file:{}?immutable=1", mounted.display());
        for q in queries {
            let expected = sqlite3(&db, q).success();
            let got = sqlite3(&uri, q).success();
            assert_eq!(got.stdout, expected.stdout, "{q}");
        }
        mount.unmount();
    }

    // A writable session over S3, committed as a new restore point.
    let state = tmp.path().join("state");
    let wmnt = tmp.path().join("wmnt");
    let committed = {
        let w = WritableMount::background(&repo, &shop.restore_point, &wmnt, &state, "s3-session");
        sqlite3(
            w.join("db/shop.db"),
            "PRAGMA journal_mode=DELETE; UPDATE orders SET note = 'changed on s3' WHERE id = 5;",
        )
        .success();
        std::fs::write(w.join("db/added.txt"), b"written in a session\n").unwrap();
        let c = repo
            .flr([
                "session",
                "commit",
                "s3-session",
                "--job",
                "edited",
                "--json",
            ])
            .arg("--state-dir")
            .arg(&state)
            .run()
            .success();
        seen.keep(&c);
        seen.keep_text(w.messages());
        c.json()["restore_point"]
            .as_str()
            .expect("commit names its restore point")
            .to_string()
    };
    let edited = tmp.path().join("edited");
    repo.restore(&committed, &edited, &[] as &[&str]);
    assert_eq!(
        std::fs::read(edited.join("db/added.txt")).unwrap(),
        b"written in a session\n"
    );
    let note = sqlite3(
        edited.join("db/shop.db"),
        "SELECT note FROM orders WHERE id = 5;",
    )
    .success();
    assert_eq!(note.stdout.trim(), "changed on s3");

    // Verify re-reads every pack.
    let v = repo.verify_run(true).success();
    seen.keep(&v);
    let report = v.json();
    assert_eq!(report["clean"], true, "{report}");
    assert!(report["chunks_checked"].as_u64().unwrap() > 0, "{report}");
    assert!(count(requests(&report), "get") > 0, "{report}");

    // A lost index file is rebuilt from its pack.
    let objects = server.objects("backups", "flr/main");
    let index = objects
        .iter()
        .find(|o| o.starts_with("index/") && o.ends_with(".idx"))
        .unwrap_or_else(|| panic!("no index object in {objects:?}"));
    std::fs::remove_file(server.root.join("backups/flr/main").join(index)).unwrap();
    let broken = repo.verify_run(false);
    seen.keep(&broken);
    assert_ne!(
        broken.json()["clean"],
        true,
        "verify missed a lost index: {broken}"
    );
    let repaired = repo
        .flr(["repair", "index", "--json", "--repo"])
        .arg(&repo.path)
        .run()
        .success();
    seen.keep(&repaired);
    assert_eq!(
        repaired.json()["rebuilt"].as_array().map(Vec::len),
        Some(1),
        "{repaired}"
    );
    let v = repo.verify_run(true).success();
    seen.keep(&v);
    assert_eq!(v.json()["clean"], true, "{v}");
    let again = tmp.path().join("again");
    repo.restore(&files.restore_point, &again, &[] as &[&str]);
    assert_same_tree(&src, &again.join(top));

    seen.assert_no_secret();
}

#[test]
fn everything_works_on_an_s3_repository() {
    full_cycle("s3-plain", None);
}

#[test]
fn everything_works_on_an_encrypted_s3_repository() {
    full_cycle("s3-encrypted", Some("s3 password"));
}

#[test]
fn a_scheme_flr_does_not_serve_is_refused_and_nothing_is_created() {
    let tmp = scratch("s3-scheme");
    for url in [
        "gs://bucket/prefix",
        "foo://x",
        "S3://bucket/p",
        "s3:bucket",
    ] {
        let mut cmd = Flr::new(["init", url]).into_command();
        cmd.current_dir(tmp.path());
        let r = flr_e2e::run(&mut cmd).failure();
        assert!(
            r.stderr.contains(url) && r.stderr.contains("s3://BUCKET/PREFIX"),
            "{url}: {r}"
        );
        let r = Flr::new(["backup", "--job", "j", "--repo", url])
            .arg(tmp.path())
            .run()
            .failure();
        assert!(r.stderr.contains("s3://BUCKET/PREFIX"), "{url}: {r}");
        let r = Flr::new(["verify", "--repo", url]).run().failure();
        assert!(r.stderr.contains("s3://BUCKET/PREFIX"), "{url}: {r}");
    }
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "something was created: {left:?}");
}

#[test]
fn a_wrong_secret_fails_cleanly_without_showing_it() {
    let tmp = scratch("s3-creds");
    let server = S3Server::start(&tmp.path().join("s3"), &["bkt"]);
    let repo = server.init_repo("bkt", "r", None);
    let wrong = "not-the-secret-4d1c9e";
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), b"data").unwrap();
    let bad = TestRepo {
        path: repo.path.clone(),
        password: None,
        env: server
            .env()
            .into_iter()
            .map(|(k, v)| {
                if k == "AWS_SECRET_ACCESS_KEY" {
                    (k, wrong.to_string())
                } else {
                    (k, v)
                }
            })
            .collect(),
    };
    let r = bad
        .cmd("backup")
        .args(["--job", "j", "--json"])
        .arg(&src)
        .run()
        .failure();
    assert!(
        !r.stdout.contains(wrong) && !r.stderr.contains(wrong),
        "{r}"
    );
    assert!(
        r.stderr.contains("s3://bkt/r"),
        "the error names the repository: {r}"
    );
    // Nothing was committed, and the right credentials still work.
    assert!(repo.restore_point_names().is_empty());
    let ok = repo.backup("j", &[&src]);
    assert_eq!(repo.restore_point_names(), vec![ok.restore_point.clone()]);
    let mut seen = Seen::default();
    seen.keep(&r);
    seen.keep(&ok.run);
    seen.assert_no_secret();
}

#[test]
fn init_refuses_a_prefix_that_holds_objects() {
    let tmp = scratch("s3-init");
    let server = S3Server::start(&tmp.path().join("s3"), &["bkt"]);
    let repo = server.init_repo("bkt", "r", None);
    let r = repo.flr(["init"]).arg(&repo.path).run().failure();
    assert!(r.stderr.contains("empty prefix"), "{r}");
    // A prefix beside it is empty.
    let _ = server.init_repo("bkt", "other", None);
    assert!(Path::new(&server.root.join("bkt/other/config")).is_file());
}

// ---- The read path of mounts on S3: disk cache, merged ranges, prefetch.

/// Size of the database file the read-path tests mount: 24 MiB of 8 KiB
/// pages, in 768 frames of 32 KiB.
const BIG: usize = 24 << 20;

/// An S3 repository holding one restore point of job `big` with a
/// compressible `data.db` of `len` bytes; returns the file's bytes.
fn big_file_repo(
    tmp: &Path,
    len: usize,
    password: Option<&str>,
) -> (S3Server, TestRepo, Vec<u8>, String) {
    let server = S3Server::start(&tmp.join("s3"), &["backups"]);
    let repo = server.init_repo("backups", "flr/read", password);
    let src = tmp.join("src");
    std::fs::create_dir(&src).unwrap();
    let mut rng = flr_e2e::rng::Rng::new(0x5eed);
    let bytes = flr_e2e::rng::text_bytes(&mut rng, len);
    std::fs::write(src.join("data.db"), &bytes).unwrap();
    let b = repo.backup("big", &[&src]);
    (server, repo, bytes, b.restore_point)
}

/// The JSON figures a mount prints when it ends (`flr: read stats {...}`).
#[track_caller]
fn read_stats(messages: &str) -> Value {
    let line = messages
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("flr: read stats "))
        .unwrap_or_else(|| panic!("no read stats in the mount's messages:\n{messages}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("read stats {line}: {e}"))
}

/// Unmounts and returns the mount's read stats.
#[track_caller]
fn unmount_stats(mount: Mount) -> Value {
    let log = mount.log.clone();
    mount.unmount();
    read_stats(&std::fs::read_to_string(log).unwrap())
}

#[track_caller]
fn num(v: &Value, path: &str) -> u64 {
    let mut at = v;
    for key in path.split('.') {
        at = &at[key];
    }
    at.as_u64()
        .unwrap_or_else(|| panic!("{path} missing in {v}"))
}

/// Bytes the disk cache's files take, counted as it counts them: each
/// file in whole 4 KiB blocks.
fn disk_cache_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.join("tmp"), dir.join("frames")];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            // A file may be evicted between the listing and the stat.
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.len().div_ceil(4096) * 4096;
            }
        }
    }
    total
}

fn cached_frame_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for sub in std::fs::read_dir(dir.join("frames")).unwrap().flatten() {
        for e in std::fs::read_dir(sub.path()).unwrap().flatten() {
            out.push(e.path());
        }
    }
    out.sort();
    out
}

fn disk_cache_mount_run(test: &str, password: Option<&str>) {
    let tmp = scratch(test);
    let (_server, repo, bytes, rp) = big_file_repo(tmp.path(), BIG, password);
    let cache = tmp.path().join("disk-cache");
    let cache_arg = cache.to_str().unwrap();
    let args = [
        "--job",
        "big",
        "--disk-cache",
        cache_arg,
        "--disk-cache-size",
        "1G",
    ];

    let mnt = tmp.path().join("mnt");
    let mount = Mount::background(&repo, &mnt, &args);
    let file = mount.join(format!("{rp}/src/data.db"));
    assert_eq!(std::fs::read(&file).unwrap(), bytes, "first read");
    let first = unmount_stats(mount);
    assert!(num(&first, "requests.range_get") > 0, "{first}");
    assert!(num(&first, "disk_cache.inserts") >= 700, "{first}");
    assert_eq!(num(&first, "chunk_errors"), 0, "{first}");

    // A second mount (another process) on the same directory: the whole
    // file again, without one range request for data.
    let mount = Mount::background(&repo, &mnt, &args);
    assert_eq!(std::fs::read(&file).unwrap(), bytes, "second read");
    let second = unmount_stats(mount);
    assert_eq!(num(&second, "requests.range_get"), 0, "{second}");
    assert_eq!(num(&second, "fetch.requests"), 0, "{second}");
    assert!(num(&second, "disk_cache.hits") >= 700, "{second}");
    assert_eq!(num(&second, "disk_cache.damaged"), 0, "{second}");
}

#[test]
fn a_second_mount_reads_everything_from_the_disk_cache() {
    disk_cache_mount_run("s3-disk-cache", None);
}

#[test]
fn an_encrypted_repository_is_served_from_the_disk_cache_too() {
    disk_cache_mount_run("s3-disk-cache-enc", Some("cache password"));
}

#[test]
fn the_disk_cache_never_exceeds_its_bound() {
    let tmp = scratch("s3-disk-cache-bound");
    let (_server, repo, bytes, rp) = big_file_repo(tmp.path(), BIG, None);
    let cache = tmp.path().join("disk-cache");
    let bound = 3u64 << 20;
    let mnt = tmp.path().join("mnt");
    let mount = Mount::background(
        &repo,
        &mnt,
        &[
            "--job",
            "big",
            "--disk-cache",
            cache.to_str().unwrap(),
            "--disk-cache-size",
            "3M",
        ],
    );
    let file = mount.join(format!("{rp}/src/data.db"));
    // Read in pieces, checking the directory between them.
    use std::io::Read;
    let mut f = std::fs::File::open(&file).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut peak = 0;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        // Counted with the mount process stopped, so that no file comes
        // and goes while the directory is walked.
        let pid = mount.pid.expect("the mount's pid");
        flr_e2e::command::send_signal(pid, "STOP");
        let used = disk_cache_bytes(&cache);
        flr_e2e::command::send_signal(pid, "CONT");
        peak = peak.max(used);
        assert!(
            used <= bound,
            "{used} bytes in the disk cache, bound {bound}"
        );
    }
    assert!(got == bytes, "the bytes read differ");
    drop(f);
    let stats = unmount_stats(mount);
    let used = disk_cache_bytes(&cache);
    assert!(used <= bound, "{used} bytes after the mount, bound {bound}");
    assert!(peak > bound / 2, "the cache was used: peak {peak}");
    assert!(num(&stats, "disk_cache.evictions") > 0, "{stats}");
    assert!(num(&stats, "disk_cache.used_bytes") <= bound, "{stats}");
}

#[test]
fn damaged_disk_cache_files_are_fetched_again_never_served() {
    let tmp = scratch("s3-disk-cache-damage");
    let (_server, repo, bytes, rp) = big_file_repo(tmp.path(), 4 << 20, None);
    let cache = tmp.path().join("disk-cache");
    let args = ["--job", "big", "--disk-cache", cache.to_str().unwrap()];
    let mnt = tmp.path().join("mnt");
    let mount = Mount::background(&repo, &mnt, &args);
    let file = mount.join(format!("{rp}/src/data.db"));
    assert_eq!(std::fs::read(&file).unwrap(), bytes);
    drop(unmount_stats(mount));

    let files = cached_frame_files(&cache);
    assert!(files.len() >= 100, "{} cached frames", files.len());
    // A flipped byte in the stored frame, one in the header, a truncated
    // file, an empty one (removed when the cache opens, so a plain miss),
    // and one frame's file under another's name.
    flr_e2e::repo::flip_byte(&files[0], 200);
    flr_e2e::repo::flip_byte(&files[1], 9);
    let len = std::fs::metadata(&files[2]).unwrap().len();
    flr_e2e::repo::truncate(&files[2], len / 2);
    flr_e2e::repo::truncate(&files[3], 0);
    std::fs::copy(&files[5], &files[4]).unwrap();

    let mount = Mount::background(&repo, &mnt, &args);
    assert_eq!(
        std::fs::read(&file).unwrap(),
        bytes,
        "read over a damaged cache"
    );
    let log = mount.log.clone();
    let stats = unmount_stats(mount);
    assert_eq!(num(&stats, "chunk_errors"), 0, "{stats}");
    assert_eq!(num(&stats, "disk_cache.damaged"), 4, "{stats}");
    let refetched = num(&stats, "fetch.frames_fetched");
    assert!((5..20).contains(&refetched), "{stats}");
    let messages = std::fs::read_to_string(log).unwrap();
    assert!(messages.contains("disk cache: dropping"), "{messages}");
    // The damaged files were replaced by good ones: a third mount needs
    // no request.
    let mount = Mount::background(&repo, &mnt, &args);
    assert_eq!(std::fs::read(&file).unwrap(), bytes);
    let third = unmount_stats(mount);
    assert_eq!(num(&third, "requests.range_get"), 0, "{third}");
}

#[test]
fn a_sequential_read_merges_ranges_and_prefetches() {
    let tmp = scratch("s3-sequential");
    let (_server, repo, bytes, rp) = big_file_repo(tmp.path(), BIG, None);
    let mnt = tmp.path().join("mnt");
    let mount = Mount::background(&repo, &mnt, &["--job", "big"]);
    let file = mount.join(format!("{rp}/src/data.db"));
    assert!(
        std::fs::read(&file).unwrap() == bytes,
        "the bytes read differ"
    );
    let stats = unmount_stats(mount);
    let frames = num(&stats, "fetch.frames_fetched");
    let gets = num(&stats, "requests.range_get");
    assert!(frames >= 700, "{stats}");
    // 768 frames of 32 KiB: one request per frame without merging.
    assert!(
        gets * 8 <= frames,
        "{gets} range GETs for {frames} frames: {stats}"
    );
    assert!(num(&stats, "fetch.frames_merged") > frames / 2, "{stats}");
    assert!(
        num(&stats, "readahead.frames") > frames / 2,
        "prefetch fetched most frames: {stats}"
    );
}

#[test]
fn a_cold_random_8k_read_costs_at_most_one_get() {
    let tmp = scratch("s3-random");
    let len = 64 << 20;
    let (_server, repo, bytes, rp) = big_file_repo(tmp.path(), len, None);
    let mnt = tmp.path().join("mnt");
    let mount = Mount::background(&repo, &mnt, &["--job", "big"]);
    let file = mount.join(format!("{rp}/src/data.db"));
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(&file).unwrap();
    let mut rng = flr_e2e::rng::Rng::new(81);
    let reads = 300;
    let mut buf = vec![0u8; 8192];
    for _ in 0..reads {
        let at = rng.below((len / 8192) as u64) * 8192;
        f.read_exact_at(&mut buf, at).unwrap();
        assert!(buf[..] == bytes[at as usize..at as usize + 8192], "at {at}");
    }
    drop(f);
    let stats = unmount_stats(mount);
    let gets = num(&stats, "requests.range_get");
    assert!(gets > 0, "{stats}");
    assert!(
        gets <= reads,
        "{gets} range GETs for {reads} reads: {stats}"
    );
}

/// A restore fetches neighbouring frames of a pack with one range GET
/// each: a request costs a round trip and a fee, and one per frame made a
/// 1 GiB restore from S3 take half an hour.
#[test]
fn a_restore_from_s3_fetches_neighbouring_frames_together() {
    let tmp = scratch("s3-restore-ranges");
    let server = S3Server::start(&tmp.path().join("s3"), &["backups"]);
    let repo = server.init_repo("backups", "flr/ranges", None);
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let len: u64 = 40 << 20;
    flr_e2e::tree::write_random_file(&src.join("big.db"), len, &mut flr_e2e::rng::Rng::new(41));
    let rp = repo.backup("big", &[&src]);
    let packs = server
        .objects("backups", "flr/ranges")
        .iter()
        .filter(|o| o.starts_with("packs/"))
        .count() as u64;
    let out = tmp.path().join("out");
    let restored = repo
        .cmd("restore")
        .arg(&rp.restore_point)
        .arg("--to")
        .arg(&out)
        .arg("--json")
        .run()
        .success();
    assert_same_tree(&src, &out.join("src"));
    let down = restored.json();
    let ranges = count(requests(&down), "range_get");
    // Each request covers at most 8 MiB, and frames of two packs never
    // share one; a request per frame would be over a thousand.
    let bound = packs + len / (8 << 20) + 1;
    assert!(
        ranges > 0 && ranges <= bound,
        "{ranges} range GETs for {packs} packs (at most {bound}): {down}"
    );
}
