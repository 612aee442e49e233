//! `nova template build <id>`: build a template and install it.
//!
//! The work is `nova_images::build_template`: the guest kernel (cached by
//! source version + config), the rootfs for the template's recipe, and the
//! manifest, published atomically into `$NOVA_HOME/templates/<id>/`. A build
//! whose inputs have not changed is a cache hit and returns in about a second.

use std::path::{Path, PathBuf};

use nova_images::cache::CacheDir;
use nova_images::kernel::{self, KernelSource};
use nova_images::{BuildOptions, build_template, find_template};
use novasandbox::core::NovaHome;
use novasandbox::core::template::GuestArch;

/// Arguments of `nova template build`.
#[derive(clap::Args, Debug)]
pub(crate) struct BuildArgs {
    /// Template to build: `minimal` (busybox) or `python` (Debian 12 +
    /// python3); with --from or -f, any new id.
    pub(crate) id: String,
    /// Build from an image: a registry reference (alpine:3.20,
    /// 127.0.0.1:5000/app:1), oci-layout:DIR, oci-archive:FILE or
    /// docker-archive:FILE.
    #[arg(long, value_name = "IMAGE", conflicts_with = "file")]
    pub(crate) from: Option<String>,
    /// Build from a Dockerfile (FROM, RUN, COPY, ADD, ENV, WORKDIR, USER,
    /// ARG, CMD, ENTRYPOINT); RUN steps run in a sandbox.
    #[arg(short = 'f', long = "file", value_name = "DOCKERFILE")]
    pub(crate) file: Option<PathBuf>,
    /// The Dockerfile's build context (COPY and ADD sources); default: the
    /// Dockerfile's directory.
    #[arg(value_name = "CONTEXT", requires = "file")]
    pub(crate) context: Option<PathBuf>,
    /// A Dockerfile ARG value, NAME=VALUE (repeatable).
    #[arg(long = "build-arg", value_name = "NAME=VALUE", requires = "file")]
    pub(crate) build_args: Vec<String>,
    /// A registry to speak plain HTTP to (loopback registries always are).
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub(crate) insecure_registries: Vec<String>,
    /// Rebuild the rootfs and template even when cached (reuses the cached
    /// kernel and debootstrap tree).
    #[arg(long)]
    force: bool,
    /// Rebuild everything, the kernel and the debootstrap tree included.
    #[arg(long)]
    pub(crate) rebuild_all: bool,
    /// The static guest agent to bake in as /sbin/nova-agent (`make agent`
    /// builds it; `make agent-arm64` the arm64 one). Default:
    /// target/<x86_64|aarch64>-unknown-linux-gnu/agent/nova-agent.
    #[arg(long, env = "NOVA_AGENT_BIN")]
    pub(crate) agent: Option<PathBuf>,
    /// The guest architecture: `x86_64` (default) or `arm64`. An arm64
    /// template (only `minimal` has a recipe) is installed as `<id>-arm64`
    /// and runs under `qemu-system-aarch64 -M virt` (emulated here) or Apple
    /// Virtualization.framework.
    #[arg(long, default_value = "x86_64")]
    pub(crate) arch: GuestArch,
    /// Do not boot the new template under QEMU to measure its boot time.
    #[arg(long)]
    pub(crate) no_boot_check: bool,
    /// Do not take the template's snapshot (which creates restore from
    /// instead of booting) after the build.
    #[arg(long)]
    no_snapshot: bool,
}

