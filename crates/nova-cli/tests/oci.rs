//! Templates from OCI images and Dockerfiles, end to end (issue 16).
//!
//! The test assembles an OCI image itself as an `oci-layout` directory:
//! layer 1 (gzip) is the host's busybox-static with its applets, a file of
//! known hash and a file that layer 2 (plain tar) deletes with a whiteout;
//! the config sets `Env`, `WorkingDir` and a non-root `User` (a name its
//! `/etc/passwd` lists). It then starts Debian's
//! `docker-registry` on 127.0.0.1 (its own config and storage, its own
//! process group, killed on drop), pushes the image with `skopeo`, and
//! builds templates with `nova template build` from the registry, from a
//! `docker-archive` that skopeo writes and from the layout itself; a
//! sandbox of each shows the file's hash, the deleted file gone, the env,
//! the working directory, and commands running as the image's user unless
//! `--user` says otherwise. The template restored from its snapshot gets
//! the DNS servers of the create (`NOVA_DNS_SERVERS`), not the snapshot's,
//! and its snapshot has the size its manifest records. A Dockerfile
//! (`FROM` the layout, `RUN`, `COPY`, `ENV`, `USER`) gives a template in
//! which the RUN's output and the copied file exist, RUN steps run as the
//! `USER` before them, and commands run as its last `USER`.
//!
//! Needs `docker-registry`, `skopeo` and busybox-static (`make deps`), QEMU
//! and the `minimal` template (`make images`: its agent and the cached
//! kernel are reused); without them the tests fail saying so, or print SKIP
//! with `NOVA_SKIP_VM_TESTS=1`. Each test uses its own `$NOVA_HOME`.

#![allow(clippy::unwrap_used, clippy::print_stdout, reason = "test code")]

use std::io::Write as _;
use std::net::TcpStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use novasandbox::core::NovaHome;
use sha2::{Digest as _, Sha256};

/// Content of the file whose hash the guest must show.
const KNOWN: &[u8] = b"NovaSandbox OCI import test: a file of known hash\n";

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Why this test cannot run here, if it cannot.
fn missing_prerequisite() -> Option<String> {
    for tool in [
        "/usr/bin/docker-registry",
        "/usr/bin/skopeo",
        "/bin/busybox",
    ] {
        if !Path::new(tool).is_file() {
            return Some(format!("{tool} is not installed (make deps)"));
        }
    }
    let templates = NovaHome::resolve().ok()?.templates_dir();
    if !templates.join("minimal/minimal.json").is_file() {
        return Some(format!(
            "no minimal template in {} (make images)",
            templates.display()
        ));
    }
    None
}

/// Whether the test cannot run here: as the other VM tests, a missing
/// prerequisite fails the test with what to install, unless
/// `NOVA_SKIP_VM_TESTS=1`, which makes it print SKIP and return.
fn skip(test: &str) -> bool {
    let Some(why) = missing_prerequisite() else {
        return false;
    };
    if std::env::var_os("NOVA_SKIP_VM_TESTS").is_some_and(|v| v == "1") {
        eprintln!("SKIP {test}: {why} (NOVA_SKIP_VM_TESTS=1)");
        return true;
    }
    panic!("{test}: {why}; or set NOVA_SKIP_VM_TESTS=1 to skip VM tests");
}

/// A private `$NOVA_HOME`: its own templates, the shared kernel cache, and
/// the agent taken from the minimal template.
struct TestHome {
    dir: tempfile::TempDir,
    agent: PathBuf,
}

