"""Sessions of the admin web page: a signed cookie naming a row that is checked on every request.

The cookie holds a random session id signed with the fleet's session secret
(itsdangerous), never a key or a token. Its row holds the user, what opened the
session (an API key, or an OIDC issuer), the CSRF token and the expiry, and is
read again on every request together with the user's current role and the
key's or issuer's standing: a revoked key, an issuer no longer trusted, a user
demoted below auditor or removed, and a logout all end the session at once.

Every request that changes something (any method but GET, HEAD, OPTIONS) must
carry the session's CSRF token, in the `X-CSRF-Token` header (the page's
scripts) or the `csrf_token` field of a urlencoded form (its forms). The cookie is also
`SameSite=Strict`, so another site's page cannot make the browser send it at all.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import itsdangerous
import psycopg
from psycopg_pool import AsyncConnectionPool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from core.accounts import Identity

if TYPE_CHECKING:
    from gateway.fleet import Fleet

# `__Host-`: the browser takes this cookie only with Secure, Path=/ and no Domain, so no other
# host (a sibling subdomain) can set or shadow it. Loopback http counts as secure in Chromium.
COOKIE = "__Host-mcpfleet-admin"
LIFETIME_S = 8 * 3600
ROLES = ("admin", "auditor")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
# Only plain forms carry the token as a field: parsing a multipart body here would spend an upload's
# worth of work before the endpoint that expects it sets its own limits.
FORM_TYPE = "application/x-www-form-urlencoded"
# Where the middleware leaves the session store for `session_identity`, and where a request's
# looked-up session is kept so it is read from the database once per request.
SCOPE_KEY = "mcpfleet.admin_sessions"
_FOUND_KEY = "mcpfleet.admin_session"


class CsrfRefused(HTTPException):
    """An unsafe request of a live session without its CSRF token: answered 403."""

    def __init__(self) -> None:
        super().__init__(status_code=403, detail="missing or wrong CSRF token")


@dataclass(frozen=True, slots=True)
class AdminSession:
    identity: Identity
    csrf_token: str
    expires_at: datetime
    # "api-key" or the URL of the OIDC issuer that signed the user in.
    via: str


_CURRENT = """
SELECT u.id, u.name, t.name, u.role, s.csrf_token, s.expires_at, coalesce(s.issuer, 'api-key')
  FROM admin_sessions s
  JOIN users u ON u.id = s.user_id
  JOIN tenants t ON t.id = u.tenant_id
 WHERE s.id = %s AND s.ended_at IS NULL AND s.expires_at > now()
   AND u.role = ANY(%s)
   AND (s.api_key_id IS NULL
        OR EXISTS (SELECT 1 FROM api_keys k WHERE k.id = s.api_key_id AND k.revoked_at IS NULL
                   AND (k.expires_at IS NULL OR k.expires_at > now()) AND k.user_id = u.id))
   AND (s.issuer IS NULL
        OR EXISTS (SELECT 1 FROM issuers i WHERE i.url = s.issuer AND i.tenant_id = u.tenant_id)
           AND u.subject_issuer = s.issuer)
