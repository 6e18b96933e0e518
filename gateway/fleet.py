"""The fleet's services, opened together with `async with Fleet(...)` and closed in reverse.

    pool      the database (core.db)
    calls     the audit writer: tool calls and auth decisions, journaled on local disk and written to
              the database off the request's path
    registry  what each user may run (registry.service), the sandbox manager's server source
    search    tool search over embeddings (registry.search)
    secrets   users' and tenants' secrets in Vault (core.vault): the embedded OpenBao unless VAULT_ADDR is set
    manager   the users' sandboxes, whose servers get their secrets (gateway.secret_servers): on runsc
              and docker the local manager (sandbox.manager), on kubernetes McpSandbox objects that
              the operator runs (sandbox.kubernetes)
    telemetry traces over OTLP when configured, and the metrics at /metrics (gateway.telemetry)
    models    the model router (core.models): a hosted API, Ollama, or the local llama-server, which
              gets ready in the background (its state in `mcpfleet models list`), never holding up the fleet

The app is built
before it is opened (its routes and middleware hold the fleet from the start) and the lifespan
opens it: nothing is wired afterwards. A service asked for while the fleet is closed is an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Protocol

from psycopg_pool import AsyncConnectionPool

from core.db import open_pool
from core.models.factory import router_from_env
from core.models.router import Router
from core.sealed_images import SealedImages
from core.settings import Settings
from core.vault import SecretStore, open_secrets
from gateway.call_audit import CallAudit
from gateway.egress import SandboxEgress, pinned_resolver
from gateway.limits import buckets_for
from gateway.model_relay import SandboxModels
from gateway.secret_servers import SecretServers
from gateway.services import RunningSandbox
from gateway.telemetry import Telemetry
from registry.embeddings import embedder_from_env
from registry.review import ModelReview
from registry.scan import scan_tools
from registry.search import Index, ToolSearch
from registry.service import ChangeListener, Registry
from sandbox.factory import (
    database_tiers,
    kubernetes_sandboxes,
    kubernetes_trials,
    sandbox_manager,
    sandbox_python,
    trial_backend,
)
from sandbox.housekeeping import RequestDesk
from sandbox.lease import LeasedManager, NodeLease, node_key

log = logging.getLogger(__name__)


class Sandboxes(Protocol):
    """What the fleet and the router use of the users' sandboxes, as both managers offer it:
    `sandbox.manager.SandboxManager` (runsc, docker) and `sandbox.kubernetes.KubernetesSandboxes`.
    The CLI's hibernate, resume and reclaim reach either through the database (`sandbox.requests`);
    what else each does stays its own: the local one's rows and warm pool (`mcpfleet sandboxes list`),
    the McpSandbox objects, which the operator hibernates when idle and kubectl lists."""

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def ensure(self, user_id: int, tenant: str, user: str) -> RunningSandbox: ...
    async def hibernate(self, user_id: int, reason: str = ...) -> bool: ...
    async def reclaim(self, user_id: int, reason: str = ...) -> bool: ...


@dataclass(frozen=True)
class _Services:
    pool: AsyncConnectionPool
    registry: Registry
    search: ToolSearch
    secrets: SecretStore
    manager: Sandboxes
    models: Router


class FleetClosed(RuntimeError):
    """A service was asked for outside `async with fleet`: a fault of the caller's code."""


