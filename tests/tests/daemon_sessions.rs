//! Daemon sessions while a mount is slow: a restore point on an S3
//! repository whose server stops answering is mounted without holding the
//! daemon. Its API answers, sessions of another repository come and go,
//! a second session of the same restore point waits for the first one's
//! mount (and does not mount it again), and both are served once the
//! server answers again.

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use flr_e2e::daemon::Daemon;
use flr_e2e::fault_proxy::{FaultPlan, FaultProxy};
use flr_e2e::rng::Rng;
use flr_e2e::s3::S3Server;
use flr_e2e::tree::{write_random_file, MIB};
use flr_e2e::{scratch, TestRepo};
use serde_json::{json, Value};

/// How long a call that must not wait for the held mount gets.
const ANSWER_WITHIN: Duration = Duration::from_secs(20);

#[test]
fn a_mount_held_up_by_its_store_holds_up_nothing_else() {
    let tmp = scratch("daemon-slow-mount");
    let server = S3Server::start(&tmp.path().join("s3"), &["backups"]);
    let proxy = FaultProxy::start(server.port, FaultPlan::none());
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    write_random_file(&src.join("data.bin"), 2 * MIB, &mut Rng::new(5));
    let remote = server.init_repo("backups", "flr", None);
    let rp = remote.backup("app", &[&src]).restore_point;
    let local = TestRepo::init(&tmp.path().join("local"));
    local.backup("loc", &[&src]);
    let d = Daemon::start_with_env(
        &tmp.path().join("daemon"),
        &[("remote", &remote.path), ("local", &local.path)],
        proxy.env(),
    );
    let session = |repo: &str, rp: &str| -> (u16, Value) {
        d.call(
            "POST",
            "/sessions",
            Some(json!({"repository": repo, "restore_point": rp})),
        )
    };

    // Once mounted and ended, the daemon knows the repository and the
    // restore point: mounting it again starts with a request to the store
    // (the mount's reader lock), made inside the mount.
    let (st, warm) = session("remote", &rp);
    assert_eq!(st, 201, "{warm}\n{}", d.log());
    let (st, _) = d.call(
        "DELETE",
        &format!("/sessions/{}", warm["id"].as_str().unwrap()),
        None,
    );
    assert_eq!(st, 200);

    // From now on the store holds every request.
    proxy.freeze_after(0, |_| true);
    thread::scope(|scope| {
        let first = scope.spawn(|| session("remote", &rp));
        assert!(
            proxy.wait_frozen(ANSWER_WITHIN) && wait_for_held_request(&proxy),
            "the mount sent nothing to the store"
        );
        assert!(!first.is_finished(), "the mount did not wait for the store");

        // The API answers, and another repository's sessions come and go.
        let (tx, rx) = mpsc::channel();
        let (d, session, src) = (&d, &session, &src);
        scope.spawn(move || {
            let listed = d.call("GET", "/sessions", None);
            let (st, other) = session("local", "loc/latest");
            let path = other["path"].as_str().map(str::to_string);
            let data = path.map(|p| std::fs::read(format!("{p}/src/data.bin")).unwrap());
            let (ended, _) = d.call(
                "DELETE",
                &format!("/sessions/{}", other["id"].as_str().unwrap_or("?")),
                None,
            );
            let _ = tx.send((listed, st, data, ended));
        });
        let answered = rx.recv_timeout(ANSWER_WITHIN);
        if answered.is_err() {
            // Let the held mount go, so the daemon can end.
            proxy.thaw();
            panic!("the daemon did not answer while a mount waited on its store");
        }
        let ((st, listed), created, data, ended) = answered.unwrap();
        assert_eq!(st, 200, "{listed}");
        assert_eq!(
            listed,
            json!([]),
            "a session whose mount is not made is listed"
        );
        assert_eq!(created, 201);
        assert!(
            data.as_deref() == Some(&std::fs::read(src.join("data.bin")).unwrap()[..]),
            "the local session's file differs from its source"
        );
        assert_eq!(ended, 200);

        // A second session of the held restore point waits for that mount.
        let second = scope.spawn(|| session("remote", &rp));
        thread::sleep(Duration::from_millis(500));
        assert!(!first.is_finished() && !second.is_finished());
        proxy.thaw();
        let (st1, s1) = first.join().unwrap();
        let (st2, s2) = second.join().unwrap();
        assert_eq!((st1, st2), (201, 201), "{s1}\n{s2}\n{}", d.log());
        assert_eq!(s1["path"], s2["path"], "one mount for both sessions");
        assert_eq!(s2["readers"]["sessions"], 2, "{s2}");
        let path = s1["path"].as_str().unwrap();
        assert!(
            std::fs::read(format!("{path}/src/data.bin")).unwrap()
                == std::fs::read(src.join("data.bin")).unwrap(),
            "the file read through the mount differs from its source"
        );
    });
}

/// Waits until the proxy holds a request: one counted on arrival that
/// has not finished (the log has finished exchanges only, and nothing
/// else is in flight once the store is frozen).
fn wait_for_held_request(proxy: &FaultProxy) -> bool {
    let until = std::time::Instant::now() + ANSWER_WITHIN;
    while std::time::Instant::now() < until {
        if proxy.requests() > proxy.log().len() as u64 {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}
