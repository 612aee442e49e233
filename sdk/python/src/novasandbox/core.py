"""The seed's core types: :class:`SandboxConfig`, :class:`SandboxState`,
:class:`Sandbox`, :class:`BaseHypervisor`, plus :class:`ExecResult`,
:class:`SandboxStats` and the file types.

```text
hypervisor = FirecrackerHypervisor() | QemuHypervisor() | detect()   (providers.py)
  .create_sandbox(config) --POST /v1/sandboxes--> Sandbox(sandbox_id, metadata)
Sandbox.execute_command(cmd) / run(...)  --POST .../exec  (or WebSocket .../exec/stream)
Sandbox.get_stats / pause / resume / stop --GET .../stats, POST .../pause|resume|stop
Sandbox.read_file / write_file / list_files / stat / mkdir / remove  --.../files[...]
BaseHypervisor.start_sandbox / stop_sandbox / ... (id)  --the same routes, by id
```

A :class:`Sandbox` is a handle: every call is one request to the daemon,
which owns the VM. Handles are cheap; two handles for one id see the same
sandbox.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import json
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import IO, Any, Literal, TypeAlias

from novasandbox._client import DaemonClient
from novasandbox.errors import (
    AgentError,
    CommandTimeout,
    InvalidConfig,
    NotRunning,
    SandboxNotFound,
    error_from_problem,
)

__all__ = [
    "DEFAULT_BOOT_TIMEOUT_MS",
    "DEFAULT_GUEST_PORT",
    "DEFAULT_KERNEL_ARGS",
    "DEFAULT_MEMORY_MB",
    "DEFAULT_TEMPLATE",
    "DEFAULT_VCPUS",
    "BaseHypervisor",
    "DirEntry",
    "DriveConfig",
    "ExecResult",
    "FileStat",
    "OutputCallback",
    "Sandbox",
    "SandboxConfig",
    "SandboxState",
    "SandboxStats",
]

# The seed's defaults, as crates/nova-core/src/config.rs has them.
DEFAULT_TEMPLATE = "python"
DEFAULT_MEMORY_MB = 512
DEFAULT_VCPUS = 2
DEFAULT_BOOT_TIMEOUT_MS = 5_000
DEFAULT_GUEST_PORT = 8080
DEFAULT_KERNEL_ARGS = (
    "reboot=k panic=1 pci=off i8042.noaux i8042.nomux "
    "i8042.dumbkbd i8042.nopnp random.trust_cpu=on tsc=reliable quiet"
)
MIN_BOOT_TIMEOUT_MS = 100
MAX_BOOT_TIMEOUT_MS = 600_000

StartMode: TypeAlias = Literal["auto", "snapshot", "cold"]
#: An output callback: called with each chunk of output as it arrives; may
#: be a plain function or a coroutine function.
OutputCallback: TypeAlias = Callable[[bytes], "Awaitable[None] | None"]
#: What :meth:`Sandbox.write_file` accepts.
FileData: TypeAlias = "bytes | bytearray | memoryview | str | AsyncIterable[bytes] | IO[bytes]"

_UPLOAD_CHUNK = 1024 * 1024
_STDOUT_TAG = 1
_STDERR_TAG = 2


@dataclass(frozen=True)
class DriveConfig:
    """An extra block device (a host image). Daemon-controlled: callers of
    the daemon name volumes its policy offers instead; see
    :class:`SandboxConfig`."""

    path: str
    read_only: bool = False


@dataclass
class SandboxConfig:
    """What a caller asks for when creating a sandbox: the seed's fields with
    the seed's defaults (``crates/nova-core/src/config.rs``).

    Sent to the daemon (``POST /v1/sandboxes``): ``template_id``,
    ``memory_mb``, ``vcpus``, ``enable_network``, ``host_port`` /
    ``guest_port`` (one published port), ``labels``, ``env``, ``start``, and
    ``timeout_secs`` (the sandbox's lifetime; ``None`` takes the daemon
    policy's default, 300 s out of the box).

    Controlled by the daemon, because the HTTP API does not take them from
    callers (the operator's policy decides what reaches the host):

    - ``boot_timeout_ms``: **ignored**; the daemon applies its own boot
      timeout. Checked only for its range (100..=600000), like the Rust
      config.
    - ``kernel_args``, ``rootfs_path``, ``extra_drives``,
      ``read_only_rootfs``: **refused** with :class:`InvalidConfig` when set
      to anything but their default, since the sandbox could not honour
      them. Use a template (``nova template build``) for a different root
      file system, and the policy's named volumes for extra disks.
    """

    template_id: str = DEFAULT_TEMPLATE
    memory_mb: int = DEFAULT_MEMORY_MB
    vcpus: int = DEFAULT_VCPUS
    boot_timeout_ms: int = DEFAULT_BOOT_TIMEOUT_MS
    kernel_args: str = DEFAULT_KERNEL_ARGS
    enable_network: bool = True
    host_port: int | None = None
    guest_port: int = DEFAULT_GUEST_PORT
    rootfs_path: str | None = None
    extra_drives: list[DriveConfig] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    read_only_rootfs: bool = False
    env: dict[str, str] = field(default_factory=dict)
    start: StartMode = "auto"
    timeout_secs: int | None = None

    def to_request(self) -> dict[str, Any]:
        """The ``POST /v1/sandboxes`` body; raises :class:`InvalidConfig` for
        a daemon-controlled field set to what the daemon cannot honour."""
        refused = []
        if self.kernel_args != DEFAULT_KERNEL_ARGS:
            refused.append("kernel_args")
        if self.rootfs_path is not None:
            refused.append("rootfs_path")
        if self.extra_drives:
            refused.append("extra_drives")
        if self.read_only_rootfs:
            refused.append("read_only_rootfs")
        if refused:
            raise InvalidConfig(
                f"{', '.join(refused)}: the daemon does not take "
                f"{'this field' if len(refused) == 1 else 'these fields'} from callers; "
                "use a template for another root file system and the policy's volumes "
                "for extra disks, or leave the default"
            )
        if not MIN_BOOT_TIMEOUT_MS <= self.boot_timeout_ms <= MAX_BOOT_TIMEOUT_MS:
            raise InvalidConfig(
                f"boot_timeout_ms = {self.boot_timeout_ms} is out of range: use "
                f"{MIN_BOOT_TIMEOUT_MS}..={MAX_BOOT_TIMEOUT_MS}"
            )
        if self.start not in ("auto", "snapshot", "cold"):
            raise InvalidConfig(f"start = {self.start!r}: use 'auto', 'snapshot' or 'cold'")
        body: dict[str, Any] = {
            "template": self.template_id,
            "memory_mb": self.memory_mb,
            "vcpus": self.vcpus,
            "network": self.enable_network,
            "start": self.start,
        }
        if self.host_port is not None:
            if not self.enable_network:
                raise InvalidConfig(f"host_port = {self.host_port} needs enable_network = True")
            body["ports"] = [{"host_port": self.host_port, "guest_port": self.guest_port}]
        if self.labels:
            body["labels"] = dict(self.labels)
        if self.env:
            body["env"] = dict(self.env)
        if self.timeout_secs is not None:
            body["timeout_secs"] = self.timeout_secs
        return body


class SandboxState(str, enum.Enum):
    """Where a sandbox is in its life (the daemon's ``state``)."""

    CREATING = "creating"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"

    @property
    def is_live(self) -> bool:
        """Whether a VMM runs it (running or paused, or on the way)."""
        return self in (SandboxState.CREATING, SandboxState.RUNNING, SandboxState.PAUSED)


@dataclass(frozen=True)
class ExecResult:
    """A finished command.

    ``exit_code`` is what a shell reports: the code, 128 + signal, 124 when
    its ``timeout`` expired (``timed_out`` is then true), 127 / 126 when it
    could not start (``kind == "not_started"``, the reason in ``stderr``).
    """

    exit_code: int
    stdout: str
    stderr: str
    duration_ms: float
    kind: str = "exited"
    signal: int | None = None
    exec_id: int | None = None

    @property
    def timed_out(self) -> bool:
        """Its timeout expired and it was killed."""
        return self.kind == "timed_out"

    @property
    def ok(self) -> bool:
        """It exited with code 0."""
        return self.exit_code == 0


@dataclass(frozen=True)
class SandboxStats:
    """A sandbox's resource usage now. Readable as attributes or, as a dict,
    ``stats["memory_usage_mb"]``."""

    memory_usage_mb: float
    memory_limit_mb: int
    cpu_usage_us: int
    uptime_ms: int
    vmm_rss_bytes: int
    net_rx_bytes: int | None = None
    net_tx_bytes: int | None = None
    process_count: int | None = None
    disk_used_bytes: int | None = None
    load_avg_1m: float | None = None

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def keys(self) -> list[str]:
        """The field names (so ``dict(stats)`` works)."""
        return [f.name for f in fields(self)]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SandboxStats:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class FileStat:
    """Metadata of a guest path (links followed). ``kind`` is ``file``,
    ``dir``, ``symlink`` or ``other``; ``mode`` the permission bits."""

    kind: str
    size: int
    mode: int
    uid: int
    gid: int
    modified_ms: int

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"

    @property
    def is_file(self) -> bool:
        return self.kind == "file"


@dataclass(frozen=True)
class DirEntry:
    """One entry of :meth:`Sandbox.list_files` (links not followed)."""

    name: str
    kind: str
    size: int
    mode: int
    path: str = ""

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"


def _command_body(
    cmd: str | Sequence[str],
    *,
    env: dict[str, str] | None,
    cwd: str | None,
    timeout: float | None,
    stdin: str | bytes | None,
    user: str | int | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"shell": cmd} if isinstance(cmd, str) else {"cmd": list(cmd)}
    if env:
        body["env"] = dict(env)
    if cwd is not None:
        body["cwd"] = cwd
    if user is not None:
        body["user"] = str(user)
    if timeout is not None:
        if timeout <= 0:
            raise ValueError(f"timeout = {timeout}: give seconds above 0")
        body["timeout_ms"] = max(1, round(timeout * 1000))
    if stdin is not None:
        # The JSON body carries text; bytes that are not UTF-8 go over the stream.
        body["stdin"] = stdin.decode() if isinstance(stdin, bytes) else stdin
    return body


def _result(data: dict[str, Any], *, exec_id: int | None = None) -> ExecResult:
    return ExecResult(
        exit_code=int(data["exit_code"]),
        stdout=str(data.get("stdout", "")),
        stderr=str(data.get("stderr", "")),
        duration_ms=float(data.get("duration_ms", 0)),
        kind=str(data.get("kind", "exited")),
        signal=data.get("signal"),
        exec_id=exec_id,
    )


async def _call(callback: OutputCallback | None, chunk: bytes) -> None:
    if callback is None:
        return
    outcome = callback(chunk)
    if inspect.isawaitable(outcome):
        await outcome


async def _chunks(data: FileData) -> AsyncIterator[bytes]:
    """The upload body as chunks: async iterables as they come, file objects
    read a chunk at a time (in a thread, so the loop is never blocked)."""
    if isinstance(data, AsyncIterable):
        async for chunk in data:
            yield bytes(chunk)
        return
    reader = data
    while True:
        chunk = await asyncio.to_thread(reader.read, _UPLOAD_CHUNK)  # type: ignore[union-attr]
        if not chunk:
            return
        yield bytes(chunk)


class Sandbox:
    """A handle to one sandbox the daemon runs.

    ``sandbox_id`` is its id; ``metadata`` the daemon's view of it as a dict
    (``boot_time_ms``, ``restored``, ``template``, ``backend``, ``state``,
    ...), refreshed by :meth:`refresh`.
    """

    def __init__(self, hypervisor: BaseHypervisor, view: dict[str, Any]) -> None:
        self.hypervisor = hypervisor
        self.sandbox_id: str = str(view["id"])
        self.metadata: dict[str, Any] = {}
        self._stopped_uptime_ms: int | None = None
        self._apply(view)

    def __repr__(self) -> str:
        return f"Sandbox({self.sandbox_id!r}, state={self.state.value!r})"

    @property
    def _client(self) -> DaemonClient:
        return self.hypervisor.client

    @property
    def _path(self) -> str:
        return f"/v1/sandboxes/{self.sandbox_id}"

    def _apply(self, view: dict[str, Any]) -> None:
        boot = view.get("boot") or {}
        meta = dict(view)
        meta["boot_time_ms"] = boot.get("boot_time_ms")
        meta["restored"] = boot.get("restored")
        self.metadata = meta

    @property
    def state(self) -> SandboxState:
        """The state when last seen (see :meth:`refresh`)."""
        return SandboxState(self.metadata.get("state", "running"))

    @property
    def template_id(self) -> str:
        return str(self.metadata.get("template", ""))

    async def refresh(self) -> Sandbox:
        """Reloads :attr:`metadata` from the daemon."""
        self._apply(await self._client.get_json(self._path))
        return self

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(force=True)

    # -- lifecycle --------------------------------------------------------

    async def stop(self, force: bool = False) -> None:
        """Stops the sandbox: the guest powers off (or, ``force``, its VMM is
        killed) and every host resource is released. Stopping a stopped
        sandbox is a no-op."""
        uptime = self.get_uptime_ms()
        self._apply(await self._client.post_json(f"{self._path}/stop", force=force))
        self._stopped_uptime_ms = uptime

    async def pause(self, persist: bool = False) -> None:
        """Pauses its vCPUs. With ``persist``, pauses it to disk: its memory,
        VM state and disk are saved under the daemon's data directory and its
        VMM ends, freeing its memory; ``resume`` restores it, also after the
        daemon or the host restarted."""
        self._apply(await self._client.post_json(f"{self._path}/pause", persist=persist))

    async def resume(self) -> None:
        """Resumes a paused sandbox (one paused to disk is restored first)."""
        self._apply(await self._client.post_json(f"{self._path}/resume"))

    async def is_running(self) -> bool:
        """Whether it is running now (asks the daemon)."""
        try:
            await self.refresh()
        except SandboxNotFound:
            return False
        return self.state == SandboxState.RUNNING

    def get_uptime_ms(self) -> int:
        """Milliseconds since it was created (frozen once stopped)."""
        if self._stopped_uptime_ms is not None:
            return self._stopped_uptime_ms
        created = int(self.metadata.get("created_at_ms", 0))
        return max(0, int(time.time() * 1000) - created)

    async def set_timeout(self, timeout_secs: int) -> None:
        """Sets its lifetime to ``timeout_secs`` from now."""
        self._apply(
            await self._client.post_json(f"{self._path}/timeout", {"timeout_secs": timeout_secs})
        )

    async def get_stats(self) -> SandboxStats:
        """Resource usage now: ``memory_usage_mb``, ``cpu_usage_us``, ..."""
        return SandboxStats.from_json(await self._client.get_json(f"{self._path}/stats"))

    async def logs(self, tail_bytes: int = 64 * 1024) -> str:
        """The tail of its console and VMM log."""
        response = await self._client.request(
            "GET", f"{self._path}/logs", params={"tail_bytes": tail_bytes}
        )
        return response.text

    # -- commands ---------------------------------------------------------

    async def execute_command(self, cmd: str, *, timeout: float | None = None) -> str:
        """Runs ``cmd`` with ``/bin/sh -c`` and returns its stdout, as the
        seed does; the exit code is not checked (use :meth:`run` for it).
        Raises :class:`CommandTimeout` when ``timeout`` (seconds) expires."""
        result = await self.run(cmd, timeout=timeout)
        if result.timed_out:
            raise CommandTimeout(
                f"{cmd!r} ran past its timeout of {timeout} s and was killed",
                stdout=result.stdout,
                stderr=result.stderr,
            )
        return result.stdout

    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: str | bytes | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        user: str | int | None = None,
    ) -> ExecResult:
        """Runs a command to completion: ``cmd`` a string runs with
        ``/bin/sh -c``, a sequence is an argv (no shell).

        ``env`` adds environment variables, ``cwd`` sets the working
        directory (default ``/root``), ``timeout`` (seconds) kills the
        command's process group when it expires (the result then has exit
        code 124 and ``timed_out``; no exception), ``stdin`` is written to
        its standard input, which is then closed. ``user`` runs it as that
        user, as ``docker exec -u`` takes it: ``"USER[:GROUP]"``,
        ``"UID[:GID]"`` or a uid (``"root"``, ``0``, ``"1000:1000"``); the
        default is the template's user (its image's ``User``), else root.
        A user the guest does not know ends the command with 126.

        With ``on_stdout`` / ``on_stderr`` the command streams over a
        WebSocket and each callback gets output chunks as they come (the
        result carries the whole output too, decoded as UTF-8 with
        replacement). A command that cannot start is not an error: it ends
        with 127 / 126 as in a shell.
        """
        if on_stdout is None and on_stderr is None and not isinstance(stdin, bytes):
            body = _command_body(cmd, env=env, cwd=cwd, timeout=timeout, stdin=stdin, user=user)
            return _result(await self._client.post_json(f"{self._path}/exec", body))
        return await self._run_streamed(
            cmd,
            env=env,
            cwd=cwd,
            timeout=timeout,
            stdin=stdin,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            user=user,
        )

    async def _run_streamed(
        self,
        cmd: str | Sequence[str],
        *,
        env: dict[str, str] | None,
        cwd: str | None,
        timeout: float | None,
        stdin: str | bytes | None,
        on_stdout: OutputCallback | None,
        on_stderr: OutputCallback | None,
        user: str | int | None,
    ) -> ExecResult:
        body = _command_body(cmd, env=env, cwd=cwd, timeout=timeout, stdin=None, user=user)
        if stdin is not None:
            body["interactive"] = True
        stdout = bytearray()
        stderr = bytearray()
        exec_id: int | None = None
        started_at = time.monotonic()
        async with self._client.websocket(f"{self._path}/exec/stream") as ws:
            await ws.send(json.dumps(body))
            if stdin is not None:
                data = stdin.encode() if isinstance(stdin, str) else stdin
                for i in range(0, len(data), _UPLOAD_CHUNK):
                    await ws.send(data[i : i + _UPLOAD_CHUNK])
                await ws.send(json.dumps({"type": "stdin_eof"}))
            async for message in ws:
                if isinstance(message, bytes):
                    tag, chunk = message[0], message[1:]
                    if tag == _STDOUT_TAG:
                        stdout += chunk
                        await _call(on_stdout, chunk)
                    elif tag == _STDERR_TAG:
                        stderr += chunk
                        await _call(on_stderr, chunk)
                    continue
                event = json.loads(message)
                kind = event.get("event")
                if kind == "started":
                    exec_id = event.get("exec_id")
                elif kind == "error":
                    raise error_from_problem(event, int(event.get("status") or 500))
                elif kind == "exit":
                    event.setdefault("duration_ms", (time.monotonic() - started_at) * 1000)
                    event["stdout"] = stdout.decode("utf-8", "replace")
                    event["stderr"] = stderr.decode("utf-8", "replace")
                    return _result(event, exec_id=exec_id)
        raise AgentError("the exec stream closed before the command's exit", status=502)

    # -- files ------------------------------------------------------------

    async def read_file(self, path: str) -> bytes:
        """The whole guest file ``path``."""
        out = bytearray()
        async for chunk in self.read_file_chunks(path):
            out += chunk
        return bytes(out)

    async def read_file_chunks(self, path: str) -> AsyncIterator[bytes]:
        """The guest file ``path``, chunk by chunk as it downloads."""
        async with self._client.stream("GET", f"{self._path}/files", params={"path": path}) as r:
            async for chunk in r.aiter_bytes():
                yield chunk

    async def write_file(self, path: str, data: FileData, *, mode: int = 0o644) -> int:
        """Creates or replaces the guest file ``path`` with ``data``: bytes or
        text, or streamed from an async iterable of bytes or a binary file
        object. Returns the bytes written."""
        content: bytes | AsyncIterator[bytes]
        if isinstance(data, str):
            content = data.encode()
        elif isinstance(data, (bytes, bytearray, memoryview)):
            content = bytes(data)
        else:
            content = _chunks(data)
        response = await self._client.request(
            "PUT",
            f"{self._path}/files",
            params={"path": path, "mode": format(mode, "o")},
            content=content,
            headers={"content-type": "application/octet-stream"},
        )
        return int(response.json()["bytes"])

    async def list_files(self, path: str = "/") -> list[DirEntry]:
        """The entries of the guest directory ``path``, sorted by name."""
        data = await self._client.get_json(f"{self._path}/files/list", path=path)
        base = path.rstrip("/")
        return [
            DirEntry(
                name=e["name"],
                kind=e["kind"],
                size=int(e["size"]),
                mode=int(e["mode"]),
                path=f"{base}/{e['name']}",
            )
            for e in data["entries"]
        ]

    async def stat(self, path: str) -> FileStat:
        """Metadata of the guest path ``path``."""
        data = await self._client.get_json(f"{self._path}/files/stat", path=path)
        return FileStat(**{f.name: data[f.name] for f in fields(FileStat)})

    async def exists(self, path: str) -> bool:
        """Whether the guest path ``path`` exists."""
        from novasandbox.errors import FileNotFound

        try:
            await self.stat(path)
        except FileNotFound:
            return False
        return True

    async def mkdir(self, path: str, *, mode: int = 0o755) -> None:
        """Makes the guest directory ``path`` and its missing parents."""
        await self._client.post_json(
            f"{self._path}/files/mkdir", {"path": path, "mode": format(mode, "o")}
        )

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        """Removes a guest file or empty directory (``recursive``: a tree)."""
        await self._client.request(
            "DELETE", f"{self._path}/files", params={"path": path, "recursive": recursive}
        )


class BaseHypervisor:
    """A provider of sandboxes: the seed's interface, served by the daemon.

    Subclasses (:mod:`novasandbox.providers`) name the backend they expect;
    this base class takes whatever the daemon runs. Every method is one or
    two requests; the client (``NOVA_URL`` / the default socket) is made on
    first use and closed by :meth:`close` (or ``async with``).
    """

    #: The daemon backend this class drives (``None``: any).
    backend: str | None = None

    def __init__(self, client: DaemonClient | None = None, **client_options: Any) -> None:
        """``client_options`` go to :class:`~novasandbox._client.DaemonClient`
        (``url``, ``token``, ``socket_path``, ``autostart``, ``timeout``)."""
        self.client = client if client is not None else DaemonClient(**client_options)
        self._checked = False

    async def __aenter__(self) -> BaseHypervisor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the connection to the daemon (sandboxes keep running)."""
        await self.client.aclose()

    async def health(self) -> dict[str, Any]:
        """The daemon's ``GET /v1/health``: status, version, backend, ..."""
        data: dict[str, Any] = await self.client.get_json("/v1/health")
        return data

    async def check(self) -> None:
        """Checks, once, that the daemon runs this class's backend; raises
        :class:`~novasandbox.errors.BackendMismatch` otherwise."""
        if self._checked:
            return
        if self.backend is not None:
            from novasandbox.errors import BackendMismatch

            running = str((await self.health()).get("backend", ""))
            if running != self.backend:
                raise BackendMismatch(
                    f"{type(self).__name__} needs a daemon running {self.backend}, but the "
                    f"daemon on {self.client.where} runs {running or 'an unknown backend'}: "
                    f"use novasandbox.providers.detect() to take whatever it runs"
                )
        self._checked = True

    async def create_sandbox(self, config: SandboxConfig | None = None) -> Sandbox:
        """Creates a sandbox and waits until it is ready."""
        config = config if config is not None else SandboxConfig()
        body = config.to_request()
        await self.check()
        return Sandbox(self, await self.client.post_json("/v1/sandboxes", body))

    def sandbox(self, sandbox_id: str) -> Sandbox:
        """A handle to an existing sandbox, without asking the daemon (see
        :meth:`get_sandbox`)."""
        return Sandbox(self, {"id": sandbox_id, "state": "running"})

    async def get_sandbox(self, sandbox_id: str) -> Sandbox:
        """A handle to an existing sandbox, with its metadata."""
        return Sandbox(self, await self.client.get_json(f"/v1/sandboxes/{sandbox_id}"))

    async def list_sandboxes(
        self, *, state: SandboxState | str | None = None, label: str | None = None
    ) -> list[Sandbox]:
        """The daemon's sandboxes (``label``: ``key=value,...`` selector)."""
        params: dict[str, str] = {}
        if state is not None:
            params["state"] = SandboxState(state).value
        if label is not None:
            params["label"] = label
        views = await self.client.get_json("/v1/sandboxes", **params)
        return [Sandbox(self, v) for v in views]

    async def list_templates(self) -> list[dict[str, Any]]:
        """The templates callers may use."""
        data: list[dict[str, Any]] = await self.client.get_json("/v1/templates")
        return data

    async def start_sandbox(self, sandbox_id: str) -> None:
        """Makes a sandbox run: nothing when running, a resume when paused;
        :class:`NotRunning` from any other state."""
        view = await self.client.get_json(f"/v1/sandboxes/{sandbox_id}")
        state = SandboxState(view["state"])
        if state == SandboxState.RUNNING:
            return
        if state == SandboxState.PAUSED:
            await self.resume_sandbox(sandbox_id)
            return
        raise NotRunning(
            f"sandbox {sandbox_id} is {state.value}; only a paused sandbox can be started again",
            status=409,
        )

    async def stop_sandbox(self, sandbox_id: str, force: bool = False) -> None:
        """Stops a sandbox by id."""
        await self.client.post_json(f"/v1/sandboxes/{sandbox_id}/stop", force=force)

    async def delete_sandbox(self, sandbox_id: str, force: bool = False) -> None:
        """Stops a sandbox if it is live and makes the daemon forget it."""
        await self.client.request("DELETE", f"/v1/sandboxes/{sandbox_id}", params={"force": force})

    async def pause_sandbox(self, sandbox_id: str, persist: bool = False) -> None:
        """Pauses a sandbox by id; ``persist``: to disk (see ``Sandbox.pause``)."""
        await self.client.post_json(f"/v1/sandboxes/{sandbox_id}/pause", persist=persist)

    async def resume_sandbox(self, sandbox_id: str) -> None:
        """Resumes a sandbox by id."""
        await self.client.post_json(f"/v1/sandboxes/{sandbox_id}/resume")

    async def get_sandbox_stats(self, sandbox_id: str) -> SandboxStats:
        """A sandbox's resource usage, by id."""
        return SandboxStats.from_json(
            await self.client.get_json(f"/v1/sandboxes/{sandbox_id}/stats")
        )

    async def execute_command(self, sandbox_id: str, cmd: str) -> str:
        """Runs ``cmd`` in a sandbox by id; its stdout."""
        return await self.sandbox(sandbox_id).execute_command(cmd)
