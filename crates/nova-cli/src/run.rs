//! `nova run`: boot a sandbox, run one command in it with its output
//! streamed live, print the boot time, stop the sandbox, and exit with the
//! command's exit code — as a shell would report it: the code, 128 + signal,
//! 124 for `--timeout`, 127 / 126 for a command that could not start.
//!
//! With `-i`, stdin is streamed to the command as it arrives (a reader
//! thread feeds the sandbox's [`ExecStdin`]), so `--timeout` bounds the
//! command however long stdin stays open.
//!
//! nova's own lines (`nova: ...`) go to stderr and always start on a fresh
//! line: [`Console`] remembers whether the command's last output left a line
//! open on the terminal (or file) that stderr shares, and ends it first.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use novasandbox::core::config::StartMode;
use novasandbox::core::error::ExecError;
use novasandbox::core::exec::ExecStdin;
use novasandbox::core::{
    EgressConfig, ExecEvent, ExecRequest, ExitStatus, PortProtocol, PortSpec, Sandbox,
    SandboxConfig,
};

/// Bytes read from our stdin per chunk with `-i`.
const STDIN_CHUNK: usize = 64 * 1024;

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
    /// Run CMD as this user, as `docker run -u`: `USER[:GROUP]` or `UID[:GID]`
    /// (`-u root`, `-u 0`, `-u 1000:1000`), names looked up in the guest.
    /// Default: the template's user (its image's `User`), else root.
    #[arg(long, short = 'u', value_name = "USER[:GROUP]")]
    user: Option<String>,
    /// Run CMD as one shell command line (`/bin/sh -c`), not as argv.
    #[arg(long)]
    sh: bool,
    /// Boot without the writable overlay.
    #[arg(long)]
    read_only: bool,
    /// Give the sandbox no network interface (only loopback).
    #[arg(long, conflicts_with_all = ["publish", "allow_egress", "deny_egress", "block_egress"])]
    no_network: bool,
    /// Publish a guest port: `HOST:GUEST`, `HOST:GUEST/udp` or
    /// `IP:HOST:GUEST[/tcp|udp]` (reachable at 127.0.0.1:HOST too unless IP
    /// is given); repeatable.
    #[arg(long = "publish", short = 'p', value_parser = parse_publish)]
    publish: Vec<PortSpec>,
    /// Let the guest reach only these destinations (and its DNS servers):
    /// an IPv4 CIDR or address, or a domain name; repeatable. Also opens an
    /// always-closed range (another sandbox, the host, 169.254.169.254) when
    /// a CIDR inside it is named. A domain (`example.com`, or
    /// `*.example.com` for the names under it) is allowed through the
    /// sandbox's resolver: only allowed names resolve, and only their
    /// answers are reachable.
    #[arg(long = "allow-egress", value_name = "CIDR|DOMAIN")]
    allow_egress: Vec<String>,
    /// Keep the guest from these destinations (CIDR, address or domain
    /// name); repeatable. Wins over --allow-egress.
    #[arg(long = "deny-egress", value_name = "CIDR|DOMAIN")]
    deny_egress: Vec<String>,
    /// Block all egress but what --allow-egress names (implied by
    /// --allow-egress).
    #[arg(long)]
    block_egress: bool,
    /// Send this process's stdin to the command, as it arrives.
    #[arg(long, short = 'i')]
    interactive: bool,
    /// Stop by killing the VMM instead of a graceful power-off.
    #[arg(long)]
    force_stop: bool,
    /// How the sandbox starts: `auto` (restore the template's snapshot when
    /// it fits, else boot), `snapshot` (restore or fail saying why) or
    /// `cold` (always boot the kernel).
    #[arg(long, value_name = "auto|snapshot|cold", default_value = "auto", value_parser = parse_start)]
    start: StartMode,
    /// The command and its arguments; none runs the template's default
    /// command (an image's `Entrypoint` and `Cmd`, as `docker run IMAGE`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// `auto`, `snapshot` or `cold`.
fn parse_start(s: &str) -> Result<StartMode, String> {
    match s {
        "auto" => Ok(StartMode::Auto),
        "snapshot" => Ok(StartMode::Snapshot),
        "cold" => Ok(StartMode::Cold),
        other => Err(format!(
            "{other:?} is not a start mode: use auto, snapshot or cold"
        )),
    }
}

