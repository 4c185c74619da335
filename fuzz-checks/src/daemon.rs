//! The daemon's JSON request bodies, through the daemon's own router: the
//! `ApiJson` extractor (content type, body limit, JSON into the route's
//! request type) and each handler's checks of what it got.
//!
//! The daemon here knows one repository, `r`, whose directory does not
//! exist, and one restore target directory, so a well-formed request gets
//! through every check to the point of opening the repository, and fails
//! there: no input can mount anything or start a restore.
//!
//! Input: a mode byte, then the body. Mode bits 0-1 pick the route
//! (`POST /sessions`, `POST /sessions/s-1/commit`, `POST /restore-jobs`,
//! `POST /sessions/{rest of the body up to a newline}/commit`); bit 2
//! sends it as `text/plain` instead of JSON.

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::Request;
use axum::Router;
use mountd::daemon::config::{Config, RepositoryConfig, Settings};
use mountd::daemon::{api, Daemon};
use tower::ServiceExt;

use crate::alloc;

/// Bound on bytes live while one request is served: serde_json's values
/// and the error message quoting the input are a few times the body;
/// hyper's and axum's request and response state is the constant.
const PER_BYTE: usize = 16;
const FIXED: usize = 256 << 10;

struct Server {
    runtime: tokio::runtime::Runtime,
    router: Router,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("flr-fuzz-daemon-{}", std::process::id()));
        let targets = dir.join("targets");
        std::fs::create_dir_all(&targets).expect("a temporary directory");
        let config = Config {
            settings: Settings {
                mount_root: dir.join("mnt"),
                restore_targets: vec![targets],
                ..Settings::default()
            },
            repositories: [(
                "r".to_string(),
                RepositoryConfig {
                    path: "/nonexistent/flr-fuzz-repository"
                        .parse()
                        .expect("a directory is a repository spec"),
                    s3: Default::default(),
                    password_env: None,
                    password_file: None,
                },
            )]
            .into(),
        };
        let daemon = Arc::new(Daemon::new(config).expect("daemon state"));
        Server {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime"),
            router: api::router(daemon),
        }
    })
}

pub fn check(data: &[u8]) {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let server = server();
    let (uri, body) = match mode & 3 {
        0 => ("/sessions".to_string(), body),
        1 => ("/sessions/s-1/commit".to_string(), body),
        2 => ("/restore-jobs".to_string(), body),
        _ => {
            let end = body.iter().position(|&b| b == b'\n').unwrap_or(body.len());
            let id: String = String::from_utf8_lossy(&body[..end])
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || "-_.~%".contains(*c))
                .collect();
            (
                format!("/sessions/{id}/commit"),
                body.get(end + 1..).unwrap_or_default(),
            )
        }
    };
    let content_type = if mode & 4 != 0 {
        "text/plain"
    } else {
        "application/json"
    };
    let Ok(request) = Request::builder()
        .method("POST")
        .uri(&uri)
        .header("content-type", content_type)
        .body(Body::from(body.to_vec()))
    else {
        return;
    };
    let ((status, reply), peak) = alloc::measure(|| {
        server.runtime.block_on(async {
            let response = server
                .router
                .clone()
                .oneshot(request)
                .await
                .expect("the router never fails");
            let status = response.status();
            let reply = axum::body::to_bytes(response.into_body(), 1 << 20)
                .await
                .expect("a reply body");
            (status, reply)
        })
    });
    alloc::assert_within("request", peak, data.len(), PER_BYTE, FIXED);
    // Nothing here can succeed, and nothing a client sends is the daemon's
    // fault: every reply is a client error, with a JSON message.
    assert!(
        status.is_client_error(),
        "{uri}: {status} for {:?}: {}",
        String::from_utf8_lossy(body),
        String::from_utf8_lossy(&reply)
    );
    let error: serde_json::Value = serde_json::from_slice(&reply).expect("a JSON error body");
    assert!(error["error"].is_string(), "{error}");
}
