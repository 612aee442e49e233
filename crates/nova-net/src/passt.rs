//! The user-mode network: one `passt` process per sandbox, for a host where
//! nova cannot make network namespaces (not root, no CAP_NET_ADMIN).
//!
//! # Design
//!
//! [passt](https://passt.top) is a user-space network stack: it speaks
//! Ethernet frames to the VMM over a stream socket (QEMU's
//! `-netdev stream`) and carries the guest's TCP, UDP and ICMP flows through
//! ordinary sockets of its own on the host, so it needs no privilege. A
//! published port is a listening socket of passt's (`-t`/`-u`), relayed to
//! the guest.
//!
//! ```text
//! UserNetwork::create(id, spec, dir)
//!   refuse an egress policy (passt cannot filter)   -> EgressNeedsNamespace
//!   bind-and-release every published port           -> SpecError::PortUnavailable
//!   socketpair(): one end passt's stdin (-F 0), the other for the VMM
//!   spawn passt -f (own process group), wait until it listens on every port
//!   write <dir>/passt.pid
//! backend: connect_vmm() -> fd for QEMU -netdev stream,addr.type=fd
//!          (a later VMM of the same sandbox: a new passt, same ports)
//! pause() (VMM paused to disk): reap passt, hold the ports until the next
//! teardown() / Drop -> SIGKILL the process group, reap, remove the pidfile
//! adopt(dir) / kill_leftover(dir) -> the PID in <dir>/passt.pid, if passt
//! ```
//!
//! The two ends are a socket pair, not a named socket: as root, passt drops
//! to `nobody` before it would bind a path, and the sandbox directory is
//! closed to that user. With `-F`, passt also serves exactly one client and
//! exits when it goes away, so a VMM that dies takes its passt with it; the
//! pidfile is for a provider that re-attaches a running sandbox
//! ([`UserNetwork::adopt`]) and for leftovers ([`kill_leftover`]).
//!
//! The guest keeps the addresses of the namespace mode — [`GUEST_ADDR`]`/`
//! [`GUEST_PREFIX`], gateway [`GATEWAY_ADDR`] with [`GATEWAY_MAC`] — so a
//! snapshot restores unchanged in either mode. passt does not map the
//! gateway to the host's loopback (`--no-map-gw`): the guest cannot reach
//! services listening on the host's `127.0.0.1`. DHCP, NDP and IPv6 are off
//! (the guest configures itself from the boot contract).
//!
//! # What it cannot do
//!
//! * No egress policy: every flow leaves through the host's own sockets,
//!   so the guest reaches whatever the host's user can, including the
//!   host's non-loopback addresses and `169.254.169.254`. A spec with a
//!   policy other than allow-all is refused ([`CreateNetworkError::EgressNeedsNamespace`]).
//! * No traffic counters of its own ([`UserNetwork`] has none; QEMU keeps
//!   none for a stream netdev either).
//! * Published ports are relayed by passt, so the guest sees connections
//!   from the host's loopback come from its gateway.
//! * A published UDP port answers clients on the host's other addresses
//!   (and remote ones), not on its loopback: passt (0.0~git20230309)
//!   rewrites a loopback source to the gateway, and with `--no-map-gw` it
//!   sends the guest's replies to the gateway address itself, which
//!   reaches no one. TCP is not affected.
//! * DNS: the guest is given the spec's servers, which it reaches through
//!   passt's sockets like any address; when there are none (the host has a
//!   loopback resolver only) the runtime sets [`UserOptions::dns_forward`]
//!   and the guest asks its gateway.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nova_core::SandboxId;

use crate::error::{CreateNetworkError, HostError, SpecError};
use crate::spec::{EgressPolicy, NetworkSpec, PortReservation, Protocol, reserve_ports};
use crate::{GATEWAY_ADDR, GATEWAY_MAC, GUEST_ADDR, GUEST_PREFIX};

/// The passt binary nova runs (looked up on `PATH`).
pub const PASST_BIN: &str = "passt";
/// The file in the sandbox directory holding passt's PID.
pub const PIDFILE: &str = "passt.pid";
/// The file in the sandbox directory holding passt's messages.
pub const LOG_FILE: &str = "passt.log";
/// How long passt may take to listen on every published port.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this much of passt's log is quoted in an error.
const LOG_QUOTE_BYTES: u64 = 2048;

