//! Templates from images: `nova template build <id> --from <image>`.
//!
//! [`build_from_image`] fetches the image ([`crate::oci::fetch`]), applies
//! its layers into a staging tree ([`crate::oci::unpack`]), adds the agent
//! as `/sbin/nova-agent` and the few files every guest needs
//! ([`rootfs::finish_staging`], keeping the image's own `/etc/passwd` and
//! friends), packs it with `mkfs.ext4 -d`, and installs it with the image's
//! `Env`, `WorkingDir`, `User` and `Entrypoint`/`Cmd` as the manifest's
//! [`ExecDefaults`]. [`install_tree`] is the second half, shared with
//! Dockerfile builds.

use std::path::{Path, PathBuf};
use std::time::Instant;

use nova_core::template::{
    ExecDefaults, KERNEL_FILE, ROOTFS_FILE, TemplateManager, TemplateManifest,
};

use crate::cache::{self, CacheDir};
use crate::kernel;
use crate::oci::{self, FetchImageError, ImageSource, UnpackImageError};
use crate::rootfs::{self, BuildRootfsError, EtcPolicy};
use crate::template::{BuildOptions, BuildReport, BuildTemplateError, disk_size_gb};

/// Building a template from an image failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildFromImageError {
    /// The template id is not valid.
    #[error(
        "invalid template id {0:?}: use a-z, 0-9, '.', '_' or '-' (starting with a letter or digit)"
    )]
    InvalidId(String),
    /// The image could not be fetched.
    #[error("cannot fetch image {source_ref}")]
    Fetch {
        /// The image.
        source_ref: String,
        /// The cause.
        #[source]
        source: FetchImageError,
    },
    /// A layer could not be applied.
    #[error(transparent)]
    Unpack(#[from] UnpackImageError),
    /// The image's tree redirects a path the agent is installed under.
    #[error(
        "the image's /{path} leads outside the image ({target}); nova cannot install its agent \
         there: make /{path} a directory or a relative symlink in the image"
    )]
    Confinement {
        /// The path inside the tree.
        path: String,
        /// Where it leads on the host.
        target: String,
    },
    /// Packing or installing the template failed.
    #[error(transparent)]
    Install(#[from] BuildTemplateError),
}

