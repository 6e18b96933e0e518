"""The channel between the gateway and a sandbox's supervisor.

One Unix stream socket per sandbox, carrying newline-delimited JSON objects,
each with a `type`. The gateway listens on `<channel dir>/gateway.sock` and the
supervisor connects to it from inside (`/run/mcpfleet/gateway.sock`). That way
round is the one gVisor can checkpoint: a sandbox holding a connected or
listening host socket cannot be saved, so before a checkpoint the gateway asks
the supervisor to `detach`, and afterwards (or after a gateway restart) the
supervisor simply connects again.

In a Kubernetes pod it is the other way round (`python -m sandbox.supervisor --listen HOST:PORT`):
the supervisor listens on TCP and a gateway replica connects; its first message must be an
`attach` with the sandbox's token (else the supervisor hangs up unanswered), and only then does
the supervisor say `hello`. Every gateway replica that attached keeps its connection (up to a
cap, the oldest dropped beyond): answers, notes and asks go to the gateway whose call they belong
to, `pong` and configure's result to the one that asked, `server` to all; a tunnel or a model
request stays with the gateway it was sent to. Ids are each gateway's own (two may send the same).
Everything else is the same either way.

gateway -> supervisor
    attach  {"token"}                              TCP only, first on every connection: the sandbox's
                                                   token, compared in constant time
    call    {"id", "server", "method", "params"}   a JSON-RPC request for one server
    cancel  {"id", "reason"}                       the gateway gave up on a call
    answer  {"ask", "result" | "error"}            reply to a server's request (an `ask`)
    notify  {"server", "method", "params"}         a client notification for a server (null: all)
    configure {"id", "servers": [ServerConfig]}    run exactly these servers: stop the ones gone or
                                                   changed, start the new ones; answered by a
                                                   `result` {"servers": {name: status}} once they settled
    warm    {"id", "modules"}                      start the fork server, preloading these modules too,
                                                   and answer {"forks": bool} once it has imported them
    cloned  {"id", "token"}                        to a sandbox cloned from a template, first: its
                                                   own token for its hellos from now on, and its
                                                   workspace is a new one to share; answered by an
                                                   empty `result`
    detach  {}                                     close the channel and reconnect later
    ping    {"id"}
    tunnel_opened {"tunnel", "error": str | null, "status": int}   the gateway's answer to a
                                                   `tunnel_open`: connected (error null), or refused
                                                   (status 403, 429) or unreachable (502)
    model_reply {"ask", "status"?, "content_type"?, "data", "done"}   a piece of the answer to a
                                                   `model_ask`, written to the server as it comes: the
                                                   first carries the HTTP status and content type;
                                                   `data` is text (one JSON body, an NDJSON line, an
                                                   SSE event); `done`: the last piece

supervisor -> gateway
    hello   {"token", "servers": {name: status}, "supervisor": {...}}   first message on every connection;
                                                   without the sandbox's token the gateway hangs up
    result  {"id", "result", "span"?}              a call's JSON-RPC result, as the server sent it
    error   {"id", "error", "span"?}               a call's JSON-RPC error object, as the server sent it
    note    {"id" | null, "server", "method", "params"}   a server notification; `id` names the call it belongs to
    ask     {"ask", "id" | null, "server", "method", "params"}  a server's request to the client (sampling, ...)
    server  {"server", ...status}                  a server was (re)started, failed, or removed
                                                   by a `configure` (state "removed")
    pong    {"id"}
    tunnel_open {"tunnel", "server", "host", "port"}   a server asked the egress proxy for host:port
    model_ask {"ask", "server", "method", "path", "body"}   a server declaring inference asked its model
                                                   endpoint: the HTTP method, the path without the
                                                   server's token (`/api/chat`, `/v1/chat/completions`)
                                                   and the body as text; answered by `model_reply`s
    model_cancel {"ask"}                           the server hung up before the answer's last piece
    spans   {"server", "data"}                     an OTLP/HTTP trace export a server POSTed to its trace
                                                   endpoint (`supervisor.traces`): the protobuf body, base64

either way, for an open tunnel (see `Tunnel`)
    tunnel_data {"tunnel", "data"}                 bytes (base64), at most TUNNEL_CHUNK before encoding
    tunnel_ack  {"tunnel", "bytes"}                the receiver wrote that many bytes on: the sender may
                                                   send them again (at most TUNNEL_WINDOW unacknowledged)
    tunnel_close {"tunnel", "error": str | null}   this end is closed; so must the other be

An `ask` names the call it belongs to when the supervisor can tell: the only call in flight to that
server, or the call whose id the server's request names in `params._meta["io.mcpfleet/relatedRequestId"]`
(stdio carries no such tie, so a server with several calls in flight names it there). A server may
also name its question in `params._meta["io.mcpfleet/inputKey"]`: a 2026-07-28 client is asked it as
`input_required` under that key.

A `span` {"id", "start_ns", "end_ns"} comes with the answer to a call whose `params._meta` had a
`traceparent`: the supervisor continued that trace with a span of its own (the id, 16 hex digits,
which is the parent in the `traceparent` the server got; its times in ns since the epoch). The
sandbox has no network, so the gateway exports that span for it (`traced_params`, `SpanTiming`).
A server's own spans (its OpenTelemetry SDK's) come as `spans` exports, whenever it sends them.

A server status is {"state": "idle" | "starting" | "ready" | "failed", "initialize": <its
initialize result> | null, "error": str | null, "revision": str | null}; "idle": not started yet
(servers start on first use): the first `call` to it starts it and waits for it, as for "starting".

Each message is typed below (`GatewayMessage`, `SupervisorMessage`): both ends build them as
these TypedDicts, so the type checker holds them to this table.

Which call a `note` or an `ask` belongs to: progress by its token (the supervisor
gives each call a token of its own and restores the caller's); anything else is
tied to a call only while it is the server's only call in flight, since stdio
carries no link between a request and what the server sends meanwhile. List
changes and resource updates are never tied to a call.

This module is imported inside the sandbox: standard library only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import time
from collections.abc import Callable
from typing import Any, Literal, NotRequired, TypedDict

CHANNEL_DIR = "/run/mcpfleet"
"""Where the channel dir appears inside the sandbox."""
SOCKET_NAME = "gateway.sock"
CONFIG_NAME = "supervisor.json"

TUNNEL_CHUNK = 16 * 1024
"""Bytes of a tunnel's stream per `tunnel_data` message (before base64)."""
TUNNEL_WINDOW = 256 * 1024
"""Bytes a tunnel's end may have sent and not yet had acknowledged: what the channel and the far
end's memory hold of one tunnel at most, so a slow reader slows its sender instead of filling them."""
MAX_TUNNELS = 32
"""Tunnels open at once per sandbox; beyond them the egress proxy answers 503."""
MAX_MODEL_ASKS = 16
"""Model requests in progress at once per sandbox; beyond them the model endpoint answers 429."""
MAX_SPANS_BODY = 1024 * 1024
"""Largest trace export (OTLP protobuf, before base64) a server may send; beyond it the endpoint answers 413."""

