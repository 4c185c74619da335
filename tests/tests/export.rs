//! `flr export`: a database out of a restore point as files, as one
//! archive, or as a logical dump. Real engines open what it writes and
//! answer as the source did: SQLite (with rows only in its WAL) and a
//! PostgreSQL cluster backed up stopped and one backed up running through
//! `pg_basebackup`. Each check made to fail writes nothing, and an export
//! killed outright is cleaned up by the next one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use flr_e2e::command::{send_signal, tool, wait_for_exit};
use flr_e2e::postgres::{init_cluster, items_fingerprint, load_items, make_reachable, pg_program};
use flr_e2e::{scratch, PgServer, TestRepo};
use serde_json::Value;

fn export(
    repo: &TestRepo,
    rp: &str,
    path: &str,
    format: &str,
    to: &Path,
    staging: &Path,
    extra: &[&str],
) -> flr_e2e::Run {
    repo.cmd("export")
        .arg(rp)
        .args(["--path", path, "--format", format, "--json"])
        .arg("--to")
        .arg(to)
        .arg("--staging")
        .arg(staging)
        .args(extra)
        .timeout(Duration::from_secs(600))
        .run()
}

fn sqlite(db: &Path, sql: &str) -> String {
    let out = Command::new("sqlite3").arg(db).arg(sql).output().unwrap();
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Runs Python `body`, which uses `c`: a connection to `live` in WAL mode
/// with automatic checkpoints off. Then copies `live` and its WAL to `db`
/// while that connection still keeps the WAL from being checkpointed.
fn copy_with_wal(live: &Path, db: &Path, body: &str) {
    let script = format!(
        "import sqlite3, shutil\n\
         c = sqlite3.connect({live:?})\n\
         c.execute('pragma journal_mode=wal'); c.execute('pragma wal_autocheckpoint=0')\n\
         {body}\
         shutil.copy({live:?}, {db:?}); shutil.copy({live:?} + '-wal', {db:?} + '-wal')\n",
        live = live.to_str().unwrap(),
        db = db.to_str().unwrap(),
    );
    let r = tool("python3", ["-c", &script]);
    assert!(r.status.success(), "{r}");
    let wal = db.with_file_name(format!("{}-wal", db.file_name().unwrap().to_str().unwrap()));
    assert!(wal.metadata().unwrap().len() > 0);
}

/// Nothing of an export is left in `staging`.
fn assert_clean_staging(staging: &Path) {
    let left: Vec<_> = std::fs::read_dir(staging)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in staging: {left:?}");
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        !mounts.contains(staging.to_str().unwrap()),
        "a mount is left under {}",
        staging.display()
    );
}

#[test]
fn sqlite_exports_as_files_archive_and_dump_hold_the_rows_only_the_wal_had() {
    let tmp = scratch("export-sqlite");
    let src = tmp.path().join("src");
    flr_e2e::mkdir(&src);
    // A database whose newest rows are only in its WAL.
    let live = tmp.path().join("live.db");
    copy_with_wal(
        &live,
        &src.join("app.db"),
        "c.execute('create table t(id integer primary key, v text)')\n\
         c.executemany('insert into t(v) values (?)', [('row %d' % i,) for i in range(5000)])\n\
         c.commit()\n\
         c.execute('pragma wal_checkpoint(truncate)')\n\
         c.executemany('insert into t(v) values (?)', [('wal %d' % i,) for i in range(777)])\n\
         c.commit()\n",
    );
    let want = sqlite(
        &live,
        "SELECT count(*), md5sum FROM (SELECT count(*) AS md5sum FROM t WHERE v LIKE 'wal%')",
    );
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let rp = repo.backup("app", &[&src]).restore_point;
    let staging = tmp.path().join("staging");

    let out = tmp.path().join("files");
    let run = export(&repo, &rp, "src/app.db", "files", &out, &staging, &[]).success();
    let report = run.json();
    let steps: Vec<&str> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["check", "mount", "stage", "transfer", "cleanup"]);
    // The WAL is in the main file now: the file alone has every row.
    assert!(!out.join("app.db-wal").exists());
    assert_eq!(
        sqlite(
            &out.join("app.db"),
            "SELECT count(*), md5sum FROM (SELECT count(*) AS md5sum FROM t WHERE v LIKE 'wal%')"
        ),
        want
    );
    assert_eq!(sqlite(&out.join("app.db"), "PRAGMA integrity_check"), "ok");

    let out = tmp.path().join("archive");
    export(&repo, &rp, "src/app.db", "archive", &out, &staging, &[]).success();
    assert_eq!(
        sqlite(
            &out.join("app.db"),
            "SELECT count(*), md5sum FROM (SELECT count(*) AS md5sum FROM t WHERE v LIKE 'wal%')"
        ),
        want
    );

    let out = tmp.path().join("logical");
    export(&repo, &rp, "src/app.db", "logical", &out, &staging, &[]).success();
    let rebuilt = tmp.path().join("rebuilt.db");
    let dump = std::fs::read_to_string(out.join("app.db.sql")).unwrap();
    let r = flr_e2e::command::run_with(
        Command::new("sqlite3").arg(&rebuilt),
        Some(dump.as_bytes()),
        Duration::from_secs(60),
    );
    assert!(r.status.success(), "{r}");
    assert_eq!(
        sqlite(
            &rebuilt,
            "SELECT count(*), md5sum FROM (SELECT count(*) AS md5sum FROM t WHERE v LIKE 'wal%')"
        ),
        want
    );
    assert_clean_staging(&staging);

    // The restore point is as it was.
    let verify = repo.verify_run(true);
    assert!(verify.status.success(), "{verify}");
}

