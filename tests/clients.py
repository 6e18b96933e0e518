"""MCP clients for the tests: the SDK's `Client` over Streamable HTTP with a bearer key."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from mcp import Client, StdioServerParameters
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


ROOT = Path(__file__).resolve().parent.parent


@contextlib.asynccontextmanager
async def stdio_server(module: str, workspace_root: Path, mode: str = "auto") -> AsyncIterator[Client]:
    """One of the built-in servers (`mcp_servers.<module>`) on stdio, outside any sandbox."""
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", f"mcp_servers.{module}"],
        env={**os.environ, "MCPFLEET_WORKSPACE_ROOT": str(workspace_root)},
        cwd=str(ROOT),
    )
    async with Client(params, mode=mode) as client:
        yield client


def text_of(result: Any) -> str:
    return "\n".join(block.text for block in result.content if getattr(block, "type", None) == "text")


def structured(result: Any) -> dict[str, Any]:
    if result.structured_content is not None:
        return result.structured_content
    return json.loads(text_of(result))
