//! Debian rootfs trees: `debootstrap --variant=minbase` plus a package list.
//!
//! The tree comes from the Debian mirror this host's apt already uses (read
//! from `/etc/apt/sources.list` and `sources.list.d/`, or `NOVA_DEBIAN_MIRROR`),
//! so builds work wherever `apt-get` works and no host name is baked into the
//! code. After debootstrap the tree is stripped of what a sandbox never reads
//! (docs, man pages, translations, apt lists and caches, logs), smoke-tested
//! with `chroot` (the template's check command, e.g. `python3 -c ...`), and
//! cached under `cache/debootstrap/<key>/root` keyed by suite, variant,
//! package list and [`RECIPE_VERSION`]: a minute of download and unpacking
//! happens once per package list, and every image build copies the tree.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use tokio::process::Command;

use super::{BuildRootfsError, EtcPolicy, finish_staging, io_err};
use crate::cache::{self, CacheDir, CacheKey};
use crate::command;
use crate::host_tools::{self, HostTool};

/// Bump when debootstrap options or stripping change; part of the cache key.
pub const RECIPE_VERSION: &str = "1";

/// Host tools a Debian tree needs.
pub const DEBIAN_TOOLS: &[HostTool] = &[
    HostTool::program("debootstrap", "debootstrap"),
    HostTool::program("chroot", "coreutils"),
    HostTool::file(
        "/usr/share/keyrings/debian-archive-keyring.gpg",
        "debian-archive-keyring",
    ),
];

/// What to debootstrap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebianSpec {
    /// The suite, e.g. `bookworm`.
    pub suite: String,
    /// The debootstrap variant, e.g. `minbase`.
    pub variant: String,
    /// Packages to add (`--include`).
    pub packages: Vec<String>,
    /// A command run in the finished tree with `chroot` to prove it works.
    pub check: Vec<String>,
}

impl DebianSpec {
    /// The cache key of the stripped tree.
    pub fn cache_key(&self) -> CacheKey {
        let mut key = CacheKey::new("debootstrap");
        key.push("suite", self.suite.as_bytes())
            .push("variant", self.variant.as_bytes())
            .push("packages", self.packages.join(",").as_bytes())
            .push("check", self.check.join("\0").as_bytes())
            .push("recipe", RECIPE_VERSION.as_bytes());
        key
    }

    /// Where the cached tree for this spec lives (it may not exist yet).
    pub fn cached_tree(&self, cache: &CacheDir) -> PathBuf {
        cache
            .root()
            .join("debootstrap")
            .join(self.cache_key().short())
            .join("root")
    }
}

/// The Debian mirror for `suite`: `NOVA_DEBIAN_MIRROR` if set, else the first
/// `deb` source of this host's apt configuration that serves `suite`.
pub fn find_mirror(suite: &str) -> Option<String> {
    if let Some(mirror) = std::env::var_os("NOVA_DEBIAN_MIRROR").filter(|m| !m.is_empty()) {
        return Some(mirror.to_string_lossy().into_owned());
    }
    let mut texts = Vec::new();
    if let Ok(text) = fs::read_to_string("/etc/apt/sources.list") {
        texts.push((false, text));
    }
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            let deb822 = path.extension().is_some_and(|e| e == "sources");
            let list = path.extension().is_some_and(|e| e == "list");
            if (deb822 || list)
                && let Ok(text) = fs::read_to_string(&path)
            {
                texts.push((deb822, text));
            }
        }
    }
    texts.iter().find_map(|(deb822, text)| {
        if *deb822 {
            mirror_from_deb822(text, suite)
        } else {
            mirror_from_list(text, suite)
        }
    })
}

/// Finds `deb URI suite ...` in one-line-format sources.
fn mirror_from_list(text: &str, suite: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("deb ")?.trim_start();
        // Skip an options block such as `[arch=amd64 signed-by=...]`.
        let rest = match rest.strip_prefix('[') {
            Some(options) => &options[options.find(']')? + 1..],
            None => rest,
        };
        let mut words = rest.split_whitespace();
        let uri = words.next()?;
        (words.next()? == suite).then(|| uri.to_owned())
    })
}

/// Finds a stanza with `Types: deb`, `Suites:` containing `suite`, and its first URI.
fn mirror_from_deb822(text: &str, suite: &str) -> Option<String> {
    text.split("\n\n").find_map(|stanza| {
        let field = |name: &str| {
            stanza.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| value.trim().to_owned())
            })
        };
        let enabled = field("Enabled").is_none_or(|v| v != "no");
        let types = field("Types")?;
        let suites = field("Suites")?;
        (enabled
            && types.split_whitespace().any(|t| t == "deb")
            && suites.split_whitespace().any(|s| s == suite))
        .then(|| field("URIs"))
        .flatten()
        .and_then(|uris| uris.split_whitespace().next().map(str::to_owned))
    })
}