/// Runs `nova template build`.
pub(crate) async fn build(args: &BuildArgs) -> anyhow::Result<()> {
    if args.from.is_some() || args.file.is_some() {
        let size = crate::template_image::build(args).await?;
        return finish_with_snapshot(args, &args.id, Some(size)).await;
    }
    let spec = find_template(&args.id)?.for_arch(args.arch)?;
    let home = NovaHome::resolve()?;
    let mut opts = BuildOptions::new(home.clone());
    opts.arch = args.arch;
    opts.agent = agent_path(args.agent.as_deref(), args.arch);
    opts.force = args.force;
    opts.rebuild_all = args.rebuild_all;
    opts.measure_boot = !args.no_boot_check;
    let cache = CacheDir::new(home.cache_dir());
    let kernel_cached = matches!(
        kernel::cached_kernel_for(&cache, &KernelSource::default(), args.arch).await,
        Ok(Some(_))
    );
    println!(
        "building template {} into {}{}",
        spec.id,
        home.template_dir(&spec.id).display(),
        if kernel_cached {
            String::new()
        } else {
            format!(
                " (first compiles the guest kernel: ~10 min on 2 cores; log in {})",
                home.cache_dir().join("logs").display()
            )
        }
    );
    let report = build_template(&spec, &opts).await?;
    let m = &report.template.manifest;
    println!(
        "template {} {}: kernel {}{}, rootfs {:.1} MiB, boot_time_ms {}, {:.1} s",
        m.template_id,
        if report.cached {
            "up to date (cache hit)"
        } else {
            "installed"
        },
        m.kernel_version,
        if report.kernel_cached {
            " (cached)"
        } else {
            " (built)"
        },
        report.rootfs_bytes as f64 / f64::from(1 << 20),
        m.boot_time_ms,
        report.elapsed.as_secs_f64(),
    );
    finish_with_snapshot(args, &spec.id, None).await
}

/// The agent to bake into a template of `arch`: `given` (`--agent`,
/// `NOVA_AGENT_BIN`), else the workspace's build output
/// (`target/<triple>/agent/nova-agent`), looked up from the current
/// directory and then from the build tree this `nova` binary sits in
/// (`target/debug/nova`), so a build works from any directory.
pub(crate) fn agent_path(given: Option<&Path>, arch: GuestArch) -> PathBuf {
    if let Some(path) = given {
        return path.to_owned();
    }
    let relative = Path::new(nova_images::template::default_agent_path(arch));
    if relative.exists() {
        return relative.to_owned();
    }
    let beside_nova = std::env::current_exe().ok().and_then(|exe| {
        let target_dir = exe.parent()?.parent()?;
        Some(target_dir.join(relative.strip_prefix("target").ok()?))
    });
    match beside_nova {
        Some(path) if path.exists() => path,
        _ => relative.to_owned(),
    }
}

/// Takes the snapshot of the template `id` after a build, unless told not
/// to: with `size` (memory MiB, vCPUs; an image template's, as its manifest
/// records them), else at a sandbox's default size.
async fn finish_with_snapshot(
    args: &BuildArgs,
    id: &str,
    size: Option<(u32, u8)>,
) -> anyhow::Result<()> {
    let home = NovaHome::resolve()?;
    if !args.no_snapshot {
        if snapshot_is_current(&home, id).await {
            println!("template {} snapshot up to date", id);
        } else if let Err(e) = snapshot(&SnapshotArgs {
            id: id.to_owned(),
            memory: size.map(|(memory, _)| memory),
            vcpus: size.map(|(_, vcpus)| vcpus),
        })
        .await
        {
            // The template works without one; creates then boot the kernel.
            eprintln!(
                "warning: no snapshot of template {} (creates will boot the kernel): {e:#}",
                id
            );
        }
    }
    Ok(())
}

/// Whether `templates/<id>/snapshot` was made by this host's backend for the
/// template as it is now.
async fn snapshot_is_current(home: &NovaHome, id: &str) -> bool {
    let Ok(hypervisor) = novasandbox::detect_in(home.clone()) else {
        return false;
    };
    let templates = novasandbox::core::TemplateManager::new(home.templates_dir());
    let dir = home
        .template_dir(id)
        .join(novasandbox::core::template::SNAPSHOT_DIR);
    match novasandbox::runtime::snapshot::read(&dir).await {
        Ok(snapshot) => novasandbox::runtime::snapshot::check_restorable(
            &snapshot,
            hypervisor.kind(),
            &templates,
        )
        .is_ok(),
        Err(_) => false,
    }
}

/// Arguments of `nova template rm`.
#[derive(clap::Args, Debug)]
pub(crate) struct RemoveArgs {
    /// The installed templates to remove.
    #[arg(required = true)]
    pub(crate) ids: Vec<String>,
}

