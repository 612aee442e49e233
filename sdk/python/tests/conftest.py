"""Fixtures: a real `nova serve` on a temporary NOVA_HOME, and real VMs.

The session's daemon runs with its own NOVA_HOME (``templates`` a symlink to
the installed templates) and its socket inside it, so it never meets another
engineer's daemon on /var/lib/nova. At the end every sandbox is deleted, the
daemon is stopped, and the session fails if a VMM of that home survived.

Environment:
  NOVA_BIN              the `nova` binary (default: the workspace's target/debug/nova)
  NOVA_TEST_TEMPLATES   installed templates to link (default /var/lib/nova/templates)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from novasandbox.core import BaseHypervisor, Sandbox, SandboxConfig
from novasandbox.providers import detect

REPO = Path(__file__).resolve().parents[3]
TEMPLATE = "python"


def nova_bin() -> str | None:
    explicit = os.environ.get("NOVA_BIN")
    if explicit:
        return explicit
    for candidate in (
        Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "debug" / "nova",
        REPO / "target" / "debug" / "nova",
    ):
        if candidate.is_file():
            return str(candidate)
    return shutil.which("nova")


def templates_dir() -> Path:
    return Path(os.environ.get("NOVA_TEST_TEMPLATES", "/var/lib/nova/templates"))


def make_home(root: Path) -> Path:
    """A NOVA_HOME whose templates are the installed ones.

    Every directory above it must be traversable by QEMU's unprivileged
    `-runas` user, or snapshot restores fail with "Permission denied" (QEMU
    re-opens its drives by path on `cont` after the drop): pytest's and
    mkdtemp's 0700 directories are opened up here.
    """
    root.mkdir(parents=True, exist_ok=True)
    for parent in (root, *root.parents):
        if parent == Path("/tmp") or parent == Path(tempfile.gettempdir()):
            break
        if parent.stat().st_uid == os.getuid():
            parent.chmod(parent.stat().st_mode | 0o755)
    link = root / "templates"
    if not link.exists():
        link.symlink_to(templates_dir())
    return root


def vmm_pids(home: Path) -> list[int]:
    """Processes whose command line names `home` (its sandboxes' VMMs)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if str(home).encode() in cmdline and b"serve" not in cmdline:
            pids.append(int(proc.name))
    return pids


def wait_until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not within {timeout} s")


def healthy(socket: Path) -> bool:
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket)), timeout=2) as c:
            return c.get("http://nova/v1/health").status_code == 200
    except httpx.TransportError:
        return False


def shutdown_home(home: Path, pid: int | None) -> list[int]:
    """Deletes every sandbox of the daemon on `home`, stops the daemon (pid),
    and kills what VMMs are left; returns those (a leak)."""
    socket = home / "nova.sock"
    if socket.exists():
        with (
            contextlib.suppress(httpx.TransportError),
            httpx.Client(transport=httpx.HTTPTransport(uds=str(socket)), timeout=60) as c,
        ):
            for view in c.get("http://nova/v1/sandboxes").json():
                c.delete(f"http://nova/v1/sandboxes/{view['id']}", params={"force": "true"})
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: not _alive(pid), 15, "daemon exit")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    leaked = vmm_pids(home)
    for leak in leaked:
        with contextlib.suppress(ProcessLookupError):
            os.kill(leak, signal.SIGKILL)
    return leaked


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


@pytest.fixture(scope="session")
def nova_binary() -> str:
    binary = nova_bin()
    if binary is None:
        pytest.skip("SKIP: no nova binary (set NOVA_BIN or `cargo build -p nova-cli`)")
    if not (templates_dir() / TEMPLATE).is_dir():
        pytest.skip(f"SKIP: template {TEMPLATE!r} not installed in {templates_dir()}")
    return binary


@pytest.fixture(scope="session")
def daemon_home(nova_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A running `nova serve` on a temporary NOVA_HOME, which the SDK uses
    (NOVA_HOME set, NOVA_URL unset, auto-start off)."""
    home = make_home(tmp_path_factory.mktemp("home"))
    saved = {
        k: os.environ.get(k) for k in ("NOVA_HOME", "NOVA_URL", "NOVA_AUTOSTART", "NOVA_TEST_TCP")
    }
    env = dict(os.environ, NOVA_HOME=str(home))
    env.pop("NOVA_URL", None)
    log = (home / "nova-serve.log").open("ab")
    port = free_port()
    proc = subprocess.Popen(
        [
            nova_binary,
            "serve",
            "--socket",
            str(home / "nova.sock"),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(lambda: healthy(home / "nova.sock") or proc.poll() is not None, 30, "health")
        if proc.poll() is not None:
            pytest.fail(f"nova serve exited: {(home / 'nova-serve.log').read_text()[-2000:]}")
        os.environ["NOVA_HOME"] = str(home)
        os.environ["NOVA_TEST_TCP"] = f"http://127.0.0.1:{port}"
        os.environ.pop("NOVA_URL", None)
        os.environ["NOVA_AUTOSTART"] = "0"
        yield home
    finally:
        leaked = shutdown_home(home, proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        log.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        assert not leaked, f"VMM processes of {home} survived the daemon: {leaked}"


@pytest.fixture(scope="session")
async def hypervisor(daemon_home: Path) -> AsyncIterator[BaseHypervisor]:
    async with detect() as hv:
        yield hv


def sandbox_config(**overrides: object) -> SandboxConfig:
    """The tests' sandbox: the python template, no network."""
    config = SandboxConfig(template_id=TEMPLATE, enable_network=False)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


@pytest.fixture(scope="session")
async def sandbox(hypervisor: BaseHypervisor) -> AsyncIterator[Sandbox]:
    """One sandbox shared by the tests that do not change its state."""
    sb = await hypervisor.create_sandbox(sandbox_config())
    try:
        yield sb
    finally:
        await sb.stop(force=True)