/// What a user-mode network is started with beyond its spec.
#[derive(Clone, Debug)]
pub struct UserOptions {
    /// The guest's MTU, given to passt (`-m`).
    pub mtu: u16,
    /// The resolver the guest's queries to the gateway's port 53 go to
    /// (`--dns-forward`); `None`: no forwarding (the guest is given
    /// resolvers it reaches directly, through passt's sockets).
    pub dns_forward: Option<Ipv4Addr>,
    /// The passt binary: [`PASST_BIN`] on `PATH` unless set.
    pub program: PathBuf,
}

impl Default for UserOptions {
    fn default() -> Self {
        Self {
            mtu: 1500,
            dns_forward: None,
            program: PathBuf::from(PASST_BIN),
        }
    }
}

/// A sandbox's user-mode network: its passt process and, until the VMM
/// takes it, the VMM's end of the socket pair. Dropping it kills passt.
#[derive(Debug)]
pub struct UserNetwork {
    id: SandboxId,
    spec: NetworkSpec,
    options: UserOptions,
    dir: PathBuf,
    running: Mutex<Running>,
}

/// What runs now: passt, and the VMM's end of its socket pair until taken.
#[derive(Debug, Default)]
struct Running {
    process: Option<Passt>,
    vmm_socket: Option<OwnedFd>,
    /// The published ports, bound here while no passt runs between two
    /// VMMs ([`UserNetwork::pause`]), so no one else takes them.
    held: Option<PortReservation>,
}

/// The passt process: spawned here (reaped here), or adopted from a dead
/// provider (its parent is gone; init reaps it).
#[derive(Debug)]
enum Passt {
    Spawned(Child),
    Adopted(u32),
}

impl Passt {
    fn pid(&self) -> u32 {
        match self {
            Passt::Spawned(child) => child.id(),
            Passt::Adopted(pid) => *pid,
        }
    }
}

impl UserNetwork {
    /// Starts the user-mode network of sandbox `id`, whose directory is
    /// `dir` (the pidfile and passt's log go there).
    ///
    /// # Errors
    ///
    /// * [`CreateNetworkError::Spec`]: the spec is invalid, or a published
    ///   port cannot be bound (in use, or not the host's address), naming
    ///   the port — checked before passt starts.
    /// * [`CreateNetworkError::EgressNeedsNamespace`]: the spec's egress
    ///   policy is not allow-all.
    /// * [`CreateNetworkError::Passt`]: passt could not be started, exited,
    ///   or did not listen on every port in time; its own message is quoted.
    ///
    /// Nothing is left behind on error: passt is killed, the pidfile removed.
    pub fn create(
        id: &SandboxId,
        spec: &NetworkSpec,
        dir: &Path,
        options: &UserOptions,
    ) -> Result<Self, CreateNetworkError> {
        spec.validate()?;
        if spec.egress != EgressPolicy::default() {
            return Err(CreateNetworkError::EgressNeedsNamespace);
        }
        spec.check_ports_free()?;
        let net = Self {
            id: id.clone(),
            spec: spec.clone(),
            options: options.clone(),
            dir: dir.to_owned(),
            running: Mutex::new(Running::default()),
        };
        let running = net.start()?;
        *net.lock() = running;
        Ok(net)
    }

    /// Takes over the passt of a running sandbox whose provider died: the
    /// PID in `dir`'s pidfile, checked to be a passt process. The VMM
    /// already holds its end of the socket pair.
    pub fn adopt(
        id: &SandboxId,
        spec: &NetworkSpec,
        dir: &Path,
        options: &UserOptions,
    ) -> Result<Self, HostError> {
        let pidfile = dir.join(PIDFILE);
        let pid = read_passt_pid(&pidfile)?.ok_or_else(|| HostError::NotFound {
            op: format!("a running passt named by {}", pidfile.display()),
        })?;
        Ok(Self {
            id: id.clone(),
            spec: spec.clone(),
            options: options.clone(),
            dir: dir.to_owned(),
            running: Mutex::new(Running {
                process: Some(Passt::Adopted(pid)),
                vmm_socket: None,
                held: None,
            }),
        })
    }

