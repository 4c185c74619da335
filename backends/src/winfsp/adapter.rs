//! The Windows half of the WinFsp adapter: `winfsp_wrs` callbacks over a
//! filesystem model, and the mount's lifetime. Every rule (names, case,
//! attributes, errors, open decisions) lives in [`super::translate`];
//! this file only moves values between WinFsp's types and those rules.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use vfs_core::fs::{Attr, Caller, FsError, FsModel, RenameMode, SetAttr, SetTime, ROOT_INO};
use vfs_core::manifest::NodeKind;
use winfsp_wrs::{
    filetime_now, CleanupFlags, CreateFileInfo, CreateOptions, DirInfo, FileAccessRights,
    FileAttributes, FileContextKind, FileContextMode, FileInfo, FileSystem, FileSystemInterface,
    OperationGuardStrategy, PSecurityDescriptor, Params, SecurityDescriptor, U16CStr, U16CString,
    U16String, VolumeInfo, VolumeParams, WriteMode, NTSTATUS,
};

use super::translate::{self, status, CreateKind, OpenPlan, WalkError, WinDirEntry, WinFileInfo};
use super::WinFspOptions;

// The neutral layer's NTSTATUS values are the SDK's.
const _: () = {
    use winfsp_wrs as w;
    assert!(status::STATUS_SUCCESS == w::STATUS_SUCCESS);
    assert!(status::STATUS_INVALID_HANDLE == w::STATUS_INVALID_HANDLE);
    assert!(status::STATUS_INVALID_PARAMETER == w::STATUS_INVALID_PARAMETER);
    assert!(status::STATUS_INVALID_DEVICE_REQUEST == w::STATUS_INVALID_DEVICE_REQUEST);
    assert!(status::STATUS_END_OF_FILE == w::STATUS_END_OF_FILE);
    assert!(status::STATUS_ACCESS_DENIED == w::STATUS_ACCESS_DENIED);
    assert!(status::STATUS_BUFFER_TOO_SMALL == w::STATUS_BUFFER_TOO_SMALL);
    assert!(status::STATUS_OBJECT_NAME_INVALID == w::STATUS_OBJECT_NAME_INVALID);
    assert!(status::STATUS_OBJECT_NAME_NOT_FOUND == w::STATUS_OBJECT_NAME_NOT_FOUND);
    assert!(status::STATUS_OBJECT_NAME_COLLISION == w::STATUS_OBJECT_NAME_COLLISION);
    assert!(status::STATUS_OBJECT_PATH_NOT_FOUND == w::STATUS_OBJECT_PATH_NOT_FOUND);
    assert!(status::STATUS_DATA_ERROR == w::STATUS_DATA_ERROR);
    assert!(status::STATUS_DISK_FULL == w::STATUS_DISK_FULL);
    assert!(status::STATUS_MEDIA_WRITE_PROTECTED == w::STATUS_MEDIA_WRITE_PROTECTED);
    assert!(status::STATUS_FILE_IS_A_DIRECTORY == w::STATUS_FILE_IS_A_DIRECTORY);
    assert!(status::STATUS_NOT_SUPPORTED == w::STATUS_NOT_SUPPORTED);
    assert!(status::STATUS_DIRECTORY_NOT_EMPTY == w::STATUS_DIRECTORY_NOT_EMPTY);
    assert!(status::STATUS_NOT_A_DIRECTORY == w::STATUS_NOT_A_DIRECTORY);
    assert!(status::STATUS_NAME_TOO_LONG == w::STATUS_NAME_TOO_LONG);
    assert!(status::STATUS_IO_DEVICE_ERROR == w::STATUS_IO_DEVICE_ERROR);
    assert!(status::STATUS_NOT_A_REPARSE_POINT == w::STATUS_NOT_A_REPARSE_POINT);
};

/// Sector size announced to Windows. SQL Server sizes its log writes by
/// it; 4 KiB is what modern disks report and what database pages divide.
const SECTOR_SIZE: u16 = 4096;

/// Access for everyone: full for SYSTEM and Administrators, read and
/// execute (read-only mount) or full (writable session) for the rest.
/// Windows checks these; the model has no Windows identities to check.
const READ_ONLY_SDDL: &str = "O:BAG:BAD:P(A;;FA;;;SY)(A;;FA;;;BA)(A;;FRFX;;;WD)";
const WRITABLE_SDDL: &str = "O:BAG:BAD:P(A;;FA;;;SY)(A;;FA;;;BA)(A;;FA;;;WD)";

