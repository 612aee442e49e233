//! Test hosts in namespaces, for this crate's tests and for end-to-end tests
//! of the crates above it.
//!
//! A [`TestHost`] is a namespace of its own joined to the host by a veth
//! with a `/30` (host `.1`, test host `.2`) and **no default route**: it can
//! answer what reaches it and send nothing anywhere else. Tests send traffic
//! only to loopback and to such hosts, never off the machine.
//! [`serve_http`] answers every request with a fixed body, [`serve_udp_echo`]
//! sends datagrams back; [`http_get`] is a client that runs inside a
//! namespace (a sandbox's guest, a test host).
//! [`serve_dns`] is an authoritative test resolver for a fixed list of
//! names, and [`resolve`] a DNS client that runs inside a namespace.
//! [`Namespace`] is a bare namespace removed on drop (the guest of a
//! [`GuestLink::Veth`](crate::GuestLink::Veth) sandbox).

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::HostError;
use crate::netns::{self, CreateNetnsError};
use crate::spec::Ipv4Cidr;
use crate::{firewall, link};

/// A named namespace under `/run/netns`, removed on drop.
#[derive(Debug)]
pub struct Namespace {
    name: String,
    path: PathBuf,
}

impl Namespace {
    /// Creates `/run/netns/<name>` (replacing a leftover of the same name)
    /// with loopback up.
    pub async fn create(name: &str) -> Result<Self, HostError> {
        let _ = netns::delete(name);
        let path = match netns::create(name) {
            Ok(p) => p,
            Err(CreateNetnsError::Exists) => {
                return Err(HostError::io(
                    format!("namespace {name}"),
                    io::Error::from(io::ErrorKind::AlreadyExists),
                ));
            }
            Err(CreateNetnsError::Host(e)) => return Err(e),
        };
        let ns = Self {
            name: name.to_owned(),
            path,
        };
        netns::run_in_async(&ns.path, "loopback up", || async {
            let h = link::connect()?;
            let lo = link::index(&h, "lo").await?;
            link::up(&h, lo, "lo").await
        })
        .await?;
        Ok(ns)
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = netns::delete(&self.name);
    }
}

/// A test host: a namespace joined to the host by a veth, with no route
/// beyond its `/30`.
#[derive(Debug)]
pub struct TestHost {
    ns: Namespace,
    veth: String,
    host_side: Ipv4Addr,
    addr: Ipv4Addr,
}

impl TestHost {
    /// Creates test host `name` on `subnet` (a `/30`): host side `.1`, the
    /// test host `.2`. `veth` names the host end (15 bytes at most).
    pub async fn create(name: &str, veth: &str, subnet: Ipv4Cidr) -> Result<Self, HostError> {
        let ns = Namespace::create(name).await?;
        let base = u32::from(subnet.addr());
        let host_side = Ipv4Addr::from(base + 1);
        let addr = Ipv4Addr::from(base + 2);
        let h = link::connect()?;
        let _ = link::delete(&h, veth).await;
        let fd = netns::open(ns.path())?;
        let index = link::add_veth(&h, veth, "eth0", fd.as_raw_fd(), "nova-test").await?;
        link::add_address(&h, index, veth, host_side, 30).await?;
        link::up(&h, index, veth).await?;
        netns::run_in_async(ns.path(), "configuring a test host", move || async move {
            let h = link::connect()?;
            let eth0 = link::index(&h, "eth0").await?;
            link::add_address(&h, eth0, "eth0", addr, 30).await?;
            link::up(&h, eth0, "eth0").await
        })
        .await?;
        Ok(Self {
            ns,
            veth: veth.to_owned(),
            host_side,
            addr,
        })
    }

    /// The test host's address (`.2`).
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The host's address on the test host's link (`.1`).
    pub fn host_side(&self) -> Ipv4Addr {
        self.host_side
    }

    /// The test host's namespace.
    pub fn netns(&self) -> &Path {
        self.ns.path()
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let veth = self.veth.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                let _ = rt.block_on(async {
                    let h = link::connect()?;
                    link::delete(&h, &veth).await
                });
            }
        })
        .join();
    }
}

