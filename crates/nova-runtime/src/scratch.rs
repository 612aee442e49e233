//! The sandbox's private writable disk, shared by every provider, and the
//! sparse disk-image copy every provider uses.
//!
//! A scratch disk is a sparse file formatted as ext4 without a journal (the
//! disk dies with the sandbox, so crash consistency buys nothing) and with
//! lazy inode-table initialisation, so formatting writes only a few megabytes
//! whatever the size. The guest agent mounts it and stacks an overlay on the
//! read-only template rootfs.
//!
//! Nothing is formatted on a sandbox's create path. A [`ScratchCache`] keeps
//! one empty, formatted *base* image per size (`$NOVA_HOME/cache/scratch/`),
//! made once with `mkfs.ext4` into a temporary file and renamed into place,
//! so concurrent creators (threads or processes) never see half an image.
//! Each sandbox's disk is then a [`clone_disk_image`] of the base, which
//! costs no process and, on a filesystem with reflinks, no data copy.
//!
//! [`clone_disk_image`] tries, in order: a reflink of the whole file
//! (`FICLONE`: XFS, btrfs, bcachefs); else it walks the source's data
//! extents (`SEEK_DATA` / `SEEK_HOLE`) and copies each with
//! `copy_file_range` (which the kernel may still share or offload), else
//! with plain reads and writes that skip zero blocks. Holes stay holes in
//! every case. The copy is written to a temporary name next to the target
//! and renamed over it, so the target is either absent, its old self, or the
//! whole copy. All of it runs on tokio's blocking pool.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use nova_core::error::CreateSandboxError;
use nova_core::home::NovaHome;
use rustix::fs::SeekFrom;
use rustix::io::Errno;

/// Bumped whenever the base images' `mkfs` options change, so an old base
/// is never cloned for a new sandbox.
const BASE_FORMAT: u32 = 1;
/// Chunk size of the read/write fallback and of each `copy_file_range` call.
const CHUNK: usize = 1 << 20;

/// How [`clone_disk_image`] copied a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloneMethod {
    /// The whole file was reflinked (`FICLONE`): no data copied.
    Reflink,
    /// Each data extent went through `copy_file_range`.
    CopyFileRange,
    /// Each data extent was read and written, zero blocks skipped.
    ReadWrite,
}

/// Makes `to` a sparse copy of the disk image `from`, as cheaply as the
/// filesystem allows (see the module docs), replacing `to` atomically if
/// it exists. The copy has `from`'s permission bits (under the umask).
/// Returns how it copied.
pub async fn clone_disk_image(from: &Path, to: &Path) -> io::Result<CloneMethod> {
    let (from, to) = (from.to_owned(), to.to_owned());
    blocking(move || clone_image_blocking(&from, &to, CloneMethod::Reflink)).await
}

/// The directory of pre-made empty scratch images, one per size.
#[derive(Clone, Debug)]
pub struct ScratchCache {
    dir: PathBuf,
}

impl ScratchCache {
    /// A cache in `dir` (created when first needed).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The cache of `home`: `$NOVA_HOME/cache/scratch/`.
    pub fn in_home(home: &NovaHome) -> Self {
        Self::new(home.cache_dir().join("scratch"))
    }

    /// The cache's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the base image of `size_mb` MiB lives.
    pub fn base_path(&self, size_mb: u64) -> PathBuf {
        self.dir.join(format!("ext4-{size_mb}M-v{BASE_FORMAT}.img"))
    }

    /// The base image of `size_mb` MiB, made now if it is not there yet.
    /// Concurrent calls in one process make it once; across processes each
    /// makes its own temporary file and the last rename wins, which is
    /// harmless (the images are equivalent). Call it when a provider starts
    /// to keep `mkfs` off the first sandbox's create path.
    pub async fn base(&self, size_mb: u64) -> Result<PathBuf, CreateSandboxError> {
        let path = self.base_path(size_mb);
        let lock = base_lock(&path);
        let _guard = lock.lock().await;
        let expected = size_mb * 1024 * 1024;
        if let Ok(meta) = tokio::fs::metadata(&path).await
            && meta.is_file()
            && meta.len() == expected
        {
            return Ok(path);
        }
        tracing::debug!(path = %path.display(), "making the empty scratch base image");
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(prepare(&self.dir))?;
        let tmp = temp_name(&path);
        let made = make_base(&tmp, expected).await;
        let renamed = match made {
            Ok(()) => tokio::fs::rename(&tmp, &path).await.map_err(prepare(&path)),
            Err(e) => Err(e),
        };
        if renamed.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        renamed.map(|()| path)
    }

