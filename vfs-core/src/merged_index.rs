//! The merged chunk index: the entries of many packs in one immutable file
//! (`index-merged/<hash>.midx`, laid out in [`crate::format`]), searched in
//! place instead of being loaded, with a binary fuse filter per partition
//! of the id space so that most "is this chunk new?" questions are
//! answered without touching the entries. Only the tables after the
//! entries (filters, fanout, block sums, packs: about 1.2 bytes per entry)
//! are held in memory; a lookup reads the few entries around its guess
//! with `pread`, so the entries (60 bytes each) never become part of the
//! process's memory, however many lookups run.
//!
//! The per-pack files in `index/` stay the authority on which packs exist:
//! a merged file only says where chunks are in the packs it lists, and a
//! reader uses its entries only for packs whose own index file is still
//! listed (see [`crate::repo::Repository::reload_index`]). So a merged file
//! may lag behind deletions, and a crash anywhere in a merge leaves at
//! worst a stale or superfluous merged file, never a wrong answer.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use xorf::{BinaryFuse8, DmaSerializable, Filter, FilterRef};

use crate::error::{Error, Result};
use crate::format::{
    MERGED_INDEX_MAGIC, MERGED_INDEX_PREFIX, MERGED_INDEX_VERSION, MIDX_BLOCK_ENTRIES,
    MIDX_BLOCK_SUM_LEN, MIDX_BUCKET_ENTRIES, MIDX_ENCIPHERED, MIDX_ENTRY_LEN,
    MIDX_FILTER_PARTITION_KEYS, MIDX_FILTER_ROW_LEN, MIDX_LOC_LEN, MIDX_MAX_FANOUT_BITS,
    MIDX_MAX_FILTER_BITS, MIDX_PACK_LEN, MIDX_TRAILER_LEN,
};
use crate::ids::{ChunkId, PackId};
use crate::repo::IndexEntry;

/// The key of the merged index file named `name` (hex of its hash).
pub fn merged_index_key(name: &str) -> String {
    format!("{MERGED_INDEX_PREFIX}{name}.midx")
}

/// The name in a merged index key, if it is one.
pub fn merged_index_name(key: &str) -> Option<&str> {
    let name = key
        .strip_prefix(MERGED_INDEX_PREFIX)?
        .strip_suffix(".midx")?;
    (name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())).then_some(name)
}

/// The keys of a merged index's sums and of its location cipher.
#[derive(Clone)]
pub struct MergedIndexKeys {
    sum: [u8; 32],
    cipher: Option<[u8; 32]>,
}

const SUM_CONTEXT: &str = "flr 2026 merged chunk index checksums v1";
const CIPHER_CONTEXT: &str = "flr 2026 merged chunk index locations v1";

impl MergedIndexKeys {
    /// For an unencrypted repository: sums against damage, no secrecy.
    pub fn plain() -> Self {
        MergedIndexKeys {
            sum: blake3::derive_key(SUM_CONTEXT, b""),
            cipher: None,
        }
    }

    /// For an encrypted repository, from its id key.
    pub fn keyed(id_key: &[u8; 32]) -> Self {
        MergedIndexKeys {
            sum: blake3::derive_key(SUM_CONTEXT, id_key),
            cipher: Some(blake3::derive_key(CIPHER_CONTEXT, id_key)),
        }
    }

    /// XORs the keystream of entry `position` into its location half.
    fn apply_cipher(&self, salt: &[u8; 16], position: u64, loc: &mut [u8]) {
        let Some(key) = &self.cipher else { return };
        let mut h = blake3::Hasher::new_keyed(key);
        h.update(salt);
        h.update(&position.to_le_bytes());
        let mut stream = [0u8; MIDX_LOC_LEN];
        h.finalize_xof().fill(&mut stream);
        for (b, s) in loc.iter_mut().zip(stream) {
            *b ^= s;
        }
    }

    fn block_sum(&self, block: u64, bytes: &[u8]) -> [u8; MIDX_BLOCK_SUM_LEN] {
        let mut h = blake3::Hasher::new_keyed(&self.sum);
        h.update(&block.to_le_bytes());
        h.update(bytes);
        let mut out = [0u8; MIDX_BLOCK_SUM_LEN];
        out.copy_from_slice(&h.finalize().as_bytes()[..MIDX_BLOCK_SUM_LEN]);
        out
    }

    fn meta_sum(&self, bytes: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.sum, bytes).as_bytes()
    }
}

