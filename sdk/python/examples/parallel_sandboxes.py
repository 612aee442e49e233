"""The seed's concurrency example: five sandboxes at once with asyncio.gather.

Run: python examples/parallel_sandboxes.py
"""

import asyncio
import time

from novasandbox.core import Sandbox, SandboxConfig
from novasandbox.providers import detect


async def run_task(sandbox: Sandbox, task_id: int) -> str:
    return await sandbox.execute_command(
        f"python3 -c 'import socket; print(\"task {task_id} on\", socket.gethostname())'"
    )


async def main() -> None:
    hypervisor = detect()
    config = SandboxConfig(template_id="python")

    started = time.perf_counter()
    sandboxes = await asyncio.gather(*(hypervisor.create_sandbox(config) for _ in range(5)))
    print(f"5 sandboxes ready in {(time.perf_counter() - started) * 1000:.0f} ms")

    results = await asyncio.gather(*(run_task(s, i) for i, s in enumerate(sandboxes)))
    for result in results:
        print(result.strip())

    await asyncio.gather(*(s.stop() for s in sandboxes))
    print("all stopped")
    await hypervisor.close()


if __name__ == "__main__":
    asyncio.run(main())
