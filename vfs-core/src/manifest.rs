//! A restore point's manifest: the tree of files as backed up, with each
//! file's chunk list, plus the backup's statistics.
//!
//! Nodes are stored flat in depth-first order; each names its parent by
//! index, and node 0 is the restore point's root directory.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::ChunkId;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeKind {
    Dir,
    File,
    Symlink,
    /// The kinds below exist only in writable sessions (a database server
    /// may make a pipe or socket there); restore points never hold them and
    /// [`Manifest::validate`] refuses a manifest that does.
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl NodeKind {
    /// Whether a restore point can hold this kind.
    pub fn is_stored(self) -> bool {
        matches!(self, NodeKind::Dir | NodeKind::File | NodeKind::Symlink)
    }
}

/// Where a file's bytes come from. `None` in a chunk slot is a hole: that
/// many zero bytes, stored as nothing and restored sparse.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Content {
    Empty,
    /// Every chunk is `chunk_size` bytes except possibly the last.
    Fixed {
        chunk_size: u32,
        #[serde(deserialize_with = "exact::vec")]
        chunks: Vec<Option<ChunkId>>,
    },
    /// Content-defined chunks with their lengths.
    Variable {
        #[serde(deserialize_with = "exact::vec")]
        chunks: Vec<(Option<ChunkId>, u32)>,
    },
}

/// Chunk lists decoded into a buffer of their declared length, as far as
/// the bytes being decoded can hold that many stored chunks: grown by
/// doubling, a list of millions of chunks would be held about twice over
/// while it loads.
pub(crate) mod exact {
    use std::cell::Cell;
    use std::marker::PhantomData;

    use serde::de::{Deserialize, Deserializer, SeqAccess, Visitor};

    thread_local! {
        /// Bytes of the input being decoded on this thread, or 0.
        static INPUT: Cell<usize> = const { Cell::new(0) };
    }

    /// Runs `decode` on `input` with lists sized up front.
    pub(crate) fn decoding<T>(input: &[u8], decode: impl FnOnce(&[u8]) -> T) -> T {
        let outer = INPUT.with(|c| c.replace(input.len()));
        let out = decode(input);
        INPUT.with(|c| c.set(outer));
        out
    }

    pub(super) fn vec<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        struct Items<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Items<T> {
            type Value = Vec<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
                // As many stored chunks (a tag and a 32-byte id) as the
                // input holds; without a known input, what serde itself
                // trusts: 1 MiB.
                let bound = match INPUT.with(Cell::get) {
                    0 => (1 << 20) / std::mem::size_of::<T>().max(1),
                    n => n / 33,
                };
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(bound));
                while let Some(item) = seq.next_element()? {
                    out.push(item);
                }
                Ok(out)
            }
        }
        d.deserialize_seq(Items(PhantomData))
    }
}

impl Content {
    /// Every stored chunk, in file order, with its plaintext length.
    pub fn chunks(&self, size: u64) -> Vec<(Option<ChunkId>, u64, u32)> {
        match self {
            Content::Empty => Vec::new(),
            Content::Fixed { chunk_size, chunks } => chunks
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    let off = i as u64 * *chunk_size as u64;
                    // Past `size` a chunk covers nothing: `validate` keeps
                    // that from happening below the root, but the mount
                    // also asks the root directory, whose content it skips.
                    let len = size.saturating_sub(off).min(*chunk_size as u64);
                    (*id, off, len as u32)
                })
                .collect(),
            Content::Variable { chunks } => {
                let mut off = 0u64;
                chunks
                    .iter()
                    .map(|(id, len)| {
                        let item = (*id, off, *len);
                        off += *len as u64;
                        item
                    })
                    .collect()
            }
        }
    }

    /// Bytes held in stored chunks (holes left out), without listing the
    /// chunks.
    pub fn data_bytes(&self, size: u64) -> u64 {
        match self {
            Content::Empty => 0,
            Content::Fixed { chunk_size, chunks } => {
                let step = *chunk_size as u64;
                chunks
                    .iter()
                    .enumerate()
                    .filter(|(_, id)| id.is_some())
                    .map(|(i, _)| size.saturating_sub(i as u64 * step).min(step))
                    .sum()
            }
            Content::Variable { chunks } => chunks
                .iter()
                .filter(|(id, _)| id.is_some())
                .map(|(_, len)| *len as u64)
                .sum(),
        }
    }

    /// Chunk ids only (holes skipped).
    pub fn ids(&self) -> Box<dyn Iterator<Item = ChunkId> + '_> {
        match self {
            Content::Empty => Box::new(std::iter::empty()),
            Content::Fixed { chunks, .. } => Box::new(chunks.iter().flatten().copied()),
            Content::Variable { chunks } => Box::new(chunks.iter().filter_map(|(id, _)| *id)),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub parent: u32,
    /// File name bytes as the source OS gave them (UTF-8 not required).
    pub name: Vec<u8>,
    pub kind: NodeKind,
    /// Permission bits (07777).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub size: u64,
    /// Symlink target bytes; empty for other kinds.
    pub target: Vec<u8>,
    pub content: Content,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Sum of file sizes.
    pub logical_bytes: u64,
    /// Bytes of chunk data actually read (holes skipped).
    pub read_bytes: u64,
    pub chunks: u64,
    pub new_chunks: u64,
    /// Stored (compressed, sealed) bytes of chunks this backup added.
    pub new_chunk_bytes: u64,
    /// Bytes of pack headers, index files and this manifest.
    pub new_meta_bytes: u64,
    pub duration_ms: u64,
    /// Files whose size or mtime changed while they were being read.
    pub changed_while_reading: Vec<String>,
}

