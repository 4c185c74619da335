//! `format::open_envelope`, the first step of reading every metadata file.
//!
//! Input: a mode byte, then the file. Mode bits 0-1 pick the expected
//! magic; bit 2 has the harness rewrite the length field and the checksum
//! to match, so mutations of the header fields behind them get checked.

use vfs_core::format::{self, CHECKSUM_LEN, ENVELOPE_HEADER_LEN};

use crate::alloc;

const MAGICS: [[u8; 8]; 4] = [
    format::CONFIG_MAGIC,
    format::INDEX_MAGIC,
    format::MANIFEST_MAGIC,
    format::PACK_MAGIC,
];

pub fn check(data: &[u8]) {
    let Some((&mode, file)) = data.split_first() else {
        return;
    };
    let magic = MAGICS[(mode & 3) as usize];
    let mut file = file.to_vec();
    if mode & 4 != 0 && file.len() >= ENVELOPE_HEADER_LEN + CHECKSUM_LEN {
        let body = file.len() - CHECKSUM_LEN;
        let len = (body - ENVELOPE_HEADER_LEN) as u64;
        file[16..24].copy_from_slice(&len.to_le_bytes());
        let sum = blake3::hash(&file[..body]);
        file[body..].copy_from_slice(sum.as_bytes());
    }
    let (result, peak) = alloc::measure(|| format::open_envelope("fuzz", magic, &file));
    // Opening copies nothing: what it allocates is an error message.
    alloc::assert_within("envelope", peak, 0, 0, 4 << 10);
    if let Ok((flags, payload)) = result {
        assert_eq!(&file[..8], &magic);
        assert_eq!(flags & !(format::FLAG_ZSTD | format::FLAG_SEALED), 0);
        assert_eq!(
            payload.len(),
            file.len() - ENVELOPE_HEADER_LEN - CHECKSUM_LEN
        );
        assert!(std::ptr::eq(
            payload.as_ptr(),
            file[ENVELOPE_HEADER_LEN..].as_ptr()
        ));
    }
}