/// The id's first eight bytes as a number: fanout bucket, filter
/// partition and filter key all come from it (ids are uniform hashes).
fn prefix(id: &ChunkId) -> u64 {
    u64::from_be_bytes(id.0[..8].try_into().expect("8 bytes"))
}

fn top_bits(k: u64, bits: u32) -> usize {
    if bits == 0 {
        0
    } else {
        (k >> (64 - bits)) as usize
    }
}

/// Bits of a table with about `per` items per slot for `n` items.
fn table_bits(n: u64, per: u64, max: u32) -> u32 {
    let slots = (n / per).max(1);
    (63 - slots.leading_zeros()).min(max)
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Where the entries are read from.
enum Source {
    /// A local file, read with `pread`.
    File(File),
    /// The whole file in memory (fetched without a local copy).
    Memory(Vec<u8>),
}

impl Source {
    fn len(&self, key: &str) -> Result<u64> {
        match self {
            Source::File(f) => f.metadata().map(|m| m.len()).map_err(|e| Error::io(key, e)),
            Source::Memory(v) => Ok(v.len() as u64),
        }
    }

    /// `len` bytes at `offset`, which the caller has checked lie within.
    fn read(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read_into(key, offset, &mut buf)?;
        Ok(buf)
    }

    /// Fills `buf` from `offset`, which the caller has checked lies within.
    fn read_into(&self, key: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Source::Memory(v) => buf.copy_from_slice(&v[offset as usize..][..buf.len()]),
            Source::File(f) => {
                let done = crate::local_store::read_full_at(f, buf, offset)
                    .map_err(|e| Error::io(key, e))?;
                if done < buf.len() {
                    return Err(Error::malformed(key, "truncated while open"));
                }
            }
        }
        Ok(())
    }
}

/// Entries read on each side of a lookup's guess: ids are uniform, so the
/// guess is rarely further off than this, and the whole bucket is read
/// when it is.
const WINDOW: usize = 24;

/// An open merged index file.
pub struct MergedIndex {
    /// Its key in the store, for messages.
    key: String,
    name: String,
    source: Source,
    /// Everything after the entries: fingerprints, filter rows, fanout,
    /// block sums, packs, trailer. Offsets below are into it.
    tables: Vec<u8>,
    keys: MergedIndexKeys,
    entries: usize,
    fanout_bits: u32,
    filter_bits: u32,
    salt: [u8; 16],
    rows_at: usize,
    fanout_at: usize,
    sums_at: usize,
    packs: Vec<(PackId, u64)>,
    /// One bit per block of entries whose sum has been checked.
    verified: Vec<AtomicU64>,
}

impl std::fmt::Debug for MergedIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MergedIndex({}, {} entries)", self.key, self.entries)
    }
}

