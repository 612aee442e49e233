//! Building the guest kernels: Debian's `linux-source-6.1` with the project's configs.
//!
//! One kernel per guest architecture serves every template of it: the
//! x86_64 one both Linux VMMs, the arm64 one QEMU `virt` and Apple
//! Virtualization.framework. The x86_64 build is:
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
//!
//! The arm64 build ([`build_kernel_for`] with [`GuestArch::Arm64`]) is the
//! same with `ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu-` (Debian's
//! `gcc-aarch64-linux-gnu`), the fragment `images/kernel/microvm-arm64.config`,
//! and `make Image`: the uncompressed arm64 `Image` (checked for its header's
//! magic) is published as `Image` beside `config` and `kernel.json`. Its key
//! also holds the architecture.

pub mod config;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::process::Command;

use self::config::ArchConfig;
use crate::cache::{self, CacheDir, CacheKey};
use crate::command::{self, RunCommandError};
use nova_core::template::GuestArch;

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

/// Host tools the arm64 cross build needs besides [`KERNEL_TOOLS`].
pub const ARM64_KERNEL_TOOLS: &[HostTool] = &[HostTool::program(
    "aarch64-linux-gnu-gcc",
    "gcc-aarch64-linux-gnu",
)];

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
    /// The PVH entry point found in the ELF notes (x86_64); 0 for arm64,
    /// whose `Image` has none.
    pub pvh_entry: u64,
    /// The guest architecture (absent in manifests written before arm64:
    /// x86_64).
    #[serde(default)]
    pub arch: GuestArch,
}

/// A kernel ready to be packaged into a template.
#[derive(Debug, Clone)]
pub struct BuiltKernel {
    /// The uncompressed kernel: the stripped `vmlinux` (x86_64) or the
    /// `Image` (arm64).
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
        "kernel config does not match {fragment}: \
         missing (not =y): [{missing}]; unwanted (on): [{unwanted}]; fix the fragment's dependencies",
        missing = .missing.join(", "),
        unwanted = .unwanted.join(", ")
    )]
    Config {
        /// The fragment's path in the repository.
        fragment: &'static str,
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

/// The cache key of the x86_64 kernel built from `source_version` of
/// `package` with `fragment`.
pub fn cache_key(package: &str, source_version: &str, fragment: &str) -> CacheKey {
    let mut key = CacheKey::new("kernel");
    key.push("package", package.as_bytes())
        .push("version", source_version.as_bytes())
        .push("fragment", fragment.as_bytes())
        .push("recipe", RECIPE_VERSION.as_bytes());
    key
}

/// The cache key of `arch`'s kernel: [`cache_key`] plus the architecture
/// (for x86_64 exactly [`cache_key`], so kernels cached before arm64 stay
/// valid).
pub fn cache_key_for(arch: GuestArch, package: &str, source_version: &str) -> CacheKey {
    let config = config::for_arch(arch);
    let mut key = cache_key(package, source_version, config.fragment);
    if arch != GuestArch::X86_64 {
        key.push("arch", arch.as_str().as_bytes());
    }
    key
}

/// The file name of `arch`'s published kernel in its cache directory.
pub fn kernel_file_name(arch: GuestArch) -> &'static str {
    match arch {
        GuestArch::X86_64 => "vmlinux",
        GuestArch::Arm64 => "Image",
    }
}

/// The cached x86_64 kernel for `source`, if it has been built.
pub async fn cached_kernel(
    cache: &CacheDir,
    source: &KernelSource,
) -> Result<Option<BuiltKernel>, BuildKernelError> {
    cached_kernel_for(cache, source, GuestArch::X86_64).await
}

/// The cached kernel of `arch` for `source`, if it has been built.
pub async fn cached_kernel_for(
    cache: &CacheDir,
    source: &KernelSource,
    arch: GuestArch,
) -> Result<Option<BuiltKernel>, BuildKernelError> {
    let version = source_version(&source.package).await?;
    let key = cache_key_for(arch, &source.package, &version);
    Ok(load_cached(
        &cache.root().join("kernel").join(key.short()),
        arch,
    ))
}

fn load_cached(dir: &Path, arch: GuestArch) -> Option<BuiltKernel> {
    let vmlinux = dir.join(kernel_file_name(arch));
    let manifest = std::fs::read(dir.join("kernel.json")).ok()?;
    let manifest: KernelManifest = serde_json::from_slice(&manifest).ok()?;
    vmlinux.is_file().then_some(BuiltKernel {
        vmlinux,
        manifest,
        cached: true,
    })
}

/// Builds the x86_64 guest kernel, or returns the cached one when source
/// and config are unchanged (unless `force`).
pub async fn build_kernel(
    cache: &CacheDir,
    source: &KernelSource,
    force: bool,
) -> Result<BuiltKernel, BuildKernelError> {
    build_kernel_for(cache, source, GuestArch::X86_64, force).await
}

