"""The admin console: one server-rendered view per subject under /admin/console, each paged.

    /admin/console/versions?status=pending|approved|rejected   approve (group, tier, tools) or reject; a pending
                                                               version's diff against the approved one; add a
                                                               server from PyPI or npm by name
    /admin/console/drift                                       accept a drifted definition
    /admin/console/users, /admin/console/users/NAME            a user's keys, sandbox and secret names
    /admin/console/keys, /admin/console/sandboxes              hibernate, resume, reclaim; a running runsc
                                                               sandbox's live memory (PSS, sandbox/memory.py)
    /admin/console/audit                                       filter by action, actor, target, outcome;
                                                               verify the chain; export the tenant's log
    /admin/console/usage, /admin/console/tenants, /admin/console/secrets

Who: a live admin-page session (gateway/admin/session.py), so admins and auditors; auditors read,
only admins act. Anything else (no session, a key sent as a bearer, a user demoted since) gets
403 on every view. Actions are plain forms carrying the session's CSRF token, posted back here;
they go through the same code as the registry API and the CLI (registry.store, registry.decisions,
sandbox.requests). Secrets are set and deleted by the page's small script through the secrets API
(/api/secrets, /api/tenant-secrets) with the session and its CSRF token; values are never shown.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
import psycopg
from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import Route

from core import audit
from core.models import usage as model_usage
from core.vault import SecretError
from gateway.admin import console_data as data
from gateway.admin.pages import SECURITY_HEADERS, redirect
from gateway.admin.session import AdminSession, Sessions, check_csrf
from registry import decisions, onboarding, store
from registry.store import RegistryError
from sandbox import requests as sandbox_requests
from sandbox.memory import MemoryGauge

TEMPLATES = Path(__file__).resolve().parent / "templates" / "console"
BASE = "/admin/console"
# Fixed words only: a link must not be able to put text of its choosing on the page.
NOTICES = {
    "approved": "Approved.",
    "added": "Added: the new version is pending while it is validated.",
    "rejected": "Rejected.",
    "accepted": "The drifted definition is accepted.",
    "done": "Done.",
    "nothing": "Nothing to do: the sandbox was already in that state.",
}
# The console waits for the gateway to act on a sandbox request, as the CLI does, within these.
SANDBOX_TIMEOUT_S = 180.0
PICKUP_TIMEOUT_S = 10.0

MODEL_USAGE_DAYS = 7
MODEL_USAGE_ROWS = 25
"""The usage view's model table: `mcpfleet models usage --days N --tenant T` shows the rest."""


