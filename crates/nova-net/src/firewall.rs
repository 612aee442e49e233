//! The nftables rules of a sandbox, built as typed JSON with the `nftables`
//! crate and applied by its helper (`nft -j -f -`, one atomic batch).
//!
//! Two tables per sandbox:
//!
//! * **On the host**, `inet nova-<id>`: everything the host does for the
//!   sandbox, so teardown is one `delete table`.
//!   - `prerouting` / `output` (nat): published ports. `host_ip:host_port`
//!     (`fib daddr type local` for `0.0.0.0`) is DNATed to the namespace end
//!     of the veth, `guest_port`. `output` covers clients on the host itself,
//!     `127.0.0.1` included; such packets keep their loopback source, so the
//!     host end of the veth has `route_localnet=1` (that one interface only)
//!     and `postrouting` masquerades them to the veth's host address.
//!   - `postrouting` (nat): masquerade of the sandbox's outbound traffic.
//!   - `forward` -> `from_sandbox` -> `egress`: anti-spoofing, replies on
//!     connections made to the sandbox, then the egress policy (see
//!     [`EgressPolicy`] for the order), with deny verdicts as ICMP
//!     admin-prohibited rejects so guest programs fail fast. Every packet the
//!     sandbox originates is checked, not only a connection's first, so a
//!     policy change also cuts connections already open.
//!   - `forward` -> `to_sandbox`: only replies and published-port (DNATed)
//!     traffic may enter.
//!   - With domain rules in `allow`, the `egress` chain ends with the
//!     addresses the sandbox's resolver learned (the `allow_dns` set, whose
//!     elements time out) and a reject; a connection let through by that
//!     set gets a conntrack mark (`0x4e56` in the high half) that keeps it allowed
//!     after the address times out, until a policy update changes the mark
//!     (see [`crate::dns`]).
//!   - `input` -> `sandbox_to_host`: the host's own addresses are closed to
//!     the sandbox except the DNS servers on port 53 and `/32`s in `allow`.
//! * **In the namespace**, `inet nova`: DNAT of the published guest ports
//!   from the veth to the guest, masquerade of the guest to the veth address,
//!   a `dns_redirect` chain that, while the policy names domains, sends
//!   every DNS packet of the guest to the resolver on the gateway address,
//!   a forward chain that lets only the guest's own address out and only
//!   replies or published ports in, and an input chain closed to the guest
//!   but for ICMP (so `ping` of the gateway works). It goes with the
//!   namespace.
//!
//! IPv6 is not given to guests; the host table drops IPv6 from the sandbox.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashSet};
use std::net::Ipv4Addr;

use nftables::batch::Batch;
use nftables::expr::{
    CT, Elem, Expression, Fib, FibFlag, FibResult, Meta, MetaKey, NamedExpression, Payload,
    PayloadField, Prefix,
};
use nftables::schema::{
    Chain, Element, FlushObject, NfCmd, NfListObject, Nftables, Rule, Set, SetFlag, SetType,
    SetTypeValue, Table,
};
use nftables::stmt::{
    JumpTarget, Mangle, Match, NAT, NATFamily, Operator, Reject, RejectType, Statement,
};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook, RejectCode};

use crate::error::HostError;
use crate::spec::{EgressPolicy, Ipv4Cidr, PortMapping, fold_cidrs};
use crate::{GATEWAY_ADDR, GUEST_ADDR, METADATA_ADDR};

/// Name of the table a sandbox's namespace holds.
pub(crate) const NETNS_TABLE: &str = "nova";

// ---- small expression builders --------------------------------------------

fn s(v: impl Into<String>) -> Expression<'static> {
    Expression::String(Cow::Owned(v.into()))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn field(protocol: &'static str, name: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: Cow::Borrowed(protocol),
            field: Cow::Borrowed(name),
        },
    )))
}

fn ct(key: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: Cow::Borrowed(key),
        family: None,
        dir: None,
    }))
}

