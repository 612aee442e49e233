//! `nova serve`: runs the daemon in the foreground until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use nova_server::{ServeOptions, Server};
use novasandbox::core::NovaHome;

/// Arguments of `nova serve`.
#[derive(Debug, clap::Args)]
pub(crate) struct ServeArgs {
    /// Also listen on this TCP address (e.g. 127.0.0.1:7070), where every
    /// request needs `Authorization: Bearer <token>`; the token is made at
    /// the first start in $NOVA_HOME/token (mode 0600).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// Also serve E2B's API on this TCP address (e.g. 127.0.0.1:3000), so
    /// the unmodified `e2b` SDK works: E2B_API_URL and E2B_SANDBOX_URL
    /// http://ADDR, E2B_API_KEY the token in $NOVA_HOME/token.
    #[arg(long, value_name = "ADDR:PORT")]
    e2b_listen: Option<SocketAddr>,
    /// The Unix socket to listen on (no token; mode 0600).
    #[arg(long, value_name = "PATH", default_value = "$NOVA_HOME/nova.sock")]
    socket: String,
    /// The operator's policy: limits, allowed templates, volumes, the warm
    /// pool (see the nova-server crate docs for its keys).
    #[arg(long, value_name = "PATH", default_value = "$NOVA_HOME/policy.toml")]
    policy: String,
    /// Print the OpenAPI document and exit.
    #[arg(long)]
    print_openapi: bool,
}

fn under_home(home: &NovaHome, raw: &str) -> PathBuf {
    match raw.strip_prefix("$NOVA_HOME/") {
        Some(rest) => home.root().join(rest),
        None => PathBuf::from(raw),
    }
}

/// Runs `nova serve`.
pub(crate) async fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    if args.print_openapi {
        print!("{}", nova_server::api::openapi_json());
        return Ok(ExitCode::SUCCESS);
    }
    let home = NovaHome::resolve()?;
    std::fs::create_dir_all(home.root())
        .with_context(|| format!("cannot create {}", home.root().display()))?;
    let provider = novasandbox::detect_for_daemon(home.clone()).await?;
    if let Some(report) = &provider.reattached {
        if !report.adopted.is_empty() {
            eprintln!(
                "nova serve: re-attached {} sandbox(es) of a previous daemon",
                report.adopted.len()
            );
        }
        for failed in &report.failed {
            eprintln!(
                "nova serve: sandbox {} is failed: {}",
                failed.id, failed.reason
            );
        }
    }
    let hypervisor = provider.hypervisor;
    let mut options = ServeOptions::new(home.clone());
    options.socket = under_home(&home, &args.socket);
    options.policy = under_home(&home, &args.policy);
    options.tcp = args.listen;
    options.e2b = args.e2b_listen;
    let server = Server::bind(hypervisor, options.clone()).await?;
    eprintln!(
        "nova serve: listening on {}{} (backend {})",
        options.socket.display(),
        server
            .tcp_addr()
            .map(|a| format!(
                " and http://{a} (token in {})",
                home.root().join(nova_server::auth::TOKEN_FILE).display()
            ))
            .unwrap_or_default(),
        server.daemon().hypervisor().kind(),
    );
    if let Some(a) = server.e2b_addr() {
        eprintln!("nova serve: E2B API on http://{a} (E2B_API_URL and E2B_SANDBOX_URL)");
    }
    server.serve(shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    crate::signals::terminate_or_interrupt().await;
    eprintln!("nova serve: shutting down");
}
