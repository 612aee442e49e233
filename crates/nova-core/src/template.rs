//! Templates: what a sandbox boots.
//!
//! A template is a directory `$NOVA_HOME/templates/<id>/` holding
//! `<id>.json` (a [`TemplateManifest`], in the seed's format), the guest
//! kernel `vmlinux`, the root filesystem `rootfs.ext4` and, once made, a
//! `snapshot/` directory. [`TemplateManager`] lists, loads and validates
//! them; templates are built by `nova template build <id>`
//! (crate `nova-images`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::is_valid_template_id;

/// File name of a template's kernel.
pub const KERNEL_FILE: &str = "vmlinux";
/// File name of a template's root filesystem.
pub const ROOTFS_FILE: &str = "rootfs.ext4";
/// Directory name of a template's snapshot.
pub const SNAPSHOT_DIR: &str = "snapshot";

/// The JSON description of a template (`<id>.json`), in the seed's format.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateManifest {
    /// Human-readable name.
    pub name: String,
    /// Id; equals the directory name.
    pub template_id: String,
    /// Guest OS family, `linux`.
    pub os_type: String,
    /// Recommended guest memory in MiB.
    pub memory_mb: u32,
    /// Recommended vCPU count.
    pub vcpus: u8,
    /// Boot time measured when the template was built (0 if unknown).
    pub boot_time_ms: u64,
    /// Size of the root filesystem image in GB.
    pub disk_size_gb: f64,
    /// Release of the guest kernel.
    pub kernel_version: String,
    /// Files that must exist in the template directory, relative to it.
    pub required_files: Vec<String>,
    /// Packages installed in the root filesystem.
    pub packages: Vec<String>,
    /// The guest's CPU architecture. Absent in a manifest (the seed's
    /// format) means [`GuestArch::X86_64`], and an x86_64 manifest is
    /// written without it.
    #[serde(default, skip_serializing_if = "GuestArch::is_x86_64")]
    pub arch: GuestArch,
    /// Defaults of every command run in this template's sandboxes (from an
    /// OCI image's config or a Dockerfile); absent from the seed's format.
    #[serde(default, skip_serializing_if = "ExecDefaults::is_empty")]
    pub exec_defaults: ExecDefaults,
}

/// The CPU architecture a template's kernel and rootfs are built for.
///
/// Written `x86_64` or `arm64` (`aarch64` is read as `arm64`). An x86_64
/// template runs on x86_64 hosts (Firecracker, QEMU `microvm`); an arm64
/// one on Apple Silicon (Virtualization.framework) and, emulated, under
/// QEMU `virt` on any Linux host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GuestArch {
    /// x86-64: an uncompressed `vmlinux` with a PVH entry.
    #[default]
    #[serde(rename = "x86_64")]
    X86_64,
    /// AArch64: an uncompressed arm64 `Image` (stored as the template's
    /// [`KERNEL_FILE`]).
    #[serde(rename = "arm64", alias = "aarch64")]
    Arm64,
}

impl GuestArch {
    /// Every architecture, in the order `nova template build --arch` lists them.
    pub const ALL: [GuestArch; 2] = [GuestArch::X86_64, GuestArch::Arm64];

    /// The name used in manifests, template ids and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            GuestArch::X86_64 => "x86_64",
            GuestArch::Arm64 => "arm64",
        }
    }

    /// The name Rust targets and `uname -m` use (`x86_64`, `aarch64`).
    pub fn uname(self) -> &'static str {
        match self {
            GuestArch::X86_64 => "x86_64",
            GuestArch::Arm64 => "aarch64",
        }
    }

    /// Whether this is the default, [`GuestArch::X86_64`].
    pub fn is_x86_64(&self) -> bool {
        *self == GuestArch::X86_64
    }

    /// The architecture of the machine this binary runs on, if it is one a
    /// guest can have.
    pub fn host() -> Option<GuestArch> {
        match std::env::consts::ARCH {
            "x86_64" => Some(GuestArch::X86_64),
            "aarch64" => Some(GuestArch::Arm64),
            _ => None,
        }
    }
}