fn cidr(c: Ipv4Cidr) -> Expression<'static> {
    if c.prefix() == 32 {
        s(c.addr().to_string())
    } else {
        Expression::Named(NamedExpression::Prefix(Prefix {
            addr: Box::new(s(c.addr().to_string())),
            len: u32::from(c.prefix()),
        }))
    }
}

fn set_ref(name: &str) -> Expression<'static> {
    s(format!("@{name}"))
}

fn is(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

fn is_not(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::NEQ,
    })
}

fn is_in(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::IN,
    })
}

fn iif(name: &str) -> Statement<'static> {
    is(meta(MetaKey::Iifname), s(name))
}

fn oif(name: &str) -> Statement<'static> {
    is(meta(MetaKey::Oifname), s(name))
}

fn ipv4() -> Statement<'static> {
    is(meta(MetaKey::Nfproto), s("ipv4"))
}

fn daddr_local() -> Statement<'static> {
    is(
        Expression::Named(NamedExpression::Fib(Fib {
            result: FibResult::Type,
            flags: HashSet::from([FibFlag::Daddr]),
        })),
        s("local"),
    )
}

fn established() -> Statement<'static> {
    is_in(
        ct("state"),
        Expression::List(vec![s("established"), s("related")]),
    )
}

fn dnatted() -> Statement<'static> {
    is_in(ct("status"), s("dnat"))
}

fn reply_direction() -> Statement<'static> {
    is(ct("direction"), s("reply"))
}

fn accept() -> Statement<'static> {
    Statement::Accept(None)
}

fn drop_() -> Statement<'static> {
    Statement::Drop(None)
}

fn reject() -> Statement<'static> {
    Statement::Reject(Some(Reject::new(
        Some(RejectType::ICMPX),
        Some(RejectCode::AdminProhibited),
    )))
}

fn jump(target: &str) -> Statement<'static> {
    Statement::Jump(JumpTarget {
        target: Cow::Owned(target.to_owned()),
    })
}

fn dnat(addr: Ipv4Addr, port: Option<u16>) -> Statement<'static> {
    Statement::DNAT(Some(NAT {
        addr: Some(s(addr.to_string())),
        family: Some(NATFamily::IP),
        port: port.map(|p| Expression::Number(u32::from(p))),
        flags: None,
    }))
}

fn masquerade() -> Statement<'static> {
    Statement::Masquerade(None)
}

// ---- tables ------------------------------------------------------------------

struct TableBuilder {
    table: String,
    batch: Batch<'static>,
}

impl TableBuilder {
    fn new(table: &str) -> Self {
        Self {
            table: table.to_owned(),
            batch: Batch::new(),
        }
    }

    fn add_table(&mut self) {
        self.batch.add(NfListObject::Table(Table {
            family: NfFamily::INet,
            name: Cow::Owned(self.table.clone()),
            handle: None,
        }));
    }

