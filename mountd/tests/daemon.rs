//! End-to-end tests of `flr daemon`: the real binary, a real Unix socket,
//! real FUSE mounts. Each test starts its own daemon (own socket, mount
//! root and config) and stops it in a guard's Drop, unmounting anything
//! left even when the test fails.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mountd::client::{request, request_raw, Response};
use serde_json::{json, Value};

// The hostile restore points of the end-to-end tests (crate flr-e2e);
// the file needs only `std` and `vfs_core`, which this crate has.
#[path = "../../tests/src/hostile.rs"]
mod hostile;

fn flr() -> PathBuf {
    std::env::var_os("FLR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_flr")))
}

/// Size of the file the cancel test restores: big enough that the job is
/// still running when the cancel arrives.
const BIG: usize = 128 << 20;

/// A repository shared by all tests (built once per run): job `app` with
/// two restore points whose files differ, job `big` with one large file.
struct Fixture {
    repo: PathBuf,
    v1: PathBuf,
    v2: PathBuf,
    rp1: String,
    rp2: String,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("daemon-fixture");
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let repo = base.join("repo");
        run_ok(Command::new(flr()).arg("init").arg(&repo));
        let mut rps = Vec::new();
        for (v, seed) in [("v1", 1u64), ("v2", 2u64)] {
            let dir = base.join(v);
            std::fs::create_dir_all(dir.join("data/sub")).unwrap();
            std::fs::write(dir.join("app.db"), pseudo_random(3 << 20, seed)).unwrap();
            std::fs::write(dir.join("data/notes.txt"), format!("notes of {v}\n")).unwrap();
            std::fs::write(
                dir.join("data/sub/deep.db"),
                pseudo_random(100_000, seed + 10),
            )
            .unwrap();
            let out = run_ok(
                Command::new(flr())
                    .args(["backup", "--json", "--quiet", "--repo"])
                    .arg(&repo)
                    .args(["--job", "app"])
                    .arg(dir.join("app.db"))
                    .arg(dir.join("data")),
            );
            let v: Value = serde_json::from_str(&out).unwrap();
            rps.push(v["restore_point"].as_str().unwrap().to_string());
            // Restore point names have one-second resolution.
            std::thread::sleep(Duration::from_millis(1100));
        }
        let big = base.join("big");
        std::fs::create_dir_all(&big).unwrap();
        std::fs::write(big.join("huge.bin"), pseudo_random(BIG, 99)).unwrap();
        run_ok(
            Command::new(flr())
                .args(["backup", "--quiet", "--repo"])
                .arg(&repo)
                .args(["--job", "big", "--chunker", "fixed:64k"])
                .arg(big.join("huge.bin")),
        );
        std::fs::remove_file(big.join("huge.bin")).unwrap();
        Fixture {
            repo,
            v1: base.join("v1"),
            v2: base.join("v2"),
            rp1: rps[0].clone(),
            rp2: rps[1].clone(),
        }
    })
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run flr");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A daemon process with its own directory; stopped and cleaned up on drop.
struct Daemon {
    child: Option<Child>,
    dir: tempfile::TempDir,
    socket: PathBuf,
    root: PathBuf,
    restore: PathBuf,
    config: PathBuf,
}

impl Daemon {
    fn start(extra_settings: &str) -> Daemon {
        Daemon::start_with_repositories(extra_settings, &[])
    }

