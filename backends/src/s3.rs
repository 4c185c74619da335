//! The object store on S3-compatible storage (AWS S3, Garage, Ceph RGW,
//! MinIO, ...), through the `object_store` crate.
//!
//! - Keys map to `<prefix>/<key>` in one bucket.
//! - Writes are single PUTs (packs are at most a few tens of MiB, far below
//!   the 5 GiB a PUT takes, and one PUT is atomic where a multipart upload
//!   would cost three requests or more) sent with `If-None-Match: *`, so a
//!   server that honours conditional writes refuses to replace an object.
//!   Correctness does not rest on it: every object's name covers its
//!   content (packs and index files are named by hash, manifests by job and
//!   second, checked with a HEAD before the write), so a server that
//!   ignores the condition can only overwrite an object with the same
//!   bytes, or lose a same-second race between two hosts backing up the
//!   same job.
//! - A write that meets an existing object reads it back, and accepts it
//!   if it holds exactly the bytes written: a retried write whose first
//!   attempt landed is a success, not a conflict.
//! - Requests are retried with exponential backoff, inside `object_store`
//!   (5xx, 429, connection failures) and around it (anything else that is
//!   not a definite answer such as "not found"). Every request is
//!   idempotent: a GET or HEAD changes nothing, a PUT carries the whole
//!   object under a name that covers it, a DELETE of a missing object
//!   succeeds.
//! - The [`ObjectStore`] trait is synchronous. Requests run on a tokio
//!   runtime this store owns; a caller hands the request over and waits on
//!   a plain channel, so it may be any thread, including a thread of
//!   another tokio runtime (where `Runtime::block_on` would panic).
//! - Every HTTP request is counted by kind, with its bytes, below the retry
//!   layer, so retries count too: [`ObjectStore::requests`].
//! - Credentials are kept in [`Secret`]s, which never print: not in
//!   `Debug`, not in errors (messages from the client are scrubbed of them
//!   as well), not in logs.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpRequest, HttpResponse, HttpService, ReqwestConnector,
};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore as _, ObjectStoreExt as _, PutMode, PutOptions,
    PutPayload, RetryConfig,
};
use serde::Deserialize;
use vfs_core::store::{ObjectBytes, ObjectStore, RequestCounts};
use vfs_core::{Error, Result};

/// A credential: readable by the code that signs requests, printed by
/// nothing.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How to reach the S3 service: endpoint, region and credentials. Each one
/// left out is taken from the environment ([`S3Settings::from_env`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Settings {
    /// `https://host[:port]` of an S3-compatible service; AWS when absent.
    /// A custom endpoint is addressed path-style (`endpoint/bucket/key`),
    /// which every S3-compatible engine serves; plain `http://` is allowed
    /// to loopback addresses only.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    pub session_token: Option<Secret>,
}

impl S3Settings {
    /// `AWS_ENDPOINT_URL`, `AWS_REGION` (or `AWS_DEFAULT_REGION`),
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        S3Settings {
            endpoint: var("AWS_ENDPOINT_URL"),
            region: var("AWS_REGION").or_else(|| var("AWS_DEFAULT_REGION")),
            access_key_id: var("AWS_ACCESS_KEY_ID"),
            secret_access_key: var("AWS_SECRET_ACCESS_KEY").map(Secret),
            session_token: var("AWS_SESSION_TOKEN").map(Secret),
        }
    }

    /// These settings, with each one left out taken from `fallback`.
    pub fn or(self, fallback: S3Settings) -> S3Settings {
        S3Settings {
            endpoint: self.endpoint.or(fallback.endpoint),
            region: self.region.or(fallback.region),
            access_key_id: self.access_key_id.or(fallback.access_key_id),
            secret_access_key: self.secret_access_key.or(fallback.secret_access_key),
            session_token: self.session_token.or(fallback.session_token),
        }
    }

    /// The strings that must never appear in output.
    fn secrets(&self) -> Vec<String> {
        [&self.secret_access_key, &self.session_token]
            .into_iter()
            .flatten()
            .map(|s| s.0.clone())
            .filter(|s| !s.is_empty())
            .collect()
    }
}

