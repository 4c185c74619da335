//! The core's error type. Every variant names what broke (which file,
//! which chunk, which restore point) so a user can act on the message.

use std::path::PathBuf;

use crate::ids::ChunkId;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The OS error is in the message, so it is not also a `source`
    // (callers printing the chain would show it twice).
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: not found")]
    NotFound(String),
    #[error("{0}: already exists")]
    AlreadyExists(String),
    /// A create-only write met an object of the same name with other
    /// content: nothing was replaced.
    #[error("{0}: exists with other content; it was left as it is (run `flr verify`)")]
    Conflict(String),
    #[error("{what}: malformed: {why}")]
    Malformed { what: String, why: String },
    #[error(
        "{what}: format version {found} is not supported (this build reads version {supported})"
    )]
    UnsupportedVersion {
        what: String,
        found: u32,
        supported: u32,
    },
    #[error("wrong password for repository {0}")]
    WrongPassword(PathBuf),
    #[error(
        "repository {0} is encrypted: a password is needed (set FLR_PASSWORD or run on a terminal)"
    )]
    PasswordNeeded(PathBuf),
    #[error("chunk {id} (pack {pack}): {why}")]
    CorruptChunk {
        id: ChunkId,
        pack: String,
        why: String,
    },
    #[error("chunk {0} is referenced but not stored in the repository")]
    MissingChunk(ChunkId),
    #[error("{0}")]
    InvalidInput(String),
    /// A write to the repository failed earlier in this ingest (a full
    /// disk, say); the message is that failure's.
    #[error("writing to the repository failed: {0}")]
    Storage(String),
    /// Work stopped before its end because it was asked to, or because
    /// a part it belongs with failed; the message says which.
    #[error("{0}")]
    Cancelled(String),
    /// A lock in the repository stands in the way, or was lost.
    #[error("{0}")]
    Locked(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn malformed(what: impl Into<String>, why: impl Into<String>) -> Self {
        Error::Malformed {
            what: what.into(),
            why: why.into(),
        }
    }

    /// True when the error means stored data failed verification.
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            Error::CorruptChunk { .. } | Error::MissingChunk(_) | Error::Malformed { .. }
        )
    }
}