    /// The VMM's end of a socket pair to passt: a connected stream socket
    /// for QEMU's `-netdev stream,addr.type=fd`. The first call takes the
    /// one [`create`](Self::create) made; a later one (a VMM started again
    /// for the same sandbox, whose old VMM's passt exited with it) starts a
    /// new passt, with the same ports.
    ///
    /// # Errors
    ///
    /// As [`create`](Self::create), when a new passt cannot be started.
    pub fn connect_vmm(&self) -> Result<OwnedFd, CreateNetworkError> {
        if let Some(fd) = self.lock().vmm_socket.take() {
            return Ok(fd);
        }
        // Let go of the ports (held since a pause) just before passt binds
        // them.
        let old = std::mem::take(&mut *self.lock());
        self.stop_running(old);
        let mut running = self.start()?;
        let fd = running
            .vmm_socket
            .take()
            .expect("start() returns the VMM's end of the socket pair");
        *self.lock() = running;
        Ok(fd)
    }

    /// passt's PID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.lock().process.as_ref().map(Passt::pid)
    }

    /// The sandbox's id.
    pub fn id(&self) -> &SandboxId {
        &self.id
    }

    /// The spec in force.
    pub fn spec(&self) -> &NetworkSpec {
        &self.spec
    }

    /// The guest's address and prefix length: the namespace mode's.
    pub fn guest_addr(&self) -> (Ipv4Addr, u8) {
        (GUEST_ADDR, GUEST_PREFIX)
    }

    /// The guest's gateway: the namespace mode's.
    pub fn gateway(&self) -> Ipv4Addr {
        GATEWAY_ADDR
    }

    /// The resolvers the guest is told to use: the spec's, reached through
    /// passt's sockets; with none and [`UserOptions::dns_forward`] set, the
    /// gateway, whose port 53 passt forwards to that resolver.
    pub fn guest_dns(&self) -> Vec<Ipv4Addr> {
        match (self.spec.dns_servers.is_empty(), self.options.dns_forward) {
            (true, Some(_)) => vec![GATEWAY_ADDR],
            _ => self.spec.dns_servers.clone(),
        }
    }

    /// Kills passt (its process group), reaps it if it is this process's
    /// child, removes the pidfile. Idempotent.
    pub fn teardown(&mut self) {
        let running = std::mem::take(&mut *self.lock());
        self.stop_running(running);
    }

    /// For a network whose VMM went away for a while (a pause to disk):
    /// its passt, which exits with the VMM, is reaped now, the published
    /// ports stay bound here (as the namespace mode holds them), and the
    /// next [`connect_vmm`](Self::connect_vmm) starts a new passt on them.
    pub fn pause(&self) {
        let running = std::mem::take(&mut *self.lock());
        self.stop_running(running);
        match reserve_ports(&self.spec.ports) {
            Ok(held) => self.lock().held = Some(held),
            Err(e) => {
                tracing::warn!(sandbox = %self.id, error = %e, "a published port was taken while passt restarted");
            }
        }
    }

    /// Lets passt run on (a provider leaving its sandboxes running).
    pub fn forget(self) {
        let running = std::mem::take(&mut *self.lock());
        if let Some(Passt::Spawned(child)) = running.process {
            // Not reaped here: the process outlives this one.
            drop(child);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Running> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pidfile(&self) -> PathBuf {
        self.dir.join(PIDFILE)
    }

    /// Spawns passt on a new socket pair, waits until it listens on every
    /// published port, writes the pidfile.
    fn start(&self) -> Result<Running, CreateNetworkError> {
        let (vmm_end, passt_end) = UnixStream::pair()
            .map_err(|e| HostError::io("creating the socket pair for passt", e))?;
        let log_path = self.dir.join(LOG_FILE);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| HostError::io(format!("opening {}", log_path.display()), e))?;
        let mut command = Command::new(&self.options.program);
        command
            .args(passt_args(&self.spec, &self.options))
            .stdin(Stdio::from(OwnedFd::from(passt_end)))
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            // Its own group: a signal to the caller's group (a terminal's
            // Ctrl-C) does not reach it, and teardown kills the whole group.
            .process_group(0);
        let child = command
            .spawn()
            .map_err(|source| CreateNetworkError::Passt {
                reason: format!(
                    "cannot run {}: {source}; install passt (apt-get install passt) or run as \
                 root for the namespace network",
                    self.options.program.display()
                ),
            })?;
        let mut running = Running {
            process: Some(Passt::Spawned(child)),
            vmm_socket: Some(OwnedFd::from(vmm_end)),
            held: None,
        };
        if let Err(reason) = wait_ready(&mut running, &self.spec) {
            self.stop_running(running);
            let said = quote_log(&log_path);
            // A port taken between the check and passt's bind.
            if let Some(e) = port_error_from(&self.spec, &said) {
                return Err(e.into());
            }
            return Err(CreateNetworkError::Passt {
                reason: format!("{reason}{said}"),
            });
        }
        let pid = running.process.as_ref().map(Passt::pid).unwrap_or_default();
        if let Err(e) = std::fs::write(self.pidfile(), format!("{pid}\n")) {
            self.stop_running(running);
            return Err(HostError::io(format!("writing {}", self.pidfile().display()), e).into());
        }
        tracing::debug!(sandbox = %self.id, pid, ports = self.spec.ports.len(), "passt started");
        Ok(running)
    }

    /// Kills what `running` holds and removes the pidfile.
    fn stop_running(&self, running: Running) {
        drop(running.vmm_socket);
        drop(running.held);
        match running.process {
            Some(Passt::Spawned(mut child)) => {
                kill_group(child.id());
                // SIGKILL cannot be caught: the wait is immediate.
                if let Err(e) = child.wait() {
                    tracing::warn!(sandbox = %self.id, error = %e, "cannot reap passt");
                }
            }
            Some(Passt::Adopted(pid)) => {
                // Only if it is still passt: the PID may have been reused.
                if is_passt(pid) {
                    kill_group(pid);
                }
            }
            None => return,
        }
        let pidfile = self.pidfile();
        if let Err(e) = std::fs::remove_file(&pidfile)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %pidfile.display(), error = %e, "cannot remove passt's pidfile");
        }
    }
}

