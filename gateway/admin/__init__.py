"""The admin web page: pending tool-server versions to approve, drifted tools, usage.

`routes()` serves the page under `/admin` and the console (one view per subject, paged)
under `/admin/console` (gateway/admin/console.py), with sign-in by API key or through a
tenant's identity provider (OIDC); `SessionContext` (middleware) lets any route
ask `session.session_identity(request)` for the signed-in admin, which is how
the registry's JSON API accepts the page's requests.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from core.settings import Settings
from gateway.admin import console, mine
from gateway.admin.oidc import CALLBACK_PATH, Clients, OidcSignIn
from gateway.admin.pages import Pages
from gateway.admin.secret import session_secret
from gateway.admin.session import SessionContext, Sessions, session_identity
from gateway.oauth.tokens import OAuthVerifier

if TYPE_CHECKING:
    from gateway.fleet import Fleet

__all__ = ["SessionContext", "Sessions", "routes", "session_identity", "sessions_for"]

STATIC = Path(__file__).resolve().parent / "static"


def sessions_for(fleet: Fleet) -> Sessions:
    return Sessions(session_secret(fleet.settings.home), fleet)


def routes(sessions: Sessions, settings: Settings, oauth: OAuthVerifier) -> list[BaseRoute]:
    """`oauth`: the gateway's token verifier, whose vetted egress and issuer keys SSO shares."""
    pages = Pages(sessions)
    sso = OidcSignIn(
        sessions, pages, oauth, Clients.from_env(),
        secret=sessions.secret, public_url=settings.public_url, allow_private=settings.allow_private_issuers,
    )
    pages.identity_providers = sso.issuers
    return [
        Route("/admin", pages.admin, methods=["GET"]),
        Route("/admin/login", pages.login_page, methods=["GET"]),
        Route("/admin/login", pages.login, methods=["POST"]),
        Route("/admin/logout", pages.logout, methods=["POST"]),
        Route("/admin/oidc/start", sso.start, methods=["GET"]),
        Route(CALLBACK_PATH, sso.callback, methods=["GET"]),
        *console.routes(sessions),
        *mine.routes(sessions),
        Mount("/admin/static", StaticFiles(directory=STATIC), name="admin-static"),
    ]
