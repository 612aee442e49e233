//! Integration tests against a real Firecracker (`NOVA_FIRECRACKER_BIN`).
//!
//! They drive the VMM lifecycle with a minimal test guest (see
//! `common/mod.rs`), so they run on hosts whose KVM cannot boot a standard
//! kernel. The agent lifecycle (ready, exec) needs a real template and
//! hardware KVM: `NOVA_TEST_KVM=1`.

#![allow(clippy::unwrap_used, clippy::print_stdout, reason = "test code")]

mod common;

use std::time::Duration;

use nova_core::config::SandboxConfig;
use nova_core::error::{CreateSandboxError, ExecError};
use nova_core::home::NovaHome;
use nova_core::hypervisor::Hypervisor;
use nova_core::snapshot::{SnapshotError, SnapshotKind};
use nova_core::state::SandboxState;
use nova_firecracker::api::{ApiError, InstanceState, LogLevel};
use nova_firecracker::binary::{FirecrackerBinary, Version};
use nova_firecracker::jailer::JailLimits;
use nova_firecracker::machine::{METRICS_FILE, MachineSpec};
use nova_firecracker::process::{API_SOCKET, SpawnSpec, VmmExit};
use nova_firecracker::stats::MetricsReader;
use nova_firecracker::{FirecrackerHypervisor, FirecrackerOptions, FirecrackerSandboxes};
use nova_runtime::host::KvmStatus;
use nova_runtime::vmm::VmmProcess;
use tokio::time::Instant;

fn test_config(template: &str) -> SandboxConfig {
    SandboxConfig::builder()
        .template_id(template)
        .memory_mb(128)
        .vcpus(1)
        .boot_timeout_ms(20_000)
        .build()
        .unwrap()
}

