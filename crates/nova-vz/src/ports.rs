//! Published ports under Apple VZ: a relay on the host.
//!
//! VZ's NAT (`VZNATNetworkDeviceAttachment`, vmnet's shared mode) has no
//! port forwarding, but the Mac reaches the guest's NAT address
//! ([`crate::spec::nat_guest_addr`]) directly. So each published port is a
//! socket on the host, `host_ip:host_port`, and a relay:
//!
//! * TCP: every accepted connection gets its own connection to
//!   `guest_addr:guest_port` (bounded by [`RelayLimits::connect_timeout`])
//!   and the bytes are copied both ways ([`copy_bidirectional`]) until
//!   either side closes. At most [`RelayLimits::max_connections`] are
//!   relayed at once per port; one more is accepted and closed at once.
//! * UDP: every client address gets its own socket towards the guest
//!   (at most [`RelayLimits::max_connections`] of them); the guest's
//!   replies go back to that client, and a client the guest has not
//!   answered for [`RelayLimits::udp_idle`] is forgotten.
//!
//! The relays live in the provider's process, owned by the sandbox's
//! [`crate::VzVm`]: the ports are bound in [`crate::Vz`]'s start before the
//! helper is spawned (so a port in use refuses the create, naming it, with
//! nothing running), served once the VM runs, and closed, with every
//! relayed connection, when the VM is released (stop, pause to disk, a
//! failed create) or dropped. A detached provider that goes away takes its
//! relays with it: the VM keeps running, unreachable on its ports.
//!
//! Nothing here is macOS-specific: it is plain tokio, unit-tested on any
//! host against a local server standing in for the guest.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nova_core::network::{PortProtocol, PortSpec};
use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

/// Relayed TCP connections (or UDP clients) per published port, at most.
pub const MAX_CONNECTIONS: usize = 256;

/// How long a relay waits for the guest to accept a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a UDP client the guest does not answer is remembered.
pub const UDP_IDLE: Duration = Duration::from_secs(60);

/// The largest UDP datagram.
const MAX_DATAGRAM: usize = 65_535;

/// How often a relay warns about what clients or the guest cause.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The bounds of every relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayLimits {
    /// Relayed connections (UDP: clients) per port at once.
    pub max_connections: usize,
    /// Connecting to the guest, per connection.
    pub connect_timeout: Duration,
    /// A UDP client without an answer from the guest is forgotten after it.
    pub udp_idle: Duration,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            max_connections: MAX_CONNECTIONS,
            connect_timeout: CONNECT_TIMEOUT,
            udp_idle: UDP_IDLE,
        }
    }
}

/// A published port cannot be bound on the host.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {host_ip}:{port}/{protocol} for the guest's port")]
pub struct RelayBindError {
    /// Its index in the ports given to [`BoundPorts::bind`] (the config's
    /// [`published_ports`](nova_core::config::SandboxConfig::published_ports)).
    pub index: usize,
    /// The host port.
    pub port: u16,
    /// Its protocol.
    pub protocol: PortProtocol,
    /// The host address.
    pub host_ip: Ipv4Addr,
    /// Why (`EADDRINUSE`: in use).
    #[source]
    pub source: io::Error,
}

#[derive(Debug)]
enum Bound {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

/// The host sockets of a sandbox's published ports, bound and not yet
/// served: dropping them closes them at once. The default has none.
#[derive(Debug, Default)]
pub struct BoundPorts {
    sockets: Vec<(Bound, SocketAddr)>,
}

impl BoundPorts {
    /// Binds `host_ip:host_port` of every port in `ports`, each to be relayed
    /// to `guest:guest_port`. On error, the sockets bound so far are closed.
    ///
    /// # Errors
    ///
    /// [`RelayBindError`] naming the first port that cannot be bound.
    pub async fn bind(ports: &[PortSpec], guest: Ipv4Addr) -> Result<Self, RelayBindError> {
        let mut sockets = Vec::with_capacity(ports.len());
        for (index, port) in ports.iter().enumerate() {
            let host = SocketAddrV4::new(port.host_addr(), port.host_port);
            let bound = match port.protocol {
                PortProtocol::Tcp => TcpListener::bind(host).await.map(Bound::Tcp),
                PortProtocol::Udp => UdpSocket::bind(host).await.map(Bound::Udp),
            };
            let bound = bound.map_err(|source| RelayBindError {
                index,
                port: port.host_port,
                protocol: port.protocol,
                host_ip: port.host_addr(),
                source,
            })?;
            sockets.push((bound, SocketAddrV4::new(guest, port.guest_port).into()));
        }
        Ok(Self { sockets })
    }