class Fleet:
    def __init__(self, settings: Settings, database_url: str):
        """`database_url`: migrated already (`mcpfleet up` does it before serving)."""
        self.settings = settings
        self.database_url = database_url
        # Made now, written from once open: the middleware queues refusals into it from the start.
        self.calls = CallAudit(journal_dir=settings.home / "audit-journal")
        self.telemetry = Telemetry()
        self.on_tools_changed: list[ChangeListener] = []
        """Told the ids of users whose tools changed (approvals, pins): the router tells their clients."""
        self._services: _Services | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    async def __aenter__(self) -> Fleet:
        async with contextlib.AsyncExitStack() as stack:
            self.telemetry.open()  # first, so the spans of everything below are exported; closed last
            stack.push_async_callback(self.telemetry.close)
            pool = await open_pool(self.database_url)
            stack.push_async_callback(pool.close)
            self.calls.start(pool)
            stack.push_async_callback(self.calls.close)
            # Opened before the models (a hosted API's key is the fleet's own secret) and the manager (its
            # sandboxes' servers get their secrets from it), closed after them.
            opening = open_secrets(self.settings.home)
            secrets = await asyncio.to_thread(opening.__enter__)
            stack.push_async_callback(asyncio.to_thread, opening.__exit__, None, None, None)
            model_key = await secrets.fleet_value("MCPFLEET_MODEL_KEY") if os.environ.get("MCPFLEET_MODEL_URL") else None
            # Started early: the local model server takes seconds to be ready (or waits for its build),
            # and gets ready in the background while the rest opens and the fleet serves.
            models = router_from_env(pool, self.settings.home / "models", model_key=model_key)
            await models.start()
            stack.push_async_callback(models.close)
            python = sandbox_python()
            backend, no_trial_reason = trial_backend(self.settings, python)
            pods = None
            if backend is None and self.settings.sandbox_backend == "kubernetes":
                # Trials in throwaway pods the operator runs, as it runs the users'.
                pods = await kubernetes_trials(self.settings)
                stack.push_async_callback(pods.close)
            index = Index(pool, embedder_from_env(models=models))
            # Opened before the manager, so its first sandboxes already run what the registry approves.
            registry = Registry(
                self.settings.home, pool, backend, python, scan=scan_tools, indexer=index.version,
                artifacts_s3_url=self.settings.artifacts_s3_url, no_trial_reason=no_trial_reason, pods=pods,
                conformance_everywhere=self.settings.conformance_everywhere, outage_s=self.settings.db_outage_s,
                review=ModelReview(models) if self.settings.model_review else None,
            )
            registry.on_change.append(self._tools_changed)
            await registry.start(self.database_url)
            stack.push_async_callback(registry.close)
            servers = SecretServers(registry, secrets, pool)
            manager: Sandboxes
            # Whichever backend: a server's declared hosts are reached over its sandbox's channel.
            # Its rate limit in Redis when REDIS_URL is set, as the other limits: shared by the gateways.
            egress_buckets = buckets_for(self.settings)
            stack.push_async_callback(egress_buckets.aclose)
            egress = SandboxEgress(self.calls, per_min=self.settings.egress_per_min, buckets=egress_buckets,
                                   resolver=pinned_resolver(self.settings.egress_hosts))
            # ... and servers declaring inference ask the router over it, each as its user and itself.
            sandbox_models = SandboxModels(models)
            if self.settings.sandbox_backend == "kubernetes":
                kube = await kubernetes_sandboxes(self.settings, servers, database_tiers(pool), egress=egress,
                                                  models=sandbox_models)
                # Before the clients are told to list again: their sandboxes run the new set by then.
                registry.on_change.insert(0, kube.servers_changed)
                manager = kube
            else:
                assert backend is not None  # the local backends run their own trials
                manager = sandbox_manager(
                    self.settings, pool, backend, servers, database_url=self.database_url,
                    egress=egress, models=sandbox_models, spans=self.telemetry.server_spans,
                    on_transition=self.telemetry.metrics.sandbox_transition,
                    images=SealedImages(secrets),
                )
            if self.settings.sandbox_backend != "kubernetes":
                # One manager per backend and database, the others on standby (sandbox/lease.py).
                lease = NodeLease(self.database_url, node_key(self.settings.sandbox_backend),
                                  address=self.settings.lease_address or f"{self.settings.host}:{self.settings.port}")
                manager = LeasedManager(manager, lease)
            await manager.start()
            stack.push_async_callback(manager.close)
            if self.settings.sandbox_backend == "kubernetes":
                # `mcpfleet sandboxes hibernate|resume|reclaim` (the local manager's housekeeper takes
                # them; here the operator does the rest of housekeeping, so a desk takes them alone).
                desk = RequestDesk(pool, manager, self.database_url)
                desk.start()
                stack.push_async_callback(desk.close)
            self._services = _Services(pool, registry, ToolSearch(index, registry), secrets, manager, models)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        stack, self._stack, self._services = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def _tools_changed(self, user_ids: set[int]) -> None:
        for listener in self.on_tools_changed:
            await listener(user_ids)

    def _open(self) -> _Services:
        if self._services is None:
            raise FleetClosed("the fleet is not open")
        return self._services

    @property
    def pool(self) -> AsyncConnectionPool:
        return self._open().pool

    @property
    def registry(self) -> Registry:
        return self._open().registry

    @property
    def search(self) -> ToolSearch:
        return self._open().search

    @property
    def secrets(self) -> SecretStore:
        return self._open().secrets

    @property
    def manager(self) -> Sandboxes:
        return self._open().manager

    @property
    def models(self) -> Router:
        return self._open().models
