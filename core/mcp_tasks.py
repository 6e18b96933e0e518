"""The durable store of MCP tasks (the Tasks extension, SEP-2663): one row per task in `mcp_tasks`.

A task belongs to one user: every read and write here takes the owner's user id and matches it
in SQL, so another user's task id is indistinguishable from one that never existed.

Terminal states are final: a result, an error or a cancellation is written only while the task is
still `working` (or `input_required`), so a cancel that wins the race is not overwritten by the
result that arrives after it, and a runner that outlived its heartbeat cannot resurrect a task
already declared lost.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

ACTIVE = ("working", "input_required")

ORPHANED_MESSAGE = (
    "The gateway process running this task stopped before it finished; its outcome is unknown. "
    "Call the tool again."
)
ORPHANED_CODE = -32603  # JSON-RPC internal error: the protocol-level failure the task reports


@dataclass(frozen=True)
class TaskRow:
    id: str
    tool: str
    status: str
    status_message: str | None
    input_requests: dict[str, Any] | None
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
    ttl_ms: int


_COLUMNS = "id, tool, status, status_message, input_requests, result, error, created_at, updated_at, ttl_ms"


def new_task_id() -> str:
    # Unguessable on its own, though ownership, not secrecy, is what keeps tasks apart.
    return secrets.token_urlsafe(18)


class TaskStore:
    def __init__(self, pool: AsyncConnectionPool, runner: str, orphan_after_s: float, address: str | None = None):
        self._pool = pool
        self.runner = runner  # this gateway process
        self.address = address  # where other replicas reach it (Kubernetes), for a tasks/update
        self._orphan_after_s = orphan_after_s

    async def create(self, user_id: int, tool: str, ttl_ms: int) -> TaskRow:
        """A new working task, committed before its id is given to anyone (tasks/get finds it at once)."""
        async with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"""INSERT INTO mcp_tasks (id, user_id, tenant_id, tool, status, ttl_ms, expires_at, runner,
                                           runner_address)
                    SELECT %(id)s, u.id, u.tenant_id, %(tool)s, 'working', %(ttl)s,
                           now() + %(ttl)s * interval '1 millisecond', %(runner)s, %(address)s
                      FROM users u WHERE u.id = %(user)s
                    RETURNING {_COLUMNS}""",
                {"id": new_task_id(), "tool": tool, "ttl": ttl_ms, "runner": self.runner, "user": user_id,
                 "address": self.address},
            )
            row = await cur.fetchone()
        if row is None:
            raise LookupError(f"no user {user_id}")
        return TaskRow(**row)

    async def get(self, user_id: int, task_id: str) -> TaskRow | None:
        """The owner's task, or None (unknown, expired, or someone else's: the caller cannot tell which).
        A task whose runner stopped heartbeating is first declared failed: it will never finish."""
        await self.fail_orphans(task_id)
        async with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"SELECT {_COLUMNS} FROM mcp_tasks WHERE id = %s AND user_id = %s AND expires_at > now()",
                (task_id, user_id),
            )
            row = await cur.fetchone()
        return TaskRow(**row) if row else None

    async def runner_address(self, user_id: int, task_id: str) -> str | None:
        """The address of the replica running the owner's task while it awaits input, else None
        (someone else's, unknown, finished, or run where replicas have no addresses)."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                """SELECT runner_address FROM mcp_tasks
                    WHERE id = %s AND user_id = %s AND expires_at > now() AND status = 'input_required'""",
                (task_id, user_id),
            )
            row = await cur.fetchone()
        return row[0] if row else None

    async def cancel(self, user_id: int, task_id: str) -> bool | None:
        """Cancels the owner's task if it still runs. True: cancelled now; False: already terminal;
        None: no such task of theirs."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                """UPDATE mcp_tasks SET status = 'cancelled', status_message = 'Cancelled by the client.',
                          updated_at = now(), input_requests = NULL
                    WHERE id = %s AND user_id = %s AND expires_at > now() AND status = ANY(%s)""",
                (task_id, user_id, list(ACTIVE)),
            )
            if cur.rowcount:
                return True
            cur = await conn.execute(
                "SELECT 1 FROM mcp_tasks WHERE id = %s AND user_id = %s AND expires_at > now()", (task_id, user_id)
            )
            return False if await cur.fetchone() else None

    async def ask(self, task_id: str, input_requests: dict[str, Any]) -> bool:
        """The server asks the client for input: the task waits, listing the questions."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                """UPDATE mcp_tasks SET status = 'input_required', input_requests = %s, updated_at = now()
                    WHERE id = %s AND status = 'working'""",
                (Jsonb(input_requests), task_id),
            )
            return cur.rowcount == 1

    async def answer(self, user_id: int, task_id: str, keys: list[str]) -> dict[str, Any] | None:
        """The owner answered `keys`: they leave the questions; with none left the task works again.
        Returns what is still unanswered (empty: nothing), None when the task was not waiting."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                """UPDATE mcp_tasks
                      SET input_requests = NULLIF(input_requests - %(keys)s::text[], '{}'::jsonb),
                          status = CASE WHEN input_requests - %(keys)s::text[] = '{}'::jsonb
                                        THEN 'working' ELSE status END,
                          updated_at = now()
                    WHERE id = %(id)s AND user_id = %(user)s AND status = 'input_required' AND expires_at > now()
                    RETURNING input_requests""",
                {"keys": keys, "id": task_id, "user": user_id},
            )
            row = await cur.fetchone()
        return None if row is None else (row[0] or {})

    async def complete(self, task_id: str, result: dict[str, Any]) -> bool:
        """The tool's result (a tool error included: isError is part of a completed result)."""
        return await self._settle(task_id, "completed", None, Jsonb(result), None)

    async def fail(self, task_id: str, code: int, message: str, data: Any = None) -> bool:
        """A protocol-level failure: the call never produced a result."""
        error: dict[str, Any] = {"code": code, "message": message}
        if data is not None:
            error["data"] = data
        return await self._settle(task_id, "failed", message, None, Jsonb(error))

    async def _settle(self, task_id: str, status: str, message: str | None, result: Any, error: Any) -> bool:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                """UPDATE mcp_tasks SET status = %s, status_message = %s, result = %s, error = %s, updated_at = now(),
                          input_requests = NULL
                    WHERE id = %s AND status = ANY(%s)""",
                (status, message, result, error, task_id, list(ACTIVE)),
            )
            return cur.rowcount == 1

    async def status(self, task_id: str) -> str | None:
        """A task's status whoever owns it: for its runner, which watches for a cancel from any replica."""
        async with self._pool.connection() as conn:
            cur = await conn.execute("SELECT status FROM mcp_tasks WHERE id = %s", (task_id,))
            row = await cur.fetchone()
        return row[0] if row else None

    async def heartbeat(self) -> None:
        """This process still runs its tasks (one statement for all of them)."""
        async with self._pool.connection() as conn:
            await conn.execute(
                "UPDATE mcp_tasks SET heartbeat_at = now() WHERE runner = %s AND status = ANY(%s)",
                (self.runner, list(ACTIVE)),
            )

    async def fail_orphans(self, task_id: str | None = None) -> int:
        """Active tasks whose runner has not heartbeaten for `orphan_after_s` are failed, with a message
        that says so: their work died with the process, and no one will ever store a result."""
        query = """UPDATE mcp_tasks SET status = 'failed', status_message = %(message)s, updated_at = now(),
                          input_requests = NULL,
                          error = jsonb_build_object('code', %(code)s::int, 'message', %(message)s::text)
                    WHERE status = ANY(%(active)s) AND runner <> %(runner)s
                      AND heartbeat_at < now() - %(after)s * interval '1 second'"""
        args: dict[str, Any] = {
            "message": ORPHANED_MESSAGE, "code": ORPHANED_CODE, "active": list(ACTIVE),
            "runner": self.runner, "after": self._orphan_after_s,
        }
        if task_id is not None:
            query += " AND id = %(id)s"
            args["id"] = task_id
        async with self._pool.connection() as conn:
            cur = await conn.execute(query, args)
            return cur.rowcount

    async def purge_expired(self) -> int:
        """Tasks past their TTL are gone for good (results included)."""
        async with self._pool.connection() as conn:
            cur = await conn.execute("DELETE FROM mcp_tasks WHERE expires_at <= now()")
            return cur.rowcount
