"""The `exec` server: run a shell command in the workspace."""

from __future__ import annotations

import os
import signal
from typing import Annotated, Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field

from mcp_servers.exec.process import Capture, run_shell, start_background

DEFAULT_TIMEOUT_S = 30.0
MAX_TIMEOUT_S = 300.0
MAX_OUTPUT_BYTES = 1024 * 1024
BACKGROUND_LOG_DIR = "/tmp/exec"


class RunResult(BaseModel):
    exit_code: int | None = Field(
        description="The command's exit status; negative when a signal ended it; null when it timed out"
    )
    stdout: str
    stderr: str
    stdout_truncated: bool = Field(description=f"stdout went past {MAX_OUTPUT_BYTES} bytes; only the start is kept")
    stderr_truncated: bool = Field(description=f"stderr went past {MAX_OUTPUT_BYTES} bytes; only the start is kept")
    timed_out: bool = Field(description="The time limit ran out and the command's processes were killed")
    duration_s: float
    background_pid: int | None = Field(default=None, description="With background: the pid of the started command")
    background_log: str | None = Field(default=None, description="With background: where its output goes")


def create_server(root: str | os.PathLike[str]) -> MCPServer[Any]:
    cwd = os.fspath(root)
    server: MCPServer[Any] = MCPServer(
        "exec",
        version="0.1.0",
        instructions="Runs shell commands in your workspace, one at a time per call, with a time limit.",
        log_level="WARNING",
    )

    @server.tool(
        description=(
            "Run a shell command (/bin/sh -c) with the workspace root as working directory and return its "
            "exit code, stdout and stderr. The command gets no stdin. When the time limit runs out, the command "
            f"and every process it started are killed. Each stream keeps its first {MAX_OUTPUT_BYTES // 1024} KiB."
        ),
        annotations=ToolAnnotations(
            title="Run command",
            read_only_hint=False,
            destructive_hint=True,
            idempotent_hint=False,
            open_world_hint=True,
        ),
    )
    async def run(
        command: Annotated[str, Field(min_length=1, description="The shell command line, e.g. 'ls -la && make test'")],
        timeout_s: Annotated[
            float,
            Field(gt=0, le=MAX_TIMEOUT_S, description=f"Time limit in seconds (at most {MAX_TIMEOUT_S:g})"),
        ] = DEFAULT_TIMEOUT_S,
        background: Annotated[
            bool,
            Field(
                description=(
                    "Start the command and return at once, leaving it running (a server, a watcher); "
                    f"its output goes to {BACKGROUND_LOG_DIR}/<pid>.log. It keeps running while the sandbox "
                    "hibernates and resumes."
                )
            ),
        ] = False,
    ) -> Annotated[CallToolResult, RunResult]:
        if not os.path.isdir(cwd):
            raise ToolError(f"the workspace root {cwd} does not exist in this sandbox")
        if background:
            pid = await start_background(command, cwd=cwd, log_dir=BACKGROUND_LOG_DIR)
            started = RunResult(
                exit_code=None,
                stdout="",
                stderr="",
                stdout_truncated=False,
                stderr_truncated=False,
                timed_out=False,
                duration_s=0.0,
                background_pid=pid,
                background_log=f"{BACKGROUND_LOG_DIR}/{pid}.log",
            )
            return CallToolResult(
                content=[TextContent(type="text", text=f"started in the background: pid {pid}, output in {started.background_log}")],
                structured_content=started.model_dump(mode="json"),
            )
        outcome = await run_shell(command, cwd=cwd, timeout_s=timeout_s, output_limit=MAX_OUTPUT_BYTES)
        result = RunResult(
            exit_code=outcome.returncode,
            stdout=outcome.stdout.text(),
            stderr=outcome.stderr.text(),
            stdout_truncated=outcome.stdout.truncated,
            stderr_truncated=outcome.stderr.truncated,
            timed_out=outcome.timed_out,
            duration_s=round(outcome.duration_s, 3),
        )
        return CallToolResult(
            content=[TextContent(type="text", text=_report(result, outcome.stdout, outcome.stderr, timeout_s))],
            structured_content=result.model_dump(mode="json"),
            is_error=outcome.timed_out,
        )

    return server


def _report(result: RunResult, stdout: Capture, stderr: Capture, timeout_s: float) -> str:
    if result.timed_out:
        head = f"timed out after {timeout_s:g} s; the command and the processes it started were killed"
    elif result.exit_code is not None and result.exit_code < 0:
        head = f"killed by signal {_signal_name(-result.exit_code)} ({result.duration_s:g} s)"
    else:
        head = f"exit code {result.exit_code} ({result.duration_s:g} s)"
    parts = [head]
    for name, text, capture in (("stdout", result.stdout, stdout), ("stderr", result.stderr, stderr)):
        if text:
            parts.append(f"--- {name} ---\n{text}")
        if capture.truncated:
            parts.append(f"[{name} truncated: {capture.total} bytes written, the first {len(capture.data)} kept]")
    return "\n".join(parts)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)
