//! `nova-agent`: the guest side of NovaSandbox.
//!
//! It runs as PID 1 of every sandbox VM (and as a normal process in host
//! tests). Start-up, in order:
//!
//! 1. as PID 1, the init duties in [`init`]: file systems, the writable
//!    overlay, the guest's identity (hostname, `/etc/hosts`, machine id), `lo`;
//! 2. the tokio runtime, the child [`reaper`], and the listeners from
//!    `--listen` (or `nova.listen=` on the kernel command line, or, as PID 1,
//!    the defaults: vsock port 1024 and the virtio-serial port
//!    `org.nova.agent`, whichever exist). One failing listener is logged; the
//!    agent only gives up when none works;
//! 3. a [`session`] per host connection: handshake, then requests
//!    ([`exec`], as the request's [`user`], [`files`], [`stats`], [`refresh`]
//!    after a snapshot restore);
//! 4. on a shutdown request: `sync`, then power off (as PID 1) or exit.
//!
//! ```text
//! nova-agent [--listen unix:PATH | --listen vsock:PORT | --listen serial:NAME]... [--etc DIR]
//! ```
//!
//! `--etc DIR` is for host tests: an agent that is not PID 1 writes the
//! identity files of a [`nova_protocol::Request::Refresh`] there (and
//! nowhere without it), and looks the users of commands up in its `passwd`
//! and `group` (`/etc`'s without it); as PID 1 they are always `/etc`'s.
//!
//! Logs go to stderr (the VM console as PID 1); `NOVA_AGENT_LOG` sets the
//! filter (default `info`).

// The library exists for the binary and the fuzz targets; its docs are for
// readers of the source, and name the private modules.
#![allow(
    rustdoc::private_intra_doc_links,
    reason = "the crate docs map its private modules"
)]

mod clock;
mod entropy;
mod exec;
mod execs;
mod fdio;
mod files;
#[doc(hidden)]
pub mod fuzzing;
mod identity;
mod init;
mod listen;
mod netdev;
mod reaper;
mod refresh;
mod session;
mod spawn_error;
mod stats;
mod user;

use std::sync::Arc;

use anyhow::{Context, bail};
use nova_protocol::HelloInfo;
use nova_protocol::boot::{self, ListenAddr, NovaParams};
use tokio::sync::mpsc;

use crate::listen::Listener;
use crate::reaper::Reaper;

/// The default `PATH` of commands run by the agent as PID 1.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// State shared by every session.
#[derive(Debug)]
pub(crate) struct Agent {
    pub(crate) reaper: Arc<Reaper>,
    /// Environment commands start from; `None` inherits the agent's own
    /// (host tests), `Some` replaces it (PID 1, whose environment is the
    /// kernel's).
    pub(crate) base_env: Option<Vec<(String, String)>>,
    /// Whether the agent is the guest's PID 1: only then is the machine its
    /// own (clock, hostname, random generator, power).
    pub(crate) pid1: bool,
    /// Where a refresh writes the guest's identity: the system as PID 1, the
    /// `--etc` directory otherwise, or nowhere.
    pub(crate) identity: Option<identity::Target>,
    /// Every command started on any connection, which outlive the host
    /// connection that started them.
    pub(crate) execs: execs::ExecTable,
    started_us: u64,
    ready_us: std::sync::OnceLock<u64>,
    shutdown: mpsc::Sender<()>,
}

impl Agent {
    /// What the handshake reports.
    pub(crate) fn hello_info(&self, version: u32) -> HelloInfo {
        let uname = rustix::system::uname();
        HelloInfo {
            protocol_version: version,
            agent_version: format!("nova-agent {}", env!("CARGO_PKG_VERSION")),
            kernel_release: uname.release().to_string_lossy().into_owned(),
            agent_started_us: self.started_us,
            agent_ready_us: self.ready_us.get().copied().unwrap_or(self.started_us),
            pid1: self.pid1,
            hostname: uname.nodename().to_string_lossy().into_owned(),
        }
    }

    /// The directory standing for `/etc` when resolving users: the `--etc`
    /// directory of an agent that is not PID 1, else `/etc`.
    pub(crate) fn etc_dir(&self) -> &std::path::Path {
        match &self.identity {
            Some(identity::Target::Dir(dir)) => dir,
            _ => std::path::Path::new("/etc"),
        }
    }

    /// Asks the main task to sync and power off.
    pub(crate) fn request_shutdown(&self) {
        let _ = self.shutdown.try_send(());
    }
}

#[derive(Debug, Default)]
struct Args {
    listen: Vec<ListenAddr>,
    etc: Option<std::path::PathBuf>,
}

fn parse_args() -> anyhow::Result<Option<Args>> {
    let mut args = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--listen" => {
                let value = it.next().context("--listen needs a value")?;
                args.listen.push(value.parse()?);
            }
            s if s.starts_with("--listen=") => {
                args.listen.push(s["--listen=".len()..].parse()?);
            }
            "--etc" => {
                args.etc = Some(it.next().context("--etc needs a directory")?.into());
            }
            "--version" | "-V" => {
                eprintln!("nova-agent {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            "--help" | "-h" => {
                eprintln!(
                    "usage: nova-agent [--listen unix:PATH | --listen vsock:PORT | --listen serial:NAME]... [--etc DIR]\n\
                     As PID 1 without --listen it listens on vsock:{} and serial:{}.\n\
                     --etc DIR: where an agent that is not PID 1 (host tests) writes the hostname,\n\
                     hosts and machine-id files a refresh rewrites (as PID 1: /etc, always).",
                    boot::AGENT_VSOCK_PORT,
                    boot::AGENT_SERIAL_PORT
                );
                return Ok(None);
            }
            // The kernel passes unknown command-line words to init as arguments.
            other if std::process::id() == 1 => eprintln!("nova-agent: ignoring argument {other}"),
            other => bail!("unknown argument {other} (try --help)"),
        }
    }
    Ok(Some(args))
}

