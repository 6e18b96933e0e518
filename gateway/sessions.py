"""Who holds which 2025-11-25 session, so that no user can hold the gateway's every one.

The SDK's session manager caps the sessions of the whole gateway (`max_sessions`) and answers 503
beyond it: one user opening sessions in a loop would lock every other user out until theirs expire.
Here each user holds at most `per_user`. A request that would open one more first closes that user's
oldest idle session (no request in flight, no stream open: a client that forgot it can simply open a
new one, as it must after any expiry); when every one of them is busy, `make_room` says no and the
caller refuses the request.

Sessions end on their own too (DELETE, the idle timeout, a crash): the book asks the manager which
are still open before it counts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from mcp.server.streamable_http import MCP_SESSION_ID_HEADER
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.shared.inbound import MCP_PROTOCOL_VERSION_HEADER
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.types import Message, Scope, Send

log = logging.getLogger(__name__)

_SESSION_HEADER = MCP_SESSION_ID_HEADER.lower().encode()
_VERSION_HEADER = MCP_PROTOCOL_VERSION_HEADER.lower().encode()


@dataclass
class _Session:
    last_used: float = field(default_factory=time.monotonic)
    in_flight: int = 0


def session_id_of(scope: Scope) -> str | None:
    for name, value in scope.get("headers") or ():
        if name == _SESSION_HEADER:
            return value.decode("latin-1")
    return None


def opens_session(scope: Scope) -> bool:
    """A POST the SDK would answer by opening a session: no session id, not a 2026-07-28 request."""
    if scope["method"] != "POST" or session_id_of(scope) is not None:
        return False
    version = next((v.decode("latin-1") for k, v in scope.get("headers") or () if k == _VERSION_HEADER), None)
    return version is None or version in HANDSHAKE_PROTOCOL_VERSIONS


class SessionBook:
    def __init__(self, manager: StreamableHTTPSessionManager, per_user: int):
        self.manager = manager
        self.per_user = per_user
        self._held: dict[int, dict[str, _Session]] = {}
        self._opening: dict[int, int] = {}

    def _open_ids(self) -> dict[str, object]:
        # The manager's own table of open sessions (no public accessor): a session it discarded is gone.
        return self.manager._server_instances  # noqa: SLF001

    def held(self, user_id: int) -> dict[str, _Session]:
        """The user's sessions that are still open."""
        sessions = self._held.get(user_id)
        if not sessions:
            return {}
        open_ids = self._open_ids()
        for gone in [sid for sid in sessions if sid not in open_ids]:
            del sessions[gone]
        if not sessions:
            del self._held[user_id]
        return sessions

    async def make_room(self, user_id: int) -> bool:
        """Room for one more session of this user (closing their oldest idle one if need be), or False.

        On True the caller sends the opening request's response through `watch` and calls
        `done_opening` once it is answered."""
        sessions = self.held(user_id)
        victim = None
        if len(sessions) + self._opening.get(user_id, 0) >= self.per_user:
            idle = [(s.last_used, sid) for sid, s in sessions.items() if s.in_flight == 0]
            if not idle:
                return False
            victim = min(idle)[1]
            del sessions[victim]
        self._opening[user_id] = self._opening.get(user_id, 0) + 1
        if victim is not None:
            transport = self._open_ids().get(victim)
            log.info("user %s is at %d sessions: closing their oldest idle one", user_id, self.per_user)
            if transport is not None:
                await transport.terminate()  # type: ignore[attr-defined]
        return True

    def watch(self, user_id: int, send: Send) -> Send:
        """`send` that notes the session the response opens."""

        async def noting(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] < 400:
                for name, value in message.get("headers") or ():
                    if name.lower() == _SESSION_HEADER:
                        self._held.setdefault(user_id, {})[value.decode("latin-1")] = _Session()
            await send(message)

        return noting

    def done_opening(self, user_id: int) -> None:
        left = self._opening.get(user_id, 1) - 1
        if left:
            self._opening[user_id] = left
        else:
            self._opening.pop(user_id, None)

    @contextmanager
    def using(self, user_id: int, session_id: str | None) -> Iterator[None]:
        """A request of this session is being served: the session is not idle meanwhile."""
        session = self._held.get(user_id, {}).get(session_id) if session_id is not None else None
        if session is None:
            yield
            return
        session.in_flight += 1
        try:
            yield
        finally:
            session.in_flight -= 1
            session.last_used = time.monotonic()