MAX_LINE = 64 * 1024 * 1024
"""Longest message either side accepts; a tool result can be large. The gateway sets its own,
lower limit on answers (`SupervisorClient(max_result_bytes=)`): a longer `result` or `error` fails
its call and is skipped as it arrives, never held whole."""

# JSON-RPC error codes the supervisor itself produces.
RELATED_REQUEST_META = "io.mcpfleet/relatedRequestId"
"""In a server's request's `_meta`: the id of the supervisor's call it asks for (see `ask` above)."""
INPUT_KEY_META = "io.mcpfleet/inputKey"
"""In a server's request's `_meta`: its name for the question (the key of `inputRequests`)."""

INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
METHOD_NOT_FOUND = -32601
REQUEST_CANCELLED = -32800

# -- the messages, typed as the table above --------------------------------------------------


class ErrorObject(TypedDict):
    code: int
    message: str
    data: NotRequired[Any]


class ServerStatus(TypedDict):
    state: str
    initialize: NotRequired[dict[str, Any] | None]
    error: NotRequired[str | None]
    revision: NotRequired[str | None]


class Call(TypedDict):
    type: Literal["call"]
    id: int
    server: str
    method: str
    params: NotRequired[dict[str, Any] | None]


class Cancel(TypedDict):
    type: Literal["cancel"]
    id: int
    reason: str


class Answer(TypedDict):
    type: Literal["answer"]
    ask: int
    result: NotRequired[dict[str, Any]]
    error: NotRequired[ErrorObject]


class Notify(TypedDict):
    type: Literal["notify"]
    server: str | None
    method: str
    params: dict[str, Any] | None


class Configure(TypedDict):
    type: Literal["configure"]
    id: int
    servers: list[dict[str, Any]]


class Attach(TypedDict):
    type: Literal["attach"]
    token: str


class Warm(TypedDict):
    type: Literal["warm"]
    id: int
    modules: list[str]


class Cloned(TypedDict):
    """A sandbox cloned from a template's checkpoint (`sandbox.templates`) has the template's token in
    memory, and prepared the template's workspace, until it is told it is a clone."""

    type: Literal["cloned"]
    id: int
    token: str