#[test]
fn sqlite_without_a_wal_is_exported_as_stored_and_a_hot_journal_is_rolled_back() {
    let tmp = scratch("export-sqlite-stored");
    let src = tmp.path().join("src");
    flr_e2e::mkdir(&src);
    // plain.db: rollback-journal mode, nothing beside it. hot.db: copied
    // with its journal in the middle of a transaction whose pages the
    // tiny cache had already spilled into the main file.
    let script = format!(
        "import sqlite3, shutil\n\
         p = sqlite3.connect({plain:?})\n\
         p.execute('create table t(id integer primary key, v text)')\n\
         p.executemany('insert into t(v) values (?)', [('row %d ' % i * 8,) for i in range(4000)])\n\
         p.commit(); p.close()\n\
         live = {live:?}\n\
         c = sqlite3.connect(live, isolation_level=None)\n\
         c.execute('pragma cache_size=5')\n\
         c.execute('create table t(id integer primary key, v text)')\n\
         c.execute('begin')\n\
         c.executemany('insert into t(v) values (?)', [('row %d ' % i * 8,) for i in range(4000)])\n\
         c.execute('commit')\n\
         before = open(live, 'rb').read()\n\
         c.execute('begin')\n\
         c.execute(\"update t set v = 'changed ' || v\")\n\
         assert open(live, 'rb').read() != before, 'nothing spilled'\n\
         shutil.copy(live, {hot:?}); shutil.copy(live + '-journal', {hot:?} + '-journal')\n\
         c.execute('rollback')\n",
        plain = src.join("plain.db").to_str().unwrap(),
        live = tmp.path().join("live.db").to_str().unwrap(),
        hot = src.join("hot.db").to_str().unwrap(),
    );
    let r = tool("python3", ["-c", &script]);
    assert!(r.status.success(), "{r}");
    assert!(src.join("hot.db-journal").metadata().unwrap().len() > 0);
    let rows = "SELECT count(*), sum(v LIKE 'changed%') FROM t";
    let want = sqlite(&tmp.path().join("live.db"), rows);
    assert_eq!(want, "4000|0");
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let rp = repo.backup("app", &[&src]).restore_point;
    let staging = tmp.path().join("staging");

    // `files` of a database with nothing beside it is the stored file,
    // byte for byte.
    let out = tmp.path().join("files");
    let report = export(&repo, &rp, "src/plain.db", "files", &out, &staging, &[])
        .success()
        .json();
    let size = src.join("plain.db").metadata().unwrap().len();
    assert_eq!(report["from_store_bytes"].as_u64(), Some(size));
    assert_eq!(
        std::fs::read(out.join("plain.db")).unwrap(),
        std::fs::read(src.join("plain.db")).unwrap()
    );
    // So is its archive: the consistent copy, with nothing to recover.
    let archive = tmp.path().join("archive");
    let report = export(
        &repo,
        &rp,
        "src/plain.db",
        "archive",
        &archive,
        &staging,
        &[],
    )
    .success()
    .json();
    assert_eq!(report["from_store_bytes"].as_u64(), Some(size));
    assert_eq!(
        std::fs::read(archive.join("plain.db")).unwrap(),
        std::fs::read(src.join("plain.db")).unwrap()
    );
    assert_eq!(sqlite(&archive.join("plain.db"), rows), want);
    assert_eq!(
        sqlite(&archive.join("plain.db"), "PRAGMA integrity_check"),
        "ok"
    );
    let logical = tmp.path().join("logical");
    export(
        &repo,
        &rp,
        "src/plain.db",
        "logical",
        &logical,
        &staging,
        &[],
    )
    .success();
    let rebuilt = tmp.path().join("rebuilt.db");
    let dump = std::fs::read_to_string(logical.join("plain.db.sql")).unwrap();
    let r = flr_e2e::command::run_with(
        Command::new("sqlite3").arg(&rebuilt),
        Some(dump.as_bytes()),
        Duration::from_secs(60),
    );
    assert!(r.status.success(), "{r}");
    assert_eq!(sqlite(&rebuilt, rows), want);

    // The hot journal is rolled back: the half-done update is gone, in
    // every format, and no journal goes with the files.
    let out = tmp.path().join("hot-files");
    export(&repo, &rp, "src/hot.db", "files", &out, &staging, &[]).success();
    assert!(!out.join("hot.db-journal").exists());
    let names: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["hot.db"]);
    assert_eq!(sqlite(&out.join("hot.db"), rows), want);
    assert_eq!(sqlite(&out.join("hot.db"), "PRAGMA integrity_check"), "ok");
    let out = tmp.path().join("hot-archive");
    export(&repo, &rp, "src/hot.db", "archive", &out, &staging, &[]).success();
    assert_eq!(sqlite(&out.join("hot.db"), rows), want);
    let out = tmp.path().join("hot-logical");
    export(&repo, &rp, "src/hot.db", "logical", &out, &staging, &[]).success();
    let dump = std::fs::read_to_string(out.join("hot.db.sql")).unwrap();
    assert!(dump.contains("row 3999"));
    assert!(!dump.contains("changed"));
    assert_clean_staging(&staging);

    // The restore point is as it was.
    let verify = repo.verify_run(true);
    assert!(verify.status.success(), "{verify}");
}

