"""Telemetry, one of the fleet's services: traces exported over OTLP, and the metrics registry.

Tracing follows the standard OpenTelemetry variables. With `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, the gateway installs the SDK's tracer provider with a
batching OTLP exporter (HTTP/protobuf; `OTEL_SERVICE_NAME` defaults to `mcpfleet-gateway`,
`OTEL_TRACES_SAMPLER`, `OTEL_BSP_*`, `OTEL_EXPORTER_OTLP_HEADERS` as documented by OpenTelemetry).
Without it nothing is installed and nothing exported: the spans of `gateway.tracing` are the API's
non-recording ones, which only carry an incoming trace context on. `OTEL_SDK_DISABLED=true` or
`OTEL_TRACES_EXPORTER=none` turn exporting off even with an endpoint.

The SDK and the exporter come with the `telemetry` extra; /metrics needs only prometheus-client.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from typing import Any

from opentelemetry import trace

from core.optional import require
from gateway.metrics import Metrics
from gateway.tracing import McpTracing
from sandbox.span_relay import SpanSink

log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = "mcpfleet-gateway"
SANDBOX_SERVICE_NAME = "mcpfleet-sandbox"
"""The service of the spans supervisors make inside sandboxes (exported by the gateway for them)."""
_SPAN_ID = re.compile(r"[0-9a-f]{16}")


def exporting(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether the standard variables ask for traces to be exported over OTLP."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


class Telemetry:
    """Made with the fleet (the app's middleware holds its metrics from the start), opened with it."""

    def __init__(self) -> None:
        self.metrics = Metrics()
        self._provider: Any = None
        self._servers_processor: Any = None
        self._relay: SandboxSpans | None = None
        self.server_spans: SpanSink | None = None
        """Exports the spans servers make in their sandboxes, once open and exporting (`gateway.server_spans`)."""

    def relay(self, hop: trace.Span, name: str, attributes: dict[str, Any], timings: list[dict[str, Any]]) -> None:
        """Export the spans a supervisor made inside its sandbox (`gateway.tracing.SpanRelay`)."""
        if self._relay is not None:
            self._relay.export(hop, name, attributes, timings)

    def mcp_middleware(self) -> McpTracing:
        return McpTracing(self.metrics)

    def open(self) -> None:
        if not exporting():
            return
        sdk_trace = require("opentelemetry.sdk.trace", extra="telemetry", feature="exporting traces (OTEL_EXPORTER_OTLP_ENDPOINT)")
        export = require("opentelemetry.sdk.trace.export", extra="telemetry", feature="exporting traces")
        resources = require("opentelemetry.sdk.resources", extra="telemetry", feature="exporting traces")
        otlp = require(
            "opentelemetry.exporter.otlp.proto.http.trace_exporter", extra="telemetry", feature="exporting traces over OTLP"
        )
        # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, which win over this default.
        attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": DEFAULT_SERVICE_NAME}
        provider = sdk_trace.TracerProvider(resource=resources.Resource.create(attributes))
        processor = export.BatchSpanProcessor(otlp.OTLPSpanExporter())
        provider.add_span_processor(processor)
        self._relay = SandboxSpans(processor, provider.resource.merge(resources.Resource({"service.name": SANDBOX_SERVICE_NAME})))
        from gateway.server_spans import ServerSpans  # the SDK and the OTLP messages: the telemetry extra

        # A queue of their own: servers that send many spans crowd out one another's, not the gateway's.
        self._servers_processor = export.BatchSpanProcessor(otlp.OTLPSpanExporter())
        self.server_spans = ServerSpans(self._servers_processor)
        # The API keeps the first provider for the life of the process (one fleet per process).
        trace.set_tracer_provider(provider)
        self._provider = provider
        log.info("exporting traces over OTLP as %s", provider.resource.attributes.get("service.name"))

    async def close(self) -> None:
        """Exports what is still batched (bounded by the SDK's own export timeout)."""
        provider, self._provider, self._relay, self.server_spans = self._provider, None, None, None
        servers, self._servers_processor = self._servers_processor, None
        if servers is not None:
            await asyncio.to_thread(servers.shutdown)
        if provider is not None:
            await asyncio.to_thread(provider.shutdown)


class SandboxSpans:
    """Turns the `span` of a supervisor's answer into an exported span. The sandbox is not trusted:
    of what it sends only the span id and the times are used, and those only when well-formed; the
    trace, the parent (the gateway's hop), the name and the attributes are the gateway's own, and
    the times are held within the hop's."""

    def __init__(self, processor: Any, resource: Any):
        self.processor = processor
        self.resource = resource
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        self._readable = ReadableSpan
        self._scope = InstrumentationScope("mcpfleet.supervisor")

    def export(self, hop: trace.Span, name: str, attributes: dict[str, Any], timings: list[dict[str, Any]]) -> None:
        parent = hop.get_span_context()
        floor, now = getattr(hop, "start_time", None) or 0, time.time_ns()
        for timing in timings:
            span_id, start, end = timing.get("id"), timing.get("start_ns"), timing.get("end_ns")
            if not (isinstance(span_id, str) and _SPAN_ID.fullmatch(span_id) and span_id != "0" * 16):
                continue
            if not (type(start) is int and type(end) is int):
                continue
            start, end = max(start, floor), min(end, now)
            if end < start:
                continue
            context = trace.SpanContext(parent.trace_id, int(span_id, 16), is_remote=True, trace_flags=parent.trace_flags)
            self.processor.on_end(self._readable(
                name, context=context, parent=parent, resource=self.resource, attributes=attributes,
                kind=trace.SpanKind.SERVER, start_time=start, end_time=end, instrumentation_scope=self._scope,
            ))
