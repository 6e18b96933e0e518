"""The supervisor's end of the channel, either way round.

`Link` (runsc, Docker): the supervisor connects to the gateway's Unix socket, and again whenever
it drops. The supervisor is the side that connects there, because gVisor cannot checkpoint a
sandbox that holds a listening or connected host socket: the gateway asks it to `detach` first,
and after a restore (or a gateway restart) it connects again.

`Listener` (a Kubernetes pod): the supervisor listens on TCP and a gateway replica connects. The
pod is reachable by every gateway replica (and, were the NetworkPolicy wrong, by more), so a
connection counts only once its first message is an `attach` with the sandbox's token; one
gateway at a time, the last to attach. With a token file (the pod's Secret volume) the token is
read anew at every attach: a warm-pool pod is started before its user is known, and its claim
replaces the Secret, which the kubelet updates in place (an atomic swap of the volume's files);
from then on only the new token attaches, without a restart.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import TYPE_CHECKING, Any

from sandbox import wire
from sandbox.supervisor.child import log

if TYPE_CHECKING:
    from sandbox.supervisor.main import Supervisor

RETRY_FIRST = 0.02
RETRY_MAX = 0.5
"""Worst-case delay before a returning gateway is reconnected to."""
ATTACH_TIMEOUT = 10.0
"""Seconds a TCP connection has to attach before it is closed."""


class _Channel(asyncio.Protocol):
    """One connection: lines in, dispatched as they arrive."""

    def __init__(self, supervisor: Supervisor, on_attach: Any = None):
        """`on_attach(channel, message)`: the first message is an attach, given to it and not dispatched;
        it returns whether the connection may stay (None: no attach expected, as over the Unix socket)."""
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
                self._supervisor.on_message(message)
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
    """The supervisor's way to the gateway, whichever end connected: one transport, or none."""

    _transport: asyncio.Transport | None = None

    @property
    def connected(self) -> bool:
        return self._transport is not None

    def send(self, message: wire.SupervisorMessage) -> None:
        """Queue a message for the gateway; dropped while none is there (the next hello resyncs)."""
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(wire.encode(message))


class Link(_Outbound):
    """The channel over the Unix socket in the channel dir: the supervisor connects, and reconnects."""

    def __init__(self, path: str, supervisor: Supervisor):
        self.path = path
        self._supervisor = supervisor
        self._transport = None

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
                self._supervisor.on_connect()
                self.send(self._supervisor.hello())
                await channel.closed
            finally:
                self._transport = None
                transport.close()
                self._supervisor.on_disconnect()


class Listener(_Outbound):
    """The channel over TCP: the gateway connects and attaches with the token (`sandbox.wire`)."""

    def __init__(self, host: str, port: int, supervisor: Supervisor, token_file: str | None = None):
        """`token_file`: read at every attach (else the config's token, fixed)."""
        self.host, self.port = host, port
        self._supervisor = supervisor
        self._token_file = token_file
        self._transport = None
        self._channel: _Channel | None = None

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
            if self._channel is not None:
                self._channel.drop()

    def _new_channel(self) -> _Channel:
        channel = _Channel(self._supervisor, on_attach=self._attach)
        timeout = asyncio.get_running_loop().call_later(ATTACH_TIMEOUT, self._unless_attached, channel)
        channel.closed.add_done_callback(lambda _: self._closed(channel, timeout))
        return channel

    def _unless_attached(self, channel: _Channel) -> None:
        if channel is not self._channel:
            channel.drop()

    def _attach(self, channel: _Channel, message: dict[str, Any]) -> bool:
        token = message.get("token") if message.get("type") == "attach" else None
        current = self._token()
        if not current or not isinstance(token, str) or not hmac.compare_digest(token.encode(), current.encode()):
            log("refused a connection: no attach with the sandbox's token")
            return False
        previous = self._channel
        if previous is not None:
            # Another gateway replica took over: the calls of the previous one can no longer be answered.
            log("a gateway attached; dropping the previous one")
            self._channel = self._transport = None
            previous.drop()
            self._supervisor.on_disconnect()
        self._channel, self._transport = channel, channel.transport
        self._supervisor.on_connect()
        self.send(self._supervisor.hello(token=current))
        return True

    def _closed(self, channel: _Channel, timeout: asyncio.TimerHandle) -> None:
        timeout.cancel()
        if channel is self._channel:
            self._channel = self._transport = None
            self._supervisor.on_disconnect()