    /// A fresh, empty scratch disk of `size_mb` MiB at `path`: a clone of
    /// the base image (made first if needed). Spawns no process once the
    /// base exists.
    pub async fn create_disk(&self, path: &Path, size_mb: u64) -> Result<(), CreateSandboxError> {
        let base = self.base(size_mb).await?;
        let method = clone_disk_image(&base, path).await.map_err(prepare(path))?;
        tracing::debug!(path = %path.display(), ?method, "scratch disk cloned");
        Ok(())
    }
}

/// One async mutex per base image path, so a burst of creates in one
/// process runs `mkfs` once.
fn base_lock(path: &Path) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: LazyLock<Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>> =
        LazyLock::new(Mutex::default);
    let mut locks = LOCKS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    locks.entry(path.to_owned()).or_default().clone()
}

fn prepare(path: &Path) -> impl FnOnce(io::Error) -> CreateSandboxError {
    let path = path.to_owned();
    move |source| CreateSandboxError::Prepare { path, source }
}

/// Formats a new sparse ext4 image of `len` bytes at `path` (which must not
/// exist) and syncs it, so a rename makes it durable and whole.
async fn make_base(path: &Path, len: u64) -> Result<(), CreateSandboxError> {
    let owned = path.to_owned();
    blocking(move || {
        let file = File::options().write(true).create_new(true).open(&owned)?;
        file.set_len(len)
    })
    .await
    .map_err(prepare(path))?;
    let output = tokio::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-O", "^has_journal", "-E"])
        .arg("lazy_itable_init=1,lazy_journal_init=1,nodiscard")
        .arg(path)
        .output()
        .await
        .map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                CreateSandboxError::Unsupported {
                    reason: "mkfs.ext4 not found; install it with `apt-get install e2fsprogs`"
                        .into(),
                }
            } else {
                prepare(path)(e)
            }
        })?;
    if !output.status.success() {
        return Err(prepare(path)(io::Error::other(format!(
            "mkfs.ext4 failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))));
    }
    let owned = path.to_owned();
    blocking(move || File::open(&owned)?.sync_all())
        .await
        .map_err(prepare(path))
}

/// Runs `f` on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("blocking task failed: {e}")))?
}

/// A name next to `path` that no other caller uses: `.NAME.PID.N.tmp`.
fn temp_name(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map_or_else(|| "image".into(), |n| n.to_string_lossy());
    path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

/// [`clone_disk_image`]'s body, starting with the cheapest method `first`
/// (tests use it to force the fallbacks).
fn clone_image_blocking(from: &Path, to: &Path, first: CloneMethod) -> io::Result<CloneMethod> {
    let src = File::open(from)?;
    let meta = src.metadata()?;
    let tmp = temp_name(to);
    let dst = File::options()
        .write(true)
        .create_new(true)
        .mode(meta.permissions().mode() & 0o777)
        .open(&tmp)?;
    let copied = copy_into(&src, &dst, meta.len(), first).and_then(|method| {
        drop(dst);
        std::fs::rename(&tmp, to)?;
        Ok(method)
    });
    if copied.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    copied
}

/// Whether an error means "this filesystem (pair) cannot do that", so the
/// next method should be tried.
fn unsupported(e: Errno) -> bool {
    [
        Errno::OPNOTSUPP,
        Errno::NOTSUP,
        Errno::XDEV,
        Errno::INVAL,
        Errno::NOTTY,
        Errno::NOSYS,
    ]
    .contains(&e)
}

#[cfg(target_os = "linux")]
fn reflink(dst: &File, src: &File) -> Result<(), Errno> {
    rustix::fs::ioctl_ficlone(dst, src)
}

/// No `FICLONE` off Linux: answered as unsupported, so the copy falls back.
#[cfg(not(target_os = "linux"))]
fn reflink(dst: &File, src: &File) -> Result<(), Errno> {
    let _ = (dst, src);
    Err(Errno::NOTSUP)
}

#[cfg(target_os = "linux")]
fn copy_file_range(
    src: &File,
    off_in: &mut u64,
    dst: &File,
    off_out: &mut u64,
    len: usize,
) -> Result<usize, Errno> {
    rustix::fs::copy_file_range(src, Some(off_in), dst, Some(off_out), len)
}

/// No `copy_file_range` off Linux: answered as unsupported, so the copy
/// falls back to reads and writes.
#[cfg(not(target_os = "linux"))]
fn copy_file_range(
    src: &File,
    off_in: &mut u64,
    dst: &File,
    off_out: &mut u64,
    len: usize,
) -> Result<usize, Errno> {
    let _ = (src, off_in, dst, off_out, len);
    Err(Errno::NOSYS)
}

/// Copies `len` bytes of `src` into the empty `dst`.
fn copy_into(src: &File, dst: &File, len: u64, first: CloneMethod) -> io::Result<CloneMethod> {
    if first == CloneMethod::Reflink {
        match reflink(dst, src) {
            Ok(()) => return Ok(CloneMethod::Reflink),
            Err(e) if unsupported(e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut method = if first == CloneMethod::ReadWrite {
        CloneMethod::ReadWrite
    } else {
        CloneMethod::CopyFileRange
    };
    for (start, end) in data_extents(src, len)? {
        method = copy_extent(src, dst, start, end, method)?;
    }
    // The trailing hole (and the size, if the source ends in one).
    dst.set_len(len)?;
    Ok(method)
}

/// The source's data extents as `[start, end)` ranges, from `SEEK_DATA` /
/// `SEEK_HOLE`. A filesystem without hole tracking reports one extent.
fn data_extents(src: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut extents = Vec::new();
    let mut offset = 0;
    while offset < len {
        let start = match rustix::fs::seek(src, SeekFrom::Data(offset)) {
            Ok(start) => start,
            // No data after `offset`.
            Err(Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = match rustix::fs::seek(src, SeekFrom::Hole(start)) {
            Ok(end) => end.min(len),
            Err(Errno::NXIO) => len,
            Err(e) => return Err(e.into()),
        };
        if end <= start {
            break;
        }
        extents.push((start, end));
        offset = end;
    }
    Ok(extents)
}

/// Copies `[start, end)` of `src` to the same offsets of `dst` with
/// `method`, dropping to reads and writes if `copy_file_range` cannot be
/// used here. Returns the method that worked.
fn copy_extent(
    src: &File,
    dst: &File,
    start: u64,
    end: u64,
    method: CloneMethod,
) -> io::Result<CloneMethod> {
    let mut offset = start;
    if method == CloneMethod::CopyFileRange {
        while offset < end {
            let (mut off_in, mut off_out) = (offset, offset);
            let want = usize::try_from(end - offset).map_or(CHUNK, |n| n.min(CHUNK));
            match copy_file_range(src, &mut off_in, dst, &mut off_out, want) {
                // The source shrank under us: stop, `set_len` restores the size.
                Ok(0) => return Ok(method),
                Ok(n) => offset += n as u64,
                Err(Errno::INTR) => {}
                Err(e) if unsupported(e) && offset == start => {
                    return copy_extent(src, dst, start, end, CloneMethod::ReadWrite);
                }
                Err(e) => return Err(e.into()),
            }
        }
        return Ok(method);
    }
    let mut buf = vec![0u8; CHUNK];
    while offset < end {
        let want = usize::try_from(end - offset).map_or(CHUNK, |n| n.min(CHUNK));
        let n = src.read_at(&mut buf[..want], offset)?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        // Zero blocks are left as holes, as `cp --sparse=always` does.
        if chunk.iter().any(|&b| b != 0) {
            dst.write_all_at(chunk, offset)?;
        }
        offset += n as u64;
    }
    Ok(CloneMethod::ReadWrite)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn allocated_bytes(path: &Path) -> io::Result<u64> {
        Ok(std::fs::metadata(path)?.blocks() * 512)
    }

    /// A 16 MiB file with data at 0, at 5 MiB (across a block boundary) and
    /// at 9 MiB, holes elsewhere, ending in a hole.
    fn holey_file(path: &Path) -> Vec<u8> {
        let file = File::create(path).unwrap();
        file.set_len(16 * MIB).unwrap();
        file.write_all_at(b"head of the image", 0).unwrap();
        file.write_all_at(&[0xAB; 10_000], 5 * MIB - 3000).unwrap();
        file.write_all_at(b"tail data", 9 * MIB).unwrap();
        std::fs::read(path).unwrap()
    }

    #[test]
    fn a_sparse_copy_keeps_holes_and_content() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("from.img");
        let content = holey_file(&from);
        let source_extents = data_extents(&File::open(&from).unwrap(), 16 * MIB).unwrap();
        for first in [
            CloneMethod::Reflink,
            CloneMethod::CopyFileRange,
            CloneMethod::ReadWrite,
        ] {
            let to = dir.path().join(format!("{first:?}.img"));
            let used = clone_image_blocking(&from, &to, first).unwrap();
            assert_eq!(std::fs::read(&to).unwrap(), content, "{first:?} → {used:?}");
            assert!(
                allocated_bytes(&to).unwrap() <= 1024 * 1024,
                "{first:?} → {used:?} allocated {} bytes of 16 MiB",
                allocated_bytes(&to).unwrap()
            );
            if used != CloneMethod::Reflink {
                // Holes land where the source has them.
                let copy_extents = data_extents(&File::open(&to).unwrap(), 16 * MIB).unwrap();
                assert_eq!(copy_extents, source_extents, "{first:?} → {used:?}");
            }
        }
        assert_eq!(source_extents.len(), 3, "{source_extents:?}");
    }

    #[tokio::test]
    async fn a_clone_replaces_its_target_whole_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("from.img");
        let content = holey_file(&from);
        let to = dir.path().join("to.img");
        std::fs::write(&to, b"an older, shorter image").unwrap();
        clone_disk_image(&from, &to).await.unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), content);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(
            clone_disk_image(&dir.path().join("missing.img"), &to)
                .await
                .is_err()
        );
        assert_eq!(
            std::fs::read(&to).unwrap(),
            content,
            "a failed clone keeps the old file"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_cached_base_is_made_once_even_under_concurrent_creates() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ScratchCache::new(dir.path().join("cache"));
        let disks: Vec<PathBuf> = (0..4)
            .map(|i| dir.path().join(format!("scratch-{i}.ext4")))
            .collect();
        let mut creates = tokio::task::JoinSet::new();
        for d in &disks {
            let (cache, d) = (cache.clone(), d.clone());
            creates.spawn(async move { cache.create_disk(&d, 64).await });
        }
        for r in creates.join_all().await {
            r.unwrap();
        }
        let base = cache.base_path(64);
        let first = std::fs::metadata(&base).unwrap();
        assert_eq!(
            std::fs::read_dir(cache.dir()).unwrap().count(),
            1,
            "one base, no temporary files"
        );
        cache
            .create_disk(&dir.path().join("later.ext4"), 64)
            .await
            .unwrap();
        let again = std::fs::metadata(&base).unwrap();
        assert_eq!(
            (first.ino(), first.mtime(), first.mtime_nsec()),
            (again.ino(), again.mtime(), again.mtime_nsec()),
            "the base was made again"
        );
        for d in &disks {
            assert_eq!(std::fs::metadata(d).unwrap().len(), 64 * MIB);
            assert_ne!(std::fs::metadata(d).unwrap().ino(), first.ino());
        }
        // A base of another size is another image.
        cache
            .create_disk(&dir.path().join("big.ext4"), 128)
            .await
            .unwrap();
        assert_eq!(std::fs::read_dir(cache.dir()).unwrap().count(), 2);
    }

    #[tokio::test]
    async fn a_clone_of_the_base_is_a_clean_sparse_ext4_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ScratchCache::new(dir.path().join("cache"));
        let path = dir.path().join("scratch.ext4");
        cache.create_disk(&path, 1024).await.unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 1024 * MIB);
        assert!(
            allocated_bytes(&path).unwrap() < 64 * MIB,
            "{} bytes allocated",
            allocated_bytes(&path).unwrap()
        );
        let mut image = [0u8; 2048];
        File::open(&path)
            .unwrap()
            .read_exact_at(&mut image, 0)
            .unwrap();
        // The ext4 superblock magic 0xEF53 at offset 1024 + 56.
        assert_eq!(&image[1024 + 56..1024 + 58], &[0x53, 0xEF]);
        let fsck = std::process::Command::new("e2fsck")
            .arg("-fn")
            .arg(&path)
            .output()
            .expect("e2fsck (e2fsprogs) must be installed, as mkfs.ext4 is");
        assert!(
            fsck.status.success(),
            "e2fsck -fn: {}\n{}",
            fsck.status,
            String::from_utf8_lossy(&fsck.stdout)
        );
    }
}
