//! Checks of the built images: kernel, rootfs contents, manifests, boot.
//!
//! These use what `make images` built into `$NOVA_HOME` (kernel cache,
//! debootstrap cache, installed templates) and never rebuild the expensive
//! parts. When the artifacts are missing they fail with a message saying to
//! run `make images`, unless `NOVA_SKIP_IMAGE_TESTS=1`, which turns each
//! test into a loud SKIP line.

#![allow(clippy::print_stderr, reason = "tests report skips on stderr")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nova_core::home::NovaHome;
use nova_core::template::{GuestArch, Template, TemplateManager};
use nova_images::boot_probe::{AGENT_READY_MARKER, BootProbe};
use nova_images::cache::CacheDir;
use nova_images::elf::{self, EM_X86_64};
use nova_images::host_tools::find_program;
use nova_images::kernel::{self, KernelSource, config};
use nova_images::rootfs::debian::DebianSpec;
use nova_images::template::{BuildOptions, RootfsRecipe, build_template, find_template};

/// The real `$NOVA_HOME` and its installed templates, or `None` (after a
/// loud SKIP line) when `NOVA_SKIP_IMAGE_TESTS=1`. Panics with instructions
/// when the templates are not built.
fn built(test: &str) -> Option<(NovaHome, TemplateManager)> {
    if std::env::var("NOVA_SKIP_IMAGE_TESTS").is_ok_and(|v| v == "1") {
        eprintln!("SKIP {test}: NOVA_SKIP_IMAGE_TESTS=1 (these tests need `make images`)");
        return None;
    }
    let home = NovaHome::resolve().expect("NOVA_HOME resolves");
    let manager = TemplateManager::new(home.templates_dir());
    for id in ["minimal", "python"] {
        if let Err(err) = manager.load(id) {
            panic!(
                "{test}: template {id} is not built in {} ({err}).\n\
                 Run `make images` first (or set NOVA_SKIP_IMAGE_TESTS=1 to skip the image tests).",
                home.root().display()
            );
        }
    }
    Some((home, manager))
}

fn load(manager: &TemplateManager, id: &str) -> Template {
    manager.load(id).expect("checked by built()")
}

