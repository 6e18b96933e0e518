"""The server `@modelcontextprotocol/conformance` expects to find under test, fixture for fixture.

It serves both protocol eras: 2025-11-25 (handshake, sessions, server-to-client
requests) and 2026-07-28 (stateless, `server/discover`, `InputRequiredResult`).
"""

from __future__ import annotations

import warnings
from typing import Any

from mcp.server.caching import CacheHint
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPDeprecationWarning
from mcp_types import EmptyResult, SetLevelRequestParams, SubscribeRequestParams, UnsubscribeRequestParams

from mcp_servers.conformance import interactive, list_changes, prompts, resources, task_tools, tools
from mcp_servers.conformance.logs import SessionLogLevels, session_id_of

# Lists that the trigger tools change go stale at once; the rest never change.
CACHE_HINTS = {
    "tools/list": CacheHint(ttl_ms=0, scope="public"),
    "prompts/list": CacheHint(ttl_ms=0, scope="public"),
    "resources/list": CacheHint(ttl_ms=60_000, scope="public"),
    "resources/templates/list": CacheHint(ttl_ms=60_000, scope="public"),
    "resources/read": CacheHint(ttl_ms=60_000, scope="public"),
}


def create_server() -> MCPServer[Any]:
    # Logging, sampling and roots are deprecated as of 2026-07-28; the fixtures exercise them on purpose.
    warnings.filterwarnings("ignore", category=MCPDeprecationWarning, module=r"mcp_servers\.conformance\.")

    server: MCPServer[Any] = MCPServer(
        "mcpfleet-conformance",
        version="0.1.0",
        instructions="Fixtures of the MCP conformance suite: tools, resources and prompts with known answers.",
        tools=[tools.contact_tool()],
        cache_hints=CACHE_HINTS,
        log_level="WARNING",
    )
    logs = SessionLogLevels()
    tools.register(server, logs)
    interactive.register(server)
    task_tools.register(server)
    list_changes.register(server)
    resources.register(server)
    prompts.register(server)

    # MCPServer has no decorators for these 2025-11-25 requests; they go on the low-level server.
    lowlevel = server._lowlevel_server  # noqa: SLF001
    subscriptions = resources.Subscriptions(server)

    async def set_level(ctx: ServerRequestContext[Any, Any], params: SetLevelRequestParams) -> EmptyResult:
        logs.set(session_id_of(ctx), params.level)
        return EmptyResult()

    lowlevel.add_request_handler("logging/setLevel", SetLevelRequestParams, set_level)
    lowlevel.add_request_handler("resources/subscribe", SubscribeRequestParams, subscriptions.subscribe)
    lowlevel.add_request_handler("resources/unsubscribe", UnsubscribeRequestParams, subscriptions.unsubscribe)
    return server