/// One open file or directory, owned by WinFsp between open and close.
struct OpenNode {
    ino: u64,
    kind: NodeKind,
    /// The model's handle of an open regular file.
    fh: Option<u64>,
    /// A directory's listing, taken when a listing starts (no marker) and
    /// reused while WinFsp pages through it.
    listing: Mutex<Vec<WinDirEntry>>,
}

/// The file context WinFsp stores per open handle. WinFsp passes a null
/// context for volume-wide requests (a volume flush), which the crate's
/// own `Arc` context would turn into a dangling `Arc`; this one reads
/// null as `None`.
struct NodeRef(Option<Arc<OpenNode>>);

#[allow(unsafe_code)]
impl FileContextKind for NodeRef {
    const MODE: FileContextMode = FileContextMode::Descriptor;

    unsafe fn write(self, out: *mut RawContext) {
        let raw = match self.0 {
            Some(node) => Arc::into_raw(node).cast_mut().cast(),
            None => std::ptr::null_mut(),
        };
        // SAFETY: WinFsp hands a valid out-pointer for the new context.
        unsafe { out.write(raw) }
    }

    unsafe fn access(raw: RawContext) -> Self {
        if raw.is_null() {
            return NodeRef(None);
        }
        // SAFETY: a non-null context is one `write` made from
        // `Arc::into_raw`, alive until `access_for_close`; the count taken
        // here is released when this `NodeRef` drops.
        unsafe {
            Arc::increment_strong_count(raw as *const OpenNode);
            NodeRef(Some(Arc::from_raw(raw as *const OpenNode)))
        }
    }

    unsafe fn access_for_close(raw: RawContext) -> Self {
        if raw.is_null() {
            return NodeRef(None);
        }
        // SAFETY: close is the last use of the context: this takes back
        // the count `write` leaked.
        unsafe { NodeRef(Some(Arc::from_raw(raw as *const OpenNode))) }
    }
}

/// WinFsp's per-handle context pointer (`PVOID`; `winfsp_wrs` does not
/// re-export its sys crate, where it is a plain `*mut c_void`).
type RawContext = *mut std::ffi::c_void;

impl NodeRef {
    fn node(&self) -> Result<&OpenNode, NTSTATUS> {
        self.0.as_deref().ok_or(status::STATUS_INVALID_HANDLE)
    }
}

/// Serves one filesystem model to WinFsp.
struct WinFspAdapter {
    fs: Arc<dyn FsModel>,
    read_only: bool,
    security: SecurityDescriptor,
    volume_label: U16String,
    /// Owner of nodes made from Windows (which has no uid/gid): the owner
    /// of the mount's root.
    caller: Caller,
    state: Arc<MountState>,
}

fn win_info(info: WinFileInfo) -> FileInfo {
    let mut out = FileInfo::default();
    out.set_file_attributes(FileAttributes(info.file_attributes))
        .set_reparse_tag(info.reparse_tag)
        .set_allocation_size(info.allocation_size)
        .set_file_size(info.file_size)
        .set_creation_time(info.creation_time)
        .set_last_access_time(info.last_access_time)
        .set_last_write_time(info.last_write_time)
        .set_change_time(info.change_time)
        .set_index_number(info.index_number)
        .set_hard_links(info.hard_links);
    out
}

fn fs_err(e: FsError) -> NTSTATUS {
    translate::ntstatus(&e)
}

fn walk_err(e: WalkError) -> NTSTATUS {
    e.ntstatus()
}

impl WinFspAdapter {
    fn info(&self, attr: &Attr) -> FileInfo {
        win_info(translate::file_info(attr, self.read_only))
    }

    fn info_of(&self, ino: u64) -> Result<FileInfo, NTSTATUS> {
        let attr = self.fs.getattr(ino).map_err(fs_err)?;
        Ok(self.info(&attr))
    }

    fn writable(&self) -> Result<(), NTSTATUS> {
        if self.read_only {
            Err(status::STATUS_MEDIA_WRITE_PROTECTED)
        } else {
            Ok(())
        }
    }