/// Runs `nova template rm`: removes each template's directory (kernel,
/// rootfs, manifest, snapshot). Running sandboxes keep the files they have
/// open; a sandbox paused to disk from a removed template cannot resume.
pub(crate) fn remove(args: &RemoveArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let home = NovaHome::resolve()?;
    let manager = novasandbox::core::TemplateManager::new(home.templates_dir());
    for id in &args.ids {
        let dir = home.template_dir(id);
        if !novasandbox::core::config::is_valid_template_id(id) || !dir.is_dir() {
            let installed = manager.ids().unwrap_or_default().join(", ");
            anyhow::bail!(
                "no template {id:?} in {} (installed: {installed})",
                manager.dir().display()
            );
        }
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot remove template {id} at {}", dir.display()))?;
        println!("removed template {id}");
    }
    Ok(())
}

/// Arguments of `nova template snapshot`.
#[derive(clap::Args, Debug)]
pub(crate) struct SnapshotArgs {
    /// The installed template to snapshot.
    pub(crate) id: String,
    /// Guest memory of the snapshot, in MiB; sandboxes restore from it when
    /// they ask for the same (default: a sandbox's default).
    #[arg(long)]
    memory: Option<u32>,
    /// vCPUs of the snapshot (default: a sandbox's default).
    #[arg(long)]
    vcpus: Option<u8>,
}

/// Runs `nova template snapshot`: boots the template, pauses it, saves it
/// into `templates/<id>/snapshot/` (replacing an older one only once the new
/// one is whole), and stops it. Later creates with the same memory and vCPUs
/// restore from it instead of booting.
pub(crate) async fn snapshot(args: &SnapshotArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use novasandbox::core::{SandboxConfig, StartMode};

    let home = NovaHome::resolve()?;
    let template_dir = home.template_dir(&args.id);
    let config = |network: bool| {
        let mut builder = SandboxConfig::builder()
            .template_id(args.id.clone())
            .start(StartMode::Cold)
            .enable_network(network);
        if let Some(memory) = args.memory {
            builder = builder.memory_mb(memory);
        }
        if let Some(vcpus) = args.vcpus {
            builder = builder.vcpus(vcpus);
        }
        builder.build()
    };
    let hypervisor = novasandbox::detect_in(home)?;
    // With a network, as a default config has it, so that default creates
    // restore from the snapshot; without one where this host cannot give
    // sandboxes a network (not root, no nft).
    let sandbox = match hypervisor.create_sandbox(config(true)?).await {
        Ok(sandbox) => sandbox,
        Err(
            e @ (novasandbox::core::CreateSandboxError::Unsupported { .. }
            | novasandbox::core::CreateSandboxError::Network(_)),
        ) => {
            eprintln!(
                "note: snapshotting {} without a network ({e}); only creates with \
                 enable_network = false will restore from it",
                args.id
            );
            hypervisor
                .create_sandbox(config(false)?)
                .await
                .with_context(|| format!("cannot boot template {}", args.id))?
        }
        Err(e) => return Err(e).with_context(|| format!("cannot boot template {}", args.id)),
    };
    println!(
        "booted {} ({} MiB, {} vCPUs) in {} ms",
        args.id,
        sandbox.info().config.memory_mb,
        sandbox.info().config.vcpus,
        sandbox.boot_time_ms()
    );
    let staging = template_dir.join(".snapshot.new");
    let _ = tokio::fs::remove_dir_all(&staging).await;
    let result = async {
        sandbox.pause().await?;
        let started = std::time::Instant::now();
        hypervisor.snapshot_sandbox(sandbox.id(), &staging).await?;
        anyhow::Ok(started.elapsed())
    }
    .await;
    sandbox.stop(true).await?;
    let elapsed = match result {
        Ok(elapsed) => elapsed,
        Err(e) => {
            let _ = tokio::fs::remove_dir_all(&staging).await;
            return Err(e.context(format!("cannot snapshot template {}", args.id)));
        }
    };
    let target = template_dir.join(novasandbox::core::template::SNAPSHOT_DIR);
    let _ = tokio::fs::remove_dir_all(&target).await;
    tokio::fs::rename(&staging, &target)
        .await
        .with_context(|| format!("cannot install the snapshot at {}", target.display()))?;
    println!(
        "snapshot of {} written in {} ms to {}",
        args.id,
        elapsed.as_millis(),
        target.display()
    );
    Ok(())
}
