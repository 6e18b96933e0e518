"""The audit log: append-only and hash-chained.

PostgreSQL keeps the chain (migrations/0002_audit_chain.sql): on insert it assigns the next id
and the time under the lock of a one-row head, stores the predecessor's hash and its own,
SHA-256 over that hash and the entry's canonical form, and moves the head. Updates, deletes and
truncation are refused. `verify` recomputes every hash here, from the stored values, so a
change made with the triggers switched off is still found; only a rewrite of the whole chain
from the changed entry up to and including the head goes unseen, which is why `mcpfleet audit
verify` prints the head's hash for keeping elsewhere.

An entry is read by admins and auditors and exported to other systems, so it must never hold a
secret: `detail` is whatever the caller passes, and callers pass identifiers and hashes of
arguments (`hashlib.sha256(arguments).hexdigest()`), never the arguments, tokens or keys.

Many values come from clients (names, URIs, claims). Every string of an entry, detail included,
is passed through `text.bounded` on the way in: what PostgreSQL cannot store (NUL, lone
surrogates) never fails an append, and no client decides how much an entry adds to a log that
cannot be shrunk.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb

from core.text import bounded, bounded_json

GENESIS = bytes(32)


@dataclass(frozen=True, slots=True)
class Entry:
    id: int
    at: datetime
    tenant: str | None
    actor: str | None
    action: str
    target: str | None
    outcome: str
    detail: dict[str, Any]
    prev_hash: bytes
    hash: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": canonical_time(self.at),
            "tenant": self.tenant,
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "outcome": self.outcome,
            "detail": self.detail,
            "prev_hash": self.prev_hash.hex(),
            "hash": self.hash.hex(),
        }


@dataclass(frozen=True, slots=True)
class Head:
    last_id: int
    last_hash: bytes


@dataclass(frozen=True, slots=True)
class Broken:
    """The first entry at which the chain does not hold, and why."""

    id: int
    reason: str


async def append(
    conn: psycopg.AsyncConnection,
    *,
    action: str,
    outcome: str,
    tenant: str | None = None,
    actor: str | None = None,
    target: str | None = None,
    detail: dict[str, Any] | None = None,
) -> int:
    """Append an entry; returns its id.

    Inside the caller's transaction the entry commits or rolls back with the change it records.
    The chain's head then stays locked until that transaction ends, which holds up every other
    append: append last, just before commit. On an autocommit connection the insert is a
    transaction of its own. Under REPEATABLE READ or SERIALIZABLE a concurrent append makes this
    fail with a serialization error, to be retried like any other.

    `detail` must not hold secrets (see the module's docstring).
    """
    cur = await conn.execute(_INSERT + " RETURNING id", _row(tenant, actor, action, target, outcome, detail or {}))
    row = await cur.fetchone()
    assert row is not None
    return row[0]


_INSERT = "INSERT INTO audit_entries (tenant, actor, action, target, outcome, detail) VALUES (%s, %s, %s, %s, %s, %s)"


def _row(tenant: str | None, actor: str | None, action: str, target: str | None, outcome: str,
         detail: dict[str, Any]) -> tuple[Any, ...]:
    """The insert's parameters, every string bounded (see the module's docstring)."""

    def text(value: str | None) -> str | None:
        return None if value is None else bounded(value)

    return (text(tenant), text(actor), bounded(action), text(target), bounded(outcome), Jsonb(bounded_json(detail)))


async def append_many(
    conn: psycopg.AsyncConnection, entries: list[tuple[str | None, str | None, str, str | None, str, dict[str, Any]]]
) -> None:
    """Append (tenant, actor, action, target, outcome, detail) entries in order, in one pipeline:
    the triggers chain each row under the head's lock, taken once for the caller's transaction."""
    async with conn.cursor() as cur:
        await cur.executemany(_INSERT, [_row(*entry) for entry in entries])


def canonical_time(at: datetime) -> str:
    return at.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def canonical(
    id: int,
    at: datetime,
    tenant: str | None,
    actor: str | None,
    action: str,
    target: str | None,
    outcome: str,
    detail_text: str,
) -> str:
    """The text that PostgreSQL's `audit_canonical()` makes of the same values: jsonb's text of an
    array. `detail_text` is the detail as jsonb prints it (`detail::text`), which fixes key order
    and number form however the detail was written."""
    scalars = [
        json.dumps(v, ensure_ascii=False) for v in (id, canonical_time(at), tenant, actor, action, target, outcome)
    ]
    return "[" + ", ".join([*scalars, detail_text]) + "]"


def entry_hash(prev_hash: bytes, canonical_text: str) -> bytes:
    return hashlib.sha256(prev_hash + canonical_text.encode()).digest()


async def head(conn: psycopg.AsyncConnection) -> Head | None:
    row = await (await conn.execute("SELECT last_id, last_hash FROM audit_head")).fetchone()
    return Head(last_id=row[0], last_hash=bytes(row[1])) if row else None


async def verify(conn: psycopg.AsyncConnection, *, batch: int = 1000) -> Broken | None:
    """Walk the chain in id order; returns the first broken entry, or None if the log is intact.

    On a connection outside a transaction the walk and the head are read in one snapshot of its
    own, so appends made meanwhile do not count; inside a transaction, in the caller's.
    """
    if conn.info.transaction_status == TransactionStatus.IDLE:
        async with conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            return await _walk(conn, batch)
    return await _walk(conn, batch)


async def _walk(conn: psycopg.AsyncConnection, batch: int) -> Broken | None:
    top = await head(conn)
    expected, prev = 1, GENESIS
    # Not from 1: an entry slipped in below the first one must be seen too.
    start = -(2**63)
    while True:
        rows = await (
            await conn.execute(
                """SELECT id, at, tenant, actor, action, target, outcome, detail::text, prev_hash, hash
                     FROM audit_entries WHERE id >= %s ORDER BY id LIMIT %s""",
                (start, batch),
            )
        ).fetchall()
        for id, at, tenant, actor, action, target, outcome, detail_text, prev_hash, stored_hash in rows:
            if id < expected:
                return Broken(id, f"out of place: it precedes entry {expected}, where the chain goes on")
            if id > expected:
                missing = f"entries {expected}..{id - 1} are" if id - 1 > expected else "it is"
                return Broken(expected, f"gap: {missing} missing, the next stored entry is {id}")
            if top is not None and id > top.last_id:
                return Broken(id, f"head mismatch: it lies beyond the head, which ends the log at entry {top.last_id}")
            if bytes(prev_hash) != prev:
                before = f"entry {id - 1}" if id > 1 else "the chain's start"
                return Broken(id, f"link mismatch: it does not carry the hash of {before}")
            computed = entry_hash(prev, canonical(id, at, tenant, actor, action, target, outcome, detail_text))
            if computed != bytes(stored_hash):
                return Broken(id, "hash mismatch: it was changed after it was written")
            expected, prev = id + 1, computed
        if len(rows) < batch:
            break
        start = expected
    if top is None:
        return Broken(expected, "head mismatch: the head is missing, so where the log ends is unknown")
    if top.last_id >= expected:
        missing = f"entries {expected}..{top.last_id} are" if top.last_id > expected else "it is"
        return Broken(expected, f"head mismatch: {missing} missing, the head says the log ends at entry {top.last_id}")
    if top.last_hash != prev:
        return Broken(expected - 1, "head mismatch: the head holds another hash for it")
    return None


async def entries(
    conn: psycopg.AsyncConnection,
    *,
    tenant: str | None = None,
    since: datetime | None = None,
    limit: int | None = None,
    batch: int = 1000,
) -> AsyncIterator[Entry]:
    """Entries in id order, optionally of one tenant and from a time on; fetched in batches so that
    an export of a long log streams."""
    conditions: list[str] = ["id >= %s"]
    params: list[Any] = []
    if tenant is not None:
        conditions.append("tenant = %s")
        params.append(tenant)
    if since is not None:
        conditions.append("at >= %s")
        params.append(since)
    query = f"""SELECT id, at, tenant, actor, action, target, outcome, detail, prev_hash, hash
                  FROM audit_entries WHERE {" AND ".join(conditions)} ORDER BY id LIMIT %s"""
    start, left = -(2**63), limit
    while left is None or left > 0:
        size = batch if left is None else min(batch, left)
        rows = await (await conn.execute(query, (start, *params, size))).fetchall()
        for r in rows:
            yield Entry(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], bytes(r[8]), bytes(r[9]))
        if len(rows) < size:
            return
        start = rows[-1][0] + 1
        if left is not None:
            left -= len(rows)