    fn open_node(&self, attr: &Attr, plan: OpenPlan) -> Result<NodeRef, NTSTATUS> {
        let fh = match plan {
            OpenPlan::File { write } => Some(self.fs.open(attr.ino, write, false).map_err(fs_err)?),
            OpenPlan::Directory | OpenPlan::AttributesOnly => None,
        };
        Ok(NodeRef(Some(Arc::new(OpenNode {
            ino: attr.ino,
            kind: attr.kind,
            fh,
            listing: Mutex::new(Vec::new()),
        }))))
    }

    fn reparse_buffer(&self, attr: &Attr) -> Result<Vec<u8>, NTSTATUS> {
        if attr.kind != NodeKind::Symlink {
            return Err(status::STATUS_NOT_A_REPARSE_POINT);
        }
        let target = self.fs.readlink(attr.ino).map_err(fs_err)?;
        Ok(translate::symlink_reparse_buffer(&target))
    }

    fn delete(&self, file_name: &U16CStr, kind: NodeKind) -> Result<(), FsError> {
        let (dir, name) = translate::walk_parent(self.fs.as_ref(), file_name.as_slice()).map_err(
            |e| match e {
                WalkError::Fs(e) => e,
                _ => FsError::NotFound,
            },
        )?;
        if kind == NodeKind::Dir {
            self.fs.rmdir(dir.ino, &name)
        } else {
            self.fs.unlink(dir.ino, &name)
        }
    }
}

impl FileSystemInterface for WinFspAdapter {
    type FileContext = NodeRef;

    const GET_VOLUME_INFO_DEFINED: bool = true;
    const GET_SECURITY_BY_NAME_DEFINED: bool = true;
    const CREATE_DEFINED: bool = true;
    const OPEN_DEFINED: bool = true;
    const OVERWRITE_DEFINED: bool = true;
    const CLEANUP_DEFINED: bool = true;
    const CLOSE_DEFINED: bool = true;
    const READ_DEFINED: bool = true;
    const WRITE_DEFINED: bool = true;
    const FLUSH_DEFINED: bool = true;
    const GET_FILE_INFO_DEFINED: bool = true;
    const SET_BASIC_INFO_DEFINED: bool = true;
    const SET_FILE_SIZE_DEFINED: bool = true;
    const CAN_DELETE_DEFINED: bool = true;
    const RENAME_DEFINED: bool = true;
    const GET_SECURITY_DEFINED: bool = true;
    const READ_DIRECTORY_DEFINED: bool = true;
    const GET_REPARSE_POINT_DEFINED: bool = true;
    const RESOLVE_REPARSE_POINTS_DEFINED: bool = true;
    const DISPATCHER_STOPPED_DEFINED: bool = true;

    fn get_volume_info(&self) -> Result<VolumeInfo, NTSTATUS> {
        let st = self.fs.statfs();
        VolumeInfo::new(st.total_bytes, st.free_bytes, &self.volume_label)
            .map_err(|_| status::STATUS_INVALID_PARAMETER)
    }

    fn get_security_by_name(
        &self,
        file_name: &U16CStr,
        find_reparse_point: impl Fn() -> Option<FileAttributes>,
    ) -> Result<(FileAttributes, PSecurityDescriptor, bool), NTSTATUS> {
        match translate::walk(self.fs.as_ref(), file_name.as_slice()) {
            Ok(attr) => {
                let info = translate::file_info(&attr, self.read_only);
                Ok((
                    FileAttributes(info.file_attributes),
                    self.security.as_ptr(),
                    false,
                ))
            }
            // A link on the way: WinFsp resolves it (ResolveReparsePoints).
            Err(WalkError::SymlinkOnPath { .. }) => match find_reparse_point() {
                Some(attributes) => Ok((attributes, self.security.as_ptr(), true)),
                None => Err(status::STATUS_OBJECT_PATH_NOT_FOUND),
            },
            Err(e) => Err(walk_err(e)),
        }
    }

