//! A detached Firecracker provider's owner process, for the re-attach tests
//! (`tests/reattach.rs`): it creates one sandbox (no network) under the
//! `NOVA_HOME` given as its first argument, then prints `SANDBOX <id>`,
//! `EXEC <exec id>` (`-` when it started no command) and `VMM <pid>`, one
//! per line, and waits to be killed. The test SIGKILLs it and re-attaches.
//!
//! Usage: `fc_detached_owner <nova-home> <firecracker> <template> <mode>`,
//! where `<mode>` is
//!
//! - `vmm`: no agent is waited for (the test guest of `tests/common`, which
//!   boots on any KVM), unjailed;
//! - `vmm-paused`: the same, paused before the lines are printed;
//! - `vmm-jailed`: `vmm` through the jailer
//!   ([`JailerConfig::for_host`](nova_firecracker::jailer::JailerConfig::for_host):
//!   root, a static Firecracker, a `jailer` beside it), its jails under
//!   `<nova-home>/jails`;
//! - `agent:<shell command>`: a real template with `nova-agent` (hardware
//!   KVM), jailed when the host allows it ([`FirecrackerOptions::new`]);
//!   the command is started and left running.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use nova_core::config::SandboxConfig;
use nova_core::exec::ExecRequest;
use nova_core::home::NovaHome;
use nova_core::hypervisor::Hypervisor;
use nova_firecracker::binary::FirecrackerBinary;
use nova_firecracker::jailer::JailerConfig;
use nova_firecracker::{FirecrackerHypervisor, FirecrackerOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(home), Some(firecracker), Some(template), Some(mode)) =
        (args.next(), args.next(), args.next(), args.next())
    else {
        return Err(
            "usage: fc_detached_owner <nova-home> <firecracker> <template> \
             vmm|vmm-paused|agent:<command>"
                .into(),
        );
    };
    let binary = FirecrackerBinary::at(firecracker)?;
    let mut jailer = JailerConfig::for_host(binary.path());
    if let Ok(jailer) = &mut jailer {
        jailer.chroot_base = Path::new(&home).join("jails");
    }
    let mut options = FirecrackerOptions::new(NovaHome::at(&home), binary);
    let command = match mode.as_str() {
        "vmm" | "vmm-paused" | "vmm-jailed" => {
            options.wait_for_agent = false;
            options.allow_non_hardware_kvm = true;
            options.jailer = match mode.as_str() {
                "vmm-jailed" => Some(jailer?),
                _ => None,
            };
            None
        }
        other => match other.strip_prefix("agent:") {
            Some(command) => Some(command.to_owned()),
            None => return Err(format!("unknown mode {other:?}").into()),
        },
    };
    options.scratch_size_mb = 64;
    let provider = FirecrackerHypervisor::detached(options);
    let config = SandboxConfig::builder()
        .template_id(template)
        .memory_mb(128)
        .vcpus(1)
        .boot_timeout_ms(60_000)
        .enable_network(false)
        .build()?;
    let sandbox = provider.create_sandbox(config).await?;
    let id = sandbox.id().clone();
    let stream = match command {
        Some(command) => Some(
            provider
                .exec_stream(&id, ExecRequest::shell(command))
                .await?,
        ),
        None => None,
    };
    let exec_id = match &stream {
        Some(stream) => stream
            .exec_id()
            .ok_or("the provider gave the command no exec id")?
            .to_string(),
        None => "-".to_owned(),
    };
    if mode == "vmm-paused" {
        sandbox.pause().await?;
    }
    let vmm = provider
        .get(&id)
        .await
        .and_then(|info| info.vmm_pid)
        .ok_or("no VMM pid")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "SANDBOX {id}\nEXEC {exec_id}\nVMM {vmm}")?;
    out.flush()?;
    drop(out);
    // Hold the stream (and the sandbox) until killed.
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        let _ = (&stream, &sandbox);
    }
}