/// Extracts a cluster's archive (zstd-compressed when it is named so)
/// into a fresh data directory `dir`, as tar does it for a DBA.
fn extract_cluster(tarball: &Path, dir: &Path) -> PathBuf {
    flr_e2e::postgres::make_postgres_dir(dir);
    let mut args = vec![
        "-xpf",
        tarball.to_str().unwrap(),
        "-C",
        dir.to_str().unwrap(),
    ];
    if tarball.extension().is_some_and(|e| e == "zst") {
        args.insert(0, "--zstd");
    }
    let r = tool("tar", args);
    assert!(r.status.success(), "{r}");
    dir.to_path_buf()
}

fn fingerprint_at(data: &Path) -> String {
    let server = PgServer::start(data);
    let fp = items_fingerprint(&server);
    server.stop();
    fp
}

#[test]
fn postgres_exports_of_a_stopped_and_a_running_cluster_start_and_answer_as_the_source() {
    let tmp = scratch("export-pg");
    make_reachable(&tmp.path().join("any"));
    let data = tmp.path().join("src").join("pgdata");
    init_cluster(&data);
    let server = PgServer::start(&data);
    load_items(&server, 1, 60_000);
    let want = items_fingerprint(&server);
    // Running: a base backup copy, which needs recovery to open.
    let running = tmp.path().join("running").join("pgdata");
    server.base_backup(&running);
    assert!(running.join("backup_label").exists());
    // Crashed: a copy of the files of the running server after a
    // checkpoint, without its pid file; pg_control says "in production",
    // so the export must run crash recovery.
    server.query("CHECKPOINT;");
    let crashed = tmp.path().join("crashed").join("pgdata");
    flr_e2e::mkdir(crashed.parent().unwrap());
    let r = tool(
        "cp",
        ["-a", data.to_str().unwrap(), crashed.to_str().unwrap()],
    );
    assert!(r.status.success(), "{r}");
    std::fs::remove_file(crashed.join("postmaster.pid")).unwrap();
    server.stop();

    let repo = TestRepo::init(&tmp.path().join("repo"));
    let stopped_rp = repo.backup("stopped", &[&data]).restore_point;
    let running_rp = repo.backup("running", &[&running]).restore_point;
    let crashed_rp = repo.backup("crashed", &[&crashed]).restore_point;
    let staging = tmp.path().join("staging");

    for (rp, what) in [
        (&stopped_rp, "stopped"),
        (&running_rp, "running"),
        (&crashed_rp, "crashed"),
    ] {
        let out = tmp.path().join(format!("files-{what}"));
        let report = export(&repo, rp, "pgdata", "files", &out, &staging, &[])
            .success()
            .json();
        // A cluster shut down cleanly comes whole from the repository,
        // with no server started. Otherwise recovery runs on a session,
        // and the relation files it left alone come from the repository.
        let from_store = report["from_store_bytes"].as_u64().unwrap();
        let bytes = report["bytes"].as_u64().unwrap();
        if what == "stopped" {
            assert_eq!(from_store, bytes, "{what}: {report}");
        } else {
            assert!(
                from_store > 1 << 20 && from_store < bytes,
                "{what}: {report}"
            );
        }
        let exported = out.join("pgdata");
        assert!(
            !exported.join("backup_label").exists(),
            "{what}: recovery did not run"
        );
        assert_eq!(fingerprint_at(&exported), want, "{what}");
        assert_clean_staging(&staging);
    }

    // Archive: one tar in pg_basebackup's layout; extracted, it starts.
    let out = tmp.path().join("archive");
    export(
        &repo,
        &running_rp,
        "pgdata",
        "archive",
        &out,
        &staging,
        &["--compress"],
    )
    .success();
    let tarball = out.join("pgdata.tar.zst");
    assert!(tarball.is_file());
    let extracted = extract_cluster(&tarball, &tmp.path().join("extracted"));
    assert!(extracted.join("PG_VERSION").is_file());
    assert_eq!(fingerprint_at(&extracted), want);

    // The stopped cluster's archive is written straight from the
    // repository, with no session and no server, and leaves out the
    // stopped server's postmaster.opts; extracted, it starts.
    let out = tmp.path().join("archive-stopped");
    let report = export(&repo, &stopped_rp, "pgdata", "archive", &out, &staging, &[])
        .success()
        .json();
    let opts_bytes = std::fs::metadata(data.join("postmaster.opts"))
        .unwrap()
        .len();
    assert_eq!(
        report["from_store_bytes"].as_u64().unwrap() + opts_bytes,
        report["logical_bytes"].as_u64().unwrap(),
        "{report}"
    );
    let tarball = out.join("pgdata.tar");
    let r = tool("tar", ["-tf", tarball.to_str().unwrap()]);
    assert!(r.status.success(), "{r}");
    assert!(r
        .stdout
        .lines()
        .any(|l| l.trim_end_matches('/') == "global/pg_control"));
    assert!(!r.stdout.contains("postmaster"), "{}", r.stdout);
    let extracted = extract_cluster(&tarball, &tmp.path().join("extracted-stopped"));
    assert_eq!(fingerprint_at(&extracted), want);
    assert_clean_staging(&staging);

    // Logical: a dump per database that restores into a fresh cluster.
    let out = tmp.path().join("logical");
    export(&repo, &running_rp, "pgdata", "logical", &out, &staging, &[]).success();
    let dumps = out.join("pgdata");
    assert!(dumps.join("globals.sql").is_file());
    let fresh = tmp.path().join("fresh").join("pgdata");
    init_cluster(&fresh);
    let target = PgServer::start(&fresh);
    target.query("CREATE DATABASE restored;");
    let r = flr_e2e::command::run(
        Command::new(pg_program("pg_restore"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &target.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "restored",
            ])
            .arg(dumps.join("postgres.dump")),
    );
    assert!(r.status.success(), "{r}");
    let got = target.query_in(
        "restored",
        "SELECT count(*), sum(amount),
                md5(string_agg(id || ':' || name || ':' || amount || ':' || payload, ',' ORDER BY id))
         FROM items;",
    );
    assert_eq!(got, want);
    target.stop();
    assert_clean_staging(&staging);
}

