"""Server middleware: a client seen is a sandbox to wake.

A hibernated sandbox takes a restore (a few hundred milliseconds) before it can answer. A client
says who it is well before its first `tools/call`: its `initialize` (2025-11-25), its
`server/discover` (2026-07-28), any authenticated request. On each, the manager is told to begin
resuming that user's sandbox in the background (`SandboxManager.wake`), and the request goes on
without waiting. The first call then finds the sandbox running or resuming and joins that resume;
if it failed, the call gets the failure. Requests that never reach the sandbox wake nothing: a
task's status and result are read from the database (a hibernated sandbox stays so), and a ping
or a cancellation asks nothing of it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from mcp.server.context import ServerRequestContext

from gateway.auth import identity_of
from gateway.services import Services

Handler = Callable[[ServerRequestContext[Any, Any]], Awaitable[Any]]

NO_SANDBOX = frozenset({"ping", "tasks/get", "tasks/cancel", "tasks/list", "tasks/result"})
"""Methods answered without the sandbox (`tasks/update` answers a running task's server: it is awake)."""


def wake_sandboxes(fleet: Services) -> Callable[[ServerRequestContext[Any, Any], Handler], Awaitable[Any]]:
    """The middleware over `fleet`'s sandbox manager (read per request: it is opened after the app is made)."""

    async def wake_sandbox(ctx: ServerRequestContext[Any, Any], call_next: Handler) -> Any:
        identity = identity_of(getattr(ctx.request, "scope", None)) if ctx.method not in NO_SANDBOX else None
        # Only the local manager hibernates with memory; Kubernetes sandboxes are woken by their first call.
        wake = getattr(fleet.manager, "wake", None) if identity is not None else None
        if identity is not None and wake is not None:
            wake(identity.user_id, identity.tenant, identity.user)
        return await call_next(ctx)

    return wake_sandbox
