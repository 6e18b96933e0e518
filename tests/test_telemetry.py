"""Traces, metrics and JSON logs of a real gateway (`mcpfleet up`) serving real sandbox calls.

Traces are exported by the gateway's own OTLP exporter (OTEL_EXPORTER_OTLP_ENDPOINT) to a receiver
in this test process: a plain HTTP server that decodes OTLP/protobuf with the `opentelemetry-proto`
messages, as a collector would. The metrics page is read with prometheus_client's text parser.
"""

from __future__ import annotations

import base64
import http.server
import json
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse
from prometheus_client.parser import text_string_to_metric_families

from tests.clients import connect
from tests.conftest import make_fleet
from tests.test_egress import python_inside

MODERN = {"MCP-Protocol-Version": "2026-07-28", "Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
ENVELOPE = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"}}


class OtlpReceiver:
    """Stands in for an OpenTelemetry collector (none runs here): OTLP/HTTP protobuf on loopback."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.path == "/v1/traces":
                    receiver.take(body)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def take(self, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            service = resource["service.name"]
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attributes = {a.key: _value(a.value) for a in span.attributes}
                    with self.lock:
                        self.spans.append({
                            "service": service, "name": span.name, "kind": span.kind, "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(), "parent": span.parent_span_id.hex(), "attributes": attributes,
                            "status": span.status.code, "scope": scope_spans.scope.name, "resource": resource,
                        })

    def trace(self, trace_id: str, until: str, timeout: float = 15) -> list[dict[str, Any]]:
        """The spans of one trace, once a span named `until` has arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                spans = [s for s in self.spans if s["trace_id"] == trace_id]
            if any(s["name"] == until for s in spans):
                time.sleep(0.3)  # its siblings come in the same batch or the next
                with self.lock:
                    return [s for s in self.spans if s["trace_id"] == trace_id]
            time.sleep(0.1)
        raise AssertionError(f"no span {until!r} in trace {trace_id}; got {[s['name'] for s in spans]}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _value(value: Any) -> Any:
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    running = OtlpReceiver()
    yield running
    running.close()


@pytest.fixture(scope="module")
def traced(tmp_path_factory, postgres_url, receiver):
    """A gateway exporting its traces to the receiver, writing JSON logs, listening beyond loopback
    (all addresses: the tests reach it on 127.0.0.1 only)."""
    running = make_fleet(
        tmp_path_factory, postgres_url,
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_BSP_SCHEDULE_DELAY="100", MCPFLEET_LOG_FORMAT="json",
        MCPFLEET_HOST="0.0.0.0",
    )
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def dana(traced) -> str:
    return traced.add_user("dana")


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def modern_call(url: str, key: str, tool: str, arguments: dict, *, headers: dict | None = None, meta: dict | None = None) -> dict:
    body = {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
            "params": {"name": tool, "arguments": arguments, "_meta": {**ENVELOPE, **(meta or {})}}}
    response = httpx.post(url, json=body, timeout=120, headers={
        **MODERN, "Mcp-Method": "tools/call", "Mcp-Name": tool, "Authorization": f"Bearer {key}", **(headers or {})})
    # 2026-07-28 answers a JSON-RPC error about the request's params with HTTP 400.
    assert response.status_code == (200 if "result" in response.json() else 400), response.text
    return response.json()


def by_name(spans: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The gateway's spans by name (a supervisor's span is named as the hop it answers)."""
    return {s["name"]: s for s in spans if s["service"] == "mcpfleet-gateway"}


# -- traces --------------------------------------------------------------------------------------


def test_a_call_is_one_trace_from_the_clients_traceparent_header_to_the_channel(traced, receiver, dana):
    header, trace_id, client_span = traceparent()
    answer = modern_call(traced.mcp_url, dana, "workspace__list_dir", {"path": "."}, headers={"traceparent": header})
    assert "result" in answer, answer

    everything = receiver.trace(trace_id, until="POST /mcp")
    assert {s["service"] for s in everything} == {"mcpfleet-gateway", "mcpfleet-sandbox"}
    spans = by_name(everything)
    http_span, mcp_span = spans["POST /mcp"], spans["tools/call workspace__list_dir"]
    assert http_span["parent"] == client_span  # the header was honoured
    assert spans["authenticate"]["parent"] == http_span["span_id"]
    assert spans["authenticate"]["attributes"]["mcpfleet.auth.outcome"] == "accepted"
    assert mcp_span["parent"] == http_span["span_id"]
    assert mcp_span["kind"] == 2  # SERVER
    assert mcp_span["attributes"] == {
        "mcp.method.name": "tools/call", "gen_ai.tool.name": "workspace__list_dir", "gen_ai.operation.name": "execute_tool",
        "jsonrpc.request.id": "7", "mcp.protocol.version": "2026-07-28", "network.transport": "tcp",
    }
    # The first call of this user brought a sandbox up, inside an MCP span of this request (a 2026-07-28
    # call's Mcp-Param-* check reads the tool's schema from the catalog, which needs the sandbox: inside
    # the call's own span on the fast path, inside the SDK's tools/list span on the general path).
    mcp_spans = {s["span_id"] for s in spans.values() if s["kind"] == 2 and s["parent"] == http_span["span_id"]}
    bring_up = [s for s in spans.values() if s["name"] in ("sandbox cold start", "sandbox claim", "sandbox resume")]
    assert bring_up and all(s["parent"] in mcp_spans for s in bring_up)
    assert "sandbox cold start" in spans
    hop = spans["tools/call list_dir"]
    assert hop["kind"] == 3  # CLIENT: the hop over the channel
    assert hop["parent"] == mcp_span["span_id"]
    assert hop["attributes"]["mcpfleet.server"] == "workspace"
    # The supervisor continued the trace inside the sandbox; the gateway exported its span.
    inside = [s for s in everything if s["service"] == "mcpfleet-sandbox"]
    assert [(s["name"], s["kind"], s["parent"], s["scope"]) for s in inside] == [
        ("tools/call list_dir", 2, hop["span_id"], "mcpfleet.supervisor")]
    # No argument, result or token in any span.
    dumped = json.dumps(everything)
    assert dana not in dumped and '"path"' not in dumped


def test_a_traceparent_in_meta_wins_and_errors_carry_their_type(traced, receiver, dana):
    header, header_trace, _ = traceparent()
    meta_parent, meta_trace, meta_span = traceparent()
    answer = modern_call(traced.mcp_url, dana, "workspace__no_such_tool", {},
                         headers={"traceparent": header}, meta={"traceparent": meta_parent})
    assert answer["error"]["code"] == -32602

    spans = by_name(receiver.trace(meta_trace, until="tools/call workspace__no_such_tool"))
    mcp_span = spans["tools/call workspace__no_such_tool"]
    assert mcp_span["parent"] == meta_span
    assert mcp_span["attributes"]["error.type"] == "-32602"
    assert mcp_span["status"] == 2  # ERROR
    # The HTTP span stays in the header's trace.
    assert by_name(receiver.trace(header_trace, until="POST /mcp"))


async def test_the_trace_context_goes_on_to_the_server_in_meta(traced, receiver, dana):
    """The channel hop's context is what the sandbox gets: the SDK client's own session, whose
    `exec__run` shows the process; the supervisor passes `_meta` on to the server untouched."""
    header, trace_id, _ = traceparent()
    async with connect(traced.mcp_url, dana, "legacy", ) as client:
        result = await client.call_tool("exec__run", {"command": "true", "timeout_s": 30}, meta={"traceparent": header})
    assert not result.is_error
    spans = by_name(receiver.trace(trace_id, until="tools/call run"))
    assert spans["tools/call run"]["parent"] == spans["tools/call exec__run"]["span_id"]
    assert spans["tools/call exec__run"]["attributes"]["mcp.protocol.version"] == "2025-11-25"
    assert "mcp.session.id" in spans["tools/call exec__run"]["attributes"]


def test_servers_are_told_of_the_trace_endpoint_only_by_a_gateway_that_exports(traced, receiver, fleet, dana):
    """The fleet's wiring of `tests/test_server_spans.py`: a gateway exporting traces has its
    sandboxes serve the trace endpoint (processes the exec server runs inherit its variables); one
    that does not, none."""
    def otel_env(running, key: str) -> dict[str, str]:
        answer = modern_call(running.mcp_url, key, "exec__run", {"command": "env", "timeout_s": 30})
        stdout = answer["result"]["structuredContent"]["stdout"]
        return dict(line.split("=", 1) for line in stdout.splitlines() if line.startswith("OTEL_"))

    exported = otel_env(traced, dana)
    assert exported["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"].startswith("http://127.0.0.1:")
    assert (exported["OTEL_EXPORTER_OTLP_PROTOCOL"], exported["OTEL_SERVICE_NAME"]) == ("http/protobuf", "exec")
    assert not any(receiver.endpoint in value for value in exported.values())  # the collector is the gateway's alone
    assert otel_env(fleet, fleet.add_user("otel-off")) == {}


def test_a_servers_process_exports_spans_through_the_gateway_as_that_server_whatever_it_claims(traced, receiver, dana):
    """What a server's OpenTelemetry SDK does, done by hand by a command the exec server runs (the
    sandbox's Python has no SDK; `tests/test_server_spans.py` runs one): an OTLP/protobuf POST to
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT. The span reaches the gateway's collector as the exec server's."""
    trace_id, start = secrets.token_bytes(16), time.time_ns()
    request = ExportTraceServiceRequest()
    claimed = request.resource_spans.add()
    for key, value in {"service.name": "mcpfleet-gateway", "mcpfleet.server": "workspace", "host.name": "inside"}.items():
        attribute = claimed.resource.attributes.add()
        attribute.key, attribute.value.string_value = key, value
    span = claimed.scope_spans.add().spans.add()
    span.trace_id, span.span_id, span.name = trace_id, secrets.token_bytes(8), "made inside"
    span.start_time_unix_nano, span.end_time_unix_nano = start, start + 1000
    body = base64.b64encode(request.SerializeToString()).decode()
    code = ("import base64, os, urllib.request\n"
            f"sent = urllib.request.Request(os.environ['OTEL_EXPORTER_OTLP_TRACES_ENDPOINT'], data=base64.b64decode('{body}'),"
            " headers={'Content-Type': 'application/x-protobuf'})\n"
            "print(urllib.request.urlopen(sent, timeout=30).status)")
    answer = modern_call(traced.mcp_url, dana, "exec__run", {"command": python_inside(code), "timeout_s": 30})
    assert answer["result"]["structuredContent"]["stdout"].strip() == "200", answer

    (got,) = receiver.trace(trace_id.hex(), until="made inside", timeout=30)
    assert got["service"] == "mcpfleet-server"
    assert got["resource"]["mcpfleet.server"] == "exec" and got["resource"]["mcpfleet.sandbox"].startswith("sbx-")
    assert got["resource"]["host.name"] == "inside"  # what it says of itself but its name is kept


# -- metrics ----------------------------------------------------------------------------------------


def scrape(url: str, key: str | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def op_count(samples: dict, tool: str, outcome: str, error_type: str) -> float:
    labels = (("error_type", error_type), ("gen_ai_tool_name", tool), ("mcp_method_name", "tools/call"), ("outcome", outcome))
    return samples.get(("mcp_server_operation_duration_seconds_count", labels), 0.0)


def test_metrics_count_real_calls_by_tool_and_outcome(traced, dana):
    auditor = traced.add_user("erin", role="auditor")
    url = f"{traced.base_url}/metrics"
    before = scrape(url, auditor)
    for _ in range(3):
        assert "result" in modern_call(traced.mcp_url, dana, "workspace__list_dir", {"path": "."})
    answer = modern_call(traced.mcp_url, dana, "workspace__read_file", {"path": "../outside"})
    assert answer["result"]["isError"] is True
    for i in range(2):
        assert "error" in modern_call(traced.mcp_url, dana, f"nope__{secrets.token_hex(4)}_{i}", {})
    assert httpx.post(traced.mcp_url, json={}, headers=MODERN).status_code == 401
    after = scrape(url, auditor)

    assert op_count(after, "workspace__list_dir", "ok", "") - op_count(before, "workspace__list_dir", "ok", "") == 3
    assert op_count(after, "workspace__read_file", "tool_error", "tool_error") - op_count(before, "workspace__read_file", "tool_error", "tool_error") == 1
    # Unknown tools are counted under one label, never under the names clients made up.
    assert op_count(after, "_other", "error", "-32602") - op_count(before, "_other", "error", "-32602") == 2
    assert not any("nope__" in str(labels) for _, labels in after)
    assert after[("mcpfleet_refusals_total", (("reason", "auth"),))] - before.get(("mcpfleet_refusals_total", (("reason", "auth"),)), 0) == 1
    # The sandbox this module's first call started, counted and timed.
    assert after[("mcpfleet_sandbox_events_total", (("event", "cold_start"),))] >= 1
    assert after[("mcpfleet_sandbox_event_duration_seconds_count", (("event", "cold_start"),))] >= 1
    assert after[("mcpfleet_sandboxes", (("state", "Running"),))] >= 1
    assert after[("mcpfleet_sandboxes_running_here", (("kind", "user"),))] >= 1
    assert ("mcpfleet_warm_pool_size", ()) in after and ("mcpfleet_audit_queue_depth", ()) in after
    assert after[("mcpfleet_db_pool_connections", (("use", "max"),))] > 0


def test_metrics_are_refused_beyond_loopback_without_an_admin_or_auditor(traced, dana):
    url = f"{traced.base_url}/metrics"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {dana}"}).status_code == 401  # a member
    assert httpx.get(url, headers={"Authorization": "Bearer mcpf_000000000000_" + "x" * 43}).status_code == 401
    admin = traced.add_user("frank", role="admin")
    assert "mcp_server_operation_duration_seconds" in httpx.get(url, headers={"Authorization": f"Bearer {admin}"}).text


def test_metrics_are_open_on_loopback(fleet):
    response = httpx.get(f"{fleet.base_url}/metrics")
    assert response.status_code == 200
    assert any(f.name == "mcpfleet_warm_pool_size" for f in text_string_to_metric_families(response.text))


# -- logs --------------------------------------------------------------------------------------------


def test_log_lines_are_json_and_carry_the_trace_of_the_call_they_were_written_in(traced, receiver):
    grace = traced.add_user("grace")
    header, trace_id, _ = traceparent()
    modern_call(traced.mcp_url, grace, "workspace__list_dir", {"path": "."}, headers={"traceparent": header})
    receiver.trace(trace_id, until="POST /mcp")
    lines = [line for line in traced.log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    in_call = [r for r in records if r.get("trace_id") == trace_id]
    assert in_call, "no log line was written inside the traced call"
    assert all(len(r["span_id"]) == 16 for r in in_call)
    assert grace not in traced.log()


# -- what the SREs get in k8s/monitoring ------------------------------------------------------------

MONITORING = Path(__file__).resolve().parent.parent / "k8s" / "monitoring"


def exposed_names() -> set[str]:
    """Every name the gateway's page can have: families, and their series (a histogram's _bucket, _count, _sum)."""
    from gateway.metrics import Metrics

    metrics = Metrics()
    metrics.operation("tools/call", "t", "ok", "", 0.1)
    metrics.refused("auth")
    metrics.sandbox_events.labels("cold_start").inc()
    metrics.sandbox_durations.labels("cold_start").observe(1)
    metrics.sandboxes.labels("Running").set(1)
    metrics.running_here.labels("user").set(1)
    metrics.db_pool.labels("idle").set(1)
    families = list(text_string_to_metric_families(metrics.page().decode()))
    return {f.name for f in families} | {s.name for f in families for s in f.samples}


def queried_names(text: str) -> set[str]:
    return set(re.findall(r"\b(mcp_server_\w+|mcpfleet_\w+)", text))


def test_the_alert_rules_are_valid_promql_over_metrics_the_gateway_has(tmp_path):
    rule = yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    names = queried_names(json.dumps(rule))
    assert names and names <= exposed_names(), names - exposed_names()
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package; scripts/setup.sh test installs it)")
    plain = tmp_path / "rules.yaml"
    plain.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    checked = subprocess.run([promtool, "check", "rules", str(plain)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_dashboard_queries_metrics_the_gateway_has():
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(exprs) >= 10
    names = queried_names(" ".join(exprs))
    assert names <= exposed_names(), names - exposed_names()
    # Every panel has a place of its own on the grid.
    places = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in dashboard["panels"]]
    assert len(set(places)) == len(places)


# -- inside the sandbox: the supervisor continues the trace ----------------------------------------

# A stdio MCP server that answers every tools/call with the `_meta` it was sent.
META_ECHO_SERVER = r'''
import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if "id" not in message:
        continue
    method, params = message.get("method"), message.get("params") or {}
    if method == "initialize":
        result = {"protocolVersion": params.get("protocolVersion"), "capabilities": {"tools": {}}, "serverInfo": {"name": "echo", "version": "1"}}
    elif method == "tools/list":
        result = {"tools": [{"name": "meta", "inputSchema": {"type": "object"}}]}
    elif method == "tools/call":
        result = {"content": [{"type": "text", "text": json.dumps(params.get("_meta") or {})}]}
    else:
        result = {}
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}) + "\n")
    sys.stdout.flush()
'''


@pytest.fixture(scope="module")
async def meta_echo():
    import tempfile

    from sandbox.client import SupervisorClient
    from sandbox.supervisor.config import ServerConfig
    from tests.test_sandbox_supervisor import TOKEN, RunningSupervisor

    with tempfile.TemporaryDirectory(prefix="mcpf-tel-", dir="/tmp") as directory:
        supervisor = RunningSupervisor(Path(directory), [ServerConfig(name="echo", argv=[sys.executable, "-c", META_ECHO_SERVER])], token=TOKEN)
        client = SupervisorClient(supervisor.socket, token=TOKEN)
        await client.listen()
        supervisor.start()
        try:
            await client.wait_ready(60)
            yield client
        finally:
            await client.close()
            supervisor.stop()


async def echo_meta(client, meta: dict) -> tuple[dict, list[dict]]:
    from sandbox.channel import sandbox_spans

    spans: list[dict] = []
    token = sandbox_spans.set(spans)
    try:
        result = await client.request("echo", "tools/call", {"name": "meta", "arguments": {}, "_meta": meta})
    finally:
        sandbox_spans.reset(token)
    return json.loads(result["content"][0]["text"]), spans


async def test_the_supervisor_hands_the_server_a_traceparent_of_its_own_span_and_sends_its_times_back(meta_echo):
    header, trace_id, gateway_span = traceparent()
    before = time.time_ns()
    seen, spans = await echo_meta(meta_echo, {"traceparent": header, "tracestate": "k=v", "progressToken": 3})
    version, seen_trace, seen_parent, flags = seen["traceparent"].split("-")
    assert (version, seen_trace, flags) == ("00", trace_id, "01")
    assert seen_parent != gateway_span
    assert seen["tracestate"] == "k=v" and "progressToken" in seen  # the rest of _meta goes on as before
    assert len(spans) == 1 and spans[0]["id"] == seen_parent
    assert before <= spans[0]["start_ns"] <= spans[0]["end_ns"] <= time.time_ns()


@pytest.mark.parametrize("meta", [{}, {"traceparent": "00-" + "0" * 32 + "-" + "1" * 16 + "-01"}, {"traceparent": "not one"}])
async def test_a_call_without_a_valid_traceparent_is_passed_on_as_it_came(meta_echo, meta):
    seen, spans = await echo_meta(meta_echo, meta)
    assert seen == meta and spans == []


def test_a_sandboxs_span_is_exported_only_as_a_child_of_the_gateways_hop_with_its_times_bounded():
    """The sandbox is not trusted: a forged span id is dropped, times are held within the hop."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from gateway.telemetry import SandboxSpans

    exported = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exported)
    relay = SandboxSpans(processor, Resource({"service.name": "mcpfleet-sandbox"}))
    hop = TracerProvider().get_tracer("t").start_span("hop")
    started = hop.start_time
    relay.export(hop, "tools/call x", {"mcp.method.name": "tools/call"}, [
        {"id": "ab" * 8, "start_ns": 0, "end_ns": 10**20},  # times from nowhere: clamped
        {"id": "XYZ", "start_ns": started, "end_ns": started},  # not a span id
        {"id": "cd" * 8, "start_ns": "1", "end_ns": 2},  # not times
        {"id": "00" * 8, "start_ns": started, "end_ns": started},  # the invalid span id
    ])
    (span,) = exported.get_finished_spans()
    assert span.context.trace_id == hop.get_span_context().trace_id and span.parent.span_id == hop.get_span_context().span_id
    assert span.context.span_id == int("ab" * 8, 16)
    assert started <= span.start_time <= span.end_time <= time.time_ns()
    assert span.resource.attributes["service.name"] == "mcpfleet-sandbox"
