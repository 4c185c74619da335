//! Content identifiers: BLAKE3 hashes, keyed when the repository is
//! encrypted so that ids reveal nothing about the plaintext.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasherDefault, Hash, Hasher};

use serde::{Deserialize, Serialize};

/// Identifies one chunk of plaintext by its (possibly keyed) BLAKE3 hash.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkId(pub [u8; 32]);

impl Hash for ChunkId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // The id is already a uniform hash: its first eight bytes are a
        // perfectly good table hash, with no need to hash it again.
        state.write_u64(u64::from_le_bytes(self.0[..8].try_into().unwrap()));
    }
}

/// Hasher for tables keyed by [`ChunkId`]: passes the id's own bits
/// through (SipHash over 32 bytes was a visible cost per chunk lookup).
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached if something other than a ChunkId is hashed.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ b as u64;
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

pub type BuildIdHasher = BuildHasherDefault<IdHasher>;
/// A map keyed by chunk id.
pub type IdMap<V> = HashMap<ChunkId, V, BuildIdHasher>;
/// A set of chunk ids.
pub type IdSet = HashSet<ChunkId, BuildIdHasher>;

impl ChunkId {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Twelve hex digits are plenty to find a chunk in logs.
        write!(f, "{}", &self.to_hex()[..12])
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.to_hex())
    }
}

/// Identifies a pack file by the BLAKE3 hash of its whole contents.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PackId(pub [u8; 32]);

impl PackId {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<PackId> {
        let bytes = hex::decode(s).ok()?;
        Some(PackId(bytes.try_into().ok()?))
    }
}

impl fmt::Display for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_hex())
    }
}

impl fmt::Debug for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PackId({})", self.to_hex())
    }
}

/// Computes chunk ids: plain BLAKE3, or keyed BLAKE3 in encrypted repositories.
#[derive(Clone)]
pub struct ChunkHasher {
    key: Option<[u8; 32]>,
}

impl ChunkHasher {
    pub fn plain() -> Self {
        ChunkHasher { key: None }
    }

    pub fn keyed(key: [u8; 32]) -> Self {
        ChunkHasher { key: Some(key) }
    }

    pub fn id(&self, data: &[u8]) -> ChunkId {
        let hash = match &self.key {
            Some(key) => blake3::keyed_hash(key, data),
            None => blake3::hash(data),
        };
        ChunkId(*hash.as_bytes())
    }
}
