"""The daemon's problem codes as typed exceptions."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import sandbox_config

from novasandbox.core import BaseHypervisor, Sandbox, SandboxConfig
from novasandbox.errors import (
    BackendMismatch,
    DaemonUnavailable,
    FileNotFound,
    InvalidConfig,
    InvalidPath,
    NovaError,
    SandboxNotFound,
    TemplateNotFound,
    error_from_problem,
    error_from_response,
)
from novasandbox.providers import FirecrackerHypervisor, QemuHypervisor, detect


def test_problem_codes_map_to_classes():
    e = error_from_problem({"code": "quota_exceeded", "detail": "full", "status": 429}, 429)
    assert (type(e).__name__, e.status, e.code, e.detail) == (
        "QuotaExceeded",
        429,
        "quota_exceeded",
        "full",
    )
    unknown = error_from_problem({"code": "brand_new", "detail": "x"}, 418)
    assert type(unknown) is NovaError
    assert unknown.code == "brand_new"
    assert error_from_response(502, b"bad gateway").status == 502


async def test_unknown_sandbox_is_sandbox_not_found(hypervisor: BaseHypervisor):
    with pytest.raises(SandboxNotFound) as caught:
        await hypervisor.get_sandbox_stats("sb-doesnotexist0")
    assert caught.value.status == 404
    assert caught.value.code == "sandbox_not_found"
    with pytest.raises(SandboxNotFound):
        await hypervisor.sandbox("sb-doesnotexist0").execute_command("true")


async def test_too_much_memory_is_invalid_config(hypervisor: BaseHypervisor):
    with pytest.raises(InvalidConfig) as caught:
        await hypervisor.create_sandbox(sandbox_config(memory_mb=1_000_000))
    assert caught.value.status == 400
    assert "memory_mb" in caught.value.detail


async def test_unknown_template(hypervisor: BaseHypervisor):
    with pytest.raises(TemplateNotFound):
        await hypervisor.create_sandbox(SandboxConfig(template_id="no-such-template"))


async def test_file_errors(sandbox: Sandbox):
    with pytest.raises(FileNotFound):
        await sandbox.read_file("/no/such/file")
    with pytest.raises(InvalidPath):
        await sandbox.stat("relative/path")


async def test_a_provider_for_another_backend_says_so(hypervisor: BaseHypervisor):
    running = (await hypervisor.health())["backend"]
    other = QemuHypervisor() if running == "firecracker" else FirecrackerHypervisor()
    async with other:
        with pytest.raises(BackendMismatch, match=f"runs {running}"):
            await other.create_sandbox(sandbox_config())
    same = QemuHypervisor() if running == "qemu" else FirecrackerHypervisor()
    async with same:
        await same.check()


async def test_no_daemon_is_daemon_unavailable(tmp_path: Path):
    async with detect(socket_path=tmp_path / "nothing.sock") as hv:
        with pytest.raises(DaemonUnavailable, match="nova serve"):
            await hv.health()
