"""Guest files: round trips (bytes and streams), listing, stat, mkdir, remove."""

from __future__ import annotations

import io
import os
from collections.abc import AsyncIterator

import pytest

from novasandbox.core import Sandbox
from novasandbox.errors import FileConflict, FileNotFound

MIB = 1024 * 1024


async def test_bytes_round_trip_of_a_few_mib(sandbox: Sandbox):
    data = os.urandom(3 * MIB + 17)
    assert await sandbox.write_file("/tmp/blob.bin", data) == len(data)
    assert await sandbox.read_file("/tmp/blob.bin") == data
    stat = await sandbox.stat("/tmp/blob.bin")
    assert (stat.kind, stat.size, stat.mode & 0o777) == ("file", len(data), 0o644)
    digest = await sandbox.execute_command("sha256sum /tmp/blob.bin | cut -d' ' -f1")
    import hashlib

    assert digest.strip() == hashlib.sha256(data).hexdigest()


async def test_streamed_uploads_and_downloads(sandbox: Sandbox):
    parts = [os.urandom(MIB) for _ in range(4)]

    async def chunks() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    assert await sandbox.write_file("/tmp/streamed.bin", chunks()) == 4 * MIB
    received = [chunk async for chunk in sandbox.read_file_chunks("/tmp/streamed.bin")]
    assert b"".join(received) == b"".join(parts)

    data = os.urandom(2 * MIB)
    assert await sandbox.write_file("/tmp/from-file.bin", io.BytesIO(data), mode=0o600) == len(data)
    assert await sandbox.read_file("/tmp/from-file.bin") == data
    assert (await sandbox.stat("/tmp/from-file.bin")).mode & 0o777 == 0o600

    await sandbox.write_file("/tmp/text.txt", "héllo\n")
    assert await sandbox.execute_command("cat /tmp/text.txt") == "héllo\n"


async def test_mkdir_list_stat_remove(sandbox: Sandbox):
    await sandbox.mkdir("/tmp/tree/a/b", mode=0o700)
    await sandbox.write_file("/tmp/tree/a/one.txt", b"1")
    await sandbox.write_file("/tmp/tree/a/two.txt", b"22")
    entries = await sandbox.list_files("/tmp/tree/a")
    assert [(e.name, e.kind, e.size) for e in entries if not e.is_dir] == [
        ("one.txt", "file", 1),
        ("two.txt", "file", 2),
    ]
    assert [e.path for e in entries] == [
        "/tmp/tree/a/b",
        "/tmp/tree/a/one.txt",
        "/tmp/tree/a/two.txt",
    ]
    assert (await sandbox.stat("/tmp/tree/a/b")).is_dir
    assert await sandbox.exists("/tmp/tree/a/one.txt")
    await sandbox.remove("/tmp/tree/a/one.txt")
    assert not await sandbox.exists("/tmp/tree/a/one.txt")
    with pytest.raises(FileConflict):
        await sandbox.remove("/tmp/tree")
    await sandbox.remove("/tmp/tree", recursive=True)
    with pytest.raises(FileNotFound):
        await sandbox.list_files("/tmp/tree")
