//! The daemon's TOML configuration: repositories by name, and settings.
//!
//! ```toml
//! [settings]
//! mount_root = "/mnt/flr"
//! socket = "/run/flr/mountd.sock"
//! cache_size = "512M"
//! disk_cache = "/var/cache/flr/frames"   # one cache for every mount
//! disk_cache_size = "10G"
//! idle_timeout_secs = 3600
//! restore_targets = ["/srv/restore"]
//! export_staging = "/var/tmp/flr-staging"
//!
//! [repositories.app]
//! path = "/srv/backup/repo"
//! password_env = "FLR_PASSWORD_APP"
//!
//! [repositories.offsite]
//! path = "s3://backups/flr"
//! [repositories.offsite.s3]       # each one left out: AWS_* variables
//! endpoint = "https://s3.example.net"
//! region = "eu-central-1"
//! access_key_id = "..."
//! secret_access_key = "..."
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use backends::repo_spec::RepoSpec;
use backends::s3::S3Settings;
use serde::Deserialize;

pub const DEFAULT_SOCKET: &str = "/run/flr/mountd.sock";
#[cfg(not(windows))]
pub const DEFAULT_MOUNT_ROOT: &str = "/mnt/flr";
#[cfg(windows)]
pub const DEFAULT_MOUNT_ROOT: &str = r"C:\VeeamFLR";
/// Shortest bearer token accepted for the TCP listener: a guessable token
/// would turn the listener into an open door.
const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub settings: Settings,
    #[serde(default)]
    pub repositories: BTreeMap<String, RepositoryConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Sessions are mounted at `<mount_root>/<repository>/<job>/<timestamp>`.
    pub mount_root: PathBuf,
    pub socket: PathBuf,
    /// Bytes of decoded frames the daemon keeps in memory (`512M`): one
    /// cache, shared by all its mounts.
    pub cache_size: String,
    /// A directory where the daemon keeps the stored frames its mounts
    /// fetch from repositories (worth it for S3 ones), shared by all its
    /// mounts; none by default. Only this daemon may use it.
    pub disk_cache: Option<PathBuf>,
    /// The disk cache's bound in bytes (`10G`), a hard limit.
    pub disk_cache_size: String,
    /// FUSE worker threads per mount.
    pub fuse_threads: usize,
    /// A mount no file is open on and nothing has read for this long is
    /// unmounted and its sessions end; 0 keeps idle mounts.
    pub idle_timeout_secs: u64,
    /// Expiry of sessions that do not ask for one; 0 means none.
    pub session_expiry_secs: u64,
    /// Directories restore jobs may write into (at or below); none by
    /// default, so restore jobs are refused until some are configured.
    pub restore_targets: Vec<PathBuf>,
    /// Restore jobs running at once; more wait in the queue.
    pub restore_workers: usize,
    /// Optional TCP listener (e.g. `127.0.0.1:8474`); needs `tcp_token`.
    pub tcp_listen: Option<SocketAddr>,
    /// Bearer token every TCP request must carry.
    pub tcp_token: Option<String>,
    /// Let the kernel unmount a mount when the daemon dies (through
    /// fusermount3's watcher process). Off by default: the daemon clears
    /// mounts left by a crash at its next start instead, and root mounts
    /// directly without a helper process per mount.
    pub auto_unmount: bool,
    /// Where writable sessions keep their changes (default
    /// `/var/lib/flr/sessions` for root, or `FLR_STATE_DIR`).
    pub state_dir: Option<PathBuf>,
    /// Where `POST /devices` makes its pipes, one directory per job
    /// (default `/run/flr/devices` for root).
    pub devices_dir: Option<PathBuf>,
    /// Where export jobs stage unless they name a directory (default
    /// `/var/tmp/flr-staging`).
    pub export_staging: Option<PathBuf>,
    /// Clients that may connect to sessions published over NFS
    /// (`"export": {"nfs": ...}`): addresses or networks (`10.0.0.0/8`).
    /// Empty: loopback clients only, and exports must bind to loopback.
    pub nfs_allow: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            mount_root: DEFAULT_MOUNT_ROOT.into(),
            socket: DEFAULT_SOCKET.into(),
            cache_size: "512M".into(),
            disk_cache: None,
            disk_cache_size: "10G".into(),
            fuse_threads: 2,
            idle_timeout_secs: 0,
            session_expiry_secs: 0,
            restore_targets: Vec::new(),
            restore_workers: 2,
            tcp_listen: None,
            tcp_token: None,
            auto_unmount: false,
            state_dir: None,
            devices_dir: None,
            export_staging: None,
            nfs_allow: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    /// A directory, or `s3://BUCKET/PREFIX`.
    pub path: RepoSpec,
    /// How to reach an S3 repository; settings left out come from the
    /// `AWS_*` environment variables of the daemon.
    #[serde(default)]
    pub s3: S3Settings,
    /// Name of an environment variable holding the password.
    pub password_env: Option<String>,
    /// File whose contents (trailing newline removed) are the password.
    pub password_file: Option<PathBuf>,
}