    fn create(
        &self,
        file_name: &U16CStr,
        create_file_info: CreateFileInfo,
        _security_descriptor: SecurityDescriptor,
    ) -> Result<(Self::FileContext, FileInfo), NTSTATUS> {
        self.writable()?;
        let (dir, name) =
            translate::walk_parent(self.fs.as_ref(), file_name.as_slice()).map_err(walk_err)?;
        let (attr, plan) = match translate::create_kind(create_file_info.create_options.0) {
            CreateKind::Directory => (
                self.fs
                    .mkdir(dir.ino, &name, 0o755, self.caller)
                    .map_err(fs_err)?,
                OpenPlan::Directory,
            ),
            CreateKind::File => (
                self.fs
                    .mknod(dir.ino, &name, NodeKind::File, 0o644, 0, self.caller)
                    .map_err(fs_err)?,
                OpenPlan::File { write: true },
            ),
        };
        let node = self.open_node(&attr, plan)?;
        Ok((node, self.info(&attr)))
    }

    fn open(
        &self,
        file_name: &U16CStr,
        create_options: CreateOptions,
        granted_access: FileAccessRights,
    ) -> Result<(Self::FileContext, FileInfo), NTSTATUS> {
        let attr = translate::walk(self.fs.as_ref(), file_name.as_slice()).map_err(walk_err)?;
        let plan = translate::open_plan(
            attr.kind,
            create_options.0,
            granted_access.0,
            !self.read_only,
        )?;
        let node = self.open_node(&attr, plan)?;
        Ok((node, self.info(&attr)))
    }

    fn overwrite(
        &self,
        file_context: Self::FileContext,
        _file_attributes: FileAttributes,
        _replace_file_attributes: bool,
        _allocation_size: u64,
    ) -> Result<FileInfo, NTSTATUS> {
        self.writable()?;
        let node = file_context.node()?;
        let set = SetAttr {
            size: Some(0),
            ..SetAttr::default()
        };
        let attr = self.fs.setattr(node.ino, &set).map_err(fs_err)?;
        Ok(self.info(&attr))
    }

    fn cleanup(
        &self,
        file_context: Self::FileContext,
        file_name: Option<&U16CStr>,
        flags: CleanupFlags,
    ) {
        let (Ok(node), Some(file_name)) = (file_context.node(), file_name) else {
            return;
        };
        if flags.is(CleanupFlags::DELETE) {
            // Cleanup cannot fail back to Windows; can_delete vetted it.
            if let Err(e) = self.delete(file_name, node.kind) {
                tracing::warn!(
                    "delete of {} at cleanup failed: {e}",
                    file_name.to_string_lossy()
                );
            }
        }
    }

    fn close(&self, file_context: Self::FileContext) {
        if let Some(fh) = file_context.0.as_ref().and_then(|n| n.fh) {
            self.fs.release(fh);
        }
    }

    fn read(
        &self,
        file_context: Self::FileContext,
        buffer: &mut [u8],
        offset: u64,
    ) -> Result<usize, NTSTATUS> {
        let node = file_context.node()?;
        let fh = node.fh.ok_or(status::STATUS_INVALID_DEVICE_REQUEST)?;
        let len = u32::try_from(buffer.len()).unwrap_or(u32::MAX);
        let data = self.fs.read(fh, offset, len).map_err(fs_err)?;
        if data.is_empty() && !buffer.is_empty() {
            return Err(status::STATUS_END_OF_FILE);
        }
        let n = data.len().min(buffer.len());
        buffer[..n].copy_from_slice(&data[..n]);
        Ok(n)
    }

    fn write(
        &self,
        file_context: Self::FileContext,
        buffer: &[u8],
        mode: WriteMode,
    ) -> Result<(usize, FileInfo), NTSTATUS> {
        self.writable()?;
        let node = file_context.node()?;
        let fh = node.fh.ok_or(status::STATUS_INVALID_DEVICE_REQUEST)?;
        let (offset, data) = match mode {
            WriteMode::Normal { offset } => (offset, buffer),
            WriteMode::WriteToEOF => (self.fs.getattr(node.ino).map_err(fs_err)?.size, buffer),
            // Paging I/O: never extend the file.
            WriteMode::ConstrainedIO { offset } => {
                let size = self.fs.getattr(node.ino).map_err(fs_err)?.size;
                let room = usize::try_from(size.saturating_sub(offset)).unwrap_or(usize::MAX);
                (offset, &buffer[..buffer.len().min(room)])
            }
        };
        let mut written = 0;
        while written < data.len() {
            let n = self
                .fs
                .write(fh, offset + written as u64, &data[written..])
                .map_err(fs_err)?;
            if n == 0 {
                break;
            }
            written += n as usize;
        }
        Ok((written, self.info_of(node.ino)?))
    }