#[test]
fn each_failed_check_names_itself_and_writes_nothing() {
    let tmp = scratch("export-checks");
    make_reachable(&tmp.path().join("any"));
    let data = tmp.path().join("src").join("pgdata");
    init_cluster(&data);
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let rp = repo.backup("pg", &[&data]).restore_point;
    let staging = tmp.path().join("staging");
    let expect = |run: flr_e2e::Run, check: &str, target: &Path| {
        let run = run.expect_code(1);
        assert!(
            run.stderr.contains(&format!("check `{check}` failed")),
            "{run}"
        );
        assert!(run.stderr.contains("nothing was written"), "{run}");
        assert!(!staging.exists() || std::fs::read_dir(&staging).unwrap().next().is_none());
        let left: Vec<_> = std::fs::read_dir(target)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        left
    };

    // Not a database.
    let out = tmp.path().join("out");
    let left = expect(
        export(&repo, &rp, "pgdata/base", "files", &out, &staging, &[]),
        "engine",
        &out,
    );
    assert!(left.is_empty());
    let left = expect(
        export(&repo, &rp, "nowhere", "files", &out, &staging, &[]),
        "path",
        &out,
    );
    assert!(left.is_empty());

    // A remote target without a token, and one where nothing answers:
    // refused, not taken for a local directory named `flr:`.
    let run = export(
        &repo,
        &rp,
        "pgdata",
        "files",
        Path::new("flr://127.0.0.1:9/srv"),
        &staging,
        &[],
    )
    .expect_code(1);
    assert!(run.stderr.contains("check `remote token` failed"), "{run}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let run = repo
        .cmd("export")
        .arg(&rp)
        .args(["--path", "pgdata", "--format", "files", "--to"])
        .arg(format!("flr://127.0.0.1:{closed}/srv"))
        .arg("--staging")
        .arg(&staging)
        .env("FLR_TOKEN", "0123456789abcdef0123")
        .run()
        .expect_code(1);
    assert!(
        run.stderr.contains("check `remote target` failed")
            && run.stderr.contains("does not answer"),
        "{run}"
    );
    assert!(!run.stderr.contains("0123456789abcdef0123"), "{run}");
    assert!(!Path::new("flr:").exists());
    assert!(!staging.exists() || std::fs::read_dir(&staging).unwrap().next().is_none());

    // A target that is not empty.
    let busy = tmp.path().join("busy");
    flr_e2e::mkdir(&busy);
    std::fs::write(busy.join("keep.txt"), b"mine").unwrap();
    let left = expect(
        export(&repo, &rp, "pgdata", "files", &busy, &staging, &[]),
        "target",
        &busy,
    );
    assert_eq!(left, ["keep.txt"]);

    // pg_dump missing from the programs' directory.
    let bin = tmp.path().join("pgbin");
    flr_e2e::mkdir(&bin);
    for p in ["pg_ctl", "postgres", "psql", "pg_dumpall"] {
        std::os::unix::fs::symlink(pg_program(p), bin.join(p)).unwrap();
    }
    let run = repo
        .cmd("export")
        .arg(&rp)
        .args(["--path", "pgdata", "--format", "logical", "--to"])
        .arg(&out)
        .arg("--staging")
        .arg(&staging)
        .env("FLR_PG_BIN", &bin)
        .run();
    let left = expect(run, "programs", &out);
    assert!(left.is_empty());

    // Staging on a small tmpfs, and a read-only target.
    let small = tmp.path().join("small");
    let ro = tmp.path().join("ro");
    let _small = flr_e2e::mount::tmpfs(&small, "size=8m");
    let _ro = flr_e2e::mount::tmpfs(&ro, "ro,size=8m");
    let run = export(
        &repo,
        &rp,
        "pgdata",
        "files",
        &out,
        &small.join("stage"),
        &[],
    )
    .expect_code(1);
    assert!(run.stderr.contains("check `staging space` failed"), "{run}");
    assert!(!small.join("stage").exists());
    let run = export(&repo, &rp, "pgdata", "files", &ro.join("t"), &staging, &[]).expect_code(1);
    assert!(run.stderr.contains("check `target rights` failed"), "{run}");
    assert!(!out.exists());
}

#[test]
fn an_export_killed_during_staging_is_cleaned_up_by_the_next() {
    let tmp = scratch("export-kill");
    make_reachable(&tmp.path().join("any"));
    let data = tmp.path().join("src").join("pgdata");
    init_cluster(&data);
    let server = PgServer::start(&data);
    load_items(&server, 1, 200_000);
    server.stop();
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let rp = repo.backup("pg", &[&data]).restore_point;
    let staging = tmp.path().join("staging");
    let out = tmp.path().join("out");
    let mut child = repo
        .cmd("export")
        .arg(&rp)
        .args([
            "--path",
            "pgdata",
            "--format",
            "logical",
            "--logical-format",
            "plain",
            "--to",
        ])
        .arg(&out)
        .arg("--staging")
        .arg(&staging)
        .spawn_quiet();
    // Killed once its server runs.
    let until = Instant::now() + Duration::from_secs(120);
    let postmaster = loop {
        let state = std::fs::read_dir(&staging)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| std::fs::read(e.unwrap().path().join("state.json")).ok())
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
        if let Some(pm) = state.as_ref().and_then(|s| s["postmaster"].as_u64()) {
            break pm as u32;
        }
        assert!(Instant::now() < until, "the export's server never came up");
        std::thread::sleep(Duration::from_millis(20));
    };
    send_signal(child.id(), "KILL");
    assert!(wait_for_exit(child.id(), Duration::from_secs(10)));
    let _ = child.wait();
    assert!(std::fs::read_dir(&staging).unwrap().next().is_some());

    // The next export removes it all: server, mount, staged files.
    let sqlite_src = tmp.path().join("lite");
    flr_e2e::mkdir(&sqlite_src);
    sqlite(
        &sqlite_src.join("a.db"),
        "CREATE TABLE x(a); INSERT INTO x VALUES (1);",
    );
    let lite_rp = repo.backup("lite", &[&sqlite_src]).restore_point;
    let run = export(
        &repo,
        &lite_rp,
        "lite/a.db",
        "files",
        &tmp.path().join("lite-out"),
        &staging,
        &[],
    )
    .success();
    assert!(run.stderr.contains("did not finish"), "{run}");
    assert!(
        wait_for_exit(postmaster, Duration::from_secs(10)),
        "the killed export's server still runs"
    );
    assert_clean_staging(&staging);
    assert!(!out.exists() || std::fs::read_dir(&out).unwrap().next().is_none());
}

