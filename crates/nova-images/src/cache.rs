//! Content-addressed build cache and atomic publication of build outputs.
//!
//! Every expensive output (kernel, debootstrap tree, finished template) is
//! keyed by a SHA-256 over everything that decides its content: source package
//! versions, the config text, the package list, a per-step recipe version
//! bumped whenever the build code changes what it produces. An output is built
//! in a temporary directory beside its final place and renamed into place only
//! when complete, so an interrupted build never leaves a half-written result
//! that a later run would take for a finished one; leftovers are dot-named and
//! swept by the next build.
//!
//! Layout under `$NOVA_HOME/cache`:
//! `kernel/<key>/`, `debootstrap/<key>/`, `templates/<id>.key`, `logs/`, `locks/`.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Builds a cache key from labelled parts. The label of each part is hashed
/// with it, so two parts can never run together into the same bytes.
#[derive(Debug, Clone, Default)]
pub struct CacheKey {
    hasher: Sha256,
}

impl CacheKey {
    /// An empty key for the output `kind` ("kernel", "rootfs", ...).
    pub fn new(kind: &str) -> Self {
        let mut key = Self::default();
        key.push("kind", kind.as_bytes());
        key
    }

    /// Adds one labelled part.
    pub fn push(&mut self, label: &str, value: &[u8]) -> &mut Self {
        for part in [label.as_bytes(), value] {
            self.hasher.update((part.len() as u64).to_le_bytes());
            self.hasher.update(part);
        }
        self
    }

    /// Adds the content of a file (streamed).
    pub fn push_file(&mut self, label: &str, path: &Path) -> io::Result<&mut Self> {
        let mut file = File::open(path)?;
        let mut inner = Sha256::new();
        io::copy(&mut file, &mut inner)?;
        let digest = inner.finalize();
        Ok(self.push(label, &digest))
    }

    /// The key as 64 hex digits.
    pub fn hex(&self) -> String {
        self.hasher
            .clone()
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The first 16 hex digits: enough to name a cache directory.
    pub fn short(&self) -> String {
        self.hex()[..16].to_owned()
    }
}

/// The `$NOVA_HOME/cache` directory and its sub-directories.
#[derive(Debug, Clone)]
pub struct CacheDir {
    root: PathBuf,
}

impl CacheDir {
    /// The cache rooted at `root` (usually `$NOVA_HOME/cache`).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The cache root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/<name>`, created if missing.
    pub fn subdir(&self, name: &str) -> io::Result<PathBuf> {
        let dir = self.root.join(name);
        fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// The log file for one build step, in `<root>/logs/`.
    pub fn log_file(&self, name: &str) -> io::Result<PathBuf> {
        Ok(self.subdir("logs")?.join(format!("{name}.log")))
    }

    /// Takes an exclusive lock named `name`, held until the guard is dropped,
    /// so two concurrent builds of the same output wait for each other.
    pub fn lock(&self, name: &str) -> io::Result<LockGuard> {
        let path = self.subdir("locks")?.join(format!("{name}.lock"));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)?;
        Ok(LockGuard { _file: file })
    }
}

/// An exclusive build lock; released on drop (closing the file drops the flock).
#[derive(Debug)]
pub struct LockGuard {
    _file: File,
}

/// A temporary directory beside `dest`, named `.tmp-<name>-XXXX`, removed on
/// drop unless published with [`publish_dir`].
pub fn staging_dir_for(dest: &Path) -> io::Result<tempfile::TempDir> {
    let parent = parent_of(dest)?;
    fs::create_dir_all(parent)?;
    let name = file_name(dest)?;
    tempfile::Builder::new()
        .prefix(&format!(".tmp-{name}-"))
        .tempdir_in(parent)
}

/// Removes leftovers (`.tmp-<name>-*`, `.old-<name>-*`) of interrupted builds of `dest`.
pub fn sweep_leftovers(dest: &Path) -> io::Result<()> {
    let parent = parent_of(dest)?;
    let name = file_name(dest)?;
    let Ok(entries) = fs::read_dir(parent) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let entry_name = entry.file_name();
        let entry_name = entry_name.to_string_lossy();
        if entry_name.starts_with(&format!(".tmp-{name}-"))
            || entry_name.starts_with(&format!(".old-{name}-"))
        {
            tracing::debug!(path = %entry.path().display(), "removing leftover of an interrupted build");
            remove_any(&entry.path())?;
        }
    }
    Ok(())
}

