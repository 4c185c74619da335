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

fn kek(password: &[u8], salt: &[u8], m: u32, t: u32, p: u32) -> Result<[u8; KEY_LEN]> {
    let params = Params::new(m, t, p, Some(KEY_LEN))
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
        let (m, t, p) = (KDF_M_COST_KIB, KDF_T_COST, KDF_P_COST);
        let salt: [u8; KDF_SALT_LEN] = random_bytes();
        let master: [u8; MASTER_KEY_LEN] = random_bytes();
        let wrap = XChaCha20Poly1305::new(&kek(password, &salt, m, t, p)?.into());
        let nonce: [u8; NONCE_LEN] = random_bytes();
        let sealed = wrap
            .encrypt(XNonce::from_slice(&nonce), master.as_slice())
            .map_err(|_| Error::InvalidInput("sealing the master key failed".into()))?;
        let mut wrapped = nonce.to_vec();
        wrapped.extend_from_slice(&sealed);
        let config = EncryptionConfig {
            kdf: KDF_NAME.into(),
            salt: hex::encode(salt),
            m_cost_kib: m,
            t_cost: t,
            p_cost: p,
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
        if config.kdf != KDF_NAME {
            return Err(Error::malformed(
                "config",
                format!("unknown key derivation {:?}", config.kdf),
            ));
        }
        let bad = |why: &str| Error::malformed("config", why.to_string());
        let salt = hex::decode(&config.salt).map_err(|_| bad("salt is not hex"))?;
        let wrapped =
            hex::decode(&config.wrapped_key).map_err(|_| bad("wrapped key is not hex"))?;
        if wrapped.len() != WRAPPED_KEY_LEN {
            return Err(bad("wrapped key has the wrong length"));
        }
        let wrap = XChaCha20Poly1305::new(
            &kek(
                password,
                &salt,
                config.m_cost_kib,
                config.t_cost,
                config.p_cost,
            )?
            .into(),
        );
        let master = wrap
            .decrypt(
                XNonce::from_slice(&wrapped[..NONCE_LEN]),
                &wrapped[NONCE_LEN..],
            )
            .map_err(|_| Error::WrongPassword(repo.to_path_buf()))?;
        let master: [u8; MASTER_KEY_LEN] =
            master.try_into().map_err(|_| bad("master key length"))?;
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
