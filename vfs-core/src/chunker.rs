//! Cutting files into chunks.
//!
//! Two ways, chosen per file (see [`ChunkerKind::choose`]):
//! - fixed-size chunks aligned to the database page size, for data files
//!   that change in place: a changed page changes exactly one chunk, and
//!   offset-to-chunk is a division;
//! - content-defined chunks (FastCDC) for streams and everything else, so
//!   that inserted bytes shift only the chunks around the insert.
//!
//! Chunkers work on a buffer and report cut points; [`ChunkStream`] drives
//! them over any `Read` with bounded memory.

use std::io::Read;
use std::ops::Range;

use serde::{Deserialize, Serialize};

/// FastCDC sizes: 64 KiB average, the size the benchmark favoured for
/// streams (dump files, archives) between dedup ratio and index size.
pub const CDC_MIN: u32 = 16 << 10;
pub const CDC_AVG: u32 = 64 << 10;
pub const CDC_MAX: u32 = 256 << 10;

/// Fixed chunk size used for page-structured files whose page size cannot
/// be read from a header (PostgreSQL, SQL Server and InnoDB use 8/16 KiB
/// pages; 8 KiB divides or equals all of them).
pub const DEFAULT_PAGE_CHUNK: u32 = 8 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkerKind {
    /// Fixed-size chunks of this many bytes.
    Fixed(u32),
    /// FastCDC with the given min / average / max sizes.
    Cdc { min: u32, avg: u32, max: u32 },
}

impl ChunkerKind {
    pub fn default_cdc() -> Self {
        ChunkerKind::Cdc {
            min: CDC_MIN,
            avg: CDC_AVG,
            max: CDC_MAX,
        }
    }

    /// Picks the chunker for a file from its name and first bytes.
    ///
    /// SQLite files declare their page size in the header; PostgreSQL
    /// relation files (numeric names, optionally `_fsm`/`_vm`/`.N`) and
    /// files with common database-file extensions get 8 KiB pages.
    pub fn choose(name: &[u8], head: &[u8]) -> Self {
        if let Some(page) = sqlite_page_size(head) {
            return ChunkerKind::Fixed(page);
        }
        let name = String::from_utf8_lossy(name).to_ascii_lowercase();
        let ext_db = [".mdf", ".ndf", ".ldf", ".ibd", ".db", ".sqlite", ".sqlite3"]
            .iter()
            .any(|e| name.ends_with(e));
        if ext_db || is_postgres_relation(&name) {
            return ChunkerKind::Fixed(DEFAULT_PAGE_CHUNK);
        }
        ChunkerKind::default_cdc()
    }

    /// Parses `fixed:SIZE`, `cdc` or `auto` (auto is `None`).
    pub fn parse(s: &str) -> Result<Option<Self>, String> {
        if s == "auto" {
            return Ok(None);
        }
        if s == "cdc" {
            return Ok(Some(ChunkerKind::default_cdc()));
        }
        if let Some(size) = s.strip_prefix("fixed:") {
            let size = parse_size(size)?;
            if !(512..=(4 << 20)).contains(&size) {
                return Err(format!("fixed chunk size {size} is outside 512 B .. 4 MiB"));
            }
            return Ok(Some(ChunkerKind::Fixed(size as u32)));
        }
        Err(format!(
            "unknown chunker {s:?} (expected auto, cdc or fixed:SIZE)"
        ))
    }
}

/// Parses sizes such as `4096`, `64k`, `8KiB`, `2M`, `1G`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.trim_end_matches("ib").trim_end_matches('b');
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("not a size: {s:?}"))
}

fn sqlite_page_size(head: &[u8]) -> Option<u32> {
    if head.len() < 100 || &head[..16] != b"SQLite format 3\0" {
        return None;
    }
    let raw = u16::from_be_bytes([head[16], head[17]]) as u32;
    // The header stores 65536 as 1.
    let page = if raw == 1 { 65536 } else { raw };
    (page.is_power_of_two() && (512..=65536).contains(&page)).then_some(page)
}

fn is_postgres_relation(name: &str) -> bool {
    let base = name.split(['_', '.']).next().unwrap_or("");
    !base.is_empty() && base.bytes().all(|b| b.is_ascii_digit()) && {
        let rest = &name[base.len()..];
        rest.is_empty()
            || rest == "_fsm"
            || rest == "_vm"
            || rest == "_init"
            || rest
                .strip_prefix('.')
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
    }
}

/// Finds the cut points of the chunks that start at `buf[0]`. When `eof`
/// is false the last chunk may be incomplete and is left for the next call:
/// the returned ranges cover a prefix of `buf`.
pub fn cut(kind: ChunkerKind, buf: &[u8], eof: bool) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    match kind {
        ChunkerKind::Fixed(size) => {
            let size = size as usize;
            let mut start = 0;
            while start + size <= buf.len() {
                out.push(start..start + size);
                start += size;
            }
            if eof && start < buf.len() {
                out.push(start..buf.len());
            }
        }
        ChunkerKind::Cdc { min, avg, max } => {
            let mut start = 0;
            // A cut point depends only on bytes from the chunk's start, so a
            // chunk ending before the buffer's end is final only if the
            // buffer held at least `max` bytes from its start, or at EOF.
            while start < buf.len() {
                let rest = &buf[start..];
                if !eof && rest.len() < max as usize {
                    break;
                }
                let mut cdc = fastcdc::v2020::FastCDC::new(rest, min, avg, max);
                let Some(chunk) = cdc.next() else { break };
                out.push(start..start + chunk.length);
                start += chunk.length;
            }
        }
    }
    out
}

