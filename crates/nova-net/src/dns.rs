//! Domain egress rules: a per-sandbox resolver that answers only allowed
//! names and opens the addresses it answered with.
//!
//! When a sandbox's [`EgressPolicy`] names domains, the namespace's nft
//! table redirects every DNS packet the guest sends (UDP and TCP port 53,
//! whatever server it names) to [`GATEWAY_ADDR`]`:53`, where a
//! resolver listens: a tokio task of the process that owns the
//! sandbox's network, whose sockets were opened inside the sandbox's
//! namespace. For each query it
//!
//! 1. parses it ([`hickory_proto`]) and answers `FORMERR` / `NOTIMP` to
//!    anything but one standard question;
//! 2. answers `NXDOMAIN` to a name the [`DomainFilter`] refuses (a `deny`
//!    match, or no `allow` match when `allow` names domains);
//! 3. forwards an allowed query to the upstream resolvers (the spec's
//!    `dns_servers`, in order, 2 s each) from sockets in the namespace, so
//!    the query leaves as the sandbox's own traffic;
//! 4. when `allow` names domains, adds the answer's IPv4 addresses (A
//!    records, CNAME targets included) to the host table's `allow_dns` set
//!    with a timeout of the record's TTL bounded to
//!    [`MIN_LEARNED_TTL`]..=[`MAX_LEARNED_TTL`], *before* the guest gets
//!    the answer, so its first packet already passes.
//!
//! A connection the set let through is marked (conntrack mark) and stays
//! allowed after the address expires from the set; a policy update changes
//! the mark, and keeps only the learned addresses of names the new policy
//! still allows, so connections to a domain no longer allowed are cut.
//!
//! The guest is untrusted, so what it can make the resolver do is bounded:
//! [`MAX_QUERIES_PER_SEC`] queries a second (a token bucket; the excess is
//! dropped), [`UDP_IN_FLIGHT`] UDP queries being answered and
//! [`UPSTREAM_SOCKETS`] queries upstream at a time, [`TCP_CONNS`]
//! TCP connections of [`TCP_QUERIES_PER_CONN`] queries each within
//! [`TCP_CONN_TIMEOUT`], messages of [`MAX_MESSAGE`] bytes, and
//! [`MAX_LEARNED`] learned addresses (past that, a new address stays closed
//! until older ones expire).
//!
//! What this cannot cover: a guest that connects to an address it did not
//! resolve here (a hard-coded IP, a name resolved over DNS-over-HTTPS or
//! DNS-over-TLS, or through a proxy) is governed by the CIDR rules alone;
//! an allowed name that shares an address with a denied one (a CDN) opens
//! that address for both; IPv6 (AAAA) answers open nothing, as guests have
//! no IPv6.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinHandle;
use tracing::debug;

use crate::GATEWAY_ADDR;
use crate::error::HostError;
use crate::firewall;
use crate::netns;
use crate::spec::{DomainName, EgressPolicy, EgressRule};

/// The shortest time a learned address stays in the allow set, seconds
/// (a TTL of 0 must still let the guest connect).
pub const MIN_LEARNED_TTL: u32 = 60;
/// The longest time a learned address stays in the allow set, seconds.
pub const MAX_LEARNED_TTL: u32 = 3600;
/// The most learned addresses a sandbox holds at once.
pub const MAX_LEARNED: usize = 4096;
/// Queries a second a guest may send (the bucket holds twice as many).
pub const MAX_QUERIES_PER_SEC: u32 = 200;
/// Upstream queries in flight at once, per sandbox.
pub const UPSTREAM_SOCKETS: usize = 8;
/// UDP queries being answered at once, per sandbox; more are dropped.
pub const UDP_IN_FLIGHT: usize = 64;
/// TCP connections open at once, per sandbox.
pub const TCP_CONNS: usize = 8;
/// Queries one TCP connection may carry.
pub const TCP_QUERIES_PER_CONN: usize = 16;
/// How long one TCP connection may stay open.
pub const TCP_CONN_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest DNS message handled, bytes; larger ones are dropped.
pub const MAX_MESSAGE: usize = 4096;
/// How long each upstream server gets to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// Which names a sandbox may resolve, from the domain entries of its
/// [`EgressPolicy`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DomainFilter {
    allow: Vec<DomainName>,
    deny: Vec<DomainName>,
}

