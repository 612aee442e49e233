//! A uid and gid of its own for each sandbox's QEMU.
//!
//! With the default confinement as root, each QEMU drops to an id drawn at
//! random from [`PER_SANDBOX_IDS`] and owned by that sandbox alone while it
//! lives: its writable disk is chowned to it (QEMU reopens the disk by path
//! when a snapshot hands it over, after it dropped root), and no other
//! sandbox's QEMU can open, trace or signal it. Ids are unique within this
//! process; across processes on one host a collision is unlikely (one in
//! 2^24 per pair) and would only let two sandboxes' QEMUs share a uid.

use std::collections::BTreeSet;
use std::sync::Mutex;

use crate::confinement::PER_SANDBOX_IDS;

/// The ids leased by this process.
static TAKEN: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

/// A per-sandbox id, given back when dropped.
#[derive(Debug)]
pub(crate) struct IdLease(u32);

impl IdLease {
    /// Draws a free id.
    pub(crate) fn take() -> std::io::Result<Self> {
        let span = PER_SANDBOX_IDS.end - PER_SANDBOX_IDS.start;
        let mut taken = TAKEN.lock().unwrap_or_else(|p| p.into_inner());
        for _ in 0..64 {
            let mut bytes = [0u8; 4];
            getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
            let id = PER_SANDBOX_IDS.start + u32::from_le_bytes(bytes) % span;
            if taken.insert(id) {
                return Ok(Self(id));
            }
        }
        Err(std::io::Error::other(
            "no free per-sandbox uid after 64 draws",
        ))
    }

    /// Takes `id` again for a sandbox whose QEMU runs as it already (a
    /// re-attached sandbox); fails if this process leased it to another.
    pub(crate) fn claim(id: u32) -> std::io::Result<Self> {
        let mut taken = TAKEN.lock().unwrap_or_else(|p| p.into_inner());
        if !taken.insert(id) {
            return Err(std::io::Error::other(format!(
                "per-sandbox uid {id} is leased to another sandbox"
            )));
        }
        Ok(Self(id))
    }

    /// The uid (also used as the gid).
    pub(crate) fn id(&self) -> u32 {
        self.0
    }
}

impl Drop for IdLease {
    fn drop(&mut self) {
        TAKEN
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_distinct_in_range_and_given_back() {
        let a = IdLease::take().unwrap();
        let b = IdLease::take().unwrap();
        assert_ne!(a.id(), b.id());
        assert!(PER_SANDBOX_IDS.contains(&a.id()));
        let id = a.id();
        drop(a);
        assert!(!TAKEN.lock().unwrap().contains(&id));
        assert!(TAKEN.lock().unwrap().contains(&b.id()));
    }
}
