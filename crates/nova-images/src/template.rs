//! The templates this crate knows how to build, and building one end to end.
//!
//! [`build_template`] is what `nova template build <id>` runs: build (or take
//! from the cache) the kernel, stage the rootfs for the template's recipe,
//! pack it, write the manifest in the seed's format through nova-core's
//! [`TemplateManager`], and publish `$NOVA_HOME/templates/<id>/` in one
//! rename. A finished template is itself cached: its key (kernel key, recipe,
//! agent binary, base tree) is stored in the template directory itself
//! ([`BUILD_KEY_FILE`], so it always describes the files beside it), and a
//! rebuild with an unchanged key that still loads through `TemplateManager`
//! returns at once, which is what makes a second `make images` take seconds.
//!
//! A template can be built for another guest architecture
//! ([`BuildOptions::arch`]): [`TemplateSpec::for_arch`] gives the arm64
//! variant of a known template its own id (`minimal-arm64`), the kernel is
//! the arm64 one ([`kernel::build_kernel_for`]), the rootfs gets the arm64
//! agent and busybox, and the manifest records `"arch": "arm64"`. Only
//! `minimal` has an arm64 recipe.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nova_core::home::NovaHome;
use nova_core::template::{
    GuestArch, KERNEL_FILE, ROOTFS_FILE, Template, TemplateError, TemplateManager, TemplateManifest,
};

use crate::boot_probe::{AGENT_READY_MARKER, BootProbe, BootProbeError};
use crate::cache::{self, CacheDir, CacheKey};
use crate::host_tools;
use crate::kernel::{self, BuildKernelError, KernelSource};
use crate::rootfs::debian::{self, DebianSpec};
use crate::rootfs::{self, BuildRootfsError, minimal};

/// Where `cargo build -p nova-agent --profile agent --target x86_64-unknown-linux-gnu`
/// puts the static agent, relative to the workspace root.
pub const DEFAULT_AGENT_PATH: &str = "target/x86_64-unknown-linux-gnu/agent/nova-agent";

/// Where `cargo build -p nova-agent --profile agent --target aarch64-unknown-linux-gnu`
/// (`make agent-arm64`) puts the static arm64 agent, relative to the workspace root.
pub const DEFAULT_ARM64_AGENT_PATH: &str = "target/aarch64-unknown-linux-gnu/agent/nova-agent";

/// The default agent path for a guest of `arch`.
pub fn default_agent_path(arch: GuestArch) -> &'static str {
    match arch {
        GuestArch::X86_64 => DEFAULT_AGENT_PATH,
        GuestArch::Arm64 => DEFAULT_ARM64_AGENT_PATH,
    }
}

/// File in a template directory holding the cache key it was built from.
pub const BUILD_KEY_FILE: &str = ".nova-build-key";

/// How a template's root filesystem is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootfsRecipe {
    /// busybox-static + the agent.
    Minimal,
    /// A debootstrap tree + the agent.
    Debian(DebianSpec),
}

/// A template this crate can build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateSpec {
    /// The id (directory name under `templates/`).
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// Recommended memory.
    pub memory_mb: u32,
    /// Recommended vCPUs.
    pub vcpus: u8,
    /// The packages recorded in the manifest.
    pub packages: Vec<String>,
    /// How the rootfs is made.
    pub recipe: RootfsRecipe,
}

/// The templates `nova template build` knows, in the order it lists them.
pub fn known_templates() -> Vec<TemplateSpec> {
    let python_packages: Vec<String> = ["python3", "curl", "wget", "ca-certificates"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    vec![
        TemplateSpec {
            id: "minimal".into(),
            name: "Minimal (busybox)".into(),
            memory_mb: 256,
            vcpus: 1,
            packages: vec!["busybox-static".into()],
            recipe: RootfsRecipe::Minimal,
        },
        TemplateSpec {
            id: "python".into(),
            name: "Python 3.11 (Debian 12)".into(),
            memory_mb: 512,
            vcpus: 2,
            packages: python_packages.clone(),
            recipe: RootfsRecipe::Debian(DebianSpec {
                suite: "bookworm".into(),
                variant: "minbase".into(),
                packages: python_packages,
                check: [
                    "python3",
                    "-c",
                    "import ssl, json, sqlite3, urllib.request; print('python ok')",
                ]
                .into_iter()
                .map(str::to_owned)
                .collect(),
            }),
        },
    ]
}

impl TemplateSpec {
    /// This template for guests of `arch`: unchanged for x86_64; for
    /// another architecture, its own id (`<id>-<arch>`, e.g.
    /// `minimal-arm64`) and name, so both can be installed side by side.
    /// Fails when the recipe cannot be built for `arch` (only `minimal` can
    /// be built for arm64: debootstrap's second stage would run arm64
    /// binaries, which this host cannot without qemu-user).
    pub fn for_arch(self, arch: GuestArch) -> Result<TemplateSpec, UnsupportedArchError> {
        if arch == GuestArch::X86_64 {
            return Ok(self);
        }
        if self.recipe != RootfsRecipe::Minimal {
            return Err(UnsupportedArchError { id: self.id, arch });
        }
        Ok(TemplateSpec {
            id: format!("{}-{arch}", self.id),
            name: format!("{} ({arch})", self.name),
            ..self
        })
    }
}

/// A template has no recipe for the architecture asked for.
#[derive(Debug, thiserror::Error)]
#[error(
    "template {id:?} cannot be built for {arch}: only `minimal` has an {arch} recipe \
     (`nova template build minimal --arch {arch}`)"
)]
pub struct UnsupportedArchError {
    /// The template id.
    pub id: String,
    /// The architecture asked for.
    pub arch: GuestArch,
}

