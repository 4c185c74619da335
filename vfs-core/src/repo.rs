//! The repository: config and keys, the in-memory chunk index, reading
//! chunks (raw and decoded as separate steps) and restore points.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use crate::crypto::{EncryptionConfig, Keys};
use crate::error::{Error, Result};
use crate::format::{self, CHUNK_ZSTD, FLAG_SEALED, FLAG_ZSTD};
use crate::ids::{ChunkHasher, ChunkId, IdMap, PackId};
use crate::manifest::{validate_job_name, Manifest};
use crate::merged_index::{
    merged_index_key, merged_index_name, MergedIndex, MergedIndexKeys, MergedIndexWriter,
};
use crate::store::{ObjectBytes, ObjectStore};

pub const CONFIG_KEY: &str = "config";

/// Chunks up to this size are compressed at the page level.
pub const PAGE_CHUNK_MAX: usize = 16 << 10;

fn default_page_level() -> i32 {
    1
}
pub const RESTORE_POINTS_PREFIX: &str = "restore-points/";
pub const INDEX_PREFIX: &str = "index/";
pub const PACKS_PREFIX: &str = "packs/";

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoConfig {
    pub version: u32,
    pub id: String,
    /// zstd level for chunks and metadata.
    pub compression_level: i32,
    /// zstd level for chunks of at most [`PAGE_CHUNK_MAX`] bytes (database
    /// pages). On 4 KiB pages of the benchmark database, level 1 compressed
    /// 45% faster than level 3 for a 1% larger result (`zstd -b -B4096`).
    #[serde(default = "default_page_level")]
    pub page_compression_level: i32,
    pub encryption: Option<EncryptionConfig>,
}

/// Where a chunk is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkLoc {
    /// Index into the repository's pack table.
    pub pack: u32,
    /// The stored frame holding the chunk: offset and length in the pack.
    pub offset: u32,
    pub stored_len: u32,
    pub raw_len: u32,
    pub flags: u8,
    /// Where the chunk starts in its frame's plaintext, and that
    /// plaintext's length.
    pub frame_offset: u32,
    pub frame_raw_len: u32,
}

/// One entry of an index file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    pub id: ChunkId,
    pub offset: u32,
    pub stored_len: u32,
    pub raw_len: u32,
    pub flags: u8,
    pub frame_offset: u32,
    pub frame_raw_len: u32,
}

impl ChunkLoc {
    /// The entry as an index file stores it.
    pub fn entry(&self, id: ChunkId) -> IndexEntry {
        IndexEntry {
            id,
            offset: self.offset,
            stored_len: self.stored_len,
            raw_len: self.raw_len,
            flags: self.flags,
            frame_offset: self.frame_offset,
            frame_raw_len: self.frame_raw_len,
        }
    }

    /// The key of this chunk's decoded frame in caches: a hash of the pack
    /// and of everything that says how the frame is read and decoded
    /// (offset, stored length, flags, plaintext length). Two different
    /// frames never share a key, even if an index disagreed with its pack.
    pub fn frame_key(&self, pack: &PackId) -> ChunkId {
        let mut h = blake3::Hasher::new();
        h.update(&pack.0);
        h.update(&self.offset.to_le_bytes());
        h.update(&self.stored_len.to_le_bytes());
        h.update(&[self.flags]);
        h.update(&self.frame_raw_len.to_le_bytes());
        ChunkId(*h.finalize().as_bytes())
    }
}

impl IndexEntry {
    pub fn loc(&self, pack: u32) -> ChunkLoc {
        ChunkLoc {
            pack,
            offset: self.offset,
            stored_len: self.stored_len,
            raw_len: self.raw_len,
            flags: self.flags,
            frame_offset: self.frame_offset,
            frame_raw_len: self.frame_raw_len,
        }
    }
}

/// A pack's own entry table, stored inside the pack (see
/// [`format::PACK_TRAILER_LEN`]); the index file is a copy of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackTable {
    pub entries: Vec<IndexEntry>,
}

/// The contents of `index/<pack>.idx`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexFile {
    pub pack: PackId,
    pub pack_len: u64,
    pub entries: Vec<IndexEntry>,
}

/// The chunk index: chunk id to location, and the pack table. The packs a
/// merged index file covers are searched in that file, in place; the few
/// packs not merged yet are held in memory.
#[derive(Default)]
pub struct Index {
    recent: IdMap<ChunkLoc>,
    merged: Option<Arc<MergedIndex>>,
    /// Per pack number of the merged file: its number here, or `None` for
    /// a pack left out (its index file is gone, or the pack is).
    merged_packs: Vec<Option<u32>>,
    pub packs: Vec<PackId>,
    pack_numbers: HashMap<PackId, u32>,
    /// Packs left out because they are missing or damaged, as messages.
    pub problems: Vec<String>,
    /// Packs (by number) that a prune has listed for deletion: readable,
    /// but never reused by a writer ([`crate::lock`] says why).
    no_dedup: std::collections::HashSet<u32>,
    /// Packs held in memory, not covered by the merged file, with their
    /// lengths (to tell what a later listing adds).
    unmerged_lens: HashMap<PackId, u64>,
    /// The packs on a prune's pending list when the index was scanned.
    pending: HashSet<PackId>,
    /// Bumped by every scan or refresh that replaces or extends the index.
    generation: u64,
}

impl Index {
    /// Calls `each` with the locations of `id` in the merged file, in packs
    /// still present, until it returns true. A damaged block is logged and
    /// answers nothing: a backup then stores the chunk again, and a read
    /// fails, rather than trusting a location that failed its checksum.
    fn merged_locs(&self, id: &ChunkId, mut each: impl FnMut(ChunkLoc) -> bool) {
        let Some(m) = &self.merged else { return };
        let found = m.find(id, |pack, e| match self.merged_packs[pack as usize] {
            Some(n) => each(e.loc(n)),
            None => false,
        });
        if let Err(e) = found {
            tracing::warn!(error = %e, "merged index entry unreadable; run `flr repair index`");
        }
    }

    /// Where chunk `id` is stored, preferring a pack no prune is about to
    /// delete.
    pub fn get(&self, id: &ChunkId) -> Option<ChunkLoc> {
        let mut fallback = None;
        if let Some(loc) = self.recent.get(id) {
            if !self.no_dedup.contains(&loc.pack) {
                return Some(*loc);
            }
            fallback = Some(*loc);
        }
        let mut best = None;
        self.merged_locs(id, |loc| {
            if self.no_dedup.contains(&loc.pack) {
                fallback.get_or_insert(loc);
                false
            } else {
                best = Some(loc);
                true
            }
        });
        best.or(fallback)
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.get(id).is_some()
    }

    /// Whether a writer may reuse the stored chunk `id` instead of storing
    /// it again: it is indexed, in a pack no prune is about to delete. A
    /// chunk not in memory is looked up on disk only if the merged file's
    /// filter says it may be there.
    pub fn has_for_dedup(&self, id: &ChunkId) -> bool {
        if let Some(loc) = self.recent.get(id) {
            if !self.no_dedup.contains(&loc.pack) {
                return true;
            }
        }
        if !self.merged.as_ref().is_some_and(|m| m.may_contain(id)) {
            return false;
        }
        let mut found = false;
        self.merged_locs(id, |loc| {
            found = !self.no_dedup.contains(&loc.pack);
            found
        });
        found
    }

    /// Entries held in memory (of packs not merged yet).
    pub fn in_memory_len(&self) -> usize {
        self.recent.len()
    }

