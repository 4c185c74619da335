//! The object store on a local directory.
//!
//! Writes go to `tmp/<pid>-<random>`, are fsynced, renamed into place and
//! the parent directory fsynced, so a crash leaves either the whole object
//! or none.
//!
//! Objects are placed with a hard link, which fails if the name exists, so
//! no write ever replaces an object (a rename would, silently).
//!
//! Reads: ranges are read with `pread` through a bounded set of open pack
//! files. Nothing is memory-mapped: every page a reader faults in (and the
//! kernel maps up to sixteen around each fault) counted toward a mount's
//! resident size (740 MB under random reads with a 64 MiB cache), and
//! mappings kept per pack ran into `vm.max_map_count` (65,530) on large
//! repositories. With `pread` the kernel's page cache holds the packs and
//! a process's own memory is what it asked for.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::store::{ObjectBytes, ObjectStore};

pub struct LocalStore {
    root: PathBuf,
    /// Open packs for `pread`, least recently used closed first.
    files: Mutex<lru::LruCache<String, Arc<File>>>,
}

/// Pack files kept open for `pread`: enough for the working set of a
/// mount, well below the usual 1024 file descriptors per process.
const OPEN_FILES: usize = 256;

const TMP_DIR: &str = "tmp";

impl LocalStore {
    /// Opens a store rooted at an existing directory.
    pub fn open(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::NotFound(format!(
                "repository directory {}",
                root.display()
            )));
        }
        Ok(LocalStore {
            root: root.to_path_buf(),
            files: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(OPEN_FILES).expect("nonzero"),
            )),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Removes temporary files left by writers that no longer run.
    pub fn clean_stale_temp_files(&self) {
        let Ok(entries) = fs::read_dir(self.root.join(TMP_DIR)) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name.split('-').next().and_then(|p| p.parse::<u32>().ok());
            let alive = pid.is_some_and(process_alive);
            if !alive {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// A fresh path in the temporary directory, named so that
    /// [`Self::clean_stale_temp_files`] knows its writer.
    fn temp_path(&self) -> Result<PathBuf> {
        let tmp_dir = self.root.join(TMP_DIR);
        fs::create_dir_all(&tmp_dir).map_err(|e| Error::io(&tmp_dir, e))?;
        Ok(tmp_dir.join(format!(
            "{}-{}",
            std::process::id(),
            crate::crypto::random_hex(8)
        )))
    }

    fn write_object(&self, key: &str, data: &[u8]) -> Result<()> {
        let tmp = self.temp_path()?;
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(data)?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(&tmp, e));
        }
        self.place(key, &tmp)
    }

    /// Moves the synced file `tmp` to `key`, create-only; `tmp` is gone
    /// afterwards either way.
    fn place(&self, key: &str, tmp: &Path) -> Result<()> {
        let target = self.path(key);
        let parent = target.parent().expect("object keys have a parent");
        if !parent.is_dir() {
            if let Err(e) = fs::create_dir_all(parent) {
                let _ = fs::remove_file(tmp);
                return Err(Error::io(parent, e));
            }
            if let Some(grand) = parent.parent() {
                sync_dir(grand)?;
            }
        }
        // A hard link fails atomically if the target exists; a rename would
        // silently replace it.
        let placed = fs::hard_link(tmp, &target).and_then(|()| fs::remove_file(tmp));
        if let Err(e) = placed {
            let _ = fs::remove_file(tmp);
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                return Err(Error::AlreadyExists(key.to_string()));
            }
            return Err(Error::io(&target, e));
        }
        sync_dir(parent)
    }

    fn open_file(&self, key: &str) -> Result<Arc<File>> {
        if let Some(f) = self.files.lock().get(key) {
            return Ok(f.clone());
        }
        let path = self.path(key);
        let file = Arc::new(File::open(&path).map_err(|e| not_found_or_io(key, &path, e))?);
        self.files.lock().put(key.to_string(), file.clone());
        Ok(file)
    }

    fn pread(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let file = self.open_file(key)?;
        let mut buf = vec![0u8; len];
        let done =
            read_full_at(&file, &mut buf, offset).map_err(|e| Error::io(self.path(key), e))?;
        if done < len {
            let size = file.metadata().map(|m| m.len()).unwrap_or(0);
            return Err(Error::malformed(
                key,
                format!("truncated: {len} bytes at offset {offset} requested, file has {size}"),
            ));
        }
        Ok(buf)
    }

    /// Files under `prefix`, recursively, sorted, with their sizes if
    /// `sizes` (0 otherwise). A file removed while the walk runs is left
    /// out.
    fn walk(&self, prefix: &str, sizes: bool) -> Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        let dir = self.path(prefix);
        if !dir.exists() {
            return Ok(out);
        }
        let mut stack = vec![(dir, prefix.to_string())];
        while let Some((dir, key)) = stack.pop() {
            let entries = fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| Error::io(&dir, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let ft = entry.file_type().map_err(|e| Error::io(entry.path(), e))?;
                if ft.is_dir() {
                    stack.push((entry.path(), format!("{key}{name}/")));
                    continue;
                }
                let len = match sizes {
                    false => 0,
                    true => match entry.metadata() {
                        Ok(m) => m.len(),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(Error::io(entry.path(), e)),
                    },
                };
                out.push((format!("{key}{name}"), len));
            }
        }
        out.sort();
        Ok(out)
    }
}

#[cfg(target_os = "linux")]
pub(crate) fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn process_alive(_pid: u32) -> bool {
    // Without a cheap liveness check, keep the file; a later gc removes it.
    true
}

/// Fills `buf` from `offset` with positioned reads; returns how many bytes
/// were read, fewer than asked only where the file ends.
pub(crate) fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match read_at(file, &mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    file.read_at(buf, offset)
}

#[cfg(windows)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    use std::os::windows::fs::FileExt;
    file.seek_read(buf, offset)
}

fn not_found_or_io(key: &str, path: &Path, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::NotFound(key.to_string())
    } else {
        Error::io(path, e)
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    // Directories cannot be opened for fsync on Windows; NTFS journals the
    // rename itself.
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

impl ObjectStore for LocalStore {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        self.write_object(key, data)
    }

    fn local_path(&self, key: &str) -> Option<PathBuf> {
        Some(self.path(key))
    }

    fn temp_file_path(&self) -> Option<PathBuf> {
        self.temp_path().ok()
    }

    fn put_file(&self, key: &str, path: &Path) -> Result<()> {
        if path.parent() == Some(self.root.join(TMP_DIR).as_path()) {
            return self.place(key, path);
        }
        let data = fs::read(path).map_err(|e| Error::io(path, e))?;
        let _ = fs::remove_file(path);
        self.write_object(key, &data)
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        let path = self.path(key);
        fs::read(&path).map_err(|e| not_found_or_io(key, &path, e))
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<ObjectBytes> {
        Ok(ObjectBytes(Arc::new(self.pread(key, offset, len)?)))
    }

    fn size(&self, key: &str) -> Result<Option<u64>> {
        let path = self.path(key);
        match fs::metadata(&path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .walk(prefix, false)?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }

    fn list_sizes(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        self.walk(prefix, true)
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.files.lock().pop(key);
        let path = self.path(key);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(path, e)),
        }
    }
}