    fn flush(&self, file_context: Self::FileContext) -> Result<FileInfo, NTSTATUS> {
        match file_context.0.as_deref() {
            Some(node) => {
                self.fs.fsync(node.ino).map_err(fs_err)?;
                self.info_of(node.ino)
            }
            // A volume flush: every session write is made durable by the
            // per-file fsyncs; nothing more to do.
            None => Ok(FileInfo::default()),
        }
    }

    fn get_file_info(&self, file_context: Self::FileContext) -> Result<FileInfo, NTSTATUS> {
        self.info_of(file_context.node()?.ino)
    }

    fn set_basic_info(
        &self,
        file_context: Self::FileContext,
        _file_attributes: FileAttributes,
        _creation_time: u64,
        last_access_time: u64,
        last_write_time: u64,
        _change_time: u64,
    ) -> Result<FileInfo, NTSTATUS> {
        let node = file_context.node()?;
        // Zero means "leave it"; attribute bits have no model counterpart.
        let at = |t: u64| {
            (t != 0).then(|| {
                let (sec, nsec) = translate::unix_time(t);
                SetTime::At(sec, nsec)
            })
        };
        let set = SetAttr {
            atime: at(last_access_time),
            mtime: at(last_write_time),
            ..SetAttr::default()
        };
        if set == SetAttr::default() {
            return self.info_of(node.ino);
        }
        self.writable()?;
        let attr = self.fs.setattr(node.ino, &set).map_err(fs_err)?;
        Ok(self.info(&attr))
    }

    fn set_file_size(
        &self,
        file_context: Self::FileContext,
        new_size: u64,
        set_allocation_size: bool,
    ) -> Result<FileInfo, NTSTATUS> {
        self.writable()?;
        let node = file_context.node()?;
        let size = self.fs.getattr(node.ino).map_err(fs_err)?.size;
        if set_allocation_size {
            // Allocation below the size cuts the file; above it reserves.
            if new_size < size {
                let set = SetAttr {
                    size: Some(new_size),
                    ..SetAttr::default()
                };
                self.fs.setattr(node.ino, &set).map_err(fs_err)?;
            } else if new_size > size {
                match self.fs.fallocate(node.ino, size, new_size - size, true) {
                    Ok(()) | Err(FsError::Unsupported) => {}
                    Err(e) => return Err(fs_err(e)),
                }
            }
        } else {
            let set = SetAttr {
                size: Some(new_size),
                ..SetAttr::default()
            };
            self.fs.setattr(node.ino, &set).map_err(fs_err)?;
        }
        self.info_of(node.ino)
    }

    fn can_delete(
        &self,
        file_context: Self::FileContext,
        _file_name: &U16CStr,
    ) -> Result<(), NTSTATUS> {
        self.writable()?;
        let node = file_context.node()?;
        if node.ino == ROOT_INO {
            return Err(status::STATUS_ACCESS_DENIED);
        }
        if node.kind == NodeKind::Dir && !self.fs.readdir(node.ino).map_err(fs_err)?.is_empty() {
            return Err(status::STATUS_DIRECTORY_NOT_EMPTY);
        }
        Ok(())
    }

    fn rename(
        &self,
        _file_context: Self::FileContext,
        file_name: &U16CStr,
        new_file_name: &U16CStr,
        replace_if_exists: bool,
    ) -> Result<(), NTSTATUS> {
        self.writable()?;
        let fs = self.fs.as_ref();
        let (from_dir, from) =
            translate::walk_parent(fs, file_name.as_slice()).map_err(walk_err)?;
        let (to_dir, to) =
            translate::walk_parent(fs, new_file_name.as_slice()).map_err(walk_err)?;
        let mode = if replace_if_exists {
            RenameMode::Replace
        } else {
            RenameMode::NoReplace
        };
        fs.rename(from_dir.ino, &from, to_dir.ino, &to, mode)
            .map_err(fs_err)
    }

    fn get_security(
        &self,
        _file_context: Self::FileContext,
    ) -> Result<PSecurityDescriptor, NTSTATUS> {
        Ok(self.security.as_ptr())
    }

