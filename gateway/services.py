"""What the router needs of the fleet's services, as protocols: the fleet (`gateway.fleet.Fleet`)
provides them, and tests may provide their own."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from core.models.api import Models
from gateway.call_audit import CallAudit
from gateway.telemetry import Telemetry
from sandbox.channel import NotificationHandler, RequestHandler


class SandboxClient(Protocol):
    """What the router needs of a sandbox's channel (`sandbox.client.SupervisorClient`)."""

    async def catalog(self) -> Mapping[str, Mapping[str, Any]]: ...

    async def request(
        self,
        server: str,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        on_notification: NotificationHandler | None = None,
        on_request: RequestHandler | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]: ...


class RunningSandbox(Protocol):
    @property
    def client(self) -> SandboxClient: ...


class SandboxProvider(Protocol):
    """What the router needs of the sandbox manager: the caller's sandbox, running."""

    async def ensure(self, user_id: int, tenant: str, user: str) -> RunningSandbox: ...


class ToolRegistry(Protocol):
    """What the router asks of the registry (`registry.service.Registry`)."""

    async def guard(self, user_id: int, per_server: Mapping[str, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]: ...

    def record_call(self, user_id: int, server: str, tool: str, ok: bool, elapsed_ms: float) -> str | None:
        """Counts the call; returns the version of the server the user's call went to."""
        ...

    def why_unavailable(self, user_id: int, public_name: str, kind: str = "tool") -> str | None:
        """Why a tool, a prompt (`kind` "prompt") or a resource ("resource", by URI) is held back, if it is."""
        ...

    def version_of(self, user_id: int, server: str) -> str | None: ...


SearchTools = Any
"""async (identity, query, limit) -> list of hits with `as_dict()`."""

class Services(Protocol):
    """What the router routes with: `gateway.fleet.Fleet`, open while the app serves."""

    calls: CallAudit
    telemetry: Telemetry

    @property
    def manager(self) -> SandboxProvider: ...

    @property
    def registry(self) -> ToolRegistry | None: ...

    @property
    def search(self) -> SearchTools | None: ...

    @property
    def models(self) -> Models: ...
