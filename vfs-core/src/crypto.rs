//! Encryption: a random master key wrapped by a password-derived key
//! (Argon2id), data sealed with XChaCha20-Poly1305.
//!
//! Every sealed object (a frame of chunks, a metadata envelope) carries a
//! fresh random 24-byte nonce in front: a frame's contents depend on which
//! chunks were new together, so no nonce can be derived from them safely.

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::{
    DATA_KEY, ID_KEY, KDF_M_COST_KIB, KDF_NAME, KDF_P_COST, KDF_SALT_LEN, KDF_T_COST, KDF_VERSION,
    KEY_LEN, MASTER_KEY_LEN, NONCE_LEN, TAG_LEN, WRAPPED_KEY_LEN,
};

/// Key-derivation and wrapped-key record kept in the repository config.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionConfig {
    pub kdf: String,
    pub salt: String,
    pub m_cost_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
    /// The master key wrapped as [`crate::format::WRAPPED_KEY_LEN`] says, hex.
    pub wrapped_key: String,
}

/// The unwrapped keys of an encrypted repository.
#[derive(Clone)]
pub struct Keys {
    cipher: XChaCha20Poly1305,
    pub id_key: [u8; KEY_LEN],
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).expect("the OS random source failed");
    b
}

/// Argon2id cost parameters, as kept in [`EncryptionConfig`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    pub m_cost_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
}

impl KdfParams {
    /// What `flr init --encrypt` uses (see [`crate::format::KDF_M_COST_KIB`]).
    pub const DEFAULT: KdfParams = KdfParams {
        m_cost_kib: KDF_M_COST_KIB,
        t_cost: KDF_T_COST,
        p_cost: KDF_P_COST,
    };
    /// Upper bounds a config may ask for. Unlocking allocates `m_cost_kib`
    /// and runs `t_cost` passes over it before the password can be checked,
    /// so a damaged or hostile config must not name terabytes or hours:
    /// 1 GiB and 16 passes are 16 and 5 times the default.
    pub const MAX_M_COST_KIB: u32 = 1 << 20;
    pub const MAX_T_COST: u32 = 16;
    pub const MAX_P_COST: u32 = 16;
}

/// What unlocking needs from an [`EncryptionConfig`], checked.
#[derive(Clone, Debug)]
pub struct KeyRecord {
    pub params: KdfParams,
    pub salt: Vec<u8>,
    /// The master key wrapped as [`WRAPPED_KEY_LEN`] says.
    pub wrapped: Vec<u8>,
}

impl EncryptionConfig {
    /// Checks the record without deriving anything: the key derivation,
    /// its costs (within [`KdfParams`]' bounds), the salt and the wrapped
    /// key's encoding and length.
    pub fn key_record(&self) -> Result<KeyRecord> {
        let bad = |why: String| Error::malformed("config", why);
        if self.kdf != KDF_NAME {
            return Err(bad(format!("unknown key derivation {:?}", self.kdf)));
        }
        let params = KdfParams {
            m_cost_kib: self.m_cost_kib,
            t_cost: self.t_cost,
            p_cost: self.p_cost,
        };
        if params.m_cost_kib > KdfParams::MAX_M_COST_KIB
            || params.t_cost > KdfParams::MAX_T_COST
            || params.p_cost > KdfParams::MAX_P_COST
        {
            return Err(bad(format!(
                "key-derivation costs {}/{}/{} (KiB/passes/lanes) exceed {}/{}/{}",
                params.m_cost_kib,
                params.t_cost,
                params.p_cost,
                KdfParams::MAX_M_COST_KIB,
                KdfParams::MAX_T_COST,
                KdfParams::MAX_P_COST
            )));
        }
        let salt = hex::decode(&self.salt).map_err(|_| bad("salt is not hex".into()))?;
        let wrapped =
            hex::decode(&self.wrapped_key).map_err(|_| bad("wrapped key is not hex".into()))?;
        if wrapped.len() != WRAPPED_KEY_LEN {
            return Err(bad("wrapped key has the wrong length".into()));
        }
        Ok(KeyRecord {
            params,
            salt,
            wrapped,
        })
    }
}

fn kek(password: &[u8], salt: &[u8], p: KdfParams) -> Result<[u8; KEY_LEN]> {
    let params = Params::new(p.m_cost_kib, p.t_cost, p.p_cost, Some(KEY_LEN))
        .map_err(|e| Error::InvalidInput(format!("bad key-derivation parameters: {e}")))?;
    let version = Version::try_from(KDF_VERSION)
        .map_err(|e| Error::InvalidInput(format!("key-derivation version: {e}")))?;
    let mut out = [0u8; KEY_LEN];
    Argon2::new(Algorithm::Argon2id, version, params)
        .hash_password_into(password, salt, &mut out)
        .map_err(|e| Error::InvalidInput(format!("key derivation failed: {e}")))?;
    Ok(out)
}

