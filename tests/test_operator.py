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
import dataclasses
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
os.environ["MCPFLEET_KUBE_STANDIN"] = "1"  # this KUBECONFIG is the stand-in's: the real-cluster suite stays skipped
os.environ["MCPFLEET_SANDBOX_KEY_FILE"] = str(_TMP / "fleet.key")
os.environ.setdefault("MCPFLEET_IDLE_HIBERNATE_S", "600")  # the idle test lowers it
os.environ.setdefault("MCPFLEET_IDLE_CHECK_S", "0.5")
os.environ.setdefault("MCPFLEET_POOL_CHECK_S", "1")
(_TMP / "fleet.key").write_bytes(b"test-fleet-key")

kopf = pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")
import requests  # noqa: E402  (the client's transport; used here for the stand-in's own tests)
from kmock._internal.apps import Server  # noqa: E402
from kopf.testing import KopfRunner  # noqa: E402

from mcpfleet_operator import handlers, objects  # noqa: E402,F401
from tests.kube_standin import (  # noqa: E402
    CONFIGMAPS,
    EVENTS,
    NETPOLS,
    PEERINGS,
    PODS,
    POOLS,
    PVCS,
    SANDBOXES,
    SECRETS,
    KubeStandin,
)

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
            "phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "supervisor", "image": "mcpfleet-sandbox:dev", "imageID": "", "ready": True,
                                   "restartCount": 0, "state": {"running": {}}}]}}))

    def stall_pod(self, name: str, waiting: str, phase: str = "Running") -> None:
        """Play the kubelet: the supervisor container waits for `waiting` (CrashLoopBackOff, ImagePullBackOff, …)."""
        self.call(self.api.kubelet(PODS, NS, name, {"status": {
            "phase": phase, "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [{"name": "supervisor", "image": "mcpfleet-sandbox:dev", "imageID": "", "ready": False, "restartCount": 3,
                                   "state": {"waiting": {"reason": waiting, "message": f"the kubelet says {waiting}"}}}]}}))


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


def creation_handled(cluster: Cluster, name: str) -> bool:
    """kopf has run every creation handler (it records the handled spec then)."""
    return "kopf.mcpfleet.dev/last-handled-configuration" in (cluster.sandbox(name).get("metadata", {}).get("annotations") or {})


def events_for(cluster: Cluster, name: str) -> list[str]:
    return [e.get("reason") for n in cluster.api.names(EVENTS, NS) for e in [cluster.api.get(EVENTS, NS, n)]
            if (e.get("involvedObject") or {}).get("name") == name]


def start_ready(cluster: Cluster, name: str, **spec: Any) -> dict[str, Any]:
    created = cluster.create_sandbox(name, **spec)
    wait_for(lambda: cluster.api.get(PODS, NS, name), what="the pod")
    wait_for(lambda: state(cluster, name) == "Starting", what="Starting")
    cluster.run_pod(name)
    wait_for(lambda: state(cluster, name) == "Running", what="Running")
    return created


def test_ready_when_the_pod_runs(cluster: Cluster) -> None:
    t0 = time.monotonic()
    with operator():
        start_ready(cluster, "acme-bob")
        wait_for(lambda: "Running" in events_for(cluster, "acme-bob"), what="the Running event")
    sb = cluster.sandbox("acme-bob")
    assert sb["status"]["endpoint"] == f"10.0.0.7:{objects.PORT}" and sb["status"]["podName"] == "acme-bob"
    assert condition(sb, "Ready") == "True" and condition(sb, "Hibernated") == "False"
    assert {"Starting", "Running"} <= set(events_for(cluster, "acme-bob"))
    print(f"ready: {time.monotonic() - t0:.2f}s")


def test_hibernate_keeps_the_workspace_and_wake_recreates_the_pod(cluster: Cluster) -> None:
    t0 = time.monotonic()
    with operator():
        start_ready(cluster, "acme-carol")
        first_uid = cluster.api.get(PODS, NS, "acme-carol")["metadata"]["uid"]
        cluster.patch_sandbox("acme-carol", {"spec": {"operatingMode": "Hibernated"}})
        wait_for(lambda: state(cluster, "acme-carol") == "Hibernated", what="Hibernated")
        assert cluster.api.get(PODS, NS, "acme-carol") is None
        assert cluster.api.get(PVCS, NS, "acme-carol-workspace") is not None
        sb = cluster.sandbox("acme-carol")
        assert condition(sb, "Hibernated") == "True" and condition(sb, "Ready") == "False" and not sb["status"].get("endpoint")

        cluster.patch_sandbox("acme-carol", {"spec": {"operatingMode": "Running"}})
        wait_for(lambda: state(cluster, "acme-carol") == "Resuming", what="Resuming")
        pod = wait_for(lambda: cluster.api.get(PODS, NS, "acme-carol"), what="the new pod")
        assert pod["metadata"]["uid"] != first_uid
        assert pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "acme-carol-workspace"
        cluster.run_pod("acme-carol", ip="10.0.0.9")
        wait_for(lambda: state(cluster, "acme-carol") == "Running", what="Running again")
    sb = cluster.sandbox("acme-carol")
    assert sb["status"]["endpoint"] == "10.0.0.9:7070" and condition(sb, "Hibernated") == "False"
    assert {"Hibernated", "Resuming"} <= set(events_for(cluster, "acme-carol"))
    print(f"hibernate+wake: {time.monotonic() - t0:.2f}s")


