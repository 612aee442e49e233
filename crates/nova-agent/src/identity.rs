//! The guest's identity: its hostname, and the files that must agree with
//! it — `/etc/hostname`, `/etc/hosts` (so the hostname resolves, to a
//! loopback address), and `/etc/machine-id` (new for every sandbox).
//!
//! The template's files were written when the image was built and name no
//! sandbox, so [`apply`] rewrites them at boot, and [`refresh`] again in a
//! guest restored from a snapshot (whose files name the snapshot's guest):
//!
//! * on a writable root (the overlay), each file is kept on a tmpfs
//!   (`/run/nova/identity/<name>`) and bind-mounted over its `/etc` path
//!   once, at the first write (a missing file or a symlink there is first
//!   replaced by an empty regular file to mount over); later writes,
//!   refreshes included, rewrite the tmpfs file in place, so the mount keeps
//!   showing it. A refresh then touches neither the overlay nor the scratch
//!   disk's ext4: in a guest just restored under emulation (TCG, nothing of
//!   it translated yet), writing the files through those took ~25 ms of a
//!   ~100 ms restore. As in a Docker container, `/etc/hostname`, `/etc/hosts`,
//!   `/etc/machine-id` and `/etc/resolv.conf` are then mount points: they can
//!   be written in place, not renamed over or removed;
//! * on a read-only root (`read_only_rootfs`), the three files are written to
//!   a tmpfs (`/run/nova/etc`) and stacked over `/etc` with a read-only
//!   overlay (`lowerdir=/run/nova/etc:/etc`): `/etc` shows the sandbox's
//!   files, and stays read-only. Unlike bind mounts over single files, this
//!   also works when the image has no `/etc/machine-id` to mount over. A
//!   refresh does not touch the lower directory of the mounted overlay (the
//!   kernel leaves changes to a mounted overlay's layers undefined): it
//!   prepares the files in the other of two directories, detaches the old
//!   overlay and mounts a new one from them.
//!
//! With a network (`nova.net=`), `/etc/resolv.conf` is one more such file
//! ([`set_resolv_conf`], at boot): every write, refreshes included, carries
//! it, so a new overlay never drops it. A refresh that names DNS servers
//! (the host's current ones: a snapshot's are those of the host and time it
//! was taken on) replaces it first; one that names none leaves it as it is
//! (a guest without a network keeps the image's file).
//!
//! `/etc/hosts` keeps the image's own entries; only the loopback lines are
//! rewritten: `127.0.0.1 localhost`, `127.0.1.1 <hostname>` (Debian's
//! convention for the machine's own name) and `::1 localhost ...`.
//!
//! Only PID 1 touches the machine's identity ([`Target::System`]); an agent
//! on a host (tests) writes the three files into a directory of its own
//! ([`Target::Dir`]) and never sets the host's hostname.

use std::ffi::CString;
use std::hash::{Hash, Hasher};
use std::io::{self, Read};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use rustix::mount::{MountFlags, UnmountFlags, mount, unmount};

/// Hostname used when the kernel command line gives none, or an invalid one.
pub(crate) const DEFAULT_HOSTNAME: &str = "nova";
/// Longest hostname the kernel accepts.
const HOSTNAME_MAX: usize = 64;
/// Where the files are prepared on a read-only root: the first at boot, then
/// each refresh takes the one the mounted overlay does not use.
const RUN_ETC: [&str; 2] = ["/run/nova/etc", "/run/nova/etc.1"];
/// Where the files live on a writable root, each bind-mounted over its
/// `/etc` path.
const RUN_IDENTITY: &str = "/run/nova/identity";

/// The `/etc` files already bind-mounted from [`RUN_IDENTITY`] (a guest
/// restored from a snapshot has its mounts and this list as they were).
static BOUND: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// One identity change at a time (a refresh on two connections at once).
static WRITING: Mutex<()> = Mutex::new(());

/// `/etc/resolv.conf`, when the guest has a network (or a refresh named
/// DNS servers).
static RESOLV_CONF: Mutex<Option<String>> = Mutex::new(None);