/// Moves the finished directory `staged` to `dest`, replacing what was there.
///
/// With an existing `dest` the two are swapped atomically (`renameat2`
/// `RENAME_EXCHANGE`) and the old one is removed afterwards, so readers see
/// either the old or the new directory, never neither; where the filesystem
/// cannot exchange, the old one is first renamed aside.
pub fn publish_dir(staged: tempfile::TempDir, dest: &Path) -> io::Result<()> {
    let staged = staged.keep();
    if !dest.exists() {
        return fs::rename(&staged, dest);
    }
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    match renameat_with(CWD, &staged, CWD, dest, RenameFlags::EXCHANGE) {
        Ok(()) => remove_any(&staged),
        Err(_) => {
            let aside =
                parent_of(dest)?.join(format!(".old-{}-{}", file_name(dest)?, std::process::id()));
            fs::rename(dest, &aside)?;
            fs::rename(&staged, dest)?;
            remove_any(&aside)
        }
    }
}

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err),
    }
}

fn parent_of(path: &Path) -> io::Result<&Path> {
    path.parent()
        .ok_or_else(|| io::Error::other(format!("{} has no parent", path.display())))
}

fn file_name(path: &Path) -> io::Result<String> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| io::Error::other(format!("{} has no file name", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_every_part_and_on_boundaries() {
        let mut a = CacheKey::new("kernel");
        a.push("version", b"6.1.1").push("config", b"X=y");
        let mut b = CacheKey::new("kernel");
        b.push("version", b"6.1.1").push("config", b"X=y");
        assert_eq!(a.hex(), b.hex());
        assert_eq!(a.hex().len(), 64);
        assert_eq!(a.short().len(), 16);

        let mut c = CacheKey::new("kernel");
        c.push("version", b"6.1.1").push("config", b"X=n");
        assert_ne!(a.hex(), c.hex());

        // Moving a byte across a part boundary changes the key.
        let mut d = CacheKey::new("kernel");
        d.push("version", b"6.1.1X").push("config", b"=y");
        assert_ne!(a.hex(), d.hex());
        assert_ne!(CacheKey::new("kernel").hex(), CacheKey::new("rootfs").hex());
    }

    #[test]
    fn file_parts_hash_content() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"one").unwrap();
        let k1 = CacheKey::new("t").push_file("f", &f).unwrap().hex();
        fs::write(&f, b"two").unwrap();
        let k2 = CacheKey::new("t").push_file("f", &f).unwrap().hex();
        assert_ne!(k1, k2);
    }

    #[test]
    fn publish_replaces_atomically_and_sweeps_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("python");

        let first = staging_dir_for(&dest).unwrap();
        fs::write(first.path().join("v"), "1").unwrap();
        publish_dir(first, &dest).unwrap();
        assert_eq!(fs::read_to_string(dest.join("v")).unwrap(), "1");

        let second = staging_dir_for(&dest).unwrap();
        fs::write(second.path().join("v"), "2").unwrap();
        publish_dir(second, &dest).unwrap();
        assert_eq!(fs::read_to_string(dest.join("v")).unwrap(), "2");

        // An interrupted build leaves a dot-named staging dir; the next sweep removes it.
        let interrupted = staging_dir_for(&dest).unwrap().keep();
        let unrelated = dir.path().join(".tmp-minimal-x");
        fs::create_dir(&unrelated).unwrap();
        sweep_leftovers(&dest).unwrap();
        assert!(!interrupted.exists());
        assert!(
            unrelated.exists(),
            "only leftovers of this output are swept"
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn an_unpublished_staging_dir_is_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let staged = staging_dir_for(&dir.path().join("x")).unwrap();
        let path = staged.path().to_owned();
        drop(staged);
        assert!(!path.exists());
    }

    #[test]
    fn locks_are_reentrant_across_guards_in_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::new(dir.path());
        drop(cache.lock("python").unwrap());
        let _again = cache.lock("python").unwrap();
        assert!(dir.path().join("locks/python.lock").exists());
    }
}
