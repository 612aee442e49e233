//! QEMU `microvm` provider for NovaSandbox.
//!
//! Each sandbox is one `qemu-system-x86_64 -M microvm` process booting the
//! template's uncompressed kernel straight into `nova-agent` (PID 1), with
//! the template rootfs shared read-only and a private sparse scratch disk for
//! the writable overlay. The host drives QEMU through QMP ([`qmp`]) and the
//! guest through the agent protocol over a virtio-serial port whose host end
//! is a Unix socket. QEMU takes its whole configuration on its command line
//! ([`cmdline`]), so "configure" costs nothing and boot time is spawn → QMP
//! ready → agent ready. QEMU runs under its seccomp filter and, when nova
//! is root, as an unprivileged user ([`confinement`]).
//!
//! A template whose manifest says arm64 runs the same way in
//! `qemu-system-aarch64 -M virt` under TCG ([`qemu_for`] picks the binary
//! and accelerator by the guest's architecture, [`cmdline`] the machine,
//! CPU and console): the guest Apple Virtualization.framework boots on a
//! Mac, emulated here.
//!
//! This is the backend that boots real guests on any Linux host: with KVM
//! when the host has hardware virtualization, else with TCG (software
//! emulation, seconds per boot; development and CI only).

#![forbid(unsafe_code)]

pub mod baseline;
pub mod cmdline;
pub mod confinement;
mod hypervisor;
mod ids;
pub mod qmp;
pub mod vm;

pub use hypervisor::{
    DEFAULT_SCRATCH_MB, QEMU_AARCH64_BIN, QEMU_AARCH64_BIN_ENV, Qemu, QemuHypervisor, QemuOptions,
    QemuUnavailable, qemu_for,
};
pub use vm::QemuVm;
