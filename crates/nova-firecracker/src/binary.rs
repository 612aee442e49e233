//! Finding the `firecracker` binary and checking that we support it.
//!
//! The binary is `$NOVA_FIRECRACKER_BIN` when set, else `firecracker` on
//! `PATH` (the lookup is `nova_runtime::host::find_binary`, shared with
//! `nova doctor`). Its `--version` line (`Firecracker v1.16.1`) must fall in
//! [`MIN_VERSION`, `MAX_VERSION`): the API shapes in [`crate::api`] are those
//! of the 1.x series, and 1.4 is the oldest with every endpoint we use.

use std::fmt;
use std::path::{Path, PathBuf};

use nova_runtime::host::{FIRECRACKER_BIN, FIRECRACKER_BIN_ENV, binary_version, find_binary};

/// Oldest supported Firecracker (inclusive).
pub const MIN_VERSION: Version = Version::new(1, 4, 0);
/// First unsupported Firecracker (exclusive).
pub const MAX_VERSION: Version = Version::new(2, 0, 0);
/// Where to get Firecracker, for error messages.
pub const INSTALL_HINT: &str = "download a release from \
     https://github.com/firecracker-microvm/firecracker/releases and put `firecracker` on PATH, \
     or set NOVA_FIRECRACKER_BIN to its path";

/// A Firecracker version number (pre-release suffixes are ignored:
/// `1.17.0-dev` is `1.17.0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Patch.
    pub patch: u32,
}

impl Version {
    /// `major.minor.patch`.
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Self {
            major,
            minor,
            patch,
        }
    }

    /// Parses `1.16.1`, `v1.16.1`, `1.17.0-dev` or a `--version` line such
    /// as `Firecracker v1.16.1`.
    pub fn parse(text: &str) -> Option<Self> {
        let word = text.split_whitespace().find(|w| {
            w.trim_start_matches('v')
                .starts_with(|c: char| c.is_ascii_digit())
        })?;
        let core = word.trim_start_matches('v');
        let core = core.split(['-', '+']).next()?;
        let mut parts = core.split('.').map(str::parse::<u32>);
        let major = parts.next()?.ok()?;
        let minor = parts.next()?.ok()?;
        let patch = parts.next().unwrap_or(Ok(0)).ok()?;
        Some(Self::new(major, minor, patch))
    }

    /// Whether this version is in the supported range.
    pub fn is_supported(self) -> bool {
        (MIN_VERSION..MAX_VERSION).contains(&self)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// A usable Firecracker binary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirecrackerBinary {
    /// Its path.
    pub path: PathBuf,
    /// Its version.
    pub version: Version,
}

/// No usable Firecracker binary.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BinaryError {
    /// Not found where we looked.
    #[error("firecracker not found (looked in {searched}); {INSTALL_HINT}", searched = .searched.join(", "))]
    NotFound {
        /// Every place tried.
        searched: Vec<String>,
    },
    /// It did not run or did not print a version.
    #[error("{} did not report a version with --version; is it a Firecracker binary?", .path.display())]
    NoVersion {
        /// The binary.
        path: PathBuf,
    },
    /// Its version is outside the supported range.
    #[error(
        "{} is Firecracker {version}; NovaSandbox supports {MIN_VERSION} up to (not including) \
         {MAX_VERSION}; {INSTALL_HINT}", .path.display()
    )]
    Unsupported {
        /// The binary.
        path: PathBuf,
        /// Its version.
        version: Version,
    },
}

impl FirecrackerBinary {
    /// Finds Firecracker (`$NOVA_FIRECRACKER_BIN`, then `PATH`) and checks
    /// its version.
    pub fn locate() -> Result<Self, BinaryError> {
        let found = find_binary(FIRECRACKER_BIN_ENV, FIRECRACKER_BIN).map_err(|nf| {
            BinaryError::NotFound {
                searched: nf.searched,
            }
        })?;
        Self::from_version_line(found.path, found.version.as_deref())
    }

    /// Checks the binary at `path`.
    pub fn at(path: impl Into<PathBuf>) -> Result<Self, BinaryError> {
        let path = path.into();
        let line = binary_version(&path);
        Self::from_version_line(path, line.as_deref())
    }

    /// Checks a binary whose `--version` printed `line` (testable form).
    pub fn from_version_line(path: PathBuf, line: Option<&str>) -> Result<Self, BinaryError> {
        let Some(version) = line
            .filter(|l| l.trim_start().starts_with("Firecracker"))
            .and_then(Version::parse)
        else {
            return Err(BinaryError::NoVersion { path });
        };
        if !version.is_supported() {
            return Err(BinaryError::Unsupported { path, version });
        }
        Ok(Self { path, version })
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_version_lines() {
        assert_eq!(
            Version::parse("Firecracker v1.16.1"),
            Some(Version::new(1, 16, 1))
        );
        assert_eq!(
            Version::parse("Firecracker v1.17.0-dev"),
            Some(Version::new(1, 17, 0))
        );
        assert_eq!(Version::parse("1.4"), Some(Version::new(1, 4, 0)));
        assert_eq!(Version::parse("Firecracker"), None);
        assert_eq!(Version::parse("vX.Y"), None);
    }

    #[test]
    fn enforces_the_supported_range() {
        let check = |line: &str| FirecrackerBinary::from_version_line("/fc".into(), Some(line));
        assert_eq!(
            check("Firecracker v1.16.1").unwrap().version,
            Version::new(1, 16, 1)
        );
        assert!(check("Firecracker v1.4.0").is_ok());
        let old = check("Firecracker v1.3.3").unwrap_err();
        assert!(matches!(old, BinaryError::Unsupported { .. }));
        assert!(old.to_string().contains("supports 1.4.0"), "{old}");
        assert!(matches!(
            check("Firecracker v2.0.0"),
            Err(BinaryError::Unsupported { .. })
        ));
        assert!(matches!(
            FirecrackerBinary::from_version_line("/fc".into(), None),
            Err(BinaryError::NoVersion { .. })
        ));
    }

    #[test]
    fn not_found_says_where_and_how_to_install() {
        let e = BinaryError::NotFound {
            searched: vec!["$PATH for `firecracker`".into()],
        };
        let msg = e.to_string();
        assert!(msg.contains("$PATH for `firecracker`"), "{msg}");
        assert!(msg.contains("NOVA_FIRECRACKER_BIN"), "{msg}");
        assert!(msg.contains("releases"), "{msg}");
        // A binary that is not Firecracker prints no usable version.
        assert!(matches!(
            FirecrackerBinary::at("/bin/true"),
            Err(BinaryError::NoVersion { .. })
        ));
    }
}
