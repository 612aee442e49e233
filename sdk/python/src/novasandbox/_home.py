"""Where the daemon lives: ``$NOVA_HOME`` resolved exactly as the Rust code does
(``crates/nova-core/src/home.rs``), and the socket and files under it."""

from __future__ import annotations

import os
from pathlib import Path

SOCKET_FILE = "nova.sock"
TOKEN_FILE = "token"
SERVE_LOG_FILE = "nova-serve.log"


def nova_home() -> Path:
    """``$NOVA_HOME``: the ``NOVA_HOME`` variable when set and not empty (made
    absolute); else ``/var/lib/nova`` for root; else ``$XDG_DATA_HOME/nova``
    (when absolute); else ``~/.local/share/nova``."""
    env = os.environ.get("NOVA_HOME")
    if env:
        return Path(env).absolute()
    if os.geteuid() == 0:
        return Path("/var/lib/nova")
    xdg = os.environ.get("XDG_DATA_HOME")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "nova"
    home = os.environ.get("HOME")
    if not home:
        raise RuntimeError("cannot choose a data directory: set NOVA_HOME (or HOME)")
    return Path(home) / ".local" / "share" / "nova"


def default_socket() -> Path:
    """The daemon's Unix socket, ``$NOVA_HOME/nova.sock``."""
    return nova_home() / SOCKET_FILE
