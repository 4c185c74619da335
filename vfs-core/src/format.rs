//! The one owner of the on-disk format: magic numbers, versions, header
//! layouts and the envelope every metadata file is wrapped in.
//!
//! Repository layout (all names relative to the repository root):
//!
//! ```text
//! config                       Envelope(CONFIG): JSON RepoConfig, never encrypted
//! packs/<2 hex>/<pack id>.pack PACK_HEADER | stored frames | Envelope(PACK_TABLE) | PACK_TRAILER
//! index/<pack id>.idx          Envelope(INDEX): the entries of that one pack (a copy of its table)
//! index-merged/<hash>.midx     the entries of many packs, sorted, searchable in place (below)
//! restore-points/<job>/<ts>.<tag>.rp Envelope(MANIFEST): one restore point; <tag> is 16 hex
//!                              digits of a keyed hash of its contents (older: <ts>.rp)
//! locks/<lock id>.<n>          Envelope(LOCK): a writer, reader or prune lock, refresh n
//! pending/<id>.packs           Envelope(PENDING): packs a prune will delete later
//! pending/<id>.writers         Envelope(PENDING_WRITERS): writer locks it waits for
//! tmp/                         objects being written; never read
//! ```
//!
//! An envelope is `EnvelopeHeader | payload | blake3(header | payload)`.
//! The payload is zstd-compressed postcard (JSON for the config) and, in an
//! encrypted repository, sealed with XChaCha20-Poly1305 after compression.

use crate::error::{Error, Result};

/// Version of the repository layout as a whole; bumped when a reader of an
/// older version would misread anything. Version 1 named a pack by the hash
/// of its bytes alone, which did not cover its frame layout (the same bytes
/// cut two ways got one name, and the second index replaced the first);
/// version 2 packs carry their own entry table, inside the hashed bytes.
pub const REPO_VERSION: u32 = 2;

/// Magic of each kind of envelope. Eight bytes so a hexdump shows the kind.
pub const CONFIG_MAGIC: [u8; 8] = *b"FLRCONF\0";
pub const INDEX_MAGIC: [u8; 8] = *b"FLRINDX\0";
pub const MANIFEST_MAGIC: [u8; 8] = *b"FLRMANI\0";
/// A lock (`locks/<lock id>.<refresh number>`), see [`crate::lock`].
pub const LOCK_MAGIC: [u8; 8] = *b"FLRLOCK\0";
/// A prune's list of packs waiting for deletion (`pending/<id>.packs`).
pub const PENDING_MAGIC: [u8; 8] = *b"FLRPDEL\0";
/// The writer locks that existed when a pending list took effect
/// (`pending/<id>.writers`).
pub const PENDING_WRITERS_MAGIC: [u8; 8] = *b"FLRPWRT\0";
pub const PACK_MAGIC: [u8; 8] = *b"FLRPACK\0";
/// The envelope of a pack's own entry table, stored inside the pack.
pub const PACK_TABLE_MAGIC: [u8; 8] = *b"FLRPTAB\0";
/// Last eight bytes of every pack: a reader finds the table from the end.
pub const PACK_TRAILER_MAGIC: [u8; 8] = *b"FLRPEND\0";

/// Version of each structure, checked independently of REPO_VERSION so one
/// structure can evolve without touching the others.
pub const ENVELOPE_VERSION: u32 = 1;
pub const PACK_VERSION: u32 = 2;

/// Envelope flag: payload is zstd-compressed.
pub const FLAG_ZSTD: u32 = 1;
/// Envelope flag: payload is sealed (nonce prefix + ciphertext + tag).
pub const FLAG_SEALED: u32 = 2;

/// Largest plaintext an envelope's zstd payload may decode to. Metadata is
/// held in memory whole, so this is a bound on what one file can make a
/// reader allocate, far above any real file: the index of one pack or the
/// manifest of a multi-terabyte restore point (about 33 bytes per stored
/// chunk). A payload whose zstd header declares more is refused before
/// anything is decompressed.
pub const MAX_META_PLAIN: u64 = 16 << 30;

