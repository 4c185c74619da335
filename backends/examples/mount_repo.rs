//! Manual test bench for the FUSE adapter.
//!
//! ```text
//! mount_repo backup <repo-dir> <job> <path>...   # init the repository if needed, back up
//! mount_repo mount <repo-dir> <mountpoint> [seconds]
//! mount_repo stale <mountpoint>                  # report a dead mount, and clear it
//! ```
//!
//! `mount` serves until the filesystem is unmounted from outside
//! (`fusermount3 -u <mountpoint>`), or, given `seconds`, unmounts itself
//! from another thread after that long, as a signal handler would.

#[cfg(target_os = "linux")]
fn main() {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::time::Duration;

    use backends::fuse::{self, FuseOptions};
    use vfs_core::backup::{backup, BackupOptions, Source};
    use vfs_core::fs::{FsOptions, RepoFs};
    use vfs_core::local_store::LocalStore;
    use vfs_core::repo::Repository;

    fn open(dir: &Path) -> Arc<Repository> {
        let store = LocalStore::open(dir).expect("open store");
        let repo = Repository::open(Arc::new(store), || {
            Err(vfs_core::Error::PasswordNeeded(dir.to_path_buf()))
        })
        .expect("open repository");
        Arc::new(repo)
    }

    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("backup") if args.len() >= 4 => {
            let dir = PathBuf::from(&args[1]);
            std::fs::create_dir_all(&dir).expect("create repository directory");
            let store = LocalStore::open(&dir).expect("open store");
            if let Err(e) = Repository::init(&store, None) {
                eprintln!("init: {e}");
            }
            let repo = open(&dir);
            let opts = BackupOptions {
                job: args[2].clone(),
                chunker: None,
                hostname: "bench".to_string(),
                progress: Default::default(),
            };
            let paths = args[3..].iter().map(PathBuf::from).collect();
            let manifest = backup(&repo, Source::Paths(paths), &opts).expect("backup");
            println!("restore point {}", manifest.full_name());
        }
        Some("mount") if args.len() >= 3 => {
            let repo = open(Path::new(&args[1]));
            // Who we are, without unsafe getuid(): the owner of /proc/self.
            let me = std::fs::metadata("/proc/self").expect("stat /proc/self");
            let (uid, gid) = {
                use std::os::unix::fs::MetadataExt;
                (me.uid(), me.gid())
            };
            let fs = RepoFs::new(
                repo,
                FsOptions {
                    cache_bytes: 256 << 20,
                    disk_cache: None,
                    readahead_threads: 2,
                    uid,
                    gid,
                    filter: Default::default(),
                },
            )
            .expect("filesystem model");
            let opts = FuseOptions {
                threads: 4,
                allow_other: true,
                auto_unmount: std::env::var_os("AUTO_UNMOUNT").is_some(),
                fs_name: "flr-bench".to_string(),
            };
            let mount = fuse::mount(fs.clone(), Path::new(&args[2]), &opts).expect("mount");
            println!("mounted at {}", mount.mountpoint().display());
            if let Some(secs) = args.get(3) {
                let secs: u64 = secs.parse().expect("seconds");
                let unmounter = mount.unmounter();
                std::thread::spawn(move || loop {
                    std::thread::sleep(Duration::from_secs(secs));
                    match unmounter.unmount() {
                        Ok(()) => break,
                        Err(e) => eprintln!("unmount: {e}; retrying"),
                    }
                });
            }
            mount.wait();
            println!(
                "unmounted; reads {} bytes {}",
                fs.counters.reads.load(std::sync::atomic::Ordering::Relaxed),
                fs.counters
                    .bytes_served
                    .load(std::sync::atomic::Ordering::Relaxed)
            );
            mount.unmount().expect("join session");
        }
        Some("stale") if args.len() == 2 => {
            let path = Path::new(&args[1]);
            let stale = fuse::is_stale_mount(path);
            println!("stale: {stale}");
            if stale {
                fuse::clear_stale_mount(path).expect("clear stale mount");
                println!("cleared; stale now: {}", fuse::is_stale_mount(path));
            }
        }
        _ => {
            eprintln!("usage: mount_repo backup <repo> <job> <path>... | mount <repo> <mountpoint> [seconds] | stale <mountpoint>");
            std::process::exit(2);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn main() {}
