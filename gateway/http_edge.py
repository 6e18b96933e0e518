"""Deadlines and a connection cap at the HTTP edge, where no ASGI middleware can see.

uvicorn closes a keep-alive connection that stays idle between requests, but a connection that has
sent part of a request's headers, or a body one byte at a time, it keeps for as long as the client
likes; a few hundred such clients hold the gateway. Here each request must send its headers within
`header_timeout_s` of its first byte (of the connection, for the first request) and its whole body
within `body_timeout_s` of its headers, or the connection is answered 408 and closed. Once the body
is in, nothing is timed: a response may stream for as long as it likes (SSE).

Connections beyond `max_connections` are answered 503 and closed at once (uvicorn's own
`limit_concurrency` counts the same connections but answers only once a request's headers are in).
Both answers are JSON-RPC errors, which MCP clients show (gateway/refusals.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from core.settings import Settings
from gateway.refusals import jsonrpc_error

_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: "
_BUSY = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: "


def _answer(head: bytes, text: str) -> bytes:
    body = jsonrpc_error(text)
    return head + str(len(body)).encode() + b"\r\n\r\n" + body


class DeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline, a body deadline and a connection cap."""

    header_timeout_s = 10.0
    body_timeout_s = 30.0
    max_connections = 1000

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self.logger.warning("refused a connection: %d open (limit %d)", len(self.connections) - 1, self.max_connections)
            transport.write(_answer(_BUSY, "too many connections to the gateway (MCPFLEET_MAX_CONNECTIONS); retry later"))
            transport.close()
            return
        self._arm(self.header_timeout_s, "headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # a further request on a kept-alive connection
            self._arm(self.header_timeout_s, "headers")

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()
        self._arm(self.body_timeout_s, "body")

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def _arm(self, seconds: float, part: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired, part, seconds)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, part: str, seconds: float) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        self.logger.info("closed a connection from %s: its request's %s took over %g s", self.client, part, seconds)
        cycle = self.cycle
        if cycle is None or not cycle.response_started:
            self.transport.write(_answer(_TIMEOUT, f"the request's {part} did not arrive within {seconds:g} s"))
        if cycle is not None:  # as if the client had gone: the application's receive() says so, its send() is dropped
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()


def protocol_for(settings: Settings) -> type[DeadlineProtocol]:
    """The protocol class for uvicorn's `http=`, with this fleet's deadlines and cap."""
    return type(
        "GatewayHttpProtocol",
        (DeadlineProtocol,),
        {
            "header_timeout_s": settings.header_timeout_s,
            "body_timeout_s": settings.body_timeout_s,
            "max_connections": settings.max_connections,
        },
    )
