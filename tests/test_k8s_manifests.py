"""The Kubernetes manifests under k8s/, checked offline: no API server runs here.

Each overlay is built with `kubectl kustomize`; every object it yields is validated against the Kubernetes
schemas bundled with kubernetes-validate, and objects of our own kinds (and kopf's) against their CRD's
openAPIV3Schema with jsonschema. Then what a reviewer would check by eye: every container hardened, and
RBAC no wider than SPEC.md's lists.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
OVERLAYS = ("base", "overlays/dev", "overlays/prod")
# A Kubernetes release kubernetes-validate bundles, and the oldest the fleet supports (kubectl's here too).
KUBERNETES_VERSION = "1.32.0"
NAMESPACE = "mcpfleet"


def _kubectl_skip_reason() -> str | None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return (
            "kubectl is not installed; Debian 12 packages none recent enough (its kubernetes-client is 1.20, "
            "whose kustomize cannot build these overlays): install kubectl 1.27 or later to run these tests"
        )
    out = subprocess.run([kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True)
    if out.returncode != 0:
        return f"`kubectl version --client` failed: {out.stderr.strip()}"
    kustomize = json.loads(out.stdout).get("kustomizeVersion", "")
    major = re.match(r"v?(\d+)", kustomize)
    if not major or int(major.group(1)) < 5:
        return f"kubectl's kustomize is {kustomize or 'missing'}; these overlays need kustomize v5 (kubectl 1.27 or later)"
    return None


needs_kubectl = pytest.mark.skipif(_kubectl_skip_reason() is not None, reason=_kubectl_skip_reason() or "")


def build(overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run(["kubectl", "kustomize", str(K8S / overlay)], capture_output=True, text=True, check=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def objects(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    if reason := _kubectl_skip_reason():
        pytest.skip(reason)
    return build(request.param)


def crds() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema, for every CRD under k8s/crds."""
    schemas = {}
    for path in sorted((K8S / "crds").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                schemas[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = version["schema"]["openAPIV3Schema"]
    return schemas


def crd(name: str) -> dict[str, Any]:
    return next(d for d in yaml.safe_load_all((K8S / "crds" / name).read_text()) if d)


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema as the API server applies it with field validation Strict (kubectl's default since 1.27):
    a field the schema does not declare is an error, except under x-kubernetes-preserve-unknown-fields."""
    schema = copy.deepcopy(schema)

    def visit(node: dict[str, Any]) -> None:
        if node.get("type") == "object" and "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for child in node.get("properties", {}).values():
            visit(child)
        if isinstance(node.get("items"), dict):
            visit(node["items"])

    visit(schema)
    # apiVersion, kind and metadata are the API server's; the schema describes the rest.
    schema.setdefault("properties", {}).update({"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}})
    return schema


def validate_custom(obj: dict[str, Any]) -> None:
    """Raises jsonschema.ValidationError when obj breaks its CRD's schema (OpenAPI v3.0, so draft 4)."""
    schema = crds()[(obj["apiVersion"], obj["kind"])]
    jsonschema.Draft4Validator(strict(schema)).validate(obj)


# Build and schemas


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_builds(overlay: str) -> None:
    assert build(overlay)


def test_every_object_validates(objects: list[dict[str, Any]]) -> None:
    custom = crds()
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if (obj["apiVersion"], obj["kind"]) in custom:
            validate_custom(obj)
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{where}: {e.message} at {'.'.join(map(str, e.path))}")


def test_namespaced_objects_are_in_the_fleets_namespace(objects: list[dict[str, Any]]) -> None:
    cluster_scoped = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "RuntimeClass"}
    for obj in objects:
        expected = None if obj["kind"] in cluster_scoped else NAMESPACE
        assert obj["metadata"].get("namespace") == expected, f"{obj['kind']}/{obj['metadata']['name']}"


# The CRDs: structural, as SPEC.md says


def _structural_errors(node: dict[str, Any], path: str = "") -> list[str]:
    errors = []
    if "type" not in node and not (node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")):
        errors.append(f"{path or '.'}: no type")
    if "properties" in node and "additionalProperties" in node:
        errors.append(f"{path}: both properties and additionalProperties")
    for name, child in node.get("properties", {}).items():
        errors += _structural_errors(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        errors += _structural_errors(node["items"], f"{path}[]")
    return errors


@pytest.mark.parametrize("name", ["mcpsandbox.yaml", "mcpsandboxpool.yaml"])
def test_crds_are_structural_with_status_and_only_status_open(name: str) -> None:
    version = crd(name)["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    assert _structural_errors(schema) == []
    assert "status" in version["subresources"]
    # Only status is left open, for kopf's progress and handler results; spec is closed.
    open_paths = []

    def walk(node: dict[str, Any], path: str) -> None:
        if node.get("x-kubernetes-preserve-unknown-fields"):
            open_paths.append(path)
        for key, child in node.get("properties", {}).items():
            walk(child, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")

    walk(schema, "")
    assert open_paths == [".status"]


def test_mcpsandbox_crd_names_and_printer_columns() -> None:
    spec = crd("mcpsandbox.yaml")["spec"]
    assert (spec["group"], spec["scope"]) == ("mcpfleet.dev", "Namespaced")
    assert spec["names"]["plural"] == "mcpsandboxes" and spec["names"]["shortNames"] == ["mcpsb"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1"
    columns = {c["name"].upper(): c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["USER"] == ".spec.user"
    assert columns["TENANT"] == ".spec.tenant"
    assert columns["STATE"] == ".status.state"
    assert columns["READY"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["LAST-ACTIVE"] == ".status.lastActivity"
    assert "AGE" in columns


def test_mcpsandboxpool_crd_scales() -> None:
    spec = crd("mcpsandboxpool.yaml")["spec"]
    assert spec["names"]["shortNames"] == ["mcpsbpool"]
    assert spec["versions"][0]["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }


# Sample objects against the CRDs

SANDBOX = {
    "apiVersion": "mcpfleet.dev/v1alpha1",
    "kind": "McpSandbox",
    "metadata": {"name": "acme-alice", "namespace": NAMESPACE},
    "spec": {
        "user": "alice",
        "tenant": "acme",
        "userId": 7,
        "tier": {"name": "standard", "cpus": 1, "memoryMb": 512, "pids": 256, "diskMb": 1024},
        "servers": [
            {"name": "workspace", "prefix": "ws", "version": "1.0.0", "artifactSha256": "", "command": ["python", "-m", "x"], "egress": []},
            {"name": "fetch", "prefix": "fetch", "version": "2.1.0", "artifactSha256": "a" * 64, "command": ["fetch"], "egress": ["example.com:443"]},
        ],
        "operatingMode": "Running",
        "workspace": {"size": "1Gi", "retention": "Keep", "storageClassName": "standard"},
        "poolRef": "standard",
    },
    "status": {
        "state": "Running",
        "reason": "The sandbox is running.",
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "PodReady", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1},
            {"type": "WorkspaceReady", "status": "True", "reason": "Bound", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"},
        ],
        "endpoint": "10.0.0.5:7070",
        "podName": "acme-alice",
        "tokenSecret": "acme-alice-token",
        "lastActivity": "2026-01-01T00:00:00Z",
        "observedGeneration": 1,
        # kopf's own bookkeeping must survive: status stays open.
        "kopf": {"progress": {}},
    },
}

POOL = {
    "apiVersion": "mcpfleet.dev/v1alpha1",
    "kind": "McpSandboxPool",
    "metadata": {"name": "standard", "namespace": NAMESPACE},
    "spec": {"replicas": 3, "tier": {"name": "standard", "cpus": 0.5, "memoryMb": 256, "pids": 128, "diskMb": 512}, "template": {"image": "mcpfleet-sandbox:dev"}},
    "status": {"replicas": 2, "selector": "mcpfleet.dev/pool=standard", "conditions": [{"type": "Available", "status": "False", "reason": "Filling"}]},
}


def _with(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of obj with the dotted path set to value (or removed, for value=...)."""
    obj = copy.deepcopy(obj)
    *parents, last = path.split(".")
    node = obj
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is ...:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return obj


GOOD = {
    "full sandbox": SANDBOX,
    "minimal sandbox": {"apiVersion": "mcpfleet.dev/v1alpha1", "kind": "McpSandbox", "metadata": {"name": "a-b"}, "spec": {"user": "b", "tenant": "a"}},
    "hibernated": _with(SANDBOX, "spec.operatingMode", "Hibernated"),
    "retention Delete": _with(SANDBOX, "spec.workspace.retention", "Delete"),
    "size in Mi": _with(SANDBOX, "spec.workspace.size", "512Mi"),
    "full pool": POOL,
    "empty pool": _with(_with(POOL, "spec.replicas", 0), "status", ...),
    "traces on": _with(SANDBOX, "spec.traces", True),
    "pool with traces": _with(POOL, "spec.template.traces", True),
}

BAD = {
    "operatingMode Paused": _with(SANDBOX, "spec.operatingMode", "Paused"),
    "missing user": _with(SANDBOX, "spec.user", ...),
    "missing tenant": _with(SANDBOX, "spec.tenant", ...),
    "missing spec": _with(SANDBOX, "spec", ...),
    "unknown spec field": _with(SANDBOX, "spec.operatingmode", "Running"),
    "retention Forever": _with(SANDBOX, "spec.workspace.retention", "Forever"),
    "size not a quantity": _with(SANDBOX, "spec.workspace.size", "a lot"),
    "negative memory": _with(SANDBOX, "spec.tier.memoryMb", -1),
    "zero cpus": _with(SANDBOX, "spec.tier.cpus", 0),
    "cpus as text": _with(SANDBOX, "spec.tier.cpus", "1"),
    "artifact digest not hex": _with(SANDBOX, "spec.servers.1.artifactSha256", "z" * 64),
    "server without name": _with(SANDBOX, "spec.servers.0.name", ...),
    "state Sleeping": _with(SANDBOX, "status.state", "Sleeping"),
    "condition type Alive": _with(SANDBOX, "status.conditions.0.type", "Alive"),
    "condition status yes": _with(SANDBOX, "status.conditions.0.status", "yes"),
    "negative replicas": _with(POOL, "spec.replicas", -1),
    "pool without replicas": _with(POOL, "spec.replicas", ...),
    "replicas as text": _with(POOL, "spec.replicas", "3"),
    "traces as text": _with(SANDBOX, "spec.traces", "true"),
    "pool traces as text": _with(POOL, "spec.template.traces", "yes"),
}


def test_what_the_gateway_writes_passes_the_crd() -> None:
    """The McpSandboxes the gateway creates: a user's (sandbox.kubernetes) and a trial's
    (sandbox.kubernetes_trials), with a published server that declares egress hosts."""
    from registry.artifacts import server_spec
    from registry.trial import TRIAL_TIER
    from sandbox.kubernetes_objects import sandbox_spec
    from sandbox.kubernetes_trials import trial_name, trial_spec
    from sandbox.tiers import Tier

    published = server_spec("weather", "c" * 64, "weather_tool.server:main", ("API_KEY",), egress=("api.example.com", "tiles.example.com:8443"))
    name = trial_name(published)
    trial = trial_spec(name, published, TRIAL_TIER)
    assert name.startswith("trial-cccccccccccc-") and "userId" not in trial and trial["servers"][0]["egress"] == []
    assert trial["workspace"]["retention"] == "Delete" and trial["servers"][0]["artifactSha256"] == "c" * 64
    user = sandbox_spec(7, "acme", "alice", Tier("standard", 1.0, 512, 128, 1024), (published,))
    assert user["servers"][0]["egress"] == ["api.example.com", "tiles.example.com:8443"]
    assert "MCPFLEET_DECLARED_SECRETS" not in str(user) + str(trial)  # a server's environment never goes into the object
    traced = sandbox_spec(7, "acme", "alice", Tier("standard", 1.0, 512, 128, 1024), (published,), traces=True)
    assert traced["traces"] is True and user["traces"] is False
    for obj_name, spec in ((name, trial), ("acme-alice", user), ("acme-alice", traced)):
        validate_custom({"apiVersion": "mcpfleet.dev/v1alpha1", "kind": "McpSandbox", "metadata": {"name": obj_name}, "spec": spec})


@pytest.mark.parametrize("name", GOOD)
def test_good_objects_pass_their_crd(name: str) -> None:
    validate_custom(GOOD[name])


@pytest.mark.parametrize("name", BAD)
def test_bad_objects_fail_their_crd(name: str) -> None:
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(BAD[name])


# Hardening: every container of every overlay

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}


def _pod_specs(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    specs = []
    for obj in objects:
        if obj["kind"] in WORKLOADS:
            template = obj["spec"]["jobTemplate"]["spec"]["template"] if obj["kind"] == "CronJob" else obj["spec"]["template"]
            specs.append((f"{obj['kind']}/{obj['metadata']['name']}", template["spec"]))
    return specs


def test_every_container_is_hardened(objects: list[dict[str, Any]]) -> None:
    pods = _pod_specs(objects)
    assert pods
    for where, pod in pods:
        pod_context = pod.get("securityContext", {})
        assert pod_context.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert not (pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC")), where
        assert not any("hostPath" in v for v in pod.get("volumes", [])), where
        for container in pod.get("initContainers", []) + pod["containers"]:
            context = {**pod_context, **container.get("securityContext", {})}
            name = f"{where} container {container['name']}"
            assert context.get("runAsNonRoot") is True, name
            assert context.get("runAsUser", 1) != 0, name
            assert context.get("allowPrivilegeEscalation") is False, name
            assert context.get("readOnlyRootFilesystem") is True, name
            assert context.get("privileged") is not True, name
            assert "ALL" in context.get("capabilities", {}).get("drop", []), name
            assert not context.get("capabilities", {}).get("add"), name


# RBAC as SPEC.md lists it


def _one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _grants(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs; no wildcard anywhere."""
    grants: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                grants.setdefault((group, resource), set()).update(rule["verbs"])
    return grants


def _bound(objects: list[dict[str, Any]], account: str) -> list[tuple[str, str]]:
    """(role kind, role name) of every binding naming the ServiceAccount."""
    return [
        (b["roleRef"]["kind"], b["roleRef"]["name"])
        for b in objects
        if b["kind"] in ("RoleBinding", "ClusterRoleBinding")
        for s in b["subjects"]
        if s["kind"] == "ServiceAccount" and s["name"] == account and s.get("namespace") == NAMESPACE
    ]


def test_gateway_rbac_is_least_privilege(objects: list[dict[str, Any]]) -> None:
    assert _bound(objects, "mcpfleet-gateway") == [("Role", "mcpfleet-gateway")]
    grants = _grants(_one(objects, "Role", "mcpfleet-gateway"))
    assert not any(resource.startswith("secrets") for _, resource in grants)
    assert grants[("", "pods")] == {"get", "list", "watch"}
    assert grants == {
        ("mcpfleet.dev", "mcpsandboxes"): {"get", "list", "watch", "create", "patch", "delete"},
        ("mcpfleet.dev", "mcpsandboxes/status"): {"get"},
        ("mcpfleet.dev", "mcpsandboxpools"): {"get", "list", "watch"},
        ("", "pods"): {"get", "list", "watch"},
    }


def test_operator_rbac_is_limited_to_its_resources(objects: list[dict[str, Any]]) -> None:
    assert sorted(_bound(objects, "mcpfleet-operator")) == [("ClusterRole", "mcpfleet-operator"), ("Role", "mcpfleet-operator")]
    owned = {"create", "get", "list", "watch", "patch", "delete"}
    allowed = {
        ("", "pods"): owned,
        ("", "persistentvolumeclaims"): owned,
        ("", "secrets"): owned,
        ("", "configmaps"): owned,
        ("networking.k8s.io", "networkpolicies"): owned,
        ("", "events"): {"create", "patch"},
        ("mcpfleet.dev", "mcpsandboxes"): {"get", "list", "watch", "patch", "update"},
        ("mcpfleet.dev", "mcpsandboxpools"): {"get", "list", "watch", "patch", "update"},
        ("mcpfleet.dev", "mcpsandboxes/status"): {"get", "patch", "update"},
        ("mcpfleet.dev", "mcpsandboxpools/status"): {"get", "patch", "update"},
        ("mcpfleet.dev", "mcpsandboxes/finalizers"): {"update"},
        ("mcpfleet.dev", "mcpsandboxpools/finalizers"): {"update"},
        ("kopf.dev", "kopfpeerings"): {"get", "list", "watch", "patch"},
        ("coordination.k8s.io", "leases"): {"get", "create", "patch", "update"},
    }
    for key, verbs in _grants(_one(objects, "Role", "mcpfleet-operator")).items():
        assert key in allowed and verbs <= allowed[key], (key, verbs)
    assert _grants(_one(objects, "ClusterRole", "mcpfleet-operator")) == {
        ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},
        ("kopf.dev", "clusterkopfpeerings"): {"get", "list", "watch", "patch"},
    }


def test_only_the_operator_has_a_cluster_role(objects: list[dict[str, Any]]) -> None:
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "ClusterRole"] == ["mcpfleet-operator"]


# The fleet's shape


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_gateway_deployment(objects: list[dict[str, Any]]) -> None:
    deployment = _one(objects, "Deployment", "mcpfleet-gateway")
    template = deployment["spec"]["template"]
    assert template["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"
    assert template["spec"]["serviceAccountName"] == "mcpfleet-gateway"
    (container,) = template["spec"]["containers"]
    env = _env(container)
    assert env["MCPFLEET_SANDBOX_BACKEND"] == "kubernetes"
    assert env["MCPFLEET_HOST"] == "0.0.0.0"
    for key in ("DATABASE_URL", "REDIS_URL", "VAULT_ADDR"):
        assert env[key] == {"secretKeyRef": {"name": "mcpfleet-config", "key": key}}
    key_file = Path(env["MCPFLEET_SANDBOX_KEY_FILE"])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(key_file.parent))
    volume = next(v for v in template["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "mcpfleet-sandbox-key" and key_file.name == "key"
    # Each replica names the address the others reach it at (its pod IP and its port): the replicas
    # pass a session's requests to the one that holds it. POD_IP comes first: $(VAR) only sees earlier ones.
    names = [e["name"] for e in container["env"]]
    assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == "http"]
    assert env["MCPFLEET_REPLICA_ADDRESS"] == f"$(POD_IP):{port}" == f"$(POD_IP):{env['MCPFLEET_PORT']}"
    assert names.index("POD_IP") < names.index("MCPFLEET_REPLICA_ADDRESS")
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"]["cpu"], "the HPA scales on CPU: requests must be set"


def test_gateway_replicas_pdb_hpa_service_and_network_policy(objects: list[dict[str, Any]]) -> None:
    deployment = _one(objects, "Deployment", "mcpfleet-gateway")
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert deployment["spec"]["replicas"] >= 1
    assert _one(objects, "PodDisruptionBudget", "mcpfleet-gateway")["spec"] == {"minAvailable": 1, "selector": {"matchLabels": selector}}
    hpa = _one(objects, "HorizontalPodAutoscaler", "mcpfleet-gateway")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "mcpfleet-gateway"
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
    assert _one(objects, "Service", "mcpfleet-gateway")["spec"]["selector"] == selector
    policy = _one(objects, "NetworkPolicy", "mcpfleet-gateway")["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/component": "gateway"}
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    to_sandboxes = [r for r in policy["egress"] for t in r.get("to", []) if t.get("podSelector", {}).get("matchLabels") == {"app.kubernetes.io/component": "sandbox"}]
    assert to_sandboxes and to_sandboxes[0]["ports"] == [{"port": 7070, "protocol": "TCP"}]
    # Replica to replica on the gateway's own port (and that port is open to them on the way in).
    to_gateways = [r for r in policy["egress"] for t in r.get("to", []) if t.get("podSelector", {}).get("matchLabels") == {"app.kubernetes.io/component": "gateway"}]
    assert to_gateways and to_gateways[0]["ports"] == [{"port": 8080, "protocol": "TCP"}]
    assert any({"port": 8080, "protocol": "TCP"} in r["ports"] and "from" not in r for r in policy["ingress"])
    # Declared egress hosts on any port, but no private, link-local or CGNAT address: the policy keeps
    # the gateway's own vetting (gateway/egress.py) from being the only line.
    internet = [r for r in policy["egress"] for t in r.get("to", []) if t.get("ipBlock", {}).get("cidr") == "0.0.0.0/0"]
    assert len(internet) == 1 and "ports" not in internet[0], internet
    assert set(internet[0]["to"][0]["ipBlock"]["except"]) == {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10"}
    blocks = [t["ipBlock"] for r in policy["egress"] for t in r.get("to", []) if "ipBlock" in t]
    assert all(b.get("except") for b in blocks), "every CIDR the gateway may reach keeps the private ranges out"


def test_operator_deployment_and_runtime_class(objects: list[dict[str, Any]]) -> None:
    template = _one(objects, "Deployment", "mcpfleet-operator")["spec"]["template"]
    assert template["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
    assert template["spec"]["serviceAccountName"] == "mcpfleet-operator"
    (container,) = template["spec"]["containers"]
    assert container["command"] == ["mcpfleet-operator"]
    assert {"MCPFLEET_SANDBOX_IMAGE", "MCPFLEET_SANDBOX_KEY_FILE"} <= set(_env(container))
    runtime = _one(objects, "RuntimeClass", "gvisor")
    assert runtime["handler"] == "runsc"


@needs_kubectl
def test_base_and_prod_run_two_gateways_and_prod_pins_images() -> None:
    for overlay in ("base", "overlays/prod"):
        assert _one(build(overlay), "Deployment", "mcpfleet-gateway")["spec"]["replicas"] == 2
    prod = build("overlays/prod")
    images = [c["image"] for _, pod in _pod_specs(prod) for c in pod["containers"]]
    assert images and all("/" in image and not image.endswith(":dev") for image in images), images
    operator = _one(prod, "Deployment", "mcpfleet-operator")["spec"]["template"]["spec"]["containers"][0]
    assert not _env(operator)["MCPFLEET_SANDBOX_IMAGE"].endswith(":dev")
    # Production brings its own secrets and data stores.
    assert not [o for o in prod if o["kind"] in ("Secret", "StatefulSet")]


@needs_kubectl
def test_dev_brings_its_data_stores_and_secrets() -> None:
    dev = build("overlays/dev")
    config = _one(dev, "Secret", "mcpfleet-config")
    assert {"DATABASE_URL", "REDIS_URL", "VAULT_ADDR"} <= set(config.get("data", {}))
    assert "key" in _one(dev, "Secret", "mcpfleet-sandbox-key")["data"]
    images = {c["image"] for _, pod in _pod_specs(dev) for c in pod["containers"]}
    assert "pgvector/pgvector:pg17" in images