class Detach(TypedDict):
    type: Literal["detach"]


class Ping(TypedDict):
    type: Literal["ping"]
    id: int


class TunnelOpen(TypedDict):
    type: Literal["tunnel_open"]
    tunnel: int
    server: str
    host: str
    port: int


class TunnelOpened(TypedDict):
    type: Literal["tunnel_opened"]
    tunnel: int
    error: str | None
    status: int


class TunnelData(TypedDict):
    type: Literal["tunnel_data"]
    tunnel: int
    data: str


class TunnelAck(TypedDict):
    type: Literal["tunnel_ack"]
    tunnel: int
    bytes: int


class TunnelClose(TypedDict):
    type: Literal["tunnel_close"]
    tunnel: int
    error: str | None


TunnelMessage = TunnelData | TunnelAck | TunnelClose


class ModelReply(TypedDict):
    type: Literal["model_reply"]
    ask: int
    status: NotRequired[int]
    content_type: NotRequired[str]
    data: str
    done: bool


GatewayMessage = (Attach | Call | Cancel | Answer | Notify | Configure | Warm | Cloned | Detach | Ping | TunnelOpened | TunnelMessage
                  | ModelReply)


class Hello(TypedDict):
    type: Literal["hello"]
    token: str
    servers: dict[str, ServerStatus]
    supervisor: dict[str, Any]


class SpanTiming(TypedDict):
    id: str
    start_ns: int
    end_ns: int


class Result(TypedDict):
    type: Literal["result"]
    id: Any
    result: Any
    span: NotRequired[SpanTiming]


class Error(TypedDict):
    type: Literal["error"]
    id: Any
    error: ErrorObject
    span: NotRequired[SpanTiming]


class Note(TypedDict):
    type: Literal["note"]
    id: int | None
    server: str
    method: str
    params: dict[str, Any] | None


class Ask(TypedDict):
    type: Literal["ask"]
    ask: int
    id: int | None
    server: str
    method: str
    params: dict[str, Any] | None


class Server(ServerStatus):
    type: Literal["server"]
    server: str


class Pong(TypedDict):
    type: Literal["pong"]
    id: Any


class ModelAsk(TypedDict):
    type: Literal["model_ask"]
    ask: int
    server: str
    method: str
    path: str
    body: str


class ModelCancel(TypedDict):
    type: Literal["model_cancel"]
    ask: int


class Spans(TypedDict):
    type: Literal["spans"]
    server: str
    data: str


SupervisorMessage = (Hello | Result | Error | Note | Ask | Server | Pong | TunnelOpen | TunnelMessage | ModelAsk
                     | ModelCancel | Spans)


_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False)
_decode = json.JSONDecoder().decode


def encode(message: GatewayMessage | SupervisorMessage | dict[str, Any]) -> bytes:
    return (_encoder.encode(message) + "\n").encode()


def decode(line: bytes) -> dict[str, Any]:
    message = _decode(line.decode())
    if not isinstance(message, dict):
        raise ValueError("a message must be a JSON object")
    return message


class LineSplitter:
    """Cuts a byte stream into lines, as it arrives; a line longer than `limit` is an error."""

    def __init__(self, limit: int = MAX_LINE):
        self.limit = limit
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> list[bytes]:
        """The complete lines `data` ends (without their newlines, empty ones dropped)."""
        if b"\n" not in data:
            self._parts.append(data)
            self._size += len(data)
            if self._size > self.limit:
                self._parts, self._size = [], 0
                raise ValueError(f"a line longer than {self.limit} bytes")
            return []
        if self._parts:
            data = b"".join(self._parts) + data
            self._parts, self._size = [], 0
        lines = data.split(b"\n")
        rest = lines.pop()
        if rest:
            if len(rest) > self.limit:
                raise ValueError(f"a line longer than {self.limit} bytes")
            self._parts, self._size = [rest], len(rest)
        return [line for line in lines if line]


def error_object(code: int, message: str, data: Any = None) -> ErrorObject:
    error: ErrorObject = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return error


