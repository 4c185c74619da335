//! Where a repository is, as a user names it: a local directory or
//! `s3://BUCKET/PREFIX`. Every command that takes a repository parses it
//! here and opens its store through [`RepoSpec::open_store`], so a URL
//! scheme flr does not serve is refused in one place, never taken for a
//! directory name.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vfs_core::local_store::LocalStore;
use vfs_core::store::ObjectStore;

use crate::s3::{S3Location, S3Settings, S3Store};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RepoSpec {
    Local(PathBuf),
    S3(S3Location),
}

impl RepoSpec {
    pub fn parse(text: &str) -> Result<RepoSpec, String> {
        if text.is_empty() {
            return Err("the repository is empty; give a directory or s3://BUCKET/PREFIX".into());
        }
        if let Some(rest) = text.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!(
                    "repository {text}: no bucket named (s3://BUCKET/PREFIX)"
                ));
            }
            if !(3..=63).contains(&bucket.len())
                || !bucket
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            {
                return Err(format!(
                    "repository {text}: {bucket:?} is not a bucket name (3 to 63 lower-case letters, digits, '-' and '.')"
                ));
            }
            let prefix = prefix.trim_matches('/');
            if prefix
                .split('/')
                .any(|part| part == "." || part == ".." || (part.is_empty() && !prefix.is_empty()))
            {
                return Err(format!(
                    "repository {text}: the prefix may not hold empty, '.' or '..' parts"
                ));
            }
            return Ok(RepoSpec::S3(S3Location {
                bucket: bucket.into(),
                prefix: prefix.into(),
            }));
        }
        if let Some(scheme) = url_scheme(text) {
            if scheme.eq_ignore_ascii_case("s3") {
                return Err(format!(
                    "repository {text}: an S3 repository is written s3://BUCKET/PREFIX"
                ));
            }
            return Err(format!(
                "repository {text}: flr does not serve {scheme}:// repositories; give a directory or s3://BUCKET/PREFIX"
            ));
        }
        Ok(RepoSpec::Local(PathBuf::from(text)))
    }

    /// The directory of a local repository.
    pub fn local_path(&self) -> Option<&Path> {
        match self {
            RepoSpec::Local(p) => Some(p),
            RepoSpec::S3(_) => None,
        }
    }

    /// The same repository named so that it means the same from any
    /// working directory (an absolute path for a local one).
    pub fn absolute(&self) -> RepoSpec {
        match self {
            RepoSpec::Local(p) => RepoSpec::Local(std::path::absolute(p).unwrap_or(p.clone())),
            s3 => s3.clone(),
        }
    }

    /// Opens the repository's object store; `s3` says how to reach an
    /// S3 one (ignored for a directory).
    pub fn open_store(&self, s3: &S3Settings) -> vfs_core::Result<Arc<dyn ObjectStore>> {
        Ok(match self {
            RepoSpec::Local(p) => Arc::new(LocalStore::open(p)?),
            RepoSpec::S3(loc) => Arc::new(S3Store::open(loc.clone(), s3)?),
        })
    }
}

impl std::str::FromStr for RepoSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        RepoSpec::parse(s)
    }
}

impl<'de> serde::Deserialize<'de> for RepoSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        RepoSpec::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for RepoSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RepoSpec::Local(p) => write!(f, "{}", p.display()),
            RepoSpec::S3(loc) => write!(f, "{loc}"),
        }
    }
}

/// The scheme of `text` if it reads as a URL (`scheme://...`, or `s3:`
/// without the slashes). A one-letter scheme is a Windows drive (`C:\`).
fn url_scheme(text: &str) -> Option<&str> {
    let (scheme, rest) = text.split_once(':')?;
    let looks = scheme.len() > 1
        && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    (looks && (rest.starts_with("//") || scheme.eq_ignore_ascii_case("s3"))).then_some(scheme)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!(
            RepoSpec::parse("s3://bucket/a/b/").unwrap(),
            RepoSpec::S3(S3Location {
                bucket: "bucket".into(),
                prefix: "a/b".into()
            })
        );
        assert_eq!(
            RepoSpec::parse("s3://bucket").unwrap().to_string(),
            "s3://bucket"
        );
        assert_eq!(
            RepoSpec::parse("/srv/repo").unwrap(),
            RepoSpec::Local("/srv/repo".into())
        );
        assert_eq!(
            RepoSpec::parse("C:\\repo").unwrap(),
            RepoSpec::Local("C:\\repo".into())
        );
        assert_eq!(
            RepoSpec::parse("backup:2026").unwrap(),
            RepoSpec::Local("backup:2026".into())
        );
    }

    #[test]
    fn unserved_schemes_and_bad_buckets_are_refused() {
        for (text, why) in [
            ("gs://bucket/p", "does not serve gs://"),
            ("foo://x", "does not serve foo://"),
            ("S3://bucket/p", "is written s3://BUCKET"),
            ("s3:bucket", "is written s3://BUCKET"),
            ("s3:///p", "no bucket"),
            ("s3://Bucket/p", "not a bucket name"),
            ("s3://bkt/a//c", "empty"),
            ("s3://b/p", "not a bucket name"),
            ("s3://bkt/../c", "'..'"),
            ("", "empty"),
        ] {
            let err = RepoSpec::parse(text).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
    }
}