/// A test server's thread, running until its `Worker` is dropped; its loop
/// polls the flag it is given.
#[derive(Debug)]
struct Worker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    fn spawn(run: impl FnOnce(&AtomicBool) + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || run(&flag));
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An HTTP server answering every request with a fixed body, until dropped.
#[derive(Debug)]
pub struct HttpServer {
    addr: SocketAddrV4,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    _worker: Worker,
}

impl HttpServer {
    /// Where it listens.
    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    /// The source addresses of the connections it served.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Serves `body` over HTTP/1.0 on `addr`, bound inside the namespace at
/// `netns` (`None`: the host's).
pub async fn serve_http(
    netns: Option<&Path>,
    addr: SocketAddrV4,
    body: Vec<u8>,
) -> Result<HttpServer, HostError> {
    let bind = move || {
        let l = TcpListener::bind(addr).map_err(|e| HostError::io(format!("binding {addr}"), e))?;
        l.set_nonblocking(true)
            .map_err(|e| HostError::io("set_nonblocking", e))?;
        Ok(l)
    };
    let listener = match netns {
        Some(path) => netns::run_in(path, "binding a test server", bind).await?,
        None => bind()?,
    };
    let addr = match listener.local_addr() {
        Ok(SocketAddr::V4(a)) => a,
        Ok(SocketAddr::V6(_)) => addr,
        Err(e) => return Err(HostError::io("local_addr", e)),
    };
    let peers = Arc::new(Mutex::new(Vec::new()));
    let worker = {
        let peers = peers.clone();
        Worker::spawn(move |stop| {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        peers
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(peer);
                        let _ = answer(stream, &body);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        })
    };
    Ok(HttpServer {
        addr,
        peers,
        _worker: worker,
    })
}

fn answer(mut stream: TcpStream, body: &[u8]) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 64 * 1024 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    write!(
        stream,
        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body)?;
    stream.flush()
}

/// A UDP server that sends every datagram back, until dropped.
#[derive(Debug)]
pub struct UdpEcho {
    addr: SocketAddrV4,
    _worker: Worker,
}

impl UdpEcho {
    /// Where it listens.
    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }
}

/// Echoes UDP datagrams on `addr`, bound inside the namespace at `netns`.
pub async fn serve_udp_echo(netns: &Path, addr: SocketAddrV4) -> Result<UdpEcho, HostError> {
    let socket = netns::run_in(netns, "binding a UDP echo server", move || {
        let s =
            UdpSocket::bind(addr).map_err(|e| HostError::io(format!("binding udp {addr}"), e))?;
        s.set_read_timeout(Some(Duration::from_millis(20)))
            .map_err(|e| HostError::io("set_read_timeout", e))?;
        Ok(s)
    })
    .await?;
    let worker = Worker::spawn(move |stop| {
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&buf[..n], peer);
            }
        }
    });
    Ok(UdpEcho {
        addr,
        _worker: worker,
    })
}

/// A test DNS server answering A queries for a fixed list of names, until
/// dropped.
#[derive(Debug)]
pub struct DnsServer {
    addr: SocketAddrV4,
    queries: Arc<Mutex<Vec<String>>>,
    _worker: Worker,
}