/// Makes every identity write (from the next one on) include
/// `/etc/resolv.conf` with `content`. Set at boot, before [`apply`], and by
/// a [`refresh`] that names DNS servers.
pub(crate) fn set_resolv_conf(content: String) {
    *RESOLV_CONF.lock().unwrap_or_else(PoisonError::into_inner) = Some(content);
}

/// `/etc/resolv.conf` listing `servers`, as a refresh writes it.
fn refreshed_resolv_conf(servers: &[Ipv4Addr]) -> String {
    let mut out = String::from("# written by nova-agent from the host's refresh\n");
    for server in servers {
        out.push_str(&format!("nameserver {server}\n"));
    }
    out
}

/// Where an identity is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// The machine's own: the kernel's hostname and `/etc` (PID 1 only).
    System,
    /// Only the three files, into this directory (`--etc`, for host tests).
    Dir(PathBuf),
}

/// What [`apply`] did, for the log.
#[derive(Debug, Default)]
pub(crate) struct IdentityReport {
    /// The hostname set.
    pub(crate) hostname: String,
    /// The machine id written.
    pub(crate) machine_id: String,
    /// Whether `/etc` was read-only and got the overlay.
    pub(crate) overlaid: bool,
}

/// Sets the hostname and writes the identity files at boot (see the module
/// docs). `requested` is `nova.hostname=` from the kernel command line.
pub(crate) fn apply(requested: Option<&str>) -> io::Result<IdentityReport> {
    let hostname = match requested {
        Some(name) if valid_hostname(name) => name.to_owned(),
        Some(name) => {
            tracing::warn!(
                name,
                "invalid hostname on the kernel command line; using the default"
            );
            DEFAULT_HOSTNAME.to_owned()
        }
        None => DEFAULT_HOSTNAME.to_owned(),
    };
    let machine_id = new_machine_id(&hostname, &[]);
    let overlaid = write(&Target::System, &hostname, &machine_id)?;
    Ok(IdentityReport {
        hostname,
        machine_id,
        overlaid,
    })
}

/// Gives the machine a new identity after a snapshot restore: `hostname`
/// (already checked with [`valid_hostname`]) and a new machine id, drawn
/// after the host's `entropy` was mixed into the kernel's pool and mixed
/// with it too (so it is new even if that did not take). With `dns`,
/// `/etc/resolv.conf` lists those servers from now on. With no `target`
/// nothing is written. Returns the machine id.
pub(crate) fn refresh(
    target: Option<&Target>,
    hostname: &str,
    entropy: &[u8],
    dns: Option<&[Ipv4Addr]>,
) -> io::Result<String> {
    if let Some(servers) = dns {
        set_resolv_conf(refreshed_resolv_conf(servers));
    }
    let machine_id = new_machine_id(hostname, entropy);
    if let Some(target) = target {
        let overlaid = write(target, hostname, &machine_id)?;
        tracing::info!(hostname, machine_id, overlaid, "identity refreshed");
    }
    Ok(machine_id)
}

/// Sets the hostname (for [`Target::System`]) and writes the three files.
/// Returns whether they went into an overlay over a read-only `/etc`.
fn write(target: &Target, hostname: &str, machine_id: &str) -> io::Result<bool> {
    let _writing = WRITING.lock().unwrap_or_else(PoisonError::into_inner);
    let etc = match target {
        Target::System => {
            rustix::system::sethostname(hostname.as_bytes())
                .map_err(|e| io::Error::other(format!("sethostname {hostname}: {e}")))?;
            Path::new("/etc")
        }
        Target::Dir(dir) => dir.as_path(),
    };
    let existing_hosts = std::fs::read_to_string(etc.join("hosts")).unwrap_or_default();
    let mut files = vec![
        ("hostname", format!("{hostname}\n")),
        ("hosts", render_hosts(&existing_hosts, hostname)),
        ("machine-id", format!("{machine_id}\n")),
    ];
    if let Some(resolv) = RESOLV_CONF
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
    {
        files.push(("resolv.conf", resolv));
    }
    if *target == Target::System {
        if is_read_only(etc) {
            overlay_etc(&files)?;
            return Ok(true);
        }
        bind_etc(&files)?;
        return Ok(false);
    }
    for (name, content) in &files {
        write_replacing(&etc.join(name), content.as_bytes())?;
    }
    Ok(false)
}

