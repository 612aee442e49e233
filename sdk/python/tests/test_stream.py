"""Streamed commands over the WebSocket: callbacks as output comes, stdin."""

from __future__ import annotations

import asyncio

from novasandbox.core import Sandbox


async def test_callbacks_get_output_as_it_comes_and_stdin_reaches_the_command(sandbox: Sandbox):
    out: list[bytes] = []
    err: list[bytes] = []
    result = await sandbox.run(
        "while read line; do echo got:$line; echo warn:$line >&2; done; exit 5",
        stdin="a\nb\n",
        on_stdout=out.append,
        on_stderr=err.append,
    )
    assert result.exit_code == 5
    assert b"".join(out) == b"got:a\ngot:b\n"
    assert b"".join(err) == b"warn:a\nwarn:b\n"
    assert result.stdout == "got:a\ngot:b\n"
    assert result.stderr == "warn:a\nwarn:b\n"
    assert result.exec_id is not None


async def test_output_streams_before_the_command_ends(sandbox: Sandbox):
    loop = asyncio.get_running_loop()
    first_at: list[float] = []

    async def on_stdout(chunk: bytes) -> None:  # coroutine callbacks are awaited
        if not first_at:
            first_at.append(loop.time())

    started = loop.time()
    result = await sandbox.run("echo early; sleep 1.5; echo late", on_stdout=on_stdout)
    ended = loop.time()
    assert result.stdout == "early\nlate\n"
    assert first_at[0] - started < ended - started - 1.0


async def test_binary_stdin_and_timeout_over_the_stream(sandbox: Sandbox):
    data = bytes(range(256)) * 64
    result = await sandbox.run("wc -c", stdin=data)
    assert result.stdout.strip() == str(len(data))
    chunks: list[bytes] = []
    timed = await sandbox.run("echo start; sleep 30", timeout=0.5, on_stdout=chunks.append)
    assert timed.timed_out
    assert timed.exit_code == 124
    assert b"".join(chunks) == b"start\n"
