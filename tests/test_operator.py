"""The operator (operator/mcpfleet_operator) run by kopf against a STAND-IN for the Kubernetes API.

No Kubernetes API server runs on these machines. These tests run the real kopf operator, in its own
thread, against kmock (pinned 0.8) extended by tests/kube_standin.py: an in-memory server with the
API's shape, discovery, watches, patches, finalizers, resourceVersions and the status subresource, but
no kubelet, no scheduler, no garbage collector and no admission. The tests play those parts: they set a
pod's phase, IP and readiness themselves. What passes here is the operator's logic against the API's
contract as the stand-in implements it, not a cluster's behaviour.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# kopf and the client read these when the operator starts; the handlers read the MCPFLEET_* ones on import.
_TMP = Path(tempfile.mkdtemp(prefix="mcpfleet-operator-"))
os.environ["KUBECONFIG"] = str(_TMP / "kubeconfig")
os.environ["MCPFLEET_SANDBOX_KEY_FILE"] = str(_TMP / "fleet.key")
os.environ.setdefault("MCPFLEET_IDLE_HIBERNATE_S", "3")
os.environ.setdefault("MCPFLEET_IDLE_CHECK_S", "0.5")
os.environ.setdefault("MCPFLEET_POOL_CHECK_S", "1")
(_TMP / "fleet.key").write_bytes(b"test-fleet-key")

kopf = pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")
import requests  # noqa: E402  (the client's transport; used here for the stand-in's own tests)
from kmock._internal.apps import Server  # noqa: E402
from kopf.testing import KopfRunner  # noqa: E402

from mcpfleet_operator import handlers, objects  # noqa: E402,F401
from tests.kube_standin import EVENTS, NETPOLS, PEERINGS, PODS, POOLS, PVCS, SANDBOXES, SECRETS, KubeStandin  # noqa: E402

NS = "mcpfleet"
KEY = b"test-fleet-key"


class Cluster:
    """The stand-in served over HTTP from a thread of its own, and the tests' hands on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self.stop = asyncio.Event()
        async with KubeStandin() as api, Server(api) as server:
            self.api, self.url = api, str(server.url).rstrip("/")
            self.ready.set()
            await self.stop.wait()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    # -- HTTP, as any client would --------------------------------------------------------------------
    def http(self, method: str, path: str, body: Any = None, content_type: str = "application/merge-patch+json") -> requests.Response:
        return requests.request(method, self.url + path, json=body, headers={"Content-Type": content_type}, timeout=10)

    def create_sandbox(self, name: str, **spec: Any) -> dict[str, Any]:
        body = {"apiVersion": "mcpfleet.dev/v1alpha1", "kind": "McpSandbox", "metadata": {"name": name},
                "spec": {"user": name, "tenant": "acme", "tier": {"name": "standard", "cpus": 1, "memoryMb": 512, "pids": 256},
                         "workspace": {"size": "1Gi"}, "servers": [], **spec}}
        r = self.http("POST", f"/apis/mcpfleet.dev/v1alpha1/namespaces/{NS}/mcpsandboxes", body, "application/json")
        assert r.status_code in (200, 201), r.text
        return r.json()

    def patch_sandbox(self, name: str, body: dict[str, Any]) -> None:
        r = self.http("PATCH", f"/apis/mcpfleet.dev/v1alpha1/namespaces/{NS}/mcpsandboxes/{name}", body)
        assert r.status_code == 200, r.text

    def sandbox(self, name: str) -> dict[str, Any]:
        return self.api.get(SANDBOXES, NS, name) or {}

    def run_pod(self, name: str, ip: str = "10.0.0.7") -> None:
        """Play the kubelet: the pod runs, has an IP and passes its readiness probe."""
        self.call(self.api.kubelet(PODS, NS, name, {"status": {
            "phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}}))


def wait_for(check: Callable[[], Any], timeout: float = 15, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or check}")


def state(cluster: Cluster, name: str) -> str | None:
    return (cluster.sandbox(name).get("status") or {}).get("state")


def condition(sandbox: dict[str, Any], type_: str) -> str | None:
    return next((c["status"] for c in (sandbox.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


@pytest.fixture()
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    c.call(_seed(c.api))
    (_TMP / "kubeconfig").write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: standin, cluster: {{server: "{c.url}"}}}}]
users: [{{name: tester, user: {{token: standin-token}}}}]
contexts: [{{name: standin, context: {{cluster: standin, user: tester, namespace: {NS}}}}}]
current-context: standin
""")
    yield c
    c.close()


async def _seed(api: KubeStandin) -> None:
    api.objects["v1/namespaces", None, NS] = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "uid": "ns-uid"}}
    api.objects["kopf.dev/v1/kopfpeerings", NS, "mcpfleet"] = {
        "apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "mcpfleet", "namespace": NS, "uid": "peer-uid"}}


def operator(*extra: str) -> KopfRunner:
    args = ["run", "--namespace", NS, "-m", "mcpfleet_operator.handlers", *(extra or ("--standalone",))]
    return KopfRunner(args, timeout=20)


# --- the lifecycle -----------------------------------------------------------------------------------

def test_create_makes_the_four_objects_hardened(cluster: Cluster) -> None:
    t0 = time.monotonic()
    with operator():
        created = cluster.create_sandbox("acme-alice")
        wait_for(lambda: state(cluster, "acme-alice") == "Starting", what="Starting")
        pod = wait_for(lambda: cluster.api.get(PODS, NS, "acme-alice"), what="the pod")
    spec, container = pod["spec"], pod["spec"]["containers"][0]
    assert spec["runtimeClassName"] == "gvisor" and spec["automountServiceAccountToken"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
    pvc = cluster.api.get(PVCS, NS, "acme-alice-workspace")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "1Gi" and "ownerReferences" not in pvc["metadata"]
    secret = cluster.api.get(SECRETS, NS, "acme-alice-token")
    import base64
    assert base64.b64decode(secret["data"]["token"]).decode() == objects.token(KEY, NS, "acme-alice", created["metadata"]["uid"])
    policy = cluster.api.get(NETPOLS, NS, "acme-alice")
    assert policy["spec"]["egress"] == [] and policy["spec"]["podSelector"]["matchLabels"] == {objects.SANDBOX_LABEL: "acme-alice"}
    sb = cluster.sandbox("acme-alice")
    assert condition(sb, "WorkspaceReady") == "True" and condition(sb, "Ready") == "False"
    assert "mcpfleet.dev/cleanup" in sb["metadata"]["finalizers"]
    print(f"create: {time.monotonic() - t0:.2f}s")
