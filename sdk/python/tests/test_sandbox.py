"""The seed's sandbox API against a real daemon and real VMs."""

from __future__ import annotations

import asyncio

import pytest
from conftest import TEMPLATE, sandbox_config

from novasandbox.core import (
    DEFAULT_KERNEL_ARGS,
    BaseHypervisor,
    DriveConfig,
    Sandbox,
    SandboxConfig,
    SandboxState,
)
from novasandbox.errors import CommandTimeout, InvalidConfig, NotRunning


class TestSandboxConfig:
    def test_default_config(self):
        config = SandboxConfig()
        assert config.template_id == "python"
        assert config.memory_mb == 512
        assert config.vcpus == 2
        assert config.boot_timeout_ms == 5000
        assert config.kernel_args == (
            "reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.dumbkbd i8042.nopnp "
            "random.trust_cpu=on tsc=reliable quiet"
        )
        assert config.enable_network is True
        assert config.host_port is None
        assert config.guest_port == 8080
        assert config.rootfs_path is None
        assert config.extra_drives == []
        assert config.labels == {}
        assert config.read_only_rootfs is False
        assert config.env == {}
        assert config.start == "auto"
        assert config.timeout_secs is None

    def test_defaults_make_the_daemons_default_request(self):
        assert SandboxConfig().to_request() == {
            "template": "python",
            "memory_mb": 512,
            "vcpus": 2,
            "network": True,
            "start": "auto",
        }

    def test_ports_labels_env_and_lifetime_are_sent(self):
        body = SandboxConfig(
            host_port=18080, guest_port=80, labels={"team": "a"}, env={"A": "1"}, timeout_secs=60
        ).to_request()
        assert body["ports"] == [{"host_port": 18080, "guest_port": 80}]
        assert body["labels"] == {"team": "a"}
        assert body["env"] == {"A": "1"}
        assert body["timeout_secs"] == 60

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("kernel_args", DEFAULT_KERNEL_ARGS + " debug"),
            ("rootfs_path", "/tmp/rootfs.ext4"),
            ("extra_drives", [DriveConfig("/tmp/disk.img")]),
            ("read_only_rootfs", True),
        ],
    )
    def test_daemon_controlled_fields_are_refused(self, field, value):
        config = SandboxConfig(**{field: value})
        with pytest.raises(InvalidConfig, match=field):
            config.to_request()

    def test_boot_timeout_is_range_checked_and_otherwise_daemon_controlled(self):
        assert "boot_timeout_ms" not in SandboxConfig(boot_timeout_ms=60_000).to_request()
        with pytest.raises(InvalidConfig, match="boot_timeout_ms"):
            SandboxConfig(boot_timeout_ms=10).to_request()

    def test_a_host_port_needs_a_network(self):
        with pytest.raises(InvalidConfig, match="enable_network"):
            SandboxConfig(host_port=8000, enable_network=False).to_request()


