//! The receiving side of an export from another host ([`crate::transfer`]
//! is the sender): `POST /receive/check`, `POST /receive`,
//! `PUT /receive/{id}`, `POST /receive/{id}/commit`, `DELETE /receive/{id}`.
//!
//! Only directories at or below `settings.restore_targets` are written
//! (the rule restore jobs follow: absolute, no `..`, symlinks resolved
//! before the comparison). Data goes into `DIR/.flr-partial-PID-rN` and is
//! renamed into place only when the sender's BLAKE3 hash and byte count
//! of the stream equal the ones computed here. The stream is unpacked as
//! it arrives, through a small bounded channel, so memory does not grow
//! with the export. A stream that breaks, fails to unpack or hashes
//! differently removes the partial directory, and so does a transfer left
//! idle for [`IDLE`] or found at the next start.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::StatusCode;
use bytes::Bytes;
use http_body_util::BodyExt;
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{json, Value};

use super::api::ApiError;
use super::{jobs, log, Daemon};

/// A transfer opened but not streamed or committed for this long is
/// dropped with its partial directory.
const IDLE: Duration = Duration::from_secs(600);

/// Chunks of the stream in flight between the connection and the
/// unpacker (each at most a few hundred KiB).
const IN_FLIGHT: usize = 16;

/// How deep below each restore target partial directories are looked for
/// at start.
const STALE_DEPTH: usize = 4;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveRequest {
    /// The absolute directory to write into.
    pub dir: String,
    #[serde(default)]
    pub overwrite: bool,
    /// Bytes the sender expects to write (free space is checked).
    #[serde(default)]
    pub bytes: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitRequest {
    /// The sender's BLAKE3 of the stream, in hex.
    pub blake3: String,
    /// Bytes of the stream.
    pub bytes: u64,
}

#[derive(Clone, PartialEq, Eq)]
enum Stage {
    Open,
    Receiving,
    Received { blake3: String, bytes: u64 },
}

struct Receive {
    dir: PathBuf,
    partial: PathBuf,
    overwrite: bool,
    stage: Mutex<Stage>,
    touched: Mutex<Instant>,
}

#[derive(Default)]
pub struct Receives {
    list: Mutex<BTreeMap<String, Arc<Receive>>>,
    seq: AtomicU64,
}

impl Receives {
    fn find(&self, id: &str) -> Result<Arc<Receive>, ApiError> {
        self.list
            .lock()
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("unknown transfer {id:?}")))
    }

    /// Forgets a transfer and removes its partial directory.
    fn discard(&self, id: &str) -> bool {
        let r = self.list.lock().remove(id);
        if let Some(r) = &r {
            let _ = std::fs::remove_dir_all(&r.partial);
        }
        r.is_some()
    }

    /// Drops every transfer (at shutdown).
    pub fn discard_all(&self) {
        let ids: Vec<String> = self.list.lock().keys().cloned().collect();
        for id in ids {
            self.discard(&id);
        }
    }

    /// Drops transfers idle for longer than [`IDLE`].
    pub fn reap(&self) {
        let idle: Vec<String> = self
            .list
            .lock()
            .iter()
            .filter(|(_, r)| {
                *r.stage.lock() != Stage::Receiving && r.touched.lock().elapsed() > IDLE
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in idle {
            if self.discard(&id) {
                log(format!(
                    "transfer {id}: idle for {}s, dropped with its partial data",
                    IDLE.as_secs()
                ));
            }
        }
    }
}

/// The target checks, without writing: allowed, writable, empty unless
/// `overwrite`, room for `bytes`. Returns the resolved directory.
pub fn check(daemon: &Daemon, req: &ReceiveRequest) -> Result<PathBuf, ApiError> {
    // Every directory the rule refuses is "not allowed here" (403), so a
    // sender reports one check for it.
    let dir = jobs::check_target(daemon, &req.dir).map_err(|e| {
        if e.status == StatusCode::BAD_REQUEST {
            ApiError::forbidden(e.message)
        } else {
            e
        }
    })?;
    let at = crate::export::nearest_existing(&dir);
    if !crate::host::can_write(&at) {
        return Err(ApiError::forbidden(format!(
            "{} is not writable by the flr daemon here",
            at.display()
        )));
    }
    if dir.is_dir()
        && !req.overwrite
        && !crate::export::dir_is_empty(&dir).map_err(|e| ApiError::internal(format!("{e:#}")))?
    {
        return Err(ApiError::conflict(format!(
            "{} is not empty (give overwrite to export into it anyway)",
            dir.display()
        )));
    }
    let free = crate::export::free_bytes(&dir).map_err(|e| ApiError::internal(format!("{e:#}")))?;
    if free < req.bytes {
        return Err(ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            format!(
                "{} has {} free, the export needs {}",
                at.display(),
                crate::human(free),
                crate::human(req.bytes)
            ),
        ));
    }
    Ok(dir)
}