/// Polls until passt listens on every published port; an error says why
/// not (it exited, or time ran out).
fn wait_ready(running: &mut Running, spec: &NetworkSpec) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(Passt::Spawned(child)) = running.process.as_mut() {
            match child.try_wait() {
                Ok(Some(status)) => return Err(format!("passt exited at start ({status})")),
                Ok(None) => {}
                Err(e) => return Err(format!("cannot wait for passt: {e}")),
            }
        }
        match listening_ports() {
            Ok(listening) => {
                if spec.ports.iter().all(|p| {
                    listening
                        .iter()
                        .any(|(proto, port)| *proto == p.protocol && *port == p.host_port)
                }) {
                    return Ok(());
                }
            }
            // Off Linux there is no /proc to ask: passt's own exit is the
            // only failure seen.
            Err(_) if !cfg!(target_os = "linux") => return Ok(()),
            Err(e) => return Err(format!("cannot read the host's listening sockets: {e}")),
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "passt did not listen on every published port within {READY_TIMEOUT:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Drop for UserNetwork {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// passt's command line for `spec`: foreground, IPv4 only, the guest link
/// of the namespace mode, no DHCP/NDP/RA, no gateway mapping to the host,
/// the published ports, the socket on stdin.
pub fn passt_args(spec: &NetworkSpec, options: &UserOptions) -> Vec<String> {
    let mac = GATEWAY_MAC
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let mut args: Vec<String> = [
        "--foreground",
        "--quiet",
        "--ipv4-only",
        "--fd",
        "0",
        "--address",
        &GUEST_ADDR.to_string(),
        "--netmask",
        &GUEST_PREFIX.to_string(),
        "--gateway",
        &GATEWAY_ADDR.to_string(),
        "--mac-addr",
        &mac,
        "--mtu",
        &options.mtu.to_string(),
        "--no-map-gw",
        "--no-dhcp",
        "--no-dhcpv6",
        "--no-ndp",
        "--no-ra",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    if let Some(dns) = options.dns_forward {
        args.extend([
            "--dns-forward".to_owned(),
            GATEWAY_ADDR.to_string(),
            "--dns".to_owned(),
            dns.to_string(),
        ]);
    }
    for p in &spec.ports {
        let flag = match p.protocol {
            Protocol::Tcp => "-t",
            Protocol::Udp => "-u",
        };
        let at = if p.host_ip.is_unspecified() {
            String::new()
        } else {
            format!("{}/", p.host_ip)
        };
        args.push(flag.to_owned());
        args.push(format!("{at}{}:{}", p.host_port, p.guest_port));
    }
    args
}

/// Kills the passt named by the pidfile in `dir`, if one runs: what a
/// sandbox that died with its provider left. Returns its PID.
pub fn kill_leftover(dir: &Path) -> Option<u32> {
    let pidfile = dir.join(PIDFILE);
    let pid = read_passt_pid(&pidfile).ok().flatten()?;
    kill_group(pid);
    let _ = std::fs::remove_file(&pidfile);
    Some(pid)
}

/// The PID in `pidfile` when it names a running passt; `None` when the
/// file is missing or the process is gone (or is something else now).
fn read_passt_pid(pidfile: &Path) -> Result<Option<u32>, HostError> {
    let text = match std::fs::read_to_string(pidfile) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(HostError::io(format!("reading {}", pidfile.display()), e)),
    };
    let pid: u32 = text.trim().parse().map_err(|_| {
        HostError::io(
            format!("reading {}", pidfile.display()),
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not a PID"),
        )
    })?;
    Ok(is_passt(pid).then_some(pid))
}

/// Whether `pid` runs passt (its name is `passt` or, after passt re-executes
/// itself, `passt.avx2`).
fn is_passt(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|comm| comm.trim_end().starts_with("passt"))
}

