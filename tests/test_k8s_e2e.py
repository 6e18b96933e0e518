"""The deployed fleet on a real cluster (CI: .github/workflows/k8s-e2e.yml, kind with gVisor).

Applies nothing of the fleet itself (`kubectl apply -k k8s/overlays/dev` did); it checks what runs, then
walks one McpSandbox through its life: Running (a ready gVisor pod), Hibernated (pod gone, PVC kept), deleted.
Skipped unless KUBECONFIG is set (by the one who runs it: the operator's tests set it to their stand-in's,
and say so in MCPFLEET_KUBE_STANDIN, for every test module imported after theirs).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(
    not os.environ.get("KUBECONFIG") or bool(os.environ.get("MCPFLEET_KUBE_STANDIN")), reason="needs a cluster with the fleet deployed: set KUBECONFIG (see .github/workflows/k8s-e2e.yml)"
)

NAMESPACE = os.environ.get("MCPFLEET_NAMESPACE", "mcpfleet")
GROUP, VERSION, PLURAL = "mcpfleet.dev", "v1alpha1", "mcpsandboxes"
TIMEOUT_S = float(os.environ.get("MCPFLEET_E2E_TIMEOUT_S", "300"))


def eventually(check: Callable[[], Any], what: str, timeout: float = TIMEOUT_S) -> Any:
    """check()'s first truthy answer; fails naming `what` and the last answer after timeout seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(2)
    pytest.fail(f"{what}: not within {timeout:.0f} s (last: {last!r})")


@pytest.fixture(scope="module")
def api() -> Any:
    from kubernetes import client, config

    config.load_kube_config()
    return client


def _not_found(call: Callable[[], Any]) -> Any:
    from kubernetes.client.exceptions import ApiException

    try:
        return call()
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def test_crds_are_established(api: Any) -> None:
    extensions = api.ApiextensionsV1Api()
    for name in ("mcpsandboxes.mcpfleet.dev", "mcpsandboxpools.mcpfleet.dev", "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"):
        conditions = extensions.read_custom_resource_definition(name).status.conditions or []
        assert any(c.type == "Established" and c.status == "True" for c in conditions), name


def test_gateway_and_operator_are_ready(api: Any) -> None:
    apps = api.AppsV1Api()

    def ready(name: str) -> bool:
        d = apps.read_namespaced_deployment(name, NAMESPACE)
        return bool(d.status.ready_replicas) and d.status.ready_replicas == d.spec.replicas

    eventually(lambda: ready("mcpfleet-gateway"), "gateway Deployment ready")
    eventually(lambda: ready("mcpfleet-operator"), "operator Deployment ready")


@pytest.fixture
def sandbox(api: Any) -> Iterator[str]:
    custom = api.CustomObjectsApi()
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "McpSandbox",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "user": name,
            "tenant": "e2e",
            "tier": {"name": "small", "cpus": 0.5, "memoryMb": 256, "pids": 128, "diskMb": 256},
            "servers": [],
            "operatingMode": "Running",
            "workspace": {"size": "256Mi", "retention": "Delete"},
        },
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, body)
    yield name
    _not_found(lambda: custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name))
    _not_found(lambda: api.CoreV1Api().delete_namespaced_persistent_volume_claim(f"{name}-workspace", NAMESPACE))


def test_a_sandbox_runs_hibernates_and_goes(api: Any, sandbox: str) -> None:
    core, custom = api.CoreV1Api(), api.CustomObjectsApi()
    name = sandbox

    def get() -> dict[str, Any]:
        return custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)

    def condition(obj: dict[str, Any], kind: str) -> str | None:
        return next((c["status"] for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), None)

    def pod_ready() -> Any:
        pod = _not_found(lambda: core.read_namespaced_pod(name, NAMESPACE))
        if pod is None or pod.metadata.deletion_timestamp:
            return None
        ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
        return pod if ready else None

    # Running: a ready pod under gVisor, hardened, and the object says so.
    pod = eventually(pod_ready, f"pod {name} Ready")
    assert pod.spec.runtime_class_name == "gvisor"
    assert pod.spec.automount_service_account_token is False
    (container,) = pod.spec.containers
    assert container.security_context.read_only_root_filesystem is True
    assert container.security_context.allow_privilege_escalation is False
    obj = eventually(lambda: (o := get()) and o.get("status", {}).get("state") == "Running" and condition(o, "Ready") == "True" and o, f"{name} Running and Ready")
    assert obj["status"]["podName"] == name
    assert obj["status"]["endpoint"].endswith(":7070")
    assert core.read_namespaced_persistent_volume_claim(f"{name}-workspace", NAMESPACE)

    # Hibernated: the pod goes, the workspace stays.
    custom.patch_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name, {"spec": {"operatingMode": "Hibernated"}})
    eventually(lambda: _not_found(lambda: core.read_namespaced_pod(name, NAMESPACE)) is None, f"pod {name} deleted on hibernation")
    eventually(lambda: get().get("status", {}).get("state") == "Hibernated", f"{name} state Hibernated")
    assert core.read_namespaced_persistent_volume_claim(f"{name}-workspace", NAMESPACE)

    # Running again, then deleted: nothing of it runs any more.
    custom.patch_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name, {"spec": {"operatingMode": "Running"}})
    eventually(pod_ready, f"pod {name} Ready again after resuming")
    custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)
    eventually(lambda: _not_found(lambda: core.read_namespaced_pod(name, NAMESPACE)) is None, f"pod {name} deleted with its McpSandbox")
    eventually(lambda: _not_found(get) is None, f"McpSandbox {name} gone (finalizers done)")
