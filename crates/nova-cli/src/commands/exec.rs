//! `nova exec` and `nova attach`: a command in a sandbox, streamed, with its
//! exit code as nova's own.
//!
//! Every exec streams over the WebSocket (so output appears as it is
//! produced, byte for byte: stdout to fd 1, stderr to fd 2). The command is
//! an argv, never a shell line, as in `docker exec`: `nova exec ID -- sh -c
//! 'a | b'` for a pipeline.
//!
//! ```text
//! stdin thread --chunks--> select loop --binary--> daemon   (-i; EOF: stdin_eof)
//! SIGINT, SIGTERM ------->             --signal-->          (without -t; with -t
//!                                                             Ctrl-C is a byte)
//! SIGWINCH -------------->             --resize-->          (-t)
//! daemon --stdout/stderr/exit--> select loop --> fd 1 / fd 2 / exit code
//! ```
//!
//! With `-t` the local terminal is in raw mode for the whole session; the
//! [`RawMode`] guard restores it on every way out.

use std::io::Read;
use std::process::ExitCode;

use nova_server::api::exec::{ExecBody, ExitKind, TtySize};
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{SignalKind, signal};

use crate::client::ws::{ExecSocket, Frame};
use crate::client::{Client, ClientError};
use crate::terminal::{self, RawMode};

/// Arguments of `nova exec`.
#[derive(Debug, clap::Args)]
pub(crate) struct ExecArgs {
    /// Keep stdin open and forward it to the command.
    #[arg(long, short = 'i')]
    interactive: bool,
    /// Run the command on a terminal (raw mode here, resizes forwarded).
    #[arg(long, short = 't')]
    tty: bool,
    /// An environment variable for this command.
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = super::key_value)]
    env: Vec<(String, String)>,
    /// Working directory in the guest.
    #[arg(long, short = 'w', value_name = "DIR")]
    workdir: Option<String>,
    /// Kill the command after this many seconds (exit code 124).
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// Run as this user, as `docker exec -u`: `USER[:GROUP]` or `UID[:GID]`
    /// (`-u root`, `-u 0`, `-u 1000:1000`); names are looked up in the
    /// guest. Default: the template's user (its image's `User`), else root.
    #[arg(long, short = 'u', value_name = "USER[:GROUP]")]
    user: Option<String>,
    /// The sandbox.
    id: String,
    /// The program and its arguments (an argv; no shell).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// Arguments of `nova attach`.
#[derive(Debug, clap::Args)]
pub(crate) struct AttachArgs {
    /// The sandbox.
    id: String,
    /// The command's id (printed by `nova exec` with NOVA_LOG=info, listed by
    /// `GET /v1/sandboxes/ID/execs`).
    exec_id: u64,
}

/// Runs `nova exec`.
pub(crate) async fn run(args: &ExecArgs) -> anyhow::Result<ExitCode> {
    let client = Client::from_env()?;
    let tty_size = args.tty.then(|| {
        let (rows, cols) = terminal::size().unwrap_or((24, 80));
        TtySize { rows, cols }
    });
    let body = ExecBody {
        cmd: Some(args.command.clone()),
        env: super::to_map(&args.env),
        cwd: args.workdir.clone(),
        timeout_ms: args.timeout.map(|s| s.saturating_mul(1000)),
        tty: tty_size,
        interactive: args.interactive,
        user: args.user.clone(),
        ..ExecBody::default()
    };
    let socket = client.exec_stream(&args.id, &body).await?;
    // Raw mode only once the daemon has the command, and only for a
    // terminal: `-t` with stdin from a pipe changes nothing here.
    let _raw = if args.tty && args.interactive && terminal::stdin_is_tty() {
        RawMode::enter()?
    } else {
        None
    };
    let code = pump(socket, &args.id, args.interactive, args.tty).await?;
    Ok(ExitCode::from(code))
}

/// Runs `nova attach`.
pub(crate) async fn attach(args: &AttachArgs) -> anyhow::Result<ExitCode> {
    let client = Client::from_env()?;
    let socket = client.attach(&args.id, args.exec_id).await?;
    Ok(ExitCode::from(pump(socket, &args.id, false, false).await?))
}

/// Reads stdin on a thread of its own (a blocked read must never hold up
/// the process's exit) and hands chunks over; the channel closes at EOF.
fn stdin_chunks() -> tokio::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    });
    rx
}

/// Drives a streamed exec to its end; the command's exit code, as a shell
/// reports it (0..=255). When the connection to the daemon breaks after the
/// command started, the error says how to follow it again (`nova attach`):
/// the command keeps running in the sandbox.
async fn pump(
    mut socket: ExecSocket,
    sandbox: &str,
    interactive: bool,
    tty: bool,
) -> anyhow::Result<u8> {
    let mut started = None;
    let mut stdin = interactive.then(stdin_chunks);
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut winch = signal(SignalKind::window_change())?;
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let result = loop {
        tokio::select! {
            frame = socket.next() => match frame {
                Ok(Frame::Started { exec_id }) => {
                    tracing::info!(exec_id, "command started");
                    started = exec_id;
                }
                Ok(Frame::Stdout(bytes)) => {
                    stdout.write_all(&bytes).await?;
                    stdout.flush().await?;
                }
                Ok(Frame::Stderr(bytes)) => {
                    stderr.write_all(&bytes).await?;
                    stderr.flush().await?;
                }
                Ok(Frame::Exit(exit)) => {
                    if exit.kind == ExitKind::NotStarted {
                        let why = exit.error.as_deref().unwrap_or("it could not start");
                        eprintln!("nova: {why}");
                    }
                    break Ok(exit.exit_code.clamp(0, 255) as u8);
                }
                Err(e) => break Err(e),
            },
            chunk = async {
                match stdin.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => match chunk {
                Some(bytes) => socket.stdin(bytes).await?,
                None => {
                    stdin = None;
                    socket.stdin_eof().await?;
                }
            },
            _ = interrupt.recv() => socket.signal(2).await?,
            _ = terminate.recv() => socket.signal(15).await?,
            _ = winch.recv(), if tty => {
                if let Some((rows, cols)) = terminal::size() {
                    socket.resize(rows, cols).await?;
                }
            }
        }
    };
    socket.close().await;
    result.map_err(|e: ClientError| match started {
        Some(exec_id) => anyhow::Error::from(e).context(format!(
            "the connection to the daemon broke; the command keeps running in the \
             sandbox: `nova attach {sandbox} {exec_id}` follows it and passes its exit code on"
        )),
        None => e.into(),
    })
}
