"""The built-in servers' tool definitions, listed in-process (their code ships with the gateway).

The registry records them for each tenant's built-in versions at startup, so search and the
admin page know them before any sandbox has run.
"""

from __future__ import annotations

import tempfile
from typing import Any

from mcp_servers.conformance.server import create_server as conformance_server
from mcp_servers.exec.server import create_server as exec_server
from mcp_servers.workspace.server import create_server as workspace_server


async def builtin_tools() -> dict[str, list[dict[str, Any]]]:
    """Prefix -> the server's tool definitions as `tools/list` gives them."""
    with tempfile.TemporaryDirectory(prefix="mcpfleet-builtins-") as root:
        servers = {"workspace": workspace_server(root), "exec": exec_server(root), "conformance": conformance_server()}
        return {
            prefix: [t.model_dump(by_alias=True, exclude_none=True, mode="json") for t in await server.list_tools()]
            for prefix, server in servers.items()
        }
