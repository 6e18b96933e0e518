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
import dataclasses
import hmac
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException

from core.tasks import Tasks
from sandbox import wire
from sandbox.client import SupervisorClient
from sandbox.errors import SandboxError, SandboxUnavailable
from sandbox.kubernetes_objects import (
    ACTIVITY_ANNOTATION,
    DEFAULT_NAMESPACE,
    DNS_LABEL,
    GROUP,
    PLURAL,
    USER_LABEL,
    VERSION,
    McpSandboxObjects,
    TierOf,
    host_port,
    is_ready,
    sandbox_name,
    sandbox_spec,
    sandbox_token,
    spec_servers,
    unavailable,
)
from sandbox.model_asks import ModelGate
from sandbox.servers import ServerSource, ServerSpec, server_configs
from sandbox.span_relay import SpanSink
from sandbox.tunnels import EgressPolicy

log = logging.getLogger(__name__)


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
        if not DNS_LABEL.match(name) or len(name) > 253:
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
        await client.connect(*host_port(endpoint), timeout=self.connect_timeout)
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
            raise unavailable("list", f"of user {user_id}", exc) from None
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