    /// The host address of each bound port, in order (with the port the
    /// system chose for a `host_port` of 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.sockets
            .iter()
            .filter_map(|(bound, _)| match bound {
                Bound::Tcp(l) => l.local_addr().ok(),
                Bound::Udp(s) => s.local_addr().ok(),
            })
            .collect()
    }

    /// Starts relaying every port (one task each, on the current runtime).
    pub fn serve(self, limits: RelayLimits) -> PortRelays {
        let tasks = self
            .sockets
            .into_iter()
            .map(|(bound, guest)| match bound {
                Bound::Tcp(listener) => tokio::spawn(serve_tcp(listener, guest, limits)),
                Bound::Udp(socket) => tokio::spawn(serve_udp(socket, guest, limits)),
            })
            .collect();
        PortRelays { tasks }
    }
}

/// The running relays of a sandbox's published ports. [`shutdown`]
/// (or dropping it) closes the host sockets and every relayed connection.
///
/// [`shutdown`]: PortRelays::shutdown
#[derive(Debug, Default)]
pub struct PortRelays {
    tasks: Vec<JoinHandle<()>>,
}

impl PortRelays {
    /// Stops every relay and waits until its sockets are closed.
    pub async fn shutdown(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        for task in self.tasks.drain(..) {
            // Cancelled (or, never, panicked): either way it is gone.
            let _ = task.await;
        }
    }
}

impl Drop for PortRelays {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Logs at most one warning per [`WARN_EVERY`], counting the ones skipped:
/// clients and the guest trigger these.
struct Warn {
    last: Option<Instant>,
    skipped: u64,
}

impl Warn {
    fn new() -> Self {
        Self {
            last: None,
            skipped: 0,
        }
    }

    fn warn(&mut self, guest: SocketAddr, what: &str, error: &dyn std::fmt::Display) {
        let now = Instant::now();
        if self.last.is_some_and(|last| now - last < WARN_EVERY) {
            self.skipped += 1;
            return;
        }
        tracing::warn!(%guest, %error, skipped = self.skipped, "published port: {what}");
        self.last = Some(now);
        self.skipped = 0;
    }
}

async fn serve_tcp(listener: TcpListener, guest: SocketAddr, limits: RelayLimits) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    let mut warn = Warn::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    let Ok(permit) = permits.clone().try_acquire_owned() else {
                        warn.warn(guest, "too many connections, one closed", &limits.max_connections);
                        drop(client);
                        continue;
                    };
                    connections.spawn(async move {
                        let relayed = relay_tcp(client, guest, limits.connect_timeout).await;
                        drop(permit);
                        relayed
                    });
                }
                Err(e) => {
                    // Out of descriptors, usually: wait for some to close.
                    warn.warn(guest, "cannot accept a connection", &e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Ok(Err(e)) = done {
                    warn.warn(guest, "cannot reach the guest", &e);
                }
            }
        }
    }
}

/// Relays one connection; an error only when the guest could not be
/// reached (a connection ending badly is the peers' business).
async fn relay_tcp(
    mut client: TcpStream,
    guest: SocketAddr,
    connect_timeout: Duration,
) -> io::Result<()> {
    let mut upstream = tokio::time::timeout(connect_timeout, TcpStream::connect(guest))
        .await
        .map_err(|_| {
            io::Error::new(io::ErrorKind::TimedOut, "the guest did not accept in time")
        })??;
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let _ = copy_bidirectional(&mut client, &mut upstream).await;
    Ok(())
}

