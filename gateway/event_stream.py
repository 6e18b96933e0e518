"""A call's answer as `text/event-stream`, written as its events come (both fast paths use it)."""

from __future__ import annotations

import asyncio

from mcp.server._streamable_http_modern import _SSE_HEADERS, _SSE_PING_INTERVAL
from starlette.types import Send

# The SDK's own (private) pieces of its general paths, so the fast paths answer with the same bytes.
SSE_HEADERS = _SSE_HEADERS
PING_S = _SSE_PING_INTERVAL
"""A call silent this long commits its answer to an event stream and pings on it."""
PING = b": ping\r\n\r\n"


class EventStream:
    """A call's notifications and pings, written as they come: the first commits `text/event-stream`."""

    def __init__(self, send: Send, headers: list[tuple[bytes, bytes]] = SSE_HEADERS):
        self._send = send
        self._headers = headers
        self._lock = asyncio.Lock()
        self.committed = False
        self.gone = False
        """The client went away: nothing more is written."""

    async def open(self) -> None:
        """Commit to `text/event-stream` now (a session's answer always is one)."""
        await self.send(b"")

    async def send(self, event: bytes, more: bool = True) -> None:
        async with self._lock:
            if self.gone:
                return
            if not self.committed:
                self.committed = True
                await self._send({"type": "http.response.start", "status": 200, "headers": self._headers})
            if event or not more:
                await self._send({"type": "http.response.body", "body": event, "more_body": more})
