//! QEMU booted by hand: the baseline that NovaSandbox's overhead is measured
//! against (`nova bench boot`).
//!
//! [`raw_boot`] starts QEMU with exactly the command line a sandbox gets,
//! connects to the agent socket and completes the protocol handshake, with
//! none of the provider's machinery (no QMP session, no state task, no
//! registry). The scratch disk is cloned before the clock starts, as the
//! provider's is, and QEMU runs under the same confinement.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nova_core::config::SandboxConfig;
use nova_core::template::Template;
use nova_protocol::client::AgentClient;

use crate::QemuOptions;
use crate::cmdline::VmSpec;

/// Boots `template` by hand in `workdir` (a short path: it holds the
/// sockets) and returns the time from spawn to the agent's handshake.
pub async fn raw_boot(
    options: &QemuOptions,
    template: &Template,
    config: &SandboxConfig,
    workdir: &Path,
) -> Result<Duration, Box<dyn std::error::Error + Send + Sync>> {
    let scratch = workdir.join("scratch.ext4");
    let _ = std::fs::remove_file(&scratch);
    nova_runtime::scratch::ScratchCache::in_home(&options.home)
        .create_disk(&scratch, options.scratch_size_mb)
        .await?;
    let arch = template.manifest.arch;
    let (qemu_bin, accel) = crate::hypervisor::qemu_for(options, arch)?;
    let spec = VmSpec {
        arch,
        kernel: template.kernel_path(),
        rootfs: template.rootfs_path(),
        scratch: Some(scratch),
        extra_drives: Vec::new(),
        memory_mb: config.memory_mb,
        vcpus: config.vcpus,
        accel,
        qmp_socket: workdir.join("api.sock"),
        agent_socket: workdir.join("vsock.sock"),
        kernel_args: config.kernel_args.clone(),
        hostname: "raw".into(),
        tsc_khz: crate::cmdline::tcg_tsc_khz(accel),
        confinement: crate::confinement::Confinement::for_host(),
        incoming: false,
        run_as_ids: None,
        net: None,
        memory: crate::cmdline::GuestMemory::SharedMemfd,
    };
    let args = spec.try_qemu_args()?;
    let start = Instant::now();
    let mut child = tokio::process::Command::new(&qemu_bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let timeout = Duration::from_millis(config.boot_timeout_ms);
    let deadline = tokio::time::Instant::from_std(start + timeout);
    let stream = nova_runtime::retry::connect_unix(&spec.agent_socket, deadline).await?;
    let (client, _hello) =
        AgentClient::connect(stream, timeout.saturating_sub(start.elapsed())).await?;
    let elapsed = start.elapsed();
    drop(client);
    child.kill().await?;
    for f in ["api.sock", "vsock.sock", "scratch.ext4"] {
        let _ = std::fs::remove_file(workdir.join(f));
    }
    Ok(elapsed)
}
