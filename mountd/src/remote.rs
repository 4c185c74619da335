//! Commands that run or talk to the mount daemon: `daemon`, `mounts`,
//! `unmount`, `status`, and `mount` when a daemon answers.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use mountd::client::{self, Response};
use mountd::daemon::{self, Config};
use serde_json::{json, Value};

use crate::exit;

/// Config read when `flr daemon` gets no --config.
const DEFAULT_CONFIG: &str = "/etc/flr/daemon.toml";

/// `flr daemon`: binds the socket, runs until SIGTERM or SIGINT.
pub fn daemon(config: Option<PathBuf>, socket: Option<PathBuf>) -> Result<u8> {
    let mut config = match config {
        Some(path) => Config::load(&path)?,
        None if Path::new(DEFAULT_CONFIG).exists() => Config::load(Path::new(DEFAULT_CONFIG))?,
        None => Config::default(),
    };
    if let Some(s) = socket {
        config.settings.socket = s;
    }
    let socket = config.settings.socket.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    #[cfg(not(unix))]
    let served = runtime.block_on(async move {
        // No Unix socket on Windows: the API is served on tcp_listen only,
        // and every request needs tcp_token (checked by daemon::run).
        let _ = socket;
        let Some(addr) = config.settings.tcp_listen else {
            bail!("the daemon on Windows listens on TCP only: set settings.tcp_listen (and tcp_token)");
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        daemon::log(format!("listening on tcp {addr} (bearer token required)"));
        let shutdown = async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                daemon::log("Ctrl-C received");
            }
        };
        daemon::run(listener, config, shutdown).await
    });
    #[cfg(unix)]
    let served = runtime.block_on(async move {
        // Signal handlers first: a SIGTERM right after start must still
        // unmount cleanly.
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let std_listener = daemon::bind_socket(&socket)?;
        let _socket_file = SocketFile(socket.clone());
        let listener = tokio::net::UnixListener::from_std(std_listener)?;
        daemon::log(format!("listening on {}", socket.display()));
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => daemon::log("SIGTERM received"),
                _ = int.recv() => daemon::log("SIGINT received"),
            }
        };
        daemon::run(listener, config, shutdown).await
    });
    // A device job whose writer holds its pipe open without writing may
    // still be reading: it is not waited for forever (its pipes are
    // cleared at the next start).
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    served?;
    Ok(exit::OK)
}

/// Removes the socket file when the daemon ends.
#[cfg(unix)]
struct SocketFile(PathBuf);

#[cfg(unix)]
impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn no_daemon(socket: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "no flr daemon is running (nothing answers on {}); start one with `flr daemon`, or pass --socket / FLR_SOCKET",
        socket.display()
    )
}

/// One call to the daemon; a refused connection means no daemon.
fn call(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<Response> {
    client::request(socket, method, path, body).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => no_daemon(socket),
        _ => anyhow::anyhow!("cannot talk to the flr daemon on {}: {e}", socket.display()),
    })
}

fn expect_ok(r: Response, what: &str) -> Result<Value> {
    if (200..300).contains(&r.status) {
        Ok(r.json())
    } else {
        bail!("{what}: {} (HTTP {})", r.error_message(), r.status)
    }
}

/// The daemon's name for repository `repo` (a config name, a path or an
/// S3 spec), if it serves it.
pub fn daemon_repository(
    socket: &Path,
    repo: &backends::repo_spec::RepoSpec,
) -> Result<Option<String>> {
    let repos = expect_ok(
        call(socket, "GET", "/repositories", None)?,
        "listing repositories",
    )?;
    let given = repo.to_string();
    let wanted = repo.local_path().and_then(|p| p.canonicalize().ok());
    let same_place = |configured: &str| match &wanted {
        Some(dir) => Path::new(configured).canonicalize().ok().as_ref() == Some(dir),
        None => configured == given,
    };
    Ok(repos
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| {
            r["name"].as_str() == Some(given.as_str()) || r["path"].as_str().is_some_and(same_place)
        })
        .and_then(|r| r["name"].as_str())
        .map(str::to_string))
}

/// One call to the daemon, its JSON on success, its error otherwise.
pub fn call_ok(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
    what: &str,
) -> Result<Value> {
    expect_ok(call(socket, method, path, body)?, what)
}

