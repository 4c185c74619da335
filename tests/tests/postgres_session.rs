//! PostgreSQL 15 running on a writable session: a restore point mounted
//! copy-on-write (`flr mount --writable`), a real server started on the
//! data directory inside the mount, its changes committed as a new
//! restore point (`flr session commit`) or thrown away (`flr session
//! discard`, or an unmount without `--keep`).
//!
//! Every scenario first records what the server answers on a plain
//! directory, then asks the same through the mount: equal answers mean the
//! mount served the cluster's files, and took PostgreSQL's writes, fsyncs,
//! renames and truncations, correctly. A restored copy is the control: if
//! it answers right and the session does not, the fault is the session.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flr_e2e::command::{tool, wait_for_exit};
use flr_e2e::postgres::{
    assert_pgbench_consistent, init_cluster, items_fingerprint, load_items, make_reachable,
};
use flr_e2e::tree::assert_same_tree;
use flr_e2e::{is_mounted, scratch, Flr, Mount, PgServer, TestRepo, WritableMount};

/// The data directory's name: `flr backup /x/pgdata` puts it at the root
/// of the restore point, so a session shows it as `MOUNT/pgdata`.
const DATADIR: &str = "pgdata";

/// How long the mount process gets to end after an unmount or a discard.
const EXIT_GRACE: Duration = Duration::from_secs(30);

/// The data directory inside a session's mount; panics with the mount's
/// top level and messages when it is not there.
#[track_caller]
fn datadir_in(mount: &WritableMount) -> PathBuf {
    let data = mount.join(DATADIR);
    if !data.is_dir() {
        let top: Vec<String> = std::fs::read_dir(mount.path())
            .map(|entries| {
                entries
                    .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                    .collect()
            })
            .unwrap_or_else(|e| vec![format!("(read_dir failed: {e})")]);
        panic!(
            "no {DATADIR}/ at the root of the session mounted at {}; it holds {top:?}\n--- mount messages ---\n{}",
            mount.path().display(),
            mount.messages()
        );
    }
    data
}

/// Asserts that the data directory in the mount has the owner and the
/// permission bits of the one that was backed up (PostgreSQL refuses to
/// start otherwise, with a less direct message).
#[track_caller]
fn assert_same_owner_and_mode(original: &Path, mounted: &Path) {
    let a = std::fs::metadata(original).expect("stat the original data directory");
    let b = std::fs::metadata(mounted).expect("stat the mounted data directory");
    assert_eq!(
        (a.uid(), a.gid(), a.permissions().mode() & 0o7777),
        (b.uid(), b.gid(), b.permissions().mode() & 0o7777),
        "owner, group and mode of {} differ from the backed-up {}",
        mounted.display(),
        original.display()
    );
}

/// `flr session SUBCOMMAND ID ... --state-dir DIR`; must exit 0.
#[track_caller]
fn session_cmd(state_dir: &Path, args: &[&str]) -> flr_e2e::Run {
    Flr::new(["session"])
        .args(args)
        .arg("--state-dir")
        .arg(state_dir)
        .run()
        .success()
}

/// `flr session commit ID --job JOB`: the new restore point's name.
#[track_caller]
fn commit(state_dir: &Path, session: &str, job: &str) -> String {
    let r = session_cmd(state_dir, &["commit", session, "--job", job]);
    let name = r
        .stdout
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or_else(|| panic!("session commit printed no restore point: {r}"))
        .to_string();
    assert!(
        name.starts_with(&format!("{job}/")),
        "session commit printed {name:?}, not a restore point of job {job}: {r}"
    );
    name
}

/// The output of `flr session list --json`, as text (the tests only ask
/// whether a session id appears in it).
fn session_list(state_dir: &Path) -> String {
    session_cmd(state_dir, &["list", "--json"]).stdout
}

/// A scratch directory the `postgres` user can reach into.
fn pg_scratch(test: &str) -> tempfile::TempDir {
    let tmp = scratch(test);
    make_reachable(&tmp.path().join("any"));
    tmp
}

