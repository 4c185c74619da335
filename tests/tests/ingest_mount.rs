//! Ingest mounts (`flr mount --ingest`): backup tools write into the
//! mount and the unmount commits what they wrote as one restore point.
//! `pg_dump -Fd -j 4`, run as `postgres` into a mount owned by it,
//! restores into a fresh database with the same rows; `sqlite3 .backup`
//! (which reads back its destination) gives a byte-identical database; a
//! header patched after a long write and reads of a file being written
//! work through the kernel; an abort or a killed mount commits nothing,
//! and the next ingest of the same data reuses the packs already written;
//! a full repository disk fails writes with ENOSPC and commits nothing;
//! `pg_basebackup -Fp` into a mount passes `pg_verifybackup`.

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use flr_e2e::command::{run_with, send_signal, tool, wait_for_exit, DEFAULT_TIMEOUT};
use flr_e2e::mount::force_unmount;
use flr_e2e::postgres::{load_items, make_reachable, pg_program};
use flr_e2e::sqlite::{create_shop, sqlite3};
use flr_e2e::{is_mounted, scratch, Mount, PgServer, Rng, TestRepo};
use serde_json::Value;

/// How long a mount process may take to commit and exit after its
/// unmount.
const COMMIT_GRACE: Duration = Duration::from_secs(120);

/// `flr mount --ingest --job JOB MOUNTPOINT --background` with `extra`.
#[track_caller]
fn ingest(repo: &TestRepo, mountpoint: &Path, job: &str, extra: &[&str]) -> Mount {
    let mut args = vec!["--ingest", "--job", job];
    args.extend_from_slice(extra);
    Mount::background(repo, mountpoint, &args)
}

/// `flr ingest commit MOUNTPOINT --json`, then waits for the mount process
/// to exit; returns the reply.
#[track_caller]
fn commit(repo: &TestRepo, mut mount: Mount) -> Value {
    let run = repo
        .flr(["ingest", "commit"])
        .arg(&mount.path)
        .arg("--json")
        .run()
        .success();
    let reply = run.json();
    assert!(
        reply["restore_point"].is_string() && reply["stats"].is_object(),
        "{reply}"
    );
    assert!(!is_mounted(&mount.path), "still mounted after the commit");
    if let Some(pid) = mount.pid.take() {
        assert!(
            wait_for_exit(pid, COMMIT_GRACE),
            "mount process {pid} runs on after its commit:\n{}",
            mount.messages()
        );
    }
    reply
}

/// `umount MOUNTPOINT` and waits for the mount process to commit and exit;
/// returns its messages.
#[track_caller]
fn umount(mut mount: Mount) -> String {
    let r = tool("umount", [mount.path.as_os_str()]);
    assert!(r.status.success(), "umount failed: {r}");
    if let Some(pid) = mount.pid.take() {
        assert!(
            wait_for_exit(pid, COMMIT_GRACE),
            "mount process {pid} runs on after umount:\n{}",
            mount.messages()
        );
    }
    mount.messages()
}

/// psql against database `db` of `server`; the tuples, trimmed.
#[track_caller]
fn psql(server: &PgServer, db: &str, sql: &str) -> String {
    let r = run_with(
        Command::new(pg_program("psql"))
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-p", &server.port.to_string()])
            .args(["-U", "postgres", "-d", db]),
        Some(sql.as_bytes()),
        DEFAULT_TIMEOUT,
    );
    assert!(r.status.success(), "psql -d {db} failed: {r}");
    r.stdout.trim().to_string()
}