/// Spawn, configure, `InstanceStart`, pause/resume as `GET /` reports it,
/// metrics flush, a refused request carrying Firecracker's fault message,
/// and a graceful end: Ctrl+Alt+Del makes the guest reset, and Firecracker
/// exits with code 0.
#[tokio::test]
async fn vmm_lifecycle_through_the_typed_api() {
    let Some(fc) = common::firecracker("vmm_lifecycle_through_the_typed_api") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    common::write_test_kernel(&dir.path().join("vmlinux"));
    let rootfs = std::fs::File::create(dir.path().join("rootfs.ext4")).unwrap();
    rootfs.set_len(1024 * 1024).unwrap();
    let spec = SpawnSpec {
        firecracker: fc.path(),
        id: "lifecycle-1",
        workdir: dir.path(),
        jail: None,
        limits: JailLimits {
            memory_mib: 128,
            vcpus: 1,
        },
        output: &dir.path().join("console.log"),
        boot_timer: false,
        extra_args: &[],
        netns: None,
    };
    let mut vmm = VmmProcess::spawn(&nova_firecracker::process::command(&spec).unwrap()).unwrap();
    let pid = vmm.pid().unwrap();
    let mut api = nova_firecracker::process::connect_api(
        &dir.path().join(API_SOCKET),
        Instant::now() + Duration::from_secs(10),
    )
    .await
    .unwrap();
    let info = api.instance_info().await.unwrap();
    assert_eq!(info.id, "lifecycle-1");
    assert_eq!(info.state, InstanceState::NotStarted);
    assert_eq!(Version::parse(&info.vmm_version), Some(fc.version));
    assert_eq!(
        Version::parse(&api.version().await.unwrap().firecracker_version),
        Some(fc.version)
    );

    // A refused request: Firecracker's own reason reaches the caller.
    let mut broken = MachineSpec {
        kernel: dir.path().join("no-such-kernel").to_string_lossy().into(),
        rootfs: "rootfs.ext4".into(),
        scratch: None,
        extra_drives: Vec::new(),
        memory_mib: 128,
        vcpus: 1,
        kernel_args: "panic=1".into(),
        hostname: "t".into(),
        serial_console: false,
        track_dirty_pages: false,
        vsock_uds: "vsock.sock".into(),
        metrics_path: Some(METRICS_FILE.into()),
        log_path: Some("vmm.log".into()),
        log_level: LogLevel::Info,
        entropy: true,
        balloon: None,
        network: Vec::new(),
        guest_net: None,
    };
    let err = api
        .put_boot_source(&broken.boot_source().unwrap())
        .await
        .unwrap_err();
    let fault = err.fault_message().unwrap().to_owned();
    assert!(matches!(err, ApiError::Fault { .. }));
    assert!(!fault.is_empty());
    println!("Firecracker refused a missing kernel with: {fault}");

    broken.kernel = "vmlinux".into();
    let spec_ok = broken;
    spec_ok.configure(&mut api).await.unwrap();
    let config = api.machine_config().await.unwrap();
    assert_eq!((config.vcpu_count, config.mem_size_mib), (1, 128));
    api.instance_start().await.unwrap();
    assert_eq!(
        api.instance_info().await.unwrap().state,
        InstanceState::Running
    );
    // A second start is refused, with a reason.
    assert!(
        api.instance_start()
            .await
            .unwrap_err()
            .fault_message()
            .is_some()
    );

    api.pause().await.unwrap();
    assert_eq!(
        api.instance_info().await.unwrap().state,
        InstanceState::Paused
    );
    api.resume().await.unwrap();
    assert_eq!(
        api.instance_info().await.unwrap().state,
        InstanceState::Running
    );

    // The guest polls the i8042 status port: each poll is a port I/O exit.
    let mut metrics = MetricsReader::new(dir.path().join(METRICS_FILE));
    let deadline = Instant::now() + Duration::from_secs(10);
    let totals = loop {
        api.flush_metrics().await.unwrap();
        let totals = metrics.read_new().unwrap().clone();
        if totals.vcpu.exit_io_in > 0 || Instant::now() > deadline {
            break totals;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(totals.flushes >= 1, "{totals:?}");
    assert!(totals.vcpu.exit_io_in > 0, "{totals:?}");

    api.send_ctrl_alt_del().await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(10), vmm.wait())
        .await
        .expect("the guest resets after Ctrl+Alt+Del");
    assert_eq!(exit, VmmExit::Code(0), "{exit}");
    assert!(!common::alive(pid));
}

/// The provider end to end without an agent: create, stats and metrics,
/// pause/resume as Firecracker reports them, a full snapshot, a graceful
/// stop, a restore into a fresh process, a forced stop, and nothing left.
#[tokio::test]
async fn sandbox_lifecycle_snapshot_and_restore() {
    let Some(fc) = common::firecracker("sandbox_lifecycle_snapshot_and_restore") else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    common::install_test_template(home.path(), "fctest");
    let hv = common::vmm_only(home.path(), fc);

    let sandbox = hv.create_sandbox(test_config("fctest")).await.unwrap();
    let id = sandbox.id().clone();
    let boot = sandbox.info().boot.clone().unwrap();
    println!("cold boot to InstanceStart: {boot:?}");
    assert!(!boot.from_snapshot);
    assert!(boot.spawn_ms > 0.0 && boot.configure_ms > 0.0);
    assert_eq!(boot.guest_ms, 0.0, "no agent was waited for");
    let pid = sandbox.info().vmm_pid.unwrap();
    let dir = sandbox.info().dir.clone();
    assert!(dir.join("scratch.ext4").exists());
    assert!(dir.join("state.json").exists());
    assert_eq!(
        hv.instance_info(&id).await.unwrap().state,
        InstanceState::Running
    );

    // Commands need the agent; the error says why there is none.
    let err = sandbox.execute_command("true").await.unwrap_err();
    assert!(matches!(err, ExecError::Agent(_)), "{err}");

    let stats = hv.get_sandbox_stats(&id).await.unwrap();
    assert!(stats.vmm.rss_bytes > 0, "{stats:?}");
    assert!(stats.vmm.block_read_bytes.is_some(), "{stats:?}");
    assert!(stats.guest.is_none());
    // The guest polls the i8042 status port; wait until an exit is counted.
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let metrics = hv.vmm_metrics(&id).await.unwrap();
        if metrics.vcpu.exit_io_in > 0 || Instant::now() > deadline {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        metrics.flushes >= 2 && metrics.vcpu.exit_io_in > 0,
        "{metrics:?}"
    );

    // A snapshot needs a paused VM.
    let snap = home.path().join("snap");
    assert!(matches!(
        hv.snapshot_sandbox_with(&id, &snap, SnapshotKind::Full)
            .await,
        Err(SnapshotError::NotPaused(SandboxState::Running))
    ));
    sandbox.pause().await.unwrap();
    assert_eq!(
        hv.instance_info(&id).await.unwrap().state,
        InstanceState::Paused
    );
    // Diff snapshots need dirty-page tracking.
    assert!(matches!(
        hv.snapshot_sandbox_with(&id, &snap, SnapshotKind::Diff)
            .await,
        Err(SnapshotError::Unsupported { .. })
    ));
    let started = std::time::Instant::now();
    let info = hv
        .snapshot_sandbox_with(&id, &snap, SnapshotKind::Full)
        .await
        .unwrap();
    println!("full snapshot of 128 MiB: {:?}", started.elapsed());
    assert_eq!(info.manifest.source, id);
    for file in ["vmstate", "memory", "scratch.ext4", "snapshot.json"] {
        assert!(snap.join(file).exists(), "{file} missing");
    }
    sandbox.resume().await.unwrap();
    assert_eq!(
        hv.instance_info(&id).await.unwrap().state,
        InstanceState::Running
    );

    // Graceful stop: Ctrl+Alt+Del, the guest resets, Firecracker exits.
    let started = std::time::Instant::now();
    sandbox.stop(false).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "graceful stop took {:?} (it should not have waited for a kill)",
        started.elapsed()
    );
    assert!(!common::alive(pid));
    assert!(!dir.exists());
    assert_eq!(hv.get(&id).await.unwrap().state, SandboxState::Stopped);

    // Restore into a fresh process: it resumes where the snapshot was.
    let restored = hv.create_sandbox_from_snapshot(&snap).await.unwrap();
    let rid = restored.id().clone();
    assert_ne!(rid, id);
    let boot = restored.info().boot.clone().unwrap();
    println!("restore to running: {boot:?}");
    assert!(boot.from_snapshot);
    let rpid = restored.info().vmm_pid.unwrap();
    assert_eq!(
        hv.instance_info(&rid).await.unwrap().state,
        InstanceState::Running
    );
    assert!(restored.info().dir.join("scratch.ext4").exists());
    restored.pause().await.unwrap();
    assert_eq!(
        hv.instance_info(&rid).await.unwrap().state,
        InstanceState::Paused
    );
    // Forced stop of a paused sandbox.
    restored.stop(true).await.unwrap();
    assert!(!common::alive(rpid));
    assert!(common::leftovers(home.path()).is_empty());
    assert!(restored.pause().await.is_err());
}

