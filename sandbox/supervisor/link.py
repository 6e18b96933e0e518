"""The supervisor's end of the channel: connect to the gateway, and again whenever it drops.

The supervisor is the side that connects, because gVisor cannot checkpoint a
sandbox that holds a listening or connected host socket: the gateway asks it to
`detach` first, and after a restore (or a gateway restart) it connects again.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from sandbox import wire
from sandbox.supervisor.child import log

if TYPE_CHECKING:
    from sandbox.supervisor.main import Supervisor

RETRY_FIRST = 0.02
RETRY_MAX = 0.5
"""Worst-case delay before a returning gateway is reconnected to."""


class Link:
    def __init__(self, path: str, supervisor: Supervisor):
        self.path = path
        self._supervisor = supervisor
        self._writer: asyncio.StreamWriter | None = None

    @property
    def connected(self) -> bool:
        return self._writer is not None

    def send(self, message: dict[str, Any]) -> None:
        """Queue a message for the gateway; dropped while disconnected (the next hello resyncs)."""
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(wire.encode(message))

    async def run(self) -> None:
        delay = RETRY_FIRST
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self.path, limit=wire.MAX_LINE)
            except OSError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = RETRY_FIRST
            self._writer = writer
            try:
                self.send(self._supervisor.hello())
                await self._serve(reader)
            finally:
                self._writer = None
                writer.close()
                try:
                    await writer.wait_closed()
                except OSError:
                    pass
                self._supervisor.on_disconnect()

    async def _serve(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                message = wire.decode(line)
                if message.get("type") == "detach":
                    log("detaching from the gateway")
                    return
                self._supervisor.on_message(message)
        except (ValueError, ConnectionError) as exc:
            log(f"dropping the gateway connection: {exc!r}")