/// Starts a server on `data`, logging how long it took to accept
/// connections (crash recovery included).
#[track_caller]
fn start(data: &Path, what: &str) -> PgServer {
    let t = Instant::now();
    let server = PgServer::start(data);
    eprintln!(
        "{what}: PostgreSQL up in {:?} (port {})",
        t.elapsed(),
        server.port
    );
    server
}

/// The control: a stopped cluster, backed up and restored to a plain
/// directory, starts and answers as before. Proves the cluster, the
/// queries and the backup without any mount.
#[test]
fn restored_copy_of_a_stopped_cluster_answers_the_same() {
    let tmp = pg_scratch("pg-restored");
    let src = tmp.path().join("src").join(DATADIR);
    init_cluster(&src);
    let server = start(&src, "source");
    load_items(&server, 1, 50_000);
    let expected = items_fingerprint(&server);
    server.stop();

    let repo = TestRepo::init(&tmp.path().join("repo"));
    let backup = repo.backup("pg", &[&src]);
    let out = tmp.path().join("out");
    repo.restore(&backup.restore_point, &out, &[] as &[&str]);
    let restored = out.join(DATADIR);
    assert_same_owner_and_mode(&src, &restored);
    make_reachable(&restored);
    let server = start(&restored, "restored copy");
    assert_eq!(items_fingerprint(&server), expected);
    server.stop();
}

/// The main path: a stopped cluster backed up; a writable session of it
/// answers like the original, takes inserts, updates, a table rewrite and
/// a configuration change; the session is committed as a new restore
/// point, which holds all of it, while the original restore point still
/// holds the original data.
#[test]
fn stopped_cluster_session_commits_a_new_restore_point() {
    let tmp = pg_scratch("pg-stopped");
    let state = tmp.path().join("sessions");

    // The original cluster: 200,000 rows (about 45 MB with the index).
    let src = tmp.path().join("src").join(DATADIR);
    init_cluster(&src);
    let server = start(&src, "source");
    load_items(&server, 1, 200_000);
    let original = items_fingerprint(&server);
    server.stop();

    let repo = TestRepo::init(&tmp.path().join("repo"));
    let first = repo.backup("pg", &[&src]).restore_point;

    // A session of it: same answers, then changes of every kind.
    let mnt = WritableMount::background(&repo, &first, &tmp.path().join("mnt1"), &state, "edit");
    let data = datadir_in(&mnt);
    assert_same_owner_and_mode(&src, &data);
    let server = start(&data, "session edit");
    assert_eq!(
        items_fingerprint(&server),
        original,
        "the session answers differently from the backed-up cluster"
    );
    // New pages at the end of the table and its indexes ...
    load_items(&server, 200_001, 205_000);
    // ... changes inside existing pages ...
    server.query("UPDATE items SET amount = amount + 1 WHERE id % 97 = 0;");
    // ... a rewrite into new files, the old ones truncated and unlinked at
    // the next checkpoint ...
    server.query("VACUUM FULL items;");
    server.query("CHECKPOINT;");
    // ... and a rename (postgresql.auto.conf is written to a temporary
    // file, then renamed over the old one).
    server.query("ALTER SYSTEM SET work_mem = '7MB';");
    server.query("SELECT pg_reload_conf();");
    let changed = items_fingerprint(&server);
    assert_ne!(changed, original);
    server.stop();

    let list = session_list(&state);
    assert!(
        list.contains("edit"),
        "session list does not show session edit: {list}"
    );
    let second = commit(&state, "edit", "pg-edited");
    // The commit stored the session exactly: every file of the data
    // directory with its mode, mtime and bytes, as a read-only mount of the
    // new restore point shows them.
    {
        let ro = Mount::background(
            &repo,
            &tmp.path().join("committed"),
            &["--restore-point", &second],
        );
        let (job, ts) = second.split_once('/').expect("JOB/TIMESTAMP");
        assert_same_tree(&data, &ro.join(job).join(ts).join(DATADIR));
    }
    // An unmount without --keep ends the session and drops its state.
    let r = tool("fusermount3", [Path::new("-u"), mnt.path()]);
    assert!(r.status.success(), "{r}");
    if let Some(pid) = mnt.mount.pid {
        assert!(
            wait_for_exit(pid, EXIT_GRACE),
            "the mount process {pid} still runs {EXIT_GRACE:?} after the unmount:\n{}",
            mnt.messages()
        );
    }
    assert!(
        !state.join("edit").exists(),
        "unmounting without --keep left the session's state in {}",
        state.join("edit").display()
    );
    drop(mnt);

    let names = repo.restore_point_names();
    assert!(
        names.contains(&first) && names.contains(&second),
        "restore points {names:?} should hold {first} and {second}"
    );
    let verify = repo.verify_run(true);
    assert!(
        verify.status.success(),
        "verify --read-data after the commit: {verify}"
    );

    // The committed restore point, in a session of its own: the changes.
    {
        let mnt =
            WritableMount::background(&repo, &second, &tmp.path().join("mnt2"), &state, "reopen");
        let data = datadir_in(&mnt);
        let server = start(&data, "committed restore point");
        assert_eq!(
            items_fingerprint(&server),
            changed,
            "the committed restore point does not hold the session's changes"
        );
        assert_eq!(server.query("SHOW work_mem;"), "7MB");
        server.stop();
    }

    // The committed restore point restored to a plain directory: the same,
    // so the commit stored consistent files with their owners and modes.
    {
        let out = tmp.path().join("out");
        repo.restore(&second, &out, &[] as &[&str]);
        let restored = out.join(DATADIR);
        assert_same_owner_and_mode(&src, &restored);
        let server = start(&restored, "committed restore point, restored");
        assert_eq!(items_fingerprint(&server), changed);
        server.stop();
    }

    // The original restore point is untouched by the session.
    {
        let mnt =
            WritableMount::background(&repo, &first, &tmp.path().join("mnt3"), &state, "again");
        let data = datadir_in(&mnt);
        let server = start(&data, "original restore point again");
        assert_eq!(
            items_fingerprint(&server),
            original,
            "the original restore point changed"
        );
        assert_ne!(server.query("SHOW work_mem;"), "7MB");
        server.stop();
    }
}

