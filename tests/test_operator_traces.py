"""The operator and servers' spans: `spec.traces` (set by a gateway that exports traces) rendered into
the supervisor's config, and warm pool pods claimed only by sandboxes that want what they started with.

As in tests/test_operator.py, the real kopf operator runs against a STAND-IN for the Kubernetes API
(kmock, extended by tests/kube_standin.py: no API server can run here); the tests play the kubelet.
The config is read back with the supervisor's own parser (`SupervisorConfig.from_json`).
"""

from __future__ import annotations

import json
import time

import pytest
from test_operator import (  # noqa: F401  (cluster is a fixture; the module as pytest imported it, not a second copy)
    NS,
    Cluster,
    _pool_pods,
    cluster,
    creation_handled,
    operator,
    state,
    wait_for,
)

from sandbox.supervisor.config import SupervisorConfig

kopf = pytest.importorskip("kopf")
from mcpfleet_operator import objects  # noqa: E402
from tests.kube_standin import CONFIGMAPS, PODS, POOLS  # noqa: E402


def _config(cluster: Cluster, config_map: str) -> SupervisorConfig | None:
    found = cluster.api.get(CONFIGMAPS, NS, config_map)
    return SupervisorConfig.from_json(found["data"][objects.CONFIG_KEY]) if found else None


def _create_pool(cluster: Cluster, name: str, replicas: int, traces: bool) -> None:
    body = {"apiVersion": "mcpfleet.dev/v1alpha1", "kind": "McpSandboxPool", "metadata": {"name": name},
            "spec": {"replicas": replicas, "tier": {"name": "standard", "cpus": 1, "memoryMb": 512},
                     "template": {"traces": traces}}}
    r = cluster.http("POST", f"/apis/mcpfleet.dev/v1alpha1/namespaces/{NS}/mcpsandboxpools", body, "application/json")
    assert r.status_code in (200, 201), r.text


def test_the_config_says_traces_as_the_spec_does() -> None:
    assert SupervisorConfig.from_json(objects.supervisor_config([], traces=True)).traces is True
    assert SupervisorConfig.from_json(objects.supervisor_config([])).traces is False
    pool = {"metadata": {"name": "warm"}, "spec": {"template": {"traces": True}}}
    assert objects.pod_traces(objects.pool_pod(pool, "warm-abc", "img")) is True
    assert objects.pod_traces(objects.pool_pod({"metadata": {"name": "warm"}, "spec": {}}, "warm-abc", "img")) is False
    assert objects.pod_traces({"metadata": {}}) is False  # a pool pod from before the annotation: traces off


def test_spec_traces_reaches_the_supervisors_config_and_a_change_reaches_the_next_pod(cluster: Cluster) -> None:
    t0 = time.monotonic()
    with operator():
        cluster.create_sandbox("acme-tess", traces=True)
        cluster.create_sandbox("acme-ugo")
        assert wait_for(lambda: _config(cluster, "acme-tess-config"), what="the config map").traces is True
        assert wait_for(lambda: _config(cluster, "acme-ugo-config"), what="the other config map").traces is False
        pod = wait_for(lambda: cluster.api.get(PODS, NS, "acme-tess"), what="the pod")
        wait_for(lambda: creation_handled(cluster, "acme-tess"), what="the creation handled")
        cluster.run_pod("acme-tess")
        wait_for(lambda: state(cluster, "acme-tess") == "Running", what="Running")
        # The gateway stops exporting: the config follows, the running pod is left to its work.
        cluster.patch_sandbox("acme-tess", {"spec": {"traces": False}})
        wait_for(lambda: _config(cluster, "acme-tess-config").traces is False, what="the config map updated")
        time.sleep(0.5)
        assert cluster.api.get(PODS, NS, "acme-tess")["metadata"]["uid"] == pod["metadata"]["uid"]
        assert state(cluster, "acme-tess") == "Running"
    print(f"traces config: {time.monotonic() - t0:.2f}s")


def test_a_sandbox_claims_only_a_warm_pod_that_relays_spans_as_it_wants(cluster: Cluster) -> None:
    t0 = time.monotonic()
    with operator():
        _create_pool(cluster, "warm", 1, traces=False)
        (quiet,) = wait_for(lambda: _pool_pods(cluster, "warm"), what="a warm pod")
        cluster.run_pod(quiet)
        wait_for(lambda: ((cluster.api.get(POOLS, NS, "warm") or {}).get("status") or {}).get("replicas") == 1, what="ready")
        assert _config(cluster, "warm-pool-config").traces is False
        # A tracing gateway's sandbox would get a pod that serves no trace endpoint: it starts cold instead.
        cluster.create_sandbox("acme-vera", poolRef="warm", traces=True)
        wait_for(lambda: cluster.api.get(PODS, NS, "acme-vera"), what="a pod of its own")
        wait_for(lambda: state(cluster, "acme-vera") == "Starting", what="Starting cold")
        assert _pool_pods(cluster, "warm") == [quiet]
        assert _config(cluster, "acme-vera-config").traces is True

        # The pool's template follows the gateways: its unclaimed pod is replaced by one that relays spans.
        r = cluster.http("PATCH", f"/apis/mcpfleet.dev/v1alpha1/namespaces/{NS}/mcpsandboxpools/warm",
                         {"spec": {"template": {"traces": True}}})
        assert r.status_code == 200, r.text
        (tracing,) = wait_for(lambda: [p for p in _pool_pods(cluster, "warm") if p != quiet] if cluster.api.get(PODS, NS, quiet)
                              is None else None, what="the warm pod replaced")
        assert objects.pod_traces(cluster.api.get(PODS, NS, tracing))
        assert _config(cluster, "warm-pool-config").traces is True
        cluster.run_pod(tracing)
        wait_for(lambda: ((cluster.api.get(POOLS, NS, "warm") or {}).get("status") or {}).get("replicas") == 1, what="ready")
        cluster.create_sandbox("acme-walt", poolRef="warm", traces=True)
        wait_for(lambda: state(cluster, "acme-walt") == "Running", what="claimed and Running")
        assert cluster.sandbox("acme-walt")["status"]["podName"] == tracing
    print(f"traces pool: {time.monotonic() - t0:.2f}s")