/// Largest zstd window a metadata payload may use (log2 bytes). Writers
/// compress at level 19 at most, which uses 2^23; a decoder allocates its
/// window before reading any data, so a few garbled bytes must not be able
/// to ask for zstd's own limit of 2^31.
pub const META_WINDOW_LOG_MAX: u32 = 23;

/// Length of the trailing checksum of an envelope.
pub const CHECKSUM_LEN: usize = 32;

/// Envelope header: magic (8) | version u32 | flags u32 | payload length u64.
/// Little-endian throughout.
pub const ENVELOPE_HEADER_LEN: usize = 24;
const _: () = assert!(ENVELOPE_HEADER_LEN == 8 + 4 + 4 + 8);

/// Pack header: magic (8) | version u32 | reserved u32.
pub const PACK_HEADER_LEN: usize = 16;
const _: () = assert!(PACK_HEADER_LEN == 8 + 4 + 4);

/// Pack trailer: length of the entry table envelope u64 | PACK_TRAILER_MAGIC.
/// The table (every chunk's id, frame offset and lengths, sealed when the
/// repository is encrypted) ends where the trailer starts. It makes a pack
/// self-describing: its index file can always be rebuilt from it
/// (`flr repair index`), and since the pack's id hashes the table too, two
/// packs holding the same bytes in different frames never share an id.
pub const PACK_TRAILER_LEN: usize = 16;
const _: () = assert!(PACK_TRAILER_LEN == 8 + 8);

/// Smallest well-formed pack: a header, no frames, the smallest table
/// envelope and the trailer.
pub const PACK_MIN_LEN: usize =
    PACK_HEADER_LEN + ENVELOPE_HEADER_LEN + CHECKSUM_LEN + PACK_TRAILER_LEN;

/// Target size of a pack. Large enough that a terabyte is tens of
/// thousands of files (memory maps and S3 objects stay manageable), small
/// enough that a crash loses little work and a pack builds in memory.
pub const PACK_TARGET_SIZE: usize = 32 << 20;

/// Plaintext bytes of new page-sized chunks compressed together as one
/// zstd frame (each chunk keeps its own id and index entry, pointing into
/// the frame). Compressing 4 KiB pages one by one lost 16% of the ratio
/// and most of zstd's speed; a frame this size keeps random reads cheap
/// (a read decodes at most this much per chunk it touches).
pub const FRAME_TARGET: usize = 32 << 10;

/// Stored-chunk flag: the stored bytes are zstd-compressed (otherwise raw,
/// used when compression would not shrink the chunk).
pub const CHUNK_ZSTD: u8 = 1;

/// Largest chunk any chunker may emit; readers refuse larger raw lengths so
/// a garbled index cannot make us allocate gigabytes.
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;

pub fn pack_header() -> [u8; PACK_HEADER_LEN] {
    let mut h = [0u8; PACK_HEADER_LEN];
    h[..8].copy_from_slice(&PACK_MAGIC);
    h[8..12].copy_from_slice(&PACK_VERSION.to_le_bytes());
    h
}

