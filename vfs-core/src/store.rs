//! The object-store trait the repository is written against, and an
//! in-memory implementation for tests. The local-disk store is in
//! [`crate::local_store`]; the S3 store lives in the `backends` crate.
//!
//! Objects are immutable: `put` creates a whole object atomically (readers
//! see all of it or nothing) and never replaces one: a key that exists is
//! `AlreadyExists` on every store. A remote store may instead accept a key
//! that already holds exactly the bytes given: a retried write whose first
//! attempt did land must not turn into a failure.

use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::error::{Error, Result};

/// Requests a remote store sent, by kind, and the bytes they moved: a
/// user of an object store pays per request and per byte.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RequestCounts {
    /// Whole-object GETs.
    pub get: u64,
    /// GETs of a byte range.
    pub range_get: u64,
    pub put: u64,
    pub list: u64,
    pub head: u64,
    pub delete: u64,
    /// Other requests (multipart upload steps, for instance).
    pub other: u64,
    /// Requests answered with a server error (5xx, 429) or not answered
    /// at all; each was retried or reported. Included in the counts above.
    pub failed: u64,
    /// Bytes of request bodies sent.
    pub bytes_up: u64,
    /// Bytes of response bodies, as their `Content-Length` declares.
    pub bytes_down: u64,
}

impl RequestCounts {
    pub fn total(&self) -> u64 {
        self.get + self.range_get + self.put + self.list + self.head + self.delete + self.other
    }

    /// The requests sent since `earlier` was taken.
    pub fn since(&self, earlier: &RequestCounts) -> RequestCounts {
        RequestCounts {
            get: self.get - earlier.get,
            range_get: self.range_get - earlier.range_get,
            put: self.put - earlier.put,
            list: self.list - earlier.list,
            head: self.head - earlier.head,
            delete: self.delete - earlier.delete,
            other: self.other - earlier.other,
            failed: self.failed - earlier.failed,
            bytes_up: self.bytes_up - earlier.bytes_up,
            bytes_down: self.bytes_down - earlier.bytes_down,
        }
    }
}

/// Bytes handed out by a store, shared cheaply between readers.
#[derive(Clone)]
pub struct ObjectBytes(pub Arc<Vec<u8>>);

impl Deref for ObjectBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

pub trait ObjectStore: Send + Sync {
    /// A human-readable location, used in messages.
    fn location(&self) -> String;
    /// Stores a whole object durably under a new `key`. Fails with
    /// `AlreadyExists` if the key exists (or may return `Ok` if it holds
    /// exactly `data`), atomically with respect to other writers where the
    /// store can: no write ever replaces an object (see
    /// [`crate::repo::Repository::put_once`] for writes that may meet an
    /// identical object).
    fn put(&self, key: &str, data: &[u8]) -> Result<()>;
    /// Reads a whole object.
    fn get(&self, key: &str) -> Result<Vec<u8>>;
    /// Reads `len` bytes at `offset`; fails if the object is shorter.
    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<ObjectBytes>;
    /// Size of an object, or `None` if it does not exist.
    fn size(&self, key: &str) -> Result<Option<u64>>;
    /// Keys under a prefix ending in '/', recursively, in sorted order.
    fn list(&self, prefix: &str) -> Result<Vec<String>>;
    /// Keys under a prefix with their sizes, as [`Self::list`] orders them.
    /// A store whose listing carries sizes answers in its listing's
    /// requests; by default each key is asked for its size, and a key
    /// removed since the listing is left out.
    fn list_sizes(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        for key in self.list(prefix)? {
            if let Some(n) = self.size(&key)? {
                out.push((key, n));
            }
        }
        Ok(out)
    }
    /// Removes an object; removing a missing object is not an error.
    fn delete(&self, key: &str) -> Result<()>;

    /// Where the object `key` can be read as a local file, for a store
    /// that keeps its objects in one (read through a mapping there).
    fn local_path(&self, _key: &str) -> Option<std::path::PathBuf> {
        None
    }

    /// A new path for a temporary file that [`Self::put_file`] can move
    /// into place without copying; `None` where any local directory does.
    fn temp_file_path(&self) -> Option<std::path::PathBuf> {
        None
    }

    /// Stores the synced file at `path` as `key`, create-only like
    /// [`Self::put`], and removes the file, for objects too large to hold
    /// in memory. By default the file is read whole and put.
    fn put_file(&self, key: &str, path: &std::path::Path) -> Result<()> {
        let data = std::fs::read(path).map_err(|e| crate::error::Error::io(path, e))?;
        let _ = std::fs::remove_file(path);
        self.put(key, &data)
    }
    /// The requests sent so far, for stores reached over a network;
    /// `None` for a local store, which pays nothing per request.
    fn requests(&self) -> Option<RequestCounts> {
        None
    }
    /// How many whole-object writes are worth running at once: one for a
    /// local disk, more for a store where each write waits a round trip.
    fn write_concurrency(&self) -> usize {
        1
    }
    /// Size at which a writer closes a pack: larger where every object
    /// costs a request, so that a backup sends fewer of them.
    fn pack_size(&self) -> usize {
        crate::format::PACK_TARGET_SIZE
    }
}

/// An object store in memory, for tests.
#[derive(Default)]
pub struct MemoryStore {
    objects: RwLock<BTreeMap<String, Arc<Vec<u8>>>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces an object's bytes, to simulate damage in tests.
    pub fn tamper(&self, key: &str, f: impl FnOnce(&mut Vec<u8>)) {
        let mut objects = self.objects.write();
        let obj = objects.get_mut(key).expect("tamper: no such object");
        let mut bytes = (**obj).clone();
        f(&mut bytes);
        *obj = Arc::new(bytes);
    }
}

impl ObjectStore for MemoryStore {
    fn location(&self) -> String {
        "memory".into()
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        let mut objects = self.objects.write();
        if objects.contains_key(key) {
            return Err(Error::AlreadyExists(key.to_string()));
        }
        objects.insert(key.to_string(), Arc::new(data.to_vec()));
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        self.objects
            .read()
            .get(key)
            .map(|v| (**v).clone())
            .ok_or_else(|| Error::NotFound(key.to_string()))
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<ObjectBytes> {
        let objects = self.objects.read();
        let obj = objects
            .get(key)
            .ok_or_else(|| Error::NotFound(key.to_string()))?;
        let start = offset as usize;
        if start.checked_add(len).is_none_or(|end| end > obj.len()) {
            return Err(Error::malformed(key, "range beyond the end of the object"));
        }
        Ok(ObjectBytes(Arc::new(obj[start..start + len].to_vec())))
    }

    fn size(&self, key: &str) -> Result<Option<u64>> {
        Ok(self.objects.read().get(key).map(|v| v.len() as u64))
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .list_sizes(prefix)?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }

    fn list_sizes(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        Ok(self
            .objects
            .read()
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.len() as u64))
            .collect())
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.objects.write().remove(key);
        Ok(())
    }
}
