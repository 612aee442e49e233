//! Boot benchmark: the project's kernel against Debian's stock cloud kernel.
//!
//! `cargo bench -p nova-images` boots each kernel N times (env
//! `NOVA_BENCH_RUNS`, default 3) under QEMU `microvm` with TCG, with the same
//! root filesystem, and prints time to init measured on the host: from just
//! before QEMU is spawned until the rootfs's init prints a marker on the
//! console. The rootfs is the `minimal` recipe plus `/sbin/nova-bench-init`, a
//! two-line shell script that prints the marker, so both kernels are timed to
//! the same event. Debian's cloud kernel has virtio-mmio and virtio-blk as
//! modules and no command-line virtio-mmio devices, so it boots the way it
//! must: with its initrd and ACPI on. Ours boots without either. Both get the
//! legacy PIT, PIC and RTC spelled out (`pit=on,pic=on,rtc=on`): with
//! microvm's `auto` defaults under TCG the stock kernel finds no timer to
//! calibrate against and hangs.
//!
//! Needs: the `minimal` template's kernel (`make images`), busybox-static,
//! e2fsprogs, qemu-system-x86, and `linux-image-cloud-amd64` for the second
//! column (skipped loudly when it is not installed).

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a benchmark prints its table"
)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use nova_core::home::NovaHome;
use nova_core::template::TemplateManager;
use nova_images::boot_probe::{BootProbe, BootTiming};
use nova_images::host_tools;
use nova_images::rootfs::{self, minimal};

const MARKER: &str = "NOVA-BENCH-INIT-REACHED";
const INIT_SCRIPT: &str = "#!/bin/sh\necho NOVA-BENCH-INIT-REACHED\nexec sleep 3600\n";
const BENCH_INIT: &str = "/sbin/nova-bench-init";

struct Kernel {
    label: String,
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    machine: &'static str,
}

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), String> {
    let runs: usize = std::env::var("NOVA_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let home = NovaHome::resolve().map_err(|e| e.to_string())?;
    let template = TemplateManager::new(home.templates_dir())
        .load("minimal")
        .map_err(|e| format!("{e}\n(run `make images` first)"))?;
    let qemu = host_tools::find_program("qemu-system-x86_64")
        .ok_or("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")?;

    let mut kernels = vec![Kernel {
        label: format!("nova {}", template.manifest.kernel_version),
        kernel: template.kernel_path(),
        initrd: None,
        machine: "microvm,acpi=off,pit=on,pic=on,rtc=on",
    }];
    match debian_cloud_kernel() {
        Some((kernel, initrd, version)) => {
            kernels.push(Kernel {
                label: format!("debian {version}"),
                kernel,
                initrd: Some(initrd),
                machine: "microvm,pit=on,pic=on,rtc=on",
            });
        }
        None => println!(
            "SKIP debian cloud kernel: /boot/vmlinuz-*-cloud-amd64 with its initrd not found \
             (apt-get install linux-image-cloud-amd64)"
        ),
    }

    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let image = bench_rootfs(work.path()).await?;

    let mut results: Vec<(String, Vec<BootTiming>)> = kernels
        .iter()
        .map(|k| (k.label.clone(), Vec::new()))
        .collect();
    for run in 0..runs {
        for (kernel, (_, timings)) in kernels.iter().zip(results.iter_mut()) {
            let mut probe = BootProbe::new(qemu.clone(), kernel.kernel.clone(), image.clone());
            probe.initrd = kernel.initrd.clone();
            probe.machine = kernel.machine.to_owned();
            probe.cmdline =
                format!("console=ttyS0 reboot=k panic=1 root=/dev/vda ro init={BENCH_INIT}");
            probe.marker = vec![MARKER.to_owned()];
            probe.timeout = Duration::from_secs(120);
            let timing = probe
                .run()
                .await
                .map_err(|e| format!("{}: {e}", kernel.label))?;
            eprintln!(
                "run {}: {:<28} {:>7.0} ms",
                run + 1,
                kernel.label,
                ms(timing.to_marker)
            );
            timings.push(timing);
        }
    }

    println!(
        "\nboot to init under QEMU microvm, TCG, 512 MiB, same rootfs, N={runs} (host clock: spawn -> init's console line)"
    );
    println!(
        "{:<30} {:>10} {:>10} {:>10} {:>18}",
        "kernel", "mean ms", "min ms", "max ms", "kernel 'Run init'"
    );
    let mut means = Vec::new();
    for (label, timings) in &results {
        let to_init: Vec<f64> = timings.iter().map(|t| ms(t.to_marker)).collect();
        let kernel_line: Vec<f64> = timings
            .iter()
            .filter_map(|t| t.to_kernel_init.map(ms))
            .collect();
        let mean = to_init.iter().sum::<f64>() / to_init.len().max(1) as f64;
        let min = to_init.iter().copied().fold(f64::INFINITY, f64::min);
        let max = to_init.iter().copied().fold(0.0, f64::max);
        let kline = if kernel_line.is_empty() {
            "-".to_owned()
        } else {
            format!(
                "{:.0} ms",
                kernel_line.iter().sum::<f64>() / kernel_line.len() as f64
            )
        };
        println!("{label:<30} {mean:>10.0} {min:>10.0} {max:>10.0} {kline:>18}");
        means.push(mean);
    }
    if let [ours, stock] = means[..] {
        println!(
            "ratio debian/nova: {:.2}x (nova takes {:.0}% of the stock kernel's time)",
            stock / ours,
            100.0 * ours / stock
        );
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The newest `/boot/vmlinuz-*-cloud-amd64` with its initrd, and its version.
fn debian_cloud_kernel() -> Option<(PathBuf, PathBuf, String)> {
    let mut found: Vec<(PathBuf, PathBuf, String)> = std::fs::read_dir("/boot")
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let version = name.strip_prefix("vmlinuz-")?.to_owned();
            let initrd = Path::new("/boot").join(format!("initrd.img-{version}"));
            (version.ends_with("-cloud-amd64") && initrd.is_file())
                .then(|| (entry.path(), initrd, version))
        })
        .collect();
    found.sort_by(|a, b| a.2.cmp(&b.2));
    found.pop()
}

/// The minimal recipe plus the bench init script, packed as ext4.
async fn bench_rootfs(dir: &Path) -> Result<PathBuf, String> {
    let tree = dir.join("tree");
    let log = dir.join("build.log");
    let agent = Path::new(nova_images::template::DEFAULT_AGENT_PATH);
    // The bench times the kernel, not the agent: busybox stands in when the
    // agent is not built.
    let agent = if agent.is_file() {
        agent
    } else {
        Path::new(minimal::BUSYBOX_PATH)
    };
    minimal::stage(&tree, Path::new(minimal::BUSYBOX_PATH), agent, &log)
        .await
        .map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))?;
    let script = tree.join(BENCH_INIT.trim_start_matches('/'));
    std::fs::write(&script, INIT_SCRIPT).map_err(|e| e.to_string())?;
    let mut perms = std::fs::metadata(&script)
        .map_err(|e| e.to_string())?
        .permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&script, perms).map_err(|e| e.to_string())?;
    let image = dir.join("bench-rootfs.ext4");
    rootfs::make_ext4(&tree, &image, "nova-bench", &log)
        .await
        .map_err(|e| e.to_string())?;
    Ok(image)
}