impl std::fmt::Display for GuestArch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no [`GuestArch`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown architecture {0:?}: use x86_64 or arm64")]
pub struct ParseGuestArchError(pub String);

impl std::str::FromStr for GuestArch {
    type Err = ParseGuestArchError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "x86_64" | "amd64" | "x86-64" => Ok(GuestArch::X86_64),
            "arm64" | "aarch64" => Ok(GuestArch::Arm64),
            other => Err(ParseGuestArchError(other.to_owned())),
        }
    }
}

/// What every command in a template's sandboxes runs with unless the request
/// says otherwise: an OCI image's `Env`, `WorkingDir`, `User` and
/// `Entrypoint`/`Cmd`, or what a Dockerfile's `ENV`, `WORKDIR`, `USER`,
/// `ENTRYPOINT` and `CMD` left.
///
/// The runtime applies them in one place (`nova_runtime::Guest`): `env`
/// goes under the sandbox's and the request's own variables, `cwd` is used
/// when a request names none. `user`, `entrypoint` and `cmd` are recorded
/// for callers (the agent runs commands as root).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecDefaults {
    /// Environment variables, name to value.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub env: std::collections::BTreeMap<String, String>,
    /// Working directory (absolute guest path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// The image's user as it names it (`name`, `uid`, `uid:gid`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The image's entrypoint (argv).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    /// The image's command (argv; arguments of the entrypoint if it has one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
}

impl ExecDefaults {
    /// Whether nothing is set (the seed's templates).
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

/// A validated, installed template.
#[derive(Clone, Debug, PartialEq)]
pub struct Template {
    /// Its manifest.
    pub manifest: TemplateManifest,
    /// Its directory.
    pub dir: PathBuf,
}

impl Template {
    /// The template id.
    pub fn id(&self) -> &str {
        &self.manifest.template_id
    }

    /// The guest kernel.
    pub fn kernel_path(&self) -> PathBuf {
        self.dir.join(KERNEL_FILE)
    }

    /// The shared read-only root filesystem.
    pub fn rootfs_path(&self) -> PathBuf {
        self.dir.join(ROOTFS_FILE)
    }

