//! Applying image layers to a root tree, safely.
//!
//! A layer is a tar stream (plain, or gzip-compressed; zstd is refused with
//! a clear error) applied on top of the tree the earlier layers left, as the
//! OCI image spec's "changeset" rules say:
//!
//! * regular files, directories, symlinks and hard links are created with
//!   their mode; as root their owner (uid:gid) is kept too, so that
//!   `mkfs.ext4 -d` copies it into the image (run as a user, the image is
//!   root-owned: see [`crate::rootfs::make_ext4`]);
//! * `.wh.NAME` deletes `NAME` from the lower layers; `.wh..wh..opq` empties
//!   its directory of what the lower layers put there;
//! * device nodes and FIFOs are skipped (the guest's devtmpfs provides
//!   devices).
//!
//! Nothing a layer says can touch anything outside the root. Every entry
//! path is relative and free of `..`; each parent directory is resolved
//! component by component *inside* the root, following the image's own
//! symlinks as the guest would see them (an absolute target is relative to
//! the root) and refusing one that climbs above the root; the last
//! component is never followed (an existing symlink there is replaced, not
//! written through). A hard link must name an entry inside the root, and a
//! symlink whose relative target climbs above the root is refused. Any such
//! entry fails the whole layer with [`ApplyLayerError::Unsafe`], naming it.

use std::collections::{HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// The prefix of a whiteout entry's name.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// The name of an opaque-directory marker.
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// Most symlinks followed while resolving one path (as Linux's `MAXSYMLINKS`).
const MAX_SYMLINKS: u32 = 40;

/// Applying a layer failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyLayerError {
    /// An entry would write outside the root, or is otherwise malformed.
    #[error("layer entry {entry:?} is refused: {reason}; the layer is unsafe to apply")]
    Unsafe {
        /// The entry's path as the tar stream names it.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The layer is compressed with zstd, which this build does not read.
    #[error(
        "the layer is zstd-compressed, which nova cannot read yet; rebuild the image with gzip layers"
    )]
    Zstd,
    /// The tar stream is corrupt.
    #[error("the layer is not a readable tar stream (entry {entry:?})")]
    Tar {
        /// The last entry read, if any.
        entry: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing the tree failed.
    #[error("cannot write {path} while applying entry {entry:?}")]
    Io {
        /// The entry.
        entry: String,
        /// The host path involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// What [`apply_layer`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Entries created or replaced.
    pub written: u64,
    /// Whiteouts and opaque markers applied.
    pub whiteouts: u64,
    /// Device nodes, FIFOs and other entries skipped.
    pub skipped: u64,
}

/// How a layer is applied.
#[derive(Debug, Clone, Copy)]
pub struct ApplyOptions {
    /// Set each entry's owner to its uid:gid (needs root).
    pub keep_owners: bool,
}

impl Default for ApplyOptions {
    /// Owners are kept when running as root.
    fn default() -> Self {
        Self {
            keep_owners: rustix::process::geteuid().is_root(),
        }
    }
}

/// Applies the layer read from `reader` (plain tar or gzip; sniffed) on top
/// of the tree at `root`.
pub fn apply_layer(
    root: &Path,
    reader: impl Read,
    options: ApplyOptions,
) -> Result<LayerStats, ApplyLayerError> {
    let mut reader = BufReader::new(reader);
    let magic = reader.fill_buf().map_err(|source| ApplyLayerError::Tar {
        entry: String::new(),
        source,
    })?;
    if magic.starts_with(&[0x1f, 0x8b]) {
        apply_tar(root, flate2::read::GzDecoder::new(reader), options)
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Err(ApplyLayerError::Zstd)
    } else {
        apply_tar(root, reader, options)
    }
}

struct Applier<'a> {
    root: &'a Path,
    options: ApplyOptions,
    /// Paths (relative to the root) this layer wrote: an opaque marker
    /// keeps them.
    written: HashSet<PathBuf>,
    stats: LayerStats,
}