/// A bucket and a key prefix: `s3://BUCKET/PREFIX`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct S3Location {
    pub bucket: String,
    /// Without leading or trailing '/'; empty for the bucket's root.
    pub prefix: String,
}

impl std::fmt::Display for S3Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.prefix.is_empty() {
            write!(f, "s3://{}", self.bucket)
        } else {
            write!(f, "s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// Concurrent pack uploads a backup runs against an object store: enough
/// to hide a round trip per pack, few enough that the packs in flight stay
/// a bounded amount of memory (one per upload, one queued, one filling:
/// 5 x 64 MiB).
const WRITE_CONCURRENCY: usize = 3;

/// Packs on object storage are twice the local size: every pack is two
/// requests (the pack and its index file), and a user pays per request.
/// Reads fetch frames by range, so a pack's size costs them nothing.
const PACK_SIZE: usize = 64 << 20;

/// Attempts of a request around `object_store`'s own retries, and the
/// first pause between them (doubled each time).
const ATTEMPTS: u32 = 4;
const FIRST_PAUSE: Duration = Duration::from_millis(200);

/// Counters of the requests sent, by kind (see [`RequestCounts`]).
#[derive(Debug, Default)]
struct Counters {
    get: AtomicU64,
    range_get: AtomicU64,
    put: AtomicU64,
    list: AtomicU64,
    head: AtomicU64,
    delete: AtomicU64,
    other: AtomicU64,
    failed: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> RequestCounts {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RequestCounts {
            get: n(&self.get),
            range_get: n(&self.range_get),
            put: n(&self.put),
            list: n(&self.list),
            head: n(&self.head),
            delete: n(&self.delete),
            other: n(&self.other),
            failed: n(&self.failed),
            bytes_up: n(&self.bytes_up),
            bytes_down: n(&self.bytes_down),
        }
    }

    fn count(&self, req: &HttpRequest) {
        let query = req.uri().query().unwrap_or("");
        let counter = match req.method().as_str() {
            "GET" if query.contains("list-type") || query.contains("prefix=") => &self.list,
            "GET" if req.headers().contains_key("range") => &self.range_get,
            "GET" => &self.get,
            "PUT" if !query.contains("uploadId") => &self.put,
            "HEAD" => &self.head,
            // `object_store` deletes through the bulk API, one POST
            // `?delete` per call.
            "DELETE" => &self.delete,
            "POST" if query.split('&').any(|q| q == "delete" || q == "delete=") => &self.delete,
            _ => &self.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.bytes_up
            .fetch_add(req.body().content_length() as u64, Ordering::Relaxed);
    }
}

/// The HTTP client under `object_store`, counting what goes through it.
#[derive(Debug)]
struct CountingConnector(Arc<Counters>);

#[derive(Debug)]
struct CountingService {
    inner: HttpClient,
    counters: Arc<Counters>,
}

impl HttpConnector for CountingConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(CountingService {
            inner,
            counters: self.0.clone(),
        }))
    }
}

#[async_trait::async_trait]
impl HttpService for CountingService {
    async fn call(&self, req: HttpRequest) -> std::result::Result<HttpResponse, HttpError> {
        self.counters.count(&req);
        // A HEAD answer declares the object's length but carries no body.
        let has_body = req.method().as_str() != "HEAD";
        let answer = self.inner.execute(req).await;
        match &answer {
            Ok(resp) => {
                // "Not found" and "precondition failed" are answers; what
                // counts as failed is what a retry is for.
                let status = resp.status();
                if status.is_server_error() || status.as_u16() == 429 {
                    self.counters.failed.fetch_add(1, Ordering::Relaxed);
                }
                let declared = resp
                    .headers()
                    .get("content-length")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
                if has_body {
                    self.counters
                        .bytes_down
                        .fetch_add(declared, Ordering::Relaxed);
                }
            }
            Err(_) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        answer
    }
}

pub struct S3Store {
    /// `Some` until drop, which shuts it down without waiting (a runtime
    /// dropped on another runtime's thread would panic).
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    client: Arc<AmazonS3>,
    location: S3Location,
    counters: Arc<Counters>,
    /// Credentials to scrub from messages.
    secrets: Arc<Vec<String>>,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store")
            .field("location", &self.location.to_string())
            .finish_non_exhaustive()
    }
}

