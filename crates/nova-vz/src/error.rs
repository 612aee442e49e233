//! VZ's errors (`NSError`s of `VZErrorDomain`) as typed values:
//! [`VzFailure`], made from the error's domain, code and description by
//! [`VzFailure::from_ns_error_parts`], so that the mapping is tested on any
//! host and the helper's answers carry a kind the host can act on.

use serde::{Deserialize, Serialize};

/// `VZErrorDomain`, the domain of Virtualization.framework's own errors.
pub const VZ_ERROR_DOMAIN: &str = "VZErrorDomain";

/// What kind of failure VZ reported (`VZErrorCode`), or that the error came
/// from another domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VzErrorKind {
    /// `VZErrorInternal` (1).
    Internal,
    /// `VZErrorInvalidVirtualMachineConfiguration` (2).
    InvalidConfiguration,
    /// `VZErrorInvalidVirtualMachineState` (3).
    InvalidState,
    /// `VZErrorInvalidVirtualMachineStateTransition` (4).
    InvalidStateTransition,
    /// `VZErrorInvalidDiskImage` (5).
    InvalidDiskImage,
    /// `VZErrorVirtualMachineLimitExceeded` (6).
    LimitExceeded,
    /// `VZErrorNetworkError` (7).
    Network,
    /// `VZErrorOutOfDiskSpace` (8).
    OutOfDiskSpace,
    /// `VZErrorOperationCancelled` (9).
    Cancelled,
    /// `VZErrorNotSupported` (10).
    NotSupported,
    /// `VZErrorSave` (11).
    Save,
    /// `VZErrorRestore` (12).
    Restore,
    /// Another `VZErrorDomain` code (macOS installation, USB, NBD: not used
    /// for Linux guests).
    Other,
    /// An error of another domain (`NSCocoaErrorDomain`, `NSPOSIXErrorDomain`).
    Foreign,
}

impl VzErrorKind {
    /// The kind of `code` in `domain`.
    pub fn classify(domain: &str, code: i64) -> Self {
        if domain != VZ_ERROR_DOMAIN {
            return Self::Foreign;
        }
        match code {
            1 => Self::Internal,
            2 => Self::InvalidConfiguration,
            3 => Self::InvalidState,
            4 => Self::InvalidStateTransition,
            5 => Self::InvalidDiskImage,
            6 => Self::LimitExceeded,
            7 => Self::Network,
            8 => Self::OutOfDiskSpace,
            9 => Self::Cancelled,
            10 => Self::NotSupported,
            11 => Self::Save,
            12 => Self::Restore,
            _ => Self::Other,
        }
    }

    /// What a user can do about it, where there is something.
    pub fn hint(self) -> Option<&'static str> {
        Some(match self {
            Self::InvalidConfiguration => {
                "check the template's kernel (an uncompressed arm64 Image) and disks, and that \
                 the helper is signed with the com.apple.security.virtualization entitlement \
                 (make sign-macos)"
            }
            Self::InvalidDiskImage => "the disk must be a raw image the user can read",
            Self::LimitExceeded => "stop another VM first",
            Self::OutOfDiskSpace => "free space on the volume of NOVA_HOME",
            Self::NotSupported => "this needs a newer macOS (save and restore need macOS 14)",
            Self::Restore => {
                "the saved state was made on another Mac or macOS, or for other devices; \
                 rebuild the template's snapshot"
            }
            _ => return None,
        })
    }
}

/// One failure VZ reported, as the helper passes it on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{description} ({domain} {code}){}", hint.as_deref().map(|h| format!("; {h}")).unwrap_or_default())]
pub struct VzFailure {
    /// Its kind.
    pub kind: VzErrorKind,
    /// The `NSError` domain.
    pub domain: String,
    /// The `NSError` code.
    pub code: i64,
    /// Its `localizedDescription`.
    pub description: String,
    /// What to do, when known ([`VzErrorKind::hint`]).
    pub hint: Option<String>,
}

impl VzFailure {
    /// The failure of an `NSError` with these parts.
    pub fn from_ns_error_parts(domain: &str, code: i64, description: &str) -> Self {
        let kind = VzErrorKind::classify(domain, code);
        Self {
            kind,
            domain: domain.to_owned(),
            code,
            description: description.to_owned(),
            hint: kind.hint().map(str::to_owned),
        }
    }

    /// A failure of the helper itself (no `NSError`): `Foreign`, code 0.
    pub fn helper(description: impl Into<String>) -> Self {
        Self {
            kind: VzErrorKind::Foreign,
            domain: "nova-vz-vmm".to_owned(),
            code: 0,
            description: description.into(),
            hint: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vz_codes_map_to_kinds_and_other_domains_are_foreign() {
        let kinds: Vec<VzErrorKind> = (1..=13)
            .map(|code| VzErrorKind::classify(VZ_ERROR_DOMAIN, code))
            .collect();
        assert_eq!(
            kinds,
            [
                VzErrorKind::Internal,
                VzErrorKind::InvalidConfiguration,
                VzErrorKind::InvalidState,
                VzErrorKind::InvalidStateTransition,
                VzErrorKind::InvalidDiskImage,
                VzErrorKind::LimitExceeded,
                VzErrorKind::Network,
                VzErrorKind::OutOfDiskSpace,
                VzErrorKind::Cancelled,
                VzErrorKind::NotSupported,
                VzErrorKind::Save,
                VzErrorKind::Restore,
                VzErrorKind::Other,
            ]
        );
        assert_eq!(
            VzErrorKind::classify("NSPOSIXErrorDomain", 2),
            VzErrorKind::Foreign
        );
    }

    #[test]
    fn a_failure_says_what_vz_said_and_what_to_do() {
        let f = VzFailure::from_ns_error_parts(
            VZ_ERROR_DOMAIN,
            2,
            "Invalid virtual machine configuration.",
        );
        assert_eq!(f.kind, VzErrorKind::InvalidConfiguration);
        let text = f.to_string();
        assert!(
            text.starts_with("Invalid virtual machine configuration. (VZErrorDomain 2); check"),
            "{text}"
        );
        assert!(text.contains("make sign-macos"), "{text}");
        let plain = VzFailure::from_ns_error_parts(VZ_ERROR_DOMAIN, 1, "Internal error.");
        assert_eq!(plain.to_string(), "Internal error. (VZErrorDomain 1)");
    }
}
