"""The MCP round trip CI runs (`make mcp-test`): a real MCP client (the `mcp`
package from PyPI) starts `nova mcp` over stdio, lists the tools, creates a
sandbox from the `python` template, runs `python3 -c 'print(6*7)'`, writes a
file and reads it back, lists files, gets stats, stops the sandbox, and
checks that an error comes back as a tool error (not a protocol error).

Usage: stdio_roundtrip.py NOVA_BIN TEMPLATES_DIR
It makes its own temporary NOVA_HOME whose `templates` links to TEMPLATES_DIR,
and checks that no sandbox is left in it afterwards.
"""

import asyncio
import json
import os
import sys
import tempfile
import time

from mcp import Client
from mcp.client.stdio import StdioServerParameters

EXPECTED_TOOLS = {
    "create_sandbox",
    "run_command",
    "read_file",
    "write_file",
    "list_files",
    "get_stats",
    "stop_sandbox",
    "list_sandboxes",
}


def structured(result):
    """The tool's structured output, failing loudly on a tool error."""
    if result.is_error:
        raise AssertionError(f"tool error: {result.content}")
    if result.structured_content is not None:
        return result.structured_content
    return json.loads(result.content[0].text)


async def roundtrip(nova: str, home: str) -> None:
    env = {"NOVA_HOME": home, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if "NOVA_LOG" in os.environ:
        env["NOVA_LOG"] = os.environ["NOVA_LOG"]
    params = StdioServerParameters(command=nova, args=["mcp"], env=env)
    async with Client(params, read_timeout_seconds=180) as client:
        tools = await client.list_tools()
        names = {t.name for t in tools.tools}
        assert EXPECTED_TOOLS <= names, f"missing tools: {EXPECTED_TOOLS - names}"
        for tool in tools.tools:
            assert tool.description and len(tool.description) > 40, tool.name
            assert tool.input_schema.get("type") == "object", tool.name
        print(f"tools: {sorted(names)}")

        started = time.monotonic()
        sandbox = structured(
            await client.call_tool(
                "create_sandbox",
                {"template": "python", "memory_mb": 256, "network": False},
            )
        )
        sid = sandbox["sandbox_id"]
        assert sandbox["state"] == "running", sandbox
        assert sandbox["stops_with_session"] is True, sandbox
        print(f"created {sid} in {time.monotonic() - started:.1f} s")

        out = structured(
            await client.call_tool(
                "run_command",
                {"sandbox_id": sid, "command": "python3 -c 'print(6*7)'"},
            )
        )
        assert out["exit_code"] == 0 and out["stdout"] == "42\n", out
        print("run_command: python3 printed 42")

        out = structured(
            await client.call_tool(
                "run_command",
                {"sandbox_id": sid, "argv": ["sh", "-c", "echo oops >&2; exit 3"]},
            )
        )
        assert out["exit_code"] == 3 and out["stderr"] == "oops\n", out

        text = "hello from MCP\nline two\n"
        wrote = structured(
            await client.call_tool(
                "write_file",
                {"sandbox_id": sid, "path": "/root/work/note.txt", "content": text},
            )
        )
        assert wrote["bytes"] == len(text.encode()), wrote
        back = structured(
            await client.call_tool(
                "read_file", {"sandbox_id": sid, "path": "/root/work/note.txt"}
            )
        )
        assert back["content"] == text, back
        print("write_file + read_file: content round-tripped")

        listing = structured(
            await client.call_tool("list_files", {"sandbox_id": sid, "path": "/root/work"})
        )
        assert [e["name"] for e in listing["entries"]] == ["note.txt"], listing

        stats = structured(await client.call_tool("get_stats", {"sandbox_id": sid}))
        assert stats["memory_limit_mb"] == 256 and stats["uptime_ms"] > 0, stats

        listed = structured(await client.call_tool("list_sandboxes", {}))
        assert [s["sandbox_id"] for s in listed["sandboxes"]] == [sid], listed

        stopped = structured(await client.call_tool("stop_sandbox", {"sandbox_id": sid}))
        assert stopped["stopped"] is True, stopped
        print(f"stopped {sid}")

        # A mistake is a tool error a model can read, not a protocol error.
        missing = await client.call_tool("run_command", {"sandbox_id": sid, "command": "true"})
        assert missing.is_error, missing
        problem = missing.structured_content or json.loads(missing.content[0].text)
        assert problem["code"] == "sandbox_not_found", problem
        print("an unknown sandbox is a tool error with code sandbox_not_found")


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    nova, templates = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    if not os.path.isfile(os.path.join(templates, "python", "python.json")):
        print(f"the python template is not built in {templates}: run `make images`", file=sys.stderr)
        return 1
    started = time.monotonic()
    # Short path: the sandboxes' Unix sockets must stay under 108 bytes.
    with tempfile.TemporaryDirectory(prefix="nova-mcp-", dir="/tmp") as home:
        os.symlink(templates, os.path.join(home, "templates"))
        asyncio.run(roundtrip(nova, home))
        sandboxes = os.path.join(home, "sandboxes")
        left = os.listdir(sandboxes) if os.path.isdir(sandboxes) else []
        assert not left, f"sandboxes left behind: {left}"
    print(f"MCP stdio round trip: 1 passed, 0 failed ({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