/// The agent's entry point (the binary's `main`): parses the arguments,
/// does PID 1's duties, serves hosts until a shutdown, then powers off (as
/// PID 1) or exits. Never returns as PID 1.
pub fn main() {
    let started_us = clock::boottime_us();
    let pid1 = std::process::id() == 1;
    init_tracing();
    if let Err(e) = real_main(started_us, pid1) {
        tracing::error!("nova-agent failed: {e:#}");
        if pid1 {
            // PID 1 must not exit (the kernel would panic); power off cleanly.
            power_off(true);
        }
        std::process::exit(1);
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("NOVA_AGENT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        // The guest console ends up in the host's console.log, where escape
        // codes are noise.
        .with_ansi(false)
        .init();
}

fn real_main(started_us: u64, pid1: bool) -> anyhow::Result<()> {
    let Some(args) = parse_args()? else {
        return Ok(());
    };
    let mut cmdline = NovaParams::default();
    if pid1 {
        let (parsed, report) = init::setup();
        tracing::info!(
            hostname = %report.hostname,
            machine_id = %report.machine_id,
            overlay = ?report.overlay,
            net = ?report.net,
            failures = report.failures.len(),
            "init done"
        );
        cmdline = parsed;
        std::env::set_current_dir("/").context("chdir /")?;
    }
    let listen = if !args.listen.is_empty() {
        args.listen
    } else if pid1 {
        cmdline.listen_or_default()
    } else {
        bail!("nothing to listen on: pass --listen unix:PATH (or vsock:PORT, serial:NAME)");
    };
    let base_env = pid1.then(|| {
        let mut env = vec![
            ("PATH".to_owned(), DEFAULT_PATH.to_owned()),
            ("HOME".to_owned(), "/root".to_owned()),
        ];
        env.extend(cmdline.env.iter().cloned());
        env
    });

    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let identity = if pid1 {
        if args.etc.is_some() {
            tracing::warn!("ignoring --etc: as PID 1 the identity files are /etc's");
        }
        Some(identity::Target::System)
    } else {
        args.etc.map(identity::Target::Dir)
    };
    runtime.block_on(serve(listen, base_env, identity, started_us, pid1))?;
    // Do not wait for blocked tasks (a file read on a hung device).
    runtime.shutdown_background();
    power_off(pid1);
    Ok(())
}

async fn serve(
    listen: Vec<ListenAddr>,
    base_env: Option<Vec<(String, String)>>,
    identity: Option<identity::Target>,
    started_us: u64,
    pid1: bool,
) -> anyhow::Result<()> {
    let reaper = Reaper::start().context("cannot watch SIGCHLD")?;
    if !pid1 {
        // Orphans of our commands come to us rather than to the host's init,
        // so a killed process group really is gone when we say so.
        if let Err(e) = rustix::process::set_child_subreaper(Some(rustix::process::getpid())) {
            tracing::debug!(error = %e, "cannot become a child subreaper");
        }
    }
    let (shutdown_tx, mut shutdown_rx) = mpsc::channel(1);
    let agent = Arc::new(Agent {
        reaper,
        base_env,
        pid1,
        identity,
        execs: execs::ExecTable::default(),
        started_us,
        ready_us: std::sync::OnceLock::new(),
        shutdown: shutdown_tx,
    });
    let mut listening = 0;
    for addr in &listen {
        match Listener::bind(addr) {
            Ok(listener) => {
                tracing::info!(%addr, "listening");
                listening += 1;
                tokio::spawn(listener.run(agent.clone()));
            }
            Err(e) => tracing::warn!(%addr, error = %e, "cannot listen"),
        }
    }
    if listening == 0 {
        bail!("could not listen on any of {listen:?}");
    }
    let ready_us = clock::boottime_us();
    let _ = agent.ready_us.set(ready_us);
    tracing::info!(
        started_ms = started_us / 1000,
        ready_ms = ready_us / 1000,
        "nova-agent {} ready",
        env!("CARGO_PKG_VERSION")
    );
    if pid1 {
        let _ = shutdown_rx.recv().await;
    } else {
        // Outside a VM, SIGTERM/SIGINT end the agent; take the commands'
        // process groups along instead of leaving them orphaned.
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
        tokio::select! {
            _ = shutdown_rx.recv() => {}
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        for pgid in agent.reaper.running() {
            exec::kill_group(pgid, rustix::process::Signal::KILL);
        }
    }
    Ok(())
}

/// Syncs file systems, then ends the VM (PID 1) or exits.
///
/// The VM is ended with a restart, not a power-off: the VMMs we run on
/// (Firecracker, QEMU `microvm` with ACPI off) have no power-off device, so a
/// power-off request only halts the CPUs and leaves the VMM running, while a
/// restart (with `reboot=k` on the kernel command line) resets through the
/// keyboard controller, which Firecracker and QEMU's `-no-reboot` turn into a
/// clean VMM exit. Power-off is the fallback for VMMs that do have the device.
fn power_off(pid1: bool) {
    rustix::fs::sync();
    if !pid1 {
        tracing::info!("exiting on request");
        std::process::exit(0);
    }
    tracing::info!("shutting down");
    if let Err(e) = rustix::system::reboot(rustix::system::RebootCommand::Restart) {
        tracing::error!(error = %e, "restart failed; powering off instead");
    }
    if let Err(e) = rustix::system::reboot(rustix::system::RebootCommand::PowerOff) {
        tracing::error!(error = %e, "power off failed too");
    }
    // PID 1 must never exit.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
