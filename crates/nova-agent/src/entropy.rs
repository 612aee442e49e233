//! Host entropy for a guest restored from a snapshot.
//!
//! Every guest restored from one snapshot starts with the same kernel random
//! state: the input pool and the keys of the kernel's generator (the CRNG)
//! are part of the memory image. Until the kernel reseeds on its own (on
//! Linux 5.18 and later, up to a minute on, unless the VMM offers a VM
//! generation id that the kernel watches), siblings draw the same "random"
//! numbers from `getrandom(2)` and `/dev/urandom`. [`mix_in`] ends that:
//!
//! * writing the host's bytes to `/dev/urandom` mixes them into the input
//!   pool. Nothing is credited, so this can only add unpredictability; it
//!   needs no privilege and is harmless on any machine;
//! * the `RNDRESEEDCRNG` ioctl (Linux 4.17 and later, `CAP_SYS_ADMIN`) makes
//!   the generator reseed from that pool now, so every later read reflects
//!   the host's bytes. Only PID 1 does this: elsewhere (host tests) the
//!   generator is not the guest's own.
//!
//! Random state that processes already hold (a user-space generator seeded
//! before the snapshot) is out of this module's reach.

use std::fs::OpenOptions;
use std::io::{self, Write};

use rustix::ioctl::{NoArg, Opcode, ioctl, opcode};

/// `RNDRESEEDCRNG` from `<linux/random.h>`: `_IO('R', 0x07)`, no argument.
const RNDRESEEDCRNG: Opcode = opcode::none(b'R', 0x07);

/// Mixes `entropy` into the kernel's input pool and, with `reseed`, makes
/// the kernel's generator reseed from it. Returns whether it reseeded: a
/// kernel that refuses (too old, not yet initialized, no privilege) is
/// logged and reported as `false`, not an error, since the bytes were still
/// mixed in and the kernel reseeds on its own schedule.
pub(crate) fn mix_in(entropy: &[u8], reseed: bool) -> io::Result<bool> {
    let mut urandom = OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| io::Error::new(e.kind(), format!("open /dev/urandom: {e}")))?;
    urandom
        .write_all(entropy)
        .map_err(|e| io::Error::new(e.kind(), format!("write to /dev/urandom: {e}")))?;
    if !reseed {
        return Ok(false);
    }
    // SAFETY: RNDRESEEDCRNG is the random device's opcode for a request
    // without an argument (`_IO`), which is what `NoArg` makes.
    let request = unsafe { NoArg::<RNDRESEEDCRNG>::new() };
    // SAFETY: with no argument the kernel reads and writes none of our
    // memory; `urandom` is an open descriptor of the random device for the
    // whole call. The only effect is a reseed of the kernel's generator.
    match unsafe { ioctl(&urandom, request) } {
        Ok(()) => Ok(true),
        Err(e) => {
            tracing::warn!(error = %e, "the kernel did not reseed its random generator (RNDRESEEDCRNG); the host's entropy is mixed in and takes effect at its next reseed");
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_opcode_is_the_kernels() {
        // `_IO('R', 0x07)` on x86_64 and arm64 (no direction, no size).
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        assert_eq!(RNDRESEEDCRNG, 0x5207);
    }

    #[test]
    fn mixing_in_needs_no_privilege_and_does_not_reseed_unasked() {
        assert!(!mix_in(&[0x5a; 64], false).unwrap());
        assert!(!mix_in(&[], false).unwrap());
    }
}