/// `[IP:]HOST:GUEST[/tcp|/udp]`, as `docker run -p` spells it.
fn parse_publish(s: &str) -> Result<PortSpec, String> {
    let bad = |why: &str| format!("{s:?} is not [IP:]HOST:GUEST[/tcp|/udp]: {why}");
    let (ports, protocol) = match s.rsplit_once('/') {
        Some((ports, "tcp")) => (ports, PortProtocol::Tcp),
        Some((ports, "udp")) => (ports, PortProtocol::Udp),
        Some(_) => return Err(bad("the protocol is tcp or udp")),
        None => (s, PortProtocol::Tcp),
    };
    let parts: Vec<&str> = ports.split(':').collect();
    let (host_ip, host, guest) = match parts.as_slice() {
        [host, guest] => (None, *host, *guest),
        [ip, host, guest] => (
            Some(
                ip.parse::<std::net::Ipv4Addr>()
                    .map_err(|_| bad("IP is an IPv4 address"))?,
            ),
            *host,
            *guest,
        ),
        _ => return Err(bad("give both ports")),
    };
    let port = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| bad("ports are numbers 1..=65535"))
    };
    Ok(PortSpec {
        host_port: port(host)?,
        guest_port: port(guest)?,
        protocol,
        host_ip,
    })
}

/// The egress policy the flags ask for, if any.
fn egress_from_args(args: &RunArgs) -> Option<EgressConfig> {
    let block_all = args.block_egress || !args.allow_egress.is_empty();
    (block_all || !args.deny_egress.is_empty()).then(|| EgressConfig {
        block_all,
        allow: args.allow_egress.clone(),
        deny: args.deny_egress.clone(),
    })
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// Runs `nova run`.
pub(crate) async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let console = Console::new(std::io::stdout(), std::io::stderr(), stdout_is_stderr());
    let result = run_with(args, &console).await;
    if result.is_err() {
        // `main` prints the error chain next; start it on a line of its own.
        console.end_open_line();
    }
    result
}

/// `nova run` without a command runs the template's default one: refused
/// before booting when `--sh` is given or the template has none.
fn refuse_without_default_command(args: &RunArgs) -> anyhow::Result<()> {
    anyhow::ensure!(!args.sh, "--sh needs a command line: nova run --sh 'CMD'");
    let home = novasandbox::core::NovaHome::resolve()?;
    let template = novasandbox::core::TemplateManager::new(home.templates_dir())
        .load(&args.template)
        .with_context(|| format!("cannot read template {}", args.template))?;
    let defaults = &template.manifest.exec_defaults;
    anyhow::ensure!(
        !defaults.entrypoint.is_empty() || !defaults.cmd.is_empty(),
        "give the command to run (nova run -t {} -- CMD ARGS...): template {} has no \
         default command (only templates built from an image with an Entrypoint or Cmd do)",
        args.template,
        args.template
    );
    Ok(())
}