/// A SQLite database whose WAL holds bytes is restored into staging with
/// its WAL to be recovered: the staging check counts both, while one with
/// nothing beside it stages nothing for `files`.
#[test]
fn staging_space_counts_a_sqlite_wal_restored_there() {
    let tmp = scratch("export-sqlite-space");
    let src = tmp.path().join("src");
    flr_e2e::mkdir(&src);
    // walled.db: its 120 MB of rows are all in its WAL.
    copy_with_wal(
        &tmp.path().join("live.db"),
        &src.join("walled.db"),
        "c.execute('create table t(b blob)')\n\
         c.execute('with recursive n(i) as (select 1 union all select i + 1 from n where i < 30000) \
                    insert into t select randomblob(4000) from n')\n\
         c.commit()\n",
    );
    sqlite(
        &src.join("plain.db"),
        "CREATE TABLE t(v); INSERT INTO t VALUES (1);",
    );
    assert!(src.join("walled.db-wal").metadata().unwrap().len() > 100 << 20);
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let rp = repo.backup("app", &[&src]).restore_point;

    // 400 MiB: the 320 MiB floor and the plain file fit; the WAL does not.
    let small = tmp.path().join("small");
    let _small = flr_e2e::mount::tmpfs(&small, "size=400m");
    let staging = small.join("stage");
    let out = tmp.path().join("out");
    let run = export(&repo, &rp, "src/walled.db", "files", &out, &staging, &[]).expect_code(1);
    assert!(run.stderr.contains("check `staging space` failed"), "{run}");
    assert!(!out.exists() && !staging.exists());
    export(&repo, &rp, "src/plain.db", "files", &out, &staging, &[]).success();
    assert_eq!(sqlite(&out.join("plain.db"), "SELECT v FROM t"), "1");
    assert_clean_staging(&staging);
}