    fn chain(&self, name: &str) -> Chain<'static> {
        Chain {
            family: NfFamily::INet,
            table: Cow::Owned(self.table.clone()),
            name: Cow::Owned(name.to_owned()),
            ..Chain::default()
        }
    }

    fn base_chain(
        &mut self,
        name: &str,
        kind: NfChainType,
        hook: NfHook,
        prio: i32,
        policy: NfChainPolicy,
    ) {
        let chain = Chain {
            _type: Some(kind),
            hook: Some(hook),
            prio: Some(prio),
            policy: Some(policy),
            ..self.chain(name)
        };
        self.batch.add(NfListObject::Chain(chain));
    }

    fn regular_chain(&mut self, name: &str) {
        let chain = self.chain(name);
        self.batch.add(NfListObject::Chain(chain));
    }

    fn flush_chain(&mut self, name: &str) {
        let chain = self.chain(name);
        self.batch.add_cmd(NfCmd::Flush(FlushObject::Chain(chain)));
    }

    fn set(&self, name: &str) -> Set<'static> {
        Set {
            family: NfFamily::INet,
            table: Cow::Owned(self.table.clone()),
            name: Cow::Owned(name.to_owned()),
            set_type: SetTypeValue::Single(SetType::Ipv4Addr),
            flags: Some(HashSet::from([SetFlag::Interval])),
            ..Set::default()
        }
    }

    fn add_set(&mut self, name: &str) {
        let set = self.set(name);
        self.batch.add(NfListObject::Set(Box::new(set)));
    }

    /// A set of single addresses whose elements carry a timeout.
    fn learned_set(&self) -> Set<'static> {
        Set {
            flags: Some(HashSet::from([SetFlag::Timeout])),
            ..self.set(SET_LEARNED)
        }
    }

    fn flush_set(&mut self, name: &str) {
        let set = if name == SET_LEARNED {
            self.learned_set()
        } else {
            self.set(name)
        };
        self.batch
            .add_cmd(NfCmd::Flush(FlushObject::Set(Box::new(set))));
    }

    fn add_elements(&mut self, set: &str, cidrs: &[Ipv4Cidr]) {
        if cidrs.is_empty() {
            return;
        }
        self.batch.add(NfListObject::Element(Element {
            family: NfFamily::INet,
            table: Cow::Owned(self.table.clone()),
            name: Cow::Owned(set.to_owned()),
            elem: Cow::Owned(cidrs.iter().map(|c| cidr(*c)).collect()),
        }));
    }

    /// Adds (`delete` false) or deletes single addresses with timeouts in
    /// the learned set.
    fn learned_elements(&mut self, elements: &[(Ipv4Addr, u32)], delete: bool) {
        if elements.is_empty() {
            return;
        }
        let element = Element {
            family: NfFamily::INet,
            table: Cow::Owned(self.table.clone()),
            name: Cow::Borrowed(SET_LEARNED),
            elem: Cow::Owned(
                elements
                    .iter()
                    .map(|(ip, timeout)| {
                        if delete {
                            s(ip.to_string())
                        } else {
                            Expression::Named(NamedExpression::Elem(Elem {
                                val: Box::new(s(ip.to_string())),
                                timeout: Some(*timeout),
                                expires: None,
                                comment: None,
                                counter: None,
                            }))
                        }
                    })
                    .collect(),
            ),
        };
        if delete {
            self.batch.delete(NfListObject::Element(element));
        } else {
            self.batch.add(NfListObject::Element(element));
        }
    }

    fn rule(&mut self, chain: &str, expr: Vec<Statement<'static>>) {
        self.batch.add(NfListObject::Rule(Rule {
            family: NfFamily::INet,
            table: Cow::Owned(self.table.clone()),
            chain: Cow::Owned(chain.to_owned()),
            expr: Cow::Owned(expr),
            ..Rule::default()
        }));
    }

    fn finish(self) -> Nftables<'static> {
        self.batch.to_nftables()
    }
}

/// The nftables sets a host table holds; the egress policy fills them.
const SET_ALLOW: &str = "allow";
const SET_DENY: &str = "deny";
const SET_ALLOW_PROTECTED: &str = "allow_protected";
const SET_ALLOW_HOST: &str = "allow_host";
const SET_DNS: &str = "dns";
/// Addresses the sandbox's resolver answered for allowed domains.
const SET_LEARNED: &str = "allow_dns";
const EGRESS_SETS: [&str; 5] = [
    SET_ALLOW,
    SET_DENY,
    SET_ALLOW_PROTECTED,
    SET_ALLOW_HOST,
    SET_DNS,
];

/// Everything the host table is made from.
#[derive(Debug)]
pub(crate) struct HostTable<'a> {
    /// `nova-<id>`.
    pub(crate) table: &'a str,
    /// The host end of the veth.
    pub(crate) veth: &'a str,
    /// The namespace end's address.
    pub(crate) netns_addr: Ipv4Addr,
    /// The whole sandbox pool (other sandboxes).
    pub(crate) pool: Ipv4Cidr,
    pub(crate) ports: &'a [PortMapping],
    pub(crate) egress: &'a EgressPolicy,
    pub(crate) dns: &'a [Ipv4Addr],
    /// Learned addresses to (re)fill `allow_dns` with on update, with the
    /// seconds each has left.
    pub(crate) learned: &'a [(Ipv4Addr, u32)],
    /// The policy's generation, which the conntrack mark of connections
    /// allowed through `allow_dns` carries.
    pub(crate) generation: u32,
}