fn apply_tar(
    root: &Path,
    reader: impl Read,
    options: ApplyOptions,
) -> Result<LayerStats, ApplyLayerError> {
    let mut archive = tar::Archive::new(reader);
    let mut applier = Applier {
        root,
        options,
        written: HashSet::new(),
        stats: LayerStats::default(),
    };
    let mut last = String::new();
    let entries = archive.entries().map_err(|source| ApplyLayerError::Tar {
        entry: String::new(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| ApplyLayerError::Tar {
            entry: last.clone(),
            source,
        })?;
        last = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        applier.apply(entry)?;
    }
    Ok(applier.stats)
}

/// Checks an entry path: relative, no `..`; returns its normal components
/// (empty for the root itself).
fn entry_components(raw: &[u8], entry: &str) -> Result<Vec<OsString>, ApplyLayerError> {
    let path = Path::new(OsStr::from_bytes(raw));
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => parts.push(part.to_owned()),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(unsafe_entry(entry, "the path is absolute"));
            }
            Component::ParentDir => {
                return Err(unsafe_entry(entry, "the path contains `..`"));
            }
        }
    }
    Ok(parts)
}

fn unsafe_entry(entry: &str, reason: impl Into<String>) -> ApplyLayerError {
    ApplyLayerError::Unsafe {
        entry: entry.to_owned(),
        reason: reason.into(),
    }
}

