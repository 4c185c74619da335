//! The platform-neutral half of the WinFsp adapter: everything that turns
//! a Windows request into filesystem-model calls and a model answer into
//! what Windows expects, with no Windows type in sight, so it compiles
//! and is unit-tested on Linux.
//!
//! - Names: WinFsp hands over `\`-separated UTF-16 paths relative to the
//!   volume root. [`split_path`] cuts one into components, [`name_to_model`]
//!   and [`name_to_windows`] convert a component between UTF-16 and the
//!   model's bytes, and [`walk`] resolves a path with one
//!   [`FsModel::lookup`] per component.
//! - Case: restore points come from case-sensitive filesystems, so a
//!   directory may hold both `Data` and `data`. A name is first looked up
//!   exactly; only when that fails is the directory searched for the one
//!   entry equal to it ignoring case (Windows programs often change the
//!   case of a name they were given). Two or more such entries are
//!   ambiguous and the name is not found; their exact spellings still work.
//!   The volume is announced as case-insensitive and case-preserving.
//! - Characters Windows forbids in names (`\ : * ? " < > |` and controls)
//!   travel as the private-use characters U+F000 + byte, the convention
//!   Cygwin and WSL use, so such files are still listed and opened.
//!   Names that are not UTF-8 cannot be spelled in UTF-16 and are left out
//!   of listings.
//! - [`file_info`] turns an [`Attr`] into [`WinFileInfo`] (attribute bits,
//!   sizes, FILETIME stamps); [`ntstatus`] is the one place an [`FsError`]
//!   becomes an NTSTATUS; [`open_plan`] and [`create_kind`] decide what a
//!   create or open request calls on the model.

use vfs_core::fs::{Attr, FsError, FsModel, ROOT_INO};
use vfs_core::manifest::NodeKind;

/// NTSTATUS codes the adapter returns. Defined here (not taken from
/// `windows-sys`) so this module compiles everywhere; the Windows glue
/// asserts at compile time that each equals the SDK's value.
pub mod status {
    pub const STATUS_SUCCESS: i32 = 0;
    pub const STATUS_INVALID_HANDLE: i32 = 0xC000_0008_u32 as i32;
    pub const STATUS_INVALID_PARAMETER: i32 = 0xC000_000D_u32 as i32;
    pub const STATUS_INVALID_DEVICE_REQUEST: i32 = 0xC000_0010_u32 as i32;
    pub const STATUS_END_OF_FILE: i32 = 0xC000_0011_u32 as i32;
    pub const STATUS_ACCESS_DENIED: i32 = 0xC000_0022_u32 as i32;
    pub const STATUS_BUFFER_TOO_SMALL: i32 = 0xC000_0023_u32 as i32;
    pub const STATUS_OBJECT_NAME_INVALID: i32 = 0xC000_0033_u32 as i32;
    pub const STATUS_OBJECT_NAME_NOT_FOUND: i32 = 0xC000_0034_u32 as i32;
    pub const STATUS_OBJECT_NAME_COLLISION: i32 = 0xC000_0035_u32 as i32;
    pub const STATUS_OBJECT_PATH_NOT_FOUND: i32 = 0xC000_003A_u32 as i32;
    pub const STATUS_DATA_ERROR: i32 = 0xC000_003E_u32 as i32;
    pub const STATUS_DISK_FULL: i32 = 0xC000_007F_u32 as i32;
    pub const STATUS_MEDIA_WRITE_PROTECTED: i32 = 0xC000_00A2_u32 as i32;
    pub const STATUS_FILE_IS_A_DIRECTORY: i32 = 0xC000_00BA_u32 as i32;
    pub const STATUS_NOT_SUPPORTED: i32 = 0xC000_00BB_u32 as i32;
    pub const STATUS_DIRECTORY_NOT_EMPTY: i32 = 0xC000_0101_u32 as i32;
    pub const STATUS_NOT_A_DIRECTORY: i32 = 0xC000_0103_u32 as i32;
    pub const STATUS_NAME_TOO_LONG: i32 = 0xC000_0106_u32 as i32;
    pub const STATUS_IO_DEVICE_ERROR: i32 = 0xC000_0185_u32 as i32;
    pub const STATUS_NOT_A_REPARSE_POINT: i32 = 0xC000_0275_u32 as i32;
}
use status::*;

/// `FILE_ATTRIBUTE_*` bits of a file's info.
pub mod attributes {
    pub const READONLY: u32 = 0x0001;
    pub const HIDDEN: u32 = 0x0002;
    pub const SYSTEM: u32 = 0x0004;
    pub const DIRECTORY: u32 = 0x0010;
    pub const ARCHIVE: u32 = 0x0020;
    /// Valid only alone: a file with no other attribute.
    pub const NORMAL: u32 = 0x0080;
    pub const SPARSE_FILE: u32 = 0x0200;
    pub const REPARSE_POINT: u32 = 0x0400;
}

/// The reparse tag of a symbolic link.
pub const IO_REPARSE_TAG_SYMLINK: u32 = 0xA000_000C;
/// `SYMLINK_FLAG_RELATIVE`: the target is relative to the link's directory.
const SYMLINK_FLAG_RELATIVE: u32 = 1;