/// Opens a transfer: checks, then makes the partial directory.
pub fn open(daemon: &Daemon, req: &ReceiveRequest) -> Result<Value, ApiError> {
    if daemon.shutting_down.load(Relaxed) {
        return Err(ApiError::unavailable("the daemon is shutting down"));
    }
    let dir = check(daemon, req)?;
    let n = daemon.receives.seq.fetch_add(1, Relaxed);
    let id = format!("r-{}-{n}", std::process::id());
    let partial = dir.join(format!(".flr-partial-{}-r{n}", std::process::id()));
    let made = std::fs::create_dir_all(&dir).and_then(|()| {
        std::fs::create_dir(&partial)?;
        crate::host::set_mode(&partial, 0o700)
    });
    if let Err(e) = made {
        let _ = std::fs::remove_dir(&partial);
        return Err(ApiError::internal(format!(
            "cannot make {}: {e}",
            partial.display()
        )));
    }
    daemon.receives.list.lock().insert(
        id.clone(),
        Arc::new(Receive {
            dir: dir.clone(),
            partial,
            overwrite: req.overwrite,
            stage: Mutex::new(Stage::Open),
            touched: Mutex::new(Instant::now()),
        }),
    );
    log(format!("transfer {id} opened into {}", dir.display()));
    Ok(json!({"id": id, "dir": dir.display().to_string()}))
}

/// The stream of a `PUT`, read by the unpacker: hashed and counted.
struct StreamReader {
    rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
    hasher: blake3::Hasher,
    bytes: u64,
}

impl Read for StreamReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Err(e)) => return Err(e),
                Some(Ok(b)) => self.cur = b,
            }
        }
        let n = buf.len().min(self.cur.len());
        let part = self.cur.split_to(n);
        buf[..n].copy_from_slice(&part);
        self.hasher.update(&part);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Unpacks a tar stream into `into`, refusing any entry that would land
/// outside it or is not a file, directory or symlink. Returns the
/// stream's hash and size.
fn unpack(reader: StreamReader, into: &Path) -> Result<(String, u64), String> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(false);
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut e = entry.map_err(|e| e.to_string())?;
        let path = e.path().map_err(|e| e.to_string())?.into_owned();
        if path
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(format!(
                "entry {} would land outside the target",
                path.display()
            ));
        }
        let kind = e.header().entry_type();
        if !(kind.is_file() || kind.is_dir() || kind.is_symlink()) {
            return Err(format!(
                "entry {} is a {kind:?}, which an export never holds",
                path.display()
            ));
        }
        if !e
            .unpack_in(into)
            .map_err(|err| format!("cannot write {}: {err}", path.display()))?
        {
            return Err(format!(
                "entry {} would land outside the target",
                path.display()
            ));
        }
    }
    let mut reader = archive.into_inner();
    // The tar's end blocks and any padding are part of the hash.
    io::copy(&mut reader, &mut io::sink()).map_err(|e| e.to_string())?;
    Ok((reader.hasher.finalize().to_hex().to_string(), reader.bytes))
}

/// Takes the stream of transfer `id` and unpacks it into its partial
/// directory.
pub async fn receive(daemon: &Arc<Daemon>, id: &str, mut body: Body) -> Result<Value, ApiError> {
    let r = daemon.receives.find(id)?;
    {
        let mut stage = r.stage.lock();
        if *stage != Stage::Open {
            return Err(ApiError::conflict(format!(
                "transfer {id} already has its data"
            )));
        }
        *stage = Stage::Receiving;
    }
    let (tx, rx) = tokio::sync::mpsc::channel(IN_FLIGHT);
    let partial = r.partial.clone();
    let unpacker = tokio::task::spawn_blocking(move || {
        unpack(
            StreamReader {
                rx,
                cur: Bytes::new(),
                hasher: blake3::Hasher::new(),
                bytes: 0,
            },
            &partial,
        )
    });
    let mut broke = None;
    loop {
        match body.frame().await {
            None => break,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    *r.touched.lock() = Instant::now();
                    if tx.send(Ok(data)).await.is_err() {
                        // The unpacker stopped early; it says why.
                        break;
                    }
                }
            }
            Some(Err(e)) => {
                let _ = tx
                    .send(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        e.to_string(),
                    )))
                    .await;
                broke = Some(e.to_string());
                break;
            }
        }
    }
    drop(tx);
    let unpacked = unpacker.await;
    let fail = |why: String| {
        daemon.receives.discard(id);
        log(format!(
            "transfer {id} failed: {why}; its partial data is removed"
        ));
        Err(ApiError::bad_request(format!("{why}; nothing was kept")))
    };
    match (broke, unpacked) {
        (Some(e), _) => fail(format!("the stream broke off: {e}")),
        (None, Ok(Ok((blake3, bytes)))) => {
            *r.stage.lock() = Stage::Received {
                blake3: blake3.clone(),
                bytes,
            };
            *r.touched.lock() = Instant::now();
            Ok(json!({"id": id, "bytes": bytes, "blake3": blake3}))
        }
        (None, Ok(Err(e))) => fail(format!("the stream is not a valid export: {e}")),
        (None, Err(e)) => fail(format!("the unpacker failed: {e}")),
    }
}

