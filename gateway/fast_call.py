"""A fast path for a 2026-07-28 `tools/call`, beside the SDK's general path.

The general path of one stateless call, inside the gateway, after authentication and the limits:
the SDK reads and parses the body again (the limits middleware parsed it already), validates the
JSON-RPC envelope with pydantic, then, to check `Mcp-Param-*` headers against the tool's schema, runs
the whole `tools/list` handler through the middleware chain (a span, a metric, the caller's catalog,
and pydantic's check of every tool definition in the listing) for every call that has arguments, and
only then serves the call from a task group of two tasks joined by a memory stream.

Here the same call is served from the message the limits middleware parsed (`limits.PARSED_BODY`):
the same checks in the same order (DNS-rebinding, Accept, duplicated routing headers, the SDK's own
classifier of the request envelope), and the call served in the request's own task by the SDK's
`serve_one`, the `Mcp-Param-*` check first in it (`param_headers`, with the tool's schema read from
the caller's catalog, the one the call itself is routed with): the same server middleware (the MCP span
and its metrics, `requestState` sealing and checking) and the same handler (`Router.call_tool`:
sandbox, registry guard, pins, policy, tool sets, breakers, audit, input_required, sampling). One
helper task watches for the client going away and keeps a long call's stream alive with pings, as
the SDK's does. The answer is written by the SDK's own functions, so its bytes are the general path's.

A `tools/call` in a 2025-11-25 session takes its own fast path (gateway/fast_session_call.py), and
so do the client's answers to that call's server requests and its cancellation of it.

What these paths do not take goes to the general path untouched, before anything is read or sent:
another method or revision, a body the limits middleware did not parse, and any request a check
above would refuse (the general path refuses it, in its words).
`MCPFLEET_FAST_PATH=off` sends everything the general way (the benchmark's baseline).
`mcpfleet_tool_calls_by_path_total` counts the calls each path served.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Mapping
from typing import Any, TypeGuard

import anyio
from mcp.server._streamable_http_modern import (
    _SingleExchangeDispatchContext,
    _sse_event,
    _to_jsonrpc_response,
    _write,
)
from mcp.server.connection import Connection
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.runner import serve_one
from mcp.server.streamable_http import check_accept_headers
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecurityMiddleware
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import (
    MCP_PARAM_HEADER_PREFIX,
    MCP_PROTOCOL_VERSION_HEADER,
    InboundLadderRejection,
    InboundModernRoute,
    classify_inbound_request,
    find_duplicated_routing_header,
    validate_mcp_param_headers,
)
from mcp.shared.jsonrpc_dispatcher import progress_token_from_params
from mcp.shared.message import ServerMessageMetadata
from mcp.shared.transport_context import TransportContext
from mcp_types import (
    CLIENT_CAPABILITIES_META_KEY,
    CLIENT_INFO_META_KEY,
    PROTOCOL_VERSION_META_KEY,
)
from mcp_types import methods as mcp_methods
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS
from opentelemetry import trace
from pydantic import ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.auth import identity_of
from gateway.catalog import Catalog
from gateway.event_stream import PING, PING_S, EventStream
from gateway.fast_session_call import FastSessionCalls
from gateway.limits import PARSED_BODY
from gateway.metrics import Metrics
from gateway.routing import Router
from gateway.sessions import session_id_of

_VERSION_HEADER = MCP_PROTOCOL_VERSION_HEADER.lower().encode()
_PARAM_PREFIX = MCP_PARAM_HEADER_PREFIX.lower()
_ENVELOPE_KEYS = frozenset({"jsonrpc", "id", "method", "params"})
_LISTING_ENVELOPE = (PROTOCOL_VERSION_META_KEY, CLIENT_CAPABILITIES_META_KEY, CLIENT_INFO_META_KEY)
_FAST = "mcpfleet.fast_call"
"""Set in the ASGI scope of a request the fast path serves."""


class FastToolCall:
    """ASGI app inside `LimitsMiddleware`: serves a 2026-07-28 `tools/call` itself, anything else through `app`."""

    def __init__(self, app: ASGIApp, sessions: StreamableHTTPSessionManager, router: Router, metrics: Metrics,
                 enabled: bool = True):
        self.app = app
        self.sessions = sessions
        self.router = router
        self.metrics = metrics
        self.enabled = enabled
        self.security = TransportSecurityMiddleware(sessions.security_settings)
        self.session_calls = FastSessionCalls(sessions)
        # tool name -> definition, per catalog (a catalog is rebuilt, not changed, when a listing changes).
        self._by_name: weakref.WeakKeyDictionary[Catalog, dict[str, dict[str, Any]]] = weakref.WeakKeyDictionary()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        payload = scope.get(PARSED_BODY)
        if scope["type"] != "http" or not isinstance(payload, dict):
            await self.app(scope, receive, send)
            return
        session_id = session_id_of(scope) if self.enabled and identity_of(scope) is not None else None
        if not _is_tool_call(payload):
            # A client's answer to a session call's server request, or its cancel of one, is taken there.
            if session_id is None or not await self.session_calls.take(scope, receive, send, payload, session_id):
                await self.app(scope, receive, send)
            return
        version = next((v.decode("latin-1") for k, v in scope["headers"] if k == _VERSION_HEADER), None)
        revision = version if version in MODERN_PROTOCOL_VERSIONS or version in HANDSHAKE_PROTOCOL_VERSIONS else "other"
        if self.enabled and identity_of(scope) is not None and (
            await self._modern(scope, receive, send, payload) if version in MODERN_PROTOCOL_VERSIONS
            else session_id is not None and version is not None
            and await self.session_calls.serve(scope, receive, send, payload, session_id, version)
        ):
            self.metrics.call_path("fast", revision)
            return
        self.metrics.call_path("general", revision)
        await self.app(scope, receive, send)

    async def _modern(self, scope: Scope, receive: Receive, send: Send, payload: dict[str, Any]) -> bool:
        """Serve the call and say True, or say False having read and sent nothing (the general path serves it)."""
        request = Request(scope, receive)
        if await self.security.validate_request(request, is_post=True) is not None:
            return False
        has_json, has_sse = check_accept_headers(request)
        json_only = self.sessions.json_response
        if not has_json or not (has_sse or json_only):
            return False
        if find_duplicated_routing_header(request.headers.items()) is not None:
            return False
        verdict = classify_inbound_request(payload, headers=dict(request.headers))
        if not isinstance(verdict, InboundModernRoute):
            return False
        trace.get_current_span().set_attribute("mcpfleet.gateway.path", "fast")
        request_id, params = payload["id"], payload["params"]
        server, lifespan_state = self.sessions.app, self.sessions._lifespan_state  # noqa: SLF001 (no public accessor)
        dctx = _SingleExchangeDispatchContext(
            transport=TransportContext(kind="streamable-http", can_send_request=False, headers=request.headers),
            request_id=request_id,
            message_metadata=ServerMessageMetadata(request_context=request),
            progress_token=progress_token_from_params(params),
        )

        connection = Connection.from_envelope(verdict.protocol_version, verdict.client_info, verdict.client_capabilities)
        scope[_FAST] = True  # the Mcp-Param-* check runs in the chain (`param_headers`)
        if json_only:
            await _write(await _to_jsonrpc_response(request_id, serve_one(
                server, dctx, "tools/call", params, connection=connection, lifespan_state=lifespan_state)), scope, receive, send)
            return True

        stream = EventStream(send)
        dctx.sink = stream  # type: ignore[assignment]  # the SDK only calls its send()
        with anyio.CancelScope() as call:
            watcher = asyncio.create_task(_watch(receive, stream, call))
            try:
                reply = await _to_jsonrpc_response(request_id, serve_one(
                    server, dctx, "tools/call", params, connection=connection, lifespan_state=lifespan_state))
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
        if call.cancelled_caught:
            return True  # the client went away: nobody to answer (the SDK's general path does the same)
        if stream.committed:
            await stream.send(_sse_event(reply), more=False)
        else:
            await _write(reply, scope, receive, send)
        return True

    async def param_headers(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        """Server middleware (right after the MCP span): a fast call's `Mcp-Param-*` check, the SDK's
        `_mcp_param_rejection` with the schema from the caller's catalog; the general path's ran before the chain.

        Here it runs inside the call's MCP span, so a sandbox brought up for the catalog is traced in
        the call, and a mismatch is that span's error; on the wire it is the general path's 400."""
        self.session_calls.note(ctx)
        scope = getattr(ctx.request, "scope", None)
        if ctx.method == "tools/call" and isinstance(scope, dict) and scope.get(_FAST) and isinstance(ctx.params, Mapping):
            rejection = await self._param_rejection(ctx, ctx.params, ctx.request.headers)
            if rejection is not None:
                raise MCPError(code=rejection.code, message=rejection.message, data=rejection.data)
        return await call_next(ctx)

    async def _param_rejection(self, ctx: ServerRequestContext[Any, Any], params: Mapping[str, Any],
                               headers: Mapping[str, str]) -> InboundLadderRejection | None:
        arguments = params.get("arguments")
        if arguments is not None and not isinstance(arguments, Mapping):
            return None
        if not arguments and not any(header.startswith(_PARAM_PREFIX) for header in headers):
            return None
        envelope = params.get("_meta") or {}
        meta = {key: envelope[key] for key in _LISTING_ENVELOPE if envelope.get(key) is not None}
        try:  # as the SDK: an envelope the listing would refuse skips the check (the call itself is refused)
            mcp_methods.validate_client_request("tools/list", ctx.protocol_version, {"_meta": meta})
        except ValidationError:
            return None
        try:
            catalog = await self.router.caller_catalog(ctx)
        except Exception:  # fail-open as the SDK's: the call itself reports what is wrong
            return None
        by_name = self._by_name.get(catalog)
        if by_name is None:
            by_name = self._by_name[catalog] = {tool["name"]: tool for tool in catalog.tools}
        tool = by_name.get(params["name"])
        if tool is None:
            return None
        return validate_mcp_param_headers(tool.get("inputSchema"), arguments or {}, headers)


def _is_tool_call(payload: Any) -> TypeGuard[dict[str, Any]]:
    """A single well-formed `tools/call` request (anything else is the general path's to judge)."""
    if not isinstance(payload, dict) or payload.get("method") != "tools/call" or payload.get("jsonrpc") != "2.0":
        return False
    if not payload.keys() <= _ENVELOPE_KEYS:
        return False
    request_id, params = payload.get("id"), payload.get("params")
    if isinstance(request_id, bool) or not isinstance(request_id, (str, int)):
        return False
    return isinstance(params, dict) and isinstance(params.get("name"), str)


async def _watch(receive: Receive, stream: EventStream, call: anyio.CancelScope) -> None:
    """Cancel the call when the client goes away; ping while it is silent."""
    while True:
        with anyio.move_on_after(PING_S):
            while (await receive())["type"] != "http.disconnect":
                pass
            call.cancel()
            return
        await stream.send(PING)
