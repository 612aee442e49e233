"""Benchmark (not a test): ``execute_command("true")`` round trip from Python.

Three figures over the same sandbox, interleaved so that all see the same load:

- ``sdk``: ``await sandbox.execute_command("true")`` through this package;
- ``raw``: the same ``POST /v1/sandboxes/{id}/exec`` with a bare
  ``httpx.AsyncClient`` on the daemon's socket: the floor of any HTTP client,
  i.e. the daemon plus the Rust library plus HTTP;
- ``library``: the ``duration_ms`` the daemon reports for each command, which
  the Rust runtime measures from request to exit (whole milliseconds).

and prints p50 / p99 of each, the SDK's added latency over the raw floor and
over the Rust library, and their ratios. Issue 14's target: under 2 ms added
at p50.

Run: ``python bench/exec_roundtrip.py [-n 100] [--template python]`` (a daemon is
found or started as for any SDK program).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx

from novasandbox.core import SandboxConfig
from novasandbox.providers import detect


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-n", type=int, default=100, help="samples of each (default 100)")
    parser.add_argument("--template", default="python")
    args = parser.parse_args()

    hypervisor = detect()
    sandbox = await hypervisor.create_sandbox(
        SandboxConfig(template_id=args.template, enable_network=False)
    )
    client = hypervisor.client
    if client.url is not None:
        raw = httpx.AsyncClient(base_url=client.url, headers=client._headers(), timeout=None)
    else:
        raw = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(client.socket_path)),
            base_url="http://nova",
            timeout=None,
        )
    path = f"/v1/sandboxes/{sandbox.sandbox_id}/exec"
    sdk_ms: list[float] = []
    raw_ms: list[float] = []
    lib_ms: list[float] = []
    try:
        for _ in range(5):  # warm both connections and the guest's caches
            await sandbox.execute_command("true")
            (await raw.post(path, json={"shell": "true"})).raise_for_status()
        for _ in range(args.n):
            t0 = time.perf_counter()
            await sandbox.execute_command("true")
            sdk_ms.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            response = await raw.post(path, json={"shell": "true"})
            raw_ms.append((time.perf_counter() - t0) * 1000)
            response.raise_for_status()
            lib_ms.append(float(response.json()["duration_ms"]))
    finally:
        await raw.aclose()
        await sandbox.stop(force=True)
        await hypervisor.close()

    backend = (sandbox.metadata or {}).get("backend", "?")
    print(f"execute_command('true') round trip, n={args.n}, backend {backend}, {client.where}")
    print(f"{'':28}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    rows = [
        ("Python SDK", sdk_ms),
        ("raw httpx POST /exec", raw_ms),
        ("Rust library (daemon)", lib_ms),
    ]
    for name, samples in rows:
        print(
            f"{name:28}{percentile(samples, 50):10.2f}{percentile(samples, 99):10.2f}"
            f"{statistics.fmean(samples):10.2f}"
        )
    sdk50, raw50, lib50 = (percentile(s, 50) for _, s in rows)
    print(
        f"SDK over raw HTTP: +{sdk50 - raw50:.2f} ms at p50 (ratio {sdk50 / raw50:.2f}); "
        f"SDK over the Rust library: +{sdk50 - lib50:.2f} ms at p50"
        + (f" (ratio {sdk50 / lib50:.2f})" if lib50 > 0 else "")
        + "; target: under 2 ms added at p50"
    )


if __name__ == "__main__":
    asyncio.run(main())