/// A base backup of a running cluster (`pg_basebackup -X stream`) needs
/// crash recovery from its backup_label at the first start: that recovery
/// runs on the mount, and the server then answers as the source did when
/// the backup was taken. A pgbench run, a crash and a second recovery on
/// the same session follow.
#[test]
fn base_backup_recovers_on_a_session() {
    let tmp = pg_scratch("pg-basebackup");
    let state = tmp.path().join("sessions");

    let src = tmp.path().join("src").join(DATADIR);
    init_cluster(&src);
    let source = start(&src, "source");
    load_items(&source, 1, 100_000);
    source.pgbench_init(2);
    source.pgbench(["-c", "2", "-t", "200", "-n"]);
    let at_backup = items_fingerprint(&source);
    let history_at_backup = assert_pgbench_consistent(&source);
    let copy = tmp.path().join("basebackup").join(DATADIR);
    source.base_backup(&copy);
    assert!(
        copy.join("backup_label").is_file(),
        "pg_basebackup wrote no backup_label in {}",
        copy.display()
    );
    // Changes after the backup must not show up in it.
    load_items(&source, 100_001, 101_000);
    assert_ne!(items_fingerprint(&source), at_backup);
    source.stop();

    let repo = TestRepo::init(&tmp.path().join("repo"));
    let rp = repo.backup("pg-base", &[&copy]).restore_point;

    let mnt = WritableMount::background(&repo, &rp, &tmp.path().join("mnt"), &state, "recover");
    let data = datadir_in(&mnt);
    assert_same_owner_and_mode(&copy, &data);
    let server = start(&data, "base backup on the session (recovery)");
    let recovery: Vec<String> = server
        .log()
        .lines()
        .filter(|l| l.contains("redo") || l.contains("recovery") || l.contains("backup"))
        .map(str::to_string)
        .collect();
    eprintln!("recovery log:\n{}", recovery.join("\n"));
    assert_eq!(server.query("SELECT pg_is_in_recovery();"), "f");
    assert_eq!(
        items_fingerprint(&server),
        at_backup,
        "the recovered base backup answers differently from the source at backup time"
    );
    assert_eq!(assert_pgbench_consistent(&server), history_at_backup);

    // Writes under load, then a crash: the second recovery replays the WAL
    // written to the session.
    server.pgbench(["-c", "4", "-j", "2", "-t", "250", "-n"]);
    let history = assert_pgbench_consistent(&server);
    let items = items_fingerprint(&server);
    server.stop_immediate();
    let server = start(&data, "session after a crash (recovery)");
    assert_eq!(assert_pgbench_consistent(&server), history);
    assert_eq!(items_fingerprint(&server), items);
    // Every B-tree index agrees with itself and with its table.
    let checked = server.query(
        "CREATE EXTENSION IF NOT EXISTS amcheck;
         SELECT c.relname, bt_index_check(c.oid::regclass, true)
         FROM pg_class c JOIN pg_am a ON a.oid = c.relam
         WHERE a.amname = 'btree' AND c.relkind = 'i' AND c.relpersistence = 'p';",
    );
    eprintln!(
        "amcheck: {} B-tree indexes checked",
        checked.lines().count()
    );
    server.stop();
    drop(mnt);
}

