"""The seed's providers: one class per backend, each a client of the daemon.

``FirecrackerHypervisor()``, ``QemuHypervisor()`` and ``AppleVZHypervisor()``
ask the daemon which backend it runs (``GET /v1/health`` -> ``backend``) on
first use and raise :class:`~novasandbox.errors.BackendMismatch` when it runs
another one (or :class:`~novasandbox.errors.Unsupported` up front where this
host cannot run that backend at all). :func:`detect` takes whatever the
daemon runs: the daemon itself picks the best backend the host offers
(Firecracker with hardware KVM, else QEMU; Apple VZ on macOS).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from novasandbox._client import DaemonClient
from novasandbox.core import BaseHypervisor
from novasandbox.errors import Unsupported

__all__ = [
    "AppleVZHypervisor",
    "BaseHypervisor",
    "DaemonHypervisor",
    "FirecrackerHypervisor",
    "QemuHypervisor",
    "detect",
]


def _local_daemon() -> bool:
    """Whether the daemon is on this host (the Unix socket, not NOVA_URL)."""
    return not os.environ.get("NOVA_URL")


class DaemonHypervisor(BaseHypervisor):
    """Whatever backend the daemon runs (what :func:`detect` returns)."""

    backend = None


class FirecrackerHypervisor(BaseHypervisor):
    """Sandboxes on Firecracker: a Linux host with hardware KVM."""

    backend = "firecracker"

    def __init__(self, client: DaemonClient | None = None, **client_options: Any) -> None:
        local = client is None and not client_options.get("url") and _local_daemon()
        if local and sys.platform != "linux":
            raise Unsupported(
                f"Firecracker runs on Linux hosts only (this is {sys.platform}); "
                "use AppleVZHypervisor on macOS, or detect()"
            )
        super().__init__(client, **client_options)


class QemuHypervisor(BaseHypervisor):
    """Sandboxes on QEMU (microvm): KVM where it runs, else TCG emulation."""

    backend = "qemu"


class AppleVZHypervisor(BaseHypervisor):
    """Sandboxes on Apple's Virtualization.framework: macOS hosts."""

    backend = "apple-vz"

    def __init__(self, client: DaemonClient | None = None, **client_options: Any) -> None:
        local = client is None and not client_options.get("url") and _local_daemon()
        if local and sys.platform != "darwin":
            raise Unsupported(
                f"Apple Virtualization.framework runs on macOS only (this is {sys.platform}); "
                "use FirecrackerHypervisor or QemuHypervisor on Linux, or detect()"
            )
        super().__init__(client, **client_options)


def detect(client: DaemonClient | None = None, **client_options: Any) -> BaseHypervisor:
    """A provider for whatever backend the daemon runs (no check, no request
    until first use)."""
    return DaemonHypervisor(client, **client_options)
