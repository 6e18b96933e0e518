"""The fast path for a `tools/call` in a 2025-11-25 session, beside the SDK's session transport.

The SDK's path for one call in a session, after authentication and the limits: the transport parses
and validates the body again, opens a memory stream per request and an `EventSourceResponse` in a
task group, passes the message to the session's read loop, whose dispatcher spawns the handler in a
task of its own; the answer goes back through the session's write stream, a router task, the
request's stream and the SSE writer task. Here the same call runs in the request's own task, from
the message the limits middleware parsed, through the same kernel (`ServerRunner` over the session's
own `Connection`, so the same middleware chain, handler, log-level gate and session tool sets), and
its events are written straight to the response: `text/event-stream` at once, notifications as they
come, then the answer, as the SDK's session path answers.

What lives in the SDK's session state is kept here for these calls, with the same meaning:

| SDK (session transport, dispatcher)       | here                                                     |
|-------------------------------------------|----------------------------------------------------------|
| session lookup, owner check, terminated   | the same checks against the session manager; any miss → SDK |
| idle countdown suspended while in flight  | the same counter and deadline on the session's transport |
| a server request related to the call      | written on the call's stream with an id of the gateway's |
| (sampling, elicitation, roots)            | (`fast-N`), answered by the client's later POST, which is |
|                                           | taken here (202) when its id is one of these             |
| `notifications/cancelled` for the call    | taken here (202) when it names a call served here: the    |
|                                           | call is interrupted and never answered                   |
| client gone mid-call                      | the call goes on (the spec: a disconnect is no cancel);   |
|                                           | its pending server requests fail as "Connection closed"   |

Anything else (another method, a session not yet seen initialised, JSON-response mode, a request a
check would refuse) goes to the SDK untouched, before anything is read or sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
from mcp.server._streamable_http_modern import _sse_event
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser, authorization_context
from mcp.server.connection import Connection
from mcp.server.context import ServerRequestContext
from mcp.server.runner import ServerRunner
from mcp.server.streamable_http import MCP_SESSION_ID_HEADER, StreamableHTTPServerTransport, check_accept_headers
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecurityMiddleware
from mcp.shared.dispatcher import CallOptions, coerce_request_id
from mcp.shared.exceptions import MCPError, NoBackChannelError
from mcp.shared.jsonrpc_dispatcher import handler_exception_to_error_data, progress_token_from_params
from mcp.shared.message import ServerMessageMetadata
from mcp.shared.transport_context import TransportContext
from mcp_types import (
    CONNECTION_CLOSED,
    INTERNAL_ERROR,
    REQUEST_TIMEOUT,
    ErrorData,
    JSONRPCError,
    JSONRPCNotification,
    JSONRPCRequest,
    JSONRPCResponse,
    RequestId,
)
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.event_stream import PING, PING_S, SSE_HEADERS, EventStream

log = logging.getLogger(__name__)

_SESSION_HEADER = MCP_SESSION_ID_HEADER.lower().encode()
_CANCELLED = "notifications/cancelled"
_CLOSED = ErrorData(code=CONNECTION_CLOSED, message="Connection closed")


@dataclass(eq=False)
class _CallContext:
    """The SDK's `DispatchContext` for one call served here: its notifications and server requests
    go on the call's own stream, as the session transport routes them by related request id."""

    calls: FastSessionCalls
    session_id: str
    stream: EventStream
    _request_id: RequestId
    message_metadata: ServerMessageMetadata
    _progress_token: Any = None
    transport: TransportContext = field(default_factory=lambda: TransportContext(kind="jsonrpc", can_send_request=True))
    cancel_requested: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    asked: set[str] = field(default_factory=set)
    _closed: bool = False

    @property
    def request_id(self) -> RequestId:
        return self._request_id

    @property
    def can_send_request(self) -> bool:
        return not self._closed and not self.stream.gone

    async def notify(self, method: str, params: Mapping[str, Any] | None, opts: CallOptions | None = None) -> None:
        if self._closed:
            return
        notification = JSONRPCNotification(jsonrpc="2.0", method=method, params=dict(params) if params else None)
        await self.stream.send(_sse_event(notification))

    async def progress(self, progress: float, total: float | None = None, message: str | None = None) -> None:
        if self._progress_token is None:
            return
        params: dict[str, Any] = {"progressToken": self._progress_token, "progress": progress}
        if total is not None:
            params["total"] = total
        if message is not None:
            params["message"] = message
        await self.notify("notifications/progress", params)

    async def send_raw_request(self, method: str, params: Mapping[str, Any] | None,
                               opts: CallOptions | None = None) -> dict[str, Any]:
        if not self.can_send_request:
            raise NoBackChannelError(method)
        request_id = f"fast-{next(self.calls.ids)}"  # not an integer: never one of the dispatcher's own ids
        answer: asyncio.Future[dict[str, Any] | ErrorData] = asyncio.get_running_loop().create_future()
        self.calls.awaiting[(self.session_id, request_id)] = answer
        self.asked.add(request_id)
        try:
            request = JSONRPCRequest(jsonrpc="2.0", id=request_id, method=method, params=dict(params) if params else None)
            await self.stream.send(_sse_event(request))  # type: ignore[arg-type]  # any JSON-RPC message frames alike
            try:
                outcome = await asyncio.wait_for(answer, (opts or {}).get("timeout"))
            except TimeoutError:
                await self.notify(_CANCELLED, {"requestId": request_id, "reason": "timed out"})
                raise MCPError(code=REQUEST_TIMEOUT, message=f"Request {method!r} timed out") from None
        finally:
            self.asked.discard(request_id)
            self.calls.awaiting.pop((self.session_id, request_id), None)
        if isinstance(outcome, ErrorData):
            raise MCPError.from_error_data(outcome)
        return outcome

    def close(self) -> None:
        self._closed = True

    def abandon_requests(self) -> None:
        """The client is gone: what the call asked it can no longer be answered."""
        for request_id in list(self.asked):
            answer = self.calls.awaiting.get((self.session_id, request_id))
            if answer is not None and not answer.done():
                answer.set_result(_CLOSED)