/// Diff snapshots: with dirty-page tracking, a diff is merged into the full
/// snapshot's memory file, and the result loads.
#[tokio::test]
async fn diff_snapshot_merges_into_the_full_one() {
    let Some(fc) = common::firecracker("diff_snapshot_merges_into_the_full_one") else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    common::install_test_template(home.path(), "fctest");
    let mut options = FirecrackerOptions::new(NovaHome::at(home.path()), fc);
    options.jailer = None;
    options.wait_for_agent = false;
    options.allow_non_hardware_kvm = true;
    options.track_dirty_pages = true;
    options.scratch_size_mb = 64;
    let hv = FirecrackerHypervisor::new(options);
    let sandbox = hv.create_sandbox(test_config("fctest")).await.unwrap();
    let id = sandbox.id().clone();
    let snap = home.path().join("snap");
    sandbox.pause().await.unwrap();
    assert!(matches!(
        hv.snapshot_sandbox_with(&id, &snap, SnapshotKind::Diff)
            .await,
        Err(SnapshotError::Invalid { .. })
    ));
    hv.snapshot_sandbox_with(&id, &snap, SnapshotKind::Full)
        .await
        .unwrap();
    sandbox.resume().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    sandbox.pause().await.unwrap();
    let diff = hv
        .snapshot_sandbox_with(&id, &snap, SnapshotKind::Diff)
        .await
        .unwrap();
    assert_eq!(diff.manifest.kind, SnapshotKind::Diff);
    sandbox.stop(true).await.unwrap();
    let restored = hv.create_sandbox_from_snapshot(&snap).await.unwrap();
    assert_eq!(
        hv.instance_info(restored.id()).await.unwrap().state,
        InstanceState::Running
    );
    restored.stop(false).await.unwrap();
    assert!(common::leftovers(home.path()).is_empty());
}