impl MergedIndex {
    /// Opens the file at `path` (a local copy of `key`), read in place.
    pub fn open_path(key: &str, path: &Path, keys: &MergedIndexKeys) -> Result<Self> {
        let file = File::open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NotFound(key.to_string())
            } else {
                Error::io(path, e)
            }
        })?;
        Self::parse(key, Source::File(file), keys)
    }

    /// Opens a merged index held in memory.
    pub fn from_bytes(key: &str, bytes: Vec<u8>, keys: &MergedIndexKeys) -> Result<Self> {
        Self::parse(key, Source::Memory(bytes), keys)
    }

    fn parse(key: &str, source: Source, keys: &MergedIndexKeys) -> Result<Self> {
        let bad = |why: String| Error::malformed(key, why);
        let len = source.len(key)?;
        if len < MIDX_TRAILER_LEN as u64 {
            return Err(bad(format!("{len} bytes, shorter than its trailer")));
        }
        let t = source.read(key, len - MIDX_TRAILER_LEN as u64, MIDX_TRAILER_LEN)?;
        if t[..8] != MERGED_INDEX_MAGIC {
            return Err(bad("not a merged index file (bad magic)".into()));
        }
        let version = le32(&t, 8);
        if version != MERGED_INDEX_VERSION {
            return Err(Error::UnsupportedVersion {
                what: key.to_string(),
                found: version,
                supported: MERGED_INDEX_VERSION,
            });
        }
        let flags = le32(&t, 12);
        if flags & !MIDX_ENCIPHERED != 0 {
            return Err(bad(format!("unknown flags {flags:#x}")));
        }
        match (flags & MIDX_ENCIPHERED != 0, keys.cipher.is_some()) {
            (true, false) => return Err(bad("enciphered in an unencrypted repository".into())),
            (false, true) => return Err(bad("not enciphered in an encrypted repository".into())),
            _ => {}
        }
        let entries = le64(&t, 16);
        let pack_count = le32(&t, 24) as u64;
        let fanout_bits = le32(&t, 28);
        let filter_bits = le32(&t, 32);
        if le32(&t, 36) != 0 {
            return Err(bad("reserved trailer field is not zero".into()));
        }
        let salt: [u8; 16] = t[40..56].try_into().expect("16 bytes");
        let rows_at = le64(&t, 56);
        if fanout_bits > MIDX_MAX_FANOUT_BITS || filter_bits > MIDX_MAX_FILTER_BITS {
            return Err(bad(format!(
                "table sizes of {fanout_bits} and {filter_bits} bits are out of range"
            )));
        }
        if entries > u32::MAX as u64 {
            return Err(bad(format!(
                "{entries} entries is more than a file may hold"
            )));
        }
        let blocks = entries.div_ceil(MIDX_BLOCK_ENTRIES as u64);
        let meta_len = (1u64 << filter_bits) * MIDX_FILTER_ROW_LEN as u64
            + (1u64 << fanout_bits) * 4
            + blocks * MIDX_BLOCK_SUM_LEN as u64
            + pack_count * MIDX_PACK_LEN as u64
            + MIDX_TRAILER_LEN as u64;
        let entries_len = entries * MIDX_ENTRY_LEN as u64;
        if rows_at.checked_add(meta_len) != Some(len) || rows_at < entries_len {
            return Err(bad(format!(
                "{len} bytes do not hold the {entries} entries and tables its trailer describes (truncated or damaged)"
            )));
        }
        // Everything after the entries, in memory; offsets from here on
        // are into it.
        let tables = source.read(key, entries_len, (len - entries_len) as usize)?;
        let base = entries_len as usize;
        let rows_at = rows_at as usize - base;
        let sum_at = tables.len() - 32;
        if keys.meta_sum(&tables[rows_at..sum_at]) != tables[sum_at..] {
            return Err(bad(
                "checksum mismatch in its tables (damaged, or written with another key)".into(),
            ));
        }
        let fanout_at = rows_at + (MIDX_FILTER_ROW_LEN << filter_bits);
        let sums_at = fanout_at + (4 << fanout_bits);
        let packs_at = sums_at + blocks as usize * MIDX_BLOCK_SUM_LEN;
        let mut last = 0;
        for b in 0..1usize << fanout_bits {
            let n = le32(&tables, fanout_at + 4 * b);
            if n < last {
                return Err(bad(format!("fanout bucket {b} goes backwards")));
            }
            last = n;
        }
        if last as u64 != entries {
            return Err(bad(format!(
                "fanout counts {last} entries, the trailer {entries}"
            )));
        }
        for p in 0..1usize << filter_bits {
            let row = &tables[rows_at + p * MIDX_FILTER_ROW_LEN..][..MIDX_FILTER_ROW_LEN];
            let (sl, mask, scl) = (le32(row, 8), le32(row, 12), le32(row, 16));
            let (at, fp_len) = (le64(row, 20), le64(row, 28));
            if fp_len == 0 {
                continue;
            }
            let fits = sl.is_power_of_two()
                && mask == sl - 1
                && scl % sl == 0
                && (scl as u64 + 2 * sl as u64) <= fp_len
                && at >= entries_len
                && at
                    .checked_add(fp_len)
                    .is_some_and(|end| end <= (rows_at + base) as u64);
            if !fits {
                return Err(bad(format!("filter partition {p} is inconsistent")));
            }
        }
        let packs = (0..pack_count as usize)
            .map(|i| {
                let row = &tables[packs_at + i * MIDX_PACK_LEN..][..MIDX_PACK_LEN];
                (
                    PackId(row[..32].try_into().expect("32 bytes")),
                    le64(row, 32),
                )
            })
            .collect();
        let name = crate::merged_index::merged_index_name(key)
            .unwrap_or(key)
            .to_string();
        Ok(MergedIndex {
            key: key.to_string(),
            name,
            source,
            tables,
            keys: keys.clone(),
            entries: entries as usize,
            fanout_bits,
            filter_bits,
            salt,
            rows_at,
            fanout_at,
            sums_at,
            packs,
            verified: (0..blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        })
    }

    /// The key it was opened from.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Its name: the hex of its hash.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Entries, counting a chunk stored in two packs twice.
    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// The packs it covers, with their lengths, numbered by position.
    pub fn packs(&self) -> &[(PackId, u64)] {
        &self.packs
    }

    /// False if no entry has this id; true if one may (about 0.4% of
    /// absent ids say so too). Reads one or three bytes of a filter.
    pub fn may_contain(&self, id: &ChunkId) -> bool {
        let k = prefix(id);
        let p = top_bits(k, self.filter_bits);
        let row = &self.tables[self.rows_at + p * MIDX_FILTER_ROW_LEN..][..MIDX_FILTER_ROW_LEN];
        let (at, len) = (le64(row, 20) as usize, le64(row, 28) as usize);
        if len == 0 {
            return false;
        }
        let at = at - self.entries * MIDX_ENTRY_LEN;
        xorf::BinaryFuse8Ref::from_dma(&row[..20], &self.tables[at..at + len]).contains(&k)
    }

    /// Entries `lo..hi`, as stored.
    fn read_entries(&self, lo: usize, hi: usize) -> Result<Vec<u8>> {
        self.source.read(
            &self.key,
            (lo * MIDX_ENTRY_LEN) as u64,
            (hi - lo) * MIDX_ENTRY_LEN,
        )
    }

    /// Checks block `b`'s entries (`bytes`) against its sum, and notes it.
    fn check_block(&self, b: usize, bytes: &[u8]) -> Result<()> {
        let stored = &self.tables[self.sums_at + b * MIDX_BLOCK_SUM_LEN..][..MIDX_BLOCK_SUM_LEN];
        if self.keys.block_sum(b as u64, bytes) != stored {
            return Err(Error::malformed(
                &self.key,
                format!("block {b} of its entries fails its checksum (damaged)"),
            ));
        }
        self.verified[b / 64].fetch_or(1u64 << (b % 64), Ordering::Relaxed);
        Ok(())
    }

    fn block_range(&self, b: usize) -> (usize, usize) {
        let start = b * MIDX_BLOCK_ENTRIES;
        (start, (start + MIDX_BLOCK_ENTRIES).min(self.entries))
    }

    /// Checks the sums of the blocks holding entries `lo..hi`, once each
    /// per open file (a block is read whole the first time only).
    fn verify(&self, lo: usize, hi: usize) -> Result<()> {
        if lo >= hi {
            return Ok(());
        }
        for b in lo / MIDX_BLOCK_ENTRIES..=(hi - 1) / MIDX_BLOCK_ENTRIES {
            if self.verified[b / 64].load(Ordering::Relaxed) & (1u64 << (b % 64)) != 0 {
                continue;
            }
            let (start, end) = self.block_range(b);
            self.check_block(b, &self.read_entries(start, end)?)?;
        }
        Ok(())
    }

    /// Entry `i`, whose stored bytes are `raw` (its block already
    /// verified): pack number and entry.
    fn entry_from(&self, i: usize, raw: &[u8]) -> Result<(u32, IndexEntry)> {
        let mut loc = [0u8; MIDX_LOC_LEN];
        loc.copy_from_slice(&raw[32..MIDX_ENTRY_LEN]);
        self.keys.apply_cipher(&self.salt, i as u64, &mut loc);
        let pack = le32(&loc, 0);
        if pack as usize >= self.packs.len() || loc[25..] != [0, 0, 0] {
            return Err(Error::malformed(
                &self.key,
                format!("entry {i} names pack number {pack} of {}", self.packs.len()),
            ));
        }
        let entry = IndexEntry {
            id: ChunkId(raw[..32].try_into().expect("32 bytes")),
            offset: le32(&loc, 4),
            stored_len: le32(&loc, 8),
            raw_len: le32(&loc, 12),
            frame_offset: le32(&loc, 16),
            frame_raw_len: le32(&loc, 20),
            flags: loc[24],
        };
        let pack_len = self.packs[pack as usize].1;
        let frames_end = pack_len.saturating_sub(
            (crate::format::PACK_TRAILER_LEN + crate::format::ENVELOPE_HEADER_LEN) as u64,
        );
        crate::repo::check_entries(&self.key, std::slice::from_ref(&entry), frames_end)?;
        Ok((pack, entry))
    }

    /// Calls `each` with (pack number, entry) for every entry of `id`, in
    /// pack order, until it returns true. Reads the entries around a guess
    /// from the id (its bucket's whole run if the guess was too far off).
    pub fn find(&self, id: &ChunkId, mut each: impl FnMut(u32, &IndexEntry) -> bool) -> Result<()> {
        let bucket = top_bits(prefix(id), self.fanout_bits);
        let lo = match bucket {
            0 => 0,
            b => le32(&self.tables, self.fanout_at + 4 * (b - 1)) as usize,
        };
        let hi = le32(&self.tables, self.fanout_at + 4 * bucket) as usize;
        if lo >= hi {
            return Ok(());
        }
        self.verify(lo, hi)?;
        // Ids are uniform hashes, spread evenly over the bucket's key
        // range: a guess from the key lands a few entries off.
        let shift = 64 - self.fanout_bits;
        let within = (prefix(id) as u128) & ((1u128 << shift) - 1);
        let g = lo + ((within * (hi - lo) as u128) >> shift) as usize;
        let (mut wl, mut wh) = (g.saturating_sub(WINDOW).max(lo), (g + WINDOW).min(hi));
        // The window on the stack: a lookup allocates nothing unless it
        // has to read the whole bucket.
        let mut window = [0u8; 2 * WINDOW * MIDX_ENTRY_LEN];
        let window = &mut window[..(wh - wl) * MIDX_ENTRY_LEN];
        self.source
            .read_into(&self.key, (wl * MIDX_ENTRY_LEN) as u64, window)?;
        let id_in = |buf: &[u8], wl: usize, i: usize| -> [u8; 32] {
            buf[(i - wl) * MIDX_ENTRY_LEN..][..32]
                .try_into()
                .expect("32 bytes")
        };
        // The window holds the answer only if the first entry not below
        // the id, and the last entry of the id, fall inside it.
        let short_below = wl > lo && id_in(window, wl, wl) >= id.0;
        let short_above = wh < hi && id_in(window, wl, wh - 1) <= id.0;
        let bucket_bytes;
        let buf: &[u8] = if short_below || short_above {
            (wl, wh) = (lo, hi);
            bucket_bytes = self.read_entries(lo, hi)?;
            &bucket_bytes
        } else {
            window
        };
        let (mut a, mut z) = (wl, wh);
        while a < z {
            let m = a + (z - a) / 2;
            if id_in(buf, wl, m) < id.0 {
                a = m + 1;
            } else {
                z = m;
            }
        }
        while a < wh && id_in(buf, wl, a) == id.0 {
            let raw = &buf[(a - wl) * MIDX_ENTRY_LEN..][..MIDX_ENTRY_LEN];
            let (pack, entry) = self.entry_from(a, raw)?;
            if each(pack, &entry) {
                break;
            }
            a += 1;
        }
        Ok(())
    }

    /// Every entry in order, each block read once and checked: what a
    /// merge reads.
    pub fn entries(&self) -> impl Iterator<Item = Result<(u32, IndexEntry)>> + '_ {
        let blocks = self.entries.div_ceil(MIDX_BLOCK_ENTRIES);
        (0..blocks).flat_map(move |b| {
            let (start, end) = self.block_range(b);
            let read = self
                .read_entries(start, end)
                .and_then(|bytes| self.check_block(b, &bytes).map(|()| bytes));
            let out: Vec<Result<(u32, IndexEntry)>> = match read {
                Err(e) => vec![Err(e)],
                Ok(bytes) => (start..end)
                    .map(|i| {
                        let raw = &bytes[(i - start) * MIDX_ENTRY_LEN..][..MIDX_ENTRY_LEN];
                        self.entry_from(i, raw)
                    })
                    .collect(),
            };
            out
        })
    }
}