/// Builds `arch`'s guest kernel, or returns the cached one when source and
/// config are unchanged (unless `force`).
pub async fn build_kernel_for(
    cache: &CacheDir,
    source: &KernelSource,
    arch: GuestArch,
    force: bool,
) -> Result<BuiltKernel, BuildKernelError> {
    let arch_config = config::for_arch(arch);
    let version = source_version(&source.package).await?;
    let key = cache_key_for(arch, &source.package, &version);
    let kernels = cache.subdir("kernel").map_err(io_err(cache.root()))?;
    let dest = kernels.join(key.short());
    let lock_name = match arch {
        GuestArch::X86_64 => "kernel".to_owned(),
        other => format!("kernel-{other}"),
    };
    let _lock = cache.lock(&lock_name).map_err(io_err(cache.root()))?;
    if !force && let Some(kernel) = load_cached(&dest, arch) {
        tracing::info!(release = %kernel.manifest.release, path = %kernel.vmlinux.display(), "kernel cache hit");
        return Ok(kernel);
    }
    let log = cache
        .log_file(&format!("kernel-{}", key.short()))
        .map_err(io_err(cache.root()))?;
    let _ = std::fs::remove_file(&log);
    host_tools::ensure(KERNEL_TOOLS, &log).await?;
    if arch_config.cross_compile.is_some() {
        host_tools::ensure(ARM64_KERNEL_TOOLS, &log).await?;
    }
    cache::sweep_leftovers(&dest).map_err(io_err(&kernels))?;

    let started = Instant::now();
    tracing::info!(version = %version, %arch, log = %log.display(), "building the guest kernel (a clean build takes ~10 minutes on 2 cores)");
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

    let fragment_path = staging.path().join(format!("microvm-{arch}.config"));
    std::fs::write(&fragment_path, arch_config.fragment).map_err(io_err(&fragment_path))?;
    command::run_logged(
        make(&src, arch_config)
            .env("KCONFIG_ALLCONFIG", &fragment_path)
            .arg("allnoconfig"),
        &log,
    )
    .await
    .map_err(step("make allnoconfig"))?;
    let final_config_path = src.join(".config");
    let final_config =
        std::fs::read_to_string(&final_config_path).map_err(io_err(&final_config_path))?;
    let mismatch = config::verify_arch(arch_config, &final_config);
    if !mismatch.is_empty() {
        return Err(BuildKernelError::Config {
            fragment: arch_config.fragment_path,
            missing: mismatch.missing,
            unwanted: mismatch.unwanted,
        });
    }

    let jobs = std::thread::available_parallelism().map_or(2, usize::from);
    command::run_logged(
        make(&src, arch_config)
            .arg(format!("-j{jobs}"))
            .arg(arch_config.make_target),
        &log,
    )
    .await
    .map_err(step("make the kernel"))?;
    let release = command::capture(make(&src, arch_config).arg("-s").arg("kernelrelease"))
        .await
        .map_err(step("make kernelrelease"))?
        .trim()
        .to_owned();

    let (kernel_file, pvh_entry) = match arch {
        GuestArch::X86_64 => {
            let vmlinux = staging.path().join("vmlinux");
            let pvh_entry = publishable_vmlinux(&src, &vmlinux, &log).await?;
            (vmlinux, pvh_entry)
        }
        GuestArch::Arm64 => {
            let image = staging.path().join(kernel_file_name(arch));
            let built = src.join(arch_config.output);
            std::fs::copy(&built, &image).map_err(io_err(&built))?;
            check_arm64_image(&image)?;
            (image, 0)
        }
    };
    let config_copy = staging.path().join("config");
    std::fs::write(&config_copy, &final_config).map_err(io_err(&config_copy))?;
    std::fs::remove_dir_all(&src).map_err(io_err(&src))?;

    let vmlinux_bytes = std::fs::metadata(&kernel_file)
        .map_err(io_err(&kernel_file))?
        .len();
    let manifest = KernelManifest {
        release,
        source_package: source.package.clone(),
        source_version: version,
        key: key.hex(),
        build_seconds: started.elapsed().as_secs(),
        vmlinux_bytes,
        pvh_entry,
        arch,
    };
    let manifest_path = staging.path().join("kernel.json");
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| BuildKernelError::Io {
        path: manifest_path.clone(),
        source: e.into(),
    })?;
    std::fs::write(&manifest_path, json).map_err(io_err(&manifest_path))?;
    cache::publish_dir(staging, &dest).map_err(io_err(&dest))?;
    tracing::info!(
        %arch,
        release = %manifest.release,
        seconds = manifest.build_seconds,
        mib = vmlinux_bytes / (1 << 20),
        "guest kernel built"
    );
    Ok(BuiltKernel {
        vmlinux: dest.join(kernel_file_name(arch)),
        manifest,
        cached: false,
    })
}

