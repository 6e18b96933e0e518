"""Spans that a server makes inside its sandbox, end to end: a real runsc sandbox (no network), a
tool server with the real OpenTelemetry SDK and OTLP/HTTP exporter and no code of ours (the mcp SDK's
own middleware makes its span per request), the supervisor's trace endpoint, the channel, the
gateway's `ServerSpans` and `SandboxSpans`, and the real OTLP exporter to a receiver in this process
(`tests.test_telemetry.OtlpReceiver`, standing in for a collector).

The gateway's HTTP and MCP layers are left out: the test makes the hop's span itself, as
`gateway.tracing.channel_hop` does, with a tracer provider of its own (the process's global one is
not ours to set). The sandbox's Python has no OpenTelemetry SDK: the test copies the installed
distributions (all pure Python, or abi3) into the server's revision in the tools dir, so only this
server loads them.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import propagate
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind

from gateway.server_spans import SERVER_SERVICE_NAME, ServerSpans
from gateway.telemetry import SANDBOX_SERVICE_NAME, SandboxSpans
from sandbox import wire
from sandbox.bundle import TOOLS
from sandbox.channel import sandbox_spans
from sandbox.manager import SandboxManager
from sandbox.servers import ServerSpec
from tests.test_egress import python_inside
from tests.test_sandbox_lifecycle import SERVERS, call, fleets, sh  # noqa: F401  (fleets is a fixture)
from tests.test_sandbox_supervisor import text
from tests.test_telemetry import OtlpReceiver

pytestmark = [pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed"),
              pytest.mark.timeout(900)]

REVISION = "traced-r1"
# What the OTLP/HTTP exporter needs beyond what the sandbox's venv has (the API, idna, typing_extensions).
DISTRIBUTIONS = (
    "opentelemetry-sdk", "opentelemetry-semantic-conventions", "opentelemetry-exporter-otlp-proto-http",
    "opentelemetry-exporter-otlp-proto-common", "opentelemetry-exporter-otlp-common",
    "opentelemetry-exporter-http-transport", "opentelemetry-proto", "protobuf", "googleapis-common-protos",
    "requests", "urllib3", "charset-normalizer", "certifi",
)
OTEL_ENV = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_SERVICE_NAME")

# A tool server as anyone would write one with the OpenTelemetry SDK: the exporter and the service
# name come from the standard variables; the mcp SDK makes a span per request by itself.
TRACED = """
import json, os, urllib.error, urllib.request
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from mcp.server.mcpserver import MCPServer

provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter()))
trace.set_tracer_provider(provider)
server = MCPServer("traced")

@server.tool(description="Some work in a span of its own")
def work() -> str:
    with trace.get_tracer("traced.tool").start_as_current_span("work") as span:
        span.set_attribute("work.items", 3)
    return "done"

@server.tool(description="A span exported (gzipped) by a provider that claims to be another service")
def impostor() -> str:
    from opentelemetry.exporter.otlp.proto.http import Compression
    other = TracerProvider(resource=Resource.create({"service.name": "mcpfleet-gateway", "mcpfleet.server": "exec"}))
    other.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(compression=Compression.Gzip)))
    other.get_tracer("impostor").start_span("impostor").end()
    return "sent"

