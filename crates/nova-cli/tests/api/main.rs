//! The daemon's HTTP API end to end: a real `nova serve` (this package's
//! binary) on a temporary `$NOVA_HOME`, real microVMs from the installed
//! `minimal` template, every endpoint driven over the Unix socket (and TCP
//! for the token checks).
//!
//! - [`endpoints`]: every route against one sandbox (plus one that expires),
//! - [`bad_input`]: malformed and refused requests are 4xx problems that
//!   name what is wrong, never a 5xx; the bearer token over TCP,
//! - [`restart`]: `kill -9` of the daemon during a streamed exec, during a
//!   create, and of a VMM while no daemon runs.
//!
//! Each test starts its own daemon and boots one or two VMs under QEMU
//! (TCG on CI); `make test` runs them with `--test-threads=2` on small
//! hosts. Without the templates the tests fail, unless
//! `NOVA_SKIP_VM_TESTS=1`, where they print SKIP.

#![allow(clippy::unwrap_used, reason = "test code")]
#![allow(unreachable_pub, reason = "test modules")]

mod bad_input;
mod endpoints;
mod harness;
mod restart;
