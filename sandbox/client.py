"""The gateway's end of a sandbox channel (see `sandbox.wire` for the messages).

The gateway listens on the socket in the sandbox's channel dir and the
supervisor inside connects to it, so a new gateway process, or a sandbox
restored from a checkpoint, simply gets a new connection. In a Kubernetes pod
the supervisor listens on TCP instead and the gateway connects (`connect`),
attaching with the token; from the hello on, both ways are the same. Calls are
multiplexed by id; results come back as the server produced them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import itertools
import logging
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from sandbox import wire
from sandbox.catalogs import Catalogs
from sandbox.channel import (
    READ_CHUNK,
    Connection,
    LineReader,
    NotificationHandler,
    PendingCall,
    RequestHandler,
    own_socket,
    sandbox_spans,
)
from sandbox.errors import SandboxDetached, SandboxRpcError, SandboxUnavailable
from sandbox.model_asks import ModelGate, ModelRelay
from sandbox.span_relay import SpanRelay, SpanSink
from sandbox.tunnels import EgressPolicy, TunnelRelay

log = logging.getLogger(__name__)

STATUS_METHOD = "server/status"
"""Method of the event a listener gets when a server (re)starts or fails; params are its status."""

HELLO_TIMEOUT = 10.0
"""Seconds a new connection has to say hello before it is dropped."""
_ANSWER_HEAD = re.compile(rb'\{"type":"(?:result|error)","id":(\d{1,18})[,}]')


@dataclass(frozen=True)
class SandboxEvent:
    """A server notification not tied to a call (list_changed, resources/updated, ...), or a status change."""

    server: str
    method: str
    params: dict[str, Any] | None


class SupervisorClient:
    def __init__(
        self,
        socket_path: Path | None = None,
        *,
        token: str | None = None,
        socket_owner: tuple[int, int] | None = None,
        on_request: RequestHandler | None = None,
        max_result_bytes: int = wire.MAX_LINE,
        egress: EgressPolicy | None = None,
        models: ModelGate | None = None,
        spans: SpanSink | None = None,
    ):
        """`token` is the secret the supervisor's hello must carry (None: any hello will do).
        `on_request` answers server requests that belong to no call (or whose call has no handler).
        A call whose answer is longer than `max_result_bytes` fails with a JSON-RPC error saying so;
        the answer is skipped as it arrives, never held.
        Without `socket_path`, the client only `connect`s (to a supervisor listening on TCP).
        `egress` decides the connections the sandbox's servers ask for (None: every one is refused);
        `models` answers their model asks (None: every one is refused); `spans` exports the spans
        they make (None: dropped)."""
        self.socket_path = Path(socket_path) if socket_path is not None else None
        self.address = str(socket_path)
        """Where the supervisor is, for messages: the socket, or host:port once connected."""
        self.max_result_bytes = max_result_bytes
        self._token = token
        self._socket_owner = socket_owner
        self._default_on_request = on_request
        self._listener: asyncio.AbstractServer | None = None
        self._socket_inode: int | None = None
        self._connection: Connection | None = None
        self._ready = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._disconnected.set()
        self._ids = itertools.count(1)
        self._calls: dict[int, PendingCall] = {}
        self._asks: dict[int, asyncio.Task[None]] = {}
        self.servers: dict[str, dict[str, Any]] = {}
        self.supervisor: dict[str, Any] = {}
        self._catalogs = Catalogs(self.request, lambda name: self.servers.get(name))
        self._listeners: list[Callable[[SandboxEvent], Any]] = []
        self._detached = False
        self._reading: asyncio.Task[None] | None = None
        self.wake: Callable[[], None] | None = None
        """Called before every message to the supervisor (the manager sets it to thaw a frozen sandbox)."""
        self.tunnels = TunnelRelay(egress) if egress is not None else None
        self.model_asks = ModelRelay(models)
        self.spans = SpanRelay(spans)

    # -- the socket ---------------------------------------------------------------------

    async def listen(self) -> None:
        """Start accepting the supervisor's connection (a stale socket file is replaced).

        The channel dir is the sandbox's to write: between any two steps here, code inside may
        rename a symlink over the socket's name. So no name in it is ever followed: the socket is
        bound (which fails on a name that exists, a symlink included), and its mode and owner are
        set through a descriptor opened without following, once it is known to be a socket.
        """
        self._detached = False
        if self._listener is not None:
            return
        path = self.socket_path
        if path is None:
            raise SandboxUnavailable("this channel connects to its supervisor over TCP; it has no socket to listen on")
        if len(os.fsencode(path)) >= 108:
            raise SandboxUnavailable(f"socket path too long for a Unix socket: {path}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # unlink never follows a symlink
            sock.bind(str(path))
            self._socket_inode = own_socket(path, self._socket_owner)
            self._listener = await asyncio.start_unix_server(self._accept, sock=sock, limit=READ_CHUNK)
        except OSError as exc:
            sock.close()
            raise SandboxUnavailable(f"cannot listen on {path}: {exc}") from None
        except BaseException:
            sock.close()
            raise

    async def _stop_listening(self) -> None:
        if self._listener is None:
            return
        self._listener.close()
        self._listener = None
        # Only our own socket file: another gateway may have taken the path over since.
        path = self.socket_path
        with contextlib.suppress(FileNotFoundError):
            if path is not None and os.lstat(path).st_ino == self._socket_inode:
                os.unlink(path)

    async def connect(self, host: str, port: int, timeout: float) -> None:
        """Connect to a supervisor listening on TCP (a pod), attach with the token and wait for its
        hello, trying again until `timeout` while nothing listens yet. A connection this client
        holds is closed first; other gateways' connections to the same supervisor stay (it keeps
        every gateway that attached, each with its own calls).
        Raises SandboxUnavailable if there is no hello in time (a wrong token: the supervisor hangs up)."""
        if self._token is None:
            raise ValueError("connecting over TCP needs the sandbox's token")
        self._detached = False
        if self._connection is not None:
            self._connection.close()
            await self._disconnected.wait()
        self.address = f"{host}:{port}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.02
        while True:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port, limit=READ_CHUNK), max(0.01, deadline - loop.time())
                )
                break
            except (OSError, asyncio.TimeoutError) as exc:
                if loop.time() + delay >= deadline:
                    raise SandboxUnavailable(f"cannot connect to the supervisor at {self.address}: {exc!r}") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
        attach: wire.Attach = {"type": "attach", "token": self._token}
        writer.write(wire.encode(attach))
        reading = asyncio.create_task(self._accept(reader, writer))
        ready = asyncio.create_task(self._ready.wait())
        try:
            await asyncio.wait({reading, ready}, timeout=max(0.01, deadline - loop.time()), return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if not self._ready.is_set():
            writer.close()
            raise SandboxUnavailable(f"the supervisor at {self.address} did not say hello (was the token right?)")
        self._reading = reading

    def _wake(self) -> None:
        if self.wake is not None:
            self.wake()

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    @property
    def in_flight(self) -> int:
        """Calls sent and not yet answered."""
        return len(self._calls)

    async def wait_ready(self, timeout: float) -> None:
        """Wait for the supervisor's hello (its servers have all started or failed by then)."""
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except asyncio.TimeoutError:
            raise SandboxUnavailable(f"the supervisor did not connect within {timeout:.0f}s") from None

    async def wait_disconnected(self) -> None:
        await self._disconnected.wait()

    async def detach(self, timeout: float = 10.0) -> None:
        """Stop listening and have the supervisor close its connection (so the sandbox can be checkpointed).

        The supervisor keeps trying to connect; `listen()` again lets it back in.
        """
        self._detached = True
        await self._stop_listening()
        connection = self._connection
        if connection is not None:
            connection.send({"type": "detach"})
            try:
                await asyncio.wait_for(self._disconnected.wait(), timeout)
            except asyncio.TimeoutError:
                connection.close()
                raise SandboxUnavailable("the supervisor did not detach") from None

    async def close(self) -> None:
        self._detached = True
        await self._stop_listening()
        if self._connection is not None:
            self._connection.close()
            await self._disconnected.wait()
        self._fail_calls(None, "the gateway closed the channel")

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = Connection(writer, self._wake)
        lines = LineReader(reader, self.max_result_bytes, self._too_long, self._unwanted)
        try:
            hello = await asyncio.wait_for(lines.next(), HELLO_TIMEOUT)
            if hello is None or not self._is_supervisor(wire.decode(hello)):
                # Code run in the sandbox can reach this socket too; only the supervisor knows the token.
                log.warning("refused a connection to %s: not the supervisor", self.address)
                return
            previous = self._connection
            if previous is not None:
                previous.close()  # a supervisor that reconnects replaces its old connection
            self._connection = connection
            self._disconnected.clear()
            self._dispatch(connection, wire.decode(hello))
            while line := await lines.next():
                self._dispatch(connection, wire.decode(line))
        except (ValueError, ConnectionError, asyncio.TimeoutError) as exc:
            log.warning("dropping the connection to %s: %r", self.address, exc)
        finally:
            writer.close()
            self._fail_calls(connection, "the sandbox's supervisor disconnected")
            if self.tunnels is not None:
                self.tunnels.drop_all("the sandbox's supervisor disconnected")
            self.model_asks.drop_all()
            if self._connection is connection:
                self._connection = None
                self._ready.clear()
                self._disconnected.set()

    def _too_long(self, head: bytes) -> None:
        """An answer longer than the limit: its call fails (a message of another kind is only dropped)."""
        match = _ANSWER_HEAD.match(head)
        call = self._calls.pop(int(match.group(1)), None) if match else None
        log.warning("skipped a message over %d bytes from %s: %r...", self.max_result_bytes, self.address, head[:48])
        if call is not None and not call.future.done():
            call.future.set_exception(SandboxRpcError(
                wire.INTERNAL_ERROR,
                f"the result is larger than the gateway's limit of {self.max_result_bytes} bytes per call",
                {"limit": self.max_result_bytes},
            ))

    def _unwanted(self, head: bytes) -> bool:
        """An answer to a call that is no longer in flight (cancelled, timed out): dropped unread."""
        match = _ANSWER_HEAD.match(head)
        return match is not None and int(match.group(1)) not in self._calls

    def _is_supervisor(self, hello: dict[str, Any]) -> bool:
        if hello.get("type") != "hello":
            return False
        if self._token is None:
            return True
        return hmac.compare_digest(str(hello.get("token", "")).encode(), self._token.encode())

    def _fail_calls(self, connection: Connection | None, reason: str) -> None:
        for call_id, call in list(self._calls.items()):
            if connection is None or call.connection is connection:
                del self._calls[call_id]
                if not call.future.done():
                    call.future.set_exception(SandboxUnavailable(reason))
        for task in list(self._asks.values()):
            task.cancel()

    # -- messages from the supervisor ---------------------------------------------------

    def _dispatch(self, connection: Connection, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "result" or kind == "error":
            call = self._calls.pop(message.get("id"), None)  # type: ignore[arg-type]
            if call is None or call.future.done():
                return
            span = message.get("span")
            call.span = span if isinstance(span, dict) else None
            if kind == "result":
                call.future.set_result(message.get("result") or {})
            else:
                call.future.set_exception(SandboxRpcError.from_error(message.get("error") or {}))
        elif kind == "note":
            self._on_note(message)
        elif kind == "ask":
            key = message["ask"]
            self._asks[key] = asyncio.create_task(self._answer(connection, key, message))
        elif kind == "server":
            name = message["server"]
            if message.get("state") == "removed":
                self.servers.pop(name, None)
                self._catalogs.invalidate(name)
                self._emit(SandboxEvent(name, STATUS_METHOD, {"state": "removed"}))
                return
            self.servers[name] = {k: message.get(k) for k in ("state", "initialize", "error", "revision")}
            self._catalogs.invalidate(name)
            self._emit(SandboxEvent(name, STATUS_METHOD, self.servers[name]))
        elif kind == "hello":
            self.servers = dict(message.get("servers") or {})
            self.supervisor = dict(message.get("supervisor") or {})
            for name in self._catalogs.known() | set(self.servers):
                self._catalogs.invalidate(name)
            self._ready.set()
        elif kind in ("tunnel_open", "tunnel_data", "tunnel_ack", "tunnel_close"):
            if self.tunnels is not None:
                self.tunnels.on_message(connection, message)
            elif kind == "tunnel_open":
                connection.send({"type": "tunnel_opened", "tunnel": message.get("tunnel", 0), "status": 403,
                                 "error": "this gateway grants no egress"})
        elif kind in ("model_ask", "model_cancel"):
            self.model_asks.on_message(connection, message)
        elif kind == "spans":
            self.spans.on_message(message)
        elif kind == "pong":
            call = self._calls.pop(message.get("id"), None)  # type: ignore[arg-type]
            if call is not None and not call.future.done():
                call.future.set_result({})

    def _on_note(self, message: dict[str, Any]) -> None:
        method, params, server = message.get("method", ""), message.get("params"), message.get("server", "")
        if method == "notifications/cancelled" and isinstance(params, dict):
            task = self._asks.get(params.get("requestId"))  # type: ignore[arg-type]
            if task is not None:
                task.cancel()  # the server withdrew its request
            return
        call = self._calls.get(message.get("id")) if message.get("id") is not None else None  # type: ignore[arg-type]
        if call is not None:
            call.note(method, params)
            return
        if method.endswith("/list_changed"):
            self._catalogs.invalidate(server)
        self._emit(SandboxEvent(server, method, params))

    async def _answer(self, connection: Connection, key: int, message: dict[str, Any]) -> None:
        call = self._calls.get(message.get("id")) if message.get("id") is not None else None  # type: ignore[arg-type]
        handler = call.on_request if call is not None and call.on_request is not None else self._default_on_request
        method, params = message.get("method", ""), message.get("params")
        reply: wire.Answer = {"type": "answer", "ask": key}
        try:
            if handler is None:
                raise SandboxRpcError(wire.METHOD_NOT_FOUND, f"no client is connected that can answer {method}")
            reply["result"] = await handler(method, params)
        except asyncio.CancelledError:
            reply["error"] = wire.error_object(wire.REQUEST_CANCELLED, "request cancelled")
        except SandboxRpcError as exc:
            reply["error"] = exc.to_error()
        except Exception as exc:
            log.exception("answering %s for %s failed", method, message.get("server"))
            reply["error"] = wire.error_object(wire.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
        finally:
            self._asks.pop(key, None)
        connection.send(reply)

    # -- events -------------------------------------------------------------------------

    def add_listener(self, listener: Callable[[SandboxEvent], Any]) -> Callable[[], None]:
        """Call `listener` for every event (list_changed and other session notifications, status changes).

        Returns a function that removes it. A listener may be async.
        """
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _emit(self, event: SandboxEvent) -> None:
        for listener in list(self._listeners):
            try:
                outcome = listener(event)
                if inspect.isawaitable(outcome):
                    asyncio.ensure_future(outcome)
            except Exception:
                log.exception("a sandbox event listener failed")

    # -- calls --------------------------------------------------------------------------

    async def request(
        self,
        server: str,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        on_notification: NotificationHandler | None = None,
        on_request: RequestHandler | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Send one JSON-RPC request to `server` and return its `result` as the server sent it.

        Notifications the server sends while handling it go to `on_notification`
        (in order, all delivered before this returns); its requests to the client
        (sampling, elicitation, roots) go to `on_request`, whose return value is
        the answer. Raises SandboxRpcError for the server's JSON-RPC errors,
        SandboxUnavailable if the sandbox is gone or the channel breaks, and
        TimeoutError after `timeout` seconds (the server is told to cancel).
        """
        connection = self._connection
        if connection is None or not self._ready.is_set():
            self._raise_unavailable()
        call_id = next(self._ids)
        call = PendingCall(connection, on_notification, on_request)
        self._calls[call_id] = call
        message: wire.Call = {"type": "call", "id": call_id, "server": server, "method": method}
        if params is not None:
            message["params"] = params
        connection.send(message)
        try:
            result = await asyncio.wait_for(call.future, timeout) if timeout is not None else await call.future
        except (asyncio.CancelledError, asyncio.TimeoutError):
            if self._calls.pop(call_id, None) is not None:
                connection.send({"type": "cancel", "id": call_id, "reason": "cancelled by the gateway"})
            raise
        finally:
            self._calls.pop(call_id, None)
            if call.span is not None and (spans := sandbox_spans.get()) is not None:
                spans.append(call.span)
        await call.notes_delivered()
        return result

    def _raise_unavailable(self) -> NoReturn:
        if self._detached:
            raise SandboxDetached("the gateway let go of this sandbox (it is hibernating or being reclaimed)")
        raise SandboxUnavailable("the sandbox's supervisor is not connected")

    async def notify(self, server: str | None, method: str, params: dict[str, Any] | None = None) -> None:
        """Send a client notification (e.g. roots/list_changed) to one server, or to all with None."""
        connection = self._connection
        if connection is None:
            raise SandboxUnavailable("the sandbox's supervisor is not connected")
        connection.send({"type": "notify", "server": server, "method": method, "params": params})

    async def configure(self, servers: list[dict[str, Any]], timeout: float = 120.0) -> dict[str, Any]:
        """Have the supervisor run exactly these servers (`ServerConfig` fields each); returns once
        the new ones have started or failed, with every server's status."""
        result = await self._ask({"type": "configure", "servers": servers}, timeout,
                                 f"the supervisor did not start the servers within {timeout:.0f}s")
        self.servers = {name: dict(status) for name, status in (result.get("servers") or {}).items()}
        return result

    async def ping(self, timeout: float = 5.0) -> None:
        """A round trip to the supervisor itself (no server involved)."""
        await self._ask({"type": "ping"}, timeout, f"the supervisor did not answer a ping within {timeout:.0f}s")

    async def warm(self, modules: list[str], timeout: float = 120.0) -> bool:
        """Have the supervisor start its fork server and wait for its imports (a template's, before
        its checkpoint); False if it has none."""
        result = await self._ask({"type": "warm", "modules": modules}, timeout, f"the fork server did not warm up within {timeout:.0f}s")
        return bool(result.get("forks"))

    async def cloned(self, token: str, timeout: float = 60.0) -> None:
        """Tell a sandbox cloned from a template that it is one: its hellos carry `token` from now on,
        and its workspace (its user's, not the template's) is shared with its servers' group."""
        await self._ask({"type": "cloned", "token": token}, timeout, f"the cloned supervisor did not answer within {timeout:.0f}s")
        self._token = token

    async def _ask(self, message: dict[str, Any], timeout: float, timed_out: str) -> dict[str, Any]:
        """A request to the supervisor itself, under a fresh id; its result, or SandboxUnavailable."""
        connection = self._connection
        if connection is None or not self._ready.is_set():
            self._raise_unavailable()
        call_id = next(self._ids)
        call = PendingCall(connection, None, None)
        self._calls[call_id] = call
        connection.send({**message, "id": call_id})  # type: ignore[arg-type]
        try:
            return await asyncio.wait_for(call.future, timeout)
        except asyncio.TimeoutError:
            raise SandboxUnavailable(timed_out) from None
        finally:
            self._calls.pop(call_id, None)

    # -- catalog ------------------------------------------------------------------------

    async def catalog(self) -> dict[str, dict[str, Any]]:
        """Per server: its tools, resources, resourceTemplates, prompts, serverInfo, capabilities, state.

        Lists are fetched (all pages) on first use and cached until the server
        says they changed or restarts (`sandbox.catalogs`). A server that failed to
        start has `state` "failed", an `error` and empty lists.
        """
        if not self._ready.is_set():
            self._raise_unavailable()
        return await self._catalogs.of(sorted(self.servers))