    /// The merged index file in use, if any.
    pub fn merged(&self) -> Option<&Arc<MergedIndex>> {
        self.merged.as_ref()
    }

    /// Packs whose entries are held in memory, not yet merged.
    pub fn unmerged_packs(&self) -> usize {
        self.unmerged_lens.len()
    }

    /// Keeps writers from reusing the chunks of `packs` from now on.
    pub fn exclude_from_dedup(&mut self, packs: &[PackId]) {
        for p in packs {
            if let Some(n) = self.pack_numbers.get(p) {
                self.no_dedup.insert(*n);
            }
        }
    }

    fn number(&mut self, pack: PackId) -> u32 {
        match self.pack_numbers.get(&pack) {
            Some(n) => *n,
            None => {
                let n = self.packs.len() as u32;
                self.packs.push(pack);
                self.pack_numbers.insert(pack, n);
                n
            }
        }
    }

    pub fn add_pack(&mut self, file: &IndexFile) {
        let n = self.number(file.pack);
        self.unmerged_lens.insert(file.pack, file.pack_len);
        for e in &file.entries {
            self.recent.entry(e.id).or_insert(e.loc(n));
        }
    }

    /// Uses `merged` for the packs of it that `keep` accepts.
    fn set_merged(&mut self, merged: Arc<MergedIndex>, mut keep: impl FnMut(&PackId) -> bool) {
        let mut map = Vec::with_capacity(merged.packs().len());
        for (pack, _) in merged.packs() {
            map.push(keep(pack).then(|| self.number(*pack)));
        }
        self.merged_packs = map;
        self.merged = Some(merged);
    }
}

/// One listing of the files the index is built from.
struct IndexListing {
    /// Packs on a prune's pending list.
    pending: HashSet<PackId>,
    /// Per-pack index files and their packs.
    idx_files: Vec<(String, PackId)>,
    listed: HashSet<PackId>,
    merged_keys: Vec<String>,
    /// Packs present, with their lengths.
    present: HashMap<PackId, u64>,
}

/// What one scan of the index found.
struct IndexScan {
    index: Index,
    /// The per-pack files read (not covered by the merged file).
    files: Vec<IndexFile>,
    /// Every merged file listed.
    merged_keys: Vec<String>,
}

/// What a merge starts from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeMode {
    /// The merged file in use plus the per-pack files it lacks.
    Incremental,
    /// Every per-pack file, ignoring merged files.
    Rebuild,
}

/// Steps of a merge after which a test can stop it, as a crash would.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeStep {
    /// The new file is complete in its temporary place, not yet stored.
    Finished,
    /// The new file is stored; the files it replaces are not removed yet.
    Written,
}

pub fn pack_key(pack: &PackId) -> String {
    let hex = pack.to_hex();
    format!("{PACKS_PREFIX}{}/{hex}.pack", &hex[..2])
}

pub fn index_key(pack: &PackId) -> String {
    format!("{INDEX_PREFIX}{}.idx", pack.to_hex())
}

/// A restore point's name, `job/timestamp`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RestorePointName {
    pub job: String,
    pub name: String,
}

impl RestorePointName {
    pub fn parse(s: &str) -> Result<Self> {
        let (job, name) = s.split_once('/').ok_or_else(|| {
            Error::InvalidInput(format!(
                "restore point {s:?} is not of the form JOB/TIMESTAMP"
            ))
        })?;
        validate_job_name(job)?;
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(Error::InvalidInput(format!(
                "invalid restore point name {s:?}"
            )));
        }
        Ok(RestorePointName {
            job: job.into(),
            name: name.into(),
        })
    }

    /// The name without the tag that tells two restore points of one
    /// name apart (see [`Repository::list_restore_points`]).
    pub fn base(&self) -> &str {
        split_tag(&self.name).0
    }
}

/// Hex digits in the tag of a manifest's key.
const MANIFEST_TAG_LEN: usize = 16;

/// Splits `NAME.TAG` into its name and tag; a name without a tag is
/// returned whole.
fn split_tag(name: &str) -> (&str, Option<&str>) {
    match name.rsplit_once('.') {
        Some((base, tag))
            if !base.is_empty()
                && tag.len() == MANIFEST_TAG_LEN
                && tag.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            (base, Some(tag))
        }
        _ => (name, None),
    }
}

/// The key of a manifest: `restore-points/JOB/NAME.TAG.rp`, or
/// `restore-points/JOB/NAME.rp` as repositories written before tags
/// have them.
fn manifest_key(job: &str, base: &str, tag: Option<&str>) -> String {
    match tag {
        Some(tag) => format!("{RESTORE_POINTS_PREFIX}{job}/{base}.{tag}.rp"),
        None => format!("{RESTORE_POINTS_PREFIX}{job}/{base}.rp"),
    }
}

/// The job, name and tag a manifest's key holds.
fn parse_manifest_key(key: &str) -> Option<(String, String, Option<String>)> {
    let rest = key
        .strip_prefix(RESTORE_POINTS_PREFIX)?
        .strip_suffix(".rp")?;
    let name = RestorePointName::parse(rest).ok()?;
    let (base, tag) = split_tag(&name.name);
    Some((name.job.clone(), base.to_string(), tag.map(str::to_string)))
}

impl std::fmt::Display for RestorePointName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.job, self.name)
    }
}

/// Encodes metadata as [`Repository::encode_meta`] does.
#[derive(Clone)]
pub struct MetaEncoder {
    keys: Option<Keys>,
    level: i32,
}

impl MetaEncoder {
    pub fn encode<T: Serialize>(&self, magic: [u8; 8], value: &T) -> Vec<u8> {
        let plain = postcard::to_stdvec(value).expect("metadata serializes");
        let mut payload = zstd::bulk::compress(&plain, self.level).expect("zstd in memory");
        let mut flags = FLAG_ZSTD;
        if let Some(keys) = &self.keys {
            payload = keys.seal_meta(&payload);
            flags |= FLAG_SEALED;
        }
        format::seal_envelope(magic, flags, &payload)
    }
}

pub struct Repository {
    store: Arc<dyn ObjectStore>,
    config: RepoConfig,
    keys: Option<Keys>,
    hasher: ChunkHasher,
    index: RwLock<Index>,
    /// Where the repository is, for messages (a path or a URL).
    location: String,
    /// Distinguishes this open repository from every other in this
    /// process, so per-thread state never carries a frame across them.
    instance: u64,
    /// Whether an unreadable index file fails [`Self::reload_index`].
    strict: bool,
    pack_target: AtomicUsize,
    /// Where merged index files of a remote store are copied to be read.
    merged_cache: Option<PathBuf>,
    /// The key of each restore point listed or written so far: the name
    /// alone does not give it (see [`Self::list_restore_points`]).
    manifest_keys: parking_lot::Mutex<HashMap<RestorePointName, String>>,
}

/// The last frame a thread decoded: (repository instance, frame key, bytes).
type KeptFrame = Option<(u64, ChunkId, Arc<Vec<u8>>)>;

static INSTANCES: AtomicU64 = AtomicU64::new(0);

/// Checks entries (of an index file or a pack's own table) against the
/// pack they describe, whose frames lie in `[PACK_HEADER_LEN, frames_end)`.
pub(crate) fn check_entries(what: &str, entries: &[IndexEntry], frames_end: u64) -> Result<()> {
    for e in entries {
        if e.raw_len > format::MAX_CHUNK_SIZE
            || e.frame_raw_len > format::MAX_CHUNK_SIZE
            || e.frame_offset as u64 + e.raw_len as u64 > e.frame_raw_len as u64
            || (e.offset as u64) < format::PACK_HEADER_LEN as u64
            || e.offset as u64 + e.stored_len as u64 > frames_end
            || e.flags & !CHUNK_ZSTD != 0
        {
            return Err(Error::malformed(
                what,
                format!("entry for chunk {} is out of bounds", e.id),
            ));
        }
    }
    Ok(())
}