async fn run_with(args: RunArgs, console: &Console) -> anyhow::Result<ExitCode> {
    // A program with no name cannot run: refused before booting, as a shell
    // refuses it.
    if !args.sh && args.command.first().is_some_and(String::is_empty) {
        console.line("nova: '': command not found");
        return Ok(ExitCode::from(127));
    }
    if args.command.is_empty() {
        refuse_without_default_command(&args)?;
    }
    let config = SandboxConfig::builder()
        .template_id(&args.template)
        .memory_mb(args.memory)
        .vcpus(args.vcpus)
        .boot_timeout_ms(args.boot_timeout_ms)
        .read_only_rootfs(args.read_only)
        .enable_network(!args.no_network)
        .start(args.start);
    let config = args
        .publish
        .iter()
        .fold(config, |config, port| config.port(*port));
    let config = match egress_from_args(&args) {
        Some(egress) => config.egress(egress),
        None => config,
    }
    .build()?;
    let mut request = if args.sh {
        ExecRequest::shell(args.command.join(" "))
    } else {
        ExecRequest::argv(args.command.clone())
    };
    for (k, v) in args.env {
        request = request.env(k, v);
    }
    if let Some(user) = args.user {
        request = request.user(user);
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
        request = request.stream_stdin();
    }

    let hypervisor = novasandbox::detect()?;
    // Ctrl-C or SIGTERM while booting drops the boot, which kills the VMM
    // and removes the sandbox's files; while the command runs, it stops the
    // sandbox. Either way nothing is left behind.
    let sandbox = tokio::select! {
        created = hypervisor.create_sandbox(config) => created.context("cannot create the sandbox")?,
        signal = interrupted() => {
            console.line(&format!("nova: {signal} while booting; the sandbox was removed"));
            return Ok(ExitCode::from(130));
        }
    };
    print_boot(&sandbox, console);
    let (outcome, force) = tokio::select! {
        outcome = stream(&sandbox, request, console) => (outcome, args.force_stop),
        signal = interrupted() => {
            console.line(&format!("nova: {signal}; stopping the sandbox"));
            (Ok(130), true)
        }
    };
    let stopped = sandbox.stop(force).await;
    // A reader that went away (`nova run … | head`) ends the run quietly,
    // with the status a shell gives a process killed by SIGPIPE.
    let outcome = match outcome {
        Err(e)
            if e.chain().any(|cause| {
                cause
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            Ok(128 + 13)
        }
        other => other,
    };
    let code = outcome?;
    stopped.context("cannot stop the sandbox")?;
    Ok(ExitCode::from(
        u8::try_from(code.clamp(0, 255)).unwrap_or(1),
    ))
}

/// Runs `request`, copying its output to ours as it arrives (and our stdin
/// to it, with `-i`); returns the shell-style exit code.
async fn stream(sandbox: &Sandbox, request: ExecRequest, console: &Console) -> anyhow::Result<i32> {
    let mut events = match sandbox.exec_stream(request).await {
        Ok(events) => events,
        Err(ExecError::Spawn(e)) => {
            // As a shell does: one line naming what is missing, 127 / 126.
            console.line(&format!("nova: {e}"));
            return Ok(e.shell_code());
        }
        Err(e) => return Err(e).context("cannot run the command"),
    };
    if let Some(stdin) = events.take_stdin() {
        forward_stdin(std::io::stdin(), stdin, tokio::runtime::Handle::current());
    }
    while let Some(event) = events.next().await {
        match event {
            ExecEvent::Stdout(bytes) => console.stdout(&bytes)?,
            ExecEvent::Stderr(bytes) => console.stderr(&bytes)?,
            ExecEvent::Exited(status) => {
                match status {
                    ExitStatus::Code(0) => {}
                    ExitStatus::TimedOut => console.line(&format!(
                        "nova: command timed out; its process group was killed (exit code {})",
                        status.shell_code()
                    )),
                    _ => console.line(&format!("nova: command ended with {status}")),
                }
                return Ok(status.shell_code());
            }
        }
    }
    anyhow::bail!("the sandbox's agent went away before the command ended")
}

/// Copies `input` to the command's stdin as it arrives, on a thread of its
/// own (a blocking read of a pipe or terminal that may never end must not
/// hold up the runtime, nor its shutdown). End of input closes the
/// command's stdin; the command exiting ends the copy at the next chunk.
fn forward_stdin<R>(mut input: R, stdin: ExecStdin, runtime: tokio::runtime::Handle)
where
    R: Read + Send + 'static,
{
    let spawned = std::thread::Builder::new()
        .name("nova-stdin".into())
        .spawn(move || {
            let mut buf = vec![0u8; STDIN_CHUNK];
            loop {
                let n = match input.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read stdin; closing the command's stdin");
                        break;
                    }
                };
                if runtime.block_on(stdin.write(buf[..n].to_vec())).is_err() {
                    // The command exited or closed its stdin.
                    return;
                }
            }
            stdin.close();
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the stdin thread; the command's stdin is closed");
    }
}

/// Where the command's output and nova's own lines go, keeping track of
/// whether a line is left open so that nova's lines start on a fresh one.
struct Console<O = std::io::Stdout, E = std::io::Stderr> {
    inner: Mutex<ConsoleInner<O, E>>,
}

