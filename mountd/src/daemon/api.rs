//! The HTTP/JSON control API (axum). `GET /openapi.json` serves the
//! OpenAPI 3 document describing every route below.
//!
//! Every failure is a JSON body `{"error": "..."}` with a status that says
//! whose mistake it was: 400 malformed input, 403 a target the config
//! does not allow, 404 an unknown name, 409 a conflict, 415 a body that is
//! not JSON, 500/503 the daemon's side.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::{header, request::Parts, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use super::copy_jobs::{self, CopyRequest};
use super::device_jobs::{self, DeviceRequest};
use super::export_jobs::{self, ExportJobInfo, NewExport};
use super::jobs::{self, JobRequest};
use super::receive::{self, CommitRequest, ReceiveRequest};
use super::sessions::{self, MountKey, NewSession};
use super::{metrics, unix_now, Daemon};

const OPENAPI: &str = include_str!("openapi.json");

/// Longest expiry a session may ask for: a year.
const MAX_EXPIRY_SECS: u64 = 365 * 86_400;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, m)
    }
    pub fn forbidden(m: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, m)
    }
    pub fn conflict(m: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, m)
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, m)
    }
    pub fn unavailable(m: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, m)
    }

    /// The core's errors by kind: unknown names are 404, bad names 400,
    /// everything else the daemon's problem.
    pub fn from_core(e: vfs_core::Error) -> Self {
        use vfs_core::Error as E;
        let status = match &e {
            E::NotFound(_) => StatusCode::NOT_FOUND,
            E::InvalidInput(_) => StatusCode::BAD_REQUEST,
            E::AlreadyExists(_) => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

/// `Json` whose rejections are JSON errors that say what was wrong.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the request body must be JSON, sent with Content-Type: application/json",
            )),
            Err(e) => Err(ApiError::bad_request(format!(
                "invalid request body: {}",
                e.body_text()
            ))),
        }
    }
}

/// A path parameter whose rejection is a JSON error.
pub struct ApiPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ApiPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|e: PathRejection| {
                ApiError::bad_request(format!("invalid path: {}", e.body_text()))
            })
    }
}

type AppState = State<Arc<Daemon>>;

pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics_text))
        .route("/repositories", get(repositories))
        .route("/repositories/{repo}/restore-points", get(restore_points))
        .route("/sessions", get(list_sessions).post(create_session))
        .route("/sessions/{id}", get(get_session).delete(end_session))
        .route("/sessions/{id}/commit", post(commit_session))
        .route("/restore-jobs", get(list_jobs).post(create_job))
        .route("/restore-jobs/{id}", get(get_job).delete(cancel_job))
        .route("/restore-jobs/{id}/cancel", post(cancel_job))
        .route("/copies", get(list_copies).post(create_copy))
        .route("/copies/{id}", get(get_copy).delete(cancel_copy))
        .route("/copies/{id}/cancel", post(cancel_copy))
        .route("/devices", get(list_devices).post(create_devices))
        .route("/devices/{id}", get(get_devices).delete(cancel_devices))
        .route("/devices/{id}/cancel", post(cancel_devices))
        .route("/exports", get(list_exports).post(create_export))
        .route("/exports/{id}", get(get_export).delete(cancel_export))
        .route("/receive/check", post(receive_check))
        .route("/receive", post(receive_open))
        .route("/receive/{id}", put(receive_data).delete(receive_abandon))
        .route("/receive/{id}/commit", post(receive_commit))
        .fallback(|| async { ApiError::not_found("no such endpoint; see GET /openapi.json") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this endpoint; see GET /openapi.json",
            )
        })
        .with_state(daemon)
}

/// Requires `Authorization: Bearer <token>` on every request (the TCP
/// listener; the Unix socket is protected by its file mode).
pub fn with_bearer_token(app: Router, token: String) -> Router {
    let token: Arc<str> = token.into();
    app.layer(axum::middleware::from_fn(
        move |req: Request, next: Next| {
            let token = token.clone();
            async move {
                let given = req
                    .headers()
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "));
                if given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
                    return next.run(req).await;
                }
                let mut resp = ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "this listener needs Authorization: Bearer <settings.tcp_token>",
                )
                .into_response();
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                resp
            }
        },
    ))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn health(State(d): AppState) -> Json<serde_json::Value> {
    let (_, sessions, mounts, _) = d.sessions.stats().await;
    let counts = d.jobs.counts();
    Json(json!({
        "status": if d.shutting_down.load(Relaxed) { "stopping" } else { "ok" },
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "uptime_secs": d.started.elapsed().as_secs(),
        "mount_root": d.mount_root.display().to_string(),
        "sessions": sessions,
        "mounts": mounts,
        "jobs_active": counts.by_state[0] + counts.by_state[1],
        "stale_mounts_cleared": d.stale_cleared.lock().clone(),
    }))
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn metrics_text(State(d): AppState) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics::render(&d).await,
    )
}