impl DomainFilter {
    /// The domain entries of `policy`.
    pub fn new(policy: &EgressPolicy) -> Self {
        let domains = |rules: &[EgressRule]| {
            rules
                .iter()
                .filter_map(|r| match r {
                    EgressRule::Domain(d) => Some(d.clone()),
                    EgressRule::Cidr(_) => None,
                })
                .collect()
        };
        Self {
            allow: domains(&policy.allow),
            deny: domains(&policy.deny),
        }
    }

    /// Whether the policy names any domain, so that a resolver is needed.
    pub fn is_active(&self) -> bool {
        !self.allow.is_empty() || !self.deny.is_empty()
    }

    /// Whether `allow` names domains: then only their addresses (and the
    /// CIDRs in `allow`) are open.
    pub fn is_allowlist(&self) -> bool {
        !self.allow.is_empty()
    }

    /// Whether `name` (any case, trailing dot or not) may be resolved: no
    /// `deny` entry matches it, and an `allow` entry does if there are any.
    /// `example.com` matches itself only; `*.example.com` matches every name
    /// under `example.com` but not `example.com` itself.
    pub fn permits(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if self.deny.iter().any(|d| matches(d, &name)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|d| matches(d, &name))
    }
}

fn matches(rule: &DomainName, name: &str) -> bool {
    match rule.as_str().strip_prefix("*.") {
        Some(suffix) => name
            .strip_suffix(suffix)
            .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        None => name == rule.as_str(),
    }
}

/// An address learned from an answer, and the name it answered.
#[derive(Clone, Debug)]
struct LearnedEntry {
    name: String,
    until: Instant,
}

/// What the resolver and policy updates share, behind one lock: an update
/// and an answer's addition to the set never interleave, so no address of
/// a name the new policy refuses is added after the update.
#[derive(Debug)]
pub(crate) struct DnsState {
    filter: DomainFilter,
    learned: HashMap<Ipv4Addr, LearnedEntry>,
    /// The host table holding the `allow_dns` set.
    table: String,
}

/// The state shared by a sandbox's resolver and its policy updates.
pub(crate) type SharedDnsState = Arc<Mutex<DnsState>>;

impl DnsState {
    pub(crate) fn new(table: &str, filter: DomainFilter) -> SharedDnsState {
        Arc::new(Mutex::new(Self {
            filter,
            learned: HashMap::new(),
            table: table.to_owned(),
        }))
    }

    pub(crate) fn filter(&self) -> &DomainFilter {
        &self.filter
    }

    /// The learned addresses a policy with `filter` keeps, with the seconds
    /// each has left.
    pub(crate) fn retained(&self, filter: &DomainFilter) -> Vec<(Ipv4Addr, u32)> {
        if !filter.is_allowlist() {
            return Vec::new();
        }
        let now = Instant::now();
        self.learned
            .iter()
            .filter(|(_, e)| e.until > now && filter.permits(&e.name))
            .map(|(ip, e)| {
                let left = e.until.saturating_duration_since(now).as_secs();
                (*ip, u32::try_from(left).unwrap_or(MAX_LEARNED_TTL).max(1))
            })
            .collect()
    }

    /// Installs a new filter after its batch was applied, keeping `kept`.
    pub(crate) fn replace(&mut self, filter: DomainFilter, kept: &[(Ipv4Addr, u32)]) {
        self.filter = filter;
        self.learned
            .retain(|ip, _| kept.iter().any(|(k, _)| k == ip));
    }

