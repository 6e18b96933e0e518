"""The gateway as an ASGI app: `/mcp` behind bearer auth, health probes, lifespan."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import psycopg
from mcp.server.auth.middleware.auth_context import AuthContextMiddleware
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from core.mcp_tasks import TaskStore
from core.outage import DatabaseUnavailable
from core.settings import Settings
from gateway import admin, artifact_api, metrics, registry_api, secrets_api
from gateway.admin.secret import session_secret
from gateway.auth import ApiKeyVerifier, BearerVerifier
from gateway.breakers import Breakers
from gateway.call_audit import AuditedBearerBackend, database_down_response, missing_scope_hook, note_oauth_refusal
from gateway.fast_call import FastToolCall
from gateway.fleet import Fleet
from gateway.forward import Forwarder, ForwardToOwner, ReplicaClient
from gateway.http_headers import TrimHeaderWhitespace
from gateway.input_required import HeldCallRoutes, InputExchanges
from gateway.input_required import boundary as request_state_boundary
from gateway.limits import LimitsMiddleware, buckets_for
from gateway.oauth.resource import RequireBearer, metadata_routes
from gateway.oauth.tokens import OAuthVerifier
from gateway.refusals import JsonRpcRefusals
from gateway.routing import Router
from gateway.sampling import Sampling
from gateway.session_routes import CONNECT_S, ReplicaHops, SessionRouting, SessionSeal, fleet_key, reachable
from gateway.sessions import SessionBook
from gateway.tasks import TaskCalls, runner_name
from gateway.tool_sets import ToolSets
from gateway.tracing import HttpTracing, TracedAuthBackend
from gateway.wake import wake_sandboxes

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def transport_security(settings: Settings) -> TransportSecuritySettings:
    """DNS-rebinding protection: only our own Host names, only same-host Origins."""
    hosts = {f"{settings.host}:{settings.port}", f"{settings.host}:*"}
    origins = {f"http://{settings.host}:{settings.port}", *settings.allowed_origins}
    if settings.host in LOOPBACK_HOSTS or settings.host == "0.0.0.0":
        hosts |= {"127.0.0.1:*", "localhost:*", "[::1]:*"}
        origins |= {"http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"}
    # Names a client reaches the gateway by through a proxy: the public URL's, and those configured
    # (a Kubernetes Service's DNS names). A Host header carries a port only when it is not the default.
    named = set(settings.allowed_hosts)
    if settings.configured_public_url:
        public = urlsplit(settings.configured_public_url)
        if public.hostname:
            named.add(public.hostname)
            origins.add(f"{public.scheme}://{public.netloc}")
    for name in named:
        hosts |= {name, f"{name}:*"}
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True, allowed_hosts=sorted(hosts), allowed_origins=sorted(origins)
    )


def create_app(fleet: Fleet) -> Starlette:
    """The gateway over `fleet`, which the app's lifespan opens and closes."""
    settings = fleet.settings
    # Several replicas on Kubernetes: a held call's requestState names its replica (a retry may reach another).
    route = reachable(settings.replica_address) if settings.replica_address else None
    exchanges = InputExchanges(settings.input_wait_s, settings.input_held_per_user, route)
    tool_sets = ToolSets(fleet, settings.db_outage_s)
    tasks = TaskCalls(
        int(settings.task_ttl_s * 1000), settings.task_heartbeat_s, settings.task_orphan_s / 2, exchanges,
        settings.tasks_per_user,
    )
    router = Router(
        fleet, bare_servers=settings.bare_servers,
        breakers=Breakers(settings.breaker_failures, settings.breaker_cooldown_s), tool_sets=tool_sets,
        exchanges=exchanges, sampling=Sampling(lambda: fleet.models, settings.sampling_by_fleet), tasks=tasks,
    )
    fleet.on_tools_changed.append(router.tools_changed)
    mcp_server = router.server()
    sessions = StreamableHTTPSessionManager(
        app=mcp_server,
        security_settings=transport_security(settings),
        max_request_body_size=settings.max_body_bytes,
        session_idle_timeout=settings.session_idle_s,
    )
    state_secret = session_secret(settings.home)
    fast_calls = FastToolCall(StreamableHTTPASGIApp(sessions), sessions, router, fleet.telemetry.metrics, settings.fast_path)
    # Our span per request (the HTTP span as its parent, metrics beside it) in place of the SDK's own; a
    # fast call's Mcp-Param-* check inside it. requestState (2026-07-28 input_required) is sealed on the
    # way out and verified on the way in.
    mcp_server.middleware = [
        fleet.telemetry.mcp_middleware(), wake_sandboxes(fleet), fast_calls.param_headers, router.session_sets,
        tasks.name_header,
        request_state_boundary(state_secret, settings.input_wait_s),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with fleet:
            verifier.start_listening(fleet.database_url)
            oauth.start_listening(fleet.database_url)
            tasks.start(TaskStore(fleet.pool, runner_name(), settings.task_orphan_s, route))
            try:
                async with sessions.run():
                    yield
            finally:
                await tasks.close()  # its running calls are failed with the reason, not left to look orphaned
                exchanges.close()  # servers still waiting for a client's input are told the gateway stops
                await verifier.stop_listening()
                await forwarder.aclose()
                await oauth.close()
                await buckets.aclose()

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    down_since: list[float] = []  # when the probe first found the database away (probes come every few seconds)

    async def readyz(request: Request) -> JSONResponse:
        """Ready while the database answers, and through a brief outage of it (`db_outage_s` since a
        probe first found it away): running sandboxes' calls go on meanwhile (core/outage.py), and a
        probe that failed at once would take every replica out of service together."""
        checks: dict[str, str] = {}
        try:
            async with fleet.pool.connection(timeout=2) as conn:
                await conn.execute("SELECT 1")
            checks["database"] = "ok"
            down_since.clear()
        except Exception as exc:
            if not down_since:
                down_since.append(time.monotonic())
            away = time.monotonic() - down_since[0]
            within = away < settings.db_outage_s
            checks["database"] = f"unavailable: {type(exc).__name__}" + (f" for {away:.0f}s; serving from cache" if within else "")
            if within:
                return JSONResponse({"status": "degraded", "checks": checks}, status_code=200)
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503)

    calls = fleet.calls
    verifier = ApiKeyVerifier(fleet)
    fleet.telemetry.metrics.outage_caches += [verifier.cache, tool_sets.cache]
    oauth = OAuthVerifier(settings, fleet, on_refused=note_oauth_refusal)
    admin_sessions = admin.sessions_for(fleet)
    buckets = buckets_for(settings)
    # Refusals in plain text (the transport's) become JSON-RPC errors that clients show.
    refusing = JsonRpcRefusals(
        RequireBearer(
            LimitsMiddleware(
                fast_calls, settings, buckets, calls,
                SessionBook(sessions, settings.max_sessions_per_user) if settings.max_sessions_per_user > 0 else None,
            ),
            public_url=settings.public_url, required_scopes=settings.required_scopes,
            on_missing_scope=missing_scope_hook(calls),
        ),
        max_body_bytes=settings.max_body_bytes,
    )
    forwarder = Forwarder(settings.max_body_bytes, connect_timeout=CONNECT_S)
    # Several replicas on Kubernetes: a session's requests go to the replica that opened it.
    seal = SessionSeal(fleet_key(settings.sandbox_key_file), settings.replica_address) if settings.replica_address else None
    held_calls = HeldCallRoutes(state_secret, settings.input_wait_s)

    async def holder(message: dict[str, Any], user_id: int) -> str | None:
        """The replica holding what a 2026-07-28 request answers: a call waiting on its requestState, or a task."""
        return held_calls.route_of(message, user_id) or await tasks.route_of(message, user_id)

    mcp_endpoint = ForwardToOwner(refusing if seal is None else SessionRouting(refusing, seal, forwarder, holder),
                                  owner=lambda: getattr(fleet.manager, "owner_address", None), forwarder=forwarder,
                                  secret=settings.replica_secret, behind_proxy=settings.trusted_proxies is not None)
    app = Starlette(
        routes=[
            Route("/mcp", endpoint=mcp_endpoint, methods=["GET", "POST", "DELETE"]),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            *metadata_routes(settings.public_url, settings.required_scopes, fleet),
            *registry_api.routes(fleet),
            *metrics.routes(fleet),
            *secrets_api.routes(fleet),
            *artifact_api.routes(fleet),
            *admin.routes(admin_sessions, settings, oauth),
        ],
        middleware=[
            *([Middleware(ReplicaHops, seal=seal)] if seal is not None else []),
            # A request passed on by another replica of this box is the client's, for the audit and the limits.
            Middleware(ReplicaClient, secret=settings.replica_secret),
            Middleware(HttpTracing, metrics=fleet.telemetry.metrics),
            Middleware(TrimHeaderWhitespace),
            Middleware(
                AuthenticationMiddleware,
                backend=TracedAuthBackend(AuditedBearerBackend(BearerVerifier(verifier, oauth), calls)),
                on_error=database_down_response,
            ),
            Middleware(AuthContextMiddleware),
            Middleware(admin.SessionContext, sessions=admin_sessions),
        ],
        lifespan=lifespan,
        # What truly needs the database (approvals, new users, the registry) says so while it is away.
        exception_handlers={psycopg.OperationalError: database_unreachable, psycopg.InterfaceError: database_unreachable,
                            DatabaseUnavailable: database_unreachable},
    )
    return app


async def database_unreachable(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, DatabaseUnavailable):
        exc = DatabaseUnavailable(f"{request.method} {request.url.path}")
    return JSONResponse({"error": "database_unavailable", "message": str(exc)}, status_code=503, headers={"Retry-After": "2"})
