"""The `exec` server, run over stdio as the supervisor runs it, driven by the SDK's Client."""

from __future__ import annotations

import os
import time
from pathlib import Path

from mcp_servers.exec.server import MAX_OUTPUT_BYTES
from tests.clients import stdio_server
from tests.clients import text_of as text

ROOT = Path(__file__).resolve().parent.parent


def exec_server(root: Path, mode: str = "auto"):
    return stdio_server("exec", root, mode)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child of an exited shell is reaped by init; until then it is a zombie, which is dead enough.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_exit_code_stdout_stderr_and_working_directory(tmp_path: Path) -> None:
    (tmp_path / "marker").write_text("here")
    async with exec_server(tmp_path) as client:
        result = await client.call_tool("run", {"command": "pwd; cat marker; echo oops >&2; exit 3"})
        assert not result.is_error  # a failing command is a result, not a tool failure
        out = result.structured_content
        assert out["exit_code"] == 3
        assert out["stdout"] == f"{tmp_path}\nhere"
        assert out["stderr"] == "oops\n"
        assert out["timed_out"] is False
        assert out["stdout_truncated"] is False and out["stderr_truncated"] is False
        assert "exit code 3" in text(result) and "oops" in text(result)

        ok = await client.call_tool("run", {"command": "true"})
        assert ok.structured_content["exit_code"] == 0 and ok.structured_content["stdout"] == ""

        # No stdin: a command that reads it sees end of file at once.
        cat = await client.call_tool("run", {"command": "cat; echo done", "timeout_s": 5})
        assert cat.structured_content["stdout"] == "done\n" and not cat.structured_content["timed_out"]

        killed = await client.call_tool("run", {"command": "kill -9 $$"})
        assert killed.structured_content["exit_code"] == -9
        assert "SIGKILL" in text(killed)


async def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    async with exec_server(tmp_path) as client:
        started = time.monotonic()
        result = await client.call_tool(
            "run",
            {"command": "sleep 60 & echo $! > child.pid; echo started; sleep 60", "timeout_s": 1},
        )
        elapsed = time.monotonic() - started
    assert result.is_error
    out = result.structured_content
    assert out["timed_out"] is True and out["exit_code"] is None
    assert out["stdout"] == "started\n"
    assert "timed out after 1 s" in text(result) and "killed" in text(result)
    assert elapsed < 10
    child = int((tmp_path / "child.pid").read_text())
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child), "the background child of a timed-out command is still running"


async def test_output_is_truncated_per_stream(tmp_path: Path) -> None:
    async with exec_server(tmp_path, mode="legacy") as client:
        stdout = f"head -c {3 * MAX_OUTPUT_BYTES} /dev/zero | tr '\\0' o"
        stderr = f"head -c {MAX_OUTPUT_BYTES + 7} /dev/zero | tr '\\0' e >&2"
        result = await client.call_tool("run", {"command": f"{stdout}; {stderr}"})
    out = result.structured_content
    assert out["exit_code"] == 0
    assert out["stdout_truncated"] is True and out["stderr_truncated"] is True
    assert out["stdout"] == "o" * MAX_OUTPUT_BYTES
    assert out["stderr"] == "e" * MAX_OUTPUT_BYTES
    report = text(result)
    assert f"stdout truncated: {3 * MAX_OUTPUT_BYTES} bytes written, the first {MAX_OUTPUT_BYTES} kept" in report
    assert f"stderr truncated: {MAX_OUTPUT_BYTES + 7} bytes written" in report


async def test_time_limit_bounds_and_definition(tmp_path: Path) -> None:
    async with exec_server(tmp_path) as client:
        tool = (await client.list_tools()).tools[0]
        assert tool.name == "run"
        assert tool.input_schema["required"] == ["command"]
        assert tool.input_schema["properties"]["timeout_s"]["default"] == 30
        assert tool.input_schema["properties"]["timeout_s"]["maximum"] == 300
        assert tool.annotations.read_only_hint is False
        assert tool.output_schema["title"] == "RunResult"

        too_long = await client.call_tool("run", {"command": "true", "timeout_s": 301})
        assert too_long.is_error and "300" in text(too_long)
        zero = await client.call_tool("run", {"command": "true", "timeout_s": 0})
        assert zero.is_error
        empty = await client.call_tool("run", {"command": ""})
        assert empty.is_error