impl Drop for S3Store {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// What a failed attempt means for the next one.
enum Failure {
    /// A definite answer: retrying gives the same.
    Final(Error),
    /// Perhaps passing (a reset connection, a server error past the
    /// client's own retries).
    Passing(Error),
}

impl S3Store {
    /// Connects to `location` (no request is sent until the first use).
    pub fn open(location: S3Location, settings: &S3Settings) -> Result<S3Store> {
        if location.bucket.is_empty() {
            return Err(Error::InvalidInput(format!("{location}: no bucket named")));
        }
        let counters = Arc::new(Counters::default());
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&location.bucket)
            .with_region(settings.region.as_deref().unwrap_or("us-east-1"))
            .with_http_connector(CountingConnector(counters.clone()))
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(5),
                    base: 2.0,
                },
                max_retries: 6,
                retry_timeout: Duration::from_secs(60),
            })
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(10))
                    .with_timeout(Duration::from_secs(120)),
            );
        match &settings.endpoint {
            Some(endpoint) => {
                let plain_http = endpoint.starts_with("http://");
                if plain_http && !is_loopback_url(endpoint) {
                    return Err(Error::InvalidInput(format!(
                        "S3 endpoint {endpoint}: plain http is allowed to loopback addresses only; use https"
                    )));
                }
                builder = builder
                    .with_endpoint(endpoint)
                    .with_allow_http(plain_http)
                    // A custom endpoint is rarely set up for bucket
                    // subdomains; every engine serves path-style requests.
                    .with_virtual_hosted_style_request(false);
            }
            None => builder = builder.with_virtual_hosted_style_request(true),
        }
        if let Some(id) = &settings.access_key_id {
            builder = builder.with_access_key_id(id);
        }
        if let Some(secret) = &settings.secret_access_key {
            builder = builder.with_secret_access_key(secret.expose());
        }
        if let Some(token) = &settings.session_token {
            builder = builder.with_token(token.expose());
        }
        let secrets = Arc::new(settings.secrets());
        let client = builder.build().map_err(|e| {
            Error::InvalidInput(format!("{location}: {}", scrub(&e.to_string(), &secrets)))
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("flr-s3")
            .enable_all()
            .build()
            .map_err(|e| Error::io("S3 client runtime", e))?;
        Ok(S3Store {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
            client: Arc::new(client),
            location,
            counters,
            secrets,
        })
    }

    /// Keys under `prefix` (relative to the repository's prefix) with
    /// their sizes, sorted: one listing, which pages by itself.
    fn list_meta(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let trimmed = prefix.trim_end_matches('/');
        let base = if self.location.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.location.prefix)
        };
        let full = format!("{base}{trimmed}");
        let full = full.trim_end_matches('/');
        let list_path = if full.is_empty() {
            None
        } else {
            Some(ObjectPath::parse(full).map_err(|e| {
                Error::InvalidInput(format!("{}: bad prefix {prefix:?}: {e}", self.location))
            })?)
        };
        let client = self.client.clone();
        let keys = self.with_retries(prefix, || {
            let (client, list_path) = (client.clone(), list_path.clone());
            async move {
                client
                    .list(list_path.as_ref())
                    .map_ok(|meta| (meta.location.to_string(), meta.size))
                    .try_collect::<Vec<(String, u64)>>()
                    .await
            }
        })?;
        let mut out: Vec<(String, u64)> = keys
            .into_iter()
            .filter_map(|(k, n)| Some((k.strip_prefix(&base)?.to_string(), n)))
            .filter(|(k, _)| k.starts_with(prefix))
            .collect();
        out.sort();
        Ok(out)
    }

    pub fn location_of(&self) -> &S3Location {
        &self.location
    }

    fn path(&self, key: &str) -> Result<ObjectPath> {
        let full = if self.location.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.location.prefix)
        };
        ObjectPath::parse(&full)
            .map_err(|e| Error::InvalidInput(format!("{}: bad key {key:?}: {e}", self.location)))
    }

    /// Runs a request on the store's runtime and waits for it on a plain
    /// channel, whatever thread this is.
    fn run<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> Result<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| Error::Storage(format!("{}: the S3 client has stopped", self.location)))
    }

    /// Turns a client error into ours, naming the object and keeping
    /// credentials out of the message.
    fn failure(&self, key: &str, e: object_store::Error) -> Failure {
        use object_store::Error as E;
        let what = format!("{}/{key}", self.location);
        let message = scrub(&e.to_string(), &self.secrets);
        match e {
            E::NotFound { .. } => Failure::Final(Error::NotFound(what)),
            E::AlreadyExists { .. } | E::Precondition { .. } | E::NotModified { .. } => {
                Failure::Final(Error::AlreadyExists(what))
            }
            E::PermissionDenied { .. } | E::Unauthenticated { .. } => Failure::Final(Error::io(
                what,
                std::io::Error::new(std::io::ErrorKind::PermissionDenied, message),
            )),
            E::InvalidPath { .. } | E::NotSupported { .. } | E::NotImplemented { .. } => {
                Failure::Final(Error::InvalidInput(format!("{what}: {message}")))
            }
            // A 4xx answer past the cases above (a bad request, a missing
            // bucket) is as definite as they are.
            _ if message.contains("status code: 4") => {
                Failure::Final(Error::io(what, std::io::Error::other(message)))
            }
            _ => Failure::Passing(Error::io(what, std::io::Error::other(message))),
        }
    }

    /// Runs `attempt` until it gives a definite answer or the attempts
    /// run out, pausing longer after each passing failure.
    fn with_retries<T: Send + 'static, F>(&self, key: &str, attempt: impl Fn() -> F) -> Result<T>
    where
        F: Future<Output = object_store::Result<T>> + Send + 'static,
    {
        let mut pause = FIRST_PAUSE;
        let mut tries = 0;
        loop {
            tries += 1;
            match self.run(attempt())? {
                Ok(v) => return Ok(v),
                Err(e) => match self.failure(key, e) {
                    Failure::Final(e) => return Err(e),
                    Failure::Passing(e) if tries >= ATTEMPTS => return Err(e),
                    Failure::Passing(e) => {
                        tracing::warn!("{e}; trying again in {} ms", pause.as_millis());
                        std::thread::sleep(pause);
                        pause *= 2;
                    }
                },
            }
        }
    }
}

