"""The bodies of the objects the operator owns, built from a McpSandbox or McpSandboxPool (pure functions).

For McpSandbox NAME (all labelled `app.kubernetes.io/part-of: mcpfleet`, `mcpfleet.dev/sandbox: NAME`):

| Object         | Name             | Owned by the McpSandbox? | What                                                  |
|----------------|------------------|--------------------------|-------------------------------------------------------|
| PVC            | NAME-workspace   | no: `workspace.retention`| the user's /workspace, kept across hibernation        |
| Secret         | NAME-token       | yes                      | key `token`: HMAC of the fleet key (SPEC.md)          |
| NetworkPolicy  | NAME             | yes                      | ingress from the gateway on 7070; egress only to the  |
|                |                  |                          | gateway's HTTP port and DNS when published servers    |
|                |                  |                          | are fetched, else none                                |
| ConfigMap      | NAME-config      | yes                      | key `sandbox.json`: the supervisor's config, rendered |
|                |                  |                          | from spec.servers (`supervisor_config`)               |
| Pod            | NAME             | yes                      | gVisor, non-root, read-only root, no capabilities     |

A warm pool's pods are named POOL-XXXXX and carry their own PVC (POOL-XXXXX-workspace) and Secret
(POOL-XXXXX-token); a claim relabels them to the McpSandbox, which records the PVC's name in the
annotation `mcpfleet.dev/workspace-claim` so that a woken sandbox mounts the same volume. They all
mount the pool's ConfigMap (POOL-pool-config: no servers, since nobody's servers are known before a
claim); the gateway configures a claimed pod's servers over the channel. Whether a supervisor relays
its servers' spans (`spec.traces`, set by a gateway that exports traces) is read once at the pod's
start: the pool's ConfigMap carries the pool's `spec.template.traces`, each pool pod the annotation
`mcpfleet.dev/traces`, and a sandbox claims only a pod whose setting is its own (else starts cold).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

GROUP = "mcpfleet.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
PORT = 7070
CONFIG_DIR = "/etc/mcpfleet"
CONFIG_KEY = "sandbox.json"
SUPERVISOR_CONFIG = f"{CONFIG_DIR}/{CONFIG_KEY}"
TOKEN_DIR = "/var/run/mcpfleet"
WORKSPACE = "/workspace"
TOOLS = "/opt/tools"
"""Where published servers' installs are, one dir per wheel digest (their command lines name it)."""
GATEWAY_PORT = 8080

PART_OF = {"app.kubernetes.io/part-of": "mcpfleet"}
SANDBOX_LABEL = "mcpfleet.dev/sandbox"
POOL_LABEL = "mcpfleet.dev/pool"
CLAIMED_LABEL = "mcpfleet.dev/claimed"
LAST_ACTIVITY = "mcpfleet.dev/last-activity"
WORKSPACE_CLAIM = "mcpfleet.dev/workspace-claim"
TRACES = "mcpfleet.dev/traces"
"""On a pool pod: "true" when its supervisor serves its servers a trace endpoint (`spec.template.traces`)."""
RETRY = "mcpfleet.dev/retry"
"""Any new value retries a Failed sandbox (as a change of its spec does)."""

Body = dict[str, Any]


def token(key: bytes, namespace: str, name: str, uid: str) -> str:
    """The sandbox's token as SPEC.md derives it; the gateway computes the same without reading the Secret."""
    digest = hmac.new(key, f"mcpsandbox/{namespace}/{name}/{uid}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode()


def sandbox_labels(name: str) -> dict[str, str]:
    return {**PART_OF, SANDBOX_LABEL: name}


def pool_labels(pool: str, claimed: bool = False) -> dict[str, str]:
    return {**PART_OF, POOL_LABEL: pool, CLAIMED_LABEL: "true" if claimed else "false"}


def workspace_name(name: str) -> str:
    return f"{name}-workspace"


def secret_name(name: str) -> str:
    return f"{name}-token"


def pvc(name: str, workspace: Mapping[str, Any], labels: Mapping[str, str]) -> Body:
    spec: Body = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": str(workspace.get("size") or "1Gi")}},
    }
    if workspace.get("storageClassName"):
        spec["storageClassName"] = workspace["storageClassName"]
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "labels": dict(labels)}, "spec": spec}


