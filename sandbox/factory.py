"""The sandboxes as the fleet's settings choose them: their Python, the backend, the lifecycle and the manager."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from core import accounts, audit
from core.optional import require
from core.settings import Settings
from sandbox import tiers
from sandbox.backends.base import SandboxBackend
from sandbox.backends.runsc import RunscBackend
from sandbox.manager import SANDBOX_GID, SANDBOX_UID, Lifecycle, SandboxManager
from sandbox.model_asks import ModelGate
from sandbox.runtime import PythonRuntime, current_python, venv_python
from sandbox.servers import BUILTIN_SERVERS, ServerSource, ServerSpec
from sandbox.span_relay import SpanSink
from sandbox.state import Transition
from sandbox.steps import ImageSealer
from sandbox.tiers import Tier
from sandbox.tunnels import EgressPolicy
from sandbox.workspaces import Workspaces

if TYPE_CHECKING:
    from sandbox.kubernetes import KubernetesSandboxes
    from sandbox.kubernetes_objects import TierOf
    from sandbox.kubernetes_trials import KubernetesTrials

log = logging.getLogger(__name__)

SANDBOX_VENV = Path(__file__).resolve().parent.parent / ".venv-sandbox"
"""Built by scripts/setup.sh next to the project when the machine has Python 3.12 or later."""


def sandbox_python() -> PythonRuntime:
    """The venv that MCPFLEET_SANDBOX_PYTHON names, else the project's .venv-sandbox, else the gateway's Python."""
    configured = os.environ.get("MCPFLEET_SANDBOX_PYTHON")
    venv = Path(configured) if configured else SANDBOX_VENV if SANDBOX_VENV.exists() else None
    if venv is None:
        return current_python()
    try:
        return venv_python(venv)
    except RuntimeError as exc:
        hint = "MCPFLEET_SANDBOX_PYTHON must name a venv" if configured else "run scripts/setup.sh to rebuild it"
        raise RuntimeError(f"the sandboxes' Python: {exc} ({hint})") from None


def sandbox_backend(settings: Settings, python: PythonRuntime) -> SandboxBackend:
    log.info("sandboxes run Python %s (%s)", python.version, python.executable)
    if settings.sandbox_backend == "docker":
        require("docker", extra="docker", feature="MCPFLEET_SANDBOX_BACKEND=docker")
        from sandbox.backends.docker import docker_backend

        return docker_backend(settings.home, python)
    return RunscBackend(settings.home / "runsc", python=python)


def trial_backend(settings: Settings, python: PythonRuntime) -> tuple[SandboxBackend | None, str]:
    """Where the registry's validation runs a published version on trial, or None and why not.
    On runsc and docker: the fleet's backend. On kubernetes the sandboxes are pods the operator
    runs, and a gateway starts none; a gateway whose machine has runsc (gVisor) still runs the
    trial there, one without it runs it in a throwaway pod (`kubernetes_trials`)."""
    if settings.sandbox_backend != "kubernetes":
        return sandbox_backend(settings, python), ""
    if shutil.which("runsc") is not None:
        return sandbox_backend(settings, python), ""
    return None, "this gateway has no local sandbox runtime for trials (MCPFLEET_SANDBOX_BACKEND=kubernetes, runsc not on PATH)"


def _kubernetes_key(settings: Settings) -> bytes:
    """The fleet's sandbox key, which tokens are derived with (the kubernetes extra installed)."""
    feature = "MCPFLEET_SANDBOX_BACKEND=kubernetes"
    require("kubernetes_asyncio", extra="kubernetes", feature=feature)
    from sandbox.kubernetes_objects import read_key

    if settings.sandbox_key_file is None:
        raise RuntimeError(f"{feature} needs MCPFLEET_SANDBOX_KEY_FILE: the fleet's sandbox key, as the operator has it")
    return read_key(settings.sandbox_key_file)


async def kubernetes_sandboxes(
    settings: Settings, servers: ServerSource, tier_of: TierOf, *, kubeconfig: str | None = None,
    egress: EgressPolicy | None = None, models: ModelGate | None = None, spans: SpanSink | None = None,
) -> KubernetesSandboxes:
    """The kubernetes backend's manager (`MCPFLEET_SANDBOX_BACKEND=kubernetes`): McpSandbox objects
    in `MCPFLEET_K8S_NAMESPACE`, tokens derived with the key in `MCPFLEET_SANDBOX_KEY_FILE`; the API
    as the pod's service account (or the kubeconfig) allows. `egress`, `models`, `spans`: as for the
    local manager."""
    key = _kubernetes_key(settings)  # first: it names the extra when kubernetes_asyncio is missing
    from sandbox.kubernetes import KubernetesSandboxes
    from sandbox.kubernetes_objects import api_client

    return KubernetesSandboxes(
        await api_client(kubeconfig), servers, tier_of, key,
        namespace=settings.k8s_namespace, max_result_bytes=settings.max_result_bytes,
        start_timeout=float(settings.k8s_start_timeout_s), egress=egress, models=models, spans=spans,
    )  # fmt: skip


