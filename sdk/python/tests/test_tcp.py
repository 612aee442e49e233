"""NOVA_URL + NOVA_TOKEN: the daemon's TCP listener with a bearer token."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import sandbox_config

from novasandbox.errors import Unauthorized
from novasandbox.providers import detect


async def test_tcp_with_the_token(daemon_home: Path, monkeypatch: pytest.MonkeyPatch):
    url = os.environ["NOVA_TEST_TCP"]
    monkeypatch.setenv("NOVA_URL", url)
    monkeypatch.delenv("NOVA_TOKEN", raising=False)  # read from $NOVA_HOME/token
    async with detect() as hv:
        assert hv.client.where == url
        sandbox = await hv.create_sandbox(sandbox_config())
        try:
            out: list[bytes] = []
            result = await sandbox.run("cat", stdin="over tcp", on_stdout=out.append)
            assert result.stdout == "over tcp"
            assert b"".join(out) == b"over tcp"
        finally:
            await sandbox.stop(force=True)
    monkeypatch.setenv("NOVA_TOKEN", "wrong")
    async with detect() as hv:
        with pytest.raises(Unauthorized):
            await hv.list_sandboxes()