async fn serve_udp(socket: UdpSocket, guest: SocketAddr, limits: RelayLimits) {
    let socket = Arc::new(socket);
    let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut replies = JoinSet::new();
    let mut warn = Warn::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        tokio::select! {
            received = socket.recv_from(&mut buf) => {
                let (len, client) = match received {
                    Ok(received) => received,
                    Err(e) => {
                        warn.warn(guest, "cannot receive a datagram", &e);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let upstream = match clients.get(&client) {
                    Some(upstream) => upstream.clone(),
                    None if clients.len() >= limits.max_connections => {
                        warn.warn(guest, "too many UDP clients, a datagram dropped", &limits.max_connections);
                        continue;
                    }
                    None => match udp_upstream(guest).await {
                        Ok(upstream) => {
                            let upstream = Arc::new(upstream);
                            clients.insert(client, upstream.clone());
                            replies.spawn(udp_replies(upstream.clone(), socket.clone(), client, limits.udp_idle));
                            upstream
                        }
                        Err(e) => {
                            warn.warn(guest, "cannot open a socket towards the guest", &e);
                            continue;
                        }
                    },
                };
                if let Err(e) = upstream.send(&buf[..len]).await {
                    warn.warn(guest, "cannot reach the guest", &e);
                }
            }
            Some(done) = replies.join_next(), if !replies.is_empty() => {
                if let Ok(client) = done {
                    clients.remove(&client);
                }
            }
        }
    }
}

async fn udp_upstream(guest: SocketAddr) -> io::Result<UdpSocket> {
    let upstream = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)).await?;
    upstream.connect(guest).await?;
    Ok(upstream)
}