fn debugfs(image: &Path, request: &str) -> String {
    let debugfs = find_program("debugfs").expect("debugfs (e2fsprogs) is installed");
    let out = Command::new(debugfs)
        .arg("-R")
        .arg(request)
        .arg(image)
        .output()
        .expect("debugfs runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn workspace_agent() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(nova_images::template::DEFAULT_AGENT_PATH)
}

#[test]
fn kernel_is_a_stripped_x86_64_elf_with_a_pvh_note() {
    let Some((_, manager)) = built("kernel_is_a_stripped_x86_64_elf_with_a_pvh_note") else {
        return;
    };
    for id in ["minimal", "python"] {
        let kernel = load(&manager, id).kernel_path();
        let info = elf::read_elf(&kernel).expect("vmlinux parses as ELF64");
        assert_eq!(info.machine, EM_X86_64, "{id}: x86-64");
        let entry = info
            .pvh_entry
            .expect("Xen PHYS32_ENTRY note (type 18) present");
        assert!(
            entry > 0x10_0000 && entry < 0x1_0000_0000,
            "{id}: 32-bit physical PVH entry {entry:#x}"
        );
        let size = std::fs::metadata(&kernel).unwrap().len();
        assert!(
            size < 30 << 20,
            "{id}: stripped vmlinux should be small, is {size} bytes"
        );
    }
}

#[tokio::test]
async fn cached_kernel_config_has_every_required_option() {
    let Some((home, manager)) = built("cached_kernel_config_has_every_required_option") else {
        return;
    };
    let cache = CacheDir::new(home.cache_dir());
    let kernel = kernel::cached_kernel(&cache, &KernelSource::default())
        .await
        .expect("kernel source version readable")
        .expect("the kernel for the current source + fragment is cached (run `make images`)");
    let final_config = std::fs::read_to_string(kernel.vmlinux.with_file_name("config")).unwrap();
    let mismatch = config::verify(config::FRAGMENT, &final_config);
    assert!(mismatch.is_empty(), "{mismatch:?}");
    assert_eq!(
        load(&manager, "minimal").manifest.kernel_version,
        kernel.manifest.release
    );
}

#[tokio::test]
async fn the_arm64_template_has_the_arm64_kernel_agent_and_busybox() {
    let test = "the_arm64_template_has_the_arm64_kernel_agent_and_busybox";
    if std::env::var("NOVA_SKIP_IMAGE_TESTS").is_ok_and(|v| v == "1") {
        eprintln!("SKIP {test}: NOVA_SKIP_IMAGE_TESTS=1");
        return;
    }
    let home = NovaHome::resolve().expect("NOVA_HOME resolves");
    let manager = TemplateManager::new(home.templates_dir());
    let Ok(template) = manager.load("minimal-arm64") else {
        eprintln!("SKIP {test}: minimal-arm64 is not built (`make images-arm64`)");
        return;
    };
    assert_eq!(template.manifest.arch, GuestArch::Arm64);
    // The kernel is the cached arm64 build, its config what the fragment asks.
    let cache = CacheDir::new(home.cache_dir());
    let built = kernel::cached_kernel_for(&cache, &KernelSource::default(), GuestArch::Arm64)
        .await
        .expect("kernel source version readable")
        .expect("the arm64 kernel for the current source + fragment is cached");
    assert_eq!(template.manifest.kernel_version, built.manifest.release);
    assert_eq!(built.manifest.arch, GuestArch::Arm64);
    kernel::check_arm64_image(&template.kernel_path()).unwrap();
    let final_config = std::fs::read_to_string(built.vmlinux.with_file_name("config")).unwrap();
    let mismatch = config::verify_arch(&config::ARM64, &final_config);
    assert!(mismatch.is_empty(), "{mismatch:?}");
    // The agent and busybox in the rootfs are static arm64 binaries.
    let dir = tempfile::tempdir().unwrap();
    for (inside, name) in [("/sbin/nova-agent", "agent"), ("/bin/busybox", "busybox")] {
        let out = dir.path().join(name);
        debugfs(
            &template.rootfs_path(),
            &format!("dump {inside} {}", out.display()),
        );
        let info = elf::read_elf(&out).unwrap();
        assert_eq!(info.machine, elf::EM_AARCH64, "{inside}");
        assert!(!info.has_interpreter, "{inside} must be static");
    }
}

#[test]
fn rootfs_images_contain_the_static_agent_as_init() {
    let Some((_, manager)) = built("rootfs_images_contain_the_static_agent_as_init") else {
        return;
    };
    for id in ["minimal", "python"] {
        let rootfs = load(&manager, id).rootfs_path();
        let dir = tempfile::tempdir().unwrap();
        let dumped = dir.path().join("nova-agent");
        debugfs(
            &rootfs,
            &format!("dump /sbin/nova-agent {}", dumped.display()),
        );
        let info = elf::read_elf(&dumped)
            .unwrap_or_else(|e| panic!("{id}: /sbin/nova-agent missing or bad: {e}"));
        assert!(
            info.is_static_x86_64(),
            "{id}: /sbin/nova-agent must be static"
        );
        let init = debugfs(&rootfs, "stat /sbin/init");
        assert!(
            init.contains("Type: symlink"),
            "{id}: /sbin/init is a symlink: {init}"
        );
        assert!(
            init.contains("Fast link dest: \"nova-agent\""),
            "{id}: /sbin/init -> nova-agent: {init}"
        );
        for dir in ["/proc", "/sys", "/dev", "/tmp", "/run", "/root", "/etc"] {
            assert!(
                debugfs(&rootfs, &format!("stat {dir}")).contains("Type: directory"),
                "{id}: {dir}"
            );
        }
        assert_eq!(debugfs(&rootfs, "cat /etc/hostname"), "nova\n", "{id}");
        assert!(
            debugfs(&rootfs, "cat /etc/passwd").starts_with("root:x:0:0:"),
            "{id}"
        );
    }
}

#[test]
fn minimal_rootfs_is_busybox_and_under_16_mb() {
    let Some((_, manager)) = built("minimal_rootfs_is_busybox_and_under_16_mb") else {
        return;
    };
    let rootfs = load(&manager, "minimal").rootfs_path();
    let size = std::fs::metadata(&rootfs).unwrap().len();
    assert!(size < 16_000_000, "minimal rootfs is {size} bytes");
    assert!(debugfs(&rootfs, "stat /bin/busybox").contains("Type: regular"));
    assert!(debugfs(&rootfs, "stat /bin/sh").contains("Fast link dest: \"/bin/busybox\""));
}

#[test]
fn python_rootfs_has_python3_and_no_docs_or_apt_lists() {
    let Some((_, manager)) = built("python_rootfs_has_python3_and_no_docs_or_apt_lists") else {
        return;
    };
    let rootfs = load(&manager, "python").rootfs_path();
    for binary in ["/usr/bin/python3", "/usr/bin/curl", "/usr/bin/wget"] {
        assert!(
            !debugfs(&rootfs, &format!("stat {binary}")).is_empty(),
            "{binary} present"
        );
    }
    assert!(debugfs(&rootfs, "stat /etc/ssl/certs/ca-certificates.crt").contains("Type: regular"));
    assert!(
        debugfs(&rootfs, "ls /usr/share/man")
            .lines()
            .all(|l| !l.contains(".gz"))
    );
    let lists = debugfs(&rootfs, "ls -l /var/lib/apt/lists");
    assert!(
        !lists.contains("InRelease") && !lists.contains("_Packages"),
        "apt lists stripped: {lists}"
    );
}

#[test]
fn python3_runs_in_the_cached_debootstrap_tree() {
    let Some((home, _)) = built("python3_runs_in_the_cached_debootstrap_tree") else {
        return;
    };
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIP python3_runs_in_the_cached_debootstrap_tree: chroot needs root");
        return;
    }
    let spec = find_template("python").unwrap();
    let RootfsRecipe::Debian(debian): &RootfsRecipe = &spec.recipe else {
        panic!("python is Debian")
    };
    let tree = DebianSpec::cached_tree(debian, &CacheDir::new(home.cache_dir()));
    assert!(
        tree.join("usr/bin/python3").exists(),
        "debootstrap tree cached at {} (run `make images`)",
        tree.display()
    );
    let out = Command::new(find_program("chroot").unwrap())
        .arg(&tree)
        .args([
            "python3",
            "-c",
            "import ssl, json, sqlite3, sys; print(sys.version_info[:2], ssl.OPENSSL_VERSION)",
        ])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("(3, 11) OpenSSL"), "{stdout}");
}