async fn repositories(State(d): AppState) -> Json<serde_json::Value> {
    Json(
        d.repos
            .values()
            .map(|r| json!({"name": r.name, "path": r.config.path.to_string()}))
            .collect(),
    )
}

async fn restore_points(
    State(d): AppState,
    ApiPath(repo): ApiPath,
) -> Result<Json<serde_json::Value>, ApiError> {
    d.repo(&repo)?;
    let rows = tokio::task::spawn_blocking(move || {
        let handle = d.repo(&repo)?;
        let r = handle.open_for(None).map_err(ApiError::from_core)?;
        let mut rows = Vec::new();
        for name in r.list_restore_points(None).map_err(ApiError::from_core)? {
            let m = r.load_manifest(&name).map_err(ApiError::from_core)?;
            rows.push(json!({
                "name": name.to_string(), "job": name.job, "timestamp": name.name,
                "time": m.time, "files": m.stats.files, "logical_bytes": m.stats.logical_bytes,
            }));
        }
        Ok::<_, ApiError>(rows)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(Json(rows.into()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSession {
    repository: String,
    /// `JOB/TIMESTAMP`, or `JOB/latest`.
    restore_point: Option<String>,
    /// The newest restore point of this job.
    job: Option<String>,
    expires_in_secs: Option<u64>,
    /// A copy-on-write session whose files can be changed.
    #[serde(default)]
    writable: bool,
    /// Publish the session over NFSv3 as well.
    export: Option<SessionExport>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionExport {
    /// `ADDR:PORT` (port 0: any free port) or a bare `PORT` on loopback.
    nfs: String,
}

async fn create_session(
    State(d): AppState,
    ApiJson(req): ApiJson<CreateSession>,
) -> Result<(StatusCode, Json<sessions::SessionInfo>), ApiError> {
    let spec = match (&req.restore_point, &req.job) {
        (Some(rp), None) => rp.clone(),
        (None, Some(job)) => format!("{job}/latest"),
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of restore_point (JOB/TIMESTAMP) and job",
            ))
        }
    };
    let expires_in = match req.expires_in_secs {
        Some(0) => return Err(ApiError::bad_request("expires_in_secs must be at least 1")),
        Some(s) if s > MAX_EXPIRY_SECS => {
            return Err(ApiError::bad_request(format!(
                "expires_in_secs must be at most {MAX_EXPIRY_SECS}"
            )))
        }
        s => s.map(Duration::from_secs),
    };
    let nfs = match &req.export {
        None => None,
        Some(e) => {
            let addr: std::net::SocketAddr = match e.nfs.parse::<u16>() {
                Ok(port) => (std::net::Ipv4Addr::LOCALHOST, port).into(),
                Err(_) => e.nfs.parse().map_err(|_| {
                    ApiError::bad_request(format!(
                        "export.nfs {:?}: expected ADDR:PORT or PORT",
                        e.nfs
                    ))
                })?,
            };
            if !addr.ip().is_loopback() && d.config.settings.nfs_allow.is_empty() {
                return Err(ApiError::forbidden(format!(
                    "export.nfs {addr}: an export on a non-loopback address needs settings.nfs_allow (the clients that may connect)"
                )));
            }
            Some(addr)
        }
    };
    d.repo(&req.repository)?;
    let (d2, repository) = (d.clone(), req.repository.clone());
    let restore_point = tokio::task::spawn_blocking(move || {
        let repo = d2
            .repo(&repository)?
            .open_for(None)
            .map_err(ApiError::from_core)?;
        repo.resolve(&spec).map_err(ApiError::from_core)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    let info = sessions::create(
        &d,
        NewSession {
            key: MountKey {
                repository: req.repository,
                restore_point,
                // The session's id is filled in when it is made.
                writable: req.writable.then(String::new),
            },
            expires_in,
            nfs,
        },
    )
    .await?;
    super::log(format!(
        "session {} opened: {}:{} at {}",
        info.id, info.repository, info.restore_point, info.path
    ));
    Ok((StatusCode::CREATED, Json(info)))
}

async fn list_sessions(State(d): AppState) -> Json<Vec<sessions::SessionInfo>> {
    Json(d.sessions.list().await)
}

async fn get_session(
    State(d): AppState,
    ApiPath(id): ApiPath,
) -> Result<Json<sessions::SessionInfo>, ApiError> {
    Ok(Json(d.sessions.get(&id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitSession {
    job: String,
}

async fn commit_session(
    State(d): AppState,
    ApiPath(id): ApiPath,
    ApiJson(req): ApiJson<CommitSession>,
) -> Result<Json<sessions::Committed>, ApiError> {
    Ok(Json(sessions::commit(&d, &id, req.job).await?))
}

async fn end_session(
    State(d): AppState,
    ApiPath(id): ApiPath,
) -> Result<Json<serde_json::Value>, ApiError> {
    let unmounted = sessions::end(&d, &id).await?;
    Ok(Json(
        json!({"id": id, "ended": true, "unmounted": unmounted, "ended_at": unix_now()}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateJob {
    repository: String,
    restore_point: String,
    #[serde(default)]
    paths: Vec<String>,
    target: String,
    #[serde(default)]
    overwrite: bool,
}

async fn create_job(
    State(d): AppState,
    ApiJson(req): ApiJson<CreateJob>,
) -> Result<(StatusCode, Json<jobs::JobInfo>), ApiError> {
    let info = jobs::start(
        &d,
        JobRequest {
            repository: req.repository,
            restore_point: req.restore_point,
            paths: req.paths,
            target: req.target,
            overwrite: req.overwrite,
        },
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(info)))
}

async fn list_jobs(State(d): AppState) -> Json<Vec<jobs::JobInfo>> {
    Json(d.jobs.table.list())
}

async fn get_job(
    State(d): AppState,
    ApiPath(id): ApiPath,
) -> Result<Json<jobs::JobInfo>, ApiError> {
    Ok(Json(d.jobs.table.get(&id)?))
}

async fn cancel_job(
    State(d): AppState,
    ApiPath(id): ApiPath,
) -> Result<(StatusCode, Json<jobs::JobInfo>), ApiError> {
    Ok((StatusCode::ACCEPTED, Json(d.jobs.table.cancel(&id)?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateCopy {
    from: String,
    to: String,
    #[serde(default)]
    job: Option<String>,
    #[serde(default)]
    restore_points: Vec<String>,
}

async fn create_copy(
    State(d): AppState,
    ApiJson(req): ApiJson<CreateCopy>,
) -> Result<(StatusCode, Json<copy_jobs::CopyJobInfo>), ApiError> {
    let info = copy_jobs::start(
        &d,
        CopyRequest {
            from: req.from,
            to: req.to,
            job: req.job,
            restore_points: req.restore_points,
        },
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(info)))
}

async fn list_copies(State(d): AppState) -> Json<Vec<copy_jobs::CopyJobInfo>> {
    Json(d.copy_jobs.table.list())
}

async fn get_copy(
    State(d): AppState,
    ApiPath(id): ApiPath,
) -> Result<Json<copy_jobs::CopyJobInfo>, ApiError> {
    Ok(Json(d.copy_jobs.table.get(&id)?))
}

async fn cancel_copy(
    State(d): AppState,
    ApiPath(id): ApiPath,
) -> Result<(StatusCode, Json<copy_jobs::CopyJobInfo>), ApiError> {
    Ok((StatusCode::ACCEPTED, Json(d.copy_jobs.table.cancel(&id)?)))
}

/// Who is on the other end of a Unix socket connection: devices are made
/// for that user unless the request names an owner.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
}

#[cfg(unix)]
impl
    axum::extract::connect_info::Connected<
        axum::serve::IncomingStream<'_, tokio::net::UnixListener>,
    > for Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        // Unknown (it cannot fail on Linux): nobody's.
        stream.io().peer_cred().map_or(
            Peer {
                uid: u32::MAX - 1,
                gid: u32::MAX - 1,
            },
            |c| Peer {
                uid: c.uid(),
                gid: c.gid(),
            },
        )
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateDevices {
    repository: String,
    databases: Vec<String>,
    #[serde(default = "one")]
    streams: usize,
    /// raw or tar.
    #[serde(default = "raw")]
    format: String,
    /// User (name or uid) to own the pipes; default: the caller.
    owner: Option<String>,
    /// Seconds to wait for each device's writer.
    timeout_secs: Option<u64>,
}

fn one() -> usize {
    1
}

fn raw() -> String {
    "raw".into()
}

async fn create_devices(
    State(d): AppState,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<Peer>>>,
    ApiJson(req): ApiJson<CreateDevices>,
) -> Result<(StatusCode, Json<device_jobs::DeviceJobInfo>), ApiError> {
    let format =
        vfs_core::devices::StreamFormat::parse(&req.format).map_err(ApiError::bad_request)?;
    let owner = match (&req.owner, peer) {
        (Some(user), _) => crate::devices::Owner::lookup(user)
            .map_err(|e| ApiError::not_found(format!("owner: {e:#}")))?,
        (None, Some(axum::Extension(axum::extract::ConnectInfo(p)))) => crate::devices::Owner {
            uid: p.uid,
            gid: p.gid,
        },
        // Over TCP nobody is known: the daemon's own user.
        (None, None) => crate::devices::Owner::current(),
    };
    match req.timeout_secs {
        Some(0) => return Err(ApiError::bad_request("timeout_secs must be at least 1")),
        Some(s) if s > MAX_EXPIRY_SECS => {
            return Err(ApiError::bad_request(format!(
                "timeout_secs must be at most {MAX_EXPIRY_SECS}"
            )))
        }
        _ => {}
    }
    let info = device_jobs::start(
        &d,
        DeviceRequest {
            repository: req.repository,
            databases: req.databases,
            streams: req.streams,
            format,
            owner,
            timeout: req.timeout_secs.map(Duration::from_secs),
        },
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(info)))
}

async fn list_devices(State(d): AppState) -> Json<Vec<device_jobs::DeviceJobInfo>> {
    Json(d.device_jobs.list())
}

async fn get_devices(
    State(d): AppState,
    ApiPath(id): ApiPath,
) -> Result<Json<device_jobs::DeviceJobInfo>, ApiError> {
    Ok(Json(d.device_jobs.get(&id)?))
}

async fn cancel_devices(
    State(d): AppState,
    ApiPath(id): ApiPath,
) -> Result<(StatusCode, Json<device_jobs::DeviceJobInfo>), ApiError> {
    Ok((StatusCode::ACCEPTED, Json(d.device_jobs.cancel(&id)?)))
}

async fn create_export(
    State(d): AppState,
    ApiJson(req): ApiJson<NewExport>,
) -> Result<(StatusCode, Json<ExportJobInfo>), ApiError> {
    Ok((
        StatusCode::ACCEPTED,
        Json(export_jobs::start(&d, req).await?),
    ))
}

async fn list_exports(State(d): AppState) -> Json<Vec<ExportJobInfo>> {
    Json(d.exports.list())
}

async fn get_export(
    State(d): AppState,
    ApiPath(id): ApiPath,
) -> Result<Json<ExportJobInfo>, ApiError> {
    Ok(Json(d.exports.get(&id)?))
}

async fn cancel_export(
    State(d): AppState,
    ApiPath(id): ApiPath,
) -> Result<(StatusCode, Json<ExportJobInfo>), ApiError> {
    Ok((StatusCode::ACCEPTED, Json(d.exports.cancel(&id)?)))
}

async fn receive_check(
    State(d): AppState,
    ApiJson(req): ApiJson<ReceiveRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let dir = tokio::task::spawn_blocking(move || receive::check(&d, &req))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(Json(json!({"dir": dir.display().to_string()})))
}

async fn receive_open(
    State(d): AppState,
    ApiJson(req): ApiJson<ReceiveRequest>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let opened = tokio::task::spawn_blocking(move || receive::open(&d, &req))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok((StatusCode::CREATED, Json(opened)))
}

async fn receive_data(
    State(d): AppState,
    ApiPath(id): ApiPath,
    body: axum::body::Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(receive::receive(&d, &id, body).await?))
}

async fn receive_commit(
    State(d): AppState,
    ApiPath(id): ApiPath,
    ApiJson(req): ApiJson<CommitRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let done = tokio::task::spawn_blocking(move || receive::commit(&d, &id, &req))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(Json(done))
}

async fn receive_abandon(
    State(d): AppState,
    ApiPath(id): ApiPath,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(receive::abandon(&d, &id)?))
}