    /// Adds the addresses `answers` (address, TTL) of `name` to the set,
    /// when the current filter still allows `name` and is an allowlist.
    /// Addresses known with more than half their time left are skipped.
    async fn learn(&mut self, name: &str, answers: &[(Ipv4Addr, u32)]) -> Result<(), HostError> {
        if !self.filter.is_allowlist() || !self.filter.permits(name) || answers.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        self.learned.retain(|_, e| e.until > now);
        let mut elements = Vec::new();
        for &(ip, ttl) in answers {
            let timeout = ttl.clamp(MIN_LEARNED_TTL, MAX_LEARNED_TTL);
            let refresh = match self.learned.get(&ip) {
                Some(e)
                    if e.until.saturating_duration_since(now).as_secs() * 2 > timeout.into() =>
                {
                    continue;
                }
                Some(_) => true,
                None if self.learned.len() + elements.len() >= MAX_LEARNED => {
                    debug!(%ip, name, "the learned address set is full; the address stays closed");
                    continue;
                }
                None => false,
            };
            elements.push(firewall::LearnedElement {
                ip,
                timeout,
                refresh,
            });
        }
        if elements.is_empty() {
            return Ok(());
        }
        let batch = firewall::add_learned(&self.table, &elements);
        tokio::task::spawn_blocking(move || {
            firewall::apply(&batch, "adding resolved addresses to the allow set")
        })
        .await
        .map_err(|_| HostError::ThreadPanicked {
            op: "adding resolved addresses".into(),
        })??;
        for e in elements {
            self.learned.insert(
                e.ip,
                LearnedEntry {
                    name: name.to_owned(),
                    until: now + Duration::from_secs(e.timeout.into()),
                },
            );
        }
        Ok(())
    }
}

/// A sandbox's resolver task; stops when dropped.
#[derive(Debug)]
pub(crate) struct Resolver {
    task: JoinHandle<()>,
}

impl Drop for Resolver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The sockets a resolver is made of, opened inside the sandbox namespace.
struct Sockets {
    udp: UdpSocket,
    tcp: TcpListener,
    upstream: Vec<UdpSocket>,
}

fn open_sockets() -> Result<Sockets, HostError> {
    let at = SocketAddrV4::new(GATEWAY_ADDR, 53);
    let udp = UdpSocket::bind(at).map_err(|e| HostError::io(format!("binding udp {at}"), e))?;
    let tcp = TcpListener::bind(at).map_err(|e| HostError::io(format!("binding tcp {at}"), e))?;
    let mut upstream = Vec::with_capacity(UPSTREAM_SOCKETS);
    for _ in 0..UPSTREAM_SOCKETS {
        upstream.push(
            UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
                .map_err(|e| HostError::io("binding an upstream DNS socket", e))?,
        );
    }
    for s in upstream.iter().chain([&udp]) {
        s.set_nonblocking(true)
            .map_err(|e| HostError::io("making a DNS socket non-blocking", e))?;
    }
    tcp.set_nonblocking(true)
        .map_err(|e| HostError::io("making a DNS socket non-blocking", e))?;
    Ok(Sockets { udp, tcp, upstream })
}

impl Resolver {
    /// Opens the resolver's sockets inside the namespace at `netns` (on a
    /// thread that entered it; blocks for that thread, about a millisecond)
    /// and spawns its task on the current tokio runtime. `upstream` are the
    /// servers allowed queries go to.
    pub(crate) fn start(
        netns: &Path,
        upstream: Vec<Ipv4Addr>,
        state: SharedDnsState,
    ) -> Result<Self, HostError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| {
            HostError::io(
                "starting the sandbox's resolver (no tokio runtime)",
                io::Error::other(e),
            )
        })?;
        let fd = netns::open(netns)?;
        let sockets = std::thread::Builder::new()
            .name("nova-net-dns".into())
            .spawn(move || {
                rustix::thread::move_into_link_name_space(
                    std::os::fd::AsFd::as_fd(&fd),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .map_err(|e| HostError::io("entering the sandbox's network namespace", e.into()))?;
                open_sockets()
            })
            .map_err(|e| HostError::io("spawning the resolver's socket thread", e))?
            .join()
            .map_err(|_| HostError::ThreadPanicked {
                op: "opening the resolver's sockets".into(),
            })??;
        let _guard = runtime.enter();
        let wrap = |e| HostError::io("registering a DNS socket with tokio", e);
        let udp = tokio::net::UdpSocket::from_std(sockets.udp).map_err(wrap)?;
        let tcp = tokio::net::TcpListener::from_std(sockets.tcp).map_err(wrap)?;
        let mut pool = Vec::with_capacity(sockets.upstream.len());
        for s in sockets.upstream {
            pool.push(tokio::net::UdpSocket::from_std(s).map_err(wrap)?);
        }
        let ctx = Arc::new(Context {
            upstream,
            permits: Semaphore::new(pool.len()),
            pool: std::sync::Mutex::new(pool),
            state,
        });
        let task = runtime.spawn(serve(udp, tcp, ctx));
        Ok(Self { task })
    }
}