/// `CreateOptions` bits the adapter looks at.
pub const FILE_DIRECTORY_FILE: u32 = 0x0000_0001;
pub const FILE_NON_DIRECTORY_FILE: u32 = 0x0000_0040;
pub const FILE_DELETE_ON_CLOSE: u32 = 0x0000_1000;
pub const FILE_OPEN_REPARSE_POINT: u32 = 0x0020_0000;

/// Access rights that change a file's data.
pub const FILE_WRITE_DATA: u32 = 0x0002;
pub const FILE_APPEND_DATA: u32 = 0x0004;
pub const GENERIC_WRITE: u32 = 0x4000_0000;
pub const GENERIC_ALL: u32 = 0x1000_0000;

/// Seconds from 1601-01-01 (the FILETIME epoch) to 1970-01-01.
const FILETIME_UNIX_OFFSET_SECS: i64 = 11_644_473_600;
/// FILETIME counts 100 ns ticks.
const TICKS_PER_SEC: i64 = 10_000_000;

/// Longest name component in UTF-16 units (what NTFS allows; WinFsp's
/// directory entries hold 255 as well).
pub const MAX_COMPONENT_LEN: usize = 255;

/// The one place where a model error becomes an NTSTATUS. Distinct causes
/// keep distinct codes: a missing file is not an I/O error, corrupt data
/// is not a missing file.
pub fn ntstatus(e: &FsError) -> i32 {
    match e {
        FsError::NotFound => STATUS_OBJECT_NAME_NOT_FOUND,
        FsError::NotADirectory => STATUS_NOT_A_DIRECTORY,
        FsError::IsADirectory => STATUS_FILE_IS_A_DIRECTORY,
        FsError::NotASymlink => STATUS_NOT_A_REPARSE_POINT,
        // What Windows answers for a write to read-only media.
        FsError::ReadOnly => STATUS_MEDIA_WRITE_PROTECTED,
        FsError::InvalidArgument => STATUS_INVALID_PARAMETER,
        FsError::BadHandle => STATUS_INVALID_HANDLE,
        // A chunk failed verification: a data error, never wrong bytes.
        FsError::Corrupt(_) => STATUS_DATA_ERROR,
        FsError::Io(_) => STATUS_IO_DEVICE_ERROR,
        FsError::Exists => STATUS_OBJECT_NAME_COLLISION,
        FsError::NotEmpty => STATUS_DIRECTORY_NOT_EMPTY,
        FsError::NameTooLong => STATUS_NAME_TOO_LONG,
        FsError::NoSpace => STATUS_DISK_FULL,
        FsError::NotPermitted => STATUS_ACCESS_DENIED,
        FsError::Unsupported => STATUS_NOT_SUPPORTED,
        FsError::SessionIo(_) => STATUS_IO_DEVICE_ERROR,
    }
}

/// Why a path did not resolve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// A directory on the way is missing or is not a directory: Windows
    /// tells this apart from a missing last component.
    PathNotFound,
    /// A component on the way is a symbolic link; the caller lets Windows
    /// resolve it (a reparse). `depth` components were walked before it.
    SymlinkOnPath { depth: usize, link: Attr },
    /// A component cannot be spelled in the model (bad UTF-16, too long).
    BadName(i32),
    /// The model's own error, for the last component or the walk itself.
    Fs(FsError),
}

impl WalkError {
    pub fn ntstatus(&self) -> i32 {
        match self {
            WalkError::PathNotFound => STATUS_OBJECT_PATH_NOT_FOUND,
            // Reaching this means the caller did not reparse; the link's
            // own target is not followed here.
            WalkError::SymlinkOnPath { .. } => STATUS_OBJECT_PATH_NOT_FOUND,
            WalkError::BadName(status) => *status,
            WalkError::Fs(e) => ntstatus(e),
        }
    }
}

impl From<FsError> for WalkError {
    fn from(e: FsError) -> Self {
        WalkError::Fs(e)
    }
}

/// The components of a WinFsp path (`\a\b`), empty for the root. Empty
/// components (doubled or trailing separators) are skipped; `/` is not a
/// separator here (WinFsp normalizes it away before we see a path).
pub fn split_path(path: &[u16]) -> Vec<&[u16]> {
    path.split(|&c| c == u16::from(b'\\'))
        .filter(|c| !c.is_empty())
        .collect()
}

/// Characters Windows refuses in a name, carried as U+F000 + byte.
fn forbidden_on_windows(b: u8) -> bool {
    b < 0x20 || matches!(b, b'\\' | b':' | b'*' | b'?' | b'"' | b'<' | b'>' | b'|')
}

const PRIVATE_USE_BASE: u32 = 0xF000;

