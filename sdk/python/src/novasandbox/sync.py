"""A thin blocking wrapper over the async API, for scripts and notebooks.

```python
from novasandbox.sync import detect
from novasandbox.core import SandboxConfig

with detect() as hv:
    sandbox = hv.create_sandbox(SandboxConfig(template_id="python"))
    print(sandbox.execute_command("python3 -c 'print(6*7)'"))
    sandbox.stop()
```

Each wrapper owns (or shares) one event loop on a background thread; every
call runs the async method there and waits for it. Safe to call from
several threads; not from inside a running event loop's thread (use the
async API there).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from novasandbox import providers
from novasandbox.core import (
    BaseHypervisor,
    DirEntry,
    ExecResult,
    FileStat,
    Sandbox,
    SandboxConfig,
    SandboxStats,
)

__all__ = ["Hypervisor", "SyncSandbox", "detect"]

T = TypeVar("T")


class _LoopThread:
    """An event loop running on a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="novasandbox-sync", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
        if not self.loop.is_running():
            self.loop.close()


class SyncSandbox:
    """The blocking form of :class:`~novasandbox.core.Sandbox`."""

    def __init__(self, runner: _LoopThread, inner: Sandbox) -> None:
        self._run = runner.run
        #: The async handle, for what this wrapper leaves out.
        self.inner = inner

    def __repr__(self) -> str:
        return f"Sync{self.inner!r}"

    @property
    def sandbox_id(self) -> str:
        return self.inner.sandbox_id

    @property
    def metadata(self) -> dict[str, Any]:
        return self.inner.metadata

    def __enter__(self) -> SyncSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(force=True)

    def execute_command(self, cmd: str, *, timeout: float | None = None) -> str:
        return self._run(self.inner.execute_command(cmd, timeout=timeout))

    def run(self, cmd: str | Sequence[str], **options: Any) -> ExecResult:
        """:meth:`Sandbox.run`; callbacks run on the SDK's loop thread."""
        return self._run(self.inner.run(cmd, **options))

    def get_stats(self) -> SandboxStats:
        return self._run(self.inner.get_stats())

    def stop(self, force: bool = False) -> None:
        self._run(self.inner.stop(force=force))

    def pause(self, persist: bool = False) -> None:
        self._run(self.inner.pause(persist=persist))

    def resume(self) -> None:
        self._run(self.inner.resume())

    def is_running(self) -> bool:
        return self._run(self.inner.is_running())

    def get_uptime_ms(self) -> int:
        return self.inner.get_uptime_ms()

    def read_file(self, path: str) -> bytes:
        return self._run(self.inner.read_file(path))

    def write_file(self, path: str, data: Any, *, mode: int = 0o644) -> int:
        return self._run(self.inner.write_file(path, data, mode=mode))

    def list_files(self, path: str = "/") -> list[DirEntry]:
        return self._run(self.inner.list_files(path))

    def stat(self, path: str) -> FileStat:
        return self._run(self.inner.stat(path))

    def mkdir(self, path: str, *, mode: int = 0o755) -> None:
        self._run(self.inner.mkdir(path, mode=mode))

    def remove(self, path: str, *, recursive: bool = False) -> None:
        self._run(self.inner.remove(path, recursive=recursive))


class Hypervisor:
    """The blocking form of a provider: ``Hypervisor()`` takes whatever the
    daemon runs; ``Hypervisor(providers.QemuHypervisor)`` insists on one."""

    def __init__(
        self,
        provider: type[BaseHypervisor] = providers.DaemonHypervisor,
        **client_options: Any,
    ) -> None:
        self._runner = _LoopThread()
        try:
            #: The async provider, for what this wrapper leaves out.
            self.inner = provider(**client_options)
        except BaseException:
            self._runner.stop()
            raise

    def __enter__(self) -> Hypervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the connection and the loop thread (sandboxes keep running)."""
        try:
            self._runner.run(self.inner.close())
        finally:
            self._runner.stop()

    def _wrap(self, sandbox: Sandbox) -> SyncSandbox:
        return SyncSandbox(self._runner, sandbox)

    def health(self) -> dict[str, Any]:
        return self._runner.run(self.inner.health())

    def create_sandbox(self, config: SandboxConfig | None = None) -> SyncSandbox:
        return self._wrap(self._runner.run(self.inner.create_sandbox(config)))

    def get_sandbox(self, sandbox_id: str) -> SyncSandbox:
        return self._wrap(self._runner.run(self.inner.get_sandbox(sandbox_id)))

    def list_sandboxes(self) -> list[SyncSandbox]:
        return [self._wrap(s) for s in self._runner.run(self.inner.list_sandboxes())]

    def start_sandbox(self, sandbox_id: str) -> None:
        self._runner.run(self.inner.start_sandbox(sandbox_id))

    def stop_sandbox(self, sandbox_id: str, force: bool = False) -> None:
        self._runner.run(self.inner.stop_sandbox(sandbox_id, force))

    def pause_sandbox(self, sandbox_id: str, persist: bool = False) -> None:
        self._runner.run(self.inner.pause_sandbox(sandbox_id, persist))

    def resume_sandbox(self, sandbox_id: str) -> None:
        self._runner.run(self.inner.resume_sandbox(sandbox_id))

    def get_sandbox_stats(self, sandbox_id: str) -> SandboxStats:
        return self._runner.run(self.inner.get_sandbox_stats(sandbox_id))


def detect(**client_options: Any) -> Hypervisor:
    """A blocking provider for whatever backend the daemon runs."""
    return Hypervisor(providers.DaemonHypervisor, **client_options)
