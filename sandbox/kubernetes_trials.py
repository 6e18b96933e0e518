"""Throwaway sandboxes on Kubernetes, for the registry's trial runs (`registry.trial.trial_in_pod`).

A gateway on the kubernetes backend starts no sandbox itself. To try a published version it asks
the operator for one as it does for a user: a McpSandbox `trial-<digest>-<random>` in its
namespace whose spec.servers names only that server, so that the pod's init container fetches
exactly that wheel through the artifact route (`gateway.artifact_api`, with this object's token),
in the trial tier, with a workspace deleted with it. Once it is Ready the gateway connects as to
any sandbox, configures the server (its environment reaches a pod only over the channel) and lets
the caller look; the object is deleted afterwards, whatever happened (the operator's finalizer
removes the pod, its Secret, ConfigMap, NetworkPolicy and volume). No user is named: without
`spec.userId` no user's call ever finds it, and its servers declare no egress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from kubernetes_asyncio import client as k8s

from sandbox import wire
from sandbox.client import SupervisorClient
from sandbox.errors import SandboxUnavailable
from sandbox.kubernetes_objects import DEFAULT_NAMESPACE, McpSandboxObjects, host_port, is_ready, sandbox_token, spec_servers
from sandbox.servers import ServerSpec, server_configs
from sandbox.tiers import Tier

log = logging.getLogger(__name__)

TRIAL_LABEL = "mcpfleet.dev/trial"
TRIAL_TENANT = "mcpfleet-trial"


def trial_name(spec: ServerSpec) -> str:
    """`trial-<12 of the digest>-<6 random hex>`: whose trial it is at a glance, and never reused."""
    return f"trial-{re.sub(r'[^a-z0-9]', '', spec.revision.lower())[:12] or 'x'}-{secrets.token_hex(3)}"


def trial_spec(name: str, spec: ServerSpec, tier: Tier) -> dict[str, Any]:
    """The throwaway McpSandbox's spec: no userId, the server without egress, a workspace deleted with it."""
    return {
        "user": name,
        "tenant": TRIAL_TENANT,
        "tier": {"name": tier.name, "cpus": tier.cpus, "memoryMb": tier.memory_mb, "pids": tier.pids, "diskMb": tier.disk_mb},
        "servers": spec_servers((dataclasses.replace(spec, egress=()),)),
        "operatingMode": "Running",
        "workspace": {"size": f"{max(tier.disk_mb, 1)}Mi", "retention": "Delete"},
    }


class KubernetesTrials(McpSandboxObjects):
    def __init__(
        self, api: k8s.ApiClient, key: bytes, *, namespace: str = DEFAULT_NAMESPACE, start_timeout: float = 300.0,
        connect_timeout: float = 30.0, poll_interval: float = 0.3, max_result_bytes: int = wire.MAX_LINE,
    ):  # fmt: skip
        super().__init__(api, namespace, start_timeout, poll_interval)
        self.connect_timeout = connect_timeout
        self.max_result_bytes = max_result_bytes
        self._key = key

    async def close(self) -> None:
        await self.api.close()

    @contextlib.asynccontextmanager
    async def one_shot(self, spec: ServerSpec, tier: Tier, timeout: float) -> AsyncIterator[tuple[SupervisorClient, float]]:
        """A pod running `spec` alone, connected and configured: its client and the seconds from
        asking for it to the server answering (scheduling, the wheel's fetch and the start).
        SandboxUnavailable if it is not ready within the start timeout or fails."""
        name = trial_name(spec)
        started = time.monotonic()
        obj = await self._create(name, trial_spec(name, spec, tier), {TRIAL_LABEL: "true"})
        client: SupervisorClient | None = None
        try:
            if not is_ready(obj):
                obj = await self._wait_ready(name)
            client = SupervisorClient(
                token=sandbox_token(self._key, self.namespace, name, obj["metadata"]["uid"]),
                max_result_bytes=self.max_result_bytes,
            )
            await client.connect(*host_port(obj["status"]["endpoint"]), timeout=self.connect_timeout)
            await client.configure([dataclasses.asdict(c) for c in server_configs((spec,))], timeout)
            yield client, time.monotonic() - started
        finally:
            if client is not None:
                await client.close()
            try:
                await self._delete(name)
            except SandboxUnavailable as exc:  # the operator's idle timer or an SRE removes it later
                log.warning("could not delete the trial sandbox %s: %s", name, exc)