def test_idle_timer_hibernates_and_activity_is_mirrored(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses
    import datetime
    monkeypatch.setattr(handlers, "CONFIG", dataclasses.replace(handlers.CONFIG, idle_hibernate_s=2.0))
    t0 = time.monotonic()
    with operator():
        start_ready(cluster, "acme-dave")
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        cluster.patch_sandbox("acme-dave", {"metadata": {"annotations": {objects.LAST_ACTIVITY: now}}})
        wait_for(lambda: (cluster.sandbox("acme-dave").get("status") or {}).get("lastActivity") == now, what="the mirror")
        wait_for(lambda: state(cluster, "acme-dave") == "Hibernated", what="idle hibernation")
    elapsed = time.monotonic() - t0
    assert cluster.sandbox("acme-dave")["spec"]["operatingMode"] == "Hibernated"
    assert "IdleHibernate" in events_for(cluster, "acme-dave")
    print(f"idle: {elapsed:.2f}s")


def ready_reason(sandbox: dict[str, Any]) -> str | None:
    return next((c.get("reason") for c in (sandbox.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"), None)


def warnings_for(cluster: Cluster, name: str) -> list[str]:
    return [e.get("reason") for n in cluster.api.names(EVENTS, NS) for e in [cluster.api.get(EVENTS, NS, n)]
            if (e.get("involvedObject") or {}).get("name") == name and e.get("type") == "Warning"]


def test_a_crash_looping_pod_fails_the_sandbox_and_its_recovery_runs_it_again(cluster: Cluster) -> None:
    t0 = time.monotonic()
    with operator():
        start_ready(cluster, "acme-kim")
        cluster.stall_pod("acme-kim", "CrashLoopBackOff")
        wait_for(lambda: state(cluster, "acme-kim") == "Failed", what="Failed")
        sb = cluster.sandbox("acme-kim")
        assert condition(sb, "Ready") == "False" and ready_reason(sb) == "CrashLoopBackOff"
        assert not sb["status"].get("endpoint") and "CrashLoopBackOff" in sb["status"]["reason"]
        failed = time.monotonic() - t0
        wait_for(lambda: warnings_for(cluster, "acme-kim") == ["Failed"], what="a Warning event")
        # Another crash of the same kind is not another transition (nor another Event).
        cluster.stall_pod("acme-kim", "CrashLoopBackOff")
        time.sleep(0.5)
        assert warnings_for(cluster, "acme-kim") == ["Failed"]
        cluster.run_pod("acme-kim", ip="10.0.0.8")  # the back-off ended and it came up
        wait_for(lambda: state(cluster, "acme-kim") == "Running", what="Running again")
    sb = cluster.sandbox("acme-kim")
    assert condition(sb, "Ready") == "True" and sb["status"]["endpoint"] == "10.0.0.8:7070"
    print(f"crash loop: Failed after {failed:.2f}s, total {time.monotonic() - t0:.2f}s")


def test_an_image_pull_failure_fails_and_a_retry_annotation_starts_a_new_pod(cluster: Cluster) -> None:
    with operator():
        cluster.create_sandbox("acme-lou")
        first = wait_for(lambda: cluster.api.get(PODS, NS, "acme-lou"), what="the pod")["metadata"]["uid"]
        wait_for(lambda: state(cluster, "acme-lou") == "Starting", what="Starting")
        cluster.stall_pod("acme-lou", "ImagePullBackOff", phase="Pending")
        wait_for(lambda: state(cluster, "acme-lou") == "Failed", what="Failed")
        assert ready_reason(cluster.sandbox("acme-lou")) == "ImagePullBackOff"
        # The status of a Failed sandbox changing (its own transition) retries nothing: only the spec or the annotation.
        time.sleep(0.5)
        assert cluster.api.get(PODS, NS, "acme-lou")["metadata"]["uid"] == first
        cluster.patch_sandbox("acme-lou", {"metadata": {"annotations": {objects.RETRY: "1"}}})
        wait_for(lambda: state(cluster, "acme-lou") == "Starting", what="Starting again")
        second = wait_for(lambda: (cluster.api.get(PODS, NS, "acme-lou") or {}).get("metadata", {}).get("uid") not in (None, first)
                          and cluster.api.get(PODS, NS, "acme-lou"), what="a new pod")
        assert second["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "acme-lou-workspace"
        cluster.run_pod("acme-lou")
        wait_for(lambda: state(cluster, "acme-lou") == "Running", what="Running after the retry")
    assert warnings_for(cluster, "acme-lou") == ["Failed"]


def test_a_failed_pod_phase_fails_and_a_spec_change_retries(cluster: Cluster) -> None:
    with operator():
        start_ready(cluster, "acme-max")
        first = cluster.api.get(PODS, NS, "acme-max")["metadata"]["uid"]
        cluster.call(cluster.api.kubelet(PODS, NS, "acme-max", {"status": {"phase": "Failed", "reason": "Evicted"}}))
        wait_for(lambda: state(cluster, "acme-max") == "Failed", what="Failed")
        sb = cluster.sandbox("acme-max")
        assert ready_reason(sb) == "PodFailed" and "Evicted" in sb["status"]["reason"]
        cluster.patch_sandbox("acme-max", {"spec": {"tier": {"name": "large", "cpus": 2, "memoryMb": 1024, "pids": 256}}})
        pod = wait_for(lambda: (cluster.api.get(PODS, NS, "acme-max") or {}).get("metadata", {}).get("uid") not in (None, first)
                       and cluster.api.get(PODS, NS, "acme-max"), what="a new pod")
        assert pod["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "2"  # from the changed spec
        cluster.run_pod("acme-max")
        wait_for(lambda: state(cluster, "acme-max") == "Running", what="Running after the retry")


def test_a_ready_pod_whose_event_was_overtaken_still_makes_the_sandbox_running(cluster: Cluster) -> None:
    # A Starting written after the pod's Ready event was handled (two handlers racing over one sandbox) leaves
    # no event to come: the periodic check sees the pod Ready and the sandbox Running again.
    with operator():
        start_ready(cluster, "acme-uma")
        path = f"/apis/mcpfleet.dev/v1alpha1/namespaces/{NS}/mcpsandboxes/acme-uma/status"
        r = cluster.http("PATCH", path, {"status": {"state": "Starting", "endpoint": None}})
        assert r.status_code == 200, r.text
        wait_for(lambda: state(cluster, "acme-uma") == "Running", what="Running again by the periodic check")
        assert cluster.sandbox("acme-uma")["status"]["endpoint"] == "10.0.0.7:7070"


def test_a_pod_not_ready_by_the_start_deadline_fails(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers, "CONFIG", dataclasses.replace(handlers.CONFIG, start_deadline_s=2.0))
    t0 = time.monotonic()
    with operator():
        cluster.create_sandbox("acme-ned")
        wait_for(lambda: state(cluster, "acme-ned") == "Starting", what="Starting")
        wait_for(lambda: state(cluster, "acme-ned") == "Failed", what="Failed by the deadline")
        elapsed = time.monotonic() - t0
        sb = cluster.sandbox("acme-ned")
        assert ready_reason(sb) == "StartDeadlineExceeded" and "MCPFLEET_START_DEADLINE_S" in sb["status"]["reason"]
        # A pod that is ready in time is never failed by it.
        start_ready(cluster, "acme-ola")
        time.sleep(3)
        assert state(cluster, "acme-ola") == "Running"
    assert elapsed >= 1.0  # 2 s less the creationTimestamp's resolution, a whole second
    print(f"start deadline (2 s): Failed after {elapsed:.2f}s")


def test_delete_says_reclaimed_before_the_finalizer_lets_go(cluster: Cluster) -> None:
    with operator():
        start_ready(cluster, "acme-pia")
        seen: list[str | None] = []
        done = threading.Event()

        def watch() -> None:  # what `kubectl get -w` would show
            while True:
                seen.append(state(cluster, "acme-pia"))
                if done.is_set():  # one read after the object is gone, however late this thread wakes
                    return
                time.sleep(0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()
        assert cluster.http("DELETE", f"/apis/mcpfleet.dev/v1alpha1/namespaces/{NS}/mcpsandboxes/acme-pia").status_code == 200
        wait_for(lambda: cluster.api.get(SANDBOXES, NS, "acme-pia") is None, what="the finalizer released")
        done.set()
        watcher.join()
    assert "Reclaimed" in seen and seen[-1] is None
    assert seen.index("Reclaimed") < len(seen) - 1 and "Reclaimed" in events_for(cluster, "acme-pia")
    status_writes = [r for r in cluster.api._requests if str(r.method).endswith("PATCH") and r.url.path.endswith("/acme-pia/status")]
    assert status_writes  # written through the status subresource, before the object went


BUILTIN = {"name": "workspace", "prefix": "workspace", "version": "builtin", "artifactSha256": "",
           "command": ["python", "-m", "mcp_servers.workspace"], "egress": []}


def _servers_in(cluster: Cluster, config_map: str) -> list[str]:
    import json
    return [s["name"] for s in json.loads(cluster.api.get(CONFIGMAPS, NS, config_map)["data"]["sandbox.json"])["servers"]]


def test_the_supervisor_config_is_a_config_map_that_follows_spec_servers(cluster: Cluster) -> None:
    t0 = time.monotonic()
    with operator():
        created = cluster.create_sandbox("acme-cora", servers=[BUILTIN])
        pod = wait_for(lambda: cluster.api.get(PODS, NS, "acme-cora"), what="the pod")
        config = wait_for(lambda: cluster.api.get(CONFIGMAPS, NS, "acme-cora-config"), what="the config map")
        assert config["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
        assert _servers_in(cluster, "acme-cora-config") == ["workspace"]
        mounts = {m["name"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
        assert mounts["config"] == {"name": "config", "mountPath": "/etc/mcpfleet", "readOnly": True}
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["config"]["configMap"]["name"] == "acme-cora-config"
        args = pod["spec"]["containers"][0]["args"]
        assert args[-1] == objects.SUPERVISOR_CONFIG and args[args.index("--token-file") + 1] == "/var/run/mcpfleet/token"

        # Once the creation is handled (kopf records the handled spec): a change before it is part of the creation.
        wait_for(lambda: creation_handled(cluster, "acme-cora"), what="the creation handled")
        fetch = {"name": "io.example.fetch", "prefix": "fetch", "version": "1.0.0", "artifactSha256": "b" * 64,
                 "command": ["python", "-c", "import fetch"], "egress": ["example.com"]}
        cluster.patch_sandbox("acme-cora", {"spec": {"servers": [BUILTIN, fetch]}})
        wait_for(lambda: _servers_in(cluster, "acme-cora-config") == ["workspace", "fetch"], what="the config map updated")
        wait_for(lambda: cluster.api.get(NETPOLS, NS, "acme-cora")["spec"]["egress"], what="egress opened for fetch")
        wait_for(lambda: "ServersChanged" in events_for(cluster, "acme-cora"), what="the ServersChanged event")
        # A newly approved published wheel: a new pod, whose init container fetches it into /opt/tools.
        fetching = wait_for(lambda: (cluster.api.get(PODS, NS, "acme-cora") or {}).get("spec", {}).get("initContainers")
                            and cluster.api.get(PODS, NS, "acme-cora"), what="a pod that fetches")
        assert fetching["metadata"]["uid"] != pod["metadata"]["uid"]
        (init,) = fetching["spec"]["initContainers"]
        assert init["args"][-1] == "b" * 64 and init["args"][init["args"].index("--sandbox") + 1] == f"{NS}/acme-cora"
        assert {"name": "tools", "mountPath": "/opt/tools"} in init["volumeMounts"]
        wait_for(lambda: state(cluster, "acme-cora") == "Starting", what="Starting the new pod")
        cluster.run_pod("acme-cora")
        wait_for(lambda: state(cluster, "acme-cora") == "Running", what="Running")
        running = cluster.api.get(PODS, NS, "acme-cora")["metadata"]["uid"]
        # Servers going away (or built-in ones changing) restart nothing: the gateway reconfigures the supervisor.
        cluster.patch_sandbox("acme-cora", {"spec": {"servers": [BUILTIN]}})
        wait_for(lambda: cluster.api.get(NETPOLS, NS, "acme-cora")["spec"]["egress"] == [], what="egress closed again")
        assert _servers_in(cluster, "acme-cora-config") == ["workspace"]
        time.sleep(0.5)
        assert cluster.api.get(PODS, NS, "acme-cora")["metadata"]["uid"] == running and state(cluster, "acme-cora") == "Running"

        assert cluster.http("DELETE", f"/apis/mcpfleet.dev/v1alpha1/namespaces/{NS}/mcpsandboxes/acme-cora").status_code == 200
        wait_for(lambda: cluster.api.get(SANDBOXES, NS, "acme-cora") is None, what="the finalizer released")
    assert cluster.api.get(CONFIGMAPS, NS, "acme-cora-config") is None
    print(f"config map: {time.monotonic() - t0:.2f}s")


@pytest.mark.parametrize("retention", ["Keep", "Delete"])
def test_delete_cleans_up_by_retention(cluster: Cluster, retention: str) -> None:
    t0 = time.monotonic()
    with operator():
        start_ready(cluster, "acme-erin", workspace={"size": "2Gi", "retention": retention})
        r = cluster.http("DELETE", f"/apis/mcpfleet.dev/v1alpha1/namespaces/{NS}/mcpsandboxes/acme-erin")
        assert r.status_code == 200, r.text
        wait_for(lambda: cluster.api.get(SANDBOXES, NS, "acme-erin") is None, what="the finalizer released")
    assert cluster.api.get(PODS, NS, "acme-erin") is None
    assert cluster.api.get(SECRETS, NS, "acme-erin-token") is None
    assert cluster.api.get(NETPOLS, NS, "acme-erin") is None
    assert (cluster.api.get(PVCS, NS, "acme-erin-workspace") is not None) == (retention == "Keep")
    print(f"delete {retention}: {time.monotonic() - t0:.2f}s")


def _pool_pods(cluster: Cluster, pool: str, claimed: str = "false") -> list[str]:
    return [n for n in cluster.api.names(PODS, NS)
            if (cluster.api.get(PODS, NS, n)["metadata"].get("labels") or {}).get(objects.POOL_LABEL) == pool
            and cluster.api.get(PODS, NS, n)["metadata"]["labels"].get(objects.CLAIMED_LABEL) == claimed]


def _create_pool(cluster: Cluster, name: str, replicas: int) -> None:
    body = {"apiVersion": "mcpfleet.dev/v1alpha1", "kind": "McpSandboxPool", "metadata": {"name": name},
            "spec": {"replicas": replicas, "tier": {"name": "standard", "cpus": 1, "memoryMb": 512}}}
    r = cluster.http("POST", f"/apis/mcpfleet.dev/v1alpha1/namespaces/{NS}/mcpsandboxpools", body, "application/json")
    assert r.status_code in (200, 201), r.text


def test_pool_fills_a_claim_takes_a_ready_pod_and_the_pool_refills(cluster: Cluster) -> None:
    t0 = time.monotonic()
    with operator():
        _create_pool(cluster, "warm", 2)
        pods = wait_for(lambda: len(_pool_pods(cluster, "warm")) == 2 and _pool_pods(cluster, "warm"), what="two warm pods")
        for i, pod in enumerate(pods):
            cluster.run_pod(pod, ip=f"10.0.1.{i + 1}")
        wait_for(lambda: ((cluster.api.get(POOLS, NS, "warm") or {}).get("status") or {}).get("replicas") == 2, what="2 ready")
        assert cluster.api.get(POOLS, NS, "warm")["status"]["selector"] == "mcpfleet.dev/pool=warm,mcpfleet.dev/claimed=false"
        filled = time.monotonic() - t0
        # Warm pods run no servers until claimed (the gateway configures a claimed pod's over the channel).
        assert _servers_in(cluster, "warm-pool-config") == []
        assert {v["name"]: v for v in cluster.api.get(PODS, NS, pods[0])["spec"]["volumes"]}["config"]["configMap"]["name"] == "warm-pool-config"

        created = cluster.create_sandbox("acme-frank", poolRef="warm")
        wait_for(lambda: state(cluster, "acme-frank") == "Running", what="claimed and Running")
        sb = cluster.sandbox("acme-frank")
        claimed = sb["status"]["podName"]
        assert claimed in pods and sb["status"]["endpoint"].endswith(":7070") and condition(sb, "Ready") == "True"
        labels = cluster.api.get(PODS, NS, claimed)["metadata"]["labels"]
        assert labels[objects.CLAIMED_LABEL] == "true" and labels[objects.SANDBOX_LABEL] == "acme-frank"
        import base64
        token = base64.b64decode(cluster.api.get(SECRETS, NS, f"{claimed}-token")["data"]["token"]).decode()
        assert token == objects.token(KEY, NS, "acme-frank", created["metadata"]["uid"])
        # The pool refills: two unclaimed pods again, the new one not yet ready.
        wait_for(lambda: len(_pool_pods(cluster, "warm")) == 2, what="the refill")
        assert cluster.api.get(PVCS, NS, f"{claimed}-workspace")["metadata"]["labels"][objects.SANDBOX_LABEL] == "acme-frank"
        assert cluster.api.get(PVCS, NS, "acme-frank-workspace") is None  # the warm volume is the user's
        # Hibernated and woken, the claimed sandbox gets a pod of its own name on the warm pod's volume.
        cluster.patch_sandbox("acme-frank", {"spec": {"operatingMode": "Hibernated"}})
        wait_for(lambda: state(cluster, "acme-frank") == "Hibernated", what="Hibernated")
        assert cluster.api.get(PODS, NS, claimed) is None
        cluster.patch_sandbox("acme-frank", {"spec": {"operatingMode": "Running"}})
        woken = wait_for(lambda: cluster.api.get(PODS, NS, "acme-frank"), what="the woken pod")
        assert woken["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == f"{claimed}-workspace"
    print(f"pool: filled {filled:.2f}s, total {time.monotonic() - t0:.2f}s")


def test_a_sandbox_with_published_servers_starts_cold_rather_than_claim_a_pod_without_them(cluster: Cluster) -> None:
    published = {"name": "io.example.w", "prefix": "w", "artifactSha256": "d" * 64, "command": ["python", "-c", "x"]}
    with operator():
        _create_pool(cluster, "warm", 1)
        (pod,) = wait_for(lambda: _pool_pods(cluster, "warm"), what="a warm pod")
        cluster.run_pod(pod)
        wait_for(lambda: ((cluster.api.get(POOLS, NS, "warm") or {}).get("status") or {}).get("replicas") == 1, what="ready")
        cluster.create_sandbox("acme-quin", poolRef="warm", servers=[published])
        own = wait_for(lambda: cluster.api.get(PODS, NS, "acme-quin"), what="a pod of its own")
        assert own["spec"]["initContainers"][0]["args"][-1] == "d" * 64
        assert _pool_pods(cluster, "warm") == [pod]  # the warm pod is still unclaimed
        wait_for(lambda: state(cluster, "acme-quin") == "Starting", what="Starting cold")


def test_a_claim_that_meets_a_409_rereads_and_retries(cluster: Cluster) -> None:
    with operator():
        _create_pool(cluster, "warm", 1)
        (pod,) = wait_for(lambda: _pool_pods(cluster, "warm"), what="a warm pod")
        cluster.run_pod(pod)
        wait_for(lambda: ((cluster.api.get(POOLS, NS, "warm") or {}).get("status") or {}).get("replicas") == 1, what="ready")
        cluster.api.interleave_write(PODS, NS, pod)
        cluster.create_sandbox("acme-gina", poolRef="warm")
        wait_for(lambda: state(cluster, "acme-gina") == "Running", what="claimed after the conflict")
    patches = [r for r in cluster.api._requests if str(r.method).endswith("PATCH") and r.url.path.endswith(f"/pods/{pod}")]
    assert len(patches) >= 2 and not cluster.api._interleaved  # the first answered 409, the re-read one succeeded
    assert cluster.sandbox("acme-gina")["status"]["podName"] == pod


def test_a_restarted_operator_adopts_without_duplicates(cluster: Cluster) -> None:
    t0 = time.monotonic()
    with operator():
        cluster.create_sandbox("acme-hal")
        wait_for(lambda: state(cluster, "acme-hal") == "Starting", what="Starting")
        # Stopped once the creation is handled (an operator stopped amid it finishes the creation instead of adopting).
        wait_for(lambda: creation_handled(cluster, "acme-hal"), what="the creation handled")
    pod_uid = cluster.api.get(PODS, NS, "acme-hal")["metadata"]["uid"]
    cluster.run_pod("acme-hal")  # became ready while no operator ran
    with operator():
        wait_for(lambda: state(cluster, "acme-hal") == "Running", what="Running after the restart")
        wait_for(lambda: "Adopted" in events_for(cluster, "acme-hal"), what="the Adopted event")
    assert [n for n in cluster.api.names(PODS, NS) if n.startswith("acme-hal")] == ["acme-hal"]
    assert cluster.api.get(PODS, NS, "acme-hal")["metadata"]["uid"] == pod_uid
    print(f"restart: {time.monotonic() - t0:.2f}s")


def test_two_peered_replicas_do_not_fight(cluster: Cluster) -> None:
    """kopf's peering: the lower-priority replica pauses while the higher one runs; one pod, one creation."""
    peering = ("--peering", "mcpfleet")
    peers = lambda: len((cluster.api.get(PEERINGS, NS, "mcpfleet") or {}).get("status") or {})  # noqa: E731
    # The higher one is up first, so the lower one starts paused (peering is mandatory) and stays so. Started
    # together, both may run for a moment before each has seen the other, and a sandbox created in that
    # moment gets both finalizer patches (one fails with 422): the race peering leaves open at start.
    with operator(*peering, "--priority", "100"):
        wait_for(lambda: peers() == 1, what="the first peer")
        with operator(*peering, "--priority", "50"):
            wait_for(lambda: peers() == 2, what="both peers")
            cluster.create_sandbox("acme-ivy")
            wait_for(lambda: state(cluster, "acme-ivy") == "Starting", what="Starting")
            time.sleep(1)
    pod_posts = [r for r in cluster.api._requests if str(r.method).endswith("POST") and r.url.path.endswith("/pods")]
    assert len(pod_posts) == 1
    assert events_for(cluster, "acme-ivy").count("Starting") == 1


# --- the stand-in's own semantics (tests/kube_standin.py's table) --------------------------------------

def _pod_body(name: str, **meta: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **meta}, "spec": {"containers": []}}


def test_standin_assigns_uid_resource_version_generation_and_namespace(cluster: Cluster) -> None:
    r = cluster.http("POST", f"/api/v1/namespaces/{NS}/pods", _pod_body("p1"), "application/json")
    meta = r.json()["metadata"]
    assert meta["uid"] and meta["resourceVersion"].isdigit() and meta["generation"] == 1 and meta["namespace"] == NS
    r2 = cluster.http("PATCH", f"/api/v1/namespaces/{NS}/pods/p1", {"metadata": {"labels": {"a": "b"}}})
    assert r2.json()["metadata"]["generation"] == 1 and int(r2.json()["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    r3 = cluster.http("PATCH", f"/api/v1/namespaces/{NS}/pods/p1", {"spec": {"nodeName": "n1"}})
    assert r3.json()["metadata"]["generation"] == 2 and r3.json()["metadata"]["uid"] == meta["uid"]
    assert cluster.http("POST", f"/api/v1/namespaces/{NS}/pods", _pod_body("p1"), "application/json").status_code == 409


def test_standin_conflicts_on_a_stale_resource_version_and_fails_a_json_patch_test(cluster: Cluster) -> None:
    meta = cluster.http("POST", f"/api/v1/namespaces/{NS}/pods", _pod_body("p2"), "application/json").json()["metadata"]
    cluster.http("PATCH", f"/api/v1/namespaces/{NS}/pods/p2", {"metadata": {"labels": {"x": "1"}}})
    stale = cluster.http("PATCH", f"/api/v1/namespaces/{NS}/pods/p2", {"metadata": {"resourceVersion": meta["resourceVersion"], "labels": {"x": "2"}}})
    assert stale.status_code == 409 and cluster.api.get(PODS, NS, "p2")["metadata"]["labels"]["x"] == "1"
    failed = cluster.http("PATCH", f"/api/v1/namespaces/{NS}/pods/p2",
                          [{"op": "test", "path": "/metadata/resourceVersion", "value": meta["resourceVersion"]}], "application/json-patch+json")
    assert failed.status_code == 422


def test_standin_generate_name_lists_and_namespaces(cluster: Cluster) -> None:
    names = {cluster.http("POST", f"/api/v1/namespaces/{NS}/events", {"metadata": {"generateName": "ev-"}}, "application/json").json()
             ["metadata"]["name"] for _ in range(3)}
    assert len(names) == 3 and all(n.startswith("ev-") for n in names)
    listing = cluster.http("GET", f"/api/v1/namespaces/{NS}/events").json()
    assert listing["kind"] == "EventList" and listing["metadata"]["resourceVersion"].isdigit() and len(listing["items"]) == 3
    assert [n["metadata"]["name"] for n in cluster.http("GET", "/api/v1/namespaces").json()["items"]] == [NS]


def test_standin_separates_the_status_subresource(cluster: Cluster) -> None:
    cluster.create_sandbox("acme-st")
    base = f"/apis/mcpfleet.dev/v1alpha1/namespaces/{NS}/mcpsandboxes/acme-st"
    cluster.http("PATCH", base, {"status": {"state": "Running"}, "spec": {"operatingMode": "Hibernated"}})
    assert "status" not in cluster.sandbox("acme-st") and cluster.sandbox("acme-st")["spec"]["operatingMode"] == "Hibernated"
    cluster.http("PATCH", base + "/status", {"status": {"state": "Running"}, "spec": {"operatingMode": "Running"}})
    assert cluster.sandbox("acme-st")["status"] == {"state": "Running"} and cluster.sandbox("acme-st")["spec"]["operatingMode"] == "Hibernated"


# --- objects.py: pure -------------------------------------------------------------------------------------

SANDBOX = {"apiVersion": "mcpfleet.dev/v1alpha1", "kind": "McpSandbox",
           "metadata": {"name": "acme-alice", "namespace": NS, "uid": "u-1"},
           "spec": {"user": "alice", "tenant": "acme", "tier": {"cpus": 2, "memoryMb": 1024, "pids": 128, "diskMb": 2048},
                    "servers": [{"name": "fetch", "egress": ["example.com"]}]}}


def test_token_is_the_contracts_hmac() -> None:
    import base64
    import hashlib
    import hmac
    expected = base64.urlsafe_b64encode(hmac.new(KEY, b"mcpsandbox/mcpfleet/acme-alice/u-1", hashlib.sha256).digest()).decode()
    assert objects.token(KEY, NS, "acme-alice", "u-1") == expected
    assert objects.token(KEY, NS, "acme-alice", "u-2") != expected


def test_pod_is_hardened_and_sized_by_the_tier() -> None:
    pod = objects.sandbox_pod(SANDBOX, "img:1")
    spec, c = pod["spec"], pod["spec"]["containers"][0]
    assert spec["runtimeClassName"] == "gvisor" and spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 1000
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["args"][:9] == ["/usr/bin/tini-static", "--", "python", "-s", "-P", "-OO", "-S", "-m", "sandbox.supervisor"]
    assert "0.0.0.0:7070" in c["args"]
    assert c["resources"]["limits"] == {"cpu": "2", "memory": "1024Mi", "ephemeral-storage": "2048Mi"}
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["workspace"]["persistentVolumeClaim"]["claimName"] == "acme-alice-workspace"
    assert vols["token"]["secret"]["secretName"] == "acme-alice-token" and vols["tmp"]["emptyDir"] == {"medium": "Memory"}
    assert pod["metadata"]["labels"] == {"app.kubernetes.io/part-of": "mcpfleet", "mcpfleet.dev/sandbox": "acme-alice",
                                         "app.kubernetes.io/component": "sandbox"}
    assert {"name": "tools", "mountPath": "/opt/tools", "readOnly": True} in c["volumeMounts"] and vols["tools"]["emptyDir"] == {}
    assert "initContainers" not in spec  # built-in servers only: nothing to fetch
    claimed = {**SANDBOX, "metadata": {**SANDBOX["metadata"], "annotations": {objects.WORKSPACE_CLAIM: "warm-abc-workspace"}}}
    assert objects.sandbox_pod(claimed, "img")["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "warm-abc-workspace"


def test_published_servers_are_fetched_by_a_hardened_init_container_through_a_narrow_egress() -> None:
    digest = "c" * 64
    servers = [{"name": "io.example.weather", "prefix": "weather", "artifactSha256": digest, "command": ["python", "-c", "x"]},
               {"name": "workspace", "command": ["python", "-m", "mcp_servers.workspace"]}]
    sandbox = {**SANDBOX, "spec": {**SANDBOX["spec"], "servers": servers}}
    pod = objects.sandbox_pod(sandbox, "img:1", tools_image="gw:1", gateway_url="http://gw:8080")
    (init,) = pod["spec"]["initContainers"]
    assert init["image"] == "gw:1" and init["args"][:3] == ["python", "-m", "registry.fetch"] and init["args"][-1] == digest
    assert init["args"][init["args"].index("--gateway") + 1] == "http://gw:8080"
    assert init["securityContext"] == pod["spec"]["containers"][0]["securityContext"]  # as hardened as the supervisor
    policy = objects.network_policy("n", {}, servers)
    to_gateway = [r for r in policy["spec"]["egress"] if r["to"][0].get("podSelector", {}).get("matchLabels") == {"app.kubernetes.io/component": "gateway"}]
    assert to_gateway and to_gateway[0]["ports"] == [{"protocol": "TCP", "port": 8080}]
    assert objects.network_policy("n", {}, servers[1:])["spec"]["egress"] == []


def test_a_servers_dependency_layer_is_fetched_by_the_same_init_container() -> None:
    digest, layer, wheels = "c" * 64, "e" * 64, ["1" * 64, "2" * 64]
    servers = [{"name": "io.example.slugger", "prefix": "slugger", "artifactSha256": digest, "layerSha256": layer,
                "layerWheels": wheels, "command": ["python", "-c", "x"]}]
    sandbox = {**SANDBOX, "spec": {**SANDBOX["spec"], "servers": servers}}
    (init,) = objects.sandbox_pod(sandbox, "img:1", tools_image="gw:1")["spec"]["initContainers"]
    assert f"--layer={layer}={','.join(wheels)}" in init["args"] and init["args"][-1] == digest


def test_network_policy_admits_the_gateway_and_lets_out_only_the_fetch() -> None:
    """Declared egress hosts open nothing in the pod's policy: the gateway makes those connections and
    carries them over the channel it opened (admitted by the ingress rule). Only a pod with published
    servers to fetch may reach the gateway's HTTP port, and DNS to find it."""
    declaring = objects.network_policy("n", {"mcpfleet.dev/sandbox": "n"}, SANDBOX["spec"]["servers"])
    ingress = declaring["spec"]["ingress"]
    assert ingress == [{"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/component": "gateway"}}}],
                        "ports": [{"protocol": "TCP", "port": 7070}]}]
    assert declaring["spec"]["egress"] == [] and set(declaring["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert objects.network_policy("n", {}, [{"name": "x", "egress": []}])["spec"]["egress"] == []
    published = [{"name": "fetch", "artifactSha256": "d" * 64, "egress": ["example.com", "tiles.example.com:8443"]}]
    rules = objects.network_policy("n", {}, published)["spec"]["egress"]
    assert rules == [
        {"to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/component": "gateway"}}}],
         "ports": [{"protocol": "TCP", "port": 8080}]},
        {"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
         "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
    ]
    assert not any("ipBlock" in t for r in rules for t in r["to"])  # never the internet, whatever is declared


def test_declared_egress_hosts_reach_the_supervisors_config() -> None:
    import json
    config = json.loads(objects.supervisor_config([
        {"name": "io.example.fetch", "prefix": "fetch", "artifactSha256": "d" * 64, "command": ["python"], "egress": ["example.com:8443"]},
        {"name": "workspace", "command": ["python", "-m", "mcp_servers.workspace"]},
    ]))
    assert [(s["name"], s["egress"]) for s in config["servers"]] == [("fetch", ["example.com:8443"]), ("workspace", [])]


def test_pvc_secret_and_conditions() -> None:
    pvc = objects.pvc("a-workspace", {"size": "5Gi", "storageClassName": "fast"}, {"k": "v"})
    assert pvc["spec"]["resources"]["requests"]["storage"] == "5Gi" and pvc["spec"]["storageClassName"] == "fast"
    assert "storageClassName" not in objects.pvc("a", {}, {})["spec"]
    import base64
    assert base64.b64decode(objects.secret("a-token", "tok", {})["data"]["token"]) == b"tok"
    conds = objects.condition(None, "Ready", "False", "Starting", "m", now="t1", generation=1)
    same = objects.condition(conds, "Ready", "False", "Still", "m", now="t2", generation=2)
    moved = objects.condition(same, "Ready", "True", "PodReady", "m", now="t3", generation=2)
    assert same[0]["lastTransitionTime"] == "t1" and moved[0]["lastTransitionTime"] == "t3" and len(moved) == 1
    ready = {"status": {"phase": "Running", "podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}}
    assert objects.pod_ready(ready) and not objects.pod_ready({"status": {"phase": "Pending"}})


def test_the_config_map_is_what_the_supervisor_reads_and_what_the_gateway_would_configure() -> None:
    """The operator renders the supervisor's config from the spec the gateway writes (sandbox.kubernetes
    .sandbox_spec); the supervisor's own parser reads it to the servers the gateway's server_configs
    gives for the same servers (bar the environment, which never goes into an object), so a pod
    started from it already runs what the gateway wants."""
    from sandbox.kubernetes_objects import sandbox_spec
    from sandbox.servers import BUILTIN_SERVERS, ServerSpec, server_configs
    from sandbox.supervisor.config import SupervisorConfig
    from sandbox.tiers import Tier

    published = ServerSpec("weather", ("python", "-c", "import weather"), env={"MCPFLEET_DECLARED_SECRETS": "KEY"}, revision="a" * 64)
    servers = (*BUILTIN_SERVERS, published)
    spec = sandbox_spec(7, "acme", "alice", Tier("standard", 1, 512, 256, 1024), servers)
    spec["servers"].append({"name": "io.example.nothing-to-run", "version": "1"})  # no command: left out
    config = SupervisorConfig.from_json(objects.supervisor_config(spec["servers"]))
    expected = [dataclasses.replace(c, env={}) for c in server_configs(servers)]
    assert config.servers == expected and config.token == "" and config.env == {}
    assert [s.revision for s in config.servers] == ["builtin", "builtin", "builtin", "a" * 64]
    cm = objects.config_map("acme-alice-config", spec["servers"], {"k": "v"})
    assert cm["kind"] == "ConfigMap" and set(cm["data"]) == {"sandbox.json"}
    assert "KEY" not in cm["data"]["sandbox.json"]


def test_the_operator_folder_does_not_shadow_the_standard_librarys_operator() -> None:
    import operator
    import sysconfig
    assert operator.__file__ and operator.__file__.startswith(sysconfig.get_paths()["stdlib"]) and operator.itemgetter
