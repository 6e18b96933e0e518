"""Audit entries for what happens on the request path: authentication decisions and tool calls.

Nothing here writes to the database while a request waits. Each entry is appended to this process's
journal on local disk as it is recorded (core/audit_journal.py) and kept in an in-memory queue; a
background task appends the queue in batches, one transaction per batch, about once a second; the
chain's head is locked per insert inside that transaction, so a batch holds it once for all its rows.
A tool call's answer waits only for the journal's group fsync (`durable`), never for the database.
The queue is flushed when the gateway shuts down. A process killed outright loses nothing: its
journal is replayed into the chain by the next process of the fleet that finds it (on start and
every few seconds), and the journal's mark in the database, moved in the same transaction as the
entries, makes every entry go in once.

Bounds, so that the hot path and a flood of bad credentials cannot fill the log:
- `auth.accepted` is written for a credential (keyed by the SHA-256 of the bearer string) the
  first time this process sees it and then at most once per `ACCEPTED_EVERY_S`.
- `auth.refused` is written at most once per (reason, client IP) per `REFUSED_EVERY_S`; the
  refusals swallowed in between are counted into the next entry's `detail.suppressed`.

Entries hold identifiers only: a key's public prefix, a token's issuer and subject, the SHA-256 of
a tool call's canonical JSON arguments. Never a key, a token, or an argument.

What a client sends is bounded as it is queued (`text.bounded`): a tool name of megabytes or with
a NUL in it is kept as its first characters and its SHA-256, so neither the queue nor the log
grows with it. An entry the database still refuses is written as `audit.refused` and the rest of
its batch goes in: one entry never holds up the others. Only when the database cannot be reached
is a batch kept to be tried again: in order, every round, until the database is back (restarted,
failed over); calls go on meanwhile and their entries queue behind it. Up to `MAX_QUEUED` entries
(about 100 MB at worst) nothing is lost; past it each entry is counted (and not journaled) and the
count written as one `audit.dropped` entry, and `mcpfleet_audit_dropped_total` says so at once. A
connection lost during the COMMIT itself leaves it unknown whether the batch went in; it is tried
again, and the journal's mark tells what of it is already there.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser, BearerAuthBackend
from mcp.server.auth.provider import TokenVerifier
from psycopg_pool import AsyncConnectionPool
from starlette.authentication import AuthenticationError
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse, PlainTextResponse, Response

from core import accounts, audit, audit_journal
from core.accounts import Identity
from core.outage import UNREACHABLE, DatabaseUnavailable
from core.tasks import Tasks
from core.text import bounded, bounded_json
from gateway.artifact_api import is_sandbox_request
from gateway.auth import FleetToken, is_api_key

log = logging.getLogger(__name__)

FLUSH_EVERY_S = 1.0
ACCEPTED_EVERY_S = 600.0
REFUSED_EVERY_S = 10.0
REPLAY_EVERY_S = 5.0  # how often journals of dead processes are looked for (also at once on start)
MAX_QUEUED = 100_000  # beyond this the database is not keeping up: drop and say so, rather than grow without end
_SEEN_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class Pending:
    action: str
    outcome: str
    tenant: str | None
    actor: str | None
    target: str | None
    detail: dict[str, Any]
    journal: str | None = None
    """The journal the entry is in and its number there (core/audit_journal.py); None if it is not."""
    seq: int = 0


def arguments_hash(arguments: Any) -> str:
    """SHA-256 of the arguments' canonical JSON (sorted keys, no spaces): equal arguments hash alike."""
    text = json.dumps(arguments if arguments is not None else {}, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class CallAudit:
    """The queue and its writer, which writes once `start` gives it the pool."""

    pool: AsyncConnectionPool | None = None
    journal_dir: Path | None = None
    """Where this process's journal goes (under the fleet home); None keeps entries in memory only."""
    clock: Callable[[], float] = time.monotonic
    _queue: list[Pending] = field(default_factory=list)
    _in_flight: int = 0
    _dropped: int = 0
    written: int = 0
    """Entries written since the gateway started (the metrics' counters read these three)."""
    dropped: int = 0
    """Entries lost because the queue was full (each loss is also written, as `audit.dropped`)."""
    retries: int = 0
    """Rounds whose batch could not be written because the database could not be reached."""
    _accepted_at: dict[bytes, float] = field(default_factory=dict)
    _refused: dict[tuple[str, str], tuple[float, int]] = field(default_factory=dict)
    _tasks: Tasks = field(default_factory=Tasks)
    journal: audit_journal.Journal | None = None
    replayed: int = 0
    """Entries replayed from the journals of processes that died before writing them."""

    @property
    def queued(self) -> int:
        """Entries waiting to be written, the batch being written included (the audit queue depth)."""
        return len(self._queue) + self._in_flight

    # -- what is recorded ---------------------------------------------------------------------

    def record(self, action: str, outcome: str, *, tenant: str | None = None, actor: str | None = None,
               target: str | None = None, detail: dict[str, Any] | None = None) -> None:
        if len(self._queue) + self._in_flight >= MAX_QUEUED:
            self._dropped += 1
            self.dropped += 1
            return
        entry = Pending(action, outcome, _text(tenant), _text(actor), _text(target), bounded_json(detail or {}))
        key = self.journal.append((entry.tenant, entry.actor, entry.action, entry.target, entry.outcome, entry.detail)) \
            if self.journal is not None else None
        if key is not None:
            entry = dataclasses.replace(entry, journal=key[0], seq=key[1])
        self._queue.append(entry)

    async def durable(self) -> None:
        """Returns once every entry recorded so far is on disk (one fsync shared by the callers that
        wait meanwhile): a tool call's answer goes out after this. Never raises."""
        if self.journal is not None:
            await self.journal.durable()

    def tool_call(self, identity: Identity, *, tool: str, server: str, arguments: Any, outcome: str,
                  latency_ms: float, version: str | None = None, error_code: int | None = None,
                  action: str = "tool.call") -> None:
        """A tool call, or (`action` "prompt.get", "resource.read") a prompt got or a resource read."""
        detail: dict[str, Any] = {"server": server, "args_sha256": arguments_hash(arguments), "latency_ms": round(latency_ms, 1)}
        if version is not None:
            detail["version"] = version
        if error_code is not None:
            detail["code"] = error_code
        self.record(action, outcome, tenant=identity.tenant, actor=identity.principal, target=tool, detail=detail)

    def accepted(self, token: str, access: FleetToken, ip: str) -> None:
        digest = hashlib.sha256(token.encode()).digest()
        now = self.clock()
        last = self._accepted_at.get(digest)
        if last is not None and now - last < ACCEPTED_EVERY_S:
            return
        if len(self._accepted_at) > _SEEN_LIMIT:
            self._accepted_at.clear()
        self._accepted_at[digest] = now
        identity = access.identity
        detail: dict[str, Any] = {"ip": ip}
        if is_api_key(access):
            detail["key_prefix"] = _key_prefix(token)
        else:
            detail |= {"issuer": (access.claims or {}).get("iss"), "sub": (access.claims or {}).get("sub")}
        self.record("auth.accepted", "ok", tenant=identity.tenant, actor=identity.principal, detail=detail)

    def refused(self, reason: str, ip: str, *, tenant: str | None = None, actor: str | None = None,
                **who: Any) -> None:
        """A refusal; written unless one with the same reason and IP was written in the last 10 s."""
        now = self.clock()
        key = (reason, ip)
        last = self._refused.get(key)
        if last is not None and now - last[0] < REFUSED_EVERY_S:
            self._refused[key] = (last[0], last[1] + 1)
            return
        suppressed = last[1] if last is not None else 0
        if len(self._refused) > _SEEN_LIMIT:
            self._refused.clear()
        self._refused[key] = (now, 0)
        detail = {"reason": reason, "ip": ip, **{k: v for k, v in who.items() if v is not None}}
        if suppressed:
            detail["suppressed"] = suppressed
        self.record("auth.refused", "refused", tenant=tenant, actor=actor, detail=detail)

    def role_refused(self, identity: Identity, what: str, needs: tuple[str, ...], ip: str) -> None:
        """An authenticated caller whose role does not allow `what` (e.g. `POST /registry/v1/...`)."""
        self.refused("insufficient role", ip, tenant=identity.tenant, actor=identity.principal,
                     role=identity.role, needs=list(needs), request=what)

    # -- the writer ---------------------------------------------------------------------------

    def start(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool
        if self.journal_dir is not None:
            self.journal = audit_journal.Journal(self.journal_dir)
            self.journal.open()
        self._tasks.spawn(self._run(), name="call-audit")

    async def close(self) -> None:
        await self._tasks.close()
        try:
            await self.flush()
        except Exception as exc:  # the gateway still stops; the journal keeps what was queued for the next start
            log.error("could not write %d audit entries before stopping%s: %s", len(self._queue),
                      "; they stay in the journal for the next start" if self.journal is not None else "", exc)
        if self.journal is not None:
            self.journal.close(all_written=not self._queue and not self.journal.failed)
            self.journal = None

    async def _run(self) -> None:
        replay_at = 0.0  # at once: a process that died before this one started may have left entries
        while True:
            if self.journal_dir is not None and self.clock() >= replay_at:
                replay_at = self.clock() + REPLAY_EVERY_S
                await self._replay()
            await asyncio.sleep(FLUSH_EVERY_S)
            try:
                await self.flush()
            except UNREACHABLE as exc:  # kept queued: the next round tries again
                self.retries += 1
                log.warning("could not write %d audit entries yet: %s", len(self._queue), exc)
            except Exception:  # a fault of ours: the writer goes on, or nothing is audited any more
                log.exception("could not write %d audit entries", len(self._queue))

    async def _replay(self) -> None:
        assert self.pool is not None and self.journal_dir is not None
        own = self.journal.ids if self.journal is not None else set()
        try:
            count = await audit_journal.replay_orphans(self.pool, self.journal_dir, own, append_rows)
        except UNREACHABLE as exc:  # the journals stay: the next round tries again
            log.warning("could not replay audit journals yet: %s", exc)
            return
        except Exception:
            log.exception("could not replay audit journals")
            return
        if count:
            self.replayed += count
            self.written += count
            log.warning("wrote %d audit entries that a process which ended abruptly had journaled", count)

    async def flush(self) -> int:
        """Appends everything queued in one transaction; returns how many entries were written."""
        if self.pool is None or (not self._queue and not self._dropped):
            return 0
        batch, self._queue = self._queue, []
        if self._dropped:
            batch.append(Pending("audit.dropped", "error", None, None, None, {"count": self._dropped}))
            self._dropped = 0
        # While the pool waits for a connection (up to its timeout when the database is away), the
        # batch is neither in the queue nor written: counted apart so the depth and the bound see it.
        self._in_flight = len(batch)
        try:
            async with self.pool.connection() as conn, conn.transaction():
                # What a lost COMMIT (or a replay) already put in the chain is left out (the journal's mark).
                marks = await audit_journal.written_upto(conn, (e.journal for e in batch if e.journal is not None))
                await append_rows(conn, [(e.tenant, e.actor, e.action, e.target, e.outcome, e.detail) for e in batch
                                     if e.journal is None or e.seq > marks[e.journal]])
                await audit_journal.mark_written(conn, {e.journal: e.seq for e in batch if e.journal is not None})
        except BaseException:
            self._queue[:0] = batch  # in order, ahead of whatever came meanwhile
            raise
        finally:
            self._in_flight = 0
        self.written += len(batch)
        if self.journal is not None:
            self.journal.written(e.journal for e in self._queue)
        return len(batch)


async def append_rows(conn: psycopg.AsyncConnection, rows: list[audit_journal.Row]) -> None:
    """Appends in the caller's transaction; if the database refuses the batch, entry by entry."""
    if not rows:
        return
    try:
        async with conn.transaction():
            await audit.append_many(conn, rows)
    except UNREACHABLE:
        raise
    except Exception as exc:
        log.warning("an audit batch of %d entries was refused (%s); writing them one by one", len(rows), exc)
        await _one_by_one(conn, rows)


async def _one_by_one(conn: psycopg.AsyncConnection, rows: list[audit_journal.Row]) -> None:
    """Each entry in a savepoint of one transaction; those the database refuses become `audit.refused`
    entries saying what was refused and why."""
    async with conn.transaction():
        for tenant, actor, action, target, outcome, detail in rows:
            try:
                async with conn.transaction():
                    await audit.append_many(conn, [(tenant, actor, action, target, outcome, detail)])
            except UNREACHABLE:
                raise
            except Exception as exc:
                log.error("the audit log refused a %s entry: %s", action, exc)
                try:
                    async with conn.transaction():
                        await audit.append(conn, action="audit.refused", outcome="error", tenant=tenant, actor=actor,
                                           target=target, detail={"action": action, "outcome": outcome, "why": str(exc)})
                except UNREACHABLE:
                    raise
                except Exception as again:
                    log.error("could not record the refusal either: %s", again)


def _text(value: str | None) -> str | None:
    return None if value is None else bounded(value)


def _key_prefix(token: str) -> str | None:
    parts = accounts.split_key(token)
    return parts[0] if parts else None


# Why the OAuth verifier refused the token of the current request (set by its `on_refused`).
_oauth_refusal: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("oauth_refusal", default=None)


def note_oauth_refusal(message: str, issuer: Any, subject: Any) -> None:
    """Given to `OAuthVerifier.on_refused`: keeps the reason for the backend below to audit."""
    holder = _oauth_refusal.get()
    if holder is not None:
        holder.update(why=message, issuer=issuer if isinstance(issuer, str) else None,
                      sub=subject if isinstance(subject, str) else None)


def oauth_reason(message: str) -> str:
    """A short, stable reason from the verifier's message (which stays in `detail.why`)."""
    text = message.lower()
    for needle, reason in (("expired", "expired token"), ("audience", "wrong audience"), ("signature", "bad signature"),
                           ("algorithm", "algorithm not accepted"), ("not trusted", "foreign issuer"),
                           ("no issuer", "no issuer"), ("not a signed jwt", "malformed token"),
                           ("no key", "unknown signing key"), ("cannot provision", "cannot provision user"),
                           ("claims", "invalid claims")):
        if needle in text:
            return reason
    return "invalid token"


def client_ip(conn: HTTPConnection) -> str:
    return conn.client.host if conn.client else "unknown"


class DatabaseDown(AuthenticationError):
    """Authentication needed the database and could not reach it (`database_down_response`)."""


def database_down_response(conn: HTTPConnection, exc: Exception) -> Response:
    """The authentication middleware's `on_error`: a 503 that says to retry, not a 401 that says the
    credential is bad; anything else as Starlette answers it (400)."""
    if isinstance(exc, DatabaseDown):
        return JSONResponse({"error": "temporarily_unavailable", "error_description": str(exc)},
                            status_code=503, headers={"Retry-After": "2"})
    return PlainTextResponse(str(exc), status_code=400)


class AuditedBearerBackend(BearerAuthBackend):
    """The SDK's bearer backend, with every decision it makes handed to the audit queue."""

    def __init__(self, token_verifier: TokenVerifier, calls: CallAudit):
        super().__init__(token_verifier)
        self.calls = calls

    async def authenticate(self, conn: HTTPConnection):  # type: ignore[override]
        if is_sandbox_request(conn):
            return None  # the artifact route checks the sandbox's token itself (gateway.artifact_api)
        header = next((v for k, v in conn.headers.items() if k.lower() == "authorization"), None)
        holder: dict[str, Any] = {}
        reset = _oauth_refusal.set(holder)
        try:
            result = await super().authenticate(conn)
        except UNREACHABLE as exc:  # e.g. a new OAuth user to provision: it must wait for the database
            raise DatabaseDown(str(DatabaseUnavailable("Signing you in"))) from exc
        except DatabaseUnavailable as exc:
            raise DatabaseDown(str(exc)) from exc
        finally:
            _oauth_refusal.reset(reset)
        if header is None or not header.lower().startswith("bearer "):
            return result
        token = header[7:].strip()
        ip = client_ip(conn)
        if result is not None:
            user = result[1]
            if isinstance(user, AuthenticatedUser) and isinstance(user.access_token, FleetToken):
                self.calls.accepted(token, user.access_token, ip)
            return result
        if token.startswith(accounts.KEY_PREFIX):
            await self._refused_key(token, ip)
        else:
            why = holder.get("why") or "invalid token"
            self.calls.refused(oauth_reason(why), ip, issuer=holder.get("issuer"), sub=holder.get("sub"), why=why)
        return None

    async def _refused_key(self, token: str, ip: str) -> None:
        prefix = _key_prefix(token)
        if prefix is None:
            self.calls.refused("malformed key", ip)
            return
        reason = "unknown key"
        if self.calls.pool is not None:
            # One indexed lookup by the public prefix, only for refused keys, to tell why.
            try:
                async with self.calls.pool.connection(timeout=2) as db:
                    row = await (await db.execute("SELECT revoked_at IS NOT NULL FROM api_keys WHERE prefix = %s", (prefix,))).fetchone()
            except UNREACHABLE:
                row = None  # cannot tell why: refused all the same
            if row is not None:
                reason = "revoked key" if row[0] else "wrong key secret"
        self.calls.refused(reason, ip, key_prefix=prefix)


def missing_scope_hook(calls: CallAudit) -> Callable[[Any, Any, list[str]], None]:
    """For `RequireBearer(on_missing_scope=...)`: a valid token without the scopes `/mcp` requires."""

    def refused(scope: Any, token: Any, missing: list[str]) -> None:
        identity = getattr(token, "identity", None)
        claims = getattr(token, "claims", None) or {}
        client = scope.get("client")
        calls.refused("missing scope", client[0] if client else "unknown",
                      tenant=getattr(identity, "tenant", None), actor=getattr(identity, "principal", None),
                      issuer=claims.get("iss"), sub=claims.get("sub"), missing=missing)

    return refused