    fn read_directory(
        &self,
        file_context: Self::FileContext,
        marker: Option<&U16CStr>,
        mut add_dir_info: impl FnMut(DirInfo) -> bool,
    ) -> Result<(), NTSTATUS> {
        let node = file_context.node()?;
        let mut listing = node.listing.lock();
        if marker.is_none() || listing.is_empty() {
            let (entries, skipped) =
                translate::listing(self.fs.as_ref(), node.ino).map_err(fs_err)?;
            if skipped > 0 {
                tracing::debug!(
                    ino = node.ino,
                    skipped,
                    "names that are not UTF-8 are left out of the Windows listing"
                );
            }
            *listing = entries;
        }
        for entry in translate::entries_after(&listing, marker.map(|m| m.as_slice())) {
            let attr = match self.fs.getattr(entry.ino) {
                Ok(attr) => attr,
                // Removed since the listing was taken.
                Err(FsError::NotFound) => continue,
                Err(e) => return Err(fs_err(e)),
            };
            let mut info = translate::file_info(&attr, self.read_only);
            if let Ok(text) = String::from_utf16(&entry.name) {
                info.file_attributes |= translate::hidden_by_name(text.as_bytes());
            }
            let Ok(name) = U16CString::from_vec(entry.name.clone()) else {
                continue;
            };
            if !add_dir_info(DirInfo::new(win_info(info), &name)) {
                break;
            }
        }
        Ok(())
    }

    fn get_reparse_point(
        &self,
        file_context: Self::FileContext,
        _file_name: &U16CStr,
        buffer: &mut [u8],
    ) -> Result<usize, NTSTATUS> {
        let attr = self.fs.getattr(file_context.node()?.ino).map_err(fs_err)?;
        let data = self.reparse_buffer(&attr)?;
        let out = buffer
            .get_mut(..data.len())
            .ok_or(status::STATUS_BUFFER_TOO_SMALL)?;
        out.copy_from_slice(&data);
        Ok(data.len())
    }

    fn get_reparse_point_by_name(
        &self,
        file_name: &U16CStr,
        _is_directory: bool,
        buffer: Option<&mut [u8]>,
    ) -> Result<usize, NTSTATUS> {
        let attr = translate::walk(self.fs.as_ref(), file_name.as_slice()).map_err(walk_err)?;
        let data = self.reparse_buffer(&attr)?;
        if let Some(buffer) = buffer {
            let out = buffer
                .get_mut(..data.len())
                .ok_or(status::STATUS_BUFFER_TOO_SMALL)?;
            out.copy_from_slice(&data);
        }
        Ok(data.len())
    }

    fn dispatcher_stopped(&self, normally: bool) {
        if !normally {
            tracing::warn!(
                "the WinFsp dispatcher of {} stopped abnormally",
                self.state.mountpoint.display()
            );
        }
        self.state.mark_ended();
    }
}

/// What the mount handle and its unmounters share.
struct MountState {
    mountpoint: PathBuf,
    /// The running file system until it is stopped.
    running: Mutex<Option<FileSystem>>,
    ended: Mutex<bool>,
    ended_cv: Condvar,
    stopping: AtomicBool,
}

impl MountState {
    fn mark_ended(&self) {
        *self.ended.lock() = true;
        self.ended_cv.notify_all();
    }

    fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(fs) = self.running.lock().take() {
            fs.stop();
        }
        self.mark_ended();
    }
}

/// A mounted WinFsp volume. Dropping it unmounts.
pub struct WinFspMount {
    state: Arc<MountState>,
}

/// Ends a [`WinFspMount`] from another thread (the control API, a
/// console handler).
#[derive(Clone)]
pub struct WinFspUnmounter {
    state: Arc<MountState>,
}

impl WinFspUnmounter {
    /// Stops the dispatcher and removes the mount point. Unlike FUSE,
    /// WinFsp has no busy refusal: handles still open under the mount
    /// fail from then on. Unmounting twice succeeds.
    pub fn unmount(&self) -> io::Result<()> {
        self.state.stop();
        Ok(())
    }

    /// The same as [`WinFspUnmounter::unmount`]: WinFsp has no lazy
    /// detach. Kept so callers treat both adapters alike.
    pub fn detach(&self) -> io::Result<()> {
        self.unmount()
    }
}

