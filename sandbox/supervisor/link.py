"""The supervisor's end of the channel: connect to the gateway, and again whenever it drops.

The supervisor is the side that connects, because gVisor cannot checkpoint a
sandbox that holds a listening or connected host socket: the gateway asks it to
`detach` first, and after a restore (or a gateway restart) it connects again.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from sandbox import wire
from sandbox.supervisor.child import log

if TYPE_CHECKING:
    from sandbox.supervisor.main import Supervisor

RETRY_FIRST = 0.02
RETRY_MAX = 0.5
"""Worst-case delay before a returning gateway is reconnected to."""


class _Channel(asyncio.Protocol):
    """One connection: lines in, dispatched as they arrive."""

    def __init__(self, supervisor: Supervisor):
        self._supervisor = supervisor
        self._lines = wire.LineSplitter()
        self._transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            for line in self._lines.feed(data):
                message = wire.decode(line)
                if message.get("type") == "detach":
                    log("detaching from the gateway")
                    self._drop()
                    return
                self._supervisor.on_message(message)
        except ValueError as exc:
            log(f"dropping the gateway connection: {exc}")
            self._drop()

    def _drop(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class Link:
    def __init__(self, path: str, supervisor: Supervisor):
        self.path = path
        self._supervisor = supervisor
        self._transport: asyncio.Transport | None = None

    @property
    def connected(self) -> bool:
        return self._transport is not None

    def send(self, message: wire.SupervisorMessage) -> None:
        """Queue a message for the gateway; dropped while disconnected (the next hello resyncs)."""
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(wire.encode(message))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = RETRY_FIRST
        while True:
            try:
                transport, channel = await loop.create_unix_connection(lambda: _Channel(self._supervisor), self.path)
            except OSError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = RETRY_FIRST
            self._transport = transport
            try:
                self.send(self._supervisor.hello())
                await channel.closed
            finally:
                self._transport = None
                transport.close()
                self._supervisor.on_disconnect()
