//! `flr devices`: named pipes per database and stream, written by real
//! processes at once. The stored streams are byte-identical and each
//! database is one restore point; a killed writer, a cut or hostile tar, a
//! device nobody writes to and a full disk each fail only what they touch,
//! say where, and commit nothing partial; pipes are 0600, go to the owner
//! asked for, and are cleaned up after a crash. Real engines: `pg_dump -Fc`
//! of two databases at once into devices, restored from the mount with
//! `pg_restore`.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flr_e2e::command::{process_alive, send_signal, wait_for_exit};
use flr_e2e::postgres::{init_cluster, make_reachable, pg_program};
use flr_e2e::rng::mixed_bytes;
use flr_e2e::tarball::Tar;
use flr_e2e::{scratch, Mount, PgServer, Rng, TestRepo};
use serde_json::Value;

/// A running `flr devices --json`: its devices, then its outcome.
struct Devices {
    child: Child,
    stdout: BufReader<std::process::ChildStdout>,
    stderr_path: PathBuf,
    /// Database and stream -> path.
    paths: Vec<(String, u64, PathBuf)>,
}

impl Devices {
    #[track_caller]
    fn start(repo: &TestRepo, dir: &Path, extra: &[&str], databases: &[&str]) -> Devices {
        let stderr_path = dir.with_extension(format!("log-{}", databases.join("-")));
        let mut cmd = repo
            .cmd("devices")
            .arg("--dir")
            .arg(dir)
            .arg("--json")
            .args(extra)
            .args(databases)
            .into_command();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr_path).unwrap());
        let mut child = cmd.spawn().expect("start flr devices");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            let _ = child.wait();
            panic!(
                "flr devices printed no devices:\n{}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        let v: Value = serde_json::from_str(&line).expect("devices JSON line");
        let paths = v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["db"].as_str().unwrap().to_string(),
                    d["stream"].as_u64().unwrap(),
                    PathBuf::from(d["path"].as_str().unwrap()),
                )
            })
            .collect();
        Devices {
            child,
            stdout,
            stderr_path,
            paths,
        }
    }

    fn path(&self, db: &str, stream: u64) -> &Path {
        &self
            .paths
            .iter()
            .find(|(d, s, _)| d == db && *s == stream)
            .unwrap_or_else(|| panic!("no device {db}/{stream} in {:?}", self.paths))
            .2
    }

    /// Waits for the end: exit code, the results line by database, stderr.
    #[track_caller]
    fn finish(mut self) -> (i32, Vec<Value>, String) {
        let started = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if started.elapsed() > Duration::from_secs(300) {
                let _ = self.child.kill();
                panic!("flr devices did not end within 300 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut rest = String::new();
        self.stdout.read_to_string(&mut rest).unwrap();
        let stderr = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        let last = rest.lines().last().unwrap_or_else(|| {
            panic!("flr devices ended ({status}) without its results line:\n{stderr}")
        });
        let v: Value = serde_json::from_str(last).expect("results JSON line");
        let results = v["results"].as_array().unwrap().clone();
        (status.code().unwrap_or(-1), results, stderr)
    }
}

impl Drop for Devices {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn result<'a>(results: &'a [Value], db: &str) -> &'a Value {
    results
        .iter()
        .find(|r| r["db"] == db)
        .unwrap_or_else(|| panic!("no result for {db} in {results:?}"))
}

/// Writes `file` into `device` from a process of its own (`dd`, as an
/// engine's writer would be), returning it.
fn writer(file: &Path, device: &Path) -> Child {
    Command::new("dd")
        .arg(format!("if={}", file.display()))
        .arg(format!("of={}", device.display()))
        .args(["bs=64k", "status=none"])
        .spawn()
        .expect("start dd")
}

