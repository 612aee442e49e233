//! `nova-vz-vmm`: the helper process that owns one Apple VZ virtual machine
//! (see the `nova_vz` crate docs). Started by the VZ backend, one per
//! sandbox; not meant to be run by hand.
//!
//! Usage: `nova-vz-vmm --spec VZ.JSON --control API.SOCK --vsock VSOCK.SOCK`

#[cfg(target_os = "macos")]
fn main() -> std::process::ExitCode {
    nova_vz::macos::helper::main()
}

#[cfg(not(target_os = "macos"))]
fn main() -> std::process::ExitCode {
    eprintln!("nova-vz-vmm runs Apple Virtualization.framework VMs and works on macOS only");
    std::process::ExitCode::from(2)
}
