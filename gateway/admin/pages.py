"""The admin page, and signing in and out of it with an API key.

The page itself is static HTML and a script that reads and changes the registry
through its JSON API (`/registry/v1`) with the session cookie; this module only
serves it to a live session, and turns a pasted API key into a session. Only
admins and auditors (read-only) get one. The same sign-in, with a `Place` of its
own, opens the user page's sessions (gateway/admin/mine.py), for any role.
"""

from __future__ import annotations

import hmac
import html
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from string import Template
from urllib.parse import urlencode

import psycopg
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from core import accounts, audit
from gateway.admin.session import CSRF_FIELD, Sessions, check_csrf

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "templates"
# The login form's own CSRF token (there is no session yet): a short-lived cookie the form must echo.
LOGIN_COOKIE = "__Host-mcpfleet-login"
LOGIN_COOKIE_S = 900
# Scripts and styles only from our own origin; nothing may frame the page (clickjacking on Approve).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def render(name: str, status_code: int = 200, markup: dict[str, str] | None = None, **values: str) -> HTMLResponse:
    """A template of ours with every value HTML-escaped (`markup`: HTML we built ourselves from escaped parts)."""
    text = Template((TEMPLATES / name).read_text()).substitute({**{k: html.escape(v) for k, v in values.items()}, **(markup or {})})
    return HTMLResponse(text, status_code=status_code, headers=SECURITY_HEADERS)


NOTICES = {"ended": "Your session has ended; please sign in again."}


def _cookie_warning(request: Request) -> str:
    """Browsers keep Secure cookies only from https or loopback: say so rather than loop back here."""
    host = request.url.hostname or ""
    if request.url.scheme == "https" or host in ("127.0.0.1", "localhost", "::1") or host.endswith(".localhost"):
        return ""
    return (
        "This page is served over plain http from a non-loopback address: browsers will not keep the session "
        "cookie, so signing in cannot work. Serve the gateway over https (or reach it through loopback)."
    )


def redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303, headers={"Cache-Control": "no-store"})


@dataclass(frozen=True)
class Place:
    """Where a kind of session signs in and lands: the admin page's, or the user page's (gateway/admin/mine.py)."""

    home: str = "/admin"
    login: str = "/admin/login"
    template: str = "login.html"
    audit: str = "admin"
    """The audit actions' prefix: `admin.login`, `admin.logout`."""
    refused: str = "Only admins and auditors may use this page."
    login_cookie: str = LOGIN_COOKIE


ADMIN = Place()


class Pages:
    def __init__(self, sessions: Sessions, place: Place = ADMIN):
        self.sessions = sessions
        self.place = place
        # Identity providers the login page offers besides the key form (set when SSO is on).
        self.identity_providers: Callable[[], Awaitable[list[str]]] | None = None

    async def admin(self, request: Request) -> Response:
        session = await self.sessions.current(request)
        if session is None:
            return redirect(self.place.login)
        who = session.identity
        return render(
            "admin.html",
            csrf_token=session.csrf_token,
            user=who.principal,
            role=who.role,
            expires_at=session.expires_at.isoformat(timespec="seconds"),
        )

    async def login_form(self, request: Request, *, error: str = "", status_code: int = 200) -> Response:
        token = secrets.token_urlsafe(32)
        providers = await self.identity_providers() if self.identity_providers else []
        links = "".join(
            f'<a class="provider" href="/admin/oidc/start?{html.escape(urlencode({"issuer": url}))}">'
            f"Sign in with {html.escape(url)}</a>"
            for url in providers
        )
        response = render(
            self.place.template,
            status_code=status_code,
            markup={"providers": f'<nav class="sso" aria-label="single sign-on">{links}</nav>' if links else ""},
            csrf_token=token,
            error=error,
            warning=_cookie_warning(request),
        )
        response.set_cookie(
            self.place.login_cookie, token, max_age=LOGIN_COOKIE_S, path="/", secure=True, httponly=True, samesite="strict"
        )
        return response

    async def login_page(self, request: Request) -> Response:
        if await self.sessions.current(request) is not None:
            return redirect(self.place.home)
        # Only our own words: a link must not be able to put text of its choosing on this page.
        return await self.login_form(request, error=NOTICES.get(request.query_params.get("notice", ""), ""))

    async def login(self, request: Request) -> Response:
        form = await request.form()
        sent, expected = form.get(CSRF_FIELD), request.cookies.get(self.place.login_cookie)
        if not isinstance(sent, str) or not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
            return await self.login_form(request, error="The form expired; please try again.", status_code=403)
        key = form.get("api_key")
        key = key.strip() if isinstance(key, str) else ""
        async with self.sessions.pool.connection() as conn:
            identity = await accounts.verify_key(conn, key)
            if identity is None:
                await audit.append(conn, action=f"{self.place.audit}.login", outcome="denied", detail={"reason": "invalid key"})
                return await self.login_form(request, error="That key is not valid.", status_code=401)
            if identity.role not in self.sessions.roles:
                await audit.append(
                    conn, action=f"{self.place.audit}.login", outcome="denied", tenant=identity.tenant, actor=identity.principal,
                    detail={"reason": f"role {identity.role}"},
                )
                return await self.login_form(request, error=self.place.refused, status_code=403)
            prefix, key_id = await _key_of(conn, key)
            cookie = await self.sessions.open(conn, identity, api_key_id=key_id)
            await audit.append(
                conn, action=f"{self.place.audit}.login", outcome="ok", tenant=identity.tenant, actor=identity.principal,
                detail={"via": "api-key", "prefix": prefix},
            )
        response = redirect(self.place.home)
        self.sessions.set_cookie(response, cookie)
        response.delete_cookie(self.place.login_cookie, path="/", secure=True, httponly=True, samesite="strict")
        return response

    async def logout(self, request: Request) -> Response:
        session = await self.sessions.current(request)
        if session is not None:
            await check_csrf(request, session)
            await self.sessions.end(request)
            async with self.sessions.pool.connection() as conn:
                await audit.append(
                    conn, action=f"{self.place.audit}.logout", outcome="ok", tenant=session.identity.tenant,
                    actor=session.identity.principal,
                )
        response = redirect(self.place.login)
        self.sessions.clear_cookie(response)
        return response



async def _key_of(conn: psycopg.AsyncConnection, key: str) -> tuple[str, int]:
    """(prefix, row id) of a key `verify_key` accepted: the session is tied to that key's standing."""
    parts = accounts.split_key(key)
    assert parts is not None
    row = await (await conn.execute("SELECT id FROM api_keys WHERE prefix = %s", (parts[0],))).fetchone()
    assert row is not None
    return parts[0], row[0]