impl DnsServer {
    /// Where it listens (UDP).
    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    /// The names it was asked, lowercase, without the trailing dot.
    pub fn queries(&self) -> Vec<String> {
        self.queries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Serves DNS over UDP on `addr`, bound inside the namespace at `netns`:
/// an A query for a name in `records` gets its address (TTL `ttl`
/// seconds), any other query `NXDOMAIN`.
pub async fn serve_dns(
    netns: &Path,
    addr: SocketAddrV4,
    records: Vec<(String, Ipv4Addr)>,
    ttl: u32,
) -> Result<DnsServer, HostError> {
    let socket = netns::run_in(netns, "binding a test DNS server", move || {
        let s =
            UdpSocket::bind(addr).map_err(|e| HostError::io(format!("binding udp {addr}"), e))?;
        s.set_read_timeout(Some(Duration::from_millis(20)))
            .map_err(|e| HostError::io("set_read_timeout", e))?;
        Ok(s)
    })
    .await?;
    let queries = Arc::new(Mutex::new(Vec::new()));
    let worker = {
        let queries = queries.clone();
        Worker::spawn(move |stop| {
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                if let Some(reply) = dns_reply(&buf[..n], &records, ttl, &queries) {
                    let _ = socket.send_to(&reply, peer);
                }
            }
        })
    };
    Ok(DnsServer {
        addr,
        queries,
        _worker: worker,
    })
}

fn dns_reply(
    query: &[u8],
    records: &[(String, Ipv4Addr)],
    ttl: u32,
    log: &Mutex<Vec<String>>,
) -> Option<Vec<u8>> {
    use hickory_proto::op::{Message, MessageType, ResponseCode};
    use hickory_proto::rr::{RData, Record, RecordType, rdata::A};
    let request = Message::from_vec(query).ok()?;
    let question = request.queries().first()?.clone();
    let name = question.name().to_ascii().to_ascii_lowercase();
    let name = name.trim_end_matches('.').to_owned();
    log.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(name.clone());
    let mut reply = Message::new();
    reply
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(request.op_code())
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(true)
        .add_query(question.clone());
    match records.iter().find(|(n, _)| *n == name) {
        Some((_, ip)) => {
            if question.query_type() == RecordType::A {
                reply.add_answer(Record::from_rdata(
                    question.name().clone(),
                    ttl,
                    RData::A(A(*ip)),
                ));
            }
        }
        None => {
            reply.set_response_code(ResponseCode::NXDomain);
        }
    }
    reply.to_vec().ok()
}

/// What [`resolve`] got: the response code and the A records' addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsAnswer {
    /// `NoError`, `NXDomain`, ...
    pub code: hickory_proto::op::ResponseCode,
    /// The addresses of the A records in the answer section.
    pub addrs: Vec<Ipv4Addr>,
}

/// Asks `server:53` for the A records of `name` from inside the namespace
/// at `netns`, over UDP or (`tcp`) TCP, waiting `timeout`.
pub async fn resolve(
    netns: &Path,
    server: Ipv4Addr,
    name: &str,
    tcp: bool,
    timeout: Duration,
) -> Result<DnsAnswer, HostError> {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    let qname = Name::from_ascii(name).map_err(|e| {
        HostError::io(
            format!("{name} as a DNS name"),
            io::Error::new(io::ErrorKind::InvalidInput, e),
        )
    })?;
    let mut query = Message::new();
    query
        .set_id(0x4e56)
        .set_recursion_desired(true)
        .add_query(Query::query(qname, RecordType::A));
    let bytes = query
        .to_vec()
        .map_err(|e| HostError::io("encoding a DNS query", io::Error::other(e)))?;
    let to = SocketAddr::from((server, 53));
    let exchange = move || -> io::Result<Vec<u8>> {
        if tcp {
            let mut stream = TcpStream::connect_timeout(&to, timeout)?;
            stream.set_read_timeout(Some(timeout))?;
            let len = u16::try_from(bytes.len()).map_err(io::Error::other)?;
            stream.write_all(&len.to_be_bytes())?;
            stream.write_all(&bytes)?;
            let mut len = [0u8; 2];
            stream.read_exact(&mut len)?;
            let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
            stream.read_exact(&mut reply)?;
            Ok(reply)
        } else {
            let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            socket.set_read_timeout(Some(timeout))?;
            socket.send_to(&bytes, to)?;
            let mut buf = [0u8; 4096];
            let (n, _) = socket.recv_from(&mut buf)?;
            Ok(buf[..n].to_vec())
        }
    };
    let reply = netns::run_in(netns, "a test DNS client", move || {
        exchange().map_err(|e| HostError::io(format!("querying {to}"), e))
    })
    .await?;
    let reply = Message::from_vec(&reply).map_err(|e| {
        HostError::io(
            "parsing a DNS reply",
            io::Error::new(io::ErrorKind::InvalidData, e),
        )
    })?;
    Ok(DnsAnswer {
        code: reply.response_code(),
        addrs: reply
            .answers()
            .iter()
            .filter_map(|r| match r.data() {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect(),
    })
}

/// `GET /` from inside the namespace at `netns` (`None`: the host's), with
/// `timeout` for connecting and for the whole exchange; returns the body.
pub async fn http_get(
    netns: Option<&Path>,
    to: SocketAddrV4,
    timeout: Duration,
) -> Result<Vec<u8>, HostError> {
    let get = move || {
        get_blocking(to, timeout).map_err(|e| HostError::io(format!("GET http://{to}/"), e))
    };
    match netns {
        Some(path) => netns::run_in(path, "a test client", get).await,
        None => tokio::task::spawn_blocking(get)
            .await
            .map_err(|_| HostError::ThreadPanicked {
                op: "a test client".into(),
            })?,
    }
}

fn get_blocking(to: SocketAddrV4, timeout: Duration) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(to), timeout)?;
    stream.set_read_timeout(Some(
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1)),
    ))?;
    write!(stream, "GET / HTTP/1.0\r\nHost: {to}\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no HTTP header end"))?;
    if !response.starts_with(b"HTTP/1.0 200") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a 200 response",
        ));
    }
    Ok(response[split + 4..].to_vec())
}

