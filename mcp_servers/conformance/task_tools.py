"""Fixture tools of the Tasks extension's scenarios (`tasks-*`, SEP-2663).

The server itself knows nothing of tasks: it runs each call to its end, as any server does. A tool
says that it may run as a task, in its definition; the gateway then answers a client that declared
the extension with a task, runs the call in the background and keeps its outcome (gateway/tasks.py).
The MCPServer decorator cannot set a tool's `execution`, so the same word goes in its `_meta`.
"""

from __future__ import annotations

from typing import Any

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types import INTERNAL_ERROR, CallToolResult, ElicitResult, InputRequiredResult, TextContent

from mcp_servers.conformance.client_input import ClientInput, elicitation

TASKS = "io.modelcontextprotocol/tasks"
CONFIRM_SCHEMA = {"type": "object", "properties": {"confirm": {"type": "boolean"}, "name": {"type": "string"}}}
NAME_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def _supports(level: str, *, input_first: bool = False) -> dict[str, Any]:
    # `inputFirst`: the gateway asks the first round of input before the task starts (gateway/tasks.py).
    return {TASKS: {"taskSupport": level, **({"inputFirst": True} if input_first else {})}}


def _answer(answer: Any) -> str:
    if not isinstance(answer, ElicitResult):
        return "no answer"
    if answer.action != "accept" or not answer.content:
        return f"the user chose {answer.action}"
    return ", ".join(f"{k}={v}" for k, v in sorted(answer.content.items()))


def _text(text: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=text)])


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

    @server.tool(description="Asks to confirm deleting `filename`, then says what it did; may run as a task.",
                 meta=_supports("optional"))
    async def confirm_delete(ctx: Context, filename: str = "file.txt") -> CallToolResult | InputRequiredResult:
        answers = await ClientInput(ctx).ask({"confirm": elicitation(f"Delete {filename}?", CONFIRM_SCHEMA)})
        if isinstance(answers, InputRequiredResult):
            return answers
        return _text(f"{filename}: {_answer(answers['confirm'])}")

    @server.tool(description="Asks two questions at once (first, second); may run as a task.",
                 meta=_supports("optional"))
    async def multi_input(ctx: Context) -> CallToolResult | InputRequiredResult:
        answers = await ClientInput(ctx).ask(
            {"first": elicitation("First question", CONFIRM_SCHEMA), "second": elicitation("Second question", CONFIRM_SCHEMA)}
        )
        if isinstance(answers, InputRequiredResult):
            return answers
        return _text(f"first: {_answer(answers['first'])}; second: {_answer(answers['second'])}")

    @server.tool(description="Asks the user's name (user_name) before it becomes a task, then greets them from it.",
                 meta=_supports("required", input_first=True))
    async def test_tool_with_task(ctx: Context) -> CallToolResult | InputRequiredResult:
        answers = await ClientInput(ctx).ask({"user_name": elicitation("What is your name?", NAME_SCHEMA)})
        if isinstance(answers, InputRequiredResult):
            return answers
        await anyio.sleep(0.5)  # the long part, done as a task
        return _text(f"Hello, {_answer(answers['user_name'])}!")
