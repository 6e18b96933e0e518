"""The gateway's side of one channel connection: framing and bookkeeping below `SupervisorClient`.

`LineReader` cuts the supervisor's stream into messages without ever holding one longer than
the gateway's limit; `Connection` writes messages; `PendingCall` is one call in flight with the
handlers its notifications and the server's requests go to; `own_socket` takes hold of the
listening socket's inode without following its name (the channel dir is writable from inside).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from sandbox import wire
from sandbox.errors import SandboxUnavailable

log = logging.getLogger("sandbox.client")

NotificationHandler = Callable[[str, "dict[str, Any] | None"], "Awaitable[None] | None"]
RequestHandler = Callable[[str, "dict[str, Any] | None"], "Awaitable[dict[str, Any]]"]

READ_CHUNK = 256 * 1024
"""Bytes read off the channel at a time; the socket's reader buffers at most twice that."""
HEAD = 64
"""Bytes of a message enough to tell a call's answer and its id (the supervisor writes `type` and `id` first)."""


class Connection:
    def __init__(self, writer: asyncio.StreamWriter, wake: Callable[[], None] | None = None):
        """`wake` is called before each message: a frozen sandbox is thawed to take it."""
        self.writer = writer
        self.wake = wake

    def send(self, message: wire.GatewayMessage) -> None:
        if not self.writer.is_closing():
            if self.wake is not None:
                self.wake()
            self.writer.write(wire.encode(message))

    def close(self) -> None:
        self.writer.close()


sandbox_spans: ContextVar[list[dict[str, Any]] | None] = ContextVar("sandbox_spans", default=None)
"""Set to a list by a caller that exports the supervisor's spans (the gateway's tracing): the
`span` of each answer to its calls is appended, as the sandbox sent it (to be checked there)."""


class PendingCall:
    """One call in flight, with what to do with its notifications and the server's requests."""

    __slots__ = ("future", "connection", "on_notification", "on_request", "span", "_last_note")

    def __init__(
        self,
        connection: Connection,
        on_notification: NotificationHandler | None,
        on_request: RequestHandler | None,
    ):
        self.future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.connection = connection
        self.on_notification = on_notification
        self.on_request = on_request
        self.span: dict[str, Any] | None = None
        """The supervisor's span for this call, as its answer gave it (`wire.SpanTiming`, unchecked)."""
        self._last_note: asyncio.Task[None] | None = None

    def note(self, method: str, params: dict[str, Any] | None) -> None:
        """Hand a notification to the caller's handler, in order, without holding up the channel."""
        if self.on_notification is None:
            return
        self._last_note = asyncio.create_task(self._deliver(self._last_note, method, params))

    async def _deliver(self, previous: asyncio.Task[None] | None, method: str, params: dict[str, Any] | None) -> None:
        if previous is not None:
            await previous
        try:
            outcome = self.on_notification(method, params)  # type: ignore[misc]
            if inspect.isawaitable(outcome):
                await outcome
        except Exception:
            log.exception("a notification handler failed on %s", method)

    async def notes_delivered(self) -> None:
        if self._last_note is not None:
            await self._last_note


class LineReader:
    """The channel's messages as lines, none held longer than `limit` bytes.

    A longer line is skipped as it arrives, never buffered whole, and `too_long` hears of its start;
    so is a line whose start shows it answers a call nobody waits for any more (`unwanted`).
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        limit: int,
        too_long: Callable[[bytes], None],
        unwanted: Callable[[bytes], bool],
    ):
        self._reader = reader
        self._limit = limit
        self._too_long = too_long
        self._unwanted = unwanted
        self._buffer = bytearray()
        self._scanned = 0  # no newline in the buffer before this
        self._skipping = False
        self._judged = False

    async def next(self) -> bytes | None:
        """The next non-empty line (without its newline); None once the channel is closed."""
        while True:
            end = self._buffer.find(b"\n", self._scanned)
            self._scanned = len(self._buffer) if end < 0 else 0
            if not self._skipping:
                if end > self._limit or (end < 0 and len(self._buffer) > self._limit):
                    self._too_long(bytes(self._buffer[:HEAD]))
                    self._skipping = True
                elif not self._judged and (end >= 0 or len(self._buffer) >= HEAD):
                    self._judged = True
                    self._skipping = self._unwanted(bytes(self._buffer[:HEAD]))
            if end >= 0:
                line = b"" if self._skipping else bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                self._skipping = self._judged = False
                if line:
                    return line
                continue
            if self._skipping:
                self._buffer.clear()
                self._scanned = 0
            chunk = await self._reader.read(READ_CHUNK)
            if not chunk:
                return None
            self._buffer += chunk


def own_socket(path: Path, owner: tuple[int, int] | None) -> int:
    """Make the socket just bound at `path` 0600 (and `owner`'s) without following its name; its inode.

    Refused if the name no longer holds a socket: something in the sandbox replaced it.
    """
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode):
            raise SandboxUnavailable(f"{path} was replaced while the gateway bound it; not following it")
        # An O_PATH descriptor takes no fchmod; its /proc link reaches the inode it holds, and only that.
        held = f"/proc/self/fd/{fd}"
        os.chmod(held, 0o600)
        if owner is not None:
            os.chown(held, *owner)
        return st.st_ino
    finally:
        os.close(fd)