/// A batch of chunks read from a stream: one buffer and the chunk ranges.
pub struct ChunkBatch {
    pub data: Vec<u8>,
    pub chunks: Vec<Range<usize>>,
    /// Offset in the file of `data[0]`.
    pub offset: u64,
}

/// Reads a stream and yields batches of whole chunks, holding at most one
/// batch plus one maximal chunk in memory.
pub struct ChunkStream<R> {
    reader: R,
    kind: ChunkerKind,
    carry: Vec<u8>,
    offset: u64,
    batch_bytes: usize,
    eof: bool,
}

impl<R: Read> ChunkStream<R> {
    pub fn new(reader: R, kind: ChunkerKind, batch_bytes: usize) -> Self {
        ChunkStream {
            reader,
            kind,
            carry: Vec::new(),
            offset: 0,
            batch_bytes,
            eof: false,
        }
    }

    /// The next batch, or `None` at the end of the stream.
    pub fn next_batch(&mut self) -> std::io::Result<Option<ChunkBatch>> {
        let mut data = std::mem::take(&mut self.carry);
        let want = self.batch_bytes.max(CDC_MAX as usize * 2);
        // read_to_end grows the buffer as data arrives (no zero-filling of
        // a whole batch), so a small file costs what it holds.
        while !self.eof && data.len() < want {
            let limit = (want - data.len()) as u64;
            match (&mut self.reader).take(limit).read_to_end(&mut data) {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if data.is_empty() {
            return Ok(None);
        }
        let chunks = cut(self.kind, &data, self.eof);
        let used = chunks.last().map_or(0, |c| c.end);
        self.carry = data[used..].to_vec();
        data.truncate(used);
        let offset = self.offset;
        self.offset += used as u64;
        if chunks.is_empty() {
            // Not possible with want >= 2 * max, but never loop forever.
            return if self.eof {
                Ok(None)
            } else {
                self.next_batch()
            };
        }
        Ok(Some(ChunkBatch {
            data,
            chunks,
            offset,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all_chunks(kind: ChunkerKind, data: &[u8], batch: usize) -> Vec<Vec<u8>> {
        let mut s = ChunkStream::new(data, kind, batch);
        let mut out = Vec::new();
        while let Some(b) = s.next_batch().unwrap() {
            for r in b.chunks {
                out.push(b.data[r].to_vec());
            }
        }
        out
    }

    proptest! {
        #[test]
        fn chunks_concatenate_to_input(data in proptest::collection::vec(any::<u8>(), 0..600_000),
                                       fixed in 1u32..5, batch in 1usize..300_000) {
            for kind in [ChunkerKind::Fixed(fixed * 1024), ChunkerKind::default_cdc(),
                         ChunkerKind::Cdc { min: 1024, avg: 4096, max: 16384 }] {
                let chunks = all_chunks(kind, &data, batch);
                prop_assert_eq!(chunks.concat(), data.clone());
                if let ChunkerKind::Fixed(size) = kind {
                    for c in &chunks[..chunks.len().saturating_sub(1)] {
                        prop_assert_eq!(c.len(), size as usize);
                    }
                }
            }
        }

        #[test]
        fn cdc_cuts_do_not_depend_on_batching(data in proptest::collection::vec(any::<u8>(), 0..700_000),
                                              b1 in 1usize..400_000, b2 in 1usize..400_000) {
            let kind = ChunkerKind::Cdc { min: 2048, avg: 8192, max: 32768 };
            prop_assert_eq!(all_chunks(kind, &data, b1), all_chunks(kind, &data, b2));
        }
    }

    #[test]
    fn choose_reads_sqlite_page_size() {
        let mut head = b"SQLite format 3\0".to_vec();
        head.extend_from_slice(&4096u16.to_be_bytes());
        head.resize(100, 0);
        assert_eq!(
            ChunkerKind::choose(b"app.db", &head),
            ChunkerKind::Fixed(4096)
        );
        head[16..18].copy_from_slice(&1u16.to_be_bytes());
        assert_eq!(ChunkerKind::choose(b"x", &head), ChunkerKind::Fixed(65536));
        assert_eq!(ChunkerKind::choose(b"16384", b""), ChunkerKind::Fixed(8192));
        assert_eq!(
            ChunkerKind::choose(b"16384_fsm", b""),
            ChunkerKind::Fixed(8192)
        );
        assert_eq!(
            ChunkerKind::choose(b"16384.1", b""),
            ChunkerKind::Fixed(8192)
        );
        assert_eq!(
            ChunkerKind::choose(b"dump.sql", b""),
            ChunkerKind::default_cdc()
        );
        assert_eq!(ChunkerKind::choose(b"1a", b""), ChunkerKind::default_cdc());
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("8KiB").unwrap(), 8192);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert!(parse_size("x").is_err());
    }
}