/// Whether an `http://` URL names a loopback host.
fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or("");
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        authority.split(':').next().unwrap_or("")
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `message` with every credential in it replaced.
fn scrub(message: &str, secrets: &[String]) -> String {
    let mut out = message.to_string();
    for s in secrets {
        out = out.replace(s.as_str(), "<redacted>");
    }
    out
}

impl ObjectStore for S3Store {
    fn location(&self) -> String {
        self.location.to_string()
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        let path = self.path(key)?;
        // One copy, shared by every attempt.
        let payload = PutPayload::from(data.to_vec());
        let client = self.client.clone();
        let created = self.with_retries(key, || {
            let (client, path, payload) = (client.clone(), path.clone(), payload.clone());
            async move {
                let opts = PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                };
                client.put_opts(&path, payload, opts).await.map(|_| ())
            }
        });
        match created {
            Err(Error::AlreadyExists(what)) => match self.get(key) {
                Ok(existing) if existing == data => Ok(()),
                Ok(_) => Err(Error::AlreadyExists(what)),
                Err(e) => Err(e),
            },
            other => other,
        }
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        let path = self.path(key)?;
        let client = self.client.clone();
        self.with_retries(key, || {
            let (client, path) = (client.clone(), path.clone());
            async move {
                let bytes = client.get(&path).await?.bytes().await?;
                Ok(bytes.to_vec())
            }
        })
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<ObjectBytes> {
        if len == 0 {
            return Ok(ObjectBytes(Arc::new(Vec::new())));
        }
        let path = self.path(key)?;
        let client = self.client.clone();
        let end = offset
            .checked_add(len as u64)
            .ok_or_else(|| Error::malformed(key, "range beyond the end of the object"))?;
        let got = self.with_retries(key, || {
            let (client, path) = (client.clone(), path.clone());
            async move { client.get_range(&path, offset..end).await }
        });
        let bytes = match got {
            Ok(b) => b,
            // A range that starts past the end is refused by the server.
            Err(Error::Io { source, .. }) if source.to_string().contains("416") => {
                return Err(Error::malformed(
                    key,
                    format!("truncated: {len} bytes at offset {offset} requested"),
                ))
            }
            Err(e) => return Err(e),
        };
        if bytes.len() != len {
            return Err(Error::malformed(
                key,
                format!(
                    "truncated: {len} bytes at offset {offset} requested, {} returned",
                    bytes.len()
                ),
            ));
        }
        Ok(ObjectBytes(Arc::new(bytes.to_vec())))
    }

