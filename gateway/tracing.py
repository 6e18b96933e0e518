"""Spans of one MCP request, named by the OpenTelemetry semantic conventions for MCP.

    POST /mcp                      SERVER   the HTTP request; its parent is the client's `traceparent` header
      authenticate                 INTERNAL the bearer token checked (no token in the span)
      tools/call workspace__read   SERVER   the MCP request: mcp.method.name, gen_ai.tool.name,
                                            jsonrpc.request.id, mcp.protocol.version, error.type
        sandbox claim | sandbox cold start | sandbox resume      (sandbox.manager, when one is needed)
        tools/call read            CLIENT   the hop over the channel to the server in the sandbox; the
                                            trace context travels on in `params._meta` (traceparent,
                                            tracestate)
          tools/call read          SERVER   the supervisor's span (service `mcpfleet-sandbox`): it
                                            hands the server a traceparent of its own and sends its
                                            times back with the answer, the gateway exports it
            ...                    any      the server's own spans, when it has an OpenTelemetry SDK
                                            (service `mcpfleet-server`): it exports them to the
                                            supervisor, which relays them (`gateway.server_spans`)

The MCP span's parent is the `traceparent` of the request's own `params._meta` when it has one
(the MCP convention, SEP-414), else the HTTP span: the SDK runs a session's handlers in a task of
their own, so the HTTP request's context is found through the ASGI scope, not inherited.

Only the API is used here: with no tracer provider installed (`gateway.telemetry` installs one when
OTEL_EXPORTER_OTLP_ENDPOINT is set) every span is a non-recording one, which still carries an incoming
trace context on to the sandbox. No argument, result, token or secret is ever put in a span.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.shared.exceptions import MCPError
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, StatusCode
from pydantic import ValidationError
from starlette.authentication import AuthenticationBackend
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sandbox.channel import sandbox_spans

if TYPE_CHECKING:
    from gateway.metrics import Metrics

tracer = trace.get_tracer("mcpfleet.gateway")

SCOPE_KEY = "mcpfleet.trace_context"
"""Where the HTTP span's context waits in the ASGI scope for the MCP span."""
INVALID_PARAMS = "-32602"
# HTTP answers to /mcp that refuse a request before any MCP handler runs, by the metric's reason.
_REFUSED = {401: "auth", 403: "scope", 429: "rate_limit"}
_MAX_ATTRIBUTE = 256


def _bounded(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _MAX_ATTRIBUTE else text[: _MAX_ATTRIBUTE - 1] + "…"


class HttpTracing:
    """ASGI middleware, outermost: a span per HTTP request to /mcp, parented by the `traceparent`
    header; counts the refusals the layers inside answer with 401, 403 or 429."""

    def __init__(self, app: ASGIApp, metrics: Metrics, path: str = "/mcp"):
        self.app = app
        self.metrics = metrics
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k in (b"traceparent", b"tracestate")}
        parent = propagate.extract(carrier) if carrier else None
        method = scope["method"]
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with tracer.start_as_current_span(
            f"{method} {self.path}", context=parent, kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": self.path, "network.protocol.name": "http"},
        ) as span:
            scope[SCOPE_KEY] = otel_context.get_current()
            try:
                await self.app(scope, receive, send_status)
            finally:
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(StatusCode.ERROR)
                    span.set_attribute("error.type", str(status))
                reason = _REFUSED.get(status)
                if reason is not None:
                    self.metrics.refused(reason)


class TracedAuthBackend(AuthenticationBackend):
    """Starlette's authentication backend with the check in a span of its own."""

    def __init__(self, backend: AuthenticationBackend):
        self.backend = backend

    async def authenticate(self, conn: HTTPConnection) -> Any:
        if conn.scope.get("path") == "/metrics" or SCOPE_KEY not in conn.scope:
            return await self.backend.authenticate(conn)
        with tracer.start_as_current_span("authenticate", kind=SpanKind.INTERNAL) as span:
            result = await self.backend.authenticate(conn)
            span.set_attribute("mcpfleet.auth.outcome", "accepted" if result is not None else "refused")
            return result


