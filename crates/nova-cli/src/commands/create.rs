//! `nova create`: a ready sandbox; prints its id only (for `ID=$(nova
//! create)`).

use std::process::ExitCode;

use nova_server::api::sandboxes::{CreateSandboxRequest, PortMapping, PortProtocolView};

use crate::client::Client;

/// Arguments of `nova create`.
#[derive(Debug, clap::Args)]
pub(crate) struct CreateArgs {
    /// Template (`nova template list`); the daemon's default when absent.
    #[arg(long, short = 't')]
    template: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, short = 'm', value_name = "MB")]
    memory: Option<u32>,
    /// vCPUs.
    #[arg(long)]
    vcpus: Option<u8>,
    /// Publish a guest port on the host (127.0.0.1 too): HOST:GUEST[/udp]; repeatable.
    #[arg(long = "publish", short = 'p', value_name = "HOST:GUEST[/udp]", value_parser = parse_port)]
    ports: Vec<PortMapping>,
    /// A label, for `nova ls -l`.
    #[arg(long = "label", short = 'l', value_name = "KEY=VALUE", value_parser = super::key_value)]
    labels: Vec<(String, String)>,
    /// An environment variable for every command run in the sandbox.
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = super::key_value)]
    env: Vec<(String, String)>,
    /// Lifetime in seconds: the daemon stops the sandbox this long after
    /// the create (the daemon's default when absent).
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// No network (the daemon's default otherwise).
    #[arg(long)]
    no_network: bool,
}

fn parse_port(raw: &str) -> Result<PortMapping, String> {
    let bad = || format!("{raw:?} is not HOST:GUEST[/tcp|/udp] (two ports, like 8080:80)");
    let (ports, protocol) = match raw.rsplit_once('/') {
        Some((ports, "tcp")) => (ports, PortProtocolView::Tcp),
        Some((ports, "udp")) => (ports, PortProtocolView::Udp),
        Some(_) => return Err(bad()),
        None => (raw, PortProtocolView::Tcp),
    };
    let (host, guest) = ports.split_once(':').ok_or_else(bad)?;
    let port = |p: &str| p.parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(bad);
    Ok(PortMapping {
        host_port: port(host)?,
        guest_port: port(guest)?,
        protocol,
    })
}

impl CreateArgs {
    /// The API request these arguments ask for.
    fn request(&self) -> CreateSandboxRequest {
        CreateSandboxRequest {
            template: self.template.clone(),
            memory_mb: self.memory,
            vcpus: self.vcpus,
            network: self.no_network.then_some(false),
            ports: self.ports.clone(),
            labels: super::to_map(&self.labels),
            env: super::to_map(&self.env),
            timeout_secs: self.timeout,
            ..CreateSandboxRequest::default()
        }
    }
}

/// Runs `nova create`.
pub(crate) async fn run(args: &CreateArgs) -> anyhow::Result<ExitCode> {
    let client = Client::from_env()?;
    let view = client.create(&args.request()).await?;
    println!("{}", view.id);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_host_colon_guest() {
        let p = parse_port("8080:80").unwrap();
        assert_eq!((p.host_port, p.guest_port), (8080, 80));
        assert!(parse_port("8080").is_err());
        assert!(parse_port("0:80").is_err());
        assert!(parse_port("a:80").is_err());
    }
}
