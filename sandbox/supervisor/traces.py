"""Servers' own spans: an OTLP/HTTP endpoint on the sandbox's loopback, relayed to the gateway.

Served only when the gateway exports traces (`SupervisorConfig.traces`); otherwise nothing listens
and servers are told nothing. When it is, every server is started with the standard OpenTelemetry
variables naming this endpoint under a path of its own (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` =
`http://127.0.0.1:PORT/<token>/v1/traces`, `OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`,
`OTEL_SERVICE_NAME` = its name), so an OpenTelemetry SDK in the server, in any language, exports
with no code of ours; a server that loads none pays nothing. The supervisor hands each traced call
a `traceparent` of its own span (`wire.traced_params`): the server's spans are its children.

The sandbox has no network: each export is relayed whole to the gateway as a `spans` message naming
the server, and the gateway decodes it and exports the spans under a service name of its own. This
end decides only who sends (the path's token names the server and the kernel must agree that the
connecting process is that server or one of its descendants, as for the model endpoint: `peers`),
how much (at most `wire.MAX_SPANS_BODY` an export: 413) and how often (a budget per server: 429,
which OTLP exporters retry later). It answers at once: spans are not worth holding a server up.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import time
import zlib
from collections.abc import Callable
from typing import Any

from sandbox import wire
from sandbox.supervisor.listener import Gateway, LoopbackListener, http_head
from sandbox.supervisor.peers import stranger

HEAD_TIMEOUT = 10.0
PATH = "/v1/traces"
BUDGET_BYTES = 8 * 1024 * 1024
"""What a server may send in a burst; it comes back at BUDGET_PER_S."""
BUDGET_PER_S = 1024 * 1024
MIN_COST = 16 * 1024
"""What any export costs of the budget, however small: at most BUDGET_PER_S / MIN_COST exports a second."""


class TraceEndpoint(LoopbackListener):
    def __init__(self, send: Callable[[Any, Gateway], None], pid_of: Callable[[str], int | None],
                 newest: Callable[[], Gateway | None]):
        """As `LoopbackListener`."""
        super().__init__(send, pid_of, newest)
        self._budgets: dict[str, tuple[float, float]] = {}
        """Per server: what is left of its budget, and when that was so."""

    def credentials(self, server: str) -> tuple[str, dict[str, str]]:
        """A new token for `server` and the environment that names the endpoint to it."""
        token = self._new_token(server)
        return token, {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{self.port}/{token}{PATH}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_SERVICE_NAME": server,
        }

    def _drop(self, requests: list[int], reason: str) -> None:
        """Nothing is held: each export is relayed as it comes."""

    def _server_of(self, token: str) -> str | None:
        for known, server in self._servers_by_token.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return server
        return None

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            return await _answer(writer, 400)
        method, target, _ = parts
        token, _, path = target.split("?", 1)[0].partition("/")[2].partition("/")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if ":" in line)}
        server = self._server_of(token)
        if server is None:
            return await _answer(writer, 401)
        if stranger(server, self._pid_of(server), writer.get_extra_info("peername"), self.port or 0) is not None:
            return await _answer(writer, 403)
        if method != "POST" or "/" + path != PATH:
            return await _answer(writer, 404)
        if headers.get("content-type", "").split(";")[0].strip().lower() != "application/x-protobuf":
            return await _answer(writer, 415)  # OTLP/JSON is not relayed: http/protobuf, as the environment says
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return await _answer(writer, 411)
        length = headers.get("content-length", "")
        if not length.isdigit() or int(length) > wire.MAX_SPANS_BODY:
            return await _answer(writer, 413)
        body = await asyncio.wait_for(reader.readexactly(int(length)), HEAD_TIMEOUT)
        encoding = headers.get("content-encoding", "identity").lower()
        if encoding == "gzip":
            inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
            try:
                body = inflate.decompress(body, wire.MAX_SPANS_BODY + 1)
            except zlib.error:
                return await _answer(writer, 400)
            if len(body) > wire.MAX_SPANS_BODY or inflate.unconsumed_tail:
                return await _answer(writer, 413)
        elif encoding != "identity":
            return await _answer(writer, 415)
        gateway = self._newest()  # one gateway exports them (of several attached to a pod: the newest)
        if gateway is None:
            return await _answer(writer, 503)
        if not self._spend(server, max(MIN_COST, len(body))):
            return await _answer(writer, 429)
        self._send_to({"type": "spans", "server": server, "data": base64.b64encode(body).decode()}, gateway)
        await _answer(writer, 200)

    def _spend(self, server: str, cost: int) -> bool:
        """Take `cost` from `server`'s budget, if it has that much."""
        budgets = self._budgets
        now = time.monotonic()
        left, then = budgets.get(server, (BUDGET_BYTES, now))
        left = min(BUDGET_BYTES, left + (now - then) * BUDGET_PER_S)
        if left < cost:
            budgets[server] = (left, now)
            return False
        budgets[server] = (left - cost, now)
        return True


async def _answer(writer: asyncio.StreamWriter, status: int) -> None:
    """An empty body: an empty ExportTraceServiceResponse when 200 (full success), and a refusal
    says what it needs to in its status alone."""
    writer.write(http_head(status, "application/x-protobuf", 0))
    await writer.drain()