class TestSandbox:
    async def test_create_execute_and_stats(self, sandbox: Sandbox):
        assert sandbox.sandbox_id.startswith("sb-")
        assert sandbox.metadata["boot_time_ms"] > 0
        assert sandbox.metadata["template"] == TEMPLATE
        assert sandbox.state == SandboxState.RUNNING
        assert await sandbox.execute_command("python3 -c 'print(6*7)'") == "42\n"
        assert await sandbox.is_running()
        stats = await sandbox.get_stats()
        assert stats.memory_usage_mb > 0
        assert stats.cpu_usage_us > 0
        assert stats["memory_usage_mb"] == stats.memory_usage_mb
        assert sandbox.get_uptime_ms() > 0

    async def test_run_reports_exit_code_stderr_env_and_cwd(self, sandbox: Sandbox):
        result = await sandbox.run(
            "echo $GREETING; pwd; echo oops >&2; exit 3", env={"GREETING": "hi"}, cwd="/tmp"
        )
        assert (result.exit_code, result.stdout, result.stderr) == (3, "hi\n/tmp\n", "oops\n")
        assert result.duration_ms >= 0
        assert not result.ok
        argv = await sandbox.run(["python3", "-c", "import sys; print(sys.argv[1])", "a b"])
        assert argv.stdout == "a b\n"
        piped = await sandbox.run("tr a-z A-Z", stdin="shout\n")
        assert piped.stdout == "SHOUT\n"

    async def test_a_missing_program_is_127_not_an_error(self, sandbox: Sandbox):
        result = await sandbox.run(["no-such-program"])
        assert result.exit_code == 127
        assert result.kind == "not_started"

    async def test_user_runs_the_command_as_that_user(self, sandbox: Sandbox):
        nobody = await sandbox.run('id -u; id -g; echo "$HOME $USER"', user="nobody")
        assert nobody.stdout == "65534\n65534\n/nonexistent nobody\n", nobody
        chunks: list[bytes] = []
        streamed = await sandbox.run(["id", "-u"], user="4242:4243", on_stdout=chunks.append)
        assert (streamed.stdout, b"".join(chunks)) == ("4242\n", b"4242\n")
        root = await sandbox.run("id -u", user=0)
        assert root.stdout == "0\n"
        unknown = await sandbox.run("id -u", user="no-such-user")
        assert (unknown.exit_code, unknown.kind) == (126, "not_started")

    async def test_timeouts_kill_the_command(self, sandbox: Sandbox):
        result = await sandbox.run("sleep 30", timeout=0.5)
        assert result.exit_code == 124
        assert result.timed_out
        with pytest.raises(CommandTimeout) as caught:
            await sandbox.execute_command("echo before; sleep 30", timeout=0.5)
        assert caught.value.stdout == "before\n"

    async def test_concurrent_commands(self, sandbox: Sandbox):
        outs = await asyncio.gather(*(sandbox.execute_command(f"echo {i}") for i in range(8)))
        assert outs == [f"{i}\n" for i in range(8)]

    async def test_pause_resume_stop(self, hypervisor: BaseHypervisor):
        sb = await hypervisor.create_sandbox(sandbox_config())
        try:
            await sb.pause()
            assert sb.state == SandboxState.PAUSED
            assert not await sb.is_running()
            await sb.resume()
            assert await sb.is_running()
            assert await sb.execute_command("echo back") == "back\n"
            # The same by id, as the seed's hypervisor has them.
            await hypervisor.pause_sandbox(sb.sandbox_id)
            assert (await hypervisor.get_sandbox(sb.sandbox_id)).state == SandboxState.PAUSED
            await hypervisor.start_sandbox(sb.sandbox_id)  # resumes a paused one
            await hypervisor.start_sandbox(sb.sandbox_id)  # running: nothing to do
            stats = await hypervisor.get_sandbox_stats(sb.sandbox_id)
            assert stats.memory_limit_mb == 512
            await hypervisor.pause_sandbox(sb.sandbox_id)
            await hypervisor.resume_sandbox(sb.sandbox_id)
            uptime = sb.get_uptime_ms()
            await sb.stop()
            assert not await sb.is_running()
            assert sb.state == SandboxState.STOPPED
            assert sb.get_uptime_ms() >= uptime
            await sb.stop()  # stopping a stopped sandbox is a no-op
            with pytest.raises(NotRunning):
                await sb.execute_command("true")
            with pytest.raises(NotRunning):
                await hypervisor.start_sandbox(sb.sandbox_id)
        finally:
            await hypervisor.delete_sandbox(sb.sandbox_id, force=True)

    async def test_pause_to_disk_and_resume(self, hypervisor: BaseHypervisor):
        sb = await hypervisor.create_sandbox(sandbox_config())
        try:
            await sb.write_file("/tmp/kept", b"kept across the disk")
            await sb.pause(persist=True)
            assert sb.state == SandboxState.PAUSED
            assert not await sb.is_running()
            await sb.resume()
            assert await sb.is_running()
            assert await sb.read_file("/tmp/kept") == b"kept across the disk"
            # By id too.
            await hypervisor.pause_sandbox(sb.sandbox_id, persist=True)
            await hypervisor.resume_sandbox(sb.sandbox_id)
            assert await sb.execute_command("echo back") == "back\n"
        finally:
            await hypervisor.delete_sandbox(sb.sandbox_id, force=True)

    async def test_stop_sandbox_by_id_and_listing(self, hypervisor: BaseHypervisor):
        sb = await hypervisor.create_sandbox(sandbox_config(labels={"suite": "sdk"}))
        listed = await hypervisor.list_sandboxes(label="suite=sdk")
        assert [s.sandbox_id for s in listed] == [sb.sandbox_id]
        await hypervisor.stop_sandbox(sb.sandbox_id, force=True)
        assert not await sb.is_running()
        await hypervisor.delete_sandbox(sb.sandbox_id)
        assert not await sb.is_running()  # forgotten: not found, so not running
