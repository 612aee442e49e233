//! `nova template build <id>`: build a template and install it.
//!
//! The work is `nova_images::build_template`: the guest kernel (cached by
//! source version + config), the rootfs for the template's recipe, and the
//! manifest, published atomically into `$NOVA_HOME/templates/<id>/`. A build
//! whose inputs have not changed is a cache hit and returns in about a second.

use std::path::PathBuf;

use nova_images::cache::CacheDir;
use nova_images::kernel::{self, KernelSource};
use nova_images::template::DEFAULT_AGENT_PATH;
use nova_images::{BuildOptions, build_template, find_template};
use novasandbox::core::NovaHome;

/// Arguments of `nova template build`.
#[derive(clap::Args, Debug)]
pub(crate) struct BuildArgs {
    /// Template to build: `minimal` (busybox) or `python` (Debian 12 + python3).
    id: String,
    /// Rebuild the rootfs and template even when cached (reuses the cached
    /// kernel and debootstrap tree).
    #[arg(long)]
    force: bool,
    /// Rebuild everything, the kernel and the debootstrap tree included.
    #[arg(long)]
    rebuild_all: bool,
    /// The static guest agent to bake in as /sbin/nova-agent (`make agent` builds it).
    #[arg(long, env = "NOVA_AGENT_BIN", default_value = DEFAULT_AGENT_PATH)]
    agent: PathBuf,
    /// Do not boot the new template under QEMU to measure its boot time.
    #[arg(long)]
    no_boot_check: bool,
}

/// Runs `nova template build`.
pub(crate) async fn build(args: &BuildArgs) -> anyhow::Result<()> {
    let spec = find_template(&args.id)?;
    let home = NovaHome::resolve()?;
    let mut opts = BuildOptions::new(home.clone());
    opts.agent = args.agent.clone();
    opts.force = args.force;
    opts.rebuild_all = args.rebuild_all;
    opts.measure_boot = !args.no_boot_check;
    let cache = CacheDir::new(home.cache_dir());
    let kernel_cached = matches!(
        kernel::cached_kernel(&cache, &KernelSource::default()).await,
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
    Ok(())
}
