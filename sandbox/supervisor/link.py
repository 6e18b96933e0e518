"""The supervisor's end of the channel, either way round.

`Link` (runsc, Docker): the supervisor connects to the gateway's Unix socket, and again whenever
it drops. The supervisor is the side that connects there, because gVisor cannot checkpoint a
sandbox that holds a listening or connected host socket: the gateway asks it to `detach` first,
and after a restore (or a gateway restart) it connects again. One connection at a time.

`Listener` (a Kubernetes pod): the supervisor listens on TCP and gateway replicas connect. The
pod is reachable by every gateway replica (and, were the NetworkPolicy wrong, by more), so a
connection counts only once its first message is an `attach` with the sandbox's token. Every
replica that attached keeps its connection (up to `MAX_GATEWAYS`, the oldest dropped beyond):
any replica may serve any call of the sandbox's user, and two calls served at the same moment by
two replicas must not interrupt each other. With a token file (the pod's Secret volume) the token
is read anew at every attach: a warm-pool pod is started before its user is known, and its claim
replaces the Secret, which the kubelet updates in place (an atomic swap of the volume's files);
from then on only the new token attaches, without a restart.

Each connection has a key of its own (`Gateway`), which the supervisor tells its messages by:
what a gateway asked is answered to that gateway only, and what one gateway drops ends only what
it had open (`Supervisor.on_disconnect`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import socket
from typing import TYPE_CHECKING, Any

from sandbox import wire
from sandbox.supervisor.child import log

if TYPE_CHECKING:
    from sandbox.supervisor.main import Supervisor

Gateway = int
"""The key of one gateway connection, never reused within a supervisor's life."""

RETRY_FIRST = 0.02
RETRY_MAX = 0.5
"""Worst-case delay before a returning gateway is reconnected to."""
ATTACH_TIMEOUT = 10.0
"""Seconds a TCP connection has to attach before it is closed."""
MAX_GATEWAYS = 16
"""Attached connections kept at once; one more drops the oldest (a replica that restarted leaves
its old connection behind until the kernel notices; the cap bounds what a token holder can open)."""
MAX_UNATTACHED = 64
"""Connections waiting to attach at once; one more drops the oldest (a flood without the token holds
no more than this, and a gateway, which attaches as soon as it connects, still gets through)."""
KEEPALIVE = (30, 10, 3)
"""TCP keepalive of an attached connection (idle seconds, interval, probes): a replica whose node
died or was cut off sends no FIN, and what it had open is ended once the probes go unanswered."""

_keys = itertools.count(1)