def config_map_name(name: str) -> str:
    return f"{name}-config"


def supervisor_config(servers: list[Mapping[str, Any]] | None, traces: bool = False) -> str:
    """The supervisor's config (sandbox/supervisor/config.py, `SupervisorConfig.from_json`) for `spec.servers`.

    As the gateway's `sandbox.servers.server_configs` builds it: each server by its tool prefix, its
    command, run in /workspace, and its revision (the wheel's digest, else the version, else
    "builtin") so that the gateway sees the pod already runs what it wants and need not restart it.
    No environment: a server's secrets reach it only over the channel (`configure`), never through
    an object anyone with read access to ConfigMaps could see. A server without a command has
    nothing to run and is left out. The token is the Secret volume's (`--token-file`), not here.
    `traces` (`spec.traces`: the gateway exports traces): the supervisor serves its servers an OTLP
    endpoint on the pod's loopback and relays their spans over the channel (read at the pod's start).
    """
    rendered = []
    for s in servers or []:
        if not s.get("command"):
            continue
        rendered.append({
            "name": s.get("prefix") or s["name"],
            "argv": [str(a) for a in s["command"]],
            "env": {},
            "cwd": WORKSPACE,
            "revision": s.get("artifactSha256") or s.get("version") or "builtin",
            # Its supervisor offers it the egress proxy; the gateway makes each connection.
            "egress": [str(h) for h in s.get("egress") or []],
            # Its supervisor offers it the model endpoint; the gateway answers every ask.
            "inference": bool(s.get("inference")),
        })
    return json.dumps({"socket": "", "servers": rendered, "env": {}, "traces": bool(traces)}, indent=2, sort_keys=True)


def config_map(name: str, servers: list[Mapping[str, Any]] | None, labels: Mapping[str, str], traces: bool = False) -> Body:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "labels": dict(labels)},
        "data": {CONFIG_KEY: supervisor_config(servers, traces)},
    }


def secret(name: str, token_value: str, labels: Mapping[str, str]) -> Body:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": name, "labels": dict(labels)},
        "data": {"token": base64.b64encode(token_value.encode()).decode()},
    }


def published_layers(servers: list[Mapping[str, Any]] | None) -> list[str]:
    """`--layer DIGEST=WHEEL,...` arguments of `registry.fetch`: the dependency layers of the
    published servers, each unpacked from its wheels into the tools volume under its digest."""
    layers = {s["layerSha256"]: s.get("layerWheels") or [] for s in servers or [] if s.get("layerSha256")}
    return [f"--layer={digest}={','.join(wheels)}" for digest, wheels in sorted(layers.items())]


def published_digests(servers: list[Mapping[str, Any]] | None) -> list[str]:
    """The wheels a sandbox's published servers run (built-in servers ship with the image: none)."""
    return sorted({s["artifactSha256"] for s in servers or [] if s.get("artifactSha256")})


def network_policy(name: str, selector: Mapping[str, str], servers: list[Mapping[str, Any]] | None) -> Body:
    """Ingress only from the gateway on the supervisor's port. Egress: none, except, when published
    servers are to be fetched, to the gateway's HTTP port (and DNS, to find it). Servers that declare
    egress hosts need no rule: their connections are made by the gateway and carried over the
    channel the gateway opened to the pod (`sandbox.tunnels`), which the ingress rule admits."""
    egress: list[Body] = []
    if published_digests(servers):
        # A policy is per pod, not per container: the supervisor's container may reach the gateway's HTTP
        # port too (where every request is authenticated), not only the init container that fetches.
        egress.append({"to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/component": "gateway"}}}],
                       "ports": [{"protocol": "TCP", "port": GATEWAY_PORT}]})
        egress.append({"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                       "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "labels": {**PART_OF}},
        "spec": {
            "podSelector": {"matchLabels": dict(selector)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/component": "gateway"}}}],
                "ports": [{"protocol": "TCP", "port": PORT}],
            }],
            "egress": egress,
        },
    }