/// `flr session discard` ends the mount and leaves nothing of the
/// session; a new session of the same restore point shows none of the
/// discarded writes.
#[test]
fn discarded_session_leaves_nothing() {
    let tmp = pg_scratch("pg-discard");
    let state = tmp.path().join("sessions");

    let src = tmp.path().join("src").join(DATADIR);
    init_cluster(&src);
    let server = start(&src, "source");
    load_items(&server, 1, 20_000);
    let original = items_fingerprint(&server);
    server.stop();

    let repo = TestRepo::init(&tmp.path().join("repo"));
    let rp = repo.backup("pg", &[&src]).restore_point;

    let mnt = WritableMount::background(&repo, &rp, &tmp.path().join("mnt"), &state, "scratchpad");
    let data = datadir_in(&mnt);
    let server = start(&data, "session scratchpad");
    load_items(&server, 20_001, 30_000);
    server.query("DELETE FROM items WHERE id % 3 = 0;");
    let changed = items_fingerprint(&server);
    server.stop_immediate();
    let server = start(&data, "session scratchpad after a crash (recovery)");
    assert_eq!(items_fingerprint(&server), changed);
    server.stop();
    assert!(
        state.join("scratchpad").exists(),
        "the session's state is not in {}",
        state.join("scratchpad").display()
    );

    let discard = Flr::new(["session", "discard", "scratchpad", "--state-dir"])
        .arg(&state)
        .run();
    assert!(
        discard.status.success(),
        "session discard failed: {discard}\nstill mounted: {}; state left: {}\n--- mount messages ---\n{}",
        is_mounted(mnt.path()),
        state.join("scratchpad").exists(),
        mnt.messages()
    );
    assert!(
        !is_mounted(mnt.path()),
        "{} is still mounted after session discard",
        mnt.path().display()
    );
    assert!(
        !state.join("scratchpad").exists(),
        "session discard left {}",
        state.join("scratchpad").display()
    );
    if let Some(pid) = mnt.mount.pid {
        assert!(
            wait_for_exit(pid, EXIT_GRACE),
            "the mount process {pid} still runs {EXIT_GRACE:?} after session discard:\n{}",
            mnt.messages()
        );
    }
    let list = session_list(&state);
    assert!(
        !list.contains("scratchpad"),
        "session list still shows the discarded session: {list}"
    );
    drop(mnt);

    let mnt = WritableMount::background(&repo, &rp, &tmp.path().join("mnt-again"), &state, "fresh");
    let server = start(&datadir_in(&mnt), "fresh session");
    assert_eq!(
        items_fingerprint(&server),
        original,
        "a discarded session's writes reached the restore point"
    );
    server.stop();
    drop(mnt);
    // The repository holds only the original restore point.
    let names = repo.restore_point_names();
    assert!(
        names == [rp.as_str()],
        "restore points after a discard: {names:?}, expected only {rp}"
    );
}