    /// The template's snapshot directory (may not exist).
    pub fn snapshot_dir(&self) -> PathBuf {
        self.dir.join(SNAPSHOT_DIR)
    }
}

/// A template could not be found or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    /// No template has this id.
    #[error(
        "template {id:?} is not installed in {dir}; installed: {installed}; build it with \
         `nova template build {id}`",
        installed = if available.is_empty() { "none".to_owned() } else { available.join(", ") }
    )]
    NotFound {
        /// The id asked for.
        id: String,
        /// The templates directory searched.
        dir: PathBuf,
        /// The ids that are installed.
        available: Vec<String>,
    },
    /// The id is not a valid template id.
    #[error("invalid template id {0:?}: use a-z, 0-9, '.', '_' or '-'")]
    InvalidId(String),
    /// The manifest could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The manifest's path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The manifest is not valid JSON of the expected shape.
    #[error("{path} is not a valid template manifest; rebuild it with `nova template build {id}`")]
    Parse {
        /// The template id.
        id: String,
        /// The manifest's path.
        path: PathBuf,
        /// The JSON error (names the missing or unexpected field).
        #[source]
        source: serde_json::Error,
    },
    /// The manifest's `template_id` differs from its directory's name.
    #[error("{path} says template_id {found:?}, but its directory is {expected:?}")]
    IdMismatch {
        /// The manifest's path.
        path: PathBuf,
        /// The directory name.
        expected: String,
        /// The manifest's id.
        found: String,
    },
    /// Files listed in `required_files` are missing.
    #[error(
        "template {id:?} is incomplete: missing {missing}; rebuild it with `nova template build {id}`",
        missing = missing.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    MissingFiles {
        /// The template id.
        id: String,
        /// The missing files, as full paths.
        missing: Vec<PathBuf>,
    },
    /// A `required_files` entry escapes the template directory.
    #[error("template {id:?} lists {file:?} in required_files; use a relative path inside it")]
    BadRequiredFile {
        /// The template id.
        id: String,
        /// The bad entry.
        file: String,
    },
    /// The templates directory could not be listed.
    #[error("cannot list {dir}")]
    List {
        /// The templates directory.
        dir: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Lists, loads and validates the templates under one directory.
#[derive(Clone, Debug)]
pub struct TemplateManager {
    dir: PathBuf,
}

impl TemplateManager {
    /// Manages the templates under `dir` (normally `$NOVA_HOME/templates`).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The templates directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The ids of the installed templates (directories with a manifest),
    /// sorted. A missing templates directory means none.
    pub fn ids(&self) -> Result<Vec<String>, TemplateError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(TemplateError::List {
                    dir: self.dir.clone(),
                    source,
                });
            }
        };
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| TemplateError::List {
                dir: self.dir.clone(),
                source,
            })?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if is_valid_template_id(&name) && entry.path().join(format!("{name}.json")).is_file() {
                ids.push(name);
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Loads every installed template; each entry is the template or why it
    /// cannot be used.
    pub fn list(&self) -> Result<Vec<Result<Template, TemplateError>>, TemplateError> {
        Ok(self.ids()?.iter().map(|id| self.load(id)).collect())
    }

    /// Loads template `id` and checks that its manifest parses, names its own
    /// directory and that every required file exists.
    pub fn load(&self, id: &str) -> Result<Template, TemplateError> {
        if !is_valid_template_id(id) {
            return Err(TemplateError::InvalidId(id.to_owned()));
        }
        let dir = self.dir.join(id);
        let path = dir.join(format!("{id}.json"));
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(TemplateError::NotFound {
                    id: id.to_owned(),
                    dir: self.dir.clone(),
                    available: self.ids().unwrap_or_default(),
                });
            }
            Err(source) => return Err(TemplateError::Read { path, source }),
        };
        let manifest: TemplateManifest =
            serde_json::from_str(&text).map_err(|source| TemplateError::Parse {
                id: id.to_owned(),
                path: path.clone(),
                source,
            })?;
        if manifest.template_id != id {
            return Err(TemplateError::IdMismatch {
                path,
                expected: id.to_owned(),
                found: manifest.template_id,
            });
        }
        let mut missing = Vec::new();
        for file in &manifest.required_files {
            let rel = Path::new(file);
            if rel.is_absolute()
                || rel
                    .components()
                    .any(|c| c == std::path::Component::ParentDir)
            {
                return Err(TemplateError::BadRequiredFile {
                    id: id.to_owned(),
                    file: file.clone(),
                });
            }
            if !dir.join(rel).exists() {
                missing.push(dir.join(rel));
            }
        }
        if !missing.is_empty() {
            return Err(TemplateError::MissingFiles {
                id: id.to_owned(),
                missing,
            });
        }
        Ok(Template { manifest, dir })
    }

    /// Writes `manifest` as `<id>.json` in `dir` (a template directory being
    /// built), atomically.
    pub fn write_manifest(dir: &Path, manifest: &TemplateManifest) -> std::io::Result<()> {
        let path = dir.join(format!("{}.json", manifest.template_id));
        let tmp = dir.join(format!(".{}.json.tmp", manifest.template_id));
        let json = serde_json::to_string_pretty(manifest).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, json + "\n")?;
        std::fs::rename(tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(id: &str) -> TemplateManifest {
        TemplateManifest {
            name: "Python 3".into(),
            template_id: id.into(),
            os_type: "linux".into(),
            memory_mb: 512,
            vcpus: 2,
            boot_time_ms: 0,
            disk_size_gb: 0.3,
            kernel_version: "6.1.0".into(),
            required_files: vec![KERNEL_FILE.into(), ROOTFS_FILE.into()],
            packages: vec!["python3".into(), "curl".into()],
            arch: GuestArch::X86_64,
            exec_defaults: ExecDefaults::default(),
        }
    }

    fn install(root: &Path, m: &TemplateManifest, files: &[&str]) {
        let dir = root.join(&m.template_id);
        std::fs::create_dir_all(&dir).unwrap();
        TemplateManager::write_manifest(&dir, m).unwrap();
        for f in files {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
    }

    #[test]
    fn exec_defaults_are_optional_in_the_manifest_and_round_trip() {
        let seed = manifest("python");
        let json = serde_json::to_string(&seed).unwrap();
        assert!(
            !json.contains("exec_defaults"),
            "the seed's format is unchanged: {json}"
        );
        assert_eq!(
            serde_json::from_str::<TemplateManifest>(&json).unwrap(),
            seed
        );
        let mut from_image = manifest("app");
        from_image.exec_defaults = ExecDefaults {
            env: [("PATH".to_owned(), "/usr/bin:/bin".to_owned())].into(),
            cwd: Some("/srv".into()),
            user: Some("1000:1000".into()),
            entrypoint: vec!["/entry".into()],
            cmd: vec!["serve".into()],
        };
        let json = serde_json::to_string(&from_image).unwrap();
        assert_eq!(
            serde_json::from_str::<TemplateManifest>(&json).unwrap(),
            from_image
        );
        let unknown = json.replace("\"cwd\"", "\"workdir\"");
        assert!(serde_json::from_str::<TemplateManifest>(&unknown).is_err());
    }

    #[test]
    fn loads_a_good_template_in_the_seed_format() {
        let root = tempfile::tempdir().unwrap();
        let seed_json = r#"{
            "name": "Python 3.11", "template_id": "python", "os_type": "linux",
            "memory_mb": 512, "vcpus": 2, "boot_time_ms": 150, "disk_size_gb": 1,
            "kernel_version": "6.1.0", "required_files": ["vmlinux", "rootfs.ext4"],
            "packages": ["python3", "curl", "wget"]
        }"#;
        let dir = root.path().join("python");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("python.json"), seed_json).unwrap();
        std::fs::write(dir.join("vmlinux"), b"k").unwrap();
        std::fs::write(dir.join("rootfs.ext4"), b"r").unwrap();
        let mgr = TemplateManager::new(root.path());
        let t = mgr.load("python").unwrap();
        assert_eq!(t.id(), "python");
        assert_eq!(t.manifest.disk_size_gb, 1.0);
        assert_eq!(t.manifest.packages, ["python3", "curl", "wget"]);
        assert_eq!(t.kernel_path(), dir.join("vmlinux"));
        assert_eq!(t.rootfs_path(), dir.join("rootfs.ext4"));
        assert_eq!(mgr.ids().unwrap(), ["python"]);
    }

    #[test]
    fn manifest_round_trips() {
        let root = tempfile::tempdir().unwrap();
        let m = manifest("minimal");
        install(root.path(), &m, &[KERNEL_FILE, ROOTFS_FILE]);
        let t = TemplateManager::new(root.path()).load("minimal").unwrap();
        assert_eq!(t.manifest, m);
    }

    #[test]
    fn missing_field_is_named() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("bad");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("bad.json"),
            r#"{"name": "x", "template_id": "bad"}"#,
        )
        .unwrap();
        let e = TemplateManager::new(root.path()).load("bad").unwrap_err();
        assert!(matches!(e, TemplateError::Parse { .. }));
        let cause = std::error::Error::source(&e).unwrap().to_string();
        assert!(cause.contains("missing field `os_type`"), "{cause}");
    }

    #[test]
    fn unknown_id_lists_installed_ones_and_the_build_command() {
        let root = tempfile::tempdir().unwrap();
        install(
            root.path(),
            &manifest("minimal"),
            &[KERNEL_FILE, ROOTFS_FILE],
        );
        install(
            root.path(),
            &manifest("python"),
            &[KERNEL_FILE, ROOTFS_FILE],
        );
        let e = TemplateManager::new(root.path()).load("node").unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, TemplateError::NotFound { ref available, .. } if available == &["minimal", "python"])
        );
        assert!(msg.contains("installed: minimal, python"), "{msg}");
        assert!(msg.contains("nova template build node"), "{msg}");

        let empty = tempfile::tempdir().unwrap();
        let e = TemplateManager::new(empty.path().join("none"))
            .load("python")
            .unwrap_err();
        assert!(e.to_string().contains("installed: none"), "{e}");
    }

    #[test]
    fn missing_required_file_is_named() {
        let root = tempfile::tempdir().unwrap();
        install(root.path(), &manifest("python"), &[KERNEL_FILE]);
        let e = TemplateManager::new(root.path())
            .load("python")
            .unwrap_err();
        match &e {
            TemplateError::MissingFiles { missing, .. } => {
                assert_eq!(missing, &[root.path().join("python").join(ROOTFS_FILE)]);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(e.to_string().contains("rootfs.ext4"));
    }

    #[test]
    fn id_mismatch_and_escaping_required_files_are_rejected() {
        let root = tempfile::tempdir().unwrap();
        let mut m = manifest("a");
        install(root.path(), &m, &[KERNEL_FILE, ROOTFS_FILE]);
        std::fs::rename(root.path().join("a/a.json"), root.path().join("a/b.json")).unwrap();
        std::fs::rename(root.path().join("a"), root.path().join("b")).unwrap();
        let mgr = TemplateManager::new(root.path());
        assert!(matches!(
            mgr.load("b"),
            Err(TemplateError::IdMismatch { .. })
        ));

        m.template_id = "c".into();
        m.required_files.push("../../etc/passwd".into());
        install(root.path(), &m, &[KERNEL_FILE, ROOTFS_FILE]);
        assert!(matches!(
            mgr.load("c"),
            Err(TemplateError::BadRequiredFile { .. })
        ));
        assert!(matches!(mgr.load("../c"), Err(TemplateError::InvalidId(_))));
    }

    #[test]
    fn list_reports_each_template() {
        let root = tempfile::tempdir().unwrap();
        install(root.path(), &manifest("good"), &[KERNEL_FILE, ROOTFS_FILE]);
        install(root.path(), &manifest("broken"), &[]);
        std::fs::create_dir_all(root.path().join("not-a-template")).unwrap();
        let list = TemplateManager::new(root.path()).list().unwrap();
        assert_eq!(list.len(), 2);
        assert!(list[0].is_err(), "broken sorts first");
        assert_eq!(list[1].as_ref().unwrap().id(), "good");
    }

    #[test]
    fn the_arch_is_optional_in_a_manifest_and_written_only_when_not_x86_64() {
        let x86 = manifest("x");
        let json = serde_json::to_value(&x86).unwrap();
        assert!(json.get("arch").is_none(), "{json}");
        let back: TemplateManifest = serde_json::from_value(json).unwrap();
        assert_eq!(back.arch, GuestArch::X86_64);

        let arm = TemplateManifest {
            arch: GuestArch::Arm64,
            ..manifest("a")
        };
        let json = serde_json::to_value(&arm).unwrap();
        assert_eq!(json["arch"], "arm64");
        let mut aliased = json.clone();
        aliased["arch"] = "aarch64".into();
        let back: TemplateManifest = serde_json::from_value(aliased).unwrap();
        assert_eq!(back.arch, GuestArch::Arm64);
        let mut bad = json;
        bad["arch"] = "riscv64".into();
        assert!(serde_json::from_value::<TemplateManifest>(bad).is_err());
    }

    #[test]
    fn arch_names_parse_and_print() {
        for arch in GuestArch::ALL {
            assert_eq!(arch.as_str().parse::<GuestArch>(), Ok(arch));
            assert_eq!(arch.uname().parse::<GuestArch>(), Ok(arch));
            assert_eq!(arch.to_string(), arch.as_str());
        }
        let err = "mips".parse::<GuestArch>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown architecture \"mips\": use x86_64 or arm64"
        );
    }
}
