//! The pool of /30 subnets the host ends of the veths take addresses from.
//!
//! Each sandbox gets one /30: `.1` on the host end of its veth, `.2` on the
//! namespace end. The guest never sees these (it has the same link-local
//! address in every sandbox); they exist so the host can route to and NAT
//! each namespace separately. The pool remembers what it handed out in this
//! process, and [`SandboxNetwork::create`](crate::SandboxNetwork::create)
//! also skips any /30 an address on the host already falls in (another
//! process's sandbox, a leftover, an unrelated interface).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, PoisonError};

use crate::spec::Ipv4Cidr;

/// The default pool: `10.200.0.0/16`, room for 16384 sandboxes.
pub const DEFAULT_POOL: Ipv4Cidr = match Ipv4Cidr::const_new(Ipv4Addr::new(10, 200, 0, 0), 16) {
    Some(c) => c,
    None => panic!("the default pool is a valid CIDR"),
};

/// A shared, cloneable pool of /30 subnets.
#[derive(Clone, Debug)]
pub struct AddressPool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    range: Ipv4Cidr,
    /// Offsets (in /30 units) handed out and not yet returned.
    used: Mutex<BTreeSet<u32>>,
}

/// A pool range too small to hold a /30.
#[derive(Debug, thiserror::Error)]
#[error("address pool {0} is smaller than a /30: use a prefix of 30 or less")]
pub struct PoolTooSmall(pub Ipv4Cidr);

impl AddressPool {
    /// A pool over `range`, which must be a /30 or wider.
    pub fn new(range: Ipv4Cidr) -> Result<Self, PoolTooSmall> {
        if range.prefix() > 30 {
            return Err(PoolTooSmall(range));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                range,
                used: Mutex::new(BTreeSet::new()),
            }),
        })
    }

    /// The range the pool hands out.
    pub fn range(&self) -> Ipv4Cidr {
        self.inner.range
    }

    /// How many subnets are leased now.
    pub fn leased(&self) -> usize {
        self.inner
            .used
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Leases the first free /30 that none of `taken` falls in.
    pub(crate) fn lease(&self, taken: &[Ipv4Addr]) -> Option<SubnetLease> {
        let range = self.inner.range;
        let count = u32::try_from(range.size() / 4).unwrap_or(u32::MAX);
        let base = u32::from(range.addr());
        let taken: BTreeSet<u32> = taken
            .iter()
            .filter(|a| range.contains(**a))
            .map(|a| (u32::from(*a) - base) / 4)
            .collect();
        let mut used = self
            .inner
            .used
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let slot = (0..count).find(|i| !used.contains(i) && !taken.contains(i))?;
        used.insert(slot);
        Some(SubnetLease {
            pool: self.clone(),
            slot,
        })
    }
}

impl AddressPool {
    /// Leases the /30 whose host end is `host_addr` (a network a dead
    /// owner left, taken over); `None` if it is outside the pool or leased.
    pub(crate) fn lease_at(&self, host_addr: Ipv4Addr) -> Option<SubnetLease> {
        let range = self.inner.range;
        if !range.contains(host_addr) {
            return None;
        }
        let slot = (u32::from(host_addr) - u32::from(range.addr())) / 4;
        let mut used = self
            .inner
            .used
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !used.insert(slot) {
            return None;
        }
        Some(SubnetLease {
            pool: self.clone(),
            slot,
        })
    }
}

impl Default for AddressPool {
    fn default() -> Self {
        Self::new(DEFAULT_POOL).expect("the default pool is a /16")
    }
}

/// One leased /30; returned to the pool on drop.
#[derive(Debug)]
pub(crate) struct SubnetLease {
    pool: AddressPool,
    slot: u32,
}

impl SubnetLease {
    fn base(&self) -> u32 {
        u32::from(self.pool.inner.range.addr()) + self.slot * 4
    }

    /// The /30 itself.
    pub(crate) fn subnet(&self) -> Ipv4Cidr {
        Ipv4Cidr::host(Ipv4Addr::from(self.base())).with_prefix(30)
    }

    /// The host end's address (`.1`).
    pub(crate) fn host_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base() + 1)
    }

    /// The namespace end's address (`.2`).
    pub(crate) fn netns_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base() + 2)
    }
}

impl Drop for SubnetLease {
    fn drop(&mut self) {
        self.pool
            .inner
            .used
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_unique_and_returned() {
        let pool = AddressPool::new("10.9.0.0/29".parse().expect("cidr")).expect("pool");
        let a = pool.lease(&[]).expect("first");
        let b = pool.lease(&[]).expect("second");
        assert!(pool.lease(&[]).is_none(), "a /29 holds two /30s");
        assert_eq!(a.host_addr(), Ipv4Addr::new(10, 9, 0, 1));
        assert_eq!(a.netns_addr(), Ipv4Addr::new(10, 9, 0, 2));
        assert_eq!(b.host_addr(), Ipv4Addr::new(10, 9, 0, 5));
        assert_eq!(b.subnet().to_string(), "10.9.0.4/30");
        drop(a);
        assert_eq!(pool.leased(), 1);
        let c = pool.lease(&[]).expect("returned slot");
        assert_eq!(c.host_addr(), Ipv4Addr::new(10, 9, 0, 1));
    }

    #[test]
    fn addresses_on_the_host_are_skipped() {
        let pool = AddressPool::new("10.9.0.0/28".parse().expect("cidr")).expect("pool");
        let l = pool
            .lease(&[Ipv4Addr::new(10, 9, 0, 2), Ipv4Addr::new(192, 0, 2, 2)])
            .expect("lease");
        assert_eq!(l.subnet().to_string(), "10.9.0.4/30");
    }

    #[test]
    fn a_pool_must_hold_a_slash_30() {
        assert!(AddressPool::new("10.9.0.0/31".parse().expect("cidr")).is_err());
        assert_eq!(AddressPool::default().range().to_string(), "10.200.0.0/16");
    }
}