thread_local! {
    static LAST_FRAME: std::cell::RefCell<KeptFrame> = const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<zstd::bulk::Decompressor<'static>> =
        std::cell::RefCell::new(zstd::bulk::Decompressor::new().expect("zstd context"));
}

impl Repository {
    /// Creates a new repository in an empty store.
    pub fn init(store: &dyn ObjectStore, password: Option<&[u8]>) -> Result<()> {
        Self::init_with_levels(store, password, 3, default_page_level())
    }

    /// Like [`Self::init`], with the zstd levels for page-sized chunks
    /// (`page_level`) and for everything else (`level`).
    pub fn init_with_levels(
        store: &dyn ObjectStore,
        password: Option<&[u8]>,
        level: i32,
        page_level: i32,
    ) -> Result<()> {
        for l in [level, page_level] {
            if !(-7..=19).contains(&l) {
                return Err(Error::InvalidInput(format!(
                    "compression level {l} is outside -7..=19"
                )));
            }
        }
        if store.size(CONFIG_KEY)?.is_some() {
            return Err(Error::AlreadyExists(format!(
                "repository at {}",
                store.location()
            )));
        }
        let encryption = match password {
            Some(p) => Some(Keys::create(p)?.1),
            None => None,
        };
        let config = RepoConfig {
            version: format::REPO_VERSION,
            id: crate::crypto::random_hex(16),
            compression_level: level,
            page_compression_level: page_level,
            encryption,
        };
        // The config is the one JSON file, so an operator can read the
        // version and encryption parameters with any tool.
        let json = serde_json::to_string_pretty(&config).expect("config serializes") + "\n";
        store.put(
            CONFIG_KEY,
            &format::seal_envelope(format::CONFIG_MAGIC, 0, json.as_bytes()),
        )
    }

