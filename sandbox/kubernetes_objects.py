"""McpSandbox objects, the contract between the gateway and the operator (its CRD): their names,
the supervisor token derived for each, the spec written for a user, readiness, and the reads and
writes both `sandbox.kubernetes` (users' sandboxes) and `sandbox.kubernetes_trials` (throwaway
ones) make, with the API client they make them through."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException

from sandbox.errors import SandboxUnavailable
from sandbox.servers import ServerSpec
from sandbox.tiers import Tier

log = logging.getLogger(__name__)

GROUP = "mcpfleet.dev"
VERSION = "v1alpha1"
PLURAL = "mcpsandboxes"
KIND = "McpSandbox"
ACTIVITY_ANNOTATION = "mcpfleet.dev/last-activity"
USER_LABEL = "mcpfleet.dev/user-id"
MERGE_PATCH = "application/merge-patch+json"
DEFAULT_NAMESPACE = "mcpfleet"

TierOf = Callable[[int], Awaitable[Tier]]
"""The user's tier (the database's, in the fleet)."""

DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def sandbox_name(tenant: str, user: str) -> str:
    """The user's McpSandbox: `<tenant>-<user>` when both are DNS labels already and the tenant has
    no `-` (so no two users share a name), else their sanitised forms and 8 hex of a digest of both."""
    if DNS_LABEL.match(tenant) and DNS_LABEL.match(user) and "-" not in tenant and len(tenant) + len(user) < 63:
        return f"{tenant}-{user}"

    def clean(text: str, most: int) -> str:
        return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:most].strip("-") or "x"

    digest = hashlib.sha256(f"{tenant}\0{user}".encode()).hexdigest()[:8]
    return f"{clean(tenant, 20)}-{clean(user, 32)}-{digest}"


def sandbox_token(key: bytes, namespace: str, name: str, uid: str) -> str:
    """The supervisor's token in that sandbox's pod (the operator puts the same into its Secret):
    derived, so the gateway needs no access to Secrets, and new with every object (its uid)."""
    digest = hmac.new(key, f"mcpsandbox/{namespace}/{name}/{uid}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode()


def sandbox_spec(
    user_id: int, tenant: str, user: str, tier: Tier, servers: tuple[ServerSpec, ...], traces: bool = False
) -> dict[str, Any]:
    """The McpSandbox spec for a user (operatingMode Running). `traces`: this gateway exports traces,
    so the pod's supervisor serves its servers a trace endpoint and relays their spans."""
    return {
        "user": user,
        "tenant": tenant,
        "userId": user_id,
        "tier": {"name": tier.name, "cpus": tier.cpus, "memoryMb": tier.memory_mb, "pids": tier.pids, "diskMb": tier.disk_mb},
        "servers": spec_servers(servers),
        "operatingMode": "Running",
        "workspace": {"size": f"{tier.disk_mb}Mi"},
        "traces": traces,
    }


def spec_servers(servers: tuple[ServerSpec, ...]) -> list[dict[str, Any]]:
    """The McpSandbox's `spec.servers`: what the user may run, by name and revision (never their
    environment, which holds secrets and reaches a pod only over the channel), and the egress
    hosts it declares (the operator renders them into the supervisor's config, so its proxy is
    offered to that server; the connections are the gateway's to make)."""
    return [
        {
            "name": s.name,
            "prefix": s.name,
            "version": s.revision,
            "artifactSha256": s.revision if _SHA256.match(s.revision) else "",
            "layerSha256": s.layer,
            "layerWheels": list(s.layer_wheels),
            "command": list(s.argv),
            "egress": list(s.egress),  # the hosts the gateway connects it to over the channel
            "inference": s.inference,  # its supervisor offers it the model endpoint; the gateway answers
        }
        for s in servers
    ]


def is_ready(obj: dict[str, Any]) -> bool:
    """Ready condition True, an endpoint to connect to, and not going away."""
    status = obj.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    return ready and bool(status.get("endpoint")) and not (obj.get("metadata") or {}).get("deletionTimestamp")