impl TestHome {
    fn new() -> Self {
        let shared = NovaHome::resolve().unwrap();
        let dir = tempfile::Builder::new()
            .prefix("nova-oci-")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::create_dir_all(dir.path().join("cache")).unwrap();
        std::os::unix::fs::symlink(
            shared.cache_dir().join("kernel"),
            dir.path().join("cache/kernel"),
        )
        .unwrap();
        let agent = dir.path().join("nova-agent");
        let rootfs = shared.templates_dir().join("minimal/rootfs.ext4");
        let out = Command::new("debugfs")
            .arg("-R")
            .arg(format!("dump /sbin/nova-agent {}", agent.display()))
            .arg(&rootfs)
            .output()
            .unwrap();
        assert!(
            agent.is_file(),
            "cannot take the agent from {}: {}",
            rootfs.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir, agent }
    }

    fn nova(&self, args: &[&str]) -> Output {
        self.nova_with(args, &[])
    }

    /// Runs `nova` with `args` and the extra environment `vars`.
    fn nova_with(&self, args: &[&str], vars: &[(&str, &str)]) -> Output {
        let out = Command::new(env!("CARGO_BIN_EXE_nova"))
            .args(args)
            .envs(vars.iter().copied())
            .env("NOVA_HOME", self.dir.path())
            .env("NOVA_AGENT_BIN", &self.agent)
            .env_remove("NOVA_LOG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        println!(
            "$ nova {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn build(&self, id: &str, extra: &[&str]) {
        let mut args = vec!["template", "build", id, "--no-boot-check"];
        args.extend_from_slice(extra);
        let out = self.nova(&args);
        assert!(out.status.success(), "nova template build {id} failed");
    }

    /// Runs a shell line in a sandbox of `template` (with `flags`);
    /// returns its stdout and nova's stderr.
    fn run(&self, template: &str, flags: &[&str], script: &str) -> (String, String) {
        self.run_with(template, flags, script, &[])
    }

    /// [`TestHome::run`] with the extra environment `vars` for `nova`.
    fn run_with(
        &self,
        template: &str,
        flags: &[&str],
        script: &str,
        vars: &[(&str, &str)],
    ) -> (String, String) {
        let mut args = vec!["run", "--template", template];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["--sh", script]);
        let out = self.nova_with(&args, vars);
        assert!(out.status.success(), "nova run in {template} failed");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// Builds a tar stream entry by entry.
struct TarBuilder(tar::Builder<Vec<u8>>);

impl TarBuilder {
    fn new() -> Self {
        Self(tar::Builder::new(Vec::new()))
    }
    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(size);
        h
    }
    fn dir(mut self, path: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, 0o755, 0);
        self.0.append_data(&mut h, path, &[][..]).unwrap();
        self
    }
    fn file(mut self, path: &str, mode: u32, data: &[u8]) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }
    fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }
    fn finish(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

/// Writes a blob into the layout; returns its descriptor JSON.
fn blob(layout: &Path, media_type: &str, bytes: &[u8]) -> serde_json::Value {
    let hex = sha256_hex(bytes);
    std::fs::write(layout.join("blobs/sha256").join(&hex), bytes).unwrap();
    serde_json::json!({ "mediaType": media_type, "digest": format!("sha256:{hex}"), "size": bytes.len() })
}

/// Assembles the test image as an OCI layout in `layout` (tag `1`).
fn assemble_image(layout: &Path) {
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let applets = Command::new("/bin/busybox").arg("--list").output().unwrap();
    let mut layer1 = TarBuilder::new()
        .dir("bin/")
        .file("bin/busybox", 0o755, &busybox);
    for applet in String::from_utf8_lossy(&applets.stdout).split_whitespace() {
        if applet != "busybox" {
            layer1 = layer1.symlink(&format!("bin/{applet}"), "busybox");
        }
    }
    let layer1 = layer1
        .dir("etc/")
        .file(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:App:/home/app:/bin/sh\n",
        )
        .file("etc/group", 0o644, b"root:x:0:\napp:x:1001:\n")
        .dir("data/")
        .file("data/known.bin", 0o644, KNOWN)
        .file("data/deleted.txt", 0o644, b"layer 2 deletes me\n")
        .finish();
    let layer2 = TarBuilder::new()
        .file("data/.wh.deleted.txt", 0o644, b"")
        .file("data/layer2.txt", 0o644, b"from layer 2\n")
        .finish();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&layer1).unwrap();
    let layer1_gz = gz.finish().unwrap();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "NOVA_OCI_TEST=hello-from-the-image"],
            "WorkingDir": "/data",
            "User": "app",
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo \"default=$(id -u) $(pwd) $NOVA_OCI_TEST\""]
        },
        "rootfs": {
            "type": "layers",
            "diff_ids": [format!("sha256:{}", sha256_hex(&layer1)), format!("sha256:{}", sha256_hex(&layer2))]
        }
    });
    let config = serde_json::to_vec(&config).unwrap();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": blob(layout, "application/vnd.oci.image.config.v1+json", &config),
        "layers": [
            blob(layout, "application/vnd.oci.image.layer.v1.tar+gzip", &layer1_gz),
            blob(layout, "application/vnd.oci.image.layer.v1.tar", &layer2),
        ]
    });
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let mut descriptor = blob(
        layout,
        "application/vnd.oci.image.manifest.v1+json",
        &manifest,
    );
    descriptor["annotations"] = serde_json::json!({ "org.opencontainers.image.ref.name": "1" });
    let index = serde_json::json!({ "schemaVersion": 2, "manifests": [descriptor] });
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
}

