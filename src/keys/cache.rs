//! The cache directory (`keys.cache_dir`): the last good key set of each network issuer,
//! so that a restart while an issuer is down still starts ready.
//!
//! This module owns the file layout and the atomic write; it does not decide when to
//! read or write (the refresher does) and never fails the sidecar: a cache that cannot be
//! read or written costs a warning, not availability.
//!
//! One file per issuer, named from the issuer so that no issuer name can escape the
//! directory or collide with another: the issuer's host reduced to `[a-z0-9.-]`, then the
//! first 16 hex digits of the SHA-256 of its canonical name, e.g.
//! `customers.gitlab.com-6b1f0a3c9d2e4f57.jwks.json`. The content is the accepted keys as
//! a JWKS document ([`ParsedKeySet::accepted_jwks_bytes`]), so reading it back goes
//! through the same parser and rules as a fetch.

use std::fs::{self, File};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use aws_lc_rs::digest;

use super::fetch::read_key_file;
use super::jwks::{KeyLimits, ParsedKeySet};
use super::{KeySource, canonical_issuer};

/// Longest host part of a cache file name; the hash keeps names unique anyway.
const MAX_HOST_CHARS: usize = 64;

/// The cache directory of `keys.cache_dir`.
#[derive(Clone, Debug)]
pub(crate) struct KeyCache {
    dir: PathBuf,
}

impl KeyCache {
    pub(crate) fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cache file of one issuer (by its canonical name).
    pub(crate) fn path_for(&self, issuer: &str) -> PathBuf {
        self.dir.join(file_name(issuer))
    }

    /// The cached key set of `issuer` (source [`KeySource::Cache`]), or `None` when there
    /// is none. A file that cannot be read or is not a usable key set is logged and
    /// ignored: the network fetch that follows replaces it.
    pub(crate) fn load(&self, issuer: &str, limits: &KeyLimits) -> Option<ParsedKeySet> {
        let path = self.path_for(issuer);
        match read_key_file(&path, KeySource::Cache, limits) {
            Ok(parsed) => Some(parsed),
            Err(super::fetch::FetchError::ReadFile { source, .. })
                if source.kind() == io::ErrorKind::NotFound =>
            {
                None
            }
            Err(error) => {
                tracing::warn!(
                    %issuer,
                    %error,
                    "ignoring the cached key set; the issuer's keys will come from the network"
                );
                None
            }
        }
    }

    /// Writes `issuer`'s key set so that a reader sees either the old file or the whole
    /// new one, even across a crash: a temporary file in the same directory, fsync,
    /// rename over the old file, fsync of the directory (so the rename itself is durable).
    pub(crate) fn store(&self, issuer: &str, jwks: &[u8]) -> io::Result<PathBuf> {
        fs::create_dir_all(&self.dir)?;
        let path = self.path_for(issuer);
        let temp = self.temp_path(&path);
        let written = write_synced(&temp, jwks).and_then(|()| fs::rename(&temp, &path));
        if let Err(error) = written {
            fs::remove_file(&temp).ok();
            return Err(error);
        }
        sync_dir(&self.dir)?;
        Ok(path)
    }

