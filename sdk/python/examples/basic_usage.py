"""The seed's basic usage: create a sandbox, run a command, print the boot time, stop.

Run: python examples/basic_usage.py (a daemon is started if none runs).
"""

import asyncio

from novasandbox.core import SandboxConfig
from novasandbox.providers import detect


async def main() -> None:
    # The seed wrote FirecrackerHypervisor(); detect() takes whatever backend
    # this host's daemon runs (FirecrackerHypervisor() insists on Firecracker).
    hypervisor = detect()
    config = SandboxConfig(template_id="python")
    sandbox = await hypervisor.create_sandbox(config)
    print(f"Sandbox {sandbox.sandbox_id} booted in {sandbox.metadata['boot_time_ms']:.0f} ms")

    output = await sandbox.execute_command("python3 -c 'print(6*7)'")
    print(f"Output: {output.strip()}")

    await sandbox.stop(force=False)
    await hypervisor.close()


if __name__ == "__main__":
    asyncio.run(main())
