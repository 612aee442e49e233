//! The sandbox network of a host that cannot make one (anything but Linux).
//!
//! [`SandboxNetwork`] here has no values: its constructors answer
//! [`HostError::NotLinux`], so code written against the Linux type (the
//! runtime, which only makes a network when its backend attaches one and
//! the host supports it) builds unchanged, and every method on a value is
//! statically unreachable. [`clean_leftovers`] finds nothing: no host
//! object of a sandbox network can exist here.

use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::Path;

use nova_core::SandboxId;

use crate::error::{
    CountersError, CreateNetworkError, HostError, LeftoverError, OpenTapError, TeardownError,
    UpdateEgressError,
};
use crate::pool::AddressPool;
use crate::spec::{EgressPolicy, NetworkSpec};

/// A sandbox's traffic, counted on its veth (Linux only).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Bytes into the sandbox.
    pub rx_bytes: u64,
    /// Bytes out of the sandbox.
    pub tx_bytes: u64,
    /// Packets into the sandbox.
    pub rx_packets: u64,
    /// Packets out of the sandbox.
    pub tx_packets: u64,
}

/// What [`clean_leftovers`] removed: always nothing on this host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeftoverReport {
    /// Namespaces removed (names).
    pub netns: Vec<String>,
    /// Host links removed (names).
    pub links: Vec<String>,
    /// nft tables removed (names).
    pub tables: Vec<String>,
}

impl LeftoverReport {
    /// Whether nothing was found.
    pub fn is_empty(&self) -> bool {
        self.netns.is_empty() && self.links.is_empty() && self.tables.is_empty()
    }
}

/// Finds no leftovers: sandbox networks are never made on this host.
pub async fn clean_leftovers(keep: impl Fn(&str) -> bool) -> Result<LeftoverReport, LeftoverError> {
    let _ = keep;
    Ok(LeftoverReport::default())
}

/// A sandbox network, which this host cannot make: no value exists.
#[derive(Debug)]
pub enum SandboxNetwork {}

impl SandboxNetwork {
    /// Fails with [`HostError::NotLinux`].
    pub async fn create(
        id: &SandboxId,
        spec: &NetworkSpec,
        pool: &AddressPool,
    ) -> Result<Self, CreateNetworkError> {
        let _ = (id, spec, pool);
        Err(not_linux("making a sandbox network"))
    }

    /// Fails with [`HostError::NotLinux`].
    pub fn adopt(
        id: &SandboxId,
        spec: &NetworkSpec,
        pool: &AddressPool,
        host_addr: Ipv4Addr,
    ) -> Result<Self, CreateNetworkError> {
        let _ = (id, spec, pool, host_addr);
        Err(not_linux("taking over a sandbox network"))
    }

    /// Unreachable: no value exists.
    pub async fn update_egress(&mut self, egress: EgressPolicy) -> Result<(), UpdateEgressError> {
        let _ = egress;
        match *self {}
    }

    /// Unreachable: no value exists.
    pub async fn counters(&self) -> Result<NetCounters, CountersError> {
        match *self {}
    }

    /// Unreachable: no value exists.
    pub async fn open_tap(&self, vnet_hdr: bool) -> Result<OwnedFd, OpenTapError> {
        let _ = vnet_hdr;
        match *self {}
    }

    /// Unreachable: no value exists.
    pub fn open_netns(&self) -> Result<OwnedFd, HostError> {
        match *self {}
    }

    /// Unreachable: no value exists.
    pub async fn teardown(&mut self) -> Result<(), TeardownError> {
        match *self {}
    }

    /// Unreachable: no value exists.
    pub fn forget(self) {
        match self {}
    }

    /// Unreachable: no value exists.
    pub fn id(&self) -> &SandboxId {
        match *self {}
    }

    /// Unreachable: no value exists.
    pub fn netns_name(&self) -> &str {
        match *self {}
    }

    /// Unreachable: no value exists.
    pub fn netns_path(&self) -> &Path {
        match *self {}
    }

    /// Unreachable: no value exists.
    pub fn host_veth(&self) -> &str {
        match *self {}
    }

    /// Unreachable: no value exists.
    pub fn host_addr(&self) -> Ipv4Addr {
        match *self {}
    }

    /// Unreachable: no value exists.
    pub fn netns_addr(&self) -> Ipv4Addr {
        match *self {}
    }

    /// Unreachable: no value exists.
    pub fn guest_addr(&self) -> (Ipv4Addr, u8) {
        match *self {}
    }

    /// Unreachable: no value exists.
    pub fn gateway(&self) -> Ipv4Addr {
        match *self {}
    }

    /// Unreachable: no value exists.
    pub fn spec(&self) -> &NetworkSpec {
        match *self {}
    }
}

fn not_linux(op: &str) -> CreateNetworkError {
    HostError::NotLinux { op: op.to_owned() }.into()
}
