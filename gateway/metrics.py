"""The gateway's Prometheus metrics, served at `/metrics`.

| metric                                         | type      | labels                                    |
|------------------------------------------------|-----------|-------------------------------------------|
| `mcp_server_operation_duration_seconds`        | histogram | mcp_method_name, gen_ai_tool_name, outcome, error_type |
| `mcpfleet_tool_calls_by_path_total`            | counter   | path (fast, general), revision (2025-11-25, 2026-07-28) |
| `mcpfleet_refusals_total`                      | counter   | reason (rate_limit, auth, scope, policy, breaker) |
| `mcpfleet_sandbox_events_total`                | counter   | event (cold_start, claim, hibernate, resume, failed, reclaim) |
| `mcpfleet_sandbox_event_duration_seconds`      | histogram | event (cold_start, hibernate, resume)      |
| `mcpfleet_sandboxes`                           | gauge     | state (every row's state, all replicas)    |
| `mcpfleet_sandboxes_running_here`              | gauge     | kind (user, warm)                          |
| `mcpfleet_warm_pool_size`                      | gauge     |                                           |
| `mcpfleet_audit_queue_depth`                   | gauge     |                                           |
| `mcpfleet_audit_entries_total`                 | counter   | fate (written, dropped, retried: rounds the database could not be reached) |
| `mcpfleet_auth_served_in_outage_total`         | counter   |                                           |
| `mcpfleet_db_pool_connections`                 | gauge     | use (size, idle, waiting, max)             |

The histogram is the OpenTelemetry `mcp.server.operation.duration` in Prometheus' spelling;
`outcome` is ok, tool_error (the tool said isError) or error (a JSON-RPC error, `error_type` its
code). Gauges are read when the page is asked for, so a scrape costs one small query.

Tool names come from clients: a name the caller may not use is never a label (it counts as
`_other`), and so no client can make the page grow without bound.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from typing import TYPE_CHECKING, Any

import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from core.outage import OutageCache
from gateway.auth import identity_of

if TYPE_CHECKING:
    from gateway.fleet import Fleet

log = logging.getLogger(__name__)

METRICS_ROLES = ("admin", "auditor")
"""Who may read the page when the gateway listens beyond loopback."""
OTHER_TOOL = "_other"
# The OTel semantic conventions' recommended buckets for mcp.server.operation.duration.
DURATION_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
SANDBOX_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160)
MAX_TOOL_LABELS = 2000


class Metrics:
    """One registry per fleet (not the process-wide default), so several fleets in one process stay apart."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.operations = Histogram(
            "mcp_server_operation_duration_seconds", "MCP requests served, by method, tool and outcome",
            ["mcp_method_name", "gen_ai_tool_name", "outcome", "error_type"], buckets=DURATION_BUCKETS, registry=r,
        )
        self.call_paths = Counter(
            "mcpfleet_tool_calls_by_path", "tools/call requests by the path that served them (gateway/fast_call.py)",
            ["path", "revision"], registry=r,
        )
        self.refusals = Counter("mcpfleet_refusals", "Requests refused before any tool ran, by reason", ["reason"], registry=r)
        self.sandbox_events = Counter("mcpfleet_sandbox_events", "Sandbox lifecycle events on this replica", ["event"], registry=r)
        self.sandbox_durations = Histogram(
            "mcpfleet_sandbox_event_duration_seconds", "How long cold starts, hibernations and resumes took",
            ["event"], buckets=SANDBOX_BUCKETS, registry=r,
        )
        self.sandboxes = Gauge("mcpfleet_sandboxes", "Sandboxes by state (the database's rows: every replica's)", ["state"], registry=r)
        self.running_here = Gauge("mcpfleet_sandboxes_running_here", "Sandboxes running on this replica", ["kind"], registry=r)
        self.warm_pool = Gauge("mcpfleet_warm_pool_size", "Warm-pool sandboxes ready to be claimed on this replica", registry=r)
        self.warm_pool_target = Gauge("mcpfleet_warm_pool_target", "The warm pool's configured size", registry=r)
        self.audit_queue = Gauge("mcpfleet_audit_queue_depth", "Audit entries queued, not yet written", registry=r)
        self.audit_entries = Counter("mcpfleet_audit_entries", "Audit entries from the request path, by fate", ["fate"], registry=r)
        self.auth_from_cache = Counter("mcpfleet_auth_served_in_outage", "Keys and tool sets served from cache while the database could not be reached", registry=r)
        self._seen: dict[str, float] = {}
        self.outage_caches: list[OutageCache[Any, Any]] = []
        """What requests read through the database's outages (the app adds its caches)."""
        self.db_pool = Gauge("mcpfleet_db_pool_connections", "The database pool's connections", ["use"], registry=r)
        self._tools: set[str] = set()
        # When each sandbox entered the state whose end we time: {sandbox id: (event, monotonic start)}.
        self._since: dict[str, tuple[str, float]] = {}

    # -- what the gateway counts ------------------------------------------------------------

    def operation(self, method: str, tool: str | None, outcome: str, error_type: str, seconds: float) -> None:
        self.operations.labels(method, self._tool_label(tool, outcome, error_type), outcome, error_type).observe(seconds)

    def _tool_label(self, tool: str | None, outcome: str, error_type: str) -> str:
        if tool is None:
            return ""
        # -32602 is how an unknown or held-back tool is answered: its name is the client's, not ours.
        if error_type == "-32602" or (tool not in self._tools and len(self._tools) >= MAX_TOOL_LABELS):
            return OTHER_TOOL
        self._tools.add(tool)
        return tool

    def call_path(self, path: str, revision: str) -> None:
        self.call_paths.labels(path, revision).inc()

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason).inc()

    async def sandbox_transition(self, conn: psycopg.AsyncConnection, event: dict[str, Any]) -> None:
        """The manager's `on_transition` hook (`sandbox.state`): counts and times lifecycle steps."""
        sandbox, state, now = event["sandbox"], event["state"], time.monotonic()
        if state == "Pending":
            self._since[sandbox] = ("cold_start", now)
        elif state == "Hibernating":
            self._since[sandbox] = ("hibernate", now)
        elif state == "Resuming":
            self._since[sandbox] = ("resume", now)
        elif state == "Running" and event.get("reason") == "claimed from the warm pool":
            self.sandbox_events.labels("claim").inc()
        elif state in ("Running", "Hibernated"):
            started = self._since.pop(sandbox, None)
            if started is not None:
                self.sandbox_events.labels(started[0]).inc()
                self.sandbox_durations.labels(started[0]).observe(now - started[1])
        elif state in ("Failed", "Reclaimed"):
            self._since.pop(sandbox, None)
            self.sandbox_events.labels("failed" if state == "Failed" else "reclaim").inc()

    # -- read when the page is asked for ---------------------------------------------------------

    def _count(self, counter: Counter, name: str, total: float) -> None:
        """A counter that follows a running total kept elsewhere (read when the page is asked for)."""
        counter.inc(max(0.0, total - self._seen.get(name, 0.0)))
        self._seen[name] = total

    async def refresh(self, fleet: Fleet) -> None:
        manager, pool = fleet.manager, fleet.pool
        warm = len(manager.running.warm)
        self.warm_pool.set(warm)
        self.warm_pool_target.set(manager.lifecycle.warm_pool_size)
        self.running_here.labels("warm").set(warm)
        self.running_here.labels("user").set(len(manager.running) - warm)
        self.audit_queue.set(fleet.calls.queued)
        calls = fleet.calls
        self._count(self.audit_entries.labels("written"), "written", calls.written)
        self._count(self.audit_entries.labels("dropped"), "dropped", calls.dropped)
        self._count(self.audit_entries.labels("retried"), "retried", calls.retries)
        self._count(self.auth_from_cache, "outage", sum(c.served_in_outage for c in self.outage_caches))
        stats = pool.get_stats()
        self.db_pool.labels("size").set(stats.get("pool_size", 0))
        self.db_pool.labels("idle").set(stats.get("pool_available", 0))
        self.db_pool.labels("waiting").set(stats.get("requests_waiting", 0))
        self.db_pool.labels("max").set(pool.max_size)
        try:
            async with asyncio.timeout(2), pool.connection() as conn:
                rows = await (await conn.execute("SELECT state, count(*) FROM sandboxes GROUP BY state")).fetchall()
        except (psycopg.Error, TimeoutError) as exc:  # the page still answers, without the rows' counts
            log.warning("metrics: could not count sandboxes by state: %s", type(exc).__name__)
            return
        counts = dict(rows)
        for state in ("Pending", "Starting", "Running", "Hibernating", "Hibernated", "Resuming", "Reclaimed", "Failed"):
            self.sandboxes.labels(state).set(counts.get(state, 0))

    def page(self) -> bytes:
        return generate_latest(self.registry)


def loopback_only(host: str) -> bool:
    """Whether a gateway listening on `host` is reachable from this machine alone."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name: it may resolve to anything
        return False


def may_read(request: Request, listens_on: str) -> bool:
    """Open on loopback; beyond it, only with the bearer token of an admin or an auditor (Prometheus
    scrapes with an auditor's API key: `bearer_token_file`)."""
    if loopback_only(listens_on):
        return True
    identity = identity_of(request.scope)
    return identity is not None and identity.role in METRICS_ROLES


def routes(fleet: Fleet) -> list[Route]:
    async def metrics(request: Request) -> Response:
        settings = fleet.settings
        if not may_read(request, settings.host):
            return PlainTextResponse(
                "the metrics need the bearer token of an admin or an auditor: this gateway listens beyond loopback\n",
                status_code=401, headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
            )
        telemetry = fleet.telemetry
        await telemetry.metrics.refresh(fleet)
        return Response(telemetry.metrics.page(), media_type=CONTENT_TYPE_LATEST)

    return [Route("/metrics", metrics)]
