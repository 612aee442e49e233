"""The seed's monitoring loop: a sandbox's resource use while it works.

Run: python examples/monitoring.py
"""

import asyncio

from novasandbox.core import SandboxConfig
from novasandbox.providers import detect


async def main() -> None:
    hypervisor = detect()
    sandbox = await hypervisor.create_sandbox(SandboxConfig(template_id="python"))

    # Some work to watch: a busy loop for a few seconds, in the background.
    await sandbox.execute_command(
        "setsid python3 -c 'import time; end = time.time() + 3\n"
        "while time.time() < end: pass' >/dev/null 2>&1 &"
    )
    for _ in range(5):
        if not await sandbox.is_running():
            break
        stats = await sandbox.get_stats()
        print(
            f"uptime {sandbox.get_uptime_ms():>6} ms  "
            f"memory {stats.memory_usage_mb:6.1f} MB  "
            f"cpu {stats.cpu_usage_us:>10} us"
        )
        await asyncio.sleep(0.5)

    await sandbox.stop()
    await hypervisor.close()


if __name__ == "__main__":
    asyncio.run(main())