impl BackupStats {
    pub fn added_bytes(&self) -> u64 {
        self.new_chunk_bytes + self.new_meta_bytes
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub job: String,
    /// The restore point's name within the job (a UTC timestamp).
    pub name: String,
    /// Seconds since the Unix epoch, UTC, when the backup started.
    pub time: i64,
    pub hostname: String,
    pub stats: BackupStats,
    pub nodes: Vec<Node>,
}

impl Manifest {
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.job, self.name)
    }

    /// Checks the invariants a reader relies on, so a garbled but
    /// well-checksummed manifest still cannot crash or mislead a mount, nor
    /// steer a restore outside its target: every name is one plain path
    /// component and no directory holds two entries of the same name.
    /// Linear in nodes apart from one sort for the duplicate check.
    pub fn validate(&self, what: &str) -> Result<()> {
        let bad = |why: String| Err(Error::malformed(what, why));
        let Some(root) = self.nodes.first() else {
            return bad("no root node".into());
        };
        if root.kind != NodeKind::Dir {
            return bad("root node is not a directory".into());
        }
        for (i, n) in self.nodes.iter().enumerate().skip(1) {
            let p = n.parent as usize;
            if p >= i || self.nodes[p].kind != NodeKind::Dir {
                return bad(format!("node {i} has an invalid parent {p}"));
            }
            // The parent is checked, so the path below is well defined.
            let at = || format!("{:?} (node {i})", self.child_path(p, &n.name));
            if let Some(why) = name_problem(&n.name) {
                return bad(format!("{}: the name {why}", at()));
            }
            if !n.kind.is_stored() {
                return bad(format!("{} is a {:?}, which is never stored", at(), n.kind));
            }
            if n.mtime_nsec >= 1_000_000_000 {
                return bad(format!("{}: mtime has {} nanoseconds", at(), n.mtime_nsec));
            }
            if n.kind == NodeKind::Symlink && (n.target.is_empty() || n.target.contains(&0)) {
                return bad(format!("{}: symlink target is empty or holds NUL", at()));
            }
            let expected: u64 = match &n.content {
                Content::Empty => 0,
                Content::Fixed { chunk_size, chunks } => {
                    if *chunk_size == 0 || *chunk_size > crate::format::MAX_CHUNK_SIZE {
                        return bad(format!("{} has chunk size {chunk_size}", at()));
                    }
                    let full = n.size.div_ceil(*chunk_size as u64);
                    if full != chunks.len() as u64 {
                        return bad(format!(
                            "{}: {} chunks for {} bytes",
                            at(),
                            chunks.len(),
                            n.size
                        ));
                    }
                    n.size
                }
                Content::Variable { chunks } => chunks.iter().map(|c| c.1 as u64).sum(),
            };
            if n.kind == NodeKind::File && expected != n.size {
                return bad(format!(
                    "{}: chunks cover {expected} bytes, size is {}",
                    at(),
                    n.size
                ));
            }
        }
        // Siblings are not adjacent in depth-first order, so sort node
        // indices by (parent, name): duplicates end up side by side.
        let mut order: Vec<u32> = (1..self.nodes.len() as u32).collect();
        let key = |i: &u32| {
            let n = &self.nodes[*i as usize];
            (n.parent, n.name.as_slice())
        };
        order.sort_unstable_by(|a, b| key(a).cmp(&key(b)));
        if let Some(pair) = order.windows(2).find(|w| key(&w[0]) == key(&w[1])) {
            let (first, second) = (pair[0].min(pair[1]), pair[0].max(pair[1]));
            return bad(format!(
                "{:?} appears twice in one directory (nodes {first} and {second})",
                self.path_of(second as usize)
            ));
        }
        Ok(())
    }

    /// The path an entry `name` of directory node `parent` would have,
    /// for messages about names that may not be valid.
    fn child_path(&self, parent: usize, name: &[u8]) -> String {
        let name = String::from_utf8_lossy(name);
        match parent {
            0 => name.into_owned(),
            p => format!("{}/{name}", self.path_of(p)),
        }
    }

    /// The path of node `i` relative to the restore point root.
    pub fn path_of(&self, mut i: usize) -> String {
        let mut parts = Vec::new();
        while i != 0 {
            parts.push(String::from_utf8_lossy(&self.nodes[i].name).into_owned());
            i = self.nodes[i].parent as usize;
        }
        parts.reverse();
        parts.join("/")
    }
}