    fn size(&self, key: &str) -> Result<Option<u64>> {
        let path = self.path(key)?;
        let client = self.client.clone();
        match self.with_retries(key, || {
            let (client, path) = (client.clone(), path.clone());
            async move { client.head(&path).await.map(|m| m.size) }
        }) {
            Ok(n) => Ok(Some(n)),
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .list_meta(prefix)?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }

    fn list_sizes(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        self.list_meta(prefix)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        let client = self.client.clone();
        match self.with_retries(key, || {
            let (client, path) = (client.clone(), path.clone());
            async move { client.delete(&path).await }
        }) {
            Err(Error::NotFound(_)) => Ok(()),
            other => other,
        }
    }

    fn requests(&self) -> Option<RequestCounts> {
        Some(self.counters.snapshot())
    }

    fn write_concurrency(&self) -> usize {
        WRITE_CONCURRENCY
    }

    fn pack_size(&self) -> usize {
        PACK_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_urls_are_told_apart() {
        for url in [
            "http://127.0.0.1:9000",
            "http://localhost:9000/",
            "http://[::1]:80",
            "http://127.8.0.1",
        ] {
            assert!(is_loopback_url(url), "{url}");
        }
        for url in [
            "http://10.0.0.1:9000",
            "http://example.com",
            "http://127.0.0.1.example.com",
        ] {
            assert!(!is_loopback_url(url), "{url}");
        }
    }

    #[test]
    fn secrets_never_print() {
        let s = S3Settings {
            secret_access_key: Some(Secret::new("hunter2-secret")),
            session_token: Some(Secret::new("token-xyz")),
            ..Default::default()
        };
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("token-xyz"),
            "{shown}"
        );
        assert_eq!(
            scrub("sig hunter2-secret and token-xyz", &s.secrets()),
            "sig <redacted> and <redacted>"
        );
    }

    #[test]
    fn plain_http_to_another_host_is_refused() {
        let settings = S3Settings {
            endpoint: Some("http://192.0.2.1:9000".into()),
            ..Default::default()
        };
        let loc = S3Location {
            bucket: "b".into(),
            prefix: "p".into(),
        };
        let err = S3Store::open(loc, &settings).unwrap_err();
        assert!(err.to_string().contains("loopback"), "{err}");
    }
}