struct ConsoleInner<O, E> {
    out: O,
    err: E,
    /// stdout and stderr are the same file (a terminal, `2>&1`): a line the
    /// command left open on either is open for nova's lines too.
    shared: bool,
    /// The last byte written to stdout was not a newline.
    out_open: bool,
    /// The last byte written to stderr was not a newline.
    err_open: bool,
    /// Which stream was written last.
    last_was_out: bool,
}

impl<O: Write, E: Write> Console<O, E> {
    fn new(out: O, err: E, shared: bool) -> Self {
        Self {
            inner: Mutex::new(ConsoleInner {
                out,
                err,
                shared,
                out_open: false,
                err_open: false,
                last_was_out: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConsoleInner<O, E>> {
        // Nothing panics while holding the lock; a poisoned one is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Copies command output to our stdout.
    fn stdout(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut c = self.lock();
        c.out.write_all(bytes)?;
        c.out.flush()?;
        if let Some(&last) = bytes.last() {
            c.out_open = last != b'\n';
            c.last_was_out = true;
        }
        Ok(())
    }

    /// Copies command output to our stderr.
    fn stderr(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut c = self.lock();
        c.err.write_all(bytes)?;
        c.err.flush()?;
        if let Some(&last) = bytes.last() {
            c.err_open = last != b'\n';
            c.last_was_out = false;
        }
        Ok(())
    }

    /// Writes one of nova's own lines to stderr, on a line of its own.
    fn line(&self, text: &str) {
        let mut c = self.lock();
        c.end_open_line();
        // Nowhere left to report a failing stderr to.
        let _ = writeln!(c.err, "{text}");
        let _ = c.err.flush();
    }

    /// Ends a line the command left open where stderr shows it.
    fn end_open_line(&self) {
        self.lock().end_open_line();
    }
}

impl<O: Write, E: Write> ConsoleInner<O, E> {
    fn end_open_line(&mut self) {
        let open = if self.shared && self.last_was_out {
            self.out_open
        } else {
            self.err_open
        };
        if open {
            let _ = self.err.write_all(b"\n");
            let _ = self.err.flush();
        }
        self.out_open &= !self.shared;
        self.err_open = false;
    }
}

/// Whether our stdout and stderr are the same file (a terminal, `2>&1`, one
/// pipe). If it cannot be told, they are taken to be.
fn stdout_is_stderr() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let identity = |fd: std::os::fd::BorrowedFd<'_>| {
        let file = std::fs::File::from(fd.try_clone_to_owned().ok()?);
        let meta = file.metadata().ok()?;
        Some((meta.dev(), meta.ino()))
    };
    match (
        identity(std::io::stdout().as_fd()),
        identity(std::io::stderr().as_fd()),
    ) {
        (Some(out), Some(err)) => out == err,
        _ => true,
    }
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

fn print_boot(sandbox: &Sandbox, console: &Console) {
    let info = sandbox.info();
    let line = match &info.boot {
        Some(b) if b.from_snapshot => format!(
            "nova: sandbox {} ({}) restored from the template's snapshot in {:.1} ms [spawn {:.1} ms, load {:.1} ms, agent {:.1} ms; prepare {:.1} ms before]",
            info.id,
            info.hypervisor,
            b.boot_time_ms,
            b.spawn_ms,
            b.configure_ms,
            b.guest_ms,
            b.prepare_ms,
        ),
        Some(b) => format!(
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
        None => format!("nova: sandbox {} booted", info.id),
    };
    console.line(&line);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_flags_parse_like_docker() {
        assert_eq!(parse_publish("8080:80"), Ok(PortSpec::tcp(8080, 80)));
        assert_eq!(parse_publish("5353:53/udp"), Ok(PortSpec::udp(5353, 53)));
        assert_eq!(
            parse_publish("127.0.0.1:8080:80/tcp"),
            Ok(PortSpec {
                host_ip: Some(std::net::Ipv4Addr::LOCALHOST),
                ..PortSpec::tcp(8080, 80)
            })
        );
        for bad in ["8080", "8080:80/sctp", "x:80", "8080:70000", "::1:80:80"] {
            assert!(parse_publish(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn start_flags_name_the_modes() {
        assert_eq!(parse_start("auto"), Ok(StartMode::Auto));
        assert_eq!(parse_start("snapshot"), Ok(StartMode::Snapshot));
        assert_eq!(parse_start("cold"), Ok(StartMode::Cold));
        assert!(
            parse_start("warm")
                .unwrap_err()
                .contains("auto, snapshot or cold")
        );
    }

    #[test]
    fn network_flags_make_the_config() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        let cli = Cli::try_parse_from([
            "nova",
            "-p",
            "8080:80",
            "-p",
            "9090:90/udp",
            "--allow-egress",
            "10.0.0.0/8",
            "--deny-egress",
            "example.com",
            "true",
        ])
        .unwrap();
        assert_eq!(cli.run.publish.len(), 2);
        let egress = egress_from_args(&cli.run).unwrap();
        assert!(egress.block_all);
        assert_eq!(egress.deny, ["example.com"]);
        let cli = Cli::try_parse_from(["nova", "true"]).unwrap();
        assert!(egress_from_args(&cli.run).is_none());
        assert!(Cli::try_parse_from(["nova", "--no-network", "-p", "1:1", "true"]).is_err());
    }

    /// A writer whose bytes the test reads back, shared by stdout and
    /// stderr when they are one file.
    #[derive(Clone, Default)]
    struct Sink(std::sync::Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    #[test]
    fn novas_line_after_output_without_a_newline_starts_on_a_fresh_line() {
        // The case: `printf tail >&2; exit 3` on a terminal.
        let tty = Sink::default();
        let console = Console::new(tty.clone(), tty.clone(), true);
        console.stderr(b"tail").unwrap();
        console.line("nova: command ended with exit code 3");
        assert_eq!(tty.text(), "tail\nnova: command ended with exit code 3\n");

        // Output that ended its line gets no blank line.
        let tty = Sink::default();
        let console = Console::new(tty.clone(), tty.clone(), true);
        console.stdout(b"done\n").unwrap();
        console.line("nova: x");
        assert_eq!(tty.text(), "done\nnova: x\n");

        // stdout left open on a shared terminal, stderr closed before it.
        let tty = Sink::default();
        let console = Console::new(tty.clone(), tty.clone(), true);
        console.stderr(b"warn\n").unwrap();
        console.stdout(b"partial").unwrap();
        console.line("nova: x");
        console.line("nova: y");
        assert_eq!(tty.text(), "warn\npartial\nnova: x\nnova: y\n");
    }

    #[test]
    fn a_redirected_stdout_does_not_put_blank_lines_on_stderr() {
        let (out, err) = (Sink::default(), Sink::default());
        let console = Console::new(out.clone(), err.clone(), false);
        console.stdout(b"no newline at the end").unwrap();
        console.line("nova: command ended with exit code 1");
        assert_eq!(
            out.text(),
            "no newline at the end",
            "stdout is left as the command wrote it"
        );
        assert_eq!(err.text(), "nova: command ended with exit code 1\n");

        // But an open line on stderr itself is ended.
        console.stderr(b"oops").unwrap();
        console.end_open_line();
        console.end_open_line();
        assert_eq!(err.text(), "nova: command ended with exit code 1\noops\n");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stdin_reaches_the_command_before_it_ends() {
        // Stdin that has one line and then stays open (`sleep 100 | nova
        // run -i`): the line must arrive without waiting for the end.
        let (reader, mut writer) = std::io::pipe().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        forward_stdin(
            reader,
            ExecStdin::new(tx),
            tokio::runtime::Handle::current(),
        );
        writer.write_all(b"hello\n").unwrap();
        assert_eq!(rx.recv().await, Some(b"hello\n".to_vec()));
        // Closing our stdin closes the command's.
        drop(writer);
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_command_that_exits_stops_the_stdin_copy() {
        let (reader, mut writer) = std::io::pipe().unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        drop(rx);
        forward_stdin(
            reader,
            ExecStdin::new(tx),
            tokio::runtime::Handle::current(),
        );
        // The thread reads this, fails to deliver it and ends, closing the
        // pipe's read end: further writes fail instead of blocking forever.
        let mut failed = false;
        for _ in 0..10_000 {
            if writer.write_all(&[0u8; 4096]).is_err() {
                failed = true;
                break;
            }
        }
        assert!(
            failed,
            "the stdin thread kept reading after the command was gone"
        );
    }
}