async def kubernetes_trials(settings: Settings, *, kubeconfig: str | None = None) -> KubernetesTrials:
    """Throwaway McpSandboxes for the registry's trial runs, on a gateway with no local runtime."""
    key = _kubernetes_key(settings)
    from sandbox.kubernetes_objects import api_client
    from sandbox.kubernetes_trials import KubernetesTrials

    return KubernetesTrials(
        await api_client(kubeconfig), key, namespace=settings.k8s_namespace,
        start_timeout=float(settings.k8s_start_timeout_s), max_result_bytes=settings.max_result_bytes,
    )  # fmt: skip


def database_tiers(pool: AsyncConnectionPool) -> TierOf:
    """Each user's tier as the database has it (`mcpfleet tiers assign`), read when their McpSandbox
    is made: the same placement the local manager reads before a start."""

    async def tier_of(user_id: int) -> Tier:
        async with pool.connection() as conn:
            return (await tiers.placement(conn, user_id)).tier

    return tier_of


def lifecycle(settings: Settings) -> Lifecycle:
    idle = settings.idle_hibernate_s
    waits = [s for s in (idle, settings.idle_freeze_s) if s > 0]
    return Lifecycle(
        idle_hibernate_s=idle,
        idle_freeze_s=settings.idle_freeze_s,
        clone_templates=settings.sandbox_clones,
        reclaim_after_s=settings.reclaim_after_s,
        delete_workspace_on_reclaim=settings.workspace_retention == "delete",
        warm_pool_size=settings.warm_pool_size,
        max_running=settings.max_running,
        # Often enough that an idle sandbox hibernates (or freezes) within a quarter of its idle time.
        housekeeping_interval_s=max(1.0, min(30.0, *(s / 4 for s in waits))),
    )


async def audit_transition(conn: psycopg.AsyncConnection, event: dict[str, Any]) -> None:
    """Every sandbox state change goes to the audit log, in the transaction that records it."""
    found = await accounts.principal_of(conn, event["user_id"]) if event["user_id"] is not None else None
    tenant, user = found if found is not None else (None, None)
    await audit.append(
        conn,
        action=f"sandbox.{event['state'].lower()}",
        outcome="failed" if event["state"] == "Failed" else "ok",
        tenant=tenant,
        actor="mcpfleet",
        target=event["sandbox"],
        detail={"user": user, "reason": event["reason"]},
    )


def sandbox_manager(
    settings: Settings,
    pool: AsyncConnectionPool,
    backend: SandboxBackend,
    servers: ServerSource | Sequence[ServerSpec] = BUILTIN_SERVERS,
    *,
    database_url: str | None = None,
    egress: EgressPolicy | None = None,
    models: ModelGate | None = None,
    spans: SpanSink | None = None,
    on_transition: Transition | None = None,
    images: ImageSealer | None = None,
) -> SandboxManager:
    """`servers`: what each user's sandbox runs; the fleet passes its registry, tests a fixed list.
    Every change of state is audited, then told to `on_transition` (the gateway's metrics).
    `images`: encrypts checkpoint images at rest (the fleet passes core.sealed_images')."""
    if settings.sandbox_backend == "kubernetes":
        # Its manager is another class, opened asynchronously (it reads the kubeconfig): the fleet
        # opens it with kubernetes_sandboxes.
        raise RuntimeError("MCPFLEET_SANDBOX_BACKEND=kubernetes has no local manager: use kubernetes_sandboxes")
    workspaces = Workspaces(
        settings.home / "workspaces", uid=SANDBOX_UID, gid=SANDBOX_GID, quotas=settings.workspace_quotas
    )
    return SandboxManager(
        settings.home,
        pool,
        backend,
        servers,
        lifecycle=lifecycle(settings),
        workspaces=workspaces,
        on_transition=audit_transition if on_transition is None else _both(audit_transition, on_transition),
        database_url=database_url,
        max_result_bytes=settings.max_result_bytes,
        egress=egress,
        models=models,
        spans=spans,
        images=images,
    )


def _both(first: Transition, then: Transition) -> Transition:
    async def told(conn: psycopg.AsyncConnection, event: dict[str, Any]) -> None:
        await first(conn, event)
        await then(conn, event)

    return told
