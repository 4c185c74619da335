//! Source trees with every kind of file a backup must carry, and the
//! comparison of two trees.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use filetime::FileTime;

use crate::rng::{mixed_bytes, text_bytes, Rng};

pub const MIB: u64 = 1 << 20;

/// Depth of the nested directory chain in [`build_rich_tree`].
pub const DEEP_LEVELS: usize = 30;

/// What [`build_rich_tree`] made, by path relative to its root.
pub struct RichTree {
    pub root: PathBuf,
    /// 50 MiB: half incompressible, half text.
    pub large: &'static str,
    /// 100 MiB with three written ranges, the rest holes.
    pub sparse: &'static str,
    pub sparse_len: u64,
    /// One file inside the odd-names directory, for selective restore.
    pub odd_file: &'static str,
    /// The nested directory chain, for selective restore of a subtree.
    pub deep_dir: &'static str,
}

/// Fills `root` (which must not exist) with: a large file, a sparse file,
/// empty files, an empty directory, relative, absolute and dangling
/// symlinks (and one to a directory), a chain of [`DEEP_LEVELS`] nested
/// directories, names with spaces, UTF-8, a newline and a non-UTF-8 byte,
/// modes 0600/0640/0755/0444 on files and 0700/0555 on directories, and
/// mtimes with nanoseconds (one before 1970, one after 2100) on every
/// entry, the root included.
pub fn build_rich_tree(root: &Path, seed: u64) -> RichTree {
    let mut rng = Rng::new(seed);
    fs::create_dir(root).unwrap_or_else(|e| panic!("mkdir {}: {e}", root.display()));
    let p = |rel: &str| root.join(rel);
    let put = |rel: &str, data: &[u8], mode: u32| {
        let path = root.join(rel);
        fs::write(&path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
    };

    let mut large = rng.bytes((25 * MIB) as usize);
    large.extend_from_slice(&text_bytes(&mut rng, (25 * MIB) as usize));
    put("large.bin", &large, 0o644);
    drop(large);

    let sparse_len = 100 * MIB;
    {
        let f = File::create(p("sparse.img")).expect("create sparse file");
        f.set_len(sparse_len).expect("size sparse file");
        f.write_all_at(&rng.bytes(MIB as usize), 0).expect("write");
        f.write_all_at(&text_bytes(&mut rng, (512 << 10) as usize), 40 * MIB + 4096)
            .expect("write");
        f.write_all_at(&rng.bytes(64 << 10), sparse_len - (64 << 10))
            .expect("write");
        fs::set_permissions(p("sparse.img"), fs::Permissions::from_mode(0o640)).expect("chmod");
    }

    put("empty.txt", b"", 0o644);
    put("small.txt", b"hello, restore\n", 0o600);
    put("script.sh", b"#!/bin/sh\necho restored\n", 0o755);
    put("readonly.txt", &text_bytes(&mut rng, 3000), 0o444);
    put(
        "mixed.dat",
        &mixed_bytes(&mut rng, 3 * MIB as usize + 17),
        0o644,
    );
    put("old.txt", b"from before the epoch\n", 0o644);
    put("future.txt", b"from after 2100\n", 0o644);

    fs::create_dir(p("dir with space")).expect("mkdir");
    put("dir with space/file with space.txt", b"spaces\n", 0o644);
    put("dir with space/empty too", b"", 0o600);

    fs::create_dir(p("odd names")).expect("mkdir");
    put(
        "odd names/données ü.txt",
        "accents: données, ü\n".as_bytes(),
        0o644,
    );
    put("odd names/日本語.txt", "日本語\n".as_bytes(), 0o644);
    put("odd names/line\nbreak", b"a newline in the name\n", 0o644);
    put("odd names/-leading-dash", b"dash\n", 0o644);
    put("odd names/.hidden", b"hidden\n", 0o644);
    let latin1 = p("odd names").join(OsStr::from_bytes(b"latin1-\xe9t\xe9.bin"));
    fs::write(&latin1, rng.bytes(10_000)).expect("write non-UTF-8 name");

    fs::create_dir(p("empty-dir")).expect("mkdir");
    fs::create_dir(p("private")).expect("mkdir");
    put("private/secret.txt", b"only the owner\n", 0o600);
    fs::create_dir(p("ro-dir")).expect("mkdir");
    put("ro-dir/inside.txt", b"in a read-only directory\n", 0o444);

    fs::create_dir(p("links")).expect("mkdir");
    let link = |target: &Path, rel: &str| {
        std::os::unix::fs::symlink(target, root.join(rel)).expect("symlink");
    };
    link(Path::new("../small.txt"), "links/relative");
    link(&p("small.txt"), "links/absolute");
    link(Path::new("does/not/exist"), "links/dangling");
    link(Path::new("../odd names"), "links/to-dir");

    let mut deep = p("deep");
    fs::create_dir(&deep).expect("mkdir");
    for level in 1..=DEEP_LEVELS {
        deep.push(format!("d{level:02}"));
        fs::create_dir(&deep).expect("mkdir deep");
        fs::write(
            deep.join(format!("level-{level:02}.txt")),
            format!("level {level}\n"),
        )
        .expect("write deep");
    }

    fs::set_permissions(p("empty-dir"), fs::Permissions::from_mode(0o700)).expect("chmod");
    fs::set_permissions(p("private"), fs::Permissions::from_mode(0o700)).expect("chmod");
    fs::set_permissions(p("ro-dir"), fs::Permissions::from_mode(0o555)).expect("chmod");
    fs::set_permissions(root, fs::Permissions::from_mode(0o755)).expect("chmod");

    // Distinct mtimes with nanoseconds on every entry; setting a time
    // does not touch the parent's, so order does not matter.
    let mut all = Vec::new();
    walk(root, &mut all);
    for (i, path) in all.iter().enumerate() {
        let rel = path.strip_prefix(root).expect("inside");
        let (sec, nsec) = match rel.to_str() {
            Some("old.txt") => (-31_536_000 + 12_345, 987_654_321),
            Some("future.txt") => (4_102_444_800 + 99, 1),
            _ => (
                1_700_000_000 + i as i64 * 3_671,
                (i as u32 * 7_919_113 + 1) % 1_000_000_000,
            ),
        };
        let t = FileTime::from_unix_time(sec, nsec);
        let is_link = fs::symlink_metadata(path)
            .expect("lstat")
            .file_type()
            .is_symlink();
        if is_link {
            filetime::set_symlink_file_times(path, t, t).expect("set symlink mtime");
        } else {
            filetime::set_file_times(path, t, t).expect("set mtime");
        }
    }

    RichTree {
        root: root.to_path_buf(),
        large: "large.bin",
        sparse: "sparse.img",
        sparse_len,
        odd_file: "odd names/données ü.txt",
        deep_dir: "deep",
    }
}

/// Every path under `dir` (not `dir` itself), depth first, sorted, not
/// following symlinks; `dir` last so callers can treat it like the rest.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for name in sorted_names(dir) {
        let path = dir.join(&name);
        let meta = fs::symlink_metadata(&path).expect("lstat");
        if meta.is_dir() {
            walk(&path, out);
        } else {
            out.push(path);
        }
    }
    out.push(dir.to_path_buf());
}