/// Returns the stripped debootstrap tree for `spec`, building and caching it
/// first when missing (or when `force`).
pub async fn debootstrap_cached(
    cache: &CacheDir,
    spec: &DebianSpec,
    template: &str,
    force: bool,
    log: &Path,
) -> Result<PathBuf, BuildRootfsError> {
    let tree = spec.cached_tree(cache);
    let dest = tree
        .parent()
        .map(Path::to_owned)
        .ok_or_else(|| BuildRootfsError::Io {
            path: tree.clone(),
            source: io::Error::other("cache path has no parent"),
        })?;
    let _lock = cache
        .lock(&format!("debootstrap-{}", spec.cache_key().short()))
        .map_err(io_err(cache.root()))?;
    if !force && tree.join("etc/os-release").exists() && dest.join("complete").exists() {
        tracing::info!(path = %tree.display(), "debootstrap cache hit");
        return Ok(tree);
    }
    if !rustix::process::geteuid().is_root() {
        return Err(BuildRootfsError::NeedsRoot {
            template: template.to_owned(),
        });
    }
    host_tools::ensure(DEBIAN_TOOLS, log).await?;
    let mirror = find_mirror(&spec.suite).ok_or_else(|| BuildRootfsError::NoMirror {
        suite: spec.suite.clone(),
    })?;
    cache::sweep_leftovers(&dest).map_err(io_err(&dest))?;
    let staging = cache::staging_dir_for(&dest).map_err(io_err(&dest))?;
    let root = staging.path().join("root");
    tracing::info!(suite = %spec.suite, mirror = %mirror, packages = %spec.packages.join(","), "debootstrap (about a minute)");
    let debootstrap =
        host_tools::find_program("debootstrap").unwrap_or_else(|| "debootstrap".into());
    let mut cmd = Command::new(debootstrap);
    cmd.arg(format!("--variant={}", spec.variant))
        .arg("--components=main");
    if !spec.packages.is_empty() {
        cmd.arg(format!("--include={}", spec.packages.join(",")));
    }
    cmd.arg(&spec.suite).arg(&root).arg(&mirror);
    command::run_logged(&mut cmd, log)
        .await
        .map_err(|source| BuildRootfsError::Step {
            step: "debootstrap",
            source,
        })?;
    let freed = strip_tree(&root).map_err(io_err(&root))?;
    tracing::info!(mib = freed >> 20, "stripped docs, locales and apt caches");
    if let Some((program, args)) = spec.check.split_first() {
        let chroot = host_tools::find_program("chroot").unwrap_or_else(|| "chroot".into());
        command::run_logged(
            Command::new(chroot)
                .arg(&root)
                .arg(program)
                .args(args)
                .env_clear()
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            log,
        )
        .await
        .map_err(|source| BuildRootfsError::Step {
            step: "smoke test in chroot",
            source,
        })?;
    }
    let marker = staging.path().join("complete");
    fs::write(&marker, spec.packages.join("\n") + "\n").map_err(io_err(&marker))?;
    cache::publish_dir(staging, &dest).map_err(io_err(&dest))?;
    Ok(tree)
}

/// Stages a Debian image at `root`: a copy of the cached `tree` plus the agent.
pub async fn stage(
    root: &Path,
    tree: &Path,
    agent: &Path,
    log: &Path,
) -> Result<(), BuildRootfsError> {
    fs::create_dir_all(root).map_err(io_err(root))?;
    let mut src = tree.as_os_str().to_owned();
    src.push("/.");
    command::run_logged(
        Command::new("cp")
            .arg("-a")
            .arg("--reflink=auto")
            .arg(src)
            .arg(root),
        log,
    )
    .await
    .map_err(|source| BuildRootfsError::Step {
        step: "copy debootstrap tree",
        source,
    })?;
    finish_staging(root, agent, EtcPolicy::Distribution)
}

/// Removes what a sandbox never reads from a Debian tree; returns bytes freed.
///
/// Kept: `copyright` files (licences travel with the image), `locale.alias`,
/// Python's `__pycache__` (every sandbox would otherwise recompile on import).
pub fn strip_tree(root: &Path) -> io::Result<u64> {
    let mut freed = 0;
    freed += clear_dir(&root.join("usr/share/doc"), &|path| {
        // Keep usr/share/doc/<pkg>/copyright, drop the rest.
        path.file_name().is_some_and(|n| n == "copyright")
    })?;
    for dir in [
        "usr/share/man",
        "usr/share/info",
        "usr/share/lintian",
        "usr/share/linda",
        "var/cache/apt",
        "var/log",
    ] {
        freed += clear_dir(&root.join(dir), &|_| false)?;
    }
    freed += clear_dir(&root.join("usr/share/locale"), &|path| {
        path.file_name().is_some_and(|n| n == "locale.alias")
    })?;
    freed += clear_dir(&root.join("var/lib/apt/lists"), &|path| {
        path.file_name()
            .is_some_and(|n| n == "lock" || n == "partial")
    })?;
    for dir in ["var/cache/debconf", "var/lib/dpkg"] {
        freed += clear_dir(&root.join(dir), &|path| {
            !path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().ends_with("-old"))
        })?;
    }
    Ok(freed)
}

