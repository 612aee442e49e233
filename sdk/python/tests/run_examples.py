"""Runs the seed's examples as a user would, against real sandboxes (`make sdk-test`).

Each example runs as its own process with a fresh NOVA_HOME (templates linked
from the installed ones) and no daemon: the first one starts `nova serve`
itself, as a user's would. Afterwards every sandbox is deleted, that daemon
stopped, and a leftover VMM is an error.

Usage: python tests/run_examples.py [EXAMPLE.py ...]   (NOVA_BIN: the binary)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conftest import make_home, nova_bin, shutdown_home

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def daemon_pid(home: Path) -> int | None:
    """The `nova serve` whose NOVA_HOME is `home`."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in cmdline and f"NOVA_HOME={home}".encode() in environ:
            return int(proc.name)
    return None


def main() -> int:
    binary = nova_bin()
    if binary is None:
        print("SKIP: no nova binary (set NOVA_BIN)")
        return 0
    names = sys.argv[1:] or ["basic_usage.py", "parallel_sandboxes.py", "monitoring.py"]
    with tempfile.TemporaryDirectory(prefix="nova-examples-") as tmp:
        home = make_home(Path(tmp) / "home")
        env = dict(os.environ, NOVA_HOME=str(home), NOVA_BIN=binary, NOVA_AUTOSTART="1")
        env.pop("NOVA_URL", None)
        failed = []
        try:
            for name in names:
                print(f"--- examples/{name}", flush=True)
                started = time.monotonic()
                code = subprocess.call([sys.executable, str(EXAMPLES / name)], env=env)
                print(f"--- examples/{name}: exit {code} in {time.monotonic() - started:.1f} s")
                if code != 0:
                    failed.append(name)
        finally:
            leaked = shutdown_home(home, daemon_pid(home))
        if leaked:
            print(f"FAIL: VMMs left behind: {leaked}")
            return 1
        if failed:
            print(f"FAIL: {', '.join(failed)}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