/// The conntrack mark of a connection the learned set let through under
/// policy `generation`: `0x4e56_0000` with the low 16 bits of the generation.
pub(crate) fn learned_mark(generation: u32) -> u32 {
    0x4e56_0000 | (generation & 0xffff)
}

/// One address for the learned set.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LearnedElement {
    pub(crate) ip: Ipv4Addr,
    /// Seconds.
    pub(crate) timeout: u32,
    /// Already in the set: replace it, to restart its timeout.
    pub(crate) refresh: bool,
}

/// Adds addresses to the learned set of host table `table`; an address
/// being refreshed is added (a no-op if present), deleted and added again,
/// in one batch, so that its timeout restarts whether or not the kernel
/// expired it meanwhile.
pub(crate) fn add_learned(table: &str, elements: &[LearnedElement]) -> Nftables<'static> {
    let mut t = TableBuilder::new(table);
    let refresh: Vec<(Ipv4Addr, u32)> = elements
        .iter()
        .filter(|e| e.refresh)
        .map(|e| (e.ip, e.timeout))
        .collect();
    t.learned_elements(&refresh, false);
    t.learned_elements(&refresh, true);
    let all: Vec<(Ipv4Addr, u32)> = elements.iter().map(|e| (e.ip, e.timeout)).collect();
    t.learned_elements(&all, false);
    t.finish()
}

