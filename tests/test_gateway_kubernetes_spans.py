"""A gateway on MCPFLEET_SANDBOX_BACKEND=kubernetes that exports traces: real `mcpfleet up` (with
OTEL_EXPORTER_OTLP_ENDPOINT), real PostgreSQL, the SDK's Client over Streamable HTTP, real supervisors
on TCP. Its McpSandboxes ask for `spec.traces`, and a span that a process in the pod exports to its
server's trace endpoint reaches the gateway's collector as that server's, in that McpSandbox.

Stand-ins, as no cluster and no collector run here: kmock's emulator serves the McpSandbox objects
(tests/kube_sandboxes.py says what it does and what it does not prove); the test plays the operator
(`Operator`: a pod is a real supervisor listening on loopback TCP, chrooted with a /workspace, its
config saying `traces` as the object does); `OtlpReceiver` (tests/test_telemetry.py) plays the collector.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import time
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.clients import connect, structured
from tests.conftest import make_fleet
from tests.kube_sandboxes import KEY, NS, Operator, PodSupervisor, serving_sandboxes, spec_pod, stored, write_kubeconfig
from tests.test_egress import python_inside
from tests.test_gateway_kubernetes import kube, workdir  # noqa: F401  (fixtures)
from tests.test_telemetry import OtlpReceiver

WITHIN = 90.0
"""The test's bound: a wait that never ends fails the test instead of hanging it."""


@pytest.fixture(scope="module")
def receiver():
    running = OtlpReceiver()
    yield running
    running.close()


@pytest.fixture(scope="module")
async def gateway(kube, workdir, tmp_path_factory, postgres_url, receiver):
    key_file = workdir / "sandbox.key"
    key_file.write_bytes(KEY + b"\n")
    fleet = make_fleet(
        tmp_path_factory, postgres_url,
        MCPFLEET_SANDBOX_BACKEND="kubernetes", MCPFLEET_K8S_NAMESPACE=NS, MCPFLEET_SANDBOX_KEY_FILE=str(key_file),
        KUBECONFIG=str(write_kubeconfig(workdir / "kubeconfig", kube)), MCPFLEET_K8S_START_TIMEOUT_S="5",
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_BSP_SCHEDULE_DELAY="100",
        # As in a gateway pod: no gVisor on this gateway's machine.
        PATH=os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "runsc").exists()),
    )  # fmt: skip
    await asyncio.to_thread(fleet.start)
    yield fleet
    # In a thread: the stand-in answers in this loop while the gateway stops.
    await asyncio.to_thread(fleet.stop)


def export_request(trace_id: bytes) -> bytes:
    """One span, as a server's SDK would export it, claiming to be the gateway and another server."""
    request = ExportTraceServiceRequest()
    claimed = request.resource_spans.add()
    for key, value in {"service.name": "mcpfleet-gateway", "mcpfleet.server": "workspace"}.items():
        attribute = claimed.resource.attributes.add()
        attribute.key, attribute.value.string_value = key, value
    span = claimed.scope_spans.add().spans.add()
    start = time.time_ns()
    span.trace_id, span.span_id, span.name = trace_id, secrets.token_bytes(8), "made in a pod"
    span.start_time_unix_nano, span.end_time_unix_nano = start, start + 1000
    return request.SerializeToString()


async def test_a_span_made_in_a_pod_reaches_the_gateways_collector_as_its_servers(gateway, kube, workdir, receiver):
    """kmock stands in for the API server, `Operator` for the operator, `OtlpReceiver` for the collector."""
    async with asyncio.timeout(WITHIN):
        key = await asyncio.to_thread(gateway.add_user, "tara", "default", "member")
        trace_id = secrets.token_bytes(16)
        body = base64.b64encode(export_request(trace_id)).decode()
        code = ("import base64, os, urllib.request\n"
                f"sent = urllib.request.Request(os.environ['OTEL_EXPORTER_OTLP_TRACES_ENDPOINT'], data=base64.b64decode('{body}'),"
                " headers={'Content-Type': 'application/x-protobuf'})\n"
                "print(urllib.request.urlopen(sent, timeout=30).status)")
        played = Operator(kube, workdir, spec_pod, pod=PodSupervisor, only=frozenset({"default-tara"}))
        async with played, connect(gateway.mcp_url, key) as client:
            result = await client.call_tool("exec__run", {"command": python_inside(code), "timeout_s": 30})
            assert not result.is_error and structured(result)["stdout"].strip() == "200", structured(result)
        assert stored(kube, "default-tara")["spec"]["traces"] is True
        (got,) = await asyncio.to_thread(receiver.trace, trace_id.hex(), until="made in a pod", timeout=30)
        assert got["service"] == "mcpfleet-server"
        assert got["resource"]["mcpfleet.server"] == "exec" and got["resource"]["mcpfleet.sandbox"] == "default-tara"
