"""Which protocol era a request belongs to: the stateless 2026-07-28 one, or the handshake one before it."""

from __future__ import annotations

from typing import Any

from mcp.server.mcpserver import Context
from mcp_types.version import is_version_at_least

STATELESS_VERSION = "2026-07-28"


def is_stateless(ctx: Context[Any, Any]) -> bool:
    """True for 2026-07-28 and later: no server-to-client requests, input comes back with a retry."""
    return ctx.protocol_version is not None and is_version_at_least(ctx.protocol_version, STATELESS_VERSION)