impl HostTable<'_> {
    /// The whole table, to create it.
    pub(crate) fn create(&self) -> Nftables<'static> {
        let mut t = TableBuilder::new(self.table);
        t.add_table();
        for set in EGRESS_SETS {
            t.add_set(set);
        }
        let learned = t.learned_set();
        t.batch.add(NfListObject::Set(Box::new(learned)));
        use NfChainPolicy::Accept;
        t.base_chain(
            "prerouting",
            NfChainType::NAT,
            NfHook::Prerouting,
            -100,
            Accept,
        );
        t.base_chain("output", NfChainType::NAT, NfHook::Output, -100, Accept);
        t.base_chain(
            "postrouting",
            NfChainType::NAT,
            NfHook::Postrouting,
            100,
            Accept,
        );
        t.base_chain("forward", NfChainType::Filter, NfHook::Forward, 0, Accept);
        t.base_chain("input", NfChainType::Filter, NfHook::Input, 0, Accept);
        for chain in ["from_sandbox", "egress", "to_sandbox", "sandbox_to_host"] {
            t.regular_chain(chain);
        }

        for p in self.ports {
            let mut m = vec![ipv4()];
            if p.host_ip.is_unspecified() {
                m.push(daddr_local());
            } else {
                m.push(is(field("ip", "daddr"), s(p.host_ip.to_string())));
            }
            m.push(is(
                field(p.protocol.as_str(), "dport"),
                Expression::Number(u32::from(p.host_port)),
            ));
            m.push(dnat(self.netns_addr, Some(p.guest_port)));
            t.rule("prerouting", m.clone());
            t.rule("output", m);
        }

        let veth = self.veth;
        let netns_addr = s(self.netns_addr.to_string());
        t.rule(
            "postrouting",
            vec![
                oif(veth),
                ipv4(),
                is(
                    field("ip", "saddr"),
                    cidr(
                        Ipv4Cidr::new(Ipv4Addr::new(127, 0, 0, 0), 8)
                            .expect("127.0.0.0/8 is a network"),
                    ),
                ),
                masquerade(),
            ],
        );
        t.rule(
            "postrouting",
            vec![
                ipv4(),
                is(field("ip", "saddr"), netns_addr.clone()),
                is_not(meta(MetaKey::Oifname), s(veth)),
                masquerade(),
            ],
        );

        t.rule("forward", vec![iif(veth), jump("from_sandbox")]);
        t.rule("forward", vec![oif(veth), jump("to_sandbox")]);
        t.rule("input", vec![iif(veth), jump("sandbox_to_host")]);

        t.rule(
            "from_sandbox",
            vec![is_not(meta(MetaKey::Nfproto), s("ipv4")), drop_()],
        );
        t.rule(
            "from_sandbox",
            vec![is_not(field("ip", "saddr"), netns_addr), drop_()],
        );
        t.rule("from_sandbox", vec![reply_direction(), accept()]);
        t.rule("from_sandbox", vec![jump("egress")]);

        t.rule("to_sandbox", vec![established(), accept()]);
        t.rule("to_sandbox", vec![dnatted(), accept()]);
        t.rule("to_sandbox", vec![drop_()]);

        t.rule("sandbox_to_host", vec![established(), accept()]);
        t.rule(
            "sandbox_to_host",
            vec![is_not(meta(MetaKey::Nfproto), s("ipv4")), drop_()],
        );
        t.rule(
            "sandbox_to_host",
            vec![is(field("ip", "daddr"), set_ref(SET_DENY)), drop_()],
        );
        for proto in ["udp", "tcp"] {
            t.rule(
                "sandbox_to_host",
                vec![
                    is(field("ip", "daddr"), set_ref(SET_DNS)),
                    is(field(proto, "dport"), Expression::Number(53)),
                    accept(),
                ],
            );
        }
        t.rule(
            "sandbox_to_host",
            vec![is(field("ip", "daddr"), set_ref(SET_ALLOW_HOST)), accept()],
        );
        t.rule("sandbox_to_host", vec![drop_()]);

        self.fill_egress(&mut t);
        t.finish()
    }

    /// Replaces the egress policy in place: one atomic batch.
    pub(crate) fn update_egress(&self) -> Nftables<'static> {
        let mut t = TableBuilder::new(self.table);
        for set in EGRESS_SETS.into_iter().chain([SET_LEARNED]) {
            t.flush_set(set);
        }
        t.flush_chain("egress");
        self.fill_egress(&mut t);
        t.finish()
    }

    /// The sets' elements and the `egress` chain.
    fn fill_egress(&self, t: &mut TableBuilder) {
        let allow = self.egress.allow_cidrs();
        // Exceptions to the always-denied ranges come from the unfolded list:
        // `0.0.0.0/0` next to `10.200.0.6/32` must not swallow the latter.
        let raw: Vec<Ipv4Cidr> = self.egress.allow.iter().filter_map(|r| r.cidr()).collect();
        let metadata = Ipv4Cidr::host(METADATA_ADDR);
        let protected = fold_cidrs(
            raw.iter()
                .copied()
                .filter(|c| self.pool.contains_cidr(c) || metadata.contains_cidr(c)),
        );
        let hosts = fold_cidrs(raw.iter().copied().filter(|c| c.prefix() == 32));
        let dns = fold_cidrs(
            self.dns
                .iter()
                .map(|a| Ipv4Cidr::host(*a))
                .collect::<BTreeSet<_>>(),
        );
        t.add_elements(SET_ALLOW, &allow);
        t.add_elements(SET_DENY, &self.egress.deny_cidrs());
        t.add_elements(SET_ALLOW_PROTECTED, &protected);
        t.add_elements(SET_ALLOW_HOST, &hosts);
        t.add_elements(SET_DNS, &dns);
        t.learned_elements(self.learned, false);

        let daddr = || field("ip", "daddr");
        t.rule("egress", vec![is(daddr(), set_ref(SET_DENY)), reject()]);
        t.rule(
            "egress",
            vec![is(daddr(), set_ref(SET_ALLOW_PROTECTED)), accept()],
        );
        t.rule("egress", vec![is(daddr(), cidr(metadata)), reject()]);
        t.rule("egress", vec![is(daddr(), cidr(self.pool)), reject()]);
        for proto in ["udp", "tcp"] {
            t.rule(
                "egress",
                vec![
                    is(daddr(), set_ref(SET_DNS)),
                    is(field(proto, "dport"), Expression::Number(53)),
                    accept(),
                ],
            );
        }
        t.rule("egress", vec![is(daddr(), set_ref(SET_ALLOW)), accept()]);
        if crate::dns::DomainFilter::new(self.egress).is_allowlist() {
            let mark = Expression::Number(learned_mark(self.generation));
            t.rule("egress", vec![is(ct("mark"), mark.clone()), accept()]);
            t.rule(
                "egress",
                vec![
                    is(daddr(), set_ref(SET_LEARNED)),
                    Statement::Mangle(Mangle {
                        key: ct("mark"),
                        value: mark,
                    }),
                    accept(),
                ],
            );
            t.rule("egress", vec![reject()]);
            return;
        }
        t.rule(
            "egress",
            vec![if self.egress.block_all {
                reject()
            } else {
                accept()
            }],
        );
    }
}