class FastSessionCalls:
    """Serves a session's `tools/call` itself, and the client's messages that belong to those calls."""

    def __init__(self, sessions: StreamableHTTPSessionManager):
        self.sessions = sessions
        self.security = TransportSecurityMiddleware(sessions.security_settings)
        self.ids = itertools.count(1)
        self.awaiting: dict[tuple[str, str], asyncio.Future[dict[str, Any] | ErrorData]] = {}
        self._calls: dict[tuple[str, RequestId], _CallContext] = {}
        # Session id -> its Connection, noted as the session's own messages pass the middleware chain.
        self._connections: weakref.WeakValueDictionary[str, Connection] = weakref.WeakValueDictionary()

    def note(self, ctx: ServerRequestContext[Any, Any]) -> None:
        """Remember the session's connection (`ctx.session` is the request's own over it; no public way to it)."""
        connection = getattr(ctx.session, "_connection", None)
        session_id = getattr(connection, "session_id", None)
        if session_id is not None and self._connections.get(session_id) is not connection:
            self._connections[session_id] = connection  # type: ignore[assignment]

    def _transport(self, scope: Scope, session_id: str) -> StreamableHTTPServerTransport | None:
        """The session's transport if the SDK would serve this request in it, else None."""
        manager = self.sessions
        transport = manager._server_instances.get(session_id)  # noqa: SLF001 (the manager's table; no accessor)
        if transport is None or transport.is_terminated or manager.json_response:
            return None
        user = scope.get("user")
        requestor = authorization_context(user) if isinstance(user, AuthenticatedUser) else None
        if requestor != manager._session_owners.get(session_id):  # noqa: SLF001 (the SDK's owner check, as it makes it)
            return None
        if transport.idle_scope is not None and transport.idle_scope.cancel_called:
            return None
        return transport

    async def _acceptable(self, request: Request) -> bool:
        """The transport's own checks of a POST in a session (it would refuse what fails here)."""
        if await self.security.validate_request(request, is_post=True) is not None:
            return False
        has_json, has_sse = check_accept_headers(request)
        content_type = request.headers.get("content-type", "").split(";")[0]
        return has_json and has_sse and "application/json" in (part.strip() for part in content_type.split(","))

    async def serve(self, scope: Scope, receive: Receive, send: Send, payload: dict[str, Any], session_id: str,
                    version: str) -> bool:
        """Serve the call and say True, or say False having read and sent nothing (the SDK serves it)."""
        transport = self._transport(scope, session_id)
        connection = self._connections.get(session_id)
        if transport is None or connection is None or not connection.initialize_accepted:
            return False
        if version not in HANDSHAKE_PROTOCOL_VERSIONS:
            return False
        request = Request(scope, receive)
        if not await self._acceptable(request):
            return False
        request_id, params = payload["id"], payload["params"]
        key = (session_id, coerce_request_id(request_id))
        if key in self._calls:
            return False  # an id already in flight: the SDK's to judge
        stream = EventStream(send, [*SSE_HEADERS, (_SESSION_HEADER, session_id.encode())])
        call = _CallContext(self, session_id, stream, request_id, ServerMessageMetadata(request_context=request),
                            progress_token_from_params(params))
        self._calls[key] = call
        server, lifespan_state = self.sessions.app, self.sessions._lifespan_state  # noqa: SLF001 (no public accessor)
        runner = ServerRunner(server, connection, lifespan_state)
        with _in_flight(transport):
            await stream.open()
            keep_alive = asyncio.create_task(_keep_alive(receive, call))
            reply: JSONRPCResponse | JSONRPCError | None = None
            try:
                with call.scope:
                    try:
                        reply = JSONRPCResponse(jsonrpc="2.0", id=request_id,
                                                result=await runner.on_request(call, "tools/call", params))
                    except Exception as exc:  # the dispatcher's boundary, as the SDK's session path maps it
                        error = handler_exception_to_error_data(exc)
                        if error is None:
                            log.exception("handler for 'tools/call' raised")
                            error = ErrorData(code=0, message=str(exc))
                        reply = JSONRPCError(jsonrpc="2.0", id=request_id, error=error)
            finally:
                call.close()
                del self._calls[key]
                keep_alive.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await keep_alive
            # A call the client cancelled is never answered (the spec); its stream just ends.
            await stream.send(b"" if reply is None or call.cancel_requested.is_set() else _sse_event(reply), more=False)
        return True

    async def take(self, scope: Scope, receive: Receive, send: Send, payload: dict[str, Any], session_id: str) -> bool:
        """Take the client's answer to a server request of a call served here, or its cancellation of
        such a call: 202, as the transport answers them. Anything else: False, nothing read or sent."""
        if "method" in payload:
            if payload.get("method") != _CANCELLED or not isinstance(params := payload.get("params"), dict):
                return False
            cancelled = params.get("requestId")
            if isinstance(cancelled, bool) or not isinstance(cancelled, (str, int)):
                return False
            call = self._calls.get((session_id, coerce_request_id(cancelled)))
            if call is None or not await self._accepted(scope, receive, session_id):
                return False
            call.cancel_requested.set()
            call.scope.cancel()
        else:
            answered = payload.get("id")
            answer = self.awaiting.get((session_id, answered)) if isinstance(answered, str) else None
            if answer is None or not ("result" in payload or "error" in payload):
                return False
            if not await self._accepted(scope, receive, session_id):
                return False
            if not answer.done():
                answer.set_result(_outcome(payload))
        await Response(None, status_code=202, headers={"Content-Type": "application/json",
                                                      MCP_SESSION_ID_HEADER: session_id})(scope, receive, send)
        return True

    async def _accepted(self, scope: Scope, receive: Receive, session_id: str) -> bool:
        return self._transport(scope, session_id) is not None and await self._acceptable(Request(scope, receive))