/// The id is not one this crate can build.
#[derive(Debug, thiserror::Error)]
#[error("unknown template {id:?}; known templates: {}", known.join(", "))]
pub struct UnknownTemplateError {
    /// The id asked for.
    pub id: String,
    /// The ids that can be built.
    pub known: Vec<String>,
}

/// Looks up a buildable template by id.
pub fn find_template(id: &str) -> Result<TemplateSpec, UnknownTemplateError> {
    let known = known_templates();
    known
        .iter()
        .find(|t| t.id == id)
        .cloned()
        .ok_or_else(|| UnknownTemplateError {
            id: id.to_owned(),
            known: known.into_iter().map(|t| t.id).collect(),
        })
}

/// Inputs of a template build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// `$NOVA_HOME`: templates are installed under it and builds cached under it.
    pub home: NovaHome,
    /// The static guest agent binary to bake in.
    pub agent: PathBuf,
    /// Rebuild the rootfs and template even when cached (the kernel and the
    /// debootstrap tree are still reused).
    pub force: bool,
    /// Rebuild everything, kernel and debootstrap tree included.
    pub rebuild_all: bool,
    /// Where the kernel source comes from.
    pub kernel_source: KernelSource,
    /// Boot the finished template under QEMU (TCG) to measure `boot_time_ms`
    /// (x86_64 only; an arm64 template records 0).
    pub measure_boot: bool,
    /// The guest architecture: picks the kernel, the busybox, and which
    /// agent is accepted; the spec should come from
    /// [`TemplateSpec::for_arch`] with the same architecture.
    pub arch: GuestArch,
}

impl BuildOptions {
    /// Defaults: the agent at [`DEFAULT_AGENT_PATH`], Debian's kernel source,
    /// nothing forced, boot time measured when QEMU is installed.
    pub fn new(home: NovaHome) -> Self {
        Self {
            home,
            agent: DEFAULT_AGENT_PATH.into(),
            force: false,
            rebuild_all: false,
            kernel_source: KernelSource::default(),
            measure_boot: true,
            arch: GuestArch::X86_64,
        }
    }
}

/// What a template build did.
#[derive(Debug, Clone)]
pub struct BuildReport {
    /// The installed template, as `TemplateManager` loads it.
    pub template: Template,
    /// Whether the whole template was a cache hit.
    pub cached: bool,
    /// Whether the kernel came from the cache.
    pub kernel_cached: bool,
    /// Size of `rootfs.ext4`.
    pub rootfs_bytes: u64,
    /// Wall time of the build.
    pub elapsed: Duration,
}