/// The namespace's table.
pub(crate) fn netns_table(
    guest_dev: &str,
    veth: &str,
    netns_addr: Ipv4Addr,
    ports: &[PortMapping],
    redirect_dns: bool,
) -> Nftables<'static> {
    let mut t = TableBuilder::new(NETNS_TABLE);
    t.add_table();
    t.base_chain(
        "prerouting",
        NfChainType::NAT,
        NfHook::Prerouting,
        -100,
        NfChainPolicy::Accept,
    );
    t.base_chain(
        "postrouting",
        NfChainType::NAT,
        NfHook::Postrouting,
        100,
        NfChainPolicy::Accept,
    );
    t.base_chain(
        "input",
        NfChainType::Filter,
        NfHook::Input,
        0,
        NfChainPolicy::Drop,
    );
    t.base_chain(
        "forward",
        NfChainType::Filter,
        NfHook::Forward,
        0,
        NfChainPolicy::Drop,
    );
    t.regular_chain(DNS_REDIRECT);
    t.rule("prerouting", vec![iif(guest_dev), jump(DNS_REDIRECT)]);
    fill_dns_redirect(&mut t, redirect_dns);

    let guest_ports: BTreeSet<(&'static str, u16)> = ports
        .iter()
        .map(|p| (p.protocol.as_str(), p.guest_port))
        .collect();
    for (proto, port) in guest_ports {
        t.rule(
            "prerouting",
            vec![
                iif(veth),
                ipv4(),
                is(field("ip", "daddr"), s(netns_addr.to_string())),
                is(field(proto, "dport"), Expression::Number(u32::from(port))),
                dnat(GUEST_ADDR, None),
            ],
        );
    }
    t.rule(
        "postrouting",
        vec![
            oif(veth),
            ipv4(),
            is(field("ip", "saddr"), s(GUEST_ADDR.to_string())),
            masquerade(),
        ],
    );

    t.rule("input", vec![iif("lo"), accept()]);
    t.rule("input", vec![established(), accept()]);
    t.rule(
        "input",
        vec![
            iif(guest_dev),
            ipv4(),
            is(field("ip", "daddr"), s(GATEWAY_ADDR.to_string())),
            is(field("ip", "protocol"), s("icmp")),
            accept(),
        ],
    );

    for proto in ["udp", "tcp"] {
        t.rule(
            "input",
            vec![
                iif(guest_dev),
                ipv4(),
                is(field("ip", "daddr"), s(GATEWAY_ADDR.to_string())),
                is(field(proto, "dport"), Expression::Number(53)),
                accept(),
            ],
        );
    }

    t.rule(
        "forward",
        vec![
            iif(guest_dev),
            oif(veth),
            ipv4(),
            is(field("ip", "saddr"), s(GUEST_ADDR.to_string())),
            accept(),
        ],
    );
    t.rule(
        "forward",
        vec![iif(veth), oif(guest_dev), established(), accept()],
    );
    t.rule(
        "forward",
        vec![iif(veth), oif(guest_dev), dnatted(), accept()],
    );
    t.finish()
}

/// The namespace chain that sends the guest's DNS to the resolver.
const DNS_REDIRECT: &str = "dns_redirect";

fn fill_dns_redirect(t: &mut TableBuilder, on: bool) {
    if !on {
        return;
    }
    for proto in ["udp", "tcp"] {
        t.rule(
            DNS_REDIRECT,
            vec![
                ipv4(),
                is(field(proto, "dport"), Expression::Number(53)),
                dnat(GATEWAY_ADDR, Some(53)),
            ],
        );
    }
}

