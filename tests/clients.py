"""MCP clients for the tests: the SDK's `Client` over Streamable HTTP with a bearer key."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

# The two protocol revisions clients use today: the handshake era and the stateless one.
MODES = ("legacy", "2026-07-28")


@contextlib.asynccontextmanager
async def connect(url: str, key: str, mode: str = "legacy", **kw: Any) -> AsyncIterator[Client]:
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {key}"})
    async with http:
        async with Client(streamable_http_client(url, http_client=http), mode=mode, **kw) as client:
            yield client


def text_of(result: Any) -> str:
    return "".join(getattr(block, "text", "") for block in result.content)


def structured(result: Any) -> dict[str, Any]:
    if result.structured_content is not None:
        return result.structured_content
    return json.loads(text_of(result))
