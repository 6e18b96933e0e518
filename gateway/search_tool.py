"""The gateway's own tool `fleet__search_tools`: the caller's approved tools found by meaning.

The search itself is the registry's (`Services.search`, only what is approved for the caller);
here are the tool's definition, the check of its arguments, and its result. A client connected
with a tool set (`/mcp?set=NAME`) is shown only that set's tools.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mcp_types as types
from mcp.shared.exceptions import MCPError

from core.accounts import Identity
from gateway.services import Services
from gateway.tool_sets import ActiveSet

MAX_HITS = 50

SEARCH_TOOL = "fleet__search_tools"
SEARCH_TOOL_DEFINITION: dict[str, Any] = {
    "name": SEARCH_TOOL,
    "title": "Search the tools you may use",
    "description": (
        "Find tools approved for you by what they do, best match first. Use it instead of listing every tool: "
        "describe the task in plain words and call the tools it names."
    ),
    "inputSchema": {
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "What you want to do, in plain words"},
            "limit": {"type": "integer", "minimum": 1, "maximum": MAX_HITS, "default": 10},
        },
        "required": ["query"],
    },
    "annotations": {"readOnlyHint": True, "openWorldHint": False},
}


def search_arguments(arguments: Mapping[str, Any]) -> tuple[str, int]:
    """The query and the number of hits asked for, or a JSON-RPC error saying which argument is wrong."""
    query, limit = arguments.get("query"), arguments.get("limit", 10)
    if not isinstance(query, str) or not query.strip():
        raise MCPError(code=types.INVALID_PARAMS, message="query must be a non-empty string")
    if not isinstance(limit, int) or not 1 <= limit <= MAX_HITS:
        raise MCPError(code=types.INVALID_PARAMS, message=f"limit must be an integer from 1 to {MAX_HITS}")
    return query, limit


async def search_hits(fleet: Services, identity: Identity, active: ActiveSet | None, query: str, limit: int) -> list[dict[str, Any]]:
    if active is None:
        return [hit.as_dict() for hit in await fleet.search(identity, query, limit)]
    # Ask for the most, keep the set's: the set narrows what search may name.
    return [hit.as_dict() for hit in await fleet.search(identity, query, MAX_HITS) if active.allows(hit.name)][:limit]


def search_result(hits: list[dict[str, Any]]) -> dict[str, Any]:
    lines = [f"{hit['name']}: {hit['description']}" for hit in hits] or ["no approved tool matches"]
    return {"content": [{"type": "text", "text": "\n".join(lines)}], "structuredContent": {"tools": hits}, "isError": False}
