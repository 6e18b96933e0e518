"""A page of the user's own, under /me: any user sets and deletes their own secrets there.

    GET  /me                   the secrets the servers approved for you declare: set by you, tenant-wide, or missing
    GET  /me/login, POST       sign in with your own API key (any role); POST /me/logout
    POST /me/secrets/set       server, name, value (write-only: never shown back, never in the page)
    POST /me/secrets/delete    server, name

Sessions are the admin page's (gateway/admin/session.py) with every role allowed, their own cookie
and their own signing salt, so a session of this page never opens the admin page or the console,
and the key's standing (revoked, expired) and the user's existence are re-read on every request.
Forms carry the session's CSRF token; the cookie is SameSite=Strict. Whose secrets are touched is
the session's user and nothing in the form: a forged form naming another user changes only the
sender's own. A value is set only for a name a server approved for the user declares; changes go
through the same calls as the secrets API (core.vault.set_secret / remove_secret), audited by name.
Sign-in here is by API key only: the OIDC sign-in (gateway/admin/oidc.py) lands on the admin page.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.accounts import ROLES
from core.vault import SecretError, SecretInfo, remove_secret, set_secret
from gateway.admin.console import page_html
from gateway.admin.pages import Pages, Place, redirect
from gateway.admin.session import AdminSession, Sessions, check_csrf
from gateway.secrets_api import MAX_BODY
from registry.secret_names import declared_for_user

HOME = "/me"
PLACE = Place(home=HOME, login="/me/login", template="me_login.html", audit="me",
              refused="This user may not sign in.", login_cookie="__Host-mcpfleet-me-login")
COOKIE = "__Host-mcpfleet-me"
NOTICES = {"set": "Saved. The value is kept in Vault and is not shown again.", "removed": "Deleted."}


def sessions_for(admin: Sessions) -> Sessions:
    """The user page's sessions: the admin page's store, every role, a cookie and salt of their own."""
    return Sessions(admin.secret, admin.fleet, lifetime_s=admin.lifetime_s, roles=ROLES, cookie=COOKIE,
                    salt="mcpfleet.me-session")


@dataclass(frozen=True)
class Row:
    server: str
    name: str
    state: str
    """"set by you", "set tenant-wide" or "missing"."""
    version: int | None = None
    updated_at: str | None = None


def rows_of(declares: dict[str, tuple[str, ...]], own: list[SecretInfo], shared: list[SecretInfo]) -> list[Row]:
    mine = {(s.server, s.name): s for s in own}
    tenant = {(s.server, s.name) for s in shared}
    rows = []
    for server in sorted(declares):
        for name in sorted(declares[server]):
            if (server, name) in mine:
                s = mine[server, name]
                rows.append(Row(server, name, "set by you", s.version, s.updated_at))
            else:
                rows.append(Row(server, name, "set tenant-wide" if (server, name) in tenant else "missing"))
    return rows


Handler = Callable[[Request, AdminSession, psycopg.AsyncConnection], Awaitable[Response]]


class MyPage:
    def __init__(self, sessions: Sessions):
        self.sessions = sessions

    def view(self, handler: Handler, *, act: bool = False) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            session = await self.sessions.current(request)
            if session is None:
                return redirect(PLACE.login)
            if act:
                await check_csrf(request, session)  # 403 without the session's token
            async with self.sessions.pool.connection() as conn:
                return await handler(request, session, conn)

        return endpoint

    def render(self, request: Request, session: AdminSession, *, status: int = 200, **values: Any) -> Response:
        return page_html("me.html", status, session=session, who=session.identity,
                         notice=NOTICES.get(request.query_params.get("notice", ""), ""), **values)

    async def page(self, request: Request, session: AdminSession, conn: psycopg.AsyncConnection, *,
                   error: str = "", status: int = 200) -> Response:
        who = session.identity
        declares = await declared_for_user(conn, who.user_id)
        try:
            own = await self.sessions.fleet.secrets.list_secrets(who.tenant, who.user)
            shared = await self.sessions.fleet.secrets.list_secrets(who.tenant, None)
        except SecretError as exc:  # Vault down included; its message names no value
            own, shared, error = [], [], error or str(exc)
        listed = {(r.server, r.name) for r in rows_of(declares, own, shared)}
        return self.render(request, session, status=status, error=error, rows=rows_of(declares, own, shared),
                           undeclared=[s for s in own if (s.server, s.name) not in listed])

    async def set(self, request: Request, session: AdminSession, conn: psycopg.AsyncConnection) -> Response:
        form = await request.form()
        server, name, value = _field(form, "server"), _field(form, "name"), form.get("value")
        who = session.identity
        if name not in (await declared_for_user(conn, who.user_id)).get(server, ()):
            return await self.page(request, session, conn, status=400,
                                   error=f"No server approved for you declares a secret {name} for {server}.")
        if not isinstance(value, str) or not value or len(value.encode()) > MAX_BODY:
            return await self.page(request, session, conn, status=400, error=f"Send a value of 1 to {MAX_BODY} bytes.")
        try:
            await set_secret(self.sessions.fleet.secrets, conn, actor=who.principal, tenant=who.tenant, user=who.user,
                             server=server, name=name, value=value)
        except SecretError as exc:
            return await self.page(request, session, conn, status=503, error=str(exc))
        return redirect(f"{HOME}?notice=set")

    async def delete(self, request: Request, session: AdminSession, conn: psycopg.AsyncConnection) -> Response:
        form = await request.form()
        who = session.identity
        try:
            removed = await remove_secret(self.sessions.fleet.secrets, conn, actor=who.principal, tenant=who.tenant,
                                          user=who.user, server=_field(form, "server"), name=_field(form, "name"))
        except SecretError as exc:
            return await self.page(request, session, conn, status=400, error=str(exc))
        if not removed:
            return await self.page(request, session, conn, status=404, error="You have no such secret.")
        return redirect(f"{HOME}?notice=removed")


def _field(form: Any, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


def routes(admin: Sessions) -> list[Route]:
    sessions = sessions_for(admin)
    pages, mine = Pages(sessions, PLACE), MyPage(sessions)
    return [
        Route(HOME, mine.view(lambda request, session, conn: mine.page(request, session, conn)), methods=["GET"]),
        Route(PLACE.login, pages.login_page, methods=["GET"]),
        Route(PLACE.login, pages.login, methods=["POST"]),
        Route(f"{HOME}/logout", pages.logout, methods=["POST"]),
        Route(f"{HOME}/secrets/set", mine.view(mine.set, act=True), methods=["POST"]),
        Route(f"{HOME}/secrets/delete", mine.view(mine.delete, act=True), methods=["POST"]),
    ]
