//! Exports through daemons: to a second daemon over TCP (right token:
//! the database arrives and answers as the source; wrong token, a
//! directory outside its restore targets, a broken stream, a bad checksum:
//! nothing is kept), export jobs through the API (cancelled while
//! transferring: nothing is left), and a daemon killed outright during
//! staging whose next start removes everything the export had made.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use flr_e2e::command::{tool, wait_for_exit};
use flr_e2e::daemon::{exchange, Daemon, TOKEN};
use flr_e2e::postgres::{init_cluster, items_fingerprint, load_items, make_reachable};
use flr_e2e::{scratch, PgServer, TestRepo};
use serde_json::{json, Value};

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
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

/// Nothing of an export in `staging`, and no mount below it.
fn assert_nothing_staged(staging: &Path) {
    assert!(
        entries(staging).is_empty(),
        "left in staging: {:?}",
        entries(staging)
    );
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        !mounts.contains(staging.to_str().unwrap()),
        "a mount is left under {}",
        staging.display()
    );
}

const ROWS_SQL: &str = "SELECT count(*), sum(length(v)), max(id) FROM t";

fn sqlite_source(dir: &Path, rows: usize, blob: usize) -> (PathBuf, String) {
    let src = dir.join("lite");
    flr_e2e::mkdir(&src);
    let db = src.join("app.db");
    let script = format!(
        "import sqlite3, os\n\
         c = sqlite3.connect({db:?})\n\
         c.execute('create table t(id integer primary key, v blob)')\n\
         c.executemany('insert into t(v) values (?)', [(os.urandom({blob}),) for i in range({rows})])\n\
         c.commit()\n",
        db = db.to_str().unwrap()
    );
    let r = tool("python3", ["-c", &script]);
    assert!(r.status.success(), "{r}");
    let want = sqlite(&db, ROWS_SQL);
    (src, want)
}