/// Why `name` cannot be one entry of a directory, if it cannot: a
/// restore creates it inside its parent, so it must be a single path
/// component on every OS it might be restored to.
fn name_problem(name: &[u8]) -> Option<&'static str> {
    if name.is_empty() {
        Some("is empty")
    } else if name == b"." || name == b".." {
        Some("is '.' or '..'")
    } else if name.contains(&b'/') {
        Some("contains '/'")
    } else if name.contains(&0) {
        Some("contains NUL")
    } else {
        None
    }
}

/// Checks a job name: it becomes a directory name in the repository and
/// in every mount.
pub fn validate_job_name(job: &str) -> Result<()> {
    validate_name("job name", job, 128)
}

/// Checks a name that becomes a directory name (a job, a session id):
/// letters, digits, '-', '_' and '.', not starting with '.', at most `max`
/// bytes. `what` names it in the error.
pub fn validate_name(what: &str, name: &str, max: usize) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= max
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!(
            "invalid {what} {name:?}: use letters, digits, '-', '_' and '.', not starting with '.'"
        )))
    }
}

/// Formats Unix seconds as the restore-point name `YYYY-MM-DDTHH-MM-SSZ`
/// (no colons, so the name is valid on every filesystem).
pub fn timestamp_name(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}-{:02}-{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_format() {
        assert_eq!(timestamp_name(0), "1970-01-01T00-00-00Z");
        assert_eq!(timestamp_name(1_795_318_174), "2026-11-22T03-29-34Z");
        assert_eq!(timestamp_name(951_782_400), "2000-02-29T00-00-00Z");
    }

    fn entry(parent: u32, name: &[u8], kind: NodeKind) -> Node {
        Node {
            parent,
            name: name.to_vec(),
            kind,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime_sec: 0,
            mtime_nsec: 0,
            size: 0,
            target: if kind == NodeKind::Symlink {
                b"/etc".to_vec()
            } else {
                Vec::new()
            },
            content: Content::Empty,
        }
    }

    /// The validation error for a tree of `nodes` below a root directory.
    fn refusal(nodes: Vec<Node>) -> String {
        let mut all = vec![entry(0, b"", NodeKind::Dir)];
        all.extend(nodes);
        let m = Manifest {
            job: "j".into(),
            name: "n".into(),
            time: 0,
            hostname: "h".into(),
            stats: BackupStats::default(),
            nodes: all,
        };
        match m.validate("restore point j/n") {
            Ok(()) => panic!("accepted {:?}", m.nodes),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn names_that_are_not_one_plain_component_are_refused() {
        for (name, why) in [
            (&b""[..], "is empty"),
            (b".", "'.' or '..'"),
            (b"..", "'.' or '..'"),
            (b"a/b", "contains '/'"),
            (b"/", "contains '/'"),
            (b"a\0b", "contains NUL"),
        ] {
            let msg = refusal(vec![
                entry(0, b"d", NodeKind::Dir),
                entry(1, name, NodeKind::File),
            ]);
            assert!(msg.contains("restore point j/n"), "{msg}");
            assert!(msg.contains(why) && msg.contains("\"d/"), "{name:?}: {msg}");
        }
    }

    #[test]
    fn two_entries_of_one_name_in_a_directory_are_refused() {
        // The symlink-then-directory trick: `x -> /etc`, then `x/`, then
        // `x/passwd`; siblings need not be adjacent.
        let msg = refusal(vec![
            entry(0, b"x", NodeKind::Symlink),
            entry(0, b"d", NodeKind::Dir),
            entry(2, b"inner", NodeKind::File),
            entry(0, b"x", NodeKind::Dir),
            entry(4, b"passwd", NodeKind::File),
        ]);
        assert!(
            msg.contains("\"x\" appears twice") && msg.contains("nodes 1 and 4"),
            "{msg}"
        );
        let msg = refusal(vec![
            entry(0, b"d", NodeKind::Dir),
            entry(1, b"f", NodeKind::File),
            entry(1, b"f", NodeKind::File),
        ]);
        assert!(msg.contains("\"d/f\" appears twice"), "{msg}");
        // The same name in different directories is fine.
        let mut all = vec![entry(0, b"", NodeKind::Dir)];
        all.extend([
            entry(0, b"a", NodeKind::Dir),
            entry(1, b"f", NodeKind::File),
            entry(0, b"b", NodeKind::Dir),
            entry(3, b"f", NodeKind::File),
        ]);
        let m = Manifest {
            job: "j".into(),
            name: "n".into(),
            time: 0,
            hostname: "h".into(),
            stats: BackupStats::default(),
            nodes: all,
        };
        m.validate("restore point j/n").unwrap();
    }

    #[test]
    fn a_symlink_is_never_a_parent_and_its_target_is_checked() {
        let msg = refusal(vec![
            entry(0, b"x", NodeKind::Symlink),
            entry(1, b"f", NodeKind::File),
        ]);
        assert!(msg.contains("node 2 has an invalid parent 1"), "{msg}");
        let mut link = entry(0, b"l", NodeKind::Symlink);
        link.target = b"a\0b".to_vec();
        assert!(refusal(vec![link]).contains("NUL"));
        let mut link = entry(0, b"l", NodeKind::Symlink);
        link.target.clear();
        assert!(refusal(vec![link]).contains("empty"));
    }

    #[test]
    fn fixed_chunks_past_the_size_cover_nothing() {
        // A root directory with a chunk list longer than its size: loading
        // it in a mount used to subtract past zero.
        let content = Content::Fixed {
            chunk_size: 4096,
            chunks: vec![None, None, None],
        };
        let lens: Vec<u32> = content.chunks(100).iter().map(|c| c.2).collect();
        assert_eq!(lens, [100, 0, 0]);
    }

    #[test]
    fn data_bytes_match_the_chunk_list() {
        let id = |n: u8| Some(ChunkId([n; 32]));
        let cases = [
            (Content::Empty, 0),
            (
                Content::Fixed {
                    chunk_size: 4096,
                    chunks: vec![id(1), None, id(2), id(3)],
                },
                3 * 4096 + 100,
            ),
            (
                Content::Fixed {
                    chunk_size: 4096,
                    chunks: vec![id(1), None, None],
                },
                100,
            ),
            (
                Content::Variable {
                    chunks: vec![(id(1), 7), (None, 5000), (id(2), 9)],
                },
                5016,
            ),
        ];
        for (content, size) in cases {
            let listed: u64 = content
                .chunks(size)
                .iter()
                .filter(|c| c.0.is_some())
                .map(|c| c.2 as u64)
                .sum();
            assert_eq!(content.data_bytes(size), listed, "{content:?}");
        }
    }

    #[test]
    fn job_names() {
        assert!(validate_job_name("nightly-db_1.x").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", "ü"] {
            assert!(validate_job_name(bad).is_err(), "{bad}");
        }
    }
}
