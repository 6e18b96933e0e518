"""The gateway's end of a sandbox's trace endpoint (the supervisor's is `sandbox.supervisor.traces`).

A `spans` message names a server and carries one OTLP export (protobuf) that server made inside the
sandbox. What becomes of it is the `SpanSink`'s to decide (the gateway's `gateway.server_spans`,
which exports its spans under the fleet's service name for servers); this module only ties it to
the sandbox it came from, and drops what no server of that sandbox can have sent.
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Any, Protocol

from sandbox import wire
from sandbox.tunnels import Sandbox

log = logging.getLogger(__name__)

_MAX_DATA = (wire.MAX_SPANS_BODY + 2) // 3 * 4
"""The longest base64 text of an export of MAX_SPANS_BODY bytes."""


class SpanSink(Protocol):
    def export(self, sandbox: Sandbox, server: str, body: bytes) -> None:
        """Export the spans of `body` (an ExportTraceServiceRequest, as `server` of `sandbox` sent
        it: untrusted), without blocking for long; never raises for a body that does not decode."""
        ...


class SpanRelay:
    """The trace exports of one sandbox's channel."""

    def __init__(self, sink: SpanSink | None):
        """`sink` None: every export is dropped (a gateway that exports no traces)."""
        self.sink = sink
        self.sandbox: Sandbox | None = None
        """Set once the manager holds the sandbox, as `ModelRelay.sandbox`; before, exports are dropped."""

    def on_message(self, message: dict[str, Any]) -> None:
        sink, sandbox = self.sink, self.sandbox
        server, data = message.get("server"), message.get("data")
        if sink is None or sandbox is None or not isinstance(server, str) or not isinstance(data, str):
            return
        if sandbox.servers is not None and server not in {s.name for s in sandbox.servers}:
            return
        if len(data) > _MAX_DATA:
            return
        try:
            body = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            return
        try:
            sink.export(sandbox, server, body)
        except Exception:
            log.exception("the spans of server %s in sandbox %s could not be exported", server, sandbox.id)
