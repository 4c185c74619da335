//! A repository under test and typed wrappers around the commands that
//! use it.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::command::Run;
use crate::flr::Flr;

/// A repository directory (inside a test's scratch directory) and its
/// password, if encrypted.
pub struct TestRepo {
    pub path: PathBuf,
    pub password: Option<String>,
    /// Environment every command on it gets (an S3 repository's endpoint
    /// and credentials).
    pub env: Vec<(String, String)>,
}

/// A committed backup: its restore point and the `--json` statistics.
pub struct Backup {
    pub restore_point: String,
    pub stats: Value,
    pub run: Run,
}

impl Backup {
    fn from_run(run: Run) -> Backup {
        let v = run.json();
        let restore_point = v["restore_point"]
            .as_str()
            .unwrap_or_else(|| panic!("no restore_point in backup output: {run}"))
            .to_string();
        let stats = v["stats"].clone();
        assert!(stats.is_object(), "no stats in backup output: {run}");
        Backup {
            restore_point,
            stats,
            run,
        }
    }

    /// A numeric statistic, e.g. `added_bytes`.
    #[track_caller]
    pub fn stat(&self, key: &str) -> u64 {
        self.stats[key]
            .as_u64()
            .unwrap_or_else(|| panic!("stats.{key} missing or not a number in {}", self.stats))
    }

    pub fn added_bytes(&self) -> u64 {
        self.stat("added_bytes")
    }
}

impl TestRepo {
    /// `flr init PATH`, unencrypted.
    pub fn init(path: &Path) -> TestRepo {
        let repo = TestRepo {
            path: path.to_path_buf(),
            password: None,
            env: Vec::new(),
        };
        repo.flr(["init"]).arg(path).run().success();
        assert!(
            path.join("config").is_file(),
            "init wrote no config in {}",
            path.display()
        );
        repo
    }

    /// `flr init PATH --encrypt` with FLR_PASSWORD set.
    pub fn init_encrypted(path: &Path, password: &str) -> TestRepo {
        let repo = TestRepo {
            path: path.to_path_buf(),
            password: Some(password.to_string()),
            env: Vec::new(),
        };
        repo.flr(["init"])
            .arg(path)
            .arg("--encrypt")
            .run()
            .success();
        repo
    }

    /// `flr ARGS...` with this repository's password in the environment
    /// (the caller adds `--repo` where the subcommand takes it).
    pub fn flr<I, S>(&self, args: I) -> Flr
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut f = Flr::new(args).password(self.password.as_deref());
        for (k, v) in &self.env {
            f = f.env(k, v);
        }
        f
    }

    /// `flr SUBCOMMAND --repo PATH`.
    pub fn cmd(&self, subcommand: &str) -> Flr {
        self.flr([subcommand]).arg("--repo").arg(&self.path)
    }

    /// `flr backup --json` of `paths` as `job`, without asserting.
    pub fn backup_run(&self, job: &str, paths: &[&Path]) -> Run {
        self.cmd("backup")
            .args(["--job", job, "--json"])
            .args(paths)
            .run()
    }

    /// `flr backup --json` of `paths` as `job`; must exit 0.
    #[track_caller]
    pub fn backup(&self, job: &str, paths: &[&Path]) -> Backup {
        Backup::from_run(self.backup_run(job, paths).success())
    }

    /// Parses the output of a backup that exited with `code` (0 or 3).
    #[track_caller]
    pub fn parse_backup(run: Run) -> Backup {
        Backup::from_run(run)
    }

    /// `flr restore-points --json`, as a list of objects.
    #[track_caller]
    pub fn restore_points(&self) -> Vec<Value> {
        let run = self.cmd("restore-points").arg("--json").run().success();
        match run.json() {
            Value::Array(items) => items,
            other => panic!("restore-points --json is not an array: {other}"),
        }
    }

    /// Names (`job/timestamp`) of all restore points.
    #[track_caller]
    pub fn restore_point_names(&self) -> Vec<String> {
        self.restore_points()
            .iter()
            .map(|rp| rp["name"].as_str().expect("restore point name").to_string())
            .collect()
    }

    /// `flr restore RP --to DIR [PATHS...]`, without asserting.
    pub fn restore_run<S: AsRef<OsStr>>(&self, restore_point: &str, to: &Path, paths: &[S]) -> Run {
        self.cmd("restore")
            .arg(restore_point)
            .arg("--to")
            .arg(to)
            .arg("--quiet")
            .args(paths)
            .run()
    }

    /// `flr restore RP --to DIR [PATHS...]`; must exit 0.
    #[track_caller]
    pub fn restore<S: AsRef<OsStr>>(&self, restore_point: &str, to: &Path, paths: &[S]) -> Run {
        self.restore_run(restore_point, to, paths).success()
    }

    /// `flr verify [--read-data] --json`, without asserting.
    pub fn verify_run(&self, read_data: bool) -> Run {
        let mut f = self.cmd("verify").arg("--json");
        if read_data {
            f = f.arg("--read-data");
        }
        f.run()
    }

    /// Every file in the repository with its size, by relative path.
    pub fn listing(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        let mut stack = vec![self.path.clone()];
        while let Some(dir) = stack.pop() {
            let entries = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()));
            for e in entries {
                let e = e.expect("directory entry");
                let meta = std::fs::symlink_metadata(e.path()).expect("stat repository file");
                let rel = e
                    .path()
                    .strip_prefix(&self.path)
                    .expect("inside the repository")
                    .to_string_lossy()
                    .into_owned();
                if meta.is_dir() {
                    out.insert(format!("{rel}/"), 0);
                    stack.push(e.path());
                } else {
                    out.insert(rel, meta.len());
                }
            }
        }
        out
    }

    /// Paths of all files under `sub` (e.g. "packs", "index") whose names
    /// end with `suffix`, sorted.
    pub fn files_under(&self, sub: &str, suffix: &str) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = self
            .listing()
            .keys()
            .filter(|k| k.starts_with(&format!("{sub}/")) && k.ends_with(suffix))
            .map(|k| self.path.join(k))
            .collect();
        out.sort();
        out
    }

    /// The pack files (`packs/xx/<id>.pack`).
    pub fn packs(&self) -> Vec<PathBuf> {
        self.files_under("packs", ".pack")
    }

    /// The file of a restore point (`restore-points/<job>/<ts>.<tag>.rp`).
    pub fn manifest_path(&self, restore_point: &str) -> PathBuf {
        let (job, name) = restore_point
            .split_once('/')
            .unwrap_or_else(|| panic!("restore point {restore_point:?} is not JOB/NAME"));
        let dir = self.path.join("restore-points").join(job);
        let found: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| {
                let file = p.file_name().unwrap().to_string_lossy();
                file.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('.') && rest.ends_with(".rp"))
            })
            .collect();
        match found.as_slice() {
            [one] => one.clone(),
            other => panic!("restore point {restore_point}: files {other:?}"),
        }
    }
}

/// Flips every bit of the byte at `offset` of `path`.
pub fn flip_byte(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset)
        .expect("read the byte to flip");
    b[0] ^= 0xff;
    f.write_all_at(&b, offset).expect("write the flipped byte");
    f.sync_all().expect("sync");
}

/// Truncates `path` to `len` bytes.
pub fn truncate(path: &Path, len: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.set_len(len).expect("truncate");
}
