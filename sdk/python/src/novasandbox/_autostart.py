"""Starting ``nova serve`` when no daemon answers on the default socket.

The binary is ``$NOVA_BIN``, else ``nova`` on ``PATH``. It runs detached (its
own session, reparented to init, so it outlives this process and its
sandboxes outlive both), with ``NOVA_HOME`` set to the home the SDK resolved
and its output appended to ``$NOVA_HOME/nova-serve.log``. The SDK waits for
``GET /v1/health`` (``NOVA_AUTOSTART_TIMEOUT`` seconds, default 10) and says
so once, in a warning of the ``novasandbox`` logger.

Two processes racing to start one are harmless: the daemon takes a lock on
``$NOVA_HOME``, the loser exits, and both SDKs find the winner's socket.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx

from novasandbox._home import SERVE_LOG_FILE
from novasandbox.errors import DaemonUnavailable

logger = logging.getLogger("novasandbox")

DEFAULT_WAIT_SECS = 10.0
_announced = False


def find_binary() -> str | None:
    """``$NOVA_BIN`` when set, else ``nova`` on ``PATH``."""
    explicit = os.environ.get("NOVA_BIN")
    if explicit:
        return explicit
    return shutil.which("nova")


def _wait_secs() -> float:
    try:
        return float(os.environ.get("NOVA_AUTOSTART_TIMEOUT", DEFAULT_WAIT_SECS))
    except ValueError:
        return DEFAULT_WAIT_SECS


async def _healthy(socket: Path) -> bool:
    transport = httpx.AsyncHTTPTransport(uds=str(socket))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://nova", timeout=2.0, trust_env=False
    ) as client:
        try:
            response = await client.get("/v1/health")
        except httpx.TransportError:
            return False
        return response.status_code == 200


def _log_tail(log: Path, limit: int = 2000) -> str:
    try:
        data = log.read_bytes()[-limit:]
    except OSError:
        return ""
    return data.decode("utf-8", "replace").strip()


async def start_daemon(home: Path, socket: Path) -> int:
    """Starts ``nova serve`` for ``home`` and waits until it answers on
    ``socket``. Returns its pid; raises :class:`DaemonUnavailable` with the
    reason (no binary, it exited, no answer in time) and the log's tail."""
    global _announced
    binary = find_binary()
    if binary is None:
        raise DaemonUnavailable(
            f"no NovaSandbox daemon answers on unix:{socket}, and no `nova` binary was found "
            "to start one: set NOVA_BIN to it, put it on PATH, or run `nova serve`"
        )
    if not _executable(binary):
        raise DaemonUnavailable(
            f"no NovaSandbox daemon answers on unix:{socket}, and cannot start one: "
            f"{binary} (NOVA_BIN) is not an executable file"
        )
    log = home / SERVE_LOG_FILE
    try:
        pid = await asyncio.to_thread(_launch, binary, home, log)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        raise DaemonUnavailable(f"cannot start `{binary} serve` (NOVA_HOME={home}): {e}") from e
    deadline = time.monotonic() + _wait_secs()
    while True:
        if await _healthy(socket):
            break
        if not _alive(pid):
            # Another daemon may have won the race for this home's lock.
            if await _healthy(socket):
                break
            raise DaemonUnavailable(
                f"`{binary} serve` (NOVA_HOME={home}) exited before answering; "
                f"its log {log} ends with:\n{_log_tail(log)}"
            )
        if time.monotonic() > deadline:
            raise DaemonUnavailable(
                f"`{binary} serve` (pid {pid}, NOVA_HOME={home}) did not answer on "
                f"unix:{socket} within {_wait_secs():g} s; its log {log} ends with:\n"
                f"{_log_tail(log)}"
            )
        await asyncio.sleep(0.05)
    if not _announced:
        _announced = True
        logger.warning(
            "no NovaSandbox daemon answered on %s: started `%s serve` (pid %d, NOVA_HOME=%s, "
            "log %s); it keeps running after this program",
            socket,
            binary,
            pid,
            home,
            log,
        )
    return pid


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _launch(binary: str, home: Path, log: Path) -> int:
    """Starts the daemon detached; its pid."""
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["NOVA_HOME"] = str(home)
    # A shell that backgrounds the daemon and exits: the daemon is reparented
    # to init (never our zombie) and lives in the shell's new session.
    script = 'exec 0</dev/null; "$0" serve >>"$1" 2>&1 & echo $!'
    launcher = subprocess.run(
        ["/bin/sh", "-c", script, binary, str(log)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        check=True,
        timeout=10,
    )
    return int(launcher.stdout.strip())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive; /proc tells it apart where there is one.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"
