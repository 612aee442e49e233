//! Core types of NovaSandbox.
//!
//! This crate fixes the names and shapes every other crate plugs into:
//!
//! - [`config`]: [`SandboxConfig`], what a caller asks for, with its defaults,
//!   builder and validation;
//! - [`state`]: [`SandboxState`], the lifecycle state machine, whose legal
//!   transitions are enforced in one place;
//! - [`id`]: [`SandboxId`], short, unique, URL- and path-safe identifiers;
//! - [`metadata`]: [`SandboxInfo`] and the boot-time breakdown;
//! - [`network`]: published ports and the egress policy of a config;
//! - [`exec`], [`fs`] and [`stats`]: what commands, file operations and
//!   monitoring return;
//! - [`hypervisor`]: the object-safe [`Hypervisor`] trait every backend
//!   (Firecracker, QEMU, Apple VZ) implements, and the [`Sandbox`] handle that
//!   delegates to it;
//! - [`template`]: [`TemplateManager`], which lists, loads and validates the
//!   templates installed under `$NOVA_HOME/templates`;
//! - [`home`]: the host data layout rooted at `$NOVA_HOME`;
//! - [`snapshot`]: what a snapshot records and why one is refused.
//!
//! It holds types only: no process spawning and no host probing (that is
//! `nova-runtime`'s), so it compiles on every host the project supports.
//!
//! ```
//! use nova_core::{ConfigError, SandboxConfig, SandboxState};
//!
//! // A config is validated when built; bad values name the field and range.
//! let config = SandboxConfig::builder().template_id("python").memory_mb(1024).build()?;
//! assert_eq!((config.vcpus, config.guest_port), (2, 8080));
//! let err = SandboxConfig::builder().vcpus(0).build().unwrap_err();
//! assert_eq!(err.to_string(), "vcpus = 0 is out of range: use 1..=32");
//!
//! // Illegal lifecycle moves are errors, not silent no-ops.
//! let mut state = SandboxState::Stopped;
//! let err = state.transition_to(SandboxState::Paused).unwrap_err();
//! assert!(err.to_string().starts_with("cannot pause a sandbox that is stopped"));
//! # Ok::<(), ConfigError>(())
//! ```

#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod exec;
pub mod fs;
pub mod home;
pub mod hypervisor;
pub mod id;
pub mod metadata;
pub mod network;
pub mod sandbox;
pub mod snapshot;
pub mod state;
pub mod stats;
pub mod template;

pub use config::{ConfigError, DriveConfig, SandboxConfig, SandboxConfigBuilder, StartMode};
pub use error::{CreateSandboxError, ExecError, FileError, SandboxError, UpdateNetworkError};
pub use exec::{ExecEvent, ExecOutput, ExecRequest, ExecStream, ExitStatus};
pub use home::NovaHome;
pub use hypervisor::{Hypervisor, HypervisorKind};
pub use id::SandboxId;
pub use metadata::{BootTimings, SandboxInfo};
pub use network::{EgressConfig, PortProtocol, PortSpec};
pub use sandbox::Sandbox;
pub use state::{InvalidTransition, SandboxState};
pub use stats::{GuestStats, SandboxStats, VmmStats};
pub use template::{
    ExecDefaults, GuestArch, Template, TemplateError, TemplateManager, TemplateManifest,
};