/// Removes the contents of `dir` recursively, keeping paths for which
/// `keep` is true (and the directories leading to them). Missing dirs are fine.
fn clear_dir(dir: &Path, keep: &dyn Fn(&Path) -> bool) -> io::Result<u64> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut freed = 0;
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        if keep(&path) {
            continue;
        }
        let meta = fs::symlink_metadata(&path)?;
        if meta.is_dir() {
            freed += clear_dir(&path, keep)?;
            // Remove the directory only if nothing in it was kept.
            if fs::read_dir(&path)?.next().is_none() {
                fs::remove_dir(&path)?;
            }
        } else {
            freed += meta.len();
            fs::remove_file(&path)?;
        }
    }
    Ok(freed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_from_one_line_sources() {
        let text = "# comment\ndeb-src http://src.example/debian bookworm main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main\n";
        assert_eq!(
            mirror_from_list(text, "bookworm").as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(
            mirror_from_list(
                "deb http://m.example/debian bookworm-updates main",
                "bookworm"
            ),
            None
        );
    }

    #[test]
    fn mirror_from_deb822_sources() {
        let text = "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n\
                    Components: main\n\nTypes: deb deb-src\nURIs: http://deb.example/debian http://b.example\n\
                    Suites: bookworm bookworm-updates\nComponents: main\n";
        assert_eq!(
            mirror_from_deb822(text, "bookworm").as_deref(),
            Some("http://deb.example/debian")
        );
        let disabled = "Enabled: no\nTypes: deb\nURIs: http://x.example\nSuites: bookworm\n";
        assert_eq!(mirror_from_deb822(disabled, "bookworm"), None);
    }

    #[test]
    fn this_host_has_a_mirror_for_bookworm() {
        if !Path::new("/etc/debian_version").exists() {
            eprintln!("SKIP: not a Debian host");
            return;
        }
        let mirror = find_mirror("bookworm");
        assert!(
            mirror.as_deref().is_some_and(|m| m.starts_with("http")),
            "{mirror:?}"
        );
    }

    #[test]
    fn strip_keeps_copyright_and_removes_docs_and_lists() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let files = [
            "usr/share/doc/curl/copyright",
            "usr/share/doc/curl/changelog.Debian.gz",
            "usr/share/man/man1/curl.1.gz",
            "usr/share/locale/de/LC_MESSAGES/apt.mo",
            "usr/share/locale/locale.alias",
            "var/lib/apt/lists/deb.debian.org_dists_bookworm_InRelease",
            "var/lib/apt/lists/lock",
            "var/cache/apt/pkgcache.bin",
            "var/lib/dpkg/status",
            "var/lib/dpkg/status-old",
            "usr/lib/python3.11/__pycache__/os.cpython-311.pyc",
        ];
        for f in files {
            fs::create_dir_all(root.join(f).parent().unwrap()).unwrap();
            fs::write(root.join(f), b"0123456789").unwrap();
        }
        let freed = strip_tree(root).unwrap();
        assert_eq!(freed, 60);
        let kept = [
            "usr/share/doc/curl/copyright",
            "usr/share/locale/locale.alias",
            "var/lib/apt/lists/lock",
            "var/lib/dpkg/status",
            "usr/lib/python3.11/__pycache__/os.cpython-311.pyc",
        ];
        for f in files {
            assert_eq!(root.join(f).exists(), kept.contains(&f), "{f}");
        }
        assert!(
            root.join("usr/share/man").is_dir(),
            "the directory itself stays"
        );
        assert!(!root.join("usr/share/locale/de").exists());
    }

    #[test]
    fn the_key_follows_the_package_list() {
        let spec = |packages: &[&str]| DebianSpec {
            suite: "bookworm".into(),
            variant: "minbase".into(),
            packages: packages.iter().map(|p| (*p).to_owned()).collect(),
            check: vec![],
        };
        assert_eq!(
            spec(&["python3"]).cache_key().hex(),
            spec(&["python3"]).cache_key().hex()
        );
        assert_ne!(
            spec(&["python3"]).cache_key().hex(),
            spec(&["python3", "curl"]).cache_key().hex()
        );
    }
}