#[test]
fn four_streams_of_two_databases_written_by_eight_processes_are_stored_byte_for_byte() {
    let tmp = scratch("devices");
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let dir = tmp.path().join("dev");
    let mut rng = Rng::new(1001);
    // Streams of different lengths, the shortest empty; two databases
    // share one stream's content (a copy dedups across them).
    let mut sources = Vec::new();
    for (db, sizes) in [
        ("sales", [7 << 20, 3 << 20, 0, 12345]),
        ("crm", [5 << 20, 9 << 20, 1, 3 << 20]),
    ] {
        for (i, size) in sizes.into_iter().enumerate() {
            let path = tmp.path().join(format!("{db}-{i}"));
            let data = if db == "crm" && i == 3 {
                std::fs::read(tmp.path().join("sales-1")).unwrap()
            } else {
                mixed_bytes(&mut rng, size)
            };
            std::fs::write(&path, data).unwrap();
            sources.push((db, i as u64, path));
        }
    }
    let devices = Devices::start(&repo, &dir, &["--streams", "4"], &["sales", "crm"]);
    assert_eq!(devices.paths.len(), 8);
    let me = std::fs::metadata("/proc/self").unwrap();
    for (_, _, p) in &devices.paths {
        let m = std::fs::symlink_metadata(p).unwrap();
        assert!(m.file_type().is_fifo(), "{} is not a pipe", p.display());
        assert_eq!(m.permissions().mode() & 0o7777, 0o600, "{}", p.display());
        assert_eq!((m.uid(), m.gid()), (me.uid(), me.gid()), "{}", p.display());
    }
    let writers: Vec<Child> = sources
        .iter()
        .map(|(db, i, src)| writer(src, devices.path(db, *i)))
        .collect();
    for mut w in writers {
        assert!(w.wait().unwrap().success());
    }
    let (code, results, stderr) = devices.finish();
    assert_eq!(code, 0, "{stderr}");
    let names = repo.restore_point_names();
    assert_eq!(names.len(), 2, "{names:?}");
    for db in ["sales", "crm"] {
        let rp = result(&results, db)["restore_point"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(rp.starts_with(&format!("{db}/")), "{rp}");
        let out = tmp.path().join(format!("out-{db}"));
        repo.restore(&rp, &out, &[] as &[&str]);
        for (d, i, src) in sources.iter().filter(|s| s.0 == db) {
            let got = std::fs::read(out.join(format!("stream-{i}"))).unwrap();
            let want = std::fs::read(src).unwrap();
            assert!(
                got == want,
                "{d} stream {i} differs ({} vs {} bytes)",
                got.len(),
                want.len()
            );
        }
    }
    // Removed at the end.
    assert!(!dir.join("sales").exists() && !dir.join("crm").exists());
    let verify = repo.verify_run(true);
    assert!(verify.status.success(), "{verify}");
}

#[test]
fn a_killed_writer_a_cut_tar_and_a_hostile_tar_fail_only_their_own_database() {
    let tmp = scratch("devices-fail");
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let dir = tmp.path().join("dev");
    let mut rng = Rng::new(7);
    let big = tmp.path().join("big");
    std::fs::write(&big, mixed_bytes(&mut rng, 6 << 20)).unwrap();

    // Raw: the writers are run by flr (--exec), so a killed one is known.
    let script = format!(
        "case $FLR_DATABASE in \
           whole) cat {big} > $FLR_DEVICE ;; \
           killed) head -c 3000000 {big} > $FLR_DEVICE; kill -9 $$ ;; \
         esac",
        big = big.display()
    );
    let devices = Devices::start(&repo, &dir, &["--exec", &script], &["whole", "killed"]);
    let (code, results, stderr) = devices.finish();
    assert_eq!(code, 1, "{stderr}");
    assert!(result(&results, "whole")["restore_point"].is_string());
    let err = result(&results, "killed")["error"].as_str().unwrap();
    for needle in [
        "device ",
        "killed/0",
        "database killed",
        "byte 3000000",
        "killed by signal 9",
    ] {
        assert!(err.contains(needle), "{needle:?} not in {err:?}");
    }
    assert_eq!(repo.restore_point_names().len(), 1);

    // Tar: the stream carries its own end.
    let payload = mixed_bytes(&mut rng, 200_000);
    let good = Tar::new()
        .file("base/1/16384", &payload)
        .file("PG_VERSION", b"15\n")
        .end();
    let cut = good[..100_000].to_vec();
    let hostile = Tar::new()
        .file("ok", b"fine")
        .file("../../escaped", b"evil")
        .end();
    let streams = [("fine", good), ("cut", cut), ("hostile", hostile)];
    let devices = Devices::start(
        &repo,
        &dir,
        &["--format", "tar"],
        &["fine", "cut", "hostile"],
    );
    let mut writers = Vec::new();
    for (db, bytes) in &streams {
        let src = tmp.path().join(format!("{db}.tar"));
        std::fs::write(&src, bytes).unwrap();
        writers.push(writer(&src, devices.path(db, 0)));
    }
    for mut w in writers {
        let _ = w.wait();
    }
    let (code, results, stderr) = devices.finish();
    assert_eq!(code, 1, "{stderr}");
    let rp = result(&results, "fine")["restore_point"]
        .as_str()
        .unwrap()
        .to_string();
    let cut_err = result(&results, "cut")["error"].as_str().unwrap();
    assert!(
        cut_err.contains("database cut")
            && cut_err.contains("byte 100000")
            && cut_err.contains("ends early"),
        "{cut_err}"
    );
    let hostile_err = result(&results, "hostile")["error"].as_str().unwrap();
    assert!(
        hostile_err.contains("..") && hostile_err.contains("database hostile"),
        "{hostile_err}"
    );
    assert!(!tmp.path().join("escaped").exists() && !dir.join("escaped").exists());
    let names = repo.restore_point_names();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(!names
        .iter()
        .any(|n| n.starts_with("cut/") || n.starts_with("hostile/")));
    let out = tmp.path().join("out-fine");
    repo.restore(&rp, &out, &[] as &[&str]);
    assert_eq!(std::fs::read(out.join("base/1/16384")).unwrap(), payload);
    assert_eq!(std::fs::read(out.join("PG_VERSION")).unwrap(), b"15\n");
}

#[test]
fn a_device_nobody_writes_to_times_out_and_the_other_database_commits() {
    let tmp = scratch("devices-timeout");
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let dir = tmp.path().join("dev");
    let src = tmp.path().join("src");
    std::fs::write(&src, b"a small dump").unwrap();
    let started = Instant::now();
    let devices = Devices::start(&repo, &dir, &["--timeout", "2"], &["busy", "idle"]);
    let mut w = writer(&src, devices.path("busy", 0));
    assert!(w.wait().unwrap().success());
    let (code, results, stderr) = devices.finish();
    assert_eq!(code, 1, "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(result(&results, "busy")["restore_point"].is_string());
    let err = result(&results, "idle")["error"].as_str().unwrap();
    assert!(
        err.contains("idle/0") && err.contains("nobody wrote to it within 2 s"),
        "{err}"
    );
    assert_eq!(repo.restore_point_names().len(), 1);
    assert!(!dir.join("idle").exists());
}

#[test]
fn a_full_repository_disk_commits_nothing_and_says_so() {
    let tmp = scratch("devices-full");
    let small = tmp.path().join("small");
    let _small = flr_e2e::mount::tmpfs(&small, "size=16m");
    let repo = TestRepo::init(&small.join("repo"));
    let src = tmp.path().join("src");
    std::fs::write(&src, Rng::new(3).bytes(64 << 20)).unwrap();
    let dir = tmp.path().join("dev");
    let devices = Devices::start(&repo, &dir, &[], &["big"]);
    let mut w = writer(&src, devices.path("big", 0));
    let (code, results, stderr) = devices.finish();
    let _ = w.wait();
    assert_eq!(code, 1, "{stderr}");
    let err = result(&results, "big")["error"].as_str().unwrap();
    assert!(err.contains("No space left on device"), "{err}");
    assert!(repo.restore_point_names().is_empty());
    // What was written is still sound.
    let verify = repo.verify_run(true);
    assert!(verify.status.success(), "{verify}");
}

#[test]
fn pipes_go_to_the_owner_asked_for_and_a_crashed_run_leaves_none_behind() {
    let tmp = scratch("devices-owner");
    make_reachable(&tmp.path().join("any"));
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let dir = tmp.path().join("dev");
    let id = Command::new("id")
        .args(["-u", "postgres"])
        .output()
        .unwrap();
    let postgres_uid: u32 = String::from_utf8(id.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let devices = Devices::start(
        &repo,
        &dir,
        &["--owner", "postgres", "--streams", "2"],
        &["pg"],
    );
    for (_, _, p) in &devices.paths {
        let m = std::fs::symlink_metadata(p).unwrap();
        assert_eq!(m.uid(), postgres_uid, "{}", p.display());
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
    }
    let d = std::fs::metadata(dir.join("pg")).unwrap();
    assert_eq!(
        (d.uid(), d.permissions().mode() & 0o777),
        (postgres_uid, 0o700)
    );
    // The engine's user writes to it; another user cannot.
    let denied = Command::new("runuser")
        .args(["-u", "nobody", "--", "sh", "-c"])
        .arg(format!("echo x > {}", devices.path("pg", 0).display()))
        .output()
        .unwrap();
    assert!(!denied.status.success());

    // A second run for the same database is refused while this one lives.
    let second = repo
        .cmd("devices")
        .arg("--dir")
        .arg(&dir)
        .arg("pg")
        .run()
        .failure();
    assert!(second.stderr.contains("in use by flr"), "{second}");

    // Killed: its pipes stay, and the next run clears them and works.
    let pid = devices.child.id();
    send_signal(pid, "KILL");
    assert!(wait_for_exit(pid, Duration::from_secs(10)) || !process_alive(pid));
    drop(devices);
    assert!(dir.join("pg/0").exists());
    let devices = Devices::start(&repo, &dir, &["--owner", "postgres"], &["pg"]);
    assert!(!dir.join("pg/1").exists(), "a stale pipe was kept");
    let src = tmp.path().join("src");
    std::fs::write(&src, b"after a crash").unwrap();
    make_reachable(&src);
    let status = Command::new("runuser")
        .args(["-u", "postgres", "--", "sh", "-c"])
        .arg(format!(
            "cat {} > {}",
            src.display(),
            devices.path("pg", 0).display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    let (code, _, stderr) = devices.finish();
    assert_eq!(code, 0, "{stderr}");
    assert!(!dir.join("pg").exists());
}

#[test]
fn pg_dump_of_two_databases_at_once_into_devices_restores_with_pg_restore_from_the_mount() {
    let tmp = scratch("devices-pg");
    make_reachable(&tmp.path().join("any"));
    let data = tmp.path().join("src").join("pgdata");
    init_cluster(&data);
    let server = PgServer::start(&data);
    for db in ["shop", "crm"] {
        server.query(&format!("CREATE DATABASE {db};"));
    }
    let psql = |db: &str, sql: &str| -> String {
        let out = Command::new(pg_program("psql"))
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &server.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
            ])
            .args(["-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    psql(
        "shop",
        "CREATE TABLE orders AS SELECT g AS id, md5(g::text) AS note, g * 3 AS total \
         FROM generate_series(1, 200000) g; ALTER TABLE orders ADD PRIMARY KEY (id);",
    );
    psql(
        "crm",
        "CREATE TABLE people AS SELECT g AS id, repeat(chr(65 + g % 26), 40) AS name \
         FROM generate_series(1, 150000) g;",
    );
    let fingerprint = |db: &str, table: &str| {
        psql(
            db,
            &format!("SELECT count(*) || ':' || md5(string_agg(t::text, ',' ORDER BY id)) FROM {table} t"),
        )
    };
    let want = [
        ("shop", "orders", fingerprint("shop", "orders")),
        ("crm", "people", fingerprint("crm", "people")),
    ];

    let repo = TestRepo::init(&tmp.path().join("repo"));
    let dir = tmp.path().join("dev");
    let devices = Devices::start(&repo, &dir, &["--owner", "postgres"], &["shop", "crm"]);
    let dumps: Vec<Child> = ["shop", "crm"]
        .iter()
        .map(|db| {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(pg_program("pg_dump"))
                // A pipe cannot be fsynced: --no-sync (or `> device`).
                .args([
                    "-Fc",
                    "--no-sync",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &server.port.to_string(),
                    "-U",
                    "postgres",
                    "-f",
                ])
                .arg(devices.path(db, 0))
                .arg(db)
                .spawn()
                .unwrap()
        })
        .collect();
    for mut d in dumps {
        assert!(d.wait().unwrap().success());
    }
    let (code, results, stderr) = devices.finish();
    assert_eq!(code, 0, "{stderr}");

    let mount = Mount::background(&repo, &tmp.path().join("mnt"), &[]);
    for (db, table, fp) in &want {
        let rp = result(&results, db)["restore_point"]
            .as_str()
            .unwrap()
            .to_string();
        let restored = format!("{db}_restored");
        server.query(&format!("CREATE DATABASE {restored};"));
        let dump = mount.join(&rp).join("stream-0");
        let out = Command::new(pg_program("pg_restore"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &server.port.to_string(),
                "-U",
                "postgres",
                "-d",
                &restored,
            ])
            .arg(&dump)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_restore {}: {}",
            dump.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(&fingerprint(&restored, table), fp, "{db}");
    }
    mount.unmount();
    server.stop();
}