pub fn check_pack_header(what: &str, bytes: &[u8]) -> Result<()> {
    if bytes.len() < PACK_HEADER_LEN || bytes[..8] != PACK_MAGIC {
        return Err(Error::malformed(what, "not a pack file (bad magic)"));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
    if version != PACK_VERSION {
        return Err(Error::UnsupportedVersion {
            what: what.to_string(),
            found: version,
            supported: PACK_VERSION,
        });
    }
    if bytes[12..16] != [0; 4] {
        return Err(Error::malformed(what, "unknown pack header flags"));
    }
    Ok(())
}

pub fn pack_trailer(table_len: u64) -> [u8; PACK_TRAILER_LEN] {
    let mut t = [0u8; PACK_TRAILER_LEN];
    t[..8].copy_from_slice(&table_len.to_le_bytes());
    t[8..].copy_from_slice(&PACK_TRAILER_MAGIC);
    t
}

/// Where a pack's entry table lies, from the pack's length and its last
/// [`PACK_TRAILER_LEN`] bytes: the table's offset and length.
pub fn parse_pack_trailer(what: &str, pack_len: u64, trailer: &[u8]) -> Result<(u64, u64)> {
    if pack_len < PACK_MIN_LEN as u64 || trailer.len() != PACK_TRAILER_LEN {
        return Err(Error::malformed(
            what,
            format!("truncated ({pack_len} bytes, too short for a pack)"),
        ));
    }
    if trailer[8..] != PACK_TRAILER_MAGIC {
        return Err(Error::malformed(
            what,
            "no pack trailer (truncated, or not a pack of this format)",
        ));
    }
    let table_len = u64::from_le_bytes(trailer[..8].try_into().expect("8 bytes"));
    let room = pack_len - (PACK_HEADER_LEN + PACK_TRAILER_LEN) as u64;
    if table_len < (ENVELOPE_HEADER_LEN + CHECKSUM_LEN) as u64 || table_len > room {
        return Err(Error::malformed(
            what,
            format!("entry table of {table_len} bytes does not fit in a pack of {pack_len}"),
        ));
    }
    Ok((pack_len - PACK_TRAILER_LEN as u64 - table_len, table_len))
}

/// Wraps `payload` (already compressed/sealed as `flags` says) in an envelope.
pub fn seal_envelope(magic: [u8; 8], flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ENVELOPE_HEADER_LEN + payload.len() + CHECKSUM_LEN);
    out.extend_from_slice(&magic);
    out.extend_from_slice(&ENVELOPE_VERSION.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Checks magic, version, length and checksum; returns (flags, payload).
pub fn open_envelope<'a>(what: &str, magic: [u8; 8], bytes: &'a [u8]) -> Result<(u32, &'a [u8])> {
    if bytes.len() < ENVELOPE_HEADER_LEN + CHECKSUM_LEN {
        return Err(Error::malformed(
            what,
            format!("truncated ({} bytes)", bytes.len()),
        ));
    }
    if bytes[..8] != magic {
        return Err(Error::malformed(
            what,
            "bad magic (not the expected kind of file)",
        ));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
    if version != ENVELOPE_VERSION {
        return Err(Error::UnsupportedVersion {
            what: what.to_string(),
            found: version,
            supported: ENVELOPE_VERSION,
        });
    }
    let flags = u32::from_le_bytes(bytes[12..16].try_into().unwrap());
    let len = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
    // Compared as the payload's length: the whole file's length, 56 bytes
    // more, overflows u64 for a garbled field (a panic with overflow checks).
    let payload_len = (bytes.len() - ENVELOPE_HEADER_LEN - CHECKSUM_LEN) as u64;
    if len != payload_len {
        let expected = (ENVELOPE_HEADER_LEN + CHECKSUM_LEN) as u128 + len as u128;
        return Err(Error::malformed(
            what,
            format!(
                "length mismatch: header says {expected} bytes, file has {}",
                bytes.len()
            ),
        ));
    }
    let body_end = bytes.len() - CHECKSUM_LEN;
    let sum = blake3::hash(&bytes[..body_end]);
    if sum.as_bytes() != &bytes[body_end..] {
        return Err(Error::malformed(
            what,
            "checksum mismatch (file is damaged)",
        ));
    }
    if flags & !(FLAG_ZSTD | FLAG_SEALED) != 0 {
        return Err(Error::malformed(what, format!("unknown flags {flags:#x}")));
    }
    Ok((flags, &bytes[ENVELOPE_HEADER_LEN..body_end]))
}

// ---------------------------------------------------------------------
// The merged chunk index (`index-merged/<blake3 of the file>.midx`, read
// by `merged_index`): the entries of many packs in one file, sorted by
// chunk id, searched in place through a mapping, never decoded whole.
//
// ```text
// entries      MIDX_ENTRY_LEN each, sorted by (chunk id, pack number)
// fingerprints the binary fuse filters' arrays, one per filter partition
// filter rows  MIDX_FILTER_ROW_LEN each, 2^filter_bits of them
// fanout       u32 each, 2^fanout_bits: entries whose id's top bits are <= i
// block sums   MIDX_BLOCK_SUM_LEN each, one per MIDX_BLOCK_ENTRIES entries
// pack table   MIDX_PACK_LEN each: the packs that entries number
// trailer      MIDX_TRAILER_LEN
// ```
//
// The trailer's checksum covers everything from the filter rows to the
// trailer itself, so opening checks all a reader trusts in one read of a
// few megabytes; each block of entries is checked by its own sum the first
// time a lookup touches it. The fingerprints are covered by nothing: a
// damaged one only makes the filter say "maybe" or "no" wrongly, and a
// wrong "no" costs storing a chunk again, never a wrong location. Both
// checksums are keyed in an encrypted repository (a key derived from the
// id key), and there the location half of each entry is enciphered with a
// keystream of that key, the file's salt and the entry's position.
// ---------------------------------------------------------------------

pub const MERGED_INDEX_MAGIC: [u8; 8] = *b"FLRMIDX\0";
pub const MERGED_INDEX_VERSION: u32 = 1;
/// Where merged index files live, next to (not inside) `index/`, whose
/// per-pack files stay the authority on which packs exist.
pub const MERGED_INDEX_PREFIX: &str = "index-merged/";
/// Trailer flag: the location half of every entry is enciphered.
pub const MIDX_ENCIPHERED: u32 = 1;

/// Chunk id (32) | pack number u32 | offset u32 | stored length u32 |
/// raw length u32 | frame offset u32 | frame raw length u32 | flags u8 |
/// 3 reserved zero bytes. Fixed size, so entry `i` is at `i * LEN`.
pub const MIDX_ENTRY_LEN: usize = 60;
/// The location half of an entry: everything after the chunk id.
pub const MIDX_LOC_LEN: usize = MIDX_ENTRY_LEN - 32;
const _: () = assert!(MIDX_LOC_LEN == 6 * 4 + 1 + 3);

/// Entries per checked block: 30 KiB, so the first lookup in a block
/// hashes little more than the pages it reads anyway.
pub const MIDX_BLOCK_ENTRIES: usize = 512;
/// A block's sum: 128 bits of keyed BLAKE3, ample against damage.
pub const MIDX_BLOCK_SUM_LEN: usize = 16;

/// Pack id (32) | pack length u64.
pub const MIDX_PACK_LEN: usize = 40;

/// A filter partition: the binary fuse descriptor (seed u64 | segment
/// length u32 | its mask u32 | segment count length u32) | offset of its
/// fingerprints u64 | their length u64. A length of zero is an empty
/// partition, which contains nothing.
pub const MIDX_FILTER_ROW_LEN: usize = 20 + 8 + 8;
/// Keys per filter partition aimed at: the filter of one partition is
/// built in memory at a time (a few tens of MiB at most) while merging.
pub const MIDX_FILTER_PARTITION_KEYS: u64 = 1 << 20;
/// Entries per fanout bucket aimed at: a lookup binary-searches about
/// this many, and the fanout stays at 4 bytes per 128 entries.
pub const MIDX_BUCKET_ENTRIES: u64 = 128;
pub const MIDX_MAX_FANOUT_BITS: u32 = 24;
/// Packs held in memory (per-pack files not merged) at which a backup
/// merges them into a new merged file: at 32 MiB packs of 4 KiB pages
/// about 260,000 entries, some 20 MiB of memory, read again by each open.
pub const MIDX_MERGE_AFTER_PACKS: usize = 32;
/// Entries held in memory at which a backup to a local repository
/// merges, however few packs hold them: a map entry costs about 70 bytes, and more while an open
/// reads the per-pack files, so that one full backup of a 1 GiB database
/// in 4 KiB pages (some 260,000 entries) is merged at once rather than
/// held in every later process's memory.
pub const MIDX_MERGE_AFTER_ENTRIES: usize = 1 << 17;
pub const MIDX_MAX_FILTER_BITS: u32 = 16;

/// Magic (8) | version u32 | flags u32 | entries u64 | packs u32 |
/// fanout bits u32 | filter bits u32 | reserved u32 | salt (16) |
/// offset of the filter rows u64 | checksum (32).
pub const MIDX_TRAILER_LEN: usize = 96;
const _: () = assert!(MIDX_TRAILER_LEN == 8 + 4 + 4 + 8 + 4 + 4 + 4 + 4 + 16 + 8 + 32);

// ---------------------------------------------------------------------
// Keys of an encrypted repository (used by `crypto`).
//
// The config holds `EncryptionConfig`: the KDF name and parameters, a
// salt, and the master key wrapped (sealed) under the key the KDF derives
// from the password. The master key is one random secret split in two, so
// chunk ids are never keyed with the key that encrypts.
// ---------------------------------------------------------------------

/// XChaCha20-Poly1305 nonce, stored in front of every sealed object. 192
/// random bits: nonces are drawn at random (no counter survives a crash or
/// two writers), and at this length collisions stay negligible.
pub const NONCE_LEN: usize = 24;

/// Poly1305 tag, stored after the ciphertext.
pub const TAG_LEN: usize = 16;

/// Every symmetric key: XChaCha20 and keyed BLAKE3 both take 32 bytes, and
/// the KDF derives the key-encryption key at this length.
pub const KEY_LEN: usize = 32;

/// The master key: data key | id key.
pub const MASTER_KEY_LEN: usize = 2 * KEY_LEN;

/// Bytes of the master key that seal chunks and metadata.
pub const DATA_KEY: std::ops::Range<usize> = 0..KEY_LEN;

/// Bytes of the master key that key the BLAKE3 chunk ids.
pub const ID_KEY: std::ops::Range<usize> = KEY_LEN..MASTER_KEY_LEN;

/// The wrapped master key as stored (hex) in the config: nonce | sealed
/// master key | tag.
pub const WRAPPED_KEY_LEN: usize = NONCE_LEN + MASTER_KEY_LEN + TAG_LEN;
const _: () = assert!(WRAPPED_KEY_LEN == 24 + 64 + 16);
const _: () = assert!(DATA_KEY.end == ID_KEY.start && ID_KEY.end == MASTER_KEY_LEN);

/// The one key derivation understood; the config names it so another can
/// be added without guessing.
pub const KDF_NAME: &str = "argon2id";

/// Argon2 version 1.3 (0x13), the version RFC 9106 defines.
pub const KDF_VERSION: u32 = 0x13;

/// Random salt per repository: 128 bits, as RFC 9106 recommends.
pub const KDF_SALT_LEN: usize = 16;

/// Parameters new repositories get: 64 MiB and 3 passes, one lane, the
/// OWASP-recommended floor for Argon2id. Stored in the config, so raising
/// them later leaves existing repositories readable.
pub const KDF_M_COST_KIB: u32 = 64 * 1024;
pub const KDF_T_COST: u32 = 3;
pub const KDF_P_COST: u32 = 1;

// ---------------------------------------------------------------------
// Writable sessions (used by `session`).
//
// A session directory under the state directory:
//
// ```text
// session.json   JSON SessionInfo: format, id, repository, restore point
// lock           held (flock) by the process serving the session; empty
// state          Envelope(STATE): postcard checkpoint of the overlay
// journal        JOURNAL_HEADER, then records appended since the checkpoint
// data/<name>    sparse file: the bytes written to one file, at their offsets
// ```
//
// Nothing stored names a node by inode number: a mount hands those out as
// restore points load, so they differ between runs. A restore point node
// is named by its index in the restore point's manifest (immutable), a
// node made in the session by its session id ([`FIRST_SESSION_NODE`] up).
// ---------------------------------------------------------------------

/// Version of everything in a session directory (`session.json`, `state`,
/// `journal`, data file names). Sessions are short-lived: a session of
/// another version is refused, never migrated.
/// 2: nodes named by manifest index or session id instead of inode number.
pub const SESSION_FORMAT: u32 = 2;

pub const SESSION_INFO_FILE: &str = "session.json";
pub const SESSION_LOCK_FILE: &str = "lock";
pub const SESSION_STATE_FILE: &str = "state";
pub const SESSION_JOURNAL_FILE: &str = "journal";
pub const SESSION_DATA_DIR: &str = "data";

/// Magic of the checkpoint's envelope.
pub const STATE_MAGIC: [u8; 8] = *b"FLRSTAT\0";

/// Magic of a journal.
pub const JOURNAL_MAGIC: [u8; 8] = *b"FLRJRNL\0";

/// Journal header: magic (8) | SESSION_FORMAT u32 | flags u32 (none yet,
/// must be 0) | checkpoint generation u64. Little-endian. The generation
/// ties the journal to the checkpoint it follows, so a checkpoint that
/// crashed midway never has its journal replayed twice.
pub const JOURNAL_HEADER_LEN: usize = 24;
const _: () = assert!(JOURNAL_HEADER_LEN == 8 + 4 + 4 + 8);

/// Journal record: payload length u32 | first RECORD_CHECKSUM_LEN bytes of
/// blake3(payload) | payload (postcard). The checksum finds the record a
/// crash tore at the tail; four bytes suffice for that. A record that is
/// whole but wrong is caught by decoding and by the checks of replay.
pub const RECORD_CHECKSUM_LEN: usize = 4;
pub const RECORD_HEADER_LEN: usize = 4 + RECORD_CHECKSUM_LEN;
const _: () = assert!(RECORD_HEADER_LEN == 8);

/// Ids of nodes made in a session start here, and double as their inode
/// numbers: a mount's restore point inodes stay far below (2^48 nodes).
pub const FIRST_SESSION_NODE: u64 = 1 << 48;

/// Prefix of the data file of a restore point node (`r` and its manifest
/// index in hex); a session-made node's data file is its id in hex, which
/// never starts with `r`.
pub const DATA_FILE_RESTORE_POINT_PREFIX: &str = "r";

/// How a session's files name a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum NodeRef {
    /// Node `i` of the restore point's manifest (0 is its root).
    RestorePoint(u32),
    /// A node made in the session, by its id (at least
    /// [`FIRST_SESSION_NODE`]).
    Session(u64),
}

impl NodeRef {
    /// Name of the node's data file in `data/`.
    pub fn data_file_name(self) -> String {
        match self {
            NodeRef::RestorePoint(i) => format!("{DATA_FILE_RESTORE_POINT_PREFIX}{i:x}"),
            NodeRef::Session(id) => format!("{id:x}"),
        }
    }
}

/// A journal's header for a journal following checkpoint `generation`.
pub fn journal_header(generation: u64) -> [u8; JOURNAL_HEADER_LEN] {
    let mut h = [0u8; JOURNAL_HEADER_LEN];
    h[..8].copy_from_slice(&JOURNAL_MAGIC);
    h[8..12].copy_from_slice(&SESSION_FORMAT.to_le_bytes());
    h[16..24].copy_from_slice(&generation.to_le_bytes());
    h
}

fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(b.try_into().ok()?))
}

