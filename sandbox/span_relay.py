"""The gateway's end of a sandbox's trace endpoint (the supervisor's is `sandbox.supervisor.traces`).

A `spans` message names a server and carries one OTLP export (protobuf) that server made inside the
sandbox. What becomes of it is the `SpanSink`'s to decide (the gateway's `gateway.server_spans`,
which exports its spans under the fleet's service name for servers); this module only ties it to
the sandbox it came from, drops what no server of that sandbox can have sent, and has the sink
decode and export it on a thread (a full export takes tens of milliseconds, not the channel's to
wait for), at most MAX_PENDING at a time per sandbox: beyond, an export is dropped.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from typing import Any, Protocol

from sandbox import wire
from sandbox.tunnels import Sandbox

log = logging.getLogger(__name__)

MAX_PENDING = 4
"""Exports of one sandbox being decoded at once; the supervisor paces each server (`supervisor.traces`)."""
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
        self.pending = 0
        self.dropped = 0
        """Exports dropped since the channel opened, for lack of room."""

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
        if self.pending >= MAX_PENDING:
            self.dropped += 1
            if self.dropped in (1, 10, 100, 1000):
                log.warning("sandbox %s: %d span exports dropped (more than %d at once)", sandbox.id, self.dropped, MAX_PENDING)
            return
        self.pending += 1
        done = asyncio.get_running_loop().run_in_executor(None, _export, sink, sandbox, server, body)
        done.add_done_callback(self._finished)

    def _finished(self, _: asyncio.Future[None]) -> None:
        self.pending -= 1


def _export(sink: SpanSink, sandbox: Sandbox, server: str, body: bytes) -> None:
    try:
        sink.export(sandbox, server, body)
    except Exception:
        log.exception("the spans of server %s in sandbox %s could not be exported", server, sandbox.id)