/// A distribution registry on 127.0.0.1, in its own process group,
/// killed on drop.
struct Registry {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("storage").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap();
        let mut registry = Self {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            if let Ok(Some(status)) = registry.child.try_wait() {
                panic!("docker-registry exited at start: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen on {port} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let pgid = self.child.id() as i32;
        // SAFETY: killpg on the process group this test created for the
        // registry (process_group(0) made its pid the group id).
        unsafe {
            libc::killpg(pgid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

fn skopeo(args: &[&str]) {
    let out = Command::new("/usr/bin/skopeo")
        .args(["--insecure-policy"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What every template built from the test image must show; `flags` go
/// to `nova run`. Returns nova's stderr.
fn check_image_template(home: &TestHome, id: &str, flags: &[&str]) -> String {
    let (out, err) = home.run(
        id,
        flags,
        "busybox sha256sum /data/known.bin; ls /data; echo \"env=$NOVA_OCI_TEST\"; echo \"cwd=$(pwd)\"; test -x /sbin/nova-agent && echo agent-ok",
    );
    assert!(
        out.contains(&sha256_hex(KNOWN)),
        "{id}: the known file's hash is missing: {out}"
    );
    assert!(
        !out.contains("deleted.txt"),
        "{id}: the whiteout did not delete: {out}"
    );
    assert!(
        out.contains("layer2.txt"),
        "{id}: layer 2 is missing: {out}"
    );
    assert!(
        out.contains("env=hello-from-the-image"),
        "{id}: the image's Env is not a default: {out}"
    );
    assert!(
        out.contains("cwd=/data"),
        "{id}: the image's WorkingDir is not the default: {out}"
    );
    assert!(out.contains("agent-ok"), "{id}: no agent: {out}");
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(home.dir.path().join(format!("templates/{id}/{id}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["exec_defaults"]["cwd"], "/data");
    assert_eq!(manifest["exec_defaults"]["entrypoint"][0], "/bin/sh");
    assert!(
        manifest["exec_defaults"]["cmd"][0]
            .as_str()
            .unwrap()
            .starts_with("echo")
    );
    // No command: the image's Entrypoint + Cmd, as its user, in its
    // WorkingDir, with its Env (as `docker run IMAGE`).
    let mut args = vec!["run", "--template", id];
    args.extend_from_slice(flags);
    let out = home.nova(&args);
    assert!(
        out.status.success(),
        "{id}: nova run without a command failed"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "default=1000 /data hello-from-the-image",
        "{id}: not the image's default command"
    );
    assert_eq!(manifest["exec_defaults"]["user"], "1000:1001");
    check_users(home, id, flags, "1000 1001 /home/app app");
    err
}

/// Commands in a sandbox of `id` run as `default` (`uid gid HOME USER`),
/// and as root with `--user 0` and `-u root`.
fn check_users(home: &TestHome, id: &str, flags: &[&str], default: &str) {
    let show = "echo \"$(id -u) $(id -g) $HOME $USER\"";
    let (out, _) = home.run(id, flags, show);
    assert_eq!(out.trim(), default, "{id}: not the image's user");
    for user in [["--user", "0"], ["-u", "root"]] {
        let mut with = flags.to_vec();
        with.extend_from_slice(&user);
        let (out, _) = home.run(id, &with, show);
        assert_eq!(out.trim(), "0 0 /root root", "{id} with {user:?}");
    }
}

#[test]
fn templates_from_a_registry_a_docker_archive_and_an_oci_layout() {
    let test = "templates_from_a_registry_a_docker_archive_and_an_oci_layout";
    if skip(test) {
        return;
    }
    let home = TestHome::new();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    assemble_image(&layout);
    let registry = Registry::start();
    let reference = format!("127.0.0.1:{}/test:1", registry.port);
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:1", layout.display()),
        &format!("docker://{reference}"),
    ]);
    let archive = work.path().join("image.tar");
    skopeo(&[
        "copy",
        &format!("oci:{}:1", layout.display()),
        &format!("docker-archive:{}:test:1", archive.display()),
    ]);

    home.build("from-registry", &["--no-snapshot", "--from", &reference]);
    check_image_template(&home, "from-registry", &["--memory", "256", "--no-network"]);
    // The layers are cached by digest.
    let blobs = home.dir.path().join("cache/oci/blobs/sha256");
    assert!(std::fs::read_dir(&blobs).unwrap().count() >= 3);

    home.build(
        "from-archive",
        &[
            "--no-snapshot",
            "--from",
            &format!("docker-archive:{}", archive.display()),
        ],
    );
    check_image_template(&home, "from-archive", &["--memory", "256", "--no-network"]);

    // With the template's snapshot (as a build takes by default): a
    // default create restores it, and the image's defaults still apply.
    home.build(
        "from-layout",
        &["--from", &format!("oci-layout:{}", layout.display())],
    );
    let err = check_image_template(&home, "from-layout", &[]);
    assert!(
        err.contains("restored from the template's snapshot"),
        "the snapshot was not used: {err}"
    );
    // The snapshot was taken at the size the manifest records.
    let dir = home.dir.path().join("templates/from-layout");
    let read = |path: PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    };
    let manifest = read(dir.join("from-layout.json"));
    let snapshot = read(dir.join("snapshot/snapshot.json"));
    assert_eq!(
        (&manifest["memory_mb"], &manifest["vcpus"]),
        (
            &snapshot["config"]["memory_mb"],
            &snapshot["config"]["vcpus"]
        ),
        "manifest {manifest} vs snapshot {snapshot}"
    );
    // A restore gets the DNS servers a cold boot would get now, not the
    // snapshot's (no DNS traffic: 198.18.0.0/15 is a test range).
    let (resolv, err) = home.run_with(
        "from-layout",
        &[],
        "cat /etc/resolv.conf",
        &[("NOVA_DNS_SERVERS", "198.18.0.53,198.18.0.54")],
    );
    assert!(
        err.contains("restored from the template's snapshot"),
        "the snapshot was not used: {err}"
    );
    let servers: Vec<&str> = resolv
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver "))
        .collect();
    assert_eq!(servers, ["198.18.0.53", "198.18.0.54"], "{resolv}");
    drop(registry);
}

#[test]
fn a_dockerfile_with_from_run_copy_and_env() {
    let test = "a_dockerfile_with_from_run_copy_and_env";
    if skip(test) {
        return;
    }
    let home = TestHome::new();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    assemble_image(&layout);
    let context = work.path().join("context");
    std::fs::create_dir_all(&context).unwrap();
    std::fs::write(context.join("hello.txt"), b"copied from the context\n").unwrap();
    let dockerfile = context.join("Dockerfile");
    std::fs::write(
        &dockerfile,
        format!(
            "FROM oci-layout:{}\n\
             USER root\n\
             ENV GREETING=hi-from-env\n\
             RUN echo \"built with $GREETING\" > /data/run.txt && mkdir -p /opt/made\n\
             COPY hello.txt /data/copied.txt\n\
             WORKDIR /opt/made\n\
             RUN pwd > here.txt\n\
             USER app\n\
             RUN echo \"run-as=$(id -u):$(id -g)\"\n",
            layout.display()
        ),
    )
    .unwrap();
    let out = home.nova(&[
        "template",
        "build",
        "from-dockerfile",
        "--no-snapshot",
        "--no-boot-check",
        "-f",
        dockerfile.to_str().unwrap(),
        context.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "the Dockerfile build failed");
    let progress = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(progress.contains("[4/9] line 4: RUN"), "{progress}");
    // RUN steps run as the stage's USER: root (USER root over the image's
    // app) until `USER app`.
    assert!(progress.contains("run-as=1000:1001"), "{progress}");
    let (shown, _) = home.run(
        "from-dockerfile",
        &["--memory", "256", "--no-network"],
        "cat /data/run.txt /data/copied.txt /opt/made/here.txt; echo \"env=$GREETING\"; pwd; ls /data",
    );
    assert!(shown.contains("built with hi-from-env"), "{shown}");
    assert!(shown.contains("copied from the context"), "{shown}");
    assert!(shown.contains("env=hi-from-env"), "{shown}");
    assert!(shown.lines().any(|l| l == "/opt/made"), "{shown}");
    assert!(!shown.contains("deleted.txt"), "{shown}");
    check_users(
        &home,
        "from-dockerfile",
        &["--memory", "256", "--no-network"],
        "1000 1001 /home/app app",
    );

    // FROM a template whose default user is not root: its files (some only
    // root may read) are still exported whole.
    let second = context.join("Dockerfile.second");
    std::fs::write(
        &second,
        "FROM from-dockerfile
USER root
RUN echo second-stage > /data/second.txt
",
    )
    .unwrap();
    let out = home.nova(&[
        "template",
        "build",
        "from-template",
        "--no-snapshot",
        "--no-boot-check",
        "-f",
        second.to_str().unwrap(),
        context.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "the build FROM a non-root template failed"
    );
    let (shown, _) = home.run(
        "from-template",
        &["--memory", "256", "--no-network"],
        "cat /data/second.txt /data/run.txt",
    );
    assert_eq!(shown, "second-stage\nbuilt with hi-from-env\n");

    // A RUN that fails fails the build, naming its line and the exit code,
    // with its output shown; its sandbox is stopped.
    let failing = context.join("Dockerfile.fails");
    std::fs::write(
        &failing,
        format!(
            "FROM oci-layout:{}\nRUN echo about-to-fail && exit 3\n",
            layout.display()
        ),
    )
    .unwrap();
    let out = home.nova(&[
        "template",
        "build",
        "never",
        "--no-snapshot",
        "--no-boot-check",
        "-f",
        failing.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("about-to-fail"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 2") && err.contains("exit code 3"),
        "{err}"
    );
    assert!(!home.dir.path().join("templates/never").exists());

    // The build's stage templates are gone.
    let left: Vec<_> = std::fs::read_dir(home.dir.path().join("templates"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("nova-build-"))
        .collect();
    assert!(left.is_empty(), "stage templates left behind: {left:?}");
    let sandboxes = home.dir.path().join("sandboxes");
    let live = std::fs::read_dir(&sandboxes).map_or(0, |d| d.count());
    assert_eq!(live, 0, "build sandboxes left behind");
}
