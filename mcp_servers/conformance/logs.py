"""Log messages to the client, at the level the client asked for.

On 2025-11-25 a client sets a session's level with `logging/setLevel`; on 2026-07-28 it
opts in per request through `_meta`, and the SDK applies that itself.
"""

from __future__ import annotations

from typing import Any

from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import Context
from mcp_types import LoggingLevel

LEVELS: tuple[LoggingLevel, ...] = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")
_STDIO = ""  # the one session of a stdio connection, which has no session id
_MAX_SESSIONS = 1000


class SessionLogLevels:
    def __init__(self) -> None:
        self._levels: dict[str, LoggingLevel] = {}

    def set(self, session_id: str | None, level: LoggingLevel) -> None:
        key = session_id or _STDIO
        self._levels.pop(key, None)
        self._levels[key] = level
        while len(self._levels) > _MAX_SESSIONS:  # forget the sessions that set a level longest ago
            del self._levels[next(iter(self._levels))]

    def allows(self, session_id: str | None, level: LoggingLevel) -> bool:
        threshold = self._levels.get(session_id or _STDIO, "debug")
        return LEVELS.index(level) >= LEVELS.index(threshold)

    async def log(self, ctx: Context[Any, Any], level: LoggingLevel, message: str) -> None:
        if not self.allows(session_id_of(ctx.request_context), level):
            return
        await ctx.log(level, message, logger_name="conformance")


def session_id_of(ctx: ServerRequestContext[Any, Any]) -> str | None:
    """The Streamable HTTP session a request belongs to; None on stdio and stateless requests."""
    headers = getattr(ctx.request, "headers", None)
    return headers.get("mcp-session-id") if headers is not None else None
