"""NovaSandbox: microVM sandboxes for AI agents, from Python.

A client of the ``nova serve`` daemon with the seed's API::

    from novasandbox.core import SandboxConfig
    from novasandbox.providers import FirecrackerHypervisor  # or QemuHypervisor, detect()

    hypervisor = FirecrackerHypervisor()
    sandbox = await hypervisor.create_sandbox(SandboxConfig(template_id="python"))
    print(await sandbox.execute_command("python3 -c 'print(6*7)'"))
    await sandbox.stop()

Modules: :mod:`novasandbox.core` (config, sandbox, results),
:mod:`novasandbox.providers` (one class per backend, ``detect()``),
:mod:`novasandbox.errors` (typed exceptions), :mod:`novasandbox.sync`
(blocking wrapper).
"""

from novasandbox._version import __version__
from novasandbox.core import (
    BaseHypervisor,
    ExecResult,
    Sandbox,
    SandboxConfig,
    SandboxState,
    SandboxStats,
)
from novasandbox.errors import NovaError
from novasandbox.providers import detect

__all__ = [
    "BaseHypervisor",
    "ExecResult",
    "NovaError",
    "Sandbox",
    "SandboxConfig",
    "SandboxState",
    "SandboxStats",
    "__version__",
    "detect",
]