    /// A name no other writer (another task or another process on the same directory)
    /// uses at the same time, and that `load` never reads.
    fn temp_path(&self, target: &Path) -> PathBuf {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        self.dir
            .join(format!(".{name}.{}.{n}.tmp", std::process::id()))
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    // Opening a directory read-only and fsyncing it is how POSIX makes a rename durable.
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// `{host}-{16 hex digits of SHA-256(canonical issuer)}.jwks.json`.
fn file_name(issuer: &str) -> String {
    let issuer = canonical_issuer(issuer);
    let hash = digest::digest(&digest::SHA256, issuer.as_bytes());
    let hex: String = hash.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let host = reqwest::Url::parse(issuer)
        .ok()
        .and_then(|url| url.host_str().map(str::to_owned))
        .unwrap_or_default();
    let host: String = host
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .filter(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
        .take(MAX_HOST_CHARS)
        .collect();
    // A leading dot would hide the file and look like one of our temporary files.
    let host = host.trim_start_matches('.');
    if host.is_empty() {
        format!("issuer-{hex}.jwks.json")
    } else {
        format!("{host}-{hex}.jwks.json")
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;
    use std::time::SystemTime;

    use super::*;
    use crate::dev::DevKey;
    use crate::keys::jwks::parse_key_set;

    fn key(n: usize) -> DevKey {
        let pem = [
            include_str!("../../tests/fixtures/keys/test-rsa-2048-1.pem"),
            include_str!("../../tests/fixtures/keys/test-rsa-2048-2.pem"),
        ][n - 1];
        DevKey::from_pkcs8_pem(pem, format!("test-key-{n}")).expect("fixture")
    }

    fn parsed(keys: &[&DevKey]) -> ParsedKeySet {
        let json = serde_json::to_vec(&DevKey::key_set_json(keys)).expect("json");
        parse_key_set(
            &json,
            KeySource::Network,
            SystemTime::now(),
            &KeyLimits::default(),
        )
        .expect("valid")
    }

    fn fingerprints(set: &ParsedKeySet) -> Vec<(Option<String>, u64)> {
        set.key_set
            .keys
            .iter()
            .map(|k| (k.kid.clone(), k.fingerprint))
            .collect()
    }

    #[test]
    fn file_names_are_safe_and_distinct() {
        let names = [
            file_name("https://customers.gitlab.com"),
            file_name("https://customers.gitlab.com/"),
            file_name("https://gitlab.com"),
            file_name("https://gitlab.com/other"),
            file_name("http://127.0.0.1:8080"),
        ];
        assert_eq!(names[0], names[1], "a trailing slash names the same issuer");
        assert!(
            names[0].starts_with("customers.gitlab.com-"),
            "{}",
            names[0]
        );
        assert!(names[0].ends_with(".jwks.json"));
        assert_ne!(names[2], names[3]);
        assert!(names[4].starts_with("127.0.0.1-"), "{}", names[4]);
        for hostile in ["../../etc/passwd", "https://../x", "", "https://a/..%2f.."] {
            let name = file_name(hostile);
            assert!(!name.contains('/') && !name.starts_with('.'), "{name}");
        }
    }

    #[test]
    fn store_is_atomic_and_reads_back_equal() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cache = KeyCache::new(dir.path().join("nested"));
        let issuer = "https://issuer.test";
        assert!(cache.load(issuer, &KeyLimits::default()).is_none());

        let first = parsed(&[&key(1)]);
        let path = cache
            .store(issuer, &first.accepted_jwks_bytes())
            .expect("stored");
        let inode = fs::metadata(&path).expect("written").ino();
        let second = parsed(&[&key(1), &key(2)]);
        cache
            .store(issuer, &second.accepted_jwks_bytes())
            .expect("stored");

        // Replaced by a rename (a new inode), never rewritten in place.
        assert_ne!(fs::metadata(&path).expect("written").ino(), inode);
        assert_eq!(
            fs::read(&path).expect("read"),
            second.accepted_jwks_bytes(),
            "the file holds exactly the accepted keys"
        );
        let entries: Vec<_> = fs::read_dir(cache.dir())
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(entries.len(), 1, "no temporary files left: {entries:?}");

        let loaded = cache.load(issuer, &KeyLimits::default()).expect("cached");
        assert_eq!(loaded.key_set.source, KeySource::Cache);
        assert_eq!(fingerprints(&loaded), fingerprints(&second));
        assert_eq!(loaded.accepted_jwks_bytes(), second.accepted_jwks_bytes());
    }

    #[test]
    fn a_corrupt_or_unreadable_file_is_ignored() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cache = KeyCache::new(dir.path());
        let limits = KeyLimits::default();
        for corrupt in [
            &b"{\"keys\": [{\"kty\": \"RSA\""[..],
            b"",
            b"{\"keys\": []}",
        ] {
            fs::write(cache.path_for("https://a.test"), corrupt).expect("write");
            assert!(cache.load("https://a.test", &limits).is_none());
        }
        // A directory where the file should be: unreadable, still not fatal.
        fs::create_dir(cache.path_for("https://b.test")).expect("mkdir");
        assert!(cache.load("https://b.test", &limits).is_none());
    }

    #[test]
    fn a_failed_store_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cache = KeyCache::new(dir.path());
        // The target is a non-empty directory, so the rename fails.
        let target = cache.path_for("https://a.test");
        fs::create_dir(&target).expect("mkdir");
        fs::write(target.join("x"), b"x").expect("write");
        assert!(cache.store("https://a.test", b"{}").is_err());
        let entries = fs::read_dir(dir.path()).expect("dir").count();
        assert_eq!(entries, 1);
    }
}
