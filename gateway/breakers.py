"""Circuit breakers: a user's sandbox, or a server in it, that keeps failing is fenced for a while.

Each breaker counts failures in a row (a streak older than `WINDOW_S` starts over). At
`failures` it opens: calls are refused at once, saying until when, instead of each waiting for
another cold start or another crash. After the cool-down one call, the probe, is let through
(half-open) while the others are still refused; its success closes the breaker, its failure
opens it again for twice as long as before (up to `MAX_COOLDOWN_S`).

Breakers live in the gateway process: each replica fences on what it sees itself, which is
enough to spare the sandbox and the callers, and needs nothing shared.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from mcp.shared.exceptions import MCPError

from sandbox.errors import QuotaExceeded, SandboxDetached, SandboxRpcError, SandboxUnavailable
from sandbox.lease import Standby

INTERNAL_ERROR = -32603
BREAKER_OPEN = -32003
"""JSON-RPC error of a fenced call (implementation-defined server range; -32001 is quota, -32029 rate)."""

WINDOW_S = 60.0
"""Failures count as "in a row" only while each comes within this long of the one before."""
MAX_COOLDOWN_S = 600.0
MAX_BREAKERS = 100_000
"""Closed breakers without failures are dropped past this many, so the table stays bounded."""


Verdict = Literal["failure", "alive"] | None


class Fenced(Exception):
    """A call refused because its breaker is open."""

    def __init__(self, what: str, retry_in: float):
        self.what = what
        self.retry_in = retry_in
        until = datetime.now(UTC) + timedelta(seconds=retry_in)
        super().__init__(
            f"{what} failed repeatedly and is fenced off until {until:%H:%M:%S} UTC: retry in {retry_in:.0f}s"
        )


@dataclass
class _Breaker:
    failures: int = 0
    last_failure: float = 0.0
    open_until: float | None = None  # None: closed
    cooldown: float = 0.0  # of the last opening; doubled when a probe fails
    probing: bool = False


class Breakers:
    """Breakers by key (`(user_id,)` for a sandbox, `(user_id, server)` for a server)."""

    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic):
        self.failures = max(1, failures)
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.on_refused: Callable[[], None] = lambda: None  # counts refusals (metrics, reason "breaker")
        self._breakers: dict[Hashable, _Breaker] = {}

    def check(self, key: Hashable, what: str) -> None:
        """Raise Fenced if calls to `key` are refused now; otherwise the call may go (perhaps as the probe)."""
        breaker = self._breakers.get(key)
        if breaker is None or breaker.open_until is None:
            return
        now = self.clock()
        if now < breaker.open_until or breaker.probing:
            # While the probe is out, the others wait for its outcome as if still open.
            raise Fenced(what, max(breaker.open_until - now, 1.0))
        breaker.probing = True

    def succeeded(self, key: Hashable) -> None:
        breaker = self._breakers.get(key)
        if breaker is not None:
            del self._breakers[key]

    def failed(self, key: Hashable) -> bool:
        """Count a failure; True when it opened the breaker (the caller audits each opening once)."""
        now = self.clock()
        breaker = self._breakers.get(key)
        if breaker is None:
            if len(self._breakers) >= MAX_BREAKERS:
                self._forget_closed()
            breaker = self._breakers[key] = _Breaker()
        if breaker.probing:  # the probe failed: open again, for longer
            breaker.probing = False
            breaker.cooldown = min(breaker.cooldown * 2, MAX_COOLDOWN_S)
            breaker.open_until = now + breaker.cooldown
            return True
        if breaker.open_until is not None:  # a call let in before it opened, failing late
            return False
        if now - breaker.last_failure > WINDOW_S:
            breaker.failures = 0
        breaker.failures += 1
        breaker.last_failure = now
        if breaker.failures < self.failures:
            return False
        breaker.cooldown = self.cooldown_s
        breaker.open_until = now + breaker.cooldown
        return True

    def released(self, key: Hashable) -> None:
        """The probe ended neither way (cancelled, or the caller's own error): another may probe."""
        breaker = self._breakers.get(key)
        if breaker is not None:
            breaker.probing = False

    def retry_in(self, key: Hashable) -> float:
        breaker = self._breakers.get(key)
        if breaker is None or breaker.open_until is None:
            return 0.0
        return max(breaker.open_until - self.clock(), 0.0)

    @contextlib.contextmanager
    def guard(
        self, key: Hashable, what: str, verdict: Callable[[BaseException], Verdict], on_open: Callable[[float], None],
    ) -> Iterator[None]:
        """Around one attempt at `key`: refused with a JSON-RPC error while fenced; `verdict` says
        whether an exception is the thing's failure, a sign it is alive, or neither (released)."""
        try:
            self.check(key, what)
        except Fenced as exc:
            self.on_refused()
            raise MCPError(
                code=BREAKER_OPEN, message=str(exc), data={"fenced": what, "retryAfterSeconds": round(exc.retry_in, 1)}
            ) from None
        try:
            yield
        except BaseException as exc:
            outcome = verdict(exc)
            if outcome == "failure":
                if self.failed(key):
                    on_open(self.retry_in(key))
            elif outcome == "alive":
                self.succeeded(key)
            else:
                self.released(key)
            raise
        self.succeeded(key)

    def _forget_closed(self) -> None:
        for key in [k for k, b in self._breakers.items() if b.open_until is None]:
            del self._breakers[key]


def bring_up_verdict(exc: BaseException) -> Verdict:
    """A start that failed counts; a full quota or a sandbox let go of on purpose says nothing of it."""
    if isinstance(exc, (QuotaExceeded, SandboxDetached, Standby)):  # Standby: another gateway runs them
        return None
    return "failure" if isinstance(exc, SandboxUnavailable) else None


def server_verdict(exc: BaseException) -> Verdict:
    """A server that crashed, is not running, or failed internally counts; its other errors are answers."""
    if isinstance(exc, SandboxRpcError):
        return "failure" if exc.code == INTERNAL_ERROR else "alive"
    if isinstance(exc, SandboxDetached):
        return None
    return "failure" if isinstance(exc, SandboxUnavailable) else None