fn le_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let b = bytes.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

/// Checks a journal's header (`bytes` is the whole journal, `what` names
/// it); returns the generation.
pub fn check_journal_header(what: &str, bytes: &[u8]) -> Result<u64> {
    if bytes.len() < JOURNAL_HEADER_LEN || bytes[..8] != JOURNAL_MAGIC {
        return Err(Error::malformed(what, "not a session journal (bad magic)"));
    }
    let version = le_u32(bytes, 8).unwrap_or_default();
    if version != SESSION_FORMAT {
        return Err(Error::UnsupportedVersion {
            what: what.to_string(),
            found: version,
            supported: SESSION_FORMAT,
        });
    }
    let flags = le_u32(bytes, 12).unwrap_or_default();
    if flags != 0 {
        return Err(Error::malformed(what, format!("unknown flags {flags:#x}")));
    }
    le_u64(bytes, 16).ok_or_else(|| Error::malformed(what, "truncated header"))
}

/// Frames one record's payload.
pub fn journal_record(payload: &[u8]) -> Result<Vec<u8>> {
    let len = u32::try_from(payload.len())
        .map_err(|_| Error::InvalidInput(format!("journal record of {} bytes", payload.len())))?;
    let mut record = Vec::with_capacity(RECORD_HEADER_LEN + payload.len());
    record.extend_from_slice(&len.to_le_bytes());
    record.extend_from_slice(&blake3::hash(payload).as_bytes()[..RECORD_CHECKSUM_LEN]);
    record.extend_from_slice(payload);
    Ok(record)
}

