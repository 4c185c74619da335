//! `flr daemon` as a test's process: its own socket, mount root, state,
//! staging and restore target, a TCP listener with a token, and HTTP/1.1
//! exchanges over either; stopped on drop (SIGTERM, then SIGKILL).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::command::{send_signal, wait_for_exit};
use crate::flr_bin;
use crate::s3::free_port;

/// The bearer token of every test daemon's TCP listener.
pub const TOKEN: &str = "export-test-token-0123456789";

/// Status and JSON body of one HTTP/1.1 exchange.
pub fn exchange(stream: &mut impl ReadWrite, request: &[u8]) -> (u16, Value) {
    stream.write_all(request).unwrap();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

pub trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

pub fn request_bytes(
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<&Value>,
) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n");
    if let Some(t) = auth {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    if !body.is_empty() {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    req.into_bytes()
}

/// A `flr daemon` with its own socket, mount root, state, staging and
/// restore target; stopped on drop (SIGTERM, then SIGKILL).
pub struct Daemon {
    child: Option<Child>,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    /// Where it may write (settings.restore_targets).
    pub restore: PathBuf,
    /// settings.export_staging.
    pub staging: PathBuf,
    pub port: u16,
    /// Variables the process gets besides the test's own.
    env: Vec<(String, String)>,
}

impl Daemon {
    pub fn start(dir: &Path, repos: &[(&str, &Path)]) -> Daemon {
        Daemon::start_with_env(dir, repos, Vec::new())
    }

    /// Like [`Daemon::start`], with `env` set for the daemon process (the
    /// `AWS_*` variables of an S3 repository).
    pub fn start_with_env(
        dir: &Path,
        repos: &[(&str, &Path)],
        env: Vec<(String, String)>,
    ) -> Daemon {
        crate::mkdir(dir);
        let restore = dir.join("restore");
        let staging = dir.join("staging");
        crate::mkdir(&restore);
        let port = free_port();
        let config = dir.join("daemon.toml");
        let mut text = format!(
            "[settings]\nmount_root = {:?}\nsocket = {:?}\nstate_dir = {:?}\nrestore_targets = [{restore:?}]\nexport_staging = {staging:?}\ntcp_listen = \"127.0.0.1:{port}\"\ntcp_token = \"{TOKEN}\"\n",
            dir.join("mnt"),
            dir.join("mountd.sock"),
            dir.join("state"),
        );
        for (name, path) in repos {
            text.push_str(&format!("\n[repositories.{name}]\npath = {path:?}\n"));
        }
        std::fs::write(&config, text).unwrap();
        let mut d = Daemon {
            child: None,
            socket: dir.join("mountd.sock"),
            dir: dir.to_path_buf(),
            config,
            restore,
            staging,
            port,
            env,
        };
        d.spawn();
        d
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .unwrap();
        self.child = Some(
            Command::new(flr_bin())
                .arg("daemon")
                .arg("--config")
                .arg(&self.config)
                .env_remove("FLR_SOCKET")
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            if self.call("GET", "/health", None).0 == 200 {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the daemon did not answer: {}", self.log());
    }

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        match UnixStream::connect(&self.socket) {
            Ok(mut s) => exchange(&mut s, &request_bytes(method, path, None, body.as_ref())),
            Err(_) => (0, Value::Null),
        }
    }

    pub fn tcp(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        exchange(
            &mut s,
            &request_bytes(method, path, Some(token), body.as_ref()),
        )
    }

    pub fn url(&self, rel: &str) -> String {
        format!(
            "flr://127.0.0.1:{}{}",
            self.port,
            self.restore.join(rel).display()
        )
    }

    pub fn kill9(&mut self) {
        let mut c = self.child.take().unwrap();
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Polls an export job until it has finished.
    pub fn wait_export(&self, id: &str, limit: Duration) -> Value {
        let until = Instant::now() + limit;
        loop {
            let (st, j) = self.call("GET", &format!("/exports/{id}"), None);
            assert_eq!(st, 200, "{j}");
            if ["done", "failed", "cancelled"].contains(&j["state"].as_str().unwrap()) {
                return j;
            }
            assert!(Instant::now() < until, "export {id} still runs: {j}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            send_signal(c.id(), "TERM");
            if !wait_for_exit(c.id(), Duration::from_secs(40)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}
