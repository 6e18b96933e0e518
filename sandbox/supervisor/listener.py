"""What the supervisor's loopback services for servers share (the egress proxy, the model endpoint,
the trace endpoint): a socket on the sandbox's loopback, bound on first use, a token per server,
accepting only while `serve()`d, and one task per connection, each handed to `_serve_one` and
closed after it."""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import Callable
from typing import Any

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
    def __init__(self, send: Callable[[Any], None], pid_of: Callable[[str], int | None],
                 connected: Callable[[], bool]):
        """`send` queues a message for the gateway (dropped while none is connected, which
        `connected` tells); `pid_of` gives a server's process id (None while it is not running)."""
        self._send = send
        self._connected = connected
        self._pid_of = pid_of
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
        token = secrets.token_urlsafe(24)
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
        """The gateway went away: nothing in progress can go on (a new gateway knows none of it)."""
        raise NotImplementedError

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