impl Applier<'_> {
    fn apply<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), ApplyLayerError> {
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw).into_owned();
        let parts = entry_components(&raw, &name)?;
        let Some((last, parents)) = parts.split_last() else {
            // The root itself ("./"): only its mode and owner could change;
            // the root of a guest stays as staged.
            return Ok(());
        };
        let kind = entry.header().entry_type();
        let last_bytes = last.as_bytes();
        if last_bytes == OPAQUE_MARKER.as_bytes() {
            let dir = self.resolve_dir(parents, &name)?;
            self.clear_opaque(&dir, parents, &name)?;
            self.stats.whiteouts += 1;
            return Ok(());
        }
        if let Some(target) = last_bytes.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            if target.is_empty() || target == b"." || target == b".." {
                return Err(unsafe_entry(
                    &name,
                    "the whiteout names no entry, `.` or `..`",
                ));
            }
            let dir = self.resolve_dir(parents, &name)?;
            remove_any(&dir.join(OsStr::from_bytes(target)), &name)?;
            self.stats.whiteouts += 1;
            return Ok(());
        }
        let rel: PathBuf = parts.iter().collect();
        let dir = self.resolve_dir(parents, &name)?;
        let dest = dir.join(last);
        let mode = entry.header().mode().unwrap_or(0o644) & 0o7777;
        let owner = (
            entry.header().uid().unwrap_or(0),
            entry.header().gid().unwrap_or(0),
        );
        let io = |path: &Path| {
            let (entry, path) = (name.clone(), path.to_owned());
            move |source| ApplyLayerError::Io {
                entry,
                path,
                source,
            }
        };
        match kind {
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&dest) {
                    Ok(meta) if meta.is_dir() => {}
                    Ok(_) => {
                        remove_any(&dest, &name)?;
                        fs::create_dir(&dest).map_err(io(&dest))?;
                    }
                    Err(_) => fs::create_dir(&dest).map_err(io(&dest))?,
                }
                self.finish(&dest, mode, owner, &name)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                remove_any(&dest, &name)?;
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                    .mode(0o600)
                    .open(&dest)
                    .map_err(io(&dest))?;
                io::copy(&mut entry, &mut file).map_err(io(&dest))?;
                drop(file);
                self.finish(&dest, mode, owner, &name)?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| unsafe_entry(&name, "the symlink has no target"))?
                    .into_owned();
                check_symlink_target(parents.len(), &target, &name)?;
                remove_any(&dest, &name)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &dest).map_err(io(&dest))?;
                if self.options.keep_owners {
                    std::os::unix::fs::lchown(&dest, Some(owner.0 as u32), Some(owner.1 as u32))
                        .map_err(io(&dest))?;
                }
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| unsafe_entry(&name, "the hard link has no target"))?
                    .into_owned();
                let target_parts = entry_components(&target, &name).map_err(|_| {
                    unsafe_entry(
                        &name,
                        format!(
                            "the hard link's target {:?} is outside the root",
                            String::from_utf8_lossy(&target)
                        ),
                    )
                })?;
                let Some((target_last, target_parents)) = target_parts.split_last() else {
                    return Err(unsafe_entry(&name, "the hard link names the root"));
                };
                let source = self.resolve_dir(target_parents, &name)?.join(target_last);
                match fs::symlink_metadata(&source) {
                    Ok(meta) if !meta.is_dir() => {}
                    _ => {
                        return Err(unsafe_entry(
                            &name,
                            format!(
                                "the hard link's target {:?} is not a file in the image",
                                String::from_utf8_lossy(&target)
                            ),
                        ));
                    }
                }
                if source != dest {
                    remove_any(&dest, &name)?;
                    fs::hard_link(&source, &dest).map_err(io(&dest))?;
                }
            }
            _ => {
                // Character and block devices, FIFOs and anything newer.
                tracing::debug!(entry = %name, ?kind, "layer entry skipped");
                self.stats.skipped += 1;
                return Ok(());
            }
        }
        self.written.insert(rel);
        self.stats.written += 1;
        Ok(())
    }

    /// Sets owner (as root) then mode (a chown clears set-id bits).
    fn finish(
        &self,
        path: &Path,
        mode: u32,
        owner: (u64, u64),
        entry: &str,
    ) -> Result<(), ApplyLayerError> {
        let io = |source| ApplyLayerError::Io {
            entry: entry.to_owned(),
            path: path.to_owned(),
            source,
        };
        if self.options.keep_owners {
            std::os::unix::fs::lchown(path, Some(owner.0 as u32), Some(owner.1 as u32))
                .map_err(io)?;
        }
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io)
    }

    /// Resolves the directory `parents` inside the root as the guest would
    /// (following the image's symlinks, absolute ones relative to the root),
    /// creating missing directories; returns its host path, which is a real
    /// directory under the root.
    fn resolve_dir(&self, parents: &[OsString], entry: &str) -> Result<PathBuf, ApplyLayerError> {
        let mut resolved: Vec<OsString> = Vec::new();
        let mut pending: VecDeque<OsString> = parents.iter().cloned().collect();
        let mut followed = 0u32;
        while let Some(part) = pending.pop_front() {
            match part.as_bytes() {
                b"" | b"." => continue,
                b".." => {
                    if resolved.pop().is_none() {
                        return Err(unsafe_entry(
                            entry,
                            "a symlink on its path leads above the root",
                        ));
                    }
                    continue;
                }
                _ => {}
            }
            let host: PathBuf = std::iter::once(self.root.as_os_str().to_owned())
                .chain(resolved.iter().cloned())
                .chain(std::iter::once(part.clone()))
                .collect();
            match fs::symlink_metadata(&host) {
                Ok(meta) if meta.is_dir() => resolved.push(part),
                Ok(meta) if meta.file_type().is_symlink() => {
                    followed += 1;
                    if followed > MAX_SYMLINKS {
                        return Err(unsafe_entry(entry, "too many symlinks on its path"));
                    }
                    let target = fs::read_link(&host).map_err(|source| ApplyLayerError::Io {
                        entry: entry.to_owned(),
                        path: host.clone(),
                        source,
                    })?;
                    if target.is_absolute() {
                        resolved.clear();
                    }
                    let mut front: Vec<OsString> = Vec::new();
                    for component in target.components() {
                        match component {
                            Component::Normal(p) => front.push(p.to_owned()),
                            Component::ParentDir => front.push("..".into()),
                            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
                        }
                    }
                    for p in front.into_iter().rev() {
                        pending.push_front(p);
                    }
                }
                Ok(_) => {
                    return Err(unsafe_entry(
                        entry,
                        format!(
                            "{:?} on its path is not a directory",
                            resolved
                                .iter()
                                .chain(std::iter::once(&part))
                                .collect::<PathBuf>()
                        ),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&host).map_err(|source| ApplyLayerError::Io {
                        entry: entry.to_owned(),
                        path: host.clone(),
                        source,
                    })?;
                    fs::set_permissions(&host, fs::Permissions::from_mode(0o755)).map_err(
                        |source| ApplyLayerError::Io {
                            entry: entry.to_owned(),
                            path: host.clone(),
                            source,
                        },
                    )?;
                    resolved.push(part);
                }
                Err(source) => {
                    return Err(ApplyLayerError::Io {
                        entry: entry.to_owned(),
                        path: host,
                        source,
                    });
                }
            }
        }
        Ok(std::iter::once(self.root.as_os_str().to_owned())
            .chain(resolved)
            .collect())
    }

    /// Empties `dir` of what lower layers put there, keeping what this
    /// layer wrote (under `rel_dir`).
    fn clear_opaque(
        &self,
        dir: &Path,
        rel_dir: &[OsString],
        entry: &str,
    ) -> Result<(), ApplyLayerError> {
        let rel: PathBuf = rel_dir.iter().collect();
        let listing = fs::read_dir(dir).map_err(|source| ApplyLayerError::Io {
            entry: entry.to_owned(),
            path: dir.to_owned(),
            source,
        })?;
        for child in listing {
            let child = child.map_err(|source| ApplyLayerError::Io {
                entry: entry.to_owned(),
                path: dir.to_owned(),
                source,
            })?;
            let child_rel = rel.join(child.file_name());
            if self
                .written
                .iter()
                .any(|written| written.starts_with(&child_rel))
            {
                continue;
            }
            remove_any(&child.path(), entry)?;
        }
        Ok(())
    }
}