fn sorted_names(dir: &Path) -> Vec<std::ffi::OsString> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").file_name())
        .collect();
    names.sort();
    names
}

/// Regular files under `root`, relative, sorted.
pub fn regular_files(root: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    walk(root, &mut all);
    let mut files: Vec<PathBuf> = all
        .into_iter()
        .filter(|p| {
            fs::symlink_metadata(p)
                .map(|m| m.is_file())
                .unwrap_or(false)
        })
        .map(|p| p.strip_prefix(root).expect("inside").to_path_buf())
        .collect();
    files.sort();
    files
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

fn kind(meta: &fs::Metadata) -> Kind {
    let t = meta.file_type();
    if t.is_symlink() {
        Kind::Symlink
    } else if t.is_dir() {
        Kind::Dir
    } else if t.is_file() {
        Kind::File
    } else {
        Kind::Other
    }
}

/// Every difference between the trees at `a` and `b` (their roots
/// included): kind, permission bits, mtime (seconds and nanoseconds),
/// size, contents byte for byte, symlink targets, and entries missing on
/// either side. Empty when they are identical.
pub fn compare_trees(a: &Path, b: &Path) -> Vec<String> {
    let mut diffs = Vec::new();
    compare_entry(a, b, Path::new("."), &mut diffs);
    diffs
}

/// Panics with every difference if the trees differ.
#[track_caller]
pub fn assert_same_tree(expected: &Path, actual: &Path) {
    let diffs = compare_trees(expected, actual);
    assert!(
        diffs.is_empty(),
        "{} differs from {} in {} ways:\n  {}",
        actual.display(),
        expected.display(),
        diffs.len(),
        diffs.join("\n  ")
    );
}

fn compare_entry(a: &Path, b: &Path, rel: &Path, diffs: &mut Vec<String>) {
    let (ma, mb) = match (fs::symlink_metadata(a), fs::symlink_metadata(b)) {
        (Ok(ma), Ok(mb)) => (ma, mb),
        (ea, eb) => {
            diffs.push(format!(
                "{rel:?}: cannot stat: {:?} / {:?}",
                ea.err().map(|e| e.to_string()),
                eb.err().map(|e| e.to_string())
            ));
            return;
        }
    };
    let (ka, kb) = (kind(&ma), kind(&mb));
    if ka != kb {
        diffs.push(format!("{rel:?}: kind {ka:?} vs {kb:?}"));
        return;
    }
    if ma.mode() & 0o7777 != mb.mode() & 0o7777 {
        diffs.push(format!(
            "{rel:?}: mode {:o} vs {:o}",
            ma.mode() & 0o7777,
            mb.mode() & 0o7777
        ));
    }
    if (ma.mtime(), ma.mtime_nsec()) != (mb.mtime(), mb.mtime_nsec()) {
        diffs.push(format!(
            "{rel:?}: mtime {}.{:09} vs {}.{:09}",
            ma.mtime(),
            ma.mtime_nsec(),
            mb.mtime(),
            mb.mtime_nsec()
        ));
    }
    match ka {
        Kind::File => {
            if ma.len() != mb.len() {
                diffs.push(format!("{rel:?}: size {} vs {}", ma.len(), mb.len()));
            } else if let Err(why) = same_contents(a, b) {
                diffs.push(format!("{rel:?}: {why}"));
            }
        }
        Kind::Symlink => {
            let (ta, tb) = (fs::read_link(a), fs::read_link(b));
            match (ta, tb) {
                (Ok(ta), Ok(tb)) if ta == tb => {}
                (ta, tb) => diffs.push(format!("{rel:?}: link target {ta:?} vs {tb:?}")),
            }
        }
        Kind::Dir => {
            let (na, nb) = (sorted_names(a), sorted_names(b));
            for n in na.iter().filter(|n| !nb.contains(n)) {
                diffs.push(format!("{:?}: missing", rel.join(n)));
            }
            for n in nb.iter().filter(|n| !na.contains(n)) {
                diffs.push(format!("{:?}: unexpected", rel.join(n)));
            }
            for n in na.iter().filter(|n| nb.contains(n)) {
                compare_entry(&a.join(n), &b.join(n), &rel.join(n), diffs);
            }
        }
        Kind::Other => diffs.push(format!("{rel:?}: neither file, directory nor symlink")),
    }
}

/// Reads until `buf` is full or end of file; returns the bytes read.
fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Compares two files byte for byte; the error names the first
/// differing offset (or the read error).
pub fn same_contents(a: &Path, b: &Path) -> Result<(), String> {
    let open = |p: &Path| File::open(p).map_err(|e| format!("open {}: {e}", p.display()));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    let mut ba = vec![0u8; MIB as usize];
    let mut bb = vec![0u8; MIB as usize];
    let mut offset = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba)
            .map_err(|e| format!("read {} at {offset}: {e}", a.display()))?;
        let nb = read_full(&mut fb, &mut bb)
            .map_err(|e| format!("read {} at {offset}: {e}", b.display()))?;
        if let Some(i) = ba[..na.min(nb)]
            .iter()
            .zip(&bb[..na.min(nb)])
            .position(|(x, y)| x != y)
        {
            return Err(format!("contents differ at byte {}", offset + i as u64));
        }
        if na != nb {
            return Err(format!(
                "lengths differ: one ends at {}",
                offset + na.min(nb) as u64
            ));
        }
        if na == 0 {
            return Ok(());
        }
        offset += na as u64;
    }
}

