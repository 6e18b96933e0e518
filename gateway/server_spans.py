"""Spans that servers make inside their sandboxes, exported with the gateway's own.

A server with an OpenTelemetry SDK exports to its supervisor's loopback endpoint (the variables it is
started with say where: `sandbox.supervisor.traces`); the supervisor relays each export over the
channel (`sandbox.span_relay`) and it ends here, decoded with the OTLP protobuf messages and handed
to the gateway's own span processor, so it goes where the gateway's spans go (the operator's
collector) and nowhere else. The server's span for a traced call is a child of the supervisor's span
for it (the `traceparent` the server got), in the caller's trace.

The sandbox is not trusted, and neither are the servers: every span is filed under the fleet's
service name for servers, `mcpfleet-server`, with the server and the sandbox as the gateway knows
them (`mcpfleet.server`, `mcpfleet.sandbox`), whatever the export says; the resource's own `service.*`
and `mcpfleet.*` attributes are dropped, so no server passes for the gateway or for another server.
Spans, events, links and attributes are taken up to fixed counts, strings cut to a fixed length.
What a server puts in its spans is its own (arguments included, if it records them).
"""

from __future__ import annotations

import logging
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode

from sandbox.tunnels import Sandbox

log = logging.getLogger(__name__)

SERVER_SERVICE_NAME = "mcpfleet-server"
MAX_ATTRIBUTES = 128
MAX_EVENTS = 128
MAX_LINKS = 32
MAX_STRING = 4096
_KINDS = {1: SpanKind.INTERNAL, 2: SpanKind.SERVER, 3: SpanKind.CLIENT, 4: SpanKind.PRODUCER, 5: SpanKind.CONSUMER}
_OWN_KEYS = ("service.", "mcpfleet.")


class ServerSpans:
    """A `sandbox.span_relay.SpanSink`: the spans of an export, to `processor` (the gateway's, which
    takes spans from any thread)."""

    def __init__(self, processor: Any):
        self.processor = processor

    def export(self, sandbox: Sandbox, server: str, body: bytes) -> None:
        try:
            request = ExportTraceServiceRequest.FromString(body)
        except DecodeError:
            log.info("server %s in sandbox %s sent spans that are not OTLP protobuf", server, sandbox.id)
            return
        for resource_spans in request.resource_spans:
            theirs = _attributes(a for a in resource_spans.resource.attributes if not a.key.startswith(_OWN_KEYS))
            resource = Resource({**theirs, "service.name": SERVER_SERVICE_NAME, "mcpfleet.server": server,
                                 "mcpfleet.sandbox": sandbox.id})
            for scope_spans in resource_spans.scope_spans:
                scope = InstrumentationScope(_cut(scope_spans.scope.name) or "unknown", _cut(scope_spans.scope.version) or None)
                for span in scope_spans.spans:
                    readable = _readable(span, resource, scope)
                    if readable is not None:
                        self.processor.on_end(readable)


def _readable(span: ProtoSpan, resource: Resource, scope: InstrumentationScope) -> ReadableSpan | None:
    context = _context(span.trace_id, span.span_id, span.trace_state, span.flags)
    if context is None or span.end_time_unix_nano < span.start_time_unix_nano:
        return None
    parent = _context(span.trace_id, span.parent_span_id, "", span.flags) if span.parent_span_id else None
    links = []
    for link in span.links[:MAX_LINKS]:
        linked = _context(link.trace_id, link.span_id, link.trace_state, link.flags)
        if linked is not None:
            links.append(Link(linked, _attributes(link.attributes)))
    code = StatusCode.ERROR if span.status.code == 2 else StatusCode.OK if span.status.code == 1 else StatusCode.UNSET
    return ReadableSpan(
        _cut(span.name) or "unnamed", context=context, parent=parent, resource=resource,
        attributes=_attributes(span.attributes), kind=_KINDS.get(span.kind, SpanKind.INTERNAL),
        events=[Event(_cut(e.name), _attributes(e.attributes), e.time_unix_nano) for e in span.events[:MAX_EVENTS]],
        links=links, status=Status(code, _cut(span.status.message) if code is StatusCode.ERROR else None),
        start_time=span.start_time_unix_nano, end_time=span.end_time_unix_nano, instrumentation_scope=scope,
    )


def _context(trace_id: bytes, span_id: bytes, state: str, flags: int) -> SpanContext | None:
    if len(trace_id) != 16 or len(span_id) != 8 or not any(trace_id) or not any(span_id):
        return None
    try:
        trace_state = TraceState.from_header([state]) if state else None
    except ValueError:
        trace_state = None
    return SpanContext(int.from_bytes(trace_id, "big"), int.from_bytes(span_id, "big"), is_remote=True,
                       trace_flags=TraceFlags(flags & 0xFF or TraceFlags.SAMPLED), trace_state=trace_state)


def _attributes(pairs: Any) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    for pair in pairs:
        if len(kept) >= MAX_ATTRIBUTES:
            break
        value = _value(pair.value) if isinstance(pair, KeyValue) else None
        if value is not None and pair.key:
            kept[_cut(pair.key)] = value
    return kept


def _value(value: AnyValue) -> Any:
    """A primitive or a list of one kind of primitive, as OpenTelemetry attributes hold; else None."""
    which = value.WhichOneof("value")
    if which == "string_value":
        return _cut(value.string_value)
    if which in ("bool_value", "int_value", "double_value"):
        return getattr(value, which)
    if which == "array_value":
        items = [_value(v) for v in value.array_value.values[:MAX_ATTRIBUTES]]
        kinds = {type(v) for v in items}
        return tuple(items) if len(kinds) == 1 and None not in items and not kinds & {tuple} else None
    return None  # bytes, nested lists and maps: not an attribute's value


def _cut(text: str) -> str:
    return text if len(text) <= MAX_STRING else text[: MAX_STRING - 1] + "…"

