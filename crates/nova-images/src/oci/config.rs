//! An image's configuration blob (the OCI image config, which Docker's
//! shares): the platform, the layers' `diff_ids`, and the process defaults
//! that become a template's [`ExecDefaults`].

use std::collections::BTreeMap;
use std::path::Path;

use nova_core::template::ExecDefaults;
use serde::Deserialize;

/// The parts of an image config nova uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ImageConfig {
    /// CPU architecture (`amd64`, `arm64`, ...).
    #[serde(default)]
    pub architecture: String,
    /// Operating system (`linux`).
    #[serde(default)]
    pub os: String,
    /// The process defaults.
    #[serde(default)]
    pub config: Option<ProcessConfig>,
    /// The layers' uncompressed digests.
    #[serde(default)]
    pub rootfs: Option<RootFs>,
}

/// `config` in an image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ProcessConfig {
    /// `NAME=value` entries.
    #[serde(default)]
    pub env: Option<Vec<String>>,
    /// Working directory.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`.
    #[serde(default)]
    pub user: Option<String>,
    /// Entrypoint argv.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// Command argv.
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
}

/// `rootfs` in an image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct RootFs {
    /// `sha256:<hex>` of each uncompressed layer, bottom first.
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// The image config cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ImageConfigError {
    /// It is not JSON of the config's shape.
    #[error("the image config is not valid JSON")]
    Parse(#[from] serde_json::Error),
    /// It is for another OS or CPU.
    #[error(
        "the image is for {os}/{architecture}; nova's guests are linux/amd64: pull the \
         linux/amd64 variant"
    )]
    Platform {
        /// The image's OS.
        os: String,
        /// The image's architecture.
        architecture: String,
    },
}

impl ImageConfig {
    /// Parses a config blob and checks that it is for linux/amd64 (an
    /// unset field is accepted).
    pub fn parse(bytes: &[u8]) -> Result<Self, ImageConfigError> {
        let config: Self = serde_json::from_slice(bytes)?;
        let os_ok = config.os.is_empty() || config.os == "linux";
        let arch_ok = config.architecture.is_empty() || config.architecture == "amd64";
        if !os_ok || !arch_ok {
            return Err(ImageConfigError::Platform {
                os: config.os,
                architecture: config.architecture,
            });
        }
        Ok(config)
    }

    /// The layers' diff ids (empty when the config lists none).
    pub fn diff_ids(&self) -> &[String] {
        self.rootfs.as_ref().map_or(&[], |r| r.diff_ids.as_slice())
    }

    /// The template exec defaults this image gives.
    pub fn exec_defaults(&self) -> ExecDefaults {
        let Some(config) = &self.config else {
            return ExecDefaults::default();
        };
        let env: BTreeMap<String, String> = config
            .env
            .iter()
            .flatten()
            .filter_map(|entry| {
                let (name, value) = entry.split_once('=')?;
                (!name.is_empty()).then(|| (name.to_owned(), value.to_owned()))
            })
            .collect();
        ExecDefaults {
            env,
            cwd: config.working_dir.clone().filter(|d| d.starts_with('/')),
            user: config.user.clone().filter(|u| !u.is_empty()),
            entrypoint: config.entrypoint.clone().unwrap_or_default(),
            cmd: config.cmd.clone().unwrap_or_default(),
        }
    }
}

/// Resolves a user name (and group name) against the tree's `/etc/passwd`
/// and `/etc/group` into `uid:gid`; numeric parts and names the files do not
/// list are kept as given.
pub fn resolve_user(tree: &Path, user: &str) -> String {
    let (name, group) = match user.split_once(':') {
        Some((n, g)) => (n, Some(g)),
        None => (user, None),
    };
    let passwd = std::fs::read_to_string(tree.join("etc/passwd")).unwrap_or_default();
    let groups = std::fs::read_to_string(tree.join("etc/group")).unwrap_or_default();
    let lookup = |text: &str, key: &str, field: usize| -> Option<String> {
        text.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&key)).then(|| fields.get(field).map(|s| (*s).to_owned()))?
        })
    };
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let uid = if numeric(name) {
        Some(name.to_owned())
    } else {
        lookup(&passwd, name, 2)
    };
    let Some(uid) = uid else {
        return user.to_owned();
    };
    let gid = match group {
        Some(g) if numeric(g) => Some(g.to_owned()),
        Some(g) => lookup(&groups, g, 2),
        None if numeric(name) => passwd.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.get(2) == Some(&name)).then(|| fields.get(3).map(|s| (*s).to_owned()))?
        }),
        None => lookup(&passwd, name, 3),
    };
    match gid {
        Some(gid) => format!("{uid}:{gid}"),
        None => user.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_defaults_become_exec_defaults() {
        let config = ImageConfig::parse(
            br#"{"architecture":"amd64","os":"linux",
                "config":{"Env":["PATH=/usr/bin:/bin","GREETING=a=b","=bad"],
                          "WorkingDir":"/srv","User":"app","Cmd":["sh"]},
                "rootfs":{"type":"layers","diff_ids":["sha256:00"]}}"#,
        )
        .unwrap();
        let defaults = config.exec_defaults();
        assert_eq!(defaults.env["GREETING"], "a=b");
        assert_eq!(defaults.env.len(), 2);
        assert_eq!(defaults.cwd.as_deref(), Some("/srv"));
        assert_eq!(defaults.user.as_deref(), Some("app"));
        assert_eq!(defaults.cmd, ["sh"]);
        assert_eq!(config.diff_ids(), ["sha256:00"]);
    }

    #[test]
    fn other_platforms_are_refused_by_name() {
        let err = ImageConfig::parse(br#"{"architecture":"arm64","os":"linux"}"#).unwrap_err();
        assert!(err.to_string().contains("linux/arm64"), "{err}");
        assert!(ImageConfig::parse(b"[1,2]").is_err());
    }

    #[test]
    fn user_names_resolve_against_the_image() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        assert_eq!(resolve_user(dir.path(), "app"), "1000:1001");
        assert_eq!(resolve_user(dir.path(), "app:staff"), "1000:50");
        assert_eq!(resolve_user(dir.path(), "1000"), "1000:1001");
        assert_eq!(resolve_user(dir.path(), "nobody"), "nobody");
    }
}
