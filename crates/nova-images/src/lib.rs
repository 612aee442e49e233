//! NovaSandbox guest images: the microVM kernel, root filesystems, templates.
//!
//! A sandbox boots a *template*: `$NOVA_HOME/templates/<id>/` with
//! `vmlinux`, `rootfs.ext4` and `<id>.json`. This crate builds them from
//! packages a Debian host can reach, with one command, cached:
//!
//! * [`kernel`]: Debian's `linux-source-6.1` configured by the project's
//!   fragment (`images/kernel/microvm-x86_64.config`: virtio-mmio, no modules,
//!   no PCI, PVH entry) into an uncompressed, stripped `vmlinux` that both
//!   Firecracker and QEMU `microvm` boot; cached by source version + config.
//! * [`rootfs`]: ext4 images made with `mkfs.ext4 -d` (no mount, no loop):
//!   [`rootfs::minimal`] (busybox-static) and [`rootfs::debian`]
//!   (debootstrap minbase + packages, cached); `nova-agent` is `/sbin/init`.
//! * [`template`]: the known templates (`minimal`, `python`) and
//!   [`template::build_template`], which ties it together and installs the
//!   result atomically, in the manifest format nova-core's `TemplateManager`
//!   loads.
//! * [`oci`] and [`image_template`]: templates from OCI / Docker images
//!   (registry pulls, OCI layouts and archives, `docker save` archives),
//!   layers applied safely, the image's process defaults kept as the
//!   template's exec defaults; [`dockerfile`]: templates from Dockerfiles,
//!   `RUN` steps run in sandboxes.
//! * [`boot_probe`]: boots a kernel + rootfs under QEMU TCG and times it
//!   (template `boot_time_ms`, tests, the boot benchmark).
//!
//! Supporting pieces: [`cache`] (keys, atomic publication, locks),
//! [`command`] (logged host commands), [`host_tools`] (finding and
//! installing host tools), [`elf`] (PVH-note and static-binary checks).

#![forbid(unsafe_code)]

pub mod boot_probe;
pub mod cache;
pub mod command;
pub mod dockerfile;
pub mod elf;
pub mod host_tools;
pub mod image_template;
pub mod kernel;
pub mod oci;
pub mod rootfs;
pub mod template;

pub use template::{
    BuildOptions, BuildReport, BuildTemplateError, build_template, find_template, known_templates,
};
