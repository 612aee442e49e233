//! A detached provider's owner process, for the re-attach tests
//! (`tests/reattach.rs`): it creates one sandbox (no network, or with
//! `user:<host port>` a user-mode network publishing that port to the
//! guest's port 80) under the `NOVA_HOME` given as its first argument,
//! starts a command in it, prints `SANDBOX <id>`, `EXEC <exec id>` and
//! `VMM <pid>` (one per line), then waits to be killed. The test SIGKILLs
//! it mid-command and re-attaches.
//!
//! Usage: `detached_owner <nova-home> <template> <shell command> [user:<port>]`

use std::io::Write;
use std::time::Duration;

use nova_core::config::SandboxConfig;
use nova_core::exec::ExecRequest;
use nova_core::home::NovaHome;
use nova_core::hypervisor::Hypervisor;
use nova_qemu::{QemuHypervisor, QemuOptions};
use nova_runtime::host::HostReport;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(home), Some(template), Some(command)) = (args.next(), args.next(), args.next())
    else {
        return Err("usage: detached_owner <nova-home> <template> <shell command>".into());
    };
    let report = HostReport::probe();
    let accel = report.qemu_accel();
    let qemu = report.qemu.map_err(|_| "qemu-system-x86_64 not found")?;
    let user_port: Option<u16> = match args.next() {
        Some(arg) => Some(
            arg.strip_prefix("user:")
                .ok_or("the fourth argument is user:<host port>")?
                .parse()?,
        ),
        None => None,
    };
    let provider = QemuHypervisor::detached(QemuOptions {
        home: NovaHome::at(home),
        qemu_bin: qemu.path,
        accel,
        scratch_size_mb: 1024,
    });
    let mut config = SandboxConfig::builder()
        .template_id(template)
        .memory_mb(256)
        .vcpus(1)
        .boot_timeout_ms(90_000)
        .enable_network(false)
        .build()?;
    if let Some(port) = user_port {
        provider.set_net_mode(nova_runtime::network::NetModeChoice::User);
        config.enable_network = true;
        config.host_port = Some(port);
        config.guest_port = 80;
        config.validate()?;
    }
    let sandbox = provider.create_sandbox(config).await?;
    let id = sandbox.id().clone();
    let stream = provider
        .exec_stream(&id, ExecRequest::shell(command))
        .await?;
    let exec_id = stream
        .exec_id()
        .ok_or("the provider gave the command no exec id")?;
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
        let _ = &stream;
    }
}