/// Waiting for an agent that never comes ends in a boot timeout that quotes
/// the VMM's log, and leaves nothing behind.
#[tokio::test]
async fn agent_wait_times_out_and_cleans_up() {
    let Some(fc) = common::firecracker("agent_wait_times_out_and_cleans_up") else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    common::install_test_template(home.path(), "fctest");
    let mut options = FirecrackerOptions::new(NovaHome::at(home.path()), fc);
    options.jailer = None;
    options.allow_non_hardware_kvm = true;
    options.scratch_size_mb = 64;
    let hv = FirecrackerHypervisor::new(options);
    let mut config = test_config("fctest");
    config.boot_timeout_ms = 1500;
    let started = std::time::Instant::now();
    let err = hv.create_sandbox(config).await.unwrap_err();
    assert!(
        matches!(
            err,
            CreateSandboxError::BootTimeout {
                timeout_ms: 1500,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(common::leftovers(home.path()).is_empty());
    assert!(hv.list().await.is_empty());
}

/// A paravirtualized KVM is refused unless the caller opted in, with a
/// message that says what to do. Runs without Firecracker: the check comes
/// before anything is spawned.
#[tokio::test]
async fn paravirtualized_kvm_is_refused_unless_allowed() {
    let home = tempfile::tempdir().unwrap();
    common::install_test_template(home.path(), "fctest");
    let binary = FirecrackerBinary {
        path: "/nonexistent/firecracker".into(),
        version: Version::new(1, 16, 1),
    };
    let hv = FirecrackerHypervisor::new(FirecrackerOptions::new(NovaHome::at(home.path()), binary));
    if !matches!(hv.backend().kvm(), KvmStatus::Paravirtualized { .. }) {
        println!(
            "SKIP paravirtualized_kvm_is_refused_unless_allowed: this host's KVM is {}",
            hv.backend().kvm()
        );
        return;
    }
    let err = hv.create_sandbox(test_config("fctest")).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, CreateSandboxError::Unsupported { .. }),
        "{msg}"
    );
    assert!(msg.contains("allow_non_hardware_kvm"), "{msg}");
    assert!(common::leftovers(home.path()).is_empty());
}

/// The full lifecycle with the agent: needs hardware KVM and a template built
/// by `make images` in `$NOVA_HOME`.
#[tokio::test]
async fn agent_lifecycle_on_hardware_kvm() {
    let Some(fc) = common::firecracker("agent_lifecycle_on_hardware_kvm") else {
        return;
    };
    if std::env::var_os("NOVA_TEST_KVM").is_none_or(|v| v != "1") {
        println!("SKIP agent_lifecycle_on_hardware_kvm: NOVA_TEST_KVM=1 not set");
        return;
    }
    let home = NovaHome::resolve().unwrap();
    let template = std::env::var("NOVA_TEST_TEMPLATE").unwrap_or_else(|_| "python".into());
    let hv = FirecrackerHypervisor::new(FirecrackerOptions::new(home, fc));
    let config = SandboxConfig::builder()
        .template_id(template)
        .build()
        .unwrap();
    let sandbox = hv.create_sandbox(config).await.unwrap();
    println!("boot: {:?}", sandbox.info().boot);
    let out = sandbox.execute_command("echo $((6 * 7))").await.unwrap();
    assert_eq!(out.stdout_lossy(), "42\n");
    sandbox
        .hypervisor()
        .write_file(sandbox.id(), "/tmp/x", b"hello".to_vec(), 0o644)
        .await
        .unwrap();
    assert_eq!(
        sandbox
            .hypervisor()
            .read_file(sandbox.id(), "/tmp/x")
            .await
            .unwrap(),
        b"hello"
    );
    let stats = sandbox.get_stats().await.unwrap();
    assert!(stats.guest.is_some());
    sandbox.pause().await.unwrap();
    sandbox.resume().await.unwrap();
    sandbox.stop(false).await.unwrap();
}

/// Whether this host can make sandbox networks; prints SKIP when not.
fn networking(test: &str) -> bool {
    match nova_runtime::network::unsupported_reason() {
        Some(why) => {
            println!("SKIP {test}: {why}");
            false
        }
        None => true,
    }
}

/// Firecracker started inside a sandbox network's namespace opens the
/// namespace's tap by name for `eth0` and boots with it: the VMM's network
/// namespace is the sandbox's, it holds a descriptor on `tap0`, and
/// `GET /vm/config` lists the interface. Runs the test guest (no agent), so
/// it needs no hardware KVM; needs root for the network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecracker_runs_in_the_sandbox_netns_on_its_tap() {
    let test = "firecracker_runs_in_the_sandbox_netns_on_its_tap";
    let Some(fc) = common::firecracker(test) else {
        return;
    };
    if !networking(test) {
        return;
    }
    let pool = nova_net::AddressPool::new("10.252.0.0/16".parse().unwrap()).unwrap();
    let id: nova_core::SandboxId = format!("fcnet{}", std::process::id()).parse().unwrap();
    let mut net = nova_net::SandboxNetwork::create(&id, &nova_net::NetworkSpec::default(), &pool)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    common::write_test_kernel(&dir.path().join("vmlinux"));
    std::fs::File::create(dir.path().join("rootfs.ext4"))
        .unwrap()
        .set_len(1024 * 1024)
        .unwrap();
    let netns = std::sync::Arc::new(net.open_netns().unwrap());
    let spec = SpawnSpec {
        firecracker: fc.path(),
        id: "net-1",
        workdir: dir.path(),
        jail: None,
        limits: JailLimits {
            memory_mib: 128,
            vcpus: 1,
        },
        output: &dir.path().join("console.log"),
        boot_timer: false,
        extra_args: &[],
        netns: Some(&netns),
    };
    let mut vmm = VmmProcess::spawn_in_netns(
        &nova_firecracker::process::command(&spec).unwrap(),
        nova_runtime::vmm::SpawnMode::Owned,
        spec.netns,
    )
    .unwrap();
    let pid = vmm.pid().unwrap();
    let mut api = nova_firecracker::process::connect_api(
        &dir.path().join(API_SOCKET),
        Instant::now() + Duration::from_secs(10),
    )
    .await
    .unwrap();
    let machine = MachineSpec {
        kernel: "vmlinux".into(),
        rootfs: "rootfs.ext4".into(),
        scratch: None,
        extra_drives: Vec::new(),
        memory_mib: 128,
        vcpus: 1,
        kernel_args: String::new(),
        hostname: "net-1".into(),
        serial_console: false,
        track_dirty_pages: false,
        vsock_uds: "vsock.sock".into(),
        metrics_path: None,
        log_path: None,
        log_level: LogLevel::Info,
        entropy: false,
        balloon: None,
        network: vec![nova_firecracker::machine::network_interface(
            net.tap_name().unwrap(),
        )],
        guest_net: Some(nova_runtime::network::guest_net(&net)),
    };
    machine.configure(&mut api).await.unwrap();
    api.instance_start().await.unwrap();

    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(net.netns_path()).unwrap());
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap(),
        std::path::PathBuf::from(format!("net:[{inode}]")),
        "Firecracker runs in the sandbox's namespace"
    );
    let holds_tap = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
        .any(|info| info.lines().any(|l| l == "iff:\ttap0"));
    assert!(holds_tap, "Firecracker holds a queue of tap0");
    let config: serde_json::Value = api.get("/vm/config").await.unwrap();
    assert_eq!(
        config["network-interfaces"][0]["host_dev_name"], "tap0",
        "{config}"
    );
    assert!(
        config["boot-source"]["boot_args"]
            .as_str()
            .unwrap()
            .contains("nova.net=169.254.0.21/30,gw=169.254.0.22"),
        "{config}"
    );

    vmm.kill().await;
    net.teardown().await.unwrap();
    assert!(!net.netns_path().exists(), "the namespace is gone");
}