struct Context {
    upstream: Vec<Ipv4Addr>,
    permits: Semaphore,
    pool: std::sync::Mutex<Vec<tokio::net::UdpSocket>>,
    state: SharedDnsState,
}

/// A token bucket: `rate` a second, holding up to `2 * rate`.
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let rate = f64::from(MAX_QUERIES_PER_SEC);
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * rate).min(2.0 * rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

async fn serve(udp: tokio::net::UdpSocket, tcp: tokio::net::TcpListener, ctx: Arc<Context>) {
    let udp = Arc::new(udp);
    let conns = Arc::new(Semaphore::new(TCP_CONNS));
    let in_flight = Arc::new(Semaphore::new(UDP_IN_FLIGHT));
    let mut bucket = Bucket {
        tokens: 2.0 * f64::from(MAX_QUERIES_PER_SEC),
        at: Instant::now(),
    };
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        tokio::select! {
            got = udp.recv_from(&mut buf) => {
                let Ok((n, peer)) = got else { continue };
                if !bucket.take() || n == 0 {
                    continue;
                }
                let Ok(permit) = in_flight.clone().try_acquire_owned() else { continue };
                let query = buf[..n].to_vec();
                let (udp, ctx) = (udp.clone(), ctx.clone());
                tokio::spawn(async move {
                    if let Some(reply) = answer(&query, &ctx).await {
                        let _ = udp.send_to(&reply, peer).await;
                    }
                    drop(permit);
                });
            }
            got = tcp.accept() => {
                let Ok((stream, _)) = got else { continue };
                let Ok(permit) = conns.clone().try_acquire_owned() else { continue };
                if !bucket.take() {
                    continue;
                }
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(TCP_CONN_TIMEOUT, serve_tcp(stream, &ctx)).await;
                    drop(permit);
                });
            }
        }
    }
}

async fn serve_tcp(mut stream: tokio::net::TcpStream, ctx: &Context) -> io::Result<()> {
    for _ in 0..TCP_QUERIES_PER_CONN {
        let len = usize::from(stream.read_u16().await?);
        if len == 0 || len > MAX_MESSAGE {
            return Ok(());
        }
        let mut query = vec![0u8; len];
        stream.read_exact(&mut query).await?;
        let Some(reply) = answer(&query, ctx).await else {
            return Ok(());
        };
        let Ok(len) = u16::try_from(reply.len()) else {
            return Ok(());
        };
        stream.write_u16(len).await?;
        stream.write_all(&reply).await?;
    }
    Ok(())
}

/// The reply to one query, or `None` to stay silent (unparsable input, or
/// no upstream answer that could be checked).
async fn answer(query: &[u8], ctx: &Context) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    if request.message_type() != MessageType::Query {
        return None;
    }
    let refuse = |code| {
        let mut m = Message::error_msg(request.id(), request.op_code(), code);
        m.add_queries(request.queries().iter().cloned());
        m.to_vec().ok()
    };
    if request.op_code() != OpCode::Query {
        return refuse(ResponseCode::NotImp);
    }
    let [question] = request.queries() else {
        return refuse(ResponseCode::FormErr);
    };
    let name = question.name().to_ascii().to_ascii_lowercase();
    let name = name.trim_end_matches('.');
    if !ctx.state.lock().await.filter.permits(name) {
        debug!(name, "refused a name the egress policy does not allow");
        return refuse(ResponseCode::NXDomain);
    }
    let Some((raw, response)) = forward(query, request.id(), ctx).await else {
        return refuse(ResponseCode::ServFail);
    };
    let answers: Vec<(Ipv4Addr, u32)> = response
        .answers()
        .iter()
        .filter(|r| r.record_type() == RecordType::A)
        .filter_map(|r| match r.data() {
            RData::A(a) => Some((a.0, r.ttl())),
            _ => None,
        })
        .collect();
    let mut state = ctx.state.lock().await;
    if let Err(e) = state.learn(name, &answers).await {
        debug!(name, error = %e, "cannot open the addresses of an allowed name");
        return refuse(ResponseCode::ServFail);
    }
    Some(raw)
}