/// The payload of the record at `pos` of a journal and where the next one
/// starts; `None` at the end and at a record a crash tore (cut short, or
/// its checksum does not match).
pub fn next_journal_record(bytes: &[u8], pos: usize) -> Option<(&[u8], usize)> {
    let len = le_u32(bytes, pos)? as usize;
    let sum = bytes.get(pos.checked_add(4)?..pos.checked_add(RECORD_HEADER_LEN)?)?;
    let start = pos + RECORD_HEADER_LEN;
    let end = start.checked_add(len)?;
    let payload = bytes.get(start..end)?;
    (blake3::hash(payload).as_bytes()[..RECORD_CHECKSUM_LEN] == *sum).then_some((payload, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips_and_detects_damage() {
        let sealed = seal_envelope(INDEX_MAGIC, FLAG_ZSTD, b"hello");
        let (flags, payload) = open_envelope("x", INDEX_MAGIC, &sealed).unwrap();
        assert_eq!(flags, FLAG_ZSTD);
        assert_eq!(payload, b"hello");
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x40;
            assert!(open_envelope("x", INDEX_MAGIC, &bad).is_err(), "byte {i}");
        }
        assert!(open_envelope("x", INDEX_MAGIC, &sealed[..sealed.len() - 1]).is_err());
        assert!(open_envelope("x", MANIFEST_MAGIC, &sealed).is_err());
    }

    #[test]
    fn a_length_field_near_u64_max_is_a_mismatch_not_an_overflow() {
        let mut sealed = seal_envelope(INDEX_MAGIC, 0, b"hello");
        for len in [u64::MAX, u64::MAX - 55, u64::MAX - 56] {
            sealed[16..24].copy_from_slice(&len.to_le_bytes());
            let err = open_envelope("x", INDEX_MAGIC, &sealed).unwrap_err();
            // The sum, not what it wraps to (nor a panic under overflow checks).
            let says = format!("header says {} bytes", len as u128 + 56);
            assert!(err.to_string().contains(&says), "{err}");
        }
    }

    #[test]
    fn pack_trailers_locate_their_table_and_refuse_nonsense() {
        let len = 1000u64;
        let t = pack_trailer(100);
        assert_eq!(parse_pack_trailer("p", len, &t).unwrap(), (884, 100));
        for bad_len in [0, 10, len] {
            assert!(parse_pack_trailer("p", len, &pack_trailer(bad_len)).is_err());
        }
        let mut wrong = t;
        wrong[15] ^= 1;
        assert!(parse_pack_trailer("p", len, &wrong).is_err());
        assert!(parse_pack_trailer("p", 20, &t).is_err());
        assert!(parse_pack_trailer("p", len, &t[1..]).is_err());
    }
}
