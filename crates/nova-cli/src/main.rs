//! `nova`: the NovaSandbox command-line tool.
//!
//! Each subcommand lives in its own module (the daemon's client commands
//! under [`commands`], over the typed [`client`]); `main` parses arguments, sets up
//! logging, runs the command and prints the error chain on failure (the
//! only place `anyhow` is used).

#![forbid(unsafe_code)]
#![allow(clippy::print_stdout, reason = "a CLI prints its results")]

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use commands::lifecycle::Action;

mod bench;
mod client;
mod commands;
mod doctor;
mod mcp;
mod run;
mod serve;
mod signals;
mod template;
mod template_image;
mod terminal;

/// NovaSandbox: microVM sandboxes for AI agents.
#[derive(Debug, Parser)]
#[command(name = "nova", version, about, propagate_version = true)]
struct Cli {
    /// Log filter (e.g. `info`, `nova_qemu=debug`); defaults to `warn`, or
    /// the RUST_LOG environment variable.
    #[arg(long, global = true, env = "NOVA_LOG")]
    log: Option<String>,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Report what this host can run and which backend would be used.
    Doctor(doctor::DoctorArgs),
    /// Boot a sandbox, run a command in it, print the boot time, stop it.
    Run(run::RunArgs),
    /// Run the daemon: an HTTP API on $NOVA_HOME/nova.sock (and optionally
    /// TCP) that keeps sandboxes for other processes.
    Serve(serve::ServeArgs),
    /// Serve MCP (Model Context Protocol) on stdin/stdout: sandbox tools for
    /// an agent, in-process (no daemon needed); register as `nova mcp`.
    Mcp(mcp::McpArgs),
    /// Measure boot latency and NovaSandbox's overhead on this host.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Build and list templates.
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Create a sandbox in the daemon and print its id.
    Create(commands::create::CreateArgs),
    /// List the daemon's sandboxes (live ones; -a for all).
    #[command(visible_alias = "ps")]
    Ls(commands::list::ListArgs),
    /// Run a command in a sandbox; its exit code is nova's.
    Exec(commands::exec::ExecArgs),
    /// Follow a command started earlier (its output and exit code).
    Attach(commands::exec::AttachArgs),
    /// Copy a file between the host and a sandbox: ID:/guest/path on one side.
    Cp(commands::cp::CpArgs),
    /// Show sandboxes' CPU, memory and processes.
    Stats(commands::stats::StatsArgs),
    /// Pause sandboxes' vCPUs (--to-disk: save them and free their memory).
    Pause(commands::lifecycle::PauseArgs),
    /// Resume paused sandboxes.
    Resume(commands::lifecycle::IdsArgs),
    /// Stop sandboxes (they stay listed with `ls -a` until `rm`).
    Stop(commands::lifecycle::ForceArgs),
    /// Remove sandboxes (a live one only with -f, which kills it).
    Rm(commands::lifecycle::ForceArgs),
    /// Print a sandbox's console log.
    Logs(commands::lifecycle::LogsArgs),
    /// Print sandboxes' details as JSON.
    Inspect(commands::lifecycle::IdsArgs),
}

#[derive(Debug, Subcommand)]
enum TemplateCommand {
    /// List the installed templates (an unusable one says why).
    List,
    /// Build a template (kernel, rootfs, manifest) and install it.
    Build(template::BuildArgs),
    /// Boot a template and save a snapshot that later creates restore from.
    Snapshot(template::SnapshotArgs),
    /// Remove installed templates.
    Rm(template::RemoveArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log.as_deref());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Commands::Doctor(args) => doctor::run(&args),
            Commands::Run(args) => run::run(args).await,
            Commands::Serve(args) => serve::run(args).await,
            Commands::Mcp(args) => mcp::run(args).await,
            Commands::Bench(cmd) => bench::run(cmd).await.map(|()| ExitCode::SUCCESS),
            Commands::Template(TemplateCommand::List) => list_templates(),
            Commands::Template(TemplateCommand::Build(args)) => {
                template::build(&args).await.map(|()| ExitCode::SUCCESS)
            }
            Commands::Template(TemplateCommand::Snapshot(args)) => {
                template::snapshot(&args).await.map(|()| ExitCode::SUCCESS)
            }
            Commands::Template(TemplateCommand::Rm(args)) => {
                template::remove(&args).map(|()| ExitCode::SUCCESS)
            }
            Commands::Create(args) => commands::create::run(&args).await,
            Commands::Ls(args) => commands::list::run(&args).await,
            Commands::Exec(args) => commands::exec::run(&args).await,
            Commands::Attach(args) => commands::exec::attach(&args).await,
            Commands::Cp(args) => commands::cp::run(&args).await,
            Commands::Stats(args) => commands::stats::run(&args).await,
            Commands::Pause(args) => commands::lifecycle::pause(&args).await,
            Commands::Resume(args) => commands::lifecycle::ids(Action::Resume, &args).await,
            Commands::Stop(args) => {
                commands::lifecycle::forced(|force| Action::Stop { force }, &args).await
            }
            Commands::Rm(args) => {
                commands::lifecycle::forced(|force| Action::Remove { force }, &args).await
            }
            Commands::Logs(args) => commands::lifecycle::logs(&args).await,
            Commands::Inspect(args) => commands::lifecycle::inspect(&args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            print_error(&error);
            ExitCode::FAILURE
        }
    }
}

/// `nova template list`: one line per installed template.
fn list_templates() -> anyhow::Result<ExitCode> {
    use novasandbox::core::{NovaHome, TemplateManager};
    let home = NovaHome::resolve()?;
    let manager = TemplateManager::new(home.templates_dir());
    let templates = manager.list()?;
    if templates.is_empty() {
        println!(
            "no templates in {}; build one with `nova template build python` (or `minimal`)",
            manager.dir().display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<16} {:<6} {:>7} {:>5} {:>9} {:<14} PACKAGES",
        "ID", "ARCH", "MEM_MB", "VCPU", "DISK_GB", "KERNEL"
    );
    for template in templates {
        match template {
            Ok(t) => {
                let m = &t.manifest;
                println!(
                    "{:<16} {:<6} {:>7} {:>5} {:>9.3} {:<14} {}",
                    m.template_id,
                    m.arch.as_str(),
                    m.memory_mb,
                    m.vcpus,
                    m.disk_size_gb,
                    m.kernel_version,
                    m.packages.join(",")
                );
            }
            Err(e) => println!("unusable: {e}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints an error and its chain of causes, one per line.
fn print_error(error: &anyhow::Error) {
    eprintln!("error: {error}");
    for cause in error.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
}

fn init_logging(filter: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = filter
        .map(EnvFilter::new)
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("warn"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, never in a log file.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every subcommand's arguments are consistent (unique names, valid
    /// defaults): clap checks them only when a command is used.
    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
