"""What of a client's request `_meta` the gateway passes on to the server in the user's sandbox."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mcp_types as types
from mcp.server.context import ServerRequestContext

# The 2026-07-28 request envelope describes the client's connection to the gateway, not
# the gateway's connection to the server, which has its own handshake.
_ENVELOPE_KEYS = frozenset(
    {types.PROTOCOL_VERSION_META_KEY, types.CLIENT_INFO_META_KEY, types.CLIENT_CAPABILITIES_META_KEY, types.LOG_LEVEL_META_KEY}
)


def forwarded_meta(ctx: ServerRequestContext[Any, Any]) -> dict[str, Any]:
    """What of a request's `_meta` travels on to the server: progress tokens and the like, which it answers through us.

    Read from the request as it came on the wire (`ctx.params`), where keys keep their wire names.
    """
    raw = (ctx.params or {}).get("_meta")
    if not isinstance(raw, Mapping):
        return {}
    return {k: v for k, v in raw.items() if k not in _ENVELOPE_KEYS}
