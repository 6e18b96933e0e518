"""Users' sandboxes on Kubernetes (`MCPFLEET_SANDBOX_BACKEND=kubernetes`): the gateway's side.

There the operator owns the pods; the gateway only asks for a sandbox and connects to it. Per
user it keeps one `McpSandbox` (the contract: the operator's CRD), and on a call:

    no McpSandbox          create it (its spec: the user's tier and approved servers)
    operatingMode Hibernated   patch it Running (the operator starts a pod on the same workspace)
    then                   read it until its Ready condition is True and it has an endpoint,
                           connect to the supervisor there over TCP, attach with the token
                           derived from the object's uid (`sandbox_token`), and hand the
                           router the client, as `SandboxManager.ensure` does

The call waits meanwhile. Calls stamp the annotation `mcpfleet.dev/last-activity`, at most once
per sandbox per `activity_interval` (the operator mirrors it into status and hibernates idle
sandboxes by it). `hibernate` patches `operatingMode: Hibernated`; `reclaim` deletes the object.
When what a user may run changes (`servers_changed`, the registry's `on_change`), the object's
`spec.servers` is patched and a pod connected here is configured at once.
Any gateway replica may do all this for any user: the object is the shared state, and the
supervisor keeps every replica that attached, each with its own connection (`supervisor.link`),
so calls of one user served at the same moment by two replicas each get their own answers. A
server that declares egress hosts reaches them through the channel: a gateway that attached
(the newest when the server connects) makes each connection (`egress`, the fleet's
`gateway.egress.SandboxEgress`), so the pod itself needs no route out. So do the spans its servers
make, when this gateway exports traces (`spans`): `spec.traces` is true, the operator has the pod's
supervisor serve them an OTLP endpoint on its loopback, and each export comes over the channel to
`sandbox.span_relay`, as from a local sandbox. An object whose `spec.traces` is not this gateway's is
patched when the gateway brings it up; a running pod keeps what it started with (its next pod follows).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException

from core.tasks import Tasks
from sandbox import wire
from sandbox.client import SupervisorClient
from sandbox.errors import SandboxError, SandboxUnavailable
from sandbox.model_asks import ModelGate
from sandbox.servers import ServerSource, ServerSpec, server_configs
from sandbox.span_relay import SpanSink
from sandbox.tiers import Tier
from sandbox.tunnels import EgressPolicy

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

_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def sandbox_name(tenant: str, user: str) -> str:
    """The user's McpSandbox: `<tenant>-<user>` when both are DNS labels already and the tenant has
    no `-` (so no two users share a name), else their sanitised forms and 8 hex of a digest of both."""
    if _DNS_LABEL.match(tenant) and _DNS_LABEL.match(user) and "-" not in tenant and len(tenant) + len(user) < 63:
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


def _host_port(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


@dataclass
class KubeSandbox:
    """A user's sandbox as this gateway holds it: the object's name and uid, and the channel."""

    name: str
    uid: str
    user_id: int
    tenant: str
    user: str
    client: SupervisorClient
    endpoint: str
    servers: tuple[ServerSpec, ...] | None = None
    last_used_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    def __post_init__(self) -> None:
        # The channel's egress tunnels are decided by who the sandbox is for and what it runs now.
        if self.client.tunnels is not None:
            self.client.tunnels.sandbox = self
        self.client.model_asks.sandbox = self
        self.client.spans.sandbox = self

    @property
    def id(self) -> str:
        return self.name


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
            raise _unavailable("read", name, exc) from None

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
                raise _unavailable("create", name, exc) from None
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
            raise _unavailable("patch", name, exc) from None

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
            raise _unavailable("delete", name, exc) from None
        return True


class KubernetesSandboxes(McpSandboxObjects):
    """The manager of the kubernetes backend: what the router asks of `SandboxManager` (`ensure`),
    with McpSandbox objects for rows and the operator for the steps."""

    def __init__(
        self,
        api: k8s.ApiClient,
        servers: ServerSource,
        tier_of: TierOf,
        key: bytes,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        start_timeout: float = 300.0,
        connect_timeout: float = 30.0,
        activity_interval: float = 30.0,
        poll_interval: float = 0.3,
        max_result_bytes: int = wire.MAX_LINE,
        egress: EgressPolicy | None = None,
        models: ModelGate | None = None,
        spans: SpanSink | None = None,
    ):
        """`egress` decides the connections servers that declare egress hosts ask for over the
        channel (None: none is made); the pod itself has no route out but to the gateway.
        `models` answers the model asks of servers that declare inference (None: none is answered);
        `spans` exports the spans servers make (None: their pods are not offered a trace endpoint)."""
        super().__init__(api, namespace, start_timeout, poll_interval)
        self.servers = servers
        self.tier_of = tier_of
        self.connect_timeout = connect_timeout
        self.activity_interval = activity_interval
        self.max_result_bytes = max_result_bytes
        self.egress = egress
        self.models = models
        self.spans = spans
        self._key = key
        self._sandboxes: dict[int, KubeSandbox] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._active: dict[str, datetime] = {}
        """Sandboxes used since the last stamp, by name: when last."""
        self._tasks = Tasks()
        self._closing = False

    # -- gateway lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks.spawn(self._stamp_periodically())

    async def close(self) -> None:
        """Stamp the last activity and drop the channels; the sandboxes stay for the next gateway
        (the operator hibernates them when idle)."""
        self._closing = True
        await self._tasks.close()
        await self.flush_usage()
        for sandbox in list(self._sandboxes.values()):
            await sandbox.client.close()
        self._sandboxes.clear()
        await self.api.close()

    # -- per user ---------------------------------------------------------------------------

    async def ensure(self, user_id: int, tenant: str, user: str) -> KubeSandbox:
        """The user's sandbox, connected: created or woken and waited for if need be."""
        if self._closing:
            raise SandboxUnavailable("the gateway is stopping")
        sandbox = self._sandboxes.get(user_id)
        if sandbox is None or not sandbox.client.connected:
            async with self._lock(user_id):
                sandbox = self._sandboxes.get(user_id)
                if sandbox is None or not sandbox.client.connected:
                    sandbox = await self._bring_up(user_id, tenant, user, sandbox)
        wanted = await self.servers.servers_for(user_id)
        if sandbox.servers != wanted:
            if _already_runs(sandbox.client, wanted):
                sandbox.servers = wanted
            else:
                await self._configure(sandbox, wanted)
        self.touch(sandbox)
        return sandbox

    async def resume(self, user_id: int, tenant: str, user: str) -> KubeSandbox:
        return await self.ensure(user_id, tenant, user)

    async def hibernate(self, user_id: int, reason: str = "requested") -> bool:
        """Ask the operator to hibernate the user's sandbox; False if it has none running."""
        async with self._lock(user_id):
            sandbox = self._sandboxes.pop(user_id, None)
            if sandbox is not None:
                await sandbox.client.close()
            obj = await self._of_user(user_id)
            if obj is None or obj["spec"].get("operatingMode") == "Hibernated":
                return False
            name = obj["metadata"]["name"]
            log.info("hibernating sandbox %s (%s)", name, reason)
            await self.flush_usage()
            await self._patch(name, {"spec": {"operatingMode": "Hibernated"}})
            return True

    async def reclaim(self, user_id: int, reason: str = "reclaimed") -> bool:
        """Delete the user's McpSandbox (the operator keeps or deletes the workspace by its retention);
        False if there was none."""
        async with self._lock(user_id):
            sandbox = self._sandboxes.pop(user_id, None)
            if sandbox is not None:
                await sandbox.client.close()
            obj = await self._of_user(user_id)
            if obj is None:
                return False
            name = obj["metadata"]["name"]
            log.info("reclaiming sandbox %s (%s)", name, reason)
            if not await self._delete(name):
                return False
            self._active.pop(name, None)
            return True

    async def list(self) -> list[dict[str, Any]]:
        """The McpSandboxes in the namespace: name, user, tenant, state, reason, last activity."""
        found = await self.objects.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)
        return [
            {
                "id": o["metadata"]["name"],
                "user": o["spec"].get("user"),
                "tenant": o["spec"].get("tenant"),
                "state": (o.get("status") or {}).get("state"),
                "reason": (o.get("status") or {}).get("reason"),
                "last_used_at": (o["metadata"].get("annotations") or {}).get(ACTIVITY_ANNOTATION),
            }
            for o in found.get("items") or []
        ]

    async def authenticate(self, name: str, token: str) -> dict[str, Any] | None:
        """The McpSandbox `name` in this namespace if `token` is the one its pod holds (derived from
        its uid, compared in constant time), else None: how a pod's init container proves which
        sandbox it is (`gateway.artifact_api`). SandboxUnavailable if the API cannot be read."""
        if not _DNS_LABEL.match(name) or len(name) > 253:
            return None
        obj = await self._get(name)
        uid = ((obj or {}).get("metadata") or {}).get("uid")
        if obj is None or not uid:
            return None
        expected = sandbox_token(self._key, self.namespace, name, uid)
        return obj if hmac.compare_digest(expected.encode(), token.encode()) else None

    def get(self, user_id: int) -> KubeSandbox | None:
        return self._sandboxes.get(user_id)

    async def servers_changed(self, user_ids: set[int]) -> None:
        """What these users may run changed (the registry's `on_change`): their McpSandboxes'
        `spec.servers` follow, so that what the cluster shows and the next pod agree with the
        approvals, and a sandbox connected here is configured now rather than at its next call."""
        for user_id in sorted(user_ids):
            try:
                wanted = await self.servers.servers_for(user_id)
                sandbox = self._sandboxes.get(user_id)
                obj = None if sandbox is not None else await self._of_user(user_id)
                name = sandbox.name if sandbox is not None else obj["metadata"]["name"] if obj is not None else None
                if name is not None:
                    await self._patch(name, {"spec": {"servers": spec_servers(wanted)}})
                if sandbox is not None and sandbox.client.connected and sandbox.servers != wanted:
                    await self._configure(sandbox, wanted)
            except (SandboxError, TimeoutError) as exc:
                # The next call configures it (ensure compares what runs with what is wanted).
                log.warning("could not bring the sandbox of user %s up to date: %s", user_id, exc)

    # -- activity ---------------------------------------------------------------------------

    def touch(self, sandbox: KubeSandbox) -> None:
        sandbox.last_used_at = datetime.now(timezone.utc)
        self._active[sandbox.name] = sandbox.last_used_at

    async def flush_usage(self) -> None:
        """Stamp every sandbox used since the last stamp with when it was last used."""
        active, self._active = self._active, {}
        for name, when in active.items():
            stamp = when.isoformat(timespec="seconds").replace("+00:00", "Z")
            try:
                await self._patch(name, {"metadata": {"annotations": {ACTIVITY_ANNOTATION: stamp}}})
            except SandboxUnavailable as exc:
                log.warning("could not stamp the activity of %s: %s", name, exc)

    async def _stamp_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.activity_interval)
            await self.flush_usage()

    # -- steps ------------------------------------------------------------------------------

    async def _bring_up(self, user_id: int, tenant: str, user: str, held: KubeSandbox | None) -> KubeSandbox:
        name = sandbox_name(tenant, user)
        wanted = await self.servers.servers_for(user_id)
        obj = await self._get(name)
        traces = self.spans is not None
        if obj is None:
            spec = sandbox_spec(user_id, tenant, user, await self.tier_of(user_id), wanted, traces)
            obj = await self._create(name, spec, {USER_LABEL: str(user_id)})
        else:
            # Made by a gateway that exported traces, or did not: its next pod is as this one wants.
            change: dict[str, Any] = {} if bool((obj.get("spec") or {}).get("traces")) == traces else {"traces": traces}
            if (obj.get("spec") or {}).get("operatingMode") == "Hibernated":
                log.info("waking sandbox %s of %s/%s", name, tenant, user)
                change["operatingMode"] = "Running"
            if change:
                obj = await self._patch(name, {"spec": change})
        if not is_ready(obj):
            obj = await self._wait_ready(name)
        uid = obj["metadata"]["uid"]
        endpoint = obj["status"]["endpoint"]
        if held is not None and held.uid == uid and held.endpoint == endpoint:
            # The same pod, whose connection was lost (the pod's network, or the supervisor dropping
            # the oldest of more than its cap of attached gateways): connect again.
            client = held.client
        else:
            if held is not None:
                await held.client.close()
            token = sandbox_token(self._key, self.namespace, name, uid)
            client = SupervisorClient(token=token, max_result_bytes=self.max_result_bytes, egress=self.egress,
                                      models=self.models, spans=self.spans)
            held = None
        await client.connect(*_host_port(endpoint), timeout=self.connect_timeout)
        sandbox = held or KubeSandbox(name, uid, user_id, tenant, user, client, endpoint)
        self._sandboxes[user_id] = sandbox
        log.info("sandbox %s of %s/%s connected at %s", name, tenant, user, endpoint)
        return sandbox

    async def _configure(self, sandbox: KubeSandbox, wanted: tuple[ServerSpec, ...]) -> None:
        """Tell the supervisor which servers to run (their environment never goes into the object)."""
        await sandbox.client.configure([dataclasses.asdict(c) for c in server_configs(wanted)], self.start_timeout)
        sandbox.servers = wanted

    # -- the API ----------------------------------------------------------------------------

    async def _of_user(self, user_id: int) -> dict[str, Any] | None:
        try:
            found = await self.objects.list_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, label_selector=f"{USER_LABEL}={user_id}"
            )
        except ApiException as exc:
            raise _unavailable("list", f"of user {user_id}", exc) from None
        # Checked here too: the label is only a way to ask for less.
        mine = [o for o in found.get("items") or [] if (o.get("spec") or {}).get("userId") == user_id]
        return mine[0] if mine else None

    def _lock(self, user_id: int) -> asyncio.Lock:
        return self._locks.setdefault(user_id, asyncio.Lock())


def _already_runs(client: SupervisorClient, wanted: tuple[ServerSpec, ...]) -> bool:
    """The pod was started with these servers (the operator wrote them from the spec, as name and
    revision): no need to restart them. A server with an environment is always configured, since
    that (its secrets) reaches a pod only over the channel, never through the object."""
    running = {name: status.get("revision") for name, status in client.servers.items()}
    return running == {s.name: s.revision for s in wanted} and not any(s.env or s.secrets for s in wanted)


def _unavailable(what: str, name: str, exc: ApiException) -> SandboxUnavailable:
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