#[test]
fn an_export_to_a_second_daemon_arrives_checked_and_a_wrong_token_writes_nothing() {
    let tmp = scratch("export-remote");
    make_reachable(&tmp.path().join("any"));
    let (lite, lite_want) = sqlite_source(tmp.path(), 3000, 700);
    let data = tmp.path().join("pg").join("pgdata");
    init_cluster(&data);
    let server = PgServer::start(&data);
    load_items(&server, 1, 40_000);
    let pg_want = items_fingerprint(&server);
    server.stop();
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let lite_rp = repo.backup("lite", &[&lite]).restore_point;
    let pg_rp = repo.backup("pg", &[&data]).restore_point;

    // The sending daemon serves the repository; the receiving one only
    // lets exports into its restore target.
    let sender = Daemon::start(&tmp.path().join("a"), &[("main", repo.path.as_path())]);
    let receiver = Daemon::start(&tmp.path().join("b"), &[]);
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let staging = tmp.path().join("staging");

    // Run here (no daemon on the socket), SQLite as files.
    let run = repo
        .cmd("export")
        .arg(&lite_rp)
        .args([
            "--path",
            "lite/app.db",
            "--format",
            "files",
            "--json",
            "--to",
        ])
        .arg(receiver.url("lite"))
        .arg("--token-file")
        .arg(&token_file)
        .arg("--staging")
        .arg(&staging)
        .env("FLR_SOCKET", tmp.path().join("no-daemon.sock"))
        .timeout(Duration::from_secs(300))
        .run()
        .success();
    let report = run.json();
    let steps: Vec<&str> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["check", "mount", "stage", "transfer", "cleanup"]);
    let got = receiver.restore.join("lite/app.db");
    assert_eq!(sqlite(&got, ROWS_SQL), lite_want);
    assert_eq!(sqlite(&got, "PRAGMA integrity_check"), "ok");
    assert_eq!(entries(&receiver.restore.join("lite")), ["app.db"]);
    assert_nothing_staged(&staging);
    assert!(
        receiver.log().contains("checked (blake3"),
        "{}",
        receiver.log()
    );

    // Through the sending daemon (the CLI finds it on the socket),
    // PostgreSQL as files: the cluster starts on the receiver's copy.
    let run = repo
        .cmd("export")
        .arg(&pg_rp)
        .args(["--path", "pgdata", "--format", "files", "--json", "--to"])
        .arg(receiver.url("pg"))
        .env("FLR_TOKEN", TOKEN)
        .env("FLR_SOCKET", &sender.socket)
        .timeout(Duration::from_secs(300))
        .run()
        .success();
    assert!(run.stderr.contains("runs on the flr daemon"), "{run}");
    let (_, jobs) = sender.call("GET", "/exports", None);
    let job = &jobs.as_array().unwrap()[0];
    assert_eq!(job["state"], "done", "{job}");
    assert!(!job.to_string().contains(TOKEN), "the token shows: {job}");
    assert_eq!(job["steps"].as_array().unwrap().len(), 5, "{job}");
    let copy = receiver.restore.join("pg/pgdata");
    let server = PgServer::start(&copy);
    assert_eq!(items_fingerprint(&server), pg_want);
    server.stop();
    assert_nothing_staged(&sender.staging);

    // A wrong token: the check fails, nothing is written anywhere.
    let run = repo
        .cmd("export")
        .arg(&lite_rp)
        .args(["--path", "lite/app.db", "--format", "archive", "--to"])
        .arg(receiver.url("wrong"))
        .env("FLR_TOKEN", "not-the-token-at-all-0000")
        .arg("--staging")
        .arg(&staging)
        .env("FLR_SOCKET", tmp.path().join("no-daemon.sock"))
        .run()
        .expect_code(1);
    assert!(run.stderr.contains("check `remote token` failed"), "{run}");
    assert!(run.stderr.contains("nothing was written"), "{run}");
    assert!(!run.stderr.contains("not-the-token-at-all"), "{run}");
    assert_eq!(entries(&receiver.restore), ["lite", "pg"]);
    assert!(!staging.exists() || entries(&staging).is_empty());
    // The same through the daemon: its job fails the same check.
    let run = repo
        .cmd("export")
        .arg(&lite_rp)
        .args(["--path", "lite/app.db", "--format", "logical", "--to"])
        .arg(receiver.url("wrong"))
        .env("FLR_TOKEN", "not-the-token-at-all-0000")
        .env("FLR_SOCKET", &sender.socket)
        .run()
        .expect_code(1);
    assert!(run.stderr.contains("check `remote token` failed"), "{run}");
    assert_eq!(entries(&receiver.restore), ["lite", "pg"]);
    assert!(!sender.log().contains("not-the-token-at-all"));

    // Outside the receiver's restore targets, or climbing out of them.
    for (dir, check) in [
        (tmp.path().join("elsewhere"), "target rights"),
        (receiver.restore.join("x/../../escape"), "target rights"),
    ] {
        let run = repo
            .cmd("export")
            .arg(&lite_rp)
            .args(["--path", "lite/app.db", "--format", "files", "--to"])
            .arg(format!(
                "flr://127.0.0.1:{}{}",
                receiver.port,
                dir.display()
            ))
            .env("FLR_TOKEN", TOKEN)
            .arg("--staging")
            .arg(&staging)
            .env("FLR_SOCKET", tmp.path().join("no-daemon.sock"))
            .run()
            .expect_code(1);
        assert!(
            run.stderr.contains(&format!("check `{check}` failed")),
            "{run}"
        );
    }
    assert!(!tmp.path().join("elsewhere").exists());
    assert!(!receiver.dir.join("escape").exists());
    // A symlink inside the restore target that leads out of it.
    std::os::unix::fs::symlink(tmp.path(), receiver.restore.join("out")).unwrap();
    let (st, body) = receiver.tcp(
        "POST",
        "/receive",
        TOKEN,
        Some(json!({"dir": receiver.restore.join("out/sneaky"), "bytes": 1})),
    );
    assert_eq!(st, 403, "{body}");
    assert!(!tmp.path().join("sneaky").exists());
    std::fs::remove_file(receiver.restore.join("out")).unwrap();
    // A non-empty target without --overwrite.
    let run = repo
        .cmd("export")
        .arg(&lite_rp)
        .args(["--path", "lite/app.db", "--format", "files", "--to"])
        .arg(receiver.url("lite"))
        .env("FLR_TOKEN", TOKEN)
        .arg("--staging")
        .arg(&staging)
        .env("FLR_SOCKET", tmp.path().join("no-daemon.sock"))
        .run()
        .expect_code(1);
    assert!(
        run.stderr.contains("check `target` failed") && run.stderr.contains("not empty"),
        "{run}"
    );

    // A stream whose checksum does not match what arrived, and a stream
    // that breaks off: the receiver keeps nothing.
    let tarball = Command::new("tar")
        .args(["-cf", "-", "-C"])
        .arg(&lite)
        .arg("app.db")
        .output()
        .unwrap()
        .stdout;
    let target = receiver.restore.join("checked");
    let open = || {
        let (st, body) = receiver.tcp(
            "POST",
            "/receive",
            TOKEN,
            Some(json!({"dir": target, "bytes": 1})),
        );
        assert_eq!(st, 201, "{body}");
        body["id"].as_str().unwrap().to_string()
    };
    let id = open();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", receiver.port)).unwrap();
    let mut req = format!(
        "PUT /receive/{id} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        tarball.len()
    )
    .into_bytes();
    req.extend_from_slice(&tarball);
    let (st, body) = exchange(&mut s, &req);
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["bytes"].as_u64().unwrap(), tarball.len() as u64);
    assert_eq!(
        body["blake3"].as_str().unwrap(),
        blake3::hash(&tarball).to_hex().as_str()
    );
    let (st, body) = receiver.tcp(
        "POST",
        &format!("/receive/{id}/commit"),
        TOKEN,
        Some(json!({"blake3": blake3::hash(b"something else").to_hex().as_str(), "bytes": tarball.len()})),
    );
    assert_eq!(st, 409, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("checksum mismatch"),
        "{body}"
    );
    assert!(entries(&target).is_empty(), "{:?}", entries(&target));

    let id = open();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", receiver.port)).unwrap();
    let head = format!(
        "PUT /receive/{id} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    let half = &tarball[..tarball.len() / 2];
    s.write_all(format!("{:x}\r\n", half.len()).as_bytes())
        .unwrap();
    s.write_all(half).unwrap();
    s.write_all(b"\r\n").unwrap();
    s.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(s);
    let until = Instant::now() + Duration::from_secs(10);
    while !entries(&target).is_empty() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(entries(&target).is_empty(), "{:?}", entries(&target));
    let (st, _) = receiver.tcp(
        "POST",
        &format!("/receive/{id}/commit"),
        TOKEN,
        Some(json!({"blake3": "00", "bytes": 0})),
    );
    assert_eq!(st, 404);
}