impl From<BuildRootfsError> for BuildFromImageError {
    fn from(e: BuildRootfsError) -> Self {
        Self::Install(e.into())
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BuildTemplateError + '_ {
    move |source| BuildTemplateError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Options of an image build.
#[derive(Debug, Clone)]
pub struct ImageBuildOptions {
    /// Home, agent, kernel, boot measurement (`force` and `rebuild_all`
    /// apply to the kernel only: an image build always restages).
    pub build: BuildOptions,
    /// Registries to speak plain HTTP to, besides loopback ones.
    pub insecure_registries: Vec<String>,
    /// Memory of the template, MiB: its manifest's, and what `nova
    /// template build` takes its snapshot with.
    pub memory_mb: u32,
    /// vCPUs of the template: its manifest's, and its snapshot's.
    pub vcpus: u8,
}

impl ImageBuildOptions {
    /// Defaults: a sandbox's default size
    /// ([`nova_core::config::DEFAULT_MEMORY_MB`],
    /// [`nova_core::config::DEFAULT_VCPUS`]), so that default creates
    /// restore the template's snapshot; TLS for every non-loopback registry.
    pub fn new(build: BuildOptions) -> Self {
        Self {
            build,
            insecure_registries: Vec::new(),
            memory_mb: nova_core::config::DEFAULT_MEMORY_MB,
            vcpus: nova_core::config::DEFAULT_VCPUS,
        }
    }
}

/// Builds template `id` from `source` and installs it.
pub async fn build_from_image(
    id: &str,
    source: &ImageSource,
    opts: &ImageBuildOptions,
) -> Result<BuildReport, BuildFromImageError> {
    if !nova_core::config::is_valid_template_id(id) {
        return Err(BuildFromImageError::InvalidId(id.to_owned()));
    }
    let started = Instant::now();
    let cache_root = opts.build.home.cache_dir();
    let image = oci::fetch(source, &cache_root, &opts.insecure_registries)
        .await
        .map_err(|e| BuildFromImageError::Fetch {
            source_ref: source.to_string(),
            source: e,
        })?;
    let templates = opts.build.home.templates_dir();
    std::fs::create_dir_all(&templates).map_err(io_err(&templates))?;
    let dest = templates.join(id);
    cache::sweep_leftovers(&dest).map_err(io_err(&templates))?;
    let staging = cache::staging_dir_for(&dest).map_err(io_err(&templates))?;
    let tree = staging.path().join(".rootfs-tree");
    let unpacked = {
        let (image, tree) = (image.clone(), tree.clone());
        tokio::task::spawn_blocking(move || oci::unpack(&image, &tree))
            .await
            .map_err(|e| BuildTemplateError::Io {
                path: staging.path().to_owned(),
                source: std::io::Error::other(e),
            })?
    };
    unpacked?;
    let mut defaults = image.config.exec_defaults();
    if let Some(user) = &defaults.user {
        defaults.user = Some(oci::config::resolve_user(&tree, user));
    }
    let name = format!("image {source}");
    let report = install_tree(id, &name, staging, &tree, defaults, opts, started).await?;
    Ok(report)
}

/// Checks that the paths [`rootfs::finish_staging`] writes under stay
/// inside `tree` on the host (an image's `/etc` could be an absolute
/// symlink, which the host would follow).
pub fn check_confinement(tree: &Path) -> Result<(), BuildFromImageError> {
    let Ok(root) = tree.canonicalize() else {
        return Ok(());
    };
    for path in [
        "etc",
        "sbin",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "root",
        "mnt",
        "home",
        "var",
        "var/tmp",
        "usr",
        "usr/local",
        "usr/local/bin",
    ] {
        let host = tree.join(path);
        if std::fs::symlink_metadata(&host).is_err() {
            continue;
        }
        match host.canonicalize() {
            Ok(resolved) if resolved.starts_with(&root) => {}
            Ok(resolved) => {
                return Err(BuildFromImageError::Confinement {
                    path: path.to_owned(),
                    target: resolved.display().to_string(),
                });
            }
            // A dangling symlink: finish_staging would create through it.
            Err(_) => {
                return Err(BuildFromImageError::Confinement {
                    path: path.to_owned(),
                    target: std::fs::read_link(&host)
                        .map(|t| t.display().to_string())
                        .unwrap_or_else(|_| "an unreadable link".into()),
                });
            }
        }
    }
    Ok(())
}

/// Adds the agent to `tree`, packs it, and installs template `id` from the
/// staging directory `staging` (which `tree` is inside) with `defaults`.
pub async fn install_tree(
    id: &str,
    name: &str,
    staging: tempfile::TempDir,
    tree: &Path,
    defaults: ExecDefaults,
    opts: &ImageBuildOptions,
    started: Instant,
) -> Result<BuildReport, BuildFromImageError> {
    check_confinement(tree)?;
    rootfs::finish_staging(tree, &opts.build.agent, EtcPolicy::Image)?;
    let cache = CacheDir::new(opts.build.home.cache_dir());
    let _lock = cache
        .lock(&format!("template-{id}"))
        .map_err(io_err(cache.root()))?;
    let log = cache
        .log_file(&format!("template-{id}"))
        .map_err(io_err(cache.root()))?;
    let kernel = kernel::build_kernel(&cache, &opts.build.kernel_source, opts.build.rebuild_all)
        .await
        .map_err(BuildTemplateError::from)?;
    let image = staging.path().join(ROOTFS_FILE);
    let rootfs_bytes = rootfs::make_ext4(tree, &image, &format!("nova-{id}"), &log).await?;
    std::fs::remove_dir_all(tree).map_err(io_err(tree))?;
    let vmlinux = staging.path().join(KERNEL_FILE);
    if std::fs::hard_link(&kernel.vmlinux, &vmlinux).is_err() {
        std::fs::copy(&kernel.vmlinux, &vmlinux).map_err(io_err(&vmlinux))?;
    }
    let boot_time_ms = if opts.build.measure_boot {
        crate::template::measure_boot(&vmlinux, &image).await
    } else {
        0
    };
    let manifest = TemplateManifest {
        name: name.to_owned(),
        template_id: id.to_owned(),
        os_type: "linux".into(),
        memory_mb: opts.memory_mb,
        vcpus: opts.vcpus,
        boot_time_ms,
        disk_size_gb: disk_size_gb(rootfs_bytes),
        kernel_version: kernel.manifest.release.clone(),
        required_files: vec![KERNEL_FILE.into(), ROOTFS_FILE.into()],
        packages: Vec::new(),
        exec_defaults: defaults,
        arch: nova_core::GuestArch::X86_64,
    };
    TemplateManager::write_manifest(staging.path(), &manifest).map_err(io_err(staging.path()))?;
    let dest: PathBuf = opts.build.home.templates_dir().join(id);
    // An image build has no build key: a later `nova template build <id>`
    // (of a known recipe) never mistakes it for its own cache hit.
    cache::publish_dir(staging, &dest).map_err(io_err(&dest))?;
    let template = TemplateManager::new(opts.build.home.templates_dir())
        .load(id)
        .map_err(BuildTemplateError::from)?;
    tracing::info!(
        id,
        mib = rootfs_bytes >> 20,
        "template installed from an image"
    );
    Ok(BuildReport {
        template,
        cached: false,
        kernel_cached: kernel.cached,
        rootfs_bytes,
        elapsed: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_etc_symlink_leaving_the_tree_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&tree).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("etc")).unwrap();
        let err = check_confinement(&tree).unwrap_err();
        assert!(err.to_string().contains("/etc"), "{err}");
        std::fs::remove_file(tree.join("etc")).unwrap();
        std::fs::create_dir_all(tree.join("usr/sbin")).unwrap();
        std::os::unix::fs::symlink("usr/sbin", tree.join("sbin")).unwrap();
        check_confinement(&tree).unwrap();
    }
}