def host_port(endpoint: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` as (host, port)."""
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


class McpSandboxObjects:
    """McpSandbox objects in one namespace, as the gateway reads and writes them: the steps that
    `KubernetesSandboxes` (users' sandboxes) and `KubernetesTrials` (throwaway ones) share."""

    def __init__(self, api: k8s.ApiClient, namespace: str, start_timeout: float, poll_interval: float):
        self.api = api
        self.objects = k8s.CustomObjectsApi(api)
        self.namespace = namespace
        self.start_timeout = start_timeout
        self.poll_interval = poll_interval

    async def _get(self, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = await self.objects.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
            return obj
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise unavailable("read", name, exc) from None

    async def _create(self, name: str, spec: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": {"app.kubernetes.io/part-of": "mcpfleet", **labels},
            },
            "spec": spec,
        }
        try:
            obj: dict[str, Any] = await self.objects.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)
            log.info("created sandbox %s for %s/%s", name, spec["tenant"], spec["user"])
            return obj
        except ApiException as exc:
            if exc.status != 409:
                raise unavailable("create", name, exc) from None
        # Another gateway replica created it first: it is the same user's, so take it as it is.
        found = await self._get(name)
        if found is None:
            raise SandboxUnavailable(f"sandbox {name} was created and deleted meanwhile; try again")
        if (found.get("spec") or {}).get("operatingMode") == "Hibernated":
            return await self._patch(name, {"spec": {"operatingMode": "Running"}})
        return found

    async def _patch(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        try:
            obj: dict[str, Any] = await self.objects.patch_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, patch,
                _content_type=MERGE_PATCH,  # type: ignore[call-arg]  # the stubs omit the generated client's kwargs
            )  # fmt: skip
            return obj
        except ApiException as exc:
            raise unavailable("patch", name, exc) from None

    async def _wait_ready(self, name: str) -> dict[str, Any]:
        """Read the object every `poll_interval` until it is ready; SandboxUnavailable if it does not
        come in time, fails or goes away. (Polling, not a watch: every API server answers a GET
        the same way, and a start takes seconds, so a few reads cost nothing.)"""
        try:
            async with asyncio.timeout(self.start_timeout):
                while True:
                    obj = await self._get(name)
                    if obj is None:
                        raise SandboxUnavailable(f"sandbox {name} was deleted while starting")
                    status = obj.get("status") or {}
                    if status.get("state") == "Failed":
                        raise SandboxUnavailable(f"sandbox {name} failed: {status.get('reason') or 'no reason given'}")
                    if is_ready(obj):
                        return obj
                    await asyncio.sleep(self.poll_interval)
        except TimeoutError:
            raise SandboxUnavailable(f"sandbox {name} was not ready within {self.start_timeout:.0f}s") from None

    async def _delete(self, name: str) -> bool:
        """Delete the object (the operator's finalizer tears down what it made); False if it was gone."""
        try:
            await self.objects.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise unavailable("delete", name, exc) from None
        return True


def unavailable(what: str, name: str, exc: ApiException) -> SandboxUnavailable:
    return SandboxUnavailable(f"cannot {what} McpSandbox {name}: {exc.status} {exc.reason}")


async def api_client(kubeconfig: str | None = None) -> k8s.ApiClient:
    """In a pod, its service account; else the kubeconfig (KUBECONFIG, ~/.kube/config)."""
    configuration = k8s.Configuration()
    try:
        k8s_config.load_incluster_config(client_configuration=configuration)
    except k8s_config.ConfigException:
        await k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    return k8s.ApiClient(configuration)


def read_key(path: str | Path) -> bytes:
    """The fleet's sandbox key (the Secret `mcpfleet-sandbox-key`, key `key`, mounted as a file)."""
    key = Path(path).read_bytes().strip()
    if len(key) < 16:
        raise ValueError(f"the sandbox key in {path} is too short (at least 16 bytes)")
    return key