class _Channel(asyncio.Protocol):
    """One connection: lines in, dispatched as they arrive, under the connection's key."""

    def __init__(self, supervisor: Supervisor, on_attach: Any = None):
        """`on_attach(channel, message)`: the first message is an attach, given to it and not dispatched;
        it returns whether the connection may stay (None: no attach expected, as over the Unix socket)."""
        self.key: Gateway = next(_keys)
        self._supervisor = supervisor
        self._on_attach = on_attach
        self._lines = wire.LineSplitter()
        self._transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._transport

    def data_received(self, data: bytes) -> None:
        try:
            for line in self._lines.feed(data):
                if self._transport is None or self._transport.is_closing():
                    return  # dropped meanwhile (refused, or replaced by a newer one): nothing more of it counts
                message = wire.decode(line)
                if self._on_attach is not None:
                    on_attach, self._on_attach = self._on_attach, None
                    if not on_attach(self, message):
                        self._drop()
                        return
                    continue
                if message.get("type") == "detach":
                    log("detaching from the gateway")
                    self._supervisor.on_detach()
                    self._drop()
                    return
                self._supervisor.on_message(message, self.key)
        except ValueError as exc:
            log(f"dropping the gateway connection: {exc}")
            self._drop()

    def drop(self) -> None:
        self._drop()

    def _drop(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class _Outbound:
    """The supervisor's way to the gateways, whichever end connected: a transport per connection."""

    def __init__(self) -> None:
        self._transports: dict[Gateway, asyncio.Transport] = {}  # in the order they attached

    @property
    def connected(self) -> bool:
        return bool(self._transports)

    def newest(self) -> Gateway | None:
        """The gateway that attached last (None: none is there), for what no gateway asked for."""
        return next(reversed(self._transports), None)

    def is_connected(self, gateway: Gateway) -> bool:
        return gateway in self._transports

    def send(self, message: wire.SupervisorMessage, to: Gateway | None = None) -> None:
        """Queue a message for gateway `to`, or for every gateway (None); dropped for one that is
        gone (whatever it had open was ended with it) and while none is there (the next hello resyncs)."""
        if to is None:
            data = wire.encode(message)
            for transport in self._transports.values():
                if not transport.is_closing():
                    transport.write(data)
            return
        one = self._transports.get(to)
        if one is not None and not one.is_closing():
            one.write(wire.encode(message))


class Link(_Outbound):
    """The channel over the Unix socket in the channel dir: the supervisor connects, and reconnects."""

    def __init__(self, path: str, supervisor: Supervisor):
        super().__init__()
        self.path = path
        self._supervisor = supervisor

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
            self._transports = {channel.key: transport}
            try:
                self._supervisor.on_connect(channel.key)
                self.send(self._supervisor.hello(), channel.key)
                await channel.closed
            finally:
                self._transports = {}
                transport.close()
                self._supervisor.on_disconnect(channel.key)


class Listener(_Outbound):
    """The channel over TCP: gateways connect and attach with the token (`sandbox.wire`)."""

    def __init__(self, host: str, port: int, supervisor: Supervisor, token_file: str | None = None):
        """`token_file`: read at every attach (else the config's token, fixed)."""
        super().__init__()
        self.host, self.port = host, port
        self._supervisor = supervisor
        self._token_file = token_file
        self._channels: dict[Gateway, _Channel] = {}  # attached, oldest first
        self._unattached: dict[_Channel, None] = {}  # oldest first

    def _token(self) -> str:
        """The token a gateway must attach with now ("" when there is none: then nobody attaches)."""
        if self._token_file is None:
            return self._supervisor.config.token
        try:
            with open(self._token_file) as f:
                return f.read().strip()
        except OSError as exc:
            log(f"cannot read the token file: {exc.strerror}")
            return ""

    async def run(self) -> None:
        if not self._token():
            raise RuntimeError("listening on TCP needs a token to check gateways by")
        loop = asyncio.get_running_loop()
        server = await loop.create_server(self._new_channel, self.host, self.port, reuse_address=True)
        log(f"listening on {self.host}:{self.port}")
        try:
            await server.serve_forever()
        finally:
            server.close()
            for channel in [*self._channels.values(), *self._unattached]:
                channel.drop()

    def _new_channel(self) -> _Channel:
        if len(self._unattached) >= MAX_UNATTACHED:
            log(f"a connection came with {MAX_UNATTACHED} others still to attach; dropping the oldest")
            oldest = next(iter(self._unattached))
            del self._unattached[oldest]
            oldest.drop()
        channel = _Channel(self._supervisor, on_attach=self._attach)
        self._unattached[channel] = None
        timeout = asyncio.get_running_loop().call_later(ATTACH_TIMEOUT, self._unless_attached, channel)
        channel.closed.add_done_callback(lambda _: self._closed(channel, timeout))
        return channel

    def _unless_attached(self, channel: _Channel) -> None:
        if channel in self._unattached:
            channel.drop()

    def _attach(self, channel: _Channel, message: dict[str, Any]) -> bool:
        self._unattached.pop(channel, None)
        token = message.get("token") if message.get("type") == "attach" else None
        current = self._token()
        if not current or not isinstance(token, str) or not hmac.compare_digest(token.encode(), current.encode()):
            log("refused a connection: no attach with the sandbox's token")
            return False
        transport = channel.transport
        if transport is None or transport.is_closing():
            return False
        while len(self._channels) >= MAX_GATEWAYS:
            oldest = next(iter(self._channels.values()))
            log(f"a gateway attached with {MAX_GATEWAYS} others attached; dropping the oldest")
            oldest.drop()
            self._forget(oldest)
        self._channels[channel.key] = channel
        self._transports[channel.key] = transport
        _keep_alive(transport)
        self._supervisor.on_connect(channel.key)
        self.send(self._supervisor.hello(token=current), channel.key)
        return True

    def _closed(self, channel: _Channel, timeout: asyncio.TimerHandle) -> None:
        timeout.cancel()
        self._unattached.pop(channel, None)
        self._forget(channel)

    def _forget(self, channel: _Channel) -> None:
        """The connection is gone or going: what it had open ends now, once."""
        if self._channels.pop(channel.key, None) is not None:
            self._transports.pop(channel.key, None)
            self._supervisor.on_disconnect(channel.key)


def _keep_alive(transport: asyncio.Transport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):  # not Linux, or a socket without these options
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in zip(("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT"), KEEPALIVE, strict=True):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