    /// Like [`Daemon::start`], with `repositories` (name, path) configured
    /// besides `main`, the shared fixture.
    fn start_with_repositories(extra_settings: &str, repositories: &[(&str, &Path)]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/mountd.sock");
        let root = dir.path().join("mnt");
        let restore = dir.path().join("restore");
        std::fs::create_dir_all(&restore).unwrap();
        let config = dir.path().join("daemon.toml");
        let state = dir.path().join("sessions");
        let cache = if extra_settings.contains("cache_size") {
            ""
        } else {
            "cache_size = \"64M\"\n"
        };
        std::fs::write(
            &config,
            format!(
                "[settings]\nmount_root = {root:?}\nsocket = {socket:?}\n{cache}restore_targets = [{restore:?}]\nstate_dir = {state:?}\n{extra_settings}\n\n[repositories.main]\npath = {:?}\n",
                fixture().repo
            ) + &repositories
                .iter()
                .map(|(name, path)| format!("\n[repositories.{name}]\npath = {path:?}\n"))
                .collect::<String>(),
        )
        .unwrap();
        let mut d = Daemon {
            child: None,
            dir,
            socket,
            root,
            restore,
            config,
        };
        d.spawn();
        d
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the daemon process and waits until it answers.
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new(flr())
            .arg("daemon")
            .arg("--config")
            .arg(&self.config)
            .env_remove("FLR_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < until {
            if mountd::client::is_running(&self.socket) {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited with {status}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("daemon did not answer: {}", self.log());
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// Waits for the daemon process to exit and returns whether it
    /// exited successfully.
    fn wait_exit(&mut self, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        let child = self.child.as_mut().unwrap();
        while Instant::now() < until {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("daemon did not exit in {limit:?}: {}", self.log());
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Response {
        request(&self.socket, method, path, body.as_ref()).unwrap()
    }

    fn session(&self, restore_point: &str) -> Value {
        let r = self.call(
            "POST",
            "/sessions",
            Some(json!({"repository": "main", "restore_point": restore_point})),
        );
        assert_eq!(r.status, 201, "{}", r.body);
        r.json()
    }

    /// Polls a job until it has finished.
    fn wait_job(&self, id: &str) -> Value {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let j = self
                .call("GET", &format!("/restore-jobs/{id}"), None)
                .json();
            if ["done", "failed", "cancelled"].contains(&j["state"].as_str().unwrap()) {
                return j;
            }
            assert!(Instant::now() < until, "job {id} did not finish: {j}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Mount points listed in /proc/mounts at or below `root`.
fn mounts_under(root: &Path) -> Vec<String> {
    let root = root.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .filter(|m| *m == root || m.starts_with(&format!("{root}/")))
        .map(str::to_string)
        .collect()
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let until = Instant::now() + Duration::from_secs(15);
            while Instant::now() < until && child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Whatever is still mounted (a failed test, kill -9) goes now.
        for m in mounts_under(&self.root).iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

fn assert_error(r: &Response, status: u16, needle: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    let msg = r.json()["error"].as_str().unwrap_or_default().to_string();
    assert!(
        msg.contains(needle),
        "expected {needle:?} in the error, got {:?}",
        r.body
    );
}

#[test]
fn socket_is_private_and_a_second_daemon_is_refused() {
    let d = Daemon::start("");
    let meta = std::fs::metadata(&d.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.uid(), std::fs::metadata("/proc/self").unwrap().uid());
    let out = Command::new(flr())
        .arg("daemon")
        .arg("--config")
        .arg(&d.config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already listening"), "{err}");
    // The first daemon is unharmed.
    assert_eq!(d.call("GET", "/health", None).status, 200);
    let doc = d.call("GET", "/openapi.json", None).json();
    assert_eq!(doc["openapi"], "3.0.3");
}

#[test]
fn two_clients_mount_different_restore_points_and_read_them() {
    let f = fixture();
    let d = Daemon::start("");
    let clients: Vec<_> = [(f.rp1.clone(), f.v1.clone()), (f.rp2.clone(), f.v2.clone())]
        .into_iter()
        .map(|(rp, src)| {
            let socket = d.socket.clone();
            std::thread::spawn(move || {
                let r = request(
                    &socket,
                    "POST",
                    "/sessions",
                    Some(&json!({"repository": "main", "restore_point": rp})),
                )
                .unwrap();
                assert_eq!(r.status, 201, "{}", r.body);
                let s = r.json();
                let path = PathBuf::from(s["path"].as_str().unwrap());
                for file in ["app.db", "data/notes.txt", "data/sub/deep.db"] {
                    assert_eq!(
                        std::fs::read(path.join(file)).unwrap(),
                        std::fs::read(src.join(file)).unwrap(),
                        "{file} of {rp}"
                    );
                }
                s
            })
        })
        .collect();
    let sessions: Vec<Value> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    assert_ne!(sessions[0]["path"], sessions[1]["path"]);
    assert_eq!(mounts_under(&d.root).len(), 2);

    // A third session on the first restore point shares its mount, and
    // an open file shows as a reader.
    let shared = d.session(&f.rp1);
    assert_eq!(shared["path"], sessions[0]["path"]);
    assert_eq!(shared["readers"]["sessions"], 2);
    let held =
        std::fs::File::open(Path::new(shared["path"].as_str().unwrap()).join("app.db")).unwrap();
    let s = d.call(
        "GET",
        &format!("/sessions/{}", shared["id"].as_str().unwrap()),
        None,
    );
    assert_eq!(s.json()["readers"]["open_files"], 1, "{}", s.body);
    drop(held);
    assert_eq!(mounts_under(&d.root).len(), 2);

    // Ending one of two sessions keeps the mount; ending the last unmounts.
    let end = |s: &Value| {
        let r = d.call(
            "DELETE",
            &format!("/sessions/{}", s["id"].as_str().unwrap()),
            None,
        );
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["unmounted"].as_bool().unwrap()
    };
    assert!(!end(&shared));
    assert!(end(&sessions[0]));
    assert!(end(&sessions[1]));
    assert!(mounts_under(&d.root).is_empty());
    let metrics = d.call("GET", "/metrics", None).body;
    assert!(metrics.contains("flr_sessions_active 0"), "{metrics}");
    assert!(metrics.contains("flr_read_latency_seconds_bucket{le=\"+Inf\"}"));
    assert!(!metrics.contains("flr_bytes_served_total 0\n"), "{metrics}");
}

#[test]
fn a_writable_session_takes_writes_commits_and_discards() {
    let f = fixture();
    let d = Daemon::start("");
    let r = d.call(
        "POST",
        "/sessions",
        Some(json!({"repository": "main", "restore_point": f.rp1, "writable": true})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let s = r.json();
    assert_eq!(s["writable"], true);
    let id = s["id"].as_str().unwrap().to_string();
    let path = PathBuf::from(s["path"].as_str().unwrap());
    // Its own mount, next to where a read-only one would be.
    let ro = d.session(&f.rp1);
    assert_ne!(ro["path"], s["path"]);
    std::fs::write(path.join("data/notes.txt"), b"changed in the session\n").unwrap();
    std::fs::write(path.join("new.txt"), b"new file\n").unwrap();
    let ro_path = PathBuf::from(ro["path"].as_str().unwrap());
    assert_eq!(
        std::fs::read(ro_path.join("data/notes.txt")).unwrap(),
        std::fs::read(f.v1.join("data/notes.txt")).unwrap(),
        "the read-only mount of the same restore point must not change"
    );
    let session_dir = d.dir.path().join("sessions").join(&id);
    assert!(session_dir.join("session.json").is_file());

    // A read-only session has nothing to commit; a bad job name is refused.
    let ro_id = ro["id"].as_str().unwrap();
    let c = d.call(
        "POST",
        &format!("/sessions/{ro_id}/commit"),
        Some(json!({"job": "x"})),
    );
    assert_error(&c, 409, "read-only");
    let c = d.call(
        "POST",
        &format!("/sessions/{id}/commit"),
        Some(json!({"job": "../x"})),
    );
    assert_error(&c, 400, "invalid job name");

    let c = d.call(
        "POST",
        &format!("/sessions/{id}/commit"),
        Some(json!({"job": "edited"})),
    );
    assert_eq!(c.status, 200, "{}", c.body);
    let committed = c.json()["restore_point"].as_str().unwrap().to_string();
    assert!(committed.starts_with("edited/"), "{committed}");
    let new = d.session(&committed);
    let new_path = PathBuf::from(new["path"].as_str().unwrap());
    assert_eq!(
        std::fs::read(new_path.join("data/notes.txt")).unwrap(),
        b"changed in the session\n"
    );
    assert_eq!(
        std::fs::read(new_path.join("app.db")).unwrap(),
        std::fs::read(f.v1.join("app.db")).unwrap()
    );

    // Ending the writable session discards its changes.
    let r = d.call("DELETE", &format!("/sessions/{id}"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!session_dir.exists(), "session directory left behind");
    assert!(!path.exists(), "mount directory left behind");
    for s in [&ro, &new] {
        let r = d.call(
            "DELETE",
            &format!("/sessions/{}", s["id"].as_str().unwrap()),
            None,
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert!(mounts_under(&d.root).is_empty());
}

/// `nfs://ADDR//PATH` for libnfs's tools, NFS and MOUNT on one port
/// (libnfs mounts the URL's path up to its last '/': the second slash
/// makes that `/` for a file in the root).
fn nfs_url(addr: &str, path: &str) -> String {
    let (host, port) = addr.rsplit_once(':').unwrap();
    format!("nfs://{host}//{path}?version=3&nfsport={port}&mountport={port}")
}

/// `nfs-cat` of a URL: its bytes, or `None` if it failed.
fn nfs_cat(url: &str) -> Option<Vec<u8>> {
    let out = Command::new("nfs-cat")
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .expect("run nfs-cat (Debian libnfs-utils)");
    out.status.success().then_some(out.stdout)
}

#[test]
fn sessions_are_published_over_nfs_until_they_end() {
    let f = fixture();
    let d = Daemon::start("");
    let tmp = tempfile::tempdir().unwrap();

    // A read-only session, exported on a free loopback port.
    let r = d.call(
        "POST",
        "/sessions",
        Some(json!({"repository": "main", "restore_point": f.rp1,
                    "export": {"nfs": "127.0.0.1:0"}})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let ro = r.json();
    let ro_addr = ro["export"]["nfs"]
        .as_str()
        .expect("export.nfs")
        .to_string();
    assert!(
        ro_addr.starts_with("127.0.0.1:") && !ro_addr.ends_with(":0"),
        "{ro}"
    );
    assert_eq!(
        nfs_cat(&nfs_url(&ro_addr, "app.db")).expect("nfs-cat app.db"),
        std::fs::read(f.v1.join("app.db")).unwrap()
    );
    assert_eq!(
        nfs_cat(&nfs_url(&ro_addr, "data/notes.txt")).unwrap(),
        b"notes of v1\n"
    );
    let listed = d.call("GET", "/sessions", None).json();
    assert_eq!(listed[0]["export"]["nfs"], ro_addr.as_str(), "{listed}");

    // A writable session over NFS: a file copied in is in the commit.
    let r = d.call(
        "POST",
        "/sessions",
        Some(
            json!({"repository": "main", "restore_point": f.rp1, "writable": true,
                    "export": {"nfs": "127.0.0.1:0"}}),
        ),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let rw = r.json();
    let rw_id = rw["id"].as_str().unwrap().to_string();
    let rw_addr = rw["export"]["nfs"].as_str().unwrap().to_string();
    let local = tmp.path().join("from-nfs.txt");
    std::fs::write(&local, b"arrived over NFS\n").unwrap();
    let cp = Command::new("nfs-cp")
        .arg(&local)
        .arg(nfs_url(&rw_addr, "data/from-nfs.txt"))
        .output()
        .expect("run nfs-cp");
    assert!(
        cp.status.success(),
        "{}",
        String::from_utf8_lossy(&cp.stderr)
    );
    // The read-only export of the same restore point refuses the write.
    let cp = Command::new("nfs-cp")
        .arg(&local)
        .arg(nfs_url(&ro_addr, "data/from-nfs.txt"))
        .output()
        .expect("run nfs-cp");
    assert!(!cp.status.success(), "a read-only export took a write");
    let c = d.call(
        "POST",
        &format!("/sessions/{rw_id}/commit"),
        Some(json!({"job": "via-nfs"})),
    );
    assert_eq!(c.status, 200, "{}", c.body);
    let committed = c.json()["restore_point"].as_str().unwrap().to_string();
    let new = d.session(&committed);
    assert_eq!(
        std::fs::read(PathBuf::from(new["path"].as_str().unwrap()).join("data/from-nfs.txt"))
            .unwrap(),
        b"arrived over NFS\n"
    );

    // Bad export requests are refused and leave nothing mounted.
    let before = mounts_under(&d.root).len();
    for (body, status, needle) in [
        (json!({"nfs": "nonsense"}), 400, "ADDR:PORT"),
        (json!({"nfs": "0.0.0.0:0"}), 403, "nfs_allow"),
        (json!({"nfs": ro_addr.clone()}), 409, "cannot serve NFS"),
        (
            json!({"nfs": "127.0.0.1:0", "smb": 1}),
            400,
            "unknown field",
        ),
    ] {
        let r = d.call(
            "POST",
            "/sessions",
            Some(json!({"repository": "main", "restore_point": f.rp2, "export": body})),
        );
        assert_error(&r, status, needle);
    }
    assert_eq!(
        mounts_under(&d.root).len(),
        before,
        "a refused export left a mount"
    );

    // Ending a session stops its export.
    for s in [&ro, &rw, &new] {
        let r = d.call(
            "DELETE",
            &format!("/sessions/{}", s["id"].as_str().unwrap()),
            None,
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert!(
        nfs_cat(&nfs_url(&ro_addr, "app.db")).is_none(),
        "the export still serves after its session ended"
    );
    assert!(mounts_under(&d.root).is_empty());
}

/// The value of an unlabelled metric in `/metrics` text.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn twenty_mounts_share_the_daemons_one_cache_bound() {
    // 20 restore points (one per job) of 1.5 MiB of incompressible data
    // each: 30 MiB read through 20 mounts, against a 4 MiB cache.
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    run_ok(Command::new(flr()).arg("init").arg(&repo));
    let mut sources = Vec::new();
    for n in 0..20u64 {
        let dir = tmp.path().join(format!("src{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("data.bin"), pseudo_random(3 << 19, 1000 + n)).unwrap();
        run_ok(
            Command::new(flr())
                .args(["backup", "--quiet", "--repo"])
                .arg(&repo)
                .args(["--job", &format!("j{n}")])
                .arg(dir.join("data.bin")),
        );
        sources.push(dir.join("data.bin"));
    }
    let d = Daemon::start_with_repositories("cache_size = \"4M\"", &[("many", &repo)]);
    let mut paths = Vec::new();
    for n in 0..20 {
        let r = d.call(
            "POST",
            "/sessions",
            Some(json!({"repository": "many", "job": format!("j{n}")})),
        );
        assert_eq!(r.status, 201, "{}", r.body);
        paths.push(PathBuf::from(r.json()["path"].as_str().unwrap()));
    }
    let distinct: std::collections::BTreeSet<_> = paths.iter().collect();
    assert_eq!(distinct.len(), 20, "20 restore points, 20 mounts");
    // Every mount reads its file whole, twice, while the others hold
    // theirs open: all through the one cache.
    let open: Vec<std::fs::File> = paths
        .iter()
        .map(|p| std::fs::File::open(p.join("data.bin")).unwrap())
        .collect();
    for _ in 0..2 {
        for (p, src) in paths.iter().zip(&sources) {
            assert!(
                std::fs::read(p.join("data.bin")).unwrap() == std::fs::read(src).unwrap(),
                "{} differs from its source",
                p.display()
            );
        }
    }
    let m = d.call("GET", "/metrics", None).body;
    assert_eq!(metric(&m, "flr_mounts_active"), 20, "{m}");
    let capacity = metric(&m, "flr_cache_capacity_bytes");
    assert!(capacity <= 4 << 20 && capacity > 3 << 20, "{m}");
    let resident = metric(&m, "flr_cache_resident_bytes");
    assert!(
        resident <= capacity,
        "the cache holds {resident} bytes, above its bound {capacity}"
    );
    assert!(
        metric(&m, "flr_cache_evictions_total") > 0,
        "30 MiB passed a 4 MiB cache: {m}"
    );
    assert!(metric(&m, "flr_cache_misses_total") > 0, "{m}");
    drop(open);
}

#[test]
fn restore_jobs_write_files_equal_to_the_source_and_never_overwrite_unasked() {
    let f = fixture();
    let d = Daemon::start("");
    let target = d.restore.join("out");
    let job = |overwrite: bool| {
        let r = d.call(
            "POST",
            "/restore-jobs",
            Some(json!({
                "repository": "main", "restore_point": f.rp2,
                "paths": ["*.db", "data/**/*.db"], "target": target, "overwrite": overwrite,
            })),
        );
        assert_eq!(r.status, 202, "{}", r.body);
        d.wait_job(r.json()["id"].as_str().unwrap())
    };
    let j = job(false);
    assert_eq!(j["state"], "done", "{j}");
    assert_eq!(j["files_done"], 2);
    assert_eq!(j["bytes_done"], j["bytes_total"]);
    for file in ["app.db", "data/sub/deep.db"] {
        assert_eq!(
            std::fs::read(target.join(file)).unwrap(),
            std::fs::read(f.v2.join(file)).unwrap()
        );
    }
    assert!(!target.join("data/notes.txt").exists());

    // Existing files stay as they are unless overwrite is asked for.
    std::fs::write(target.join("app.db"), b"local change").unwrap();
    let j = job(false);
    assert_eq!(j["state"], "failed");
    assert!(j["error"].as_str().unwrap().contains("overwrite"), "{j}");
    assert_eq!(
        std::fs::read(target.join("app.db")).unwrap(),
        b"local change"
    );
    let j = job(true);
    assert_eq!(j["state"], "done", "{j}");
    assert_eq!(
        std::fs::read(target.join("app.db")).unwrap(),
        std::fs::read(f.v2.join("app.db")).unwrap()
    );
}

#[test]
fn a_cancelled_job_leaves_no_partial_files() {
    let d = Daemon::start("");
    let target = d.restore.join("cancelled");
    let r = d.call(
        "POST",
        "/restore-jobs",
        Some(json!({"repository": "main", "restore_point": "big/latest", "target": target})),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_string();
    // Cancel once it is writing.
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let j = d.call("GET", &format!("/restore-jobs/{id}"), None).json();
        if j["state"] == "running" && j["bytes_done"].as_u64().unwrap() > 0 {
            break;
        }
        assert!(j["state"] == "queued" || j["state"] == "running", "{j}");
        assert!(Instant::now() < until, "job never ran: {j}");
        std::thread::sleep(Duration::from_millis(2));
    }
    let r = d.call("POST", &format!("/restore-jobs/{id}/cancel"), None);
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json()["cancel_requested"], true);
    let j = d.wait_job(&id);
    assert_eq!(j["state"], "cancelled", "{j}");
    assert!(j["bytes_done"].as_u64().unwrap() < BIG as u64);
    let left: Vec<_> = std::fs::read_dir(&target)
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
    // A finished job cannot be cancelled again.
    assert_error(
        &d.call("DELETE", &format!("/restore-jobs/{id}"), None),
        409,
        "already finished",
    );
    let metrics = d.call("GET", "/metrics", None).body;
    assert!(
        metrics.contains("flr_restore_jobs{state=\"cancelled\"} 1"),
        "{metrics}"
    );
}

#[test]
fn sigterm_unmounts_everything() {
    let f = fixture();
    let mut d = Daemon::start("");
    d.session(&f.rp1);
    d.session(&f.rp2);
    assert_eq!(mounts_under(&d.root).len(), 2);
    d.signal("TERM");
    assert!(d.wait_exit(Duration::from_secs(20)), "{}", d.log());
    assert!(mounts_under(&d.root).is_empty(), "{}", d.log());
    assert!(!d.socket.exists());
    assert!(
        d.log().contains("stopped: 2 mount(s) unmounted"),
        "{}",
        d.log()
    );
}

#[test]
fn kill_9_then_restart_clears_stale_mounts() {
    let f = fixture();
    let mut d = Daemon::start("");
    let s = d.session(&f.rp1);
    let path = s["path"].as_str().unwrap().to_string();
    d.signal("KILL");
    assert!(!d.wait_exit(Duration::from_secs(10)));
    assert_eq!(mounts_under(&d.root), std::slice::from_ref(&path));
    d.spawn();
    let health = d.call("GET", "/health", None).json();
    assert_eq!(health["stale_mounts_cleared"], json!([path]), "{health}");
    assert!(d.log().contains(&format!("cleared stale mount {path}")));
    assert!(mounts_under(&d.root).is_empty());
    // The same restore point mounts again at the same place.
    let again = d.session(&f.rp1);
    assert_eq!(again["path"].as_str().unwrap(), path);
    assert!(std::fs::read(Path::new(&path).join("app.db")).is_ok());
}

#[test]
fn sessions_expire() {
    let f = fixture();
    let d = Daemon::start("");
    let r = d.call(
        "POST",
        "/sessions",
        Some(json!({"repository": "main", "job": "app", "expires_in_secs": 1})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["restore_point"], f.rp2.as_str());
    assert!(r.json()["expires_at"].is_u64());
    let until = Instant::now() + Duration::from_secs(10);
    while !mounts_under(&d.root).is_empty() {
        assert!(Instant::now() < until, "session did not expire");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(d.call("GET", "/sessions", None).json(), json!([]));
    assert!(d.log().contains("(expired)"));
}

#[test]
fn bad_input_gets_a_clear_answer_and_harms_nothing() {
    let f = fixture();
    let d = Daemon::start("");
    let post = |path: &str, body: &str| request_raw(&d.socket, "POST", path, Some(body)).unwrap();
    assert_error(&post("/sessions", "{\"repository\": "), 400, "parse");
    assert_error(
        &post(
            "/sessions",
            r#"{"repository": "main", "job": "app", "colour": "red"}"#,
        ),
        400,
        "unknown field `colour`",
    );
    assert_error(
        &post("/sessions", r#"{"repository": 7}"#),
        400,
        "invalid type",
    );
    assert_error(
        &post("/sessions", r#"{"repository": "main"}"#),
        400,
        "exactly one of",
    );
    assert_error(
        &post("/sessions", r#"{"repository": "nope", "job": "app"}"#),
        404,
        "unknown repository \"nope\"",
    );
    assert_error(
        &post(
            "/sessions",
            r#"{"repository": "main", "restore_point": "app/2001-01-01T00-00-00Z"}"#,
        ),
        404,
        "app/2001-01-01T00-00-00Z",
    );
    assert_error(
        &post("/sessions", r#"{"repository": "main", "job": "nojob"}"#),
        404,
        "nojob",
    );
    assert_error(
        &post(
            "/sessions",
            r#"{"repository": "main", "restore_point": "../../etc"}"#,
        ),
        400,
        "invalid job name",
    );
    assert_error(
        &d.call("GET", "/sessions/s-999", None),
        404,
        "unknown session",
    );
    assert_error(
        &d.call("DELETE", "/sessions/s-999", None),
        404,
        "unknown session",
    );
    assert_error(
        &d.call("GET", "/restore-jobs/j-999", None),
        404,
        "unknown restore job",
    );
    assert_error(
        &d.call("GET", "/repositories/nope/restore-points", None),
        404,
        "unknown repository",
    );
    let job = |target: &str, extra: Value| {
        let mut body = json!({"repository": "main", "restore_point": f.rp1, "target": target});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        d.call("POST", "/restore-jobs", Some(body))
    };
    assert_error(
        &job("/etc/flr-test", json!({})),
        403,
        "outside the directories",
    );
    let inside_root = d.root.join("x");
    assert_error(
        &job(inside_root.to_str().unwrap(), json!({})),
        403,
        "inside the mount root",
    );
    assert_error(&job("relative/dir", json!({})), 400, "absolute");
    let sneaky = format!("{}/../../etc", d.restore.display());
    assert_error(&job(&sneaky, json!({})), 400, "'..'");
    assert_error(
        &job(
            d.restore.to_str().unwrap(),
            json!({"paths": ["nothing/*.xyz"]}),
        ),
        404,
        "matches",
    );
    assert_error(
        &job(
            d.restore.to_str().unwrap(),
            json!({"paths": ["missing.db"]}),
        ),
        404,
        "missing.db",
    );
    let r = request_raw(&d.socket, "POST", "/sessions", None).unwrap();
    assert_eq!(r.status, 415, "{}", r.body);
    assert_error(
        &d.call("GET", "/no/such/thing", None),
        404,
        "no such endpoint",
    );
    assert_error(&d.call("PUT", "/sessions", None), 405, "not allowed");

    // A client that goes away mid-request leaves nothing behind.
    for _ in 0..5 {
        let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
        s.write_all(
            b"POST /sessions HTTP/1.1\r\nHost: flr\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n{\"repository\": \"main\",",
        )
        .unwrap();
        drop(s);
    }
    // And one that leaves right after a full request to mount.
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    let body = json!({"repository": "main", "restore_point": f.rp1}).to_string();
    write!(
        s,
        "POST /sessions HTTP/1.1\r\nHost: flr\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    drop(s);
    std::thread::sleep(Duration::from_millis(500));
    let health = d.call("GET", "/health", None).json();
    assert_eq!(health["status"], "ok");
    // Either the mount finished and was dropped with the request, or the
    // session exists and is listed: never an unlisted mount.
    let listed = d.call("GET", "/sessions", None).json();
    assert_eq!(
        mounts_under(&d.root).len(),
        listed.as_array().unwrap().len(),
        "{listed}"
    );
    assert!(listed.as_array().unwrap().len() <= 1);
}

#[test]
fn the_command_line_uses_the_daemon_and_says_when_none_runs() {
    let f = fixture();
    let d = Daemon::start("");
    let cli = |args: &[&str]| {
        Command::new(flr())
            .args(args)
            .env("FLR_SOCKET", &d.socket)
            .output()
            .unwrap()
    };
    let out = cli(&["mount", "--repo", f.repo.to_str().unwrap(), "--job", "app"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(path.ends_with(&f.rp2), "{path}");
    assert!(Path::new(&path).join("app.db").exists());
    let out = cli(&["mounts"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&path));
    let out = cli(&["status"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 sessions on 1 mounts"));
    let out = cli(&["unmount", &path]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(mounts_under(&d.root).is_empty());

    let none = d.dir.path().join("none.sock");
    for args in [&["status"][..], &["mounts"], &["unmount", "s-1"]] {
        let out = Command::new(flr())
            .args(args)
            .arg("--socket")
            .arg(&none)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no flr daemon is running"), "{args:?}: {err}");
    }
}

/// Free TCP port on loopback for the schemathesis listener.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn the_api_matches_its_openapi_document() {
    let port = free_port();
    let token = "test-token-0123456789";
    let d = Daemon::start(&format!(
        "tcp_listen = \"127.0.0.1:{port}\"\ntcp_token = \"{token}\""
    ));
    // The TCP listener refuses requests without the token.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");

    let st = Command::new("schemathesis").arg("--version").output();
    assert!(
        st.is_ok_and(|o| o.status.success()),
        "schemathesis is not installed: run scripts/setup.sh (pip install schemathesis)"
    );
    let out = Command::new("timeout")
        .args(["120", "schemathesis", "run"])
        .arg(format!("http://127.0.0.1:{port}/openapi.json"))
        .args(["--url", &format!("http://127.0.0.1:{port}")])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args([
            "--checks",
            "all",
            "--max-examples",
            "10",
            "--max-time",
            "60",
        ])
        .current_dir(d.dir.path())
        .output()
        .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
    // Nothing it sent left a mount behind that no session lists.
    let listed = d.call("GET", "/sessions", None).json();
    assert_eq!(
        mounts_under(&d.root).len(),
        listed.as_array().unwrap().len()
    );
}

/// Restore points whose manifests would lead a restore outside its target
/// are refused by restore jobs (with and without overwrite) and served by
/// no session's mount; the decoy beside the targets stays empty.
#[test]
fn hostile_restore_points_are_refused_by_jobs_and_mounts() {
    let repo_dir = tempfile::tempdir().unwrap();
    let repo = repo_dir.path().join("repo");
    run_ok(Command::new(flr()).arg("init").arg(&repo));
    let d = Daemon::start_with_repositories("", &[("hostile", &repo)]);
    // The daemon reads manifests when asked, so they can be written now,
    // aimed at a sibling of the targets inside the allowed directory.
    let outside = d.restore.join("outside");
    std::fs::create_dir(&outside).unwrap();
    let assert_untouched = |after: &str| {
        let left: Vec<_> = std::fs::read_dir(&outside)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "after {after}: the decoy holds {left:?}");
    };
    for case in hostile::hostile_cases(&outside) {
        let rp = hostile::write_restore_point(&repo, case.job, case.nodes);
        let target = d.restore.join(format!("target-{}", case.job));
        for overwrite in [false, true] {
            let r = d.call(
                "POST",
                "/restore-jobs",
                Some(json!({
                    "repository": "hostile", "restore_point": rp,
                    "target": target, "overwrite": overwrite,
                })),
            );
            // Refused up front, or accepted and failed: never done.
            let error = if r.status == 202 {
                let j = d.wait_job(r.json()["id"].as_str().unwrap());
                assert_eq!(j["state"], "failed", "{rp}: {j}");
                j["error"].as_str().unwrap_or_default().to_string()
            } else {
                assert!(r.status >= 400, "{rp}: {}", r.body);
                r.json()["error"].as_str().unwrap_or_default().to_string()
            };
            assert!(
                error.contains(&format!("restore point {rp}")) && error.contains(&case.refusal),
                "{rp}: expected {:?} in {error:?}",
                case.refusal
            );
            assert_untouched(&format!("a restore job of {rp}"));
            assert!(!target.exists(), "{rp}: the job created its target");
        }

        let r = d.call(
            "POST",
            "/sessions",
            Some(json!({"repository": "hostile", "restore_point": rp})),
        );
        if r.status == 201 {
            let s = r.json();
            let path = PathBuf::from(s["path"].as_str().unwrap());
            let listed = std::fs::read_dir(&path).and_then(|rd| rd.collect::<Result<Vec<_>, _>>());
            match listed {
                Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{rp}: {e}"),
                Ok(entries) => panic!("{rp} was served: {entries:?}"),
            }
            for name in ["x", "d", "f", "x/f"] {
                let meta = std::fs::symlink_metadata(path.join(name));
                assert!(meta.is_err(), "{rp}: {name} was served: {meta:?}");
            }
            let end = d.call(
                "DELETE",
                &format!("/sessions/{}", s["id"].as_str().unwrap()),
                None,
            );
            assert_eq!(end.status, 200, "{}", end.body);
        } else {
            assert!(r.status >= 400, "{rp}: {}", r.body);
            let error = r.json()["error"].as_str().unwrap_or_default().to_string();
            assert!(error.contains(&case.refusal), "{rp}: {error:?}");
        }
        assert_untouched(&format!("a session of {rp}"));
    }
    assert!(mounts_under(&d.root).is_empty());
}

#[test]
fn log_json_writes_one_json_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("d.sock");
    let config = dir.path().join("daemon.toml");
    std::fs::write(
        &config,
        format!(
            "[settings]\nmount_root = {:?}\nsocket = {socket:?}\n",
            dir.path().join("mnt")
        ),
    )
    .unwrap();
    let log = dir.path().join("log");
    let mut child = Command::new(flr())
        .args(["daemon", "--log-json", "--config"])
        .arg(&config)
        .env_remove("FLR_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    while !mountd::client::is_running(&socket) {
        assert!(Instant::now() < until, "daemon did not answer");
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(st.success());
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 3, "{text}");
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"));
        assert_eq!(v["target"], "flr::daemon", "{line}");
        assert!(v["fields"]["message"].is_string(), "{line}");
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
    }
    assert!(text.contains("listening on"), "{text}");
}

/// Polls a device job until it has finished.
fn wait_devices(d: &Daemon, id: &str) -> Value {
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let j = d.call("GET", &format!("/devices/{id}"), None).json();
        if j["state"] != "running" {
            return j;
        }
        assert!(
            Instant::now() < until,
            "device job {id} did not finish: {j}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn devices_through_the_api_take_concurrent_writers_and_commit_a_restore_point_per_database() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    run_ok(Command::new(flr()).arg("init").arg(&repo));
    let devices_dir = tmp.path().join("devices");
    let d = Daemon::start_with_repositories(
        &format!("devices_dir = {devices_dir:?}"),
        &[("ingest", &repo)],
    );
    let r = d.call(
        "POST",
        "/devices",
        Some(json!({"repository": "ingest", "databases": ["a", "b"], "streams": 2})),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let job = r.json();
    let id = job["id"].as_str().unwrap().to_string();
    let mut writers = Vec::new();
    let mut sources = Vec::new();
    for db in job["databases"].as_array().unwrap() {
        assert_eq!(db["state"], "running");
        for dev in db["devices"].as_array().unwrap() {
            assert_eq!(dev["state"], "waiting");
            let path = PathBuf::from(dev["path"].as_str().unwrap());
            assert!(path.starts_with(&devices_dir), "{}", path.display());
            let m = std::fs::symlink_metadata(&path).unwrap();
            // Owned by the caller (this test, through the socket's peer).
            assert_eq!(m.mode() & 0o7777, 0o600);
            assert_eq!(m.uid(), std::fs::metadata("/proc/self").unwrap().uid());
            let name = format!("{}-{}", db["name"].as_str().unwrap(), dev["stream"]);
            let src = tmp.path().join(&name);
            let seed = sources.len() as u64 + 40;
            std::fs::write(&src, pseudo_random((2 << 20) + seed as usize * 1000, seed)).unwrap();
            writers.push(
                Command::new("dd")
                    .arg(format!("if={}", src.display()))
                    .arg(format!("of={}", path.display()))
                    .args(["bs=64k", "status=none"])
                    .spawn()
                    .unwrap(),
            );
            sources.push((
                db["name"].as_str().unwrap().to_string(),
                dev["stream"].as_u64().unwrap(),
                src,
            ));
        }
    }
    for mut w in writers {
        assert!(w.wait().unwrap().success());
    }
    let done = wait_devices(&d, &id);
    assert_eq!(done["state"], "done", "{done}");
    for db in done["databases"].as_array().unwrap() {
        let name = db["name"].as_str().unwrap();
        let rp = db["restore_point"].as_str().unwrap();
        assert!(rp.starts_with(&format!("{name}/")), "{rp}");
        let out = tmp.path().join(format!("out-{name}"));
        run_ok(
            Command::new(flr())
                .args(["restore", "--quiet", "--repo"])
                .arg(&repo)
                .arg(rp)
                .arg("--to")
                .arg(&out),
        );
        for (_, i, src) in sources.iter().filter(|s| s.0 == name) {
            assert!(
                std::fs::read(out.join(format!("stream-{i}"))).unwrap()
                    == std::fs::read(src).unwrap(),
                "{name} stream {i} differs"
            );
        }
        for dev in db["devices"].as_array().unwrap() {
            assert_eq!(dev["state"], "ended");
            assert!(!Path::new(dev["path"].as_str().unwrap()).exists());
        }
    }
    assert!(
        d.call("GET", "/devices", None)
            .json()
            .as_array()
            .unwrap()
            .len()
            == 1
    );

    // Nobody writes: the timeout fails the database, and says so.
    let r = d.call(
        "POST",
        "/devices",
        Some(json!({"repository": "ingest", "databases": ["idle"], "timeout_secs": 1, "owner": "nobody"})),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let job = r.json();
    let path = job["databases"][0]["devices"][0]["path"]
        .as_str()
        .unwrap()
        .to_string();
    let nobody = Command::new("id").args(["-u", "nobody"]).output().unwrap();
    let nobody: u32 = String::from_utf8(nobody.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().uid(), nobody);
    let failed = wait_devices(&d, job["id"].as_str().unwrap());
    assert_eq!(failed["state"], "failed", "{failed}");
    let err = failed["databases"][0]["error"].as_str().unwrap();
    assert!(err.contains("nobody wrote to it within 1 s"), "{err}");
    assert_eq!(failed["databases"][0]["devices"][0]["state"], "failed");

    // Cancelled while waiting: nothing committed, pipes gone.
    let r = d.call(
        "POST",
        "/devices",
        Some(json!({"repository": "ingest", "databases": ["later"], "format": "tar"})),
    );
    let job = r.json();
    let id = job["id"].as_str().unwrap();
    let path = job["databases"][0]["devices"][0]["path"]
        .as_str()
        .unwrap()
        .to_string();
    let r = d.call("POST", &format!("/devices/{id}/cancel"), None);
    assert_eq!(r.status, 202, "{}", r.body);
    let cancelled = wait_devices(&d, id);
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    assert!(cancelled["databases"][0]["restore_point"].is_null());
    assert!(!Path::new(&path).exists());
    let listed = run_ok(
        Command::new(flr())
            .args(["restore-points", "--json", "--repo"])
            .arg(&repo),
    );
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");

    // Bad requests are refused with a reason.
    for (body, status, needle) in [
        (
            json!({"repository": "nope", "databases": ["a"]}),
            404,
            "unknown repository",
        ),
        (
            json!({"repository": "ingest", "databases": ["a"], "streams": 0}),
            400,
            "streams",
        ),
        (
            json!({"repository": "ingest", "databases": ["../x"]}),
            400,
            "job name",
        ),
        (
            json!({"repository": "ingest", "databases": []}),
            400,
            "at least one",
        ),
        (
            json!({"repository": "ingest", "databases": ["a", "a"]}),
            400,
            "twice",
        ),
        (
            json!({"repository": "ingest", "databases": ["a"], "format": "zip"}),
            400,
            "raw or tar",
        ),
        (
            json!({"repository": "ingest", "databases": ["a"], "owner": "no-such-user-x"}),
            404,
            "no user",
        ),
    ] {
        let r = d.call("POST", "/devices", Some(body.clone()));
        assert_error(&r, status, needle);
    }
    assert_error(
        &d.call("GET", "/devices/d-999", None),
        404,
        "unknown device job",
    );
}

/// Polls a copy job until it has finished.
fn wait_copy(d: &Daemon, id: &str) -> Value {
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let j = d.call("GET", &format!("/copies/{id}"), None).json();
        if ["done", "failed", "cancelled"].contains(&j["state"].as_str().unwrap()) {
            return j;
        }
        assert!(Instant::now() < until, "copy job {id} did not finish: {j}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn copy_jobs_copy_restore_points_to_another_repository_and_stop_when_cancelled() {
    let f = fixture();
    let archive_dir = tempfile::tempdir().unwrap();
    let archive = archive_dir.path().join("archive");
    run_ok(Command::new(flr()).arg("init").arg(&archive));
    let d = Daemon::start_with_repositories("", &[("archive", &archive)]);
    let copy = |body: Value| {
        let r = d.call("POST", "/copies", Some(body));
        assert_eq!(r.status, 202, "{}", r.body);
        r.json()["id"].as_str().unwrap().to_string()
    };

    let id = copy(json!({"from": "main", "to": "archive", "job": "app"}));
    let j = wait_copy(&d, &id);
    assert_eq!(j["state"], "done", "{j}");
    assert_eq!(j["restore_points"], json!([f.rp1, f.rp2]), "{j}");
    assert_eq!(j["bytes_done"], j["bytes_total"], "{j}");
    assert!(j["uploaded_bytes"].as_u64().unwrap() > 0, "{j}");
    for r in j["done"].as_array().unwrap() {
        assert_eq!(r["copied"], true, "{j}");
        assert!(r["verified_chunks"].as_u64().unwrap() > 0, "{j}");
    }
    // The copy restores like the original, through the archive.
    let target = d.restore.join("from-archive");
    let r = d.call(
        "POST",
        "/restore-jobs",
        Some(json!({"repository": "archive", "restore_point": f.rp2, "target": target})),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let rj = d.wait_job(r.json()["id"].as_str().unwrap());
    assert_eq!(rj["state"], "done", "{rj}");
    for file in ["app.db", "data/sub/deep.db", "data/notes.txt"] {
        assert_eq!(
            std::fs::read(target.join(file)).unwrap(),
            std::fs::read(f.v2.join(file)).unwrap(),
            "{file}"
        );
    }
    // Again: nothing to send.
    let j = wait_copy(
        &d,
        &copy(json!({"from": "main", "to": "archive", "job": "app"})),
    );
    assert_eq!(j["state"], "done", "{j}");
    assert_eq!(j["uploaded_bytes"], 0, "{j}");

    // Cancelled while sending: no restore point of the job appears.
    let id = copy(json!({"from": "main", "to": "archive", "restore_points": ["big"]}));
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let j = d.call("GET", &format!("/copies/{id}"), None).json();
        if j["state"] == "running" && j["bytes_done"].as_u64().unwrap() > 0 {
            break;
        }
        assert!(j["state"] == "queued" || j["state"] == "running", "{j}");
        assert!(Instant::now() < until, "copy job never ran: {j}");
        std::thread::sleep(Duration::from_millis(2));
    }
    let r = d.call("DELETE", &format!("/copies/{id}"), None);
    assert_eq!(r.status, 202, "{}", r.body);
    let j = wait_copy(&d, &id);
    assert_eq!(j["state"], "cancelled", "{j}");
    let listed = d
        .call("GET", "/repositories/archive/restore-points", None)
        .body;
    assert!(!listed.contains("big/"), "{listed}");
    assert_error(
        &d.call("DELETE", &format!("/copies/{id}"), None),
        409,
        "already finished",
    );

    // Requests that cannot work are refused up front.
    assert_error(
        &d.call(
            "POST",
            "/copies",
            Some(json!({"from": "main", "to": "main"})),
        ),
        400,
        "two repositories",
    );
    assert_error(
        &d.call(
            "POST",
            "/copies",
            Some(json!({"from": "main", "to": "nowhere"})),
        ),
        404,
        "unknown repository",
    );
    assert_error(
        &d.call(
            "POST",
            "/copies",
            Some(json!({"from": "main", "to": "archive", "restore_points": ["app/1999-01-01T00-00-00Z"]})),
        ),
        404,
        "restore point",
    );
}