/// The PIDs of every passt process on the host (for tests and `doctor`).
pub fn passt_pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| is_passt(*pid))
        .collect()
}

fn kill_group(pid: u32) {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    // passt leads its own group (it was spawned with process_group(0)).
    if rustix::process::kill_process_group(pid, rustix::process::Signal::KILL).is_err() {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

/// The TCP ports in LISTEN and the UDP ports bound on the host (IPv4), from
/// `/proc/net/{tcp,udp}`.
fn listening_ports() -> std::io::Result<Vec<(Protocol, u16)>> {
    let mut out = Vec::new();
    for (proto, file, state) in [
        (Protocol::Tcp, "/proc/net/tcp", "0A"),
        (Protocol::Udp, "/proc/net/udp", "07"),
    ] {
        let text = std::fs::read_to_string(file)?;
        for line in text.lines().skip(1) {
            let mut fields = line.split_whitespace();
            let (Some(local), Some(_remote), Some(st)) =
                (fields.nth(1), fields.next(), fields.next())
            else {
                continue;
            };
            if st != state {
                continue;
            }
            if let Some(port) = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
            {
                out.push((proto, port));
            }
        }
    }
    Ok(out)
}

/// The end of passt's log, for an error message: its own lines, without
/// the noise of a host with no syslog.
fn quote_log(path: &Path) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(LOG_QUOTE_BYTES)));
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("Failed to send") && !l.contains("Changing to nobody")
        })
        .collect();
    if lines.is_empty() {
        String::new()
    } else {
        format!("; passt said: {}", lines.join(" / "))
    }
}