/// Building a template failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildTemplateError {
    /// The kernel build failed.
    #[error("building the guest kernel failed")]
    Kernel(#[from] BuildKernelError),
    /// The rootfs build failed.
    #[error("building the root filesystem failed")]
    Rootfs(#[from] BuildRootfsError),
    /// The template has no recipe for the architecture.
    #[error(transparent)]
    Arch(#[from] UnsupportedArchError),
    /// The finished template does not load.
    #[error("the built template does not load")]
    Load(#[from] TemplateError),
    /// Cache or template-directory I/O failed.
    #[error("template I/O failed at {path}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BuildTemplateError + '_ {
    move |source| BuildTemplateError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Builds template `spec` and installs it under `$NOVA_HOME/templates/<id>/`.
pub async fn build_template(
    spec: &TemplateSpec,
    opts: &BuildOptions,
) -> Result<BuildReport, BuildTemplateError> {
    let started = Instant::now();
    let cache = CacheDir::new(opts.home.cache_dir());
    let templates = opts.home.templates_dir();
    let manager = TemplateManager::new(&templates);
    std::fs::create_dir_all(&templates).map_err(io_err(&templates))?;
    let _lock = cache
        .lock(&format!("template-{}", spec.id))
        .map_err(io_err(cache.root()))?;
    let log = cache
        .log_file(&format!("template-{}", spec.id))
        .map_err(io_err(cache.root()))?;
    let _ = std::fs::remove_file(&log);

    // Fail fast: the agent is checked before a possibly ten-minute kernel build.
    if !opts.agent.is_file() {
        return Err(BuildRootfsError::AgentMissing(opts.agent.clone()).into());
    }
    let arch = opts.arch;
    if arch != GuestArch::X86_64 {
        // Before a possibly long kernel build: the agent must be arm64's.
        rootfs::ensure_static_for(&opts.agent, arch)?;
    }
    let kernel =
        kernel::build_kernel_for(&cache, &opts.kernel_source, arch, opts.rebuild_all).await?;
    let mut key = CacheKey::new("template");
    key.push("kernel", kernel.manifest.key.as_bytes())
        .push("spec", format!("{spec:?}").as_bytes())
        .push("rootfs-recipe", rootfs::RECIPE_VERSION.as_bytes());
    key.push_file("agent", &opts.agent)
        .map_err(io_err(&opts.agent))?;
    let arm64_busybox = match (&spec.recipe, arch) {
        (RootfsRecipe::Minimal, GuestArch::Arm64) => {
            Some(minimal::arm64_busybox(&cache, opts.rebuild_all, &log).await?)
        }
        _ => None,
    };
    match &spec.recipe {
        RootfsRecipe::Minimal => {
            let busybox = Path::new(minimal::BUSYBOX_PATH);
            if busybox.is_file() {
                key.push_file("busybox", busybox).map_err(io_err(busybox))?;
            }
            if let Some(arm64) = &arm64_busybox {
                key.push_file("busybox-arm64", &arm64.path)
                    .map_err(io_err(&arm64.path))?;
            }
        }
        RootfsRecipe::Debian(debian_spec) => {
            key.push("debootstrap", debian_spec.cache_key().hex().as_bytes());
        }
    }
    let dest = templates.join(&spec.id);
    let key_file = dest.join(BUILD_KEY_FILE);
    if !opts.force && !opts.rebuild_all {
        let stored = std::fs::read_to_string(&key_file).unwrap_or_default();
        if stored.trim() == key.hex()
            && let Ok(template) = manager.load(&spec.id)
        {
            let rootfs_bytes = std::fs::metadata(template.rootfs_path()).map_or(0, |m| m.len());
            tracing::info!(id = %spec.id, "template is up to date (cache hit)");
            return Ok(BuildReport {
                template,
                cached: true,
                kernel_cached: true,
                rootfs_bytes,
                elapsed: started.elapsed(),
            });
        }
    }

    cache::sweep_leftovers(&dest).map_err(io_err(&templates))?;
    let staging = cache::staging_dir_for(&dest).map_err(io_err(&templates))?;
    let tree = staging.path().join(".rootfs-tree");
    tracing::info!(id = %spec.id, "staging the root filesystem");
    match &spec.recipe {
        RootfsRecipe::Minimal => match &arm64_busybox {
            Some(busybox) => {
                minimal::stage_arm64(
                    &tree,
                    busybox,
                    Path::new(minimal::BUSYBOX_PATH),
                    &opts.agent,
                    &log,
                )
                .await?
            }
            None => {
                minimal::stage(&tree, Path::new(minimal::BUSYBOX_PATH), &opts.agent, &log).await?
            }
        },
        RootfsRecipe::Debian(_) if arch != GuestArch::X86_64 => {
            return Err(BuildTemplateError::Arch(UnsupportedArchError {
                id: spec.id.clone(),
                arch,
            }));
        }
        RootfsRecipe::Debian(debian_spec) => {
            let base =
                debian::debootstrap_cached(&cache, debian_spec, &spec.id, opts.rebuild_all, &log)
                    .await?;
            debian::stage(&tree, &base, &opts.agent, &log).await?;
        }
    }
    let image = staging.path().join(ROOTFS_FILE);
    let rootfs_bytes = rootfs::make_ext4(&tree, &image, &format!("nova-{}", spec.id), &log).await?;
    std::fs::remove_dir_all(&tree).map_err(io_err(&tree))?;
    let vmlinux = staging.path().join(KERNEL_FILE);
    if std::fs::hard_link(&kernel.vmlinux, &vmlinux).is_err() {
        std::fs::copy(&kernel.vmlinux, &vmlinux).map_err(io_err(&vmlinux))?;
    }

    let boot_time_ms = if opts.measure_boot && arch == GuestArch::X86_64 {
        measure_boot(&vmlinux, &image).await
    } else {
        0
    };
    let manifest = TemplateManifest {
        name: spec.name.clone(),
        template_id: spec.id.clone(),
        os_type: "linux".into(),
        memory_mb: spec.memory_mb,
        vcpus: spec.vcpus,
        boot_time_ms,
        disk_size_gb: disk_size_gb(rootfs_bytes),
        kernel_version: kernel.manifest.release.clone(),
        required_files: vec![KERNEL_FILE.into(), ROOTFS_FILE.into()],
        packages: spec.packages.clone(),
        arch,
        exec_defaults: Default::default(),
    };
    TemplateManager::write_manifest(staging.path(), &manifest).map_err(io_err(staging.path()))?;
    let staged_key = staging.path().join(BUILD_KEY_FILE);
    std::fs::write(&staged_key, key.hex() + "\n").map_err(io_err(&staged_key))?;
    cache::publish_dir(staging, &dest).map_err(io_err(&dest))?;
    let template = manager.load(&spec.id)?;
    tracing::info!(id = %spec.id, mib = rootfs_bytes >> 20, dir = %template.dir.display(), "template installed");
    Ok(BuildReport {
        template,
        cached: false,
        kernel_cached: kernel.cached,
        rootfs_bytes,
        elapsed: started.elapsed(),
    })
}

/// The image size in GB (10^9 bytes), to three decimals, as the manifest records it.
pub fn disk_size_gb(bytes: u64) -> f64 {
    (bytes as f64 / 1e9 * 1000.0).round() / 1000.0
}

/// Boots the new template under QEMU (TCG) until nova-agent logs `ready`
/// and returns the host-measured time in ms (spawn to ready), or 0 with a
/// warning when QEMU is missing or the boot fails. Under TCG this is seconds;
/// with KVM it is far less, so treat it as this host's figure.
pub(crate) async fn measure_boot(vmlinux: &Path, rootfs: &Path) -> u64 {
    let Some(qemu) = host_tools::find_program("qemu-system-x86_64") else {
        tracing::warn!("qemu-system-x86_64 not found: boot_time_ms recorded as 0");
        return 0;
    };
    let Ok(sockets) = tempfile::tempdir() else {
        tracing::warn!("no temporary directory for the agent socket: boot_time_ms recorded as 0");
        return 0;
    };
    let mut probe = BootProbe::new(qemu, vmlinux.to_owned(), rootfs.to_owned());
    probe.agent_socket = Some(sockets.path().join("agent.sock"));
    probe.marker = AGENT_READY_MARKER.iter().map(|p| (*p).to_owned()).collect();
    match probe.run().await {
        Ok(timing) => u64::try_from(timing.to_marker.as_millis()).unwrap_or(u64::MAX),
        Err(
            err @ (BootProbeError::Spawn { .. }
            | BootProbeError::Exited { .. }
            | BootProbeError::Timeout { .. }),
        ) => {
            tracing::warn!(error = %err, "could not boot the new template under QEMU; boot_time_ms recorded as 0");
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_ids_list_the_known_ones() {
        let err = find_template("node").unwrap_err();
        assert_eq!(err.known, ["minimal", "python"]);
        assert_eq!(
            err.to_string(),
            "unknown template \"node\"; known templates: minimal, python"
        );
        assert_eq!(find_template("python").unwrap().memory_mb, 512);
    }

    #[test]
    fn python_has_the_seed_package_list_and_a_smoke_test() {
        let python = find_template("python").unwrap();
        assert_eq!(
            python.packages,
            ["python3", "curl", "wget", "ca-certificates"]
        );
        let RootfsRecipe::Debian(spec) = &python.recipe else {
            panic!("python is a Debian image")
        };
        assert_eq!(spec.suite, "bookworm");
        assert_eq!(spec.variant, "minbase");
        assert_eq!(spec.check[0], "python3");
    }

    #[test]
    fn ids_are_valid_template_ids_for_the_manager() {
        for spec in known_templates() {
            assert!(
                nova_core::config::is_valid_template_id(&spec.id),
                "{}",
                spec.id
            );
        }
    }

    #[test]
    fn disk_size_is_in_gb_with_three_decimals() {
        assert_eq!(disk_size_gb(0), 0.0);
        assert_eq!(disk_size_gb(14_500_000), 0.015);
        assert_eq!(disk_size_gb(2_000_000_000), 2.0);
    }

    #[tokio::test]
    async fn a_missing_agent_fails_fast_before_the_kernel_build() {
        let home = tempfile::tempdir().unwrap();
        let mut opts = BuildOptions::new(NovaHome::at(home.path()));
        opts.agent = home.path().join("no-agent");
        let started = Instant::now();
        let err = build_template(&find_template("minimal").unwrap(), &opts)
            .await
            .unwrap_err();
        assert!(
            matches!(err, BuildTemplateError::Rootfs(BuildRootfsError::AgentMissing(ref p)) if *p == opts.agent),
            "{err:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no kernel build was attempted"
        );
        assert!(!home.path().join("templates/minimal").exists());
    }
}
