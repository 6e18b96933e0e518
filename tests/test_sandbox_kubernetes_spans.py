"""Servers' own spans from a Kubernetes pod: the kubernetes backend's manager (sandbox/kubernetes.py)
of a gateway that exports traces asks for `spec.traces`, and a pod's supervisor relays what its
servers export over the channel into the gateway's export, as from a local sandbox.

No Kubernetes API server can run here: kmock's KubernetesEmulator stands in for one, and the test
plays the operator (tests/kube_sandboxes.py, `Operator`): the pod is a real supervisor process
listening on loopback TCP (`--listen`, the pod's command line) with a /workspace of its own
(`PodSupervisor`, chrooted: needs root), its config saying `traces` as the McpSandbox does. The server is the one of tests/test_server_spans.py, with the real OpenTelemetry SDK
and OTLP/HTTP exporter (the test's Python has them); the gateway's half is the real `ServerSpans` and
OTLP exporter, to a receiver in this process standing in for a collector (`OtlpReceiver`).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from gateway.server_spans import SERVER_SERVICE_NAME
from gateway.telemetry import SANDBOX_SERVICE_NAME
from sandbox.kubernetes import KubernetesSandboxes
from sandbox.servers import ServerSpec, StaticServers
from tests.kube_sandboxes import KEY, NS, Operator, PodSupervisor, api_client, patches, serving_sandboxes, stored
from tests.test_sandbox_kubernetes import api, tier_of, workdir  # noqa: F401  (api and workdir are fixtures)
from tests.test_sandbox_supervisor import text, tool
from tests.test_server_spans import OTEL_ENV, TRACED, exporting, receiver, traced_call  # noqa: F401  (fixtures)

WITHIN = 60.0
"""Each test's bound: a test that waits longer fails instead of hanging."""


def traced_servers(workdir: Path, export_timeout_s: int = 10) -> StaticServers:
    """The traced server, run by the pod's supervisor with the test's Python (which has the SDK).
    Told of no endpoint, its SDK exports to its default (localhost:4318, where nothing listens) and
    retries each span until its timeout: a server told of none is given one second, not ten, so that
    the test does not wait. A server that exports to the relay keeps the SDK's ten: on a loaded machine
    one second can end an export that would have landed, and its spans are then dropped."""
    code = workdir / "traced_tool.py"
    code.write_text(TRACED)
    env = {"TRACED_RUN": "1", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": str(export_timeout_s)}
    return StaticServers([ServerSpec("traced", (sys.executable, str(code)), env=env, revision="traced-r1")])


async def test_a_tracing_gateway_asks_for_traces_and_exports_a_pods_server_spans(api, workdir, receiver, exporting):
    provider, relay, server_spans = exporting
    async with asyncio.timeout(WITHIN):
        sandboxes = KubernetesSandboxes(api_client(api), traced_servers(workdir), tier_of, KEY, namespace=NS, spans=server_spans)
        async with Operator(api, workdir, pod=PodSupervisor):
            sandbox = await sandboxes.ensure(31, "acme", "tracy")
            assert stored(api, "acme-tracy")["spec"]["traces"] is True
            env = json.loads(text(await tool(sandbox.client, "env", server="traced")))
            assert set(OTEL_ENV) <= set(env) and env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"].startswith("http://127.0.0.1:"), env

            trace_id, hop_id, result = await traced_call(provider, relay, sandbox, "work")
            assert text(result) == "done"
            spans = await asyncio.to_thread(receiver.trace, trace_id, until="work", timeout=30)
            (supervisor,) = [s for s in spans if s["service"] == SANDBOX_SERVICE_NAME]
            assert supervisor["parent"] == hop_id
            mine = {s["name"]: s for s in spans if s["service"] == SERVER_SERVICE_NAME}
            assert mine["work"]["parent"] == mine["tools/call work"]["span_id"]
            assert mine["tools/call work"]["parent"] == supervisor["span_id"]
            # Filed under the sandbox as the gateway knows it: the McpSandbox's name.
            assert mine["work"]["resource"]["mcpfleet.server"] == "traced"
            assert mine["work"]["resource"]["mcpfleet.sandbox"] == "acme-tracy" == sandbox.id
        await sandboxes.close()


async def test_a_sandbox_made_without_traces_is_switched_when_a_tracing_gateway_wakes_it(api, workdir, receiver, exporting):
    """Made by a gateway that exports no traces: no trace endpoint, its servers told nothing. A gateway
    that exports them wakes it with `spec.traces` in the same patch, and the new pod relays."""
    provider, relay, server_spans = exporting
    async with asyncio.timeout(WITHIN):
        quiet = KubernetesSandboxes(api_client(api), traced_servers(workdir, export_timeout_s=1), tier_of, KEY, namespace=NS)
        async with Operator(api, workdir, pod=PodSupervisor) as operator:
            sandbox = await quiet.ensure(32, "acme", "quinn")
            assert stored(api, "acme-quinn")["spec"]["traces"] is False
            env = json.loads(text(await tool(sandbox.client, "env", server="traced")))
            assert not set(OTEL_ENV) & set(env), env
            assert await quiet.hibernate(32) is True
            await quiet.close()
            # `hibernate` returns once the spec says so; the wake below must find the pod gone, as it
            # would on a cluster some time later, not race the operator's reading of that spec.
            while (stored(api, "acme-quinn").get("status") or {}).get("state") != "Hibernated":
                await asyncio.sleep(0.05)

            tracing = KubernetesSandboxes(api_client(api), traced_servers(workdir), tier_of, KEY, namespace=NS, spans=server_spans)
            woken = await tracing.ensure(32, "acme", "quinn")
            assert patches(api, "acme-quinn")[-1].data == {"spec": {"traces": True, "operatingMode": "Running"}}
            assert operator.started == 2
            env = json.loads(text(await tool(woken.client, "env", server="traced")))
            assert set(OTEL_ENV) <= set(env), env
            trace_id, _, _ = await traced_call(provider, relay, woken, "work")
            spans = await asyncio.to_thread(receiver.trace, trace_id, until="work", timeout=30)
            assert any(s["name"] == "work" and s["service"] == SERVER_SERVICE_NAME for s in spans)
        await tracing.close()