/// A link's name and its IPv4 addresses with their prefix lengths.
pub type LinkAddresses = (String, Vec<(Ipv4Addr, u8)>);

/// The links of a namespace (`None`: the host's) with their IPv4 addresses.
pub async fn links_with_addresses(netns: Option<&Path>) -> Result<Vec<LinkAddresses>, HostError> {
    async fn read() -> Result<Vec<LinkAddresses>, HostError> {
        let h = link::connect()?;
        let links = link::list(&h).await?;
        let addrs = link::ipv4_addresses_by_link(&h).await?;
        Ok(links
            .into_iter()
            .map(|l| {
                let a = addrs
                    .iter()
                    .filter(|(i, _, _)| *i == l.index)
                    .map(|(_, a, p)| (*a, *p))
                    .collect();
                (l.name, a)
            })
            .collect())
    }
    match netns {
        Some(path) => netns::run_in_async(path, "listing links", read).await,
        None => read().await,
    }
}

/// Host links labelled as a sandbox's veth (`nova-net:<id>`), by id.
pub async fn sandbox_veths() -> Result<Vec<(String, String)>, HostError> {
    let h = link::connect()?;
    Ok(link::list(&h)
        .await?
        .into_iter()
        .filter_map(|l| {
            let id = l
                .alias
                .as_deref()?
                .strip_prefix(crate::ALIAS_PREFIX)?
                .to_owned();
            Some((l.name, id))
        })
        .collect())
}

/// The names of the host's `inet` nft tables.
pub fn host_nft_tables() -> Result<Vec<String>, HostError> {
    firewall::list_inet_tables()
}

/// `nft list table inet <table>` inside the namespace at `netns`.
pub async fn nft_list_in(netns: &Path, table: &str) -> Result<String, HostError> {
    let table = table.to_owned();
    netns::run_in(netns, "listing a table", move || {
        firewall::list_table_text(&table)
    })
    .await
}

/// The names under `/run/netns`.
pub fn namespaces() -> Result<Vec<String>, HostError> {
    netns::list()
}

/// Why sandbox networking cannot be tested here, if it cannot: not root, no
/// `/dev/net/tun`, no `nft`, or a kernel without nf_tables.
pub fn unsupported_reason() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("not running as root".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    match std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
    {
        Err(e) => Some(format!(
            "cannot run nft ({e}): install the nftables package"
        )),
        Ok(o) if !o.status.success() => Some(format!(
            "nft does not work here (kernel without nf_tables?): {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(_) => None,
    }
}