impl Keys {
    /// Makes new random keys and the config record that wraps them.
    pub fn create(password: &[u8]) -> Result<(Keys, EncryptionConfig)> {
        Self::create_with(password, KdfParams::DEFAULT)
    }

    /// Like [`Self::create`] with other key-derivation costs (tests use
    /// tiny ones: the default takes a good part of a second).
    pub fn create_with(password: &[u8], params: KdfParams) -> Result<(Keys, EncryptionConfig)> {
        let salt: [u8; KDF_SALT_LEN] = random_bytes();
        let master: [u8; MASTER_KEY_LEN] = random_bytes();
        let wrap = XChaCha20Poly1305::new(&kek(password, &salt, params)?.into());
        let nonce: [u8; NONCE_LEN] = random_bytes();
        let sealed = wrap
            .encrypt(XNonce::from_slice(&nonce), master.as_slice())
            .map_err(|_| Error::InvalidInput("sealing the master key failed".into()))?;
        let mut wrapped = nonce.to_vec();
        wrapped.extend_from_slice(&sealed);
        let config = EncryptionConfig {
            kdf: KDF_NAME.into(),
            salt: hex::encode(salt),
            m_cost_kib: params.m_cost_kib,
            t_cost: params.t_cost,
            p_cost: params.p_cost,
            wrapped_key: hex::encode(wrapped),
        };
        Ok((Keys::from_master(&master), config))
    }

    /// Unwraps the master key; a wrong password fails authentication.
    pub fn unlock(
        config: &EncryptionConfig,
        password: &[u8],
        repo: &std::path::Path,
    ) -> Result<Keys> {
        let record = config.key_record()?;
        let wrap = XChaCha20Poly1305::new(&kek(password, &record.salt, record.params)?.into());
        let master = wrap
            .decrypt(
                XNonce::from_slice(&record.wrapped[..NONCE_LEN]),
                &record.wrapped[NONCE_LEN..],
            )
            .map_err(|_| Error::WrongPassword(repo.to_path_buf()))?;
        let master: [u8; MASTER_KEY_LEN] = master
            .try_into()
            .map_err(|_| Error::malformed("config", "master key length"))?;
        Ok(Keys::from_master(&master))
    }

    fn from_master(master: &[u8; MASTER_KEY_LEN]) -> Keys {
        let mut data_key = [0u8; KEY_LEN];
        data_key.copy_from_slice(&master[DATA_KEY]);
        let mut id_key = [0u8; KEY_LEN];
        id_key.copy_from_slice(&master[ID_KEY]);
        Keys {
            cipher: XChaCha20Poly1305::new(&data_key.into()),
            id_key,
        }
    }

    /// Seals bytes with a fresh random nonce stored in front.
    pub fn seal_meta(&self, plain: &[u8]) -> Vec<u8> {
        let nonce: [u8; NONCE_LEN] = random_bytes();
        let mut out = nonce.to_vec();
        out.extend(
            self.cipher
                .encrypt(XNonce::from_slice(&nonce), plain)
                .expect("XChaCha20-Poly1305 sealing cannot fail for in-memory buffers"),
        );
        out
    }

    pub fn open_meta(&self, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return None;
        }
        self.cipher
            .decrypt(
                XNonce::from_slice(&sealed[..NONCE_LEN]),
                &sealed[NONCE_LEN..],
            )
            .ok()
    }
}

/// Random bytes for ids of repositories and temporary files.
pub fn random_hex(n: usize) -> String {
    let b: [u8; 16] = random_bytes();
    hex::encode(&b[..n.min(16)])
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: KdfParams = KdfParams {
        m_cost_kib: 8,
        t_cost: 1,
        p_cost: 1,
    };

    #[test]
    fn unlock_takes_the_password_and_refuses_others() {
        let (keys, config) = Keys::create_with(b"pw", TINY).unwrap();
        let again = Keys::unlock(&config, b"pw", "r".as_ref()).unwrap();
        assert_eq!(again.id_key, keys.id_key);
        assert!(matches!(
            Keys::unlock(&config, b"other", "r".as_ref()),
            Err(Error::WrongPassword(_))
        ));
    }

    #[test]
    fn huge_key_derivation_costs_are_refused_before_deriving() {
        // A config naming 4 TiB of Argon2 memory used to reach the
        // allocator (and abort the process) before the password was tried.
        let (_, good) = Keys::create_with(b"pw", TINY).unwrap();
        for (m, t, p) in [(u32::MAX, 1, 1), (8, u32::MAX, 1), (8, 1, 0xFF_FFFF)] {
            let mut config = good.clone();
            (config.m_cost_kib, config.t_cost, config.p_cost) = (m, t, p);
            let started = std::time::Instant::now();
            let err = Keys::unlock(&config, b"pw", "r".as_ref()).err().unwrap();
            assert!(matches!(err, Error::Malformed { .. }), "{err}");
            assert!(started.elapsed() < std::time::Duration::from_secs(1));
        }
    }
}
