//! Building the guest kernel: Debian's `linux-source-6.1` with the project's config.
//!
//! One kernel serves every template and both Linux VMMs. The build is:
//! unpack the source tarball into a staging directory in the cache,
//! `make allnoconfig` with the fragment ([`config::FRAGMENT`]) as
//! `KCONFIG_ALLCONFIG`, verify the final `.config` against the fragment,
//! `make vmlinux`, strip it, check it is an x86-64 ELF with a PVH entry note,
//! and publish `vmlinux` + `config` + `kernel.json` under
//! `cache/kernel/<key>/`. The key hashes the source package version, the
//! fragment and [`RECIPE_VERSION`], so the kernel is rebuilt only when one of
//! them changes. The unpacked tree (~1.5 GB after building) is deleted once the
//! kernel is published. All output of the build goes to
//! `cache/logs/kernel-<key>.log`; a failure shows its last lines.

pub mod config;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::process::Command;

use crate::cache::{self, CacheDir, CacheKey};
use crate::command::{self, RunCommandError};
use crate::elf::{self, EM_X86_64, ReadElfError};
use crate::host_tools::{self, EnsureToolsError, HostTool};

/// Bump when the build steps change what they produce; part of the cache key.
pub const RECIPE_VERSION: &str = "1";

/// Debian's kernel source package and its tarball.
pub const DEFAULT_SOURCE_PACKAGE: &str = "linux-source-6.1";
/// Where [`DEFAULT_SOURCE_PACKAGE`] puts the source tarball.
pub const DEFAULT_SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";

/// Host tools a kernel build needs.
pub const KERNEL_TOOLS: &[HostTool] = &[
    HostTool::file(DEFAULT_SOURCE_TARBALL, DEFAULT_SOURCE_PACKAGE),
    HostTool::program("make", "make"),
    HostTool::program("gcc", "gcc"),
    HostTool::program("ld", "binutils"),
    HostTool::program("strip", "binutils"),
    HostTool::program("bc", "bc"),
    HostTool::program("flex", "flex"),
    HostTool::program("bison", "bison"),
    HostTool::program("xz", "xz-utils"),
    HostTool::program("perl", "perl"),
    HostTool::file("/usr/include/libelf.h", "libelf-dev"),
    HostTool::file("/usr/include/openssl/opensslv.h", "libssl-dev"),
];

/// Where the kernel source comes from.
#[derive(Debug, Clone)]
pub struct KernelSource {
    /// The Debian package providing the tarball (its version is part of the key).
    pub package: String,
    /// The source tarball (`.tar.xz`, one top-level directory).
    pub tarball: PathBuf,
}

impl Default for KernelSource {
    fn default() -> Self {
        Self {
            package: DEFAULT_SOURCE_PACKAGE.to_owned(),
            tarball: DEFAULT_SOURCE_TARBALL.into(),
        }
    }
}

/// What `cache/kernel/<key>/kernel.json` records about a built kernel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelManifest {
    /// `make kernelrelease`, e.g. `6.1.0-nova` plus Debian's sublevel.
    pub release: String,
    /// The source package.
    pub source_package: String,
    /// Its Debian version.
    pub source_version: String,
    /// The full cache key.
    pub key: String,
    /// How long the build took, in seconds.
    pub build_seconds: u64,
    /// Size of the stripped `vmlinux`.
    pub vmlinux_bytes: u64,
    /// The PVH entry point found in the ELF notes.
    pub pvh_entry: u64,
}

/// A kernel ready to be packaged into a template.
#[derive(Debug, Clone)]
pub struct BuiltKernel {
    /// The stripped, uncompressed kernel.
    pub vmlinux: PathBuf,
    /// What the build recorded.
    pub manifest: KernelManifest,
    /// Whether it came from the cache.
    pub cached: bool,
}