/// Sends `query` to each upstream server in turn until one answers with a
/// response to it; returns the raw and the parsed response.
async fn forward(query: &[u8], id: u16, ctx: &Context) -> Option<(Vec<u8>, Message)> {
    let _permit = ctx.permits.acquire().await.ok()?;
    let socket = ctx
        .pool
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .pop()?;
    let mut result = None;
    let mut buf = vec![0u8; MAX_MESSAGE];
    'servers: for server in &ctx.upstream {
        let to = SocketAddr::from((*server, 53));
        if socket.send_to(query, to).await.is_err() {
            continue;
        }
        let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
        // Replies to an earlier query that timed out on this socket, or from
        // anyone else, are skipped.
        while let Ok(Ok((n, from))) =
            tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await
        {
            if from != to {
                continue;
            }
            match Message::from_vec(&buf[..n]) {
                Ok(m) if m.id() == id && m.message_type() == MessageType::Response => {
                    result = Some((buf[..n].to_vec(), m));
                    break 'servers;
                }
                _ => continue,
            }
        }
    }
    ctx.pool
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(socket);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(allow: &[&str], deny: &[&str]) -> DomainFilter {
        DomainFilter::new(&EgressPolicy::parse(true, allow, deny).expect("valid policy"))
    }

    #[test]
    fn exact_names_and_wildcards() {
        let f = filter(&["allowed.test", "*.pypi.org", "10.0.0.0/8"], &[]);
        assert!(f.is_active() && f.is_allowlist());
        assert!(f.permits("allowed.test"));
        assert!(f.permits("Allowed.Test."));
        assert!(!f.permits("sub.allowed.test"));
        assert!(f.permits("files.pypi.org"));
        assert!(f.permits("a.b.pypi.org"));
        assert!(!f.permits("pypi.org"), "a wildcard is subdomains only");
        assert!(!f.permits("evilpypi.org"));
        assert!(!f.permits("blocked.test"));
    }

    #[test]
    fn deny_wins_and_deny_alone_allows_the_rest() {
        let f = filter(&["*.example.com"], &["bad.example.com"]);
        assert!(f.permits("good.example.com"));
        assert!(!f.permits("bad.example.com"));
        let f = filter(&[], &["blocked.test"]);
        assert!(f.is_active() && !f.is_allowlist());
        assert!(f.permits("anything.else"));
        assert!(!f.permits("blocked.test"));
        let f = filter(&["10.0.0.0/8"], &[]);
        assert!(!f.is_active());
    }

    #[test]
    fn retained_keeps_names_the_new_filter_allows() {
        let old = filter(&["a.test", "b.test"], &[]);
        let mut state = DnsState {
            filter: old,
            learned: HashMap::new(),
            table: "t".into(),
        };
        let later = Instant::now() + Duration::from_secs(100);
        for (ip, name) in [([198, 18, 0, 1], "a.test"), ([198, 18, 0, 2], "b.test")] {
            state.learned.insert(
                Ipv4Addr::from(ip),
                LearnedEntry {
                    name: name.into(),
                    until: later,
                },
            );
        }
        let new = filter(&["a.test"], &[]);
        let kept = state.retained(&new);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].0, Ipv4Addr::new(198, 18, 0, 1));
        assert!(kept[0].1 > 90 && kept[0].1 <= 100, "{kept:?}");
        assert!(state.retained(&filter(&[], &["x.test"])).is_empty());
        state.replace(new, &kept);
        assert_eq!(state.learned.len(), 1);
    }

    #[test]
    fn the_bucket_runs_dry_and_refills() {
        let mut b = Bucket {
            tokens: 2.0,
            at: Instant::now(),
        };
        assert!(b.take());
        assert!(b.take());
        b.at -= Duration::from_secs(1);
        assert!(b.take(), "a second refills it");
    }
}