/// A UTF-16 name component as the model's bytes (UTF-8), undoing the
/// private-use mapping of [`name_to_windows`].
pub fn name_to_model(name: &[u16]) -> Result<Vec<u8>, i32> {
    if name.len() > MAX_COMPONENT_LEN {
        return Err(STATUS_NAME_TOO_LONG);
    }
    let mut out = Vec::with_capacity(name.len());
    for c in char::decode_utf16(name.iter().copied()) {
        let c = c.map_err(|_| STATUS_OBJECT_NAME_INVALID)?;
        let code = u32::from(c);
        match code.checked_sub(PRIVATE_USE_BASE) {
            Some(low) if low < 0x80 && forbidden_on_windows(low as u8) => out.push(low as u8),
            _ => {
                let mut buf = [0; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    Ok(out)
}

/// A model name as UTF-16 for Windows; `None` if it is not UTF-8 (no
/// UTF-16 spelling maps back to it) or too long for a directory entry.
pub fn name_to_windows(name: &[u8]) -> Option<Vec<u16>> {
    let text = std::str::from_utf8(name).ok()?;
    let mut out = Vec::with_capacity(name.len());
    for c in text.chars() {
        if c.is_ascii() && forbidden_on_windows(c as u8) {
            out.push((PRIVATE_USE_BASE + c as u32) as u16);
        } else {
            let mut buf = [0; 2];
            out.extend_from_slice(c.encode_utf16(&mut buf));
        }
    }
    (out.len() <= MAX_COMPONENT_LEN).then_some(out)
}

/// Whether two UTF-16 names are equal ignoring case (simple Unicode
/// lowercase, per character).
pub fn eq_ignore_case(a: &[u16], b: &[u16]) -> bool {
    let lower = |s: &[u16]| -> Option<Vec<char>> {
        char::decode_utf16(s.iter().copied())
            .map(|c| c.ok().map(|c| c.to_lowercase().next().unwrap_or(c)))
            .collect()
    };
    a.len() == b.len() && matches!((lower(a), lower(b)), (Some(x), Some(y)) if x == y)
}

/// Looks `name` up in `parent`: exactly first, then as the one entry equal
/// to it ignoring case.
pub fn lookup_component(fs: &dyn FsModel, parent: u64, name: &[u16]) -> Result<Attr, WalkError> {
    let bytes = name_to_model(name).map_err(WalkError::BadName)?;
    match fs.lookup(parent, &bytes) {
        Err(FsError::NotFound) => {}
        other => return other.map_err(WalkError::Fs),
    }
    let mut found = None;
    for entry in fs.readdir(parent)? {
        let Some(spelled) = name_to_windows(&entry.name) else {
            continue;
        };
        if eq_ignore_case(&spelled, name) {
            if found.is_some() {
                // Ambiguous: only the exact spellings reach these files.
                return Err(WalkError::Fs(FsError::NotFound));
            }
            found = Some(entry.name);
        }
    }
    match found {
        Some(exact) => Ok(fs.lookup(parent, &exact)?),
        None => Err(WalkError::Fs(FsError::NotFound)),
    }
}

/// Resolves a WinFsp path to its node's attributes. A symbolic link as the
/// last component is returned itself (not followed); one on the way is
/// [`WalkError::SymlinkOnPath`].
pub fn walk(fs: &dyn FsModel, path: &[u16]) -> Result<Attr, WalkError> {
    let components = split_path(path);
    let mut attr = fs.getattr(ROOT_INO)?;
    for (i, name) in components.iter().enumerate() {
        let last = i + 1 == components.len();
        match attr.kind {
            NodeKind::Dir => {}
            NodeKind::Symlink => {
                return Err(WalkError::SymlinkOnPath {
                    depth: i,
                    link: attr,
                });
            }
            _ => return Err(WalkError::PathNotFound),
        }
        attr = match lookup_component(fs, attr.ino, name) {
            Ok(a) => a,
            Err(WalkError::Fs(FsError::NotFound | FsError::NotADirectory)) if !last => {
                return Err(WalkError::PathNotFound)
            }
            Err(e) => return Err(e),
        };
    }
    Ok(attr)
}

/// Resolves the directory holding a path's last component, and that
/// component's model name: what create, rename and delete work on.
pub fn walk_parent(fs: &dyn FsModel, path: &[u16]) -> Result<(Attr, Vec<u8>), WalkError> {
    let components = split_path(path);
    let Some((last, dirs)) = components.split_last() else {
        // The root has no parent entry to create or remove.
        return Err(WalkError::Fs(FsError::InvalidArgument));
    };
    let mut dir = fs.getattr(ROOT_INO)?;
    for (i, name) in dirs.iter().enumerate() {
        match dir.kind {
            NodeKind::Dir => {}
            NodeKind::Symlink => {
                return Err(WalkError::SymlinkOnPath {
                    depth: i,
                    link: dir,
                });
            }
            _ => return Err(WalkError::PathNotFound),
        }
        dir = match lookup_component(fs, dir.ino, name) {
            Ok(a) => a,
            Err(WalkError::Fs(FsError::NotFound | FsError::NotADirectory)) => {
                return Err(WalkError::PathNotFound)
            }
            Err(e) => return Err(e),
        };
    }
    match dir.kind {
        NodeKind::Dir => {}
        NodeKind::Symlink => {
            return Err(WalkError::SymlinkOnPath {
                depth: dirs.len(),
                link: dir,
            })
        }
        _ => return Err(WalkError::PathNotFound),
    }
    let name = name_to_model(last).map_err(WalkError::BadName)?;
    Ok((dir, name))
}

/// A FILETIME (100 ns ticks since 1601-01-01 UTC) from Unix seconds and
/// nanoseconds; times before 1601 become 0.
pub fn filetime(sec: i64, nsec: u32) -> u64 {
    let ticks = (i128::from(sec) + i128::from(FILETIME_UNIX_OFFSET_SECS))
        * i128::from(TICKS_PER_SEC)
        + i128::from(nsec / 100);
    ticks.clamp(0, i128::from(u64::MAX)) as u64
}

/// Unix seconds and nanoseconds from a FILETIME.
pub fn unix_time(filetime: u64) -> (i64, u32) {
    let ticks = i128::from(filetime);
    let secs = ticks.div_euclid(i128::from(TICKS_PER_SEC));
    let rest = ticks.rem_euclid(i128::from(TICKS_PER_SEC));
    (
        (secs - i128::from(FILETIME_UNIX_OFFSET_SECS)) as i64,
        (rest * 100) as u32,
    )
}

/// What WinFsp's `FSP_FSCTL_FILE_INFO` holds, without its type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WinFileInfo {
    pub file_attributes: u32,
    pub reparse_tag: u32,
    pub allocation_size: u64,
    pub file_size: u64,
    pub creation_time: u64,
    pub last_access_time: u64,
    pub last_write_time: u64,
    pub change_time: u64,
    pub index_number: u64,
    pub hard_links: u32,
}

/// A node's info for Windows. `read_only_mount` marks files read-only
/// (Explorer and `attrib` then show what the mount allows); in a writable
/// session a file whose owner may not write it is read-only too.
/// Directories never get READONLY: on a directory Windows reads it as
/// "customized folder", not as a permission.
pub fn file_info(attr: &Attr, read_only_mount: bool) -> WinFileInfo {
    use attributes::*;
    let mut bits = match attr.kind {
        NodeKind::Dir => DIRECTORY,
        NodeKind::File => 0,
        NodeKind::Symlink => REPARSE_POINT,
        // Pipes, sockets and device nodes have no Windows counterpart;
        // they are shown as system files and cannot be opened for data.
        NodeKind::Fifo | NodeKind::Socket | NodeKind::CharDevice | NodeKind::BlockDevice => SYSTEM,
    };
    if attr.kind != NodeKind::Dir && (read_only_mount || attr.mode & 0o200 == 0) {
        bits |= READONLY;
    }
    let allocation_size = attr.blocks.saturating_mul(512);
    if attr.kind == NodeKind::File && allocation_size < attr.size {
        bits |= SPARSE_FILE;
    }
    if bits == 0 {
        bits = NORMAL;
    }
    let size = match attr.kind {
        NodeKind::File | NodeKind::Symlink => attr.size,
        _ => 0,
    };
    let mtime = filetime(attr.mtime_sec, attr.mtime_nsec);
    WinFileInfo {
        file_attributes: bits,
        reparse_tag: if attr.kind == NodeKind::Symlink {
            IO_REPARSE_TAG_SYMLINK
        } else {
            0
        },
        allocation_size: if attr.kind == NodeKind::Dir {
            0
        } else {
            allocation_size
        },
        file_size: size,
        // The model keeps no birth time; the modification time is the
        // closest honest answer (a restore point keeps only that one).
        creation_time: mtime,
        last_access_time: filetime(attr.atime.0, attr.atime.1),
        last_write_time: mtime,
        change_time: filetime(attr.ctime.0, attr.ctime.1),
        index_number: attr.ino,
        hard_links: attr.nlink,
    }
}

/// `FILE_ATTRIBUTE_HIDDEN` for a name Unix hides (a leading dot), the
/// convention Samba follows too.
pub fn hidden_by_name(name: &[u8]) -> u32 {
    if name.first() == Some(&b'.') && name != b"." && name != b".." {
        attributes::HIDDEN
    } else {
        0
    }
}

/// What a new node made by a create request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreateKind {
    Directory,
    File,
}

/// A create request makes a directory when asked for one
/// (`FILE_DIRECTORY_FILE`), a regular file otherwise.
pub fn create_kind(create_options: u32) -> CreateKind {
    if create_options & FILE_DIRECTORY_FILE != 0 {
        CreateKind::Directory
    } else {
        CreateKind::File
    }
}

/// Whether granted access rights let the handle change file data.
pub fn wants_write(granted_access: u32) -> bool {
    granted_access & (FILE_WRITE_DATA | FILE_APPEND_DATA | GENERIC_WRITE | GENERIC_ALL) != 0
}

/// What opening an existing node calls on the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenPlan {
    /// A directory: listed by inode, no model handle.
    Directory,
    /// A regular file: `FsModel::open(ino, write, false)`.
    File { write: bool },
    /// A node without data (link opened as itself, pipe, device): only
    /// its attributes are served.
    AttributesOnly,
}

/// Checks an open request against the node it names and says which model
/// calls serve it, or the NTSTATUS that refuses it.
pub fn open_plan(
    kind: NodeKind,
    create_options: u32,
    granted_access: u32,
    writable_mount: bool,
) -> Result<OpenPlan, i32> {
    let write = wants_write(granted_access);
    match kind {
        NodeKind::Dir if create_options & FILE_NON_DIRECTORY_FILE != 0 => {
            Err(STATUS_FILE_IS_A_DIRECTORY)
        }
        NodeKind::Dir => Ok(OpenPlan::Directory),
        _ if create_options & FILE_DIRECTORY_FILE != 0 => Err(STATUS_NOT_A_DIRECTORY),
        _ if write && !writable_mount => Err(STATUS_MEDIA_WRITE_PROTECTED),
        NodeKind::File => Ok(OpenPlan::File { write }),
        _ if create_options & FILE_DELETE_ON_CLOSE != 0 && !writable_mount => {
            Err(STATUS_MEDIA_WRITE_PROTECTED)
        }
        _ => Ok(OpenPlan::AttributesOnly),
    }
}

/// A symbolic link's target as a Windows `REPARSE_DATA_BUFFER`
/// (IO_REPARSE_TAG_SYMLINK): `/` becomes `\`, and a target not starting
/// with `/` is flagged relative. An absolute Unix target has no meaning
/// on Windows; it is passed as written and will not resolve.
pub fn symlink_reparse_buffer(target: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(target);
    let relative = !text.starts_with('/');
    let path: Vec<u16> = text
        .encode_utf16()
        .map(|c| {
            if c == u16::from(b'/') {
                u16::from(b'\\')
            } else {
                c
            }
        })
        .collect();
    let path_bytes: Vec<u8> = path.iter().flat_map(|c| c.to_le_bytes()).collect();
    let name_len = path_bytes.len() as u16;
    // Substitute name and print name are the same string, stored twice.
    // Header after the common 8 bytes: four u16 offsets/lengths + flags.
    let data_len = 12 + 2 * path_bytes.len();
    let mut buf = Vec::with_capacity(8 + data_len);
    buf.extend_from_slice(&IO_REPARSE_TAG_SYMLINK.to_le_bytes());
    buf.extend_from_slice(&(data_len as u16).to_le_bytes());
    buf.extend_from_slice(&0u16.to_le_bytes());
    buf.extend_from_slice(&0u16.to_le_bytes()); // substitute name offset
    buf.extend_from_slice(&name_len.to_le_bytes());
    buf.extend_from_slice(&name_len.to_le_bytes()); // print name offset
    buf.extend_from_slice(&name_len.to_le_bytes());
    let flags = if relative { SYMLINK_FLAG_RELATIVE } else { 0 };
    buf.extend_from_slice(&flags.to_le_bytes());
    buf.extend_from_slice(&path_bytes);
    buf.extend_from_slice(&path_bytes);
    buf
}

/// One directory entry as Windows lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WinDirEntry {
    pub name: Vec<u16>,
    pub ino: u64,
}

