//! Fuzz input to metadata envelope, and the allocation bound of metadata
//! decoding.
//!
//! Input: one mode byte, then a payload. Mode bits 0-1 say what the
//! payload is: 0 the postcard plaintext (stored uncompressed), 1 the
//! plaintext that the harness compresses as writers do, 2 a zstd frame as
//! is, 3 a whole file (header, checksum and all) as is. Bit 2 picks the
//! encrypted repository, whose payloads the harness seals (modes 0-2).
//! Modes 0-2 get a valid header and checksum, which mutations could never
//! hit, so the fuzzer reaches the decoders behind them.

use std::io::Read;

use vfs_core::format::{self, FLAG_SEALED, FLAG_ZSTD};
use vfs_core::repo::Repository;

use crate::repos::{self, Fixture};

/// Bound on bytes live at once while decoding metadata: `PER_BYTE` per
/// byte of the file plus its plaintext, plus `FIXED`.
///
/// `PER_BYTE`: decoded structures are larger than their postcard form. The
/// extreme is a hole in a file's chunk list, 1 byte on disk and 33 in an
/// `Option<ChunkId>`; a vector doubling as it grows holds up to 3x its
/// contents while it moves, and the mount's tables (child lists, chunk
/// offsets, 8 bytes per chunk) come on top: 33 * 3 + 8 + the plaintext and
/// the file themselves is under 128.
///
/// `FIXED`: zstd's decoding window, up to 2^[`format::META_WINDOW_LOG_MAX`]
/// (8 MiB) before any data is read; serde preallocating at most 1 MiB for
/// a vector from its declared length, once per level of nesting that is
/// still open (three in a manifest); contexts and messages.
pub const PER_BYTE: usize = 128;
pub const FIXED: usize = 12 << 20;

/// Inputs whose plaintext is larger than this are skipped: legitimate (a
/// sparse file's chunk list compresses a thousandfold) but too slow to
/// fuzz. What the format refuses outright, above
/// [`format::MAX_META_PLAIN`], is refused from the frame header and is
/// still checked.
pub const PLAIN_BUDGET: usize = 8 << 20;

pub struct MetaInput {
    pub fixture: &'static Fixture,
    /// The file as stored.
    pub file: Vec<u8>,
}

/// The file a fuzz input stands for, with the repository to read it in.
pub fn parse(magic: [u8; 8], data: &[u8]) -> Option<MetaInput> {
    let (&mode, payload) = data.split_first()?;
    let fixture = if mode & 4 != 0 {
        repos::encrypted()
    } else {
        repos::plain()
    };
    let (mut body, mut flags) = match mode & 3 {
        0 => (payload.to_vec(), 0),
        1 => (zstd::bulk::compress(payload, 1).ok()?, FLAG_ZSTD),
        2 => (payload.to_vec(), FLAG_ZSTD),
        _ => {
            return Some(MetaInput {
                fixture,
                file: payload.to_vec(),
            })
        }
    };
    if let Some(keys) = fixture.repo.keys() {
        body = keys.seal_meta(&body);
        flags |= FLAG_SEALED;
    }
    Some(MetaInput {
        fixture,
        file: format::seal_envelope(magic, flags, &body),
    })
}

/// The input for a plaintext in `mode` (0-2; for 2 the plaintext is
/// compressed here), for seeds.
pub fn input(mode: u8, plain: &[u8]) -> Vec<u8> {
    let mut out = vec![mode];
    if mode & 3 == 2 {
        out.extend(zstd::bulk::compress(plain, 3).expect("zstd in memory"));
    } else {
        out.extend_from_slice(plain);
    }
    out
}

/// How many plaintext bytes `file` really holds (not what its headers
/// claim), worked out by the harness; `None` above [`PLAIN_BUDGET`].
/// Damage that the product refuses counts what decodes before it.
pub fn plain_len(repo: &Repository, magic: [u8; 8], file: &[u8]) -> Option<usize> {
    let Ok((flags, payload)) = format::open_envelope("fuzz input", magic, file) else {
        return Some(0);
    };
    let opened;
    let mut payload = payload;
    if flags & FLAG_SEALED != 0 {
        match repo.keys().and_then(|k| k.open_meta(payload)) {
            Some(o) => {
                opened = o;
                payload = &opened;
            }
            None => return Some(0),
        }
    }
    if flags & FLAG_ZSTD == 0 {
        return Some(payload.len());
    }
    let Ok(decoder) = zstd::stream::read::Decoder::with_buffer(payload) else {
        return Some(0);
    };
    let mut decoder = decoder.single_frame();
    if decoder.window_log_max(format::META_WINDOW_LOG_MAX).is_err() {
        return Some(0);
    }
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0;
    loop {
        match decoder.read(&mut buf) {
            Ok(0) | Err(_) => return Some(total),
            Ok(n) => total += n,
        }
        if total > PLAIN_BUDGET {
            return None;
        }
    }
}