class Tunnel:
    """One end of a relayed TCP connection: a socket on this side, the other end across the channel.

    `pump()` reads the socket and sends `tunnel_data`, pausing while TUNNEL_WINDOW bytes are
    unacknowledged; `receive()` takes the other end's messages: data is written to the socket and
    acknowledged once the socket has taken it (so a reader that does not read holds up its sender,
    not the channel). Either end closing closes both. Used alike by the supervisor's egress proxy
    and by the gateway.
    """

    def __init__(self, tunnel_id: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 send: Callable[[Any], None]):
        self.id = tunnel_id
        self.reader, self.writer = reader, writer
        self._send = send
        self._credit = TUNNEL_WINDOW
        self._credit_back = asyncio.Event()
        self._in_flight = 0  # received and not yet acknowledged
        self._to_ack = 0
        self._acking: asyncio.Task[None] | None = None
        self.sent = 0
        """Bytes read from the socket and sent across."""
        self.received = 0
        """Bytes received from across and written to the socket."""
        self.error: str | None = None
        self.closed = False
        self.active_at = time.monotonic()
        """When bytes last went either way."""

    def forward(self, data: bytes) -> None:
        """Send bytes this end already holds (they count against the window like any others)."""
        for start in range(0, len(data), TUNNEL_CHUNK):
            chunk = data[start:start + TUNNEL_CHUNK]
            self._credit -= len(chunk)
            self.sent += len(chunk)
            self.active_at = time.monotonic()
            self._send({"type": "tunnel_data", "tunnel": self.id, "data": base64.b64encode(chunk).decode()})

    async def pump(self) -> None:
        """Socket to channel until either end closes."""
        try:
            while not self.closed:
                if self._credit <= 0:
                    self._credit_back.clear()
                    await self._credit_back.wait()
                    continue
                data = await self.reader.read(min(TUNNEL_CHUNK, self._credit))
                if not data or self.closed:
                    break
                self.forward(data)
        except (OSError, ConnectionError) as exc:
            self.close(f"{type(exc).__name__}: {exc}")
        finally:
            self.close(None)

    def receive(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if self.closed:
            return
        if kind == "tunnel_ack":
            count = message.get("bytes")
            if isinstance(count, int) and count > 0:
                self._credit = min(TUNNEL_WINDOW, self._credit + count)
                self._credit_back.set()
        elif kind == "tunnel_data":
            try:
                data = base64.b64decode(str(message.get("data", "")), validate=True)
            except (binascii.Error, ValueError):
                self.close("the other end sent data that is not base64")
                return
            self._in_flight += len(data)
            if len(data) > TUNNEL_CHUNK or self._in_flight > TUNNEL_WINDOW:
                self.close("the other end sent more than the window allows")
                return
            self.received += len(data)
            self.active_at = time.monotonic()
            self.writer.write(data)
            self._to_ack += len(data)
            if self._acking is None:
                self._acking = asyncio.ensure_future(self._ack())
        elif kind == "tunnel_close":
            self.close(message.get("error"), tell=False)

    async def _ack(self) -> None:
        """Acknowledge what the socket took, once it took it."""
        try:
            while self._to_ack and not self.closed:
                await self.writer.drain()
                count, self._to_ack = self._to_ack, 0
                self._in_flight -= count
                self._send({"type": "tunnel_ack", "tunnel": self.id, "bytes": count})
        except (OSError, ConnectionError) as exc:
            self.close(f"{type(exc).__name__}: {exc}")
        finally:
            self._acking = None

    def close(self, error: str | None, *, tell: bool = True) -> None:
        """Close this end; `tell`: say so to the other end (not when it said so first)."""
        if self.closed:
            return
        self.closed = True
        self.error = error
        self._credit_back.set()
        self.writer.close()
        if tell:
            self._send({"type": "tunnel_close", "tunnel": self.id, "error": error})


# -- trace context (W3C traceparent) ------------------------------------------------------------

_HEX = frozenset("0123456789abcdef")


def traced_params(params: dict[str, Any] | None) -> tuple[dict[str, Any], str] | None:
    """`params` with its `_meta.traceparent` (if a valid one) made the child of a new span, and that
    span's id; None when the call carries no trace context (then nothing is traced inside the sandbox)."""
    meta = (params or {}).get("_meta")
    parent = meta.get("traceparent") if isinstance(meta, dict) else None
    if not isinstance(parent, str) or not valid_traceparent(parent):
        return None
    version, trace_id, _, flags = parent.split("-")
    assert params is not None and isinstance(meta, dict)
    span_id = os.urandom(8).hex()
    return {**params, "_meta": {**meta, "traceparent": f"{version}-{trace_id}-{span_id}-{flags}"}}, span_id


def valid_traceparent(value: str) -> bool:
    parts = value.split("-")
    if len(parts) != 4 or [len(p) for p in parts] != [2, 32, 16, 2] or not all(set(p) <= _HEX for p in parts):
        return False
    return parts[0] != "ff" and parts[1] != "0" * 32 and parts[2] != "0" * 16