class McpTracing:
    """The MCP server's middleware (`Server.middleware`, in place of the SDK's own span): a SERVER
    span per request and its duration in `mcp_server_operation_duration_seconds`."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        if ctx.request_id is None:  # notifications: neither a span nor a count
            return await call_next(ctx)
        params = ctx.params or {}
        name = params.get("name") if ctx.method in ("tools/call", "prompts/get") else None
        target = _bounded(name) if isinstance(name, str) else None
        attributes: dict[str, Any] = {
            "mcp.method.name": ctx.method,
            "jsonrpc.request.id": _bounded(ctx.request_id),
            "mcp.protocol.version": ctx.protocol_version,
            "network.transport": "tcp",
        }
        if ctx.method == "tools/call":
            attributes["gen_ai.operation.name"] = "execute_tool"
            if target is not None:
                attributes["gen_ai.tool.name"] = target
        elif ctx.method == "prompts/get" and target is not None:
            attributes["gen_ai.prompt.name"] = target
        session_id = _session_id(ctx.request)
        if session_id:
            attributes["mcp.session.id"] = _bounded(session_id)
        outcome, error_type, started = "ok", "", time.perf_counter()
        with tracer.start_as_current_span(
            f"{ctx.method} {target}" if target else ctx.method, context=_parent(ctx), kind=SpanKind.SERVER,
            attributes=attributes, record_exception=False, set_status_on_exception=False,
        ) as span:
            try:
                result = await call_next(ctx)
            except MCPError as exc:
                outcome, error_type = "error", str(exc.error.code)
                span.set_attributes({"error.type": error_type, "rpc.response.status_code": error_type})
                span.set_status(StatusCode.ERROR, _bounded(exc.error.message))
                raise
            except ValidationError:  # pydantic's message repeats the client's input: not in the span
                outcome, error_type = "error", INVALID_PARAMS
                span.set_attributes({"error.type": error_type, "rpc.response.status_code": error_type})
                span.set_status(StatusCode.ERROR, "Invalid request parameters")
                raise
            except BaseException as exc:
                outcome, error_type = "error", type(exc).__qualname__
                span.set_attribute("error.type", error_type)
                span.set_status(StatusCode.ERROR)
                raise
            finally:
                if outcome != "ok":
                    self.metrics.operation(ctx.method, target, outcome, error_type, time.perf_counter() - started)
            if _is_tool_error(result):
                outcome, error_type = "tool_error", "tool_error"
                span.set_attribute("error.type", error_type)
                span.set_status(StatusCode.ERROR)
            self.metrics.operation(ctx.method, target, outcome, error_type, time.perf_counter() - started)
            return result


def _is_tool_error(result: Any) -> bool:
    if isinstance(result, Mapping):
        return result.get("isError") is True
    return getattr(result, "is_error", False) is True


def _session_id(request: Any) -> str | None:
    headers = getattr(request, "headers", None)
    return headers.get("mcp-session-id") if headers is not None else None


def _parent(ctx: ServerRequestContext[Any, Any]) -> otel_context.Context | None:
    meta = (ctx.params or {}).get("_meta")
    if isinstance(meta, Mapping) and isinstance(meta.get("traceparent"), str):
        carrier = {k: meta[k] for k in ("traceparent", "tracestate") if isinstance(meta.get(k), str)}
        extracted = propagate.extract(carrier)
        if trace.get_current_span(extracted).get_span_context().is_valid:
            return extracted
    scope = getattr(ctx.request, "scope", None)
    if isinstance(scope, Mapping) and SCOPE_KEY in scope:
        parent: otel_context.Context = scope[SCOPE_KEY]
        return parent
    return None


SpanRelay = Callable[[trace.Span, str, dict[str, Any], list[dict[str, Any]]], None]
"""Exports the supervisor's spans of one hop: (the hop's span, name, attributes, `wire.SpanTiming`s)."""


@contextlib.contextmanager
def channel_hop(server: str, method: str, params: dict[str, Any], relay: SpanRelay | None = None) -> Iterator[dict[str, Any]]:
    """A CLIENT span for a request to a server in the sandbox; yields `params` with this span's
    trace context in `_meta` (a client's own `traceparent` there is replaced: this span is its child).
    The supervisor's own span for the request comes back with its answer and goes to `relay`."""
    name = params.get("name")
    target = _bounded(name) if isinstance(name, str) else None
    attributes = {"mcp.method.name": method, "mcpfleet.server": server, "network.transport": "unix"}
    if method == "tools/call" and target is not None:
        attributes["gen_ai.tool.name"] = target
    span_name = f"{method} {target}" if target else method
    with tracer.start_as_current_span(span_name, kind=SpanKind.CLIENT, attributes=attributes, record_exception=False) as span:
        traced = params
        if span.get_span_context().is_valid:  # else nothing traces this call: pass it on as it is
            meta = {k: v for k, v in (params.get("_meta") or {}).items() if k not in ("traceparent", "tracestate")}
            propagate.inject(meta)
            traced = {**params, "_meta": meta}
        relayed: list[dict[str, Any]] = []
        collecting = sandbox_spans.set(relayed) if relay is not None and span.is_recording() else None
        try:
            yield traced
        except Exception as exc:  # SandboxRpcError carries the server's JSON-RPC code
            code = getattr(exc, "code", None)
            span.set_attribute("error.type", str(code) if isinstance(code, int) else type(exc).__qualname__)
            span.set_status(StatusCode.ERROR)
            raise
        finally:
            if collecting is not None:
                sandbox_spans.reset(collecting)
                if relayed and relay is not None:
                    relay(span, span_name, {**attributes, "network.transport": "pipe"}, relayed)
