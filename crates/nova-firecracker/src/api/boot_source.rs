//! `/boot-source`: the guest kernel, its command line and initrd.

use serde::{Deserialize, Serialize};

/// The body of `PUT /boot-source`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSource {
    /// Kernel image (ELF `vmlinux` on x86_64) as the VMM sees its path.
    pub kernel_image_path: String,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// Initial ramdisk, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn request_body() {
        let boot = BootSource {
            kernel_image_path: "/t/vmlinux".into(),
            boot_args: Some("console=ttyS0 reboot=k".into()),
            initrd_path: None,
        };
        assert_eq!(
            serde_json::to_value(&boot).unwrap(),
            json!({"kernel_image_path": "/t/vmlinux", "boot_args": "console=ttyS0 reboot=k"})
        );
    }
}