/// Building the guest kernel failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildKernelError {
    /// Host tools are missing.
    #[error("the kernel build needs host tools")]
    Tools(#[from] EnsureToolsError),
    /// The source package version could not be read.
    #[error("cannot read the version of package {package}; is it installed?")]
    SourceVersion {
        /// The package.
        package: String,
        /// The cause.
        #[source]
        source: RunCommandError,
    },
    /// A step of the build failed.
    #[error("kernel build step `{step}` failed")]
    Step {
        /// The step.
        step: &'static str,
        /// The cause, with the log's last lines.
        #[source]
        source: RunCommandError,
    },
    /// Kconfig dropped options the fragment asks for (a dependency is missing).
    #[error(
        "kernel config does not match images/kernel/microvm-x86_64.config: \
         missing (not =y): [{missing}]; unwanted (on): [{unwanted}]; fix the fragment's dependencies",
        missing = .missing.join(", "),
        unwanted = .unwanted.join(", ")
    )]
    Config {
        /// Options asked `=y` that are not.
        missing: Vec<String>,
        /// Options asked off that are on.
        unwanted: Vec<String>,
    },
    /// The built `vmlinux` is not usable.
    #[error("built vmlinux at {path} is unusable: {reason}")]
    BadVmlinux {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The built `vmlinux` could not be parsed.
    #[error("cannot inspect the built vmlinux")]
    Elf(#[from] ReadElfError),
    /// Cache or staging I/O failed.
    #[error("kernel cache I/O failed at {path}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BuildKernelError + '_ {
    move |source| BuildKernelError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The Debian version of `package` (`dpkg-query`).
pub async fn source_version(package: &str) -> Result<String, BuildKernelError> {
    let out = command::capture(Command::new("dpkg-query").args(["-W", "-f=${Version}", package]))
        .await
        .map_err(|source| BuildKernelError::SourceVersion {
            package: package.to_owned(),
            source,
        })?;
    Ok(out.trim().to_owned())
}

/// The cache key of the kernel built from `source_version` of `package` with `fragment`.
pub fn cache_key(package: &str, source_version: &str, fragment: &str) -> CacheKey {
    let mut key = CacheKey::new("kernel");
    key.push("package", package.as_bytes())
        .push("version", source_version.as_bytes())
        .push("fragment", fragment.as_bytes())
        .push("recipe", RECIPE_VERSION.as_bytes());
    key
}

/// The cached kernel for `source`, if it has been built.
pub async fn cached_kernel(
    cache: &CacheDir,
    source: &KernelSource,
) -> Result<Option<BuiltKernel>, BuildKernelError> {
    let version = source_version(&source.package).await?;
    let key = cache_key(&source.package, &version, config::FRAGMENT);
    Ok(load_cached(&cache.root().join("kernel").join(key.short())))
}

fn load_cached(dir: &Path) -> Option<BuiltKernel> {
    let vmlinux = dir.join("vmlinux");
    let manifest = std::fs::read(dir.join("kernel.json")).ok()?;
    let manifest: KernelManifest = serde_json::from_slice(&manifest).ok()?;
    vmlinux.is_file().then_some(BuiltKernel {
        vmlinux,
        manifest,
        cached: true,
    })
}

/// Builds the guest kernel, or returns the cached one when source and config
/// are unchanged (unless `force`).
pub async fn build_kernel(
    cache: &CacheDir,
    source: &KernelSource,
    force: bool,
) -> Result<BuiltKernel, BuildKernelError> {
    let version = source_version(&source.package).await?;
    let key = cache_key(&source.package, &version, config::FRAGMENT);
    let kernels = cache.subdir("kernel").map_err(io_err(cache.root()))?;
    let dest = kernels.join(key.short());
    let _lock = cache.lock("kernel").map_err(io_err(cache.root()))?;
    if !force && let Some(kernel) = load_cached(&dest) {
        tracing::info!(release = %kernel.manifest.release, path = %kernel.vmlinux.display(), "kernel cache hit");
        return Ok(kernel);
    }
    let log = cache
        .log_file(&format!("kernel-{}", key.short()))
        .map_err(io_err(cache.root()))?;
    let _ = std::fs::remove_file(&log);
    host_tools::ensure(KERNEL_TOOLS, &log).await?;
    cache::sweep_leftovers(&dest).map_err(io_err(&kernels))?;

    let started = Instant::now();
    tracing::info!(version = %version, log = %log.display(), "building the guest kernel (a clean build takes ~10 minutes on 2 cores)");
    let staging = cache::staging_dir_for(&dest).map_err(io_err(&kernels))?;
    let src = staging.path().join("src");
    std::fs::create_dir(&src).map_err(io_err(&src))?;
    let step = |step| move |source| BuildKernelError::Step { step, source };

    command::run_logged(
        Command::new("tar")
            .arg("-xf")
            .arg(&source.tarball)
            .arg("-C")
            .arg(&src)
            .arg("--strip-components=1"),
        &log,
    )
    .await
    .map_err(step("unpack source"))?;

    let fragment_path = staging.path().join("microvm-x86_64.config");
    std::fs::write(&fragment_path, config::FRAGMENT).map_err(io_err(&fragment_path))?;
    command::run_logged(
        make(&src)
            .env("KCONFIG_ALLCONFIG", &fragment_path)
            .arg("allnoconfig"),
        &log,
    )
    .await
    .map_err(step("make allnoconfig"))?;
    let final_config_path = src.join(".config");
    let final_config =
        std::fs::read_to_string(&final_config_path).map_err(io_err(&final_config_path))?;
    let mismatch = config::verify(config::FRAGMENT, &final_config);
    if !mismatch.is_empty() {
        return Err(BuildKernelError::Config {
            missing: mismatch.missing,
            unwanted: mismatch.unwanted,
        });
    }

    let jobs = std::thread::available_parallelism().map_or(2, usize::from);
    command::run_logged(make(&src).arg(format!("-j{jobs}")).arg("vmlinux"), &log)
        .await
        .map_err(step("make vmlinux"))?;
    let release = command::capture(make(&src).arg("-s").arg("kernelrelease"))
        .await
        .map_err(step("make kernelrelease"))?
        .trim()
        .to_owned();

    let vmlinux = staging.path().join("vmlinux");
    command::run_logged(
        Command::new("strip")
            .arg("--strip-all")
            .arg(src.join("vmlinux"))
            .arg("-o")
            .arg(&vmlinux),
        &log,
    )
    .await
    .map_err(step("strip vmlinux"))?;
    let info = elf::read_elf(&vmlinux)?;
    if info.machine != EM_X86_64 {
        return Err(BuildKernelError::BadVmlinux {
            path: vmlinux,
            reason: format!("machine {} is not x86-64", info.machine),
        });
    }
    let Some(pvh_entry) = info.pvh_entry else {
        return Err(BuildKernelError::BadVmlinux {
            path: vmlinux,
            reason: "no Xen PHYS32_ENTRY (PVH) note".into(),
        });
    };
    let config_copy = staging.path().join("config");
    std::fs::write(&config_copy, &final_config).map_err(io_err(&config_copy))?;
    std::fs::remove_dir_all(&src).map_err(io_err(&src))?;

    let vmlinux_bytes = std::fs::metadata(&vmlinux).map_err(io_err(&vmlinux))?.len();
    let manifest = KernelManifest {
        release,
        source_package: source.package.clone(),
        source_version: version,
        key: key.hex(),
        build_seconds: started.elapsed().as_secs(),
        vmlinux_bytes,
        pvh_entry,
    };
    let manifest_path = staging.path().join("kernel.json");
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| BuildKernelError::Io {
        path: manifest_path.clone(),
        source: e.into(),
    })?;
    std::fs::write(&manifest_path, json).map_err(io_err(&manifest_path))?;
    cache::publish_dir(staging, &dest).map_err(io_err(&dest))?;
    tracing::info!(
        release = %manifest.release,
        seconds = manifest.build_seconds,
        mib = vmlinux_bytes / (1 << 20),
        "guest kernel built"
    );
    Ok(BuiltKernel {
        vmlinux: dest.join("vmlinux"),
        manifest,
        cached: false,
    })
}

/// `make -C <src> ARCH=x86_64` with a reproducible build user and host.
fn make(src: &Path) -> Command {
    let mut cmd = Command::new("make");
    cmd.arg("-C")
        .arg(src)
        .arg("ARCH=x86_64")
        .env("KBUILD_BUILD_USER", "nova")
        .env("KBUILD_BUILD_HOST", "novasandbox");
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_changes_with_version_and_fragment_only() {
        let a = cache_key("linux-source-6.1", "6.1.1-1", "CONFIG_A=y\n").hex();
        assert_eq!(
            a,
            cache_key("linux-source-6.1", "6.1.1-1", "CONFIG_A=y\n").hex()
        );
        assert_ne!(
            a,
            cache_key("linux-source-6.1", "6.1.2-1", "CONFIG_A=y\n").hex()
        );
        assert_ne!(
            a,
            cache_key("linux-source-6.1", "6.1.1-1", "CONFIG_A=n\n").hex()
        );
    }

    #[test]
    fn a_cache_dir_without_manifest_is_not_a_hit() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinux"), b"x").unwrap();
        assert!(load_cached(dir.path()).is_none());
        let manifest = KernelManifest {
            release: "6.1.0-nova".into(),
            source_package: "linux-source-6.1".into(),
            source_version: "6.1.1-1".into(),
            key: "k".into(),
            build_seconds: 1,
            vmlinux_bytes: 1,
            pvh_entry: 0x100_0000,
        };
        std::fs::write(
            dir.path().join("kernel.json"),
            serde_json::to_vec(&manifest).unwrap(),
        )
        .unwrap();
        let hit = load_cached(dir.path()).unwrap();
        assert!(hit.cached);
        assert_eq!(hit.manifest, manifest);
    }
}
