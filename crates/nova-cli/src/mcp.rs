//! `nova mcp`: an MCP server on stdin and stdout, for an MCP client (an
//! agent, an IDE) to start as a subprocess.
//!
//! It runs in-process: a [`Daemon`] over a provider of its own
//! ([`novasandbox::detect_in`], not detached: its VMs belong to this
//! process), with the operator's `policy.toml`, and no sockets. So it works
//! without `nova serve`, beside one on the same `$NOVA_HOME` (each sandbox
//! directory is locked by its owner; this process keeps its records in a
//! private temporary directory). The MCP session is the process: when the
//! client closes stdin (or sends SIGTERM / SIGINT), every sandbox it made is
//! stopped, `keep: true` ones included, since they cannot outlive it. For
//! sandboxes that outlive a session, use `/mcp` on `nova serve`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use nova_server::mcp::StdioSession;
use nova_server::{Daemon, Policy};
use novasandbox::core::NovaHome;

/// How long stopping the sandboxes at exit may take.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Arguments of `nova mcp`.
#[derive(Debug, clap::Args)]
pub(crate) struct McpArgs {
    /// The operator's policy (limits, allowed templates, network), as for
    /// `nova serve`.
    #[arg(long, value_name = "PATH", default_value = "$NOVA_HOME/policy.toml")]
    policy: String,
    /// Print the templates directory this would use and exit (for scripts).
    #[arg(long, hide = true)]
    print_templates_dir: bool,
}

/// Runs `nova mcp` until the client closes stdin or a signal comes.
pub(crate) async fn run(args: McpArgs) -> anyhow::Result<ExitCode> {
    let home = NovaHome::resolve()?;
    if args.print_templates_dir {
        println!("{}", home.templates_dir().display());
        return Ok(ExitCode::SUCCESS);
    }
    std::fs::create_dir_all(home.root())
        .with_context(|| format!("cannot create {}", home.root().display()))?;
    let policy_path = match args.policy.strip_prefix("$NOVA_HOME/") {
        Some(rest) => home.root().join(rest),
        None => args.policy.into(),
    };
    let policy = Policy::load(&policy_path)?;
    let hypervisor = novasandbox::detect_in(home.clone())?;
    let records = tempfile::Builder::new()
        .prefix("nova-mcp-")
        .tempdir()
        .context("cannot make a directory for the records")?;
    let daemon = Daemon::with_records(hypervisor, home, policy, records.path())
        .context("cannot open the records")?;
    tokio::spawn(Daemon::run_lifetimes(Arc::downgrade(&daemon)));

    let served = tokio::select! {
        result = StdioSession::serve(daemon.clone(), rmcp_stdio()) => result.map_err(anyhow::Error::from),
        () = crate::signals::terminate_or_interrupt() => Ok(()),
    };
    // Whatever ended the session, this process's sandboxes end with it:
    // stop them cleanly rather than leave the provider to kill them.
    if tokio::time::timeout(STOP_TIMEOUT, nova_server::mcp::stop_every_sandbox(&daemon))
        .await
        .is_err()
    {
        eprintln!("nova mcp: sandboxes did not stop within {STOP_TIMEOUT:?}; exiting anyway");
    }
    served.map(|()| ExitCode::SUCCESS)
}

fn rmcp_stdio() -> (tokio::io::Stdin, tokio::io::Stdout) {
    (tokio::io::stdin(), tokio::io::stdout())
}
