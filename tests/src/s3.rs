//! A real S3 server for the tests: `s3s-fs` (a file-backed S3
//! implementation) on a free loopback port, stopped on drop, and a
//! repository on it.
//!
//! `s3s-fs` 0.14.1 is installed by scripts/setup.sh into
//! `/var/cache/flr-tools/s3s-fs-0.14.1` (or found through `FLR_S3S_FS`,
//! else on PATH). It honours `If-None-Match: *` on PutObject (412 when the
//! object exists), though with a check before the write rather than
//! atomically with it.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::repo::TestRepo;

pub const S3S_FS_VERSION: &str = "0.14.1";

/// Credentials of the test server; the secret is checked to appear in no
/// output.
pub const ACCESS_KEY: &str = "flr-test-access";
pub const SECRET_KEY: &str = "flr-test-secret-0f3c9a7e51";

/// Where scripts/setup.sh installs s3s-fs.
pub fn s3s_fs_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FLR_S3S_FS") {
        return PathBuf::from(p);
    }
    let cached = PathBuf::from(format!(
        "/var/cache/flr-tools/s3s-fs-{S3S_FS_VERSION}/bin/s3s-fs"
    ));
    if cached.is_file() {
        return cached;
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("s3s-fs"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "s3s-fs is not installed: run scripts/setup.sh (cargo install s3s-fs --version {S3S_FS_VERSION} --features binary --locked --root {})",
                cached.parent().and_then(Path::parent).unwrap().display()
            )
        })
}

/// A free loopback port (bound and released; the server takes it next).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a loopback port")
        .port()
}

/// Waits until something accepts connections on `port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A running s3s-fs; killed on drop.
pub struct S3Server {
    child: Child,
    pub port: u16,
    /// The directory it stores buckets in (one directory per bucket).
    pub root: PathBuf,
}

impl S3Server {
    /// Starts a server storing under `root` (created), with one bucket
    /// per name in `buckets`.
    #[track_caller]
    pub fn start(root: &Path, buckets: &[&str]) -> S3Server {
        crate::mkdir(root);
        for b in buckets {
            crate::mkdir(&root.join(b));
        }
        let bin = s3s_fs_bin();
        let mut last = String::new();
        // The port is free when chosen; another process may take it
        // before the server binds, so try a few.
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new(&bin)
                .args(["--host", "127.0.0.1", "--port"])
                .arg(port.to_string())
                .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
                .arg(root)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
            if wait_for_port(port, Duration::from_secs(10)) {
                return S3Server {
                    child,
                    port,
                    root: root.to_path_buf(),
                };
            }
            let _ = child.kill();
            last = format!("{:?}", child.wait());
        }
        panic!("s3s-fs did not start listening ({last})");
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The environment that points flr at this server.
    pub fn env(&self) -> Vec<(String, String)> {
        env_for(&self.endpoint())
    }

    /// `flr init s3://BUCKET/PREFIX` (encrypted with `password`).
    #[track_caller]
    pub fn init_repo(&self, bucket: &str, prefix: &str, password: Option<&str>) -> TestRepo {
        let repo = TestRepo {
            path: PathBuf::from(format!("s3://{bucket}/{prefix}")),
            password: password.map(str::to_string),
            env: self.env(),
        };
        let mut init = repo.flr(["init"]).arg(&repo.path);
        if password.is_some() {
            init = init.arg("--encrypt");
        }
        init.run().success();
        assert!(
            self.root.join(bucket).join(prefix).join("config").is_file(),
            "init wrote no config object under {}",
            self.root.join(bucket).join(prefix).display()
        );
        repo
    }

    /// The files the server holds for `bucket/prefix`, relative to it
    /// (objects only; s3s-fs keeps its metadata apart).
    pub fn objects(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let base = self.root.join(bucket).join(prefix);
        let mut out = Vec::new();
        let mut stack = vec![base.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(
                        p.strip_prefix(&base)
                            .expect("under the base")
                            .to_string_lossy()
                            .into_owned(),
                    );
                }
            }
        }
        out.sort();
        out
    }
}

/// The environment that points flr at an S3 endpoint with the test
/// credentials.
pub fn env_for(endpoint: &str) -> Vec<(String, String)> {
    [
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