    /// Opens a repository; `password` is asked only if it is encrypted.
    /// An index file that cannot be read fails the open: nothing is
    /// backed up or served over an index that may be missing entries.
    pub fn open(
        store: Arc<dyn ObjectStore>,
        password: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<Repository> {
        Self::open_inner(store, password, true)
    }

    /// Opens a repository whose index files may be damaged, for `verify`
    /// and `repair`: unreadable index files are left out and listed in
    /// [`Index::problems`] instead of failing the open.
    pub fn open_for_repair(
        store: Arc<dyn ObjectStore>,
        password: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<Repository> {
        Self::open_inner(store, password, false)
    }

    fn open_inner(
        store: Arc<dyn ObjectStore>,
        password: impl FnOnce() -> Result<Vec<u8>>,
        strict: bool,
    ) -> Result<Repository> {
        let location = store.location();
        let raw = match store.get(CONFIG_KEY) {
            Ok(raw) => raw,
            Err(Error::NotFound(_)) => {
                return Err(Error::NotFound(format!(
                    "repository at {location} (no config file; run `flr init` first)"
                )))
            }
            Err(e) => return Err(e),
        };
        let what = format!("{location}/config");
        let (_, payload) = format::open_envelope(&what, format::CONFIG_MAGIC, &raw)?;
        let config: RepoConfig = parse_config(&what, payload)?;
        if config.version != format::REPO_VERSION {
            return Err(Error::UnsupportedVersion {
                what,
                found: config.version,
                supported: format::REPO_VERSION,
            });
        }
        let keys = match &config.encryption {
            Some(enc) => Some(Keys::unlock(
                enc,
                &password()?,
                std::path::Path::new(&location),
            )?),
            None => None,
        };
        let hasher = match &keys {
            Some(k) => ChunkHasher::keyed(k.id_key),
            None => ChunkHasher::plain(),
        };
        let pack_size = store.pack_size();
        let repo = Repository {
            store,
            config,
            keys,
            hasher,
            index: RwLock::new(Index::default()),
            location,
            instance: INSTANCES.fetch_add(1, Ordering::Relaxed),
            strict,
            pack_target: AtomicUsize::new(pack_size),
            merged_cache: None,
            manifest_keys: Default::default(),
        };
        let mut repo = repo;
        if repo.store.local_path(CONFIG_KEY).is_none() && repo.location.starts_with("s3://") {
            repo.merged_cache = merged_cache_root().map(|d| d.join(&repo.config.id));
        }
        repo.reload_index()?;
        Ok(repo)
    }

    /// Where the repository is, for messages: a directory or an
    /// `s3://` URL.
    pub fn location(&self) -> &str {
        &self.location
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    pub fn is_encrypted(&self) -> bool {
        self.keys.is_some()
    }

    pub fn hasher(&self) -> &ChunkHasher {
        &self.hasher
    }

    pub fn keys(&self) -> Option<&Keys> {
        self.keys.as_ref()
    }

    pub fn index(&self) -> &RwLock<Index> {
        &self.index
    }

    /// Size at which a backup closes a pack (the store's
    /// [`ObjectStore::pack_size`]).
    pub fn pack_target(&self) -> usize {
        self.pack_target.load(Ordering::Relaxed)
    }

    /// Sets the pack size of later backups; tests use tiny packs to make
    /// repositories of many packs.
    pub fn set_pack_target(&self, bytes: usize) {
        self.pack_target.store(bytes.max(1), Ordering::Relaxed);
    }

    /// Writes an object that other writers may have written with the same
    /// name: create-only, and an existing object is accepted only if
    /// `same` says its bytes mean what ours do. Nothing is ever replaced.
    pub fn put_once(&self, key: &str, data: &[u8], same: impl Fn(&[u8]) -> bool) -> Result<()> {
        match self.store.put(key, data) {
            Err(Error::AlreadyExists(_)) => {
                let existing = self.store.get(key)?;
                if same(&existing) {
                    Ok(())
                } else {
                    Err(Error::Conflict(format!("{}/{key}", self.store.location())))
                }
            }
            other => other,
        }
    }

    /// Writes the index file of `file`'s pack, accepting an existing one
    /// only if it lists the same entries.
    pub fn put_index_file(&self, file: &IndexFile) -> Result<u64> {
        let key = index_key(&file.pack);
        let encoded = self.encode_meta(format::INDEX_MAGIC, file);
        self.put_once(&key, &encoded, |old| {
            self.decode_meta::<IndexFile>(&key, format::INDEX_MAGIC, old)
                .is_ok_and(|old| old == *file)
        })?;
        Ok(encoded.len() as u64)
    }

    /// Decodes a whole pack: header, trailer and its own entry table, each
    /// entry checked against the pack's bounds.
    pub fn parse_pack(&self, what: &str, bytes: &[u8]) -> Result<Vec<IndexEntry>> {
        format::check_pack_header(what, bytes)?;
        let len = bytes.len() as u64;
        let trailer = &bytes[bytes.len().saturating_sub(format::PACK_TRAILER_LEN)..];
        let (start, table_len) = format::parse_pack_trailer(what, len, trailer)?;
        let table = &bytes[start as usize..(start + table_len) as usize];
        self.decode_pack_table(what, start, table)
    }

    /// Reads only a pack's own entry table (its header, the trailer and the
    /// table), as `flr repair index` does: cheap even on large packs.
    pub fn read_pack_table(&self, pack: &PackId) -> Result<(u64, Vec<IndexEntry>)> {
        let key = pack_key(pack);
        let len = self
            .store
            .size(&key)?
            .ok_or_else(|| Error::NotFound(key.clone()))?;
        let head = self
            .store
            .get_range(&key, 0, format::PACK_HEADER_LEN.min(len as usize))?;
        format::check_pack_header(&key, &head)?;
        let tail_at = len.saturating_sub(format::PACK_TRAILER_LEN as u64);
        let trailer = self
            .store
            .get_range(&key, tail_at, (len - tail_at) as usize)?;
        let (start, table_len) = format::parse_pack_trailer(&key, len, &trailer)?;
        let table = self.store.get_range(&key, start, table_len as usize)?;
        Ok((len, self.decode_pack_table(&key, start, &table)?))
    }

    fn decode_pack_table(
        &self,
        what: &str,
        frames_end: u64,
        table: &[u8],
    ) -> Result<Vec<IndexEntry>> {
        let what = format!("{what} (entry table)");
        let table: PackTable = self.decode_meta(&what, format::PACK_TABLE_MAGIC, table)?;
        check_entries(&what, &table.entries, frames_end)?;
        Ok(table.entries)
    }

    /// Re-reads the index, replacing what was there: index files of other
    /// writers that appeared are picked up, those a prune removed are
    /// dropped. The merged index file covering the most packs is used in
    /// place (kept open if it is the one already in use), and only the
    /// per-pack files it does not cover are read. Packs on a prune's
    /// pending list (listed before the index files are read, see
    /// [`crate::lock`]) stay readable but are excluded from deduplication,
    /// and a chunk that is also in another pack is located there.
    pub fn reload_index(&self) -> Result<()> {
        // Most reloads only find packs added since the last: those are
        // read, and nothing else.
        if self.index.read().generation > 0 && self.refresh_index()? {
            return Ok(());
        }
        let mut attempts = 0;
        loop {
            match self.scan_index(false) {
                // A merged file that a merge replaced since the listing.
                Err(Error::NotFound(what))
                    if attempts < 5 && what.starts_with(format::MERGED_INDEX_PREFIX) =>
                {
                    attempts += 1;
                }
                Err(e) => return Err(e),
                Ok(mut scan) => {
                    {
                        let mut index = self.index.write();
                        scan.index.generation = index.generation + 1;
                        *index = std::mem::take(&mut scan.index);
                    }
                    // The per-pack files read, and the index replaced.
                    drop(scan);
                    crate::memory::release_freed();
                    return Ok(());
                }
            }
        }
    }

    /// What the index is built from, in one listing: the pending packs,
    /// the per-pack and merged index files, then the packs themselves with
    /// their sizes. Packs are listed last: a pack is stored before its
    /// index file, so the pack of every index file listed is in it unless
    /// it went since.
    fn list_index(&self) -> Result<IndexListing> {
        let pending = crate::lock::pending_pack_set(self)?;
        let keys = self.store.list(INDEX_PREFIX)?;
        let idx_files: Vec<(String, PackId)> = keys
            .into_iter()
            .filter_map(|k| {
                let id = k.strip_prefix(INDEX_PREFIX)?.strip_suffix(".idx")?;
                let id = PackId::from_hex(id)?;
                Some((k, id))
            })
            .collect();
        let listed = idx_files.iter().map(|(_, id)| *id).collect();
        let merged_keys = self
            .store
            .list(format::MERGED_INDEX_PREFIX)?
            .into_iter()
            .filter(|k| merged_index_name(k).is_some())
            .collect();
        let present = self
            .store
            .list_sizes(PACKS_PREFIX)?
            .into_iter()
            .filter_map(|(k, n)| Some((crate::verify::pack_id_of_key(&k)?, n)))
            .collect();
        Ok(IndexListing {
            pending,
            idx_files,
            listed,
            merged_keys,
            present,
        })
    }

    /// Extends the index with the per-pack index files listed since it was
    /// built, reading only those. Answers `false`, having changed nothing,
    /// where a full scan is needed: a pack or index file went or changed,
    /// another merged file is now the one to use, the packs a prune is
    /// deleting changed, the last scan found problems, or a new file is
    /// unreadable (the scan reports it).
    fn refresh_index(&self) -> Result<bool> {
        let listing = self.list_index()?;
        let mut problems = Vec::new();
        let chosen = self.choose_merged(&listing.merged_keys, &listing.listed, &mut problems)?;
        let (generation, new) = {
            let index = self.index.read();
            if !problems.is_empty()
                || !index.problems.is_empty()
                || index.pending != listing.pending
            {
                return Ok(false);
            }
            let covered: HashSet<PackId> = match (&chosen, &index.merged) {
                (None, None) => HashSet::new(),
                (Some(c), Some(m)) if c.key() == m.key() => {
                    let mut covered = HashSet::new();
                    for ((p, _), kept) in m.packs().iter().zip(&index.merged_packs) {
                        let keep = listing.listed.contains(p) && listing.present.contains_key(p);
                        if keep != kept.is_some() {
                            return Ok(false);
                        }
                        if listing.listed.contains(p) {
                            covered.insert(*p);
                        }
                    }
                    covered
                }
                _ => return Ok(false),
            };
            let unchanged = index
                .unmerged_lens
                .iter()
                .all(|(p, len)| listing.listed.contains(p) && listing.present.get(p) == Some(len));
            if !unchanged {
                return Ok(false);
            }
            let new: Vec<&String> = listing
                .idx_files
                .iter()
                .filter(|(_, p)| !covered.contains(p) && !index.unmerged_lens.contains_key(p))
                .map(|(k, _)| k)
                .collect();
            if new.is_empty() {
                return Ok(true);
            }
            (index.generation, new)
        };
        let files: Vec<Result<IndexFile>> = {
            use rayon::prelude::*;
            new.par_iter().map(|k| self.read_index_file(k)).collect()
        };
        let mut read = Vec::with_capacity(files.len());
        for f in files {
            match f {
                Ok(file)
                    if listing.present.get(&file.pack) == Some(&file.pack_len)
                        && !listing.pending.contains(&file.pack) =>
                {
                    read.push(file)
                }
                Ok(_) => return Ok(false),
                Err(e) if e.is_corruption() || matches!(e, Error::NotFound(_)) => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        let mut index = self.index.write();
        if index.generation != generation {
            return Ok(false);
        }
        for file in &read {
            index.add_pack(file);
        }
        index.generation += 1;
        tracing::debug!(packs = read.len(), "chunk index extended");
        Ok(true)
    }

    fn scan_index(&self, ignore_merged: bool) -> Result<IndexScan> {
        let IndexListing {
            pending,
            idx_files,
            listed,
            merged_keys,
            present,
        } = self.list_index()?;
        let mut index = Index::default();
        let mut covered = HashSet::new();
        let chosen = match ignore_merged {
            true => None,
            false => self.choose_merged(&merged_keys, &listed, &mut index.problems)?,
        };
        if let Some(m) = chosen {
            // A pack deleted by hand must not be offered for deduplication.
            for (p, _) in m.packs() {
                if listed.contains(p) {
                    covered.insert(*p);
                    if !present.contains_key(p) {
                        index.problems.push(format!(
                            "{}: missing; its chunks are treated as missing",
                            pack_key(p)
                        ));
                    }
                }
            }
            index.set_merged(m, |p| listed.contains(p) && present.contains_key(p));
        }
        // Each index file not merged, and the size of the pack it
        // describes: a pack that is missing or of the wrong length is left
        // out of the index, so a backup stores its chunks again and a read
        // of them fails instead of returning bytes from a damaged file.
        let files: Vec<Result<(IndexFile, Option<u64>)>> = {
            use rayon::prelude::*;
            idx_files
                .par_iter()
                .filter(|(_, id)| !covered.contains(id))
                .filter_map(|(k, _)| match self.read_index_file(k) {
                    Ok(file) => {
                        let size = present.get(&file.pack).copied();
                        Some(Ok((file, size)))
                    }
                    // Removed by a prune since the listing.
                    Err(Error::NotFound(_)) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect()
        };
        // Pending packs last, so that a chunk stored twice is located in
        // the pack that stays.
        let (mut files, later): (Vec<_>, Vec<_>) = files.into_iter().partition(|f| {
            f.as_ref()
                .map_or(true, |(file, _)| !pending.contains(&file.pack))
        });
        files.extend(later);
        let mut kept = Vec::new();
        for f in files {
            let (file, size) = match f {
                Ok(found) => found,
                Err(e) if !self.strict && e.is_corruption() => {
                    index.problems.push(format!(
                        "{e}; its pack's chunks are treated as missing until `flr repair index` rebuilds it"
                    ));
                    continue;
                }
                Err(e) => return Err(e),
            };
            match size {
                Some(n) if n == file.pack_len => {
                    index.add_pack(&file);
                    kept.push(file);
                }
                Some(n) => index.problems.push(format!(
                    "{}: {n} bytes, its index says {} (truncated or damaged); its {} chunks are treated as missing",
                    pack_key(&file.pack),
                    file.pack_len,
                    file.entries.len()
                )),
                None => index.problems.push(format!(
                    "{}: missing; its {} chunks are treated as missing",
                    pack_key(&file.pack),
                    file.entries.len()
                )),
            }
        }
        let excluded: Vec<PackId> = pending.iter().copied().collect();
        index.exclude_from_dedup(&excluded);
        index.pending = pending;
        Ok(IndexScan {
            index,
            files: kept,
            merged_keys,
        })
    }

    /// Of the merged files listed, the one covering the most packs still
    /// listed; a damaged one is reported in `problems` and passed over
    /// (the per-pack files it covers are read instead).
    fn choose_merged(
        &self,
        keys: &[String],
        listed: &HashSet<PackId>,
        problems: &mut Vec<String>,
    ) -> Result<Option<Arc<MergedIndex>>> {
        let current = self.index.read().merged.clone();
        let mut best: Option<(usize, Arc<MergedIndex>)> = None;
        for key in keys {
            let m = match current.as_ref().filter(|m| m.key() == key) {
                Some(m) => m.clone(),
                None => match self.open_merged(key) {
                    Ok(m) => Arc::new(m),
                    Err(e)
                        if e.is_corruption() || matches!(e, Error::UnsupportedVersion { .. }) =>
                    {
                        tracing::warn!(error = %e, "merged index file passed over");
                        problems.push(format!(
                            "{e}; it is passed over and the per-pack index files are read instead (the next merge or `flr repair index` replaces it)"
                        ));
                        continue;
                    }
                    Err(e) => return Err(e),
                },
            };
            let n = m.packs().iter().filter(|(p, _)| listed.contains(p)).count();
            if best.as_ref().is_none_or(|(b, _)| n > *b) {
                best = Some((n, m));
            }
        }
        Ok(best.map(|(_, m)| m))
    }

    fn merged_index_keys(&self) -> MergedIndexKeys {
        match &self.keys {
            Some(k) => MergedIndexKeys::keyed(&k.id_key),
            None => MergedIndexKeys::plain(),
        }
    }

    /// Opens a merged index file: in place in a local repository; from a
    /// local copy in the cache directory otherwise (fetched once: the file
    /// never changes under its name), or held in memory without one.
    fn open_merged(&self, key: &str) -> Result<MergedIndex> {
        let keys = self.merged_index_keys();
        if let Some(path) = self.store.local_path(key) {
            return MergedIndex::open_path(key, &path, &keys);
        }
        let Some(dir) = &self.merged_cache else {
            return MergedIndex::from_bytes(key, self.store.get(key)?, &keys);
        };
        let name = merged_index_name(key)
            .ok_or_else(|| Error::malformed(key, "not a merged index name"))?;
        let path = dir.join(format!("{name}.midx"));
        if path.exists() {
            match MergedIndex::open_path(key, &path, &keys) {
                Ok(m) => return Ok(m),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cached merged index refetched");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        self.fetch_merged(key, name, dir, &path)?;
        MergedIndex::open_path(key, &path, &keys)
    }

    /// Copies `key` into the cache directory in ranged reads, checks it
    /// against its name, and removes the cached copies of other files.
    fn fetch_merged(&self, key: &str, name: &str, dir: &Path, path: &Path) -> Result<()> {
        use std::io::Write;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let len = self
            .store
            .size(key)?
            .ok_or_else(|| Error::NotFound(key.to_string()))?;
        let tmp = dir.join(format!(".{name}.{}", crate::crypto::random_hex(8)));
        let fetch = || -> Result<()> {
            let mut out = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
            let mut hash = blake3::Hasher::new();
            let mut at = 0u64;
            while at < len {
                let n = (len - at).min(64 << 20) as usize;
                let piece = self.store.get_range(key, at, n)?;
                hash.update(&piece);
                out.write_all(&piece).map_err(|e| Error::io(&tmp, e))?;
                at += n as u64;
            }
            if hash.finalize().to_hex().as_str() != name {
                return Err(Error::malformed(key, "contents do not match its name"));
            }
            out.sync_all().map_err(|e| Error::io(&tmp, e))?;
            std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
        };
        if let Err(e) = fetch() {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        // Older copies: a process still using one keeps its mapping.
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.path() != path && e.path().extension().is_some_and(|x| x == "midx") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }

    /// Merges when enough packs are held in memory
    /// ([`format::MIDX_MERGE_AFTER_PACKS`]), or, in a local repository,
    /// enough entries ([`format::MIDX_MERGE_AFTER_ENTRIES`]). A failed merge is logged and
    /// changes nothing: the per-pack files still answer.
    pub fn merge_index_if_due(&self) {
        // On object storage a merge costs requests (the listings again,
        // each per-pack file read, the new file uploaded whole), so there
        // only the pack count makes it due.
        let local = self.store.requests().is_none();
        let due = {
            let index = self.index.read();
            index.unmerged_packs() >= format::MIDX_MERGE_AFTER_PACKS
                || (local && index.in_memory_len() >= format::MIDX_MERGE_AFTER_ENTRIES)
        };
        if !due {
            return;
        }
        if let Err(e) = self.merge_index(MergeMode::Incremental, None) {
            tracing::warn!(error = %e, "merging the chunk index failed; the per-pack index files still answer");
        }
    }

    /// Writes a merged index file covering every pack with an index file:
    /// the merged file in use plus the per-pack files it lacks
    /// ([`MergeMode::Incremental`]), or every per-pack file
    /// ([`MergeMode::Rebuild`], as `flr repair index` does). Then removes
    /// the merged files it replaces and reloads the index. `stop` ends it
    /// after a step, as a crash there would (for tests). Returns the new
    /// file's key, or `None` if nothing needed merging.
    pub fn merge_index(&self, mode: MergeMode, stop: Option<MergeStep>) -> Result<Option<String>> {
        let scan = self.scan_index(mode == MergeMode::Rebuild)?;
        let merged = scan.index.merged.clone();
        if scan.files.is_empty() && scan.merged_keys.len() == merged.is_some() as usize {
            return Ok(None);
        }
        let written = match self.write_merged(&scan, merged.as_deref(), stop) {
            // A damaged block of the old file: rebuild from the per-pack
            // files instead.
            Err(e) if e.is_corruption() && merged.is_some() => {
                tracing::warn!(error = %e, "rebuilding the merged chunk index");
                let scan = self.scan_index(true)?;
                self.write_merged(&scan, None, stop)?
            }
            other => other?,
        };
        if stop == Some(MergeStep::Written) {
            return Ok(Some(written));
        }
        for key in &scan.merged_keys {
            if *key != written {
                self.store.delete(key)?;
            }
        }
        self.reload_index()?;
        Ok(Some(written))
    }

    fn write_merged(
        &self,
        scan: &IndexScan,
        merged: Option<&MergedIndex>,
        stop: Option<MergeStep>,
    ) -> Result<String> {
        // Packs of the old file still present keep their order, then the
        // per-pack files': numbering stays monotonic, so the old entries'
        // (id, pack) order carries over.
        let mut packs = Vec::new();
        let mut renumber = Vec::new();
        if let Some(m) = merged {
            for (k, (p, len)) in m.packs().iter().enumerate() {
                match scan.index.merged_packs[k] {
                    Some(_) => {
                        renumber.push(Some(packs.len() as u32));
                        packs.push((*p, *len));
                    }
                    None => renumber.push(None),
                }
            }
        }
        let mut new = Vec::new();
        for f in &scan.files {
            let n = packs.len() as u32;
            packs.push((f.pack, f.pack_len));
            new.extend(f.entries.iter().map(|e| (n, e)));
        }
        new.sort_by_key(|a| (a.1.id, a.0));
        new.dedup_by(|a, b| (a.1.id, a.0) == (b.1.id, b.0));
        let expected = merged.map_or(0, |m| m.len()) + new.len();
        let tmp = self.store.temp_file_path().unwrap_or_else(|| {
            std::env::temp_dir().join(format!("flr-merge-{}", crate::crypto::random_hex(8)))
        });
        let result = (|| {
            let mut w =
                MergedIndexWriter::create(&tmp, &self.merged_index_keys(), packs, expected as u64)?;
            let mut new = new.into_iter().peekable();
            if let Some(m) = merged {
                for old in m.entries() {
                    let (p, e) = old?;
                    let Some(p) = renumber[p as usize] else {
                        continue;
                    };
                    while let Some((n, ne)) = new.next_if(|(n, ne)| (ne.id, *n) < (e.id, p)) {
                        w.push(n, ne)?;
                    }
                    w.push(p, &e)?;
                }
            }
            for (n, ne) in new {
                w.push(n, ne)?;
            }
            let (name, _) = w.finish()?;
            if stop == Some(MergeStep::Finished) {
                return Ok(merged_index_key(&name));
            }
            let key = merged_index_key(&name);
            match self.store.put_file(&key, &tmp) {
                // The same name is the same bytes.
                Ok(()) | Err(Error::AlreadyExists(_)) => Ok(key),
                Err(e) => Err(e),
            }
        })();
        let _ = std::fs::remove_file(&tmp);
        result
    }

    pub fn read_index_file(&self, key: &str) -> Result<IndexFile> {
        let raw = self.store.get(key)?;
        let file: IndexFile = self.decode_meta(key, format::INDEX_MAGIC, &raw)?;
        let expected = index_key(&file.pack);
        if expected != key {
            return Err(Error::malformed(
                key,
                format!("names pack {} which is not its own", file.pack),
            ));
        }
        // Frames end before the table and trailer; the exact end is the
        // pack's business (checked against its own table when read).
        let frames_end = file
            .pack_len
            .saturating_sub((format::PACK_TRAILER_LEN + format::ENVELOPE_HEADER_LEN) as u64);
        check_entries(key, &file.entries, frames_end)?;
        Ok(file)
    }

    /// Encodes metadata: postcard, zstd, sealed if encrypted, enveloped.
    pub fn encode_meta<T: Serialize>(&self, magic: [u8; 8], value: &T) -> Vec<u8> {
        self.meta_encoder().encode(magic, value)
    }

    /// An encoder of metadata that owns what it needs, for threads that
    /// outlive a borrow of the repository (lock refreshers).
    pub fn meta_encoder(&self) -> MetaEncoder {
        MetaEncoder {
            keys: self.keys.clone(),
            level: self.config.compression_level,
        }
    }

    pub fn decode_meta<T: for<'de> Deserialize<'de>>(
        &self,
        what: &str,
        magic: [u8; 8],
        raw: &[u8],
    ) -> Result<T> {
        let plain = self.open_meta(what, magic, raw)?;
        postcard::from_bytes(&plain)
            .map_err(|e| Error::malformed(what, format!("undecodable: {e}")))
    }

    /// The plain bytes of an enveloped metadata file: opened if sealed,
    /// decompressed if compressed.
    fn open_meta<'a>(
        &self,
        what: &str,
        magic: [u8; 8],
        raw: &'a [u8],
    ) -> Result<std::borrow::Cow<'a, [u8]>> {
        use std::borrow::Cow;
        let (flags, payload) = format::open_envelope(what, magic, raw)?;
        let payload: Cow<[u8]> = match (flags & FLAG_SEALED != 0, &self.keys) {
            (true, Some(keys)) => Cow::Owned(keys.open_meta(payload).ok_or_else(|| {
                Error::malformed(what, "authentication failed (damaged or foreign file)")
            })?),
            (true, None) => {
                return Err(Error::malformed(
                    what,
                    "sealed file in an unencrypted repository",
                ))
            }
            (false, Some(_)) => {
                return Err(Error::malformed(
                    what,
                    "unsealed file in an encrypted repository",
                ))
            }
            (false, None) => Cow::Borrowed(payload),
        };
        if flags & FLAG_ZSTD != 0 {
            return Ok(Cow::Owned(decompress_meta(what, &payload)?));
        }
        Ok(payload)
    }

    pub fn locate(&self, id: &ChunkId) -> Option<(ChunkLoc, PackId)> {
        let index = self.index.read();
        index
            .get(id)
            .map(|loc| (loc, index.packs[loc.pack as usize]))
    }

    /// Fetches the stored bytes of the frame at `loc` in `pack`, as they
    /// are in the pack (sealed, compressed).
    pub fn read_raw_at(&self, loc: &ChunkLoc, pack: &PackId) -> Result<ObjectBytes> {
        self.store
            .get_range(&pack_key(pack), loc.offset as u64, loc.stored_len as usize)
    }

    /// Turns a stored frame into its plaintext: open (if encrypted) and
    /// decompress. The chunks in it are checked by [`Self::chunk_in_frame`].
    pub fn decode_frame(
        &self,
        id: &ChunkId,
        loc: &ChunkLoc,
        pack: &PackId,
        raw: &[u8],
    ) -> Result<Vec<u8>> {
        let corrupt = |why: String| Error::CorruptChunk {
            id: *id,
            pack: pack.to_hex(),
            why,
        };
        let opened;
        let mut data = raw;
        if let Some(keys) = &self.keys {
            opened = keys
                .open_meta(raw)
                .ok_or_else(|| corrupt("authentication failed".into()))?;
            data = &opened;
        }
        let plain = if loc.flags & CHUNK_ZSTD != 0 {
            DECOMPRESSOR
                .with(|d| d.borrow_mut().decompress(data, loc.frame_raw_len as usize))
                .map_err(|e| corrupt(format!("decompression failed: {e}")))?
        } else {
            data.to_vec()
        };
        if plain.len() != loc.frame_raw_len as usize {
            return Err(corrupt(format!(
                "frame decoded to {} bytes, index says {}",
                plain.len(),
                loc.frame_raw_len
            )));
        }
        Ok(plain)
    }

    /// A chunk's bytes inside its decoded frame, checked against its id.
    /// Never returns unverified bytes.
    pub fn chunk_in_frame<'a>(
        &self,
        id: &ChunkId,
        loc: &ChunkLoc,
        pack: &PackId,
        frame: &'a [u8],
    ) -> Result<&'a [u8]> {
        let corrupt = |why: &str| Error::CorruptChunk {
            id: *id,
            pack: pack.to_hex(),
            why: why.to_string(),
        };
        let start = loc.frame_offset as usize;
        let bytes = frame
            .get(start..start + loc.raw_len as usize)
            .ok_or_else(|| corrupt("lies outside its frame"))?;
        if self.hasher.id(bytes) != *id {
            return Err(corrupt("content does not match its hash"));
        }
        Ok(bytes)
    }

    /// Decodes a stored frame and returns one verified chunk of it.
    pub fn decode_chunk(
        &self,
        id: &ChunkId,
        loc: &ChunkLoc,
        pack: &PackId,
        raw: &[u8],
    ) -> Result<Vec<u8>> {
        let frame = self.decode_frame(id, loc, pack, raw)?;
        Ok(self.chunk_in_frame(id, loc, pack, &frame)?.to_vec())
    }

    /// Reads and decodes the frame at `loc` in `pack` (as returned by
    /// [`Self::locate`] for `id`, which names the chunk in errors). Taking
    /// the location rather than the id keeps a caller's frame and location
    /// consistent even if the index is reloaded in between.
    pub fn read_frame_at(&self, id: &ChunkId, loc: &ChunkLoc, pack: &PackId) -> Result<Vec<u8>> {
        let raw = self.read_raw_at(loc, pack)?;
        self.decode_frame(id, loc, pack, &raw)
    }

    /// Reads and verifies one chunk. Each thread keeps the last frame it
    /// decoded, so reading a frame's chunks in order decodes it once. The
    /// kept frame is keyed by this repository instance and the frame's full
    /// description ([`ChunkLoc::frame_key`]), so it never stands in for
    /// another frame.
    pub fn read_chunk(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let (loc, pack) = self.locate(id).ok_or(Error::MissingChunk(*id))?;
        let key = loc.frame_key(&pack);
        let kept = LAST_FRAME.with(|c| {
            c.borrow()
                .as_ref()
                .filter(|(i, k, _)| *i == self.instance && *k == key)
                .map(|(_, _, f)| f.clone())
        });
        let frame = match kept {
            Some(f) => f,
            None => {
                let f = Arc::new(self.read_frame_at(id, &loc, &pack)?);
                LAST_FRAME.with(|c| *c.borrow_mut() = Some((self.instance, key, f.clone())));
                f
            }
        };
        Ok(self.chunk_in_frame(id, &loc, &pack, &frame)?.to_vec())
    }

    /// Restore points, sorted by job then time.
    ///
    /// A manifest's key carries a tag, a keyed hash of its contents, so
    /// that no write can replace one backup's manifest with another's,
    /// even on an object store that ignores `If-None-Match` (writers also
    /// look before they write, but two hosts can look at the same
    /// moment). A restore point is named by its time alone, `JOB/TIME`;
    /// should two backups of one job have committed under the same time
    /// that way, both are listed, as `JOB/TIME.TAG`.
    pub fn list_restore_points(&self, job: Option<&str>) -> Result<Vec<RestorePointName>> {
        let prefix = match job {
            Some(j) => {
                validate_job_name(j)?;
                format!("{RESTORE_POINTS_PREFIX}{j}/")
            }
            None => RESTORE_POINTS_PREFIX.to_string(),
        };
        // (job, time-name) to each (tag, key) under it.
        type Keys = Vec<(Option<String>, String)>;
        let mut by_base: BTreeMap<(String, String), Keys> = BTreeMap::new();
        for key in self.store.list(&prefix)? {
            if let Some((job, base, tag)) = parse_manifest_key(&key) {
                by_base.entry((job, base)).or_default().push((tag, key));
            }
        }
        let mut out = Vec::new();
        let mut known = self.manifest_keys.lock();
        for ((job, base), keys) in by_base {
            let alone = keys.len() == 1;
            for (tag, key) in keys {
                let name = match tag {
                    Some(tag) if !alone => format!("{base}.{tag}"),
                    _ => base.clone(),
                };
                let name = RestorePointName {
                    job: job.clone(),
                    name,
                };
                known.insert(name.clone(), key);
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// The key of restore point `name`'s manifest, or `None` if there is
    /// no such restore point. A name two restore points share is refused
    /// with the names that tell them apart.
    pub fn manifest_key(&self, name: &RestorePointName) -> Result<Option<String>> {
        if let Some(key) = self.manifest_keys.lock().get(name) {
            return Ok(Some(key.clone()));
        }
        let (base, tag) = split_tag(&name.name);
        if let Some(tag) = tag {
            let key = manifest_key(&name.job, base, Some(tag));
            if self.store.size(&key)?.is_some() {
                return Ok(Some(key));
            }
        }
        let same: Vec<RestorePointName> = self
            .list_restore_points(Some(&name.job))?
            .into_iter()
            .filter(|n| n.base() == base)
            .collect();
        match same.as_slice() {
            [] => Ok(None),
            [one] => Ok(self.manifest_keys.lock().get(one).cloned()),
            many => match many.iter().find(|n| n.name == name.name) {
                Some(exact) => Ok(self.manifest_keys.lock().get(exact).cloned()),
                None => Err(Error::InvalidInput(format!(
                    "{} backups of job {:?} committed as {name}; name one of {}",
                    many.len(),
                    name.job,
                    many.iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            },
        }
    }

    /// Whether any restore point of `job` has the time-name `base`,
    /// asked of the store now (not of what was listed before).
    pub fn restore_point_taken(&self, job: &str, base: &str) -> Result<bool> {
        validate_job_name(job)?;
        Ok(self
            .store
            .list(&format!("{RESTORE_POINTS_PREFIX}{job}/"))?
            .iter()
            .filter_map(|k| parse_manifest_key(k))
            .any(|(_, b, _)| b == base))
    }

    /// The key under which `manifest` is to be written: its name and a
    /// tag that the repository's keyed hash of its contents gives, so an
    /// object of that key can only ever hold this manifest.
    pub fn new_manifest_key(&self, manifest: &Manifest) -> String {
        let mut plain = b"flr manifest\0".to_vec();
        plain.extend(postcard::to_stdvec(manifest).expect("metadata serializes"));
        let hex = self.hasher.id(&plain).to_hex();
        manifest_key(
            &manifest.job,
            &manifest.name,
            Some(&hex[..MANIFEST_TAG_LEN]),
        )
    }

    /// Records that `key` holds restore point `name`, as a writer that
    /// has just written it knows.
    pub fn note_manifest_key(&self, name: &RestorePointName, key: &str) {
        self.manifest_keys
            .lock()
            .insert(name.clone(), key.to_string());
    }

    /// Deletes restore point `name`'s manifest (its chunks stay, for a
    /// prune to decide about).
    pub fn delete_restore_point(&self, name: &RestorePointName) -> Result<()> {
        if let Some(key) = self.manifest_key(name)? {
            self.store.delete(&key)?;
        }
        self.manifest_keys.lock().remove(name);
        Ok(())
    }

    pub fn load_manifest(&self, name: &RestorePointName) -> Result<Manifest> {
        let Some(key) = self.manifest_key(name)? else {
            return Err(Error::NotFound(format!("restore point {name}")));
        };
        let raw = match self.store.get(&key) {
            Ok(raw) => raw,
            Err(Error::NotFound(_)) => {
                self.manifest_keys.lock().remove(name);
                return Err(Error::NotFound(format!("restore point {name}")));
            }
            Err(e) => return Err(e),
        };
        let what = format!("restore point {name} ({key})");
        // The stored bytes go before the plain ones are decoded: a large
        // manifest is never held three times over.
        let plain = self
            .open_meta(&what, format::MANIFEST_MAGIC, &raw)?
            .into_owned();
        drop(raw);
        let manifest: Manifest =
            crate::manifest::exact::decoding(&plain, |b| postcard::from_bytes(b))
                .map_err(|e| Error::malformed(&what, format!("undecodable: {e}")))?;
        drop(plain);
        manifest.validate(&what)?;
        if manifest.job != name.job || manifest.name != name.base() {
            return Err(Error::malformed(
                what,
                "manifest names a different restore point",
            ));
        }
        Ok(manifest)
    }

    /// Resolves `JOB/TIMESTAMP`, or `JOB` / `JOB/latest` to the newest one.
    pub fn resolve(&self, spec: &str) -> Result<RestorePointName> {
        let (job, rest) = spec.split_once('/').unwrap_or((spec, "latest"));
        if rest == "latest" {
            return self
                .list_restore_points(Some(job))?
                .pop()
                .ok_or_else(|| Error::NotFound(format!("restore points of job {job:?}")));
        }
        RestorePointName::parse(spec)
    }
}

/// The directory remote repositories' merged index files are copied to:
/// `$FLR_CACHE_DIR/merged-index`, else under `$XDG_CACHE_HOME/flr` or
/// `~/.cache/flr`. Without any, the file is held in memory.
fn merged_cache_root() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let base = var("FLR_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("flr")))
        .or_else(|| var("HOME").map(|d| d.join(".cache").join("flr")))?;
    Some(base.join("merged-index"))
}

fn parse_config(what: &str, payload: &[u8]) -> Result<RepoConfig> {
    let text = std::str::from_utf8(payload).map_err(|_| Error::malformed(what, "not UTF-8"))?;
    let config: RepoConfig =
        serde_json::from_str(text).map_err(|e| Error::malformed(what, e.to_string()))?;
    // The levels `init` accepts: a higher one would write metadata with a
    // zstd window larger than readers accept.
    for l in [config.compression_level, config.page_compression_level] {
        if !(-7..=19).contains(&l) {
            return Err(Error::malformed(
                what,
                format!("compression level {l} is outside -7..=19"),
            ));
        }
    }
    Ok(config)
}

/// Decompresses a metadata payload: one zstd frame that declares its
/// plaintext size (every writer's frames do), at most
/// [`format::MAX_META_PLAIN`]. The output grows with what the frame really
/// holds, so a header claiming gigabytes costs nothing until the data is
/// there, and a frame holding more or less than it declared is refused.
fn decompress_meta(what: &str, payload: &[u8]) -> Result<Vec<u8>> {
    use std::io::Read;
    let bad = |why: String| Error::malformed(what, format!("bad compression: {why}"));
    let declared = match zstd::zstd_safe::get_frame_content_size(payload) {
        Ok(Some(n)) => n,
        Ok(None) => return Err(bad("the frame does not declare its size".into())),
        Err(_) => return Err(bad("not a zstd frame".into())),
    };
    if declared > format::MAX_META_PLAIN {
        return Err(bad(format!(
            "declares {declared} bytes, more than the {} a metadata file may hold",
            format::MAX_META_PLAIN
        )));
    }
    let mut decoder = zstd::stream::read::Decoder::with_buffer(payload)
        .map_err(|e| bad(e.to_string()))?
        .single_frame();
    decoder
        .window_log_max(format::META_WINDOW_LOG_MAX)
        .map_err(|e| bad(e.to_string()))?;
    // The declared size, up front: grown by doubling, a large manifest
    // would be held twice over while it is decoded. Only as much as the
    // compressed bytes could plausibly hold is trusted for a start (chunk
    // ids do not compress; a garbled header must not reserve gigabytes).
    let start = declared.min(payload.len() as u64 * 32 + (1 << 20));
    let mut out = Vec::with_capacity(start as usize + 1);
    decoder
        .take(declared.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| bad(e.to_string()))?;
    if out.len() as u64 != declared {
        return Err(bad(format!(
            "holds {} bytes, its header says {declared}",
            out.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn repo() -> Repository {
        let store = Arc::new(MemoryStore::new());
        Repository::init(store.as_ref(), None).unwrap();
        Repository::open(store, || Ok(Vec::new())).unwrap()
    }

    fn zstd_envelope(payload: &[u8]) -> Vec<u8> {
        format::seal_envelope(format::INDEX_MAGIC, FLAG_ZSTD, payload)
    }

    #[test]
    fn metadata_that_compresses_a_thousandfold_still_decodes() {
        let repo = repo();
        let sparse = vec![0u8; 8 << 20];
        let raw = repo.encode_meta(format::INDEX_MAGIC, &sparse);
        assert!(raw.len() < sparse.len() / 1000, "{}", raw.len());
        let back: Vec<u8> = repo.decode_meta("x", format::INDEX_MAGIC, &raw).unwrap();
        assert_eq!(back, sparse);
    }

    #[test]
    fn a_zstd_header_claiming_more_than_the_limit_is_refused_unread() {
        // A frame header alone: magic, single-segment with an 8-byte size.
        let mut frame = vec![0x28, 0xb5, 0x2f, 0xfd, 0xe0];
        frame.extend_from_slice(&(format::MAX_META_PLAIN + 1).to_le_bytes());
        let err = repo()
            .decode_meta::<Vec<u8>>("x", format::INDEX_MAGIC, &zstd_envelope(&frame))
            .unwrap_err();
        assert!(err.to_string().contains("more than"), "{err}");
    }

    #[test]
    fn a_frame_without_its_size_or_with_a_wrong_one_is_refused() {
        let repo = repo();
        let plain = postcard::to_stdvec(&vec![7u8; 1000]).unwrap();
        let without_size = zstd::stream::encode_all(&plain[..], 3).unwrap();
        let err = repo
            .decode_meta::<Vec<u8>>("x", format::INDEX_MAGIC, &zstd_envelope(&without_size))
            .unwrap_err();
        assert!(err.to_string().contains("declare"), "{err}");
        let mut sized = zstd::bulk::compress(&plain, 3).unwrap();
        // Single-segment frame of under 64 KiB: the size is two bytes
        // (plus 256) at offset 5.
        assert_eq!(sized[4] & 0xe0, 0x60);
        sized[5] ^= 1;
        assert!(repo
            .decode_meta::<Vec<u8>>("x", format::INDEX_MAGIC, &zstd_envelope(&sized))
            .is_err());
    }

    #[test]
    fn a_config_with_a_compression_level_readers_refuse_is_malformed() {
        let json = br#"{"version":1,"id":"ab","compression_level":22,"encryption":null}"#;
        let err = parse_config("config", json).unwrap_err();
        assert!(err.to_string().contains("outside"), "{err}");
        let ok = br#"{"version":1,"id":"ab","compression_level":19,"encryption":null}"#;
        assert!(parse_config("config", ok).is_ok());
    }
}
