//! The FFI half of the VZ backend (macOS only): the helper process
//! `nova-vz-vmm` that owns one `VZVirtualMachine`.
//!
//! - [`queue`]: the bridge between VZ's dispatch queue and tokio;
//! - [`machine`]: the VZ configuration built from a
//!   [`VzMachineSpec`](crate::spec::VzMachineSpec), and the VM's
//!   operations as async functions;
//! - [`helper`]: the helper's `main`: start the VM, serve the control and
//!   vsock sockets, exit when the VM stops.
//!
//! This code is type-checked on Linux against the real
//! `objc2-virtualization` API (`make check-macos`) and has not run: no Mac
//! was available.

pub mod helper;
pub mod machine;
pub mod queue;
