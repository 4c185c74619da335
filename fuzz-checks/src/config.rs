//! A repository's config file as `Repository::open` reads it (envelope,
//! UTF-8, JSON, version, levels), with the key record of an encrypted one
//! checked (`EncryptionConfig::key_record`) and unlocked
//! (`Keys::unlock`) with the harness's password.
//!
//! Input: a mode byte, then the file. With mode bit 0 the rest is the JSON
//! text and the harness wraps it in a valid envelope; otherwise it is the
//! whole file. Key derivation only runs for costs of at most
//! [`MAX_FUZZ_KDF`]: larger ones are legitimate up to the product's
//! bounds, but would take the fuzzer seconds per input.

use std::sync::Arc;

use vfs_core::crypto::KdfParams;
use vfs_core::format;
use vfs_core::repo::{RepoConfig, Repository, CONFIG_KEY};
use vfs_core::store::{MemoryStore, ObjectStore};

use crate::{alloc, repos};

/// Largest costs derived per input: 64 KiB, two passes, two lanes.
pub const MAX_FUZZ_KDF: KdfParams = KdfParams {
    m_cost_kib: 64,
    t_cost: 2,
    p_cost: 2,
};

/// Bound on bytes live while opening: serde_json's values are at most a
/// few times their text; Argon2's memory (at most 64 KiB here), the cipher
/// and messages are the constant.
const PER_BYTE: usize = 16;
const FIXED: usize = 1 << 20;

pub fn check(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let file = if mode & 1 != 0 {
        format::seal_envelope(format::CONFIG_MAGIC, 0, rest)
    } else {
        rest.to_vec()
    };
    // The harness's own look at the JSON, only to keep slow key
    // derivations out: the product parses it again below.
    let costly = serde_json::from_slice::<RepoConfig>(rest)
        .ok()
        .and_then(|c| c.encryption)
        .filter(|e| {
            e.m_cost_kib > MAX_FUZZ_KDF.m_cost_kib
                || e.t_cost > MAX_FUZZ_KDF.t_cost
                || e.p_cost > MAX_FUZZ_KDF.p_cost
        });
    if let Some(encryption) = costly {
        let (record, peak) = alloc::measure(|| encryption.key_record());
        alloc::assert_within("key record", peak, data.len(), PER_BYTE, FIXED);
        if let Ok(r) = record {
            assert!(r.params.m_cost_kib <= KdfParams::MAX_M_COST_KIB);
            assert!(r.params.t_cost <= KdfParams::MAX_T_COST);
            assert!(r.params.p_cost <= KdfParams::MAX_P_COST);
        }
        return;
    }
    let store = Arc::new(MemoryStore::new());
    store.put(CONFIG_KEY, &file).expect("memory store");
    let (opened, peak) =
        alloc::measure(|| Repository::open(store.clone(), || Ok(repos::PASSWORD.to_vec())));
    alloc::assert_within("config", peak, data.len(), PER_BYTE, FIXED);
    if let Ok(repo) = opened {
        let config = repo.config();
        assert_eq!(config.version, format::REPO_VERSION);
        assert_eq!(repo.is_encrypted(), config.encryption.is_some());
        // A repository that opens can write and read back its metadata.
        let raw = repo.encode_meta(format::INDEX_MAGIC, &vec![1u8, 2, 3]);
        let back: Vec<u8> = repo
            .decode_meta("fuzz", format::INDEX_MAGIC, &raw)
            .expect("own metadata decodes");
        assert_eq!(back, [1, 2, 3]);
    }
}