def _when(value: datetime | str | None) -> Markup | str:
    """Every time shown one way: a <time> holding the UTC instant, written as UTC text, which the
    console's script (static/console.js) rewrites in the browser's own zone. `value`: a datetime, or
    an ISO 8601 text (OpenBao's secret times); a text that is not one is shown as it is."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return value
    if value is None:
        return ""
    utc = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)  # naive: the database's UTC
    text = utc.strftime("%Y-%m-%d %H:%M:%S UTC")
    return Markup('<time datetime="{}" title="{}">{}</time>').format(utc.strftime("%Y-%m-%dT%H:%M:%SZ"), text, text)


def _size(value: int | None) -> str:
    return f"{value / 2**20:.1f} MiB" if value else ""


def _definition(value: Any) -> str:
    """A field of a tool definition as compact text (absent: a dash)."""
    return "—" if value is None else value if isinstance(value, str) else json.dumps(value, sort_keys=True)


_env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined)
_env.filters["when"] = _when
_env.filters["size"] = _size
_env.filters["definition"] = _definition

Handler = Callable[[Request, AdminSession, psycopg.AsyncConnection], Awaitable[Response]]


def forbidden(message: str) -> HTMLResponse:
    return _html(_env.get_template("refused.html").render(message=message), 403)


def page_html(name: str, status: int = 200, **values: Any) -> HTMLResponse:
    """One of the console's templates rendered (the user page's too, gateway/admin/mine.py)."""
    return _html(_env.get_template(name).render(**values), status)


def _html(text: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(text, status_code=status, headers=SECURITY_HEADERS)


class Console:
    def __init__(self, sessions: Sessions):
        self.sessions = sessions
        self.memory = MemoryGauge(sessions.fleet.settings.home / "runsc")

    def view(self, handler: Handler, *, act: bool = False) -> Callable[[Request], Awaitable[Response]]:
        """A view (GET, admins and auditors) or an action (POST, admins, CSRF-checked)."""

        async def endpoint(request: Request) -> Response:
            session = await self.sessions.current(request)
            if session is None:
                return forbidden("The console is for signed-in admins and auditors.")
            if act:
                await check_csrf(request, session)  # 403 without the session's token
                if session.identity.role != "admin":
                    return forbidden(f"Role {session.identity.role} may read the console but not act (needs admin).")
            async with self.sessions.pool.connection() as conn:
                try:
                    return await handler(request, session, conn)
                except RegistryError as exc:
                    return self.render(request, session, "error.html", status=exc.status, message=exc.message)

        return endpoint

    def render(self, request: Request, session: AdminSession, name: str, *, status: int = 200, **values: Any) -> HTMLResponse:
        kept = {k: v for k, v in request.query_params.items() if k not in ("page", "notice")}

        def page_url(number: int) -> str:
            return f"{request.url.path}?{urlencode({**kept, 'page': str(number)})}"

        text = _env.get_template(name).render(
            session=session, who=session.identity, path=request.url.path, query=request.query_params,
            notice=NOTICES.get(request.query_params.get("notice", ""), ""), page_url=page_url, base=BASE, **values,
        )
        return _html(text, status)

    # -- views -------------------------------------------------------------------------------------

    async def versions(self, request: Request, session: AdminSession, conn: psycopg.AsyncConnection) -> Response:
        status = request.query_params.get("status", "pending")
        if status not in data.VERSION_STATUSES:
            status = "pending"
        page = await data.versions(conn, session.identity.tenant, status, data.page_number(request.query_params.get("page")))  # type: ignore[arg-type]
        return self.render(request, session, "versions.html", current=status, statuses=data.VERSION_STATUSES, page=page,
                           tiers=await data.tiers(conn), groups=await data.groups(conn, session.identity.tenant))

    async def drift(self, request: Request, session: AdminSession, conn: psycopg.AsyncConnection) -> Response:
        page = await data.drift(conn, session.identity.tenant, data.page_number(request.query_params.get("page")))
        return self.render(request, session, "drift.html", page=page)

    async def users(self, request: Request, session: AdminSession, conn: psycopg.AsyncConnection) -> Response:
        page = await data.users(conn, session.identity.tenant, data.page_number(request.query_params.get("page")))
        return self.render(request, session, "users.html", page=page)

    async def user(self, request: Request, session: AdminSession, conn: psycopg.AsyncConnection) -> Response:
        tenant, name = session.identity.tenant, request.path_params["name"]
        found = await data.user(conn, tenant, name)
        if found is None:
            raise RegistryError(404, f"no user {name} in tenant {tenant}")
        keys = await data.keys(conn, tenant, data.page_number(request.query_params.get("page")), user_name=name)
        secrets, secrets_error = await self._secrets(tenant, name)
        return self.render(request, session, "user.html", user=found, page=keys, secrets=secrets,
                           secrets_error=secrets_error, own=name == session.identity.user,
                           sandbox=await data.sandbox_of(conn, found["id"]))

    async def keys(self, request: Request, session: AdminSession, conn: psycopg.AsyncConnection) -> Response:
        live_only = request.query_params.get("show") != "all"
        page = await data.keys(conn, session.identity.tenant, data.page_number(request.query_params.get("page")), live_only=live_only)
        return self.render(request, session, "keys.html", page=page, live_only=live_only)

    async def sandboxes(self, request: Request, session: AdminSession, conn: psycopg.AsyncConnection) -> Response:
        live_only = request.query_params.get("show") != "all"
        page = await data.sandboxes(conn, session.identity.tenant, data.page_number(request.query_params.get("page")), live_only=live_only)
        # Live PSS of the running runsc sandboxes (kept a few seconds by the gauge); other backends: n/a.
        running = [b["id"] for b in page.rows if b["backend"] == "runsc" and b["state"] == "Running"]
        measured = await asyncio.to_thread(self.memory.measure, running) if running else {}
        for b in page.rows:
            b["memory"] = measured.get(b["id"]) if b["backend"] == "runsc" else "n/a"
        return self.render(request, session, "sandboxes.html", page=page, live_only=live_only)

    async def audit(self, request: Request, session: AdminSession, conn: psycopg.AsyncConnection) -> Response:
        filters = {name: request.query_params.get(name, "").strip()[:200] for name in data.AUDIT_FILTERS}
        page = await data.audit(conn, session.identity.tenant, data.page_number(request.query_params.get("page")), filters)
        # The chain is one for the whole fleet: checking it says only "intact" or where it breaks.
        verified = await audit.verify(conn) if request.query_params.get("verify") else None
        return self.render(request, session, "audit.html", page=page, filters=filters,
                           verify=request.query_params.get("verify") is not None, broken=verified)

    async def audit_export(self, request: Request, session: AdminSession, conn: psycopg.AsyncConnection) -> Response:
        """The tenant's whole log as JSON lines, with each entry's hashes, as `mcpfleet audit export` writes it."""
        tenant, pool = session.identity.tenant, self.sessions.pool

        async def lines() -> AsyncIterator[bytes]:
            async with pool.connection() as own:  # the view's connection goes back when this returns
                async for entry in audit.entries(own, tenant=tenant):
                    yield (json.dumps(entry.to_json(), sort_keys=True) + "\n").encode()

        return StreamingResponse(lines(), media_type="application/x-ndjson", headers={
            **SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="audit-{tenant}.jsonl"'})

    async def usage(self, request: Request, session: AdminSession, conn: psycopg.AsyncConnection) -> Response:
        page = await data.tool_call_usage(conn, session.identity.tenant, data.page_number(request.query_params.get("page")))
        # The model router's own rows: the last MODEL_USAGE_DAYS days, at most MODEL_USAGE_ROWS of them (the view stays short).
        models = await model_usage.usage(conn, days=MODEL_USAGE_DAYS, tenant=session.identity.tenant)
        return self.render(request, session, "usage.html", page=page, models=models[:MODEL_USAGE_ROWS],
                           more_models=max(0, len(models) - MODEL_USAGE_ROWS), model_days=MODEL_USAGE_DAYS)

    async def tenants(self, request: Request, session: AdminSession, conn: psycopg.AsyncConnection) -> Response:
        return self.render(request, session, "tenants.html", tenants=await data.tenants(conn, session.identity.tenant))

    async def secrets(self, request: Request, session: AdminSession, conn: psycopg.AsyncConnection) -> Response:
        shared, error = await self._secrets(session.identity.tenant, None)
        return self.render(request, session, "secrets.html", secrets=shared, secrets_error=error)

    async def _secrets(self, tenant: str, user: str | None) -> tuple[list[Any], str]:
        """Names, servers, versions and dates of a user's (None: the tenant's) secrets; never values."""
        try:
            return await self.sessions.fleet.secrets.list_secrets(tenant, user), ""
        except SecretError as exc:  # Vault down included; its message names no value
            return [], str(exc)

    # -- actions -----------------------------------------------------------------------------------

    async def approve(self, request: Request, session: AdminSession, conn: psycopg.AsyncConnection) -> Response:
        form = await request.form()
        tools = [t for t in form.getlist("tools") if isinstance(t, str)]
        every = [t for t in form.getlist("all_tools") if isinstance(t, str)]
        await store.approve(
            conn, session.identity, _field(form, "name"), _field(form, "version"),
            group=_field(form, "group") or None, tier=_field(form, "tier") or None, override=_field(form, "override") == "yes",
            # Every tool ticked is the whole version, later tools included: no narrowing then.
            tools=None if sorted(tools) == sorted(every) else tools,
        )
        return redirect(f"{BASE}/versions?status=approved&notice=approved")

    async def add(self, request: Request, session: AdminSession, conn: psycopg.AsyncConnection) -> Response:
        """A server from PyPI or npm by name, through the same code as `POST /registry/v1/add`."""
        form = await request.form()
        await onboarding.add(self.sessions.fleet.registry, session.identity, _field(form, "source")[:300])
        return redirect(f"{BASE}/versions?status=pending&notice=added")

    async def reject(self, request: Request, session: AdminSession, conn: psycopg.AsyncConnection) -> Response:
        form = await request.form()
        await decisions.decide(conn, session.identity, _field(form, "name"), _field(form, "version"), "rejected",
                               _field(form, "reason") or None)
        return redirect(f"{BASE}/versions?status=rejected&notice=rejected")

    async def accept_drift(self, request: Request, session: AdminSession, conn: psycopg.AsyncConnection) -> Response:
        form = await request.form()
        try:
            drift_id = int(_field(form, "id"))
        except ValueError:
            raise RegistryError(400, "no such drift") from None
        await store.accept_drift(conn, session.identity, drift_id)
        return redirect(f"{BASE}/drift?notice=accepted")

    async def sandbox_action(self, request: Request, session: AdminSession, conn: psycopg.AsyncConnection) -> Response:
        """Hibernate, resume or reclaim a user's sandbox: a request the gateway takes, as from the CLI."""
        action, who = request.path_params["action"], session.identity
        form = await request.form()
        try:
            user_id = int(_field(form, "user_id"))
        except ValueError:
            user_id = 0
        name = await data.user_in_tenant(conn, who.tenant, user_id)
        if action not in sandbox_requests.ACTIONS or name is None:
            raise RegistryError(404, f"no user of tenant {who.tenant} with that id, or no action {action!r}")
        request_id = await sandbox_requests.submit(conn, user_id, action, f"console:{who.principal}")
        try:
            row = await sandbox_requests.wait(conn, request_id, timeout=SANDBOX_TIMEOUT_S, pickup_timeout=PICKUP_TIMEOUT_S)
        except (TimeoutError, sandbox_requests.RequestNotTaken) as exc:
            raise RegistryError(504, f"{action} {who.tenant}/{name}: {exc}") from None
        await audit.append(conn, action=f"console.sandbox.{action}", outcome=row["outcome"], tenant=who.tenant,
                           actor=who.user, target=name, detail={"request": request_id, "message": row["message"]})
        if row["outcome"] not in ("done", "nothing to do"):
            raise RegistryError(409, f"{action} {who.tenant}/{name}: {row['outcome']} ({row['message'] or 'no message'})")
        notice = "done" if row["outcome"] == "done" else "nothing"
        return redirect(f"{BASE}/sandboxes?notice={notice}")

    async def home(self, request: Request) -> Response:
        return redirect(f"{BASE}/versions")


