"""Fixtures that change the tool and prompt lists, and the notices that tell clients so.

On 2026-07-28 the notices reach `subscriptions/listen` streams (the SDK derives the
`listChanged` capabilities from serving that method); on 2025-11-25 they go to the
session that made the change, and the handshake advertises `listChanged`.
"""

from __future__ import annotations

from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.prompts.base import Prompt

from mcp_servers.conformance.era import is_stateless

DYNAMIC_TOOL = "test_dynamic_tool"
DYNAMIC_PROMPT = "test_dynamic_prompt"


def register(server: MCPServer[Any]) -> None:
    def test_dynamic_tool() -> str:
        return "This tool comes and goes with each call of test_trigger_tool_change."

    def test_dynamic_prompt() -> str:
        return "This prompt comes and goes with each call of test_trigger_prompt_change."

    dynamic_prompt = Prompt.from_function(
        test_dynamic_prompt, description="Comes and goes with each call of test_trigger_prompt_change."
    )

    @server.tool(
        description=f"Adds the tool {DYNAMIC_TOOL} when it is absent and removes it when present, "
        "then notifies clients that the tool list changed.",
        structured_output=False,
    )
    async def test_trigger_tool_change(ctx: Context) -> str:
        if any(tool.name == DYNAMIC_TOOL for tool in await server.list_tools()):
            server.remove_tool(DYNAMIC_TOOL)
            change = "removed"
        else:
            server.add_tool(
                test_dynamic_tool,
                description="Comes and goes with each call of test_trigger_tool_change.",
                structured_output=False,
            )
            change = "added"
        await ctx.notify_tools_changed()
        if not is_stateless(ctx):
            await ctx.session.send_tool_list_changed()
        return f"{DYNAMIC_TOOL} {change}"

    @server.tool(
        description=f"Adds the prompt {DYNAMIC_PROMPT} when it is absent and removes it when present, "
        "then notifies clients that the prompt list changed.",
        structured_output=False,
    )
    async def test_trigger_prompt_change(ctx: Context) -> str:
        if any(prompt.name == DYNAMIC_PROMPT for prompt in await server.list_prompts()):
            server.remove_prompt(DYNAMIC_PROMPT)
            change = "removed"
        else:
            server.add_prompt(dynamic_prompt)
            change = "added"
        await ctx.notify_prompts_changed()
        if not is_stateless(ctx):
            await ctx.session.send_prompt_list_changed()
        return f"{DYNAMIC_PROMPT} {change}"

    server.middleware.append(_advertise_list_changes)


async def _advertise_list_changes(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
    """On the handshake, say that the tool and prompt lists can change (the SDK leaves it unset)."""
    result = await call_next(ctx)
    # Inside the middleware chain a result is already the wire dict.
    if ctx.method == "initialize" and isinstance(result, dict) and isinstance(result.get("capabilities"), dict):
        capabilities = result["capabilities"]
        for kind in ("tools", "prompts"):
            if isinstance(capabilities.get(kind), dict):
                capabilities[kind] = {**capabilities[kind], "listChanged": True}
    return result