/// A networked Firecracker sandbox that fails to boot (the test guest has
/// no agent) leaves no namespace, veth or nft table behind, and a published
/// port is no longer refused. Needs root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_networked_create_leaves_no_network_behind() {
    let test = "a_failed_networked_create_leaves_no_network_behind";
    let Some(fc) = common::firecracker(test) else {
        return;
    };
    if !networking(test) {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    common::install_test_template(home.path(), "fctest");
    let mut options = FirecrackerOptions::new(NovaHome::at(home.path()), fc);
    options.jailer = None;
    options.allow_non_hardware_kvm = true;
    options.scratch_size_mb = 64;
    let hv = FirecrackerHypervisor::new(options);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = test_config("fctest");
    config.boot_timeout_ms = 1500;
    config.ports = vec![nova_core::network::PortSpec::tcp(port, 80)];
    // The sandbox's id, read from its directory while it boots.
    let sandboxes = home.path().join("sandboxes");
    let watcher = tokio::spawn(async move {
        loop {
            if let Some(Ok(entry)) = std::fs::read_dir(&sandboxes)
                .ok()
                .and_then(|mut d| d.next())
            {
                return entry.file_name().to_string_lossy().into_owned();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let err = hv.create_sandbox(config).await.unwrap_err();
    assert!(
        matches!(err, CreateSandboxError::BootTimeout { .. }),
        "{err:?}"
    );
    let id = tokio::time::timeout(Duration::from_secs(1), watcher)
        .await
        .expect("the sandbox had a directory")
        .unwrap();
    let name = format!("nova-{id}");
    assert!(!nova_net::testing::namespaces().unwrap().contains(&name));
    assert!(
        !nova_net::testing::host_nft_tables()
            .unwrap()
            .contains(&name)
    );
    let veth = nova_net::host_veth_name(&id);
    assert!(
        !nova_net::testing::sandbox_veths()
            .await
            .unwrap()
            .iter()
            .any(|(v, _)| *v == veth)
    );
    std::net::TcpListener::bind(("0.0.0.0", port)).expect("the published port is free again");
    assert!(common::leftovers(home.path()).is_empty());
}

/// Networking with the agent: a guest reaches a test host through NAT and
/// serves a published port the host fetches at `127.0.0.1`. Needs hardware
/// KVM (`NOVA_TEST_KVM=1`), root, and the `python` template (or
/// `NOVA_TEST_TEMPLATE`, with `curl` and `python3`) in `$NOVA_HOME`.
/// Traffic goes only to loopback and to a test host in 198.18.221.0/30.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn networking_on_hardware_kvm() {
    let test = "networking_on_hardware_kvm";
    let Some(fc) = common::firecracker(test) else {
        return;
    };
    if std::env::var_os("NOVA_TEST_KVM").is_none_or(|v| v != "1") {
        println!("SKIP {test}: NOVA_TEST_KVM=1 not set");
        return;
    }
    if !networking(test) {
        return;
    }
    let pid = std::process::id();
    let host = nova_net::testing::TestHost::create(
        &format!("nvf{pid}-up"),
        &format!("nvfu{}", pid % 100_000),
        "198.18.221.0/30".parse().unwrap(),
    )
    .await
    .unwrap();
    let server = nova_net::testing::serve_http(
        Some(host.netns()),
        std::net::SocketAddrV4::new(host.addr(), 8080),
        b"through NAT\n".to_vec(),
    )
    .await
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let home = NovaHome::resolve().unwrap();
    let template = std::env::var("NOVA_TEST_TEMPLATE").unwrap_or_else(|_| "python".into());
    let hv = FirecrackerHypervisor::new(FirecrackerOptions::new(home, fc));
    let mut config = SandboxConfig::builder()
        .template_id(template)
        .build()
        .unwrap();
    config.ports = vec![nova_core::network::PortSpec::tcp(port, 8000)];
    let sandbox = hv.create_sandbox(config).await.unwrap();
    let out = sandbox
        .execute_command(format!("curl -sS --max-time 10 http://{}/", server.addr()))
        .await
        .unwrap();
    assert_eq!(
        out.stdout_lossy(),
        "through NAT\n",
        "{}",
        out.stderr_lossy()
    );
    let out = sandbox
        .execute_command(
            "mkdir -p /tmp/www && echo served > /tmp/www/index.html && \
             (cd /tmp/www && nohup python3 -m http.server 8000 >/dev/null 2>&1 &)",
        )
        .await
        .unwrap();
    assert!(out.success(), "{}", out.stderr_lossy());
    let url = std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, port);
    let mut body = None;
    for _ in 0..50 {
        if let Ok(b) = nova_net::testing::http_get(None, url, Duration::from_secs(2)).await {
            body = Some(b);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(body.as_deref(), Some(&b"served\n"[..]));
    let stats = sandbox.get_stats().await.unwrap();
    assert!(stats.vmm.net_rx_bytes.unwrap_or(0) > 0);
    let netns = format!("nova-{}", sandbox.id());
    sandbox.stop(false).await.unwrap();
    assert!(!nova_net::testing::namespaces().unwrap().contains(&netns));
}