#[test]
fn an_export_job_cancelled_while_transferring_leaves_nothing() {
    let tmp = scratch("export-cancel");
    make_reachable(&tmp.path().join("any"));
    // Big enough that the transfer runs for a while.
    let (lite, _) = sqlite_source(tmp.path(), 3000, 100_000);
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let rp = repo.backup("lite", &[&lite]).restore_point;
    let d = Daemon::start(&tmp.path().join("a"), &[("main", repo.path.as_path())]);
    let target = d.restore.join("out");
    let (st, job) = d.call(
        "POST",
        "/exports",
        Some(json!({
            "repository": "main", "restore_point": rp, "path": "lite/app.db",
            "format": "files", "to": target,
        })),
    );
    assert_eq!(st, 202, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let until = Instant::now() + Duration::from_secs(120);
    let seen = loop {
        let (_, j) = d.call("GET", &format!("/exports/{id}"), None);
        if j["step"] == "transfer" && j["bytes_done"].as_u64().unwrap() > 0 {
            break j;
        }
        assert!(
            j["state"] == "running",
            "the export ended before its transfer was seen: {j}"
        );
        assert!(Instant::now() < until, "{j}");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(seen["bytes_total"].as_u64().unwrap() > 200 << 20, "{seen}");
    let steps: Vec<&str> = seen["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["check", "mount", "stage"], "{seen}");
    let (st, body) = d.call("DELETE", &format!("/exports/{id}"), None);
    assert_eq!(st, 202, "{body}");
    let end = d.wait_export(&id, Duration::from_secs(60));
    assert_eq!(end["state"], "cancelled", "{end}");
    assert!(end["cancel_requested"].as_bool().unwrap());
    assert_nothing_staged(&d.staging);
    assert!(
        entries(&target).is_empty(),
        "left at the target: {:?}",
        entries(&target)
    );
    // Cancelling again is refused: it has finished.
    assert_eq!(d.call("DELETE", &format!("/exports/{id}"), None).0, 409);
    assert_eq!(d.call("GET", "/exports/x-nope", None).0, 404);
}

#[test]
fn a_daemon_killed_during_staging_cleans_up_at_its_next_start() {
    let tmp = scratch("export-daemon-kill");
    make_reachable(&tmp.path().join("any"));
    let data = tmp.path().join("src").join("pgdata");
    init_cluster(&data);
    let server = PgServer::start(&data);
    load_items(&server, 1, 200_000);
    server.stop();
    let repo = TestRepo::init(&tmp.path().join("repo"));
    let rp = repo.backup("pg", &[&data]).restore_point;
    let mut d = Daemon::start(&tmp.path().join("a"), &[("main", repo.path.as_path())]);
    let target = d.restore.join("dump");
    let (st, job) = d.call(
        "POST",
        "/exports",
        Some(json!({
            "repository": "main", "restore_point": rp, "path": "pgdata",
            "format": "logical", "logical_format": "plain", "to": target,
        })),
    );
    assert_eq!(st, 202, "{job}");
    // Killed once the export's server runs.
    let until = Instant::now() + Duration::from_secs(120);
    let postmaster = loop {
        let state = std::fs::read_dir(&d.staging)
            .ok()
            .and_then(|mut e| e.next())
            .and_then(|e| std::fs::read(e.unwrap().path().join("state.json")).ok())
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
        if let Some(pm) = state.as_ref().and_then(|s| s["postmaster"].as_u64()) {
            break pm as u32;
        }
        assert!(Instant::now() < until, "the export's server never came up");
        std::thread::sleep(Duration::from_millis(20));
    };
    d.kill9();
    assert!(!entries(&d.staging).is_empty());
    // The server may outlive the daemon (or stop once its data directory
    // stops answering); either way the next start makes sure it is gone.

    d.spawn();
    assert!(
        wait_for_exit(postmaster, Duration::from_secs(15)),
        "the killed export's server still runs"
    );
    assert_nothing_staged(&d.staging);
    assert!(entries(&target).is_empty(), "{:?}", entries(&target));
    let log = d.log();
    assert!(log.contains("did not finish"), "{log}");
    assert!(
        log.contains("leftover(s) of unfinished exports removed"),
        "{log}"
    );
}