/// Turns the redirect of the guest's DNS to the sandbox's resolver on or
/// off (in the namespace's table). New DNS flows only: conntrack keeps an
/// ongoing flow's translation.
pub(crate) fn netns_dns_redirect(on: bool) -> Nftables<'static> {
    let mut t = TableBuilder::new(NETNS_TABLE);
    t.flush_chain(DNS_REDIRECT);
    fill_dns_redirect(&mut t, on);
    t.finish()
}

/// `delete table inet <name>`.
pub(crate) fn delete_table(name: &str) -> Nftables<'static> {
    let mut b = Batch::new();
    b.delete(NfListObject::Table(Table {
        family: NfFamily::INet,
        name: Cow::Owned(name.to_owned()),
        handle: None,
    }));
    b.to_nftables()
}

/// Applies a batch by running `nft -j -f -` from the calling thread (and so
/// in its network namespace). Blocking.
pub(crate) fn apply(nft: &Nftables<'_>, op: &str) -> Result<(), HostError> {
    nftables::helper::apply_ruleset(nft).map_err(|e| HostError::nft(op, e))
}

/// The names of the `inet` tables of the calling thread's namespace.
pub(crate) fn list_inet_tables() -> Result<Vec<String>, HostError> {
    let ruleset = nftables::helper::get_current_ruleset_with_args(
        nftables::helper::DEFAULT_NFT,
        ["list", "tables"],
    )
    .map_err(|e| HostError::nft("listing tables", e))?;
    Ok(ruleset
        .objects
        .iter()
        .filter_map(|o| match o {
            nftables::schema::NfObject::ListObject(NfListObject::Table(t))
                if t.family == NfFamily::INet =>
            {
                Some(t.name.to_string())
            }
            _ => None,
        })
        .collect())
}

/// Whether a `delete table` failed because the table does not exist.
pub(crate) fn is_missing_table(e: &HostError) -> bool {
    matches!(e, HostError::Nft { source: nftables::helper::NftablesError::NftFailed { stderr, .. }, .. }
        if stderr.contains("No such file or directory"))
}