/// A directory's entries for a listing: `.` and `..` first (except in the
/// root, which Windows lists without them), then the children sorted by
/// their UTF-16 names, so a listing resumed after a marker name
/// ([`entries_after`]) is stable. Children with no UTF-16 spelling are
/// counted in the second value and left out.
pub fn listing(fs: &dyn FsModel, ino: u64) -> Result<(Vec<WinDirEntry>, usize), FsError> {
    let children = fs.readdir(ino)?;
    let mut out = Vec::with_capacity(children.len() + 2);
    if ino != ROOT_INO {
        let dot = |s: &str| s.encode_utf16().collect::<Vec<u16>>();
        out.push(WinDirEntry {
            name: dot("."),
            ino,
        });
        out.push(WinDirEntry {
            name: dot(".."),
            ino: fs.parent(ino)?,
        });
    }
    let mut skipped = 0;
    let mut named: Vec<WinDirEntry> = children
        .into_iter()
        .filter_map(|e| match name_to_windows(&e.name) {
            Some(name) => Some(WinDirEntry { name, ino: e.ino }),
            None => {
                skipped += 1;
                None
            }
        })
        .collect();
    named.sort_by(|a, b| a.name.cmp(&b.name));
    out.extend(named);
    Ok((out, skipped))
}

/// The entries after `marker` (the last name a previous call returned);
/// all of them without one. `.` and `..` sort before every other name
/// that can follow them, so the order of [`listing`] holds.
pub fn entries_after<'a>(entries: &'a [WinDirEntry], marker: Option<&[u16]>) -> &'a [WinDirEntry] {
    let Some(marker) = marker else {
        return entries;
    };
    match entries.iter().position(|e| e.name == marker) {
        Some(i) => &entries[i + 1..],
        // The marker's entry went away: resume at the first name past it.
        None => {
            let dots = entries.iter().take_while(|e| is_dot_name(&e.name)).count();
            let rest = &entries[dots..];
            let i = rest.partition_point(|e| e.name.as_slice() <= marker);
            &rest[i..]
        }
    }
}

