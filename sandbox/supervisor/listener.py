"""What the supervisor's loopback services for servers share (the egress proxy, the model endpoint,
the trace endpoint): a socket on the sandbox's loopback, bound on first use, a token per server,
accepting only while `serve()`d, and one task per connection, each handed to `_serve_one` and
closed after it.

Each request (a tunnel, a model request) is relayed to one gateway, the newest connected when it
began (`_take_gateway`), and stays with it: only that gateway's messages reach it, and only that
gateway going away ends it (`drop_gateway`); requests other gateways relay go on."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from collections.abc import Callable
from typing import Any

Gateway = int
"""A gateway connection's key (`link.Gateway`; link imports the supervisor, which imports this)."""

HEAD_LIMIT = 16 * 1024
"""Longest request head either service reads."""
FAILED_CONNECTION = (OSError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError)
"""What ends one connection quietly: the server hung up, or sent too much, or too slowly."""


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            411: "Length Required", 413: "Payload Too Large", 415: "Unsupported Media Type", 429: "Too Many Requests",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


def http_head(status: int, content_type: str, length: int | None) -> bytes:
    """An answer's head, one request per connection; `length` None: the body comes chunked."""
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\nContent-Type: {content_type}\r\n"
            f"{framing}\r\nConnection: close\r\n\r\n").encode("latin-1")


class LoopbackListener:
    def __init__(self, send: Callable[[Any, Gateway], None], pid_of: Callable[[str], int | None],
                 newest: Callable[[], Gateway | None]):
        """`send(message, gateway)` queues a message for that gateway (dropped once it is gone);
        `newest` tells the gateway a new request goes to (None while none is connected);
        `pid_of` gives a server's process id (None while it is not running)."""
        self._send_to = send
        self._newest = newest
        self._pid_of = pid_of
        self._gateway_of: dict[int, Gateway] = {}  # request id -> the gateway relaying it
        self._sock: socket.socket | None = None
        self._accepting = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._servers_by_token: dict[str, str] = {}

    @property
    def port(self) -> int | None:
        return self._sock.getsockname()[1] if self._sock is not None else None

    def _new_token(self, server: str) -> str:
        """A new token for `server`. Binds the socket on first use; connections wait in its backlog
        until `serve()`."""
        if self._sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sock.listen(64)
            sock.setblocking(False)
            self._sock = sock
        # What `secrets.token_urlsafe(24)` returns, without the import of `secrets` (and `random`,
        # `hashlib`) that an idle supervisor would otherwise hold.
        token = base64.urlsafe_b64encode(os.urandom(24)).rstrip(b"=").decode()
        self._servers_by_token[token] = server
        return token

    def forget(self, token: str) -> None:
        """The server holding `token` stopped: its token no longer opens anything."""
        self._servers_by_token.pop(token, None)

    def serve(self) -> None:
        """Accept connections (once the socket is bound): again after `pause()`."""
        if self._sock is not None and not self._accepting:
            asyncio.get_running_loop().add_reader(self._sock.fileno(), self._accept)
            self._accepting = True

    def pause(self) -> None:
        """Stop watching the socket, which stays bound (servers keep its address and connections
        wait in its backlog). gVisor cannot checkpoint a loopback socket someone waits on
        ("endpoint still has waiters upon save"), so the supervisor pauses it before a detach."""
        if self._sock is not None and self._accepting:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._accepting = False

    def close(self) -> None:
        self.pause()
        self.drop_all("the supervisor is stopping")

    def drop_all(self, reason: str) -> None:
        """Nothing in progress can go on (the sandbox is being saved, or stops)."""
        self._drop(list(self._gateway_of), reason)

    def drop_gateway(self, gateway: Gateway, reason: str) -> None:
        """`gateway` went away: what it relayed cannot go on (another gateway knows none of it)."""
        self._drop([r for r, g in self._gateway_of.items() if g == gateway], reason)

    def _drop(self, requests: list[int], reason: str) -> None:
        """End these requests, each telling its server `reason`."""
        raise NotImplementedError

    def _take_gateway(self, request: int) -> Gateway | None:
        """The gateway `request` is relayed to from now on (None: none is connected)."""
        gateway = self._newest()
        if gateway is not None:
            self._gateway_of[request] = gateway
        return gateway

    def _release(self, request: int) -> None:
        self._gateway_of.pop(request, None)

    def _relaying(self, request: Any, gateway: Gateway) -> bool:
        """Whether `gateway` is the one `request` is relayed to (another's messages for it are ignored)."""
        return self._gateway_of.get(request) == gateway

    def _send(self, request: int, message: Any) -> None:
        """Queue a message of `request` for its gateway."""
        gateway = self._gateway_of.get(request)
        if gateway is not None:
            self._send_to(message, gateway)

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def _accept(self) -> None:
        assert self._sock is not None
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError, OSError):
            return
        conn.setblocking(False)
        task = asyncio.get_running_loop().create_task(self._connection(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connection(self, conn: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=conn, limit=HEAD_LIMIT)
        except OSError:
            conn.close()
            return
        try:
            await self._serve_one(reader, writer)
        except FAILED_CONNECTION:
            pass
        finally:
            writer.close()