/// Runs `cmp` on two files; panics unless it reports them equal.
#[track_caller]
pub fn assert_cmp(a: &Path, b: &Path) {
    let r = crate::command::tool("cmp", [OsStr::new("--"), a.as_os_str(), b.as_os_str()]);
    assert!(r.status.success(), "cmp says the files differ: {r}");
}

/// Bytes allocated on disk for `path` (st_blocks * 512).
pub fn allocated_bytes(path: &Path) -> u64 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .blocks()
        * 512
}

/// A pseudo-random file of `len` bytes written in 4 MiB pieces, so large
/// files need no large buffer.
pub fn write_random_file(path: &Path, len: u64, rng: &mut Rng) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(
        File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display())),
    );
    let mut left = len;
    let mut buf = vec![0u8; 4 << 20];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).expect("write random file");
        left -= n as u64;
    }
    f.flush().expect("flush random file");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small tree and an exact copy of it (`cp -a`).
    fn tree_and_copy(tmp: &Path) -> (PathBuf, PathBuf) {
        let a = tmp.join("a");
        fs::create_dir_all(a.join("sub")).unwrap();
        fs::write(a.join("file"), b"contents").unwrap();
        fs::write(a.join("sub/other"), vec![7u8; 100_000]).unwrap();
        std::os::unix::fs::symlink("file", a.join("link")).unwrap();
        let t = FileTime::from_unix_time(1_600_000_000, 123_456_789);
        filetime::set_file_times(a.join("file"), t, t).unwrap();
        let b = tmp.join("b");
        let r = crate::command::tool("cp", [OsStr::new("-a"), a.as_os_str(), b.as_os_str()]);
        assert!(r.status.success(), "{r}");
        assert_eq!(compare_trees(&a, &b), Vec::<String>::new());
        (a, b)
    }

    /// Each kind of difference is reported, so trees compared equal in the
    /// end-to-end tests really are equal.
    #[test]
    fn every_kind_of_difference_is_found() {
        type Mutation = fn(&Path);
        let mutations: [(&str, Mutation); 8] = [
            ("contents", |b| {
                let f = fs::OpenOptions::new()
                    .write(true)
                    .open(b.join("sub/other"))
                    .unwrap();
                f.write_all_at(b"x", 99_999).unwrap();
                let t = FileTime::from_last_modification_time(
                    &fs::metadata(b.parent().unwrap().join("a/sub/other")).unwrap(),
                );
                filetime::set_file_mtime(b.join("sub/other"), t).unwrap();
            }),
            ("mode", |b| {
                fs::set_permissions(b.join("file"), fs::Permissions::from_mode(0o600)).unwrap()
            }),
            ("mtime", |b| {
                filetime::set_file_mtime(
                    b.join("file"),
                    FileTime::from_unix_time(1_600_000_000, 123_456_788),
                )
                .unwrap()
            }),
            ("size", |b| {
                let f = fs::OpenOptions::new()
                    .append(true)
                    .open(b.join("file"))
                    .unwrap();
                f.set_len(9).unwrap();
            }),
            ("missing", |b| fs::remove_file(b.join("sub/other")).unwrap()),
            ("unexpected", |b| fs::write(b.join("extra"), b"").unwrap()),
            ("link target", |b| {
                fs::remove_file(b.join("link")).unwrap();
                std::os::unix::fs::symlink("sub", b.join("link")).unwrap();
            }),
            ("kind", |b| {
                fs::remove_file(b.join("link")).unwrap();
                fs::write(b.join("link"), b"file").unwrap();
            }),
        ];
        for (what, mutate) in mutations {
            let tmp = tempfile::tempdir().unwrap();
            let (a, b) = tree_and_copy(tmp.path());
            mutate(&b);
            let diffs = compare_trees(&a, &b);
            assert!(!diffs.is_empty(), "a change of {what} went unnoticed");
        }
    }

    #[test]
    fn same_contents_names_the_first_difference() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let mut data = vec![1u8; 3 * MIB as usize];
        fs::write(&a, &data).unwrap();
        data[MIB as usize + 5] = 2;
        fs::write(&b, &data).unwrap();
        assert_eq!(
            same_contents(&a, &b),
            Err(format!("contents differ at byte {}", MIB + 5))
        );
        assert_eq!(same_contents(&a, &a), Ok(()));
    }
}