#[test]
fn manifests_round_trip_through_template_manager_with_real_values() {
    let Some((_, manager)) =
        built("manifests_round_trip_through_template_manager_with_real_values")
    else {
        return;
    };
    for id in ["minimal", "python"] {
        let template = load(&manager, id);
        let spec = find_template(id).unwrap();
        let m = &template.manifest;
        assert_eq!(m.template_id, id);
        assert_eq!(m.os_type, "linux");
        assert_eq!(m.memory_mb, spec.memory_mb);
        assert_eq!(m.vcpus, spec.vcpus);
        assert_eq!(m.packages, spec.packages);
        assert_eq!(m.required_files, ["vmlinux", "rootfs.ext4"]);
        assert!(
            m.kernel_version.starts_with("6.1.") && m.kernel_version.ends_with("-nova"),
            "{}",
            m.kernel_version
        );
        let bytes = std::fs::metadata(template.rootfs_path()).unwrap().len();
        assert!(
            (m.disk_size_gb - bytes as f64 / 1e9).abs() < 0.001,
            "{} vs {bytes}",
            m.disk_size_gb
        );
        // Written, re-read, equal: the manifest survives the manager unchanged.
        let copy = tempfile::tempdir().unwrap();
        let dir = copy.path().join(id);
        std::fs::create_dir(&dir).unwrap();
        TemplateManager::write_manifest(&dir, m).unwrap();
        for file in &m.required_files {
            std::fs::write(dir.join(file), b"").unwrap();
        }
        assert_eq!(
            &TemplateManager::new(copy.path()).load(id).unwrap().manifest,
            m
        );
    }
}