fn is_dot_name(name: &[u16]) -> bool {
    name == [u16::from(b'.')] || name == [u16::from(b'.'), u16::from(b'.')]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use vfs_core::fs::{DirEntry, FsResult, StatFs};

    fn w(s: &str) -> Vec<u16> {
        s.encode_utf16().collect()
    }

    fn attr(ino: u64, kind: NodeKind) -> Attr {
        Attr {
            ino,
            kind,
            size: 0,
            blocks: 0,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_sec: 0,
            mtime_nsec: 0,
            atime: (0, 0),
            ctime: (0, 0),
            nlink: 1,
            rdev: 0,
        }
    }

    /// A node of the test tree: its kind, parent and (name, inode) children.
    type TreeNode = (NodeKind, u64, Vec<(Vec<u8>, u64)>);

    /// A small tree by inode.
    struct Tree {
        nodes: BTreeMap<u64, TreeNode>,
    }

    impl Tree {
        fn new(spec: &[(u64, NodeKind, u64, &[u8])]) -> Tree {
            let mut nodes = BTreeMap::new();
            nodes.insert(ROOT_INO, (NodeKind::Dir, ROOT_INO, Vec::new()));
            for &(ino, kind, parent, name) in spec {
                nodes.insert(ino, (kind, parent, Vec::new()));
                nodes.get_mut(&parent).unwrap().2.push((name.to_vec(), ino));
            }
            Tree { nodes }
        }
    }

    impl FsModel for Tree {
        fn getattr(&self, ino: u64) -> FsResult<Attr> {
            let (kind, ..) = self.nodes.get(&ino).ok_or(FsError::NotFound)?;
            Ok(attr(ino, *kind))
        }
        fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
            let (kind, _, children) = self.nodes.get(&parent).ok_or(FsError::NotFound)?;
            if *kind != NodeKind::Dir {
                return Err(FsError::NotADirectory);
            }
            let ino = children
                .iter()
                .find(|(n, _)| n == name)
                .ok_or(FsError::NotFound)?
                .1;
            self.getattr(ino)
        }
        fn readdir(&self, ino: u64) -> FsResult<Vec<DirEntry>> {
            let (_, _, children) = self.nodes.get(&ino).ok_or(FsError::NotFound)?;
            Ok(children
                .iter()
                .map(|(name, ino)| DirEntry {
                    ino: *ino,
                    kind: self.nodes[ino].0,
                    name: name.clone(),
                })
                .collect())
        }
        fn parent(&self, ino: u64) -> FsResult<u64> {
            Ok(self.nodes.get(&ino).ok_or(FsError::NotFound)?.1)
        }
        fn readlink(&self, _ino: u64) -> FsResult<Vec<u8>> {
            Err(FsError::NotASymlink)
        }
        fn open(&self, _ino: u64, _write: bool, _truncate: bool) -> FsResult<u64> {
            Err(FsError::Unsupported)
        }
        fn release(&self, _fh: u64) {}
        fn read(&self, _fh: u64, _offset: u64, _size: u32) -> FsResult<Vec<u8>> {
            Err(FsError::BadHandle)
        }
        fn statfs(&self) -> StatFs {
            StatFs::default()
        }
    }

    fn sample() -> Tree {
        Tree::new(&[
            (2, NodeKind::Dir, ROOT_INO, b"job"),
            (3, NodeKind::Dir, 2, b"2026-01-01T00-00-00Z"),
            (4, NodeKind::File, 3, b"Data.mdf"),
            (5, NodeKind::File, 3, b"a:b"),
            (6, NodeKind::File, 3, b"dup"),
            (7, NodeKind::File, 3, b"DUP"),
            (8, NodeKind::Symlink, 3, b"link"),
            (9, NodeKind::File, 3, b"\xff\xfe"),
        ])
    }

    #[test]
    fn every_fs_error_has_its_own_status() {
        let cases = [
            (FsError::NotFound, STATUS_OBJECT_NAME_NOT_FOUND),
            (FsError::NotADirectory, STATUS_NOT_A_DIRECTORY),
            (FsError::IsADirectory, STATUS_FILE_IS_A_DIRECTORY),
            (FsError::NotASymlink, STATUS_NOT_A_REPARSE_POINT),
            (FsError::ReadOnly, STATUS_MEDIA_WRITE_PROTECTED),
            (FsError::InvalidArgument, STATUS_INVALID_PARAMETER),
            (FsError::BadHandle, STATUS_INVALID_HANDLE),
            (FsError::Corrupt("chunk 00ff".into()), STATUS_DATA_ERROR),
            (FsError::Io("pack missing".into()), STATUS_IO_DEVICE_ERROR),
            (FsError::Exists, STATUS_OBJECT_NAME_COLLISION),
            (FsError::NotEmpty, STATUS_DIRECTORY_NOT_EMPTY),
            (FsError::NameTooLong, STATUS_NAME_TOO_LONG),
            (FsError::NoSpace, STATUS_DISK_FULL),
            (FsError::NotPermitted, STATUS_ACCESS_DENIED),
            (FsError::Unsupported, STATUS_NOT_SUPPORTED),
            (
                FsError::SessionIo("state dir".into()),
                STATUS_IO_DEVICE_ERROR,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(ntstatus(&e), want, "{e:?}");
            assert!(want < 0, "{e:?} must be an error status");
        }
        // Spot checks against the documented hex values.
        assert_eq!(STATUS_OBJECT_NAME_NOT_FOUND as u32, 0xC000_0034);
        assert_eq!(STATUS_MEDIA_WRITE_PROTECTED as u32, 0xC000_00A2);
    }

    #[test]
    fn paths_split_on_backslashes() {
        assert!(split_path(&w("\\")).is_empty());
        assert!(split_path(&w("")).is_empty());
        let path = w("\\job\\\\rp\\file.mdf\\");
        let parts = split_path(&path);
        assert_eq!(parts, vec![&w("job")[..], &w("rp")[..], &w("file.mdf")[..]]);
    }

    #[test]
    fn walk_resolves_exact_and_case_folded_names() {
        let fs = sample();
        assert_eq!(walk(&fs, &w("\\")).unwrap().ino, ROOT_INO);
        let path = "\\job\\2026-01-01T00-00-00Z\\Data.mdf";
        assert_eq!(walk(&fs, &w(path)).unwrap().ino, 4);
        // Windows programs change case; the one matching entry is found.
        let path = "\\JOB\\2026-01-01t00-00-00z\\data.MDF";
        assert_eq!(walk(&fs, &w(path)).unwrap().ino, 4);
    }

    #[test]
    fn names_differing_only_in_case_need_their_exact_spelling() {
        let fs = sample();
        let rp = "\\job\\2026-01-01T00-00-00Z\\";
        assert_eq!(walk(&fs, &w(&format!("{rp}dup"))).unwrap().ino, 6);
        assert_eq!(walk(&fs, &w(&format!("{rp}DUP"))).unwrap().ino, 7);
        assert_eq!(
            walk(&fs, &w(&format!("{rp}Dup"))),
            Err(WalkError::Fs(FsError::NotFound))
        );
    }

    #[test]
    fn missing_names_and_paths_are_told_apart() {
        let fs = sample();
        let e = walk(&fs, &w("\\job\\nope")).unwrap_err();
        assert_eq!(e.ntstatus(), STATUS_OBJECT_NAME_NOT_FOUND);
        let e = walk(&fs, &w("\\nope\\file")).unwrap_err();
        assert_eq!(e.ntstatus(), STATUS_OBJECT_PATH_NOT_FOUND);
        // A file used as a directory.
        let e = walk(&fs, &w("\\job\\2026-01-01T00-00-00Z\\Data.mdf\\x")).unwrap_err();
        assert_eq!(e, WalkError::PathNotFound);
        // A link on the way is left to Windows to resolve.
        let e = walk(&fs, &w("\\job\\2026-01-01T00-00-00Z\\link\\x")).unwrap_err();
        assert!(
            matches!(e, WalkError::SymlinkOnPath { depth: 3, .. }),
            "{e:?}"
        );
        // A link as the last component is returned itself.
        let link = walk(&fs, &w("\\job\\2026-01-01T00-00-00Z\\link")).unwrap();
        assert_eq!(link.kind, NodeKind::Symlink);
    }

    #[test]
    fn parent_walk_names_the_last_component() {
        let fs = sample();
        let (dir, name) = walk_parent(&fs, &w("\\job\\2026-01-01T00-00-00Z\\new.ldf")).unwrap();
        assert_eq!((dir.ino, name.as_slice()), (3, &b"new.ldf"[..]));
        assert_eq!(
            walk_parent(&fs, &w("\\")),
            Err(WalkError::Fs(FsError::InvalidArgument))
        );
        assert_eq!(
            walk_parent(&fs, &w("\\nope\\x")),
            Err(WalkError::PathNotFound)
        );
    }

    #[test]
    fn forbidden_characters_round_trip_through_private_use() {
        let spelled = name_to_windows(b"a:b").unwrap();
        assert_eq!(spelled, vec![u16::from(b'a'), 0xF03A, u16::from(b'b')]);
        assert_eq!(name_to_model(&spelled).unwrap(), b"a:b");
        let fs = sample();
        let mut path = w("\\job\\2026-01-01T00-00-00Z\\");
        path.extend(&spelled);
        assert_eq!(walk(&fs, &path).unwrap().ino, 5);
        // Other text passes unchanged, in both directions.
        let name = "données-Ω.mdf";
        assert_eq!(name_to_windows(name.as_bytes()).unwrap(), w(name));
        assert_eq!(name_to_model(&w(name)).unwrap(), name.as_bytes());
        // A private-use character that maps to no forbidden byte stays.
        assert_eq!(name_to_model(&[0xF041]).unwrap(), "\u{F041}".as_bytes());
    }

    #[test]
    fn names_windows_cannot_carry_are_refused() {
        assert_eq!(name_to_windows(b"\xff\xfe"), None);
        assert_eq!(name_to_model(&[0xD800]), Err(STATUS_OBJECT_NAME_INVALID));
        assert_eq!(
            name_to_model(&[u16::from(b'a'); 256]),
            Err(STATUS_NAME_TOO_LONG)
        );
        assert_eq!(name_to_windows(&[b'a'; 256]), None);
    }

    #[test]
    fn listings_are_sorted_resumable_and_skip_unspellable_names() {
        let fs = sample();
        let (entries, skipped) = listing(&fs, 3).unwrap();
        assert_eq!(skipped, 1);
        let names: Vec<String> = entries
            .iter()
            .map(|e| String::from_utf16(&e.name).unwrap())
            .collect();
        assert_eq!(
            names,
            [".", "..", "DUP", "Data.mdf", "a\u{F03A}b", "dup", "link"]
        );
        assert_eq!(entries[1].ino, 2);
        let after = entries_after(&entries, Some(&w("Data.mdf")));
        assert_eq!(after[0].name, w("a\u{F03A}b"));
        assert_eq!(entries_after(&entries, None).len(), entries.len());
        assert_eq!(entries_after(&entries, Some(&w(".."))).len(), 5);
        // A marker whose entry vanished resumes after where it would sort.
        let after = entries_after(&entries, Some(&w("E")));
        assert_eq!(after[0].name, w("a\u{F03A}b"));
        // The root has no dot entries.
        let (root, _) = listing(&fs, ROOT_INO).unwrap();
        assert_eq!(
            root,
            vec![WinDirEntry {
                name: w("job"),
                ino: 2
            }]
        );
    }

    #[test]
    fn filetime_counts_100ns_ticks_since_1601() {
        assert_eq!(filetime(0, 0), 116_444_736_000_000_000);
        assert_eq!(filetime(1, 999_999_999), 116_444_736_019_999_999);
        assert_eq!(filetime(-FILETIME_UNIX_OFFSET_SECS - 1, 0), 0);
        assert_eq!(unix_time(116_444_736_019_999_999), (1, 999_999_900));
        assert_eq!(unix_time(0), (-FILETIME_UNIX_OFFSET_SECS, 0));
        let t = (1_767_225_600, 123_456_700);
        assert_eq!(unix_time(filetime(t.0, t.1)), t);
    }

    #[test]
    fn file_info_carries_kind_sizes_and_times() {
        use attributes::*;
        let mut file = attr(4, NodeKind::File);
        file.size = 10_000;
        file.blocks = 24;
        file.nlink = 2;
        file = file.with_mtime(1, 500);
        file.ctime = (2, 0);
        let info = file_info(&file, true);
        assert_eq!(info.file_attributes, READONLY);
        assert_eq!(info.allocation_size, 24 * 512);
        assert_eq!(info.file_size, 10_000);
        assert_eq!(info.last_write_time, filetime(1, 500));
        assert_eq!(info.creation_time, info.last_write_time);
        assert_eq!(info.change_time, filetime(2, 0));
        assert_eq!((info.index_number, info.hard_links), (4, 2));
        // Writable and owner-writable: no attribute but NORMAL.
        assert_eq!(file_info(&file, false).file_attributes, NORMAL);
        file.mode = 0o444;
        assert_eq!(file_info(&file, false).file_attributes, READONLY);
        // Fewer blocks than bytes: a sparse file.
        file.blocks = 0;
        assert_eq!(
            file_info(&file, false).file_attributes,
            READONLY | SPARSE_FILE
        );

        let dir = file_info(&attr(3, NodeKind::Dir), true);
        assert_eq!(dir.file_attributes, DIRECTORY);
        assert_eq!((dir.file_size, dir.allocation_size), (0, 0));

        let link = file_info(&attr(8, NodeKind::Symlink), false);
        assert_eq!(link.file_attributes, REPARSE_POINT);
        assert_eq!(link.reparse_tag, IO_REPARSE_TAG_SYMLINK);

        let fifo = file_info(&attr(9, NodeKind::Fifo), false);
        assert_eq!(fifo.file_attributes, SYSTEM);
        assert_eq!(hidden_by_name(b".pgpass"), HIDDEN);
        assert_eq!(hidden_by_name(b".."), 0);
        assert_eq!(hidden_by_name(b"base"), 0);
    }

    #[test]
    fn open_requests_map_to_model_calls() {
        let read = 0x0012_0089; // FILE_GENERIC_READ
        let write = read | FILE_WRITE_DATA;
        assert_eq!(
            open_plan(NodeKind::File, 0, read, false),
            Ok(OpenPlan::File { write: false })
        );
        assert_eq!(
            open_plan(NodeKind::File, 0, write, true),
            Ok(OpenPlan::File { write: true })
        );
        assert_eq!(
            open_plan(NodeKind::File, 0, write, false),
            Err(STATUS_MEDIA_WRITE_PROTECTED)
        );
        assert_eq!(
            open_plan(NodeKind::Dir, 0, read, false),
            Ok(OpenPlan::Directory)
        );
        assert_eq!(
            open_plan(NodeKind::Dir, FILE_NON_DIRECTORY_FILE, read, false),
            Err(STATUS_FILE_IS_A_DIRECTORY)
        );
        assert_eq!(
            open_plan(NodeKind::File, FILE_DIRECTORY_FILE, read, false),
            Err(STATUS_NOT_A_DIRECTORY)
        );
        assert_eq!(
            open_plan(NodeKind::Symlink, FILE_OPEN_REPARSE_POINT, read, false),
            Ok(OpenPlan::AttributesOnly)
        );
        assert_eq!(create_kind(FILE_DIRECTORY_FILE), CreateKind::Directory);
        assert_eq!(create_kind(FILE_NON_DIRECTORY_FILE), CreateKind::File);
        assert!(wants_write(GENERIC_WRITE));
        assert!(wants_write(FILE_APPEND_DATA));
        assert!(!wants_write(read));
    }

    #[test]
    fn symlinks_become_symlink_reparse_buffers() {
        let buf = symlink_reparse_buffer(b"../data/base");
        let u16_at = |i: usize| u16::from_le_bytes([buf[i], buf[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().unwrap());
        let path = w("..\\data\\base");
        let path_len = 2 * path.len();
        assert_eq!(u32_at(0), IO_REPARSE_TAG_SYMLINK);
        assert_eq!(usize::from(u16_at(4)), buf.len() - 8);
        assert_eq!((u16_at(8), usize::from(u16_at(10))), (0, path_len));
        assert_eq!(
            (usize::from(u16_at(12)), usize::from(u16_at(14))),
            (path_len, path_len)
        );
        assert_eq!(u32_at(16), SYMLINK_FLAG_RELATIVE);
        let names: Vec<u16> = buf[20..]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(names, [path.clone(), path].concat());
        let absolute = symlink_reparse_buffer(b"/var/lib");
        assert_eq!(u32::from_le_bytes(absolute[16..20].try_into().unwrap()), 0);
    }
}