/// Refuses a symlink at depth `depth` (its parent's number of components)
/// whose relative target climbs above the root.
fn check_symlink_target(depth: usize, target: &[u8], entry: &str) -> Result<(), ApplyLayerError> {
    let path = Path::new(OsStr::from_bytes(target));
    if path.is_absolute() {
        // Resolved against the guest's root, wherever it points.
        return Ok(());
    }
    let mut level = depth as i64;
    for component in path.components() {
        match component {
            Component::ParentDir => {
                level -= 1;
                if level < 0 {
                    return Err(unsafe_entry(
                        entry,
                        format!(
                            "its symlink target {:?} leads above the root",
                            path.display()
                        ),
                    ));
                }
            }
            Component::Normal(_) => level += 1,
            _ => {}
        }
    }
    Ok(())
}

/// Removes whatever is at `path` (not following a symlink there); nothing
/// there is fine.
fn remove_any(path: &Path, entry: &str) -> Result<(), ApplyLayerError> {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(|source| ApplyLayerError::Io {
        entry: entry.to_owned(),
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar stream built entry by entry.
    struct Layer(tar::Builder<Vec<u8>>);

    impl Layer {
        fn new() -> Self {
            Self(tar::Builder::new(Vec::new()))
        }

        fn header(kind: tar::EntryType, path: &str, mode: u32) -> tar::Header {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(kind);
            // Written raw so that hostile paths survive (set_path refuses `..`).
            let bytes = path.as_bytes();
            header.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
            header.set_mode(mode);
            header.set_uid(0);
            header.set_gid(0);
            header.set_size(0);
            header
        }

        fn file(mut self, path: &str, content: &[u8]) -> Self {
            let mut header = Self::header(tar::EntryType::Regular, path, 0o644);
            header.set_size(content.len() as u64);
            header.set_cksum();
            self.0.append(&header, content).unwrap();
            self
        }

        fn dir(mut self, path: &str) -> Self {
            let mut header = Self::header(tar::EntryType::Directory, path, 0o755);
            header.set_cksum();
            self.0.append(&header, &[][..]).unwrap();
            self
        }

        fn link(mut self, kind: tar::EntryType, path: &str, target: &str) -> Self {
            let mut header = Self::header(kind, path, 0o777);
            let bytes = target.as_bytes();
            header.as_old_mut().linkname[..bytes.len()].copy_from_slice(bytes);
            header.set_cksum();
            self.0.append(&header, &[][..]).unwrap();
            self
        }

        fn bytes(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    fn apply(root: &Path, layer: Layer) -> Result<LayerStats, ApplyLayerError> {
        apply_layer(
            root,
            &layer.bytes()[..],
            ApplyOptions { keep_owners: false },
        )
    }

    /// A root inside a sandbox directory with a canary beside it.
    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let canary = dir.path().join("canary");
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&canary).unwrap();
        (dir, root, canary)
    }

    fn assert_refused(result: Result<LayerStats, ApplyLayerError>, entry: &str) {
        match result {
            Err(ApplyLayerError::Unsafe { entry: named, .. }) => assert_eq!(named, entry),
            other => panic!("expected {entry} to be refused, got {other:?}"),
        }
    }

    #[test]
    fn files_dirs_links_and_whiteouts_apply_in_order() {
        let (_dir, root, _) = setup();
        apply(
            &root,
            Layer::new()
                .dir("etc/")
                .file("etc/a", b"a")
                .file("./etc/gone", b"x")
                .dir("usr/lib/")
                .link(tar::EntryType::Symlink, "lib", "usr/lib")
                .file("bin/tool", b"tool")
                .link(tar::EntryType::Link, "bin/tool2", "bin/tool")
                .dir("opq/")
                .file("opq/old", b"old"),
        )
        .unwrap();
        let stats = apply(
            &root,
            Layer::new()
                .file("etc/.wh.gone", b"")
                .file("lib/libx.so", b"through the symlink")
                .file("opq/new", b"new")
                .file("opq/.wh..wh..opq", b""),
        )
        .unwrap();
        assert_eq!(stats.whiteouts, 2);
        assert_eq!(fs::read(root.join("etc/a")).unwrap(), b"a");
        assert!(!root.join("etc/gone").exists());
        assert_eq!(
            fs::read(root.join("usr/lib/libx.so")).unwrap(),
            b"through the symlink"
        );
        assert!(fs::symlink_metadata(root.join("lib")).unwrap().is_symlink());
        assert!(!root.join("opq/old").exists());
        assert_eq!(fs::read(root.join("opq/new")).unwrap(), b"new");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            fs::metadata(root.join("bin/tool")).unwrap().ino(),
            fs::metadata(root.join("bin/tool2")).unwrap().ino()
        );
    }

    #[test]
    fn a_symlink_at_the_last_component_is_replaced_not_written_through() {
        let (_dir, root, canary) = setup();
        let target = canary.join("victim");
        fs::write(&target, b"safe").unwrap();
        let link = format!("{}", target.display());
        apply(
            &root,
            Layer::new().link(tar::EntryType::Symlink, "x", &link),
        )
        .unwrap();
        apply(&root, Layer::new().file("x", b"pwned")).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"safe");
        assert_eq!(fs::read(root.join("x")).unwrap(), b"pwned");
    }

    #[test]
    fn an_absolute_symlink_on_the_path_resolves_inside_the_root() {
        let (_dir, root, canary) = setup();
        let link = format!("{}", canary.display());
        apply(
            &root,
            Layer::new()
                .link(tar::EntryType::Symlink, "d", &link)
                .file("d/f", b"in the root"),
        )
        .unwrap();
        assert_eq!(fs::read_dir(&canary).unwrap().count(), 0);
        let inside = root.join(canary.strip_prefix("/").unwrap()).join("f");
        assert_eq!(fs::read(inside).unwrap(), b"in the root");
    }

    #[test]
    fn hostile_entries_are_refused_and_nothing_escapes() {
        let cases: Vec<(Layer, &str)> = vec![
            (
                Layer::new().file("../canary/pwned", b"x"),
                "../canary/pwned",
            ),
            (
                Layer::new().file("a/../../canary/pwned", b"x"),
                "a/../../canary/pwned",
            ),
            (Layer::new().file("/canary/pwned", b"x"), "/canary/pwned"),
            (
                Layer::new().link(tar::EntryType::Symlink, "esc", "../canary"),
                "esc",
            ),
            (Layer::new().file(".wh...", b""), ".wh..."),
            (Layer::new().file("etc/.wh...", b""), "etc/.wh..."),
            (
                Layer::new().link(tar::EntryType::Link, "hl", "../canary/victim"),
                "hl",
            ),
        ];
        for (layer, entry) in cases {
            let (_dir, root, canary) = setup();
            fs::write(canary.join("victim"), b"safe").unwrap();
            assert_refused(apply(&root, layer), entry);
            assert_eq!(
                fs::read_dir(&canary).unwrap().count(),
                1,
                "{entry} wrote beside the root"
            );
            assert_eq!(fs::read(canary.join("victim")).unwrap(), b"safe");
        }
    }

    #[test]
    fn a_symlink_planted_on_disk_that_escapes_is_not_followed() {
        // As if an earlier (older, laxer) layer had left `esc -> ../canary`.
        let (_dir, root, canary) = setup();
        std::os::unix::fs::symlink("../canary", root.join("esc")).unwrap();
        std::os::unix::fs::symlink("sub/../../../canary", root.join("esc2")).unwrap();
        assert_refused(
            apply(&root, Layer::new().file("esc/pwned", b"x")),
            "esc/pwned",
        );
        assert_refused(
            apply(&root, Layer::new().file("esc2/pwned", b"x")),
            "esc2/pwned",
        );
        assert_refused(
            apply(&root, Layer::new().file("esc/.wh.victim", b"")),
            "esc/.wh.victim",
        );
        assert_eq!(fs::read_dir(&canary).unwrap().count(), 0);
    }

    #[test]
    fn symlink_loops_are_refused() {
        let (_dir, root, _) = setup();
        apply(
            &root,
            Layer::new().link(tar::EntryType::Symlink, "a", "b").link(
                tar::EntryType::Symlink,
                "b",
                "a",
            ),
        )
        .unwrap();
        assert_refused(apply(&root, Layer::new().file("a/x", b"x")), "a/x");
    }

    #[test]
    fn gzip_layers_are_read_and_zstd_is_named() {
        let (_dir, root, _) = setup();
        let tar = Layer::new().file("f", b"gz").bytes();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &tar).unwrap();
        let gz = gz.finish().unwrap();
        apply_layer(&root, &gz[..], ApplyOptions { keep_owners: false }).unwrap();
        assert_eq!(fs::read(root.join("f")).unwrap(), b"gz");
        let zstd = [0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0];
        assert!(matches!(
            apply_layer(&root, &zstd[..], ApplyOptions { keep_owners: false }),
            Err(ApplyLayerError::Zstd)
        ));
    }

    #[test]
    fn garbage_is_a_tar_error_not_a_panic() {
        let (_dir, root, _) = setup();
        let garbage = vec![0x42u8; 1024];
        assert!(matches!(
            apply_layer(&root, &garbage[..], ApplyOptions { keep_owners: false }),
            Err(ApplyLayerError::Tar { .. })
        ));
    }
}