/// Sends the guest's replies on `upstream` back to `client` through the
/// published socket, until the guest is silent for `idle`; returns the
/// client, to be forgotten.
async fn udp_replies(
    upstream: Arc<UdpSocket>,
    host: Arc<UdpSocket>,
    client: SocketAddr,
    idle: Duration,
) -> SocketAddr {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while let Ok(Ok(len)) = tokio::time::timeout(idle, upstream.recv(&mut buf)).await {
        let _ = host.send_to(&buf[..len], client).await;
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A guest stand-in: a TCP echo server on loopback.
    async fn echo_server() -> (SocketAddr, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        (addr, task)
    }

    fn local(guest_port: u16, protocol: PortProtocol) -> PortSpec {
        PortSpec {
            host_port: 0,
            guest_port,
            protocol,
            host_ip: Some(Ipv4Addr::LOCALHOST),
        }
    }

    async fn wait_until(what: &str, mut cond: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond().await {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn echoes(stream: &mut TcpStream, bytes: &[u8]) -> bool {
        if stream.write_all(bytes).await.is_err() {
            return false;
        }
        let mut back = vec![0u8; bytes.len()];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back)).await,
            Ok(Ok(_))
        ) && back == bytes
    }

    /// Whether the peer closed `stream` (EOF or reset) within a while.
    async fn closed(stream: &mut TcpStream) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn tcp_is_relayed_byte_for_byte() {
        let (guest, _server) = echo_server().await;
        let bound = BoundPorts::bind(
            &[local(guest.port(), PortProtocol::Tcp)],
            Ipv4Addr::LOCALHOST,
        )
        .await
        .unwrap();
        let host = bound.local_addrs()[0];
        let _relays = bound.serve(RelayLimits::default());
        let stream = TcpStream::connect(host).await.unwrap();
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 7 + i / 251) as u8).collect();
        let (mut r, mut w) = stream.into_split();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&sent).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut back))
            .await
            .expect("the echo ends once the client's half closes")
            .unwrap();
        writer.await.unwrap();
        assert_eq!(back.len(), data.len());
        assert!(back == data, "the relayed bytes differ");
    }

    #[tokio::test]
    async fn a_port_in_use_is_named_and_nothing_stays_bound() {
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy_port = busy.local_addr().unwrap().port();
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let free_port = free.local_addr().unwrap().port();
        drop(free);
        let ports = [
            PortSpec {
                host_port: free_port,
                ..local(80, PortProtocol::Tcp)
            },
            PortSpec {
                host_port: busy_port,
                ..local(8080, PortProtocol::Tcp)
            },
        ];
        let e = BoundPorts::bind(&ports, Ipv4Addr::LOCALHOST)
            .await
            .unwrap_err();
        assert_eq!((e.index, e.port), (1, busy_port), "{e:?}");
        assert_eq!(e.source.kind(), io::ErrorKind::AddrInUse, "{e:?}");
        assert!(
            e.to_string()
                .contains(&format!("127.0.0.1:{busy_port}/tcp")),
            "{e}"
        );
        // The port bound before the failure was closed again.
        std::net::TcpListener::bind(("127.0.0.1", free_port)).unwrap();
    }

    #[tokio::test]
    async fn shutdown_closes_the_port_and_every_relayed_connection() {
        let (guest, _server) = echo_server().await;
        let bound = BoundPorts::bind(
            &[local(guest.port(), PortProtocol::Tcp)],
            Ipv4Addr::LOCALHOST,
        )
        .await
        .unwrap();
        let host = bound.local_addrs()[0];
        let mut relays = bound.serve(RelayLimits::default());
        let mut stream = TcpStream::connect(host).await.unwrap();
        assert!(echoes(&mut stream, b"hello").await);
        relays.shutdown().await;
        assert!(
            closed(&mut stream).await,
            "the relayed connection stays open"
        );
        assert!(
            TcpStream::connect(host).await.is_err(),
            "the port still listens"
        );
        std::net::TcpListener::bind(host).unwrap();
    }

    #[tokio::test]
    async fn dropping_the_relays_closes_the_port() {
        let (guest, _server) = echo_server().await;
        let bound = BoundPorts::bind(
            &[local(guest.port(), PortProtocol::Tcp)],
            Ipv4Addr::LOCALHOST,
        )
        .await
        .unwrap();
        let host = bound.local_addrs()[0];
        let relays = bound.serve(RelayLimits::default());
        let mut stream = TcpStream::connect(host).await.unwrap();
        assert!(echoes(&mut stream, b"hello").await);
        drop(relays);
        assert!(
            closed(&mut stream).await,
            "the relayed connection stays open"
        );
        wait_until("the port is free", async || {
            std::net::TcpListener::bind(host).is_ok()
        })
        .await;
    }

    #[tokio::test]
    async fn connections_past_the_cap_are_closed_until_one_ends() {
        let (guest, _server) = echo_server().await;
        let bound = BoundPorts::bind(
            &[local(guest.port(), PortProtocol::Tcp)],
            Ipv4Addr::LOCALHOST,
        )
        .await
        .unwrap();
        let host = bound.local_addrs()[0];
        let _relays = bound.serve(RelayLimits {
            max_connections: 2,
            ..RelayLimits::default()
        });
        let mut first = TcpStream::connect(host).await.unwrap();
        let mut second = TcpStream::connect(host).await.unwrap();
        assert!(echoes(&mut first, b"1").await);
        assert!(echoes(&mut second, b"2").await);
        let mut third = TcpStream::connect(host).await.unwrap();
        assert!(closed(&mut third).await, "a third connection was relayed");
        drop(first);
        wait_until("a connection is relayed again", async || {
            let Ok(mut next) = TcpStream::connect(host).await else {
                return false;
            };
            echoes(&mut next, b"3").await
        })
        .await;
        assert!(echoes(&mut second, b"still").await);
    }

    #[tokio::test]
    async fn a_guest_that_does_not_listen_closes_the_connection() {
        let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let guest_port = gone.local_addr().unwrap().port();
        drop(gone);
        let bound = BoundPorts::bind(&[local(guest_port, PortProtocol::Tcp)], Ipv4Addr::LOCALHOST)
            .await
            .unwrap();
        let host = bound.local_addrs()[0];
        let _relays = bound.serve(RelayLimits::default());
        let mut stream = TcpStream::connect(host).await.unwrap();
        assert!(closed(&mut stream).await);
    }

    #[tokio::test]
    async fn udp_datagrams_are_relayed_and_answered() {
        let guest = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let guest_port = guest.local_addr().unwrap().port();
        let _server = tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((len, from)) = guest.recv_from(&mut buf).await {
                let _ = guest.send_to(&buf[..len], from).await;
            }
        });
        let bound = BoundPorts::bind(&[local(guest_port, PortProtocol::Udp)], Ipv4Addr::LOCALHOST)
            .await
            .unwrap();
        let host = bound.local_addrs()[0];
        let mut relays = bound.serve(RelayLimits::default());
        for n in 0..2u8 {
            let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            client.connect(host).await.unwrap();
            let datagram = [n; 1200];
            client.send(&datagram).await.unwrap();
            let mut back = [0u8; 2048];
            let len = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut back))
                .await
                .expect("the guest's answer is relayed back")
                .unwrap();
            assert_eq!(&back[..len], &datagram);
        }
        relays.shutdown().await;
        UdpSocket::bind(host).await.unwrap();
    }
}