/// `flr mount` through the daemon: the repository is named by its config
/// name or its path.
pub fn mount_session(
    socket: &Path,
    repo: &backends::repo_spec::RepoSpec,
    job: Option<&str>,
    restore_point: Option<&str>,
    expires_in: Option<u64>,
    writable: bool,
) -> Result<u8> {
    let Some(name) = daemon_repository(socket, repo)? else {
        bail!(
            "the flr daemon on {} does not serve repository {repo}; add it to the daemon's config, or give a MOUNTPOINT to mount without the daemon",
            socket.display(),
        );
    };
    let mut body = json!({ "repository": name });
    match (restore_point, job) {
        (Some(rp), _) => body["restore_point"] = json!(rp),
        (None, Some(job)) => body["job"] = json!(job),
        (None, None) => bail!(
            "the daemon mounts one restore point per session: pass --restore-point JOB/TIMESTAMP or --job NAME (or give a MOUNTPOINT to mount everything here)"
        ),
    }
    if let Some(secs) = expires_in {
        body["expires_in_secs"] = json!(secs);
    }
    if writable {
        body["writable"] = json!(true);
    }
    let s = expect_ok(
        call(socket, "POST", "/sessions", Some(&body))?,
        "mount failed",
    )?;
    eprintln!(
        "flr: {}session {} mounted {} by the daemon",
        if writable { "writable " } else { "" },
        s["id"].as_str().unwrap_or("?"),
        s["restore_point"].as_str().unwrap_or("?")
    );
    println!("{}", s["path"].as_str().unwrap_or(""));
    Ok(exit::OK)
}

/// `flr unmount ID|PATH`.
pub fn unmount(socket: &Path, session: &str) -> Result<u8> {
    let r = match call(socket, "GET", "/sessions", None) {
        Ok(r) => r,
        Err(e) => bail!(
            "{e:#}\n(a mount made without the daemon is unmounted with `fusermount3 -u {session}`)"
        ),
    };
    let sessions = expect_ok(r, "listing sessions")?;
    let wanted = Path::new(session).canonicalize().ok();
    let ids: Vec<String> = sessions
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| {
            s["id"].as_str() == Some(session)
                || (wanted.is_some() && s["path"].as_str().map(PathBuf::from) == wanted.clone())
        })
        .filter_map(|s| s["id"].as_str().map(str::to_string))
        .collect();
    if ids.is_empty() {
        bail!("no daemon session has id or path {session}; see `flr mounts`");
    }
    for id in ids {
        let r = expect_ok(
            call(socket, "DELETE", &format!("/sessions/{id}"), None)?,
            "unmount failed",
        )?;
        eprintln!(
            "flr: session {id} ended{}",
            if r["unmounted"] == json!(true) {
                " and unmounted"
            } else {
                " (its mount stays: other sessions use it)"
            }
        );
    }
    Ok(exit::OK)
}

/// `flr mounts`.
pub fn mounts(socket: &Path, json_out: bool) -> Result<u8> {
    let sessions = expect_ok(call(socket, "GET", "/sessions", None)?, "listing sessions")?;
    if json_out {
        println!("{sessions}");
        return Ok(exit::OK);
    }
    println!(
        "{:<8} {:<12} {:<40} {:>6} {:>8}  PATH",
        "SESSION", "REPOSITORY", "RESTORE POINT", "FILES", "SHARED"
    );
    for s in sessions.as_array().into_iter().flatten() {
        println!(
            "{:<8} {:<12} {:<40} {:>6} {:>8}  {}",
            s["id"].as_str().unwrap_or(""),
            s["repository"].as_str().unwrap_or(""),
            s["restore_point"].as_str().unwrap_or(""),
            s["readers"]["open_files"].as_u64().unwrap_or(0),
            s["readers"]["sessions"].as_u64().unwrap_or(0),
            s["path"].as_str().unwrap_or("")
        );
    }
    Ok(exit::OK)
}

/// `flr status`: exit 0 when a daemon answers, 1 when none does.
pub fn status(socket: &Path, json_out: bool) -> Result<u8> {
    let health = expect_ok(call(socket, "GET", "/health", None)?, "health")?;
    let jobs = expect_ok(call(socket, "GET", "/restore-jobs", None)?, "listing jobs")?;
    if json_out {
        println!("{}", json!({"health": health, "restore_jobs": jobs}));
        return Ok(exit::OK);
    }
    println!(
        "flr daemon {} (pid {}) on {}: up {}s, mount root {}, {} sessions on {} mounts, {} active restore jobs",
        health["status"].as_str().unwrap_or("?"),
        health["pid"],
        socket.display(),
        health["uptime_secs"],
        health["mount_root"].as_str().unwrap_or("?"),
        health["sessions"],
        health["mounts"],
        health["jobs_active"],
    );
    for j in jobs.as_array().into_iter().flatten() {
        println!(
            "  job {} {} {} -> {}: {}/{} bytes, {} files{}",
            j["id"].as_str().unwrap_or(""),
            j["state"].as_str().unwrap_or(""),
            j["restore_point"].as_str().unwrap_or(""),
            j["target"].as_str().unwrap_or(""),
            j["bytes_done"],
            j["bytes_total"],
            j["files_done"],
            j["error"]
                .as_str()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        );
    }
    Ok(exit::OK)
}
