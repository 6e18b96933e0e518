"""The admin web page: pending tool-server versions to approve, drifted tools, usage.

`routes()` serves the page under `/admin`; `SessionContext` (middleware) lets any
route ask `session.session_identity(request)` for the signed-in admin, which is
how the registry's JSON API accepts the page's requests.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from psycopg_pool import AsyncConnectionPool
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from gateway.admin.pages import Pages
from gateway.admin.secret import session_secret
from gateway.admin.session import SessionContext, Sessions, session_identity
from gateway.settings import Settings

__all__ = ["SessionContext", "Sessions", "routes", "session_identity", "sessions_for"]

STATIC = Path(__file__).resolve().parent / "static"


def sessions_for(settings: Settings, pool_of: Callable[[], AsyncConnectionPool]) -> Sessions:
    return Sessions(session_secret(settings.home), pool_of)


def routes(sessions: Sessions) -> list[BaseRoute]:
    pages = Pages(sessions)
    return [
        Route("/admin", pages.admin, methods=["GET"]),
        Route("/admin/login", pages.login_page, methods=["GET"]),
        Route("/admin/login", pages.login, methods=["POST"]),
        Route("/admin/logout", pages.logout, methods=["POST"]),
        Mount("/admin/static", StaticFiles(directory=STATIC), name="admin-static"),
    ]