"""


class Sessions:
    """Opens, finds and ends admin sessions, in the fleet's database (open while the app serves)."""

    def __init__(
        self, secret: bytes, fleet: Fleet, *, lifetime_s: int = LIFETIME_S, roles: tuple[str, ...] = ROLES,
        cookie: str = COOKIE, salt: str = "mcpfleet.admin-session",
    ):
        """`roles`, `cookie` and `salt` make another kind of session in the same table (the user page's,
        gateway/admin/mine.py): a cookie signed under one salt never unsigns under another, so a session
        of one kind is never taken for one of the other, and each re-checks its own roles."""
        self.secret = secret  # also signs the sign-in flows of gateway/admin/oidc.py, under another salt
        self._signer = itsdangerous.TimestampSigner(secret, salt=salt)
        self.fleet = fleet
        self.lifetime_s = lifetime_s
        self.roles = roles
        self.cookie = cookie

    @property
    def pool(self) -> AsyncConnectionPool:
        return self.fleet.pool

    async def open(
        self, conn: psycopg.AsyncConnection, identity: Identity, *, api_key_id: int | None = None, issuer: str | None = None
    ) -> str:
        """A new session for `identity`; returns the cookie value that names it."""
        session_id = secrets.token_urlsafe(32)
        async with conn.transaction():
            # Rows long past their expiry are of no use to anyone; a login is a rare enough moment to sweep.
            await conn.execute("DELETE FROM admin_sessions WHERE expires_at < now() - interval '1 day'")
            await conn.execute(
                """INSERT INTO admin_sessions (id, user_id, api_key_id, issuer, csrf_token, expires_at)
                   VALUES (%s, %s, %s, %s, %s, now() + make_interval(secs => %s))""",
                (_digest(session_id), identity.user_id, api_key_id, issuer, secrets.token_urlsafe(32), self.lifetime_s),
            )
        return self._signer.sign(session_id).decode()

    async def current(self, request: Request) -> AdminSession | None:
        """The request's live session, or None (no cookie, a bad signature, ended, or no longer allowed)."""
        if _FOUND_KEY in request.scope:
            return request.scope[_FOUND_KEY]
        found = None
        session_id = self._session_id(request)
        if session_id is not None:
            async with self.pool.connection() as conn:
                row = await (await conn.execute(_CURRENT, (_digest(session_id), list(self.roles)))).fetchone()
            if row is not None:
                identity = Identity(user_id=row[0], user=row[1], tenant=row[2], role=row[3])
                found = AdminSession(identity=identity, csrf_token=row[4], expires_at=row[5], via=row[6])
        request.scope[_FOUND_KEY] = found
        return found

    async def end(self, request: Request) -> AdminSession | None:
        """Ends the request's session (logout); returns it as it was, if it was live."""
        session = await self.current(request)
        session_id = self._session_id(request)
        if session_id is not None:
            async with self.pool.connection() as conn:
                await conn.execute(
                    "UPDATE admin_sessions SET ended_at = now() WHERE id = %s AND ended_at IS NULL", (_digest(session_id),)
                )
        request.scope[_FOUND_KEY] = None
        return session

    def set_cookie(self, response: Response, value: str) -> None:
        response.set_cookie(
            self.cookie, value, max_age=self.lifetime_s, path="/", secure=True, httponly=True, samesite="strict"
        )

    def clear_cookie(self, response: Response) -> None:
        response.delete_cookie(self.cookie, path="/", secure=True, httponly=True, samesite="strict")

    def _session_id(self, request: Request) -> str | None:
        value = request.cookies.get(self.cookie)
        if not value:
            return None
        try:
            return self._signer.unsign(value, max_age=self.lifetime_s).decode()
        except itsdangerous.BadSignature:  # also an expired signature
            return None


async def check_csrf(request: Request, session: AdminSession) -> None:
    """Raises CsrfRefused unless a request that changes something carries the session's token."""
    if request.method in SAFE_METHODS:
        return
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.headers.get("content-type", "").startswith(FORM_TYPE):
        field = (await request.form()).get(CSRF_FIELD)
        sent = field if isinstance(field, str) else None
    if not sent or not hmac.compare_digest(sent.encode(), session.csrf_token.encode()):
        raise CsrfRefused()


async def session_identity(request: Request) -> Identity | None:
    """The identity of the browser session this request belongs to, for APIs the admin page calls.

    Returns None when there is no live session (no cookie, a bad or expired one, logged out, or
    the user, key or issuer no longer allowed): answer as to any unauthenticated request.
    Raises `CsrfRefused` (a Starlette HTTPException, status 403) when the session is live but
    the request is unsafe (not GET/HEAD/OPTIONS) and lacks the session's CSRF token.
    The role is re-read from the database on every request; only admins and auditors have sessions.
    """
    sessions: Sessions | None = request.scope.get(SCOPE_KEY)
    if sessions is None:
        return None
    session = await sessions.current(request)
    if session is None:
        return None
    await check_csrf(request, session)
    return session.identity


class SessionContext:
    """Makes the session store reachable from any route, so `session_identity(request)` needs no argument."""

    def __init__(self, app: ASGIApp, sessions: Sessions):
        self.app = app
        self.sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[SCOPE_KEY] = self.sessions
        await self.app(scope, receive, send)


def _digest(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode()).digest()