/// Row count and an MD5 of every row, per table: equal fingerprints mean
/// equal contents.
fn fingerprint(server: &PgServer, db: &str) -> String {
    let tables = [
        "pgbench_accounts",
        "pgbench_branches",
        "pgbench_tellers",
        "pgbench_history",
        "items",
    ];
    tables
        .iter()
        .map(|t| {
            let row = psql(
                server,
                db,
                &format!(
                    "SELECT count(*), md5(string_agg(t::text, ',' ORDER BY t::text)) FROM {t} t;"
                ),
            );
            format!("{t}: {row}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs a PostgreSQL client program as `postgres`, asserting success.
#[track_caller]
fn as_postgres(program: &str, args: &[&str]) {
    let r = run_with(
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(pg_program(program))
            .args(args)
            .current_dir("/"),
        None,
        Duration::from_secs(600),
    );
    assert!(r.status.success(), "{program} failed: {r}");
}

#[test]
fn a_parallel_pg_dump_into_an_ingest_mount_restores_with_the_same_rows() {
    let tmp = scratch("ingest-pgdump");
    make_reachable(&tmp.path().join("any"));
    let data = tmp.path().join("pgdata");
    flr_e2e::postgres::init_cluster(&data);
    let server = PgServer::start(&data);
    // About 60 MB of tables: pgbench's at scale 3, a history, and items.
    server.pgbench_init(3);
    server.pgbench(["-c", "2", "-t", "200"]);
    load_items(&server, 1, 100_000);
    let before = fingerprint(&server, "postgres");

    let repo = TestRepo::init(&tmp.path().join("repo"));
    let mp = tmp.path().join("ingest");
    let mount = ingest(&repo, &mp, "shop", &["--owner", "postgres"]);
    let root = fs::metadata(&mount.path).unwrap();
    assert_eq!(
        root.uid(),
        uid_of("postgres"),
        "the root belongs to --owner"
    );
    let port = server.port.to_string();
    let target = mount.join("shop");
    let started = std::time::Instant::now();
    as_postgres(
        "pg_dump",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-Fd",
            "-j",
            "4",
            // Uncompressed, so tens of MB stream through the mount.
            "-Z",
            "0",
            "-f",
            target.to_str().unwrap(),
            "postgres",
        ],
    );
    let dumped = started.elapsed();
    // The dump's files belong to the user who wrote them.
    let toc = fs::metadata(target.join("toc.dat")).unwrap();
    assert_eq!(toc.uid(), uid_of("postgres"));
    let reply = commit(&repo, mount);
    let rp = reply["restore_point"].as_str().unwrap().to_string();
    eprintln!(
        "pg_dump -Fd -j 4 into the mount took {dumped:?}; committed {rp}: {}",
        reply["stats"]
    );
    assert!(rp.starts_with("shop/"), "{rp}");
    assert!(reply["stats"]["files"].as_u64().unwrap() >= 6, "{reply}");
    assert_eq!(repo.restore_point_names(), std::slice::from_ref(&rp));

    // pg_restore reads the dump straight from a read-only mount.
    let ro = tmp.path().join("ro");
    let ro_mount = Mount::background(&repo, &ro, &["--restore-point", &rp]);
    let dump = ro_mount.join(&rp).join("shop");
    assert!(dump.join("toc.dat").is_file(), "{}", dump.display());
    psql(&server, "postgres", "CREATE DATABASE restored;");
    as_postgres(
        "pg_restore",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-d",
            "restored",
            "-j",
            "2",
            dump.to_str().unwrap(),
        ],
    );
    drop(ro_mount);
    assert_eq!(fingerprint(&server, "restored"), before);
    repo.verify_run(true).success();
}

#[test]
fn a_plain_base_backup_into_an_ingest_mount_verifies_after_restore() {
    let tmp = scratch("ingest-basebackup");
    make_reachable(&tmp.path().join("any"));
    let data = tmp.path().join("pgdata");
    flr_e2e::postgres::init_cluster(&data);
    let server = PgServer::start(&data);
    server.pgbench_init(2);
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let mount = ingest(
        &repo,
        &tmp.path().join("mp"),
        "base",
        &["--owner", "postgres"],
    );
    let target = mount.join("base");
    let port = server.port.to_string();
    // Hundreds of files, fsyncs, and backup_manifest.tmp renamed at the end.
    as_postgres(
        "pg_basebackup",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-D",
            target.to_str().unwrap(),
            "-Fp",
            "-X",
            "stream",
            "-c",
            "fast",
        ],
    );
    let reply = commit(&repo, mount);
    assert!(reply["stats"]["files"].as_u64().unwrap() > 500, "{reply}");
    let out = tmp.path().join("out");
    repo.restore(
        reply["restore_point"].as_str().unwrap(),
        &out,
        &[] as &[&str],
    );
    let restored = out.join("base");
    assert!(restored.join("backup_manifest").is_file());
    assert!(!restored.join("backup_manifest.tmp").exists());
    // Every file against the checksums pg_basebackup wrote into the
    // manifest, and the WAL it streamed.
    make_reachable(&restored.join("x"));
    as_postgres("pg_verifybackup", &[restored.to_str().unwrap()]);
}

fn uid_of(user: &str) -> u32 {
    let r = tool("id", ["-u", user]);
    assert!(r.status.success(), "id -u {user}: {r}");
    r.stdout.trim().parse().unwrap()
}

#[test]
fn a_sqlite_backup_into_an_ingest_mount_is_byte_identical_after_umount() {
    let tmp = scratch("ingest-sqlite");
    let src = tmp.path().join("app.db");
    create_shop(&src, 2_000, 60_000);
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let mount = ingest(&repo, &tmp.path().join("mp"), "app", &[]);
    let dest = mount.join("app.db");
    let r = sqlite3(&src, &format!(".backup '{}'", dest.display()));
    assert!(r.status.success(), "sqlite3 .backup: {r}");
    // The oracle: the same backup onto a local disk. A backup writes the
    // copy's own header (change counter, schema cookie), so it differs
    // from the source in the first 100 bytes and nowhere else.
    let plain = tmp.path().join("plain.db");
    let r = sqlite3(&src, &format!(".backup '{}'", plain.display()));
    assert!(r.status.success(), "sqlite3 .backup: {r}");
    let want = fs::read(&plain).unwrap();
    let source = fs::read(&src).unwrap();
    assert_eq!(want.len(), source.len());
    let differ: Vec<usize> = (0..want.len()).filter(|&i| want[i] != source[i]).collect();
    assert!(
        differ.iter().all(|&i| i < 100),
        "the plain backup differs from its source at {differ:?}"
    );
    // Read back through the mount before the commit.
    assert!(
        fs::read(&dest).unwrap() == want,
        "app.db reads back as written"
    );
    let messages = umount(mount);
    let names = repo.restore_point_names();
    assert_eq!(
        names.len(),
        1,
        "umount commits one restore point:\n{messages}"
    );

    let out = tmp.path().join("out");
    repo.restore(&names[0], &out, &[] as &[&str]);
    let restored = out.join("app.db");
    assert!(
        fs::read(&restored).unwrap() == want,
        "the restored app.db is the backup's bytes"
    );
    let check = sqlite3(&restored, "PRAGMA integrity_check;").success();
    assert_eq!(check.stdout.trim(), "ok");
    let rows = "SELECT count(*), sum(amount_cents), max(note) FROM orders;";
    assert_eq!(
        sqlite3(&restored, rows).success().stdout,
        sqlite3(&src, rows).success().stdout
    );
    // The journal sqlite made and removed is not in the restore point.
    let entries: Vec<_> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(entries, ["app.db"]);
}

#[test]
fn header_rewrites_reads_while_writing_and_namespace_changes_are_committed() {
    let tmp = scratch("ingest-rewrite");
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let mount = ingest(&repo, &tmp.path().join("mp"), "files", &[]);
    let mut rng = Rng::new(7);
    let path = mount.join("archive.dump");
    let mut model: Vec<u8> = vec![0; 4096];
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    file.write_all(&model).unwrap();
    let reader = fs::File::open(&path).unwrap();
    // 48 MiB in 1 MiB writes, reading earlier ranges back on the way
    // (through another handle, as sqlite does).
    for k in 0..48 {
        let piece = rng.bytes(1 << 20);
        file.write_all(&piece).unwrap();
        model.extend_from_slice(&piece);
        if k % 8 == 7 {
            let at = (rng.below(model.len() as u64 - 300_000)) as usize;
            let mut got = vec![0u8; 300_000];
            reader.read_exact_at(&mut got, at as u64).unwrap();
            assert!(got == model[at..at + 300_000], "read at {at} after {k} MiB");
        }
    }
    // The header is written last, as pg_dump's toc and sqlite's page 1.
    file.seek(SeekFrom::Start(0)).unwrap();
    file.write_all(b"HEADER: 48 MiB follow").unwrap();
    model[..21].copy_from_slice(b"HEADER: 48 MiB follow");
    let mut head = vec![0u8; 8192];
    reader.read_exact_at(&mut head, 0).unwrap();
    assert!(head == model[..8192]);
    drop(file);

    // A manifest written under a temporary name, then renamed.
    fs::create_dir(mount.join("base")).unwrap();
    fs::write(mount.join("base/backup_manifest.tmp"), b"{\"files\": []}\n").unwrap();
    fs::rename(
        mount.join("base/backup_manifest.tmp"),
        mount.join("base/backup_manifest"),
    )
    .unwrap();
    // Truncated, rewritten, chmod'ed; a file removed; a symlink.
    fs::write(mount.join("base/log"), rng.bytes(100_000)).unwrap();
    let log = OpenOptions::new()
        .write(true)
        .open(mount.join("base/log"))
        .unwrap();
    log.set_len(1000).unwrap();
    log.write_all_at(b"tail", 996).unwrap();
    drop(log);
    let mut log_model = fs::read(mount.join("base/log")).unwrap();
    assert_eq!(log_model.len(), 1000);
    assert_eq!(&log_model[996..], b"tail");
    fs::set_permissions(mount.join("base/log"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(mount.join("scratch"), b"gone soon").unwrap();
    fs::remove_file(mount.join("scratch")).unwrap();
    std::os::unix::fs::symlink("base/backup_manifest", mount.join("manifest")).unwrap();
    fs::create_dir(mount.join("empty")).unwrap();
    fs::create_dir(mount.join("removed")).unwrap();
    fs::remove_dir(mount.join("removed")).unwrap();
    // No hard links or device nodes in a restore point.
    assert!(fs::hard_link(mount.join("base/log"), mount.join("hard")).is_err());
    let mknod = tool("mknod", [mount.join("fifo").as_os_str(), "p".as_ref()]);
    assert!(!mknod.status.success());
    let mut whole = Vec::new();
    fs::File::open(&path)
        .unwrap()
        .read_to_end(&mut whole)
        .unwrap();
    assert!(
        whole == model,
        "the whole file reads back before the commit"
    );
    // A file still open refuses the commit, and the mount goes on.
    repo.flr(["ingest", "commit"])
        .arg(&mount.path)
        .run()
        .failure()
        .stderr_has(&["busy", "close the files open"]);
    assert!(is_mounted(&mount.path));
    reader.read_exact_at(&mut head, 0).unwrap();
    drop(reader);

    let reply = commit(&repo, mount);
    let rp = reply["restore_point"].as_str().unwrap();
    assert_eq!(reply["stats"]["files"], 3, "{reply}");
    let out = tmp.path().join("out");
    repo.restore(rp, &out, &[] as &[&str]);
    assert!(fs::read(out.join("archive.dump")).unwrap() == model);
    assert_eq!(
        fs::read(out.join("base/backup_manifest")).unwrap(),
        b"{\"files\": []}\n"
    );
    assert!(!out.join("base/backup_manifest.tmp").exists());
    let restored_log = fs::read(out.join("base/log")).unwrap();
    log_model.truncate(1000);
    assert_eq!(restored_log, log_model);
    let mode = fs::metadata(out.join("base/log"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o600);
    assert_eq!(
        fs::read_link(out.join("manifest")).unwrap(),
        Path::new("base/backup_manifest")
    );
    assert!(out.join("empty").is_dir());
    assert!(!out.join("scratch").exists() && !out.join("removed").exists());
}

#[test]
fn abort_and_a_killed_mount_commit_nothing_and_the_next_ingest_reuses_the_packs() {
    let tmp = scratch("ingest-abort");
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let mut rng = Rng::new(11);
    // Incompressible, so the packs hold about as much as was written.
    let data = rng.bytes(120 << 20);
    let write = |mount: &Mount| {
        let mut f = fs::File::create(mount.join("dump.bin")).unwrap();
        for piece in data.chunks(1 << 20) {
            f.write_all(piece).unwrap();
        }
    };
    let mp = tmp.path().join("mp");

    let mount = ingest(&repo, &mp, "db", &[]);
    write(&mount);
    let r = repo
        .flr(["ingest", "abort"])
        .arg(&mount.path)
        .run()
        .success();
    assert!(r.stdout.contains("nothing committed"), "{r}");
    assert!(!is_mounted(&mount.path));
    drop(mount);
    assert!(repo.restore_point_names().is_empty());
    let after_abort = packs_bytes(&repo);

    let mut mount = ingest(&repo, &mp, "db", &[]);
    write(&mount);
    let pid = mount.pid.take().expect("the mount's pid");
    send_signal(pid, "KILL");
    assert!(wait_for_exit(pid, Duration::from_secs(10)));
    force_unmount(&mount.path);
    drop(mount);
    assert!(
        repo.restore_point_names().is_empty(),
        "a killed mount commits nothing"
    );
    let after_kill = packs_bytes(&repo);
    // The abort wrote its last pack: all but the file's last batch (at
    // most 4 MiB and a chunk) was there for the next ingest to find.
    assert!(
        after_abort > 115 << 20,
        "{after_abort} bytes in packs after the abort"
    );
    // A killed mount loses the pack it was filling, and nothing else.
    assert!(
        after_kill - after_abort < 8 << 20,
        "the second ingest stored {} bytes again (first: {after_abort})",
        after_kill - after_abort
    );

    let mount = ingest(&repo, &mp, "db", &[]);
    write(&mount);
    let reply = commit(&repo, mount);
    let added = reply["stats"]["added_bytes"].as_u64().unwrap();
    eprintln!(
        "120 MiB ingested thrice: {after_abort} bytes in packs after the abort, {after_kill} after the kill; the commit added {added}"
    );
    assert!(added < 8 << 20, "the commit added {added} bytes");
    let out = tmp.path().join("out");
    repo.restore(
        reply["restore_point"].as_str().unwrap(),
        &out,
        &[] as &[&str],
    );
    assert!(fs::read(out.join("dump.bin")).unwrap() == data);
    // A commit of a mount that is gone says so.
    repo.flr(["ingest", "commit"])
        .arg(&mp)
        .run()
        .failure()
        .stderr_has(&["no ingest mount answers"]);
}

fn packs_bytes(repo: &TestRepo) -> u64 {
    repo.packs()
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum()
}

/// A size-limited tmpfs for a repository to fill; unmounted (lazily if
/// busy) when dropped, also while a failed test unwinds.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    #[track_caller]
    fn new(dir: &Path, size: &str) -> SmallDisk {
        flr_e2e::mkdir(dir);
        let options = format!("size={size}");
        let r = tool(
            "mount",
            [
                "-t".as_ref(),
                "tmpfs".as_ref(),
                "-o".as_ref(),
                options.as_ref(),
                "tmpfs".as_ref(),
                dir.as_os_str(),
            ],
        );
        assert!(r.status.success(), "mount tmpfs: {r}");
        SmallDisk(dir.canonicalize().unwrap())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = tool("umount", ["-l".as_ref(), self.0.as_os_str()]);
        }
    }
}

#[test]
fn a_full_repository_disk_fails_writes_with_enospc_and_commits_nothing() {
    let tmp = scratch("ingest-full");
    let disk = SmallDisk::new(&tmp.path().join("disk"), "48m");
    let repo = TestRepo::init(&disk.0.join("repo"));
    let mount = ingest(&repo, &tmp.path().join("mp"), "full", &[]);
    let mut rng = Rng::new(5);
    let mut f = fs::File::create(mount.join("big.dump")).unwrap();
    let mut failed = None;
    for k in 0..160 {
        if let Err(e) = f.write_all(&rng.bytes(1 << 20)) {
            failed = Some((k, e));
            break;
        }
    }
    let (at, err) = failed.expect("160 MiB of new data cannot fit a 48 MiB disk");
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOSPC),
        "after {at} MiB: {err}"
    );
    drop(f);
    let r = repo
        .flr(["ingest", "commit"])
        .arg(&mount.path)
        .run()
        .failure()
        .stderr_has(&["nothing was committed", "No space left"]);
    eprintln!(
        "the write after {at} MiB failed: {err}; commit: {}",
        r.stderr.trim()
    );
    assert!(repo.restore_point_names().is_empty());
    drop(mount);
}