/// Strips the built x86_64 `vmlinux` of `src` into `vmlinux` and checks it
/// is an x86-64 ELF with a PVH entry, which it returns.
async fn publishable_vmlinux(
    src: &Path,
    vmlinux: &Path,
    log: &Path,
) -> Result<u64, BuildKernelError> {
    let step = |step| move |source| BuildKernelError::Step { step, source };
    command::run_logged(
        Command::new("strip")
            .arg("--strip-all")
            .arg(src.join("vmlinux"))
            .arg("-o")
            .arg(vmlinux),
        log,
    )
    .await
    .map_err(step("strip vmlinux"))?;
    let info = elf::read_elf(vmlinux)?;
    if info.machine != EM_X86_64 {
        return Err(BuildKernelError::BadVmlinux {
            path: vmlinux.to_owned(),
            reason: format!("machine {} is not x86-64", info.machine),
        });
    }
    info.pvh_entry.ok_or_else(|| BuildKernelError::BadVmlinux {
        path: vmlinux.to_owned(),
        reason: "no Xen PHYS32_ENTRY (PVH) note".into(),
    })
}

/// Where the arm64 boot protocol puts the `Image` header's magic, and the
/// magic (`ARM\x64`, Documentation/arm64/booting.rst).
const ARM64_IMAGE_MAGIC_OFFSET: usize = 56;
const ARM64_IMAGE_MAGIC: &[u8; 4] = b"ARM\x64";

/// Checks that `path` is an uncompressed arm64 `Image` (its header's magic).
pub fn check_arm64_image(path: &Path) -> Result<(), BuildKernelError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let magic = bytes.get(ARM64_IMAGE_MAGIC_OFFSET..ARM64_IMAGE_MAGIC_OFFSET + 4);
    if magic != Some(ARM64_IMAGE_MAGIC.as_slice()) {
        return Err(BuildKernelError::BadVmlinux {
            path: path.to_owned(),
            reason: "no arm64 Image magic (ARM\\x64) at offset 56; is it compressed?".into(),
        });
    }
    Ok(())
}

/// `make -C <src> ARCH=<arch>` (and `CROSS_COMPILE=` for a cross build)
/// with a reproducible build user and host.
fn make(src: &Path, arch: &ArchConfig) -> Command {
    let mut cmd = Command::new("make");
    cmd.arg("-C")
        .arg(src)
        .arg(format!("ARCH={}", arch.make_arch))
        .env("KBUILD_BUILD_USER", "nova")
        .env("KBUILD_BUILD_HOST", "novasandbox");
    if let Some(prefix) = arch.cross_compile {
        cmd.arg(format!("CROSS_COMPILE={prefix}"));
    }
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
        assert!(load_cached(dir.path(), GuestArch::X86_64).is_none());
        let manifest = KernelManifest {
            release: "6.1.0-nova".into(),
            source_package: "linux-source-6.1".into(),
            source_version: "6.1.1-1".into(),
            key: "k".into(),
            build_seconds: 1,
            vmlinux_bytes: 1,
            pvh_entry: 0x100_0000,
            arch: GuestArch::X86_64,
        };
        std::fs::write(
            dir.path().join("kernel.json"),
            serde_json::to_vec(&manifest).unwrap(),
        )
        .unwrap();
        let hit = load_cached(dir.path(), GuestArch::X86_64).unwrap();
        assert!(hit.cached);
        assert_eq!(hit.manifest, manifest);
        // The same directory holds no arm64 kernel (no `Image`).
        assert!(load_cached(dir.path(), GuestArch::Arm64).is_none());
    }

    #[test]
    fn the_arm64_key_differs_and_the_x86_64_key_is_unchanged() {
        let (p, v) = ("linux-source-6.1", "6.1.1-1");
        assert_eq!(
            cache_key_for(GuestArch::X86_64, p, v).hex(),
            cache_key(p, v, config::FRAGMENT).hex(),
            "kernels cached before arm64 stay valid"
        );
        assert_ne!(
            cache_key_for(GuestArch::Arm64, p, v).hex(),
            cache_key_for(GuestArch::X86_64, p, v).hex()
        );
    }

    #[test]
    fn an_arm64_image_is_recognised_by_its_magic() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("Image");
        let mut header = vec![0u8; 64];
        header[56..60].copy_from_slice(ARM64_IMAGE_MAGIC);
        std::fs::write(&image, &header).unwrap();
        check_arm64_image(&image).unwrap();
        std::fs::write(&image, b"\x1f\x8b gzip").unwrap();
        let err = check_arm64_image(&image).unwrap_err().to_string();
        assert!(err.contains("no arm64 Image magic"), "{err}");
    }
}