impl RepositoryConfig {
    /// The password for an encrypted repository, from its configured
    /// source.
    pub fn password(&self) -> vfs_core::Result<Vec<u8>> {
        if let Some(var) = &self.password_env {
            return std::env::var(var).map(String::into_bytes).map_err(|_| {
                vfs_core::Error::InvalidInput(format!(
                    "repository {} is encrypted: environment variable {var} (password_env) is not set",
                    self.path
                ))
            });
        }
        if let Some(file) = &self.password_file {
            let text = std::fs::read_to_string(file).map_err(|e| vfs_core::Error::io(file, e))?;
            return Ok(text.trim_end_matches(['\n', '\r']).as_bytes().to_vec());
        }
        Err(vfs_core::Error::PasswordNeeded(
            self.path.to_string().into(),
        ))
    }

    /// Opens the repository's store, S3 settings completed from the
    /// environment.
    pub fn open_store(&self) -> vfs_core::Result<std::sync::Arc<dyn vfs_core::store::ObjectStore>> {
        self.path
            .open_store(&self.s3.clone().or(S3Settings::from_env()))
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("config {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Config> {
        let config: Config = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// The cache size in bytes.
    pub fn cache_bytes(&self) -> usize {
        vfs_core::chunker::parse_size(&self.settings.cache_size).unwrap_or(512 << 20) as usize
    }

    /// The disk cache's bound in bytes.
    pub fn disk_cache_bytes(&self) -> u64 {
        vfs_core::chunker::parse_size(&self.settings.disk_cache_size).unwrap_or(10 << 30)
    }

    /// `settings.nfs_allow`, parsed (validated at load).
    pub fn nfs_allow(&self) -> Vec<backends::nfs::ClientNet> {
        self.settings
            .nfs_allow
            .iter()
            .filter_map(|n| n.parse().ok())
            .collect()
    }

    fn validate(&self) -> Result<()> {
        let s = &self.settings;
        vfs_core::chunker::parse_size(&s.cache_size)
            .map_err(|e| anyhow::anyhow!("settings.cache_size: {e}"))?;
        vfs_core::chunker::parse_size(&s.disk_cache_size)
            .map_err(|e| anyhow::anyhow!("settings.disk_cache_size: {e}"))?;
        if s.disk_cache.as_ref().is_some_and(|d| !d.is_absolute()) {
            bail!("settings.disk_cache must be an absolute path");
        }
        if !s.mount_root.is_absolute() || !s.socket.is_absolute() {
            bail!("settings.mount_root and settings.socket must be absolute paths");
        }
        for t in &s.restore_targets {
            if !t.is_absolute() {
                bail!(
                    "settings.restore_targets: {} is not an absolute path",
                    t.display()
                );
            }
        }
        for n in &s.nfs_allow {
            n.parse::<backends::nfs::ClientNet>()
                .map_err(|e| anyhow::anyhow!("settings.nfs_allow: {e}"))?;
        }
        if s.export_staging.as_ref().is_some_and(|p| !p.is_absolute()) {
            bail!("settings.export_staging must be an absolute path");
        }
        if s.restore_workers == 0 || s.fuse_threads == 0 {
            bail!("settings.restore_workers and settings.fuse_threads must be at least 1");
        }
        match (&s.tcp_listen, &s.tcp_token) {
            (Some(_), None) => bail!("settings.tcp_listen needs settings.tcp_token"),
            (Some(_), Some(t)) if t.len() < MIN_TOKEN_LEN => {
                bail!("settings.tcp_token must be at least {MIN_TOKEN_LEN} characters")
            }
            _ => {}
        }
        for (name, repo) in &self.repositories {
            vfs_core::manifest::validate_job_name(name)
                .map_err(|_| anyhow::anyhow!("repository name {name:?}: use letters, digits, '-', '_' and '.', not starting with '.'"))?;
            if repo.password_env.is_some() && repo.password_file.is_some() {
                bail!("repository {name}: give password_env or password_file, not both");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_config_parses() {
        let c = Config::parse(
            r#"
            [settings]
            mount_root = "/mnt/x"
            socket = "/tmp/s.sock"
            cache_size = "64M"
            disk_cache = "/var/cache/flr/frames"
            disk_cache_size = "2G"
            idle_timeout_secs = 60
            restore_targets = ["/srv/restore"]
            tcp_listen = "127.0.0.1:8474"
            tcp_token = "0123456789abcdef"

            [repositories.app]
            path = "/srv/repo"
            password_env = "PW"
            "#,
        )
        .unwrap();
        assert_eq!(c.cache_bytes(), 64 << 20);
        assert_eq!(c.disk_cache_bytes(), 2 << 30);
        assert_eq!(
            c.settings.disk_cache.as_deref(),
            Some(Path::new("/var/cache/flr/frames"))
        );
        assert!(Config::parse("[settings]\ndisk_cache = \"rel\"").is_err());
        assert!(Config::parse("[settings]\ndisk_cache_size = \"lots\"").is_err());
        assert_eq!(c.settings.idle_timeout_secs, 60);
        assert_eq!(
            c.repositories["app"].path,
            RepoSpec::Local("/srv/repo".into())
        );
    }

    #[test]
    fn an_s3_repository_takes_its_settings_and_hides_the_secret() {
        let c = Config::parse(
            r#"
            [repositories.offsite]
            path = "s3://bucket/flr"
            [repositories.offsite.s3]
            endpoint = "http://127.0.0.1:9000"
            access_key_id = "AKID"
            secret_access_key = "very-secret-key"
            "#,
        )
        .unwrap();
        let r = &c.repositories["offsite"];
        assert_eq!(r.path.to_string(), "s3://bucket/flr");
        assert_eq!(r.s3.access_key_id.as_deref(), Some("AKID"));
        let shown = format!("{c:?}");
        assert!(!shown.contains("very-secret-key"), "{shown}");
    }

    #[test]
    fn mistakes_are_refused_with_a_reason() {
        for (text, why) in [
            ("[settings]\nmount_rot = \"/x\"", "unknown field"),
            ("[settings]\ntcp_listen = \"127.0.0.1:1\"", "tcp_token"),
            (
                "[settings]\ntcp_listen = \"127.0.0.1:1\"\ntcp_token = \"short\"",
                "at least",
            ),
            ("[settings]\nmount_root = \"rel\"", "absolute"),
            ("[settings]\nnfs_allow = [\"10.0.0.0/33\"]", "nfs_allow"),
            ("[repositories.\"../x\"]\npath = \"/r\"", "repository name"),
            (
                "[repositories.x]\npath = \"gs://b/p\"",
                "does not serve gs://",
            ),
            (
                "[repositories.x]\npath = \"gs://b/p\"",
                "does not serve gs://",
            ),
        ] {
            let e = format!("{:#}", Config::parse(text).unwrap_err());
            assert!(e.contains(why), "{text}: {e}");
        }
    }
}