#[tokio::test]
async fn kernel_boots_minimal_to_the_agent_ready_under_qemu_tcg() {
    let Some((_, manager)) = built("kernel_boots_minimal_to_the_agent_ready_under_qemu_tcg") else {
        return;
    };
    let qemu =
        find_program("qemu-system-x86_64").expect("qemu-system-x86 is installed (make deps)");
    let template = load(&manager, "minimal");
    let sockets = tempfile::tempdir().unwrap();
    let socket = sockets.path().join("agent.sock");
    let mut probe = BootProbe::new(qemu, template.kernel_path(), template.rootfs_path());
    probe.agent_socket = Some(socket.clone());
    probe.marker = AGENT_READY_MARKER.iter().map(|p| (*p).to_owned()).collect();
    let (timing, mut vm) = probe
        .start()
        .await
        .expect("boots to the agent's ready line");
    assert!(
        timing
            .console
            .contains("Run /sbin/nova-agent as init process"),
        "{}",
        timing.console
    );
    assert!(timing.to_kernel_init.is_some_and(|t| t <= timing.to_marker));

    // The host end of the virtio-serial port: the protocol handshake, then a command.
    let stream = tokio::net::UnixStream::connect(&socket)
        .await
        .expect("QEMU's agent socket");
    let (client, hello) =
        nova_protocol::client::AgentClient::connect(stream, Duration::from_secs(30))
            .await
            .expect("agent answers Hello");
    assert!(hello.pid1, "the agent is PID 1");
    assert!(
        hello.kernel_release.ends_with("-nova"),
        "{}",
        hello.kernel_release
    );
    let out = client
        .run(nova_protocol::ExecSpec::argv([
            "/bin/sh",
            "-c",
            "echo hi from $(cat /etc/hostname)",
        ]))
        .await
        .expect("exec over virtio-serial");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi from nova\n");
    assert!(out.status.success());
    eprintln!(
        "boot (TCG): kernel init at {:?}, agent ready at {:?}, agent ready in guest at {} ms",
        timing.to_kernel_init,
        timing.to_marker,
        hello.agent_ready_us / 1000
    );
    vm.kill().await;
}

#[tokio::test]
async fn rebuilding_an_unchanged_template_is_a_cache_hit() {
    let Some((home, _)) = built("rebuilding_an_unchanged_template_is_a_cache_hit") else {
        return;
    };
    let agent = workspace_agent();
    assert!(
        agent.is_file(),
        "static agent built at {} (make agent)",
        agent.display()
    );
    // A private NOVA_HOME sharing only the kernel cache: the first build makes
    // the minimal template (seconds), the second must be a cache hit.
    let private = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(private.path().join("cache")).unwrap();
    std::os::unix::fs::symlink(
        home.cache_dir().join("kernel"),
        private.path().join("cache/kernel"),
    )
    .unwrap();
    let mut opts = BuildOptions::new(NovaHome::at(private.path()));
    opts.agent = agent;
    opts.measure_boot = false;
    let spec = find_template("minimal").unwrap();
    let first = build_template(&spec, &opts)
        .await
        .expect("minimal builds from the cached kernel");
    assert!(
        first.kernel_cached,
        "the kernel comes from the shared cache"
    );
    assert!(!first.cached);
    let started = Instant::now();
    let second = build_template(&spec, &opts).await.unwrap();
    assert!(second.cached, "second build is a cache hit");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "cache hit took {:?}",
        started.elapsed()
    );
    assert_eq!(second.template.manifest, first.template.manifest);
    let leftovers: Vec<_> = std::fs::read_dir(private.path().join("templates"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "no staging leftovers: {leftovers:?}");
}
