"""Fixture tools of the Tasks extension's scenarios (`tasks-*`, SEP-2663).

The server itself knows nothing of tasks: it runs each call to its end, as any server does. A tool
says that it may run as a task, in its definition; the gateway then answers a client that declared
the extension with a task, runs the call in the background and keeps its outcome (gateway/tasks.py).
The MCPServer decorator cannot set a tool's `execution`, so the same word goes in its `_meta`.
"""

from __future__ import annotations

from typing import Any

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types import INTERNAL_ERROR, CallToolResult, TextContent

TASKS = "io.modelcontextprotocol/tasks"


def _supports(level: str) -> dict[str, Any]:
    return {TASKS: {"taskSupport": level}}


def register(server: MCPServer[Any]) -> None:
    @server.tool(description="Greets by name, at once (never a task).", structured_output=False)
    def greet(name: str) -> str:
        return f"Hello, {name}!"

    @server.tool(
        description="Sleeps `seconds` seconds, then says so; may run as a task.",
        meta=_supports("optional"), structured_output=False,
    )
    async def slow_compute(seconds: float = 1.0, label: str = "") -> str:
        await anyio.sleep(max(0.0, min(seconds, 600.0)))
        return f"Computed {label or 'a result'} after {seconds:g} s."

    @server.tool(
        description="Fails as a tool after about a second (isError); runs only as a task.",
        meta=_supports("required"),
    )
    async def failing_job() -> CallToolResult:
        await anyio.sleep(1.0)
        return CallToolResult(content=[TextContent(type="text", text="The job failed, as it always does.")], is_error=True)

    @server.tool(description="Fails with a protocol error (a JSON-RPC error, no result); may run as a task.",
                 meta=_supports("optional"))
    async def protocol_error_job() -> str:
        await anyio.sleep(0.2)
        raise MCPError(code=INTERNAL_ERROR, message="The job broke down before it could produce a result.")