/// Writes a merged index file, entries in order, streaming: memory holds
/// the fanout, the block sums, one filter partition's keys and the
/// fingerprints so far (about 1.1 bytes per entry).
pub struct MergedIndexWriter {
    out: std::io::BufWriter<File>,
    path: std::path::PathBuf,
    hash: blake3::Hasher,
    keys: MergedIndexKeys,
    salt: [u8; 16],
    packs: Vec<(PackId, u64)>,
    fanout_bits: u32,
    filter_bits: u32,
    fanout: Vec<u32>,
    sums: Vec<[u8; MIDX_BLOCK_SUM_LEN]>,
    block: Vec<u8>,
    count: u64,
    last: Option<(ChunkId, u32)>,
    partition: usize,
    partition_keys: Vec<u64>,
    rows: Vec<[u8; MIDX_FILTER_ROW_LEN]>,
    fingerprints: Vec<u8>,
}

impl MergedIndexWriter {
    /// Starts a file at `path` (created, must not exist) for about
    /// `expected` entries of `packs` (sizes its tables).
    pub fn create(
        path: &Path,
        keys: &MergedIndexKeys,
        packs: Vec<(PackId, u64)>,
        expected: u64,
    ) -> Result<Self> {
        if packs.len() > u32::MAX as usize {
            return Err(Error::InvalidInput(
                "too many packs for one merged index".into(),
            ));
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        let mut salt = [0u8; 16];
        getrandom::getrandom(&mut salt).expect("the OS random source failed");
        Ok(MergedIndexWriter {
            out: std::io::BufWriter::with_capacity(1 << 20, file),
            path: path.to_path_buf(),
            hash: blake3::Hasher::new(),
            keys: keys.clone(),
            salt,
            packs,
            fanout_bits: table_bits(expected, MIDX_BUCKET_ENTRIES, MIDX_MAX_FANOUT_BITS),
            filter_bits: table_bits(expected, MIDX_FILTER_PARTITION_KEYS, MIDX_MAX_FILTER_BITS),
            fanout: Vec::new(),
            sums: Vec::new(),
            block: Vec::with_capacity(MIDX_BLOCK_ENTRIES * MIDX_ENTRY_LEN),
            count: 0,
            last: None,
            partition: 0,
            partition_keys: Vec::new(),
            rows: Vec::new(),
            fingerprints: Vec::new(),
        })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.hash.update(bytes);
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Adds an entry; entries come sorted by (id, pack), each pair once.
    pub fn push(&mut self, pack: u32, e: &IndexEntry) -> Result<()> {
        if pack as usize >= self.packs.len() {
            return Err(Error::InvalidInput(format!(
                "merged index entry names pack number {pack} of {}",
                self.packs.len()
            )));
        }
        if self.last.is_some_and(|(id, p)| (id, p) >= (e.id, pack)) {
            return Err(Error::InvalidInput(format!(
                "merged index entries out of order at chunk {}",
                e.id
            )));
        }
        if self.count >= u32::MAX as u64 {
            return Err(Error::InvalidInput(
                "too many entries for one merged index".into(),
            ));
        }
        self.last = Some((e.id, pack));
        let k = prefix(&e.id);
        let bucket = top_bits(k, self.fanout_bits);
        while self.fanout.len() < bucket {
            self.fanout.push(self.count as u32);
        }
        let part = top_bits(k, self.filter_bits);
        if part != self.partition {
            self.close_partition()?;
            while self.rows.len() < part {
                self.rows.push([0; MIDX_FILTER_ROW_LEN]);
            }
            self.partition = part;
        }
        if self.partition_keys.last() != Some(&k) {
            self.partition_keys.push(k);
        }
        let mut loc = [0u8; MIDX_LOC_LEN];
        loc[0..4].copy_from_slice(&pack.to_le_bytes());
        loc[4..8].copy_from_slice(&e.offset.to_le_bytes());
        loc[8..12].copy_from_slice(&e.stored_len.to_le_bytes());
        loc[12..16].copy_from_slice(&e.raw_len.to_le_bytes());
        loc[16..20].copy_from_slice(&e.frame_offset.to_le_bytes());
        loc[20..24].copy_from_slice(&e.frame_raw_len.to_le_bytes());
        loc[24] = e.flags;
        self.keys.apply_cipher(&self.salt, self.count, &mut loc);
        self.block.extend_from_slice(&e.id.0);
        self.block.extend_from_slice(&loc);
        self.count += 1;
        if self.block.len() == MIDX_BLOCK_ENTRIES * MIDX_ENTRY_LEN {
            self.close_block()?;
        }
        Ok(())
    }

    fn close_block(&mut self) -> Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        let sum = self.keys.block_sum(self.sums.len() as u64, &self.block);
        self.sums.push(sum);
        let block = std::mem::take(&mut self.block);
        self.write(&block)?;
        self.block = block;
        self.block.clear();
        Ok(())
    }

    /// Builds the filter of the current partition (called when the
    /// partition is complete, before the rows of later ones).
    fn close_partition(&mut self) -> Result<()> {
        let mut row = [0u8; MIDX_FILTER_ROW_LEN];
        if !self.partition_keys.is_empty() {
            let filter = BinaryFuse8::try_from(&self.partition_keys[..])
                .map_err(|e| Error::InvalidInput(format!("building a merged index filter: {e}")))?;
            filter.dma_copy_descriptor_to(&mut row[..20]);
            let fps = filter.dma_fingerprints();
            row[20..28].copy_from_slice(&(self.fingerprints.len() as u64).to_le_bytes());
            row[28..36].copy_from_slice(&(fps.len() as u64).to_le_bytes());
            self.fingerprints.extend_from_slice(fps);
            self.partition_keys.clear();
        }
        self.rows.push(row);
        Ok(())
    }

    /// Writes the tables and the trailer, syncs, and returns the file's
    /// name (the hex of its BLAKE3 hash) and length.
    pub fn finish(mut self) -> Result<(String, u64)> {
        self.close_block()?;
        self.close_partition()?;
        self.rows
            .resize(1 << self.filter_bits, [0; MIDX_FILTER_ROW_LEN]);
        while self.fanout.len() < 1 << self.fanout_bits {
            self.fanout.push(self.count as u32);
        }
        let entries_len = self.count * MIDX_ENTRY_LEN as u64;
        // Fingerprint offsets were relative to the end of the entries.
        let fingerprints = std::mem::take(&mut self.fingerprints);
        self.write(&fingerprints)?;
        let mut meta = Vec::new();
        for row in &mut self.rows {
            if le64(row, 28) != 0 {
                let at = le64(row, 20) + entries_len;
                row[20..28].copy_from_slice(&at.to_le_bytes());
            }
            meta.extend_from_slice(row);
        }
        for n in &self.fanout {
            meta.extend_from_slice(&n.to_le_bytes());
        }
        for s in &self.sums {
            meta.extend_from_slice(s);
        }
        for (id, len) in &self.packs {
            meta.extend_from_slice(&id.0);
            meta.extend_from_slice(&len.to_le_bytes());
        }
        let rows_at = entries_len + fingerprints.len() as u64;
        meta.extend_from_slice(&MERGED_INDEX_MAGIC);
        meta.extend_from_slice(&MERGED_INDEX_VERSION.to_le_bytes());
        let flags = if self.keys.cipher.is_some() {
            MIDX_ENCIPHERED
        } else {
            0
        };
        meta.extend_from_slice(&flags.to_le_bytes());
        meta.extend_from_slice(&self.count.to_le_bytes());
        meta.extend_from_slice(&(self.packs.len() as u32).to_le_bytes());
        meta.extend_from_slice(&self.fanout_bits.to_le_bytes());
        meta.extend_from_slice(&self.filter_bits.to_le_bytes());
        meta.extend_from_slice(&0u32.to_le_bytes());
        meta.extend_from_slice(&self.salt);
        meta.extend_from_slice(&rows_at.to_le_bytes());
        let sum = self.keys.meta_sum(&meta);
        meta.extend_from_slice(&sum);
        self.write(&meta)?;
        let len = rows_at + meta.len() as u64;
        let file = self
            .out
            .into_inner()
            .map_err(|e| Error::io(&self.path, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&self.path, e))?;
        Ok((self.hash.finalize().to_hex().to_string(), len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u64) -> IndexEntry {
        IndexEntry {
            id: ChunkId(*blake3::hash(&n.to_le_bytes()).as_bytes()),
            offset: (n as u32).wrapping_add(16),
            stored_len: 10,
            raw_len: 8,
            flags: 0,
            frame_offset: 0,
            frame_raw_len: 8,
        }
    }

    fn write(dir: &Path, keys: &MergedIndexKeys, n: u64) -> (Vec<u8>, Vec<IndexEntry>) {
        let mut entries: Vec<IndexEntry> = (0..n).map(entry).collect();
        entries.sort_by_key(|a| a.id);
        let path = dir.join(format!("w{n}"));
        let packs = vec![(PackId([7; 32]), 1 << 20), (PackId([8; 32]), 1 << 20)];
        let mut w = MergedIndexWriter::create(&path, keys, packs, n).unwrap();
        for (k, e) in entries.iter().enumerate() {
            w.push((k % 2) as u32, e).unwrap();
        }
        let (name, len) = w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, len);
        assert_eq!(name, blake3::hash(&bytes).to_hex().to_string());
        (bytes, entries)
    }

    fn lookups(m: &MergedIndex, entries: &[IndexEntry]) {
        for (k, e) in entries.iter().enumerate() {
            assert!(m.may_contain(&e.id));
            let mut found = Vec::new();
            m.find(&e.id, |p, got| {
                found.push((p, got.clone()));
                false
            })
            .unwrap();
            assert_eq!(found, vec![((k % 2) as u32, e.clone())]);
        }
        let absent = entry(u64::MAX);
        let mut any = false;
        m.find(&absent.id, |_, _| {
            any = true;
            true
        })
        .unwrap();
        assert!(!any);
    }

    #[test]
    fn entries_are_found_in_plain_and_enciphered_files() {
        let dir = tempfile::tempdir().unwrap();
        for keys in [MergedIndexKeys::plain(), MergedIndexKeys::keyed(&[3; 32])] {
            for n in [0, 1, 5, 3000, 40_000] {
                let (bytes, entries) = write(dir.path(), &keys, n);
                let path = dir.path().join(format!("w{n}"));
                // Read in place from the file, and from memory.
                let on_disk = MergedIndex::open_path("index-merged/t.midx", &path, &keys).unwrap();
                let in_memory =
                    MergedIndex::from_bytes("index-merged/t.midx", bytes, &keys).unwrap();
                for m in [on_disk, in_memory] {
                    assert_eq!(m.len(), n as usize);
                    lookups(&m, &entries);
                    let all: Vec<IndexEntry> = m.entries().map(|r| r.unwrap().1).collect();
                    assert_eq!(all, entries);
                }
                std::fs::remove_file(path).unwrap();
            }
        }
    }

    #[test]
    fn a_chunk_in_several_packs_is_found_in_each_wherever_its_run_falls() {
        let dir = tempfile::tempdir().unwrap();
        let keys = MergedIndexKeys::plain();
        let mut ids: Vec<IndexEntry> = (0..12_000).map(entry).collect();
        ids.sort_by_key(|a| a.id);
        let path = dir.path().join("dup");
        let packs = (0..4u8).map(|p| (PackId([p; 32]), 1 << 20)).collect();
        // Runs of one to four copies: some straddle a lookup's window.
        let copies = |k: usize| k % 4 + 1;
        let total: usize = (0..ids.len()).map(copies).sum();
        let mut w = MergedIndexWriter::create(&path, &keys, packs, total as u64).unwrap();
        for (k, e) in ids.iter().enumerate() {
            for p in 0..copies(k) {
                w.push(p as u32, e).unwrap();
            }
        }
        w.finish().unwrap();
        let m = MergedIndex::open_path("index-merged/dup.midx", &path, &keys).unwrap();
        for (k, e) in ids.iter().enumerate() {
            let mut packs = Vec::new();
            m.find(&e.id, |p, got| {
                assert_eq!(got, e);
                packs.push(p);
                false
            })
            .unwrap();
            assert_eq!(
                packs,
                (0..copies(k) as u32).collect::<Vec<_>>(),
                "entry {k}"
            );
        }
    }

    #[test]
    fn a_file_is_refused_with_its_name_when_damaged_or_foreign() {
        let dir = tempfile::tempdir().unwrap();
        let keys = MergedIndexKeys::plain();
        let (bytes, entries) = write(dir.path(), &keys, 2000);
        let key = "index-merged/damaged.midx";
        let refuse = |b: Vec<u8>, k: &MergedIndexKeys, why: &str| {
            let err = MergedIndex::from_bytes(key, b, k).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(why), "{err}");
        };
        refuse(bytes[..50].to_vec(), &keys, "shorter");
        refuse(bytes[..bytes.len() - 1].to_vec(), &keys, "bad magic");
        refuse(bytes[1..].to_vec(), &keys, "truncated");
        let mut b = bytes.clone();
        let n = b.len();
        b[n - 40] ^= 1; // the rows offset
        refuse(b, &keys, "truncated");
        let mut b = bytes.clone();
        b[n - MIDX_TRAILER_LEN - 5] ^= 1; // the pack table
        refuse(b, &keys, "checksum");
        let mut b = bytes.clone();
        b[n - MIDX_TRAILER_LEN + 8] = 9; // version
        refuse(b, &keys, "version 9");
        refuse(
            bytes.clone(),
            &MergedIndexKeys::keyed(&[1; 32]),
            "not enciphered",
        );

        // A damaged entry is refused when a lookup reaches its block;
        // other blocks still answer.
        let mut b = bytes.clone();
        b[100] ^= 0x40;
        let m = MergedIndex::from_bytes(key, b, &keys).unwrap();
        let err = m.find(&entries[1].id, |_, _| true).unwrap_err().to_string();
        assert!(err.contains(key) && err.contains("block 0"), "{err}");
        let far = &entries[1999];
        let mut hit = false;
        m.find(&far.id, |_, _| {
            hit = true;
            true
        })
        .unwrap();
        assert!(hit);
        assert!(m.entries().any(|r| r.is_err()));
    }

    #[test]
    fn the_writer_refuses_entries_out_of_order() {
        let dir = tempfile::tempdir().unwrap();
        let keys = MergedIndexKeys::plain();
        let packs = vec![(PackId([7; 32]), 1 << 20)];
        let mut w = MergedIndexWriter::create(&dir.path().join("x"), &keys, packs, 2).unwrap();
        let (a, b) = (entry(1), entry(2));
        let (lo, hi) = if a.id < b.id { (a, b) } else { (b, a) };
        w.push(0, &hi).unwrap();
        assert!(w.push(0, &lo).is_err());
        assert!(w.push(0, &hi).is_err());
        assert!(w.push(1, &hi).is_err());
    }
}