impl WinFspMount {
    /// The mount point as given (a directory path or a drive letter).
    pub fn mountpoint(&self) -> &Path {
        &self.state.mountpoint
    }

    pub fn unmounter(&self) -> WinFspUnmounter {
        WinFspUnmounter {
            state: self.state.clone(),
        }
    }

    /// Whether the volume has been unmounted.
    pub fn has_ended(&self) -> bool {
        *self.state.ended.lock()
    }

    /// Blocks until the volume is unmounted.
    pub fn wait(&self) {
        let mut ended = self.state.ended.lock();
        while !*ended {
            self.state.ended_cv.wait(&mut ended);
        }
    }

    /// Unmounts and waits for the dispatcher to stop.
    pub fn unmount(self) -> io::Result<()> {
        self.state.stop();
        Ok(())
    }
}

impl Drop for WinFspMount {
    fn drop(&mut self) {
        if !self.state.stopping.load(Ordering::SeqCst) {
            self.state.stop();
        }
    }
}

fn wide(s: &str) -> U16CString {
    // Our own constant strings hold no NUL.
    U16CString::from_str_truncate(s)
}

/// Mounts `fs` at `mountpoint`: a drive letter (`X:`) or a directory path
/// whose parent exists and which itself does not (WinFsp makes it).
/// Read-only unless the model is writable.
pub fn mount(
    fs: Arc<dyn FsModel>,
    mountpoint: &Path,
    opts: &WinFspOptions,
) -> io::Result<WinFspMount> {
    winfsp_wrs::init().map_err(|e| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("WinFsp is not installed or cannot be loaded: {e}"),
        )
    })?;
    let read_only = !fs.writable();
    let root = fs.getattr(ROOT_INO).map_err(|e| {
        io::Error::other(format!(
            "cannot read the root of the filesystem to mount: {e}"
        ))
    })?;
    let sddl = if read_only {
        READ_ONLY_SDDL
    } else {
        WRITABLE_SDDL
    };
    let security = SecurityDescriptor::from_wstr(&wide(sddl)).map_err(io::Error::other)?;

    let mut volume = VolumeParams::default();
    volume
        .set_sector_size(SECTOR_SIZE)
        .set_sectors_per_allocation_unit(1)
        .set_max_component_length(translate::MAX_COMPONENT_LEN as u16)
        .set_volume_creation_time(filetime_now())
        .set_volume_serial_number((filetime_now() / 10_000_000) as u32)
        .set_file_info_timeout(opts.info_timeout_ms)
        .set_case_sensitive_search(false)
        .set_case_preserved_names(true)
        .set_unicode_on_disk(true)
        .set_persistent_acls(true)
        .set_reparse_point(true)
        .set_reparse_point_access_check(false)
        .set_named_streams(false)
        .set_post_cleanup_when_modified_only(true)
        .set_read_only_volume(read_only);
    if volume.set_file_system_name(&wide(&opts.fs_name)).is_err() {
        tracing::debug!("file system name {:?} cut to 16 characters", opts.fs_name);
    }
    let params = Params {
        volume_params: volume,
        guard_strategy: OperationGuardStrategy::Fine,
    };

    let state = Arc::new(MountState {
        mountpoint: mountpoint.to_path_buf(),
        running: Mutex::new(None),
        ended: Mutex::new(false),
        ended_cv: Condvar::new(),
        stopping: AtomicBool::new(false),
    });
    // WinFsp holds 32 UTF-16 units of label.
    let label: Vec<u16> = opts.volume_label.encode_utf16().take(32).collect();
    let adapter = WinFspAdapter {
        fs,
        read_only,
        security,
        volume_label: U16String::from_vec(label),
        caller: Caller {
            uid: root.uid,
            gid: root.gid,
        },
        state: state.clone(),
    };
    let target = U16CString::from_os_str(mountpoint.as_os_str())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mount point contains NUL"))?;
    let running = FileSystem::start(params, Some(&target), adapter).map_err(|status| {
        io::Error::other(format!(
            "cannot mount WinFsp at {}: NTSTATUS {:#010x}",
            mountpoint.display(),
            status as u32
        ))
    })?;
    *state.running.lock() = Some(running);
    tracing::info!(
        mountpoint = %mountpoint.display(),
        read_only,
        "WinFsp volume mounted"
    );
    Ok(WinFspMount { state })
}
