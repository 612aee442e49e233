//! `nova run`: boot a sandbox, run one command in it with its output
//! streamed live, print the boot time, stop the sandbox, and exit with the
//! command's exit code.

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use novasandbox::core::{ExecEvent, ExecRequest, Sandbox, SandboxConfig};

/// Arguments of `nova run`.
#[derive(Debug, clap::Args)]
pub(crate) struct RunArgs {
    /// Template to boot.
    #[arg(long, short = 't', default_value = novasandbox::core::config::DEFAULT_TEMPLATE)]
    template: String,
    /// Guest memory in MiB.
    #[arg(long, short = 'm', default_value_t = novasandbox::core::config::DEFAULT_MEMORY_MB)]
    memory: u32,
    /// Number of vCPUs.
    #[arg(long, default_value_t = novasandbox::core::config::DEFAULT_VCPUS)]
    vcpus: u8,
    /// Kill the command after this many seconds (exit code 124).
    #[arg(long)]
    timeout: Option<f64>,
    /// Give up booting after this many milliseconds.
    #[arg(long, default_value_t = 30_000)]
    boot_timeout_ms: u64,
    /// Environment variable for the command, `KEY=VALUE`; repeatable.
    #[arg(long = "env", short = 'e', value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Working directory in the guest.
    #[arg(long)]
    cwd: Option<String>,
    /// Run CMD as one shell command line (`/bin/sh -c`), not as argv.
    #[arg(long)]
    sh: bool,
    /// Boot without the writable overlay.
    #[arg(long)]
    read_only: bool,
    /// Send this process's stdin to the command (read to its end first).
    #[arg(long, short = 'i')]
    interactive: bool,
    /// Stop by killing the VMM instead of a graceful power-off.
    #[arg(long)]
    force_stop: bool,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true, num_args = 1..)]
    command: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// Runs `nova run`.
pub(crate) async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = SandboxConfig::builder()
        .template_id(&args.template)
        .memory_mb(args.memory)
        .vcpus(args.vcpus)
        .boot_timeout_ms(args.boot_timeout_ms)
        .read_only_rootfs(args.read_only)
        .build()?;
    let mut request = if args.sh {
        ExecRequest::shell(args.command.join(" "))
    } else {
        ExecRequest::argv(args.command.clone())
    };
    for (k, v) in args.env {
        request = request.env(k, v);
    }
    if let Some(cwd) = args.cwd {
        request = request.cwd(cwd);
    }
    if let Some(secs) = args.timeout {
        anyhow::ensure!(
            secs > 0.0 && secs.is_finite(),
            "--timeout must be a positive number of seconds"
        );
        request = request.timeout(Duration::from_secs_f64(secs));
    }
    if args.interactive {
        anyhow::ensure!(
            !std::io::stdin().is_terminal(),
            "--interactive reads stdin to its end; pipe or redirect it (a terminal is not supported yet)"
        );
        let mut input = Vec::new();
        std::io::stdin()
            .read_to_end(&mut input)
            .context("cannot read stdin")?;
        request = request.stdin(input);
    }

    let hypervisor = novasandbox::detect()?;
    // Ctrl-C or SIGTERM while booting drops the boot, which kills the VMM
    // and removes the sandbox's files; while the command runs, it stops the
    // sandbox. Either way nothing is left behind.
    let sandbox = tokio::select! {
        created = hypervisor.create_sandbox(config) => created.context("cannot create the sandbox")?,
        signal = interrupted() => {
            eprintln!("nova: {signal} while booting; the sandbox was removed");
            return Ok(ExitCode::from(130));
        }
    };
    print_boot(&sandbox);
    let (outcome, force) = tokio::select! {
        outcome = stream(&sandbox, request) => (outcome, args.force_stop),
        signal = interrupted() => {
            eprintln!("nova: {signal}; stopping the sandbox");
            (Ok(130), true)
        }
    };
    let stopped = sandbox.stop(force).await;
    let code = outcome?;
    stopped.context("cannot stop the sandbox")?;
    Ok(ExitCode::from(
        u8::try_from(code.clamp(0, 255)).unwrap_or(1),
    ))
}

/// Runs `request`, copying its output to ours as it arrives; returns the
/// shell-style exit code.
async fn stream(sandbox: &Sandbox, request: ExecRequest) -> anyhow::Result<i32> {
    let mut events = sandbox
        .exec_stream(request)
        .await
        .context("cannot run the command")?;
    let mut stdout = std::io::stdout().lock();
    while let Some(event) = events.next().await {
        match event {
            ExecEvent::Stdout(bytes) => {
                stdout.write_all(&bytes)?;
                stdout.flush()?;
            }
            ExecEvent::Stderr(bytes) => {
                let mut stderr = std::io::stderr().lock();
                stderr.write_all(&bytes)?;
                stderr.flush()?;
            }
            ExecEvent::Exited(status) => {
                if !status.success() {
                    eprintln!("nova: command ended with {status}");
                }
                return Ok(status.shell_code());
            }
        }
    }
    anyhow::bail!("the sandbox's agent went away before the command ended")
}

/// Resolves on SIGINT or SIGTERM, naming it.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = tokio::signal::ctrl_c() => "interrupted",
            _ = term.recv() => "terminated",
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            "interrupted"
        }
    }
}

fn print_boot(sandbox: &Sandbox) {
    let info = sandbox.info();
    match &info.boot {
        Some(b) => eprintln!(
            "nova: sandbox {} ({}) booted in {:.1} ms [spawn {:.1} ms, configure {:.1} ms, guest {:.1} ms{}; prepare {:.1} ms before]",
            info.id,
            info.hypervisor,
            b.boot_time_ms,
            b.spawn_ms,
            b.configure_ms,
            b.guest_ms,
            b.guest_kernel_ms
                .map(|k| format!(" (kernel to agent start {k:.1} ms guest time)"))
                .unwrap_or_default(),
            b.prepare_ms,
        ),
        None => eprintln!("nova: sandbox {} booted", info.id),
    }
}