def resources(tier: Mapping[str, Any] | None) -> Body:
    tier = tier or {}
    limits: Body = {}
    if tier.get("cpus"):
        limits["cpu"] = str(tier["cpus"])
    if tier.get("memoryMb"):
        limits["memory"] = f"{int(tier['memoryMb'])}Mi"
    if tier.get("diskMb"):
        limits["ephemeral-storage"] = f"{int(tier['diskMb'])}Mi"
    return {"limits": limits, "requests": dict(limits)}


def _hardened() -> Body:
    return {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def fetch_container(sandbox: str, namespace: str, digests: list[str], *, image: str, gateway_url: str,
                    layers: list[str] | None = None) -> Body:
    """The init container that fetches the published servers' wheels by digest into the tools volume
    (`registry.fetch`, in the gateway's image, which has the installer and its limits), and their
    dependency layers (`layers`: `published_layers`)."""
    return {
        "name": "fetch-tools",
        "image": image,
        "args": ["python", "-m", "registry.fetch", "--gateway", gateway_url, "--sandbox", f"{namespace}/{sandbox}",
                 "--token-file", f"{TOKEN_DIR}/token", "--into", TOOLS, *(layers or []), *digests],
        "resources": {"limits": {"cpu": "500m", "memory": "256Mi"}, "requests": {"cpu": "100m", "memory": "128Mi"}},
        "securityContext": _hardened(),
        "volumeMounts": [
            {"name": "tools", "mountPath": TOOLS},
            {"name": "token", "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }


def pod(name: str, *, image: str, tier: Mapping[str, Any] | None, workspace_claim: str, token_secret: str,
        config: str, labels: Mapping[str, str], fetch: Body | None = None) -> Body:
    """The sandbox pod: the supervisor in TCP mode under gVisor, nothing writable but /workspace and /tmp;
    `fetch`, an init container that fills /opt/tools (read-only to the supervisor), else it stays empty."""
    body: Body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {**labels, "app.kubernetes.io/component": "sandbox"}},
        "spec": {
            "runtimeClassName": "gvisor",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "restartPolicy": "Always",
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 1000,
                "runAsGroup": 1000,
                "fsGroup": 1000,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [{
                "name": "supervisor",
                "image": image,
                # The token file is read at every attach: a claim swaps a pool pod's Secret in place.
                # PID 1 is tini (reaps orphans, passes signals on), as in a sandbox on one box: a forked
                # Python for that job cost the pod about 11-15 MiB (sandbox/bundle.py INIT). The supervisor
                # starts as on one box (sandbox/supervisor/config.py SUPERVISOR_FLAGS): without docstrings
                # and asserts, and without `site`; the image holds its .pyc at both levels.
                "args": ["/usr/bin/tini-static", "--", "python", "-s", "-P", "-OO", "-S", "-m", "sandbox.supervisor",
                         "--listen", f"0.0.0.0:{PORT}", "--token-file", f"{TOKEN_DIR}/token", SUPERVISOR_CONFIG],
                "ports": [{"name": "supervisor", "containerPort": PORT, "protocol": "TCP"}],
                "readinessProbe": {"tcpSocket": {"port": PORT}, "periodSeconds": 2},
                "resources": resources(tier),
                "securityContext": _hardened(),
                "volumeMounts": [
                    {"name": "workspace", "mountPath": WORKSPACE},
                    {"name": "token", "mountPath": TOKEN_DIR, "readOnly": True},
                    {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                    {"name": "tools", "mountPath": TOOLS, "readOnly": True},
                    {"name": "tmp", "mountPath": "/tmp"},
                ],
            }],
            "volumes": [
                {"name": "workspace", "persistentVolumeClaim": {"claimName": workspace_claim}},
                {"name": "token", "secret": {"secretName": token_secret, "defaultMode": 0o440}},
                {"name": "config", "configMap": {"name": config, "defaultMode": 0o444}},
                {"name": "tools", "emptyDir": {}},
                {"name": "tmp", "emptyDir": {"medium": "Memory"}},
            ],
        },
    }
    if fetch is not None:
        body["spec"]["initContainers"] = [fetch]
    return body


def sandbox_pod(sandbox: Mapping[str, Any], image: str, *, tools_image: str = "mcpfleet-gateway:dev",
                gateway_url: str = "http://mcpfleet-gateway:8080") -> Body:
    name = sandbox["metadata"]["name"]
    claim = (sandbox["metadata"].get("annotations") or {}).get(WORKSPACE_CLAIM) or workspace_name(name)
    servers = sandbox.get("spec", {}).get("servers")
    digests = published_digests(servers)
    fetch = fetch_container(name, sandbox["metadata"]["namespace"], digests, image=tools_image, gateway_url=gateway_url,
                            layers=published_layers(servers)) if digests else None
    return pod(name, image=image, tier=sandbox.get("spec", {}).get("tier"), workspace_claim=claim,
               token_secret=secret_name(name), config=config_map_name(name), labels=sandbox_labels(name), fetch=fetch)


def pool_pod(pool: Mapping[str, Any], name: str, image: str) -> Body:
    pool_name = pool["metadata"]["name"]
    image = (pool.get("spec", {}).get("template") or {}).get("image") or image
    body = pod(name, image=image, tier=pool.get("spec", {}).get("tier"), workspace_claim=workspace_name(name),
               token_secret=secret_name(name), config=pool_config_name(pool_name), labels=pool_labels(pool_name))
    # What its supervisor read at start, so a claim takes only a pod that relays spans as the sandbox wants.
    body["metadata"]["annotations"] = {TRACES: "true" if pool_traces(pool) else "false"}
    return body


def pool_traces(pool: Mapping[str, Any]) -> bool:
    """The pool's `spec.template.traces`: its pods' supervisors serve the servers a trace endpoint."""
    return bool((pool.get("spec", {}).get("template") or {}).get("traces"))


def pod_traces(pod_body: Mapping[str, Any]) -> bool:
    """A pool pod started with traces on (its annotation; a pod from before it has traces off)."""
    return (pod_body.get("metadata", {}).get("annotations") or {}).get(TRACES) == "true"


def pool_config_name(pool: str) -> str:
    return f"{pool}-pool-config"


def pod_ready(pod_body: Mapping[str, Any]) -> bool:
    status = pod_body.get("status") or {}
    if status.get("phase") != "Running" or not status.get("podIP"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


FAILING_WAITING_REASONS = frozenset({
    "CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "InvalidImageName",
    "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
})
"""A container waiting for one of these will not start without someone's help (or a long back-off)."""


def pod_failure(pod_body: Mapping[str, Any]) -> tuple[str, str] | None:
    """(reason, message) when the pod has failed or cannot start: phase Failed, or a container (init
    containers too) waiting for a reason in FAILING_WAITING_REASONS; None while it may yet come up."""
    status = pod_body.get("status") or {}
    if status.get("phase") == "Failed":
        return "PodFailed", f"The pod failed: {status.get('reason') or status.get('message') or 'no reason given'}."
    for c in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        waiting = (c.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in FAILING_WAITING_REASONS:
            detail = f": {waiting['message']}" if waiting.get("message") else ""
            return waiting["reason"], f"Container {c.get('name')} is in {waiting['reason']}{detail}."
    return None


def condition(conditions: list[Mapping[str, Any]] | None, type_: str, status: str, reason: str, message: str,
              *, now: str, generation: int | None) -> list[Body]:
    """The conditions list with `type_` set; lastTransitionTime moves only when the status changes."""
    out: list[Body] = []
    found = False
    for c in conditions or []:
        if c.get("type") != type_:
            out.append(dict(c))
            continue
        found = True
        changed = c.get("status") != status
        out.append({"type": type_, "status": status, "reason": reason, "message": message,
                    "lastTransitionTime": now if changed else c.get("lastTransitionTime", now),
                    "observedGeneration": generation})
    if not found:
        out.append({"type": type_, "status": status, "reason": reason, "message": message,
                    "lastTransitionTime": now, "observedGeneration": generation})
    return out