def _outcome(payload: dict[str, Any]) -> dict[str, Any] | ErrorData:
    """A client's answer as the dispatcher resolves it: the result, or its error."""
    if "error" in payload:
        try:
            return ErrorData.model_validate(payload["error"])
        except ValidationError:
            return ErrorData(code=INTERNAL_ERROR, message="The client's error answer was malformed")
    result = payload["result"]
    if not isinstance(result, dict):  # the call's server request fails saying so, rather than wait on
        return ErrorData(code=INTERNAL_ERROR, message="The client's answer was not a JSON object")
    return result


@contextlib.contextmanager
def _in_flight(transport: StreamableHTTPServerTransport) -> Iterator[None]:
    """The session is busy meanwhile: its idle countdown is suspended, as the transport does per request."""
    idle, timeout = transport.idle_scope, transport._idle_timeout  # noqa: SLF001 (the transport's own countdown)
    if idle is None or timeout is None:
        yield
        return
    transport._requests_in_flight += 1  # noqa: SLF001
    idle.deadline = math.inf
    try:
        yield
    finally:
        transport._requests_in_flight -= 1  # noqa: SLF001
        if not transport._requests_in_flight:  # noqa: SLF001
            idle.deadline = anyio.current_time() + timeout


async def _keep_alive(receive: Receive, call: _CallContext) -> None:
    """Ping while the call is silent. A client gone is not a cancellation (it sends one for that):
    the call goes on, but what it asked the client fails, since no answer can come on this stream."""
    while True:
        with anyio.move_on_after(PING_S):
            while (await receive())["type"] != "http.disconnect":
                pass
            call.stream.gone = True
            call.abandon_requests()
            return
        await call.stream.send(PING)
