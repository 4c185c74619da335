//! The peer test suites that `scripts/setup.sh` installs from crates.io
//! into `target/tools/bin`: where each one is, and that it is the pinned
//! version (the known-failure lists name the test cases of that version).

use std::path::PathBuf;
use std::process::Command;

use crate::command::run;
use crate::flr::target_dir;

/// A program installed with `cargo install --root target/tools`.
pub struct Tool {
    pub name: &'static str,
    /// Must match the version scripts/setup.sh pins.
    pub version: &'static str,
}

/// The file system exerciser: random reads, writes, truncations and
/// mmap accesses on one file, each read checked against a model.
pub const FSX: Tool = Tool {
    name: "fsx",
    version: "0.3.2",
};

/// The POSIX file system test suite: permissions, ownership, timestamps,
/// link counts and errno of every namespace call.
pub const PJDFSTEST: Tool = Tool {
    name: "pjdfstest",
    version: "0.2.2",
};

impl Tool {
    /// The installed binary: `target/tools/bin/NAME`, else `NAME` on
    /// PATH. Panics with the command that installs it when it is missing
    /// or reports another version.
    #[track_caller]
    pub fn path(&self) -> PathBuf {
        let install = format!(
            "run scripts/setup.sh, or `cargo install --locked --root {} {} --version {}`",
            target_dir().join("tools").display(),
            self.name,
            self.version
        );
        let local = target_dir().join("tools/bin").join(self.name);
        let found = if local.is_file() {
            Some(local)
        } else {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join(self.name))
                    .find(|p| p.is_file())
            })
        };
        let Some(path) = found else {
            panic!("{} is not installed: {install}", self.name);
        };
        let r = run(Command::new(&path).arg("--version"));
        let want = format!("{} {}", self.name, self.version);
        assert!(
            r.status.success() && r.stdout.trim() == want,
            "{} is not {want}: {r}\n{install}",
            path.display()
        );
        path
    }
}