def _field(form: Any, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


def routes(sessions: Sessions) -> list[Route]:
    console = Console(sessions)
    views = {"versions": console.versions, "drift": console.drift, "users": console.users, "keys": console.keys,
             "sandboxes": console.sandboxes, "audit": console.audit, "usage": console.usage,
             "tenants": console.tenants, "secrets": console.secrets}
    return [
        Route(BASE, console.view(lambda request, session, conn: console.home(request)), methods=["GET"]),
        *(Route(f"{BASE}/{name}", console.view(handler), methods=["GET"]) for name, handler in views.items()),
        Route(f"{BASE}/users/{{name}}", console.view(console.user), methods=["GET"]),
        Route(f"{BASE}/audit/export", console.view(console.audit_export), methods=["GET"]),
        Route(f"{BASE}/versions/approve", console.view(console.approve, act=True), methods=["POST"]),
        Route(f"{BASE}/versions/add", console.view(console.add, act=True), methods=["POST"]),
        Route(f"{BASE}/versions/reject", console.view(console.reject, act=True), methods=["POST"]),
        Route(f"{BASE}/drift/accept", console.view(console.accept_drift, act=True), methods=["POST"]),
        Route(f"{BASE}/sandboxes/{{action}}", console.view(console.sandbox_action, act=True), methods=["POST"]),
    ]
