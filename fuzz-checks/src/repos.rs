//! The repositories the targets decode with: one plain and one encrypted,
//! each over a `MemoryStore`, made once per process.

use std::sync::{Arc, OnceLock};

use vfs_core::crypto::{EncryptionConfig, KdfParams};
use vfs_core::format;
use vfs_core::repo::{RepoConfig, Repository, CONFIG_KEY};
use vfs_core::store::{MemoryStore, ObjectStore};

/// The password of every encrypted repository here.
pub const PASSWORD: &[u8] = b"fuzz";

/// Key-derivation costs small enough to run on every input (Argon2's
/// floor: 8 KiB, one pass, one lane).
pub const TINY_KDF: KdfParams = KdfParams {
    m_cost_kib: 8,
    t_cost: 1,
    p_cost: 1,
};

pub struct Fixture {
    pub store: Arc<MemoryStore>,
    pub repo: Arc<Repository>,
}

/// A config file as `flr init` writes it, with `encryption` if given.
pub fn config_file(encryption: Option<EncryptionConfig>) -> Vec<u8> {
    let config = RepoConfig {
        version: format::REPO_VERSION,
        id: "0123456789abcdef0123456789abcdef".into(),
        compression_level: 3,
        page_compression_level: 1,
        encryption,
    };
    let json = serde_json::to_string_pretty(&config).expect("config serializes") + "\n";
    format::seal_envelope(format::CONFIG_MAGIC, 0, json.as_bytes())
}

fn make(encryption: Option<EncryptionConfig>) -> Fixture {
    let store = Arc::new(MemoryStore::new());
    store
        .put(CONFIG_KEY, &config_file(encryption))
        .expect("memory store");
    let repo = Repository::open(store.clone(), || Ok(PASSWORD.to_vec()))
        .expect("a fresh repository opens");
    Fixture {
        store,
        repo: Arc::new(repo),
    }
}

/// A new plain repository, for a target that writes into its own.
pub fn fresh() -> Fixture {
    make(None)
}

pub fn plain() -> &'static Fixture {
    static PLAIN: OnceLock<Fixture> = OnceLock::new();
    PLAIN.get_or_init(|| make(None))
}

/// The encrypted repository's key record, made once by `Keys::create_with`
/// (password [`PASSWORD`], [`TINY_KDF`]) and kept, so whole sealed files in
/// the corpora open in every process.
const ENCRYPTED_RECORD: (&str, &str) = (
    "de18bf220605412b5ff20faa5101768e",
    "80a3467b528cb3dab8c955ecd6f6babb8fdac95ce8a12d4df6b8c137d5f1ede18e5333cbdf1d93a96c8297472f40f882c967cdb62d7265a5566d34a40b5ec30a42639dbd4847cb4d4cd7a3fc0da9c1502e4628f2999da29e61649f029d26f607ba5b493b4f89a21e",
);

pub fn encrypted() -> &'static Fixture {
    static ENCRYPTED: OnceLock<Fixture> = OnceLock::new();
    ENCRYPTED.get_or_init(|| {
        make(Some(EncryptionConfig {
            kdf: "argon2id".into(),
            salt: ENCRYPTED_RECORD.0.into(),
            m_cost_kib: TINY_KDF.m_cost_kib,
            t_cost: TINY_KDF.t_cost,
            p_cost: TINY_KDF.p_cost,
            wrapped_key: ENCRYPTED_RECORD.1.into(),
        }))
    })
}
