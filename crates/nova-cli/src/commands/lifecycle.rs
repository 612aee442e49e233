//! `nova pause|resume|stop|rm ID...`, `nova logs ID`, `nova inspect ID...`.
//!
//! The multi-id commands act on each id in turn, print each id done (as
//! `docker` does) and report each failure, then exit 1 if any failed.
//!
//! `rm` follows `docker rm`: it refuses a live sandbox (creating, running,
//! paused) unless `-f`, which stops it at once and removes it; a stopped or
//! failed one is removed. (The API's `DELETE` itself stops a live sandbox;
//! the refusal is the CLI's, so a typo'd id never kills work.)

use std::process::ExitCode;

use anyhow::bail;
use tokio::io::AsyncWriteExt;

use crate::client::{Client, ClientError};
use crate::commands::list::{is_live, state_name};

/// Arguments of `nova pause`.
#[derive(Debug, clap::Args)]
pub(crate) struct PauseArgs {
    /// Save each sandbox's memory, VM state and disk under the daemon's
    /// data directory and end its VMM (freeing its memory); `nova resume`
    /// restores it, also after the daemon or the host restarted.
    #[arg(long)]
    to_disk: bool,
    /// The sandboxes.
    #[arg(required = true)]
    ids: Vec<String>,
}

/// Arguments of `nova resume`.
#[derive(Debug, clap::Args)]
pub(crate) struct IdsArgs {
    /// The sandboxes.
    #[arg(required = true)]
    ids: Vec<String>,
}

/// Arguments of `nova stop` and `nova rm`.
#[derive(Debug, clap::Args)]
pub(crate) struct ForceArgs {
    /// `stop`: kill the VMM at once instead of asking the guest to power
    /// off. `rm`: remove a live sandbox too (killing it).
    #[arg(long, short = 'f')]
    force: bool,
    /// The sandboxes.
    #[arg(required = true)]
    ids: Vec<String>,
}

/// Arguments of `nova logs`.
#[derive(Debug, clap::Args)]
pub(crate) struct LogsArgs {
    /// The sandbox.
    id: String,
    /// Only the last this many bytes of the console (default 65536, at most
    /// 4 MiB).
    #[arg(long, value_name = "BYTES")]
    tail: Option<u64>,
}

/// One of the multi-id commands.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Action {
    /// Pause the vCPUs.
    Pause {
        /// To disk: save the VM and end its VMM.
        to_disk: bool,
    },
    /// Resume them.
    Resume,
    /// Stop (VMM gone; still listed with `ls -a`).
    Stop {
        /// Kill rather than power off.
        force: bool,
    },
    /// Remove (docker's `rm`).
    Remove {
        /// Also a live one.
        force: bool,
    },
}

async fn act(client: &Client, action: Action, id: &str) -> anyhow::Result<()> {
    match action {
        Action::Pause { to_disk } => drop(client.pause(id, to_disk).await?),
        Action::Resume => drop(client.resume(id).await?),
        Action::Stop { force } => drop(client.stop(id, force).await?),
        Action::Remove { force: true } => client.delete(id, true).await?,
        Action::Remove { force: false } => {
            let view = client.get(id).await?;
            if is_live(view.state) {
                bail!(
                    "cannot remove {id}: it is {} (stop it first with `nova stop {id}`, \
                     or remove it anyway with `nova rm -f {id}`)",
                    state_name(view.state)
                );
            }
            client.delete(id, false).await?;
        }
    }
    Ok(())
}

/// Runs `action` on every id.
pub(crate) async fn run(action: Action, ids: &[String]) -> anyhow::Result<ExitCode> {
    let client = Client::from_env()?;
    let mut failed = false;
    for id in ids {
        match act(&client, action, id).await {
            Ok(()) => println!("{id}"),
            // No daemon: the same for every id; say it once.
            Err(e)
                if matches!(
                    e.downcast_ref::<ClientError>(),
                    Some(ClientError::NoDaemon { .. })
                ) =>
            {
                return Err(e);
            }
            Err(e) => {
                failed = true;
                crate::print_error(&e);
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `nova pause`.
pub(crate) async fn pause(args: &PauseArgs) -> anyhow::Result<ExitCode> {
    run(
        Action::Pause {
            to_disk: args.to_disk,
        },
        &args.ids,
    )
    .await
}

/// `nova resume`.
pub(crate) async fn ids(action: Action, args: &IdsArgs) -> anyhow::Result<ExitCode> {
    run(action, &args.ids).await
}

/// `nova stop` / `nova rm`.
pub(crate) async fn forced(
    action: impl Fn(bool) -> Action,
    args: &ForceArgs,
) -> anyhow::Result<ExitCode> {
    run(action(args.force), &args.ids).await
}

/// Runs `nova logs`: the console's tail, as the guest wrote it.
pub(crate) async fn logs(args: &LogsArgs) -> anyhow::Result<ExitCode> {
    let client = Client::from_env()?;
    let bytes = client.logs(&args.id, args.tail).await?;
    let mut stdout = tokio::io::stdout();
    stdout.write_all(&bytes).await?;
    stdout.flush().await?;
    Ok(ExitCode::SUCCESS)
}

/// Runs `nova inspect`: one sandbox's view as pretty JSON (several: a JSON
/// array of them).
pub(crate) async fn inspect(args: &IdsArgs) -> anyhow::Result<ExitCode> {
    let client = Client::from_env()?;
    let mut views = Vec::with_capacity(args.ids.len());
    for id in &args.ids {
        views.push(client.get(id).await?);
    }
    let text = match views.as_slice() {
        [one] => serde_json::to_string_pretty(one)?,
        many => serde_json::to_string_pretty(many)?,
    };
    println!("{text}");
    Ok(ExitCode::SUCCESS)
}