/// Writes `files` on the tmpfs and shows each at its `/etc` path through a
/// bind mount, made the first time (see the module docs).
fn bind_etc(files: &[(&str, String)]) -> io::Result<()> {
    std::fs::create_dir_all(RUN_IDENTITY)
        .map_err(|e| io::Error::new(e.kind(), format!("mkdir {RUN_IDENTITY}: {e}")))?;
    let mut bound = BOUND.lock().unwrap_or_else(PoisonError::into_inner);
    for (name, content) in files {
        let source = Path::new(RUN_IDENTITY).join(name);
        // In place (truncate and write): the inode a bind mount shows stays.
        std::fs::write(&source, content)
            .map_err(|e| io::Error::new(e.kind(), format!("write {}: {e}", source.display())))?;
        if bound.iter().any(|b| b == name) {
            continue;
        }
        let target = Path::new("/etc").join(name);
        // A mount follows a symlink and needs something to cover: put a
        // regular file where there is none.
        if !std::fs::symlink_metadata(&target).is_ok_and(|m| m.file_type().is_file()) {
            write_replacing(&target, b"")?;
        }
        rustix::mount::mount_bind(&source, &target).map_err(|e| {
            io::Error::other(format!(
                "bind-mount {} over {}: {e}",
                source.display(),
                target.display()
            ))
        })?;
        bound.push((*name).to_owned());
    }
    Ok(())
}

/// Shows `files` in the read-only `/etc` through an overlay (see the module
/// docs): mounts one, or replaces the one an earlier call mounted.
fn overlay_etc(files: &[(&str, String)]) -> io::Result<()> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let current = etc_overlay_lower(&mountinfo).filter(|dir| RUN_ETC.contains(&dir.as_str()));
    let next = if current.as_deref() == Some(RUN_ETC[0]) {
        RUN_ETC[1]
    } else {
        RUN_ETC[0]
    };
    std::fs::create_dir_all(next)
        .map_err(|e| io::Error::new(e.kind(), format!("mkdir {next}: {e}")))?;
    for (name, content) in files {
        write_replacing(&Path::new(next).join(name), content.as_bytes())?;
    }
    let options = CString::new(format!("lowerdir={next}:/etc"))
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    if current.is_some() {
        // From here until the mount below, `/etc` shows the image's files.
        // Processes that hold files of the old overlay keep them.
        unmount("/etc", UnmountFlags::DETACH)
            .map_err(|e| io::Error::other(format!("detach the overlay on /etc: {e}")))?;
    }
    mount(
        "overlay",
        "/etc",
        "overlay",
        MountFlags::RDONLY,
        Some(options.as_c_str()),
    )
    .map_err(|e| io::Error::other(format!("overlay {next} on /etc: {e}")))?;
    if let Some(old) = current
        && let Err(e) = std::fs::remove_dir_all(&old)
    {
        tracing::debug!(error = %e, dir = old, "cannot remove the old identity files");
    }
    Ok(())
}

/// The first lower directory of the overlay on `/etc`, when the top-most
/// mount there is an overlay; from the text of `/proc/self/mountinfo`.
fn etc_overlay_lower(mountinfo: &str) -> Option<String> {
    let mut lower = None;
    // Later lines are later mounts, on top of the earlier ones.
    for line in mountinfo.lines() {
        let Some((mount, fs)) = line.split_once(" - ") else {
            continue;
        };
        if mount.split(' ').nth(4) != Some("/etc") {
            continue;
        }
        let mut fs = fs.split(' ');
        let fstype = fs.next();
        let options = fs.nth(1).unwrap_or_default();
        lower = if fstype == Some("overlay") {
            options
                .split(',')
                .find_map(|o| o.strip_prefix("lowerdir="))
                .and_then(|dirs| dirs.split(':').next())
                .map(str::to_owned)
        } else {
            None
        };
    }
    lower
}

