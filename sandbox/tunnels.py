"""The gateway's end of the sandbox's egress tunnels (the supervisor's is `sandbox.supervisor.proxy`).

A `tunnel_open` from the supervisor names a server and a host:port. Whether that server may go
there, where the name leads and whether that address is fair game is the `EgressPolicy`'s to
decide (the gateway's `gateway.egress`); this module only carries bytes both ways under the
window of `wire.Tunnel`, holds at most `wire.MAX_TUNNELS` per sandbox, and tells the policy how
each connection ended, with its byte counts, for the audit log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from sandbox import wire
from sandbox.channel import Connection

if TYPE_CHECKING:
    from sandbox.servers import ServerSpec

log = logging.getLogger(__name__)

IDLE_S = 300.0
"""A tunnel through which nothing went either way for this long is closed: each holds one of the
sandbox's MAX_TUNNELS and a socket of the gateway's."""


class EgressRefused(Exception):
    """A connection the gateway will not make; the message says why, `status` is the proxy's HTTP answer."""

    def __init__(self, message: str, status: int = 403):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Opened:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    address: str
    """The address actually connected to."""


class Sandbox(Protocol):
    """What the policy reads of a sandbox: who holds it and what it runs. The local manager's
    (`sandbox.running.Sandbox`) and the kubernetes backend's (`sandbox.kubernetes.KubeSandbox`)."""

    @property
    def id(self) -> str: ...
    @property
    def user_id(self) -> int | None: ...
    @property
    def tenant(self) -> str | None: ...
    @property
    def user(self) -> str | None: ...
    @property
    def servers(self) -> tuple[ServerSpec, ...] | None: ...


class EgressPolicy(Protocol):
    async def open(self, sandbox: Sandbox, server: str, host: str, port: int) -> Opened:
        """Connect for `server` of `sandbox` to host:port, or raise EgressRefused."""
        ...

    def finished(self, sandbox: Sandbox, server: str, host: str, port: int, *, address: str | None,
                 sent: int, received: int, outcome: str, error: str | None) -> None:
        """A connection ended (or was refused: address None); `sent` is bytes the server sent out."""
        ...


class TunnelRelay:
    """The tunnels of one sandbox's channel."""

    def __init__(self, policy: EgressPolicy, idle_s: float = IDLE_S):
        self.policy = policy
        self.idle_s = idle_s
        self.sandbox: Sandbox | None = None
        """Set once the manager holds the sandbox (`Sandbox.__post_init__`, `KubeSandbox.__post_init__`); before, nothing opens."""
        self._tunnels: dict[int, wire.Tunnel] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def on_message(self, connection: Connection, message: dict[str, Any]) -> None:
        tunnel_id = message.get("tunnel")
        if not isinstance(tunnel_id, int):
            return
        if message.get("type") == "tunnel_open":
            task = asyncio.create_task(self._open(connection, tunnel_id, message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        tunnel = self._tunnels.get(tunnel_id)
        if tunnel is not None:
            tunnel.receive(message)

    async def _open(self, connection: Connection, tunnel_id: int, message: dict[str, Any]) -> None:
        send = connection.send
        server, host, port = str(message.get("server", "")), str(message.get("host", "")), message.get("port")
        sandbox = self.sandbox
        if sandbox is None or not isinstance(port, int):
            send({"type": "tunnel_opened", "tunnel": tunnel_id, "error": "this sandbox has no egress", "status": 403})
            return
        if tunnel_id in self._tunnels or len(self._tunnels) >= wire.MAX_TUNNELS:
            send({"type": "tunnel_opened", "tunnel": tunnel_id, "status": 503,
                  "error": f"at most {wire.MAX_TUNNELS} connections at once leave a sandbox"})
            return
        try:
            opened = await self.policy.open(sandbox, server, host, port)
        except EgressRefused as exc:
            send({"type": "tunnel_opened", "tunnel": tunnel_id, "error": str(exc), "status": exc.status})
            outcome = "refused" if exc.status in (403, 429) else "failed"
            self.policy.finished(sandbox, server, host, port, address=None, sent=0, received=0, outcome=outcome,
                                 error=str(exc))
            return
        tunnel = wire.Tunnel(tunnel_id, opened.reader, opened.writer, send)
        if connection.writer.is_closing():
            tunnel.close("the sandbox's channel closed while connecting", tell=False)
        self._tunnels[tunnel_id] = tunnel
        send({"type": "tunnel_opened", "tunnel": tunnel_id, "error": None, "status": 200})
        watch = asyncio.create_task(self._close_when_idle(tunnel))
        try:
            await tunnel.pump()
        finally:
            watch.cancel()
            self._tunnels.pop(tunnel_id, None)
            # Seen from the server: what it sent is what this end received from across.
            self.policy.finished(sandbox, server, host, port, address=opened.address, sent=tunnel.received,
                                 received=tunnel.sent, outcome="error" if tunnel.error else "ok", error=tunnel.error)

    async def _close_when_idle(self, tunnel: wire.Tunnel) -> None:
        while not tunnel.closed:
            idle = time.monotonic() - tunnel.active_at
            if idle >= self.idle_s:
                tunnel.close(f"nothing went through for {self.idle_s:g}s")
                return
            await asyncio.sleep(self.idle_s - idle)

    def drop_all(self, reason: str) -> None:
        """The channel broke: the supervisor has dropped its ends already."""
        for tunnel in list(self._tunnels.values()):
            tunnel.close(reason, tell=False)