@server.tool(description="POST bytes to the trace endpoint; the answers' statuses")
def post(size: int, times: int = 1, token: str = "", bomb: bool = False) -> str:
    import gzip
    url = os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    if token:
        url = url.replace(url.split("/")[3], token)
    statuses = []
    for _ in range(times):
        headers = {"Content-Type": "application/x-protobuf"}
        data = os.urandom(size)
        if bomb:  # small on the wire, `size` zeros once inflated
            data, headers["Content-Encoding"] = gzip.compress(bytes(size)), "gzip"
        request = urllib.request.Request(url, data=data, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                statuses.append(response.status)
        except urllib.error.HTTPError as exc:
            statuses.append(exc.code)
        except OSError as exc:  # the endpoint may close before reading an oversized body
            statuses.append(str(exc)[:80])
    return json.dumps(statuses)

@server.tool(description="The OpenTelemetry environment this server got")
def env() -> str:
    return json.dumps({k: v for k, v in os.environ.items() if k.startswith("OTEL_")})

if os.environ.get("TRACED_RUN"):
    server.run()
"""


# Run by the exec server: an export to the traced server's endpoint, with its token.
NEIGHBOUR = """
import urllib.error, urllib.request
request = urllib.request.Request(URL, data=b"", method="POST", headers={"Content-Type": "application/x-protobuf"})
try:
    print(urllib.request.urlopen(request, timeout=30).status)
except urllib.error.HTTPError as exc:
    print(exc.code)
"""


class TracedServers:
    """The fixture servers plus `traced`, its code and the OpenTelemetry SDK put in the tools dir."""

    async def servers_for(self, user_id: int | None) -> tuple[ServerSpec, ...]:
        code = (f"import os, sys; sys.path[:0] = ['{TOOLS}/{REVISION}/lib', '{TOOLS}/{REVISION}']; "
                "os.environ['TRACED_RUN'] = '1'; import traced_tool")
        return (*SERVERS, ServerSpec("traced", ("python", "-c", code), revision=REVISION))

    def provision(self, tools_dir: Path, servers: Sequence[ServerSpec]) -> None:
        lib = tools_dir / REVISION / "lib"
        lib.mkdir(mode=0o755, parents=True, exist_ok=True)
        (tools_dir / REVISION / "traced_tool.py").write_text(TRACED)
        for name in DISTRIBUTIONS:
            dist = importlib.metadata.distribution(name)
            for file in dist.files or ():
                if "__pycache__" in file.parts or file.parts[0].startswith("..") or ".dist-info" in file.parts[0]:
                    continue
                target = lib / file
                target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                shutil.copyfile(file.locate(), target)
        for root, dirs, files in os.walk(tools_dir):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755)
            for name in files:
                os.chmod(os.path.join(root, name), 0o644)


@pytest.fixture
def receiver():
    running = OtlpReceiver()
    yield running
    running.close()


@pytest.fixture
def exporting(receiver):
    """The gateway's half, as `gateway.telemetry` makes it when OTEL_EXPORTER_OTLP_ENDPOINT is set."""
    processor = SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces"))
    provider = TracerProvider(resource=Resource({"service.name": "mcpfleet-gateway"}))
    provider.add_span_processor(processor)
    yield provider, SandboxSpans(processor, Resource({"service.name": SANDBOX_SERVICE_NAME})), ServerSpans(processor)
    provider.shutdown()


async def traced_call(provider, relay, sandbox, tool: str) -> tuple[str, str, dict[str, Any]]:
    """A call over the channel in a trace, as `gateway.tracing.channel_hop` makes it: the trace id,
    the hop's span id, and the result."""
    with provider.get_tracer("mcpfleet.gateway").start_as_current_span(f"tools/call {tool}", kind=SpanKind.CLIENT) as hop:
        meta: dict[str, str] = {}
        propagate.inject(meta)
        timings: list[dict[str, Any]] = []
        collecting = sandbox_spans.set(timings)
        try:
            result = await sandbox.client.request("traced", "tools/call", {"name": tool, "arguments": {}, "_meta": meta}, timeout=60)
        finally:
            sandbox_spans.reset(collecting)
        relay.export(hop, f"tools/call {tool}", {"mcpfleet.server": "traced"}, timings)
        context = hop.get_span_context()
    return f"{context.trace_id:032x}", f"{context.span_id:016x}", result


async def listening_ports(sandbox) -> list[str]:
    """The sandbox's listening TCP sockets, from its /proc/net/tcp (state 0A)."""
    listed = await sh(sandbox, python_inside(
        "print([l.split()[1] for l in open('/proc/net/tcp').readlines()[1:] if l.split()[3] == '0A'])"))
    return json.loads(listed["stdout"].strip().replace("'", '"'))


async def test_a_servers_own_spans_join_the_callers_trace_under_the_servers_service(fleets, receiver, exporting):
    provider, relay, server_spans = exporting
    fleet = await fleets("spans")
    manager = SandboxManager(fleet.home, fleet.pool, fleet.backend, TracedServers(), lifecycle=fleet.lifecycle,
                             spans=server_spans)
    await manager.start()
    fleet.managers.append(manager)
    alice = await fleet.user("alice")
    sandbox = await manager.ensure(*alice)

    env = json.loads(text(await call(sandbox, "env", server="traced")))
    assert set(OTEL_ENV) <= set(env), env
    assert env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"].startswith("http://127.0.0.1:")
    assert env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"].endswith("/v1/traces")
    assert (env["OTEL_EXPORTER_OTLP_PROTOCOL"], env["OTEL_SERVICE_NAME"]) == ("http/protobuf", "traced")

    trace_id, hop_id, result = await traced_call(provider, relay, sandbox, "work")
    assert text(result) == "done"
    spans = receiver.trace(trace_id, until="work", timeout=60)
    (supervisor,) = [s for s in spans if s["service"] == SANDBOX_SERVICE_NAME]
    assert supervisor["parent"] == hop_id
    mine = {s["name"]: s for s in spans if s["service"] == SERVER_SERVICE_NAME}
    # The mcp SDK's span for the request is the child of the supervisor's; the tool's own is its child.
    assert mine["tools/call work"]["parent"] == supervisor["span_id"]
    assert mine["tools/call work"]["kind"] == 2  # SERVER
    assert mine["work"]["parent"] == mine["tools/call work"]["span_id"]
    assert mine["work"]["attributes"] == {"work.items": 3} and mine["work"]["scope"] == "traced.tool"
    resource = mine["work"]["resource"]
    assert resource["mcpfleet.server"] == "traced" and resource["mcpfleet.sandbox"] == sandbox.id
    assert resource["telemetry.sdk.language"] == "python"  # what the server says of itself, but its name, stays

    # A provider claiming to be the gateway and another server is filed as this server all the same.
    await traced_call(provider, relay, sandbox, "impostor")
    (impostor,) = _wait_named(receiver, "impostor")
    assert impostor["service"] == SERVER_SERVICE_NAME
    assert impostor["resource"]["mcpfleet.server"] == "traced" and impostor["resource"]["mcpfleet.sandbox"] == sandbox.id

    # Garbage is relayed and dropped by the gateway; too much is refused at once, so is a wrong token;
    # a server that keeps sending is held to its budget. Nothing breaks: the next traced call is exported.
    assert json.loads(text(await call(sandbox, "post", server="traced", size=1000))) == [200]
    oversized = json.loads(text(await call(sandbox, "post", server="traced", size=wire.MAX_SPANS_BODY + 1)))
    assert oversized[0] == 413 or "reset" in str(oversized[0]).lower() or "broken" in str(oversized[0]).lower(), oversized
    assert json.loads(text(await call(sandbox, "post", server="traced", size=10, token=secrets.token_urlsafe(24)))) == [401]
    assert json.loads(text(await call(sandbox, "post", server="traced", size=64 * wire.MAX_SPANS_BODY, bomb=True))) == [413]
    flood = json.loads(text(await call(sandbox, "post", server="traced", size=wire.MAX_SPANS_BODY // 2, times=40)))
    assert 200 in flood and 429 in flood, flood
    trace_id, _, _ = await traced_call(provider, relay, sandbox, "work")
    assert any(s["name"] == "work" for s in receiver.trace(trace_id, until="work", timeout=60))
    assert (await listening_ports(sandbox))  # the endpoint, served

    # A neighbour (the exec server, or code it runs) holding the traced server's URL cannot send as it.
    stolen = await sh(sandbox, python_inside(NEIGHBOUR.replace("URL", repr(env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]))))
    assert stolen["stdout"].strip() == "403", stolen

    # Hibernated and resumed (the endpoint's socket is saved with the sandbox), the server exports again.
    assert await manager.hibernate(alice[0]) is True
    resumed = await manager.ensure(*alice)
    assert resumed.id == sandbox.id
    trace_id, _, _ = await traced_call(provider, relay, resumed, "work")
    assert any(s["name"] == "work" and s["service"] == SERVER_SERVICE_NAME
               for s in receiver.trace(trace_id, until="work", timeout=60))


async def test_with_tracing_off_nothing_is_served_and_servers_are_told_nothing(fleets):
    fleet = await fleets("nospans")
    manager = SandboxManager(fleet.home, fleet.pool, fleet.backend, TracedServers(), lifecycle=fleet.lifecycle)
    await manager.start()
    fleet.managers.append(manager)
    sandbox = await manager.ensure(*await fleet.user("bob"))
    env = json.loads(text(await call(sandbox, "env", server="traced")))
    assert not set(OTEL_ENV) & set(env), env
    # None of these servers declares egress or inference: nothing on the sandbox's loopback listens.
    assert await listening_ports(sandbox) == []


def _wait_named(receiver: OtlpReceiver, name: str, timeout: float = 60) -> list[dict[str, Any]]:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with receiver.lock:
            found = [s for s in receiver.spans if s["name"] == name]
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no span {name!r} arrived")
