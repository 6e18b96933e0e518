"""The gateway as an ASGI app: `/mcp` behind bearer auth, health probes, lifespan."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from mcp.server.auth.middleware.auth_context import AuthContextMiddleware
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from core.db import open_pool
from core.settings import Settings
from gateway import admin
from gateway import registry_api
from gateway.auth import ApiKeyVerifier, BearerVerifier
from gateway.call_audit import AuditedBearerBackend, CallAudit, missing_scope_hook, note_oauth_refusal
from gateway.http_headers import TrimHeaderWhitespace
from gateway.limits import LimitsMiddleware, buckets_for
from gateway.oauth.resource import RequireBearer, metadata_routes
from gateway.oauth.tokens import OAuthVerifier
from gateway.registry_setup import open_registry
from gateway.routing import Router
from gateway.sessions import SessionBook

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def transport_security(settings: Settings) -> TransportSecuritySettings:
    """DNS-rebinding protection: only our own Host names, only same-host Origins."""
    hosts = {f"{settings.host}:{settings.port}", f"{settings.host}:*"}
    origins = {f"http://{settings.host}:{settings.port}", *settings.allowed_origins}
    if settings.host in LOOPBACK_HOSTS or settings.host == "0.0.0.0":
        hosts |= {"127.0.0.1:*", "localhost:*", "[::1]:*"}
        origins |= {"http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"}
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True, allowed_hosts=sorted(hosts), allowed_origins=sorted(origins)
    )


SandboxFactory = Callable[[Settings, AsyncConnectionPool, str], Any]


def create_app(settings: Settings, database_url: str, sandbox_factory: SandboxFactory) -> Starlette:
    """`sandbox_factory(settings, pool, database_url)` returns the sandbox manager the gateway routes into."""
    state: dict[str, Any] = {}
    calls = CallAudit()
    state["calls"] = calls  # for refusals by role outside /mcp (registry API)
    router = Router(
        _LateBoundSandboxes(state),
        bare_servers=settings.bare_servers,
        registry=lambda: state.get("registry"),
        search=lambda: state.get("search"),
        calls=calls,
    )
    mcp_server = router.server()
    sessions = StreamableHTTPSessionManager(
        app=mcp_server,
        security_settings=transport_security(settings),
        max_request_body_size=settings.max_body_bytes,
        session_idle_timeout=settings.session_idle_s,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool = await open_pool(database_url)
        verifier.pool = pool
        verifier.start_listening(database_url)
        oauth.pool = pool
        oauth.start_listening(database_url)
        calls.start(pool)
        manager = sandbox_factory(settings, pool, database_url)
        registry, search = await open_registry(settings, pool, database_url, manager, router)
        await manager.start()
        state.update(pool=pool, manager=manager, registry=registry, search=search)
        try:
            async with sessions.run():
                yield
        finally:
            await manager.close()
            await registry.close()
            await calls.close()
            await verifier.stop_listening()
            await oauth.close()
            await buckets.aclose()
            await pool.close()

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> JSONResponse:
        pool: AsyncConnectionPool | None = state.get("pool")
        checks: dict[str, str] = {}
        try:
            assert pool is not None
            async with pool.connection(timeout=2) as conn:
                await conn.execute("SELECT 1")
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"unavailable: {type(exc).__name__}"
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503)

    verifier = ApiKeyVerifier()
    oauth = OAuthVerifier(settings)
    oauth.on_refused = note_oauth_refusal
    admin_sessions = admin.sessions_for(settings, lambda: state["pool"])
    buckets = buckets_for(settings)
    mcp_endpoint = RequireBearer(
        LimitsMiddleware(
            StreamableHTTPASGIApp(sessions), settings, buckets, calls,
            SessionBook(sessions, settings.max_sessions_per_user) if settings.max_sessions_per_user > 0 else None,
        ),
        public_url=settings.public_url, required_scopes=settings.required_scopes,
        on_missing_scope=missing_scope_hook(calls),
    )
    app = Starlette(
        routes=[
            Route("/mcp", endpoint=mcp_endpoint, methods=["GET", "POST", "DELETE"]),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            *metadata_routes(settings.public_url, settings.required_scopes, lambda: state["pool"]),
            *registry_api.routes(lambda: state["registry"], lambda: state["pool"], lambda: state["search"]),
            *admin.routes(admin_sessions, settings, oauth),
        ],
        middleware=[
            Middleware(TrimHeaderWhitespace),
            Middleware(AuthenticationMiddleware, backend=AuditedBearerBackend(BearerVerifier(verifier, oauth), calls)),
            Middleware(AuthContextMiddleware),
            Middleware(admin.SessionContext, sessions=admin_sessions),
        ],
        lifespan=lifespan,
    )
    app.state.fleet = state
    return app


class _LateBoundSandboxes:
    """The router is built before the lifespan opens the sandbox manager."""

    def __init__(self, state: dict[str, Any]):
        self._state = state

    async def ensure(self, user_id: int, tenant: str, user: str) -> Any:
        return await self._state["manager"].ensure(user_id, tenant, user)
