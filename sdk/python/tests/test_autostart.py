"""With no daemon on the default socket, the SDK starts `nova serve` itself."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import TEMPLATE, make_home, shutdown_home, vmm_pids

from novasandbox.core import SandboxConfig
from novasandbox.errors import DaemonUnavailable
from novasandbox.providers import detect


async def test_the_sdk_starts_a_daemon_once_and_says_so(
    nova_binary: str,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
):
    home = make_home(tmp_path_factory.mktemp("autostart"))
    monkeypatch.setenv("NOVA_HOME", str(home))
    monkeypatch.setenv("NOVA_BIN", nova_binary)
    monkeypatch.setenv("NOVA_AUTOSTART", "1")
    monkeypatch.delenv("NOVA_URL", raising=False)
    assert not (home / "nova.sock").exists()
    pid = None
    try:
        with caplog.at_level(logging.INFO, logger="novasandbox"):
            async with detect() as hv:
                sandbox = await hv.create_sandbox(
                    SandboxConfig(template_id=TEMPLATE, enable_network=False)
                )
                pid = hv.client.started_daemon_pid
                assert pid is not None
                assert await sandbox.execute_command("echo auto") == "auto\n"
                await sandbox.stop(force=True)
                # A second client finds the running daemon: no second start.
                async with detect() as again:
                    assert (await again.health())["status"] == "ok"
                    assert again.client.started_daemon_pid is None
        started = [r for r in caplog.records if "started" in r.getMessage()]
        assert len(started) <= 1  # once per process (an earlier test may have said it)
        assert (home / "nova-serve.log").exists()
    finally:
        leaked = shutdown_home(home, pid)
    assert not leaked, f"VMMs of {home} left: {leaked}"
    assert not vmm_pids(home)


async def test_no_binary_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NOVA_HOME", str(tmp_path))
    monkeypatch.setenv("NOVA_BIN", str(tmp_path / "no-such-nova"))
    monkeypatch.setenv("NOVA_AUTOSTART", "1")
    monkeypatch.delenv("NOVA_URL", raising=False)
    async with detect() as hv:
        with pytest.raises(DaemonUnavailable, match="not an executable file"):
            await hv.health()


async def test_not_with_nova_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NOVA_HOME", str(tmp_path))
    monkeypatch.setenv("NOVA_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("NOVA_TOKEN", "x")
    monkeypatch.setenv("NOVA_AUTOSTART", "1")
    async with detect() as hv:
        assert not hv.client.autostart
        with pytest.raises(DaemonUnavailable, match=r"127\.0\.0\.1:9"):
            await hv.health()
    assert not (tmp_path / "nova-serve.log").exists()
