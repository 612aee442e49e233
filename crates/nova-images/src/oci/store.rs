//! The content-addressed blob cache, `$NOVA_HOME/cache/oci/blobs/sha256/<hex>`.
//!
//! A blob enters it only through [`BlobStore::import`], which writes to a
//! temporary file, hashes while writing, and publishes by rename only when
//! the digest matches; so whatever is in the store is what its name says,
//! and a second import of the same digest is a no-op.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

/// A digest nova can check: `sha256:<64 lowercase hex>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Sha256Digest(String);

/// A digest that is not `sha256:<64 hex>`.
#[derive(Debug, thiserror::Error)]
#[error("unsupported or malformed digest {0:?}: nova checks sha256:<64 hex> digests")]
pub struct BadDigestError(pub String);

impl Sha256Digest {
    /// Parses `sha256:<hex>`.
    pub fn parse(text: &str) -> Result<Self, BadDigestError> {
        let hex = text
            .strip_prefix("sha256:")
            .ok_or_else(|| BadDigestError(text.to_owned()))?;
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return Err(BadDigestError(text.to_owned()));
        }
        Ok(Self(text.to_owned()))
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(format!("sha256:{}", hex(&Sha256::digest(bytes))))
    }
}

impl std::fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A blob failed to enter the store.
#[derive(Debug, thiserror::Error)]
pub enum ImportBlobError {
    /// Its content does not hash to its name.
    #[error(
        "blob {expected} does not match its digest (got {actual}); the source is corrupt or was tampered with"
    )]
    Mismatch {
        /// The digest it was named by.
        expected: Sha256Digest,
        /// The digest of what was read.
        actual: Sha256Digest,
    },
    /// Reading or writing failed.
    #[error("cannot store blob {digest} under {path}")]
    Io {
        /// The blob.
        digest: Sha256Digest,
        /// The path involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// The blob cache.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
}

impl BlobStore {
    /// The store under `cache_root` (`$NOVA_HOME/cache`): `oci/blobs/sha256/`.
    pub fn new(cache_root: &Path) -> Self {
        Self {
            dir: cache_root.join("oci").join("blobs").join("sha256"),
        }
    }

    /// Where blob `digest` is (or would be).
    pub fn path(&self, digest: &Sha256Digest) -> PathBuf {
        self.dir.join(digest.hex())
    }

    /// Whether the blob is stored.
    pub fn contains(&self, digest: &Sha256Digest) -> bool {
        self.path(digest).is_file()
    }

    /// Copies `reader` into the store as `digest`, checking it; returns
    /// its path. A stored blob is kept and `reader` not read.
    pub fn import(
        &self,
        digest: &Sha256Digest,
        mut reader: impl Read,
    ) -> Result<PathBuf, ImportBlobError> {
        let dest = self.path(digest);
        if dest.is_file() {
            return Ok(dest);
        }
        let io_err = |path: &Path| {
            let (digest, path) = (digest.clone(), path.to_owned());
            move |source| ImportBlobError::Io {
                digest,
                path,
                source,
            }
        };
        fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir).map_err(io_err(&self.dir))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = reader.read(&mut buf).map_err(io_err(tmp.path()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            tmp.write_all(&buf[..n]).map_err(io_err(tmp.path()))?;
        }
        let actual = Sha256Digest(format!("sha256:{}", hex(&hasher.finalize())));
        if &actual != digest {
            return Err(ImportBlobError::Mismatch {
                expected: digest.clone(),
                actual,
            });
        }
        tmp.persist(&dest)
            .map_err(|e| e.error)
            .map_err(io_err(&dest))?;
        Ok(dest)
    }

    /// Imports a file already on disk (e.g. a blob a registry client
    /// downloaded): checked, then moved or copied into place.
    pub fn import_file(
        &self,
        digest: &Sha256Digest,
        path: &Path,
    ) -> Result<PathBuf, ImportBlobError> {
        let file = fs::File::open(path).map_err(|source| ImportBlobError::Io {
            digest: digest.clone(),
            path: path.to_owned(),
            source,
        })?;
        self.import(digest, file)
    }
}

/// The sha256 of what `reader` yields, as a digest.
pub fn digest_of(mut reader: impl Read) -> io::Result<Sha256Digest> {
    let mut hasher = Sha256::new();
    io::copy(&mut reader, &mut HashWriter(&mut hasher))?;
    Ok(Sha256Digest(format!("sha256:{}", hex(&hasher.finalize()))))
}

struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_enter_only_under_their_own_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path());
        let digest = Sha256Digest::of(b"hello");
        let path = store.import(&digest, &b"hello"[..]).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"hello");
        assert!(path.starts_with(dir.path().join("oci/blobs/sha256")));
        let wrong = Sha256Digest::of(b"other");
        let err = store.import(&wrong, &b"hello"[..]).unwrap_err();
        assert!(matches!(err, ImportBlobError::Mismatch { .. }), "{err}");
        assert!(!store.contains(&wrong));
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn digests_are_checked_for_shape() {
        assert!(Sha256Digest::parse("sha512:00").is_err());
        assert!(Sha256Digest::parse("sha256:../../etc/passwd").is_err());
        assert!(Sha256Digest::parse(&format!("sha256:{}", "A".repeat(64))).is_err());
        let ok = format!("sha256:{}", "a".repeat(64));
        assert_eq!(Sha256Digest::parse(&ok).unwrap().hex(), "a".repeat(64));
    }
}
