"""The blocking wrapper."""

from __future__ import annotations

from pathlib import Path

from conftest import sandbox_config

from novasandbox import sync


def test_sync_wrapper_round_trip(daemon_home: Path):
    with sync.detect() as hv:
        assert hv.health()["status"] == "ok"
        with hv.create_sandbox(sandbox_config()) as sandbox:
            assert sandbox.metadata["boot_time_ms"] > 0
            assert sandbox.execute_command("python3 -c 'print(6*7)'") == "42\n"
            assert sandbox.run("exit 2").exit_code == 2
            sandbox.write_file("/tmp/sync.txt", b"sync")
            assert sandbox.read_file("/tmp/sync.txt") == b"sync"
            assert sandbox.get_stats().memory_usage_mb > 0
            sandbox.pause()
            assert not sandbox.is_running()
            hv.start_sandbox(sandbox.sandbox_id)
            assert sandbox.is_running()
        assert not sandbox.is_running()