/// Whether `name` is a hostname the kernel and resolvers accept: 1 to 64
/// characters, letters, digits, `-` and `.`, not starting with `-` or `.`.
pub(crate) fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= HOSTNAME_MAX
        && !name.starts_with(['-', '.'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// `/etc/hosts` for `hostname`: the loopback lines first, then the image's
/// other entries. Names the image gave `127.0.0.1` or `::1` besides
/// `localhost` are kept; its `127.0.1.1` line (the image's hostname) is
/// replaced.
fn render_hosts(existing: &str, hostname: &str) -> String {
    let mut v4 = vec!["localhost".to_owned()];
    let mut v6: Vec<String> = ["localhost", "ip6-localhost", "ip6-loopback"]
        .map(str::to_owned)
        .into();
    let mut rest = Vec::new();
    for line in existing.lines() {
        let content = line.split('#').next().unwrap_or_default();
        let mut words = content.split_whitespace();
        let Some(address) = words.next() else {
            continue;
        };
        let names = match address {
            "127.0.0.1" => &mut v4,
            "::1" => &mut v6,
            "127.0.1.1" => continue,
            _ => {
                rest.push(line);
                continue;
            }
        };
        for word in words {
            if word != hostname && !names.iter().any(|n| n == word) {
                names.push(word.to_owned());
            }
        }
    }
    let mut out = format!(
        "# Written by nova-agent for this sandbox.\n127.0.0.1\t{}\n127.0.1.1\t{hostname}\n::1\t\t{}\n",
        v4.join(" "),
        v6.join(" ")
    );
    for line in rest {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// A new machine id: 32 lowercase hex digits, from the kernel's random
/// source mixed with the hostname (the sandbox id), `extra` (the host's
/// entropy after a restore) and the clocks, so it differs between sandboxes
/// even if the random source were predictable this early, or (in a restored
/// guest) still shared with the snapshot's other guests.
fn new_machine_id(hostname: &str, extra: &[u8]) -> String {
    let mut random = [0u8; 16];
    if let Err(e) = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut random))
    {
        tracing::warn!(error = %e, "cannot read /dev/urandom for the machine id");
    }
    let realtime = rustix::time::clock_gettime(rustix::time::ClockId::Realtime);
    let boottime = crate::clock::boottime_us();
    let mut id = String::with_capacity(32);
    for half in 0u8..2 {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (
            half,
            hostname,
            random,
            extra,
            boottime,
            realtime.tv_sec,
            realtime.tv_nsec,
        )
            .hash(&mut hasher);
        id.push_str(&format!("{:016x}", hasher.finish()));
    }
    id
}

fn is_read_only(path: &Path) -> bool {
    rustix::fs::statvfs(path)
        .is_ok_and(|s| s.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
}

/// Writes `content` to `path` through a temporary file and a rename, so a
/// symlink at `path` is replaced rather than written through and readers
/// never see half a file.
fn write_replacing(path: &Path, content: &[u8]) -> io::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.nova-tmp"));
    let with_path =
        |e: io::Error| io::Error::new(e.kind(), format!("write {}: {e}", path.display()));
    std::fs::write(&tmp, content).map_err(with_path)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        with_path(e)
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_maps_the_hostname_to_loopback_and_keeps_the_images_entries() {
        let image =
            "127.0.0.1\tlocalhost\n127.0.1.1\tnova\n::1\t\tlocalhost ip6-localhost ip6-loopback\n";
        let hosts = render_hosts(image, "sb-1");
        assert_eq!(
            hosts,
            "# Written by nova-agent for this sandbox.\n127.0.0.1\tlocalhost\n\
             127.0.1.1\tsb-1\n::1\t\tlocalhost ip6-localhost ip6-loopback\n"
        );
        let image =
            "# comment\n127.0.0.1 localhost db # alias\n10.0.0.5 registry\nff02::1 ip6-allnodes\n";
        let hosts = render_hosts(image, "sb-2");
        assert!(hosts.contains("127.0.0.1\tlocalhost db\n"), "{hosts}");
        assert!(hosts.contains("127.0.1.1\tsb-2\n"), "{hosts}");
        assert!(
            hosts.contains("\n10.0.0.5 registry\nff02::1 ip6-allnodes\n"),
            "{hosts}"
        );
        assert_eq!(hosts.matches("sb-2").count(), 1, "{hosts}");
        let hosts = render_hosts("", "x");
        assert!(hosts.contains("127.0.1.1\tx\n") && hosts.contains("127.0.0.1\tlocalhost\n"));
    }

    #[test]
    fn machine_ids_are_32_hex_digits_and_differ() {
        let a = new_machine_id("sb-1", &[]);
        let b = new_machine_id("sb-1", &[]);
        assert_eq!(a.len(), 32);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
            "{a}"
        );
        assert_ne!(a, b);
        assert_ne!(new_machine_id("sb-2", &[]), a);
        assert_ne!(new_machine_id("sb-1", &[1; 32]), a);
    }

    #[test]
    fn hostnames_are_checked() {
        assert!(valid_hostname("sb-0f3a"));
        assert!(valid_hostname("a.b"));
        for bad in ["", "-x", ".x", "a b", "a/b", &"x".repeat(65)] {
            assert!(!valid_hostname(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_overlay_on_etc_is_found_in_mountinfo() {
        let root = "22 1 254:0 / / ro,relatime - ext4 /dev/root ro\n";
        let ours =
            "30 22 0:25 / /etc ro,relatime - overlay overlay ro,lowerdir=/run/nova/etc:/etc\n";
        let again = "31 22 0:26 / /etc ro,relatime - overlay overlay ro,lowerdir=/run/nova/etc.1:/etc,redirect_dir=nofollow\n";
        let tmpfs = "32 22 0:27 / /etc rw - tmpfs tmpfs rw\n";
        let other = "33 22 0:28 / /etcx ro - overlay overlay ro,lowerdir=/x:/y\n";
        assert_eq!(etc_overlay_lower(root), None);
        assert_eq!(
            etc_overlay_lower(&format!("{root}{ours}")).as_deref(),
            Some("/run/nova/etc")
        );
        // The top-most mount counts.
        assert_eq!(
            etc_overlay_lower(&format!("{root}{ours}{again}{other}")).as_deref(),
            Some("/run/nova/etc.1")
        );
        assert_eq!(etc_overlay_lower(&format!("{root}{ours}{tmpfs}")), None);
        assert_eq!(etc_overlay_lower("garbage\n\n - \n"), None);
    }

    #[test]
    fn refresh_into_a_directory_rewrites_the_three_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("hosts"),
            "127.0.0.1 localhost\n127.0.1.1 old\n10.0.0.5 registry\n",
        )
        .unwrap();
        let target = Target::Dir(dir.path().to_owned());
        let id = refresh(Some(&target), "sb-new", &[9; 32], None).unwrap();
        let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
        assert_eq!(read("hostname"), "sb-new\n");
        assert_eq!(read("machine-id"), format!("{id}\n"));
        let hosts = read("hosts");
        assert!(hosts.contains("127.0.1.1\tsb-new\n"), "{hosts}");
        assert!(
            hosts.contains("10.0.0.5 registry\n") && !hosts.contains("old"),
            "{hosts}"
        );
        let again = refresh(Some(&target), "sb-new", &[9; 32], None).unwrap();
        assert_ne!(again, id);
        assert_eq!(read("machine-id"), format!("{again}\n"));
        // No target: a new id, nothing written.
        let unwritten = refresh(None, "sb-other", &[9; 32], None).unwrap();
        assert_eq!(read("machine-id"), format!("{again}\n"));
        assert_eq!(unwritten.len(), 32);
    }

    #[test]
    fn files_are_replaced_not_written_through_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, "old").unwrap();
        let link = dir.path().join("hosts");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        write_replacing(&link, b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "old");
        assert_eq!(std::fs::read_to_string(&link).unwrap(), "new");
        assert!(!std::fs::symlink_metadata(&link).unwrap().is_symlink());
    }
}