/// The current ruleset of one table, as `nft` prints it (`nft list table`),
/// for tests and diagnostics.
pub fn list_table_text(table: &str) -> Result<String, HostError> {
    let output = std::process::Command::new("nft")
        .args(["list", "table", "inet", table])
        .output()
        .map_err(|e| HostError::io("running nft list table", e))?;
    if !output.status.success() {
        return Err(HostError::NotFound {
            op: format!(
                "nft table inet {table} ({})",
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{EgressRule, Protocol};

    fn sample<'a>(
        egress: &'a EgressPolicy,
        ports: &'a [PortMapping],
        dns: &'a [Ipv4Addr],
    ) -> HostTable<'a> {
        HostTable {
            table: "nova-sb-test",
            veth: "nova0123456789a",
            netns_addr: Ipv4Addr::new(10, 200, 0, 2),
            pool: "10.200.0.0/16".parse().expect("cidr"),
            ports,
            egress,
            dns,
            learned: &[],
            generation: 1,
        }
    }

    #[test]
    fn host_table_json_has_the_pieces() {
        let egress = EgressPolicy {
            block_all: true,
            allow: vec![
                EgressRule::Cidr("0.0.0.0/0".parse().expect("cidr")),
                EgressRule::Cidr("10.200.0.6/32".parse().expect("cidr")),
                EgressRule::Cidr("192.0.2.2/32".parse().expect("cidr")),
            ],
            deny: vec![EgressRule::Cidr("198.18.0.0/15".parse().expect("cidr"))],
        };
        let ports = [PortMapping {
            host_port: 8080,
            guest_port: 80,
            protocol: Protocol::Tcp,
            host_ip: Ipv4Addr::UNSPECIFIED,
        }];
        let dns = [Ipv4Addr::new(10, 0, 0, 2)];
        let json =
            serde_json::to_string(&sample(&egress, &ports, &dns).create()).expect("serializes");
        for needle in [
            r#""name":"nova-sb-test""#,
            r#""dnat":{"addr":"10.200.0.2","family":"ip","port":80}"#,
            r#""fib":{"result":"type","flags":["daddr"]}"#,
            r#""masquerade":null"#,
            r#""169.254.169.254""#,
            r#""prefix":{"addr":"10.200.0.0","len":16}"#,
            r#""@allow_protected""#,
        ] {
            assert!(json.contains(needle), "missing {needle} in {json}");
        }
        // 0.0.0.0/0 is folded alone into allow; the /32 inside the pool is
        // the only protected exception; both /32s may reach host addresses.
        let protected = r#""name":"allow_protected","elem":["10.200.0.6"]"#;
        assert!(json.contains(protected), "{json}");
        let hosts = r#""name":"allow_host","elem":["10.200.0.6","192.0.2.2"]"#;
        assert!(json.contains(hosts), "{json}");
    }

    #[test]
    fn a_domain_allowlist_ends_egress_with_learned_addresses_and_a_reject() {
        let egress =
            EgressPolicy::parse::<_, &str>(false, &["allowed.example.com"], &[]).expect("policy");
        let learned = [(Ipv4Addr::new(198, 18, 7, 2), 42)];
        let table = HostTable {
            learned: &learned,
            generation: 3,
            ..sample(&egress, &[], &[])
        };
        let json = serde_json::to_string(&table.update_egress()).expect("serializes");
        let mark = learned_mark(3).to_string();
        for needle in [
            r#"{"flush":{"set":{"family":"inet","table":"nova-sb-test","name":"allow_dns""#,
            r#""elem":{"val":"198.18.7.2","timeout":42"#,
            r#""@allow_dns""#,
            &format!(r#""mangle":{{"key":{{"ct":{{"key":"mark"}}}},"value":{mark}}}"#),
        ] {
            assert!(json.contains(needle), "missing {needle} in {json}");
        }
        assert!(
            json.ends_with(r#"{"reject":{"type":"icmpx","expr":"admin-prohibited"}}]}}}]}"#),
            "an allowlist of domains closes the rest although block_all is off: {json}"
        );
        let create = serde_json::to_string(&table.create()).expect("serializes");
        assert!(create.contains(r#""flags":["timeout"]"#), "{create}");

        let refresh = add_learned(
            "nova-sb-test",
            &[
                LearnedElement {
                    ip: Ipv4Addr::new(198, 18, 7, 2),
                    timeout: 60,
                    refresh: true,
                },
                LearnedElement {
                    ip: Ipv4Addr::new(198, 18, 7, 3),
                    timeout: 60,
                    refresh: false,
                },
            ],
        );
        let json = serde_json::to_string(&refresh).expect("serializes");
        let (add, rest) = json.split_once(r#"{"delete""#).expect("a delete");
        assert!(
            add.contains("198.18.7.2") && !add.contains("198.18.7.3"),
            "{json}"
        );
        assert!(rest.contains("198.18.7.3"), "{json}");
    }

    #[test]
    fn the_guest_dns_redirect_is_a_chain_turned_on_and_off() {
        let on = serde_json::to_string(&netns_dns_redirect(true)).expect("serializes");
        assert!(
            on.contains(r#""dnat":{"addr":"169.254.0.22","family":"ip","port":53}"#),
            "{on}"
        );
        let off = serde_json::to_string(&netns_dns_redirect(false)).expect("serializes");
        assert!(off.contains(r#""flush""#) && !off.contains("dnat"), "{off}");
    }

    #[test]
    fn update_flushes_sets_and_the_egress_chain_only() {
        let egress = EgressPolicy::default();
        let table = sample(&egress, &[], &[]);
        let json = serde_json::to_string(&table.update_egress()).expect("serializes");
        assert!(json.contains(r#"{"flush":{"chain""#), "{json}");
        assert!(
            !json.contains(r#""hook""#),
            "an update must not touch base chains: {json}"
        );
        assert!(
            json.ends_with(r#"{"accept":null}]}}}]}"#),
            "default verdict accept: {json}"
        );
    }
}