/// Compares the sender's hash with the one computed here and renames the
/// entries into place; a mismatch removes them.
pub fn commit(daemon: &Daemon, id: &str, req: &CommitRequest) -> Result<Value, ApiError> {
    let r = daemon.receives.find(id)?;
    let (blake3, bytes) = match &*r.stage.lock() {
        Stage::Received { blake3, bytes } => (blake3.clone(), *bytes),
        _ => {
            return Err(ApiError::conflict(format!(
                "transfer {id} has not received its data yet"
            )))
        }
    };
    if blake3 != req.blake3.to_ascii_lowercase() || bytes != req.bytes {
        daemon.receives.discard(id);
        log(format!(
            "transfer {id}: checksum mismatch, its partial data is removed"
        ));
        return Err(ApiError::conflict(format!(
            "checksum mismatch: the sender sent {} bytes hashing to {}, {bytes} bytes arrived hashing to {blake3}; nothing was kept",
            req.bytes, req.blake3
        )));
    }
    let result = (|| -> Result<Vec<String>, String> {
        // On disk before it gets its final names.
        crate::host::sync_filesystem(&r.partial)
            .map_err(|e| format!("cannot sync {}: {e}", r.partial.display()))?;
        let mut names: Vec<String> = std::fs::read_dir(&r.partial)
            .map_err(|e| e.to_string())?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for n in &names {
            let fin = r.dir.join(n);
            if fin.symlink_metadata().is_ok() {
                if !r.overwrite {
                    return Err(format!(
                        "{} appeared during the transfer (give overwrite to replace it)",
                        fin.display()
                    ));
                }
                let gone = if fin.is_dir() && !fin.is_symlink() {
                    std::fs::remove_dir_all(&fin)
                } else {
                    std::fs::remove_file(&fin)
                };
                gone.map_err(|e| format!("cannot replace {}: {e}", fin.display()))?;
            }
            std::fs::rename(r.partial.join(n), &fin)
                .map_err(|e| format!("cannot move into {}: {e}", fin.display()))?;
        }
        Ok(names)
    })();
    daemon.receives.discard(id);
    match result {
        Ok(names) => {
            log(format!(
                "transfer {id}: {bytes} bytes checked (blake3 {blake3}) and kept in {}",
                r.dir.display()
            ));
            Ok(json!({
                "id": id,
                "dir": r.dir.display().to_string(),
                "written": names,
                "bytes": bytes,
            }))
        }
        Err(e) => Err(ApiError::conflict(e)),
    }
}

/// `DELETE /receive/{id}`.
pub fn abandon(daemon: &Daemon, id: &str) -> Result<Value, ApiError> {
    if !daemon.receives.discard(id) {
        return Err(ApiError::not_found(format!("unknown transfer {id:?}")));
    }
    log(format!("transfer {id} dropped by its sender"));
    Ok(json!({"id": id, "dropped": true}))
}

/// Removes partial directories a previous daemon (or a killed export)
/// left below the restore targets; returns how many.
pub fn clear_stale(targets: &[PathBuf]) -> usize {
    fn walk(dir: &Path, depth: usize, removed: &mut usize) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(ft) = e.file_type() else { continue };
            if !ft.is_dir() {
                continue;
            }
            if name.starts_with(".flr-partial-") {
                if crate::export::partial_is_stale(&name)
                    && std::fs::remove_dir_all(e.path()).is_ok()
                {
                    log(format!(
                        "removed {} left by an export that did not finish",
                        e.path().display()
                    ));
                    *removed += 1;
                }
            } else if depth > 1 {
                walk(&e.path(), depth - 1, removed);
            }
        }
    }
    let mut removed = 0;
    for t in targets {
        walk(t, STALE_DEPTH, &mut removed);
    }
    removed
}