/// A spec error for a port passt refused, when its log names one (passt
/// says `Failed to bind any port for '-t 8080:80'`).
pub fn port_error_from(spec: &NetworkSpec, message: &str) -> Option<SpecError> {
    let (i, p) = spec
        .ports
        .iter()
        .enumerate()
        .find(|(_, p)| message.contains(&format!("{}:{}'", p.host_port, p.guest_port)))?;
    Some(SpecError::PortUnavailable {
        field: format!("ports[{i}].host_port"),
        port: p.host_port,
        protocol: p.protocol,
        host_ip: p.host_ip,
        source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PortMapping;

    #[test]
    fn the_command_line_gives_the_namespace_modes_link_and_every_port() {
        let spec = NetworkSpec {
            ports: vec![
                PortMapping::tcp(8080, 80),
                PortMapping::udp(5353, 53).on(Ipv4Addr::LOCALHOST),
            ],
            ..Default::default()
        };
        let args = passt_args(&spec, &UserOptions::default());
        let after = |flag: &str| -> Vec<&str> {
            args.windows(2)
                .filter(|w| w[0] == flag)
                .map(|w| w[1].as_str())
                .collect()
        };
        assert_eq!(after("--address"), ["169.254.0.21"]);
        assert_eq!(after("--netmask"), ["30"]);
        assert_eq!(after("--gateway"), ["169.254.0.22"]);
        assert_eq!(after("--mac-addr"), ["02:4e:4f:56:41:01"]);
        assert_eq!(after("--fd"), ["0"]);
        assert_eq!(after("-t"), ["8080:80"]);
        assert_eq!(after("-u"), ["127.0.0.1/5353:53"]);
        assert!(args.iter().any(|a| a == "--no-map-gw"));
        assert!(!args.iter().any(|a| a == "--dns-forward"));
        let forwarded = passt_args(
            &spec,
            &UserOptions {
                dns_forward: Some(Ipv4Addr::new(127, 0, 0, 53)),
                ..Default::default()
            },
        );
        let i = forwarded
            .iter()
            .position(|a| a == "--dns-forward")
            .expect("--dns-forward is given");
        assert_eq!(forwarded[i + 1], "169.254.0.22");
    }

    #[test]
    fn an_egress_policy_is_refused_before_anything_starts() {
        let spec = NetworkSpec {
            egress: EgressPolicy::block_all(),
            ..Default::default()
        };
        let dir = std::env::temp_dir().join(format!("nova-passt-unit-{}", std::process::id()));
        let e = UserNetwork::create(&SandboxId::random(), &spec, &dir, &UserOptions::default())
            .expect_err("a policy cannot be enforced by passt");
        assert!(
            matches!(e, CreateNetworkError::EgressNeedsNamespace),
            "{e:?}"
        );
        assert!(!dir.exists(), "nothing was made");
    }

    #[test]
    fn a_missing_passt_is_a_clear_error_and_leaves_nothing() {
        let dir = std::env::temp_dir().join(format!("nova-passt-missing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let e = UserNetwork::create(
            &SandboxId::random(),
            &NetworkSpec::default(),
            &dir,
            &UserOptions {
                program: dir.join("no-such-passt"),
                ..Default::default()
            },
        )
        .expect_err("no binary");
        assert!(
            matches!(&e, CreateNetworkError::Passt { reason } if reason.contains("apt-get install passt")),
            "{e}"
        );
        assert!(!dir.join(PIDFILE).exists());
        std::fs::remove_dir_all(&dir).expect("remove temp dir");
    }

    /// A passt a dead provider left (forgotten, not killed) is found by its
    /// pidfile and killed; a pidfile naming no passt is left alone.
    #[test]
    fn a_leftover_passt_is_killed_by_its_pidfile() {
        if !std::process::Command::new(PASST_BIN)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            eprintln!("SKIP a_leftover_passt_is_killed_by_its_pidfile: passt is not installed");
            return;
        }
        let dir = std::env::temp_dir().join(format!("nova-passt-leftover-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let spec = NetworkSpec {
            ports: vec![PortMapping::tcp(port, 80).on(Ipv4Addr::LOCALHOST)],
            ..Default::default()
        };
        let net = UserNetwork::create(&SandboxId::random(), &spec, &dir, &UserOptions::default())
            .expect("passt starts");
        let pid = net.pid().expect("running");
        assert!(
            listening_ports()
                .expect("/proc/net/tcp")
                .contains(&(Protocol::Tcp, port)),
            "passt listens on the published port"
        );
        // The VMM's end stays open (as in a running VMM) while forgotten.
        let vmm_end = net.connect_vmm().expect("the VMM's end");
        net.forget();
        assert!(is_passt(pid), "a forgotten passt runs on");
        assert_eq!(kill_leftover(&dir), Some(pid));
        assert!(!dir.join(PIDFILE).exists());
        drop(vmm_end);
        // It was this process's child: reap it, then it is gone.
        let gone = (0..500).any(|_| {
            let _ = rustix::process::waitpid(
                rustix::process::Pid::from_raw(pid as i32),
                rustix::process::WaitOptions::NOHANG,
            );
            let alive = is_passt(pid);
            if alive {
                std::thread::sleep(Duration::from_millis(10));
            }
            !alive
        });
        assert!(gone, "the leftover passt {pid} was killed");
        assert_eq!(kill_leftover(&dir), None, "nothing is named any more");
        std::fs::remove_dir_all(&dir).expect("remove temp dir");
    }

    #[test]
    fn passts_port_message_names_the_port() {
        let spec = NetworkSpec {
            ports: vec![PortMapping::tcp(8080, 80), PortMapping::tcp(8081, 81)],
            ..Default::default()
        };
        let e = port_error_from(&spec, "Failed to bind any port for '-t 8081:81', exiting")
            .expect("named");
        assert_eq!(e.field(), "ports[1].host_port");
        assert!(port_error_from(&spec, "something else").is_none());
    }

    #[test]
    fn listening_ports_sees_a_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let ports = listening_ports().expect("/proc/net/tcp");
        assert!(ports.contains(&(Protocol::Tcp, port)));
    }
}
